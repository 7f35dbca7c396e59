//! The writer thread and group commit.
//!
//! `append` reserves offsets and queues its records under the queue lock,
//! then waits on a oneshot channel. One dedicated thread takes everything
//! queued (up to [`ROUND_MAX_BYTES`]), encodes one buffer per touched
//! partition, writes and fsyncs the partitions in parallel, publishes the new
//! durable watermarks and answers every caller of the round. While it syncs,
//! new appends pile up in the queue and share the next round's fsyncs.

use crate::format::{encode_record, encode_segment_header, record_size, INDEX_INTERVAL_BYTES, SEGMENT_HEADER_LEN};
use crate::state::{lock, sync_dir, write, IndexEntry, PartitionState, SegmentInfo, Shared};
use sluice_core::{AppendRecord, LogError};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Payload bytes one round takes from the queue at most (a single larger
/// append is still taken whole). Bounds the encode buffers.
pub(crate) const ROUND_MAX_BYTES: usize = 32 << 20;

/// A record of a round with its reserved offset.
type Slot<'a> = (u64, &'a AppendRecord);

/// One queued `append` call.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The records, in call order.
    pub records: Vec<AppendRecord>,
    /// Offsets reserved for them.
    pub offsets: Vec<u64>,
    /// Sum of payload lengths.
    pub payload_bytes: usize,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<Vec<u64>, LogError>>,
}

/// The append queue, protected by `Shared::queue`.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Appends waiting for the writer, in offset order.
    pub pending: VecDeque<Pending>,
    /// No more appends are accepted; the writer drains and exits.
    pub closed: bool,
    /// Set when a failed write could not be rolled back: the files may hold
    /// bytes the log does not know about, so appends are refused until the
    /// log is reopened (recovery then repairs the tail).
    pub failed: Option<String>,
}

/// Write-side view of a segment (the active one, or one being created).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegState {
    /// Base offset.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset after the last record.
    pub end: u64,
    /// Position of the last sparse index entry (or the header end).
    pub last_index_pos: u64,
    /// Largest record timestamp.
    pub max_ts: Option<i64>,
}

/// The active segment of a partition, owned by the writer thread.
#[derive(Debug)]
pub(crate) struct ActiveSegment {
    /// Opened for appending.
    pub file: File,
    /// Its durable state.
    pub st: SegState,
}

/// What one partition wrote in a round, before it is published.
struct Staged {
    partition: u32,
    /// Length of the active segment before the round.
    old_len: u64,
    /// Whether bytes were appended to the active segment.
    touched_active: bool,
    /// State of the active segment after the round.
    active: SegState,
    /// New index entries of the active segment.
    active_index: Vec<IndexEntry>,
    /// Segments created in the round, oldest first.
    created: Vec<(SegState, Vec<IndexEntry>, File, PathBuf)>,
}

/// One contiguous write into one segment file.
struct Chunk {
    new_file: bool,
    st: SegState,
    index: Vec<IndexEntry>,
    buf: Vec<u8>,
}

/// Builds the chunks for one partition: usually a single buffer appended to
/// the active segment; more when the data crosses `segment_bytes`.
fn plan(partition: u32, active: SegState, records: &[Slot<'_>], segment_bytes: u64) -> Vec<Chunk> {
    let total: u64 = records.iter().map(|(_, r)| record_size(r.payload.len())).sum();
    let first_cap = total.min(segment_bytes) as usize;
    let mut chunks = Vec::with_capacity(1);
    let mut cur = Chunk { new_file: false, st: active, index: Vec::new(), buf: Vec::with_capacity(first_cap) };
    for &(offset, rec) in records {
        debug_assert_eq!(offset, cur.st.end, "offsets of a partition are dense within a round");
        let size = record_size(rec.payload.len());
        if cur.st.end > cur.st.base && cur.st.len + size > segment_bytes {
            let next = Chunk {
                new_file: true,
                st: SegState { base: offset, len: SEGMENT_HEADER_LEN, end: offset, last_index_pos: SEGMENT_HEADER_LEN, max_ts: None },
                index: Vec::new(),
                buf: encode_segment_header(partition, offset).to_vec(),
            };
            chunks.push(std::mem::replace(&mut cur, next));
        }
        if cur.st.len - cur.st.last_index_pos >= INDEX_INTERVAL_BYTES {
            cur.index.push(IndexEntry { offset, pos: cur.st.len });
            cur.st.last_index_pos = cur.st.len;
        }
        encode_record(&mut cur.buf, offset, rec.timestamp_ms, &rec.payload);
        cur.st.len += size;
        cur.st.end += 1;
        cur.st.max_ts = Some(cur.st.max_ts.map_or(rec.timestamp_ms, |m| m.max(rec.timestamp_ms)));
    }
    chunks.push(cur);
    chunks
}

/// Writes and fsyncs one partition's share of a round. Chunks are written in
/// order and each is fsynced before the next segment file is created, so
/// after a crash only the last segment can hold a torn tail. On error the
/// partition is rolled back; the `bool` says whether that succeeded.
fn write_partition(
    part: &PartitionState,
    active: &ActiveSegment,
    records: &[Slot<'_>],
    segment_bytes: u64,
    inject_failure: bool,
) -> Result<Staged, (io::Error, bool)> {
    let chunks = plan(part.id, active.st, records, segment_bytes);
    let mut staged = Staged {
        partition: part.id,
        old_len: active.st.len,
        touched_active: false,
        active: active.st,
        active_index: Vec::new(),
        created: Vec::new(),
    };
    let mut result = Ok(());
    for chunk in chunks {
        let step = if chunk.new_file {
            write_new_segment(part, &chunk).map(|(file, path)| {
                staged.created.push((chunk.st, chunk.index, file, path));
            })
        } else {
            staged.touched_active = true;
            let mut f = &active.file;
            f.write_all(&chunk.buf).and_then(|()| active.file.sync_data()).map(|()| {
                staged.active = chunk.st;
                staged.active_index = chunk.index;
            })
        };
        if let Err(e) = step {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() && inject_failure {
        result = Err(io::Error::other("injected write failure"));
    }
    match result {
        Ok(()) => Ok(staged),
        Err(e) => {
            let rolled_back = rollback(part, active, staged);
            Err((e, rolled_back))
        }
    }
}

/// Creates a segment file with `create_new`, writes the chunk (header
/// included) and fsyncs the file and the directory.
fn write_new_segment(part: &PartitionState, chunk: &Chunk) -> io::Result<(File, PathBuf)> {
    let path = part.segment_path(chunk.st.base);
    let mut file = OpenOptions::new().append(true).create_new(true).open(&path)?;
    let written = file.write_all(&chunk.buf).and_then(|()| file.sync_data()).and_then(|()| sync_dir(&part.dir));
    match written {
        Ok(()) => Ok((file, path)),
        Err(e) => {
            // Not yet in `staged.created`: remove it here.
            drop(file);
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Undoes a partition's writes of a failed round: truncates the active
/// segment to its old length and deletes created segments. Returns whether
/// every step (including the fsyncs) succeeded.
fn rollback(part: &PartitionState, active: &ActiveSegment, staged: Staged) -> bool {
    let mut ok = true;
    if staged.touched_active {
        ok &= active.file.set_len(staged.old_len).and_then(|()| active.file.sync_data()).is_ok();
    }
    let created = !staged.created.is_empty();
    for (_, _, file, path) in staged.created.into_iter().rev() {
        drop(file);
        ok &= std::fs::remove_file(&path).is_ok();
    }
    if created {
        ok &= sync_dir(&part.dir).is_ok();
    }
    if !ok {
        tracing::error!(partition = part.id, "rolling back a failed log write failed too");
    }
    ok
}

/// Makes sure no append waits forever if the writer thread panics: answers
/// everything queued and refuses later appends.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let panicked = std::thread::panicking();
        let pending = {
            let mut q = lock(&self.0.queue);
            if panicked {
                tracing::error!("the log writer thread panicked; appends fail until the log is reopened");
                q.failed = Some("the log writer thread panicked; reopen the log".into());
            }
            std::mem::take(&mut q.pending)
        };
        for p in pending {
            let err = if panicked { LogError::Io(io::Error::other("the log writer thread panicked; reopen the log")) } else { LogError::Closed };
            let _ = p.reply.send(Err(err));
        }
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: Vec<ActiveSegment>,
}

impl Writer {
    /// Creates the writer over the recovered active segments (one per partition).
    pub(crate) fn new(shared: Arc<Shared>, active: Vec<ActiveSegment>) -> Writer {
        Writer { shared, active }
    }

    /// Runs rounds until the log is closed and the queue is drained, then
    /// fsyncs every active segment once more.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let _guard = ExitGuard(Arc::clone(&self.shared));
        loop {
            let group = {
                let mut q = lock(&self.shared.queue);
                while q.pending.is_empty() && !q.closed {
                    q = self.shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                if q.pending.is_empty() {
                    break;
                }
                let mut group = Vec::new();
                let mut bytes = 0usize;
                while let Some(front) = q.pending.front() {
                    if !group.is_empty() && bytes + front.payload_bytes > ROUND_MAX_BYTES {
                        break;
                    }
                    bytes += front.payload_bytes;
                    group.extend(q.pending.pop_front());
                }
                group
            };
            self.round(group);
        }
        let mut result = Ok(());
        for a in &self.active {
            if let Err(e) = a.file.sync_all() {
                result = Err(e);
            }
        }
        result
    }

    /// Writes one group: all or nothing.
    fn round(&mut self, group: Vec<Pending>) {
        let shared = Arc::clone(&self.shared);
        let n = shared.partitions.len();
        let mut per: Vec<Vec<Slot<'_>>> = (0..n).map(|_| Vec::new()).collect();
        for p in &group {
            for (rec, &off) in p.records.iter().zip(&p.offsets) {
                per[rec.partition as usize].push((off, rec));
            }
        }
        let seg_bytes = shared.cfg.segment_bytes;
        let jobs: Vec<(&PartitionState, &ActiveSegment, &[Slot<'_>])> = per
            .iter()
            .enumerate()
            .filter(|(_, recs)| !recs.is_empty())
            .map(|(i, recs)| (&shared.partitions[i], &self.active[i], recs.as_slice()))
            .collect();
        let results: Vec<Result<Staged, (io::Error, bool)>> = if jobs.len() == 1 {
            let (part, active, recs) = jobs[0];
            vec![write_partition(part, active, recs, seg_bytes, shared.injected_failure(part.id))]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = jobs
                    .iter()
                    .map(|&(part, active, recs)| {
                        let fail = shared.injected_failure(part.id);
                        s.spawn(move || write_partition(part, active, recs, seg_bytes, fail))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err((io::Error::other("log partition writer panicked"), false)))).collect()
            })
        };
        drop(jobs);

        let mut staged = Vec::with_capacity(results.len());
        let mut failure: Option<(io::Error, bool)> = None;
        for r in results {
            match r {
                Ok(s) => staged.push(s),
                Err((e, rolled_back)) => match &mut failure {
                    None => failure = Some((e, rolled_back)),
                    Some((_, ok)) => *ok &= rolled_back,
                },
            }
        }
        drop(per);

        match failure {
            None => {
                for s in staged {
                    self.publish(s);
                }
                let round = shared.sync_rounds.fetch_add(1, Ordering::AcqRel) + 1;
                // Notify tailing readers before answering the appenders, so an
                // appender that subscribes after its append returned never sees
                // a stale change notification for its own round.
                shared.watch_tx.send_replace(round);
                for p in group {
                    let _ = p.reply.send(Ok(p.offsets));
                }
            }
            Some((err, mut rolled_back)) => {
                for s in staged {
                    let part = &shared.partitions[s.partition as usize];
                    rolled_back &= rollback(part, &self.active[s.partition as usize], s);
                }
                self.fail(group, err, rolled_back);
            }
        }
    }

    /// Makes a partition's staged writes visible: segment metadata first,
    /// then the durable watermark (under the segments lock, so a reader that
    /// loaded the watermark finds segments at least that new).
    fn publish(&mut self, s: Staged) {
        let part = &self.shared.partitions[s.partition as usize];
        let active = &mut self.active[s.partition as usize];
        let mut segs = write(&part.segments);
        if let Some(last) = segs.last_mut() {
            last.len = s.active.len;
            last.end = s.active.end;
            last.max_ts = s.active.max_ts;
            last.index.get_or_insert_with(Vec::new).extend(s.active_index);
        }
        active.st = s.active;
        for (st, index, file, path) in s.created {
            tracing::debug!(partition = s.partition, segment = %path.display(), "rolled to a new segment");
            segs.push(SegmentInfo {
                base: st.base,
                end: st.end,
                len: st.len,
                max_ts: st.max_ts,
                index: Some(index),
                last_used: AtomicU64::new(part.tick.fetch_add(1, Ordering::Relaxed)),
            });
            *active = ActiveSegment { file, st };
        }
        part.durable.store(active.st.end, Ordering::Release);
    }

    /// Fails the group and everything queued behind it (their reserved
    /// offsets follow the failed ones) and rewinds `next` to the durable
    /// watermark of every partition.
    fn fail(&self, group: Vec<Pending>, err: io::Error, rolled_back: bool) {
        let msg = if rolled_back {
            format!("append failed and was rolled back: {err}")
        } else {
            format!("append failed and could not be rolled back (reopen the log to repair it): {err}")
        };
        tracing::error!(error = %err, rolled_back, "log append failed");
        let queued = {
            let mut q = lock(&self.shared.queue);
            if !rolled_back {
                q.failed = Some(msg.clone());
            }
            for part in &self.shared.partitions {
                part.next.store(part.durable.load(Ordering::Acquire), Ordering::Release);
            }
            std::mem::take(&mut q.pending)
        };
        for p in group.into_iter().chain(queued) {
            let _ = p.reply.send(Err(LogError::Io(io::Error::new(err.kind(), msg.clone()))));
        }
    }
}
