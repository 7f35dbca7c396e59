//! The event log abstraction.
//!
//! An event log is a set of numbered partitions; each partition is an
//! append-only sequence of records addressed by a dense offset starting at 0.
//! The embedded implementation lives in `sluice-log`; NATS JetStream is the
//! planned scale-out implementation (one stream, one subject per partition,
//! the stream sequence of a subject as the offset).
//!
//! Contract every implementation must keep:
//! - `append` returns only once every record is durable (fsync or stream ack);
//! - offsets within a partition are dense and increase by one per record;
//! - after a crash, a partition contains a prefix of what was appended, and
//!   contains every record of every `append` that returned `Ok`;
//! - `next_offset` is exact while this process is the only writer, which lets
//!   the ingest pipeline record event positions in the same state-store
//!   transaction as the dedup index (see `sluice-ingest`).

use crate::{Event, Payload, PayloadError};
use async_trait::async_trait;

/// A record payload.
pub type Bytes = Vec<u8>;

/// One record to append.
#[derive(Debug, Clone)]
pub struct AppendRecord {
    /// Target partition, `< partitions()`.
    pub partition: u32,
    /// Append time in milliseconds since the Unix epoch (used by retention).
    pub timestamp_ms: i64,
    /// Opaque payload (Sluice writes an [`crate::Event`] as JSON).
    pub payload: Bytes,
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partition the record is in.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Append time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The payload as appended.
    pub payload: Bytes,
}

/// Size and extent of the log, for metrics and the consumers API.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// Bytes on disk over all partitions.
    pub bytes: u64,
    /// Per partition: (first available offset, next offset).
    pub partitions: Vec<(u64, u64)>,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Bytes freed.
    pub bytes_deleted: u64,
    /// Records deleted.
    pub records_deleted: u64,
}

/// Errors of an event log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading or writing the underlying storage failed.
    #[error("log I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A partition number outside `0..partitions()`.
    #[error("partition {0} does not exist")]
    NoSuchPartition(u32),
    /// The log was closed.
    #[error("log is closed")]
    Closed,
    /// Stored data failed a check that is not a torn tail (those are repaired on open).
    #[error("log data is corrupt: {0}")]
    Corrupt(String),
    /// The data directory holds a log written with other settings (e.g. a different partition count).
    #[error("log configuration mismatch: {0}")]
    Config(String),
}

crate::error_codes!(LogError { Io => "log.io", NoSuchPartition => "log.no_such_partition", Closed => "log.closed", Corrupt => "log.corrupt", Config => "log.config" });

/// A partitioned, durable, append-only log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Number of partitions (fixed for the life of the log).
    fn partitions(&self) -> u32;

    /// The offset the next record appended to `partition` will get.
    fn next_offset(&self, partition: u32) -> u64;

    /// The first offset still available in `partition` (after retention).
    fn start_offset(&self, partition: u32) -> u64;

    /// Appends all records, makes them durable, and returns their offsets in
    /// input order. Concurrent callers share fsyncs (group commit).
    async fn append(&self, records: Vec<AppendRecord>) -> Result<Vec<u64>, LogError>;

    /// Reads records of `partition` starting at `from` (or at the first
    /// available offset if `from` is older), at most `max_records` and about
    /// `max_bytes` (at least one record is returned if any exists).
    async fn read(&self, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError>;

    /// A receiver that changes after every successful append, for tailing readers.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Deletes data older than the retention limits.
    async fn enforce_retention(&self) -> Result<RetentionReport, LogError>;

    /// Size and extent of the log.
    fn stats(&self) -> LogStats;

    /// Flushes and closes; later appends fail with [`LogError::Closed`].
    async fn close(&self) -> Result<(), LogError>;
}

/// Producers that announced a burst of appends (a CSV import sending a
/// million rows): while one is active, consumers of this process keep their
/// effects in memory between reads instead of committing whenever the
/// stream pauses for a moment, and commit at once when the last burst ends.
///
/// Without it a consumer cannot tell a burst that is still coming from one
/// that ended: it would commit at every pause of 50 ms, and an import can
/// pause often enough that the meters consumer rewrites each of its usage
/// buckets again and again, spending the state store's CPU on the same
/// rows (measured: docs/BENCHMARKS.md, "CSV usage import"). A burst that
/// never ends (a hung producer) delays commits by at most the consumer's
/// commit interval. Producers in other processes (scale-out) are not seen;
/// there the pause heuristic alone decides.
///
/// Consumers that kept effects in memory because of a burst are *settling*
/// until those effects are committed ([`Bursts::settle`]). Background work
/// that should not compete with them (the lake writer) waits while a burst
/// is active or a consumer is settling ([`Bursts::busy`]).
#[derive(Debug, Clone)]
pub struct Bursts {
    active: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
    settling: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Bursts {
    fn default() -> Self {
        Bursts { active: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)), settling: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)) }
    }
}

impl Bursts {
    /// Announces a burst; it lasts until the guard is dropped. End it only
    /// after the burst's last append returned.
    pub fn begin(&self) -> BurstGuard {
        self.active.send_modify(|n| *n += 1);
        BurstGuard { active: self.active.clone() }
    }

    /// Whether a burst is active.
    pub fn active(&self) -> bool {
        *self.active.borrow() > 0
    }

    /// The number of active bursts, notified when it changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<usize> {
        self.active.subscribe()
    }

    /// A consumer holds effects it kept because of a burst; drop the guard
    /// once they are committed (or given up).
    pub fn settle(&self) -> BurstGuard {
        self.settling.send_modify(|n| *n += 1);
        BurstGuard { active: self.settling.clone() }
    }

    /// Whether a burst is active or a consumer is still settling one, and
    /// a receiver of each count (notified when it changes) to wait on.
    pub fn busy(&self) -> Busy {
        Busy { active: self.active.subscribe(), settling: self.settling.subscribe() }
    }
}

/// Watches whether a burst is active or being settled ([`Bursts::busy`]).
#[derive(Debug)]
pub struct Busy {
    active: tokio::sync::watch::Receiver<usize>,
    settling: tokio::sync::watch::Receiver<usize>,
}

impl Busy {
    /// True while a burst is active or a consumer settles one (marks both
    /// counts seen, for [`Busy::changed`]).
    pub fn now(&mut self) -> bool {
        *self.active.borrow_and_update() > 0 || *self.settling.borrow_and_update() > 0
    }

    /// Waits until either count changes.
    pub async fn changed(&mut self) {
        tokio::select! {
            r = self.active.changed() => { if r.is_err() { std::future::pending::<()>().await } }
            r = self.settling.changed() => { if r.is_err() { std::future::pending::<()>().await } }
        }
    }
}

/// An active burst (see [`Bursts::begin`]).
#[derive(Debug)]
pub struct BurstGuard {
    active: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
}

impl Drop for BurstGuard {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod burst_tests {
    #![allow(clippy::unwrap_used)]
    use super::Bursts;

    #[test]
    fn bursts_count_their_guards() {
        let b = Bursts::default();
        let mut rx = b.subscribe();
        assert!(!b.active());
        let g1 = b.begin();
        let g2 = b.clone().begin();
        assert!(b.active());
        assert_eq!(*rx.borrow_and_update(), 2);
        drop(g1);
        assert!(b.active());
        drop(g2);
        assert!(!b.active());
        assert!(rx.has_changed().unwrap());
    }
}

/// A record as every reader of the log sees it: where it is, when it was
/// appended, and its decoded payload — or why it cannot be decoded.
#[derive(Debug)]
pub struct DecodedRecord {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Append time (Unix milliseconds).
    pub timestamp_ms: i64,
    /// Encoded size in bytes (what memory budgets count).
    pub len: usize,
    /// The payload, or why it is not one.
    pub payload: Result<Payload, PayloadError>,
}

/// The one way to read the log: up to `max_records` records (about
/// `max_bytes`) of `partition` from `from`, decoded. `reader` names the
/// reader in logs and metrics.
///
/// A record that cannot be decoded is never skipped silently: it is
/// returned with its error, logged at WARN with the reader, partition and
/// offset, and counted in `sluice_log_undecodable_records_total{reader}`.
/// What the reader does next is its policy: a consumer sends it to its dead
/// letters ([`undecodable`] also serves a reader with its own decoding).
pub async fn read_decoded(
    log: &dyn EventLog,
    reader: &str,
    partition: u32,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<DecodedRecord>, LogError> {
    let records = log.read(partition, from, max_records, max_bytes).await?;
    Ok(records
        .into_iter()
        .map(|r| {
            let payload = Payload::decode(&r.payload);
            if let Err(e) = &payload {
                undecodable(reader, r.partition, r.offset, e);
            }
            DecodedRecord { partition: r.partition, offset: r.offset, timestamp_ms: r.timestamp_ms, len: r.payload.len(), payload }
        })
        .collect())
}

/// Logs and counts a record that cannot be decoded (see [`read_decoded`]).
pub fn undecodable(reader: &str, partition: u32, offset: u64, error: &PayloadError) {
    tracing::warn!(reader, partition, offset, error = %error, "log record cannot be decoded");
    metrics::counter!("sluice_log_undecodable_records_total", "reader" => reader.to_owned()).increment(1);
}

/// The record at (`partition`, `offset`), decoded; `None` when there is
/// none (removed by retention, or not written yet).
pub async fn fetch_record(log: &dyn EventLog, reader: &str, partition: u32, offset: u64) -> Result<Option<DecodedRecord>, LogError> {
    if offset < log.start_offset(partition) || offset >= log.next_offset(partition) {
        return Ok(None);
    }
    let records = read_decoded(log, reader, partition, offset, 1, 1).await?;
    Ok(records.into_iter().find(|r| r.offset == offset))
}

/// The event `event_id` of the record at (`partition`, `offset`): `None`
/// when the record is gone, cannot be decoded (logged, see
/// [`read_decoded`]) or does not hold that event.
pub async fn fetch_event(log: &dyn EventLog, reader: &str, partition: u32, offset: u64, event_id: &str) -> Result<Option<Event>, LogError> {
    Ok(fetch_record(log, reader, partition, offset).await?.and_then(|r| r.payload.ok()).and_then(|p| p.find(event_id)))
}
