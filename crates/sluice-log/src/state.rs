//! State shared between the API, the writer thread, readers and retention.

use crate::format::{partition_dir_name, segment_file_name};
use crate::writer::Queue;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Sealed segments whose sparse index is kept in memory, per partition. The
/// active segment's index is always kept. With 64 MiB segments and one entry
/// per 64 KiB this bounds index memory to roughly 16 KiB * 17 per partition.
pub(crate) const MAX_CACHED_INDEXES: usize = 16;

/// Read positions remembered per partition (about one per concurrent consumer).
pub(crate) const MAX_READ_HINTS: usize = 32;

/// One sparse index entry: the record with `offset` starts at byte `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Offset of the record.
    pub offset: u64,
    /// Byte position of its header in the segment file.
    pub pos: u64,
}

/// Finds the last index entry at or before `offset`, falling back to the
/// first record after the segment header.
pub(crate) fn index_lookup(index: &[IndexEntry], base: u64, offset: u64) -> IndexEntry {
    let n = index.partition_point(|e| e.offset <= offset);
    if n == 0 {
        IndexEntry { offset: base, pos: crate::format::SEGMENT_HEADER_LEN }
    } else {
        index[n - 1]
    }
}

/// What readers and retention know about one segment file. Only durable
/// (fsynced) data is described: `len` and `end` never run ahead of the disk.
#[derive(Debug)]
pub(crate) struct SegmentInfo {
    /// Offset of the first record; also the file name.
    pub base: u64,
    /// Offset after the last durable record.
    pub end: u64,
    /// Durable length of the file in bytes, header included.
    pub len: u64,
    /// Largest record timestamp, when known (always for the active segment,
    /// lazily for older ones).
    pub max_ts: Option<i64>,
    /// Sparse index; always present for the active segment, cached for a
    /// bounded number of sealed ones.
    pub index: Option<Vec<IndexEntry>>,
    /// Recency stamp for evicting cached indexes.
    pub last_used: AtomicU64,
}

/// Per-partition shared state.
#[derive(Debug)]
pub(crate) struct PartitionState {
    /// Partition number.
    pub id: u32,
    /// The partition directory.
    pub dir: PathBuf,
    /// Offset the next appended record gets. Advanced when an append is
    /// queued (under the queue lock) and reset to `durable` if a write fails.
    pub next: AtomicU64,
    /// Offsets below this are fsynced and readable.
    pub durable: AtomicU64,
    /// First offset still on disk.
    pub start: AtomicU64,
    /// Segments, ordered by base offset; the last one is the active segment.
    pub segments: RwLock<Vec<SegmentInfo>>,
    /// Clock for `SegmentInfo::last_used`.
    pub tick: AtomicU64,
    /// Where recent reads stopped (segment base, next record), so that a
    /// consumer reading sequentially continues without an index lookup or
    /// an index build. At most [`MAX_READ_HINTS`] entries.
    pub read_hints: Mutex<VecDeque<(u64, IndexEntry)>>,
}

impl PartitionState {
    /// Remembers that the record `at` of segment `base` is where a read stopped.
    pub(crate) fn remember_read_position(&self, base: u64, at: IndexEntry) {
        let mut hints = lock(&self.read_hints);
        if hints.iter().any(|h| *h == (base, at)) {
            return;
        }
        if hints.len() >= MAX_READ_HINTS {
            hints.pop_front();
        }
        hints.push_back((base, at));
    }

    /// The closest remembered read position at or before `offset` in segment `base`.
    pub(crate) fn read_hint(&self, base: u64, offset: u64) -> Option<IndexEntry> {
        lock(&self.read_hints).iter().filter(|(b, e)| *b == base && e.offset <= offset).map(|(_, e)| *e).max_by_key(|e| e.offset)
    }

    /// Path of the segment file with base offset `base`.
    pub(crate) fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.join(segment_file_name(base))
    }

    /// Installs a freshly built index for the sealed segment `base`, evicting
    /// the least recently used cached index if there are too many.
    pub(crate) fn install_index(&self, base: u64, index: Vec<IndexEntry>, max_ts: Option<i64>) {
        let mut segs = write(&self.segments);
        let Ok(i) = segs.binary_search_by_key(&base, |s| s.base) else {
            return; // deleted by retention meanwhile
        };
        let stamp = self.tick.fetch_add(1, Ordering::Relaxed);
        segs[i].index = Some(index);
        segs[i].max_ts = max_ts;
        segs[i].last_used.store(stamp, Ordering::Relaxed);
        let last = segs.len() - 1;
        let cached = segs[..last].iter().filter(|s| s.index.is_some()).count();
        if cached > MAX_CACHED_INDEXES {
            let victim = segs[..last]
                .iter()
                .enumerate()
                .filter(|(_, s)| s.index.is_some())
                .min_by_key(|(_, s)| s.last_used.load(Ordering::Relaxed))
                .map(|(i, _)| i);
            if let Some(v) = victim {
                segs[v].index = None;
            }
        }
    }
}

/// Everything behind an [`crate::EmbeddedLog`].
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration the log was opened with.
    pub cfg: crate::LogConfig,
    /// One entry per partition.
    pub partitions: Vec<PartitionState>,
    /// Appends waiting for the writer thread.
    pub queue: Mutex<Queue>,
    /// Wakes the writer thread.
    pub wake: Condvar,
    /// Bumped after every durable group commit.
    pub watch_tx: tokio::sync::watch::Sender<u64>,
    /// Completed group-commit rounds.
    pub sync_rounds: AtomicU64,
    /// Serialises retention passes.
    pub retention: Mutex<()>,
    /// Test hook: the writer fails the write of this partition.
    #[cfg(test)]
    pub fail_partition: std::sync::atomic::AtomicU32,
}

impl Shared {
    /// Whether a test asked the writer to fail writes to `partition`.
    pub(crate) fn injected_failure(&self, partition: u32) -> bool {
        #[cfg(test)]
        {
            self.fail_partition.load(Ordering::Relaxed) == partition
        }
        #[cfg(not(test))]
        {
            let _ = partition;
            false
        }
    }
}

/// Directory of `partition` under `root`.
pub(crate) fn partition_dir(root: &Path, partition: u32) -> PathBuf {
    root.join(partition_dir_name(partition))
}

// Lock helpers. A panic while holding one of these locks cannot leave the
// protected data half-updated in a way later users could not cope with (every
// update is a few field stores), so poisoning is ignored rather than turned
// into a panic in every caller.

/// Locks a mutex, ignoring poisoning.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks an RwLock, ignoring poisoning.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks an RwLock, ignoring poisoning.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Opens a directory and fsyncs it so that created, renamed or deleted
/// entries are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_lookup_finds_floor_entry() {
        let idx = [IndexEntry { offset: 10, pos: 1000 }, IndexEntry { offset: 20, pos: 2000 }];
        assert_eq!(index_lookup(&idx, 0, 5), IndexEntry { offset: 0, pos: 32 });
        assert_eq!(index_lookup(&idx, 0, 10), IndexEntry { offset: 10, pos: 1000 });
        assert_eq!(index_lookup(&idx, 0, 19), IndexEntry { offset: 10, pos: 1000 });
        assert_eq!(index_lookup(&idx, 0, 25), IndexEntry { offset: 20, pos: 2000 });
        assert_eq!(index_lookup(&[], 7, 25), IndexEntry { offset: 7, pos: 32 });
    }
}
