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
    async fn read(
        &self,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// A receiver that changes after every successful append, for tailing readers.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Deletes data older than the retention limits.
    async fn enforce_retention(&self) -> Result<RetentionReport, LogError>;

    /// Size and extent of the log.
    fn stats(&self) -> LogStats;

    /// Flushes and closes; later appends fail with [`LogError::Closed`].
    async fn close(&self) -> Result<(), LogError>;
}
