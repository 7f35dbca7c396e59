//! `EventLog::read`: locating a segment by base offset, a position by the
//! sparse index, and reading forward with fresh file handles (so readers
//! never wait on the writer beyond a short metadata lock).

use crate::segment::{read_segment, scan_sealed, SegmentRead};
use crate::state::{index_lookup, read, IndexEntry, PartitionState};
use sluice_core::{LogError, Record};
use std::io;
use std::sync::atomic::Ordering;

/// Where to read next, as found under the segments lock.
struct Located {
    base: u64,
    end: u64,
    len: u64,
    sealed: bool,
    start: Option<IndexEntry>,
}

/// Reads records of one partition (blocking; run it off the async executor).
pub(crate) fn read_partition(part: &PartitionState, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut cur = from;
    let mut vanished = 0;
    while out.len() < max_records {
        let durable = part.durable.load(Ordering::Acquire);
        let start = part.start.load(Ordering::Acquire);
        if cur < start {
            if !out.is_empty() {
                break; // retention removed what follows; the caller continues at `cur`
            }
            cur = start;
        }
        if cur >= durable {
            break;
        }
        let Some(loc) = locate(part, cur) else {
            continue; // `cur` fell below the first segment: retention ran; re-read `start`
        };
        let path = part.segment_path(loc.base);
        let entry = match loc.start {
            Some(e) => e,
            None => {
                // A sealed segment without a cached index: build it (this also
                // verifies every record of the segment once).
                let scan = match scan_sealed(&path, part.id, loc.base, loc.end, loc.len) {
                    Err(LogError::Io(e)) if e.kind() == io::ErrorKind::NotFound && vanished < 3 => {
                        vanished += 1;
                        continue;
                    }
                    other => other?,
                };
                let entry = index_lookup(&scan.index, loc.base, cur);
                part.install_index(loc.base, scan.index, scan.max_ts);
                entry
            }
        };
        let req = SegmentRead { path: &path, partition: part.id, base: loc.base, len: loc.len, start: entry, from: cur, until: loc.end.min(durable) };
        match read_segment(&req, max_records, max_bytes, &mut out, &mut bytes) {
            Ok((next, full)) => {
                cur = next.offset;
                // Remember where this read stopped, for the next sequential read
                // (also at the end of the active segment: tailing readers continue there).
                if next.offset < loc.end || !loc.sealed {
                    part.remember_read_position(loc.base, next);
                }
                if full {
                    break;
                }
                if !loc.sealed {
                    break; // read up to the durable watermark seen at lookup
                }
            }
            Err(LogError::Io(e)) if e.kind() == io::ErrorKind::NotFound && vanished < 3 => {
                // Deleted by retention between lookup and open.
                vanished += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Finds the segment holding `offset` and, if its index is cached or a read
/// stopped nearby, the closest known record position.
fn locate(part: &PartitionState, offset: u64) -> Option<Located> {
    let segs = read(&part.segments);
    let n = segs.partition_point(|s| s.base <= offset);
    let i = n.checked_sub(1)?;
    let seg = &segs[i];
    let sealed = i + 1 < segs.len();
    let from_index = if offset == seg.base {
        Some(IndexEntry { offset: seg.base, pos: crate::format::SEGMENT_HEADER_LEN })
    } else {
        seg.index.as_deref().map(|idx| {
            seg.last_used.store(part.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            index_lookup(idx, seg.base, offset)
        })
    };
    // A remembered read position closer to `offset` beats the index.
    let start = match (from_index, part.read_hint(seg.base, offset)) {
        (Some(a), Some(b)) => Some(if b.offset > a.offset { b } else { a }),
        (a, b) => a.or(b),
    };
    Some(Located { base: seg.base, end: seg.end, len: seg.len, sealed, start })
}
