//! The customer-health CLI (`sluice customers list|why`, `sluice health
//! config apply|show`, `sluice health backtest`) against a real server, in
//! an Asia/Tokyo workspace: each command's output is checked against what
//! the API answers for the same question.

use std::time::{Duration, Instant};

use chrono::{Duration as Dur, FixedOffset, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{cli, Api, Server};

/// A JSON value as the CLI prints it in a cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The data rows of a CLI table (after the header and its rule), as cells.
fn rows(out: &str, header_starts: &str) -> Vec<Vec<String>> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with(header_starts));
    let header = lines.next().unwrap_or_else(|| panic!("no table with {header_starts:?} in:\n{out}"));
    let n = header.split('|').count();
    let rule = lines.next().unwrap_or_default();
    assert!(rule.starts_with("--"), "no rule under the header in:\n{out}");
    lines
        .take_while(|l| l.contains(" |"))
        .map(|l| {
            // The last column (a note) may be empty: the line ends at its `|`.
            let mut cells: Vec<String> = l.splitn(n, '|').map(|c| c.trim().to_owned()).collect();
            cells.resize(n, String::new());
            cells
        })
        .collect()
}

/// The value of a `key:   value` line of `customers why`.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or_else(|| panic!("no {key}: line in:\n{out}")).trim()
}

async fn wait_until(what: &str, secs: u64, api: &Api, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (st, v) = api.get(path).await;
        if st == StatusCode::OK && done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config() -> Value {
    json!({"measures": {
            "logins_7d": {"kind": "count", "event_type": "login", "days": 7},
            "idle": {"kind": "days_since_last", "event_type": "login"}},
        "stages": [{"name": "active", "rule": {"all": []}}],
        "scorecards": {"active": [
            {"measure": "logins_7d", "weight": 3, "thresholds": [{"min": 5, "points": 100}, {"min": 2, "points": 50}, {"min": null, "points": 0}]},
            {"measure": "idle", "weight": 1, "linear": {"from": 10, "to": 0}}]},
        "bands": {"good": 70, "normal": 40}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_list_why_config_and_backtest_through_the_cli() {
    let s = Server::start().await;
    let root = s.root();
    let (st, v) = root.post("/v1/workspaces", json!({"name": "hcli", "time_zone": "Asia/Tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, key) = root.post("/v1/keys", json!({"name": "admin", "scope": "admin", "workspace": "hcli"})).await;
    assert_eq!(st, StatusCode::CREATED, "{key}");
    let secret = key["secret"].as_str().unwrap().to_owned();
    let api = s.api(&secret);
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", secret.as_str())];

    // Logins: acme 6 (good), bolt 2 (normal), core 1 and dune 1 three days
    // ago (bad); dune has the highest mrr, so the highest priority.
    let now = Utc::now();
    let rfc = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut events = Vec::new();
    for (c, n, ago) in [("acme", 6, Dur::minutes(1)), ("bolt", 2, Dur::minutes(1)), ("core", 1, Dur::minutes(1)), ("dune", 1, Dur::days(3))] {
        for i in 0..n {
            events.push(json!({"id": format!("{c}-{i}"), "type": "login", "customer_id": c, "timestamp": rfc(now - ago - Dur::seconds(i))}));
        }
    }
    api.ingest(Value::Array(events)).await;
    for (c, mrr) in [("acme", 2000), ("bolt", 3000), ("core", 1000), ("dune", 5000)] {
        let (st, v) = api.send(api.req(Method::PATCH, &format!("/v1/customers/{c}")).json(&json!({"mrr": mrr}))).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    wait_until("the health consumer to catch up", 120, &root, "/v1/consumers", |c| {
        c["data"].as_array().is_some_and(|d| d.iter().any(|c| c["name"] == "health" && c["lag"] == json!(0)))
    })
    .await;

    // health config apply: the version and the recompute job.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("health.json");
    std::fs::write(&file, serde_json::to_string_pretty(&config()).unwrap()).unwrap();
    let (ok, out, err) = cli(&["health", "config", "apply", file.to_str().unwrap()], &env, None);
    assert!(ok, "{err}");
    assert!(out.contains("version 1"), "{out}");
    let job = out.lines().find_map(|l| l.strip_prefix("recompute job ")).and_then(|l| l.split_whitespace().next()).expect("a job id").to_owned();
    let j = wait_until("the recompute job", 120, &api, &format!("/v1/jobs/{job}"), |j| j["status"] == "succeeded" || j["status"] == "failed").await;
    assert_eq!(j["kind"], "health.recompute", "{j}");
    assert_eq!(j["status"], "succeeded", "{j}");
    wait_until("every customer evaluated", 60, &api, "/v1/customers?sort=priority", |l| l["data"].as_array().map(Vec::len) == Some(4)).await;

    // customers list --band bad --sort priority: the API's rows, in its order.
    let (_, want) = api.get("/v1/customers?band=bad&sort=priority").await;
    let want = want["data"].as_array().unwrap().clone();
    assert_eq!(want.iter().map(|c| c["customer_id"].as_str().unwrap()).collect::<Vec<_>>(), ["dune", "core"], "{want:?}");
    let (ok, out, err) = cli(&["customers", "list", "--band", "bad", "--sort", "priority"], &env, None);
    assert!(ok, "{err}");
    let got = rows(&out, "customer_id");
    assert_eq!(got.len(), want.len(), "{out}");
    for (g, w) in got.iter().zip(&want) {
        let expect = [&w["customer_id"], &w["stage"], &w["band"], &w["score"], &w["priority"], &w["attributes"]["mrr"]].map(cell);
        assert_eq!(g.as_slice(), expect.as_slice(), "{out}");
    }
    assert_eq!(got[0][2], "bad");
    // --sort -score (a value starting with a dash) and --limit.
    let (_, top) = api.get("/v1/customers?sort=-score&limit=2").await;
    let (ok, out, err) = cli(&["customers", "list", "--sort", "-score", "--limit", "2"], &env, None);
    assert!(ok, "{err}");
    let got = rows(&out, "customer_id");
    let ids: Vec<&str> = got.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(ids, top["data"].as_array().unwrap().iter().map(|c| c["customer_id"].as_str().unwrap()).collect::<Vec<_>>(), "{out}");
    assert_eq!(ids[0], "acme");
    // --format json: the API's rows.
    let (ok, out, err) = cli(&["customers", "list", "--band", "bad", "--sort", "priority", "--format", "json"], &env, None);
    assert!(ok, "{err}");
    let rows_json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows_json.as_array().unwrap().len(), 2);
    assert_eq!(rows_json[0]["customer_id"], "dune");

    // customers why: stage and rule, score, band, the measures, the explanation.
    let (st, h) = api.get("/v1/customers/dune/health").await;
    assert_eq!(st, StatusCode::OK, "{h}");
    let (ok, out, err) = cli(&["customers", "why", "dune"], &env, None);
    assert!(ok, "{err}");
    assert!(field(&out, "stage").starts_with("active (rule: {\"all\":[]})"), "{out}");
    assert_eq!(field(&out, "score"), cell(&h["score"]), "{out}");
    assert_eq!(field(&out, "band"), cell(&h["band"]), "{out}");
    assert_eq!(field(&out, "band"), "bad");
    let table = rows(&out, "measure");
    let measures = h["measures"].as_array().unwrap();
    assert_eq!(table.len(), measures.len(), "{out}");
    for m in measures {
        let r = table.iter().find(|r| r[0] == cell(&m["name"])).unwrap_or_else(|| panic!("no row for {m} in:\n{out}"));
        let value = if m["value"].is_null() { "-".to_owned() } else { cell(&m["value"]) };
        let got = [&r[1], &r[2], &r[3], &r[5], &r[6]].map(String::clone);
        assert_eq!(got, [value, cell(&m["points"]), cell(&m["weight"]), cell(&m["contribution"]), cell(&m["note"])], "{out}");
    }
    // The contributions add up to the score (independently, and as printed).
    let sum: f64 = measures.iter().filter_map(|m| m["contribution"].as_f64()).sum();
    assert!((sum - h["score"].as_f64().unwrap()).abs() < 1e-9, "{h}");
    assert!(out.contains(&format!("the contributions add up to the score, {}", cell(&h["score"]))), "{out}");
    for n in h["explanation"].as_array().unwrap() {
        assert!(out.contains(n.as_str().unwrap()), "{n} not in:\n{out}");
    }
    // --as-of: the same evaluation as the API's at that time.
    let t = rfc(now - Dur::days(1));
    let (_, past) = api.get(&format!("/v1/customers/dune/health?as_of={}", sluice_client::urlencode(&t))).await;
    let (ok, out, err) = cli(&["customers", "why", "dune", "--as-of", &t], &env, None);
    assert!(ok, "{err}");
    assert_eq!(field(&out, "score"), cell(&past["score"]), "{out}");
    assert!(field(&out, "as of").contains(&t[..19]), "{out}");
    let (ok, _, err) = cli(&["customers", "why", "nobody"], &env, None);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");

    // An invalid configuration: exit status 1, the bad part named by its path.
    let mut bad = config();
    bad["measures"]["logins_7d"]["days"] = json!(0);
    let bad_file = dir.path().join("bad.json");
    std::fs::write(&bad_file, bad.to_string()).unwrap();
    let (ok, out, err) = cli(&["health", "config", "apply", bad_file.to_str().unwrap()], &env, None);
    assert!(!ok, "{out}");
    assert!(err.contains("measures.logins_7d.days"), "{err}");
    // Nothing applied: config show prints version 1 and its JSON.
    let (ok, out, err) = cli(&["health", "config", "show"], &env, None);
    assert!(ok, "{err}");
    assert!(err.contains("version 1"), "{err}");
    let (_, current) = api.get("/v1/health/config").await;
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), current["config"]);

    // A tiny backtest: core churns tomorrow (Tokyo), one step now.
    let tomorrow = (Utc::now().with_timezone(&FixedOffset::east_opt(9 * 3600).unwrap()).date_naive() + Dur::days(1)).format("%Y-%m-%d").to_string();
    let (st, v) = api.send(api.req(Method::PATCH, "/v1/customers/core").json(&json!({"churned_at": tomorrow}))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let at = rfc(Utc::now());
    let (ok, out, err) = cli(&["health", "backtest", "--from", &at, "--to", &at, "--step-days", "1", "--horizon-days", "30"], &env, None);
    assert!(ok, "{err}");
    let id = err.lines().find_map(|l| l.strip_prefix("backtest ")).expect("the backtest's id on stderr").trim().to_owned();
    let (st, bt) = api.get(&format!("/v1/health/backtests/{id}")).await;
    assert_eq!(st, StatusCode::OK, "{bt}");
    assert_eq!(bt["status"], "succeeded", "{bt}");
    let bands = rows(&out, "band");
    let want: Vec<Vec<String>> = bt["bands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let rate = b["churn_rate"].as_f64().map(|r| format!("{r:.4}")).unwrap_or_else(|| "-".into());
            vec![cell(&b["band"]), cell(&b["customers"]), cell(&b["churned"]), rate]
        })
        .collect();
    assert_eq!(bands, want, "{out}");
    let bad_band = bt["bands"].as_array().unwrap().iter().find(|b| b["band"] == "bad").unwrap();
    assert_eq!((bad_band["customers"].as_u64(), bad_band["churned"].as_u64()), (Some(2), Some(1)), "{bt}");
    let auc = bt["auc"].as_f64().expect("an AUC: one customer churned, three did not");
    assert!(out.contains(&format!("AUC: {auc:.4}")), "{out}");
    // A bad request names the field.
    let (ok, _, err) = cli(&["health", "backtest", "--from", "yesterday", "--to", &at], &env, None);
    assert!(!ok);
    assert!(err.contains("from"), "{err}");
}
