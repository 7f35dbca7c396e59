//! Lake files written: the lake writer's buffer of decoded events, the
//! Parquet files it writes from it (on all cores, made durable at once),
//! and compaction's merge of small files. The callers in `sluice-lake`
//! commit the files to the manifest.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{new_null_array, ArrayRef};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use sluice_core::lake::{LakeFile, PropertyType};
use sluice_core::{BatchRows, Event, Payload, PayloadError};

use crate::columns::{BatchBuilder, Fields};
use crate::ColumnarError;

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

/// Events read from the log and not yet written, grouped by file
/// (workspace, event type, UTC hour).
#[derive(Default)]
pub struct Buffer {
    /// Events per "workspace NUL event type", then per hour: looked up with
    /// a reused scratch key, so buffering an event allocates no key.
    groups: HashMap<String, HashMap<i64, Vec<Item>>>,
    sources: Sources,
    scratch: String,
    /// Approximate memory the buffered events take.
    pub bytes: usize,
    /// Buffered events.
    pub events: usize,
    /// When the first buffered event was read.
    pub since: Option<Instant>,
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

    /// Decodes one log record's payload and buffers its events; an
    /// undecodable payload buffers nothing.
    pub fn push_record(&mut self, bytes: &[u8]) -> Result<(), PayloadError> {
        let payload = Payload::decode(bytes)?;
        self.push(payload, bytes.len());
        Ok(())
    }

    /// Buffers one decoded log record (`payload_bytes`: its size in the log).
    fn push(&mut self, payload: Payload, payload_bytes: usize) {
        self.since.get_or_insert_with(Instant::now);
        match payload {
            Payload::Event(e) => {
                self.bytes += payload_bytes + EVENT_MEMORY_OVERHEAD;
                self.events += 1;
                let hour = crate::layout::hour_start(e.timestamp).timestamp_micros();
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
                    let hour = crate::layout::hour_start(r.timestamp).timestamp_micros();
                    hours.entry(hour).or_default().push(Item::Row(bi, ri as u32));
                }
                self.sources.batches.push(rows);
            }
        }
    }

    /// The buffered events as files to write, largest first (so that the
    /// threads of [`Flush::write`] finish together); `typed` gives the
    /// declared properties of (workspace, event type).
    pub fn into_flush(self, typed: impl Fn(&str, &str) -> Vec<(String, PropertyType)>) -> Flush {
        let mut groups: Vec<Group> = self
            .groups
            .into_iter()
            .flat_map(|(wt, hours)| {
                let (ws, ty) = wt.split_once('\0').map(|(w, t)| (w.to_owned(), t.to_owned())).unwrap_or_default();
                hours.into_iter().map(move |(h, v)| ((ws.clone(), ty.clone(), h), v))
            })
            .map(|(k, v)| {
                let t = typed(&k.0, &k.1);
                (k, v, t)
            })
            .collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
        Flush { groups, sources: self.sources }
    }
}

/// A buffer's events grouped by file, ready to be written.
pub struct Flush {
    groups: Vec<Group>,
    sources: Sources,
}

impl Flush {
    /// Writes every group as one file, on all cores, and makes them
    /// durable. On error returns the files already in place (for
    /// [`remove_files`]) and the error.
    pub fn write(self, root: &Path, row_group_rows: usize) -> Result<Vec<LakeFile>, (Vec<LakeFile>, ColumnarError)> {
        write_groups(root, self.groups, &self.sources, row_group_rows)
    }
}

/// The events of one file: (workspace, type, hour), the events, and the
/// declared properties of the type (typed columns).
type Group = (Key, Vec<Item>, Vec<(String, PropertyType)>);

/// Removes written files again (their commit failed).
pub fn remove_files(root: &Path, files: &[LakeFile]) {
    for f in files {
        let _ = std::fs::remove_file(root.join(&f.path));
    }
}

/// Writes every group as one file, on all cores. On error returns the files
/// already in place (for removal) and the error.
fn write_groups(root: &Path, groups: Vec<Group>, sources: &Sources, row_group_rows: usize) -> Result<Vec<LakeFile>, (Vec<LakeFile>, ColumnarError)> {
    // Files are written and renamed without an fsync each; one sync of the
    // whole file system below makes them all durable before the manifest
    // commit (thousands of fsyncs cost seconds when a flush spans many
    // partitions, e.g. a backfill of old events).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(groups.len().max(1));
    let work = std::sync::Mutex::new(groups.into_iter());
    let results: Vec<Result<LakeFile, ColumnarError>> = std::thread::scope(|s| {
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
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(ColumnarError::WriterPanicked)])).collect()
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
        Err(e) => Err((ok, ColumnarError::Sync(e))),
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
fn write_items(spec: &FileSpec<'_>, items: &[Item], sources: &Sources, enricher: &mut sluice_enrich::Enricher) -> Result<LakeFile, ColumnarError> {
    let FileSpec { root, workspace, content_type, hour, typed, row_group_rows } = *spec;
    let mut b = BatchBuilder::new(typed, row_group_rows.min(items.len()).max(1));
    let rel = crate::layout::new_file(workspace, content_type, hour);
    let tmp_dir = root.join("_tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(|source| ColumnarError::Step { step: format!("creating {}", tmp_dir.display()), source })?;
    let tmp = tmp_dir.join(format!("{}.parquet", uuid::Uuid::now_v7().simple()));
    let f = std::fs::File::create(&tmp).map_err(|source| ColumnarError::Step { step: format!("creating {}", tmp.display()), source })?;
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
    std::fs::create_dir_all(dir).map_err(|source| ColumnarError::Step { step: format!("creating {}", dir.display()), source })?;
    std::fs::rename(&tmp, &dest).map_err(|source| ColumnarError::Step { step: format!("renaming into {}", dest.display()), source })?;
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

/// Compaction's merge: reads `inputs` (the files of one partition) in
/// order and writes them into as few files as `target` bytes allow (schemas
/// unified by column name). Runs on a blocking thread.
pub fn merge(root: &Path, inputs: &[LakeFile], target: u64, row_group_rows: usize) -> Result<Vec<LakeFile>, ColumnarError> {
    let first = &inputs[0];
    // The union of the files' schemas, by column name (first type wins).
    let mut fields: Vec<Field> = Vec::new();
    for f in inputs {
        let file = std::fs::File::open(root.join(&f.path)).map_err(ColumnarError::in_file(&f.path))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(ColumnarError::in_file(&f.path))?;
        for fld in b.schema().fields() {
            if !fields.iter().any(|x| x.name() == fld.name()) {
                fields.push(fld.as_ref().clone().with_nullable(true));
            }
        }
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let mut out: Vec<LakeFile> = Vec::new();
    let mut cur: Option<(ArrowWriter<std::fs::File>, PathBuf, String, u64, i64, i64)> = None;
    let finish = |c: (ArrowWriter<std::fs::File>, PathBuf, String, u64, i64, i64), out: &mut Vec<LakeFile>| -> Result<(), ColumnarError> {
        let (w, tmp, rel, rows, min, max) = c;
        let f = w.into_inner()?;
        f.sync_all()?;
        let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        let dest = root.join(&rel);
        std::fs::rename(&tmp, &dest).map_err(|source| ColumnarError::Step { step: format!("renaming into {rel}"), source })?; // relative: job errors are shown to API clients
        if let Some(d) = dest.parent().and_then(|d| std::fs::File::open(d).ok()) {
            let _ = d.sync_all();
        }
        out.push(LakeFile {
            path: rel,
            workspace: first.workspace.clone(),
            content_type: first.content_type.clone(),
            hour_start: first.hour_start,
            row_count: rows,
            bytes,
            min_time: DateTime::from_timestamp_micros(min).unwrap_or(first.hour_start),
            max_time: DateTime::from_timestamp_micros(max).unwrap_or(first.hour_start),
            created_at: Utc::now(),
        });
        Ok(())
    };
    let result = (|| -> Result<(), ColumnarError> {
        std::fs::create_dir_all(root.join("_tmp"))?;
        for f in inputs {
            let file = std::fs::File::open(root.join(&f.path)).map_err(ColumnarError::in_file(&f.path))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(row_group_rows.min(65_536)).build())
                .map_err(ColumnarError::in_file(&f.path))?;
            for batch in reader {
                let batch = batch.map_err(ColumnarError::in_file(&f.path))?;
                let batch = conform(&batch, &schema)?;
                if cur.is_none() {
                    let tmp = root.join("_tmp").join(format!("{}.parquet", uuid::Uuid::now_v7().simple()));
                    let file = std::fs::File::create(&tmp)?;
                    let w = ArrowWriter::try_new(file, schema.clone(), Some(writer_properties(row_group_rows)))?;
                    cur = Some((w, tmp, crate::layout::new_file(&first.workspace, &first.content_type, first.hour_start), 0, i64::MAX, i64::MIN));
                }
                let c = cur.as_mut().expect("set above");
                c.0.write(&batch)?;
                c.3 += batch.num_rows() as u64;
                if let Some((lo, hi)) = time_range(&batch) {
                    c.4 = c.4.min(lo);
                    c.5 = c.5.max(hi);
                }
                if (c.0.bytes_written() + c.0.in_progress_size()) as u64 >= target {
                    finish(cur.take().expect("set above"), &mut out)?;
                }
            }
        }
        if let Some(c) = cur.take() {
            finish(c, &mut out)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for f in &out {
            let _ = std::fs::remove_file(root.join(&f.path));
        }
        return Err(e);
    }
    Ok(out)
}

/// `batch` with exactly the columns of `schema` (missing ones null).
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ColumnarError> {
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => c.clone(),
            Some(c) => arrow::compute::cast(c, f.data_type()).unwrap_or_else(|_| new_null_array(f.data_type(), batch.num_rows())),
            None => new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

fn time_range(batch: &RecordBatch) -> Option<(i64, i64)> {
    use arrow::array::TimestampMicrosecondArray;
    let c = batch.column_by_name("timestamp")?.as_any().downcast_ref::<TimestampMicrosecondArray>()?;
    let lo = arrow::compute::min(c)?;
    let hi = arrow::compute::max(c)?;
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(i: usize, ty: &str, hour: u32) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"workspace": "w", "id": format!("e{i}"), "type": ty,
            "timestamp": format!("2026-11-01T{hour:02}:30:00Z"), "received_at": "2026-11-01T23:00:00Z",
            "properties": {"n": i}, "context": {}}))
        .unwrap()
    }

    fn rows_in(root: &Path, f: &LakeFile) -> usize {
        let file = std::fs::File::open(root.join(&f.path)).unwrap();
        ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(|b| b.unwrap().num_rows()).sum()
    }

    #[test]
    fn a_buffer_becomes_one_file_per_type_and_hour_with_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Buffer::default();
        for i in 0..30 {
            let (ty, hour) = [("page", 1), ("page", 2), ("signup", 1)][i % 3];
            buf.push_record(&event(i, ty, hour)).unwrap();
        }
        // Undecodable: an error, and nothing buffered.
        assert!(buf.push_record(b"not a payload").is_err());
        assert_eq!(buf.events, 30);
        assert!(buf.since.is_some() && buf.bytes > 30 * EVENT_MEMORY_OVERHEAD);
        let typed = |_: &str, ty: &str| if ty == "page" { vec![("n".to_owned(), PropertyType::Int64)] } else { vec![] };
        let mut files = buf.into_flush(typed).write(dir.path(), 1024).unwrap();
        files.sort_by(|a, b| (&a.content_type, a.hour_start).cmp(&(&b.content_type, b.hour_start)));
        let got: Vec<(&str, u32, u64)> =
            files.iter().map(|f| (f.content_type.as_str(), chrono::Timelike::hour(&f.hour_start), f.row_count)).collect();
        assert_eq!(got, [("page", 1, 10), ("page", 2, 10), ("signup", 1, 10)]);
        for f in &files {
            assert_eq!(rows_in(dir.path(), f), f.row_count as usize, "{}", f.path);
            assert!(f.path.starts_with("workspace=w/content_type="), "{}", f.path);
            assert!(f.min_time <= f.max_time && f.bytes > 0);
        }
        // The typed column is in the page files only.
        let file = std::fs::File::open(dir.path().join(&files[0].path)).unwrap();
        let schema = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().schema().clone();
        assert!(schema.field_with_name(&crate::columns::typed_column("n")).is_ok(), "{schema:?}");
        // Nothing left in _tmp.
        assert_eq!(std::fs::read_dir(dir.path().join("_tmp")).unwrap().count(), 0);
    }

    #[test]
    fn merging_keeps_every_row_and_unifies_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let mut written = Vec::new();
        for (k, typed) in [(0, vec![("n".to_owned(), PropertyType::Int64)]), (1, vec![])] {
            let mut buf = Buffer::default();
            for i in 0..5 {
                buf.push_record(&event(k * 10 + i, "page", 1)).unwrap();
            }
            let t = typed.clone();
            written.extend(buf.into_flush(move |_: &str, _: &str| t.clone()).write(dir.path(), 1024).unwrap());
        }
        let merged = merge(dir.path(), &written, 64 << 20, 1024).unwrap();
        assert_eq!(merged.len(), 1);
        assert_eq!((merged[0].row_count, rows_in(dir.path(), &merged[0])), (10, 10));
        assert_eq!(merged[0].min_time, written[0].min_time);
        let file = std::fs::File::open(dir.path().join(&merged[0].path)).unwrap();
        let schema = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().schema().clone();
        assert!(schema.field_with_name(&crate::columns::typed_column("n")).is_ok(), "the typed column of the first file is kept");
    }
}
