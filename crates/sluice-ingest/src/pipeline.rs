//! The ingest writer: group commit, dedup, durable append, index.
//!
//! Request handlers parse and encode their events, then hand them to the one
//! writer through a bounded queue. The writer takes everything that is
//! waiting (up to [`IngestorConfig::max_group_events`]) as one *group*, in
//! two pipelined stages:
//!
//! 1. **Writer**: look the group's ids up in the id index (`sluice_log::index`:
//!    in-memory filters, no I/O for new ids) and in the set of ids appended
//!    but not yet indexed; drop ids already accepted or repeated inside the
//!    group; append the new events to the log in one call, which returns
//!    after one fsync round (group commit: every request of the group shares
//!    it).
//! 2. **Indexer**: add the new ids and their log positions to the id index
//!    (memory: the index is made durable by its own flushes, and rebuilt from
//!    the log after a crash); apply derived record effects (users, customers)
//!    with the log's new end in the state store; then answer every request of
//!    the group.
//!
//! While the indexer works on group N, the writer already appends group N+1.
//! A request is answered only after both stages: a `200` means durable in
//! the log *and* indexed.
//!
//! There is one writer, so no id can be appended twice: an id is either in
//! the index, or in the in-flight set from before its append until it is
//! indexed. If the process dies before the index was flushed, the log holds
//! events the index does not know; [`Ingestor::start`] indexes them from the
//! log before the server takes requests (the log is the source of truth), so
//! a client that retries an unacknowledged request gets "duplicate", never a
//! second copy. The same goes for record effects, whose progress is kept in
//! the state store. If a state-store commit fails while running, that group
//! and every later one already appended are answered 503, and the writer
//! re-applies the effects from the log before it accepts the next group.
//!
//! Memory is bounded: the queue holds at most `max_inflight_bytes` of encoded
//! events; when it is full, [`Ingestor::submit`] fails at once with
//! [`IngestError::Overloaded`] (HTTP 503 with `Retry-After`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::schemas::CheckEvents as _;
use chrono::Utc;
use sluice_core::{has_record_effects, partition_for, record_effects, AppendRecord, Event, EventBatch, EventLog, Payload};
use sluice_log::index::{IdIndex, IndexEntry, KeySet};
use sluice_store::Store;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct IngestorConfig {
    /// Bytes of encoded events that may wait for the writer; beyond this,
    /// ingest answers 503. Default 256 MiB.
    pub max_inflight_bytes: usize,
    /// Most events written in one group (one fsync round). Default 50,000.
    pub max_group_events: usize,
    /// How long an accepted id is remembered for dedup. Default 35 days.
    pub dedup_window: Duration,
    /// How often the id index is flushed to disk and expired ids are
    /// forgotten. Default 10 minutes.
    pub dedup_sweep_interval: Duration,
}

/// The `[ingest]` section of the server's configuration (the binary's
/// `defaults.toml` documents each key; a test checks it agrees with
/// [`Default`]): the pipeline's settings and the HTTP edge's limits.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Largest request body, compressed or decompressed. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest single event. Default 1 MiB.
    pub max_event_bytes: usize,
    /// Most events in one request. Default 10,000.
    pub max_events: usize,
    /// Request bodies buffered at once over all requests; above it ingest
    /// answers 503. At least twice `max_body_bytes`. Default 512 MiB.
    pub max_buffered_body_bytes: usize,
    /// [`IngestorConfig::max_inflight_bytes`]. Default 256 MiB.
    pub max_inflight_bytes: usize,
    /// [`IngestorConfig::dedup_window`]. Default 35 days.
    #[serde(with = "sluice_core::duration")]
    pub dedup_window: Duration,
    /// Segment-compatible endpoints: largest message. Default 32 KiB.
    pub segment_max_message_bytes: usize,
    /// Segment-compatible endpoints: largest request. Default 500 KB.
    pub segment_max_batch_bytes: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        let pipeline = IngestorConfig::default();
        IngestSettings {
            max_body_bytes: 16 << 20,
            max_event_bytes: 1 << 20,
            max_events: 10_000,
            max_buffered_body_bytes: 512 << 20,
            max_inflight_bytes: pipeline.max_inflight_bytes,
            dedup_window: pipeline.dedup_window,
            segment_max_message_bytes: 32 << 10,
            segment_max_batch_bytes: 512_000,
        }
    }
}

impl IngestSettings {
    /// The pipeline's configuration (the rest at its defaults).
    pub fn ingestor_config(&self) -> IngestorConfig {
        IngestorConfig { max_inflight_bytes: self.max_inflight_bytes, dedup_window: self.dedup_window, ..IngestorConfig::default() }
    }
}

impl Default for IngestorConfig {
    fn default() -> Self {
        IngestorConfig {
            max_inflight_bytes: 256 << 20,
            max_group_events: 50_000,
            dedup_window: Duration::from_secs(35 * 24 * 3600),
            dedup_sweep_interval: Duration::from_secs(600),
        }
    }
}

/// What happened to a request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// Newly stored events.
    pub accepted: usize,
    /// Events whose id was already accepted (within the request or before).
    pub duplicates: usize,
}

/// Why the id index could not be consulted or brought up to date with the
/// log; the writer then refuses writes until a rebuild succeeds. Shown as
/// the underlying error's text (in logs and in
/// [`IngestError::Unavailable`] at start-up).
#[derive(Debug, thiserror::Error)]
enum IndexError {
    /// Reading or writing the index files failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The state store failed (progress, record effects).
    #[error("{0}")]
    Store(#[from] sluice_store::StoreError),
    /// Reading the log failed.
    #[error("{0}")]
    Log(#[from] sluice_core::LogError),
    /// The blocking lookup task panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why events could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The queue to the writer is full; try again later.
    #[error("ingest is over capacity; retry later")]
    Overloaded,
    /// The request alone is larger than the whole in-flight budget.
    #[error("request needs {needed} bytes of buffer but the in-flight budget is {budget} bytes")]
    TooLarge {
        /// Encoded size of the request.
        needed: usize,
        /// The configured budget.
        budget: usize,
    },
    /// Events violate an enforced property schema; nothing was written.
    #[error("{0}")]
    Invalid(crate::formats::ParseError),
    /// The writer stopped (shutdown) or failed to persist; nothing was acknowledged.
    #[error("ingest unavailable: {0}")]
    Unavailable(String),
}

sluice_core::error_codes!(IngestError { Overloaded => "ingest.overloaded", TooLarge => "ingest.too_large", Invalid => "ingest.invalid", Unavailable => "ingest.unavailable" });

struct Pending {
    items: Items,
    reply: oneshot::Sender<Result<Outcome, IngestError>>,
    _permit: OwnedSemaphorePermit,
}

/// What a request brings: events (encoded as JSON records), or a batch of
/// similar events written as batch records (see `sluice_core::batch`).
enum Items {
    Events { events: Vec<Event>, encoded: Vec<Vec<u8>> },
    Batch(EventBatch),
}

impl Items {
    fn len(&self) -> usize {
        match self {
            Items::Events { events, .. } => events.len(),
            Items::Batch(b) => b.rows.len(),
        }
    }

    /// (workspace, id) of every event, in order.
    fn ids(&self) -> Box<dyn Iterator<Item = (&str, &str)> + '_> {
        match self {
            Items::Events { events, .. } => Box::new(events.iter().map(|e| (e.workspace.as_str(), e.id.as_str()))),
            Items::Batch(b) => {
                let ws = b.header.workspace.as_str();
                Box::new(b.rows.iter().map(move |r| (ws, r.id.as_str())))
            }
        }
    }
}

/// The id index key of (workspace, id): the first 16 bytes of
/// SHA-256(workspace, 0x00, id), little endian. Stored on disk, so this
/// function is part of the index format. Two different ids share a key with
/// a probability of about n²/2¹²⁹ (10⁻¹⁹ for ten billion ids).
pub fn id_key(workspace: &str, id: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(workspace.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    u128::from_le_bytes(k)
}

/// The index hour of a receive time (hours since the Unix epoch).
fn hour_of(received_at_us: i64) -> u32 {
    u32::try_from(received_at_us.div_euclid(3_600_000_000)).unwrap_or(0)
}

/// Handle to the ingest writer. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    tx: mpsc::Sender<Pending>,
    schemas: crate::schemas::Schemas,
    budget: Arc<Semaphore>,
    max_inflight_bytes: usize,
    index: Arc<IdIndex>,
}

impl Ingestor {
    /// Brings the event id index up to date with the log, then starts the
    /// writer and the dedup-window sweeper. Returns the handle and the
    /// writer's join handle (it ends when every handle is dropped and the
    /// queue is drained).
    pub async fn start(
        log: Arc<dyn EventLog>,
        store: Store,
        index: Arc<IdIndex>,
        config: IngestorConfig,
        schemas: crate::schemas::Schemas,
    ) -> Result<(Ingestor, tokio::task::JoinHandle<()>), IngestError> {
        let started = Instant::now();
        let rebuilt =
            recover(&*log, &store, &index).await.map_err(|e| IngestError::Unavailable(format!("rebuilding the event index failed: {e}")))?;
        if rebuilt > 0 {
            tracing::info!(events = rebuilt, ms = started.elapsed().as_millis() as u64, "indexed the events of the log after the index's last flush");
        }
        let (tx, rx) = mpsc::channel(4096);
        let shared = Arc::new(Shared {
            needs_rebuild: AtomicBool::new(false),
            inflight: Mutex::new(KeySet::default()),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let writer = Writer { log, store: store.clone(), index: index.clone(), config: config.clone(), shared };
        let handle = tokio::spawn(writer.run(rx));
        tokio::spawn(maintain_index(index.clone(), config.dedup_window, config.dedup_sweep_interval));
        let budget = Arc::new(Semaphore::new(config.max_inflight_bytes));
        Ok((Ingestor { tx, schemas, budget, max_inflight_bytes: config.max_inflight_bytes, index }, handle))
    }

    /// The id index (lookups by id).
    pub fn index(&self) -> &Arc<IdIndex> {
        &self.index
    }

    /// Stores `events` durably (deduplicated) and returns what happened. A
    /// returned `Ok` means every accepted event is on disk and indexed.
    pub async fn submit(&self, events: Vec<Event>) -> Result<Outcome, IngestError> {
        let (items, bytes) = self.checked_events(events)?;
        self.enqueue(items, bytes).await
    }

    /// [`Ingestor::submit`] that waits while ingest is over capacity, as
    /// [`Ingestor::submit_batch_waiting`] does: for events the server
    /// writes itself (billing's), which must not fail because an import
    /// fills ingest for a while.
    pub async fn submit_waiting(&self, events: Vec<Event>) -> Result<Outcome, IngestError> {
        let (items, bytes) = self.checked_events(events)?;
        self.enqueue_waiting(items, bytes).await
    }

    /// Events checked against the enforced schemas and encoded, with their
    /// budget in bytes.
    fn checked_events(&self, events: Vec<Event>) -> Result<(Items, usize), IngestError> {
        self.schemas.check(&events).map_err(IngestError::Invalid)?;
        let encoded: Vec<Vec<u8>> =
            events.iter().map(|e| serde_json::to_vec(e).map_err(|e| IngestError::Unavailable(e.to_string()))).collect::<Result<_, _>>()?;
        let bytes: usize = encoded.iter().map(Vec::len).sum::<usize>().max(1);
        Ok((Items::Events { events, encoded }, bytes))
    }

    /// Checks events against the enforced property schemas, without
    /// storing anything.
    pub fn check_schemas(&self, events: &[Event]) -> Result<(), IngestError> {
        self.schemas.check(events).map_err(IngestError::Invalid)
    }

    /// Stores the events of `batch` durably (deduplicated, like
    /// [`Ingestor::submit`]) as batch records: one log record per partition
    /// and up to `MAX_BATCH_ROWS` events. The CSV importer's path: while
    /// ingest is over capacity the batch waits (20 ms, doubling up to 1 s)
    /// and is submitted again, instead of failing with `Overloaded`, so that
    /// an import and API traffic share ingest and neither is refused.
    pub async fn submit_batch_waiting(&self, batch: EventBatch) -> Result<Outcome, IngestError> {
        let Some(bytes) = self.check_batch(&batch)? else { return Ok(Outcome { accepted: 0, duplicates: 0 }) };
        self.enqueue_waiting(Items::Batch(batch), bytes).await
    }

    /// Hands `items` to the writer, waiting (20 ms, doubling up to 1 s)
    /// while ingest is over capacity.
    async fn enqueue_waiting(&self, mut items: Items, bytes: usize) -> Result<Outcome, IngestError> {
        let backoff = sluice_core::Backoff::exact(Duration::from_millis(20), Duration::from_secs(1));
        let mut waits = 0;
        loop {
            match self.try_enqueue(items, bytes) {
                Ok(rx) => return reply(rx).await,
                Err((IngestError::Overloaded, Some(back))) => {
                    items = back;
                    waits += 1;
                    tokio::time::sleep(backoff.delay(waits)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Checks a batch against enforced schemas; its budget in bytes, or
    /// None for an empty batch.
    fn check_batch(&self, batch: &EventBatch) -> Result<Option<usize>, IngestError> {
        if batch.rows.is_empty() {
            return Ok(None);
        }
        if self.schemas.get(batch.header.workspace.as_str(), batch.header.event_type.as_str()).is_some_and(|s| s.enforce) {
            // Enforced property schemas are checked on the expanded events.
            let events: Vec<Event> = batch.events().collect();
            self.schemas.check(&events).map_err(IngestError::Invalid)?;
        }
        // Budget by the encoded size (what the writer holds).
        Ok(Some(64 + batch.rows.iter().map(|r| 24 + r.id.as_str().len() + r.value.as_ref().map_or(0, String::len)).sum::<usize>()))
    }

    async fn enqueue(&self, items: Items, bytes: usize) -> Result<Outcome, IngestError> {
        reply(self.try_enqueue(items, bytes).map_err(|(e, _)| e)?).await
    }

    /// Hands `items` to the writer if the budget and queue have room; when
    /// they have not (`Overloaded`), gives the items back.
    // The items come back to the caller by value (no copy of a batch); the
    // large `Err` is moved once per refused attempt.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn try_enqueue(&self, items: Items, bytes: usize) -> Result<oneshot::Receiver<Result<Outcome, IngestError>>, (IngestError, Option<Items>)> {
        if bytes > self.max_inflight_bytes {
            return Err((IngestError::TooLarge { needed: bytes, budget: self.max_inflight_bytes }, None));
        }
        let Some(permit) = u32::try_from(bytes).ok().and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok()) else {
            return Err((IngestError::Overloaded, Some(items)));
        };
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Pending { items, reply, _permit: permit }) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(p)) => Err((IngestError::Overloaded, Some(p.items))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err((IngestError::Unavailable("shutting down".into()), None)),
        }
    }
}

/// The writer's answer to an enqueued request.
async fn reply(rx: oneshot::Receiver<Result<Outcome, IngestError>>) -> Result<Outcome, IngestError> {
    rx.await.map_err(|_| IngestError::Unavailable("writer stopped".into()))?
}

/// The first stage of the writer: dedup and durable append. It hands each
/// appended group to the [`Indexer`] and goes on with the next group while
/// the indexer commits, so the log fsync of one group overlaps the index
/// transaction of the previous one. Ids of groups appended but not yet
/// committed stay in `inflight`, so dedup never misses them.
struct Writer {
    log: Arc<dyn EventLog>,
    store: Store,
    index: Arc<IdIndex>,
    config: IngestorConfig,
    shared: Arc<Shared>,
}

/// State both stages see.
struct Shared {
    /// Set by the indexer when a state-store commit failed: the record
    /// effects lag the log.
    needs_rebuild: AtomicBool,
    /// Keys ([`id_key`]) of events appended to the log whose index rows are
    /// not committed yet.
    inflight: Mutex<KeySet>,
    /// Groups handed to the indexer and not yet finished.
    pending: AtomicUsize,
    /// Signalled whenever the indexer finishes a group.
    idle: Notify,
}

/// One appended group on its way to the index.
struct IndexJob {
    rows: Vec<IndexEntry>,
    effects: Vec<sluice_core::RecordEffect>,
    progress: Vec<(u32, u64)>,
    replies: Vec<(oneshot::Sender<Result<Outcome, IngestError>>, Outcome)>,
    keys: Vec<u128>,
    bytes: usize,
    events: usize,
    started: Instant,
}

impl IndexJob {
    /// One job doing the work of several, in order.
    fn merge(mut jobs: Vec<IndexJob>) -> IndexJob {
        let mut merged = jobs.remove(0);
        let mut progress: HashMap<u32, u64> = merged.progress.drain(..).collect();
        for j in jobs {
            merged.rows.extend(j.rows);
            merged.effects.extend(j.effects);
            merged.replies.extend(j.replies);
            merged.keys.extend(j.keys);
            merged.bytes += j.bytes;
            merged.events += j.events;
            for (p, next) in j.progress {
                let e = progress.entry(p).or_insert(next);
                *e = (*e).max(next);
            }
        }
        merged.progress = progress.into_iter().collect();
        merged
    }
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        // Up to INDEX_QUEUE groups wait while one transaction commits; the
        // indexer then commits all of them in one transaction.
        let (index_tx, index_rx) = mpsc::channel(INDEX_QUEUE);
        let indexer = tokio::spawn(
            Indexer {
                store: self.store.clone(),
                index: self.index.clone(),
                shared: self.shared.clone(),
                flushing: Arc::new(AtomicBool::new(false)),
                effects_saved: Instant::now(),
                progress: HashMap::new(),
                saving: Arc::new(AtomicBool::new(false)),
            }
            .run(index_rx),
        );
        while let Some(first) = rx.recv().await {
            let mut n = first.items.len();
            let mut group = vec![first];
            while n < self.config.max_group_events {
                match rx.try_recv() {
                    Ok(p) => {
                        n += p.items.len();
                        group.push(p);
                    }
                    Err(_) => break,
                }
            }
            self.write_group(group, &index_tx).await;
        }
        drop(index_tx);
        let _ = indexer.await;
        // Flush the id index so that the next start does not re-read the log.
        let index = self.index.clone();
        match tokio::task::spawn_blocking(move || index.flush()).await {
            Ok(Ok(n)) => tracing::info!(entries = n, "id index flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the id index failed; the next start re-reads the log"),
            Err(e) => tracing::warn!(error = %e, "flushing the id index failed; the next start re-reads the log"),
        }
        tracing::info!("ingest writer stopped: queue drained");
    }

    /// Waits until the indexer has finished every group handed to it.
    async fn wait_indexer_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            if self.shared.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Answers a group whose append failed: nothing of it is in the log, so
    /// its ids leave the in-flight set and every request gets a 503.
    fn refuse(&self, keys: &[u128], replies: Vec<(oneshot::Sender<Result<Outcome, IngestError>>, Outcome)>) {
        let mut inflight = lock(&self.shared.inflight);
        for k in keys {
            inflight.remove(k);
        }
        drop(inflight);
        for (reply, _) in replies {
            let _ = reply.send(Err(IngestError::Unavailable("event log unavailable".into())));
        }
    }

    async fn write_group(&self, mut group: Vec<Pending>, index_tx: &mpsc::Sender<IndexJob>) {
        let started = Instant::now();
        if self.shared.needs_rebuild.load(Ordering::Acquire) {
            // Let the indexer fail what it still holds, then index everything
            // the log has beyond the stored progress.
            self.wait_indexer_idle().await;
            match recover(&*self.log, &self.store, &self.index).await {
                Ok(_) => {
                    lock(&self.shared.inflight).clear();
                    self.shared.needs_rebuild.store(false, Ordering::Release);
                }
                Err(e) => {
                    tracing::error!(error = %e, "event index still out of date; refusing writes");
                    return fail_all(group, "state store unavailable");
                }
            }
        }
        let t_dedup = Instant::now();
        let (all_keys, dup_mask) = match self.find_duplicates(&group).await {
            Ok(m) => m,
            Err(e) => {
                // A damaged index file: start the index over and rebuild it
                // from the log before the next group.
                tracing::error!(error = %e, "id index lookup failed; rebuilding the index from the log");
                self.wait_indexer_idle().await;
                if let Err(e) = self.index.clear() {
                    tracing::error!(error = %e, "clearing the id index failed");
                }
                self.shared.needs_rebuild.store(true, Ordering::Release);
                return fail_all(group, "event index unavailable");
            }
        };
        metrics::histogram!("sluice_ingest_stage_seconds", "stage" => "dedup").record(t_dedup.elapsed().as_secs_f64());

        // Build the append batch and the index rows for the new events.
        let now_ms = Utc::now().timestamp_millis();
        let partitions = self.log.partitions();
        let mut records = Vec::new();
        let mut rows = Vec::new();
        let mut effects = Vec::new();
        let mut keys = Vec::new();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut next: HashMap<u32, u64> = HashMap::new();
        let mut mask = dup_mask.iter().zip(all_keys);
        let mut bytes = 0usize;
        for p in group.iter_mut() {
            let mut out = Outcome { accepted: 0, duplicates: 0 };
            match &mut p.items {
                Items::Events { events, encoded } => {
                    let encoded = std::mem::take(encoded);
                    for (e, enc) in events.iter().zip(encoded) {
                        let Some((false, key)) = mask.next().map(|(d, k)| (*d, k)) else {
                            out.duplicates += 1;
                            continue;
                        };
                        out.accepted += 1;
                        effects.extend(record_effects(e));
                        let partition = partition_for(e.workspace.as_str(), e.customer_id.as_deref(), e.id.as_str(), partitions);
                        let off = next.entry(partition).or_insert_with(|| self.log.next_offset(partition));
                        rows.push(IndexEntry { key, partition, offset: *off, hour: hour_of(e.received_at.timestamp_micros()) });
                        keys.push(key);
                        *off += 1;
                        bytes += enc.len();
                        records.push(AppendRecord { partition, timestamp_ms: now_ms, payload: enc });
                    }
                }
                Items::Batch(batch) => {
                    // The new rows, per partition in row order, then one
                    // record per partition and MAX_BATCH_ROWS rows.
                    let ws = batch.header.workspace.as_str().to_owned();
                    let hour = hour_of(batch.header.received_at.timestamp_micros());
                    let mut by_partition: std::collections::BTreeMap<u32, Vec<(u128, sluice_core::BatchRow)>> = Default::default();
                    for r in std::mem::take(&mut batch.rows) {
                        let Some((false, key)) = mask.next().map(|(d, k)| (*d, k)) else {
                            out.duplicates += 1;
                            continue;
                        };
                        out.accepted += 1;
                        let partition = partition_for(&ws, r.customer_id.as_deref(), r.id.as_str(), partitions);
                        by_partition.entry(partition).or_default().push((key, r));
                    }
                    let with_effects = has_record_effects(batch.header.event_type.as_str());
                    for (partition, prows) in by_partition {
                        let mut prows = prows.into_iter().peekable();
                        while prows.peek().is_some() {
                            let off = next.entry(partition).or_insert_with(|| self.log.next_offset(partition));
                            let mut part = EventBatch { header: batch.header.clone(), rows: Vec::new() };
                            for (key, r) in prows.by_ref().take(sluice_core::batch::MAX_BATCH_ROWS) {
                                rows.push(IndexEntry { key, partition, offset: *off, hour });
                                keys.push(key);
                                part.rows.push(r);
                            }
                            if with_effects {
                                for e in part.events() {
                                    effects.extend(record_effects(&e));
                                }
                            }
                            *off += 1;
                            let payload = part.encode();
                            bytes += payload.len();
                            records.push(AppendRecord { partition, timestamp_ms: now_ms, payload });
                        }
                    }
                }
            }
            outcomes.push(out);
        }
        let dups: usize = outcomes.iter().map(|o| o.duplicates).sum();
        if dups > 0 {
            metrics::counter!("sluice_ingest_events_total", "result" => "duplicate").increment(dups as u64);
        }
        metrics::histogram!("sluice_ingest_group_events").record(dup_mask.len() as f64);
        let replies: Vec<_> = group.into_iter().map(|p| p.reply).zip(outcomes).collect();

        let mut progress = Vec::new();
        if !records.is_empty() {
            let t_append = Instant::now();
            // Registered before the append: from now on dedup sees these ids
            // even though the index does not have them yet.
            lock(&self.shared.inflight).extend(keys.iter().cloned());
            let records_len = records.len();
            let offsets = match self.log.append(records).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "log append failed");
                    // A failed append wrote nothing (the log rolls back).
                    self.refuse(&keys, replies);
                    return;
                }
            };
            // The writer is the log's only appender, so predicted offsets hold.
            // If they ever did not, the index would point elsewhere: refuse to
            // acknowledge and rebuild the index from the log.
            let predicted: HashMap<u32, u64> = next.iter().map(|(&p, &n)| (p, n)).collect();
            let actual: HashMap<u32, u64> = next.keys().map(|&p| (p, self.log.next_offset(p))).collect();
            if predicted != actual || offsets.len() != records_len {
                tracing::error!("log offsets differ from the predicted ones; rebuilding the event index");
                self.shared.needs_rebuild.store(true, Ordering::Release);
                self.refuse(&keys, replies);
                return;
            }
            metrics::histogram!("sluice_ingest_stage_seconds", "stage" => "append").record(t_append.elapsed().as_secs_f64());
            progress = next.keys().map(|&p| (p, self.log.next_offset(p))).collect();
        }
        let job = IndexJob { events: rows.len(), rows, effects, progress, replies, keys, bytes, started };
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(job)) = index_tx.send(job).await {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            for (reply, _) in job.replies {
                let _ = reply.send(Err(IngestError::Unavailable("writer stopped".into())));
            }
        }
    }

    /// The id key of every event of the group, in order (computed once
    /// here, reused for the index), and a flag per event: true if it is a
    /// duplicate.
    async fn find_duplicates(&self, group: &[Pending]) -> Result<(Vec<u128>, Vec<bool>), IndexError> {
        let keys: Vec<u128> = group.iter().flat_map(|p| p.items.ids().map(|(ws, id)| id_key(ws, id))).collect();
        // The lookups probe in-memory filters (and read a block for the rare
        // key that may be there): off the async threads for large groups.
        let (keys, found) = if keys.len() > 4096 {
            let index = self.index.clone();
            tokio::task::spawn_blocking(move || index.contains(&keys).map(|f| (keys, f))).await??
        } else {
            self.index.contains(&keys).map(|f| (keys, f))?
        };
        let inflight = lock(&self.shared.inflight);
        let mut seen = KeySet::with_capacity_and_hasher(keys.len(), Default::default());
        let mask =
            keys.iter().zip(found).map(|(key, indexed)| indexed || (!inflight.is_empty() && inflight.contains(key)) || !seen.insert(*key)).collect();
        drop(inflight);
        Ok((keys, mask))
    }
}

/// The second stage: adds the ids to the index and commits record effects
/// with the log progress, then acknowledges the group's requests.
struct Indexer {
    store: Store,
    index: Arc<IdIndex>,
    shared: Arc<Shared>,
    /// A flush of the id index is running.
    flushing: Arc<AtomicBool>,
    /// When the log progress was last saved in the state store.
    effects_saved: Instant,
    /// The log progress indexed so far (saved with the effects).
    progress: HashMap<u32, u64>,
    /// A background save of the progress is running.
    saving: Arc<AtomicBool>,
}

/// Groups that may wait for the indexer.
const INDEX_QUEUE: usize = 8;
/// Most index rows handled in one round.
const MAX_INDEX_ROWS: usize = 2_000_000;
/// Without record effects, the state store's log progress is saved at most
/// this often (on start, effects are re-applied from there).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Indexer {
    async fn run(mut self, mut rx: mpsc::Receiver<IndexJob>) {
        while let Some(first) = rx.recv().await {
            // Whatever queued up meanwhile goes into this round.
            let mut rows = first.rows.len();
            let mut jobs = vec![first];
            while rows < MAX_INDEX_ROWS {
                match rx.try_recv() {
                    Ok(j) => {
                        rows += j.rows.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let n = jobs.len();
            self.index(IndexJob::merge(jobs)).await;
            self.shared.pending.fetch_sub(n, Ordering::AcqRel);
            self.shared.idle.notify_waiters();
        }
        // Save the final progress, so the next start re-applies nothing.
        let progress: Vec<(u32, u64)> = self.progress.iter().map(|(&p, &o)| (p, o)).collect();
        if let Err(e) = self.store.apply_log_effects(&[], &progress).await {
            tracing::warn!(error = %e, "saving the log progress failed; the next start re-applies record effects from the log");
        }
    }

    async fn index(&mut self, job: IndexJob) {
        let fail = |job: IndexJob, why: &str| {
            for (reply, _) in job.replies {
                let _ = reply.send(Err(IngestError::Unavailable(why.to_owned())));
            }
        };
        if job.rows.is_empty() {
            // Only duplicates: nothing to record.
            for (reply, out) in job.replies {
                let _ = reply.send(Ok(out));
            }
            return;
        }
        // After a failed commit, later groups must not move the progress past
        // the failed one: they fail too, and the writer re-applies from the log.
        if self.shared.needs_rebuild.load(Ordering::Acquire) {
            return fail(job, "state store unavailable");
        }
        let t_index = Instant::now();
        // The ids first (memory; durable through the log until flushed).
        let index = self.index.clone();
        let (rows, progress) = (job.rows, job.progress);
        let (rows, progress) = if rows.len() > 4096 {
            let p = progress.clone();
            match tokio::task::spawn_blocking(move || {
                index.insert(&rows, &p);
                rows
            })
            .await
            {
                Ok(rows) => (rows, progress),
                Err(e) => {
                    tracing::error!(error = %e, "indexing appended events failed");
                    self.shared.needs_rebuild.store(true, Ordering::Release);
                    for (reply, _) in job.replies {
                        let _ = reply.send(Err(IngestError::Unavailable("index unavailable".into())));
                    }
                    return;
                }
            }
        } else {
            index.insert(&rows, &progress);
            (rows, progress)
        };
        let events = rows.len();
        drop(rows);
        for &(p, next) in &progress {
            let e = self.progress.entry(p).or_insert(next);
            *e = (*e).max(next);
        }
        let progress: Vec<(u32, u64)> = self.progress.iter().map(|(&p, &o)| (p, o)).collect();
        // Then the record effects with the log progress, when there are
        // effects: they must be visible when the request is answered. Without
        // effects, only the progress is saved now and then, in the
        // background (it only bounds how much of the log a restart reads).
        if job.effects.is_empty() {
            if self.effects_saved.elapsed() >= PROGRESS_EVERY && !self.saving.swap(true, Ordering::AcqRel) {
                self.effects_saved = Instant::now();
                let (store, saving) = (self.store.clone(), self.saving.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.apply_log_effects(&[], &progress).await {
                        tracing::warn!(error = %e, "saving the log progress failed; retried in a second");
                    }
                    saving.store(false, Ordering::Release);
                });
            }
        } else {
            if let Err(e) = self.store.apply_log_effects(&job.effects, &progress).await {
                tracing::error!(error = %e, "applying record effects failed; will re-apply from the log");
                self.shared.needs_rebuild.store(true, Ordering::Release);
                {
                    let mut inflight = lock(&self.shared.inflight);
                    for k in &job.keys {
                        inflight.remove(k);
                    }
                }
                return fail(IndexJob { rows: Vec::new(), progress, ..job }, "state store unavailable");
            }
            self.effects_saved = Instant::now();
        }
        metrics::histogram!("sluice_ingest_stage_seconds", "stage" => "index").record(t_index.elapsed().as_secs_f64());
        {
            let mut inflight = lock(&self.shared.inflight);
            for k in &job.keys {
                inflight.remove(k);
            }
        }
        metrics::counter!("sluice_ingest_events_total", "result" => "accepted").increment(events as u64);
        metrics::counter!("sluice_ingest_bytes_total").increment(job.bytes as u64);
        metrics::histogram!("sluice_ingest_group_seconds").record(job.started.elapsed().as_secs_f64());
        for (reply, out) in job.replies {
            let _ = reply.send(Ok(out));
        }
        // A full memtable is written out in the background.
        if self.index.needs_flush() && !self.flushing.swap(true, Ordering::AcqRel) {
            let (index, flushing) = (self.index.clone(), self.flushing.clone());
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                match index.flush() {
                    Ok(n) => tracing::debug!(entries = n, ms = t.elapsed().as_millis() as u64, "id index flushed"),
                    Err(e) => tracing::error!(error = %e, "flushing the id index failed; retried at the next flush"),
                }
                flushing.store(false, Ordering::Release);
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the set inconsistent in a
    // way that matters (it only ever grows or shrinks by whole keys).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fail_all(group: Vec<Pending>, why: &str) {
    for p in group {
        let _ = p.reply.send(Err(IngestError::Unavailable(why.to_owned())));
    }
}

/// Brings the id index and the record effects up to date with the log:
/// indexes every record at or after the index's progress, and applies the
/// record effects of every record at or after the state store's progress.
/// Returns how many events were indexed.
async fn recover(log: &dyn EventLog, store: &Store, index: &Arc<IdIndex>) -> Result<u64, IndexError> {
    let effects_progress: HashMap<u32, u64> = store.log_progress().await?.into_iter().collect();
    let index_progress = index.progress();
    let mut total = 0;
    for p in 0..log.partitions() {
        let end = log.next_offset(p);
        let mut index_from = index_progress.get(&p).copied().unwrap_or(0);
        let mut effects_from = effects_progress.get(&p).copied().unwrap_or(0);
        if index_from > end {
            // The log lost a tail (corruption repaired on open): the index must
            // not point past the end of the log.
            let n = index.truncate(p, end)?;
            tracing::warn!(
                partition = p,
                from = index_from,
                end,
                forgotten = n,
                "log is shorter than the id index; forgot index entries past its end"
            );
            index_from = end;
        }
        if effects_from > end {
            store.apply_log_effects(&[], &[(p, end)]).await?;
            effects_from = end;
        }
        let mut from = index_from.min(effects_from).max(log.start_offset(p));
        while from < end {
            let records = sluice_core::read_decoded(log, "ingest_recovery", p, from, 10_000, 16 << 20).await?;
            let Some(last) = records.last().map(|r| r.offset) else { break };
            let mut rows = Vec::new();
            let mut effects = Vec::new();
            for r in &records {
                let (to_index, to_apply) = (r.offset >= index_from, r.offset >= effects_from);
                match &r.payload {
                    Ok(Payload::Event(e)) => {
                        if to_apply {
                            effects.extend(record_effects(e));
                        }
                        if to_index {
                            let key = id_key(e.workspace.as_str(), e.id.as_str());
                            rows.push(IndexEntry { key, partition: p, offset: r.offset, hour: hour_of(e.received_at.timestamp_micros()) });
                        }
                    }
                    Ok(Payload::Batch(b)) => {
                        if to_apply && has_record_effects(b.header.event_type.as_str()) {
                            for e in b.events() {
                                effects.extend(record_effects(&e));
                            }
                        }
                        if to_index {
                            let (ws, hour) = (b.header.workspace.as_str(), hour_of(b.header.received_at.timestamp_micros()));
                            rows.extend(b.rows.iter().map(|row| IndexEntry {
                                key: id_key(ws, row.id.as_str()),
                                partition: p,
                                offset: r.offset,
                                hour,
                            }));
                        }
                    }
                    // Logged and counted by the reader: nothing to index.
                    Err(_) => {}
                }
            }
            total += rows.len() as u64;
            index.insert(&rows, &[(p, last + 1)]);
            if last + 1 > effects_from {
                store.apply_log_effects(&effects, &[(p, last + 1)]).await?;
            }
            from = last + 1;
        }
        // Nothing after the progress (or everything removed by retention).
        index.insert(&[], &[(p, end)]);
    }
    Ok(total)
}

/// Flushes the id index and forgets ids older than the dedup window, every
/// `every`.
async fn maintain_index(index: Arc<IdIndex>, window: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let cutoff = Utc::now() - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::days(35));
        let index = index.clone();
        let result = tokio::task::spawn_blocking(move || {
            let flushed = index.flush()?;
            let m = index.maintain(hour_of(cutoff.timestamp_micros()))?;
            Ok::<_, std::io::Error>((flushed, m))
        })
        .await;
        match result {
            Ok(Ok((flushed, m))) => {
                if m.runs_expired > 0 || m.entries_expired > 0 || m.merges > 0 || flushed > 0 {
                    tracing::info!(
                        flushed,
                        runs_expired = m.runs_expired,
                        merges = m.merges,
                        entries_expired = m.entries_expired,
                        "id index maintenance"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "id index maintenance failed"),
            Err(e) => tracing::warn!(error = %e, "id index maintenance failed"),
        }
    }
}
