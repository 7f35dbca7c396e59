//! Segment-compatible endpoints: raw wire tests, and the official clients.

use std::path::PathBuf;
use std::process::Command;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{Api, Server};

async fn seg(api: &Api, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
    api.send(api.http.post(format!("{}{path}", api.base)).basic_auth(key, Some("")).json(&body)).await
}

#[tokio::test]
async fn every_call_maps_to_events_and_records() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("seg").await;
    let read = s.api(&k.read);
    let anon = s.anonymous();
    let ok = json!({"success": true});

    // Before any group call, a user's track has no customer.
    let (st, v) = seg(&anon, "/v1/track", &k.ingest, json!({"userId": "u1", "event": "Signed Up", "messageId": "t0"})).await;
    assert_eq!((st, v), (StatusCode::OK, ok.clone()));
    let (st, _) = seg(
        &anon,
        "/v1/identify",
        &k.ingest,
        json!({"userId": "u1", "traits": {"email": "u1@x.test", "name": "U1"}, "messageId": "i1", "timestamp": "2024-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) =
        seg(&anon, "/v1/group", &k.ingest, json!({"userId": "u1", "groupId": "acme", "traits": {"name": "Acme", "plan": "pro"}, "messageId": "g1"}))
            .await;
    assert_eq!(st, StatusCode::OK);
    // writeKey in the body instead of Basic auth.
    let (st, _) = anon
        .post("/v1/track", json!({"writeKey": k.ingest, "userId": "u1", "event": "Order Completed", "messageId": "t1", "properties": {"total": 5}}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = seg(&anon, "/v1/page", &k.ingest, json!({"userId": "u1", "name": "Home", "properties": {"path": "/"}, "messageId": "p1", "context": {"page": {"url": "https://app.test/?utm_source=x", "referrer": "https://www.google.com/"}, "userAgent": "Mozilla/5.0", "ip": "198.51.100.4"}})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = seg(&anon, "/v1/screen", &k.ingest, json!({"anonymousId": "a-9", "name": "Settings", "messageId": "s1"})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = seg(&anon, "/v1/alias", &k.ingest, json!({"userId": "u1", "previousId": "a-9", "messageId": "al1"})).await;
    assert_eq!(st, StatusCode::OK);

    let get = |id: &'static str| {
        let read = read.clone();
        async move {
            let (st, e) = read.get(&format!("/v1/events/{id}")).await;
            assert_eq!(st, StatusCode::OK, "{id}: {e}");
            e
        }
    };
    let t0 = get("t0").await;
    assert_eq!(t0["type"], "Signed Up");
    assert!(t0.get("customer_id").is_none(), "{t0}");
    assert_eq!(t0["user_id"], "u1");
    let t1 = get("t1").await;
    assert_eq!(t1["type"], "Order Completed");
    assert_eq!(t1["customer_id"], "acme", "track after group belongs to the user's customer");
    assert_eq!(t1["properties"], json!({"total": 5}));
    assert_eq!(get("i1").await["type"], "identify");
    assert_eq!(get("i1").await["timestamp"], "2024-01-01T00:00:00Z");
    assert_eq!(get("g1").await["customer_id"], "acme");
    let p1 = get("p1").await;
    assert_eq!(p1["type"], "page");
    assert_eq!(p1["properties"], json!({"path": "/", "name": "Home"}));
    assert_eq!(p1["context"]["page_url"], "https://app.test/?utm_source=x");
    assert_eq!(p1["context"]["referrer"], "https://www.google.com/");
    assert_eq!(p1["context"]["user_agent"], "Mozilla/5.0");
    assert_eq!(p1["context"]["ip"], "198.51.100.4");
    let s1 = get("s1").await;
    assert_eq!((s1["type"].as_str(), s1["user_id"].as_str()), (Some("screen"), Some("a-9")));
    assert_eq!(s1["context"]["anonymous_id"], "a-9");
    assert_eq!(get("al1").await["properties"], json!({"previous_id": "a-9"}));

    let (st, user) = read.get("/v1/users/u1").await;
    assert_eq!(st, StatusCode::OK, "{user}");
    assert_eq!(user["traits"], json!({"email": "u1@x.test", "name": "U1"}));
    assert_eq!(user["customer_id"], "acme");
    assert_eq!(user["aliases"], json!(["a-9"]));
    let (st, c) = read.get("/v1/customers/acme").await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(c["attributes"], json!({"name": "Acme", "plan": "pro"}));
    assert_eq!(c["users"], json!(["u1"]));
    let (_, list) = read.get("/v1/customers").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(read.get("/v1/users/nobody").await.0, StatusCode::NOT_FOUND);
    // Records are per workspace.
    assert_eq!(s.root().get("/v1/customers/acme").await.0, StatusCode::NOT_FOUND);

    // Later identify merges traits; an older one only fills missing traits.
    seg(&anon, "/v1/identify", &k.ingest, json!({"userId": "u1", "traits": {"name": "U-one"}, "timestamp": "2024-02-01T00:00:00Z"})).await;
    seg(&anon, "/v1/identify", &k.ingest, json!({"userId": "u1", "traits": {"name": "old", "city": "Tokyo"}, "timestamp": "2023-01-01T00:00:00Z"}))
        .await;
    let (_, user) = read.get("/v1/users/u1").await;
    assert_eq!(user["traits"], json!({"email": "u1@x.test", "name": "U-one", "city": "Tokyo"}));
}

#[tokio::test]
async fn batch_merges_context_corrects_skew_and_is_idempotent() {
    let s = Server::start().await;
    let api = s.root();
    let body = json!({
        "batch": [
            {"type": "group", "userId": "b1", "groupId": "bcorp", "messageId": "bm1"},
            {"type": "track", "userId": "b1", "event": "Clicked", "messageId": "bm2",
             "timestamp": "2000-01-01T00:00:00Z", "context": {"ip": "192.0.2.7"}},
            {"type": "identify", "anonymousId": "anon-b", "traits": {"x": 1}, "messageId": "bm3"},
        ],
        "sentAt": "2000-01-01T00:00:30Z",
        "context": {"library": {"name": "raw-test"}, "ip": "192.0.2.1"},
    });
    let (st, v) = seg(&api, "/v1/batch", &s.key, body.clone()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, e) = api.get("/v1/events/bm2").await;
    // Sent 30 s after it happened by the client's clock: stored 30 s before receipt.
    let ts: chrono::DateTime<chrono::Utc> = e["timestamp"].as_str().unwrap().parse().unwrap();
    let rx: chrono::DateTime<chrono::Utc> = e["received_at"].as_str().unwrap().parse().unwrap();
    assert_eq!((rx - ts).num_milliseconds(), 30_000);
    assert_eq!(e["customer_id"], "bcorp", "a group earlier in the same batch counts");
    assert_eq!(e["context"]["ip"], "192.0.2.7", "message context wins over batch context");
    assert_eq!(e["context"]["library"]["name"], "raw-test");
    // The client retries the whole batch: nothing is stored twice.
    let (st, _) = seg(&api, "/v1/batch", &s.key, body).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(api.all_events("").await.len(), 3);
}

#[tokio::test]
async fn limits_missing_identity_and_wrong_keys() {
    let s = Server::start().await;
    let api = s.root();
    let anon = s.anonymous();
    // A message over 32 KB.
    let big = json!({"userId": "u", "event": "Big", "properties": {"pad": "x".repeat(33 * 1024)}});
    let (st, v) = seg(&api, "/v1/track", &s.key, big).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large");
    // A batch over 500 KB (of messages under 32 KB each).
    let items: Vec<_> = (0..20)
        .map(|i| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("big-{i}"), "properties": {"pad": "y".repeat(30_000)}}))
        .collect();
    let (st, v) = seg(&api, "/v1/batch", &s.key, json!({"batch": items})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    // A batch with one message lacking userId and anonymousId: nothing is stored.
    let (st, v) = seg(
        &api,
        "/v1/batch",
        &s.key,
        json!({"batch": [
        {"type": "track", "userId": "u", "event": "Fine", "messageId": "fine-1"},
        {"type": "track", "event": "NoOne", "messageId": "no-one"}]}),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["details"][0]["index"], 1);
    assert_eq!(v["error"]["details"][0]["field"], "userId");
    // Malformed JSON.
    let (st, _) = api.send(api.http.post(format!("{}/v1/batch", api.base)).basic_auth(&s.key, Some("")).body("{nope")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Wrong, missing and read-only write keys.
    let (st, v) = seg(&anon, "/v1/track", "wrong-key", json!({"userId": "u", "event": "E"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let (st, _) = anon.post("/v1/track", json!({"writeKey": "wrong-key", "userId": "u", "event": "E"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = anon.post("/v1/track", json!({"userId": "u", "event": "E"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let k = s.workspace_with_keys("ro").await;
    let (st, _) = seg(&anon, "/v1/track", &k.read, json!({"userId": "u", "event": "E"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Nothing of any refused request was stored.
    assert!(api.all_events("").await.is_empty());
    assert!(s.api(&k.read).all_events("").await.is_empty());
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    let _ = Method::GET;
}

// ---- the official client libraries -------------------------------------------------

pub fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients")
}

/// A tool the test needs; outside CI a missing one skips the test with a
/// message, under CI=true it fails it.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if sluice_store::testing::in_ci() {
        panic!("CI=true but {what} is not installed (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {what} is not installed; run .ci/run once to install it");
    false
}

pub fn python() -> String {
    std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn python_has(module: &str) -> bool {
    Command::new(python()).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn check_client_events(s: &Server, read: &Api, user: &str, customer: &str, track: &str, track_id: &str, skew_minutes: i64) {
    let (st, e) = read.get(&format!("/v1/events/{track_id}")).await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!(e["type"], track);
    assert_eq!(e["user_id"], user);
    assert_eq!(e["customer_id"], customer);
    let ts: chrono::DateTime<chrono::Utc> = e["timestamp"].as_str().unwrap().parse().unwrap();
    let rx: chrono::DateTime<chrono::Utc> = e["received_at"].as_str().unwrap().parse().unwrap();
    let lag = (rx - ts).num_seconds();
    assert!((skew_minutes * 60 - 5..=skew_minutes * 60 + 5).contains(&lag), "timestamp {ts} vs received {rx}");
    let (_, u) = read.get(&format!("/v1/users/{user}")).await;
    assert_eq!(u["customer_id"], customer, "{u}");
    assert!(u["traits"]["email"].as_str().unwrap().contains('@'));
    let (st, c) = read.get(&format!("/v1/customers/{customer}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(c["users"], json!([user]));
    let pages = read.all_events("&type=page").await;
    assert_eq!(pages.len(), 1);
    let _ = s;
}

#[tokio::test]
async fn official_python_client() {
    if !require(python_has("segment.analytics"), "the Python package segment-analytics-python") {
        return;
    }
    let s = Server::start().await;
    let k = s.workspace_with_keys("py").await;
    let script = clients_dir().join("segment_python.py");
    run(Command::new(python()).arg(&script).arg(&s.url).arg(&k.ingest));
    let read = s.api(&k.read);
    check_client_events(&s, &read, "py-user", "py-acme", "Order Completed", "py-track-1", 10).await;
    let (_, e) = read.get("/v1/events/py-track-1").await;
    assert_eq!(e["properties"], json!({"total": 12.5, "currency": "EUR"}));
    assert_eq!(e["context"]["library"]["name"], "analytics-python");
    // The retried batch is stored once.
    assert_eq!(read.all_events("&type=Retried%20Event").await.len(), 1);
    assert_eq!(read.all_events("").await.len(), 5);
}

#[tokio::test]
async fn official_node_client() {
    let modules = clients_dir().join("node_modules/@segment/analytics-node");
    let node_ok = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    if !require(node_ok && modules.exists(), "node with the npm package @segment/analytics-node") {
        return;
    }
    let s = Server::start().await;
    let k = s.workspace_with_keys("node").await;
    run(Command::new("node").arg(clients_dir().join("segment_node.mjs")).arg(&s.url).arg(&k.ingest));
    let read = s.api(&k.read);
    check_client_events(&s, &read, "node-user", "node-acme", "Item Purchased", "node-track-1", 5).await;
    // Running the client again (same messageIds, as a retry would) stores nothing new.
    run(Command::new("node").arg(clients_dir().join("segment_node.mjs")).arg(&s.url).arg(&k.ingest));
    assert_eq!(read.all_events("").await.len(), 4);
}

#[tokio::test]
async fn cloudevents_python_sdk() {
    if !require(python_has("cloudevents") && python_has("requests"), "the Python packages cloudevents and requests") {
        return;
    }
    let s = Server::start().await;
    run(Command::new(python()).arg(clients_dir().join("cloudevents_python.py")).arg(&s.url).arg(&s.key));
    let api = s.root();
    let (_, e) = api.get("/v1/events/ce-sdk-1").await;
    assert_eq!(e["type"], "com.example.sdk.created");
    assert_eq!(e["customer_id"], "ce-customer");
    assert_eq!(e["timestamp"], "2024-03-04T05:06:07Z");
    assert_eq!(e["properties"], json!({"n": 1}));
    assert_eq!(e["context"]["source"], "/sdk/test");
    assert_eq!(api.all_events("&type=com.example.sdk.batched").await.len(), 3);
}
