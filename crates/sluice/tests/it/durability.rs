//! Crashes, restarts and shutdown: nothing acknowledged is lost or doubled.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_sustained_ingest_loses_and_doubles_nothing() {
    let mut s = Server::start().await;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let attempted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let api = s.root();
        let (acked, attempted) = (acked.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            for seq in 0.. {
                let ids: Vec<String> = (0..50).map(|i| format!("w{w}-s{seq}-i{i}")).collect();
                attempted.lock().unwrap().extend(ids.iter().cloned());
                let body: Vec<_> = ids.iter().map(|id| json!({"id": id, "type": "load", "customer_id": format!("c{}", seq % 13)})).collect();
                match api.req(reqwest::Method::POST, "/v1/events").json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        acked.lock().unwrap().extend(ids);
                    }
                    _ => return, // the server is gone
                }
            }
        }));
    }
    // Let the load run, then crash the server in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    assert!(acked.len() >= 500, "too little load before the crash: {}", acked.len());

    s.restart();
    let api = s.root();
    let stored: Vec<String> = api.all_events("").await.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    let unique: HashSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "an event is stored twice");
    assert!(acked.is_subset(&unique), "{} acknowledged events lost", acked.difference(&unique).count());
    assert!(unique.is_subset(&attempted));
    // Every acknowledged event is readable by id.
    for id in acked.iter().take(200) {
        assert_eq!(api.get(&format!("/v1/events/{id}")).await.0, StatusCode::OK, "{id}");
    }
    // Clients retry what was not acknowledged; afterwards each event is stored once.
    let all: Vec<_> = attempted.iter().map(|id| json!({"id": id, "type": "load"})).collect();
    let mut accepted = 0;
    let mut duplicates = 0;
    for chunk in all.chunks(5000) {
        let (a, d) = api.ingest(json!(chunk)).await;
        accepted += a;
        duplicates += d;
    }
    assert_eq!(duplicates as usize, unique.len());
    assert_eq!(accepted as usize, attempted.len() - unique.len());
    assert_eq!(api.all_events("").await.len(), attempted.len());
}

#[tokio::test]
async fn torn_log_tail_is_repaired_on_start() {
    use std::io::Write;
    let mut s = Server::start().await;
    let api = s.root();
    let events: Vec<_> = (0..100).map(|i| json!({"id": format!("e{i}"), "type": "t", "customer_id": "one-customer"})).collect();
    api.ingest(json!(events)).await;
    s.kill9();
    // Simulate a write torn by a crash: half a record at the end of the active segment.
    let mut segments: Vec<_> = walk(&s.data_dir().join("log")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
    segments.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let biggest = segments.last().unwrap().clone();
    let mut f = std::fs::OpenOptions::new().append(true).open(&biggest).unwrap();
    f.write_all(&[0x2a, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
    drop(f);
    s.restart();
    let log = s.stderr_text();
    assert!(log.contains("torn log tail") && log.contains("cut_bytes=11"), "{log}");
    let api = s.root();
    assert_eq!(api.all_events("").await.len(), 100);
    assert_eq!(api.ingest(json!([{"id": "e5", "type": "t"}, {"id": "after", "type": "t", "customer_id": "one-customer"}])).await, (1, 1));
    assert_eq!(api.all_events("&customer_id=one-customer").await.len(), 101);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut s = Server::start().await;
    let api = s.root();
    api.ingest(json!([{"id": "a", "type": "t"}, {"id": "b", "type": "t"}])).await;
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}; log:\n{}", s.stderr_text());
    assert!(s.stderr_text().contains("stopped cleanly"), "{}", s.stderr_text());
    s.restart();
    let api = s.root();
    assert_eq!(api.all_events("").await.len(), 2);
    // A clean stop leaves nothing to repair.
    assert!(!s.stderr_text().contains("torn"), "{}", s.stderr_text());
}

#[tokio::test]
async fn first_start_prints_a_root_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = if crate::helpers::backend() == "postgres" { sluice_store::testing::TestDatabase::create().await } else { None };
    let state_url = db.as_ref().map(|d| d.url.clone()).unwrap_or_else(|| format!("sqlite://{}", dir.path().join("state.db").display()));
    let start = || {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(crate::helpers::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(["--state-url", &state_url])
            .env_remove("SLUICE_BOOTSTRAP_KEY")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut text = String::new();
        let mut url = String::new();
        for line in BufReader::new(child.stderr.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(u) = line.strip_prefix("sluice listening on ") {
                url = u.to_owned();
                break;
            }
            text.push_str(&line);
            text.push('\n');
        }
        (child, text, url)
    };
    let (mut child, text, url) = start();
    let key = text.split_whitespace().find(|w| w.starts_with("sk_")).expect("root key printed").to_owned();
    let resp = reqwest::Client::new().get(format!("{url}/v1/workspaces")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, text, _) = start();
    assert!(!text.contains("sk_"), "the root key was printed again:\n{text}");
    child.kill().unwrap();
    child.wait().unwrap();
}
