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

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
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
            Err(ApiError::forbidden(format!(
                "a key with scope {:?} cannot {what}; this needs {needs}",
                self.scope.as_str()
            )))
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

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let secret = key_from_headers(&parts.headers)?
            .ok_or_else(|| ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <key>`"))?;
        authenticate(state, &secret).await
    }
}
