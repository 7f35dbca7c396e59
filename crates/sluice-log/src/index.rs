//! The id index: where every accepted event id is in the log.
//!
//! Ingest must know, for every incoming event, whether its id was accepted
//! before (dedup), and `GET /v1/events/{id}` must find an event's record.
//! Both are lookups in one map from a 128-bit key (a hash of workspace and
//! id, computed by the caller) to a log position. A CSV import inserts a
//! million new keys at once; Segment clients send random UUIDs. A B-tree
//! (the state store's table, as in earlier versions) pays a random page
//! write per key, too slow for a million keys at once (measured:
//! docs/BENCHMARKS.md, "Ingest").
//! This index is built for batches instead, like a small LSM tree:
//!
//! - **memtable**: new entries go into a hash map in memory. They need not
//!   be durable: the log is, and on start the entries after the index's
//!   durable *progress* (per partition, the first offset not yet flushed)
//!   are read back from the log ([`IdIndex::progress`]).
//! - **runs**: a flush ([`IdIndex::flush`], when the memtable holds
//!   `flush_entries` or on a timer and at shutdown) sorts the memtable and
//!   writes it as an immutable *run* file, then a new manifest naming every
//!   run and the progress the runs cover. Each run has a blocked Bloom filter
//!   and a block index in memory, so a key that is not in the index (almost
//!   every key of an import) costs a few in-memory probes and no I/O; a key
//!   that may be there costs one 4 KiB read.
//! - **merges**: [`IdIndex::maintain`] deletes runs whose entries are all
//!   older than the dedup window, and merges the two smallest neighbouring
//!   runs while there are more than `max_runs` (dropping expired entries), so
//!   a lookup probes a bounded number of filters.
//!
//! # Files
//!
//! ```text
//! <dir>/manifest.json       {"version":1,"runs":["0000000000000007.run",…],"progress":[[0,5123],…]}
//! <dir>/0000000000000007.run
//! ```
//!
//! A run file (all integers little endian): a 64-byte header — magic
//! `SLIDXRUN`, version (u32, 1), entry count (u64), oldest and newest entry
//! hour (u32 each, hours since the Unix epoch), Bloom blocks (u32), CRC-32 of
//! the preceding 32 bytes, zero padding —; then the entries sorted by key,
//! 32 bytes each (key u128, partition u32, offset u64, hour u32); then one
//! fence per block of [`BLOCK`] entries (first key u128, CRC-32 of the block's
//! bytes u32); then the Bloom filter (64-byte blocks); then a CRC-32 of the
//! fences and filter. Runs are written to a temporary name, fsynced and
//! renamed; the manifest the same way. Files not named by the manifest are
//! deleted on open. A damaged run is detected by its checksums; the caller
//! then [`IdIndex::reset`]s the index and rebuilds it from the log.
//!
//! Why not a crate: embedded key-value stores (fjall, redb, sled) would do,
//! but bring their own journal and background threads; this index needs no
//! journal (the log is one) and no deletes but whole-run expiry, and its
//! batches are large enough that sorting them is the whole write path.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Entries per block: one read of 4 KiB finds a key.
pub const BLOCK: usize = 128;
const ENTRY: usize = 32;
const HEADER: usize = 64;
const MAGIC: &[u8; 8] = b"SLIDXRUN";
const VERSION: u32 = 1;
/// Bloom filter bits per entry; with 8 probes in a 512-bit block the false
/// positive rate is about 0.5 %.
const BLOOM_BITS_PER_KEY: usize = 12;
const BLOOM_PROBES: u32 = 8;

/// A position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Partition.
    pub partition: u32,
    /// Record offset.
    pub offset: u64,
}

/// One key and where its event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Hash of workspace and event id (see `sluice-ingest`).
    pub key: u128,
    /// Log partition.
    pub partition: u32,
    /// Offset of the record holding the event.
    pub offset: u64,
    /// Receive hour (hours since the Unix epoch): entries older than the
    /// dedup window are dropped by [`IdIndex::maintain`].
    pub hour: u32,
}

/// Settings of the index.
#[derive(Debug, Clone, Copy)]
pub struct IdIndexConfig {
    /// Memtable entries that make [`IdIndex::needs_flush`] true.
    pub flush_entries: usize,
    /// Runs kept before neighbours are merged.
    pub max_runs: usize,
}

impl Default for IdIndexConfig {
    fn default() -> Self {
        // 2^18 entries: a memtable of about 17 MiB (and as much for the
        // frozen one being written), so the index stays small in memory
        // while a large import streams through.
        IdIndexConfig { flush_entries: 1 << 18, max_runs: 8 }
    }
}

/// What [`IdIndex::maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Runs deleted because every entry was expired.
    pub runs_expired: usize,
    /// Merges done.
    pub merges: usize,
    /// Entries dropped as expired during merges.
    pub entries_expired: u64,
}

/// Keys are already uniformly distributed hashes: the low 64 bits are the
/// hash of the memtable (and of [`KeySet`]).
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Mem = HashMap<u128, (u32, u64, u32), BuildHasherDefault<KeyHasher>>;

/// A set of index keys, hashed by their low 64 bits (no SipHash: keys are
/// hashes already).
pub type KeySet = std::collections::HashSet<u128, BuildHasherDefault<KeyHasher>>;

/// The index. Lookups take a read lock; inserts and the swap after a flush
/// a short write lock; flushes and merges run one at a time.
pub struct IdIndex {
    dir: PathBuf,
    cfg: IdIndexConfig,
    state: RwLock<State>,
    maintenance: Mutex<()>,
}

#[derive(Default)]
struct State {
    mem: Mem,
    /// The memtable being flushed (still searched).
    frozen: Option<Arc<Mem>>,
    /// Oldest first.
    runs: Vec<Arc<Run>>,
    /// What the memtable and runs cover: per partition, the next offset.
    progress: BTreeMap<u32, u64>,
    /// What the runs cover (the manifest's progress).
    durable: BTreeMap<u32, u64>,
    next_run: u64,
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl IdIndex {
    /// Opens (or creates) the index in `dir`: reads the manifest, opens the
    /// runs it names and deletes every other file. An error means the index
    /// is damaged: [`IdIndex::reset`] and rebuild it.
    pub fn open(dir: &Path, cfg: IdIndexConfig) -> io::Result<IdIndex> {
        std::fs::create_dir_all(dir)?;
        let manifest = dir.join("manifest.json");
        let mut state = State::default();
        if manifest.exists() {
            let m: Manifest = serde_json::from_slice(&std::fs::read(&manifest)?).map_err(|e| corrupt(format!("id index manifest: {e}")))?;
            if m.version != 1 {
                return Err(corrupt(format!("id index manifest version {} (this build reads 1)", m.version)));
            }
            for name in &m.runs {
                state.runs.push(Arc::new(Run::open(&dir.join(name), name)?));
            }
            state.durable = m.progress.into_iter().collect();
            state.progress = state.durable.clone();
            state.next_run = m.next_run;
        }
        // Files of flushes and merges that did not finish.
        let keep: std::collections::HashSet<&str> = state.runs.iter().map(|r| r.name.as_str()).collect();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "manifest.json" && !keep.contains(name.as_str()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(IdIndex { dir: dir.to_path_buf(), cfg, state: RwLock::new(state), maintenance: Mutex::new(()) })
    }

    /// Deletes every file of the index in `dir`.
    pub fn reset(dir: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Forgets everything (a damaged run was found): deletes every run and
    /// the memtable and starts from an empty manifest. The caller indexes
    /// the log again from its start.
    pub fn clear(&self) -> io::Result<()> {
        let _one = self.maintenance.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = {
            let mut st = lock_write(&self.state);
            let next_run = st.next_run;
            let old = std::mem::take(&mut st.runs);
            *st = State { next_run, ..State::default() };
            old
        };
        self.write_manifest_with(&[], &BTreeMap::new(), lock_read(&self.state).next_run)?;
        for r in old {
            let _ = std::fs::remove_file(self.dir.join(&r.name));
        }
        Ok(())
    }

    /// Per partition, the next offset the index covers (memtable included).
    pub fn progress(&self) -> BTreeMap<u32, u64> {
        lock_read(&self.state).progress.clone()
    }

    /// Per partition, the next offset the runs on disk cover: after a
    /// restart, the entries of the log from here on must be inserted again.
    pub fn durable_progress(&self) -> BTreeMap<u32, u64> {
        lock_read(&self.state).durable.clone()
    }

    /// Entries in the memtable.
    pub fn mem_entries(&self) -> usize {
        lock_read(&self.state).mem.len()
    }

    /// Entries in the index (runs and memtable; a key inserted twice counts twice).
    pub fn len(&self) -> u64 {
        let st = lock_read(&self.state);
        st.runs.iter().map(|r| r.count).sum::<u64>() + st.mem.len() as u64 + st.frozen.as_ref().map_or(0, |f| f.len() as u64)
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs on disk.
    pub fn runs(&self) -> usize {
        lock_read(&self.state).runs.len()
    }

    /// True when the memtable is due for a flush.
    pub fn needs_flush(&self) -> bool {
        lock_read(&self.state).mem.len() >= self.cfg.flush_entries
    }

    /// Adds entries and moves the covered progress of partitions forward.
    pub fn insert(&self, entries: &[IndexEntry], progress: &[(u32, u64)]) {
        let mut st = lock_write(&self.state);
        st.mem.reserve(entries.len());
        for e in entries {
            st.mem.insert(e.key, (e.partition, e.offset, e.hour));
        }
        for &(p, next) in progress {
            let cur = st.progress.entry(p).or_insert(0);
            *cur = (*cur).max(next);
        }
    }

    /// Where the event of `key` is, if indexed.
    pub fn get(&self, key: u128) -> io::Result<Option<Position>> {
        let st = lock_read(&self.state);
        st.get(key)
    }

    /// For each key, whether it is indexed.
    pub fn contains(&self, keys: &[u128]) -> io::Result<Vec<bool>> {
        let st = lock_read(&self.state);
        keys.iter().map(|&k| st.get(k).map(|p| p.is_some())).collect()
    }

    /// Writes the memtable as a run and a manifest covering its progress.
    /// Returns the entries written (0: nothing to do).
    pub fn flush(&self) -> io::Result<usize> {
        let _one = self.maintenance.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (frozen, progress, name, runs) = {
            let mut st = lock_write(&self.state);
            if st.mem.is_empty() {
                return Ok(0);
            }
            // The next memtable starts at the size this one reached (at
            // most a flush's worth): growing from empty would rehash every
            // entry again at each doubling, CPU taken from the import
            // (measured: docs/BENCHMARKS.md, "CSV usage import").
            let size = st.mem.len().min(self.cfg.flush_entries);
            let frozen = Arc::new(std::mem::replace(&mut st.mem, Mem::with_capacity_and_hasher(size, Default::default())));
            st.frozen = Some(frozen.clone());
            st.next_run += 1;
            let name = format!("{:016}.run", st.next_run);
            (frozen, st.progress.clone(), name, st.runs.clone())
        };
        let written = (|| {
            let mut entries: Vec<IndexEntry> =
                frozen.iter().map(|(&key, &(partition, offset, hour))| IndexEntry { key, partition, offset, hour }).collect();
            entries.sort_unstable_by_key(|e| e.key);
            let run = Run::write(&self.dir, &name, &entries)?;
            let mut names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
            names.push(name.clone());
            self.write_manifest(&names, &progress)?;
            Ok::<_, io::Error>(run)
        })();
        let mut st = lock_write(&self.state);
        st.frozen = None;
        match written {
            Ok(run) => {
                st.runs.push(Arc::new(run));
                st.durable = progress;
                Ok(frozen.len())
            }
            Err(e) => {
                // Keep the entries searchable; a later flush writes them.
                for (k, v) in frozen.iter() {
                    st.mem.entry(*k).or_insert(*v);
                }
                let _ = std::fs::remove_file(self.dir.join(&name));
                Err(e)
            }
        }
    }

    /// Deletes runs older than `expire_before_hour` and merges neighbouring
    /// runs while there are more than `max_runs`.
    pub fn maintain(&self, expire_before_hour: u32) -> io::Result<Maintenance> {
        let _one = self.maintenance.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut report = Maintenance::default();
        let (mut runs, durable, mut next_run) = {
            let st = lock_read(&self.state);
            (st.runs.clone(), st.durable.clone(), st.next_run)
        };
        let before: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
        let n = runs.len();
        runs.retain(|r| r.max_hour >= expire_before_hour);
        report.runs_expired = n - runs.len();
        while runs.len() > self.cfg.max_runs.max(1) {
            // The neighbours with the fewest entries together.
            let i = (0..runs.len() - 1).min_by_key(|&i| runs[i].count + runs[i + 1].count).unwrap_or(0);
            next_run += 1;
            let name = format!("{:016}.run", next_run);
            let (merged, dropped) = merge(&self.dir, &name, &runs[i], &runs[i + 1], expire_before_hour)?;
            report.merges += 1;
            report.entries_expired += dropped;
            runs.splice(i..=i + 1, [Arc::new(merged)]);
        }
        let after: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
        if after == before {
            return Ok(report);
        }
        self.write_manifest_with(&after, &durable, next_run)?;
        {
            let mut st = lock_write(&self.state);
            // Runs flushed meanwhile cannot exist (flushes hold the same lock).
            st.runs = runs;
            st.next_run = next_run;
        }
        for old in before.iter().filter(|n| !after.contains(n)) {
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        Ok(report)
    }

    /// Forgets every entry of `partition` at or after `end` (the log lost
    /// its tail): rewrites the runs that hold such entries. Returns how many
    /// entries were removed.
    pub fn truncate(&self, partition: u32, end: u64) -> io::Result<u64> {
        let _one = self.maintenance.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone = |p: u32, o: u64| p == partition && o >= end;
        let mut removed = 0u64;
        let (runs, mut durable, mut next_run) = {
            let mut st = lock_write(&self.state);
            let before = st.mem.len();
            st.mem.retain(|_, v| !gone(v.0, v.1));
            removed += (before - st.mem.len()) as u64;
            if let Some(v) = st.progress.get_mut(&partition) {
                *v = (*v).min(end);
            }
            (st.runs.clone(), st.durable.clone(), st.next_run)
        };
        if let Some(v) = durable.get_mut(&partition) {
            *v = (*v).min(end);
        }
        let mut new_runs = Vec::with_capacity(runs.len());
        for r in &runs {
            let entries = r.all_entries()?;
            let kept: Vec<IndexEntry> = entries.iter().copied().filter(|e| !gone(e.partition, e.offset)).collect();
            if kept.len() == entries.len() {
                new_runs.push(r.clone());
                continue;
            }
            removed += (entries.len() - kept.len()) as u64;
            next_run += 1;
            let name = format!("{:016}.run", next_run);
            new_runs.push(Arc::new(Run::write(&self.dir, &name, &kept)?));
        }
        let names: Vec<String> = new_runs.iter().map(|r| r.name.clone()).collect();
        self.write_manifest_with(&names, &durable, next_run)?;
        {
            let mut st = lock_write(&self.state);
            st.runs = new_runs;
            st.durable = durable;
            st.next_run = next_run;
        }
        for r in runs.iter().filter(|r| !names.contains(&r.name)) {
            let _ = std::fs::remove_file(self.dir.join(&r.name));
        }
        Ok(removed)
    }

    fn write_manifest(&self, runs: &[String], progress: &BTreeMap<u32, u64>) -> io::Result<()> {
        let next_run = lock_read(&self.state).next_run;
        self.write_manifest_with(runs, progress, next_run)
    }

    fn write_manifest_with(&self, runs: &[String], progress: &BTreeMap<u32, u64>, next_run: u64) -> io::Result<()> {
        let m = Manifest { version: 1, runs: runs.to_vec(), progress: progress.iter().map(|(&p, &o)| (p, o)).collect(), next_run };
        let bytes = serde_json::to_vec(&m).map_err(|e| corrupt(e.to_string()))?;
        let tmp = self.dir.join("manifest.json.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("manifest.json"))?;
        sync_dir(&self.dir)
    }
}

impl State {
    fn get(&self, key: u128) -> io::Result<Option<Position>> {
        let found = self.mem.get(&key).or_else(|| self.frozen.as_ref().and_then(|f| f.get(&key)));
        if let Some(&(partition, offset, _)) = found {
            return Ok(Some(Position { partition, offset }));
        }
        for r in self.runs.iter().rev() {
            if let Some(p) = r.get(key)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    version: u32,
    runs: Vec<String>,
    progress: Vec<(u32, u64)>,
    next_run: u64,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    let _ = dir;
    Ok(())
}

/// A blocked Bloom filter: the probes of a key are in one 512-bit block.
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn with_keys(n: usize) -> Bloom {
        let blocks = (n * BLOOM_BITS_PER_KEY).div_ceil(512).max(1);
        Bloom { words: vec![0; blocks * 8] }
    }

    fn probes(&self, key: u128) -> (usize, u64) {
        let blocks = (self.words.len() / 8) as u64;
        let block = ((key as u64) % blocks) as usize * 8;
        (block, (key >> 64) as u64)
    }

    fn insert(&mut self, key: u128) {
        let (block, mut x) = self.probes(key);
        for _ in 0..BLOOM_PROBES {
            let bit = (x & 511) as usize;
            x = x.rotate_right(9);
            self.words[block + bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, key: u128) -> bool {
        let (block, mut x) = self.probes(key);
        for _ in 0..BLOOM_PROBES {
            let bit = (x & 511) as usize;
            x = x.rotate_right(9);
            if self.words[block + bit / 64] & (1 << (bit % 64)) == 0 {
                return false;
            }
        }
        true
    }
}

/// An immutable run on disk, with its filter and block index in memory.
struct Run {
    name: String,
    file: File,
    count: u64,
    max_hour: u32,
    /// First key and CRC of every block.
    fences: Vec<(u128, u32)>,
    bloom: Bloom,
}

fn entry_bytes(e: &IndexEntry, out: &mut [u8]) {
    out[..16].copy_from_slice(&e.key.to_le_bytes());
    out[16..20].copy_from_slice(&e.partition.to_le_bytes());
    out[20..28].copy_from_slice(&e.offset.to_le_bytes());
    out[28..32].copy_from_slice(&e.hour.to_le_bytes());
}

fn parse_entry(b: &[u8]) -> IndexEntry {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut k = [0u8; 16];
    k.copy_from_slice(&b[..16]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[20..28]);
    IndexEntry { key: u128::from_le_bytes(k), partition: u32_at(16), offset: u64::from_le_bytes(o), hour: u32_at(28) }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
}

#[cfg(not(unix))]
fn read_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

/// Writes a run entry by entry (sorted by key), one block at a time, so a
/// merge of large runs needs memory for a block, not for the runs.
struct RunWriter {
    dir: PathBuf,
    name: String,
    tmp: PathBuf,
    w: BufWriter<File>,
    bloom: Bloom,
    fences: Vec<(u128, u32)>,
    block: Vec<IndexEntry>,
    bytes: Vec<u8>,
    count: u64,
    min_hour: u32,
    max_hour: u32,
}

impl RunWriter {
    /// `expected`: at most how many entries will be pushed (sizes the filter).
    fn new(dir: &Path, name: &str, expected: usize) -> io::Result<RunWriter> {
        let tmp = dir.join(format!("{name}.tmp"));
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        w.write_all(&[0u8; HEADER])?; // rewritten by finish
        Ok(RunWriter {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
            tmp,
            w,
            bloom: Bloom::with_keys(expected),
            fences: Vec::with_capacity(expected.div_ceil(BLOCK)),
            block: Vec::with_capacity(BLOCK),
            bytes: Vec::with_capacity(BLOCK * ENTRY),
            count: 0,
            min_hour: u32::MAX,
            max_hour: 0,
        })
    }

    fn push(&mut self, e: IndexEntry) -> io::Result<()> {
        self.block.push(e);
        if self.block.len() == BLOCK {
            self.write_block()?;
        }
        Ok(())
    }

    fn write_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.bytes.clear();
        self.bytes.resize(self.block.len() * ENTRY, 0);
        for (e, out) in self.block.iter().zip(self.bytes.chunks_mut(ENTRY)) {
            entry_bytes(e, out);
            self.bloom.insert(e.key);
            self.min_hour = self.min_hour.min(e.hour);
            self.max_hour = self.max_hour.max(e.hour);
        }
        self.fences.push((self.block[0].key, crc32fast::hash(&self.bytes)));
        self.w.write_all(&self.bytes)?;
        self.count += self.block.len() as u64;
        self.block.clear();
        Ok(())
    }

    /// Writes fences, filter and header, fsyncs and renames into place.
    fn finish(mut self) -> io::Result<Run> {
        self.write_block()?;
        let mut w = self.w;
        let mut tail = crc32fast::Hasher::new();
        for (k, c) in &self.fences {
            let mut b = [0u8; 20];
            b[..16].copy_from_slice(&k.to_le_bytes());
            b[16..].copy_from_slice(&c.to_le_bytes());
            tail.update(&b);
            w.write_all(&b)?;
        }
        for word in &self.bloom.words {
            let b = word.to_le_bytes();
            tail.update(&b);
            w.write_all(&b)?;
        }
        w.write_all(&tail.finalize().to_le_bytes())?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..20].copy_from_slice(&self.count.to_le_bytes());
        header[20..24].copy_from_slice(&(if self.count == 0 { 0 } else { self.min_hour }).to_le_bytes());
        header[24..28].copy_from_slice(&self.max_hour.to_le_bytes());
        header[28..32].copy_from_slice(&((self.bloom.words.len() / 8) as u32).to_le_bytes());
        let crc = crc32fast::hash(&header[..32]);
        header[32..36].copy_from_slice(&crc.to_le_bytes());
        {
            let mut f = w.into_inner().map_err(|e| e.into_error())?;
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)?;
            f.sync_all()?;
        }
        let path = self.dir.join(&self.name);
        std::fs::rename(&self.tmp, &path)?;
        sync_dir(&self.dir)?;
        Ok(Run { name: self.name, file: File::open(&path)?, count: self.count, max_hour: self.max_hour, fences: self.fences, bloom: self.bloom })
    }
}

/// The entries of a run in key order, read one block at a time.
struct RunEntries<'r> {
    run: &'r Run,
    next_block: usize,
    block: std::vec::IntoIter<IndexEntry>,
}

impl RunEntries<'_> {
    fn next(&mut self) -> io::Result<Option<IndexEntry>> {
        loop {
            if let Some(e) = self.block.next() {
                return Ok(Some(e));
            }
            if self.next_block >= self.run.fences.len() {
                return Ok(None);
            }
            self.block = self.run.block(self.next_block)?.into_iter();
            self.next_block += 1;
        }
    }
}

impl Run {
    /// Writes sorted `entries` as run `name` (temporary file, fsync, rename).
    fn write(dir: &Path, name: &str, entries: &[IndexEntry]) -> io::Result<Run> {
        let mut w = RunWriter::new(dir, name, entries.len())?;
        for e in entries {
            w.push(*e)?;
        }
        w.finish()
    }

    fn entries(&self) -> RunEntries<'_> {
        RunEntries { run: self, next_block: 0, block: Vec::new().into_iter() }
    }

    /// Opens a run: header, fences and filter, all checked.
    fn open(path: &Path, name: &str) -> io::Result<Run> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut header = [0u8; HEADER];
        file.read_exact(&mut header)?;
        let u32_at = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        if &header[..8] != MAGIC || u32_at(32) != crc32fast::hash(&header[..32]) {
            return Err(corrupt(format!("id index run {name}: bad header")));
        }
        if u32_at(8) != VERSION {
            return Err(corrupt(format!("id index run {name}: version {} (this build reads {VERSION})", u32_at(8))));
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&header[12..20]);
        let count = u64::from_le_bytes(c);
        let max_hour = u32_at(24);
        let blocks = u32_at(28) as u64;
        let n_fences = count.div_ceil(BLOCK as u64);
        let tail_at = HEADER as u64 + count * ENTRY as u64;
        let tail_len = n_fences * 20 + blocks * 64 + 4;
        if tail_at + tail_len != len || blocks == 0 {
            return Err(corrupt(format!("id index run {name}: size {len} does not match its header")));
        }
        let mut tail = vec![0u8; tail_len as usize];
        read_at(&file, &mut tail, tail_at)?;
        let body = tail.len() - 4;
        let want = u32::from_le_bytes([tail[body], tail[body + 1], tail[body + 2], tail[body + 3]]);
        if crc32fast::hash(&tail[..body]) != want {
            return Err(corrupt(format!("id index run {name}: bad checksum")));
        }
        let fence_bytes = n_fences as usize * 20;
        let fences = tail[..fence_bytes]
            .chunks(20)
            .map(|b| {
                let mut k = [0u8; 16];
                k.copy_from_slice(&b[..16]);
                (u128::from_le_bytes(k), u32::from_le_bytes([b[16], b[17], b[18], b[19]]))
            })
            .collect();
        let words = tail[fence_bytes..body]
            .chunks(8)
            .map(|b| {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Run { name: name.to_owned(), file, count, max_hour, fences, bloom: Bloom { words } })
    }

    /// Reads block `i`, checking its CRC.
    fn block(&self, i: usize) -> io::Result<Vec<IndexEntry>> {
        let first = i * BLOCK;
        let n = (self.count as usize - first).min(BLOCK);
        let mut buf = vec![0u8; n * ENTRY];
        read_at(&self.file, &mut buf, (HEADER + first * ENTRY) as u64)?;
        if crc32fast::hash(&buf) != self.fences[i].1 {
            return Err(corrupt(format!("id index run {}: block {i} has a bad checksum", self.name)));
        }
        Ok(buf.chunks(ENTRY).map(parse_entry).collect())
    }

    fn get(&self, key: u128) -> io::Result<Option<Position>> {
        if self.count == 0 || !self.bloom.may_contain(key) {
            return Ok(None);
        }
        let i = self.fences.partition_point(|f| f.0 <= key);
        if i == 0 {
            return Ok(None);
        }
        let block = self.block(i - 1)?;
        Ok(block.binary_search_by_key(&key, |e| e.key).ok().map(|j| Position { partition: block[j].partition, offset: block[j].offset }))
    }

    fn all_entries(&self) -> io::Result<Vec<IndexEntry>> {
        let mut out = Vec::with_capacity(self.count as usize);
        for i in 0..self.fences.len() {
            out.extend(self.block(i)?);
        }
        Ok(out)
    }
}

/// Merges two runs (`b` newer) into a new run, dropping entries older than
/// `expire_before_hour`, streaming both a block at a time. Returns the run
/// and how many entries were dropped.
fn merge(dir: &Path, name: &str, a: &Run, b: &Run, expire_before_hour: u32) -> io::Result<(Run, u64)> {
    let (mut xs, mut ys) = (a.entries(), b.entries());
    let (mut x, mut y) = (xs.next()?, ys.next()?);
    let mut w = RunWriter::new(dir, name, (a.count + b.count) as usize)?;
    let mut dropped = 0u64;
    loop {
        let e = match (x, y) {
            (None, None) => break,
            (Some(p), Some(q)) if p.key == q.key => {
                // The newer run wins.
                x = xs.next()?;
                y = ys.next()?;
                q
            }
            (Some(p), Some(q)) if q.key < p.key => {
                y = ys.next()?;
                q
            }
            (Some(p), _) => {
                x = xs.next()?;
                p
            }
            (None, Some(q)) => {
                y = ys.next()?;
                q
            }
        };
        if e.hour >= expire_before_hour {
            w.push(e)?;
        } else {
            dropped += 1;
        }
    }
    Ok((w.finish()?, dropped))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(i: u64) -> u128 {
        // Spread like hashes: a multiplicative mix of i.
        let a = u128::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (a << 64) | u128::from(i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x5555)
    }

    fn entry(i: u64, hour: u32) -> IndexEntry {
        IndexEntry { key: key(i), partition: (i % 4) as u32, offset: i, hour }
    }

    #[test]
    fn finds_what_was_inserted_across_flushes_reopen_and_merges() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = IdIndexConfig { flush_entries: 1000, max_runs: 3 };
        let idx = IdIndex::open(dir.path(), cfg).unwrap();
        for round in 0..6u64 {
            let entries: Vec<IndexEntry> = (round * 1000..(round + 1) * 1000).map(|i| entry(i, 10 + round as u32)).collect();
            idx.insert(&entries, &[(0, (round + 1) * 1000)]);
            if round < 5 {
                assert_eq!(idx.flush().unwrap(), 1000);
            }
        }
        assert_eq!(idx.runs(), 5);
        assert_eq!(idx.durable_progress().get(&0), Some(&5000));
        assert_eq!(idx.progress().get(&0), Some(&6000));
        let keys: Vec<u128> = (0..7000).map(key).collect();
        let found = idx.contains(&keys).unwrap();
        assert!(found[..6000].iter().all(|&f| f) && found[6000..].iter().all(|&f| !f));
        assert_eq!(idx.get(key(4321)).unwrap(), Some(Position { partition: 1, offset: 4321 }));
        // Merge down to 3 runs: nothing lost.
        let m = idx.maintain(0).unwrap();
        assert_eq!((m.merges, idx.runs()), (2, 3));
        assert!(idx.contains(&keys[..6000]).unwrap().iter().all(|&f| f));
        // Reopen: the memtable (round 5) is gone, the runs are back.
        drop(idx);
        let idx = IdIndex::open(dir.path(), cfg).unwrap();
        assert_eq!(idx.progress().get(&0), Some(&5000));
        let found = idx.contains(&keys).unwrap();
        assert!(found[..5000].iter().all(|&f| f) && found[5000..].iter().all(|&f| !f));
        // Only the manifest and its runs are left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }

    #[test]
    fn expiry_drops_whole_runs_and_old_entries_when_merging() {
        let dir = tempfile::tempdir().unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig { flush_entries: 10, max_runs: 1 }).unwrap();
        idx.insert(&(0..100).map(|i| entry(i, 5)).collect::<Vec<_>>(), &[(0, 100)]);
        idx.flush().unwrap();
        idx.insert(&(100..200).map(|i| entry(i, if i < 150 { 6 } else { 9 })).collect::<Vec<_>>(), &[(0, 200)]);
        idx.flush().unwrap();
        idx.insert(&(200..300).map(|i| entry(i, 9)).collect::<Vec<_>>(), &[(0, 300)]);
        idx.flush().unwrap();
        let m = idx.maintain(7).unwrap();
        assert_eq!(m, Maintenance { runs_expired: 1, merges: 1, entries_expired: 50 });
        let found = idx.contains(&(0..300).map(key).collect::<Vec<_>>()).unwrap();
        assert_eq!(found.iter().filter(|&&f| f).count(), 150);
        assert!(found[150..].iter().all(|&f| f));
    }

    #[test]
    fn truncate_forgets_positions_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        idx.insert(&(0..400).map(|i| entry(i, 1)).collect::<Vec<_>>(), &[(0, 400), (1, 400), (2, 400), (3, 400)]);
        idx.flush().unwrap();
        idx.insert(&(400..500).map(|i| entry(i, 1)).collect::<Vec<_>>(), &[(0, 500), (1, 500), (2, 500), (3, 500)]);
        // Partition 1 loses offsets >= 301: entries 301, 305, ... (run) and 401, ... (memtable).
        let removed = idx.truncate(1, 301).unwrap();
        assert_eq!(removed, 50);
        assert_eq!(idx.progress().get(&1), Some(&301));
        assert_eq!(idx.durable_progress().get(&1), Some(&301));
        assert!(idx.get(key(297)).unwrap().is_some());
        assert!(idx.get(key(301)).unwrap().is_none() && idx.get(key(401)).unwrap().is_none());
        assert!(idx.get(key(302)).unwrap().is_some());
    }

    #[test]
    fn damage_is_detected_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        idx.insert(&(0..1000).map(|i| entry(i, 1)).collect::<Vec<_>>(), &[(0, 1000)]);
        idx.flush().unwrap();
        drop(idx);
        let run = std::fs::read_dir(dir.path()).unwrap().flatten().find(|e| e.file_name().to_string_lossy().ends_with(".run")).unwrap().path();
        // A flipped byte in an entry: found by the block checksum on lookup.
        let mut bytes = std::fs::read(&run).unwrap();
        bytes[HEADER + 5] ^= 0xff;
        std::fs::write(&run, &bytes).unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        let all = idx.contains(&(0..1000).map(key).collect::<Vec<_>>());
        assert!(all.is_err(), "a damaged block must be an error");
        drop(idx);
        // A cut file: refused on open; reset clears the directory.
        std::fs::write(&run, &bytes[..bytes.len() - 1]).unwrap();
        assert!(IdIndex::open(dir.path(), IdIndexConfig::default()).is_err());
        IdIndex::reset(dir.path()).unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        assert!(idx.is_empty());
    }

    #[test]
    fn leftovers_of_an_interrupted_flush_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("0000000000000009.run.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join("0000000000000009.run"), b"not in the manifest").unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        assert!(idx.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_million_keys_insert_flush_and_miss_quickly() {
        // Not a benchmark (see `sluice bench import`): a sanity check that a
        // large batch works and that misses do not read blocks.
        let dir = tempfile::tempdir().unwrap();
        let idx = IdIndex::open(dir.path(), IdIndexConfig::default()).unwrap();
        let n = 200_000u64;
        idx.insert(&(0..n).map(|i| entry(i, 3)).collect::<Vec<_>>(), &[(0, n)]);
        idx.flush().unwrap();
        let misses = idx.contains(&(n..2 * n).map(key).collect::<Vec<_>>()).unwrap();
        let false_positives = misses.iter().filter(|&&f| f).count();
        assert_eq!(false_positives, 0, "a miss reads its block and answers no");
        assert!(idx.contains(&(0..n).map(key).collect::<Vec<_>>()).unwrap().iter().all(|&f| f));
    }
}
