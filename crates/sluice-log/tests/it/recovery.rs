//! Crash recovery: torn tails are cut at the last good record on open;
//! corruption elsewhere is reported, never skipped.

use crate::*;
use sluice_core::{EventLog, LogError};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// Payload size used here: every record is 24 + 100 = 124 bytes on disk.
const PAYLOAD: usize = 100;
const RECORD: u64 = 24 + PAYLOAD as u64;

/// Appends `n` records (one call each) to partition 0 of a two-partition
/// log and one record to partition 1; returns the payloads of partition 0.
async fn write_records(dir: &Path, n: u64, segment_bytes: u64) -> Vec<Vec<u8>> {
    let log = open(&cfg(dir, 2, segment_bytes));
    let mut payloads = Vec::new();
    for i in 0..n {
        let p = payload(&format!("rec{i}"), PAYLOAD);
        assert_eq!(log.append(vec![rec(0, i as i64, p.clone())]).await.unwrap(), vec![i]);
        payloads.push(p);
    }
    log.append(vec![rec(1, 0, b"other partition".to_vec())]).await.unwrap();
    log.close().await.unwrap();
    payloads
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    segment_files(dir, 0).pop().unwrap()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Reopens after tampering and checks the common expectations: partition 0
/// was cut by `cut` bytes at offset `at`, holds exactly `payloads[..at]`, the
/// next append gets offset `at`, and a further reopen repairs nothing.
async fn check_repaired(dir: &Path, payloads: &[Vec<u8>], cut: u64, at: u64, reason: &str) {
    capture_logs();
    let c = cfg(dir, 2, 1 << 20);
    {
        let log = open(&c);
        let report = log.recovery();
        assert_eq!(report.truncated_bytes, cut, "{report:?}");
        assert_eq!(report.partitions_repaired, vec![0]);
        assert_eq!(report.repairs.len(), 1);
        assert_eq!(report.repairs[0].at_offset, at);
        assert!(report.repairs[0].reason.contains(reason), "{:?}", report.repairs[0].reason);
        let seg = report.repairs[0].segment.display().to_string();
        let lines = log_lines_with(&seg);
        assert!(
            lines.iter().any(|l| l.starts_with("WARN")
                && l.contains("partition=0")
                && l.contains(&format!("cut_bytes={cut}"))
                && l.contains(&format!("at_offset={at}"))),
            "no warning for {seg}: {lines:?}"
        );
        assert_eq!(log.next_offset(0), at);
        let got = read_all(&log, 0).await;
        assert_eq!(got.len() as u64, at);
        for (g, w) in got.iter().zip(payloads) {
            assert_eq!(&g.payload, w);
        }
        assert_eq!(read_all(&log, 1).await.len(), 1, "other partitions are untouched");
        assert_eq!(log.append(vec![rec(0, 0, b"after repair".to_vec())]).await.unwrap(), vec![at]);
        log.close().await.unwrap();
    }
    let log = open(&c);
    assert_eq!(log.recovery().truncated_bytes, 0);
    assert!(log.recovery().partitions_repaired.is_empty());
    let got = read_all(&log, 0).await;
    assert_eq!(got.len() as u64, at + 1);
    assert_eq!(got[at as usize].payload, b"after repair");
}

#[tokio::test]
async fn torn_tail_cut_mid_payload_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    assert_eq!(file_len(&seg), 32 + 10 * RECORD);
    OpenOptions::new().write(true).open(&seg).unwrap().set_len(32 + 10 * RECORD - 50).unwrap();
    check_repaired(dir.path(), &payloads, RECORD - 50, 9, "short payload").await;
}

#[tokio::test]
async fn torn_tail_cut_mid_header_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    OpenOptions::new().write(true).open(&seg).unwrap().set_len(32 + 9 * RECORD + 10).unwrap();
    check_repaired(dir.path(), &payloads, 10, 9, "short record header").await;
}

#[tokio::test]
async fn garbage_after_the_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    OpenOptions::new().append(true).open(&seg).unwrap().write_all(&Rng::new(3).bytes(37)).unwrap();
    check_repaired(dir.path(), &payloads, 37, 10, "").await;
}

#[tokio::test]
async fn zero_filled_tail_is_truncated() {
    // Some file systems leave zeros after a crash (size updated, data not).
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    OpenOptions::new().append(true).open(&seg).unwrap().write_all(&[0u8; 4096]).unwrap();
    check_repaired(dir.path(), &payloads, 4096, 10, "checksum").await;
}

#[tokio::test]
async fn flipped_byte_in_the_last_record_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&seg, bytes).unwrap();
    check_repaired(dir.path(), &payloads, RECORD, 9, "checksum mismatch").await;
}

#[tokio::test]
async fn record_with_a_wrong_offset_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 10, 1 << 20).await;
    let seg = last_segment(dir.path());
    // A well-formed record (valid checksum) that claims offset 42.
    let mut r = Vec::new();
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&3u32.to_le_bytes());
    r.extend_from_slice(&42u64.to_le_bytes());
    r.extend_from_slice(&0i64.to_le_bytes());
    r.extend_from_slice(b"abc");
    let crc = crc32fast::hash(&r[4..]);
    r[..4].copy_from_slice(&crc.to_le_bytes());
    OpenOptions::new().append(true).open(&seg).unwrap().write_all(&r).unwrap();
    check_repaired(dir.path(), &payloads, 27, 10, "offset 42").await;
}

/// Writes 20 records with 1 KiB segments (8 records per segment: 32 + 8 *
/// 124 = 1024), then leaves `bytes` as a new segment file for offset 20, as
/// a crash while creating it would.
async fn crash_while_creating_segment(bytes: &[u8]) -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 20, 1024).await;
    let files = segment_files(dir.path(), 0);
    assert_eq!(files.iter().map(|f| base_of(f)).collect::<Vec<_>>(), vec![0, 8, 16]);
    std::fs::write(dir.path().join("p-0000/00000000000000000020.log"), bytes).unwrap();
    (dir, payloads)
}

fn header_of_segment(dir: &Path, base: u64) -> Vec<u8> {
    let f = dir.join(format!("p-0000/{base:020}.log"));
    std::fs::read(f).unwrap()[..32].to_vec()
}

#[tokio::test]
async fn crash_with_half_written_segment_header() {
    // Take a real header for base 20 from a scratch log, then keep 10 bytes.
    let scratch = tempfile::tempdir().unwrap();
    write_records(scratch.path(), 28, 1024).await;
    let header = header_of_segment(scratch.path(), 24);
    let (dir, payloads) = crash_while_creating_segment(&header[..10]).await;
    check_repaired(dir.path(), &payloads, 10, 20, "short segment header").await;
    // The repaired file kept its name and now holds the new record.
    let seg = dir.path().join("p-0000/00000000000000000020.log");
    assert_eq!(file_len(&seg), 32 + 24 + 12);
}

#[tokio::test]
async fn crash_with_empty_new_segment_file() {
    let (dir, payloads) = crash_while_creating_segment(&[]).await;
    check_repaired(dir.path(), &payloads, 0, 20, "short segment header").await;
}

#[tokio::test]
async fn crash_with_garbage_segment_header() {
    let (dir, payloads) = crash_while_creating_segment(&[0xFF; 40]).await;
    check_repaired(dir.path(), &payloads, 40, 20, "magic").await;
}

#[tokio::test]
async fn header_only_segment_needs_no_repair() {
    // A crash after the new segment's header was durable but before any
    // record was: a valid, empty active segment.
    let dir = tempfile::tempdir().unwrap();
    let payloads = write_records(dir.path(), 20, 1024).await;
    // Build the header for base 20 from the one for base 16 of the same partition.
    let mut header = header_of_segment(dir.path(), 16);
    header[16..24].copy_from_slice(&20u64.to_le_bytes());
    let crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.path().join("p-0000/00000000000000000020.log"), &header).unwrap();
    let log = open(&cfg(dir.path(), 2, 1024));
    assert_eq!(log.recovery().truncated_bytes, 0);
    assert!(log.recovery().partitions_repaired.is_empty());
    assert_eq!(log.next_offset(0), 20);
    assert_eq!(log.append(vec![rec(0, 0, b"x".to_vec())]).await.unwrap(), vec![20]);
    let got = read_all(&log, 0).await;
    assert_eq!(got.len(), 21);
    assert_eq!(got[19].payload, payloads[19]);
}

#[tokio::test]
async fn missing_first_segment_is_recreated() {
    // A crash after the partition directory was created but before its
    // first segment was durable.
    let dir = tempfile::tempdir().unwrap();
    drop(open(&cfg(dir.path(), 2, 4096)));
    std::fs::remove_file(dir.path().join("p-0001/00000000000000000000.log")).unwrap();
    let log = open(&cfg(dir.path(), 2, 4096));
    assert_eq!(log.next_offset(1), 0);
    assert_eq!(log.append(vec![rec(1, 0, b"x".to_vec())]).await.unwrap(), vec![0]);
}

#[tokio::test]
async fn corrupt_record_in_a_sealed_segment_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 30, 1024).await;
    let first = dir.path().join("p-0000/00000000000000000000.log");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[(32 + 3 * RECORD + 60) as usize] ^= 1; // payload of record 3
    std::fs::write(&first, bytes).unwrap();

    let log = open(&cfg(dir.path(), 2, 1024));
    // Only the tail is checked on open: nothing to repair.
    assert!(log.recovery().partitions_repaired.is_empty());
    // Reading through the bad record fails loudly ...
    match log.read(0, 0, 100, 1 << 20).await {
        Err(LogError::Corrupt(msg)) => {
            assert!(msg.contains("partition 0"), "{msg}");
            assert!(msg.contains("00000000000000000000.log"), "{msg}");
            assert!(msg.contains("checksum"), "{msg}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // ... also when starting inside that segment (the index build checks it) ...
    assert!(matches!(log.read(0, 5, 100, 1 << 20).await, Err(LogError::Corrupt(_))));
    // ... records before it and later segments are still readable.
    assert_eq!(log.read(0, 0, 3, 1 << 20).await.unwrap().len(), 3);
    assert_eq!(log.read(0, 8, 100, 1 << 20).await.unwrap().len(), 22);
}

#[tokio::test]
async fn shortened_sealed_segment_is_reported_on_read() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 30, 1024).await;
    let second = dir.path().join("p-0000/00000000000000000008.log");
    OpenOptions::new().write(true).open(&second).unwrap().set_len(32 + 5 * RECORD).unwrap();
    let log = open(&cfg(dir.path(), 2, 1024));
    assert!(log.recovery().partitions_repaired.is_empty());
    match log.read(0, 0, 100, 1 << 20).await {
        Err(LogError::Corrupt(msg)) => assert!(msg.contains("ends before offset 13"), "{msg}"),
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(matches!(log.read(0, 10, 100, 1 << 20).await, Err(LogError::Corrupt(_))));
}
