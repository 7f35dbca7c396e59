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
use sluice_store::Store;

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
    /// The state store could not be read.
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
}

fn encode_cursor(offsets: &[u64]) -> String {
    let text = offsets.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{text}"))
}

fn decode_cursor(cursor: &str, partitions: u32) -> Result<Vec<u64>, ReadError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| ReadError::BadCursor)?;
    let text = String::from_utf8(bytes).map_err(|_| ReadError::BadCursor)?;
    let list = text.strip_prefix("v1:").ok_or(ReadError::BadCursor)?;
    let offsets: Vec<u64> = list.split(',').map(str::parse).collect::<Result<_, _>>().map_err(|_| ReadError::BadCursor)?;
    if offsets.len() != partitions as usize {
        return Err(ReadError::BadCursor);
    }
    Ok(offsets)
}

/// The cursor pointing at the current end of the log (`cursor=latest`).
pub fn latest_cursor(log: &dyn EventLog) -> String {
    let ends: Vec<u64> = (0..log.partitions()).map(|p| log.next_offset(p)).collect();
    encode_cursor(&ends)
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
        None => vec![0; parts as usize],
    };
    let limit = limit.clamp(1, 1000);
    let ends: Vec<u64> = (0..parts).map(|p| log.next_offset(p)).collect();
    // Per partition: matching (append time, offset, event) in order, up to `limit`.
    let mut candidates: Vec<Vec<(i64, u64, Event)>> = Vec::with_capacity(parts as usize);
    for p in 0..parts {
        let mut found = Vec::new();
        let mut pos = positions[p as usize].max(log.start_offset(p));
        let end = ends[p as usize];
        let mut scanned = 0;
        while pos < end && found.len() < limit && scanned < SCAN_BUDGET {
            let records = log.read(p, pos, 1000, 4 << 20).await?;
            if records.is_empty() {
                break;
            }
            for r in records {
                scanned += 1;
                pos = r.offset + 1;
                let Ok(e) = serde_json::from_slice::<Event>(&r.payload) else { continue };
                if &e.workspace == workspace && filter.matches(&e) {
                    found.push((r.timestamp_ms, r.offset, e));
                    if found.len() >= limit {
                        break;
                    }
                }
            }
        }
        // Where to resume if none of `found` is taken: the first candidate, or
        // past everything scanned.
        positions[p as usize] = found.first().map(|c| c.1).unwrap_or(pos);
        candidates.push(found);
    }
    // Merge partitions by append time, then partition, then offset.
    let mut merged: Vec<(i64, u32, u64, Event)> = candidates
        .into_iter()
        .enumerate()
        .flat_map(|(p, v)| v.into_iter().map(move |(t, o, e)| (t, p as u32, o, e)))
        .collect();
    merged.sort_by_key(|&(t, p, o, _)| (t, p, o));
    merged.truncate(limit);
    // Resume each partition after the last taken event of it.
    let mut resume = positions.clone();
    for (_, p, o, _) in &merged {
        resume[*p as usize] = o + 1;
    }
    // Candidates of one partition are taken in offset order, so "after the
    // last taken" is also "at the first untaken".
    let at_end = resume.iter().zip(&ends).all(|(r, e)| r >= e);
    Ok(EventPage { data: merged.into_iter().map(|(_, _, _, e)| e).collect(), next_cursor: encode_cursor(&resume), at_end })
}

/// One event of `workspace` by id.
pub async fn get_event(log: &dyn EventLog, store: &Store, workspace: &WorkspaceName, id: &str) -> Result<Option<Event>, ReadError> {
    let Some((p, o)) = store.event_position(workspace.as_str(), id).await? else { return Ok(None) };
    if o < log.start_offset(p) {
        return Ok(None); // removed by log retention
    }
    let records = log.read(p, o, 1, 1).await?;
    Ok(records
        .into_iter()
        .find(|r| r.offset == o)
        .and_then(|r| serde_json::from_slice::<Event>(&r.payload).ok())
        .filter(|e| &e.workspace == workspace && e.id.as_str() == id))
}
