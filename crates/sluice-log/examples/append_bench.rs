//! Append throughput of the embedded log, shaped like the ingest path:
//! a few concurrent appenders, each appending groups of thousands of
//! ~300-byte records spread over the partitions, every call durable.
//!
//! ```text
//! cargo run -p sluice-log --release --example append_bench -- [dir] [records] [batch] [appenders] [partitions]
//! ```
//!
//! Defaults: a temporary directory, 2,000,000 records, batches of 2,000,
//! 4 appenders, 8 partitions. Prints records/s, MB/s and fsync rounds, then
//! the time to read everything back.

#![allow(clippy::unwrap_used)]

use sluice_core::{AppendRecord, EventLog};
use sluice_log::{EmbeddedLog, LogConfig};
use std::sync::Arc;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = args.get(1).filter(|d| *d != "-").map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let arg = |i: usize, default: u64| args.get(i).map_or(default, |a| a.parse().unwrap());
    let records = arg(2, 2_000_000);
    let batch = arg(3, 2_000);
    let appenders = arg(4, 4);
    let partitions = arg(5, 8) as u32;

    let log = Arc::new(EmbeddedLog::open(LogConfig::new(&dir, partitions)).unwrap());
    let payload = vec![b'x'; 300];
    let per_appender = records / appenders;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let log = Arc::clone(&log);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < per_appender {
                let n = batch.min(per_appender - done);
                let recs = (0..n)
                    .map(|i| AppendRecord {
                        partition: ((a * 7919 + done + i) % u64::from(partitions)) as u32,
                        timestamp_ms: 0,
                        payload: payload.clone(),
                    })
                    .collect();
                log.append(recs).await.unwrap();
                done += n;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = per_appender * appenders;
    let stats = log.stats();
    println!(
        "appended {total} records in {secs:.2}s: {:.0} records/s, {:.1} MB/s on disk, {} fsync rounds ({} appends)",
        total as f64 / secs,
        stats.bytes as f64 / secs / 1e6,
        log.sync_rounds(),
        total.div_ceil(batch),
    );

    let started = Instant::now();
    let mut read = 0u64;
    for p in 0..partitions {
        let mut next = 0;
        loop {
            let got = log.read(p, next, 10_000, 8 << 20).await.unwrap();
            let Some(last) = got.last() else { break };
            next = last.offset + 1;
            read += got.len() as u64;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("read back {read} records in {secs:.2}s: {:.0} records/s", read as f64 / secs);
    log.close().await.unwrap();
}
