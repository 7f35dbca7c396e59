//! Segment-compatible endpoints (`/v1/track`, `/v1/identify`, `/v1/group`,
//! `/v1/page`, `/v1/screen`, `/v1/alias`, `/v1/batch`), so Segment's client
//! libraries work with a host change. The write key is an `ingest` key, sent
//! as the HTTP Basic user name or as `writeKey` in the body.
//!
//! Status codes follow Segment's: `200 {"success": true}`; `400` for
//! malformed JSON and for messages or batches over the size limits (32 KB /
//! 500 KB). Unlike Segment, which accepts and later drops invalid messages,
//! Sluice refuses a request with an invalid message (e.g. no
//! `userId`/`anonymousId`) with `400` and stores nothing of it, and a wrong
//! write key gets `401`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::Value;
use sluice_ingest::segment::{body_write_key, parse_segment, resolve_customers, SegmentCall, SegmentLimits};
use sluice_ingest::ParseError;

use crate::auth::{authenticate, key_from_headers};
use crate::error::ApiError;
use crate::json::Json;
use crate::routes::events::{gunzip, read_limited, reserve};
use crate::state::AppState;
use sluice_core::activity::{self, Activity};

/// Segment's success response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SegmentOk {
    /// Always true.
    pub success: bool,
}

// rustfmt re-indents the attribute inside this macro on every run (it is
// not idempotent there), so the macro is left as written.
#[rustfmt::skip]
macro_rules! endpoint {
    ($name:ident, $path:literal, $call:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "segment",
            request_body(content = Object, description = "a Segment message (HTTP Tracking API)"),
            responses((status = 200, body = SegmentOk), (status = 400), (status = 401), (status = 403)),
            security(("bearer" = []), ("basic" = [])))]
        pub async fn $name(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<SegmentOk>, ApiError> {
            handle(&st, &headers, body, $call).await
        }
    };
}

endpoint!(track, "/v1/track", Some(SegmentCall::Track), "Segment `track`: an event named by `event`.");
endpoint!(identify, "/v1/identify", Some(SegmentCall::Identify), "Segment `identify`: an event plus the user's traits.");
endpoint!(group, "/v1/group", Some(SegmentCall::Group), "Segment `group`: an event plus the customer (`groupId`) and the user↔customer link.");
endpoint!(page, "/v1/page", Some(SegmentCall::Page), "Segment `page`.");
endpoint!(screen, "/v1/screen", Some(SegmentCall::Screen), "Segment `screen`.");
endpoint!(alias, "/v1/alias", Some(SegmentCall::Alias), "Segment `alias`: `previousId` is now `userId`.");
endpoint!(batch, "/v1/batch", None, "Segment `batch`: up to 500 KB of messages of any type; batch-level `context` is merged into each.");

async fn handle(st: &AppState, headers: &HeaderMap, body: Body, call: Option<SegmentCall>) -> Result<Json<SegmentOk>, ApiError> {
    let limits = SegmentLimits { max_message_bytes: st.limits.segment_max_message_bytes, max_batch_bytes: st.limits.segment_max_batch_bytes };
    let as_400 = |e: ApiError| if e.status == StatusCode::PAYLOAD_TOO_LARGE { ApiError { status: StatusCode::BAD_REQUEST, ..e } } else { e };
    // Authenticate from the header first, so that a wrong key is refused
    // before the body is even read.
    let header_key = key_from_headers(headers)?;
    let principal = match &header_key {
        Some(k) => Some(authenticate(st, k).await?),
        None => None,
    };
    let (raw, mut permits) = read_limited(st, headers, body, limits.max_batch_bytes).await.map_err(as_400)?;
    let gzip = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let text: Vec<u8> = if gzip {
        permits.push(reserve(st, limits.max_batch_bytes)?);
        gunzip(&raw, limits.max_batch_bytes).map_err(as_400)?
    } else {
        raw.to_vec()
    };
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", format!("invalid JSON: {e}")))?;
    let principal = match principal {
        Some(p) => p,
        None => {
            let key = body_write_key(&value)
                .ok_or_else(|| ApiError::unauthorized("no write key: send it as the HTTP Basic user name or as `writeKey` in the body"))?;
            authenticate(st, &key).await?
        }
    };
    principal.require_ingest()?;
    let mut parsed = parse_segment(&value, call, &principal.workspace, chrono::Utc::now(), limits).map_err(|e| {
        activity::record(principal.workspace.as_str(), Activity::IngestRejected, 1);
        match e {
            ParseError::TooLarge { .. } => as_400(e.into()),
            other => other.into(),
        }
    })?;
    resolve_customers(&mut parsed, &st.store).await?;
    let out = st.ingestor.submit(parsed.events).await?;
    activity::record(principal.workspace.as_str(), Activity::EventsAccepted, out.accepted as u64);
    drop(permits);
    Ok(Json(SegmentOk { success: true }))
}
