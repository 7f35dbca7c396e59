//! The dashboard in a real browser, as part of `cargo test --workspace`: runs
//! the Node suite in `tests/browser/` (headless Debian chromium driven by
//! playwright-core, axe-core for accessibility) against this build's
//! `sluice` binary. Once per CI run: with the SQLite backend (the suite
//! starts its own server on SQLite either way).
//!
//! Needs `node`, `/usr/bin/chromium`, `/usr/bin/firefox-esr` (the Firefox
//! smoke test, `firefox.test.mjs`, over WebDriver BiDi) and
//! `tests/browser/node_modules` (`.ci/run` installs them all). Under `CI=true` anything missing fails the
//! test; elsewhere it is skipped with a message.

use std::path::Path;
use std::process::Command;

#[test]
fn dashboard_in_a_real_browser() {
    if crate::helpers::backend() == "postgres" {
        eprintln!("browser suite: runs in the SQLite pass only");
        return;
    }
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let chromium = std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let firefox = std::env::var("SLUICE_FIREFOX").unwrap_or_else(|_| "/usr/bin/firefox-esr".into());
    let node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    let missing: Vec<&str> = [
        (!node).then_some("node"),
        (!Path::new(&chromium).exists()).then_some("chromium (apt-get install chromium)"),
        (!Path::new(&firefox).exists()).then_some("firefox (apt-get install firefox-esr)"),
        (!suite.join("node_modules/playwright-core").exists()).then_some("tests/browser/node_modules (cd tests/browser && npm install)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        assert!(!ci, "the browser suite cannot run under CI=true; missing: {}", missing.join(", "));
        eprintln!("browser suite skipped; missing: {}", missing.join(", "));
        return;
    }
    // A browser, a server and their polling for two minutes: heavy work,
    // run apart from the latency tests that measure another tenant's delay.
    let _heavy = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(crate::helpers::heavy());
    let out = Command::new("node")
        .arg("--test")
        .arg(".")
        .current_dir(&suite)
        .env("SLUICE_BIN", env!("CARGO_BIN_EXE_sluice"))
        .output()
        .expect("running node --test");
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", text.lines().filter(|l| l.starts_with("# ") || l.starts_with("not ok") || l.starts_with("ok ")).collect::<Vec<_>>().join("\n"));
    assert!(out.status.success(), "the browser suite failed:\n{text}");
}
