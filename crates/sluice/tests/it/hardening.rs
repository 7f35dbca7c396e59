//! Issue 23, items 6 and 7: HTTP timeouts and the connection cap,
//! per-workspace limits, the SSRF guard, `/metrics`, and the permissions of
//! the data directory. Each test is named after the finding it guards.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::Server;

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").trim_end_matches('/').to_owned()
}

/// Raises this test process's own open-files limit (1,000 sockets).
fn raise_own_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum) {
        if cur < max {
            let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(max), maximum: Some(max) });
        }
    }
}

/// Reads until EOF, an error (reset) or `deadline`; returns what was read and
/// whether the connection ended before the deadline.
async fn read_until_closed(sock: &mut TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends one raw request and reads the whole answer (the request asks the
/// server to close); returns the response text.
async fn raw_request(addr: &str, request: &str) -> String {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let _ = sock.write_all(request.as_bytes()).await;
    let (bytes, closed) = read_until_closed(&mut sock, Instant::now() + Duration::from_secs(10)).await;
    assert!(closed, "connection not closed: {}", String::from_utf8_lossy(&bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

const HEALTHZ_CLOSE: &str = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_silent_connections_do_not_stop_healthz_or_ingest_and_are_closed_within_the_header_timeout() {
    let _heavy = crate::helpers::heavy().await;
    raise_own_fd_limit();
    // Long enough that opening 1,000 connections on a loaded 2-core machine
    // (3 s once, in a debug build beside a release build) ends well within it.
    let header_timeout = Duration::from_secs(8);
    let s = Server::start_with(&[("SLUICE_HTTP_HEADER_TIMEOUT", "8s"), ("SLUICE_HTTP_MAX_CONNECTIONS", "1010")]).await;
    let a = addr(&s);
    let api = s.root();

    // 1,000 connections that send nothing.
    let opened = Instant::now();
    let mut silent = Vec::with_capacity(1000);
    for _ in 0..1000 {
        silent.push(TcpStream::connect(&a).await.unwrap());
    }
    assert!(opened.elapsed() < header_timeout / 2, "opening the connections took {:?}", opened.elapsed());

    // Meanwhile the server answers: health and ingest (under the cap).
    let (st, _) = s.anonymous().get("/healthz").await;
    assert_eq!(st, StatusCode::OK);
    api.ingest(json!([{"id": "during-silence", "type": "t"}])).await;
    assert!(opened.elapsed() < header_timeout, "served only after the silent connections were closed");

    // Over the cap: 1,000 silent + this test's pooled client connection(s)
    // + 20 more that send nothing yet. Those beyond 1,010 are answered 503
    // with Retry-After and closed at once, not left hanging; the others are
    // served once they send their request.
    let mut extra = Vec::new();
    for _ in 0..20 {
        extra.push(TcpStream::connect(&a).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = futures::future::join_all(extra.into_iter().map(|mut sock| async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(500), sock.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        };
        if closed {
            return (String::from_utf8_lossy(&got).into_owned(), true);
        }
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        sock.write_all(HEALTHZ_CLOSE.as_bytes()).await.unwrap();
        let (bytes, closed) = read_until_closed(&mut sock, Instant::now() + Duration::from_secs(2)).await;
        (String::from_utf8_lossy(&bytes).into_owned(), closed)
    }))
    .await;
    assert!(opened.elapsed() < header_timeout, "the extra connections were answered late: {:?}", opened.elapsed());
    let mut busy = 0;
    for (text, closed) in &answers {
        assert!(closed, "an extra connection was left open: {text:?}");
        if text.starts_with("HTTP/1.1 503") {
            assert!(text.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{text}");
            busy += 1;
        } else {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
    }
    assert!((10..20).contains(&busy), "{busy} of 20 connections over the cap got 503: {answers:?}");

    // Every silent connection is closed (a 408, then EOF) within the header
    // timeout, give or take the scheduling of 1,000 timers on a loaded
    // 2-core machine (CI once saw 648 still open 2 s after it, in a debug
    // build beside the PostgreSQL suite; never a connection left open).
    let deadline = opened + header_timeout + Duration::from_secs(5);
    let results = futures::future::join_all(silent.iter_mut().map(|sock| read_until_closed(sock, deadline))).await;
    let still_open = results.iter().filter(|(_, closed)| !closed).count();
    assert_eq!(still_open, 0, "{still_open} silent connections still open {:?} after they were opened", opened.elapsed());
    for (bytes, _) in &results {
        let text = String::from_utf8_lossy(bytes);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(results.iter().any(|(b, _)| b.starts_with(b"HTTP/1.1 408")), "no silent connection got a 408");
    drop(silent);

    // Service resumed: new connections are served again.
    let answers = futures::future::join_all((0..20).map(|_| raw_request(&a, HEALTHZ_CLOSE))).await;
    for text in &answers {
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    let sent = api.req(reqwest::Method::POST, "/v1/events").json(&json!([{"id": "after-silence", "type": "t"}])).send().await;
    let status = sent.as_ref().map(|r| r.status());
    assert!(matches!(status, Ok(StatusCode::OK)), "ingest after the silence: {sent:?}\nserver log:\n{}", s.stderr_text());
}

#[tokio::test]
async fn slow_headers_get_408_or_close_within_the_header_timeout() {
    let s = Server::start_with(&[("SLUICE_HTTP_HEADER_TIMEOUT", "2s")]).await;
    let sock = TcpStream::connect(addr(&s)).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = sock.into_split();
    wr.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // One header byte every 300 ms, never the end of the headers.
    let trickle = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if wr.write_all(b"x").await.is_err() {
                break;
            }
        }
    });
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = (started + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    trickle.abort();
    let text = String::from_utf8_lossy(&bytes);
    assert!(closed, "a connection trickling its headers was still open after {:?}", started.elapsed());
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.starts_with("HTTP/1.1 408"), "no 408: {text:?}");
    // And the server still answers.
    assert!(raw_request(&addr(&s), HEALTHZ_CLOSE).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_stalled_body_gets_408_within_the_body_timeout() {
    let s = Server::start_with(&[("SLUICE_HTTP_BODY_TIMEOUT", "2s")]).await;
    let mut sock = TcpStream::connect(addr(&s)).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n[{{\"type\":",
        s.key
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut sock, started + Duration::from_secs(4)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 408"), "after {:?}: {text:?}", started.elapsed());
    assert!(text.contains("request_timeout"), "{text}");
    assert!(closed, "the connection stayed open after the 408");
    assert!(started.elapsed() >= Duration::from_millis(1500), "408 too early: {:?}", started.elapsed());
    // Nothing was stored, and the server still ingests.
    assert_eq!(s.root().all_events("").await.len(), 0);
    s.root().ingest(json!([{"id": "after", "type": "t"}])).await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    // The idle timeout is longer than the header timeout: an idle connection
    // must live past the header timeout, and be closed by the idle timeout.
    let s = Server::start_with(&[("SLUICE_HTTP_HEADER_TIMEOUT", "1s"), ("SLUICE_HTTP_IDLE_TIMEOUT", "3s")]).await;
    let mut sock = TcpStream::connect(addr(&s)).await.unwrap();
    sock.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"ok\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let (bytes, closed) = read_until_closed(&mut sock, idle_from + Duration::from_secs(6)).await;
    let idle = idle_from.elapsed();
    assert!(closed, "an idle keep-alive connection was still open after {idle:?}");
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
    assert!(idle >= Duration::from_millis(2500), "closed after {idle:?}, before the idle timeout");
    assert!(idle <= Duration::from_secs(5), "closed only after {idle:?}");
}

#[tokio::test]
async fn connections_over_the_cap_get_503_with_retry_after() {
    let s = Server::start_with(&[("SLUICE_HTTP_MAX_CONNECTIONS", "5"), ("SLUICE_HTTP_HEADER_TIMEOUT", "30s")]).await;
    let a = addr(&s);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(&a).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let text = raw_request(&a, HEALTHZ_CLOSE).await;
    assert!(started.elapsed() < Duration::from_secs(2), "the 503 took {:?}", started.elapsed());
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1\r\n"), "{text}");
    assert!(lower.contains("\"overloaded\""), "{text}");
    // The held connections still work, under the cap.
    held[0].write_all(HEALTHZ_CLOSE.as_bytes()).await.unwrap();
    let (bytes, _) = read_until_closed(&mut held[0], Instant::now() + Duration::from_secs(5)).await;
    assert!(bytes.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&bytes));
    // Once they are gone, new connections are served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = raw_request(&a, HEALTHZ_CLOSE).await;
        if text.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused after the connections closed: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn webhooks_beyond_the_workspace_limit_get_409() {
    let s = Server::start_with(&[("SLUICE_LIMITS_WEBHOOKS", "3"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "true")]).await;
    let a = s.workspace_with_keys("wa").await;
    let b = s.workspace_with_keys("wb").await;
    let hook = json!({"url": "http://127.0.0.1:9/hook", "event_types": ["t"]});
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (st, v) = s.api(&a.admin).post("/v1/webhooks", hook.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (st, v) = s.api(&a.admin).post("/v1/webhooks", hook.clone()).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("limits.webhooks"), "{v}");
    let (_, list) = s.api(&a.admin).get("/v1/webhooks").await;
    assert_eq!(list["data"].as_array().map(Vec::len).unwrap_or_else(|| list.as_array().unwrap().len()), 3, "{list}");
    // The limit is per workspace.
    let (st, v) = s.api(&b.admin).post("/v1/webhooks", hook.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Deleting one makes room.
    let (st, _) = s.api(&a.admin).delete(&format!("/v1/webhooks/{}", ids[0])).await;
    assert!(st.is_success(), "{st}");
    let (st, v) = s.api(&a.admin).post("/v1/webhooks", hook).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn meters_beyond_the_workspace_limit_get_409() {
    let s = Server::start_with(&[("SLUICE_LIMITS_METERS", "2")]).await;
    let a = s.workspace_with_keys("ma").await;
    let b = s.workspace_with_keys("mb").await;
    let meter = |key: &str| json!({"key": key, "event_type": "api.call", "aggregation": "count"});
    for key in ["m1", "m2"] {
        let (st, v) = s.api(&a.admin).post("/v1/meters", meter(key)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let (st, v) = s.api(&a.admin).post("/v1/meters", meter("m3")).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("limits.meters"), "{v}");
    let (st, _) = s.api(&a.admin).get("/v1/meters/m3").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = s.api(&b.admin).post("/v1/meters", meter("m1")).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn webhook_registration_refuses_special_purpose_addresses() {
    let s = Server::start().await;
    let api = s.root();
    for host in [
        // The findings.
        "198.18.0.1",
        "198.19.255.254",
        "192.0.0.1",
        "192.0.2.1",
        "[2001:db8::1]",
        "[100::1]",
        "[64:ff9b:1::1]",
        "[2002:7f00:1::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:0:127.0.0.1]",
        "[64:ff9b::127.0.0.1]",
        // More of the registries.
        "198.51.100.7",
        "203.0.113.7",
        "192.31.196.1",
        "192.52.193.1",
        "192.88.99.1",
        "192.175.48.1",
        "100.64.0.1",
        "169.254.169.254",
        "[3fff::1]",
        "[5f00::1]",
        "[2001::1]",
        "[fd00:ec2::254]",
        "[2002:a9fe:a9fe::1]",
    ] {
        let url = format!("http://{host}/hook");
        let (st, v) = api.post("/v1/webhooks", json!({"url": url, "event_types": ["t"]})).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {v}");
        assert_eq!(v["error"]["code"], "forbidden_target", "{url}: {v}");
    }
    let (_, list) = api.get("/v1/webhooks").await;
    assert!(!list.to_string().contains("/hook"), "a refused webhook was stored: {list}");
}

#[tokio::test]
async fn metrics_can_require_a_key_and_have_no_webhook_labels() {
    let s = Server::start_with(&[("SLUICE_METRICS_REQUIRE_KEY", "true"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let keys = s.workspace_with_keys("mx").await;
    let (st, hook) = s.api(&keys.admin).post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/hook", "event_types": ["*"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{hook}");
    let id = hook["id"].as_str().unwrap().to_owned();
    s.api(&keys.ingest).ingest(json!([{"id": "e1", "type": "t"}, {"id": "e2", "type": "t"}])).await;
    // Let the webhook consumer run (and fail against the closed port).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (st, v) = s.anonymous().get("/metrics").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let (st, v) = s.api(&keys.ingest).get("/metrics").await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, text) = s.api(&keys.read).get("/metrics").await;
    assert_eq!(st, StatusCode::OK, "{text}");
    let text = text.as_str().unwrap().to_owned();
    assert!(text.contains("sluice_http_requests_total"), "{text}");
    assert!(text.contains("sluice_consumer_lag"), "no consumer series at all:\n{text}");
    assert!(!text.contains(&id) && !text.contains("wh_"), "webhook ids in /metrics:\n{text}");
    let (st, _) = s.root().get("/metrics").await;
    assert_eq!(st, StatusCode::OK);
}

/// Every directory under `dir` is 0700 and every file 0600 (or stricter).
fn assert_private(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn data_directory_is_0700_and_files_0600() {
    let mut s = Server::start_with(&[("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let dir = s.data_dir();
    s.root().ingest(json!([{"id": "p1", "type": "t"}])).await;
    let (st, v) = s.root().post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/hook", "event_types": ["t"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let files = assert_private(&dir);
    assert!(files >= 2, "expected the log (and state.db) in {}", dir.display());
    if crate::helpers::backend() == "sqlite" {
        assert!(dir.join("state.db").exists());
    }
    assert!(std::fs::read_dir(dir.join("log")).is_ok(), "no log directory");

    // An install from before: everything readable by all. A restart fixes it.
    s.terminate();
    let mut stack = vec![dir.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    s.restart();
    s.root().ingest(json!([{"id": "p2", "type": "t"}])).await;
    assert_private(&dir);
}

/// Issue 7 (the binary as glue): the benchmark's parse-and-discard endpoint
/// was served to any ingest key in production and listed in the OpenAPI
/// document. It exists only on a server started for a benchmark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_discard_exists_only_on_a_server_started_for_a_benchmark() {
    let s = Server::start().await;
    let (st, _) = s.root().post("/v1/bench/discard", json!({"type": "x"})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, doc) = s.anonymous().get("/openapi.json").await;
    assert!(doc["paths"].get("/v1/bench/discard").is_none());
    let bench = Server::start_with(&[("SLUICE_BENCH_ENDPOINTS", "1")]).await;
    let (st, v) = bench.root().post("/v1/bench/discard", json!({"type": "x"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], 1);
    assert!(bench.root().all_events("").await.is_empty(), "nothing is stored");
}
