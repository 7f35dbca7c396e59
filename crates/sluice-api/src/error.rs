//! The one error type of every handler, and its JSON shape:
//! `{"error": {"code": "…", "message": "…", "details": [...]}}`.
//!
//! Internal errors (database, I/O) are logged with their full text and
//! answered with a generic message: internal text never reaches clients.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use sluice_ingest::{IngestError, ParseError};
use sluice_store::StoreError;

/// An API error: status, stable code, human message and optional details.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Structured details (e.g. one entry per invalid event).
    pub details: Vec<Value>,
    /// Seconds for `Retry-After` (429/503).
    pub retry_after: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorInner,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorInner {
    /// Stable code, e.g. `invalid_events`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `overloaded`.
    code: String,
    message: String,
    #[schema(value_type = Vec<Object>)]
    details: Vec<Value>,
}

impl ApiError {
    /// Builds an error without details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: vec![], retry_after: None }
    }
    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 413 `payload_too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    /// 503 `overloaded` with `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message) }
    }
    /// 500 `internal`; the cause is logged, not returned.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
    /// Adds details.
    pub fn with_details(mut self, details: Vec<Value>) -> Self {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorInner { code: self.code.to_owned(), message: self.message, details: self.details } };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("not found"),
            StoreError::Conflict(m) => ApiError::conflict(m),
            StoreError::Database(sluice_store::sqlx_reexport::Error::PoolTimedOut) => {
                tracing::warn!("state store busy: connection pool exhausted");
                ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "state store busy; retry later") }
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Malformed(m) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", m),
            ParseError::Invalid { errors, invalid_events } => {
                let listed = errors.len();
                let mut message = format!("{invalid_events} invalid event(s); nothing was written");
                if let Some(first) = errors.first() {
                    message.push_str(&format!(" (event {}: {}: {})", first.index, first.field, first.reason));
                }
                let details = errors.into_iter().filter_map(|fe| serde_json::to_value(fe).ok()).collect();
                if invalid_events > 0 && listed < invalid_events {
                    message.push_str(&format!(" (errors of the first {listed} listed)"));
                }
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_events", message).with_details(details)
            }
            ParseError::TooLarge { limit, max, message } => {
                ApiError::too_large(message).with_details(vec![serde_json::json!({"limit": limit, "max": max})])
            }
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid(p) => p.into(),
            IngestError::Overloaded => ApiError::overloaded("ingest is over capacity; retry after the indicated delay"),
            IngestError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            IngestError::Unavailable(m) => {
                tracing::error!(reason = %m, "ingest unavailable");
                ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "events could not be stored; nothing was acknowledged, retry later",
                    )
                }
            }
        }
    }
}
