//! Consumers, dead letters, replay, reset and webhooks, end to end.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, Api, Server};

/// A webhook receiver running in the test process.
#[derive(Clone, Default)]
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Received>>>,
    /// Event ids answered with 500 while present.
    fail_events: Arc<Mutex<HashSet<String>>>,
    /// Per webhook-id: how many more attempts to answer with 500.
    fail_first: Arc<Mutex<Option<u32>>>,
    failures_left: Arc<Mutex<HashMap<String, u32>>>,
    delay: Arc<Mutex<Duration>>,
}

#[derive(Clone, Debug)]
struct Received {
    webhook_id: String,
    timestamp: String,
    signature: String,
    body: String,
    event_id: String,
    status: u16,
}

impl Receiver {
    async fn start() -> Receiver {
        let mut r = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        r.url = format!("http://{}/hook", listener.local_addr().unwrap());
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let delay = *state.delay.lock().unwrap();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    let webhook_id = h("webhook-id");
                    let event_id =
                        serde_json::from_str::<Value>(&body).ok().and_then(|v| v["data"]["id"].as_str().map(str::to_owned)).unwrap_or_default();
                    let mut status = 200u16;
                    if state.fail_events.lock().unwrap().contains(&event_id) {
                        status = 500;
                    }
                    if let Some(n) = *state.fail_first.lock().unwrap() {
                        let mut left = state.failures_left.lock().unwrap();
                        let l = left.entry(webhook_id.clone()).or_insert(n);
                        if *l > 0 {
                            *l -= 1;
                            status = 500;
                        }
                    }
                    state.requests.lock().unwrap().push(Received {
                        webhook_id,
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        body,
                        event_id,
                        status,
                    });
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        r
    }

    fn got(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Successful deliveries per event id.
    fn successes(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.got().into_iter().filter(|r| r.status == 200) {
            *m.entry(r.event_id).or_default() += 1;
        }
        m
    }
}

const FAST_RETRIES: [(&str, &str); 3] = [("SLUICE_RETRY_ATTEMPTS", "3"), ("SLUICE_RETRY_BASE_MS", "20"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")];

async fn webhook(api: &Api, url: &str, types: Value) -> Value {
    let (st, v) = api.post("/v1/webhooks", json!({"url": url, "event_types": types})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    v
}

async fn consumer(api: &Api, name: &str) -> Value {
    let (_, v) = api.get("/v1/consumers").await;
    v["data"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retried_twice_then_delivered_with_one_id_and_a_valid_signature() {
    let s = Server::start_with(&[("SLUICE_RETRY_ATTEMPTS", "5"), ("SLUICE_RETRY_BASE_MS", "20"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let api = s.root();
    let rx = Receiver::start().await;
    *rx.fail_first.lock().unwrap() = Some(2);
    let hook = webhook(&api, &rx.url, json!(["order.paid"])).await;
    let secret = hook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    api.ingest(json!([{"id": "o1", "type": "order.paid", "customer_id": "c1", "properties": {"amount": "9.99"}},
                      {"id": "x1", "type": "other.type"}]))
        .await;
    eventually("a successful delivery", 20, || async { rx.successes().get("o1") == Some(&1) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = rx.got();
    assert_eq!(got.len(), 3, "two failures, then one success: {got:?}");
    assert!(got.iter().all(|r| r.webhook_id == got[0].webhook_id && r.webhook_id.starts_with("msg_")));
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 200]);
    assert!(got.iter().all(|r| r.event_id == "o1"), "only subscribed types are delivered");
    let body: Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(body["type"], "order.paid");
    assert_eq!(body["data"]["properties"]["amount"], "9.99");
    // The delivery record.
    let (_, d) = api.get(&format!("/v1/webhooks/{}/deliveries", hook["id"].as_str().unwrap())).await;
    let d = &d["data"][0];
    assert_eq!((d["status"].as_str(), d["attempts"].as_u64(), d["status_code"].as_i64()), (Some("succeeded"), Some(3), Some(200)));
    assert_eq!(d["id"], got[0].webhook_id.as_str());
    // The signature verifies with an independent implementation.
    let last = &got[2];
    let file = s.data_dir().join("delivery.json");
    std::fs::write(&file, json!({"headers": {"webhook-id": last.webhook_id, "webhook-timestamp": last.timestamp, "webhook-signature": last.signature}, "body": last.body}).to_string()).unwrap();
    if crate::segment::require(crate::segment::python_has("standardwebhooks"), "the Python package standardwebhooks") {
        let out = std::process::Command::new(crate::segment::python())
            .arg(crate::segment::clients_dir().join("verify_webhook.py"))
            .arg(&secret)
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "standardwebhooks rejected the signature: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_events_go_to_the_dlq_others_are_delivered_once_and_replay_delivers_once() {
    let s = Server::start_with(&FAST_RETRIES).await;
    let api = s.root();
    let rx = Receiver::start().await;
    let bad: HashSet<String> = ["e3", "e7", "e12"].iter().map(|s| s.to_string()).collect();
    *rx.fail_events.lock().unwrap() = bad.clone();
    let hook = webhook(&api, &rx.url, json!(["*"])).await;
    let name = format!("webhook:{}", hook["id"].as_str().unwrap());
    let events: Vec<_> = (0..20).map(|i| json!({"id": format!("e{i}"), "type": "t", "customer_id": format!("c{}", i % 3)})).collect();
    api.ingest(json!(events)).await;
    eventually("3 dead letters", 30, || async {
        let (_, v) = api.get("/v1/dlq?status=dead").await;
        v["data"].as_array().is_some_and(|d| d.len() == 3)
    })
    .await;
    eventually("17 deliveries", 10, || async { rx.successes().len() == 17 }).await;
    let (_, dlq) = api.get(&format!("/v1/dlq?consumer={name}")).await;
    let dead: HashSet<String> = dlq["data"].as_array().unwrap().iter().map(|d| d["event_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(dead, bad);
    for d in dlq["data"].as_array().unwrap() {
        assert_eq!(d["attempts"], 3);
        assert!(d["error"].as_str().unwrap().contains("500"), "{d}");
        assert!(d["first_failed_at"].as_str().unwrap() <= d["last_failed_at"].as_str().unwrap());
    }
    // Every other event exactly once; the failing ones exactly 3 attempts.
    let succ = rx.successes();
    assert!(succ.values().all(|&n| n == 1), "{succ:?}");
    assert!(bad.iter().all(|b| !succ.contains_key(b)));
    assert!(bad.iter().all(|b| rx.got().iter().filter(|r| &r.event_id == b).count() == 3));
    // The receiver sees a delivery a moment before the worker commits the
    // checkpoint past it (effect first, then checkpoint: at least once), so
    // under load the last deliveries may still be uncommitted here.
    eventually("the consumer moved on (lag 0)", 10, || async { consumer(&api, &name).await["lag"] == 0 }).await;
    let c = consumer(&api, &name).await;
    assert_eq!(c["dlq_size"], 3, "{c}");
    assert_eq!(c["lag"], 0, "the consumer moved on: {c}");
    // One dead letter in detail, with its event.
    let first_id = dlq["data"][0]["id"].as_str().unwrap().to_owned();
    let (_, one) = api.get(&format!("/v1/dlq/{first_id}")).await;
    assert_eq!(one["event"]["type"], "t");

    // Fix the cause, replay in bulk: each failing event is delivered once.
    rx.fail_events.lock().unwrap().clear();
    let (st, v) = api.post("/v1/dlq/replay", json!({"consumer": name})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["replaying"], 3);
    eventually("replays delivered", 20, || async { bad.iter().all(|b| rx.successes().get(b) == Some(&1)) }).await;
    eventually("replayed status", 10, || async {
        let (_, v) = api.get("/v1/dlq?status=replayed").await;
        v["data"].as_array().is_some_and(|d| d.len() == 3)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.successes().values().all(|&n| n == 1), "nothing delivered twice");
    assert_eq!(rx.successes().len(), 20);
    // A replayed entry cannot be replayed again.
    assert_eq!(api.post(&format!("/v1/dlq/{first_id}/replay"), json!({})).await.0, StatusCode::CONFLICT);
    // A status the list does not know is named, not an empty page.
    let (st, v) = api.get("/v1/dlq?status=gone").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("status") && v.to_string().contains("replaying"), "{v}");

    // Discard: another failing event, discarded by an admin key.
    rx.fail_events.lock().unwrap().insert("late".into());
    api.ingest(json!({"id": "late", "type": "t"})).await;
    eventually("a new dead letter", 20, || async {
        let (_, v) = api.get("/v1/dlq?status=dead").await;
        v["data"].as_array().is_some_and(|d| d.len() == 1)
    })
    .await;
    let (_, v) = api.get("/v1/dlq?status=dead").await;
    let late_id = v["data"][0]["id"].as_str().unwrap().to_owned();
    let (st, d) = api.post(&format!("/v1/dlq/{late_id}/discard"), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(d["status"], "discarded");
    // Both operations are in the audit log with the acting key.
    let (_, audit) = api.get("/v1/audit").await;
    let acts: Vec<(String, String)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["actor_key_id"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert!(acts.iter().any(|(a, k)| a == "dlq.replay_bulk" && k.starts_with("key_")), "{acts:?}");
    assert!(acts.iter().any(|(a, _)| a == "dlq.discard"), "{acts:?}");
    assert!(acts.iter().any(|(a, _)| a == "webhook.create"), "{acts:?}");
}

#[tokio::test]
async fn private_webhook_targets_are_refused_unless_allowed() {
    let s = Server::start().await;
    let api = s.root();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://10.1.2.3/x",
        "ftp://example.com/x",
    ] {
        let (st, v) = api.post("/v1/webhooks", json!({"url": url, "event_types": ["*"]})).await;
        assert!(st == StatusCode::UNPROCESSABLE_ENTITY || st == StatusCode::BAD_REQUEST, "{url}: {st} {v}");
    }
    let (_, list) = api.get("/v1/webhooks").await;
    assert!(list["data"].as_array().unwrap().is_empty());
    let allowed = Server::start_with(&[("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let (st, _) = allowed.root().post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/hook", "event_types": ["*"]})).await;
    assert_eq!(st, StatusCode::CREATED);
    // Scopes: a read key cannot create webhooks.
    let k = s.workspace_with_keys("hooks").await;
    assert_eq!(s.api(&k.read).post("/v1/webhooks", json!({"url": "https://example.com/x", "event_types": ["*"]})).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_block_other_webhooks() {
    let s = Server::start_with(&FAST_RETRIES).await;
    let api = s.root();
    let slow = Receiver::start().await;
    *slow.delay.lock().unwrap() = Duration::from_secs(3);
    let fast = Receiver::start().await;
    webhook(&api, &slow.url, json!(["*"])).await;
    webhook(&api, &fast.url, json!(["*"])).await;
    let started = Instant::now();
    let events: Vec<_> = (0..5).map(|i| json!({"id": format!("s{i}"), "type": "t", "customer_id": "one"})).collect();
    api.ingest(json!(events)).await;
    eventually("the fast receiver got everything", 10, || async { fast.successes().len() == 5 }).await;
    assert!(started.elapsed() < Duration::from_secs(3), "fast receiver waited for the slow one: {:?}", started.elapsed());
    assert!(slow.successes().len() < 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_counts_are_exact_after_kill9_and_after_a_reset() {
    let mut s = Server::start().await;
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let api = s.root();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0.. {
                let ids: Vec<String> = (0..100).map(|i| format!("k{w}-{seq}-{i}")).collect();
                let body: Vec<_> =
                    ids.iter().map(|id| json!({"id": id, "type": if id.ends_with('0') { "a" } else { "b" }, "customer_id": "c"})).collect();
                match api.req(reqwest::Method::POST, "/v1/events").json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::OK => acked.lock().unwrap().extend(ids),
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    for t in tasks {
        t.await.unwrap();
    }
    s.restart();
    let api = s.root();
    let stored = api.all_events("").await;
    assert!(stored.len() >= acked.lock().unwrap().len());
    let expected = stored.len() as i64;
    let expected_a = stored.iter().filter(|e| e["type"] == "a").count() as i64;
    eventually("event_counts caught up", 60, || async { consumer(&api, "event_counts").await["lag"] == 0 }).await;
    let (_, counts) = api.get("/v1/event-counts").await;
    assert_eq!(counts["total"], expected, "every stored event counted exactly once");
    let (_, a) = api.get("/v1/event-counts?type=a").await;
    assert_eq!(a["total"], expected_a);

    // A reset to earliest clears and rebuilds the read model: same totals.
    let k = s.workspace_with_keys("other").await;
    assert_eq!(s.api(&k.admin).post("/v1/consumers/event_counts/reset", json!({"to": "earliest"})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.post("/v1/consumers/event_counts/reset", json!({"to": "yesterday"})).await.0, StatusCode::BAD_REQUEST);
    let (st, v) = api.post("/v1/consumers/event_counts/reset", json!({"to": "earliest"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["cleared_read_model"], true);
    eventually("rebuilt", 60, || async { consumer(&api, "event_counts").await["lag"] == 0 }).await;
    let (_, counts) = api.get("/v1/event-counts").await;
    assert_eq!(counts["total"], expected);
    let (_, audit) = api.get("/v1/audit").await;
    assert!(audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "consumer.reset" && e["target_id"] == "event_counts" && e["actor_key_id"].is_string()));
    // Reset to latest: nothing is counted from before.
    api.post("/v1/consumers/event_counts/reset", json!({"to": "latest"})).await;
    api.ingest(json!([{"id": "after-reset", "type": "z"}])).await;
    eventually("counted after reset", 20, || async {
        let (_, c) = api.get("/v1/event-counts").await;
        c["total"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_followed_by_a_job_with_progress_events_and_the_cli() {
    let s = Server::start().await;
    let api = s.root();
    let events: Vec<_> = (0..3000).map(|i| json!({"id": format!("r{i}"), "type": "t", "customer_id": format!("c{}", i % 5)})).collect();
    api.ingest(json!(events)).await;
    eventually("counted", 30, || async { api.get("/v1/event-counts").await.1["total"] == 3000 }).await;
    let (st, v) = api.post("/v1/consumers/event_counts/reset", json!({"to": "earliest"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let job = v["job"].as_str().unwrap().to_owned();
    // Server-Sent Events until the job ends.
    let resp = api.req(reqwest::Method::GET, &format!("/v1/jobs/{job}/events")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = tokio::time::timeout(Duration::from_secs(30), resp.text()).await.expect("stream ends with the job").unwrap();
    assert!(text.contains("event: end"), "{text}");
    let last: Value = serde_json::from_str(text.lines().filter_map(|l| l.strip_prefix("data: ")).next_back().unwrap()).unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    assert_eq!(last["progress"]["done"], 3000);
    assert_eq!(last["progress"]["total"], 3000);
    assert_eq!(last["progress"]["percent"], 100.0);
    assert_eq!(api.get("/v1/event-counts").await.1["total"], 3000);
    let (_, list) = api.get("/v1/jobs?kind=consumer.reset&status=succeeded").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(api.post(&format!("/v1/jobs/{job}/cancel"), json!({})).await.0, StatusCode::CONFLICT);
    assert_eq!(api.post(&format!("/v1/jobs/{job}/retry"), json!({})).await.0, StatusCode::CONFLICT);
    assert_eq!(api.get("/v1/jobs/job_nope").await.0, StatusCode::NOT_FOUND);
    let k = s.workspace_with_keys("jobless").await;
    assert_eq!(s.api(&k.read).get(&format!("/v1/jobs/{job}")).await.0, StatusCode::NOT_FOUND);
    // The CLI shows and watches it.
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", s.key.as_str())];
    let (ok, out, err) = crate::helpers::cli(&["jobs", "watch", &job], &env, None);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "succeeded");
    let (ok, out, _) = crate::helpers::cli(&["jobs", "list"], &env, None);
    assert!(ok);
    assert!(out.contains(&job) && out.contains("consumer.reset"), "{out}");
}

/// Dead letters of the key's workspace in `status`, with a query, following cursors.
async fn dead_letters(api: &Api, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (st, v) = api.get(&format!("/v1/dlq?limit=1000{query}{cursor}")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        out.extend(v["data"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// Waits for a job to end and returns it.
async fn job_end(api: &Api, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, j) = api.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{j}");
        if matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return j;
        }
        assert!(Instant::now() < deadline, "job did not end: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_dlq_counts_what_the_list_shows_and_its_job_replays_and_discards_only_the_workspaces_entries() {
    let s = Server::start_with(&FAST_RETRIES).await;
    let a_keys = s.workspace_with_keys("dlq-a").await;
    let b_keys = s.workspace_with_keys("dlq-b").await;
    let (a, b) = (s.api(&a_keys.admin), s.api(&b_keys.admin));
    let rx = Receiver::start().await;
    let a_events: Vec<String> = (0..12).map(|i| format!("a{i}")).collect();
    let b_events: Vec<String> = (0..3).map(|i| format!("b{i}")).collect();
    *rx.fail_events.lock().unwrap() = a_events.iter().chain(&b_events).cloned().collect();
    let a_name = format!("webhook:{}", webhook(&a, &rx.url, json!(["*"])).await["id"].as_str().unwrap());
    webhook(&b, &rx.url, json!(["*"])).await;
    a.ingest(json!(a_events.iter().enumerate().map(|(i, id)| json!({"id": id, "type": if i < 8 { "t.a" } else { "t.b" }})).collect::<Vec<_>>()))
        .await;
    b.ingest(json!(b_events.iter().map(|id| json!({"id": id, "type": "t.a"})).collect::<Vec<_>>())).await;
    eventually("15 dead letters", 60, || async {
        dead_letters(&a, "&status=dead").await.len() == 12 && dead_letters(&b, "&status=dead").await.len() == 3
    })
    .await;

    // A dry run counts what the list shows for the same filter.
    let dry = |body: Value| {
        let a = a.clone();
        async move {
            let (st, v) = a.post("/v1/dlq/bulk", body.clone()).await;
            assert_eq!(st, StatusCode::OK, "{body}: {v}");
            v["matching"].as_u64().unwrap() as usize
        }
    };
    for (filter, query) in [
        (json!({}), String::new()),
        (json!({"consumer": a_name}), format!("&consumer={a_name}")),
        (json!({"consumer": a_name, "event_type": "t.a"}), format!("&consumer={a_name}&event_type=t.a")),
        (json!({"type": "t.b"}), "&type=t.b".to_owned()),
        (json!({"error_contains": "http 5"}), "&error_contains=http%205".to_owned()),
        (json!({"error": "500", "type": "t.a"}), "&error=500&type=t.a".to_owned()),
        (json!({"error": "no such error"}), "&error=no%20such%20error".to_owned()),
    ] {
        let listed = dead_letters(&a, &format!("&status=dead{query}")).await.len();
        let mut body = filter.clone();
        body["action"] = json!("replay");
        body["dry_run"] = json!(true);
        assert_eq!(dry(body.clone()).await, listed, "{filter} vs ?{query}");
        body["action"] = json!("discard");
        assert_eq!(dry(body).await, listed, "{filter} vs ?{query}");
    }
    assert_eq!(dry(json!({"action": "replay", "type": "t.a", "dry_run": true})).await, 8);
    assert_eq!(dry(json!({"action": "replay", "error": "no such error", "dry_run": true})).await, 0);
    // Newest first on request; oldest first stays the default.
    let asc: Vec<String> = dead_letters(&a, "").await.iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    let desc: Vec<String> = dead_letters(&a, "&order=desc").await.iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    assert!(asc.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(desc, asc.iter().rev().cloned().collect::<Vec<_>>());
    assert_eq!(a.get("/v1/dlq?order=sideways").await.0, StatusCode::BAD_REQUEST);

    // Bad requests name the field and change nothing; read keys are refused.
    for (body, field) in [
        (json!({"action": "burn"}), "action"),
        (json!({"consumer": a_name}), "action"),
        (json!({"action": "replay", "ids": []}), "ids"),
        (json!({"action": "replay", "ids": (0..1001).map(|i| format!("dlq_{i}")).collect::<Vec<_>>()}), "ids"),
        (json!({"action": "replay", "status": "dead"}), "status"),
    ] {
        let (st, v) = a.post("/v1/dlq/bulk", body.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    let (st, _) = s.api(&a_keys.read).post("/v1/dlq/bulk", json!({"action": "discard", "dry_run": true})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(dead_letters(&a, "&status=dead").await.len(), 12, "nothing changed");

    // Another workspace's ids match nothing, and its entries stay as they are.
    let b_ids: Vec<String> = dead_letters(&b, "&status=dead").await.iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(dry(json!({"action": "discard", "ids": b_ids, "dry_run": true})).await, 0);
    let (st, v) = a.post("/v1/dlq/bulk", json!({"action": "discard", "ids": b_ids})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["matching"], 0);
    let j = job_end(&a, v["job"]["id"].as_str().unwrap()).await;
    assert_eq!((j["status"].as_str(), &j["result"]), (Some("succeeded"), &json!({"discarded": 0})), "{j}");
    assert_eq!(dead_letters(&b, "&status=dead").await.len(), 3);

    // Replay by filter, once the cause is fixed: a job with progress; the
    // entries leave `dead` and are delivered.
    rx.fail_events.lock().unwrap().clear();
    let (st, v) = a.post("/v1/dlq/bulk", json!({"action": "replay", "consumer": a_name, "type": "t.a"})).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["matching"], 8);
    assert_eq!(v["job"]["kind"], "dlq.bulk");
    assert_eq!(v["job"]["payload"]["action"], "replay");
    assert_eq!(v["job"]["payload"]["v"], 1);
    let replay_job = v["job"]["id"].as_str().unwrap().to_owned();
    let j = job_end(&a, &replay_job).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["result"], json!({"replaying": 8}));
    assert_eq!((j["progress"]["done"].as_u64(), j["progress"]["total"].as_u64()), (Some(8), Some(8)), "{j}");
    assert_eq!(dead_letters(&a, &format!("&status=dead&consumer={a_name}&type=t.a")).await.len(), 0);
    eventually("8 replays delivered", 30, || async { dead_letters(&a, "&status=replayed").await.len() == 8 }).await;
    assert!((0..8).all(|i| rx.successes().get(&format!("a{i}")) == Some(&1)), "{:?}", rx.successes());

    // Discard two by ids (all other filters must match too).
    let left: Vec<String> = dead_letters(&a, "&status=dead").await.iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(left.len(), 4);
    let (st, v) = a.post("/v1/dlq/bulk", json!({"action": "discard", "ids": &left[..2], "consumer": a_name})).await;
    assert_eq!((st, v["matching"].as_u64()), (StatusCode::ACCEPTED, Some(2)), "{v}");
    let discard_job = v["job"]["id"].as_str().unwrap().to_owned();
    let j = job_end(&a, &discard_job).await;
    assert_eq!((j["status"].as_str(), &j["result"]), (Some("succeeded"), &json!({"discarded": 2})), "{j}");
    for id in &left[..2] {
        assert_eq!(a.get(&format!("/v1/dlq/{id}")).await.1["status"], "discarded");
    }
    assert_eq!(dead_letters(&a, "&status=dead").await.len(), 2);
    assert_eq!(dead_letters(&b, "&status=dead").await.len(), 3, "B's entries were never touched");

    // The audit trail: one entry per job that changed something.
    let (_, audit) = a.get("/v1/audit?limit=1000").await;
    let bulk: Vec<&Value> = audit["data"].as_array().unwrap().iter().filter(|e| e["action"].as_str().unwrap().ends_with("_bulk")).collect();
    assert_eq!(bulk.len(), 2, "{bulk:?}");
    assert_eq!(bulk[0]["action"], "dlq.replay_bulk");
    assert_eq!(bulk[0]["details"]["job"], replay_job.as_str());
    assert_eq!(bulk[0]["details"]["matched"], 8);
    assert_eq!(bulk[0]["details"]["count"], 8);
    assert_eq!(bulk[0]["details"]["filter"], json!({"consumer": a_name, "event_type": "t.a", "error": null}));
    assert_eq!(bulk[1]["action"], "dlq.discard_bulk");
    assert_eq!(bulk[1]["details"]["ids"], 2);
    assert_eq!(bulk[1]["details"]["job"], discard_job.as_str());
    assert!(bulk.iter().all(|e| e["actor_key_id"].as_str().is_some_and(|k| k.starts_with("key_"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_discard_of_more_than_a_chunk_reports_progress_and_discards_every_entry() {
    // One attempt each, to a closed port: every event is a dead letter at once.
    let s = Server::start_with(&[("SLUICE_RETRY_ATTEMPTS", "1"), ("SLUICE_RETRY_BASE_MS", "10"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let api = s.root();
    webhook(&api, "http://127.0.0.1:9/hook", json!(["*"])).await;
    let n = 1234;
    for batch in (0..n).collect::<Vec<_>>().chunks(500) {
        api.ingest(json!(batch.iter().map(|i| json!({"id": format!("e{i}"), "type": "t"})).collect::<Vec<_>>())).await;
    }
    eventually("every event dead-lettered", 120, || async { dead_letters(&api, "&status=dead").await.len() == n }).await;
    let (st, v) = api.post("/v1/dlq/bulk", json!({"action": "discard"})).await;
    assert_eq!((st, v["matching"].as_u64()), (StatusCode::ACCEPTED, Some(n as u64)), "{v}");
    let id = v["job"]["id"].as_str().unwrap().to_owned();
    // The job's progress, seen from outside, never goes back and ends at n of n.
    let mut seen = Vec::new();
    let j = loop {
        let (_, j) = api.get(&format!("/v1/jobs/{id}")).await;
        seen.push(j["progress"]["done"].as_u64().unwrap());
        if j["status"] != "queued" && j["status"] != "running" {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(j["result"], json!({"discarded": n}));
    assert_eq!((j["progress"]["done"].as_u64(), j["progress"]["total"].as_u64()), (Some(n as u64), Some(n as u64)));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(dead_letters(&api, "&status=dead").await.is_empty());
    assert_eq!(dead_letters(&api, "&status=discarded").await.len(), n);
}
