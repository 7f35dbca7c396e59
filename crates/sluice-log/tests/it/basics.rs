//! Appending, reading, reopening, configuration errors, closing.

use crate::*;
use sluice_core::{EventLog, LogError};
use sluice_log::{EmbeddedLog, LogConfig};
use std::sync::Arc;

#[tokio::test]
async fn append_read_round_trip_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 3, 1024);
    let log = open(&c);
    let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
    for round in 0..40u32 {
        let mut batch = Vec::new();
        let mut want_offsets = Vec::new();
        for i in 0..7u32 {
            let p = (round + i) % 3;
            let len = ((round * 37 + i * 11) % 300) as usize;
            let data = payload(&format!("r{round}i{i}"), len);
            want_offsets.push(expected[p as usize].len() as u64);
            expected[p as usize].push(data.clone());
            batch.push(rec(p, 1000 + i64::from(round), data));
        }
        // One record larger than a segment: it gets a segment of its own.
        if round == 20 {
            let data = payload("big", 3000);
            want_offsets.push(expected[1].len() as u64);
            expected[1].push(data.clone());
            batch.push(rec(1, 5, data));
        }
        // Offsets are dense per partition, in input order.
        assert_eq!(log.append(batch).await.unwrap(), want_offsets);
    }
    for p in 0..3u32 {
        let got = read_all(&log, p).await;
        let want = &expected[p as usize];
        assert_eq!(got.len(), want.len(), "partition {p}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.offset, i as u64);
            assert_eq!(g.partition, p);
            assert_eq!(&g.payload, w);
        }
        assert_eq!(log.next_offset(p), want.len() as u64);
        assert_eq!(log.start_offset(p), 0);
        // Several segments, named by zero-padded base offset, none (but a
        // single-record one) larger than the configured size.
        let files = segment_files(dir.path(), p);
        assert!(files.len() > 3, "partition {p} has {} segments", files.len());
        assert_eq!(files[0].file_name().unwrap(), "00000000000000000000.log");
        for f in &files {
            let len = std::fs::metadata(f).unwrap().len();
            let base = base_of(f);
            let big = got[base as usize].payload.len() > 1000;
            assert!(len <= 1024 || big, "{} is {len} bytes", f.display());
        }
        // Random access to every offset.
        for (i, w) in want.iter().enumerate() {
            let one = log.read(p, i as u64, 1, 0).await.unwrap();
            assert_eq!(one.len(), 1);
            assert_eq!(&one[0].payload, w);
        }
    }
    let stats = log.stats();
    let on_disk: u64 = (0..3).flat_map(|p| segment_files(dir.path(), p)).map(|f| std::fs::metadata(f).unwrap().len()).sum();
    assert_eq!(stats.bytes, on_disk);
    assert_eq!(stats.partitions, (0..3).map(|p| (0, expected[p].len() as u64)).collect::<Vec<_>>());
    log.close().await.unwrap();
}

#[tokio::test]
async fn reopen_keeps_offsets_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 2, 2048);
    {
        let log = open(&c);
        for i in 0..50u64 {
            let offs = log.append(vec![rec((i % 2) as u32, i as i64, payload(&format!("e{i}"), 100))]).await.unwrap();
            assert_eq!(offs, vec![i / 2]);
        }
        log.close().await.unwrap();
    }
    {
        // Dropped without close: acknowledged appends are durable anyway.
        let log = open(&c);
        assert_eq!(log.recovery().truncated_bytes, 0);
        assert_eq!(log.next_offset(0), 25);
        assert_eq!(log.next_offset(1), 25);
        let offs = log.append(vec![rec(1, 0, b"after reopen".to_vec())]).await.unwrap();
        assert_eq!(offs, vec![25]);
    }
    let log = open(&c);
    assert_eq!(log.next_offset(0), 25);
    assert_eq!(log.next_offset(1), 26);
    let p1 = read_all(&log, 1).await;
    assert_eq!(p1.len(), 26);
    assert_eq!(p1[25].payload, b"after reopen");
    assert_eq!(p1[3].payload, payload("e7", 100));
    assert_eq!(p1[3].timestamp_ms, 7);
}

#[tokio::test]
async fn next_offset_predicts_the_offsets_of_a_single_appender() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(open(&cfg(dir.path(), 4, 4096)));
    let mut rng = Rng::new(7);
    for _ in 0..100 {
        let n = rng.range(1, 20) as usize;
        let batch: Vec<_> = (0..n)
            .map(|_| {
                let p = rng.range(0, 4) as u32;
                let len = rng.range(0, 200) as usize;
                rec(p, 0, rng.bytes(len))
            })
            .collect();
        let mut predicted: Vec<u64> = (0..4).map(|p| log.next_offset(p)).collect();
        let want: Vec<u64> = batch
            .iter()
            .map(|r| {
                let o = predicted[r.partition as usize];
                predicted[r.partition as usize] += 1;
                o
            })
            .collect();
        assert_eq!(log.append(batch).await.unwrap(), want);
        for p in 0..4 {
            assert_eq!(log.next_offset(p), predicted[p as usize]);
        }
    }
    assert_eq!(log.append(Vec::new()).await.unwrap(), Vec::<u64>::new());
}

#[tokio::test]
async fn read_limits_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&cfg(dir.path(), 1, 1 << 20));
    let batch: Vec<_> = (0..10).map(|i| rec(0, i, payload(&format!("x{i}"), 100))).collect();
    log.append(batch).await.unwrap();
    assert_eq!(log.read(0, 0, 3, 1 << 20).await.unwrap().len(), 3);
    // max_bytes counts payload bytes; at least one record comes back.
    assert_eq!(log.read(0, 0, 100, 250).await.unwrap().len(), 2);
    let one = log.read(0, 4, 100, 1).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].offset, 4);
    assert_eq!(log.read(0, 7, 100, 1 << 20).await.unwrap().iter().map(|r| r.offset).collect::<Vec<_>>(), vec![7, 8, 9]);
    assert!(log.read(0, 10, 100, 1 << 20).await.unwrap().is_empty());
    assert!(log.read(0, 1000, 100, 1 << 20).await.unwrap().is_empty());
    assert!(log.read(0, 0, 0, 1 << 20).await.unwrap().is_empty());
    assert!(matches!(log.read(1, 0, 1, 1).await, Err(LogError::NoSuchPartition(1))));
    assert!(matches!(log.append(vec![rec(3, 0, vec![])]).await, Err(LogError::NoSuchPartition(3))));
    // A rejected append reserves nothing.
    assert_eq!(log.next_offset(0), 10);
    let too_big = vec![0u8; sluice_log::MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(log.append(vec![rec(0, 0, too_big)]).await, Err(LogError::Io(_))));
    assert_eq!(log.next_offset(0), 10);
    // Empty payloads are fine.
    assert_eq!(log.append(vec![rec(0, 0, vec![])]).await.unwrap(), vec![10]);
    assert_eq!(log.read(0, 10, 1, 1).await.unwrap()[0].payload, Vec::<u8>::new());
}

#[tokio::test]
async fn random_access_uses_the_sparse_index_also_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // ~1.3 MB over segments of 300 KB: several sealed segments with index entries.
    let c = cfg(dir.path(), 1, 300_000);
    let n = 4000u64;
    {
        let log = open(&c);
        for chunk in 0..(n / 500) {
            let batch = (0..500).map(|i| rec(0, 0, payload(&format!("n{}", chunk * 500 + i), 300))).collect();
            log.append(batch).await.unwrap();
        }
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            let k = rng.range(0, n);
            let got = log.read(0, k, 3, 1 << 20).await.unwrap();
            assert_eq!(got[0].offset, k);
            assert_eq!(got[0].payload, payload(&format!("n{k}"), 300));
        }
    }
    let log = open(&c);
    assert!(segment_files(dir.path(), 0).len() >= 4);
    let mut rng = Rng::new(2);
    for _ in 0..200 {
        let k = rng.range(0, n);
        let got = log.read(0, k, 2, 1 << 20).await.unwrap();
        assert_eq!(got[0].offset, k);
        assert_eq!(got[0].payload, payload(&format!("n{k}"), 300));
    }
    // Large pages cross segment boundaries.
    let all = read_all_from(&log, 0, 17, 1000).await;
    assert_eq!(all.len() as u64, n - 17);
    assert!(all.iter().enumerate().all(|(i, r)| r.offset == 17 + i as u64));
}

#[tokio::test]
async fn reopening_with_another_partition_count_fails() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&cfg(dir.path(), 2, 4096)));
    for other in [1, 3] {
        match EmbeddedLog::open(cfg(dir.path(), other, 4096)) {
            Err(LogError::Config(msg)) => {
                assert!(msg.contains("has 2 partitions"), "{msg}");
                assert!(msg.contains(&format!("asks for {other}")), "{msg}");
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }
    // The right count still opens.
    drop(open(&cfg(dir.path(), 2, 4096)));
    // A directory with partitions but no meta file is refused, not guessed.
    std::fs::remove_file(dir.path().join("meta.json")).unwrap();
    assert!(matches!(EmbeddedLog::open(cfg(dir.path(), 2, 4096)), Err(LogError::Config(_))));
}

#[tokio::test]
async fn invalid_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(EmbeddedLog::open(cfg(dir.path(), 0, 4096)), Err(LogError::Config(_))));
    assert!(matches!(EmbeddedLog::open(cfg(dir.path(), 1, 10)), Err(LogError::Config(_))));
    let c = LogConfig::new(dir.path(), 1);
    assert_eq!(c.segment_bytes, 64 << 20);
    assert_eq!(c.retention_max_age, None);
    assert_eq!(c.retention_max_bytes, None);
}

#[tokio::test]
async fn close_then_append_fails() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(open(&cfg(dir.path(), 1, 4096)));
    log.append(vec![rec(0, 0, b"one".to_vec())]).await.unwrap();
    log.close().await.unwrap();
    assert!(matches!(log.append(vec![rec(0, 0, b"two".to_vec())]).await, Err(LogError::Closed)));
    assert!(matches!(log.append(Vec::new()).await, Err(LogError::Closed)));
    log.close().await.unwrap(); // idempotent
                                // What was written stays readable.
    assert_eq!(read_all(log.as_ref(), 0).await.len(), 1);
    assert_eq!(log.next_offset(0), 1);
}

#[tokio::test]
async fn subscribers_see_every_durable_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(&cfg(dir.path(), 2, 4096)));
    let mut rx = log.subscribe();
    let before = *rx.borrow_and_update();
    let tail = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            // A tailing reader: wait for a change, then read what is new.
            let mut next = 0;
            let mut got = Vec::new();
            while got.len() < 5 {
                rx.changed().await.unwrap();
                let batch = log.read(1, next, 100, 1 << 20).await.unwrap();
                if let Some(last) = batch.last() {
                    next = last.offset + 1;
                }
                got.extend(batch.into_iter().map(|r| r.payload));
            }
            got
        })
    };
    for i in 0..5u8 {
        log.append(vec![rec(1, 0, vec![i])]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), tail).await.unwrap().unwrap();
    assert_eq!(got, (0..5u8).map(|i| vec![i]).collect::<Vec<_>>());
    assert!(*log.subscribe().borrow() > before);
}
