//! CSV usage imports.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{cli, Api, Server};

async fn setup() -> (Server, Api, String) {
    let s = Server::start().await;
    let root = s.root();
    root.post("/v1/workspaces", json!({"name": "jst", "time_zone": "Asia/Tokyo"})).await;
    let (_, key) = root.post("/v1/keys", json!({"name": "a", "scope": "admin", "workspace": "jst"})).await;
    let secret = key["secret"].as_str().unwrap().to_owned();
    let api = s.api(&secret);
    let (st, _) =
        api.post("/v1/meters", json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "usage.gb"})).await;
    assert_eq!(st, StatusCode::CREATED);
    (s, api, secret)
}

async fn import(api: &Api, query: &str, body: Vec<u8>) -> (StatusCode, Value) {
    api.send(api.req(reqwest::Method::POST, &format!("/v1/imports?kind=usage&wait=true{query}")).header("content-type", "text/csv").body(body)).await
}

async fn monthly(api: &Api, customer: &str) -> Vec<(String, String)> {
    // The meters consumer applies imported rows asynchronously: wait until stable.
    let mut last = Vec::new();
    let mut stable = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stable < 3 {
        let (_, v) = api.get(&format!("/v1/meters/gb/usage?granularity=month&customer_id={customer}")).await;
        let rows: Vec<(String, String)> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["period_start"].as_str().unwrap().to_owned(), r["value"].as_str().unwrap().to_owned()))
            .collect();
        let lag = api.get("/v1/consumers").await.1["data"].as_array().unwrap().iter().find(|c| c["name"] == "meters").map(|c| c["lag"].clone());
        if rows == last && lag == Some(json!(0)) {
            stable += 1
        } else {
            stable = 0
        }
        last = rows;
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_world_csv_imports_once_in_the_workspace_time_zone() {
    let (s, api, secret) = setup().await;
    // BOM, CRLF, upper-case headers in another order, a quoted customer with a comma and a
    // newline, a date meaning midnight in Tokyo, an explicit id, two identical rows, blank lines.
    let csv = "\u{feff}Meter,Customer_ID,quantity,TIMESTAMP,subscription_id,id\r\n\
               gb,\"acme, inc\nHQ\",0.1,2024-02-01,s1,\r\n\
               gb,\"acme, inc\nHQ\",0.1,2024-01-31T23:59:59+09:00,s1,\r\n\
               gb,beta,2.5,2024-02-10T10:00:00Z,,row-7\r\n\
               gb,beta,0.1,2024-02-10T10:00:00Z,,\r\n\
               gb,beta,0.1,2024-02-10T10:00:00Z,,\r\n\r\n\r\n";
    let (st, v) = import(&api, "", csv.as_bytes().to_vec()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!((v["rows_total"].as_u64(), v["rows_imported"].as_u64(), v["rows_duplicate"].as_u64()), (Some(5), Some(5), Some(0)), "{v}");
    assert_eq!(
        monthly(&api, "acme%2C%20inc%0AHQ").await,
        vec![("2023-12-31T15:00:00Z".to_owned(), "0.1".to_owned()), ("2024-01-31T15:00:00Z".to_owned(), "0.1".to_owned())]
    );
    assert_eq!(monthly(&api, "beta").await, vec![("2024-01-31T15:00:00Z".to_owned(), "2.7".to_owned())]);
    // The same file again: every row a duplicate, totals unchanged.
    let (_, v) = import(&api, "", csv.as_bytes().to_vec()).await;
    assert_eq!((v["rows_imported"].as_u64(), v["rows_duplicate"].as_u64()), (Some(0), Some(5)), "{v}");
    assert_eq!(monthly(&api, "beta").await, vec![("2024-01-31T15:00:00Z".to_owned(), "2.7".to_owned())]);
    // The explicit id became the event id.
    assert_eq!(api.get("/v1/events/row-7").await.1["customer_id"], "beta");

    // Strict: bad rows → nothing imported, every bad row listed with its number.
    let bad = "customer_id,meter,timestamp,quantity\nbeta,gb,2024-03-01,1\nbeta,nope,2024-03-01,1\nbeta,gb,yesterday,x\nbeta,gb,2024-03-02,2\n";
    let (st, v) = import(&api, "", bad.as_bytes().to_vec()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["rows_rejected"], 2);
    assert_eq!(v["rows_imported"], 0);
    let errs: Vec<(u64, String)> =
        v["errors"].as_array().unwrap().iter().map(|e| (e["row"].as_u64().unwrap(), e["column"].as_str().unwrap().to_owned())).collect();
    assert_eq!(errs, vec![(3, "meter".into()), (4, "timestamp".into()), (4, "quantity".into())]);
    assert_eq!(monthly(&api, "beta").await, vec![("2024-01-31T15:00:00Z".to_owned(), "2.7".to_owned())]);
    // skip_invalid: exactly the good rows.
    let (_, v) = import(&api, "&mode=skip_invalid", bad.as_bytes().to_vec()).await;
    assert_eq!((v["status"].as_str(), v["rows_imported"].as_u64(), v["rows_rejected"].as_u64()), (Some("succeeded"), Some(2), Some(2)), "{v}");
    assert_eq!(
        monthly(&api, "beta").await,
        vec![("2024-01-31T15:00:00Z".to_owned(), "2.7".to_owned()), ("2024-02-29T15:00:00Z".to_owned(), "3".to_owned())]
    );
    // Not UTF-8: a clear error naming the row.
    let mut latin1 = b"customer_id,meter,timestamp,quantity\nbeta,gb,2024-03-01,1\n".to_vec();
    latin1.extend_from_slice(b"caf\xe9,gb,2024-03-01,1\n");
    let (_, v) = import(&api, "", latin1).await;
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("row 3") && v["error"].as_str().unwrap().contains("UTF-8"), "{v}");
    // A missing column.
    let (_, v) = import(&api, "", b"customer,meter\nx,gb\n".to_vec()).await;
    assert!(v["error"].as_str().unwrap().contains("customer_id"), "{v}");
    // The meters consumer cannot be reset (its usage is cumulative).
    assert_eq!(s.root().post("/v1/consumers/meters/reset", json!({"to": "earliest"})).await.0, StatusCode::CONFLICT);
    // Multipart upload (bigger than axum's default 2 MiB body limit), and the list.
    let mut big = String::from("customer_id,meter,timestamp,quantity\n");
    while big.len() < 3 << 20 {
        big.push_str("zeta,gb,2024-04-02,0\n");
    }
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(big.into_bytes()).file_name("big.csv"));
    let (st, v) = api.send(api.req(reqwest::Method::POST, "/v1/imports?kind=usage&wait=true").multipart(form)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"customer_id,meter,timestamp,quantity\ngamma,gb,2024-04-01,4\n".to_vec()).file_name("usage.csv"),
    );
    let (st, v) = api.send(api.req(reqwest::Method::POST, "/v1/imports?kind=usage&wait=true").multipart(form)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!((v["rows_imported"].as_u64(), v["filename"].as_str()), (Some(1), Some("usage.csv")));
    let (_, list) = api.get("/v1/imports").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 8);
    let id = list["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(api.get(&format!("/v1/imports/{id}")).await.1["id"], id.as_str());
    // The CLI uploads, waits and prints the summary.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.csv");
    std::fs::write(&file, "customer_id,meter,timestamp,quantity\ndelta,gb,2024-05-01,1.5\n").unwrap();
    let (ok, out, err) = cli(&["import", file.to_str().unwrap()], &[("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", secret.as_str())], None);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["rows_imported"], 1, "{out}");
    let (ok, _, err) = cli(
        &["import", "--mode", "strict", "-"],
        &[("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", secret.as_str())],
        Some("customer_id,meter,timestamp,quantity\ndelta,gb,never,1\n"),
    );
    assert!(!ok);
    assert!(err.contains("row 2") && err.contains("timestamp"), "{err}");
}

fn big_csv(rows: usize, prefix: &str) -> String {
    let mut s = String::from("customer_id,meter,timestamp,quantity\n");
    for i in 0..rows {
        s.push_str(&format!("{prefix}{},gb,2024-02-{:02}T{:02}:00:00+09:00,0.{}\n", i % 7, i % 28 + 1, i % 24, i % 10));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_interrupted_by_kill9_completes_after_restart_exactly_once() {
    let s = Server::start_with(&[("SLUICE_JOB_LEASE", "1s")]).await;
    let mut s = s;
    let root = s.root();
    root.post("/v1/workspaces", json!({"name": "jst", "time_zone": "Asia/Tokyo"})).await;
    let (_, key) = root.post("/v1/keys", json!({"name": "a", "scope": "admin", "workspace": "jst"})).await;
    let secret = key["secret"].as_str().unwrap().to_owned();
    let api = s.api(&secret);
    api.post("/v1/meters", json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "gb"})).await;
    let rows = 60_000;
    let (st, v) =
        api.send(api.req(reqwest::Method::POST, "/v1/imports?kind=usage").header("content-type", "text/csv").body(big_csv(rows, "k"))).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    // Crash once the import has made progress (or right away if it is fast).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = api.get(&format!("/v1/imports/{id}")).await;
        if v["rows_processed"].as_u64().unwrap_or(0) > 0 || v["status"] != "queued" {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.restart();
    let api = s.api(&secret);
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let (_, v) = api.get(&format!("/v1/imports/{id}")).await;
        if v["status"] == "succeeded" {
            break v;
        }
        assert!(Instant::now() < deadline, "import did not complete after the restart: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["rows_total"], rows);
    // Every row counted exactly once: 60,000 rows of 0.0 … 0.9 → sum 27,000.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, u) = api.get("/v1/meters/gb/usage").await;
        let total: rust_decimal::Decimal =
            u["data"].as_array().unwrap().iter().map(|r| r["value"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap()).sum();
        let events = api.all_events("&type=storage.used").await.len();
        if events == rows && total == rust_decimal::Decimal::from(27_000) {
            break;
        }
        assert!(events <= rows, "{events} events for {rows} rows");
        assert!(Instant::now() < deadline, "total {total}, events {events}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_imports_run_in_order_and_can_be_cancelled() {
    let (_s, api, _) = setup().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        // The first is larger, so that it is still running when cancelled
        // (a release build imports 20,000 rows in 60 ms).
        let rows = if i == 0 { 150_000 } else { 20_000 };
        let (st, v) = api
            .send(api.req(reqwest::Method::POST, "/v1/imports?kind=usage").header("content-type", "text/csv").body(big_csv(rows, &format!("q{i}-"))))
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Cancel the last one while it waits, and the first while it runs.
    let (st, v) = api.post(&format!("/v1/jobs/{}/cancel", ids[3]), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "cancelled");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = api.get(&format!("/v1/imports/{}", ids[0])).await;
        if v["status"] != "queued" {
            break; // running (or, on a very fast machine, already done: checked below)
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    api.post(&format!("/v1/jobs/{}/cancel", ids[0]), json!({})).await;
    let mut finished = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut all_done = true;
        for id in &ids {
            let (_, v) = api.get(&format!("/v1/imports/{id}")).await;
            if !matches!(v["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                all_done = false;
            } else if !finished.iter().any(|(i, _, _)| i == id) {
                finished.push((id.clone(), v["status"].as_str().unwrap().to_owned(), v["finished_at"].as_str().unwrap_or("").to_owned()));
            }
        }
        if all_done {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: HashMap<&str, &str> = finished.iter().map(|(i, s, _)| (i.as_str(), s.as_str())).collect();
    assert_eq!(status[ids[3].as_str()], "cancelled");
    assert!(matches!(status[ids[0].as_str()], "cancelled" | "succeeded"), "the running import stops at its next check, or had finished");
    assert_eq!(status[ids[1].as_str()], "succeeded");
    assert_eq!(status[ids[2].as_str()], "succeeded");
    // Queued imports ran in order: the second finished before the third started.
    let (_, a) = api.get(&format!("/v1/jobs/{}", ids[1])).await;
    let (_, b) = api.get(&format!("/v1/jobs/{}", ids[2])).await;
    assert!(a["finished_at"].as_str().unwrap() <= b["started_at"].as_str().unwrap(), "{a} {b}");
}

use std::collections::HashMap;

/// A million rows with every timestamp form, month-end boundaries in UTC
/// that are the next month in Tokyo, and exact decimals.
fn million_row_csv(rows: usize) -> String {
    let mut s = String::with_capacity(rows * 64);
    s.push_str("customer_id,subscription_id,meter,timestamp,quantity\n");
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let month = 1 + (x % 12) as u32;
        let day = 1 + ((x >> 8) % 28) as u32;
        let ts = match i % 4 {
            0 => format!("2024-{month:02}-{day:02}"),
            1 => format!("2024-{month:02}-{day:02}T{:02}:{:02}:00Z", (x >> 16) % 24, (x >> 24) % 60),
            2 => format!("2024-{month:02}-{day:02}T{:02}:30:00+09:00", (x >> 16) % 24),
            // The last UTC evening of a month is already next month in Tokyo.
            _ => format!("2024-{month:02}-{}T15:{:02}:00Z", [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month as usize - 1], (x >> 24) % 60),
        };
        s.push_str(&format!("c{},s{},gb,{ts},{}.{:03}\n", x % 50, x % 3, (x >> 32) % 1000, (x >> 40) % 1000));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_rows_give_the_monthly_totals_of_an_independent_computation() {
    if !crate::segment::require(crate::segment::python_has("zoneinfo"), "Python 3.9+ (zoneinfo)") {
        return;
    }
    let (_s, api, _) = setup().await;
    let rows = 1_000_000;
    let csv = million_row_csv(rows);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.csv");
    std::fs::write(&path, &csv).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/usage_totals.py");
    let out = std::process::Command::new(crate::segment::python()).arg(&script).arg(&path).arg("Asia/Tokyo").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: std::collections::BTreeMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();

    let (st, v) = api.send(api.req(reqwest::Method::POST, "/v1/imports?kind=usage").header("content-type", "text/csv").body(csv.into_bytes())).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (_, v) = api.get(&format!("/v1/imports/{id}")).await;
        if v["status"] == "succeeded" {
            assert_eq!(
                (v["rows_total"].as_u64(), v["rows_imported"].as_u64(), v["rows_rejected"].as_u64()),
                (Some(rows as u64), Some(rows as u64), Some(0)),
                "{v}"
            );
            break;
        }
        assert!(v["status"] != "failed" && Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Wait for the meters consumer, then compare every (customer, month).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, c) = api.get("/v1/consumers").await;
        if c["data"].as_array().unwrap().iter().any(|c| c["name"] == "meters" && c["lag"] == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "meters consumer did not catch up: {c}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut got = std::collections::BTreeMap::new();
    for c in 0..50 {
        let (st, v) = api.get(&format!("/v1/meters/gb/usage?granularity=month&customer_id=c{c}")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        for r in v["data"].as_array().unwrap() {
            let start: chrono::DateTime<chrono::FixedOffset> = chrono::DateTime::parse_from_rfc3339(r["period_start"].as_str().unwrap()).unwrap();
            let month = (start.with_timezone(&chrono::Utc) + chrono::Duration::hours(9)).format("%Y-%m").to_string();
            let value: rust_decimal::Decimal = r["value"].as_str().unwrap().parse().unwrap();
            let e: &mut rust_decimal::Decimal = got.entry(format!("c{c}|{month}")).or_default();
            *e += value;
        }
    }
    let got: std::collections::BTreeMap<String, String> = got.into_iter().map(|(k, v)| (k, v.normalize().to_string())).collect();
    assert_eq!(got.len(), expected.len());
    let diff: Vec<_> = expected.iter().filter(|(k, v)| got.get(*k) != Some(*v)).take(5).collect();
    assert!(
        diff.is_empty(),
        "monthly totals differ from the independent computation, e.g. {diff:?} (ours: {:?})",
        diff.iter().map(|(k, _)| got.get(*k)).collect::<Vec<_>>()
    );
}

/// `order=desc` lists imports (and jobs) newest first, paged on the server
/// with the same cursors; an unknown order is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_and_jobs_list_newest_first_with_order_desc() {
    let (_s, api, _) = setup().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (st, v) = import(&api, "", b"customer_id,meter,timestamp,quantity\n".to_vec()).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let page = |path: String| {
        let api = &api;
        async move {
            let mut out = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let p = match &cursor {
                    Some(c) => format!("{path}&cursor={c}"),
                    None => path.clone(),
                };
                let (st, v) = api.get(&p).await;
                assert_eq!(st, StatusCode::OK, "{p}: {v}");
                out.extend(v["data"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()));
                match v["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => return out,
                }
            }
        }
    };
    let asc = page("/v1/imports?limit=2".into()).await;
    let desc = page("/v1/imports?limit=2&order=desc".into()).await;
    let jobs_desc = page("/v1/jobs?kind=import.usage&limit=2&order=desc".into()).await;
    assert_eq!(asc, ids, "oldest first by default");
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(desc, newest_first);
    assert_eq!(jobs_desc, newest_first);
    for path in ["/v1/imports?order=newest", "/v1/jobs?order=DESC"] {
        let (st, v) = api.get(path).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("one of asc, desc"), "{v}");
    }
}
