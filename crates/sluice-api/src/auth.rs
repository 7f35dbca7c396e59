//! API keys: generation, hashing, and the request extractor that turns an
//! `Authorization` header into a [`Principal`].
//!
//! A key is `sk_` followed by 43 URL-safe base64 characters (32 random
//! bytes). Only its SHA-256 digest is stored. A request's key is hashed and
//! looked up by digest (an index lookup on the digest reveals nothing usable
//! about the secret), and the stored digest is then compared with the
//! computed one in constant time. Verified keys are cached for
//! [`KEY_CACHE_TTL`]; revoking a key evicts it from this process's cache at
//! once (other processes notice within the TTL).
//!
//! The dashboard signs in once with a key (`POST /v1/sessions`) and then
//! sends a session cookie instead ([`SESSION_COOKIE`]); see
//! `routes/sessions.rs`. A request with an `Authorization` header is always
//! authenticated by that header. A request without one may carry the cookie;
//! if its method changes state (POST, PUT, PATCH, DELETE) it must also carry
//! the session's CSRF token in [`CSRF_HEADER`], or it is refused with 403
//! `csrf`. The cookie is `SameSite=Strict` already; the token is a second,
//! independent guard (older browsers, subdomain attacks).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sluice_core::{Scope, WorkspaceName};
use sluice_store::Store;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// How long a verified key is trusted without asking the store again.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// Who is calling: the key, its workspace and its scope.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Id of the key.
    pub key_id: String,
    /// The key's workspace; every read and write is confined to it.
    pub workspace: WorkspaceName,
    /// What the key may do.
    pub scope: Scope,
}

impl Principal {
    /// An audit entry of an action of this key in its workspace.
    pub fn audit(&self, action: &str, target_type: &str, target_id: impl std::fmt::Display, details: serde_json::Value) -> sluice_store::NewAudit {
        sluice_store::NewAudit {
            workspace: self.workspace.to_string(),
            actor_key_id: Some(self.key_id.clone()),
            action: action.to_owned(),
            target_type: target_type.to_owned(),
            target_id: target_id.to_string(),
            details,
        }
    }

    /// Fails with 403 unless the key may write events.
    pub fn require_ingest(&self) -> Result<(), ApiError> {
        self.require(self.scope.can_ingest(), "write events", "an ingest or admin key")
    }
    /// Fails with 403 unless the key may read.
    pub fn require_read(&self) -> Result<(), ApiError> {
        self.require(self.scope.can_read(), "read data", "a read or admin key")
    }
    /// Fails with 403 unless the key is an admin (or root) key.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        self.require(self.scope.can_admin(), "manage this workspace", "an admin key")
    }
    /// Fails with 403 unless the key is the root key.
    pub fn require_root(&self) -> Result<(), ApiError> {
        self.require(self.scope.is_root(), "manage workspaces", "the root key")
    }
    fn require(&self, ok: bool, what: &str, needs: &str) -> Result<(), ApiError> {
        if ok {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("a key with scope {:?} cannot {what}; this needs {needs}", self.scope.as_str())))
        }
    }
}

/// A newly generated secret and what is stored about it.
pub struct GeneratedKey {
    /// The secret, shown once.
    pub secret: String,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
    /// First characters, for recognising a key in lists.
    pub prefix: String,
}

/// Makes a new random key.
pub fn generate_key() -> GeneratedKey {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("sk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    hashed(secret)
}

/// Hash and prefix of a given secret (e.g. `SLUICE_BOOTSTRAP_KEY`).
pub fn hashed(secret: String) -> GeneratedKey {
    let hash = Sha256::digest(secret.as_bytes()).to_vec();
    let prefix = secret.chars().take(8).collect();
    GeneratedKey { secret, hash, prefix }
}

/// A new key id, time-ordered.
pub fn new_key_id() -> String {
    format!("key_{}", uuid::Uuid::now_v7().simple())
}

/// Cache of verified keys, by digest.
#[derive(Default)]
pub struct KeyCache {
    entries: RwLock<HashMap<Vec<u8>, (Principal, Instant)>>,
}

impl KeyCache {
    /// Forgets a key (after revocation).
    pub fn evict_key(&self, key_id: &str) {
        if let Ok(mut m) = self.entries.write() {
            m.retain(|_, (p, _)| p.key_id != key_id);
        }
    }

    async fn verify(&self, store: &Store, secret: &str) -> Result<Option<Principal>, ApiError> {
        let digest = Sha256::digest(secret.as_bytes()).to_vec();
        if let Ok(m) = self.entries.read() {
            if let Some((p, at)) = m.get(&digest) {
                if at.elapsed() < KEY_CACHE_TTL {
                    return Ok(Some(p.clone()));
                }
            }
        }
        let Some((key, stored)) = store.find_key_by_hash(&digest).await? else { return Ok(None) };
        if !bool::from(stored.ct_eq(&digest)) {
            return Ok(None);
        }
        let workspace = WorkspaceName::parse(key.workspace).map_err(ApiError::internal)?;
        let p = Principal { key_id: key.id, workspace, scope: key.scope };
        if let Ok(mut m) = self.entries.write() {
            if m.len() > 100_000 {
                m.clear(); // bounded memory; refilled on demand
            }
            m.insert(digest, (p.clone(), Instant::now()));
        }
        Ok(Some(p))
    }
}

/// The key of a request: `Authorization: Bearer <key>`, or HTTP Basic with
/// the key as user name and an empty password (what Segment clients send).
/// `Ok(None)` when there is no `Authorization` header.
pub(crate) fn key_from_headers(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else { return Ok(None) };
    let value = value.to_str().map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Some(rest.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| ApiError::unauthorized("malformed Basic credentials"))?;
        let user = decoded.split_once(':').map(|(u, _)| u).unwrap_or(&decoded);
        if !user.is_empty() {
            return Ok(Some(user.to_owned()));
        }
    }
    Err(ApiError::unauthorized("unsupported Authorization header; send `Authorization: Bearer <key>`"))
}

/// Verifies a key and returns its principal (401 if unknown or revoked).
pub(crate) async fn authenticate(state: &AppState, secret: &str) -> Result<Principal, ApiError> {
    match state.keys.verify(&state.store, secret).await? {
        Some(p) => Ok(p),
        None => Err(ApiError::unauthorized("invalid or revoked API key")),
    }
}

/// Name of the dashboard's session cookie.
pub const SESSION_COOKIE: &str = "sluice_session";
/// Header that carries the CSRF token of a cookie-authenticated request.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A new random token: 32 bytes, URL-safe base64 without padding.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a session token: what the state store keeps.
pub(crate) fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The value of the session cookie, if the request has one.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.trim_matches('"').to_owned())
}

/// The live session of a request's cookie: `Ok(None)` without a cookie,
/// 401 when the cookie names no live session (expired, signed out, or its
/// key revoked).
pub(crate) async fn session_of(state: &AppState, headers: &HeaderMap) -> Result<Option<(Vec<u8>, sluice_store::Session)>, ApiError> {
    let Some(token) = session_token(headers) else { return Ok(None) };
    let hash = token_hash(&token);
    match state.store.find_session(&hash, chrono::Utc::now()).await? {
        Some(s) => Ok(Some((hash, s))),
        None => Err(ApiError::unauthorized("your session has expired or was ended; sign in again")),
    }
}

/// Fails with 403 `csrf` unless a state-changing request carries the
/// session's CSRF token. Safe methods (GET, HEAD, OPTIONS) need none.
pub(crate) fn check_csrf(method: &Method, headers: &HeaderMap, session: &sluice_store::Session) -> Result<(), ApiError> {
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
        return Ok(());
    }
    let sent = headers.get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !sent.is_empty() && bool::from(sent.ct_eq(session.csrf_token.as_bytes())) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "csrf",
        "this request changes state and is authenticated by a session cookie: send the session's CSRF token in the X-CSRF-Token header",
    ))
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(secret) = key_from_headers(&parts.headers)? {
            return authenticate(state, &secret).await;
        }
        let Some((_, session)) = session_of(state, &parts.headers).await? else {
            return Err(ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <key>`"));
        };
        check_csrf(&parts.method, &parts.headers, &session)?;
        let workspace = WorkspaceName::parse(session.workspace).map_err(ApiError::internal)?;
        Ok(Principal { key_id: session.key_id, workspace, scope: session.scope })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, c.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(session_token(&headers(&["a=1; sluice_session=tok; b=2"])).as_deref(), Some("tok"));
        assert_eq!(session_token(&headers(&["a=1", "sluice_session=\"tok\""])).as_deref(), Some("tok"));
        assert_eq!(session_token(&headers(&["xsluice_session=tok; sluice_session="])), None);
        assert_eq!(session_token(&headers(&[])), None);
    }

    #[test]
    fn tokens_are_32_random_bytes_in_url_safe_base64() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
