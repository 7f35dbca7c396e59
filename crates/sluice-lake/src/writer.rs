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
//!    [`sync_files`]),
//! 3. commits every new file to the manifest (`lake_files`) **and** its
//!    checkpoint (consumer `lake`, one offset per log partition) in one
//!    state-store transaction.
//!
//! A crash before 3 leaves files that are not in the manifest: they are
//! removed on the next start ([`recover`]) and their events, still after the
//! checkpoint, are written again. A crash after 3 loses nothing. So every
//! event is in exactly one committed file, after `kill -9` or a replay.
//! Queries read the manifest, never the directory listing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_core::{BatchRows, Bursts, Event, EventLog, Payload};
use sluice_store::schemas::{PropertyType, Schemas};
use sluice_store::{LakeFile, Store};
use tokio::sync::watch;

use crate::columns::{BatchBuilder, Fields};
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

/// Parquet settings of every lake file: Snappy, statistics (for row-group
/// and page pruning), row groups of `row_group_rows`. Snappy rather than
/// zstd: zstd allocates a compression context per column chunk, which was
/// the largest single cost when a flush writes thousands of small files
/// (a backfill spanning many hours), and every engine reads Snappy.
pub fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows.max(1024)))
        .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
        .build()
}

type Key = (String, String, i64);

/// Approximate bytes a buffered single event takes in memory beyond its
/// JSON size (the maps of its properties and context, its strings).
const EVENT_MEMORY_OVERHEAD: usize = 1024;
/// Approximate bytes a buffered row of a batch record takes in memory (its
/// decoded [`sluice_core::BatchRow`] and its place in the buffer).
const BATCH_ROW_MEMORY: usize = 256;
/// Most log bytes read from one partition at a time.
const READ_BYTES: usize = 4 << 20;

/// Where a buffered event is: a single event in [`Sources::events`], or a
/// row of a batch record in [`Sources::batches`]. Batch records stay decoded
/// but are not expanded into events: a buffered row costs about
/// [`BATCH_ROW_MEMORY`], an expanded event several times that.
#[derive(Clone, Copy)]
enum Item {
    Event(u32),
    Row(u32, u32),
}

/// The events and batches the buffered [`Item`]s point into.
#[derive(Default)]
struct Sources {
    events: Vec<Event>,
    batches: Vec<BatchRows>,
}

impl Sources {
    fn timestamp(&self, it: Item) -> i64 {
        match it {
            Item::Event(e) => self.events[e as usize].timestamp.timestamp_micros(),
            Item::Row(b, r) => self.batches[b as usize].batch.rows[r as usize].timestamp.timestamp_micros(),
        }
    }

    /// Adds the event of `it` to `b` (`props` is scratch space).
    fn push_to(&self, it: Item, b: &mut BatchBuilder, props: &mut String, enricher: &mut sluice_enrich::Enricher, typed: &[(String, PropertyType)]) {
        match it {
            Item::Event(e) => b.push(&self.events[e as usize], enricher, typed),
            Item::Row(bi, ri) => {
                let rows = &self.batches[bi as usize];
                let (h, r) = (&rows.batch.header, &rows.batch.rows[ri as usize]);
                rows.properties_into(ri as usize, props);
                let fields = Fields {
                    id: r.id.as_str(),
                    event_type: h.event_type.as_str(),
                    timestamp: r.timestamp.timestamp_micros(),
                    received_at: h.received_at.timestamp_micros(),
                    customer_id: r.customer_id.as_deref(),
                    subscription_id: r.subscription_id.as_deref(),
                    user_id: None,
                    properties: props,
                    context: rows.context(),
                };
                b.push_fields(&fields, enricher, typed);
            }
        }
    }
}

#[derive(Default)]
struct Buffer {
    /// Events per "workspace NUL event type", then per hour: looked up with
    /// a reused scratch key, so buffering an event allocates no key.
    groups: HashMap<String, HashMap<i64, Vec<Item>>>,
    sources: Sources,
    scratch: String,
    /// Approximate memory the buffered events take.
    bytes: usize,
    events: usize,
    since: Option<Instant>,
}

impl Buffer {
    /// The hours of the group of (workspace, event type).
    fn hours(&mut self, workspace: &str, event_type: &str) -> &mut HashMap<i64, Vec<Item>> {
        self.scratch.clear();
        self.scratch.push_str(workspace);
        self.scratch.push('\0');
        self.scratch.push_str(event_type);
        if !self.groups.contains_key(self.scratch.as_str()) {
            self.groups.insert(self.scratch.clone(), HashMap::new());
        }
        self.groups.get_mut(self.scratch.as_str()).expect("inserted above")
    }

    fn push(&mut self, payload: Payload, payload_bytes: usize) {
        self.since.get_or_insert_with(Instant::now);
        match payload {
            Payload::Event(e) => {
                self.bytes += payload_bytes + EVENT_MEMORY_OVERHEAD;
                self.events += 1;
                let hour = layout::hour_start(e.timestamp).timestamp_micros();
                let item = Item::Event(self.sources.events.len() as u32);
                self.hours(e.workspace.as_str(), e.event_type.as_str()).entry(hour).or_default().push(item);
                self.sources.events.push(e);
            }
            Payload::Batch(batch) => {
                let n = batch.rows.len();
                self.bytes += payload_bytes + n * BATCH_ROW_MEMORY;
                self.events += n;
                let bi = self.sources.batches.len() as u32;
                let rows = BatchRows::new(batch);
                let hours = self.hours(rows.batch.header.workspace.as_str(), rows.batch.header.event_type.as_str());
                for (ri, r) in rows.batch.rows.iter().enumerate() {
                    let hour = layout::hour_start(r.timestamp).timestamp_micros();
                    hours.entry(hour).or_default().push(Item::Row(bi, ri as u32));
                }
                self.sources.batches.push(rows);
            }
        }
    }
}

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
    /// nor decodes: during a 1,000,000-row import, reading and buffering for
    /// the lake took a fifth of the server's CPU samples (session 9), on the
    /// cores the import and the meters were waiting for (only the Parquet
    /// threads run at low priority); and resuming as soon as the burst
    /// ended put its reads and its `syncfs` beside the meters' final
    /// commits. The pause lasts until neither is the case, or
    /// `flush_interval` at most (a buffer that falls due meanwhile is
    /// flushed); after that the writer works as usual, at its low
    /// priority, until the busy period ends. So the lake lags an import by
    /// at most `flush_interval` more than it would otherwise.
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
                        match Payload::decode(&r.payload) {
                            Ok(payload) => buf.push(payload, r.payload.len()),
                            // No rows: logged and counted as every reader does.
                            Err(e) => sluice_core::undecodable("lake", p, r.offset, &e),
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
        let mut groups: Vec<Group> = buf
            .groups
            .into_iter()
            .flat_map(|(wt, hours)| {
                let (ws, ty) = wt.split_once('\0').map(|(w, t)| (w.to_owned(), t.to_owned())).unwrap_or_default();
                hours.into_iter().map(move |(h, v)| ((ws.clone(), ty.clone(), h), v))
            })
            .map(|(k, v)| {
                let typed = self.schemas.get(&k.0, &k.1).map(|s| s.properties.clone()).unwrap_or_default();
                (k, v, typed)
            })
            .collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
        let root = self.cfg.root.clone();
        let rg = self.cfg.row_group_rows;
        let sources = buf.sources;
        let files = tokio::task::spawn_blocking(move || write_groups(&root, groups, &sources, rg)).await?;
        let files = match files {
            Ok(f) => f,
            Err((written, e)) => {
                remove_files(&self.cfg.root, &written);
                return Err(e);
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

/// The events of one file: (workspace, type, hour), the events, and the
/// declared properties of the type (typed columns).
type Group = (Key, Vec<Item>, Vec<(String, PropertyType)>);

fn remove_files(root: &Path, files: &[LakeFile]) {
    for f in files {
        let _ = std::fs::remove_file(root.join(&f.path));
    }
}

/// Writes every group as one file, on all cores. On error returns the files
/// already in place (for removal) and the error.
fn write_groups(root: &Path, groups: Vec<Group>, sources: &Sources, row_group_rows: usize) -> Result<Vec<LakeFile>, (Vec<LakeFile>, LakeError)> {
    // Files are written and renamed without an fsync each; one sync of the
    // whole file system below makes them all durable before the manifest
    // commit (thousands of fsyncs cost seconds when a flush spans many
    // partitions, e.g. a backfill of old events).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(groups.len().max(1));
    let work = std::sync::Mutex::new(groups.into_iter());
    let results: Vec<Result<LakeFile, LakeError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    background_priority();
                    let mut out = Vec::new();
                    let mut enricher = sluice_enrich::Enricher::new();
                    loop {
                        let next = work.lock().expect("work lock").next();
                        let Some(((ws, ty, hour), items, typed)) = next else { break };
                        let hour = DateTime::<Utc>::from_timestamp_micros(hour).unwrap_or_default();
                        let file = FileSpec { root, workspace: &ws, content_type: &ty, hour, typed: &typed, row_group_rows };
                        out.push(write_items(&file, &items, sources, &mut enricher));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(LakeError::WriterPanicked)])).collect()
    });
    let mut ok = Vec::new();
    let mut err = None;
    for r in results {
        match r {
            Ok(f) => ok.push(f),
            Err(e) => err = Some(e),
        }
    }
    if let Some(e) = err {
        return Err((ok, e));
    }
    match sync_files(root, &ok) {
        Ok(()) => Ok(ok),
        Err(e) => Err((ok, LakeError::Sync(e))),
    }
}

/// Lowers the calling thread's CPU priority (nice +10 on Linux): encoding
/// Parquet is background work, and while ingest, the consumers or queries
/// want both cores they come first. The lake then lags a little longer
/// behind a large import (its buffer stays bounded by `lake.flush_bytes`:
/// it reads no further until the flush is written) and catches up as soon
/// as a core is free. An idle machine writes at full speed.
fn background_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "cannot lower the lake writer thread's priority");
    }
}

/// Makes `files` (and their renames) durable: one `syncfs` of the lake's
/// file system on Linux, an fsync of every file and directory elsewhere.
pub fn sync_files(root: &Path, files: &[LakeFile]) -> std::io::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        let dir = std::fs::File::open(root)?;
        if rustix::fs::syncfs(&dir).is_ok() {
            return Ok(());
        }
    }
    let mut dirs = HashSet::new();
    for f in files {
        let p = root.join(&f.path);
        std::fs::File::open(&p)?.sync_all()?;
        if let Some(d) = p.parent() {
            dirs.insert(d.to_path_buf());
        }
    }
    for d in dirs {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Where and how one Parquet file is written: lake root, partition
/// (workspace, event type, hour), typed columns, rows per row group.
struct FileSpec<'a> {
    root: &'a Path,
    workspace: &'a str,
    content_type: &'a str,
    hour: DateTime<Utc>,
    typed: &'a [(String, PropertyType)],
    row_group_rows: usize,
}

/// Writes one Parquet file of the buffered `items` (all of one partition)
/// atomically: temp file, rename into the partition. Not durable yet: the
/// caller calls [`sync_files`] for all files of a flush at once.
fn write_items(spec: &FileSpec<'_>, items: &[Item], sources: &Sources, enricher: &mut sluice_enrich::Enricher) -> Result<LakeFile, LakeError> {
    let FileSpec { root, workspace, content_type, hour, typed, row_group_rows } = *spec;
    let mut b = BatchBuilder::new(typed, row_group_rows.min(items.len()).max(1));
    let rel = layout::new_file(workspace, content_type, hour);
    let tmp_dir = root.join("_tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(|source| LakeError::Step { step: format!("creating {}", tmp_dir.display()), source })?;
    let tmp = tmp_dir.join(format!("{}.parquet", uuid::Uuid::now_v7().simple()));
    let f = std::fs::File::create(&tmp).map_err(|source| LakeError::Step { step: format!("creating {}", tmp.display()), source })?;
    let mut w = ArrowWriter::try_new(f, b.schema().clone(), Some(writer_properties(row_group_rows)))?;
    let (mut min, mut max) = (i64::MAX, i64::MIN);
    let mut props = String::new();
    for chunk in items.chunks(row_group_rows.max(1)) {
        for &it in chunk {
            let t = sources.timestamp(it);
            min = min.min(t);
            max = max.max(t);
            sources.push_to(it, &mut b, &mut props, enricher, typed);
        }
        w.write(&b.finish())?;
    }
    let f = w.into_inner()?;
    let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    drop(f);
    let dest = root.join(&rel);
    let dir = dest.parent().expect("a partition file has a directory");
    std::fs::create_dir_all(dir).map_err(|source| LakeError::Step { step: format!("creating {}", dir.display()), source })?;
    std::fs::rename(&tmp, &dest).map_err(|source| LakeError::Step { step: format!("renaming into {}", dest.display()), source })?;
    Ok(LakeFile {
        path: rel,
        workspace: workspace.to_owned(),
        content_type: content_type.to_owned(),
        hour_start: hour,
        row_count: items.len() as u64,
        bytes,
        min_time: DateTime::from_timestamp_micros(min).unwrap_or(hour),
        max_time: DateTime::from_timestamp_micros(max).unwrap_or(hour),
        created_at: Utc::now(),
    })
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
