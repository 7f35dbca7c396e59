//! Reading segment files: the full scan used by recovery, index building and
//! retention, and the positioned read used by `EventLog::read`.

use crate::format::{
    check_segment_header, segment_file_name, RecordHeader, INDEX_INTERVAL_BYTES, MAX_PAYLOAD_BYTES, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::state::IndexEntry;
use sluice_core::{LogError, Record};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Result of scanning a segment from its header to its end.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Why the header is unusable, if it is.
    pub header_problem: Option<crate::format::FormatError>,
    /// Bytes covered by the header and the complete, valid records.
    pub valid_len: u64,
    /// Offset after the last valid record.
    pub end: u64,
    /// Largest timestamp among the valid records.
    pub max_ts: Option<i64>,
    /// Sparse index over the valid records.
    pub index: Vec<IndexEntry>,
    /// Position of the last index entry (or the header end), which the
    /// writer needs to continue the index.
    pub last_index_pos: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub problem: Option<String>,
}

/// Scans the first `file_len` bytes of a segment, validating every record
/// (length, checksum, offset sequence). Stops at the first invalid record and
/// reports why; only real I/O errors are returned as `Err`.
pub(crate) fn scan_segment(path: &Path, partition: u32, base: u64, file_len: u64) -> io::Result<Scan> {
    let mut scan =
        Scan { header_problem: None, valid_len: 0, end: base, max_ts: None, index: Vec::new(), last_index_pos: SEGMENT_HEADER_LEN, problem: None };
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let header_len = file_len.min(SEGMENT_HEADER_LEN) as usize;
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    r.read_exact(&mut header[..header_len])?;
    if let Err(why) = check_segment_header(&header[..header_len], partition, base) {
        scan.header_problem = Some(why);
        return Ok(scan);
    }
    let mut pos = SEGMENT_HEADER_LEN;
    let mut payload = Vec::new();
    let mut raw = [0u8; RECORD_HEADER_LEN as usize];
    while pos < file_len {
        let remaining = file_len - pos;
        if remaining < RECORD_HEADER_LEN {
            scan.problem = Some(format!("short record header ({remaining} of {RECORD_HEADER_LEN} bytes)"));
            break;
        }
        r.read_exact(&mut raw)?;
        let h = RecordHeader::decode(&raw);
        if h.len as usize > MAX_PAYLOAD_BYTES {
            scan.problem = Some(format!("record length {} exceeds the maximum {MAX_PAYLOAD_BYTES}", h.len));
            break;
        }
        if u64::from(h.len) > remaining - RECORD_HEADER_LEN {
            scan.problem = Some(format!("short payload ({} of {} bytes)", remaining - RECORD_HEADER_LEN, h.len));
            break;
        }
        payload.resize(h.len as usize, 0);
        r.read_exact(&mut payload)?;
        if !h.checksum_ok(&raw, &payload) {
            scan.problem = Some(format!("checksum mismatch in record at byte {pos}"));
            break;
        }
        if h.offset != scan.end {
            scan.problem = Some(format!("record at byte {pos} has offset {} where {} was expected", h.offset, scan.end));
            break;
        }
        if pos - scan.last_index_pos >= INDEX_INTERVAL_BYTES {
            scan.index.push(IndexEntry { offset: h.offset, pos });
            scan.last_index_pos = pos;
        }
        scan.max_ts = Some(scan.max_ts.map_or(h.timestamp_ms, |m| m.max(h.timestamp_ms)));
        scan.end += 1;
        pos += RECORD_HEADER_LEN + u64::from(h.len);
        scan.valid_len = pos;
    }
    scan.valid_len = scan.valid_len.max(SEGMENT_HEADER_LEN);
    Ok(scan)
}

/// Scans a sealed segment that must hold exactly the records
/// `base..end` in exactly `len` bytes; any deviation is corruption.
pub(crate) fn scan_sealed(path: &Path, partition: u32, base: u64, end: u64, len: u64) -> Result<Scan, LogError> {
    let scan = scan_segment(path, partition, base, len)?;
    let name = segment_file_name(base);
    if let Some(why) = &scan.header_problem {
        return Err(LogError::Corrupt(format!("partition {partition}, segment {name}: {why}")));
    }
    if let Some(why) = &scan.problem {
        return Err(LogError::Corrupt(format!("partition {partition}, segment {name}: {why} (after offset {})", scan.end)));
    }
    if scan.end != end {
        return Err(LogError::Corrupt(format!(
            "partition {partition}, segment {name}: holds offsets {base}..{} but the next segment starts at {end}",
            scan.end
        )));
    }
    Ok(scan)
}

/// Where and how much to read in one segment.
pub(crate) struct SegmentRead<'a> {
    /// The file.
    pub path: &'a Path,
    /// Partition, for header checks and messages.
    pub partition: u32,
    /// Base offset of the segment.
    pub base: u64,
    /// Durable byte length; nothing past it is read.
    pub len: u64,
    /// Where to start: a record boundary at or before `from`.
    pub start: IndexEntry,
    /// First offset to return.
    pub from: u64,
    /// Stop before this offset (end of the segment or the durable watermark).
    pub until: u64,
}

/// Reads records `from..until` of one segment into `out`, honouring the
/// limits (`max_records` total in `out`, about `max_bytes` of payload in
/// `bytes`, at least one record). Returns where the next record starts
/// (offset and byte position) and whether a limit was hit.
pub(crate) fn read_segment(
    req: &SegmentRead<'_>,
    max_records: usize,
    max_bytes: usize,
    out: &mut Vec<Record>,
    bytes: &mut usize,
) -> Result<(IndexEntry, bool), LogError> {
    let name = segment_file_name(req.base);
    let p = req.partition;
    let corrupt = |pos: u64, why: String| LogError::Corrupt(format!("partition {p}, segment {name}, byte {pos}: {why}"));
    let mut r = BufReader::with_capacity(256 << 10, File::open(req.path)?);
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    if req.len < SEGMENT_HEADER_LEN {
        return Err(corrupt(0, format!("segment is only {} bytes long", req.len)));
    }
    r.read_exact(&mut header)?;
    check_segment_header(&header, p, req.base).map_err(|why| corrupt(0, why.to_string()))?;
    let mut pos = req.start.pos;
    let mut off = req.start.offset;
    if pos != SEGMENT_HEADER_LEN {
        r.seek(SeekFrom::Start(pos))?;
    }
    let mut raw = [0u8; RECORD_HEADER_LEN as usize];
    while off < req.until {
        if req.len - pos.min(req.len) < RECORD_HEADER_LEN {
            return Err(corrupt(pos, format!("segment ends before offset {off}")));
        }
        r.read_exact(&mut raw)?;
        let h = RecordHeader::decode(&raw);
        if h.offset != off {
            return Err(corrupt(pos, format!("record has offset {} where {off} was expected", h.offset)));
        }
        let size = RECORD_HEADER_LEN + u64::from(h.len);
        if h.len as usize > MAX_PAYLOAD_BYTES || size > req.len - pos {
            return Err(corrupt(pos, format!("record {off} has impossible length {}", h.len)));
        }
        if off < req.from {
            r.seek_relative(i64::from(h.len))?;
        } else {
            let n = h.len as usize;
            if out.len() >= max_records || (!out.is_empty() && bytes.saturating_add(n) > max_bytes) {
                return Ok((IndexEntry { offset: off, pos }, true));
            }
            let mut payload = vec![0u8; n];
            r.read_exact(&mut payload)?;
            if !h.checksum_ok(&raw, &payload) {
                return Err(corrupt(pos, format!("checksum mismatch in record {off}")));
            }
            out.push(Record { partition: p, offset: off, timestamp_ms: h.timestamp_ms, payload });
            *bytes += n;
        }
        pos += size;
        off += 1;
    }
    Ok((IndexEntry { offset: off, pos }, out.len() >= max_records || *bytes >= max_bytes))
}
