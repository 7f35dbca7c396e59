//! Property-style crash test: after random appends and a random "crash"
//! (torn write, garbage, flipped byte) in the part of the log that was never
//! acknowledged, reopening yields a prefix of what was written that contains
//! every acknowledged record, and appends continue densely.

use crate::*;
use sluice_core::{AppendRecord, EventLog};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

type Expected = Vec<Vec<(i64, Vec<u8>)>>;

async fn append_random(c: &sluice_log::LogConfig, rng: &mut Rng, batches: u64, expected: &mut Expected) {
    let log = open(c);
    for _ in 0..batches {
        let n = rng.range(1, 20);
        let batch: Vec<AppendRecord> = (0..n)
            .map(|_| {
                let p = rng.range(0, u64::from(c.partitions)) as u32;
                let len = if rng.range(0, 20) == 0 { rng.range(0, 3000) } else { rng.range(0, 600) };
                let ts = rng.next_u64() as i64;
                rec(p, ts, rng.bytes(len as usize))
            })
            .collect();
        let offsets = log.append(batch.clone()).await.unwrap();
        for (r, o) in batch.into_iter().zip(offsets) {
            let exp = &mut expected[r.partition as usize];
            assert_eq!(o, exp.len() as u64);
            exp.push((r.timestamp_ms, r.payload));
        }
    }
    log.close().await.unwrap();
}

fn sizes(dir: &Path, p: u32) -> Vec<(std::path::PathBuf, u64)> {
    segment_files(dir, p)
        .into_iter()
        .map(|f| {
            let len = std::fs::metadata(&f).unwrap().len();
            (f, len)
        })
        .collect()
}

/// Damages the bytes written after `acked_total` (a position in the
/// concatenation of the partition's segment files) the way a crash could.
fn crash(dir: &Path, p: u32, acked_total: u64, rng: &mut Rng) {
    let files = sizes(dir, p);
    let total: u64 = files.iter().map(|(_, l)| l).sum();
    match rng.range(0, 3) {
        mode @ (0 | 1) => {
            // Torn write: everything after a random point is lost ...
            let cut = rng.range(acked_total, total + 1);
            let mut acc = 0;
            let mut tail = None;
            for (f, len) in &files {
                if tail.is_some() {
                    std::fs::remove_file(f).unwrap();
                } else if cut <= acc + len {
                    OpenOptions::new().write(true).open(f).unwrap().set_len(cut - acc).unwrap();
                    tail = Some(f.clone());
                }
                acc += len;
            }
            // ... and maybe replaced by garbage.
            if mode == 1 {
                let n = rng.range(1, 100) as usize;
                let garbage = rng.bytes(n);
                OpenOptions::new().append(true).open(tail.unwrap()).unwrap().write_all(&garbage).unwrap();
            }
        }
        _ => {
            // A flipped byte in the unacknowledged part of the tail segment.
            let (tail, len) = files.last().unwrap().clone();
            let tail_start = total - len;
            let from = acked_total.saturating_sub(tail_start);
            if from < len {
                let at = rng.range(from, len);
                let mut bytes = std::fs::read(&tail).unwrap();
                bytes[at as usize] ^= 1 << rng.range(0, 8);
                std::fs::write(&tail, bytes).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn reopened_log_is_a_prefix_containing_every_acknowledged_record() {
    for seed in 0..30u64 {
        let mut rng = Rng::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let partitions = rng.range(1, 4) as u32;
        let c = cfg(dir.path(), partitions, rng.range(1024, 8192));
        let mut expected: Expected = vec![Vec::new(); partitions as usize];

        // Acknowledged appends.
        let batches = rng.range(1, 15);
        append_random(&c, &mut rng, batches, &mut expected).await;
        let acked: Vec<usize> = expected.iter().map(Vec::len).collect();
        let acked_bytes: Vec<u64> = (0..partitions).map(|p| sizes(dir.path(), p).iter().map(|(_, l)| l).sum()).collect();

        // Appends "in flight" when the crash happens.
        let batches = rng.range(1, 10);
        append_random(&c, &mut rng, batches, &mut expected).await;
        let mut crashed = vec![false; partitions as usize];
        for p in 0..partitions {
            if rng.range(0, 3) > 0 {
                crash(dir.path(), p, acked_bytes[p as usize], &mut rng);
                crashed[p as usize] = true;
            }
        }

        let lens: Vec<u64> = {
            let log = open(&c);
            let mut lens = Vec::new();
            for p in 0..partitions {
                let got = read_all(&log, p).await;
                let exp = &expected[p as usize];
                assert!(got.len() >= acked[p as usize], "seed {seed} partition {p}: lost acknowledged records");
                assert!(got.len() <= exp.len(), "seed {seed} partition {p}: invented records");
                if !crashed[p as usize] {
                    assert_eq!(got.len(), exp.len(), "seed {seed} partition {p}");
                }
                for (g, (ts, payload)) in got.iter().zip(exp) {
                    assert_eq!((g.timestamp_ms, &g.payload), (*ts, payload), "seed {seed} partition {p}");
                }
                assert_eq!(log.next_offset(p), got.len() as u64, "seed {seed} partition {p}");
                lens.push(got.len() as u64);
            }
            let batch = (0..partitions).map(|p| rec(p, 0, b"after".to_vec())).collect();
            assert_eq!(log.append(batch).await.unwrap(), lens, "seed {seed}");
            log.close().await.unwrap();
            lens
        };

        let log = open(&c);
        assert!(log.recovery().partitions_repaired.is_empty(), "seed {seed}: {:?}", log.recovery());
        for p in 0..partitions {
            let got = read_all(&log, p).await;
            assert_eq!(got.len() as u64, lens[p as usize] + 1, "seed {seed} partition {p}");
            assert_eq!(got.last().unwrap().payload, b"after");
        }
    }
}
