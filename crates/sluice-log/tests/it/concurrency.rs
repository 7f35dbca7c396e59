//! Many concurrent appenders: dense distinct offsets, everything readable,
//! fsyncs shared (group commit).

use crate::*;
use sluice_core::EventLog;
use std::collections::HashMap;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_dense_offsets_and_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(&cfg(dir.path(), 4, 16 << 10)));
    let tasks = 32u64;
    let appends_per_task = 40u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let log = Arc::clone(&log);
        handles.push(tokio::spawn(async move {
            let mut rng = Rng::new(t);
            let mut acked = Vec::new();
            for a in 0..appends_per_task {
                let n = rng.range(1, 6);
                let batch: Vec<_> = (0..n).map(|i| rec(rng.range(0, 4) as u32, t as i64, format!("t{t}-a{a}-i{i}").into_bytes())).collect();
                let offsets = log.append(batch.clone()).await.unwrap();
                acked.extend(batch.into_iter().zip(offsets).map(|(r, o)| (r.partition, o, r.payload)));
            }
            acked
        }));
    }
    let mut by_partition: HashMap<u32, Vec<(u64, Vec<u8>)>> = HashMap::new();
    for h in handles {
        for (p, o, payload) in h.await.unwrap() {
            by_partition.entry(p).or_default().push((o, payload));
        }
    }
    let appends = tasks * appends_per_task;
    let rounds = log.sync_rounds();
    assert!(rounds < appends, "{rounds} fsync rounds for {appends} appends: no group commit");
    for p in 0..4u32 {
        let mut acked = by_partition.remove(&p).unwrap_or_default();
        acked.sort();
        // Distinct and dense from 0.
        assert!(acked.iter().enumerate().all(|(i, (o, _))| *o == i as u64), "partition {p}");
        assert_eq!(log.next_offset(p), acked.len() as u64);
        let got = read_all(log.as_ref(), p).await;
        assert_eq!(got.len(), acked.len());
        for (g, (o, payload)) in got.iter().zip(&acked) {
            assert_eq!((g.offset, &g.payload), (*o, payload));
        }
    }
    log.close().await.unwrap();
    // And everything is still there after a reopen.
    let log = open(&cfg(dir.path(), 4, 16 << 10));
    let total: usize = futures_len(&log).await;
    assert!(total as u64 >= appends);
}

async fn futures_len(log: &dyn EventLog) -> usize {
    let mut n = 0;
    for p in 0..log.partitions() {
        n += read_all(log, p).await.len();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_run_while_writers_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(&cfg(dir.path(), 2, 8 << 10)));
    let writer = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            for i in 0..300u64 {
                let batch = (0..5).map(|j| rec((j % 2) as u32, 0, payload(&format!("w{i}-{j}"), 50))).collect();
                log.append(batch).await.unwrap();
            }
        })
    };
    // A tailing reader sees a consistent, gap-free prefix at every moment.
    let mut next = [0u64; 2];
    let mut rx = log.subscribe();
    while next[0] + next[1] < 1500 {
        for p in 0..2u32 {
            let batch = log.read(p, next[p as usize], 1000, 1 << 20).await.unwrap();
            for r in batch {
                assert_eq!(r.offset, next[p as usize]);
                next[p as usize] += 1;
            }
        }
        if next[0] + next[1] < 1500 {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), rx.changed()).await;
        }
    }
    writer.await.unwrap();
}
