//! Reading events back: by id (through the event id index) and as filtered,
//! paginated scans of the log.
//!
//! A listing walks every partition from a cursor, keeps the events of the
//! caller's workspace that match the filter, and merges partitions by append
//! time, so pages come in acceptance order (oldest first). The cursor holds
//! one offset per partition. Each page scans at most [`SCAN_BUDGET`] records
//! per partition: a very selective filter over a long log may return a page
//! with fewer items (even none) and a `next_cursor` to continue from. The
//! event lake answers analytical queries; this API is for inspection and
//! tailing.

use base64::Engine;
use chrono::{DateTime, Utc};
use sluice_core::{Event, EventLog, WorkspaceName};
use sluice_log::index::IdIndex;

/// Most log records scanned per partition for one page.
pub const SCAN_BUDGET: usize = 100_000;

/// Filters of `GET /v1/events`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Event time at or after.
    pub from: Option<DateTime<Utc>>,
    /// Event time before.
    pub to: Option<DateTime<Utc>>,
}

impl EventFilter {
    fn matches(&self, e: &Event) -> bool {
        self.event_type.as_deref().is_none_or(|t| e.event_type.as_str() == t)
            && self.customer_id.as_deref().is_none_or(|c| e.customer_id.as_deref() == Some(c))
            && self.from.is_none_or(|f| e.timestamp >= f)
            && self.to.is_none_or(|t| e.timestamp < t)
    }
}

/// A page of events.
#[derive(Debug)]
pub struct EventPage {
    /// Events in acceptance order.
    pub data: Vec<Event>,
    /// Cursor to continue from. Always present: at the end of the log it
    /// points at the end, so polling it returns new events (tailing).
    pub next_cursor: String,
    /// True when the scan reached the end of the log: there are no more
    /// matching events right now.
    pub at_end: bool,
}

/// Reads errors: a bad cursor, or the log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The cursor is not one this server issued.
    #[error("invalid cursor")]
    BadCursor,
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] sluice_core::LogError),
}

/// A position in a partition: a record offset, and how many events of that
/// record (a batch record holds many) were already returned.
type Position = (u64, usize);

fn encode_cursor(positions: &[Position]) -> String {
    let text = positions.iter().map(|&(o, skip)| if skip == 0 { o.to_string() } else { format!("{o}.{skip}") }).collect::<Vec<_>>().join(",");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v2:{text}"))
}

/// Reads a cursor: `v1:` (record offsets) or `v2:` (offsets, each optionally
/// `.n` = events of that record already returned).
fn decode_cursor(cursor: &str, partitions: u32) -> Result<Vec<Position>, ReadError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| ReadError::BadCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| ReadError::BadCursor)?;
    let list = text.strip_prefix("v2:").or_else(|| text.strip_prefix("v1:")).ok_or(ReadError::BadCursor)?;
    let parse = |item: &str| -> Option<Position> {
        match item.split_once('.') {
            Some((o, n)) => Some((o.parse().ok()?, n.parse().ok()?)),
            None => Some((item.parse().ok()?, 0)),
        }
    };
    let positions: Vec<Position> = list.split(',').map(parse).collect::<Option<_>>().ok_or(ReadError::BadCursor)?;
    if positions.len() != partitions as usize {
        return Err(ReadError::BadCursor);
    }
    Ok(positions)
}

/// The cursor pointing at the current end of the log (`cursor=latest`).
pub fn latest_cursor(log: &dyn EventLog) -> String {
    let ends: Vec<Position> = (0..log.partitions()).map(|p| (log.next_offset(p), 0)).collect();
    encode_cursor(&ends)
}

/// A matching event and where it is: append time, record offset, index in
/// the record, events in the record.
struct Candidate {
    at: i64,
    offset: u64,
    index: usize,
    in_record: usize,
    event: Event,
}

/// Lists events of `workspace` matching `filter`, starting at `cursor`.
pub async fn list_events(
    log: &dyn EventLog,
    workspace: &WorkspaceName,
    filter: &EventFilter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<EventPage, ReadError> {
    let parts = log.partitions();
    let mut positions = match cursor {
        Some("latest") => return Ok(EventPage { data: vec![], next_cursor: latest_cursor(log), at_end: true }),
        Some(c) => decode_cursor(c, parts)?,
        None => vec![(0, 0); parts as usize],
    };
    let limit = limit.clamp(1, 1000);
    let ends: Vec<u64> = (0..parts).map(|p| log.next_offset(p)).collect();
    // Per partition: matching events in order, up to `limit` (plus the rest
    // of the last record read).
    let mut candidates: Vec<Vec<Candidate>> = Vec::with_capacity(parts as usize);
    for p in 0..parts {
        let mut found = Vec::new();
        let (start, mut skip) = positions[p as usize];
        let mut pos = start.max(log.start_offset(p));
        if pos != start {
            skip = 0; // the record was removed by retention
        }
        let end = ends[p as usize];
        let mut scanned = 0;
        while pos < end && found.len() < limit && scanned < SCAN_BUDGET {
            let records = sluice_core::read_decoded(log, "events_api", p, pos, 1000, 4 << 20).await?;
            if records.is_empty() {
                break;
            }
            for r in records {
                scanned += 1;
                pos = r.offset + 1;
                let skip_here = if r.offset == start { skip } else { 0 };
                let Ok(payload) = r.payload else { continue };
                if payload.workspace() != workspace {
                    continue;
                }
                let events = payload.into_events();
                let in_record = events.len();
                for (index, event) in events.into_iter().enumerate().skip(skip_here) {
                    if filter.matches(&event) {
                        found.push(Candidate { at: r.timestamp_ms, offset: r.offset, index, in_record, event });
                    }
                }
                if found.len() >= limit {
                    break;
                }
            }
        }
        // Where to resume if none of `found` is taken: the first candidate, or
        // past everything scanned.
        positions[p as usize] = found.first().map_or((pos, 0), |c| (c.offset, c.index));
        candidates.push(found);
    }
    // Merge partitions by append time, then partition, then position.
    let mut merged: Vec<(u32, Candidate)> = candidates.into_iter().enumerate().flat_map(|(p, v)| v.into_iter().map(move |c| (p as u32, c))).collect();
    merged.sort_by_key(|(p, c)| (c.at, *p, c.offset, c.index));
    merged.truncate(limit);
    // Resume each partition after the last taken event of it.
    let mut resume = positions.clone();
    for (p, c) in &merged {
        resume[*p as usize] = if c.index + 1 < c.in_record { (c.offset, c.index + 1) } else { (c.offset + 1, 0) };
    }
    // Candidates of one partition are taken in order, so "after the last
    // taken" is also "at the first untaken".
    let at_end = resume.iter().zip(&ends).all(|(r, e)| r.0 >= *e);
    Ok(EventPage { data: merged.into_iter().map(|(_, c)| c.event).collect(), next_cursor: encode_cursor(&resume), at_end })
}

/// One event of `workspace` by id.
pub async fn get_event(log: &dyn EventLog, index: &IdIndex, workspace: &WorkspaceName, id: &str) -> Result<Option<Event>, ReadError> {
    let key = crate::pipeline::id_key(workspace.as_str(), id);
    let Some(at) = index.get(key).map_err(|e| ReadError::Log(sluice_core::LogError::Io(e)))? else { return Ok(None) };
    let (p, o) = (at.partition, at.offset);
    if o < log.start_offset(p) {
        return Ok(None); // removed by log retention
    }
    let record = sluice_core::fetch_record(log, "events_api", p, o).await?;
    Ok(record.and_then(|r| r.payload.ok()).filter(|p| p.workspace() == workspace).and_then(|p| p.find(id)))
}
