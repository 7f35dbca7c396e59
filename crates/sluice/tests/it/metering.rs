//! Meters and usage in a non-UTC workspace, with backfill and live events.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{Api, Server};

async fn wait_job(api: &Api, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, j) = api.get(&format!("/v1/jobs/{id}")).await;
        if j["status"] == "succeeded" {
            return j;
        }
        assert!(Instant::now() < deadline, "job did not succeed: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn usage(api: &Api, q: &str) -> Vec<Value> {
    let (st, v) = api.get(q).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

async fn wait_usage(api: &Api, q: &str, want: &[(&str, &str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = usage(api, q).await;
        let got: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r["customer_id"].as_str().unwrap_or("").to_owned(),
                    r["period_start"].as_str().unwrap_or("").to_owned(),
                    r["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = want.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "usage {q}: got {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_usage_in_tokyo_with_backfill_live_events_and_no_double_counting() {
    let s = Server::start().await;
    let root = s.root();
    let (st, _) = root.post("/v1/workspaces", json!({"name": "jst", "time_zone": "Asia/Tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, key) = root.post("/v1/keys", json!({"name": "a", "scope": "admin", "workspace": "jst"})).await;
    let api = s.api(key["secret"].as_str().unwrap());

    // Before the meter exists: c1 uses 0.1 just before and 0.1 just after midnight of Feb 1 JST.
    api.ingest(json!([
        {"id": "b1", "type": "storage.used", "customer_id": "c1", "subscription_id": "s1", "timestamp": "2024-01-31T14:59:59Z", "properties": {"gb": "0.1", "region": "eu", "user": "u1"}},
        {"id": "b2", "type": "storage.used", "customer_id": "c1", "subscription_id": "s1", "timestamp": "2024-01-31T15:00:00Z", "properties": {"gb": 0.1, "region": "us", "user": "u2"}},
        {"id": "other", "type": "api.call", "customer_id": "c1"},
    ]))
    .await;
    // Validation names the field.
    let (st, v) = api.post("/v1/meters", json!({"key": "bad", "event_type": "storage.used", "aggregation": "sum"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["details"][0]["field"], "value_property");
    let (st, v) = api.post("/v1/meters", json!({"key": "bad", "event_type": "storage.used", "aggregation": "median", "value_property": "gb"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // Let the meters consumer pass these events first, so the backfill (not
    // the live consumer) must meter them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, c) = root.get("/v1/consumers").await;
        let lag = c["data"].as_array().unwrap().iter().find(|c| c["name"] == "meters").map(|c| c["lag"].clone());
        if lag == Some(json!(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "meters consumer lags: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, m) = api
        .post("/v1/meters", json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "gb", "group_by": ["region"]}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{m}");
    assert_eq!(api.post("/v1/meters", json!({"key": "gb", "event_type": "t", "aggregation": "count"})).await.0, StatusCode::CONFLICT);
    let (_, users) =
        api.post("/v1/meters", json!({"key": "users", "event_type": "storage.used", "aggregation": "unique_count", "value_property": "user"})).await;
    let (_, count) = api.post("/v1/meters", json!({"key": "n", "event_type": "storage.used", "aggregation": "count"})).await;
    let (_, peak) = api
        .post(
            "/v1/meters",
            json!({"key": "peak", "event_type": "storage.used", "aggregation": "max", "value_property": "gb", "filter": {"region": "us"}}),
        )
        .await;
    let backfill = wait_job(&api, m["backfill_job"].as_str().unwrap()).await;
    assert_eq!(backfill["result"]["events_metered"], 2, "{backfill}");
    for job in [&m, &users, &count, &peak] {
        // Whether the events before creation are metered by the backfill or
        // by the live consumer depends on how far it had got; either way the
        // backfill ends complete.
        let j = wait_job(&api, job["backfill_job"].as_str().unwrap()).await;
        assert_eq!(j["progress"]["done"], j["progress"]["total"], "{j}");
    }

    // After creation: c2 uses ten times 0.1 in February (JST), live.
    let live: Vec<_> = (0..10)
        .map(|i| json!({"id": format!("l{i}"), "type": "storage.used", "customer_id": "c2", "subscription_id": "s2", "timestamp": format!("2024-02-{:02}T03:00:00+09:00", i + 1), "properties": {"gb": "0.1", "region": "us", "user": "u9"}}))
        .collect();
    api.ingest(json!(live.clone())).await;
    // Sent again: duplicates, nothing counts twice.
    assert_eq!(api.ingest(json!(live)).await, (0, 10));

    wait_usage(
        &api,
        "/v1/meters/gb/usage?granularity=month",
        &[("c1", "2023-12-31T15:00:00Z", "0.1"), ("c1", "2024-01-31T15:00:00Z", "0.1"), ("c2", "2024-01-31T15:00:00Z", "1")],
    )
    .await;
    let rows = usage(&api, "/v1/meters/gb/usage?granularity=month&customer_id=c2").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["subscription_id"], "s2");
    assert_eq!(rows[0]["period_end"], "2024-02-29T15:00:00Z");
    assert_eq!(rows[0]["value"], "1", "ten times 0.1 is exactly 1");
    let by_region = usage(&api, "/v1/meters/gb/usage?granularity=month&customer_id=c1&group_by=region").await;
    let got: Vec<(Value, Value)> = by_region.iter().map(|r| (r["group"].clone(), r["value"].clone())).collect();
    assert_eq!(got, vec![(json!({"region": "eu"}), json!("0.1")), (json!({"region": "us"}), json!("0.1"))]);
    let day = usage(&api, "/v1/meters/gb/usage?granularity=day&customer_id=c1").await;
    assert_eq!(day[0]["period_start"], "2024-01-30T15:00:00Z");
    assert_eq!(day[1]["period_start"], "2024-01-31T15:00:00Z");
    let total = usage(&api, "/v1/meters/gb/usage?from=2024-01-31T15:00:00Z&to=2024-02-29T15:00:00Z").await;
    let sum: Vec<(&str, &str)> = total.iter().map(|r| (r["customer_id"].as_str().unwrap(), r["value"].as_str().unwrap())).collect();
    assert_eq!(sum, [("c1", "0.1"), ("c2", "1")]);
    wait_usage(&api, "/v1/meters/users/usage", &[("c1", "", "2"), ("c2", "", "1")]).await;
    wait_usage(&api, "/v1/meters/n/usage", &[("c1", "", "2"), ("c2", "", "10")]).await;
    wait_usage(&api, "/v1/meters/peak/usage", &[("c1", "", "0.1"), ("c2", "", "0.1")]).await;
    // Errors and listing.
    assert_eq!(api.get("/v1/meters/gb/usage?granularity=week").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.get("/v1/meters/gb/usage?group_by=planet").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api.get("/v1/meters/nope/usage").await.0, StatusCode::NOT_FOUND);
    let (_, list) = api.get("/v1/meters").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 4);
    // Other workspaces see nothing of it.
    assert_eq!(s.root().get("/v1/meters/gb").await.0, StatusCode::NOT_FOUND);
}
