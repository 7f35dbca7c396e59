//! `/v1/sessions`: sign-in for the dashboard.
//!
//! `POST /v1/sessions` takes a read, admin or root key once and answers a
//! session cookie ([`SESSION_COOKIE`]: 32 random bytes, URL-safe base64;
//! `HttpOnly; SameSite=Strict; Path=/`, `Secure` behind a TLS proxy that
//! sends `X-Forwarded-Proto: https`) and, in the body, the CSRF token that
//! state-changing requests must send in `X-CSRF-Token`. The key never
//! reaches the browser's storage. The store keeps only a hash of the token
//! (`sluice_store::Session`). Sessions end at sign-out, when their key is
//! revoked, or `dashboard.session_ttl` after sign-in (absolute: a lookup
//! never writes, and the cookie's `Max-Age` says the same time).

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_core::Scope;
use sluice_store::{NewSession, Session};

use super::rfc3339;
use crate::auth::{authenticate, check_csrf, random_token, session_of, token_hash, SESSION_COOKIE};
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

/// Body of `POST /v1/sessions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// A key with scope `read`, `admin` or `root`.
    pub key: String,
}

/// A session as the dashboard sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    /// Workspace of the key that signed in.
    pub workspace: String,
    /// Scope of that key: `read`, `admin` or `root`.
    pub scope: String,
    /// Id of that key.
    pub key_id: String,
    /// RFC 3339; the session stops working then.
    pub expires_at: String,
    /// Send it in `X-CSRF-Token` with every POST, PUT, PATCH and DELETE.
    pub csrf_token: String,
}

impl From<Session> for SessionView {
    fn from(s: Session) -> Self {
        SessionView {
            workspace: s.workspace,
            scope: s.scope.as_str().to_owned(),
            key_id: s.key_id,
            expires_at: rfc3339(s.expires_at),
            csrf_token: s.csrf_token,
        }
    }
}

fn cookie(headers: &HeaderMap, value: &str, max_age: u64) -> Result<HeaderValue, ApiError> {
    let tls = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}"))
        .map_err(ApiError::internal)
}

fn with_session(status: StatusCode, set_cookie: Option<HeaderValue>, view: SessionView) -> Response {
    let mut resp = (status, Json(view)).into_response();
    if let Some(c) = set_cookie {
        resp.headers_mut().insert(SET_COOKIE, c);
    }
    // The body carries the CSRF token: no cache may keep it.
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Sign in: exchange a read, admin or root key for a session cookie.
#[utoipa::path(post, path = "/v1/sessions", request_body = CreateSession, tag = "sessions",
    responses((status = 201, body = SessionView, description = "Signed in; `Set-Cookie: sluice_session=…`"),
        (status = 401, description = "unknown or revoked key"), (status = 403, description = "an ingest key")))]
pub async fn create(State(st): State<AppState>, headers: HeaderMap, Json(body): Json<CreateSession>) -> Result<Response, ApiError> {
    let principal = authenticate(&st, body.key.trim()).await?;
    if principal.scope == Scope::Ingest {
        return Err(ApiError::forbidden("an ingest key cannot sign in to the dashboard; use a read or admin key"));
    }
    let token = random_token();
    let ttl = chrono::Duration::from_std(st.session_ttl).map_err(ApiError::internal)?;
    let now = chrono::Utc::now();
    let new = NewSession { token_hash: token_hash(&token), key_id: principal.key_id.clone(), csrf_token: random_token(), expires_at: now + ttl };
    st.store.create_session(&new).await?;
    // Sign-ins and sign-outs are in the audit trail, named by the session's
    // hash prefix (never the token): an operator can tell who was signed in
    // when, and match a sign-out to its sign-in.
    let entry = principal.audit(
        "session.create",
        "session",
        session_ref(&new.token_hash),
        json!({"scope": principal.scope.as_str(), "expires_at": rfc3339(new.expires_at)}),
    );
    super::record_audit(&st, &entry).await;
    let view = SessionView {
        workspace: principal.workspace.as_str().to_owned(),
        scope: principal.scope.as_str().to_owned(),
        key_id: principal.key_id,
        expires_at: rfc3339(new.expires_at),
        csrf_token: new.csrf_token,
    };
    Ok(with_session(StatusCode::CREATED, Some(cookie(&headers, &token, st.session_ttl.as_secs())?), view))
}

/// The session of the request's cookie, with its CSRF token (after a page
/// reload the dashboard gets the token back from here).
#[utoipa::path(get, path = "/v1/sessions/current", tag = "sessions",
    responses((status = 200, body = SessionView), (status = 401, description = "no live session")),
    security(("session" = [])))]
pub async fn current(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let Some((_, session)) = session_of(&st, &headers).await? else {
        return Err(ApiError::unauthorized("not signed in"));
    };
    Ok(with_session(StatusCode::OK, None, session.into()))
}

/// Sign out: ends the session and clears the cookie. Needs `X-CSRF-Token`.
#[utoipa::path(delete, path = "/v1/sessions/current", tag = "sessions",
    responses((status = 204, description = "Signed out; the cookie is cleared"), (status = 401), (status = 403, description = "`csrf`: no or wrong X-CSRF-Token")),
    security(("session" = [])))]
pub async fn delete(State(st): State<AppState>, method: Method, headers: HeaderMap) -> Result<Response, ApiError> {
    let Some((hash, session)) = session_of(&st, &headers).await? else {
        return Err(ApiError::unauthorized("not signed in"));
    };
    check_csrf(&method, &headers, &session)?;
    st.store.delete_session(&hash).await?;
    let entry = sluice_store::NewAudit {
        workspace: session.workspace.clone(),
        actor_key_id: Some(session.key_id.clone()),
        action: "session.delete".into(),
        target_type: "session".into(),
        target_id: session_ref(&hash),
        details: json!({}),
    };
    super::record_audit(&st, &entry).await;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(SET_COOKIE, cookie(&headers, "", 0)?);
    Ok(resp)
}

/// How the audit trail names a session: the first 16 hex digits of its
/// token's SHA-256 (the store keeps the hash, never the token).
fn session_ref(hash: &[u8]) -> String {
    let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("ses_{hex}")
}
