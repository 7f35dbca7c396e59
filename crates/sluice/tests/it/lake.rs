//! The event lake and SQL: partition layout checked by DuckDB, enrichment,
//! exactly-once after kill -9, read-only and workspace-confined SQL, joins
//! with live tables, typed schemas, compaction, and the CLI.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{cli, Api, Server};
use crate::segment::{python, python_has, require};

const FAST: &[(&str, &str)] = &[("SLUICE_LAKE_FLUSH_INTERVAL", "200ms")];

async fn sql(api: &Api, q: &str) -> Vec<Value> {
    let (st, v) = api.post("/v1/sql", json!({"query": q})).await;
    assert_eq!(st, StatusCode::OK, "{q}: {v}");
    v["data"].as_array().unwrap().clone()
}

async fn sql_err(api: &Api, q: &str) -> (StatusCode, String, String) {
    let (st, v) = api.post("/v1/sql", json!({"query": q})).await;
    (st, v["error"]["code"].as_str().unwrap_or("").to_owned(), v["error"]["message"].as_str().unwrap_or("").to_owned())
}

/// Waits until the lake's committed files hold `rows` rows.
async fn wait_for_files(api: &Api, rows: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = api.get("/v1/lake/files").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let n: u64 = v["data"].as_array().unwrap().iter().map(|f| f["rows"].as_u64().unwrap()).sum();
        if n == rows {
            return v;
        }
        assert!(n <= rows, "more rows in files ({n}) than events ({rows}): {v}");
        assert!(Instant::now() < deadline, "lake files hold {n} of {rows} rows after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `job` (as returned by the API) to succeed; fails on `failed`
/// or after `limit`.
async fn wait_for_job(api: &Api, job: &Value, limit: Duration) -> Value {
    let id = job["id"].as_str().unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let (_, j) = api.get(&format!("/v1/jobs/{id}")).await;
        if j["status"] == "succeeded" {
            return j;
        }
        assert!(j["status"] != "failed", "{j}");
        assert!(Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn events(n: usize, start: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let t = start + chrono::Duration::minutes(7 * i as i64);
            let ty = ["page", "signup", "api.call"][i % 3];
            json!({
                "id": format!("ev-{i}"),
                "type": ty,
                "timestamp": t.to_rfc3339(),
                "customer_id": format!("cus_{}", i % 4),
                "user_id": format!("u{}", i % 9),
                "properties": {"amount": (i % 10) as f64 * 1.5, "path": "/pricing"},
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_land_in_the_partition_layout_and_duckdb_agrees_with_sql() {
    if !require(python_has("duckdb"), "the Python package duckdb") {
        return;
    }
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("acme").await;
    let ingest = s.api(&k.ingest);
    let read = s.api(&k.read);
    let start: chrono::DateTime<chrono::Utc> = "2026-03-01T22:10:00Z".parse().unwrap();
    let evs = events(300, start);
    for chunk in evs.chunks(100) {
        ingest.ingest(Value::Array(chunk.to_vec())).await;
    }
    let files = wait_for_files(&read, 300).await;
    // Responses show no server paths (issue 11): the lake is <data_dir>/lake.
    assert!(files.get("root").is_none(), "{files}");
    let root = s.data_dir().join("lake").display().to_string();
    let layout =
        regex_lite(r"workspace=acme/content_type=(page|signup|api\.call)/year=2026/month=03/day=0[1-3]/hour=[0-2][0-9]/[0-9a-f]{32}\.parquet");
    for f in files["data"].as_array().unwrap() {
        let p = f["path"].as_str().unwrap();
        assert!(layout(p), "unexpected path {p}");
        assert!(std::path::Path::new(&root).join(p).is_file(), "{p} is not on disk");
    }
    // The first event (22:10 UTC on March 1st) is in hour=22 of day=01.
    assert!(files["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"].as_str().unwrap().contains("content_type=page/year=2026/month=03/day=01/hour=22/")));

    let out = Command::new(python()).arg(clients_dir().join("lake_duckdb.py")).arg(&root).arg("acme").output().unwrap();
    assert!(out.status.success(), "duckdb script failed: {}", String::from_utf8_lossy(&out.stderr));
    let duck: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(duck["total"], 300);
    assert_eq!(duck["distinct_ids"], 300);
    assert_eq!(duck["misplaced"], 0, "rows in a partition that is not their UTC hour");

    let by_type = sql(&read, "SELECT content_type, count(*) AS n FROM events GROUP BY content_type").await;
    let ours: HashMap<String, u64> = by_type.iter().map(|r| (r["content_type"].as_str().unwrap().to_owned(), r["n"].as_u64().unwrap())).collect();
    let theirs: HashMap<String, u64> = duck["by_type"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours.values().sum::<u64>(), 300);
    let by_hour = sql(&read, "SELECT year || '-' || month || '-' || day || 'T' || hour AS h, count(*) AS n FROM events GROUP BY 1").await;
    let ours: HashMap<String, u64> = by_hour.iter().map(|r| (r["h"].as_str().unwrap().to_owned(), r["n"].as_u64().unwrap())).collect();
    let theirs: HashMap<String, u64> = duck["by_hour"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    assert_eq!(ours, theirs);
    let sum = sql(&read, "SELECT sum(json_get_float(properties, 'amount')) AS s FROM events").await;
    let expected: f64 = (0..300).map(|i| (i % 10) as f64 * 1.5).sum();
    assert!((sum[0]["s"].as_f64().unwrap() - expected).abs() < 1e-9, "{sum:?}");
    assert!((duck["amount"].as_f64().unwrap() - expected).abs() < 1e-9);
}

fn clients_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients")
}

/// A tiny matcher for the one layout pattern above (no regex crate needed):
/// checks the path's segments one by one.
fn regex_lite(_pattern: &str) -> impl Fn(&str) -> bool {
    |p: &str| {
        let seg: Vec<&str> = p.split('/').collect();
        seg.len() == 7
            && seg[0] == "workspace=acme"
            && ["content_type=page", "content_type=signup", "content_type=api.call"].contains(&seg[1])
            && seg[2] == "year=2026"
            && seg[3] == "month=03"
            && seg[4].strip_prefix("day=").is_some_and(|d| d.len() == 2 && d.parse::<u32>().is_ok_and(|d| (1..=3).contains(&d)))
            && seg[5].strip_prefix("hour=").is_some_and(|h| h.len() == 2 && h.parse::<u32>().is_ok_and(|h| h < 24))
            && seg[6].strip_suffix(".parquet").is_some_and(|n| n.len() == 32 && n.chars().all(|c| c.is_ascii_hexdigit()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrichment_of_real_user_agents_and_referrers() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("web").await;
    let ingest = s.api(&k.ingest);
    let read = s.api(&k.read);
    let chrome_win = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
    let iphone =
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
    let ipad = "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1";
    let googlebot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    let firefox_linux = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
    let cases = [
        (
            "e1",
            chrome_win,
            "https://www.google.com/search?q=sluice",
            "https://app.example.com/?utm_source=google&utm_medium=cpc&utm_campaign=launch",
            "203.0.113.77",
        ),
        ("e2", iphone, "https://search.yahoo.co.jp/search?p=sluice", "https://app.example.com/pricing", "2001:db8:1234:5678:9abc:def0:1234:5678"),
        ("e3", ipad, "https://t.co/abc", "https://app.example.com/", "198.51.100.23"),
        ("e4", googlebot, "https://www.bing.com/search?q=x", "https://app.example.com/", "66.249.66.1"),
        ("e5", firefox_linux, "https://mail.google.com/mail/u/0/", "https://app.example.com/?utm_source=newsletter&utm_medium=email", "192.0.2.9"),
        ("e6", chrome_win, "https://app.example.com/docs", "https://app.example.com/pricing", "192.0.2.10"),
        ("e7", chrome_win, "https://someblog.example.org/post", "https://app.example.com/", "192.0.2.11"),
    ];
    let body: Vec<Value> = cases
        .iter()
        .map(|(id, ua, referrer, url, ip)| json!({"id": id, "type": "page", "context": {"user_agent": ua, "referrer": referrer, "page_url": url, "ip": ip}}))
        .collect();
    ingest.ingest(Value::Array(body)).await;
    // Through the log tail first, then through the Parquet files: same answer.
    let q = "SELECT id, ua_browser, ua_os, ua_device, referrer_host, referrer_medium, referrer_source, utm_source, utm_medium, utm_campaign, ip, context FROM events ORDER BY id";
    for phase in ["tail", "files"] {
        if phase == "files" {
            wait_for_files(&read, cases.len() as u64).await;
        }
        let rows = sql(&read, q).await;
        let by: HashMap<&str, &Value> = rows.iter().map(|r| (r["id"].as_str().unwrap(), r)).collect();
        let check = |id: &str, col: &str, want: Value| assert_eq!(by[id][col], want, "{phase}: {id}.{col} in {}", by[id]);
        check("e1", "ua_browser", json!("Chrome"));
        check("e1", "ua_device", json!("desktop"));
        check("e1", "ua_os", json!("Windows"));
        check("e2", "ua_os", json!("iOS"));
        check("e3", "ua_os", json!("iOS"));
        check("e1", "referrer_medium", json!("search"));
        check("e1", "referrer_source", json!("Google"));
        check("e1", "referrer_host", json!("www.google.com"));
        check("e1", "utm_source", json!("google"));
        check("e1", "utm_campaign", json!("launch"));
        check("e1", "ip", json!("203.0.113.0"));
        check("e2", "ua_device", json!("mobile"));
        check("e2", "ua_browser", json!("Safari"));
        check("e2", "referrer_source", json!("Yahoo! JAPAN"));
        check("e2", "referrer_medium", json!("search"));
        check("e2", "ip", json!("2001:db8:1234::"));
        check("e3", "ua_device", json!("tablet"));
        check("e3", "referrer_medium", json!("social"));
        check("e3", "referrer_source", json!("X"));
        check("e4", "ua_device", json!("bot"));
        check("e4", "referrer_source", json!("Bing"));
        check("e5", "ua_browser", json!("Firefox"));
        check("e5", "ua_os", json!("Linux"));
        check("e5", "referrer_medium", json!("email"));
        check("e5", "referrer_source", json!("Gmail"));
        check("e5", "utm_medium", json!("email"));
        check("e6", "referrer_medium", json!("internal"));
        check("e7", "referrer_medium", json!("unknown"));
        check("e7", "referrer_host", json!("someblog.example.org"));
        // The raw address never reaches the lake, not even inside `context`.
        for r in &rows {
            let ctx = r["context"].as_str().unwrap();
            for (_, _, _, _, ip) in &cases {
                assert!(!ctx.contains(ip), "{phase}: raw IP {ip} in context {ctx}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_lake_writes_then_every_acknowledged_event_once() {
    // Every id is read back in one query: how many events were acknowledged
    // before the kill depends on the machine (over 150,000 on a fast one),
    // so the result limit is lifted for this server.
    let mut s = Server::start_with(&[("SLUICE_LAKE_FLUSH_INTERVAL", "50ms"), ("SLUICE_SQL_MAX_RESULT_ROWS", "10000000")]).await;
    let k = s.workspace_with_keys("crash").await;
    let secret = k.ingest.clone();
    let url = s.url.clone();
    // Writers keep sending until the server dies; only 200s count.
    let writer = tokio::spawn(async move {
        let api = Api { http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap(), base: url, key: Some(secret) };
        let mut acked: Vec<String> = Vec::new();
        for b in 0..100_000 {
            let batch: Vec<Value> =
                (0..200).map(|i| json!({"id": format!("k-{b}-{i}"), "type": "tick", "customer_id": format!("c{}", i % 7)})).collect();
            match api.req(reqwest::Method::POST, "/v1/events").json(&batch).send().await {
                Ok(r) if r.status() == StatusCode::OK => acked.extend(batch.iter().map(|e| e["id"].as_str().unwrap().to_owned())),
                _ => break,
            }
        }
        acked
    });
    // Let several lake flushes happen, then crash in the middle of more.
    let read = s.api(&k.read);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = read.get("/v1/lake/files").await;
        if v["data"].as_array().map_or(0, |d| d.len()) >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "no lake files after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill9();
    let acked = writer.await.unwrap();
    assert!(acked.len() >= 600, "only {} events acknowledged before the crash", acked.len());
    eprintln!("{} events acknowledged before kill -9", acked.len());
    s.restart();
    let read = s.api(&k.read);
    // Exactly once right after the restart (files + log tail) …
    let check = |rows: Vec<Value>| {
        assert_eq!(rows[0]["dups"], 0, "duplicated ids: {rows:?}");
        rows[0]["n"].as_u64().unwrap()
    };
    let n = check(sql(&read, "SELECT count(*) AS n, count(*) - count(DISTINCT id) AS dups FROM events").await);
    assert!(n >= acked.len() as u64, "{n} rows, {} acknowledged", acked.len());
    // … and once the lake writer caught up (files only).
    let stored = read.all_events("&type=tick").await.len() as u64;
    assert_eq!(n, stored, "SQL and the event log disagree");
    wait_for_files(&read, stored).await;
    let n2 = check(sql(&read, "SELECT count(*) AS n, count(*) - count(DISTINCT id) AS dups FROM events").await);
    assert_eq!(n2, stored);
    // Every acknowledged id is there.
    let ids: Vec<String> = sql(&read, "SELECT id FROM events").await.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    let ids: std::collections::HashSet<String> = ids.into_iter().collect();
    let missing = acked.iter().filter(|a| !ids.contains(*a)).count();
    assert_eq!(missing, 0, "{missing} acknowledged events missing from SQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_only_and_confined_to_the_workspace() {
    let s = Server::start_with(FAST).await;
    let a = s.workspace_with_keys("alpha").await;
    let b = s.workspace_with_keys("beta").await;
    s.api(&a.ingest).ingest(json!([{"id": "a1", "type": "x"}, {"id": "a2", "type": "x"}])).await;
    s.api(&b.ingest).ingest(json!([{"id": "b1", "type": "secret", "properties": {"card": "4242"}}])).await;
    let read_a = s.api(&a.read);
    let files = wait_for_files(&s.api(&b.read), 1).await;
    let lake_root = s.data_dir().join("lake").display().to_string();
    let b_file = format!("{lake_root}/{}", files["data"][0]["path"].as_str().unwrap());
    let b_dir = format!("{lake_root}/workspace=beta");
    wait_for_files(&read_a, 2).await;
    let rows = sql(&read_a, "SELECT id FROM events ORDER BY id").await;
    assert_eq!(rows, vec![json!({"id": "a1"}), json!({"id": "a2"})]);
    assert_eq!(sql(&read_a, "SELECT count(*) AS n FROM events WHERE type = 'secret'").await[0]["n"], 0);
    for q in [
        "DROP TABLE events".to_owned(),
        "INSERT INTO events (id) VALUES ('z')".to_owned(),
        "DELETE FROM events".to_owned(),
        "CREATE TABLE t AS SELECT 1".to_owned(),
        "COPY (SELECT 1) TO '/tmp/sluice-copy-test.csv'".to_owned(),
        format!("CREATE EXTERNAL TABLE stolen STORED AS PARQUET LOCATION '{b_dir}'"),
        "SET datafusion.execution.batch_size = 1".to_owned(),
    ] {
        let (st, code, msg) = sql_err(&read_a, &q).await;
        assert_eq!((st, code.as_str()), (StatusCode::BAD_REQUEST, "read_only"), "{q}: {msg}");
    }
    for q in [
        format!("SELECT * FROM read_parquet('{b_file}')"),
        format!("SELECT * FROM '{b_file}'"),
        format!("SELECT * FROM \"{b_file}\""),
        "SELECT * FROM beta.events".to_owned(),
        "SELECT * FROM information_schema.tables".to_owned(),
    ] {
        let (st, code, msg) = sql_err(&read_a, &q).await;
        assert_eq!((st, code.as_str()), (StatusCode::BAD_REQUEST, "invalid_sql"), "{q}: {msg}");
        assert!(!msg.contains("4242"));
    }
    assert!(!std::path::Path::new("/tmp/sluice-copy-test.csv").exists());
    // Scopes: an ingest key cannot query; no key at all is refused.
    let (st, _) = s.api(&a.ingest).post("/v1/sql", json!({"query": "SELECT 1"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = s.anonymous().post("/v1/sql", json!({"query": "SELECT 1"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Bad SQL names the problem; formats.
    let (st, code, msg) = sql_err(&read_a, "SELEC 1").await;
    assert_eq!((st, code.as_str()), (StatusCode::BAD_REQUEST, "invalid_sql"), "{msg}");
    let (st, v) = read_a.post("/v1/sql", json!({"query": "SELECT 1", "format": "xml"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let resp = read_a
        .req(reqwest::Method::POST, "/v1/sql")
        .json(&json!({"query": "SELECT id FROM events ORDER BY id", "format": "csv"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "id\na1\na2\n");
    for (format, magic) in [("parquet", &b"PAR1"[..]), ("arrow", &[0xFF, 0xFF, 0xFF, 0xFF][..])] {
        let resp =
            read_a.req(reqwest::Method::POST, "/v1/sql").json(&json!({"query": "SELECT id FROM events", "format": format})).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.unwrap().starts_with(magic), "{format}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_join_customers_and_usage() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("join").await;
    let admin = s.api(&k.admin);
    let read = s.api(&k.read);
    // Customers come from Segment `group` calls.
    for (id, name) in [("cus_a", "Acme"), ("cus_b", "Globex")] {
        let (st, v) =
            s.api(&k.ingest).post("/v1/group", json!({"userId": format!("u-{id}"), "groupId": id, "traits": {"name": name, "plan": "pro"}})).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let (st, v) = admin.post("/v1/meters", json!({"key": "gb", "event_type": "storage", "aggregation": "sum", "value_property": "gb"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mut evs = Vec::new();
    for i in 0..30 {
        let c = if i % 3 == 0 { "cus_b" } else { "cus_a" };
        evs.push(
            json!({"id": format!("s{i}"), "type": "storage", "customer_id": c, "timestamp": "2026-02-10T10:00:00Z", "properties": {"gb": "0.1"}}),
        );
    }
    admin.ingest(Value::Array(evs)).await;
    // Wait for the meter to count everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = sql(&read, "SELECT CAST(sum(value) AS VARCHAR) AS v FROM usage WHERE meter = 'gb'").await;
        if rows[0]["v"].as_str().is_some_and(|v| v.parse::<f64>().unwrap() == 3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "usage not counted: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = sql(
        &read,
        "SELECT c.name, count(*) AS n FROM events e JOIN customers c ON e.customer_id = c.customer_id \
         WHERE e.type = 'storage' GROUP BY c.name ORDER BY c.name",
    )
    .await;
    assert_eq!(rows, vec![json!({"name": "Acme", "n": 20}), json!({"name": "Globex", "n": 10})]);
    let rows = sql(
        &read,
        "SELECT c.name, CAST(u.total AS VARCHAR) AS total, e.n FROM customers c \
         JOIN (SELECT customer_id, sum(value) AS total FROM usage WHERE meter = 'gb' GROUP BY customer_id) u ON u.customer_id = c.customer_id \
         JOIN (SELECT customer_id, count(*) AS n FROM events WHERE type = 'storage' GROUP BY customer_id) e ON e.customer_id = c.customer_id \
         ORDER BY c.name",
    )
    .await;
    let norm = |v: &Value| v.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap().normalize().to_string();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0]["name"].as_str().unwrap(), norm(&rows[0]["total"]), rows[0]["n"].as_u64().unwrap()), ("Acme", "2".into(), 20));
    assert_eq!((rows[1]["name"].as_str().unwrap(), norm(&rows[1]["total"]), rows[1]["n"].as_u64().unwrap()), ("Globex", "1".into(), 10));
    // A Segment event name with a space and a slash: an escaped partition
    // directory, read back by its real name.
    let (st, v) = s.api(&k.ingest).post("/v1/track", json!({"userId": "u-cus_a", "event": "Order Completed/v2", "properties": {"total": 5}})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, f) = read.get("/v1/lake/files").await;
        if f["data"].as_array().unwrap().iter().any(|f| f["path"].as_str().unwrap().contains("content_type=Order Completed%2Fv2/")) {
            break;
        }
        assert!(Instant::now() < deadline, "{f}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = sql(&read, "SELECT content_type, type, customer_id FROM events WHERE content_type = 'Order Completed/v2'").await;
    assert_eq!(rows, vec![json!({"content_type": "Order Completed/v2", "type": "Order Completed/v2", "customer_id": "cus_a"})]);
    // The other live tables are there too; `audit_log` for admin keys only,
    // as in REST (issue 11).
    for t in ["meters", "imports", "jobs"] {
        sql(&read, &format!("SELECT count(*) AS n FROM {t}")).await;
    }
    assert_eq!(sql(&admin, "SELECT count(*) AS n FROM audit_log WHERE action = 'meter.create'").await[0]["n"], 1);
    let (st, v) = read.post("/v1/sql", json!({"query": "SELECT count(*) AS n FROM audit_log"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_schemas_add_typed_columns_and_refuse_violations() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("typed").await;
    let admin = s.api(&k.admin);
    let read = s.api(&k.read);
    let (st, v) = admin
        .send(
            admin
                .req(reqwest::Method::PUT, "/v1/schemas/purchase")
                .json(&json!({"properties": {"amount": "float64", "qty": "int64", "gift": "bool", "at": "timestamp"}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["columns"]["amount"], "p_amount");
    let (st, v) = admin.send(admin.req(reqwest::Method::PUT, "/v1/schemas/refund").json(&json!({"qty": "string"}))).await;
    assert_eq!(st, StatusCode::CONFLICT, "one column, one type: {v}");
    let (st, v) = admin.send(admin.req(reqwest::Method::PUT, "/v1/schemas/refund").json(&json!({"qty": "decimal"}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    admin
        .ingest(json!([
            {"id": "p1", "type": "purchase", "properties": {"amount": 9.5, "qty": 2, "gift": true, "at": "2026-01-01T00:00:00Z"}},
            {"id": "p2", "type": "purchase", "properties": {"amount": 0.5, "qty": 1}},
        ]))
        .await;
    let (st, v) = admin
        .post(
            "/v1/events",
            json!([{"id": "p3", "type": "purchase", "properties": {"amount": 1.0}}, {"id": "p4", "type": "purchase", "properties": {"qty": "two"}}]),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["details"][0]["index"], 1);
    assert_eq!(v["error"]["details"][0]["field"], "properties.qty");
    assert!(v["error"]["message"].as_str().unwrap().contains("properties.qty"), "{v}");
    let (st, _) = read.get("/v1/events/p3").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "nothing of a refused request is stored");
    wait_for_files(&read, 2).await;
    let rows = sql(&read, "SELECT id, p_amount, p_qty, p_gift, CAST(p_at AS VARCHAR) AS at FROM events ORDER BY id").await;
    assert_eq!(rows[0]["p_amount"], 9.5);
    assert_eq!(rows[0]["p_qty"], 2);
    assert_eq!(rows[0]["p_gift"], true);
    assert!(rows[0]["at"].as_str().unwrap().starts_with("2026-01-01"));
    assert_eq!(rows[1]["p_gift"], Value::Null);
    assert_eq!(sql(&read, "SELECT sum(p_qty) AS q FROM events").await[0]["q"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_closed_partitions_and_queries_see_every_row_once() {
    let s = Server::start_with(&[("SLUICE_LAKE_FLUSH_INTERVAL", "50ms"), ("SLUICE_LAKE_COMPACT_INTERVAL", "0s")]).await;
    let k = s.workspace_with_keys("comp").await;
    let admin = s.api(&k.admin);
    let read = s.api(&k.read);
    // Ten small files in one closed partition (two days ago).
    let hour = (chrono::Utc::now() - chrono::Duration::days(2)).format("%Y-%m-%dT%H:05:00Z").to_string();
    for b in 0..10 {
        let batch: Vec<Value> = (0..50).map(|i| json!({"id": format!("c{b}-{i}"), "type": "old", "timestamp": hour})).collect();
        admin.ingest(Value::Array(batch)).await;
        wait_for_files(&read, (b + 1) * 50).await;
    }
    let (_, before) = read.get("/v1/lake/files").await;
    assert!(before["data"].as_array().unwrap().len() >= 5, "{before}");
    // Queries keep running while compaction swaps the files.
    let q = read.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let counter = tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            seen.push(sql(&q, "SELECT count(*) AS n, count(DISTINCT id) AS d FROM events").await[0].clone());
        }
        seen
    });
    let (st, job) = admin.post("/v1/lake/compact", json!({})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    let done = wait_for_job(&admin, &job, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = counter.await.unwrap();
    assert!(!seen.is_empty());
    for v in &seen {
        assert_eq!(v, &json!({"n": 500, "d": 500}), "a query during compaction saw {v}");
    }
    assert_eq!(done["result"]["files_written"], 1, "{done}");
    let (_, after) = read.get("/v1/lake/files").await;
    let files = after["data"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{after}");
    assert_eq!(files[0]["rows"], 500);
    // Old files are gone from disk too: the directory holds only the merged file.
    let dir = s.data_dir().join("lake").join(files[0]["path"].as_str().unwrap());
    let on_disk = std::fs::read_dir(dir.parent().unwrap()).unwrap().count();
    assert_eq!(on_disk, 1);
    assert_eq!(sql(&read, "SELECT count(*) AS n FROM events").await[0]["n"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_lake_ddl_from_the_cli() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("cli").await;
    s.api(&k.ingest).ingest(json!([{"id": "x1", "type": "page"}, {"id": "x2", "type": "page"}, {"id": "x3", "type": "signup"}])).await;
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", k.read.as_str())];
    let (ok, out, err) = cli(&["sql", "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type"], &env, None);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].split('|').map(str::trim).collect::<Vec<_>>(), ["type", "n"]);
    assert!(lines[2].starts_with("page") && lines[2].trim_end().ends_with('2'), "{out}");
    assert!(lines[3].starts_with("signup") && lines[3].trim_end().ends_with('1'), "{out}");
    assert!(err.contains("2 rows"), "{err}");
    let (ok, out, err) = cli(&["sql", "--format", "csv", "SELECT id FROM events ORDER BY id"], &env, None);
    assert!(ok, "{err}");
    assert_eq!(out, "id\nx1\nx2\nx3\n");
    let (ok, out, _) = cli(&["sql", "--format", "json", "SELECT count(*) AS n FROM events"], &env, None);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([{"n": 3}]));
    let (ok, _, err) = cli(&["sql", "DROP TABLE events"], &env, None);
    assert!(!ok);
    assert!(err.contains("read_only"), "{err}");
    wait_for_files(&s.api(&k.read), 3).await;
    let (ok, out, err) = cli(&["lake", "ddl", "--engine", "athena", "--location", "s3://bucket/lake"], &env, None);
    assert!(ok, "{err}");
    for needle in [
        "CREATE EXTERNAL TABLE",
        "'projection.enabled' = 'true'",
        "storage.location.template",
        "s3://bucket/lake/workspace=${workspace}/content_type=${content_type}/year=${year}",
        "page,signup",
        "STORED AS PARQUET",
    ] {
        assert!(out.contains(needle), "{needle} missing in\n{out}");
    }
    for engine in ["trino", "duckdb", "spark"] {
        let (ok, out, err) = cli(&["lake", "ddl", "--engine", engine], &env, None);
        assert!(ok, "{engine}: {err}");
        assert!(out.contains("sluice_events"), "{out}");
    }
    let (ok, _, err) = cli(&["lake", "ddl", "--engine", "oracle"], &env, None);
    assert!(!ok && err.contains("engine"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_limits_answer_with_clear_errors() {
    let s = Server::start_with(&[("SLUICE_SQL_MAX_RESULT_ROWS", "5"), ("SLUICE_SQL_TIMEOUT", "300ms")]).await;
    let k = s.workspace_with_keys("lim").await;
    let read = s.api(&k.read);
    assert_eq!(sql(&read, "SELECT value FROM generate_series(1, 5)").await.len(), 5);
    let (st, code, msg) = sql_err(&read, "SELECT value FROM generate_series(1, 6)").await;
    assert_eq!((st, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "result_too_large"), "{msg}");
    assert!(msg.contains("max_result_rows"), "{msg}");
    let (st, code, msg) = sql_err(&read, "SELECT count(*) FROM generate_series(1, 100000000000) a").await;
    assert_eq!((st, code.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "query_timeout"), "{msg}");
    // The server is fine afterwards.
    assert_eq!(sql(&read, "SELECT 1 AS one").await, vec![json!({"one": 1})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_queries_run_as_jobs_and_export_files() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("mart").await;
    let admin = s.api(&k.admin);
    admin.ingest(json!([{"id": "m1", "type": "signup"}, {"id": "m2", "type": "signup"}, {"id": "m3", "type": "page"}])).await;
    let (st, v) = admin
        .post("/v1/queries", json!({"name": "signups", "sql": "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type", "schedule": "0 6 * * *", "export": {"format": "csv", "path": "daily/signups.csv"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(v["next_run_at"].as_str().unwrap().ends_with("T06:00:00Z"), "{v}");
    for (body, why) in [
        (json!({"name": "bad", "sql": "SELECT * FROM nowhere"}), "unknown table"),
        (json!({"name": "bad", "sql": "DROP TABLE events"}), "not read-only"),
        (json!({"name": "bad", "sql": "SELECT 1", "schedule": "every day"}), "not cron"),
        (json!({"name": "bad", "sql": "SELECT 1", "export": {"format": "csv", "path": "../../escape.csv"}}), "path outside exports"),
    ] {
        let (st, v) = admin.post("/v1/queries", body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{why}: {v}");
    }
    let (st, job) = admin.post("/v1/queries/signups/run", json!({})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    let done = wait_for_job(&admin, &job, Duration::from_secs(30)).await;
    assert_eq!(done["result"]["rows"], 2, "{done}");
    let path = done["result"]["path"].as_str().unwrap();
    // Relative to the lake (issue 11: no server paths in responses).
    assert!(path.ends_with("exports/mart/daily/signups.csv") && !path.starts_with('/'), "{path}");
    assert_eq!(std::fs::read_to_string(s.data_dir().join("lake").join(path)).unwrap(), "type,n\npage,1\nsignup,2\n");
    let (_, list) = s.api(&k.read).get("/v1/queries").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let (st, _) = admin.delete("/v1/queries/signups").await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = admin.post("/v1/queries/signups/run", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Rows of a CSV import are stored as batch records and buffered by the lake
/// writer without being expanded into events: their lake rows must still be
/// exactly the events the API shows (id, customer, subscription, time, the
/// value at the meter's nested path beside its filter properties, context).
/// Fields padded with spaces are trimmed, and two identical rows are two
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_rows_land_in_the_lake_as_the_events_the_api_shows() {
    let s = Server::start_with(FAST).await;
    let k = s.workspace_with_keys("imp").await;
    let admin = s.api(&k.admin);
    let meter = json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "usage.gb", "filter": {"region": "eu"}});
    let (st, v) = admin.post("/v1/meters", meter).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let csv = "customer_id,subscription_id,meter,timestamp,quantity,id\n\
               \"acme, \"\"inc\"\"\",s1,gb,2024-02-01T10:00:00Z,12.50,\n\
               \x20 beta \x20,,gb, 2024-02-01T11:30:00+09:00 ,0.1,given-1\n\
               beta,,gb,2024-02-01T02:30:00Z,0.1,\n\
               beta,,gb,2024-02-01T02:30:00Z,0.1,\n";
    let (st, v) = admin.send(admin.req(reqwest::Method::POST, "/v1/imports?kind=usage&wait=true").header("content-type", "text/csv").body(csv)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!((v["status"].as_str(), v["rows_imported"].as_u64()), (Some("succeeded"), Some(4)), "{v}");
    wait_for_files(&admin, 4).await;
    let rows =
        sql(&admin, "SELECT id, customer_id, subscription_id, date_part('epoch', timestamp) AS ts, properties, context FROM events ORDER BY id")
            .await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"given-1"), "{ids:?}");
    assert_eq!(ids.iter().filter(|i| i.starts_with("csv_")).count(), 3, "two identical rows are two events: {ids:?}");
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        let (st, e) = admin.get(&format!("/v1/events/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{e}");
        assert_eq!(r["customer_id"], e["customer_id"], "{id}");
        assert_eq!(r["subscription_id"], e["subscription_id"], "{id}");
        let lake_props: Value = serde_json::from_str(r["properties"].as_str().unwrap()).unwrap();
        assert_eq!(lake_props, e["properties"], "{id}");
        let lake_ctx: Value = serde_json::from_str(r["context"].as_str().unwrap()).unwrap();
        assert_eq!(lake_ctx, e["context"], "{id}");
        let t: chrono::DateTime<chrono::Utc> = e["timestamp"].as_str().unwrap().parse().unwrap();
        assert_eq!(r["ts"].as_f64().unwrap().round() as i64, t.timestamp(), "{id}: {} vs {t}", r["ts"]);
    }
    let by_customer = |c: &str| rows.iter().filter(|r| r["customer_id"] == c).count();
    assert_eq!((by_customer("acme, \"inc\""), by_customer("beta")), (1, 3), "{rows:?}");
    let acme = rows.iter().find(|r| r["customer_id"] == "acme, \"inc\"").unwrap();
    assert_eq!(serde_json::from_str::<Value>(acme["properties"].as_str().unwrap()).unwrap(), json!({"region": "eu", "usage": {"gb": "12.5"}}));
    let given = rows.iter().find(|r| r["id"] == "given-1").unwrap();
    assert_eq!((given["customer_id"].as_str(), given["subscription_id"].as_str()), (Some("beta"), None));
    let want: chrono::DateTime<chrono::Utc> = "2024-02-01T02:30:00Z".parse().unwrap();
    assert_eq!(given["ts"].as_f64().unwrap().round() as i64, want.timestamp(), "{given}");
}

/// Issue 7: a live table is read with the query's filters (never loaded
/// whole): with `sql.max_live_rows` = 5, the whole `usage` table (9 rows)
/// is refused with 413, while one customer's rows, or one customer's rows
/// in a time range, are read and summed exactly. A shape whose filters do
/// not restrict every row (a join) is not pushed down and hits the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tables_are_read_with_the_querys_filters() {
    let s = Server::start_with(&[("SLUICE_LAKE_FLUSH_INTERVAL", "200ms"), ("SLUICE_SQL_MAX_LIVE_ROWS", "5")]).await;
    let k = s.workspace_with_keys("pushdown").await;
    let admin = s.api(&k.admin);
    let read = s.api(&k.read);
    let (st, v) = admin.post("/v1/meters", json!({"key": "gb", "event_type": "storage", "aggregation": "sum", "value_property": "gb"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mut evs: Vec<Value> = (0..8)
        .map(|i| json!({"id": format!("e{i}"), "type": "storage", "customer_id": format!("c{i}"), "timestamp": "2026-02-10T10:00:00Z", "properties": {"gb": "1.5"}}))
        .collect();
    evs.push(json!({"id": "late", "type": "storage", "customer_id": "c1", "timestamp": "2026-02-10T12:00:00Z", "properties": {"gb": "0.25"}}));
    admin.ingest(Value::Array(evs)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, u) = read.get("/v1/meters/gb/usage?granularity=total").await;
        let total: rust_decimal::Decimal =
            u["data"].as_array().into_iter().flatten().filter_map(|r| r["value"].as_str()?.parse::<rust_decimal::Decimal>().ok()).sum();
        if total == rust_decimal::Decimal::new(1225, 2) {
            break;
        }
        assert!(Instant::now() < deadline, "usage not counted: {u}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _, message) = sql_err(&read, "SELECT count(*) FROM usage").await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{message}");
    assert!(message.contains("sql.max_live_rows") && message.contains("customer_id"), "{message}");
    let norm = |v: &Value| v.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap().normalize().to_string();
    let rows = sql(&read, "SELECT CAST(sum(value) AS VARCHAR) AS v, count(*) AS n FROM usage u WHERE u.customer_id = 'c1' AND meter = 'gb'").await;
    assert_eq!((norm(&rows[0]["v"]), rows[0]["n"].as_u64()), ("1.75".into(), Some(2)));
    let rows =
        sql(&read, "SELECT CAST(sum(value) AS VARCHAR) AS v FROM usage WHERE customer_id = 'c1' AND period_start >= '2026-02-10T20:30:00+09:00'")
            .await;
    assert_eq!(norm(&rows[0]["v"]), "0.25", "the bucket at 12:00 UTC only");
    let rows = sql(&read, "SELECT count(*) AS n FROM usage WHERE customer_id = 'c1' AND period_start < '2026-02-10T10:15:00Z'").await;
    assert_eq!(rows[0]["n"].as_u64(), Some(1), "the bucket at 10:00 UTC only");
    let (st, _, message) = sql_err(&read, "SELECT count(*) FROM usage u JOIN meters m ON m.key = u.meter WHERE u.customer_id = 'c1'").await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "a join is not pushed down: {message}");
}
