//! CSV usage import (`import.usage` jobs).
//!
//! The upload is first written to a file in the data directory (streamed:
//! memory stays bounded whatever the size), then a job reads it twice,
//! streaming: pass 1 validates every row and counts them; pass 2 turns the
//! valid rows into events of the meter's event type and sends them through
//! the normal ingest pipeline in batches — so API events and CSV rows count
//! alike, and a re-run (a crash, a retry, the same file imported twice)
//! counts nothing twice: every row has a deterministic event id.
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
//! bounded: a Bloom filter finds the contents that may repeat, and only
//! those get an occurrence counter.
//!
//! Modes: `strict` (default: any invalid row → nothing is imported, every
//! error is reported) and `skip_invalid` (valid rows are imported, invalid
//! ones reported). Errors: the first 1,000 with row number (1-based, the
//! header is row 1), column, value and message, plus a total.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use sluice_core::{Event, EventId, EventType, WorkspaceName};
use sluice_ingest::Ingestor;
use sluice_jobs::{JobContext, JobError, JobHandler};
use sluice_store::{Job, Meter};

/// Kind of the job.
pub const KIND: &str = "import.usage";
/// Errors listed in an import (more are only counted).
pub const MAX_ERRORS: usize = 1000;
const BATCH: usize = 5000;
/// Batches submitted to ingest at once.
const IN_FLIGHT: usize = 6;

/// Handler of `import.usage` jobs.
pub struct UsageImport {
    /// Where accepted rows go.
    pub ingestor: Ingestor,
}

struct Columns {
    customer: usize,
    subscription: Option<usize>,
    meter: usize,
    timestamp: usize,
    quantity: usize,
    id: Option<usize>,
}

struct Row {
    /// SHA-256 of the row's content (see the module doc).
    content: [u8; 32],
    /// The `id` column, when given.
    given_id: Option<String>,
    meter: Meter,
    customer: String,
    subscription: Option<String>,
    at: DateTime<Utc>,
    quantity: Decimal,
}

fn error(row: u64, column: &str, value: &str, message: impl Into<String>) -> Value {
    json!({"row": row, "column": column, "value": value.chars().take(200).collect::<String>(), "message": message.into()})
}

fn reader(path: &PathBuf) -> Result<csv::Reader<std::io::BufReader<std::fs::File>>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open the uploaded file: {e}"))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    // Skip a UTF-8 byte order mark.
    use std::io::BufRead;
    if r.fill_buf().map(|b| b.starts_with(&[0xEF, 0xBB, 0xBF])).unwrap_or(false) {
        r.consume(3);
    }
    Ok(csv::ReaderBuilder::new().has_headers(true).flexible(true).trim(csv::Trim::All).from_reader(r))
}

fn columns(headers: &csv::StringRecord) -> Result<Columns, String> {
    let find = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let need = |name: &str| find(name).ok_or_else(|| format!("the header row has no `{name}` column (required: customer_id, meter, timestamp, quantity)"));
    Ok(Columns {
        customer: need("customer_id")?,
        subscription: find("subscription_id"),
        meter: need("meter")?,
        timestamp: need("timestamp")?,
        quantity: need("quantity")?,
        id: find("id"),
    })
}

/// Parses one record; `Err` holds every error of the row.
fn parse_row(
    rec: &csv::StringRecord,
    row: u64,
    c: &Columns,
    meters: &HashMap<String, Meter>,
    tz: Tz,
    workspace: &str,
) -> Result<Row, Vec<Value>> {
    let get = |i: usize| rec.get(i).unwrap_or("").to_owned();
    let mut errs = Vec::new();
    let customer = get(c.customer);
    if customer.is_empty() || customer.chars().count() > 256 {
        errs.push(error(row, "customer_id", &customer, "must be 1-256 characters"));
    }
    let subscription = c.subscription.map(get).filter(|s| !s.is_empty());
    let meter_key = get(c.meter);
    let meter = meters.get(&meter_key).cloned();
    if meter.is_none() {
        errs.push(error(row, "meter", &meter_key, "no meter with this key in the workspace"));
    }
    let ts = get(c.timestamp);
    let at = if let Ok(t) = DateTime::parse_from_rfc3339(&ts) {
        Some(t.with_timezone(&Utc))
    } else if let Ok(d) = NaiveDate::parse_from_str(&ts, "%Y-%m-%d") {
        tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest().map(|t| t.with_timezone(&Utc))
    } else {
        errs.push(error(row, "timestamp", &ts, "must be RFC 3339 (2024-05-01T12:00:00Z) or a date YYYY-MM-DD"));
        None
    };
    let q = get(c.quantity);
    let quantity = match Decimal::from_str(&q).or_else(|_| Decimal::from_scientific(&q)) {
        Ok(v) => Some(v),
        Err(_) => {
            errs.push(error(row, "quantity", &q, "must be a decimal number such as 12.5"));
            None
        }
    };
    let given_id = c.id.map(get).filter(|s| !s.is_empty());
    if let Some(id) = &given_id {
        if let Err(e) = EventId::parse(id.clone()) {
            errs.push(error(row, "id", id, e.0));
        }
    }
    let (Some(meter), Some(at), Some(quantity), true) = (meter, at, quantity, errs.is_empty()) else { return Err(errs) };
    let mut h = Sha256::new();
    for part in [workspace, &meter.key, &customer, subscription.as_deref().unwrap_or(""), &at.to_rfc3339(), &quantity.normalize().to_string()] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    Ok(Row { content: h.finalize().into(), given_id, meter, customer, subscription, at, quantity })
}

/// The event id of a row without `id`: its content hash and how many
/// earlier rows of the file had the same content.
fn row_id(content: &[u8; 32], occurrence: u32) -> String {
    let mut h = Sha256::new();
    h.update(content);
    h.update(occurrence.to_le_bytes());
    let d = h.finalize();
    format!("csv_{}", d[..16].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A Bloom filter over row contents: finds, in bounded memory, the few
/// contents that may occur more than once in a file, so that only those need
/// an occurrence counter.
struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    fn for_bytes(file_bytes: u64) -> Bloom {
        // ~10 bits per row, assuming rows of at least 20 bytes; at most 64 MiB.
        let bits = (file_bytes / 2).clamp(1 << 16, 1 << 29);
        Bloom { bits: vec![0; (bits / 64) as usize + 1] }
    }
    /// Inserts; returns true if it may have been there already.
    fn insert(&mut self, h: &[u8; 32]) -> bool {
        let n = (self.bits.len() * 64) as u64;
        let mut present = true;
        for i in 0..7 {
            let k = u64::from_le_bytes(h[i * 4..i * 4 + 8].try_into().unwrap_or([0; 8])) % n;
            let (w, b) = ((k / 64) as usize, k % 64);
            present &= self.bits[w] & (1 << b) != 0;
            self.bits[w] |= 1 << b;
        }
        present
    }
}

fn to_event(r: Row, id: String, workspace: &WorkspaceName, received_at: DateTime<Utc>) -> Result<Event, String> {
    let mut props = Map::new();
    // Filter properties, so that the row counts for its meter.
    for (k, v) in &r.meter.filter {
        props.insert(k.clone(), v.clone());
    }
    if let Some(path) = &r.meter.value_property {
        // Nested paths become nested objects: usage.gb → {"usage": {"gb": …}}.
        let mut parts: Vec<&str> = path.split('.').collect();
        let leaf = parts.pop().unwrap_or_default();
        let mut obj = &mut props;
        for p in parts {
            obj = obj.entry(p.to_owned()).or_insert_with(|| Value::Object(Map::new())).as_object_mut().ok_or("conflicting property paths")?;
        }
        obj.insert(leaf.to_owned(), Value::String(r.quantity.normalize().to_string()));
    }
    Ok(Event {
        workspace: workspace.clone(),
        id: EventId::parse(id).map_err(|e| e.0)?,
        event_type: EventType::parse(r.meter.event_type.clone()).map_err(|e| e.0)?,
        timestamp: r.at,
        received_at,
        customer_id: Some(r.customer),
        subscription_id: r.subscription,
        user_id: None,
        properties: serde_json::value::RawValue::from_string(Value::Object(props).to_string()).map_err(|e| e.to_string())?,
        context: serde_json::value::RawValue::from_string(json!({"source": "csv_import"}).to_string()).map_err(|e| e.to_string())?,
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
        // A succeeded import is done with its upload; a failed or cancelled
        // one keeps it so `POST /v1/jobs/{id}/retry` can run it again (e.g.
        // after creating a missing meter) until `sweep_uploads` removes it.
        if job.state == "succeeded" {
            if let Some(f) = job.payload["file"].as_str() {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let started = std::time::Instant::now();
        let path = PathBuf::from(job.payload["file"].as_str().unwrap_or_default());
        let strict = job.payload["mode"].as_str() != Some("skip_invalid");
        let ws = ctx.store().get_workspace(&job.workspace).await?;
        let tz = Tz::from_str(&ws.time_zone).map_err(|e| JobError::Failed(e.to_string()))?;
        let workspace = WorkspaceName::parse(ws.name.clone()).map_err(|e| JobError::Failed(e.0))?;
        let meters: HashMap<String, Meter> = ctx.store().list_meters(Some(&ws.name)).await?.into_iter().map(|m| (m.key.clone(), m)).collect();
        let fatal = |error: String, result: Value| JobError::Fatal { error, result };

        // Pass 1: validate and count.
        let mut rdr = reader(&path).map_err(|e| fatal(e.clone(), json!({"errors": [], "errors_total": 0})))?;
        let headers = rdr.headers().map_err(|e| fatal(format!("row 1: cannot read the header row: {e}"), json!({})))?.clone();
        let cols = columns(&headers).map_err(|e| fatal(e.clone(), json!({"errors": [error(1, "", "", e)], "errors_total": 1})))?;
        let (mut errors, mut errors_total, mut rows_total, mut rows_rejected) = (Vec::new(), 0u64, 0u64, 0u64);
        let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let mut bloom = Bloom::for_bytes(file_bytes);
        let mut maybe_repeated: std::collections::HashSet<[u8; 32]> = std::collections::HashSet::new();
        let mut rec = csv::StringRecord::new();
        loop {
            let row = rdr.position().line();
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    let msg = match e.kind() {
                        csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8 (save the file as UTF-8)".to_owned(),
                        _ => format!("cannot read the row: {e}"),
                    };
                    let line = e.position().map_or(row, |p| p.line());
                    return Err(fatal(format!("row {line}: {msg}"), json!({"errors": [error(line, "", "", msg)], "errors_total": 1})));
                }
            }
            if rec.iter().all(str::is_empty) {
                continue; // blank line
            }
            let line = rec.position().map_or(row, |p| p.line());
            rows_total += 1;
            match parse_row(&rec, line, &cols, &meters, tz, &ws.name) {
                Ok(row) => {
                    if row.given_id.is_none() && bloom.insert(&row.content) {
                        maybe_repeated.insert(row.content);
                    }
                }
                Err(errs) => {
                rows_rejected += 1;
                errors_total += errs.len() as u64;
                for e in errs {
                    if errors.len() < MAX_ERRORS {
                        errors.push(e);
                    }
                }
                }
            }
            if rows_total % 50_000 == 0 {
                ctx.progress(0, None).await;
                if ctx.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
            }
        }
        let summary = |imported: u64, duplicate: u64, processed: u64| {
            json!({
                "rows_total": rows_total, "rows_processed": processed, "rows_imported": imported,
                "rows_duplicate": duplicate, "rows_rejected": rows_rejected,
                "errors": errors, "errors_total": errors_total,
                "mode": if strict { "strict" } else { "skip_invalid" },
                "duration_ms": started.elapsed().as_millis() as u64,
            })
        };
        if strict && rows_rejected > 0 {
            return Err(fatal(format!("{rows_rejected} invalid row(s); nothing was imported (mode strict)"), summary(0, 0, 0)));
        }

        // Pass 2: import the valid rows in batches through the ingest pipeline.
        let mut rdr = reader(&path).map_err(|e| fatal(e, summary(0, 0, 0)))?;
        let _ = rdr.headers();
        drop(bloom);
        let mut occurrences: HashMap<[u8; 32], u32> = HashMap::new();
        let (mut imported, mut duplicate, mut processed) = (0u64, 0u64, 0u64);
        let mut batch = Vec::with_capacity(BATCH);
        let mut in_flight: Vec<tokio::task::JoinHandle<Result<(u64, u64), JobError>>> = Vec::new();
        let received_at = Utc::now();
        while rdr.read_record(&mut rec).map_err(|e| JobError::Failed(e.to_string()))? {
            if rec.iter().all(str::is_empty) {
                continue;
            }
            processed += 1;
            let line = rec.position().map_or(0, |p| p.line());
            if let Ok(row) = parse_row(&rec, line, &cols, &meters, tz, &ws.name) {
                let id = match &row.given_id {
                    Some(id) => id.clone(),
                    None if maybe_repeated.contains(&row.content) => {
                        let n = occurrences.entry(row.content).or_insert(0);
                        *n += 1;
                        row_id(&row.content, *n - 1)
                    }
                    None => row_id(&row.content, 0),
                };
                batch.push(to_event(row, id, &workspace, received_at).map_err(JobError::Failed)?);
            }
            if batch.len() >= BATCH {
                // Several batches in flight: the ingest writer commits them
                // together (group commit), so the import is not bound by one
                // round trip per batch. Order does not matter: ids dedup.
                let ingestor = self.ingestor.clone();
                let events = std::mem::take(&mut batch);
                in_flight.push(tokio::spawn(async move { submit(&ingestor, events).await }));
                if in_flight.len() >= IN_FLIGHT {
                    let out = in_flight.remove(0).await.map_err(|e| JobError::Failed(e.to_string()))??;
                    imported += out.0;
                    duplicate += out.1;
                    ctx.progress(processed as i64, Some(rows_total as i64)).await;
                    if ctx.is_cancelled() {
                        return Err(JobError::Cancelled);
                    }
                }
            }
        }
        if !batch.is_empty() {
            let ingestor = self.ingestor.clone();
            in_flight.push(tokio::spawn(async move { submit(&ingestor, batch).await }));
        }
        for h in in_flight {
            let out = h.await.map_err(|e| JobError::Failed(e.to_string()))??;
            imported += out.0;
            duplicate += out.1;
        }
        ctx.progress(processed as i64, Some(rows_total as i64)).await;
        // The upload is removed in `ended`, once success is recorded: a
        // crash before that runs the job again, which needs the file.
        Ok(summary(imported, duplicate, processed))
    }
}

/// Submits a batch, waiting while ingest is over capacity.
async fn submit(ingestor: &Ingestor, events: Vec<Event>) -> Result<(u64, u64), JobError> {
    let mut delay = std::time::Duration::from_millis(20);
    loop {
        match ingestor.submit(events.clone()).await {
            Ok(o) => return Ok((o.accepted as u64, o.duplicates as u64)),
            Err(sluice_ingest::IngestError::Overloaded) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(JobError::Failed(e.to_string())),
        }
    }
}

/// How long a failed import's upload is kept for a retry.
pub const KEEP_FAILED_UPLOADS: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Removes uploads in `dir` older than `max_age` (those of failed imports
/// that nobody retried, or of uploads interrupted before their job was
/// queued). Returns how many were removed.
pub fn sweep_uploads(dir: &std::path::Path, max_age: std::time::Duration) -> usize {
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
