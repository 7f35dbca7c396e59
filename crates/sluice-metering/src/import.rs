//! CSV usage import (`import.usage` jobs).
//!
//! The upload is first written to a file in the data directory (streamed:
//! memory stays bounded whatever the size), then a job imports it in two
//! passes: pass 1 reads the CSV once, validates every row and writes the
//! parsed rows to a *spool* file beside the upload (compact binary, never
//! fsynced: a crashed job starts over); pass 2 reads the spool, gives every
//! row its event id and sends the rows through the normal ingest pipeline
//! as event batches (`sluice_core::batch`: one log record per partition and
//! up to 16,384 rows) — so API events and CSV rows count alike, and a re-run
//! (a crash, a retry, the same file imported twice) counts nothing twice:
//! every row has a deterministic event id. Nothing is written to the log
//! before every row was validated, so a strict import with a bad row
//! imports nothing.
//!
//! Format (header row required, names case-insensitive, extra columns
//! ignored): `customer_id`, `subscription_id` (optional), `meter` (a meter
//! key), `timestamp` (RFC 3339, or `YYYY-MM-DD` = the start of that day in
//! the workspace time zone), `quantity` (decimal), `id` (optional). UTF-8
//! with or without BOM, CRLF, quoted fields with commas and newlines, blank
//! lines are accepted.
//!
//! The id of a row without `id` is `csv_` + the first 32 hex digits of
//! SHA-256(content, n), where content is SHA-256 over the workspace, meter,
//! customer, subscription, the timestamp (RFC 3339, UTC) and the quantity
//! (normalised decimal), and n is the number of earlier rows in the same
//! file with exactly that content. So two identical rows are two usages, and
//! importing the file again (or re-running the job) is a no-op. Memory stays
//! bounded: Bloom filters find the contents that may repeat, and only those
//! are numbered, a bucket at a time on disk ([`crate::repeats`]).
//!
//! Modes: `strict` (default: any invalid row → nothing is imported, every
//! error is reported) and `skip_invalid` (valid rows are imported, invalid
//! ones reported). Errors: the first 1,000 with row number (1-based, the
//! header is row 1), column, value and message, plus a total.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use sluice_core::{BatchHeader, BatchRow, Bursts, EventBatch, EventId, WorkspaceName};
use sluice_ingest::Ingestor;
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload};
use sluice_store::{Job, Meter};

use crate::repeats::{Occurrences, RepeatFinder, Repeats};
use crate::MeterError;

/// Kind of the job.
pub const KIND: &str = "import.usage";
/// What invalid rows do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportMode {
    /// Any invalid row: nothing is imported.
    #[default]
    Strict,
    /// Valid rows are imported, invalid ones listed.
    SkipInvalid,
}

impl FromStr for ImportMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(ImportMode::Strict),
            "skip_invalid" => Ok(ImportMode::SkipInvalid),
            _ => Err(()),
        }
    }
}

/// The payload of an `import.usage` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImportPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// The uploaded file (in the imports directory).
    pub file: PathBuf,
    /// What invalid rows do.
    #[serde(default)]
    pub mode: ImportMode,
    /// Size of the upload.
    #[serde(default)]
    pub bytes: u64,
    /// The file's name as uploaded (multipart), if any.
    #[serde(default)]
    pub filename: Option<String>,
}

impl JobPayload for ImportPayload {
    const KIND: &'static str = KIND;
}

/// Errors listed in an import (more are only counted).
pub const MAX_ERRORS: usize = 1000;
/// Rows per batch handed to ingest.
const BATCH: usize = 16_384;
/// Batches submitted to ingest at once.
const IN_FLIGHT: usize = 4;

/// Handler of `import.usage` jobs.
pub struct UsageImport {
    /// Where accepted rows go.
    pub ingestor: Ingestor,
    /// Where pass 2 announces its burst of appends, so that the consumers
    /// of this process commit once it ends rather than at every pause
    /// (`sluice_consumers::Runtime::bursts`).
    pub bursts: Bursts,
}

#[derive(Clone)]
struct Columns {
    customer: usize,
    subscription: Option<usize>,
    meter: usize,
    timestamp: usize,
    quantity: usize,
    id: Option<usize>,
}

/// A valid spool row, owned (the tests compare rows; pass 2 reads into a
/// reused [`SpoolRow`]).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
struct Row {
    /// SHA-256 of the row's content (see the module doc).
    content: [u8; 32],
    /// The `id` column, when given.
    given_id: Option<String>,
    /// Index of the meter in the job's meter list.
    meter: u32,
    customer: String,
    subscription: Option<String>,
    /// Event time, microseconds since the epoch.
    at_us: i64,
    /// The quantity, normalized decimal text.
    quantity: String,
}

#[cfg(test)]
impl Row {
    /// Reads one row; `Ok(None)` at the end of the spool.
    fn read(r: &mut impl BufRead) -> std::io::Result<Option<Row>> {
        let mut buf = SpoolRow::default();
        if !buf.read(r)? {
            return Ok(None);
        }
        let text = |i: usize| buf.text(i).map(|t| t.map(str::to_owned));
        Ok(Some(Row {
            content: buf.content,
            given_id: text(1)?,
            meter: buf.meter,
            customer: text(0)?.unwrap_or_default(),
            subscription: text(2)?,
            at_us: buf.at_us,
            quantity: text(3)?.unwrap_or_default(),
        }))
    }
}

/// A valid row, as pass 1 writes it to the spool and pass 2 reads it back,
/// into buffers that are reused from row to row: allocating four `String`s
/// a row was a real share of pass 2's time (measured: docs/BENCHMARKS.md,
/// "CSV usage import").
///
/// Spool encoding (written by `Parsed::write`): content, meter (u32), time
/// (i64), then customer, given id, subscription and quantity as u32 length
/// + bytes (u32::MAX = none).
#[derive(Default)]
struct SpoolRow {
    content: [u8; 32],
    meter: u32,
    at_us: i64,
    /// Customer, given id, subscription and quantity, as written.
    fields: [Vec<u8>; 4],
    present: [bool; 4],
}

impl SpoolRow {
    /// Reads the next row; false at the end of the spool.
    fn read(&mut self, r: &mut impl BufRead) -> std::io::Result<bool> {
        if r.fill_buf()?.is_empty() {
            return Ok(false);
        }
        r.read_exact(&mut self.content)?;
        let mut b4 = [0u8; 4];
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b4)?;
        self.meter = u32::from_le_bytes(b4);
        r.read_exact(&mut b8)?;
        self.at_us = i64::from_le_bytes(b8);
        for (field, present) in self.fields.iter_mut().zip(&mut self.present) {
            r.read_exact(&mut b4)?;
            let n = u32::from_le_bytes(b4);
            *present = n != u32::MAX;
            field.clear();
            if *present {
                field.resize(n as usize, 0);
                r.read_exact(field)?;
            }
        }
        Ok(true)
    }

    /// Field `i` (0 customer, 1 given id, 2 subscription, 3 quantity).
    fn text(&self, i: usize) -> std::io::Result<Option<&str>> {
        if !self.present[i] {
            return Ok(None);
        }
        std::str::from_utf8(&self.fields[i]).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// Customer and subscription ids of pass 2, shared: the rows of a batch
/// (and the batches in flight) hold one copy of each id, not one per row.
#[derive(Default)]
struct Names(foldhash::HashSet<Arc<str>>);

impl Names {
    /// Bounds the table: a file with millions of distinct ids starts over
    /// (each id is then still shared within the rows that follow).
    const MAX: usize = 1 << 16;

    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        if self.0.len() >= Self::MAX {
            self.0.clear();
        }
        let a: Arc<str> = s.into();
        self.0.insert(a.clone());
        a
    }
}

/// Reads the next spool row's content and whether it has an `id`, skipping
/// the rest; `Ok(None)` at the end. (Numbering repeats needs only these.)
fn skim(r: &mut impl BufRead) -> std::io::Result<Option<([u8; 32], bool)>> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut head = [0u8; 44];
    r.read_exact(&mut head)?;
    let mut content = [0u8; 32];
    content.copy_from_slice(&head[..32]);
    let mut given_id = false;
    let mut b4 = [0u8; 4];
    for i in 0..4 {
        r.read_exact(&mut b4)?;
        let n = u32::from_le_bytes(b4);
        if n == u32::MAX {
            continue;
        }
        given_id |= i == 1;
        let mut left = n as usize;
        while left > 0 {
            let got = r.fill_buf()?.len().min(left);
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            r.consume(got);
            left -= got;
        }
    }
    Ok(Some((content, given_id)))
}

fn error(row: u64, column: &str, value: &str, message: impl Into<String>) -> Value {
    json!({"row": row, "column": column, "value": value.chars().take(200).collect::<String>(), "message": message.into()})
}

fn reader(path: &Path) -> Result<csv::Reader<std::io::BufReader<std::fs::File>>, MeterError> {
    let f = std::fs::File::open(path).map_err(MeterError::OpenFile)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    // Skip a UTF-8 byte order mark.
    if r.fill_buf().map(|b| b.starts_with(&[0xEF, 0xBB, 0xBF])).unwrap_or(false) {
        r.consume(3);
    }
    // Fields are trimmed where they are read (`RowParser::parse`): the csv
    // crate's `Trim::All` rebuilds every record, several allocations a row.
    Ok(csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::Headers).from_reader(r))
}

fn columns(headers: &csv::StringRecord) -> Result<Columns, MeterError> {
    let find = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let need = |name: &'static str| find(name).ok_or(MeterError::MissingColumn(name));
    Ok(Columns {
        customer: need("customer_id")?,
        subscription: find("subscription_id"),
        meter: need("meter")?,
        timestamp: need("timestamp")?,
        quantity: need("quantity")?,
        id: find("id"),
    })
}

/// A valid row as parsed from its CSV record (borrowing the record).
struct Parsed<'a> {
    content: [u8; 32],
    given_id: Option<&'a str>,
    meter: u32,
    customer: &'a str,
    subscription: Option<&'a str>,
    at_us: i64,
    /// Normalized decimal text (in the parser's reusable buffer).
    quantity: &'a str,
}

impl Parsed<'_> {
    /// Writes the row to the spool in [`SpoolRow`]'s encoding.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.content);
        out.extend_from_slice(&self.meter.to_le_bytes());
        out.extend_from_slice(&self.at_us.to_le_bytes());
        for s in [Some(self.customer), self.given_id, self.subscription, Some(self.quantity)] {
            match s {
                Some(s) => {
                    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
            }
        }
    }
}

/// Per-file parsing state: the meters, the time zone and reusable buffers.
struct RowParser<'m> {
    cols: Columns,
    meters: &'m HashMap<String, (u32, Meter)>,
    tz: Tz,
    workspace: String,
    /// Start of a local date in the time zone, per date (most files repeat dates).
    days: HashMap<NaiveDate, Option<DateTime<Utc>>>,
    quantity: String,
}

impl<'m> RowParser<'m> {
    fn new(cols: Columns, meters: &'m HashMap<String, (u32, Meter)>, tz: Tz, workspace: &str) -> Self {
        RowParser { cols, meters, tz, workspace: workspace.to_owned(), days: HashMap::new(), quantity: String::new() }
    }

    /// The event time of a `timestamp` field: RFC 3339, or a date meaning
    /// the start of that day in the workspace time zone.
    fn time(&mut self, ts: &str) -> Option<DateTime<Utc>> {
        if ts.len() == 10 {
            let d = NaiveDate::parse_from_str(ts, "%Y-%m-%d").ok()?;
            if self.days.len() > 100_000 {
                self.days.clear();
            }
            let tz = self.tz;
            return *self
                .days
                .entry(d)
                .or_insert_with(|| tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest().map(|t| t.with_timezone(&Utc)));
        }
        DateTime::parse_from_rfc3339(ts).ok().map(|t| t.with_timezone(&Utc))
    }

    /// Parses one record; `Err` holds every error of the row.
    fn parse<'r>(&'r mut self, rec: &'r csv::StringRecord, row: u64) -> Result<Parsed<'r>, Vec<Value>> {
        let c = &self.cols;
        let get = |i: usize| rec.get(i).unwrap_or("").trim_ascii();
        let mut errs = Vec::new();
        let customer = get(c.customer);
        if customer.is_empty() || (customer.len() > 256 && customer.chars().count() > 256) {
            errs.push(error(row, "customer_id", customer, "must be 1-256 characters"));
        } else if let Err(e) = sluice_core::check_storable(customer) {
            errs.push(error(row, "customer_id", customer, e.0));
        }
        let subscription = c.subscription.map(get).filter(|s| !s.is_empty());
        if let Some(Err(e)) = subscription.map(sluice_core::check_storable) {
            errs.push(error(row, "subscription_id", subscription.unwrap_or_default(), e.0));
        }
        let meter_key = get(c.meter);
        let meter = self.meters.get(meter_key).map(|(i, m)| (*i, m));
        if meter.is_none() {
            errs.push(error(row, "meter", meter_key, "no meter with this key in the workspace"));
        }
        let (ts_col, q_col, id_col) = (c.timestamp, c.quantity, c.id);
        let ts = get(ts_col);
        let at = self.time(ts);
        if at.is_none() {
            errs.push(error(row, "timestamp", ts, "must be RFC 3339 (2024-05-01T12:00:00Z) or a date YYYY-MM-DD"));
        }
        let q = get(q_col);
        let quantity = match Decimal::from_str(q).or_else(|_| Decimal::from_scientific(q)) {
            Ok(v) if v.abs() > MAX_QUANTITY => {
                errs.push(error(row, "quantity", q, "must be at most 1e20 in absolute value (so that usage sums stay exact decimals)"));
                None
            }
            Ok(v) => Some(v),
            Err(_)
                if !q.is_empty()
                    && q.trim_start_matches(['-', '+'])
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+') =>
            {
                errs.push(error(
                    row,
                    "quantity",
                    q,
                    "is beyond the largest exact decimal (about 7.9e28, 28 digits after the point); at most 1e20 in absolute value",
                ));
                None
            }
            Err(_) => {
                errs.push(error(row, "quantity", q, "must be a decimal number such as 12.5"));
                None
            }
        };
        let given_id = id_col.map(get).filter(|s| !s.is_empty());
        if let Some(id) = given_id {
            if let Err(e) = EventId::parse(id) {
                errs.push(error(row, "id", id, e.0));
            }
        }
        let (Some((meter, m)), Some(at), Some(quantity), true) = (meter, at, quantity, errs.is_empty()) else { return Err(errs) };
        self.quantity.clear();
        let _ = write!(self.quantity, "{}", quantity.normalize());
        let mut time = [0u8; 40];
        let mut h = Sha256::new();
        for part in [
            self.workspace.as_bytes(),
            m.key.as_bytes(),
            customer.as_bytes(),
            subscription.unwrap_or("").as_bytes(),
            rfc3339(at, &mut time),
            self.quantity.as_bytes(),
        ] {
            h.update(part);
            h.update([0u8]);
        }
        // The log keeps event times to the microsecond (the id above still sees
        // the time as written, so ids do not depend on this).
        Ok(Parsed { content: h.finalize().into(), given_id, meter, customer, subscription, at_us: at.timestamp_micros(), quantity: &self.quantity })
    }
}

/// The largest quantity of one row, in absolute value. A bucket's sum is an
/// exact decimal (at most about 7.9e28): with rows of at most 1e20, one
/// file can never overflow a bucket (a 1 GB file has about 24 million
/// rows); usage beyond that across many files overflows in the meters
/// consumer, which dead-letters the rows that would overflow.
const MAX_QUANTITY: Decimal = Decimal::from_parts(1_661_992_960, 1_808_227_885, 5, false, 0);

/// `t.to_rfc3339()` (what the id rule hashes) without allocating:
/// `2024-05-01T12:00:00.250+00:00`, with 0, 3, 6 or 9 fraction digits as
/// needed. Falls back to chrono for years outside 0..=9999 and leap seconds.
fn rfc3339(t: DateTime<Utc>, buf: &mut [u8; 40]) -> &[u8] {
    use chrono::{Datelike, Timelike};
    let (y, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&y) || nanos >= 1_000_000_000 {
        let s = t.to_rfc3339();
        let n = s.len().min(buf.len());
        buf[..n].copy_from_slice(&s.as_bytes()[..n]);
        return &buf[..n];
    }
    fn put(buf: &mut [u8], at: usize, v: u32, digits: usize) {
        let mut v = v;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(buf, 0, y as u32, 4);
    buf[4] = b'-';
    put(buf, 5, t.month(), 2);
    buf[7] = b'-';
    put(buf, 8, t.day(), 2);
    buf[10] = b'T';
    put(buf, 11, t.hour(), 2);
    buf[13] = b':';
    put(buf, 14, t.minute(), 2);
    buf[16] = b':';
    put(buf, 17, t.second(), 2);
    let mut n = 19;
    let (digits, v) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (3, nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        (6, nanos / 1_000)
    } else {
        (9, nanos)
    };
    if digits > 0 {
        buf[n] = b'.';
        put(buf, n + 1, v, digits);
        n += 1 + digits;
    }
    buf[n..n + 6].copy_from_slice(b"+00:00");
    &buf[..n + 6]
}

/// The event id of a row without `id`: its content hash and how many
/// earlier rows of the file had the same content.
fn row_id(content: &[u8; 32], occurrence: u32) -> EventId {
    let mut h = Sha256::new();
    h.update(content);
    h.update(occurrence.to_le_bytes());
    let d = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&d[..16]);
    sluice_core::hex_event_id(&first)
}

/// The header of the batches of one meter's rows.
fn batch_header(meter: &Meter, workspace: &WorkspaceName, received_at: DateTime<Utc>) -> Result<BatchHeader, MeterError> {
    let mut context = Map::new();
    context.insert("source".into(), Value::String("csv_import".into()));
    if meter.value_property.as_deref().is_some_and(|p| meter.filter.keys().any(|k| k == p || p.starts_with(&format!("{k}.")))) {
        return Err(MeterError::FilterValueOverlap(meter.key.clone()));
    }
    Ok(BatchHeader {
        workspace: workspace.clone(),
        event_type: sluice_core::EventType::parse(meter.event_type.clone())?,
        received_at,
        context,
        // Filter properties, so that the rows count for their meter.
        properties: meter.filter.clone(),
        value_path: meter.value_property.clone(),
    })
}

#[async_trait]
impl JobHandler for UsageImport {
    fn kind(&self) -> &str {
        KIND
    }

    fn concurrency(&self) -> usize {
        1
    }

    async fn ended(&self, job: &Job) {
        let file = ImportPayload::of(job).ok().map(|p| p.file);
        // A succeeded import is done with its upload; a failed or cancelled
        // one keeps it so `POST /v1/jobs/{id}/retry` can run it again (e.g.
        // after creating a missing meter) until `sweep_uploads` removes it.
        if job.state == sluice_core::JobState::Succeeded {
            if let Some(f) = file {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let started = std::time::Instant::now();
        let payload = ImportPayload::of(job)?;
        let path = payload.file;
        let strict = payload.mode == ImportMode::Strict;
        let ws = ctx.store().get_workspace(&job.workspace).await?;
        // A stored workspace that does not parse will not parse next time.
        let tz = Tz::from_str(&ws.time_zone).map_err(JobError::permanent)?;
        let workspace = WorkspaceName::parse(ws.name.clone()).map_err(JobError::permanent)?;
        let meter_list = ctx.store().list_meters(Some(&ws.name)).await?;
        let meters: HashMap<String, (u32, Meter)> = meter_list.iter().enumerate().map(|(i, m)| (m.key.clone(), (i as u32, m.clone()))).collect();
        let fatal = |error: String, result: Value| JobError::Permanent { error, result };

        // Pass 1 (blocking work, on its own thread): validate every row,
        // count them, spool the valid ones.
        let spool_path = path.with_extension("spool");
        let _spool_guard = RemoveOnDrop(spool_path.clone());
        let cancel = Arc::new(AtomicBool::new(false));
        let v = {
            let (path, spool_path, meters, ws_name) = (path.clone(), spool_path.clone(), meters.clone(), ws.name.clone());
            blocking(ctx, &cancel, move |cancel| validate(&path, &spool_path, &meters, tz, &ws_name, cancel)).await??
        };
        let Validated { rows_total, rows_rejected, errors, errors_total, repeats, used_meters } = v;
        let validated_ms = started.elapsed().as_millis() as u64;
        let summary = |imported: u64, duplicate: u64, processed: u64| {
            json!({
                "rows_total": rows_total, "rows_processed": processed, "rows_imported": imported,
                "rows_duplicate": duplicate, "rows_rejected": rows_rejected,
                "errors": errors, "errors_total": errors_total,
                "mode": if strict { "strict" } else { "skip_invalid" },
                "duration_ms": started.elapsed().as_millis() as u64,
                "validate_ms": validated_ms,
            })
        };
        if strict && rows_rejected > 0 {
            return Err(fatal(format!("{rows_rejected} invalid row(s); nothing was imported (mode strict)"), summary(0, 0, 0)));
        }
        // The batch header of every meter the file uses, checked against
        // enforced property schemas before anything is written.
        let received_at = Utc::now();
        let mut headers: Vec<Option<BatchHeader>> = vec![None; meter_list.len()];
        for &m in &used_meters {
            let h = batch_header(&meter_list[m as usize], &workspace, received_at).map_err(|e| fatal(e.to_string(), summary(0, 0, 0)))?;
            let sample = EventBatch {
                header: h.clone(),
                rows: vec![BatchRow {
                    id: EventId::parse("csv_sample").map_err(JobError::permanent)?,
                    timestamp: received_at,
                    customer_id: Some("sample".into()),
                    subscription_id: None,
                    value: h.value_path.as_ref().map(|_| "0".to_owned()),
                }],
            };
            if let Err(e) = self.ingestor.check_schemas(&sample.events().collect::<Vec<_>>()) {
                let msg = format!("meter {:?}: its events would break the declared schema of `{}`: {e}", meter_list[m as usize].key, h.event_type);
                return Err(fatal(msg, summary(0, 0, 0)));
            }
            headers[m as usize] = Some(h);
        }

        // Occurrence numbers of the rows whose content may repeat: counted
        // as pass 2 goes when they are few, else numbered on disk first
        // (blocking work, on its own thread).
        let (repeats, mut occurrences) = if repeats.few() {
            (repeats, Occurrences::in_memory())
        } else {
            let spool_path = spool_path.clone();
            let (repeats, occ) = blocking(ctx, &cancel, move |cancel| {
                let occ = number_repeats(&repeats, &spool_path, cancel);
                (repeats, occ)
            })
            .await?;
            match occ {
                Ok(occ) => (repeats, occ),
                Err(_) if ctx.is_cancelled() => return Err(JobError::Cancelled),
                Err(e) => return Err(JobError::Retryable(format!("numbering repeated rows: {e}"))),
            }
        };

        // Pass 2: the spooled rows, with their ids, as batches (one open
        // batch per meter) through the ingest pipeline.
        let spool_file = std::fs::File::open(&spool_path).map_err(|e| JobError::Retryable(format!("reading the import spool: {e}")))?;
        let mut spool = std::io::BufReader::with_capacity(1 << 20, spool_file);
        let (mut imported, mut duplicate, mut processed) = (0u64, 0u64, rows_rejected);
        let mut open: HashMap<u32, Vec<BatchRow>> = HashMap::new();
        let mut in_flight: std::collections::VecDeque<tokio::task::JoinHandle<Result<(u64, u64, u64), JobError>>> = Default::default();
        let mut names = Names::default();
        // Ends when pass 2 returns, after its last append (or its failure).
        let burst = self.bursts.begin();
        let mut row = SpoolRow::default();
        let spool_error = |e: std::io::Error| JobError::Retryable(format!("reading the import spool: {e}"));
        loop {
            let end = !row.read(&mut spool).map_err(spool_error)?;
            let full = if end {
                None
            } else {
                let id = match row.text(1).map_err(spool_error)? {
                    Some(id) => EventId::parse(id).map_err(|e| JobError::Retryable(e.0))?,
                    None if repeats.candidate(&row.content) => {
                        let n = occurrences.next(&row.content).map_err(|e| JobError::Retryable(format!("reading occurrence numbers: {e}")))?;
                        row_id(&row.content, n)
                    }
                    None => row_id(&row.content, 0),
                };
                let meter = &meter_list[row.meter as usize];
                let batch_row = BatchRow {
                    id,
                    timestamp: DateTime::from_timestamp_micros(row.at_us).unwrap_or_default(),
                    customer_id: Some(names.get(row.text(0).map_err(spool_error)?.unwrap_or_default())),
                    subscription_id: row.text(2).map_err(spool_error)?.map(|s| names.get(s)),
                    value: match meter.value_property {
                        Some(_) => Some(row.text(3).map_err(spool_error)?.unwrap_or_default().to_owned()),
                        None => None,
                    },
                };
                let rows = open.entry(row.meter).or_default();
                rows.push(batch_row);
                (rows.len() >= BATCH).then_some(row.meter)
            };
            // Batches to send: the full one, or at the end every open one.
            let mut ready: Vec<u32> = full.into_iter().collect();
            if end {
                ready = open.keys().copied().collect();
                ready.sort_unstable();
            }
            for m in ready {
                let Some(rows) = open.remove(&m) else { continue };
                let Some(header) = headers[m as usize].clone() else { continue };
                let batch = EventBatch { header, rows };
                let ingestor = self.ingestor.clone();
                // Several batches in flight: the ingest writer commits them
                // together (group commit). Order does not matter: ids dedup.
                in_flight.push_back(tokio::spawn(async move {
                    let n = batch.rows.len() as u64;
                    submit(&ingestor, batch).await.map(|(a, d)| (a, d, n))
                }));
                while in_flight.len() >= IN_FLIGHT {
                    let Some(h) = in_flight.pop_front() else { break };
                    let (a, d, n) = h.await.map_err(|e| JobError::Retryable(e.to_string()))??;
                    imported += a;
                    duplicate += d;
                    processed += n;
                    ctx.progress(processed as i64, Some(rows_total as i64)).await;
                    if ctx.is_cancelled() {
                        return Err(JobError::Cancelled);
                    }
                }
            }
            if end {
                break;
            }
        }
        for h in in_flight {
            let (a, d, n) = h.await.map_err(|e| JobError::Retryable(e.to_string()))??;
            imported += a;
            duplicate += d;
            processed += n;
        }
        // The burst ends once the job's end is recorded, so that the last
        // progress and the end do not queue behind the commits it releases.
        ctx.keep_until_recorded(burst);
        ctx.progress(processed as i64, Some(rows_total as i64)).await;
        // The upload is removed in `ended`, once success is recorded: a
        // crash before that runs the job again, which needs the file.
        Ok(summary(imported, duplicate, processed))
    }
}

/// What pass 1 found (`R`: the repeat finder while it runs, then what it
/// found).
struct Validated<R = Repeats> {
    rows_total: u64,
    rows_rejected: u64,
    /// The first [`MAX_ERRORS`] errors.
    errors: Vec<Value>,
    errors_total: u64,
    /// Contents that may occur more than once (they get occurrence numbers).
    repeats: R,
    /// Meters (indexes) the valid rows use.
    used_meters: HashSet<u32>,
}

/// Records per chunk that pass 1 hands to a parsing thread.
const CHUNK_RECORDS: usize = 4096;

/// What a parsing thread made of one chunk of records (pass 1).
struct Chunk {
    /// The valid rows, in the spool's encoding, in file order.
    spool: Vec<u8>,
    /// Contents of the valid rows without an `id`, in file order.
    contents: Vec<[u8; 32]>,
    used_meters: HashSet<u32>,
    rows: u64,
    rejected: u64,
    /// The chunk's first [`MAX_ERRORS`] errors.
    errors: Vec<Value>,
    errors_total: u64,
    /// The records, given back for reuse.
    records: Vec<csv::StringRecord>,
}

/// Validates a chunk of records (the work of pass 1 that does not depend on
/// other rows).
fn parse_chunk(parser: &mut RowParser<'_>, records: Vec<csv::StringRecord>) -> Chunk {
    let mut c = Chunk {
        spool: Vec::with_capacity(records.len() * 96),
        contents: Vec::with_capacity(records.len()),
        used_meters: HashSet::new(),
        rows: 0,
        rejected: 0,
        errors: Vec::new(),
        errors_total: 0,
        records,
    };
    for rec in &c.records {
        if rec.iter().all(|f| f.trim_ascii().is_empty()) {
            continue; // blank line
        }
        let line = rec.position().map_or(0, |p| p.line());
        c.rows += 1;
        match parser.parse(rec, line) {
            Ok(row) => {
                if row.given_id.is_none() {
                    c.contents.push(row.content);
                }
                c.used_meters.insert(row.meter);
                row.write(&mut c.spool);
            }
            Err(errs) => {
                c.rejected += 1;
                c.errors_total += errs.len() as u64;
                let room = MAX_ERRORS.saturating_sub(c.errors.len());
                c.errors.extend(errs.into_iter().take(room));
            }
        }
    }
    c
}

/// Pass 1: reads the CSV once, validates every row and writes the valid ones
/// to the spool. This thread reads records (the csv crate: quoting, UTF-8)
/// in chunks; parsing threads validate them (times, decimals, the content
/// hash: most of the work); this thread writes their results in file order,
/// so the spool, the errors and the occurrence numbers are what one thread
/// would make.
fn validate(
    path: &Path,
    spool_path: &Path,
    meters: &HashMap<String, (u32, Meter)>,
    tz: Tz,
    workspace: &str,
    cancel: &AtomicBool,
) -> Result<Validated, JobError> {
    let fatal = |error: String, result: Value| JobError::Permanent { error, result };
    let spool_error = |e: std::io::Error| JobError::Retryable(format!("writing the import spool: {e}"));
    let spool_file = std::fs::File::create(spool_path).map_err(|e| JobError::Retryable(format!("creating the import spool: {e}")))?;
    let mut spool = std::io::BufWriter::with_capacity(1 << 20, spool_file);
    let mut rdr = reader(path).map_err(|e| fatal(e.to_string(), json!({"errors": [], "errors_total": 0})))?;
    let headers = rdr.headers().map_err(|e| fatal(format!("row 1: cannot read the header row: {e}"), json!({})))?.clone();
    let cols = columns(&headers).map_err(|e| fatal(e.to_string(), json!({"errors": [error(1, "", "", e.to_string())], "errors_total": 1})))?;
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut v = Validated {
        rows_total: 0,
        rows_rejected: 0,
        errors: Vec::new(),
        errors_total: 0,
        repeats: RepeatFinder::for_bytes(file_bytes),
        used_meters: HashSet::new(),
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let mut free: Vec<Vec<csv::StringRecord>> = Vec::new();
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<csv::StringRecord>)>(threads);
    let work_rx = std::sync::Mutex::new(work_rx);
    std::thread::scope(|s| -> Result<(), JobError> {
        // Owned here: returning (also on an error) closes the channel, so the
        // parsing threads end before the scope waits for them.
        let work_tx = work_tx;
        // A chunk's result, or None if its parsing thread panicked.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(u64, Option<Chunk>)>();
        for _ in 0..threads {
            let (done_tx, work_rx, cols) = (done_tx.clone(), &work_rx, cols.clone());
            s.spawn(move || {
                let mut parser = RowParser::new(cols, meters, tz, workspace);
                loop {
                    let next = work_rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                    let Ok((seq, records)) = next else { return };
                    // A panic is an error of this chunk (the import fails), not a
                    // chunk that never arrives.
                    let chunk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse_chunk(&mut parser, records))).ok();
                    if done_tx.send((seq, chunk)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        // Chunks sent, chunks written, and those parsed ahead of their turn.
        let (mut sent, mut written) = (0u64, 0u64);
        let mut ahead: std::collections::BTreeMap<u64, Chunk> = Default::default();
        let mut collect = |v: &mut Validated<RepeatFinder>, free: &mut Vec<Vec<csv::StringRecord>>, written: &mut u64| -> Result<(), JobError> {
            let (seq, chunk) = done_rx.recv().map_err(|_| JobError::Retryable("an import parsing thread stopped".into()))?;
            ahead.insert(seq, chunk.ok_or_else(|| JobError::Retryable("an import parsing thread panicked".into()))?);
            while let Some(c) = ahead.remove(written) {
                *written += 1;
                spool.write_all(&c.spool).map_err(spool_error)?;
                for content in &c.contents {
                    v.repeats.add(content);
                }
                v.used_meters.extend(c.used_meters);
                v.rows_total += c.rows;
                v.rows_rejected += c.rejected;
                v.errors_total += c.errors_total;
                let room = MAX_ERRORS.saturating_sub(v.errors.len());
                v.errors.extend(c.errors.into_iter().take(room));
                free.push(c.records);
            }
            Ok(())
        };
        let mut end = false;
        while !end {
            let mut records = free.pop().unwrap_or_default();
            let mut n = 0;
            while n < CHUNK_RECORDS {
                if records.len() == n {
                    records.push(csv::StringRecord::new());
                }
                let row = rdr.position().line();
                match rdr.read_record(&mut records[n]) {
                    Ok(true) => n += 1,
                    Ok(false) => {
                        end = true;
                        break;
                    }
                    Err(e) => {
                        let msg = match e.kind() {
                            csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8 (save the file as UTF-8)".to_owned(),
                            _ => format!("cannot read the row: {e}"),
                        };
                        let line = e.position().map_or(row, |p| p.line());
                        return Err(fatal(format!("row {line}: {msg}"), json!({"errors": [error(line, "", "", msg)], "errors_total": 1})));
                    }
                }
            }
            records.truncate(n);
            if n > 0 {
                work_tx.send((sent, records)).map_err(|_| JobError::Retryable("an import parsing thread stopped".into()))?;
                sent += 1;
            }
            // A few chunks in flight: memory stays bounded.
            while sent - written > threads as u64 + 1 || (end && written < sent) {
                collect(&mut v, &mut free, &mut written)?;
            }
            if cancel.load(Ordering::Acquire) {
                return Err(JobError::Cancelled);
            }
        }
        Ok(())
    })?;
    spool.flush().map_err(spool_error)?;
    let Validated { rows_total, rows_rejected, errors, errors_total, repeats, used_meters } = v;
    Ok(Validated { rows_total, rows_rejected, errors, errors_total, repeats: repeats.finish(), used_meters })
}

/// Numbers the rows of the spool whose content may repeat
/// ([`Repeats::number`]); the bucket files go beside the spool.
fn number_repeats(repeats: &Repeats, spool_path: &Path, cancel: &AtomicBool) -> std::io::Result<Occurrences> {
    let mut spool = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(spool_path)?);
    let contents = std::iter::from_fn(move || loop {
        match skim(&mut spool) {
            Ok(Some((_, true))) => continue, // a given id: not numbered
            Ok(Some((c, false))) => return Some(Ok(c)),
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        }
    });
    repeats.number(&spool_path.with_extension("occ"), contents, cancel)
}

/// Runs blocking work `f` on its own thread; while it runs, a cancellation
/// of the job sets the flag `f` is given (checked every 500 ms).
async fn blocking<T: Send + 'static>(
    ctx: &JobContext,
    cancel: &Arc<AtomicBool>,
    f: impl FnOnce(&AtomicBool) -> T + Send + 'static,
) -> Result<T, JobError> {
    let flag = cancel.clone();
    let work = tokio::task::spawn_blocking(move || f(&flag));
    tokio::pin!(work);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut work => return r.map_err(|e| JobError::Retryable(e.to_string())),
            _ = tick.tick() => {
                if ctx.is_cancelled() {
                    cancel.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// Removes a file when dropped (the spool, whatever way the job ends).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Submits a batch, waiting while ingest is over capacity.
async fn submit(ingestor: &Ingestor, batch: EventBatch) -> Result<(u64, u64), JobError> {
    match ingestor.submit_batch_waiting(batch).await {
        Ok(o) => Ok((o.accepted as u64, o.duplicates as u64)),
        Err(e) => Err(JobError::Retryable(e.to_string())),
    }
}

/// How long a failed import's upload is kept for a retry.
pub const KEEP_FAILED_UPLOADS: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Removes uploads in `dir` older than `max_age` (those of failed imports
/// that nobody retried, or of uploads interrupted before their job was
/// queued). Returns how many were removed.
pub fn sweep_uploads(dir: &Path, max_age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > max_age);
        if old && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_of_older_binaries_still_decode() {
        // As enqueued before payloads were typed (no version).
        let old = json!({"file": "/data/imports/x.csv", "mode": "skip_invalid", "bytes": 10, "filename": null});
        let p: ImportPayload = serde_json::from_value(old).unwrap();
        assert_eq!((p.v, p.mode, p.bytes), (1, ImportMode::SkipInvalid, 10));
        let strict: ImportPayload = serde_json::from_value(json!({"file": "f", "mode": "strict"})).unwrap();
        assert_eq!(strict.mode, ImportMode::Strict);
        // What this binary writes reads back the same.
        assert_eq!(serde_json::from_value::<ImportPayload>(p.to_value()).unwrap(), p);
        // A payload without its file is refused, not read as an empty path.
        assert!(serde_json::from_value::<ImportPayload>(json!({"mode": "strict"})).is_err());
        assert!(serde_json::from_value::<ImportPayload>(json!({"file": "f", "mode": "lenient"})).is_err());
        let backfill: crate::backfill::BackfillPayload = serde_json::from_value(json!({"workspace": "w", "meter": "gb"})).unwrap();
        assert_eq!((backfill.v, backfill.meter.as_str()), (1, "gb"));
    }

    #[test]
    fn max_quantity_is_1e20() {
        assert_eq!(MAX_QUANTITY, Decimal::from_str("100000000000000000000").unwrap());
    }

    #[test]
    fn the_time_in_the_id_rule_is_chronos_rfc3339() {
        // The id of a row hashes `to_rfc3339()`; the fast formatter must
        // agree with it exactly, or re-imports would count twice.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = [0u8; 40];
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 20_000_000_000) as i64 - 5_000_000_000;
            let nanos = match i % 4 {
                0 => 0,
                1 => (x >> 40) as u32 % 1000 * 1_000_000,
                2 => (x >> 40) as u32 % 1_000_000 * 1000,
                _ => (x >> 34) as u32 % 1_000_000_000,
            };
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            assert_eq!(std::str::from_utf8(rfc3339(t, &mut buf)).unwrap(), t.to_rfc3339());
        }
        let far = DateTime::from_timestamp(400_000_000_000, 5).unwrap(); // year 14645
        assert_eq!(std::str::from_utf8(rfc3339(far, &mut buf)).unwrap(), far.to_rfc3339());
    }

    #[test]
    fn rows_round_trip_through_the_spool() {
        let p = Parsed {
            content: [7; 32],
            given_id: Some("row-1"),
            meter: 3,
            customer: "acme, inc\nHQ",
            subscription: None,
            at_us: -5,
            quantity: "12.5",
        };
        let mut buf = Vec::new();
        p.write(&mut buf);
        p.write(&mut buf);
        let mut r = std::io::Cursor::new(buf);
        let want = Row {
            content: [7; 32],
            given_id: Some("row-1".into()),
            meter: 3,
            customer: "acme, inc\nHQ".into(),
            subscription: None,
            at_us: -5,
            quantity: "12.5".into(),
        };
        assert_eq!(Row::read(&mut r).unwrap(), Some(want.clone()));
        assert_eq!(Row::read(&mut r).unwrap(), Some(want));
        assert_eq!(Row::read(&mut r).unwrap(), None);
        // skim reads the same rows' content and whether they have an id,
        // through a small buffer (strings cross buffer boundaries).
        let without_id = Parsed { given_id: None, content: [9; 32], ..p };
        let mut buf = Vec::new();
        p.write(&mut buf);
        without_id.write(&mut buf);
        let mut r = std::io::BufReader::with_capacity(5, std::io::Cursor::new(buf));
        assert_eq!(skim(&mut r).unwrap(), Some(([7; 32], true)));
        assert_eq!(skim(&mut r).unwrap(), Some(([9; 32], false)));
        assert_eq!(skim(&mut r).unwrap(), None);
    }

    #[test]
    fn identical_rows_get_distinct_ids_and_a_rerun_the_same_ones() {
        let c = [1u8; 32];
        assert_ne!(row_id(&c, 0), row_id(&c, 1));
        assert_eq!(row_id(&c, 1), row_id(&c, 1));
        let id = row_id(&c, 0);
        assert!(id.as_str().starts_with("csv_") && id.as_str().len() == 36, "{id}");
    }
}
