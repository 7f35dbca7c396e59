//! Operational endpoints: liveness, readiness, metrics, OpenAPI. These carry
//! no workspace data and need no key, so probes and scrapers work as usual.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200)))]
pub async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Readiness: started, not draining, and the state store answers.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200), (status = 503)))]
pub async fn readyz(State(st): State<AppState>) -> Response {
    if !st.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "not ready", "reason": "starting or draining"}))).into_response();
    }
    if let Err(e) = st.store.ping().await {
        tracing::warn!(error = %e, "readiness: state store unreachable");
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "not ready", "reason": "state store unreachable"}))).into_response();
    }
    // A consumer whose worker crashed and restarted recently is shown (its
    // events still flow: a failing event is dead-lettered, never a reason to
    // restart, so a restart means a bug or a broken store). The server stays
    // ready for traffic: status "degraded", HTTP 200.
    let restarting: Vec<serde_json::Value> = st
        .consumers
        .states()
        .into_iter()
        .filter(|(_, s)| s.restarted_recently())
        .map(|(name, s)| {
            let name = sluice_consumers::runtime::metric_label(&name);
            json!({"name": name, "restarts": s.restarts, "last_restart_at": s.last_restart_at.map(|t| t.to_rfc3339())})
        })
        .collect();
    let status = if restarting.is_empty() { "ready" } else { "degraded" };
    axum::Json(json!({"status": status, "state_backend": st.store.backend(), "consumers_restarting": restarting})).into_response()
}

/// Prometheus text format. With `metrics.require_key = true` it needs a
/// read, admin or root key like any data endpoint; series carry no workspace
/// or webhook ids either way (webhook consumers share the label `webhook`).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, content_type = "text/plain"), (status = 401), (status = 403)))]
pub async fn metrics(State(st): State<AppState>, mut parts: axum::http::request::Parts) -> Response {
    if st.metrics_require_key {
        use axum::extract::FromRequestParts as _;
        let who = match crate::auth::Principal::from_request_parts(&mut parts, &st).await {
            Ok(who) => who,
            Err(e) => return e.into_response(),
        };
        if let Err(e) = who.require_read() {
            return e.into_response();
        }
    }
    let stats = st.log.stats();
    metrics::gauge!("sluice_log_bytes").set(stats.bytes as f64);
    for (p, (start, next)) in stats.partitions.iter().enumerate() {
        metrics::gauge!("sluice_log_records", "partition" => p.to_string()).set((next - start) as f64);
        metrics::gauge!("sluice_log_next_offset", "partition" => p.to_string()).set(*next as f64);
    }
    let body = st.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// The OpenAPI description of this API.
pub async fn openapi() -> Response {
    axum::Json(crate::openapi()).into_response()
}

/// The dashboard: one static page that signs in with a key once
/// (`POST /v1/sessions`: an `HttpOnly` session cookie and a CSRF token kept
/// in memory; the key is never stored in the browser) and then calls this
/// API. It shows consumers and their lag, jobs and their progress, dead
/// letters (with replay and discard), webhooks and the latest events, in
/// English or Japanese. The page itself holds no data, so it needs no key.
///
/// Browsers that accept gzip get the page compressed (about a fifth of its
/// size: the first load stays far under the 300 KB budget of
/// docs/dashboard.md); it is compressed once, at the first request.
pub async fn dashboard(headers: axum::http::HeaderMap) -> Response {
    const PAGE: &str = include_str!("../dashboard/index.html");
    static GZIPPED: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(PAGE.as_bytes());
        gz.finish().unwrap_or_default()
    });
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().is_some_and(|name| name.trim().eq_ignore_ascii_case("gzip")) && !e.replace(' ', "").ends_with("q=0"));
    let common = [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache"), (header::VARY, "Accept-Encoding")];
    if gzip && !GZIPPED.is_empty() {
        (common, [(header::CONTENT_ENCODING, "gzip")], GZIPPED.as_slice()).into_response()
    } else {
        (common, PAGE).into_response()
    }
}
