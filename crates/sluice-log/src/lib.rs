//! The embedded, segmented, checksummed append-only event log of Sluice.
//!
//! [`EmbeddedLog`] implements [`sluice_core::EventLog`] on a local directory.
//! It is the default log of `sluice serve`; the on-disk format, invariants and
//! recovery procedure are written down in `docs/log-format.md`.
//!
//! # Layout
//!
//! ```text
//! <dir>/meta.json                       format version and partition count
//! <dir>/p-0000/00000000000000000000.log segment files of partition 0, named
//! <dir>/p-0000/00000000000000052311.log   by the offset of their first record
//! <dir>/p-0001/...
//! ```
//!
//! Each segment starts with a 32-byte header (magic, format version,
//! partition, base offset, CRC) followed by records: a 24-byte header (CRC32,
//! payload length, offset, timestamp; little endian) and the payload. The
//! CRC covers length, offset, timestamp and payload.
//!
//! # Writing: group commit
//!
//! [`EventLog::append`] reserves dense offsets for its records under a short
//! queue lock (this is what makes [`EventLog::next_offset`] exact), queues
//! them and awaits a oneshot reply. A dedicated writer thread takes the whole
//! queue, encodes one buffer per touched partition and writes and fsyncs
//! (`sync_data`) the partitions in parallel, one thread per partition. Only
//! then does it publish the new durable watermark, answer every caller and
//! bump the [`EventLog::subscribe`] channel. Callers that arrive while a round
//! is syncing share the next round's fsyncs. No file I/O ever runs on the
//! async executor.
//!
//! A round is all-or-nothing: if any partition fails to write or sync, every
//! partition of the round is truncated back, the round's callers and every
//! append queued behind them get the error (their reserved offsets followed
//! the failed ones), and `next_offset` falls back to the durable watermark.
//! If the rollback itself fails, the log refuses further appends until it is
//! reopened and recovery repairs the tail.
//!
//! # Reading
//!
//! Readers never take the writer's lock: they look up the segment by base
//! offset (binary search) and a start position in a sparse index (one entry
//! per 64 KiB; kept for the active segment, built lazily and cached for a
//! bounded number of sealed ones), open their own file handle and read only
//! below the durable watermark. Every returned record is checked (offset,
//! length, CRC); a bad record in a sealed segment is [`LogError::Corrupt`],
//! never skipped.
//!
//! # Recovery
//!
//! [`EmbeddedLog::open`] scans the last segment of every partition and
//! truncates it after the last valid record (short header, short payload,
//! bad checksum, unexpected offset), logging a warning with the partition,
//! segment, bytes cut and offset. A torn segment header (a crash while a new
//! segment was created) is rewritten. Because a new segment is only created
//! after the previous one is fsynced, only the last segment can be torn.
//!
//! # Retention
//!
//! [`EventLog::enforce_retention`] deletes whole sealed segments, oldest
//! first, while their newest record is older than `retention_max_age` or the
//! partition is larger than `retention_max_bytes`. The active segment is
//! never deleted.

mod format;
pub mod index;
mod open;
mod read;
mod retention;
mod segment;
mod state;
mod writer;

pub use format::MAX_PAYLOAD_BYTES;

use crate::state::{lock, read as read_lock, Shared};
use crate::writer::{Pending, Queue, Writer};
use async_trait::async_trait;
use sluice_core::{AppendRecord, EventLog, LogError, LogStats, Record, RetentionReport};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Default size at which the active segment is sealed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Configuration of an [`EmbeddedLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Directory of the log (created if missing).
    pub dir: PathBuf,
    /// Number of partitions. Fixed when the log is created; reopening with
    /// another count fails with [`LogError::Config`].
    pub partitions: u32,
    /// A segment is sealed once the next record would make it larger than
    /// this (a single larger record gets a segment of its own). At least 1024.
    pub segment_bytes: u64,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_max_age: Option<Duration>,
    /// Delete the oldest sealed segments while a partition is larger than this.
    pub retention_max_bytes: Option<u64>,
}

impl LogConfig {
    /// A configuration with 64 MiB segments and no retention limits.
    pub fn new(dir: impl Into<PathBuf>, partitions: u32) -> LogConfig {
        LogConfig { dir: dir.into(), partitions, segment_bytes: DEFAULT_SEGMENT_BYTES, retention_max_age: None, retention_max_bytes: None }
    }
}

/// The `[log]` section of the server's configuration (the binary's
/// `defaults.toml` documents each key; a test checks it agrees with
/// [`Default`]).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `file://PATH`; empty: `<data_dir>/log`.
    pub url: String,
    /// Partitions (fixed once the log exists). Default 4.
    pub partitions: u32,
    /// Segment size ([`LogConfig::segment_bytes`]). Default 64 MiB.
    pub segment_bytes: u64,
    /// Sealed segments older than this are deleted; zero keeps them. Default 90 days.
    #[serde(with = "sluice_core::duration")]
    pub retention_max_age: Duration,
    /// Per partition, the oldest sealed segments are deleted above this; 0: no limit.
    pub retention_max_bytes: u64,
    /// How often retention runs. Default 1 minute.
    #[serde(with = "sluice_core::duration")]
    pub retention_interval: Duration,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            url: String::new(),
            partitions: 4,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention_max_age: Duration::from_secs(90 * 24 * 3600),
            retention_max_bytes: 0,
            retention_interval: Duration::from_secs(60),
        }
    }
}

impl LogSettings {
    /// The log's configuration in `dir` (the directory `url` names).
    pub fn log_config(&self, dir: PathBuf) -> LogConfig {
        LogConfig {
            dir,
            partitions: self.partitions,
            segment_bytes: self.segment_bytes,
            retention_max_age: (!self.retention_max_age.is_zero()).then_some(self.retention_max_age),
            retention_max_bytes: (self.retention_max_bytes > 0).then_some(self.retention_max_bytes),
        }
    }
}

/// What [`EmbeddedLog::open`] repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Bytes cut from torn segment tails, over all partitions.
    pub truncated_bytes: u64,
    /// Partitions whose tail was repaired, ascending.
    pub partitions_repaired: Vec<u32>,
    /// One entry per repaired partition, with the details that were logged.
    pub repairs: Vec<TailRepair>,
}

/// One torn tail cut off during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRepair {
    /// The partition.
    pub partition: u32,
    /// The segment file that was truncated.
    pub segment: PathBuf,
    /// Bytes removed.
    pub cut_bytes: u64,
    /// Offset of the first record that was not kept (the partition's next
    /// offset after recovery).
    pub at_offset: u64,
    /// What was wrong with the first cut record (or the segment header).
    pub reason: String,
}

/// The embedded event log: a directory of partitions of segment files.
///
/// Open it with [`EmbeddedLog::open`] (blocking: call it before starting the
/// runtime or inside `spawn_blocking`) and use it through
/// [`sluice_core::EventLog`], typically as `Arc<dyn EventLog>`. Dropping the
/// log without [`EventLog::close`] is safe (every acknowledged append is
/// already durable); the writer thread then exits on its own.
#[derive(Debug)]
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<io::Result<()>>>>,
    recovery: RecoveryReport,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `cfg.dir`, repairing torn tails.
    ///
    /// Fails with [`LogError::Config`] if the configuration is invalid or
    /// the directory holds a log with another partition count, and with
    /// [`LogError::Io`] if the directory cannot be read or written.
    pub fn open(cfg: LogConfig) -> Result<EmbeddedLog, LogError> {
        open::prepare_dir(&cfg)?;
        let (opened, recovery) = open::open_partitions(&cfg)?;
        let mut partitions = Vec::with_capacity(opened.len());
        let mut active = Vec::with_capacity(opened.len());
        for p in opened {
            partitions.push(p.state);
            active.push(p.active);
        }
        let (watch_tx, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            cfg,
            partitions,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            watch_tx,
            sync_rounds: AtomicU64::new(0),
            retention: Mutex::new(()),
            #[cfg(test)]
            fail_partition: std::sync::atomic::AtomicU32::new(u32::MAX),
        });
        let writer = Writer::new(Arc::clone(&shared), active);
        let handle = std::thread::Builder::new().name("sluice-log-writer".into()).spawn(move || writer.run())?;
        tracing::info!(
            dir = %shared.cfg.dir.display(),
            partitions = shared.cfg.partitions,
            repaired = recovery.partitions_repaired.len(),
            "event log opened"
        );
        Ok(EmbeddedLog { shared, writer: Mutex::new(Some(handle)), recovery })
    }

    /// What recovery repaired when the log was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.shared.cfg
    }

    /// Number of group-commit rounds completed since open. Each round writes
    /// and fsyncs every partition it touches once, however many `append`
    /// calls it serves.
    pub fn sync_rounds(&self) -> u64 {
        self.shared.sync_rounds.load(Ordering::Acquire)
    }

    fn partition(&self, partition: u32) -> Result<&state::PartitionState, LogError> {
        self.shared.partitions.get(partition as usize).ok_or(LogError::NoSuchPartition(partition))
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        // Let the writer drain and exit; it holds its own `Arc<Shared>`.
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_all();
    }
}

fn writer_gone() -> LogError {
    LogError::Io(io::Error::other("the log writer thread stopped"))
}

#[async_trait]
impl EventLog for EmbeddedLog {
    fn partitions(&self) -> u32 {
        self.shared.cfg.partitions
    }

    /// Exact: offsets are reserved when an append is queued. Returns 0 for a
    /// partition that does not exist.
    fn next_offset(&self, partition: u32) -> u64 {
        self.partition(partition).map_or(0, |p| p.next.load(Ordering::Acquire))
    }

    /// Returns 0 for a partition that does not exist.
    fn start_offset(&self, partition: u32) -> u64 {
        self.partition(partition).map_or(0, |p| p.start.load(Ordering::Acquire))
    }

    async fn append(&self, records: Vec<AppendRecord>) -> Result<Vec<u64>, LogError> {
        let mut payload_bytes = 0usize;
        for r in &records {
            self.partition(r.partition)?;
            if r.payload.len() > MAX_PAYLOAD_BYTES {
                return Err(LogError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("record payload of {} bytes exceeds the maximum of {MAX_PAYLOAD_BYTES}", r.payload.len()),
                )));
            }
            payload_bytes += r.payload.len();
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut q = lock(&self.shared.queue);
            if q.closed {
                return Err(LogError::Closed);
            }
            if let Some(why) = &q.failed {
                return Err(LogError::Io(io::Error::other(why.clone())));
            }
            if records.is_empty() {
                return Ok(Vec::new());
            }
            let offsets = records
                .iter()
                .map(|r| {
                    let next = &self.shared.partitions[r.partition as usize].next;
                    let o = next.load(Ordering::Relaxed);
                    next.store(o + 1, Ordering::Release);
                    o
                })
                .collect();
            q.pending.push_back(Pending { records, offsets, payload_bytes, reply: tx });
        }
        self.shared.wake.notify_one();
        rx.await.map_err(|_| writer_gone())?
    }

    async fn read(&self, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        let part = self.partition(partition)?;
        let from = from.max(part.start.load(Ordering::Acquire));
        if max_records == 0 || from >= part.durable.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || read::read_partition(&shared.partitions[partition as usize], from, max_records, max_bytes))
            .await
            .map_err(|e| LogError::Io(io::Error::other(format!("log read task failed: {e}"))))?
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.watch_tx.subscribe()
    }

    async fn enforce_retention(&self) -> Result<RetentionReport, LogError> {
        if self.shared.cfg.retention_max_age.is_none() && self.shared.cfg.retention_max_bytes.is_none() {
            return Ok(RetentionReport::default());
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || retention::enforce(&shared))
            .await
            .map_err(|e| LogError::Io(io::Error::other(format!("log retention task failed: {e}"))))?
    }

    /// `next` is the durable watermark (what readers can see), which equals
    /// [`EventLog::next_offset`] whenever no append is in flight.
    fn stats(&self) -> LogStats {
        let mut stats = LogStats::default();
        for p in &self.shared.partitions {
            let segs = read_lock(&p.segments);
            stats.bytes += segs.iter().map(|s| s.len).sum::<u64>();
            stats.partitions.push((p.start.load(Ordering::Acquire), p.durable.load(Ordering::Acquire)));
        }
        stats
    }

    /// Waits for queued appends to finish, fsyncs the active segments and
    /// stops the writer thread. Idempotent.
    async fn close(&self) -> Result<(), LogError> {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_all();
        let handle = lock(&self.writer).take();
        let Some(handle) = handle else {
            return Ok(());
        };
        let joined = tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| LogError::Io(io::Error::other(format!("log close task failed: {e}"))))?;
        match joined {
            Ok(result) => {
                result?;
                tracing::info!(dir = %self.shared.cfg.dir.display(), "event log closed");
                Ok(())
            }
            Err(_) => Err(writer_gone()),
        }
    }
}

#[cfg(test)]
mod tests;
