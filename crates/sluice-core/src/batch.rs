//! Event batches: many similar events in one log record.
//!
//! A CSV usage import turns every row into an event. Written one JSON record
//! per row, a million rows are ~250 MB of log, a million JSON parses in every
//! consumer and a million dedup-index rows to commit one by one. Rows of one
//! import differ only in a few fields, so the importer writes them as
//! **batches** instead: one log record holds up to [`MAX_BATCH_ROWS`] events
//! that share workspace, type, receive time, context and a property template,
//! and differ in id, event time, customer, subscription and one value. A
//! batch is still a list of ordinary events: every reader can expand it
//! ([`EventBatch::events`]) and gets exactly the events a row-by-row import
//! would have written; readers that care about speed (the meters and
//! event_counts consumers) read the rows directly.
//!
//! # Payload format (version 1)
//!
//! A log record payload is either a JSON [`Event`] (it starts with `{`) or a
//! batch, which starts with the 4 magic bytes `00 'S' 'B' '1'` (a JSON text
//! never starts with a NUL byte). After the magic, all integers are unsigned
//! LEB128 varints unless noted:
//!
//! | field | encoding |
//! |---|---|
//! | header length, header | varint, then that many bytes of JSON: `{"workspace", "type", "received_at" (RFC 3339), "context" (object), "properties" (object: the template), "value_path" (dot path or null)}` |
//! | dictionary | varint count, then each string as varint length + UTF-8 (customer and subscription ids) |
//! | rows | varint count, then each row |
//!
//! A row is a flags byte — bit 0: the id is `csv_` + 32 lowercase hex digits
//! and is stored as 16 bytes; bit 1: has a customer; bit 2: has a
//! subscription; bit 3: has a value — then the id (16 bytes, or varint
//! length + UTF-8), the event time as a zigzag varint of microseconds since
//! the previous row's event time (the first row: since the Unix epoch), the
//! customer and subscription as dictionary indexes, and the value as varint
//! length + UTF-8 (a decimal number as text).
//!
//! The expanded event of a row has the header's workspace, type,
//! `received_at` and context, the row's id, time, customer and subscription,
//! and as properties the template with the row's value put at `value_path`
//! as a JSON string (`{"gb": "12.5"}`; a nested path makes nested objects).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::event::Event;
use crate::ids::{EventId, EventType, IdError, WorkspaceName};

/// The first bytes of a batch payload.
pub const MAGIC: [u8; 4] = [0, b'S', b'B', b'1'];
/// Most rows in one batch record.
pub const MAX_BATCH_ROWS: usize = 16_384;
/// Prefix of the ids that are stored as 16 bytes.
const HEX_ID_PREFIX: &str = "csv_";

/// What a batch's events share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Workspace of every event.
    pub workspace: WorkspaceName,
    /// Type of every event.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Receive time of every event.
    #[serde(with = "crate::event::rfc3339")]
    pub received_at: DateTime<Utc>,
    /// Context of every event (a JSON object).
    pub context: Map<String, Value>,
    /// Properties every event has (a JSON object).
    pub properties: Map<String, Value>,
    /// Where each row's value goes in its event's properties.
    pub value_path: Option<String>,
}

/// One event of a batch: what differs from the other events.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Event id.
    pub id: EventId,
    /// Event time.
    pub timestamp: DateTime<Utc>,
    /// Customer. Shared (`Arc<str>`): a decoded batch's rows point at its
    /// dictionary entry instead of copying the id per row (three consumers
    /// decode every batch record).
    pub customer_id: Option<Arc<str>>,
    /// Subscription (shared like the customer).
    pub subscription_id: Option<Arc<str>>,
    /// The value (a decimal number as text), put at `value_path`.
    pub value: Option<String>,
}

/// Events sharing a header.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// What the events share.
    pub header: BatchHeader,
    /// One entry per event.
    pub rows: Vec<BatchRow>,
}

/// Why a log record payload could not be decoded: it is neither a JSON
/// event nor a well-formed event batch. The messages are stable: they end up
/// in dead letters and job results.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The payload is not a batch and not a JSON event.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// [`EventBatch::decode`] was given something without the batch magic.
    #[error("not an event batch")]
    NotABatch,
    /// The batch header is not valid JSON of a [`BatchHeader`].
    #[error("batch header: {0}")]
    Header(#[source] serde_json::Error),
    /// The batch ends before a field it announces.
    #[error("batch: truncated")]
    Truncated,
    /// A variable-length integer runs past 64 bits.
    #[error("batch: varint too long")]
    VarintTooLong,
    /// A length does not fit this platform's `usize`.
    #[error("batch: length out of range")]
    LengthOutOfRange,
    /// A string field is not UTF-8.
    #[error("batch: a string is not UTF-8")]
    NotUtf8,
    /// A row refers to a dictionary entry that does not exist.
    #[error("batch: dictionary index {0} out of range")]
    DictionaryIndex(u64),
    /// A row's event id is not a valid id.
    #[error("batch: bad id: {0}")]
    BadId(#[source] IdError),
    /// A row's timestamp is outside the representable range.
    #[error("batch: time out of range")]
    TimeOutOfRange,
    /// Bytes follow the last row.
    #[error("batch: trailing bytes")]
    TrailingBytes,
}

/// A decoded log record payload.
#[derive(Debug, Clone)]
pub enum Payload {
    /// One event (JSON).
    Event(Event),
    /// A batch of events.
    Batch(EventBatch),
}

impl Payload {
    /// Decodes a log record payload.
    pub fn decode(bytes: &[u8]) -> Result<Payload, PayloadError> {
        if bytes.starts_with(&MAGIC) {
            EventBatch::decode(bytes).map(Payload::Batch)
        } else {
            Ok(Payload::Event(serde_json::from_slice::<Event>(bytes)?))
        }
    }

    /// The events of the payload (one, or a batch's rows expanded).
    pub fn into_events(self) -> Vec<Event> {
        match self {
            Payload::Event(e) => vec![e],
            Payload::Batch(b) => b.events().collect(),
        }
    }

    /// Workspace of the payload's events.
    pub fn workspace(&self) -> &WorkspaceName {
        match self {
            Payload::Event(e) => &e.workspace,
            Payload::Batch(b) => &b.header.workspace,
        }
    }

    /// Number of events in the payload.
    pub fn len(&self) -> usize {
        match self {
            Payload::Event(_) => 1,
            Payload::Batch(b) => b.rows.len(),
        }
    }

    /// True for a batch without rows (never written).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event with this id, if the payload holds it.
    pub fn find(self, id: &str) -> Option<Event> {
        match self {
            Payload::Event(e) => (e.id.as_str() == id).then_some(e),
            Payload::Batch(b) => b.rows.iter().position(|r| r.id.as_str() == id).map(|i| b.event(i)),
        }
    }
}

/// The events of a log record payload; an error if it is neither an event
/// nor a batch.
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, PayloadError> {
    Payload::decode(bytes).map(Payload::into_events)
}

impl EventBatch {
    /// The event of row `i` (panics if out of range).
    pub fn event(&self, i: usize) -> Event {
        let h = &self.header;
        let r = &self.rows[i];
        Event {
            workspace: h.workspace.clone(),
            id: r.id.clone(),
            event_type: h.event_type.clone(),
            timestamp: r.timestamp,
            received_at: h.received_at,
            customer_id: r.customer_id.as_deref().map(str::to_owned),
            subscription_id: r.subscription_id.as_deref().map(str::to_owned),
            user_id: None,
            properties: raw(&self.properties_of(r)),
            context: raw(&Value::Object(h.context.clone())),
        }
    }

    /// Every event of the batch, in row order.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        let context = raw(&Value::Object(self.header.context.clone()));
        let template = Template::new(self);
        self.rows.iter().map(move |r| Event {
            workspace: self.header.workspace.clone(),
            id: r.id.clone(),
            event_type: self.header.event_type.clone(),
            timestamp: r.timestamp,
            received_at: self.header.received_at,
            customer_id: r.customer_id.as_deref().map(str::to_owned),
            subscription_id: r.subscription_id.as_deref().map(str::to_owned),
            user_id: None,
            properties: template.properties(self, r),
            context: context.clone(),
        })
    }

    /// The properties of a row's event: the template with the value at
    /// `value_path`.
    pub fn properties_of(&self, r: &BatchRow) -> Value {
        let mut props = self.header.properties.clone();
        if let (Some(path), Some(v)) = (&self.header.value_path, &r.value) {
            let mut parts: Vec<&str> = path.split('.').collect();
            let leaf = parts.pop().unwrap_or_default();
            let mut obj = &mut props;
            for p in parts {
                let slot = obj.entry(p.to_owned()).or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                let Value::Object(next) = slot else { unreachable!("made an object above") };
                obj = next;
            }
            obj.insert(leaf.to_owned(), Value::String(v.clone()));
        }
        Value::Object(props)
    }

    /// Encodes the batch as a log record payload.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = Vec::with_capacity(64 + header.len() + self.rows.len() * 40);
        out.extend_from_slice(&MAGIC);
        put_varint(&mut out, header.len() as u64);
        out.extend_from_slice(&header);
        // Dictionary of customer and subscription ids, in first-use order;
        // each row's entries are looked up once (foldhash: SipHash and three
        // lookups per row made this a twentieth of an import's CPU).
        let mut dict: Vec<&str> = Vec::new();
        let mut lookup: foldhash::HashMap<&str, u64> = foldhash::HashMap::with_capacity_and_hasher(64, Default::default());
        let mut refs: Vec<u64> = Vec::with_capacity(self.rows.len() * 2);
        for r in &self.rows {
            for s in [&r.customer_id, &r.subscription_id].into_iter().flatten() {
                let s: &str = s;
                let next = dict.len() as u64;
                let i = *lookup.entry(s).or_insert_with(|| {
                    dict.push(s);
                    next
                });
                refs.push(i);
            }
        }
        let mut refs = refs.into_iter();
        put_varint(&mut out, dict.len() as u64);
        for s in &dict {
            put_str(&mut out, s);
        }
        put_varint(&mut out, self.rows.len() as u64);
        let mut prev = 0i64;
        for r in &self.rows {
            let hex = hex_id(r.id.as_str());
            let flags = u8::from(hex.is_some())
                | (u8::from(r.customer_id.is_some()) << 1)
                | (u8::from(r.subscription_id.is_some()) << 2)
                | (u8::from(r.value.is_some()) << 3);
            out.push(flags);
            match hex {
                Some(b) => out.extend_from_slice(&b),
                None => put_str(&mut out, r.id.as_str()),
            }
            let t = r.timestamp.timestamp_micros();
            put_varint(&mut out, zigzag(t.wrapping_sub(prev)));
            prev = t;
            for _ in [&r.customer_id, &r.subscription_id].into_iter().flatten() {
                put_varint(&mut out, refs.next().unwrap_or_default());
            }
            if let Some(v) = &r.value {
                put_str(&mut out, v);
            }
        }
        out
    }

    /// Decodes a payload written by [`EventBatch::encode`].
    pub fn decode(bytes: &[u8]) -> Result<EventBatch, PayloadError> {
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(PayloadError::NotABatch);
        }
        let hlen = r.len()?;
        let header: BatchHeader = serde_json::from_slice(r.take(hlen)?).map_err(PayloadError::Header)?;
        let n_dict = r.len()?;
        let mut dict = Vec::with_capacity(n_dict.min(1 << 16));
        for _ in 0..n_dict {
            dict.push(Arc::<str>::from(r.str()?));
        }
        let n = r.len()?;
        let mut rows = Vec::with_capacity(n.min(MAX_BATCH_ROWS * 4));
        let mut prev = 0i64;
        let get = |i: u64, dict: &[Arc<str>]| dict.get(i as usize).cloned().ok_or(PayloadError::DictionaryIndex(i));
        for _ in 0..n {
            let flags = r.take(1)?[0];
            let id = if flags & 1 != 0 {
                let mut b = [0u8; 16];
                b.copy_from_slice(r.take(16)?);
                hex_event_id(&b)
            } else {
                EventId::parse(r.str()?).map_err(PayloadError::BadId)?
            };
            prev = prev.wrapping_add(unzigzag(r.varint()?));
            let timestamp = DateTime::from_timestamp_micros(prev).ok_or(PayloadError::TimeOutOfRange)?;
            let customer_id = if flags & 2 != 0 { Some(get(r.varint()?, &dict)?) } else { None };
            let subscription_id = if flags & 4 != 0 { Some(get(r.varint()?, &dict)?) } else { None };
            let value = if flags & 8 != 0 { Some(r.str()?.to_owned()) } else { None };
            rows.push(BatchRow { id, timestamp, customer_id, subscription_id, value });
        }
        if r.pos != bytes.len() {
            return Err(PayloadError::TrailingBytes);
        }
        Ok(EventBatch { header, rows })
    }
}

/// A decoded batch whose rows are read as event fields without building an
/// [`Event`] per row: the lake writer keeps batches like this while it
/// buffers, so a buffered row costs its [`BatchRow`] instead of a whole
/// expanded event, and writing it costs no JSON parse.
pub struct BatchRows {
    /// The batch.
    pub batch: EventBatch,
    template: Template,
    context: Box<RawValue>,
}

impl BatchRows {
    /// Prepares `batch` (serializes its template and context once).
    pub fn new(batch: EventBatch) -> BatchRows {
        let template = Template::new(&batch);
        let context = raw(&Value::Object(batch.header.context.clone()));
        BatchRows { batch, template, context }
    }

    /// The context of every row's event, as JSON text.
    pub fn context(&self) -> &str {
        self.context.get()
    }

    /// Replaces `out` with the properties JSON of row `i`'s event (the
    /// text [`EventBatch::events`] gives it).
    pub fn properties_into(&self, i: usize, out: &mut String) {
        out.clear();
        self.template.write(&self.batch, &self.batch.rows[i], out);
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The properties JSON of a batch's rows as text around the value: the
/// template serialized once with a marker at `value_path`, split at the
/// marker. Expanding a row is then two copies and the value, instead of
/// building and serializing a JSON object per row.
struct Template {
    /// Text before and after the value, when the split worked.
    around: Option<(String, String)>,
    /// The properties of a row without a value.
    without: Box<RawValue>,
}

impl Template {
    const MARKER: &'static str = "\u{1}sluice-batch-value\u{1}";

    fn new(b: &EventBatch) -> Template {
        let without = raw(&Value::Object(b.header.properties.clone()));
        let marked = BatchRow {
            id: EventId::parse("marker").unwrap_or_else(|_| EventId::generate()),
            timestamp: DateTime::<Utc>::UNIX_EPOCH,
            customer_id: None,
            subscription_id: None,
            value: Some(Self::MARKER.to_owned()),
        };
        let text = b.properties_of(&marked).to_string();
        let token = serde_json::to_string(Self::MARKER).unwrap_or_default();
        let around = match text.match_indices(&token).count() {
            1 => text.split_once(&token).map(|(a, z)| (a.to_owned(), z.to_owned())),
            _ => None,
        };
        Template { around: b.header.value_path.as_ref().and(around), without }
    }

    fn properties(&self, b: &EventBatch, r: &BatchRow) -> Box<RawValue> {
        match (&self.around, &r.value) {
            (_, None) => self.without.clone(),
            (Some(_), Some(_)) => {
                let mut text = String::new();
                self.write(b, r, &mut text);
                RawValue::from_string(text).unwrap_or_else(|_| raw(&b.properties_of(r)))
            }
            (None, Some(_)) => raw(&b.properties_of(r)),
        }
    }

    /// Appends the properties JSON of row `r` to `out`.
    fn write(&self, b: &EventBatch, r: &BatchRow, out: &mut String) {
        match (&self.around, &r.value) {
            (_, None) => out.push_str(self.without.get()),
            (Some((a, z)), Some(v)) => {
                out.push_str(a);
                // The value as a JSON string; decimal text needs no escapes.
                if v.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
                    out.push('"');
                    out.push_str(v);
                    out.push('"');
                } else {
                    out.push_str(&serde_json::to_string(v).unwrap_or_default());
                }
                out.push_str(z);
            }
            (None, Some(_)) => out.push_str(&b.properties_of(r).to_string()),
        }
    }
}

fn raw(v: &Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).unwrap_or_else(|_| Event::empty_object())
}

/// The event id `csv_` + the 32 hex digits of `bytes`: the form a batch
/// record stores in 16 bytes (CSV import ids). Written into a buffer, then
/// copied once (a `char` push per digit checked capacity and encoded UTF-8
/// 32 times), and not validated again: the form is valid by construction.
pub fn hex_event_id(bytes: &[u8; 16]) -> EventId {
    let mut text = [0u8; HEX_ID_PREFIX.len() + 32];
    text[..HEX_ID_PREFIX.len()].copy_from_slice(HEX_ID_PREFIX.as_bytes());
    for (pair, x) in text[HEX_ID_PREFIX.len()..].chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[(x >> 4) as usize];
        pair[1] = HEX[(x & 15) as usize];
    }
    // ASCII by construction: the check cannot fail.
    EventId::trusted(std::str::from_utf8(&text).unwrap_or_default().to_owned())
}

/// `csv_` + 32 lowercase hex digits → the 16 bytes.
fn hex_id(id: &str) -> Option<[u8; 16]> {
    let hex = id.strip_prefix(HEX_ID_PREFIX)?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(hex[2 * i])? << 4) | nibble(hex[2 * i + 1])?;
    }
    Some(out)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(PayloadError::Truncated)?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, PayloadError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(PayloadError::VarintTooLong)
    }

    fn len(&mut self) -> Result<usize, PayloadError> {
        usize::try_from(self.varint()?).map_err(|_| PayloadError::LengthOutOfRange)
    }

    fn str(&mut self) -> Result<&'a str, PayloadError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| PayloadError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn batch() -> EventBatch {
        let mut filter = Map::new();
        filter.insert("region".into(), Value::String("eu".into()));
        EventBatch {
            header: BatchHeader {
                workspace: WorkspaceName::parse("acme").unwrap(),
                event_type: EventType::parse("storage.used").unwrap(),
                received_at: "2024-05-01T00:00:01.5Z".parse().unwrap(),
                context: serde_json::from_str(r#"{"source":"csv_import"}"#).unwrap(),
                properties: filter,
                value_path: Some("usage.gb".into()),
            },
            rows: vec![
                BatchRow {
                    id: EventId::parse("csv_00ff00ff00ff00ff00ff00ff00ff00ff").unwrap(),
                    timestamp: "2024-04-30T15:00:00Z".parse().unwrap(),
                    customer_id: Some("cust-1".into()),
                    subscription_id: Some("sub-1".into()),
                    value: Some("12.5".into()),
                },
                BatchRow {
                    id: EventId::parse("given id, with \"quotes\" and ünïcode").unwrap(),
                    timestamp: "1969-12-31T23:59:59.999999Z".parse().unwrap(),
                    customer_id: Some("cust-1".into()),
                    subscription_id: None,
                    value: None,
                },
                BatchRow {
                    id: EventId::parse("csv_00FF00ff00ff00ff00ff00ff00ff00ff").unwrap(), // upper case: stored as text
                    timestamp: "2024-04-30T15:00:00.000001Z".parse().unwrap(),
                    customer_id: None,
                    subscription_id: Some("cust-1".into()),
                    value: Some("-0.000000001".into()),
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let b = batch();
        let bytes = b.encode();
        assert!(bytes.starts_with(&MAGIC));
        assert_eq!(EventBatch::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn batch_rows_give_the_fields_of_the_expanded_events() {
        let mut b = batch();
        b.rows.push(BatchRow { value: Some("say \"hi\"\\\n".into()), ..b.rows[0].clone() });
        for value_path in [Some("usage.gb"), Some("gb"), None] {
            let mut b = b.clone();
            b.header.value_path = value_path.map(str::to_owned);
            let events: Vec<Event> = b.events().collect();
            let rows = BatchRows::new(b);
            let mut text = String::from("left over");
            for (i, e) in events.iter().enumerate() {
                rows.properties_into(i, &mut text);
                assert_eq!(text, e.properties.get(), "row {i}, value_path {value_path:?}");
                assert_eq!(rows.context(), e.context.get());
            }
        }
    }

    #[test]
    fn expands_to_the_events_a_row_import_writes() {
        let b = batch();
        let events = decode_events(&b.encode()).unwrap();
        assert_eq!(events.len(), 3);
        let json = serde_json::to_string(&events[0]).unwrap();
        assert_eq!(
            json,
            r#"{"workspace":"acme","id":"csv_00ff00ff00ff00ff00ff00ff00ff00ff","type":"storage.used","timestamp":"2024-04-30T15:00:00Z","received_at":"2024-05-01T00:00:01.500Z","customer_id":"cust-1","subscription_id":"sub-1","properties":{"region":"eu","usage":{"gb":"12.5"}},"context":{"source":"csv_import"}}"#
        );
        assert_eq!(events[1].properties.get(), r#"{"region":"eu"}"#);
        assert_eq!(events[2].subscription_id.as_deref(), Some("cust-1"));
        assert_eq!(b.clone().event(2).id, events[2].id);
        assert_eq!(Payload::decode(&b.encode()).unwrap().find("given id, with \"quotes\" and ünïcode").unwrap().id, events[1].id);
    }

    #[test]
    fn json_events_still_decode() {
        let json = r#"{"workspace":"default","id":"e1","type":"a.b","timestamp":"2024-01-02T03:04:05Z","received_at":"2024-01-02T03:04:06Z","properties":{},"context":{}}"#;
        let p = Payload::decode(json.as_bytes()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p.into_events()[0].id.as_str(), "e1");
    }

    #[test]
    fn corrupt_batches_are_errors_not_panics() {
        let bytes = batch().encode();
        for cut in 0..bytes.len() {
            assert!(EventBatch::decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut bad = bytes.clone();
        bad.push(0);
        assert!(EventBatch::decode(&bad).is_err());
        assert!(decode_events(b"\0SB1\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
    }
}
