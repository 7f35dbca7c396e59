//! Ingest formats, validation, dedup and read back.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::Server;

#[tokio::test]
async fn json_array_ndjson_and_single_event_round_trip() {
    let s = Server::start().await;
    let api = s.root();
    let (a, d) = api
        .ingest(json!({"id": "one", "type": "signup", "timestamp": "2024-05-01T21:00:00+09:00",
            "customer_id": "acme", "subscription_id": "sub-1", "user_id": "u-1",
            "properties": {"plan": "pro", "seats": 3}, "context": {"ip": "203.0.113.9", "user_agent": "UA/1.0"}}))
        .await;
    assert_eq!((a, d), (1, 0));
    let (a, d) = api.ingest(json!([{"id": "two", "type": "login"}, {"type": "login", "customer_id": "acme"}])).await;
    assert_eq!((a, d), (2, 0));
    let nd = "{\"id\":\"three\",\"type\":\"page\"}\r\n\n{\"id\":\"four\",\"type\":\"page\"}\n";
    let (st, v) = api.post_raw("/v1/events", "application/x-ndjson", nd).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"accepted": 2, "duplicates": 0}));

    let (st, e) = api.get("/v1/events/one").await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!(e["type"], "signup");
    assert_eq!(e["timestamp"], "2024-05-01T12:00:00Z");
    assert_eq!(e["customer_id"], "acme");
    assert_eq!(e["subscription_id"], "sub-1");
    assert_eq!(e["user_id"], "u-1");
    assert_eq!(e["properties"], json!({"plan": "pro", "seats": 3}));
    assert_eq!(e["context"]["user_agent"], "UA/1.0");
    assert!(e["received_at"].as_str().unwrap().ends_with('Z'));

    let all = api.all_events("").await;
    assert_eq!(all.len(), 5);
    // Generated ids are UUIDv7 strings; the default timestamp is the receive time.
    let generated = all.iter().find(|e| e["type"] == "login" && e["id"] != "two").unwrap();
    assert_eq!(generated["id"].as_str().unwrap().len(), 36);
    assert_eq!(generated["timestamp"], generated["received_at"]);

    // Filters.
    assert_eq!(api.all_events("&type=page").await.len(), 2);
    assert_eq!(api.all_events("&customer_id=acme").await.len(), 2);
    let from = api.all_events("&from=2024-05-01T12:00:00Z&to=2024-05-01T12:00:01Z").await;
    assert_eq!(from.len(), 1);
    assert_eq!(from[0]["id"], "one");
    let (st, v) = api.get("/v1/events?from=yesterday").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("from"), "{v}");
    let (st, _) = api.get("/v1/events/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pagination_follows_cursors_without_gaps_or_repeats() {
    let s = Server::start().await;
    let api = s.root();
    let events: Vec<_> = (0..250).map(|i| json!({"id": format!("p{i}"), "type": "t", "customer_id": format!("c{}", i % 7)})).collect();
    api.ingest(json!(events)).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=40&cursor={c}"),
            None => "/v1/events?limit=40".into(),
        };
        let (st, v) = api.get(&path).await;
        assert_eq!(st, StatusCode::OK);
        let page = v["data"].as_array().unwrap();
        assert!(page.len() <= 40);
        seen.extend(page.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 250);
    assert_eq!(seen.len(), 250);
    let (st, _) = api.get("/v1/events?cursor=garbage").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // Tailing: from `latest`, a new event shows up at the tail cursor.
    let (_, v) = api.get("/v1/events?cursor=latest").await;
    let tail = v["tail_cursor"].as_str().unwrap().to_owned();
    api.ingest(json!({"id": "new", "type": "t"})).await;
    let (_, v) = api.get(&format!("/v1/events?cursor={tail}")).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "new");
}

#[tokio::test]
async fn one_invalid_event_refuses_the_batch_and_names_it() {
    let s = Server::start().await;
    let api = s.root();
    let body = json!([
        {"id": "good-1", "type": "ok"},
        {"id": "bad-1", "type": "has space"},
        {"id": "good-2", "type": "ok", "properties": {"a": 1}},
        {"id": "bad-2", "type": "ok", "timestamp": "last tuesday", "properties": "nope"},
    ]);
    let (st, v) = api.post("/v1/events", body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_events");
    let details = v["error"]["details"].as_array().unwrap();
    let got: Vec<(u64, &str)> = details.iter().map(|d| (d["index"].as_u64().unwrap(), d["field"].as_str().unwrap())).collect();
    assert_eq!(got, [(1, "type"), (3, "timestamp"), (3, "properties")]);
    assert!(details.iter().all(|d| !d["reason"].as_str().unwrap().is_empty()));
    // Nothing was written, not even the valid events.
    assert!(api.all_events("").await.is_empty());
    assert_eq!(api.get("/v1/events/good-1").await.0, StatusCode::NOT_FOUND);
    // The good events are new when sent again on their own.
    assert_eq!(api.ingest(json!([{"id": "good-1", "type": "ok"}, {"id": "good-2", "type": "ok"}])).await, (2, 0));
    // Missing type and unknown fields are named too.
    let (st, v) = api.post("/v1/events", json!([{"id": "x"}, {"type": "a", "customerId": "c"}])).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = v["error"]["details"].as_array().unwrap().iter().map(|d| d["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["type", "customerId"]);
}

#[tokio::test]
async fn duplicates_are_acknowledged_not_stored_twice_even_after_restart() {
    let mut s = Server::start().await;
    let api = s.root();
    assert_eq!(api.ingest(json!([{"id": "a", "type": "t"}, {"id": "a", "type": "t"}, {"id": "b", "type": "t"}])).await, (2, 1));
    assert_eq!(api.ingest(json!([{"id": "a", "type": "t"}, {"id": "c", "type": "t"}])).await, (1, 1));
    s.restart();
    let api = s.root();
    assert_eq!(api.ingest(json!([{"id": "a", "type": "t"}, {"id": "b", "type": "t"}, {"id": "c", "type": "t"}])).await, (0, 3));
    let ids: Vec<String> = api.all_events("").await.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    // The same id in another workspace is a different event.
    let other = s.workspace_with_keys("other").await;
    assert_eq!(s.api(&other.ingest).ingest(json!({"id": "a", "type": "t"})).await, (1, 0));
}

#[tokio::test]
async fn cloudevents_structured_and_batch() {
    let s = Server::start().await;
    let api = s.root();
    let ce = json!({"specversion": "1.0", "id": "ce-1", "source": "/billing", "type": "com.example.invoice.paid",
        "time": "2024-02-03T04:05:06Z", "subject": "cust-9", "datacontenttype": "application/json",
        "data": {"amount": "12.50"}, "tenantid": "t-1"});
    let (st, v) = api.post_raw("/v1/events", "application/cloudevents+json", ce.to_string()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let batch = json!([
        {"specversion": "1.0", "id": "ce-2", "source": "/b", "type": "com.example.x", "data": [1, 2]},
        {"specversion": "1.0", "id": "ce-3", "source": "/b", "type": "com.example.x"}
    ]);
    let (st, v) = api.post_raw("/v1/events", "application/cloudevents-batch+json", batch.to_string()).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], 2);
    let (_, e) = api.get("/v1/events/ce-1").await;
    assert_eq!(e["type"], "com.example.invoice.paid");
    assert_eq!(e["timestamp"], "2024-02-03T04:05:06Z");
    assert_eq!(e["customer_id"], "cust-9");
    assert_eq!(e["properties"], json!({"amount": "12.50"}));
    assert_eq!(e["context"]["source"], "/billing");
    assert_eq!(e["context"]["tenantid"], "t-1");
    let (_, e) = api.get("/v1/events/ce-2").await;
    assert_eq!(e["properties"], json!({"data": [1, 2]}));
    // A CloudEvent without the required attributes is refused, naming them.
    let (st, v) = api.post_raw("/v1/events", "application/cloudevents+json", json!({"specversion": "1.0", "type": "x"}).to_string()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = v["error"]["details"].as_array().unwrap().iter().map(|d| d["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["id", "source"]);
}

#[tokio::test]
async fn gzip_bodies_are_accepted() {
    use std::io::Write;
    let s = Server::start().await;
    let api = s.root();
    let body = json!([{"id": "g1", "type": "t"}, {"id": "g2", "type": "t"}]).to_string();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(body.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let (st, v) = api
        .send(api.req(reqwest::Method::POST, "/v1/events").header("content-type", "application/json").header("content-encoding", "gzip").body(gz))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], 2);
}
