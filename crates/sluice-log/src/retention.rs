//! Retention: deleting whole sealed segments by age and by size.
//!
//! Only a prefix of a partition's segments is ever deleted (oldest first,
//! never the active segment), so the remaining offsets stay dense from the
//! new start offset and a crash halfway through a pass leaves a valid log.

use crate::format::segment_file_name;
use crate::segment::scan_sealed;
use crate::state::{lock, read, sync_dir, write, PartitionState, Shared};
use sluice_core::{LogError, RetentionReport};
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A sealed segment as seen by retention.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    base: u64,
    end: u64,
    len: u64,
    max_ts: Option<i64>,
}

/// Runs one retention pass over every partition (blocking).
pub(crate) fn enforce(shared: &Shared) -> Result<RetentionReport, LogError> {
    let _pass = lock(&shared.retention);
    let mut report = RetentionReport::default();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis();
    let cutoff_ms = shared.cfg.retention_max_age.map(|age| {
        let cutoff = now_ms.saturating_sub(age.as_millis());
        i64::try_from(cutoff).unwrap_or(i64::MAX)
    });
    for part in &shared.partitions {
        enforce_partition(part, cutoff_ms, shared.cfg.retention_max_bytes, &mut report)?;
    }
    if report.segments_deleted > 0 {
        tracing::info!(
            segments = report.segments_deleted,
            bytes = report.bytes_deleted,
            records = report.records_deleted,
            "log retention deleted old segments"
        );
    }
    Ok(report)
}

fn enforce_partition(part: &PartitionState, cutoff_ms: Option<i64>, max_bytes: Option<u64>, report: &mut RetentionReport) -> Result<(), LogError> {
    // Snapshot the sealed segments and the partition size. Only retention
    // removes segments (and we hold the retention lock); the writer only adds
    // segments at the end, so this prefix stays valid.
    let (sealed, mut total): (Vec<Candidate>, u64) = {
        let segs = read(&part.segments);
        let sealed =
            segs[..segs.len().saturating_sub(1)].iter().map(|s| Candidate { base: s.base, end: s.end, len: s.len, max_ts: s.max_ts }).collect();
        (sealed, segs.iter().map(|s| s.len).sum())
    };
    let mut delete = 0usize;
    if let Some(cutoff) = cutoff_ms {
        while delete < sealed.len() {
            let c = sealed[delete];
            let max_ts = match c.max_ts {
                Some(ts) => Some(ts),
                None => {
                    // Not known since open: scan the segment once.
                    let path = part.segment_path(c.base);
                    let scan = scan_sealed(&path, part.id, c.base, c.end, c.len)?;
                    set_max_ts(part, c.base, scan.max_ts);
                    scan.max_ts
                }
            };
            // A segment without records holds nothing worth keeping.
            if max_ts.is_some_and(|ts| ts >= cutoff) {
                break;
            }
            delete += 1;
        }
    }
    let by_age: u64 = sealed[..delete].iter().map(|c| c.len).sum();
    total -= by_age;
    if let Some(max) = max_bytes {
        while delete < sealed.len() && total > max {
            total -= sealed[delete].len;
            delete += 1;
        }
    }
    if delete == 0 {
        return Ok(());
    }
    let doomed = &sealed[..delete];
    {
        let mut segs = write(&part.segments);
        debug_assert!(segs.len() > delete && segs[delete - 1].base == doomed[delete - 1].base);
        segs.drain(..delete);
        part.start.store(segs[0].base, Ordering::Release);
    }
    // Delete oldest first: a crash in between leaves a shorter prefix gone,
    // never a hole.
    for c in doomed {
        let path = part.segment_path(c.base);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(partition = part.id, segment = %path.display(), error = %e, "could not delete log segment");
                return Err(e.into());
            }
        }
        tracing::debug!(partition = part.id, segment = %segment_file_name(c.base), "retention deleted segment");
        report.segments_deleted += 1;
        report.bytes_deleted += c.len;
        report.records_deleted += c.end - c.base;
    }
    sync_dir(&part.dir)?;
    Ok(())
}

fn set_max_ts(part: &PartitionState, base: u64, max_ts: Option<i64>) {
    let mut segs = write(&part.segments);
    if let Ok(i) = segs.binary_search_by_key(&base, |s| s.base) {
        segs[i].max_ts = max_ts;
    }
}
