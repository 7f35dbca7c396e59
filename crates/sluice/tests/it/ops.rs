//! Health, readiness, metrics, OpenAPI and configuration errors.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{cli, Server};

#[tokio::test]
async fn health_ready_metrics_and_openapi() {
    let s = Server::start().await;
    let anon = s.anonymous();
    assert_eq!(anon.get("/healthz").await.0, StatusCode::OK);
    let (st, v) = anon.get("/readyz").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "ready");
    s.root().ingest(json!([{"id": "a", "type": "t"}, {"id": "a", "type": "t"}])).await;
    let _ = s.root().post("/v1/events", json!({"type": "bad type"})).await;
    let (st, text) = anon.get("/metrics").await;
    assert_eq!(st, StatusCode::OK);
    let text = text.as_str().unwrap().to_owned();
    for name in [
        "sluice_http_requests_total",
        "sluice_ingest_events_total{result=\"accepted\"} 1",
        "sluice_ingest_events_total{result=\"duplicate\"} 1",
        "sluice_ingest_bytes_total",
        "sluice_ingest_rejections_total{code=\"invalid_events\"} 1",
        "sluice_ingest_ack_seconds_bucket",
        "sluice_log_bytes",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let (st, doc) = anon.get("/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/v1/events", "/v1/events/{id}", "/v1/keys", "/v1/keys/{id}", "/v1/workspaces", "/healthz", "/metrics"] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    let (st, v) = s.root().get("/v1/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "not_found");
}

#[test]
fn unknown_config_keys_stop_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n[ingest]\nmax_event = 5\n").unwrap();
    let (ok, _, err) = cli(&["serve", "--config", cfg.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()], &[], None);
    assert!(!ok);
    assert!(err.contains("unknown configuration key `ingest.max_event`"), "{err}");
    let (ok, _, err) = cli(&["serve", "--data-dir", dir.path().to_str().unwrap()], &[("SLUICE_LOG_PARTITIONS", "zero")], None);
    assert!(!ok);
    assert!(err.contains("SLUICE_LOG_PARTITIONS"), "{err}");
    let (ok, out, _) = cli(&["config", "defaults"], &[], None);
    assert!(ok);
    assert!(out.contains("dedup_window"));
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let s = Server::start().await;
    let (ok, _, err) =
        cli(&["serve", "--listen", "127.0.0.1:0", "--data-dir", s.data_dir().to_str().unwrap(), "--state-url", &s.state_url()], &[], None);
    assert!(!ok);
    assert!(err.contains("another sluice process is using the data directory"), "{err}");
    assert_eq!(s.anonymous().get("/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_dashboard_is_served_at_the_root() {
    let s = Server::start().await;
    let resp = reqwest::get(format!("{}/", s.url)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    for api in ["/v1/consumers", "/v1/jobs", "/v1/dlq", "/v1/events", "/v1/webhooks", "/v1/sql", "/v1/overview", "/v1/keys", "/v1/queries"] {
        assert!(html.contains(api), "the dashboard does not use {api}");
    }
    // A browser that accepts gzip gets the same page compressed, well under
    // the first-load budget of 300 KB.
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let resp = raw.get(format!("{}/", s.url)).header("accept-encoding", "gzip, deflate, br").send().await.unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(resp.headers()["vary"], "Accept-Encoding");
    let gz = resp.bytes().await.unwrap();
    assert!(gz.len() < 300 * 1024 && gz.len() < html.len() / 3, "{} bytes compressed of {}", gz.len(), html.len());
    let mut unzipped = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped).unwrap();
    assert_eq!(unzipped, html);
    // Without gzip (or refusing it) the page comes as it is.
    for accept in [None, Some("identity"), Some("gzip;q=0")] {
        let mut rb = raw.get(format!("{}/", s.url));
        if let Some(a) = accept {
            rb = rb.header("accept-encoding", a);
        }
        let resp = rb.send().await.unwrap();
        assert!(resp.headers().get("content-encoding").is_none(), "{accept:?}");
        assert_eq!(resp.text().await.unwrap(), html, "{accept:?}");
    }
}

/// The overview (issue #10's first dashboard page): a workspace's figures
/// now equal what the other endpoints say, and its series add up to what it
/// did — and nothing of another workspace.
#[tokio::test]
async fn the_overview_counts_a_workspaces_own_activity_now_and_over_time() {
    let s = Server::start_with(&[
        ("SLUICE_DASHBOARD_OVERVIEW_INTERVAL", "200ms"),
        ("SLUICE_RETRY_ATTEMPTS", "2"),
        ("SLUICE_RETRY_BASE_MS", "20"),
        ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1"),
    ])
    .await;
    let a = s.workspace_with_keys("ov_a").await;
    let b = s.workspace_with_keys("ov_b").await;
    let (ra, ia, aa) = (s.api(&a.read), s.api(&a.ingest), s.api(&a.admin));
    // A webhook to a closed port: every event becomes a dead letter.
    let (st, v) = aa.post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/hook", "event_types": ["ov.dead"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let events: Vec<_> = (0..25).map(|i| json!({"id": format!("ov-{i}"), "type": if i < 3 { "ov.dead" } else { "ov.ok" }})).collect();
    assert_eq!(ia.ingest(json!(events)).await, (25, 0));
    // The same ids again: duplicates are not accepted events.
    assert_eq!(ia.ingest(json!(events[..5])).await, (0, 5));
    // Two refused requests.
    for _ in 0..2 {
        let (st, _) = ia.post("/v1/events", json!({"id": "", "type": "x"})).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
    }
    // A strict import with a bad row: a failed job.
    let (st, v) = aa.post("/v1/meters", json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "gb"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let csv = "customer_id,meter,timestamp,quantity\nc1,gb,2026-01-01T00:00:00Z,1\nc1,nope,2026-01-01T00:00:00Z,1\n";
    let (st, job) =
        aa.send(aa.req(reqwest::Method::POST, "/v1/imports?kind=usage&mode=strict&wait=true").header("content-type", "text/csv").body(csv)).await;
    assert!(st.is_success(), "{job}");
    assert_eq!(job["status"], "failed", "{job}");
    // Another workspace's events are not ours.
    assert_eq!(s.api(&b.ingest).ingest(json!([{"id": "b-1", "type": "ov.ok"}, {"id": "b-2", "type": "ov.ok"}])).await, (2, 0));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let o = loop {
        let (st, o) = ra.get("/v1/overview").await;
        assert_eq!(st, StatusCode::OK, "{o}");
        let sum = |k: &str| o["series"].as_array().unwrap().iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
        if sum("events") == 25
            && sum("ingest_rejected") == 2
            && o["dead_letters_waiting"] == 3
            && sum("dead_lettered") == 3
            && sum("jobs_failed") == 1
            && o["series"].as_array().unwrap().len() >= 2
        {
            break o;
        }
        assert!(std::time::Instant::now() < deadline, "the overview never counted the activity: {o}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(o["workspace"], "ov_a");
    assert_eq!(o["events_last_hour"], 25);
    assert_eq!(o["errors"], json!({"ingest_rejected": 2, "jobs_failed": 1, "dead_lettered": 3}));
    assert_eq!(o["errors_last_hour"], 6);
    let (_, failed) = ra.get("/v1/jobs?status=failed").await;
    assert_eq!(failed["data"].as_array().unwrap().len(), 1);
    assert!(o["ingest_rate"].as_f64().unwrap() > 0.0, "{o}");
    // The figures now agree with the lists they summarize.
    let (_, dlq) = ra.get("/v1/dlq?status=dead&limit=1000").await;
    assert_eq!(o["dead_letters_waiting"].as_u64().unwrap(), dlq["data"].as_array().unwrap().len() as u64);
    let (_, consumers) = ra.get("/v1/consumers").await;
    let names = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(&o["consumers"]), names(&consumers["data"]));
    // Every point has every field; errors add up per point; points are in time order.
    let series = o["series"].as_array().unwrap();
    assert!(series.len() >= 2, "{o}");
    for p in series {
        for k in [
            "at",
            "events",
            "ingest_rejected",
            "jobs_failed",
            "dead_lettered",
            "errors",
            "jobs_queued",
            "jobs_running",
            "dead_letters_waiting",
            "consumer_lag",
        ] {
            assert!(!p[k].is_null(), "{k} missing in {p}");
        }
        let e = p["ingest_rejected"].as_u64().unwrap() + p["jobs_failed"].as_u64().unwrap() + p["dead_lettered"].as_u64().unwrap();
        assert_eq!(p["errors"].as_u64().unwrap(), e, "{p}");
    }
    let times: Vec<chrono::DateTime<chrono::Utc>> = series.iter().map(|p| p["at"].as_str().unwrap().parse().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]));
    // The other workspace sees its own two events and none of our failures.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, ob) = s.api(&b.read).get("/v1/overview").await;
        if ob["events_last_hour"] == 2 {
            assert_eq!(ob["errors_last_hour"], 0, "{ob}");
            assert_eq!(ob["dead_letters_waiting"], 0, "{ob}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ob}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A shorter window has fewer points; bad input is a 400 naming the field;
    // an ingest key cannot read it, nor can an anonymous caller.
    let (st, short) = ra.get("/v1/overview?minutes=1").await;
    assert_eq!(st, StatusCode::OK);
    assert!(short["series"].as_array().unwrap().len() <= series.len() + 5);
    for bad in ["minutes=0", "minutes=61", "minutes=x"] {
        let (st, v) = ra.get(&format!("/v1/overview?{bad}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("minutes"), "{v}");
    }
    assert_eq!(ia.get("/v1/overview").await.0, StatusCode::FORBIDDEN);
    assert_eq!(s.anonymous().get("/v1/overview").await.0, StatusCode::UNAUTHORIZED);
}

/// `GET /v1/live` (the dashboard's change notifications): `ready`, then
/// `changed` naming `jobs` when a job of the workspace changes — and an open
/// stream does not hold a shutdown until its timeout.
#[tokio::test]
async fn the_live_stream_names_what_changed_and_ends_when_the_server_drains() {
    let mut s = Server::start().await;
    let k = s.workspace_with_keys("live").await;
    let other = s.workspace_with_keys("live_other").await;
    for (key, want) in [(None, StatusCode::UNAUTHORIZED), (Some(&k.ingest), StatusCode::FORBIDDEN)] {
        let mut rb = reqwest::Client::new().get(format!("{}/v1/live", s.url));
        if let Some(key) = key {
            rb = rb.bearer_auth(key);
        }
        assert_eq!(rb.send().await.unwrap().status(), want);
    }
    let mut resp = reqwest::Client::new().get(format!("{}/v1/live", s.url)).bearer_auth(&k.read).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut text = String::new();
    // Reads the stream until `want` appears (or fails after 15 s).
    async fn read_until(resp: &mut reqwest::Response, text: &mut String, want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !text.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, resp.chunk()).await {
                Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
                other => panic!("no {want:?} in the stream ({other:?}); so far: {text:?}"),
            }
        }
    }
    read_until(&mut resp, &mut text, "event: ready").await;
    // Another workspace's job is not ours: nothing is sent for it.
    assert_eq!(s.api(&other.admin).post("/v1/lake/compact", json!({})).await.0, StatusCode::ACCEPTED);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(!text.contains("event: changed"), "{text}");
    // Ours is.
    assert_eq!(s.api(&k.admin).post("/v1/lake/compact", json!({})).await.0, StatusCode::ACCEPTED);
    read_until(&mut resp, &mut text, "event: changed").await;
    read_until(&mut resp, &mut text, "\n\n").await;
    assert!(text.contains(r#"data: {"topics":["jobs"]}"#), "{text}");
    // A SIGTERM with the stream still open: the server drains and stops
    // cleanly, well before its 30 s shutdown timeout.
    let started = std::time::Instant::now();
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}; log:\n{}", s.stderr_text());
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "shutdown took {:?}", started.elapsed());
    assert!(s.stderr_text().contains("stopped cleanly"), "{}", s.stderr_text());
}
