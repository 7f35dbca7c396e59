//! The consumer runtime against a real embedded log and SQLite store, with a
//! consumer that fails (or panics) on chosen events.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_consumers::{Attempt, Consumer, Effect, HandleError, RetryPolicy, Runtime};
use sluice_core::{AppendRecord, Event, EventLog};
use sluice_store::{CountKey, NewAudit, Store};

#[derive(Default)]
struct Picky {
    failing: Mutex<HashSet<String>>,
    panic_once: Mutex<HashSet<String>>,
    panic_always: Mutex<HashSet<String>>,
    calls: Mutex<HashMap<String, u32>>,
}

struct Handle(Arc<Picky>);

#[async_trait]
impl Consumer for Handle {
    fn name(&self) -> &str {
        "picky"
    }

    async fn handle(&self, e: &Event, _a: Attempt) -> Result<Effect, HandleError> {
        let id = e.id.to_string();
        *self.0.calls.lock().unwrap().entry(id.clone()).or_default() += 1;
        if self.0.panic_always.lock().unwrap().contains(&id) {
            panic!("simulated persistent bug on {id}");
        }
        if self.0.panic_once.lock().unwrap().remove(&id) {
            panic!("simulated bug on {id}");
        }
        if self.0.failing.lock().unwrap().contains(&id) {
            return Err(HandleError::Transient(format!("cannot handle {id}")));
        }
        Ok(Effect::Count(CountKey { workspace: "w".into(), event_type: "t".into(), customer_id: String::new(), day: "2024-01-01".into() }))
    }
}

fn event(id: &str, customer: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "workspace": "w", "id": id, "type": "t", "timestamp": "2024-01-01T00:00:00Z",
        "received_at": "2024-01-01T00:00:00Z", "customer_id": customer, "properties": {}, "context": {}
    }))
    .unwrap()
}

async fn total(store: &Store) -> i64 {
    store.event_counts("w", None, None).await.unwrap().iter().map(|r| r.3).sum()
}

async fn eventually<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_events_are_dead_lettered_others_applied_once_and_replay_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(dir.path().join("log"), 3)).unwrap());
    let picky = Arc::new(Picky::default());
    let bad: HashSet<String> = ["e5", "e17", "e40"].iter().map(|s| s.to_string()).collect();
    *picky.failing.lock().unwrap() = bad.clone();
    picky.panic_once.lock().unwrap().insert("e23".into());
    picky.panic_always.lock().unwrap().insert("e50".into());
    let mut dead_expected = bad.clone();
    dead_expected.insert("e50".into());
    // A panic is a permanent failure (issue 11): dead-lettered at once, like
    // e50, not retried.
    dead_expected.insert("e23".into());
    let records: Vec<AppendRecord> =
        (0..60).map(|i| AppendRecord { partition: i % 3, timestamp_ms: 0, payload: event(&format!("e{i}"), &format!("c{}", i % 3)) }).collect();
    log.append(records).await.unwrap();

    let policy = RetryPolicy { attempts: 4, base: Duration::from_millis(5), max: Duration::from_millis(20) };
    let rt = Runtime::new(log.clone(), store.clone(), policy, 7);
    rt.start(Arc::new(Handle(picky.clone())));
    eventually("all processed", || async { total(&store).await == 55 }).await;
    eventually("checkpoints at the end", || async {
        let cp = store.checkpoints("picky").await.unwrap();
        (0..3).all(|p| cp.get(&p) == Some(&log.next_offset(p)))
    })
    .await;
    let dead = store.list_dead_letters("w", Some("picky"), Some(sluice_store::DeadLetterStatus::Dead), None, 100).await.unwrap().data;
    assert_eq!(dead.iter().map(|d| d.event_id.clone()).collect::<HashSet<_>>(), dead_expected);
    let panicked = |id: &str| id == "e50" || id == "e23";
    assert!(dead.iter().all(|d| d.attempts == if panicked(&d.event_id) { 1 } else { 4 }), "{dead:?}");
    assert!(dead.iter().all(|d| d.error.starts_with(if panicked(&d.event_id) { "consumer panicked" } else { "cannot handle" })));
    {
        let calls = picky.calls.lock().unwrap();
        for (id, n) in calls.iter() {
            let expected = if panicked(id) {
                1
            } else if dead_expected.contains(id) {
                4
            } else {
                1
            };
            assert_eq!(*n, expected, "{id} handled {n} times");
        }
        assert_eq!(calls.len(), 60);
    }

    // Fix the cause and replay: each dead letter is applied exactly once.
    picky.failing.lock().unwrap().clear();
    picky.panic_always.lock().unwrap().clear();
    let audit = NewAudit {
        workspace: "w".into(),
        actor_key_id: Some("key_test".into()),
        action: "dlq.replay_bulk".into(),
        target_type: "dead_letter".into(),
        target_id: "*".into(),
        details: serde_json::json!({}),
    };
    assert_eq!(store.claim_replays("w", None, Some("picky"), None, None, &audit).await.unwrap(), 5);
    eventually("replayed", || async { total(&store).await == 60 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(&store).await, 60);
    let replayed = store.list_dead_letters("w", None, Some(sluice_store::DeadLetterStatus::Replayed), None, 100).await.unwrap().data;
    assert_eq!(replayed.len(), 5);
    assert!(dead_expected.iter().all(|b| picky.calls.lock().unwrap()[b] == if panicked(b) { 2 } else { 5 }));
    // A second claim finds nothing to replay.
    assert_eq!(store.claim_replays("w", None, Some("picky"), None, None, &audit).await.unwrap(), 0);

    // Stopped and started again, it resumes from its checkpoints: nothing twice.
    rt.stop("picky").await;
    rt.start(Arc::new(Handle(picky.clone())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(&store).await, 60);
    rt.stop_all().await;
}

#[test]
fn backoff_doubles_with_jitter_and_is_capped() {
    let p = RetryPolicy { attempts: 5, base: Duration::from_millis(100), max: Duration::from_millis(1000) };
    for _ in 0..50 {
        let d1 = p.delay(1);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
        let d3 = p.delay(3);
        assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
        assert!(p.delay(30) <= Duration::from_millis(1000));
    }
}

/// Effects kept during a burst are committed when it ends, and until then
/// the consumer counts as settling: `Bursts::busy` turns false only once
/// they are in the store (the lake writer waits for that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_kept_during_a_burst_settle_before_the_runtime_is_idle() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(dir.path().join("log"), 2)).unwrap());
    let rt = Runtime::new(log.clone(), store.clone(), RetryPolicy::default(), 100);
    let burst = rt.bursts().begin();
    let mut busy = rt.bursts().busy();
    let picky = Arc::new(Picky::default());
    rt.start(Arc::new(Handle(picky.clone())));
    let records: Vec<AppendRecord> =
        (0..10).map(|i| AppendRecord { partition: i % 2, timestamp_ms: 0, payload: event(&format!("e{i}"), &format!("c{i}")) }).collect();
    log.append(records).await.unwrap();
    eventually("all handled", || async { picky.calls.lock().unwrap().len() == 10 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(total(&store).await, 0, "effects were committed during the burst");
    drop(burst);
    // Busy until the held effects are committed: the first moment it is not,
    // every effect is in the store.
    let deadline = Instant::now() + Duration::from_secs(20);
    while busy.now() {
        assert!(Instant::now() < deadline, "still busy 20 s after the burst ended");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(total(&store).await, 10, "idle before the effects kept during the burst were committed");
    rt.stop_all().await;
}

/// Issue 7: a record that cannot be decoded is never skipped silently: the
/// consumer dead-letters it (no workspace: the record names none) with the
/// reason, and handles the records around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_dead_lettered_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    let log: Arc<dyn EventLog> = Arc::new(sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(dir.path().join("log"), 1)).unwrap());
    let mut records: Vec<AppendRecord> =
        (0..4).map(|i| AppendRecord { partition: 0, timestamp_ms: 0, payload: event(&format!("e{i}"), "c") }).collect();
    records.insert(2, AppendRecord { partition: 0, timestamp_ms: 0, payload: b"{not an event".to_vec() });
    log.append(records).await.unwrap();
    let rt = Runtime::new(log.clone(), store.clone(), RetryPolicy::default(), 10);
    rt.start(Arc::new(Handle(Arc::new(Picky::default()))));
    eventually("the good events counted", || async { total(&store).await == 4 }).await;
    let dead = store.list_dead_letters("", Some("picky"), None, None, 100).await.unwrap().data;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].partition, dead[0].offset, dead[0].attempts), (0, 2, 1));
    assert_eq!(dead[0].event_id, "record:0:2");
    assert!(dead[0].error.starts_with("the log record cannot be decoded"), "{}", dead[0].error);
    rt.stop_all().await;
}
