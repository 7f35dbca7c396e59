//! Dashboard sessions: a browser signs in once with a key and then carries a
//! random token in an `HttpOnly` cookie instead of the key.
//!
//! Only the SHA-256 digest of the token is stored (like keys: a copy of the
//! table does not let anyone sign in). A session belongs to the key that
//! created it and takes that key's workspace and scope at every lookup: the
//! lookup joins `api_keys` and skips revoked keys, so revoking a key ends its
//! sessions at once, in every process. Expiry is absolute (`expires_at`, set
//! at sign-in): a lookup never writes, and the cookie's `Max-Age` matches the
//! server's expiry exactly.

use chrono::{DateTime, Utc};
use sluice_core::Scope;

use crate::{from_micros, on_pool, parse_scope, to_micros, write_stmt, Result, Store};

/// A session to store.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// SHA-256 of the cookie's token.
    pub token_hash: Vec<u8>,
    /// The key that signed in.
    pub key_id: String,
    /// The token state-changing requests must echo in `X-CSRF-Token`.
    pub csrf_token: String,
    /// When the session stops working.
    pub expires_at: DateTime<Utc>,
}

/// A live session, with its key's current workspace and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The key that signed in.
    pub key_id: String,
    /// The key's workspace.
    pub workspace: String,
    /// The key's scope.
    pub scope: Scope,
    /// The CSRF token of the session.
    pub csrf_token: String,
    /// Sign-in time.
    pub created_at: DateTime<Utc>,
    /// When the session stops working.
    pub expires_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    key_id: String,
    workspace: String,
    scope: String,
    csrf_token: String,
    created_at: i64,
    expires_at: i64,
}

impl Store {
    /// Stores a new session, and deletes sessions that have expired.
    pub async fn create_session(&self, session: &NewSession) -> Result<()> {
        let now = to_micros(Utc::now());
        write_stmt!(self, pool => sqlx::query("DELETE FROM sessions WHERE expires_at <= $1").bind(now).execute(pool).await.map(|r| r.rows_affected()))?;
        write_stmt!(self, pool => sqlx::query(
            "INSERT INTO sessions (token_hash, key_id, csrf_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(session.token_hash.clone())
            .bind(session.key_id.clone())
            .bind(session.csrf_token.clone())
            .bind(now)
            .bind(to_micros(session.expires_at))
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The live session whose token hashes to `token_hash`: not expired at
    /// `now`, and its key not revoked.
    pub async fn find_session(&self, token_hash: &[u8], now: DateTime<Utc>) -> Result<Option<Session>> {
        let row: Option<SessionRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT s.key_id, k.workspace, k.scope, s.csrf_token, s.created_at, s.expires_at \
             FROM sessions s JOIN api_keys k ON k.id = s.key_id \
             WHERE s.token_hash = $1 AND s.expires_at > $2 AND k.revoked_at IS NULL")
            .bind(token_hash).bind(to_micros(now)).fetch_optional(pool).await)?;
        Ok(row.map(|r| Session {
            key_id: r.key_id,
            workspace: r.workspace,
            scope: parse_scope(&r.scope),
            csrf_token: r.csrf_token,
            created_at: from_micros(r.created_at),
            expires_at: from_micros(r.expires_at),
        }))
    }

    /// Ends a session (sign-out). False when there was none.
    pub async fn delete_session(&self, token_hash: &[u8]) -> Result<bool> {
        let done = write_stmt!(self, pool => sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(done > 0)
    }
}
