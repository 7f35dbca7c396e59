//! The runner against a real SQLite store.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use sluice_jobs::{JobContext, JobError, JobHandler, Runner, RunnerConfig};
use sluice_store::{Job, NewJob, Store};

struct Steps {
    order: Mutex<Vec<u64>>,
    fail_first: AtomicU32,
}

#[async_trait]
impl JobHandler for Steps {
    fn kind(&self) -> &str {
        "steps"
    }
    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let n = job.payload["n"].as_u64().unwrap();
        if n == 2 && self.fail_first.fetch_sub(1, Ordering::AcqRel) > 0 {
            return Err(JobError::Retryable("transient".into()));
        }
        if n == 3 {
            // Runs until cancelled.
            for i in 0.. {
                if ctx.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                ctx.progress(i, None).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for i in 1..=4 {
            ctx.progress(i, Some(4)).await;
        }
        self.order.lock().unwrap().push(n);
        Ok(json!({"n": n}))
    }
}

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::connect(&format!("sqlite://{}", dir.path().join("s.db").display())).await.unwrap();
    (s, dir)
}

async fn wait_state(store: &Store, id: &str, state: &str) -> Job {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = store.get_job(None, id).await.unwrap();
        if j.state.as_str() == state {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} is {} (wanted {state}): {j:?}", j.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn new(n: u64) -> NewJob {
    NewJob { workspace: "w".into(), kind: "steps".into(), payload: json!({"n": n}), max_attempts: 3, created_by: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_order_with_progress_retries_and_cancellation() {
    let (store, _dir) = store().await;
    let h = Arc::new(Steps { order: Mutex::default(), fail_first: AtomicU32::new(1) });
    let cfg = RunnerConfig { lease: Duration::from_secs(5), poll: Duration::from_millis(20), retry_base: Duration::from_millis(10) };
    let mut ids = Vec::new();
    for n in [0, 1, 2, 4] {
        ids.push(store.enqueue_job(&new(n)).await.unwrap().id);
    }
    let runner = Runner::start(store.clone(), vec![h.clone()], cfg);
    for id in &ids {
        let j = wait_state(&store, id, "succeeded").await;
        assert_eq!((j.progress_done, j.progress_total), (4, Some(4)));
        assert!(j.finished_at.is_some());
    }
    // Concurrency 1, oldest first; job 2 failed once and ran again after its
    // backoff, so it may finish after job 4.
    let order = h.order.lock().unwrap().clone();
    assert_eq!(order.len(), 4);
    assert_eq!(&order[..2], &[0, 1]);
    let j2 = store.get_job(None, &ids[2]).await.unwrap();
    assert_eq!(j2.attempts, 2);
    assert_eq!(j2.errors, vec!["attempt 1: transient".to_string()]);
    assert_eq!(j2.result, Some(json!({"n": 2})));

    // Cancel a running job.
    let long = store.enqueue_job(&new(3)).await.unwrap().id;
    runner.wake();
    wait_state(&store, &long, "running").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get_job(None, &long).await.unwrap().progress_done < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let j = store.cancel_job("w", &long).await.unwrap();
    assert!(j.cancel_requested);
    wait_state(&store, &long, "cancelled").await;
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_dead_process_is_reclaimed_and_run_again() {
    let (store, _dir) = store().await;
    let id = store.enqueue_job(&new(7)).await.unwrap().id;
    // A process claims it and dies (nobody renews the lease).
    let claimed = store.claim_jobs("steps", 1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(claimed[0].id, id);
    let h = Arc::new(Steps { order: Mutex::default(), fail_first: AtomicU32::new(0) });
    let cfg = RunnerConfig { lease: Duration::from_millis(300), poll: Duration::from_millis(20), retry_base: Duration::from_millis(10) };
    let runner = Runner::start(store.clone(), vec![h.clone()], cfg);
    let j = wait_state(&store, &id, "succeeded").await;
    assert_eq!(j.attempts, 2, "the second attempt ran it");
    assert_eq!(h.order.lock().unwrap().clone(), vec![7]);
    runner.stop().await;
}

/// Keeps a guard until its end is recorded (as an import keeps its burst).
struct Keeps(Mutex<Option<tokio::sync::watch::Sender<()>>>);

#[async_trait]
impl JobHandler for Keeps {
    fn kind(&self) -> &str {
        "keeps"
    }
    async fn run(&self, _job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let guard = self.0.lock().unwrap().take().unwrap();
        ctx.keep_until_recorded(guard);
        Ok(json!({}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_guard_ends_after_the_job_end_is_recorded() {
    let (store, _dir) = store().await;
    let (tx, mut rx) = tokio::sync::watch::channel(());
    let cfg = RunnerConfig { lease: Duration::from_secs(5), poll: Duration::from_millis(20), retry_base: Duration::from_millis(10) };
    let id = store.enqueue_job(&NewJob { kind: "keeps".into(), ..new(0) }).await.unwrap().id;
    let runner = Runner::start(store.clone(), vec![Arc::new(Keeps(Mutex::new(Some(tx))))], cfg);
    // The receiver sees the sender closed when the runner drops the guard:
    // by then the job's end is in the store.
    tokio::time::timeout(Duration::from_secs(20), async { while rx.changed().await.is_ok() {} }).await.unwrap();
    assert_eq!(store.get_job(None, &id).await.unwrap().state.as_str(), "succeeded");
    runner.stop().await;
}
