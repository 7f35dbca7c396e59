//! The consumer runtime: checkpointed, at-least-once delivery of log
//! records to consumers, with retries, dead letters and replay.
//!
//! Every consumer gets one worker per log partition: ordered within a
//! partition, parallel across partitions, and one slow consumer never delays
//! another (each has its own workers and checkpoints).
//!
//! A worker reads a batch from its checkpoint, hands each event to the
//! consumer and commits the effects together with the new checkpoint in one
//! state-store transaction ([`Store::commit_consumer`]): a crash anywhere
//! re-delivers the uncommitted part of the batch and nothing counts twice.
//! A consumer with external effects (webhooks) cannot share that transaction;
//! it makes its effect idempotent instead (the stable `webhook-id`) and the
//! checkpoint only moves after the effect succeeded.
//!
//! A failure is either **permanent** (caused by the event's data: a value
//! the read model cannot take, usage that would overflow, a panic while
//! handling it) or **transient** (the store, a timeout, a webhook receiver
//! that is down); see [`HandleError`]. A permanent failure sends the event
//! to the dead letters at once, with its reason, and the worker goes on: no
//! retry schedule, no restart, no stall of the other workspaces that share
//! the partition. A transient failure commits the effects before the event,
//! then retries it with exponential backoff and full jitter; after
//! [`RetryPolicy::attempts`] failures it is committed as a dead letter
//! together with the checkpoint past it. Only shared causes are transient
//! in the shared read models (their handlers fail transiently only when the
//! store does, which holds every workspace alike), and each webhook is its
//! own consumer of one workspace, so a retry never holds up another
//! workspace's events (docs/consumers.md, "Failures").
//!
//! Effects are folded exactly ([`Folder::add_usage`] is all or nothing):
//! an event whose usage would overflow what it is added to is a permanent
//! failure. When the store refuses a commit because of its data (usage that
//! overflows stored buckets, a value the database cannot hold), the worker
//! processes the carried records again: with the overflowing buckets known,
//! the events that add to them go to the dead letters; for any other
//! refusal, it commits one record at a time and dead-letters the events of
//! the record the store refuses. A panic anywhere else in a worker restarts
//! it from its last checkpoint; restarts are counted in its state
//! (`GET /v1/consumers`, `/readyz`).
//!
//! An operator replays a dead letter (it goes through this consumer only,
//! and its effects commit with its status change, so a replay applies once)
//! or discards it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sluice_core::{Backoff, Bursts, Event, EventBatch, EventLog, Payload, Record};
use sluice_store::{
    ConsumerCommit, CountKey, Folder, ModelEffect, NewAudit, NewDeadLetter, Store, StoreError, TxWork, UsageBucketKey, UsageOverflow,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Retry settings of every consumer.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before an event goes to the dead-letter queue (≥ 1). Default 5.
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time. Default 500 ms.
    pub base: Duration,
    /// Longest delay between attempts. Default 60 s.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 5, base: Duration::from_millis(500), max: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt `n` (1-based): `base * 2^(n-1)` capped at
    /// `max`, with full jitter in its upper half ([`Backoff`], the policy
    /// shared with jobs and ingest).
    pub fn delay(&self, n: u32) -> Duration {
        Backoff::new(self.base, self.max).delay(n)
    }
}

/// Which attempt this is, and where the event is in the log.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// 1-based attempt number.
    pub n: u32,
    /// True on the last attempt before the dead-letter queue.
    pub last: bool,
    /// Log partition of the event.
    pub partition: u32,
    /// Log offset of the event.
    pub offset: u64,
}

/// Why handling an event failed. The runtime retries only what can succeed
/// later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// Caused by the event itself (a value the read model cannot take,
    /// usage that would overflow, a panic while handling it): retrying
    /// cannot help. The event goes to the dead-letter queue at once.
    #[error("{0}")]
    Permanent(String),
    /// Caused by something outside the event (the store is unavailable, a
    /// timeout, a webhook receiver is down): retried with backoff, then
    /// dead-lettered after [`RetryPolicy::attempts`].
    #[error("{0}")]
    Transient(String),
}

/// What handling one event produced, to be committed with the checkpoint.
#[derive(Debug)]
pub enum Effect {
    /// Nothing to write (filtered out, or an external effect already done).
    None,
    /// Count the event in the event_counts read model.
    Count(CountKey),
    /// Several counts at once (a batch): key and how many.
    Counts(Vec<(CountKey, i64)>),
    /// Add usage to meters.
    Usage(Vec<sluice_store::UsageDelta>),
    /// The effect of a read model written against [`crate::ReadModel`]
    /// (merged with the carried effects of the same consumer, committed by
    /// the read model in the commit's transaction).
    Model(Box<dyn ModelEffect>),
}

/// What resetting a consumer does to what it built.
pub enum OnReset {
    /// Nothing: the consumer goes on from the new position (a webhook
    /// delivers again).
    Keep,
    /// Empty its read model in the reset's transaction: the consumer
    /// rebuilds it from the new position.
    Clear(Box<dyn TxWork>),
    /// The consumer cannot be reset; the reason is shown to the caller.
    Refuse(String),
}

/// What a reset did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetDone {
    /// The new checkpoint of each partition.
    pub positions: Vec<(u32, u64)>,
    /// The consumer's read model was emptied, to be rebuilt.
    pub cleared: bool,
}

/// Where a consumer without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest record still in the log.
    Earliest,
    /// Only records appended after the consumer started.
    Latest,
}

/// A named reader of the log.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Stable name: the key of its checkpoints and dead letters.
    fn name(&self) -> &str;
    /// Where to start without a checkpoint.
    fn start(&self) -> Start {
        Start::Earliest
    }
    /// Handles one event. A [`HandleError::Transient`] is a failed attempt
    /// and is retried; a [`HandleError::Permanent`] one dead-letters the
    /// event at once.
    async fn handle(&self, event: &Event, attempt: Attempt) -> Result<Effect, HandleError>;

    /// Handles every event of a batch record at once: a fast path for
    /// consumers that can work on a batch's rows without expanding them into
    /// events. `None` (the default) means "not supported": the runtime calls
    /// [`Consumer::handle`] for each event. An `Err` (or a panic) makes the
    /// runtime fall back to `handle` per event, so that a failing event is
    /// retried and dead-lettered alone. The effect must equal the sum of the
    /// per-event effects.
    async fn handle_batch(&self, _batch: &EventBatch, _attempt: Attempt) -> Option<Result<Effect, HandleError>> {
        None
    }

    /// What a reset does to what this consumer built (default: nothing).
    fn on_reset(&self) -> OnReset {
        OnReset::Keep
    }
}

sluice_core::named_enum! {
    /// What a consumer is doing (`GET /v1/consumers`).
    #[derive(Default)]
    pub enum ConsumerStatus / UnknownConsumerStatus ("a consumer status") {
        /// Processing, or waiting for events.
        #[default]
        Running = "running",
        /// An event is failing and being retried.
        Retrying = "retrying",
    }
}

/// Observable state of a consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerState {
    /// Running or retrying.
    pub status: ConsumerStatus,
    /// The most recent error, if any.
    pub last_error: Option<String>,
    /// Times a worker panicked and was restarted.
    pub restarts: u64,
    /// When a worker was last restarted.
    pub last_restart_at: Option<DateTime<Utc>>,
    /// Events sent to the dead letters by the workers.
    pub dead_lettered: u64,
    /// The workspace of the event whose failure is `last_error` (`None`:
    /// not an event's failure). Shared consumers show an error only to its
    /// own workspace.
    pub last_error_workspace: Option<String>,
}

impl ConsumerState {
    /// How long a restart counts as recent.
    pub const RECENT_RESTART: chrono::Duration = chrono::Duration::minutes(5);

    /// A worker was restarted within [`Self::RECENT_RESTART`].
    pub fn restarted_recently(&self) -> bool {
        self.last_restart_at.is_some_and(|t| Utc::now() - t < Self::RECENT_RESTART)
    }
}

struct Running {
    consumer: Arc<dyn Consumer>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    state: Arc<Mutex<ConsumerState>>,
}

/// Runs consumers.
pub struct Runtime {
    log: Arc<dyn EventLog>,
    store: Store,
    policy: RetryPolicy,
    batch: usize,
    bursts: Bursts,
    recent: RecentBatches,
    running: Mutex<HashMap<String, Running>>,
}

/// The batch records the consumers of a runtime decoded last, shared: every
/// consumer reads every record, at about the same time (they wake on the
/// same appends), and decoding is a large part of a consumer's work per
/// row. The first to read a
/// record decodes it; the others take the same [`EventBatch`] while it is
/// among the last [`RecentBatches::KEEP`].
#[derive(Default)]
struct RecentBatches(Mutex<std::collections::VecDeque<(RecordId, Arc<EventBatch>)>>);

/// A record's place and what identifies its content there.
#[derive(PartialEq, Clone, Copy)]
struct RecordId {
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    len: usize,
}

/// A decoded record.
enum DecodedRecord {
    Event(Event),
    Batch(Arc<EventBatch>),
}

impl RecentBatches {
    /// Batch records kept (a record of an import holds about 4,000 rows,
    /// 0.5 MB decoded; more when partitions are fewer).
    const KEEP: usize = 16;

    fn decode(&self, r: &Record) -> Result<DecodedRecord, sluice_core::PayloadError> {
        let id = RecordId { partition: r.partition, offset: r.offset, timestamp_ms: r.timestamp_ms, len: r.payload.len() };
        if let Some((_, b)) = lock(&self.0).iter().find(|(k, _)| *k == id) {
            return Ok(DecodedRecord::Batch(b.clone()));
        }
        match Payload::decode(&r.payload)? {
            Payload::Event(e) => Ok(DecodedRecord::Event(e)),
            Payload::Batch(b) => {
                let b = Arc::new(b);
                let mut kept = lock(&self.0);
                if kept.len() >= Self::KEEP {
                    kept.pop_front();
                }
                kept.push_back((id, b.clone()));
                Ok(DecodedRecord::Batch(b))
            }
        }
    }
}

/// Errors of runtime operations.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No consumer of that name runs.
    #[error("no consumer named {0:?}")]
    NoSuchConsumer(String),
    /// `to` of a reset is not `earliest`, `latest` or an RFC 3339 time.
    #[error("`to` must be \"earliest\", \"latest\" or an RFC 3339 time")]
    BadPosition,
    /// The consumer cannot be reset ([`OnReset::Refuse`]).
    #[error("{0}")]
    NotResettable(String),
    /// State store failure.
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    /// Log failure.
    #[error(transparent)]
    Log(#[from] sluice_core::LogError),
}

sluice_core::error_codes!(RuntimeError { NoSuchConsumer => "consumer.no_such_consumer", BadPosition => "consumer.bad_position", NotResettable => "consumer.not_resettable" } wraps { Store, Log });

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Runtime {
    /// A runtime over `log` and `store`. `batch` is the most records a worker
    /// reads and commits at once.
    pub fn new(log: Arc<dyn EventLog>, store: Store, policy: RetryPolicy, batch: usize) -> Arc<Runtime> {
        Arc::new(Runtime {
            log,
            store,
            policy,
            batch: batch.max(1),
            bursts: Bursts::default(),
            recent: RecentBatches::default(),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Where producers of this process announce bursts of appends (a CSV
    /// import): during one, consumers hold their effects until it ends
    /// rather than commit at every pause of the stream, and count as
    /// settling (`Bursts::busy`) until what they held is committed.
    pub fn bursts(&self) -> &Bursts {
        &self.bursts
    }

    /// Starts a consumer (one worker per partition and a replay loop).
    /// Starting a name that already runs does nothing.
    pub fn start(self: &Arc<Self>, consumer: Arc<dyn Consumer>) {
        let name = consumer.name().to_owned();
        let mut running = lock(&self.running);
        if running.contains_key(&name) {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(ConsumerState { status: ConsumerStatus::Running, ..Default::default() }));
        let mut tasks = Vec::new();
        for p in 0..self.log.partitions() {
            let (rt, c, st, stop_rx) = (self.clone(), consumer.clone(), state.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move { rt.supervise(c, p, st, stop_rx).await }));
        }
        let (rt, c, st) = (self.clone(), consumer.clone(), state.clone());
        tasks.push(tokio::spawn(async move { rt.replay_loop(c, st, stop_rx).await }));
        running.insert(name, Running { consumer, stop, tasks, state });
    }

    /// Stops a consumer and waits for its workers (an unfinished batch is
    /// simply not committed and will be delivered again).
    pub async fn stop(&self, name: &str) -> Option<Arc<dyn Consumer>> {
        let r = lock(&self.running).remove(name)?;
        let _ = r.stop.send(true);
        for t in r.tasks {
            let _ = t.await;
        }
        Some(r.consumer)
    }

    /// Stops every consumer.
    pub async fn stop_all(&self) {
        let names: Vec<String> = lock(&self.running).keys().cloned().collect();
        for n in names {
            self.stop(&n).await;
        }
    }

    /// Names and states of the running consumers.
    pub fn states(&self) -> Vec<(String, ConsumerState)> {
        let mut v: Vec<_> = lock(&self.running).iter().map(|(n, r)| (n.clone(), lock(&r.state).clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The log this runtime reads.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The state store its consumers commit to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Why a running consumer cannot be reset (`None`: it can, or no
    /// consumer of that name runs).
    pub fn refuses_reset(&self, name: &str) -> Option<String> {
        let consumer = lock(&self.running).get(name)?.consumer.clone();
        match consumer.on_reset() {
            OnReset::Refuse(why) => Some(why),
            OnReset::Keep | OnReset::Clear(_) => None,
        }
    }

    /// Moves a consumer to `to` (`earliest`, `latest` or an RFC 3339 time):
    /// stops it, sets every partition's checkpoint (and empties its read
    /// model when it says so, [`Consumer::on_reset`]), records the audit
    /// entry in the same transaction, and starts it again.
    pub async fn reset(self: &Arc<Self>, name: &str, to: &str, audit: &NewAudit) -> Result<ResetDone, RuntimeError> {
        let target = parse_position(to)?;
        if let Some(why) = self.refuses_reset(name) {
            return Err(RuntimeError::NotResettable(why));
        }
        let consumer = self.stop(name).await.ok_or_else(|| RuntimeError::NoSuchConsumer(name.to_owned()))?;
        let clear = match consumer.on_reset() {
            OnReset::Clear(work) => Some(work),
            OnReset::Keep | OnReset::Refuse(_) => None,
        };
        let result = async {
            let mut positions = Vec::new();
            for p in 0..self.log.partitions() {
                let off = match target {
                    Position::Earliest => self.log.start_offset(p),
                    Position::Latest => self.log.next_offset(p),
                    Position::Time(t) => self.first_offset_at(p, t).await?,
                };
                positions.push((p, off));
            }
            self.store.reset_consumer(name, &positions, clear.as_deref(), audit).await?;
            Ok(ResetDone { positions, cleared: clear.is_some() })
        }
        .await;
        self.start(consumer);
        result
    }

    /// First offset of `partition` appended at or after `t` (binary search:
    /// append times grow with offsets).
    async fn first_offset_at(&self, partition: u32, t: DateTime<Utc>) -> Result<u64, RuntimeError> {
        let target = t.timestamp_millis();
        let (mut lo, mut hi) = (self.log.start_offset(partition), self.log.next_offset(partition));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let recs = self.log.read(partition, mid, 1, 1).await?;
            match recs.first() {
                Some(r) if r.timestamp_ms < target => lo = r.offset + 1,
                Some(_) => hi = mid,
                None => break,
            }
        }
        Ok(lo)
    }

    /// Restarts a partition worker whenever it panics.
    async fn supervise(self: Arc<Self>, c: Arc<dyn Consumer>, p: u32, state: Arc<Mutex<ConsumerState>>, stop: watch::Receiver<bool>) {
        loop {
            let (rt, c2, st, stop2) = (self.clone(), c.clone(), state.clone(), stop.clone());
            let worker = tokio::spawn(async move { rt.work(c2, p, st, stop2).await });
            match worker.await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    tracing::error!(consumer = c.name(), partition = p, "consumer worker panicked; restarting from its checkpoint");
                    metrics::counter!("sluice_consumer_restarts_total", "consumer" => metric_label(c.name())).increment(1);
                    {
                        let mut s = lock(&state);
                        s.restarts += 1;
                        s.last_restart_at = Some(Utc::now());
                        s.last_error = Some("worker panicked; restarted".into());
                        s.last_error_workspace = None;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if *stop.borrow() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    async fn work(&self, c: Arc<dyn Consumer>, p: u32, state: Arc<Mutex<ConsumerState>>, mut stop: watch::Receiver<bool>) {
        let name = c.name().to_owned();
        let mut next = loop {
            match self.store.checkpoints(&name).await {
                Ok(cp) => match cp.get(&p) {
                    Some(&o) => break o,
                    None => {
                        let o = match c.start() {
                            Start::Earliest => self.log.start_offset(p),
                            Start::Latest => self.log.next_offset(p),
                        };
                        // Persist the starting point, so a restart does not skip
                        // what arrived meanwhile (Latest) or start elsewhere.
                        let commit = ConsumerCommit { consumer: name.clone(), checkpoint: Some((p, o)), ..Default::default() };
                        match self.commit(&commit, &mut stop).await {
                            Committed::Yes => break o,
                            // Only a checkpoint: the data cannot be refused.
                            Committed::Stopped | Committed::Refused(_) => return,
                        }
                    }
                },
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot read checkpoints; retrying");
                    if wait_or_stop(&mut stop, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        };
        let mut appended = self.log.subscribe();
        let mut bursts = self.bursts.subscribe();
        let lag_gauge = metrics::gauge!("sluice_consumer_lag", "consumer" => metric_label(&name), "partition" => p.to_string());
        // Effects of records processed but not committed yet: when the log
        // keeps delivering, several reads share one commit (see COMMIT_*).
        let mut carry = Carry::new(&name);
        // After a refused commit: what is known about the refused data, and
        // up to where records are processed one per commit.
        let mut care = Care::default();
        // The last wait for appends ended without one: the stream paused.
        let mut paused = false;
        // A burst ended since the last commit: commit once caught up.
        let mut burst_ended = false;
        // Held while the carry holds effects kept during a burst, until they
        // are committed: background work waits for it (`Bursts::busy`).
        let mut settling: Option<sluice_core::BurstGuard> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            if !name.starts_with("webhook:") {
                // Webhooks share one label value: their lags are in
                // `GET /v1/consumers`, not summed into one gauge.
                lag_gauge.set(self.log.next_offset(p).saturating_sub(next) as f64);
            }
            let max_records = if care.until.is_some() { 1 } else { self.batch };
            let records = match self.log.read(p, next, max_records, READ_BYTES).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(consumer = %name, partition = p, error = %e, "cannot read the log");
                    if wait_or_stop(&mut stop, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            if let Some(first) = records.first() {
                if first.offset > next {
                    // Retention deleted records this consumer had not processed.
                    tracing::warn!(consumer = %name, partition = p, skipped = first.offset - next, from = next,
                        "records removed by log retention before this consumer processed them");
                    metrics::counter!("sluice_consumer_skipped_total", "consumer" => metric_label(&name)).increment(first.offset - next);
                }
            }
            if records.is_empty() {
                // Caught up: commit what is carried before waiting — unless a
                // stream is flowing (a large, young carry, and appends came
                // within COMMIT_PAUSE): then wait for more appends until the
                // carry is the commit interval old, so a stream that arrives
                // a little slower than it is consumed still shares commits.
                // A trickle, or the end of a stream, commits at once. While a
                // producer of this process announced a burst (`Bursts`), the
                // carry is held whatever the pauses, until the burst ends.
                let pending = !carry.is_empty();
                let in_burst = *bursts.borrow_and_update() > 0;
                let interval = commit_interval(in_burst);
                let young = carry.since.elapsed() < interval;
                let hold = pending && young && !burst_ended && (in_burst || (!paused && carry.events >= COMMIT_HOLD_EVENTS));
                if pending && !hold {
                    match self.commit_carry(&name, p, &mut carry, &mut care, &mut next, &mut stop).await {
                        CarryCommitted::Yes => {
                            burst_ended = false;
                            settling = None;
                        }
                        CarryCommitted::Stopped => return,
                        CarryCommitted::Refused => continue,
                    }
                }
                let wait = match (hold, in_burst) {
                    (true, true) => interval.saturating_sub(carry.since.elapsed()),
                    (true, false) => interval.saturating_sub(carry.since.elapsed()).min(COMMIT_PAUSE),
                    (false, _) => Duration::from_secs(1),
                };
                paused = tokio::select! {
                    _ = appended.changed() => false,
                    _ = stop.changed() => false,
                    _ = bursts.changed(), if in_burst => {
                        // Its last records were appended before it ended: read
                        // them, then commit without waiting for more.
                        burst_ended = *bursts.borrow() == 0;
                        false
                    }
                    _ = tokio::time::sleep(wait) => hold,
                };
                continue;
            }
            paused = false;
            if carry.is_empty() {
                // The carry's age counts from its first record, not from
                // the idle time before it.
                carry.since = std::time::Instant::now();
                carry.from = next;
            }
            let read_end = records.last().map_or(next, |r| r.offset + 1);
            match self.process(&c, p, records, &state, &mut stop, &mut carry, &care).await {
                Processed::Next(n) => next = n,
                Processed::Stopped => return,
                Processed::Refused(e) => {
                    next = care.refused(&name, p, e, &mut carry, read_end);
                    // A store that keeps refusing is not hammered.
                    if wait_or_stop(&mut stop, REFUSED_PAUSE).await {
                        return;
                    }
                    continue;
                }
            }
            if settling.is_none() && !carry.is_empty() && *bursts.borrow() > 0 {
                settling = Some(self.bursts.settle());
            }
            let interval = commit_interval(*bursts.borrow() > 0);
            if care.until.is_some() || carry.events >= COMMIT_EVENTS || carry.since.elapsed() >= interval || carry.entries() >= COMMIT_ENTRIES {
                match self.commit_carry(&name, p, &mut carry, &mut care, &mut next, &mut stop).await {
                    CarryCommitted::Yes => settling = None,
                    CarryCommitted::Stopped => return,
                    CarryCommitted::Refused => {}
                }
            }
        }
    }

    /// Commits the carry, which covers the records up to `next`. Committed:
    /// a new, empty carry. Refused by the store because of its data: `care`
    /// learns why, `next` goes back to the carry's first record (to be
    /// processed again), after a short pause.
    async fn commit_carry(
        &self,
        name: &str,
        p: u32,
        carry: &mut Carry,
        care: &mut Care,
        next: &mut u64,
        stop: &mut watch::Receiver<bool>,
    ) -> CarryCommitted {
        match self.commit(&carry.commit, stop).await {
            Committed::Yes => {
                care.committed(*next);
                *carry = Carry::new(name);
                CarryCommitted::Yes
            }
            Committed::Stopped => CarryCommitted::Stopped,
            Committed::Refused(e) => {
                *next = care.refused(name, p, e, carry, *next);
                // A store that keeps refusing is not hammered.
                if wait_or_stop(stop, REFUSED_PAUSE).await {
                    return CarryCommitted::Stopped;
                }
                CarryCommitted::Refused
            }
        }
    }

    /// Processes a batch; returns the new checkpoint, `Stopped` if stopped
    /// before finishing (the rest will be delivered again), or `Refused`
    /// when the store refused a commit of the carry because of its data.
    #[allow(clippy::too_many_arguments)]
    async fn process(
        &self,
        c: &Arc<dyn Consumer>,
        p: u32,
        records: Vec<Record>,
        state: &Arc<Mutex<ConsumerState>>,
        stop: &mut watch::Receiver<bool>,
        carry: &mut Carry,
        care: &Care,
    ) -> Processed {
        let name = c.name().to_owned();
        let Some(mut next) = records.first().map(|r| r.offset) else {
            return Processed::Stopped;
        };
        let mut pending = std::mem::replace(&mut carry.commit, ConsumerCommit { consumer: name.clone(), ..Default::default() });
        let mut folder = std::mem::take(&mut carry.folder);
        let mut n_events = 0usize;
        let mut dead = DeadLog::default();
        for r in records {
            if *stop.borrow() {
                // Stop between records: the uncommitted rest is delivered again.
                return Processed::Stopped;
            }
            let first = Attempt { n: 1, last: self.policy.attempts <= 1, partition: p, offset: r.offset };
            let events = match self.recent.decode(&r) {
                Ok(DecodedRecord::Event(e)) => vec![e],
                Ok(DecodedRecord::Batch(batch)) => {
                    if care.forced.is_none() {
                        if let Some(Ok(effect)) = call_batch(c, &batch, first).await {
                            // All or nothing: a batch whose usage overflows
                            // (or adds to a refused bucket) is handled event
                            // by event, so that only the failing events fail.
                            if care.refusal(&effect).is_none() && push_effect(&mut pending, &mut folder, effect).is_ok() {
                                n_events += batch.rows.len();
                                next = r.offset + 1;
                                continue;
                            }
                        }
                    }
                    batch.events().collect()
                }
                Err(e) => {
                    // Never skipped silently: logged, counted, and a dead
                    // letter of no workspace (the record names none).
                    sluice_core::undecodable(&name, p, r.offset, &e);
                    let now = Utc::now();
                    pending.dead_letters.push(NewDeadLetter {
                        consumer: name.clone(),
                        workspace: String::new(),
                        event_id: format!("record:{p}:{}", r.offset),
                        event_type: String::new(),
                        partition: p,
                        offset: r.offset,
                        error: format!("the log record cannot be decoded: {e}"),
                        attempts: 1,
                        first_failed_at: now,
                        last_failed_at: now,
                    });
                    next = r.offset + 1;
                    continue;
                }
            };
            n_events += events.len();
            // The effects of one record commit together with the checkpoint
            // past it: a batch record is never half applied.
            let mut record = ConsumerCommit { consumer: name.clone(), ..Default::default() };
            let mut record_folder = Folder::default();
            let mut released = false;
            // Each event's usage, kept until the record joins the carry: if
            // the record's usage overflows what the carry holds, its events
            // join one by one and only the overflowing ones fail.
            let mut usages: Vec<(usize, Effect)> = Vec::new();
            for (index, event) in events.iter().enumerate() {
                if *stop.borrow() {
                    return Processed::Stopped;
                }
                let outcome = match &care.forced {
                    Some(why) => Err(HandleError::Permanent(why.clone())),
                    None => call(c, event, first).await,
                };
                let outcome = match outcome {
                    Ok(effect) => care.refusal(&effect).map_or(Ok(effect), |why| Err(HandleError::Permanent(why))),
                    other => other,
                };
                let failed = match outcome {
                    Ok(effect) => {
                        if let Effect::Usage(u) = &effect {
                            usages.push((index, Effect::Usage(u.clone())));
                        }
                        push_effect(&mut record, &mut record_folder, effect).err().map(|o| (o.to_string(), Utc::now(), 1))
                    }
                    Err(HandleError::Permanent(why)) => Some((why, Utc::now(), 1)),
                    Err(HandleError::Transient(err)) => {
                        // Commit the records before this one, then retry this event alone.
                        if !released {
                            pending.checkpoint = Some((p, r.offset));
                            match self.commit(&pending, stop).await {
                                Committed::Yes => carry.from = r.offset,
                                Committed::Stopped => return Processed::Stopped,
                                Committed::Refused(e) => return Processed::Refused(e),
                            }
                            pending = ConsumerCommit { consumer: name.clone(), ..Default::default() };
                            folder = Folder::default();
                            released = true;
                        }
                        let outcome = match self.retry(c, event, (p, r.offset), err, state, stop).await {
                            None => return Processed::Stopped,
                            Some(o) => o,
                        };
                        lock(state).status = ConsumerStatus::Running;
                        let outcome = match outcome {
                            Ok(effect) => match care.refusal(&effect) {
                                Some(why) => Err((why, Utc::now(), 1)),
                                None => Ok(effect),
                            },
                            failed => failed,
                        };
                        match outcome {
                            Ok(effect) => {
                                if let Effect::Usage(u) = &effect {
                                    usages.push((index, Effect::Usage(u.clone())));
                                }
                                push_effect(&mut record, &mut record_folder, effect).err().map(|o| (o.to_string(), Utc::now(), 1))
                            }
                            Err(failed) => Some(failed),
                        }
                    }
                };
                if let Some((error, first_failed_at, attempts)) = failed {
                    usages.retain(|(i, _)| *i != index);
                    dead.note(event, &error);
                    record.dead_letters.push(dead_letter(&name, state, event, (p, r.offset), error, first_failed_at, attempts));
                }
            }
            if released {
                // After a retry, this record commits on its own.
                record.checkpoint = Some((p, r.offset + 1));
                match self.commit(&record, stop).await {
                    Committed::Yes => carry.from = r.offset + 1,
                    Committed::Stopped => return Processed::Stopped,
                    Committed::Refused(e) => return Processed::Refused(e),
                }
            } else if let Err(mut record) = absorb(&mut pending, &mut folder, record) {
                // The record's usage overflows what the carry holds: its
                // events join the carry one by one, and those whose usage
                // would overflow go to the dead letters.
                record.usage.clear();
                for (index, effect) in usages {
                    if let Err(overflow) = push_effect(&mut pending, &mut folder, effect) {
                        let event = &events[index];
                        let error = overflow.to_string();
                        dead.note(event, &error);
                        record.dead_letters.push(dead_letter(&name, state, event, (p, r.offset), error, Utc::now(), 1));
                    }
                }
                if absorb(&mut pending, &mut folder, *record).is_err() {
                    unreachable!("a record without usage always joins the carry");
                }
            }
            next = r.offset + 1;
        }
        dead.flush(&name, p);
        // Carried to the caller, which commits it (with more) soon.
        pending.checkpoint = Some((p, next));
        carry.commit = pending;
        carry.folder = folder;
        carry.events += n_events;
        metrics::counter!("sluice_consumer_events_total", "consumer" => metric_label(&name)).increment(n_events as u64);
        Processed::Next(next)
    }

    /// Attempts 2..=attempts of an event that failed transiently.
    /// `Some(Ok(effect))` on success, `Some(Err((last error, first failure,
    /// attempts made)))` when exhausted or when an attempt failed
    /// permanently, `None` when stopped.
    async fn retry(
        &self,
        c: &Arc<dyn Consumer>,
        event: &Event,
        (partition, offset): (u32, u64),
        first_error: String,
        state: &Arc<Mutex<ConsumerState>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Result<Effect, (String, DateTime<Utc>, u32)>> {
        let first_failed_at = Utc::now();
        let mut error = first_error;
        for n in 2..=self.policy.attempts {
            {
                let mut s = lock(state);
                s.status = ConsumerStatus::Retrying;
                s.last_error = Some(error.clone());
                s.last_error_workspace = Some(event.workspace.to_string());
            }
            if wait_or_stop(stop, self.policy.delay(n - 1)).await {
                return None;
            }
            match call(c, event, Attempt { n, last: n == self.policy.attempts, partition, offset }).await {
                Ok(effect) => return Some(Ok(effect)),
                Err(HandleError::Permanent(e)) => return Some(Err((e, first_failed_at, n))),
                Err(HandleError::Transient(e)) => error = e,
            }
        }
        lock(state).last_error = Some(error.clone());
        Some(Err((error, first_failed_at, self.policy.attempts)))
    }

    /// Commits, retrying store failures until it works or the consumer is
    /// stopped; a failure caused by the data ([`StoreError::is_permanent`])
    /// is not retried but returned.
    async fn commit(&self, c: &ConsumerCommit, stop: &mut watch::Receiver<bool>) -> Committed {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut failures = 0;
        loop {
            match self.store.commit_consumer(c).await {
                Ok(()) => return Committed::Yes,
                Err(e) if e.is_permanent() => {
                    tracing::warn!(consumer = %c.consumer, error = %e, "the store refused a commit because of its data; processing its records again to find the events");
                    return Committed::Refused(e);
                }
                Err(e) => {
                    tracing::warn!(consumer = %c.consumer, error = %e, "consumer commit failed; retrying");
                    failures += 1;
                    if wait_or_stop(stop, backoff.delay(failures)).await {
                        return Committed::Stopped;
                    }
                }
            }
        }
    }

    /// Processes dead letters claimed for replay, through this consumer only.
    async fn replay_loop(self: Arc<Self>, c: Arc<dyn Consumer>, state: Arc<Mutex<ConsumerState>>, mut stop: watch::Receiver<bool>) {
        let name = c.name().to_owned();
        loop {
            if wait_or_stop(&mut stop, Duration::from_millis(250)).await {
                return;
            }
            let claimed = match self.store.replays_for(&name, 100).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot list replays");
                    continue;
                }
            };
            for d in claimed {
                let event = sluice_core::fetch_event(self.log.as_ref(), &name, d.partition, d.offset, &d.event_id).await.ok().flatten();
                let Some(event) = event else {
                    let _ = self.store.replay_failed(&d.id, "the event is no longer in the log (retention)", 0).await;
                    continue;
                };
                let first = call(&c, &event, Attempt { n: 1, last: self.policy.attempts <= 1, partition: d.partition, offset: d.offset }).await;
                let outcome = match first {
                    Ok(effect) => Some(Ok(effect)),
                    Err(HandleError::Permanent(e)) => Some(Err((e, Utc::now(), 1))),
                    Err(HandleError::Transient(e)) => self.retry(&c, &event, (d.partition, d.offset), e, &state, &mut stop).await,
                };
                let outcome = match outcome {
                    None => return,
                    Some(Ok(effect)) => {
                        let mut commit = ConsumerCommit { consumer: name.clone(), replayed: vec![d.id.clone()], ..Default::default() };
                        match push_effect(&mut commit, &mut Folder::default(), effect) {
                            Err(overflow) => Err((overflow.to_string(), 1)),
                            Ok(()) => match self.commit(&commit, &mut stop).await {
                                Committed::Yes => {
                                    tracing::info!(consumer = %name, dead_letter = %d.id, "replayed");
                                    Ok(())
                                }
                                Committed::Stopped => return,
                                Committed::Refused(e) => Err((public_reason(&e), 1)),
                            },
                        }
                    }
                    Some(Err((error, _, attempts))) => Err((error, attempts)),
                };
                if let Err((error, attempts)) = outcome {
                    let _ = self.store.replay_failed(&d.id, &error, attempts).await;
                }
                lock(&state).status = ConsumerStatus::Running;
            }
        }
    }
}

/// Most log bytes a worker reads at a time. Every worker of every consumer
/// holds up to this much: 1 MiB is thousands of JSON events, or about two
/// batch records of an import (32,768 rows).
const READ_BYTES: usize = 1 << 20;
/// A carried commit is written once it holds this many events…
const COMMIT_EVENTS: usize = 1_000_000;
/// …or is this old, or the consumer caught up with the log and the stream
/// paused. Under a burst (a CSV import) this turns hundreds of small
/// commits, each rewriting the same usage buckets and counts, into a few
/// large ones: with short intervals a large import rewrites each of its
/// usage buckets again and again, and those commits make a large share of
/// the import's memory allocations (measured: docs/BENCHMARKS.md, "CSV usage
/// import").
///
/// 5 s, not 1 s: a large import touches thousands of usage buckets every
/// second and each commit reads and rewrites all of them, so shorter
/// intervals spend the state store's thread on rewriting the same buckets
/// (measured: docs/BENCHMARKS.md, "CSV usage import"). Usage lags a stream
/// by at most this long.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// Outside bursts, a carry is committed once it is this old: usage and
/// counts lag a steady stream by at most about this long (a workspace's
/// usage must not wait seconds behind another workspace's stream).
const STREAM_COMMIT_INTERVAL: Duration = Duration::from_millis(250);
/// …or carries this many usage buckets and count keys (folded): what a
/// commit writes, and what the carry holds in memory (~250 bytes each), is
/// bounded by this, whatever the interval. A stream that touches few
/// buckets (they fold) commits on time; one that touches new buckets all
/// the time commits every 16,384 of them. Effects are folded as they are
/// added (`sluice_store::Folder`: one hash lookup each), so the count is
/// exact.
const COMMIT_ENTRIES: usize = 16_384;
/// A carry at least this large is held when the consumer catches up (the
/// log is being appended in a stream), until it is COMMIT_INTERVAL old…
const COMMIT_HOLD_EVENTS: usize = 1_000;
/// …or no append came for this long (the stream paused or ended: commit
/// now rather than at COMMIT_INTERVAL).
const COMMIT_PAUSE: Duration = Duration::from_millis(50);

/// Effects processed but not committed yet.
struct Carry {
    /// The first offset of the records whose effects are carried (what is
    /// processed again when the store refuses the commit).
    from: u64,
    commit: ConsumerCommit,
    /// Folds what is added to `commit`.
    folder: Folder,
    events: usize,
    since: std::time::Instant,
}

impl Carry {
    fn new(consumer: &str) -> Carry {
        Carry {
            from: 0,
            commit: ConsumerCommit { consumer: consumer.to_owned(), ..Default::default() },
            folder: Folder::default(),
            events: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Usage buckets and count keys carried (folded).
    fn entries(&self) -> usize {
        self.commit.usage.len() + self.commit.counts.len() + self.commit.model.as_ref().map_or(0, |m| m.entries())
    }

    /// Nothing processed since the last commit.
    fn is_empty(&self) -> bool {
        self.events == 0 && self.commit.checkpoint.is_none()
    }
}

/// The dead letters of one read, logged as one line.
#[derive(Default)]
struct DeadLog {
    n: usize,
    workspaces: std::collections::BTreeSet<String>,
    first: Option<(String, String)>,
}

impl DeadLog {
    fn note(&mut self, event: &Event, error: &str) {
        self.n += 1;
        if self.workspaces.len() < 8 {
            self.workspaces.insert(event.workspace.to_string());
        }
        self.first.get_or_insert_with(|| (event.id.to_string(), error.to_owned()));
    }

    fn flush(&mut self, consumer: &str, partition: u32) {
        if let Some((event, error)) = self.first.take() {
            let workspaces: Vec<&str> = self.workspaces.iter().map(String::as_str).collect();
            tracing::warn!(consumer, partition, dead_lettered = self.n, workspaces = ?workspaces, first_event = %event, first_error = %error,
                "events dead-lettered (GET /v1/dlq lists them with their reasons)");
        }
        *self = DeadLog::default();
    }
}

/// A dead letter for `event` at `(partition, offset)`, logged and counted.
fn dead_letter(
    consumer: &str,
    state: &Arc<Mutex<ConsumerState>>,
    event: &Event,
    (partition, offset): (u32, u64),
    error: String,
    first_failed_at: DateTime<Utc>,
    attempts: u32,
) -> NewDeadLetter {
    // One line per event at DEBUG; `process` logs one WARN line per read
    // (a hostile workspace's thousands of bad events must not flood the log).
    tracing::debug!(consumer, workspace = %event.workspace, event = %event.id, error = %error, attempts, "event dead-lettered");
    metrics::counter!("sluice_consumer_dead_letters_total", "consumer" => metric_label(consumer)).increment(1);
    sluice_core::activity::record(event.workspace.as_str(), sluice_core::activity::Activity::DeadLettered, 1);
    {
        let mut s = lock(state);
        s.dead_lettered += 1;
        s.last_error = Some(error.clone());
        s.last_error_workspace = Some(event.workspace.to_string());
    }
    NewDeadLetter {
        consumer: consumer.to_owned(),
        workspace: event.workspace.to_string(),
        event_id: event.id.to_string(),
        event_type: event.event_type.to_string(),
        partition,
        offset,
        error,
        attempts,
        first_failed_at,
        last_failed_at: Utc::now(),
    }
}

/// Calls the consumer; a panic in it is a permanent failure of that event
/// (it would panic again): the event goes to the dead letters, the worker
/// goes on.
async fn call(c: &Arc<dyn Consumer>, event: &Event, attempt: Attempt) -> Result<Effect, HandleError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(c.handle(event, attempt)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            metrics::counter!("sluice_consumer_panics_total", "consumer" => metric_label(c.name())).increment(1);
            Err(HandleError::Permanent(format!("consumer panicked: {msg}")))
        }
    }
}

/// Calls the batch fast path; a panic is an `Err` (the runtime then falls
/// back to the events one by one).
async fn call_batch(c: &Arc<dyn Consumer>, batch: &EventBatch, attempt: Attempt) -> Option<Result<Effect, HandleError>> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(c.handle_batch(batch, attempt)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => Some(Err(HandleError::Permanent("consumer panicked on a batch".into()))),
    }
}

/// Adds an effect to `commit` through its folder: memory stays bounded by
/// the buckets and keys touched, not by the events carried. All or nothing:
/// usage that would overflow leaves the commit as it was.
fn push_effect(commit: &mut ConsumerCommit, folder: &mut Folder, effect: Effect) -> Result<(), UsageOverflow> {
    match effect {
        Effect::None => {}
        Effect::Count(k) => folder.add_counts(commit, [(k, 1)]),
        Effect::Counts(v) => folder.add_counts(commit, v),
        Effect::Usage(u) => folder.add_usage(commit, u)?,
        Effect::Model(m) => merge_model(commit, m),
    }
    Ok(())
}

/// Adds a read model's effect to what `commit` carries.
fn merge_model(commit: &mut ConsumerCommit, m: Box<dyn ModelEffect>) {
    match &mut commit.model {
        Some(carried) => carried.merge(m),
        None => commit.model = Some(m),
    }
}

/// Moves the effects of `from` into `into` (through `into`'s folder; not
/// `from`'s checkpoint). When its usage would overflow what `into` holds,
/// nothing is moved and `from` comes back.
fn absorb(into: &mut ConsumerCommit, folder: &mut Folder, mut from: ConsumerCommit) -> Result<(), Box<ConsumerCommit>> {
    let usage = std::mem::take(&mut from.usage);
    if folder.add_usage(into, usage.iter().cloned()).is_err() {
        from.usage = usage;
        return Err(Box::new(from));
    }
    folder.add_counts(into, from.counts);
    if let Some(m) = from.model {
        merge_model(into, m);
    }
    into.dead_letters.extend(from.dead_letters);
    into.replayed.extend(from.replayed);
    Ok(())
}

/// How long a carry may wait for more records before it is committed:
/// [`COMMIT_INTERVAL`] during a burst (an import), [`STREAM_COMMIT_INTERVAL`]
/// otherwise.
fn commit_interval(in_burst: bool) -> Duration {
    if in_burst {
        COMMIT_INTERVAL
    } else {
        STREAM_COMMIT_INTERVAL
    }
}

/// The `consumer` label of a metric: one value for every webhook (their
/// names carry webhook ids, which must not appear in `/metrics`).
pub fn metric_label(name: &str) -> String {
    if name.starts_with("webhook:") {
        "webhook".to_owned()
    } else {
        name.to_owned()
    }
}

/// What processing a read of records came to.
enum Processed {
    /// Processed up to this offset (carried, not committed yet).
    Next(u64),
    /// The consumer was stopped.
    Stopped,
    /// The store refused a commit because of its data.
    Refused(StoreError),
}

/// What committing the carry came to.
enum CarryCommitted {
    /// Committed; the carry is empty.
    Yes,
    /// The consumer was stopped.
    Stopped,
    /// Refused: the carried records are to be processed again.
    Refused,
}

/// What a commit came to.
enum Committed {
    Yes,
    Stopped,
    Refused(StoreError),
}

/// What a worker knows after the store refused a commit of its data, while
/// it processes those records again.
#[derive(Default)]
struct Care {
    /// Records before this offset are processed and committed one at a
    /// time (`None`: normal carrying).
    until: Option<u64>,
    /// Buckets whose usage would overflow, with the reason: events that add
    /// to them go to the dead letters.
    overflowing: HashMap<UsageBucketKey, String>,
    /// The store refused the one record being processed for another reason:
    /// its events go to the dead letters with this reason.
    forced: Option<String>,
    /// Refusals in a row of the same record without anything new learned.
    stuck: u32,
    /// The end of the records refused commits covered.
    refused_up_to: Option<u64>,
}

/// How long a worker waits after the store refused a commit before it
/// processes the records again: a store that keeps refusing is not
/// hammered.
const REFUSED_PAUSE: Duration = Duration::from_millis(20);

impl Care {
    /// The store refused the commit of the carried records (from
    /// `carry.from` up to `to`): learn what it said, drop the carry, and
    /// return where to process again.
    fn refused(&mut self, consumer: &str, p: u32, e: StoreError, carry: &mut Carry, to: u64) -> u64 {
        let from = carry.from;
        *carry = Carry::new(consumer);
        self.refused_up_to = Some(self.refused_up_to.unwrap_or(0).max(to));
        metrics::counter!("sluice_consumer_refused_commits_total", "consumer" => metric_label(consumer)).increment(1);
        let careful_already = self.until.is_some();
        match e {
            StoreError::UsageOverflow(list) => {
                // The buckets are known: the records are processed again as
                // usual, and the events that add to them are dead-lettered.
                let before = self.overflowing.len();
                for o in list {
                    self.overflowing.entry((*o.bucket).clone()).or_insert_with(|| o.to_string());
                }
                if self.overflowing.len() == before {
                    // Refused again with nothing new learned: go on one
                    // record per commit (a refusal then names one record).
                    self.stuck += 1;
                    self.until = Some(self.until.unwrap_or(0).max(to));
                }
            }
            other => {
                self.until = Some(self.until.unwrap_or(0).max(to));
                if careful_already {
                    // One record, refused: its events are the cause.
                    self.forced = Some(format!("the state store cannot take this event's effects: {}", public_reason(&other)));
                }
                self.stuck += u32::from(careful_already);
            }
        }
        // Forcing dead-letters the events of the one record being processed:
        // only while records are processed one per commit.
        if self.stuck > 2 && self.until.is_some() {
            self.forced.get_or_insert_with(|| "the state store keeps refusing this event's effects".into());
        }
        tracing::warn!(consumer, partition = p, from, to, "processing refused records again");
        from
    }

    /// A commit went through, up to `next`.
    fn committed(&mut self, next: u64) {
        self.forced = None;
        self.stuck = 0;
        if self.until.is_some_and(|u| next >= u) {
            self.until = None;
        }
        // The overflowing buckets are kept while the refused records are
        // processed again, then forgotten (later events to them are
        // checked by the store again).
        if self.until.is_none() && self.refused_up_to.is_none_or(|u| next >= u) {
            self.overflowing.clear();
            self.refused_up_to = None;
        }
    }

    /// Why `effect` must not be applied (it adds to an overflowing bucket).
    fn refusal(&self, effect: &Effect) -> Option<String> {
        if self.overflowing.is_empty() {
            return None;
        }
        let Effect::Usage(v) = effect else { return None };
        v.iter().find_map(|d| self.overflowing.get(&d.bucket_key()).cloned())
    }
}

/// A store error as a dead letter may show it (no database internals).
fn public_reason(e: &StoreError) -> String {
    match e {
        StoreError::Database(sqlx_err) => match sqlx_err.as_database_error() {
            Some(db) => format!("the database refused a value ({})", db.code().unwrap_or_default()),
            None => "the database refused a value".into(),
        },
        other => other.to_string(),
    }
}

/// Sleeps `d`; true if the consumer was stopped meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

enum Position {
    Earliest,
    Latest,
    Time(DateTime<Utc>),
}

fn parse_position(to: &str) -> Result<Position, RuntimeError> {
    match to {
        "earliest" => Ok(Position::Earliest),
        "latest" => Ok(Position::Latest),
        t => DateTime::parse_from_rfc3339(t).map(|t| Position::Time(t.with_timezone(&Utc))).map_err(|_| RuntimeError::BadPosition),
    }
}
