//! Issue 23, SQL: a read key cannot take the server down, read more than
//! its scope, or get wrong numbers; schemas cannot break `events`; exports
//! leave no temp files; nothing shows the server's paths.
//!
//! Each query runs in a `sluice sql-worker` child limited to
//! `sql.memory_limit` + 256 MiB (+ its inputs); the server's own peak RSS
//! (VmHWM) must stay under `sql.memory_limit` + [`RSS_MARGIN`], however
//! hostile the queries.

use std::str::FromStr;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{Api, Server};

/// `sql.memory_limit` of these servers: 256 MiB.
const MEMORY_LIMIT: u64 = 256 << 20;
/// The server's peak RSS may exceed the SQL memory limit by this much (its
/// own baseline: runtime, store, log; queries run in children).
const RSS_MARGIN: u64 = 192 << 20;
const ENV: &[(&str, &str)] = &[("SLUICE_SQL_MEMORY_LIMIT", "268435456"), ("SLUICE_SQL_TIMEOUT", "5s"), ("SLUICE_LAKE_FLUSH_INTERVAL", "200ms")];

/// A `/proc/<pid>/status` field in bytes (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} missing in {status}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

async fn healthy(s: &Server) {
    let (st, v) = s.anonymous().get("/healthz").await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

async fn sql(api: &Api, q: &str) -> Vec<Value> {
    let (st, v) = api.post("/v1/sql", json!({"query": q})).await;
    assert_eq!(st, StatusCode::OK, "{q}: {v}");
    v["data"].as_array().unwrap().clone()
}

async fn put(api: &Api, path: &str, body: Value) -> (StatusCode, Value) {
    api.send(api.req(Method::PUT, path).json(&body)).await
}

/// Every file name under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_repeat_of_a_billion_bytes_is_refused_and_the_server_stays_up() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("rep").await;
    let read = s.api(&k.read);
    let pid = s.pid().unwrap();
    let t = Instant::now();
    let (st, v) = read.post("/v1/sql", json!({"query": "SELECT length(repeat('x', 1000000000)) AS n"})).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("sql.memory_limit"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    healthy(&s).await;
    assert_eq!(sql(&read, "SELECT length(repeat('x', 1000)) AS n").await, vec![json!({"n": 1000})]);
    let peak = proc_kib(pid, "VmHWM");
    assert!(peak < MEMORY_LIMIT + RSS_MARGIN, "the server's peak RSS is {} MiB", peak >> 20);
    // The worker's failure is in the log, not in the answer.
    assert!(!v.to_string().contains("memory allocation of"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sql_queries_are_refused_or_bounded_and_rss_stays_under_the_limit() {
    let _heavy = crate::helpers::heavy().await;
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("hostile").await;
    let read = s.api(&k.read);
    let pid = s.pid().unwrap();
    // Some events to join with themselves.
    let evs: Vec<Value> = (0..2000).map(|i| json!({"id": format!("e{i}"), "type": "page", "properties": {"n": i}})).collect();
    for chunk in evs.chunks(500) {
        s.api(&k.ingest).ingest(Value::Array(chunk.to_vec())).await;
    }
    let doubling = {
        let mut q = "WITH a0 AS (SELECT repeat('x', 1000000) AS s)".to_owned();
        for i in 1..12 {
            q.push_str(&format!(", a{i} AS (SELECT s || s AS s FROM a{})", i - 1));
        }
        q.push_str(" SELECT length(s) AS n FROM a11");
        q
    };
    let deep = format!("SELECT {}1{} AS x", "(".repeat(5000), ")".repeat(5000));
    let long_sum = format!("SELECT {} AS x", vec!["1"; 20000].join(" + "));
    let queries: Vec<(&str, String)> = vec![
        ("repeat", "SELECT length(repeat('x', 1000000000)) AS n".into()),
        ("repeat of repeat", "SELECT length(repeat(repeat('x', 100000), 100000)) AS n".into()),
        ("lpad", "SELECT length(lpad('x', 1000000000, 'y')) AS n".into()),
        ("rpad", "SELECT length(rpad('x', 1000000000, 'y')) AS n".into()),
        ("array_repeat", "SELECT cardinality(array_repeat(1, 1000000000)) AS n".into()),
        ("range array", "SELECT cardinality(range(1, 1000000000)) AS n".into()),
        ("generate_series array", "SELECT cardinality(generate_series(1, 1000000000)) AS n".into()),
        ("1 MB per row", "SELECT sum(length(repeat('x', 1000000 + CAST(value AS INT)))) AS n FROM generate_series(1, 100000)".into()),
        ("string_agg", "SELECT length(string_agg(repeat('x', 100000 + CAST(value AS INT)), ',')) AS n FROM generate_series(1, 100000)".into()),
        ("recursive CTE", "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) AS n FROM t".into()),
        ("doubling CTE chain", doubling),
        ("cross join x3 count", "SELECT count(*) AS n FROM events a, events b, events c, events d".into()),
        ("cross join x3 rows", "SELECT * FROM events a CROSS JOIN events b CROSS JOIN events c".into()),
        ("huge result", "SELECT * FROM generate_series(1, 100000000)".into()),
        ("deep nesting", deep),
        ("long expression", long_sum),
    ];
    let mut answers = Vec::new();
    for (name, q) in &queries {
        let t = Instant::now();
        let (st, v) = read.post("/v1/sql", json!({"query": q})).await;
        let took = t.elapsed();
        answers.push(format!("{name}: {st} in {took:?}: {}", v["error"]["message"].as_str().unwrap_or("")));
        assert!([StatusCode::BAD_REQUEST, StatusCode::PAYLOAD_TOO_LARGE, StatusCode::UNPROCESSABLE_ENTITY].contains(&st), "{name}: {st} {v}");
        // The 5 s time limit, plus the worker's start and the answer.
        assert!(took < Duration::from_secs(12), "{name} took {took:?}");
        healthy(&s).await;
        let rss = proc_kib(pid, "VmRSS");
        assert!(rss < MEMORY_LIMIT + RSS_MARGIN, "{name}: the server's RSS is {} MiB", rss >> 20);
        if *name == "recursive CTE" {
            assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("recursive"), "{v}");
        }
    }
    let peak = proc_kib(pid, "VmHWM");
    assert!(peak < MEMORY_LIMIT + RSS_MARGIN, "the server's peak RSS is {} MiB; answers:\n{}", peak >> 20, answers.join("\n"));
    eprintln!("hostile SQL answers (server peak RSS {} MiB):\n{}", peak >> 20, answers.join("\n"));
    // Still answering queries, and ingest.
    assert_eq!(sql(&read, "SELECT count(*) AS n FROM events").await, vec![json!({"n": 2000})]);
    s.api(&k.ingest).ingest(json!([{"id": "after", "type": "page"}])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_usage_table_is_exact_from_1e17_up() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("big").await;
    let admin = s.api(&k.admin);
    let (st, v) = admin.post("/v1/meters", json!({"key": "big", "event_type": "big", "aggregation": "sum", "value_property": "v"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let values = [
        ("c1", "123456789012345678.5"),
        ("c2", "100000000000000001"),
        ("c3", "99999999999999999999999999.25"),
        ("c4", "0.000000000001"),
        ("c5", "98765432109876543.210987654321"),
    ];
    let evs: Vec<Value> = values
        .iter()
        .map(|(c, v)| json!({"id": format!("b-{c}"), "type": "big", "customer_id": c, "timestamp": "2026-02-10T10:00:00Z", "properties": {"v": v}}))
        .collect();
    admin.ingest(Value::Array(evs)).await;
    // REST first: the reference.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rest = loop {
        let (st, v) = admin.get("/v1/meters/big/usage?granularity=month").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        if v["data"].as_array().unwrap().len() == values.len() {
            break v["data"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "usage not metered: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dec = |s: &str| rust_decimal::Decimal::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let rows = sql(&s.api(&k.read), "SELECT customer_id, CAST(value AS VARCHAR) AS v FROM usage WHERE meter = 'big' ORDER BY customer_id").await;
    assert_eq!(rows.len(), values.len(), "{rows:?}");
    for (row, (c, v)) in rows.iter().zip(values) {
        assert_eq!(row["customer_id"], *c);
        let r = rest.iter().find(|r| r["customer_id"] == *c).unwrap();
        assert_eq!(dec(row["v"].as_str().unwrap()), dec(r["value"].as_str().unwrap()), "SQL {row} vs REST {r}");
        assert_eq!(dec(row["v"].as_str().unwrap()), dec(v), "{row}");
    }
    // A value the column cannot hold: the query fails, naming it; never rounded.
    let (st, v) = admin.post("/v1/meters", json!({"key": "huge", "event_type": "huge", "aggregation": "sum", "value_property": "v"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    admin.ingest(json!([{"id": "h1", "type": "huge", "customer_id": "cx", "timestamp": "2026-02-10T10:00:00Z", "properties": {"v": "1000000000000000000000000000"}}])).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = admin.get("/v1/meters/huge/usage?granularity=month").await;
        if v["data"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "usage not metered: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, v) = s.api(&k.read).post("/v1/sql", json!({"query": "SELECT value FROM usage"})).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "value_out_of_range", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for needle in ["huge", "cx", "1000000000000000000000000000", "/v1/meters/huge/usage"] {
        assert!(msg.contains(needle), "{needle} missing in {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_key_cannot_read_audit_log_through_sql() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("aud").await;
    let (read, admin) = (s.api(&k.read), s.api(&k.admin));
    admin.post("/v1/meters", json!({"key": "n", "event_type": "x", "aggregation": "count"})).await;
    // REST says 403 to a read key…
    let (st, rest) = read.get("/v1/audit").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{rest}");
    // …and so does SQL, in any position, in the same shape.
    for q in [
        "SELECT * FROM audit_log",
        "SELECT count(*) AS n FROM (SELECT action FROM audit_log) a",
        "WITH x AS (SELECT * FROM audit_log) SELECT count(*) AS n FROM x",
        "SELECT (SELECT count(*) FROM audit_log) AS n",
    ] {
        let (st, v) = read.post("/v1/sql", json!({"query": q})).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{q}: {v}");
        assert_eq!(v["error"]["code"], rest["error"]["code"], "{q}: {v}");
        assert_eq!(v["error"]["code"], "forbidden");
    }
    // Text that merely mentions it is fine; admin keys read it.
    assert_eq!(sql(&read, "SELECT 'audit_log' AS t").await, vec![json!({"t": "audit_log"})]);
    let rows = sql(&admin, "SELECT count(*) AS n FROM audit_log").await;
    assert!(rows[0]["n"].as_i64().unwrap() >= 1, "{rows:?}");
    // Other live tables stay readable by a read key.
    assert_eq!(sql(&read, "SELECT key FROM meters").await, vec![json!({"key": "n"})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_properties_mapping_to_one_column_are_refused_with_409() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("cols").await;
    let admin = s.api(&k.admin);
    // Within one schema.
    let (st, v) = put(&admin, "/v1/schemas/t1", json!({"properties": {"a-b": "int64", "a_b": "int64"}})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "column_collision", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for needle in ["a-b", "a_b", "p_a_b"] {
        assert!(msg.contains(needle), "{needle} missing in {msg}");
    }
    let (_, list) = admin.get("/v1/schemas").await;
    assert_eq!(list["data"], json!([]), "nothing is written on refusal: {list}");
    // Against another event type's properties, whatever the type.
    let (st, v) = put(&admin, "/v1/schemas/t1", json!({"properties": {"a-b": "int64"}})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    for ty in ["string", "int64"] {
        let (st, v) = put(&admin, "/v1/schemas/t2", json!({"properties": {"a.b": ty}})).await;
        assert_eq!(st, StatusCode::CONFLICT, "{ty}: {v}");
        assert_eq!(v["error"]["code"], "column_collision", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("t1"), "{v}");
    }
    let (_, list) = admin.get("/v1/schemas").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    // The same name with the same type in another event type shares the column.
    let (st, v) = put(&admin, "/v1/schemas/t2", json!({"properties": {"a-b": "int64"}})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // And `events` still answers.
    admin.ingest(json!([{"id": "x1", "type": "t1", "properties": {"a-b": 7}}, {"id": "x2", "type": "t2", "properties": {"a-b": 8}}])).await;
    let rows = sql(&s.api(&k.read), "SELECT sum(p_a_b) AS s FROM events").await;
    assert_eq!(rows, vec![json!({"s": 15})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_export_leaves_no_temp_file() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("exp").await;
    let admin = s.api(&k.admin);
    admin.ingest(json!([{"id": "e1", "type": "page"}])).await;
    let (st, v) = admin
        .post("/v1/queries", json!({"name": "big", "sql": "SELECT repeat('x', 1000) AS s FROM generate_series(1, 1000)", "export": {"format": "csv", "path": "out/big.csv"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // The destination is a directory: writing succeeds, the rename fails.
    let exports = s.data_dir().join("lake/exports/exp");
    std::fs::create_dir_all(exports.join("out/big.csv")).unwrap();
    let (st, job) = admin.post("/v1/queries/big/run", json!({})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let j = loop {
        let (_, j) = admin.get(&format!("/v1/jobs/{id}")).await;
        if j["error"].is_string() || j["status"] == "failed" {
            break j;
        }
        assert!(j["status"] != "succeeded", "{j}");
        assert!(Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let left: Vec<String> = files_under(&exports).into_iter().filter(|f| f.ends_with(".tmp")).collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
    let data_dir = s.data_dir().display().to_string();
    assert!(!j.to_string().contains(&data_dir), "the job shows a server path: {j}");
    assert!(j["error"].as_str().unwrap().contains("exports/exp/out/big.csv"), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_export_temp_files_are_removed_at_start() {
    let mut s = Server::start_with(ENV).await;
    let dir = s.data_dir().join("lake/exports/ws/daily");
    std::fs::create_dir_all(&dir).unwrap();
    let stale = dir.join(".0192f3a4b5c6d7e8f90a1b2c3d4e5f60.tmp");
    std::fs::write(&stale, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("report.csv"), "a\n1\n").unwrap();
    s.restart();
    healthy(&s).await;
    assert!(!stale.exists(), "a stale export temp file survived a restart");
    assert!(dir.join("report.csv").exists(), "an export was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_responses_show_no_absolute_paths() {
    let s = Server::start_with(ENV).await;
    let k = s.workspace_with_keys("paths").await;
    let (read, admin) = (s.api(&k.read), s.api(&k.admin));
    admin.ingest(json!([{"id": "p1", "type": "page"}, {"id": "p2", "type": "page"}])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let files = loop {
        let (st, v) = read.get("/v1/lake/files").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        if !v["data"].as_array().unwrap().is_empty() {
            break v;
        }
        assert!(Instant::now() < deadline, "no lake file: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let data_dir = s.data_dir().display().to_string();
    let lake_root = s.data_dir().join("lake");
    let mut shown = vec![files.to_string()];
    for f in files["data"].as_array().unwrap() {
        let p = f["path"].as_str().unwrap();
        assert!(!p.starts_with('/'), "{p}");
        assert!(lake_root.join(p).is_file(), "{p} is not relative to the lake root");
    }
    for engine in ["duckdb", "trino", "athena", "spark"] {
        let resp = read.req(Method::GET, &format!("/v1/lake/ddl?engine={engine}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        shown.push(resp.text().await.unwrap());
    }
    let (st, job) = admin.post("/v1/lake/compact", json!({})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{job}");
    shown.push(job.to_string());
    // An export's job names its file relative to the lake root.
    let (st, v) = admin
        .post("/v1/queries", json!({"name": "q", "sql": "SELECT count(*) AS n FROM events", "export": {"format": "csv", "path": "n.csv"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (_, job) = admin.post("/v1/queries/q/run", json!({})).await;
    let id = job["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = admin.get(&format!("/v1/jobs/{id}")).await;
        if j["status"] == "succeeded" {
            assert_eq!(j["result"]["path"], "exports/paths/n.csv", "{j}");
            shown.push(j.to_string());
            break;
        }
        assert!(j["status"] != "failed" && Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SQL errors, including storage errors: a damaged lake file.
    for q in ["SELECT * FROM 'workspace=paths'", "SELECT nope FROM events", "SELECT * FROM events WHERE"] {
        let (st, v) = read.post("/v1/sql", json!({"query": q})).await;
        assert!(st.is_client_error(), "{q}: {st} {v}");
        shown.push(v.to_string());
    }
    for f in files["data"].as_array().unwrap() {
        std::fs::write(lake_root.join(f["path"].as_str().unwrap()), b"not parquet at all").unwrap();
    }
    let (st, v) = read.post("/v1/sql", json!({"query": "SELECT * FROM events"})).await;
    assert!(!st.is_success(), "{v}");
    shown.push(v.to_string());
    for text in &shown {
        assert!(!text.contains(&data_dir), "a response shows the server path {data_dir}: {text}");
        assert!(!text.contains(data_dir.trim_start_matches('/')), "a response shows the server path: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_and_saved_queries_beyond_the_workspace_limit_get_409() {
    let s = Server::start_with(&[("SLUICE_LIMITS_SCHEMAS", "2"), ("SLUICE_LIMITS_SAVED_QUERIES", "1")]).await;
    let k = s.workspace_with_keys("lim").await;
    let admin = s.api(&k.admin);
    for t in ["t1", "t2"] {
        let (st, v) = put(&admin, &format!("/v1/schemas/{t}"), json!({"properties": {format!("p_{t}"): "int64"}})).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    let (st, v) = put(&admin, "/v1/schemas/t3", json!({"properties": {"x": "int64"}})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("limits.schemas"), "{v}");
    // Replacing one is not one more.
    let (st, v) = put(&admin, "/v1/schemas/t1", json!({"properties": {"p_t1": "int64", "y": "bool"}})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = admin.post("/v1/queries", json!({"name": "a", "sql": "SELECT 1 AS one"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = admin.post("/v1/queries", json!({"name": "b", "sql": "SELECT 2 AS two"})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("limits.saved_queries"), "{v}");
    let (st, v) = admin.post("/v1/queries", json!({"name": "a", "sql": "SELECT 3 AS three"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}
