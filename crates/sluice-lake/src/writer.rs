//! The lake writer: reads the event log, buffers events per partition
//! (workspace, event type, UTC hour) and writes them as Parquet files.
//!
//! It is a log consumer with its own loop rather than a per-event
//! [`sluice_consumers`]-style consumer, because its effect is a file that
//! covers many events: it buffers by size and time (`lake.flush_bytes`,
//! 32 MiB, and `lake.flush_interval`, 60 s, in the spirit of delivery-stream
//! buffering hints) and then, for every buffered partition,
//!
//! 1. writes `_tmp/<uuid>.parquet` and renames it into its partition
//!    directory,
//! 2. makes all of them durable at once (one `syncfs` on Linux, see
//!    [`sluice_columnar::files::sync_files`]),
//! 3. commits every new file to the manifest (`lake_files`) **and** its
//!    checkpoint (consumer `lake`, one offset per log partition) in one
//!    state-store transaction.
//!
//! A crash before 3 leaves files that are not in the manifest: they are
//! removed on the next start ([`recover`]) and their events, still after the
//! checkpoint, are written again. A crash after 3 loses nothing. So every
//! event is in exactly one committed file, after `kill -9` or a replay.
//! Queries read the manifest, never the directory listing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_columnar::files::{remove_files, Buffer};
use sluice_core::{Bursts, EventLog};
use sluice_store::schemas::Schemas;
use sluice_store::Store;
use tokio::sync::watch;

use crate::layout;
use crate::LakeError;

/// Checkpoint name of the lake writer (shown by `GET /v1/consumers`).
pub const CHECKPOINT: &str = "lake";

/// Settings of the lake writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Lake root directory.
    pub root: PathBuf,
    /// Longest time an event waits in the buffer.
    pub flush_interval: Duration,
    /// Buffered event bytes (as JSON) that trigger a flush.
    pub flush_bytes: usize,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
}

/// Most log bytes read from one partition at a time.
const READ_BYTES: usize = 4 << 20;

/// Removes what a crash left behind: `_tmp/` and every file under the lake
/// that the manifest does not list. Returns how many files were removed.
pub async fn recover(store: &Store, root: &Path) -> Result<usize, LakeError> {
    let listed: HashSet<String> = store.lake_files(None).await?.into_iter().map(|f| f.path).collect();
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_dir_all(root.join("_tmp"));
        let mut n = 0;
        for rel in layout::list_lake_files(&root) {
            if !listed.contains(&rel) && std::fs::remove_file(root.join(&rel)).is_ok() {
                n += 1;
            }
        }
        n
    })
    .await
    .map_err(LakeError::from)
}

/// The lake writer.
pub struct LakeWriter {
    /// The log read.
    pub log: Arc<dyn EventLog>,
    /// Manifest and checkpoints.
    pub store: Store,
    /// Declared property schemas (typed columns).
    pub schemas: Schemas,
    /// Settings.
    pub cfg: WriterConfig,
    /// Bursts of appends announced by producers of this process (a CSV
    /// import, `sluice_core::Bursts`): while one is active, or a consumer
    /// still commits what it kept during one, the writer holds off reading,
    /// for `flush_interval` at most, and catches up afterwards.
    /// The lake is background work; an import's rows should reach the
    /// meters first, with both cores (see [`Self::run`]).
    pub bursts: Bursts,
}

impl LakeWriter {
    /// Runs until `stop` turns true; then writes everything up to the end
    /// of the log and returns.
    ///
    /// While a burst is active, or a consumer is settling one
    /// ([`LakeWriter::bursts`], [`Bursts::busy`]), the writer neither reads
    /// nor decodes: during a large import, reading and buffering for the
    /// lake took a large share of the server's CPU (measured:
    /// docs/BENCHMARKS.md, "CSV usage import"), on the cores the import and
    /// the meters were waiting for (only the Parquet threads run at low
    /// priority); and resuming as soon as the burst ended put its reads and
    /// its `syncfs` beside the meters' final commits. The pause lasts until
    /// neither is the case, or `flush_interval` at most (a buffer that falls
    /// due meanwhile is flushed); after that the writer works as usual, at
    /// its low priority, until the busy period ends. So the lake lags an
    /// import by at most `flush_interval` more than it would otherwise.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut changed = self.log.subscribe();
        let mut busy = self.bursts.busy();
        // When the current busy period (a burst and its settling) began.
        let mut paused_since: Option<Instant> = None;
        'restart: loop {
            let mut pos = match self.positions().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "lake writer cannot read its checkpoints; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut buf = Buffer::default();
            let mut round = 0u32;
            loop {
                let stopping = *stop.borrow();
                if !stopping && busy.now() {
                    let since = *paused_since.get_or_insert_with(Instant::now);
                    let pause_left = self.cfg.flush_interval.saturating_sub(since.elapsed());
                    let due_left = buf.since.map_or(Duration::MAX, |t| self.cfg.flush_interval.saturating_sub(t.elapsed()));
                    let wait = pause_left.min(due_left);
                    if !wait.is_zero() {
                        tokio::select! {
                            _ = busy.changed() => {}
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                    // A due buffer is flushed (one round, then the pause goes
                    // on); once the pause lasted `flush_interval`, the writer
                    // works as usual until the burst and its settling end.
                } else {
                    paused_since = None;
                }
                let mut read_any = false;
                // Start at another partition each round, so that when the
                // buffer fills up early no partition waits behind the others.
                let n = self.log.partitions();
                round = round.wrapping_add(1);
                for p in (0..n).map(|k| (k + round) % n) {
                    if buf.bytes >= self.cfg.flush_bytes {
                        // Full: flush before reading on (the memory bound).
                        break;
                    }
                    // Records are decoded one at a time below, not by `read_decoded`: the
                    // writer stops at its flush point in the middle of a read and
                    // reads the rest again after the flush.
                    let recs = match self.log.read(p, pos[p as usize], 20_000, READ_BYTES).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(partition = p, error = %e, "lake writer cannot read the log; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue 'restart;
                        }
                    };
                    for r in recs {
                        if buf.bytes >= self.cfg.flush_bytes {
                            // The rest is read again after the flush.
                            break;
                        }
                        read_any = true;
                        pos[p as usize] = r.offset + 1;
                        if let Err(e) = buf.push_record(&r.payload) {
                            // No rows: logged and counted as every reader does.
                            sluice_core::undecodable("lake", p, r.offset, &e);
                        }
                    }
                }
                // Stopping: read on to the end of the log, then flush.
                let drained = stopping && !read_any;
                let due = buf.since.is_some_and(|t| t.elapsed() >= self.cfg.flush_interval);
                if buf.bytes >= self.cfg.flush_bytes || due || (drained && buf.events > 0) {
                    if let Err(e) = self.flush(std::mem::take(&mut buf), &pos).await {
                        tracing::error!(error = %e, "lake flush failed; rewriting from the last checkpoint");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue 'restart;
                    }
                }
                if drained {
                    return;
                }
                if !read_any {
                    let wait = match buf.since {
                        Some(t) => self.cfg.flush_interval.saturating_sub(t.elapsed()),
                        None => Duration::from_secs(3600),
                    };
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                } else if buf.bytes < self.cfg.flush_bytes {
                    // Let appends accumulate instead of spinning on tiny reads.
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    async fn positions(&self) -> Result<Vec<u64>, LakeError> {
        let cps = self.store.checkpoints(CHECKPOINT).await?;
        Ok((0..self.log.partitions()).map(|p| cps.get(&p).copied().unwrap_or_else(|| self.log.start_offset(p))).collect())
    }

    async fn flush(&self, buf: Buffer, pos: &[u64]) -> Result<(), LakeError> {
        let started = Instant::now();
        let events = buf.events;
        let flush = buf.into_flush(|ws, ty| self.schemas.get(ws, ty).map(|s| s.properties.clone()).unwrap_or_default());
        let root = self.cfg.root.clone();
        let rg = self.cfg.row_group_rows;
        let files = tokio::task::spawn_blocking(move || flush.write(&root, rg)).await?;
        let files = match files {
            Ok(f) => f,
            Err((written, e)) => {
                remove_files(&self.cfg.root, &written);
                return Err(e.into());
            }
        };
        let checkpoints: Vec<(u32, u64)> = pos.iter().enumerate().map(|(p, o)| (p as u32, *o)).collect();
        if let Err(e) = self.store.lake_commit(CHECKPOINT, &files, &checkpoints).await {
            remove_files(&self.cfg.root, &files);
            return Err(LakeError::Commit(e));
        }
        metrics::counter!("sluice_lake_files_written_total").increment(files.len() as u64);
        metrics::counter!("sluice_lake_rows_written_total").increment(events as u64);
        metrics::histogram!("sluice_lake_flush_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(files = files.len(), events, ms = started.elapsed().as_millis() as u64, "lake files committed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_core::{AppendRecord, Bytes};

    /// A store, a log holding `n` events and a writer that flushes whatever
    /// it reads at once (`flush_bytes` 1), with a pause cap of `cap`.
    async fn setup(dir: &Path, n: usize, cap: Duration, bursts: Bursts) -> (Store, LakeWriter) {
        let store = Store::connect(&format!("sqlite://{}", dir.join("state.db").display())).await.unwrap();
        let log_dir = dir.join("log");
        let log: Arc<dyn EventLog> = Arc::new(
            tokio::task::spawn_blocking(move || sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(log_dir, 2))).await.unwrap().unwrap(),
        );
        let recs = (0..n)
            .map(|i| {
                let e = serde_json::json!({"workspace": "w", "id": format!("e{i}"), "type": "page.viewed",
                    "timestamp": "2026-11-01T12:00:00Z", "received_at": "2026-11-01T12:00:01Z", "properties": {}, "context": {}});
                AppendRecord { partition: (i % 2) as u32, timestamp_ms: 0, payload: Bytes::from(serde_json::to_vec(&e).unwrap()) }
            })
            .collect();
        log.append(recs).await.unwrap();
        let schemas = Schemas::load(&store).await.unwrap();
        let cfg = WriterConfig { root: dir.join("lake"), flush_interval: cap, flush_bytes: 1, row_group_rows: 1024 };
        (store.clone(), LakeWriter { log, store, schemas, cfg, bursts })
    }

    async fn rows_in_lake(store: &Store) -> u64 {
        store.lake_files(None).await.unwrap().iter().map(|f| f.row_count).sum()
    }

    async fn wait_for_rows(store: &Store, n: u64, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if rows_in_lake(store).await == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_burst_holds_the_writer_off_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let bursts = Bursts::default();
        let burst = bursts.begin();
        let (store, writer) = setup(dir.path(), 10, Duration::from_secs(60), bursts).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(writer.run(stop_rx));
        // Without the pause, every event would be in a file within a few ms.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rows_in_lake(&store).await, 0, "the writer wrote during a burst");
        drop(burst);
        assert!(wait_for_rows(&store, 10, Duration::from_secs(10)).await, "the writer did not catch up after the burst");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_burst_pauses_the_writer_for_flush_interval_at_most() {
        let dir = tempfile::tempdir().unwrap();
        let bursts = Bursts::default();
        let _burst = bursts.begin();
        let (store, writer) = setup(dir.path(), 10, Duration::from_millis(300), bursts).await;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(writer.run(stop_rx));
        // The burst never ends here; after flush_interval the lake gets the
        // events all the same.
        assert!(wait_for_rows(&store, 10, Duration::from_secs(10)).await, "a never-ending burst kept the lake from the events");
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}
