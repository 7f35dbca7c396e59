//! `/v1/events`: ingest and read back.

use std::io::Read;
use std::time::Instant;

use crate::json::Query;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sluice_core::activity::{self, Activity};
use sluice_core::Event;
use sluice_ingest::{parse_body, BodyFormat, EventFilter, IngestLimits, Outcome, ReadError};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

/// Bodies above this size are decompressed and parsed off the async threads.
const BLOCKING_THRESHOLD: usize = 64 << 10;

/// Response of `POST /v1/events`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// Events newly stored.
    pub accepted: usize,
    /// Events whose id had already been accepted (not stored again).
    pub duplicates: usize,
}

/// Ingest events: one JSON object, a JSON array, NDJSON or CloudEvents. A
/// 200 means every accepted event is durable. One invalid event refuses the
/// whole request (400, nothing written) and every bad event is listed.
#[utoipa::path(post, path = "/v1/events", tag = "events",
    request_body(content = String, description = "JSON event, JSON array, NDJSON (application/x-ndjson), CloudEvents (application/cloudevents+json, application/cloudevents-batch+json); optional Content-Encoding: gzip"),
    responses((status = 200, body = IngestResponse), (status = 400, description = "invalid events: details list index, field, reason"),
        (status = 401), (status = 403), (status = 413), (status = 503, description = "over capacity; see Retry-After")),
    security(("bearer" = [])))]
pub async fn ingest(State(st): State<AppState>, who: Principal, headers: HeaderMap, body: Body) -> Result<Json<IngestResponse>, ApiError> {
    let started = Instant::now();
    who.require_ingest()?;
    let result = ingest_inner(&st, &who, &headers, body, true).await;
    match &result {
        Ok(out) => {
            metrics::histogram!("sluice_ingest_ack_seconds").record(started.elapsed().as_secs_f64());
            activity::record(who.workspace.as_str(), Activity::EventsAccepted, out.accepted as u64);
        }
        Err(e) => {
            metrics::counter!("sluice_ingest_rejections_total", "code" => e.code).increment(1);
            activity::record(who.workspace.as_str(), Activity::IngestRejected, 1);
        }
    }
    let out = result?;
    Ok(Json(IngestResponse { accepted: out.accepted, duplicates: out.duplicates }))
}

/// The HTTP+JSON ceiling for `sluice bench ingest`: reads, decompresses,
/// parses and validates a body exactly like `POST /v1/events`, then discards
/// it. Nothing is stored.
#[utoipa::path(post, path = "/v1/bench/discard", tag = "events",
    responses((status = 200, body = IngestResponse)), security(("bearer" = [])))]
pub async fn discard(State(st): State<AppState>, who: Principal, headers: HeaderMap, body: Body) -> Result<Json<IngestResponse>, ApiError> {
    who.require_ingest()?;
    let out = ingest_inner(&st, &who, &headers, body, false).await?;
    Ok(Json(IngestResponse { accepted: out.accepted, duplicates: out.duplicates }))
}

async fn ingest_inner(st: &AppState, who: &Principal, headers: &HeaderMap, body: Body, store: bool) -> Result<Outcome, ApiError> {
    let limits = st.limits;
    let (raw, mut permits) = read_limited(st, headers, body, limits.max_body_bytes).await?;
    let format = BodyFormat::from_content_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase()) {
        None => false,
        Some(e) if e == "gzip" || e == "x-gzip" => true,
        Some(e) if e == "identity" || e.is_empty() => false,
        Some(e) => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Encoding {e:?} is not supported; use gzip or none"),
            ))
        }
    };
    if gzip {
        // Reserve the worst case before inflating, so concurrent gzip bodies
        // stay within the buffer budget.
        permits.push(reserve(st, limits.max_body_bytes)?);
    }
    let workspace = who.workspace.clone();
    let parse_limits = IngestLimits { max_event_bytes: limits.max_event_bytes, max_events: limits.max_events };
    let received_at = chrono::Utc::now();
    let work = move || -> Result<Vec<Event>, ApiError> {
        let text: std::borrow::Cow<'_, [u8]> = if gzip { gunzip(&raw, limits.max_body_bytes)?.into() } else { raw[..].into() };
        Ok(parse_body(&text, format, &workspace, received_at, parse_limits)?)
    };
    let events = if gzip || raw_len_over(headers, BLOCKING_THRESHOLD) {
        tokio::task::spawn_blocking(work).await.map_err(ApiError::internal)??
    } else {
        work()?
    };
    if !store {
        return Ok(Outcome { accepted: events.len(), duplicates: 0 });
    }
    let outcome = st.ingestor.submit(events).await?;
    drop(permits);
    Ok(outcome)
}

fn raw_len_over(headers: &HeaderMap, n: usize) -> bool {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok()).is_none_or(|len| len > n)
}

pub(crate) fn reserve(st: &AppState, bytes: usize) -> Result<OwnedSemaphorePermit, ApiError> {
    let n = u32::try_from(bytes.max(1)).map_err(|_| ApiError::too_large("body too large"))?;
    st.body_budget
        .clone()
        .try_acquire_many_owned(n)
        .map_err(|_| ApiError::overloaded("too many request bytes in flight; retry after the indicated delay"))
}

/// Reads the body, refusing it (413) once it passes the limit and charging
/// every buffered byte to the shared budget (503 when exhausted).
pub(crate) async fn read_limited(st: &AppState, headers: &HeaderMap, body: Body, max: usize) -> Result<(Bytes, Vec<OwnedSemaphorePermit>), ApiError> {
    let too_large = || ApiError::too_large(format!("request body exceeds {max} bytes (limit max_body_bytes)"));
    let mut body = body;
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > max as u64 {
            drain(&mut body).await;
            return Err(too_large());
        }
    }
    let mut permits = Vec::new();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                drop(buf);
                drop(permits);
                drain(&mut body).await;
                return Err(too_large());
            }
            permits.push(reserve(st, data.len())?);
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), permits))
}

/// Reads and discards the rest of a refused body (at most 64 MiB, at most
/// 10 s), so that an HTTP client which is still sending sees our 413 instead
/// of a reset connection. Nothing is buffered.
async fn drain(body: &mut Body) {
    let mut left: usize = 64 << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len());
            if n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
}

pub(crate) fn gunzip(data: &[u8], max: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", format!("invalid gzip body: {e}")))?;
    if out.len() > max {
        return Err(ApiError::too_large(format!("decompressed body exceeds {max} bytes (limit max_body_bytes)")));
    }
    Ok(out)
}

/// `GET /v1/events` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Only events of this customer.
    pub customer_id: Option<String>,
    /// Event time at or after (RFC 3339).
    pub from: Option<String>,
    /// Event time before (RFC 3339).
    pub to: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` or `tail_cursor` of a previous page, or `latest` to start at the end.
    pub cursor: Option<String>,
}

/// A page of events.
#[derive(Debug, Serialize)]
pub struct EventList {
    /// Events in acceptance order.
    pub data: Vec<Event>,
    /// Next page; `null` when the end of the log was reached.
    pub next_cursor: Option<String>,
    /// Where to poll for events that arrive later (always set).
    pub tail_cursor: String,
}

/// List events of the key's workspace, oldest first.
#[utoipa::path(get, path = "/v1/events", params(ListQuery), tag = "events",
    responses((status = 200, description = "`{data: [Event], next_cursor, tail_cursor}`"), (status = 400), (status = 403)),
    security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<ListQuery>) -> Result<Json<EventList>, ApiError> {
    who.require_read()?;
    let time = |name: &str, v: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        v.as_deref().map(|s| sluice_ingest::formats::parse_time(s).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))).transpose()
    };
    let filter =
        EventFilter { event_type: q.event_type.clone(), customer_id: q.customer_id.clone(), from: time("from", &q.from)?, to: time("to", &q.to)? };
    let page =
        sluice_ingest::list_events(&*st.log, &who.workspace, &filter, q.cursor.as_deref(), q.limit.unwrap_or(100)).await.map_err(read_error)?;
    Ok(Json(EventList {
        data: page.data,
        next_cursor: if page.at_end { None } else { Some(page.next_cursor.clone()) },
        tail_cursor: page.next_cursor,
    }))
}

/// One event by id.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "events",
    responses((status = 200, description = "the event"), (status = 404)), security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Event>, ApiError> {
    who.require_read()?;
    sluice_ingest::get_event(&*st.log, st.ingestor.index(), &who.workspace, &id)
        .await
        .map_err(read_error)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("event {id:?} not found")))
}

fn read_error(e: ReadError) -> ApiError {
    match e {
        ReadError::BadCursor => ApiError::bad_request("cursor: not a cursor issued by this server"),
        ReadError::Log(l) => ApiError::internal(l),
    }
}
