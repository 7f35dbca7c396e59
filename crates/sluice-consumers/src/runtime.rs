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
//! When an event fails, the effects before it are committed, then the event
//! is retried with exponential backoff and full jitter; after
//! [`RetryPolicy::attempts`] failures it is committed as a dead letter
//! together with the checkpoint past it, and the worker moves on: no
//! head-of-line stall. An operator replays a dead letter (it goes through
//! this consumer only, and its effects commit with its status change, so a
//! replay applies once) or discards it.
//!
//! A consumer that panics while handling an event has failed that attempt
//! (the panic is caught and retried like an error, then dead-lettered); a
//! worker that panics anywhere else is restarted from its last checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sluice_core::{Bursts, Event, EventBatch, EventLog, Payload, Record};
use sluice_store::{ConsumerCommit, CountKey, Folder, NewAudit, NewDeadLetter, Store};
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
    /// `max`, with full jitter in its upper half.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << (n.saturating_sub(1)).min(20));
        let d = exp.min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
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

/// What handling one event produced, to be committed with the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing to write (filtered out, or an external effect already done).
    None,
    /// Count the event in the event_counts read model.
    Count(CountKey),
    /// Several counts at once (a batch): key and how many.
    Counts(Vec<(CountKey, i64)>),
    /// Add usage to meters.
    Usage(Vec<sluice_store::UsageDelta>),
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
    /// Handles one event. An `Err` is a failed attempt and is retried.
    async fn handle(&self, event: &Event, attempt: Attempt) -> Result<Effect, String>;

    /// Handles every event of a batch record at once: a fast path for
    /// consumers that can work on a batch's rows without expanding them into
    /// events. `None` (the default) means "not supported": the runtime calls
    /// [`Consumer::handle`] for each event. An `Err` (or a panic) makes the
    /// runtime fall back to `handle` per event, so that a failing event is
    /// retried and dead-lettered alone. The effect must equal the sum of the
    /// per-event effects.
    async fn handle_batch(&self, _batch: &EventBatch, _attempt: Attempt) -> Option<Result<Effect, String>> {
        None
    }
}

/// Observable state of a consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerState {
    /// `running`, `retrying` (an event is failing and being retried) or `stopped`.
    pub status: String,
    /// The most recent error, if any.
    pub last_error: Option<String>,
    /// Times a worker panicked and was restarted.
    pub restarts: u64,
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
/// same appends), and decoding is a large part of a consumer's work per row
/// (a tenth of an import's CPU for two consumers). The first to read a
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

    fn decode(&self, r: &Record) -> Result<DecodedRecord, String> {
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
    /// State store failure.
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    /// Log failure.
    #[error(transparent)]
    Log(#[from] sluice_core::LogError),
}

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
        let state = Arc::new(Mutex::new(ConsumerState { status: "running".into(), ..Default::default() }));
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

    /// Moves a consumer to `to` (`earliest`, `latest` or an RFC 3339 time):
    /// stops it, sets every partition's checkpoint (clearing its read model
    /// when `clear_counts`), records the audit entry in the same transaction,
    /// and starts it again.
    pub async fn reset(self: &Arc<Self>, name: &str, to: &str, clear_counts: bool, audit: &NewAudit) -> Result<Vec<(u32, u64)>, RuntimeError> {
        let target = parse_position(to)?;
        let consumer = self.stop(name).await.ok_or_else(|| RuntimeError::NoSuchConsumer(name.to_owned()))?;
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
            self.store.reset_consumer(name, &positions, clear_counts, audit).await?;
            Ok(positions)
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
                    metrics::counter!("sluice_consumer_restarts_total", "consumer" => c.name().to_owned()).increment(1);
                    {
                        let mut s = lock(&state);
                        s.restarts += 1;
                        s.last_error = Some("worker panicked; restarted".into());
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
                        if self.commit(&commit, &mut stop).await {
                            break o;
                        }
                        return;
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
        let lag_gauge = metrics::gauge!("sluice_consumer_lag", "consumer" => name.clone(), "partition" => p.to_string());
        // Effects of records processed but not committed yet: when the log
        // keeps delivering, several reads share one commit (see COMMIT_*).
        let mut carry = Carry::new(&name);
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
            lag_gauge.set(self.log.next_offset(p).saturating_sub(next) as f64);
            let records = match self.log.read(p, next, self.batch, READ_BYTES).await {
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
                    metrics::counter!("sluice_consumer_skipped_total", "consumer" => name.clone()).increment(first.offset - next);
                }
            }
            if records.is_empty() {
                // Caught up: commit what is carried before waiting — unless a
                // stream is flowing (a large, young carry, and appends came
                // within COMMIT_PAUSE): then wait for more appends until the
                // carry is COMMIT_INTERVAL old, so a stream that arrives a
                // little slower than it is consumed still shares commits.
                // A trickle, or the end of a stream, commits at once. While a
                // producer of this process announced a burst (`Bursts`), the
                // carry is held whatever the pauses, until the burst ends.
                let pending = !carry.is_empty();
                let in_burst = *bursts.borrow_and_update() > 0;
                let young = carry.since.elapsed() < COMMIT_INTERVAL;
                let hold = pending && young && !burst_ended && (in_burst || (!paused && carry.events >= COMMIT_HOLD_EVENTS));
                if pending && !hold {
                    if !self.commit(&carry.commit, &mut stop).await {
                        return;
                    }
                    carry = Carry::new(&name);
                    burst_ended = false;
                    settling = None;
                }
                let wait = match (hold, in_burst) {
                    (true, true) => COMMIT_INTERVAL.saturating_sub(carry.since.elapsed()),
                    (true, false) => COMMIT_INTERVAL.saturating_sub(carry.since.elapsed()).min(COMMIT_PAUSE),
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
            }
            match self.process(&c, p, records, &state, &mut stop, &mut carry).await {
                Some(n) => next = n,
                None => return, // stopped
            }
            if settling.is_none() && !carry.is_empty() && *bursts.borrow() > 0 {
                settling = Some(self.bursts.settle());
            }
            if carry.events >= COMMIT_EVENTS || carry.since.elapsed() >= COMMIT_INTERVAL || carry.entries() >= COMMIT_ENTRIES {
                if !self.commit(&carry.commit, &mut stop).await {
                    return;
                }
                carry = Carry::new(&name);
                settling = None;
            }
        }
    }

    /// Processes a batch; returns the new checkpoint, or None if stopped
    /// before finishing (the rest will be delivered again).
    async fn process(
        &self,
        c: &Arc<dyn Consumer>,
        p: u32,
        records: Vec<Record>,
        state: &Arc<Mutex<ConsumerState>>,
        stop: &mut watch::Receiver<bool>,
        carry: &mut Carry,
    ) -> Option<u64> {
        let name = c.name().to_owned();
        let mut pending = std::mem::replace(&mut carry.commit, ConsumerCommit { consumer: name.clone(), ..Default::default() });
        let mut folder = std::mem::take(&mut carry.folder);
        let mut next = records.first().map(|r| r.offset)?;
        let mut n_events = 0usize;
        for r in records {
            if *stop.borrow() {
                // Stop between records: the uncommitted rest is delivered again.
                return None;
            }
            let first = Attempt { n: 1, last: self.policy.attempts <= 1, partition: p, offset: r.offset };
            let events = match self.recent.decode(&r) {
                Ok(DecodedRecord::Event(e)) => vec![e],
                Ok(DecodedRecord::Batch(batch)) => {
                    if let Some(Ok(effect)) = call_batch(c, &batch, first).await {
                        n_events += batch.rows.len();
                        push_effect(&mut pending, &mut folder, effect);
                        next = r.offset + 1;
                        continue;
                    }
                    batch.events().collect()
                }
                Err(e) => {
                    tracing::error!(consumer = %name, partition = p, offset = r.offset, error = %e, "log record is not an event; skipped");
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
            for event in &events {
                if *stop.borrow() {
                    return None;
                }
                match call(c, event, first).await {
                    Ok(effect) => push_effect(&mut record, &mut record_folder, effect),
                    Err(err) => {
                        // Commit the records before this one, then retry this event alone.
                        if !released {
                            pending.checkpoint = Some((p, r.offset));
                            if !self.commit(&pending, stop).await {
                                return None;
                            }
                            pending = ConsumerCommit { consumer: name.clone(), ..Default::default() };
                            folder = Folder::default();
                            released = true;
                        }
                        match self.retry(c, event, (p, r.offset), err, state, stop).await? {
                            Ok(effect) => push_effect(&mut record, &mut record_folder, effect),
                            Err((error, first_failed_at)) => {
                                tracing::warn!(consumer = %name, event = %event.id, error = %error, "event dead-lettered after {} attempts", self.policy.attempts);
                                metrics::counter!("sluice_consumer_dead_letters_total", "consumer" => name.clone()).increment(1);
                                record.dead_letters.push(NewDeadLetter {
                                    consumer: name.clone(),
                                    workspace: event.workspace.to_string(),
                                    event_id: event.id.to_string(),
                                    event_type: event.event_type.to_string(),
                                    partition: p,
                                    offset: r.offset,
                                    error,
                                    attempts: self.policy.attempts,
                                    first_failed_at,
                                    last_failed_at: Utc::now(),
                                });
                            }
                        }
                        lock(state).status = "running".into();
                    }
                }
            }
            if released {
                // After a retry, this record commits on its own.
                record.checkpoint = Some((p, r.offset + 1));
                if !self.commit(&record, stop).await {
                    return None;
                }
            } else {
                absorb(&mut pending, &mut folder, record);
            }
            next = r.offset + 1;
        }
        // Carried to the caller, which commits it (with more) soon.
        pending.checkpoint = Some((p, next));
        carry.commit = pending;
        carry.folder = folder;
        carry.events += n_events;
        metrics::counter!("sluice_consumer_events_total", "consumer" => name).increment(n_events as u64);
        Some(next)
    }

    /// Attempts 2..=attempts of a failed event. `Some(Ok(effect))` on
    /// success, `Some(Err((last error, first failure)))` when exhausted,
    /// `None` when stopped.
    async fn retry(
        &self,
        c: &Arc<dyn Consumer>,
        event: &Event,
        (partition, offset): (u32, u64),
        first_error: String,
        state: &Arc<Mutex<ConsumerState>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Result<Effect, (String, DateTime<Utc>)>> {
        let first_failed_at = Utc::now();
        let mut error = first_error;
        for n in 2..=self.policy.attempts {
            {
                let mut s = lock(state);
                s.status = "retrying".into();
                s.last_error = Some(error.clone());
            }
            if wait_or_stop(stop, self.policy.delay(n - 1)).await {
                return None;
            }
            match call(c, event, Attempt { n, last: n == self.policy.attempts, partition, offset }).await {
                Ok(effect) => return Some(Ok(effect)),
                Err(e) => error = e,
            }
        }
        lock(state).last_error = Some(error.clone());
        Some(Err((error, first_failed_at)))
    }

    /// Commits, retrying store failures until it works or the consumer is
    /// stopped (false).
    async fn commit(&self, c: &ConsumerCommit, stop: &mut watch::Receiver<bool>) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.commit_consumer(c).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(consumer = %c.consumer, error = %e, "consumer commit failed; retrying");
                    if wait_or_stop(stop, delay).await {
                        return false;
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
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
                let event = match self.log.read(d.partition, d.offset, 1, 1).await {
                    Ok(recs) => recs
                        .into_iter()
                        .find(|r| r.offset == d.offset)
                        .and_then(|r| Payload::decode(&r.payload).ok())
                        .and_then(|p| p.find(&d.event_id)),
                    Err(_) => None,
                };
                let Some(event) = event else {
                    let _ = self.store.replay_failed(&d.id, "the event is no longer in the log (retention)", 0).await;
                    continue;
                };
                let first = call(&c, &event, Attempt { n: 1, last: self.policy.attempts <= 1, partition: d.partition, offset: d.offset }).await;
                let outcome = match first {
                    Ok(effect) => Some(Ok(effect)),
                    Err(e) => self.retry(&c, &event, (d.partition, d.offset), e, &state, &mut stop).await,
                };
                match outcome {
                    None => return,
                    Some(Ok(effect)) => {
                        let mut commit = ConsumerCommit { consumer: name.clone(), replayed: vec![d.id.clone()], ..Default::default() };
                        push_effect(&mut commit, &mut Folder::default(), effect);
                        if !self.commit(&commit, &mut stop).await {
                            return;
                        }
                        tracing::info!(consumer = %name, dead_letter = %d.id, "replayed");
                    }
                    Some(Err((error, _))) => {
                        let _ = self.store.replay_failed(&d.id, &error, self.policy.attempts).await;
                    }
                }
                lock(&state).status = "running".into();
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
/// large ones: at 250 ms, a million-row import rewrote each of its usage
/// buckets dozens of times, and those commits made over a third of the
/// import's memory allocations (heaptrack, session 4).
///
/// 5 s, not 1 s (session 5): a million-row import over 1,000 customers
/// touches ~21,000 usage buckets every second, and each commit reads and
/// rewrites all of them; at 1 s the state store's thread took over a fifth
/// of the import's CPU. Usage lags a stream by at most this long.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
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
    commit: ConsumerCommit,
    /// Folds what is added to `commit`.
    folder: Folder,
    events: usize,
    since: std::time::Instant,
}

impl Carry {
    fn new(consumer: &str) -> Carry {
        Carry {
            commit: ConsumerCommit { consumer: consumer.to_owned(), ..Default::default() },
            folder: Folder::default(),
            events: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Usage buckets and count keys carried (folded).
    fn entries(&self) -> usize {
        self.commit.usage.len() + self.commit.counts.len()
    }

    /// Nothing processed since the last commit.
    fn is_empty(&self) -> bool {
        self.events == 0 && self.commit.checkpoint.is_none()
    }
}

/// Calls the consumer; a panic in it is a failed attempt like an error, so
/// an event that always panics ends in the dead-letter queue instead of
/// stalling its partition.
async fn call(c: &Arc<dyn Consumer>, event: &Event, attempt: Attempt) -> Result<Effect, String> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(c.handle(event, attempt)).catch_unwind().await {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            metrics::counter!("sluice_consumer_panics_total", "consumer" => c.name().to_owned()).increment(1);
            Err(format!("consumer panicked: {msg}"))
        }
    }
}

/// Calls the batch fast path; a panic is an `Err` (the runtime then falls
/// back to the events one by one).
async fn call_batch(c: &Arc<dyn Consumer>, batch: &EventBatch, attempt: Attempt) -> Option<Result<Effect, String>> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(c.handle_batch(batch, attempt)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => Some(Err("consumer panicked on a batch".into())),
    }
}

/// Adds an effect to `commit` through its folder: memory stays bounded by
/// the buckets and keys touched, not by the events carried.
fn push_effect(commit: &mut ConsumerCommit, folder: &mut Folder, effect: Effect) {
    match effect {
        Effect::None => {}
        Effect::Count(k) => folder.add_counts(commit, [(k, 1)]),
        Effect::Counts(v) => folder.add_counts(commit, v),
        Effect::Usage(u) => folder.add_usage(commit, u),
    }
}

/// Moves the effects of `from` into `into` (through `into`'s folder; not
/// `from`'s checkpoint).
fn absorb(into: &mut ConsumerCommit, folder: &mut Folder, from: ConsumerCommit) {
    folder.add_counts(into, from.counts);
    folder.add_usage(into, from.usage);
    into.dead_letters.extend(from.dead_letters);
    into.replayed.extend(from.replayed);
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
