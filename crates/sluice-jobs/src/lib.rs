//! The job runner.
//!
//! Jobs live in the state store (`sluice_store::Job`): durable, listed and
//! inspected through the API, claimed by workers. A [`Runner`] has one loop
//! per job kind; each loop keeps at most the kind's concurrency of jobs
//! running, claims the oldest due jobs when a slot frees up (so queued jobs
//! run in order), and for each job:
//!
//! - holds a **lease**, renewed by a heartbeat; when the process dies the
//!   lease expires and any runner puts the job back in the queue (or fails
//!   it when its attempts are used up). A handler must therefore be safe to
//!   run again: it resumes from what it committed, or its effects are
//!   idempotent (for example events with deterministic ids go through the
//!   deduplicating ingest path);
//! - reports **progress** through [`JobContext::progress`];
//! - sees **cancellation** through [`JobContext::is_cancelled`] (a queued job
//!   is cancelled at once by the store; a running one when its handler
//!   notices and returns [`JobError::Cancelled`]);
//! - on failure is **retried** with exponential backoff and jitter until
//!   `max_attempts`, keeping every attempt's error.
//!
//! Concurrency limits are per process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sluice_store::{Job, JobEnd, Store};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// Why an attempt did not succeed: retryable or permanent, said by the
/// variant (never inferred from the error's text).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A failure another attempt may fix; the job is retried if attempts
    /// are left.
    #[error("{0} (retryable)")]
    Retryable(String),
    /// The handler stopped because the job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A failure that another attempt cannot fix (e.g. invalid input); the
    /// job fails at once, keeping `result` (e.g. the list of bad rows).
    #[error("{error}")]
    Permanent {
        /// Why.
        error: String,
        /// What to keep as the job's result.
        result: Value,
    },
}

sluice_core::error_codes!(JobError { Retryable => "job.retryable", Cancelled => "job.cancelled", Permanent => "job.permanent" });

impl JobError {
    /// A failure another attempt may fix (the store or the log was
    /// unavailable, a timeout): retried while attempts are left.
    pub fn retryable(e: impl std::fmt::Display) -> JobError {
        JobError::Retryable(e.to_string())
    }

    /// A failure another attempt cannot fix (a payload that does not
    /// decode, invalid input): the job fails at once.
    pub fn permanent(e: impl std::fmt::Display) -> JobError {
        JobError::Permanent { error: e.to_string(), result: Value::Null }
    }
}

// Which errors are worth another attempt is decided per type, not by
// converting anything displayable into a retry: the store's failures are
// retryable unless they come from the data, the log's and the file
// system's are retryable; everything else is mapped at its call site with
// `JobError::retryable` or `JobError::permanent`.
impl From<sluice_store::StoreError> for JobError {
    fn from(e: sluice_store::StoreError) -> Self {
        if e.is_permanent() {
            JobError::permanent(e)
        } else {
            JobError::retryable(e)
        }
    }
}

impl From<sluice_core::LogError> for JobError {
    fn from(e: sluice_core::LogError) -> Self {
        JobError::retryable(e)
    }
}

impl From<std::io::Error> for JobError {
    fn from(e: std::io::Error) -> Self {
        JobError::retryable(e)
    }
}

/// The payload of one job kind: a serde struct, never a loose JSON object
/// read with defaults. Every payload has a version `v` (absent in payloads
/// of older binaries: 1), so that a job enqueued by an older binary still
/// runs; unknown fields are ignored, so that an older binary runs a newer
/// payload it understands.
pub trait JobPayload: serde::Serialize + serde::de::DeserializeOwned {
    /// The job kind this payload belongs to.
    const KIND: &'static str;

    /// The payload as stored in the job.
    fn to_value(&self) -> Value {
        // A struct of strings and numbers always serializes.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The payload of `job`; one that does not decode fails the job at once
    /// (another attempt would not decode it either).
    fn of(job: &Job) -> Result<Self, JobError> {
        serde_json::from_value(job.payload.clone())
            .map_err(|e| JobError::permanent(format!("the payload of this {} job does not decode: {e}", Self::KIND)))
    }
}

/// The result of one job kind: a serde struct, stored as the job's
/// `result` (what `GET /v1/jobs/{id}` shows).
pub trait JobResult: serde::Serialize {
    /// The result as stored in the job.
    fn to_value(&self) -> Value {
        // A struct of strings and numbers always serializes.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The version of payloads written by this binary (see [`JobPayload`]).
pub fn payload_v1() -> u32 {
    1
}

/// Runs jobs of one kind.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// The kind this handler runs, e.g. `import.usage`.
    fn kind(&self) -> &str;
    /// Jobs of this kind run at once in one process.
    fn concurrency(&self) -> usize {
        1
    }
    /// Jobs of this kind run one at a time and in order within a workspace
    /// (jobs of different workspaces still run side by side, up to
    /// [`JobHandler::concurrency`]).
    fn one_per_workspace(&self) -> bool {
        false
    }
    /// Runs one attempt; returns the job's result.
    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError>;
    /// Called once the end of an attempt is recorded, with the job as it now
    /// is (`succeeded`, `failed`, `cancelled`, or `queued` for a retry), for
    /// clean-up that must wait until the outcome is durable — for example
    /// removing an uploaded file only once the import is recorded as done,
    /// never while a crash could still make the job run again.
    async fn ended(&self, _job: &Job) {}
}

/// What a handler can do while it runs.
pub struct JobContext {
    store: Store,
    id: String,
    attempt: u32,
    cancelled: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    /// When progress was last reported.
    last_progress: std::sync::Mutex<Option<std::time::Instant>>,
    /// Progress reported but not written yet, and the order of the writes.
    progress_out: Arc<ProgressOut>,
    /// Dropped once the attempt's end is recorded ([`JobContext::keep_until_recorded`]).
    kept: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

/// Progress writes happen in the background, so a handler never waits for
/// the state store to report progress: on SQLite a progress write queues
/// behind other writers (a consumer committing thousands of usage
/// buckets), and an import that waited for each of its progress writes
/// spent much of its time there (measured: docs/BENCHMARKS.md, "CSV usage
/// import"). Writes go one at a time, in report order, each with the
/// latest numbers.
#[derive(Default)]
struct ProgressOut {
    /// The latest numbers not written yet.
    latest: std::sync::Mutex<Option<(i64, Option<i64>)>>,
    /// Held while writing (tokio's mutex is fair: writes keep their order).
    writing: tokio::sync::Mutex<()>,
}

impl ProgressOut {
    /// Writes the latest numbers, if no earlier write took them.
    async fn write(&self, store: &Store, id: &str, attempt: u32) {
        let _turn = self.writing.lock().await;
        let Some((done, total)) = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else { return };
        if let Err(e) = store.job_progress(id, attempt, done, total).await {
            tracing::warn!(job = %id, error = %e, "could not record progress");
        }
    }
}

/// Progress is written at most this often (the last report, `done ==
/// total`, always): a handler may report after every small step without
/// turning each into a state-store write.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

impl JobContext {
    /// Keeps `guard` until the end of this attempt is recorded, then drops
    /// it: for what must end only after the job does. An import holds its
    /// burst of appends (`sluice_core::Bursts`) this way: ending it lets
    /// the consumers commit everything they held, and on SQLite the job's
    /// last progress and end would queue behind those commits although its
    /// rows are long durable (measured: docs/BENCHMARKS.md, "CSV usage
    /// import").
    pub fn keep_until_recorded(&self, guard: impl Send + 'static) {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Box::new(guard));
    }

    /// Records progress: `done` of `total` units (total when known). Returns
    /// at once, the write happens in the background ([`ProgressOut`]);
    /// except the last report (`done == total`), which returns once it and
    /// every earlier report are written.
    pub async fn progress(&self, done: i64, total: Option<i64>) {
        let final_report = total == Some(done);
        {
            let mut last = self.last_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !final_report && last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        *self.progress_out.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((done, total));
        if final_report {
            self.progress_out.write(&self.store, &self.id, self.attempt).await;
        } else {
            let (out, store, id, attempt) = (self.progress_out.clone(), self.store.clone(), self.id.clone(), self.attempt);
            tokio::spawn(async move { out.write(&store, &id, attempt).await });
        }
    }

    /// True once a cancellation was asked for, or once this attempt lost
    /// its lease (another attempt took the job over); the handler should
    /// stop and return [`JobError::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.lost.load(Ordering::Acquire)
    }

    /// The store, for handlers that write state.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Settings of a runner.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    /// Lease of a running job; renewed every third of it.
    pub lease: Duration,
    /// How often idle loops look for new jobs and expired leases.
    pub poll: Duration,
    /// Backoff before the second attempt; doubles per attempt, at most 10 min.
    pub retry_base: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig { lease: Duration::from_secs(30), poll: Duration::from_millis(200), retry_base: Duration::from_secs(1) }
    }
}

/// Runs job handlers until stopped.
pub struct Runner {
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Runner {
    /// Starts one loop per handler and the lease reclaimer.
    pub fn start(store: Store, handlers: Vec<Arc<dyn JobHandler>>, cfg: RunnerConfig) -> Runner {
        let (stop, stop_rx) = watch::channel(false);
        let wake = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        let kinds: HashMap<String, Arc<dyn JobHandler>> = handlers.into_iter().map(|h| (h.kind().to_owned(), h)).collect();
        for (_, h) in kinds {
            tasks.push(tokio::spawn(kind_loop(store.clone(), h, cfg, stop_rx.clone(), wake.clone())));
        }
        tasks.push(tokio::spawn(reclaim_loop(store, cfg, stop_rx)));
        Runner { stop, tasks: std::sync::Mutex::new(tasks), wake }
    }

    /// Tells idle loops to look for work now (after an enqueue).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Stops claiming; running jobs are abandoned to their leases (another
    /// start reclaims them).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn reclaim_loop(store: Store, cfg: RunnerConfig, mut stop: watch::Receiver<bool>) {
    loop {
        match store.reclaim_expired_jobs().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(jobs = n, "reclaimed jobs whose process stopped (lease expired)"),
            Err(e) => tracing::warn!(error = %e, "could not reclaim expired jobs"),
        }
        tokio::select! {
            _ = tokio::time::sleep((cfg.lease / 2).max(Duration::from_millis(50))) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn kind_loop(store: Store, h: Arc<dyn JobHandler>, cfg: RunnerConfig, mut stop: watch::Receiver<bool>, wake: Arc<tokio::sync::Notify>) {
    let slots = Arc::new(Semaphore::new(h.concurrency().max(1)));
    loop {
        if *stop.borrow() {
            return;
        }
        let free = slots.available_permits();
        let claimed = if free > 0 {
            let claim = if h.one_per_workspace() {
                store.claim_jobs_one_per_workspace(h.kind(), free, cfg.lease).await
            } else {
                store.claim_jobs(h.kind(), free, cfg.lease).await
            };
            match claim {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(kind = h.kind(), error = %e, "could not claim jobs");
                    vec![]
                }
            }
        } else {
            vec![]
        };
        let got = !claimed.is_empty();
        for job in claimed {
            let Ok(permit) = slots.clone().try_acquire_owned() else { break };
            let (store, h) = (store.clone(), h.clone());
            tokio::spawn(async move {
                run_one(store, h, job, cfg).await;
                drop(permit);
            });
        }
        if got && slots.available_permits() > 0 {
            continue; // more may be waiting
        }
        let notified = wake.notified();
        tokio::select! {
            _ = tokio::time::sleep(cfg.poll) => {}
            _ = notified => {}
            _ = stop.changed() => return,
        }
    }
}

async fn run_one(store: Store, h: Arc<dyn JobHandler>, job: Job, cfg: RunnerConfig) {
    use futures::FutureExt;
    let cancelled = Arc::new(AtomicBool::new(job.cancel_requested));
    let lost = Arc::new(AtomicBool::new(false));
    let attempt = job.attempts;
    let ctx = JobContext {
        store: store.clone(),
        id: job.id.clone(),
        attempt,
        cancelled: cancelled.clone(),
        lost: lost.clone(),
        last_progress: std::sync::Mutex::new(None),
        progress_out: Arc::default(),
        kept: std::sync::Mutex::new(Vec::new()),
    };
    // Heartbeat: renew the lease and pick up cancellation requests. Every
    // write is fenced by the attempt number, so if this process stalled past
    // its lease and the job was reclaimed, this attempt learns it here, stops,
    // and cannot overwrite what the new attempt records.
    let hb = {
        let (store, id, cancelled, lost) = (store.clone(), job.id.clone(), cancelled.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep((cfg.lease / 3).max(Duration::from_millis(10))).await;
                match store.heartbeat_job(&id, attempt, cfg.lease).await {
                    Ok(Some(c)) => {
                        if c {
                            cancelled.store(true, Ordering::Release);
                        }
                    }
                    Ok(None) => {
                        tracing::warn!(job = %id, attempt, "job attempt lost its lease (the job was reclaimed); stopping it");
                        lost.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
                }
            }
        })
    };
    tracing::info!(job = %job.id, kind = %job.kind, attempt = job.attempts, "job started");
    let outcome = std::panic::AssertUnwindSafe(h.run(&job, &ctx)).catch_unwind().await;
    hb.abort();
    let end = match outcome {
        Ok(Ok(v)) => JobEnd::Succeeded(v),
        Ok(Err(JobError::Cancelled)) => JobEnd::Cancelled,
        Ok(Err(JobError::Permanent { error, result })) => JobEnd::Fatal { error, result },
        Ok(Err(JobError::Retryable(e))) => JobEnd::Failed { error: e, retry_in: backoff(cfg.retry_base, job.attempts) },
        Err(_) => JobEnd::Failed { error: "the job handler panicked".into(), retry_in: backoff(cfg.retry_base, job.attempts) },
    };
    let recorded = store.finish_job(&job.id, attempt, &end).await;
    drop(std::mem::take(&mut *ctx.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)));
    match recorded {
        Ok(j) => {
            tracing::info!(job = %j.id, kind = %j.kind, state = %j.state, "job attempt ended");
            metrics::counter!("sluice_jobs_finished_total", "kind" => j.kind.clone(), "state" => j.state.as_str()).increment(1);
            if j.state == sluice_core::JobState::Failed {
                sluice_core::activity::record(&j.workspace, sluice_core::activity::Activity::JobFailed, 1);
            }
            h.ended(&j).await;
        }
        Err(sluice_store::StoreError::Conflict(e)) => tracing::warn!(job = %job.id, attempt, "{e}; this attempt's outcome is dropped"),
        Err(e) => tracing::error!(job = %job.id, error = %e, "could not record the end of a job; its lease will expire and it will run again"),
    }
}

/// `base * 2^(attempt-1)`, at most 10 minutes, with jitter in its upper half
/// (the shared [`sluice_core::Backoff`]).
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    sluice_core::Backoff::new(base, Duration::from_secs(600)).delay(attempt)
}
