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
    for api in ["/v1/consumers", "/v1/jobs", "/v1/dlq", "/v1/events", "/v1/webhooks", "/v1/sql"] {
        assert!(html.contains(api), "the dashboard does not use {api}");
    }
}
