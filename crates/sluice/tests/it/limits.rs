//! Oversized, compressed and malformed bodies: a clear 4xx, nothing stored,
//! and the server stays up.

use std::io::Write;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::Server;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn bad_bodies_get_clear_4xx_and_change_nothing() {
    let s = Server::start_with(&[
        ("SLUICE_INGEST_MAX_BODY_BYTES", "65536"),
        ("SLUICE_INGEST_MAX_BUFFERED_BODY_BYTES", "1000000"),
        ("SLUICE_INGEST_MAX_EVENT_BYTES", "2048"),
        ("SLUICE_INGEST_MAX_EVENTS", "100"),
    ])
    .await;
    let api = s.root();

    // Body over the limit.
    let big = json!([{"type": "t", "properties": {"pad": "x".repeat(70_000)}}]).to_string();
    let (st, v) = api.post_raw("/v1/events", "application/json", big).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_body_bytes"), "{v}");

    // Same, without a Content-Length (chunked upload).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..20).map(|_| Ok(vec![b' '; 8192])).collect();
    let stream = futures::stream::iter(chunks);
    let (st, _) =
        api.send(api.req(Method::POST, "/v1/events").header("content-type", "application/json").body(reqwest::Body::wrap_stream(stream))).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);

    // A gzip bomb: under 64 KiB compressed, 60 MiB inflated (deflate tops out near 1:1000).
    let bomb = gzip(&vec![b' '; 60 << 20]);
    assert!(bomb.len() < 65536, "bomb is {} bytes", bomb.len());
    let (st, v) =
        api.send(api.req(Method::POST, "/v1/events").header("content-type", "application/json").header("content-encoding", "gzip").body(bomb)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("decompressed"), "{v}");

    // Broken gzip, unknown encodings.
    let (st, _) = api.send(api.req(Method::POST, "/v1/events").header("content-encoding", "gzip").body(b"not gzip".to_vec())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = api.send(api.req(Method::POST, "/v1/events").header("content-encoding", "br").body("{}")).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Malformed JSON, empty bodies, wrong shapes.
    for body in ["{\"type\": \"t\"", "[{\"type\":\"t\"},]", "", "42", "null", "[]"] {
        let (st, v) = api.post_raw("/v1/events", "application/json", body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body:?}: {v}");
        assert_eq!(v["error"]["code"], "malformed_body", "{body:?}: {v}");
    }
    let (st, v) = api.post_raw("/v1/events", "application/x-ndjson", "{\"type\":\"t\"}\nnot json\n").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("line 2"), "{v}");
    let (st, v) = api.post_raw("/v1/events", "application/json", vec![b'[', 0xff, 0xfe, b']']).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // Too many events, one event too large: 413 naming the limit.
    let many: Vec<_> = (0..101).map(|i| json!({"id": format!("m{i}"), "type": "t"})).collect();
    let (st, v) = api.post("/v1/events", json!(many)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["error"]["message"].as_str().unwrap().contains("max_events"), "{v}");
    let (st, v) = api.post("/v1/events", json!([{"type": "t"}, {"type": "t", "properties": {"pad": "y".repeat(3000)}}])).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["error"]["message"].as_str().unwrap().contains("max_event_bytes"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("index 1"), "{v}");

    // Still up, and nothing of the refused requests was stored.
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    assert!(api.all_events("").await.is_empty());
    assert_eq!(api.ingest(json!({"id": "ok", "type": "t"})).await, (1, 0));
}

#[tokio::test]
async fn over_capacity_answers_503_with_retry_after() {
    use tokio::io::AsyncWriteExt;
    // Room for two bodies being uploaded at a time.
    let s = Server::start_with(&[("SLUICE_INGEST_MAX_BODY_BYTES", "60000"), ("SLUICE_INGEST_MAX_BUFFERED_BODY_BYTES", "120000")]).await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    // Two slow clients: each sends its headers and most of its body, then stalls.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 59000\r\n\r\n",
            s.key
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&vec![b' '; 55_000]).await.unwrap();
        c.flush().await.unwrap();
        slow.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let api = s.root();
    let body = json!([{"type": "t", "properties": {"pad": "z".repeat(40_000)}}]).to_string();
    let resp = api.req(Method::POST, "/v1/events").header("content-type", "application/json").body(body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    drop(slow);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Once the slow uploads are gone, the same request succeeds.
    assert_eq!(api.ingest(json!([{"type": "t", "properties": {"pad": "z".repeat(40_000)}}])).await, (1, 0));
}
