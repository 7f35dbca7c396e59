//! Tests that need the crate's internals: injected write failures and the
//! bound on cached indexes. Everything else is in `tests/it/`.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::state::{read as read_lock, MAX_CACHED_INDEXES};
use std::path::Path;

fn record(partition: u32, i: u64) -> AppendRecord {
    AppendRecord { partition, timestamp_ms: i as i64, payload: format!("record {i:>90}").into_bytes() }
}

/// Every segment file of the log with its size, sorted.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for p in std::fs::read_dir(dir).unwrap() {
        let p = p.unwrap().path();
        if p.is_dir() {
            for f in std::fs::read_dir(&p).unwrap() {
                let f = f.unwrap().path();
                out.push((f.display().to_string(), std::fs::metadata(&f).unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

async fn failed_append_changes_nothing(partitions: u32, touched: &[u32]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LogConfig::new(dir.path(), partitions);
    cfg.segment_bytes = 1024;
    let log = EmbeddedLog::open(cfg).unwrap();
    let batch: Vec<_> = (0..20).map(|i| record(i as u32 % partitions, i)).collect();
    log.append(batch).await.unwrap();
    let before = files(dir.path());
    let next: Vec<u64> = (0..partitions).map(|p| log.next_offset(p)).collect();
    let rounds = log.sync_rounds();
    let mut rx = log.subscribe();
    rx.borrow_and_update();

    // Enough records to roll segments in every touched partition; the last
    // touched partition fails after writing everything.
    log.shared.fail_partition.store(*touched.last().unwrap(), Ordering::Relaxed);
    let batch: Vec<_> = touched.iter().flat_map(|&p| (100..130).map(move |i| record(p, i))).collect();
    let err = log.append(batch).await.unwrap_err();
    assert!(matches!(&err, LogError::Io(e) if e.to_string().contains("rolled back")), "{err}");
    assert_eq!(files(dir.path()), before, "files are back to their old contents");
    assert_eq!((0..partitions).map(|p| log.next_offset(p)).collect::<Vec<_>>(), next);
    assert_eq!(log.sync_rounds(), rounds);
    assert!(!rx.has_changed().unwrap());

    // The log is usable again once the fault is gone, without gaps.
    log.shared.fail_partition.store(u32::MAX, Ordering::Relaxed);
    let offsets = log.append(vec![record(touched[0], 999)]).await.unwrap();
    assert_eq!(offsets, vec![next[touched[0] as usize]]);
    for p in 0..partitions {
        let got = log.read(p, 0, 1000, usize::MAX).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, r)| r.offset == i as u64));
        assert!(got.iter().all(|r| !(100..130).contains(&r.timestamp_ms)), "no trace of the failed append");
    }
    drop(log);
    let mut cfg = LogConfig::new(dir.path(), partitions);
    cfg.segment_bytes = 1024;
    let log = EmbeddedLog::open(cfg).unwrap();
    assert!(log.recovery().partitions_repaired.is_empty());
    assert_eq!(log.next_offset(touched[0]), next[touched[0] as usize] + 1);
}

#[tokio::test]
async fn failed_write_on_one_of_several_partitions_is_rolled_back_everywhere() {
    failed_append_changes_nothing(3, &[0, 2, 1]).await;
}

#[tokio::test]
async fn failed_write_on_a_single_partition_is_rolled_back() {
    failed_append_changes_nothing(2, &[1]).await;
}

/// A one-partition log in `dir` of ~70 KiB segments (each sealed segment
/// has one index entry) holding `n` records, closed and opened again (so
/// that no index of a sealed segment is cached).
async fn reopened_with_small_segments(dir: &std::path::Path, n: u64) -> EmbeddedLog {
    let mut cfg = LogConfig::new(dir, 1);
    cfg.segment_bytes = 70 << 10;
    {
        let log = EmbeddedLog::open(cfg.clone()).unwrap();
        let batch: Vec<_> = (0..n).map(|i| record(0, i)).collect();
        log.append(batch).await.unwrap();
    }
    EmbeddedLog::open(cfg).unwrap()
}

#[tokio::test]
async fn cached_indexes_of_sealed_segments_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log = reopened_with_small_segments(dir.path(), 40 * 600).await;
    let segments = read_lock(&log.shared.partitions[0].segments).len();
    assert!(segments > MAX_CACHED_INDEXES + 5, "{segments} segments");
    let n = log.next_offset(0);
    for k in (1..n).step_by(97) {
        let got = log.read(0, k, 1, 0).await.unwrap();
        assert_eq!(got[0].offset, k);
        assert_eq!(got[0].timestamp_ms, k as i64);
    }
    let segs = read_lock(&log.shared.partitions[0].segments);
    let cached = segs[..segs.len() - 1].iter().filter(|s| s.index.is_some()).count();
    assert!(cached <= MAX_CACHED_INDEXES, "{cached} cached indexes");
    assert!(segs.last().unwrap().index.is_some(), "the active segment keeps its index");
}

#[tokio::test]
async fn sequential_readers_need_no_index_of_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = reopened_with_small_segments(dir.path(), 10 * 600).await;
    // Small pages: most reads start in the middle of a sealed segment.
    let mut next = 0;
    loop {
        let got = log.read(0, next, 7, usize::MAX).await.unwrap();
        let Some(last) = got.last() else { break };
        assert_eq!(got[0].offset, next);
        next = last.offset + 1;
    }
    assert_eq!(next, 6000);
    let segs = read_lock(&log.shared.partitions[0].segments);
    assert!(segs.len() > 5);
    assert!(segs[..segs.len() - 1].iter().all(|s| s.index.is_none()), "remembered positions were used");
}
