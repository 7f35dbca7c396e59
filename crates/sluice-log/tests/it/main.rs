//! Integration tests of the embedded log: one binary, shared helpers, one
//! module per area. Every test works in its own temporary directory.

#![allow(clippy::unwrap_used)]

mod basics;
mod concurrency;
mod property;
mod recovery;
mod retention;

use sluice_core::{AppendRecord, EventLog, Record};
use sluice_log::{EmbeddedLog, LogConfig};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

/// A configuration for tests: `partitions` partitions, small segments.
pub fn cfg(dir: &Path, partitions: u32, segment_bytes: u64) -> LogConfig {
    let mut c = LogConfig::new(dir, partitions);
    c.segment_bytes = segment_bytes;
    c
}

/// Opens a log, panicking on error.
pub fn open(c: &LogConfig) -> EmbeddedLog {
    EmbeddedLog::open(c.clone()).unwrap()
}

/// A record for `partition` with `payload`.
pub fn rec(partition: u32, timestamp_ms: i64, payload: Vec<u8>) -> AppendRecord {
    AppendRecord { partition, timestamp_ms, payload }
}

/// A deterministic payload of `len` bytes that names `tag`.
pub fn payload(tag: &str, len: usize) -> Vec<u8> {
    let mut p = tag.as_bytes().to_vec();
    let mut i = 0u8;
    while p.len() < len {
        p.push(b'a' + i % 26);
        i = i.wrapping_add(1);
    }
    p.truncate(len.max(tag.len()));
    p
}

/// Reads a whole partition from `from`, in pages of at most `page` records.
pub async fn read_all_from(log: &dyn EventLog, partition: u32, from: u64, page: usize) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut next = from;
    loop {
        let batch = log.read(partition, next, page, 64 << 10).await.unwrap();
        let Some(last) = batch.last() else {
            return out;
        };
        next = last.offset + 1;
        out.extend(batch);
    }
}

/// Reads a whole partition.
pub async fn read_all(log: &dyn EventLog, partition: u32) -> Vec<Record> {
    read_all_from(log, partition, 0, 100).await
}

/// Segment files of a partition, oldest first.
pub fn segment_files(dir: &Path, partition: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(format!("p-{partition:04}")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Base offset encoded in a segment file name.
pub fn base_of(path: &Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A tiny deterministic PRNG (SplitMix64), so property tests need no crate.
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// Random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Log lines captured by a process-wide tracing subscriber (tests filter by
/// their own temporary directory, since tests run in parallel).
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        LINES.lock().unwrap().push(format!("{} {}", event.metadata().level(), f.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Installs the capturing subscriber (once per process).
pub fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| tracing::subscriber::set_global_default(Capture).unwrap());
}

/// Captured log lines that contain `needle`.
pub fn log_lines_with(needle: &str) -> Vec<String> {
    LINES.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
}
