//! Retention by size and by age; reads from before the start offset.

use crate::*;
use sluice_core::{EventLog, LogError};
use std::time::Duration;

/// 100-byte payloads and 1 KiB segments: 8 records per segment.
async fn fill(log: &dyn EventLog, partition: u32, n: u64, ts: i64) {
    for chunk in 0..n.div_ceil(10) {
        let batch = (chunk * 10..((chunk + 1) * 10).min(n)).map(|i| rec(partition, ts, payload(&format!("{partition}-{i}"), 100))).collect();
        log.append(batch).await.unwrap();
    }
}

fn dir_bytes(dir: &std::path::Path, partition: u32) -> u64 {
    segment_files(dir, partition).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum()
}

#[tokio::test]
async fn retention_by_size_deletes_oldest_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 2, 1024);
    c.retention_max_bytes = Some(3000);
    let log = open(&c);
    fill(&log, 0, 100, now_ms()).await;
    fill(&log, 1, 10, now_ms()).await;
    let before = dir_bytes(dir.path(), 0);
    let files_before = segment_files(dir.path(), 0);
    let report = log.enforce_retention().await.unwrap();
    let files_after = segment_files(dir.path(), 0);
    let after = dir_bytes(dir.path(), 0);
    assert!(after <= 3000, "{after} bytes left");
    assert!(after + 1024 > 3000, "deleted more than needed: {after} bytes left");
    assert_eq!(report.segments_deleted as usize, files_before.len() - files_after.len());
    assert_eq!(report.bytes_deleted, before - after);
    let start = base_of(&files_after[0]);
    assert_eq!(report.records_deleted, start);
    assert_eq!(log.start_offset(0), start);
    assert_eq!(log.start_offset(1), 0, "partition 1 is small enough");
    assert_eq!(log.stats().partitions[0], (start, 100));
    assert_eq!(log.stats().bytes, after + dir_bytes(dir.path(), 1));

    // Reading from before the start offset reads from the start offset.
    let got = log.read(0, 0, 5, 1 << 20).await.unwrap();
    assert_eq!(got[0].offset, start);
    assert_eq!(got[0].payload, payload(&format!("0-{start}"), 100));
    let all = read_all(&log, 0).await;
    assert_eq!(all.len() as u64, 100 - start);

    // A second pass has nothing to do; appends continue densely.
    assert_eq!(log.enforce_retention().await.unwrap(), Default::default());
    assert_eq!(log.append(vec![rec(0, 0, vec![1])]).await.unwrap(), vec![100]);
    drop(log);
    let log = open(&c);
    assert_eq!(log.start_offset(0), start);
    assert_eq!(log.next_offset(0), 101);
}

#[tokio::test]
async fn retention_by_age_deletes_segments_whose_newest_record_is_old() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 2, 1024);
    c.retention_max_age = Some(Duration::from_secs(60));
    let hour_ago = now_ms() - 3_600_000;
    {
        let log = open(&c);
        fill(&log, 0, 40, hour_ago).await; // segments 0, 8, 16, 24, 32 (full)
        fill(&log, 0, 4, now_ms()).await; // offsets 40.. in a new segment
        fill(&log, 1, 30, hour_ago).await; // only old records
        log.close().await.unwrap();
    }
    // Reopen so that the age of sealed segments must be found by scanning.
    let log = open(&c);
    let report = log.enforce_retention().await.unwrap();
    assert_eq!(log.start_offset(0), 40);
    assert_eq!(read_all(&log, 0).await.len(), 4);
    // The active segment is never deleted, even if everything in it is old.
    let p1 = segment_files(dir.path(), 1);
    assert_eq!(p1.len(), 1);
    assert_eq!(log.start_offset(1), base_of(&p1[0]));
    assert_eq!(log.read(1, 0, 100, 1 << 20).await.unwrap()[0].offset, base_of(&p1[0]));
    assert_eq!(report.records_deleted, 40 + base_of(&p1[0]));
    assert_eq!(report.segments_deleted, 5 + (base_of(&p1[0]) / 8));
    // Appends carry on at the right offsets.
    assert_eq!(log.append(vec![rec(1, now_ms(), vec![])]).await.unwrap(), vec![30]);
}

#[tokio::test]
async fn retention_stops_at_the_first_young_segment() {
    // Deleting a later old segment behind a young one would leave a hole.
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1, 1024);
    c.retention_max_age = Some(Duration::from_secs(60));
    let log = open(&c);
    fill(&log, 0, 8, now_ms()).await; // segment 0: young
    fill(&log, 0, 16, now_ms() - 3_600_000).await; // segments 8, 16: old
    fill(&log, 0, 1, now_ms()).await; // segment 24 (active)
    let report = log.enforce_retention().await.unwrap();
    assert_eq!(report.segments_deleted, 0);
    assert_eq!(log.start_offset(0), 0);
}

#[tokio::test]
async fn retention_reports_corruption_in_an_old_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 1, 1024);
    c.retention_max_age = Some(Duration::from_secs(60));
    {
        let log = open(&c);
        fill(&log, 0, 20, 0).await;
    }
    let first = dir.path().join("p-0000/00000000000000000000.log");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&first, bytes).unwrap();
    let log = open(&c);
    assert!(matches!(log.enforce_retention().await, Err(LogError::Corrupt(_))));
}

#[tokio::test]
async fn no_limits_means_no_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&cfg(dir.path(), 1, 1024));
    fill(&log, 0, 50, 0).await;
    assert_eq!(log.enforce_retention().await.unwrap(), Default::default());
    assert_eq!(log.start_offset(0), 0);
}
