//! A JSON extractor whose rejections look like every other API error.
//!
//! Unlike `axum::Json` it does not insist on `Content-Type: application/json`:
//! `curl -d '{…}'` sends a form content type, and a JSON API should still
//! understand it. The body must still be valid JSON of the expected shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

/// Largest JSON body accepted by non-ingest endpoints.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// A JSON request or response body.
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_JSON_BODY)));
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!("JSON body exceeds {MAX_JSON_BODY} bytes"))
            } else {
                ApiError::bad_request(format!("could not read the request body: {}", r.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("request body is empty; expected a JSON object"));
        }
        serde_json::from_slice(&bytes).map(Json).map_err(|e| {
            let what = if e.is_data() { "invalid request body" } else { "malformed JSON" };
            ApiError::bad_request(format!("{what}: {e}"))
        })
    }
}

/// Like `axum::extract::Query`, but a bad query string (`?limit=abc`)
/// answers with the API's error shape.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or_default();
        serde_urlencoded_shim::from_str(q).map(Query)
    }
}

/// axum re-exports no query parser; its `Query` rejection text is what we need.
mod serde_urlencoded_shim {
    use serde::de::DeserializeOwned;

    use crate::error::ApiError;

    /// Parses a query string; a 400 naming what is wrong if it does not fit `T`.
    pub fn from_str<T: DeserializeOwned>(q: &str) -> Result<T, ApiError> {
        let invalid = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid query string: {e}"));
        let uri: axum::http::Uri = format!("/?{q}").parse().map_err(|e: axum::http::uri::InvalidUri| invalid(&e))?;
        axum::extract::Query::<T>::try_from_uri(&uri).map(|axum::extract::Query(v)| v).map_err(|e| invalid(&e.body_text()))
    }
}
