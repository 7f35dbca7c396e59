//! `GET /v1/audit`: who did what, when, on what.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_store::AuditEntry;

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// An audit entry.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditView {
    /// Time-ordered id.
    pub id: String,
    /// Workspace the action concerns.
    pub workspace: String,
    /// When (RFC 3339).
    pub at: String,
    /// Id of the key that acted.
    pub actor_key_id: Option<String>,
    /// What happened: `workspace.create`, `key.create`, `key.revoke`, …
    pub action: String,
    /// Kind of object acted on.
    pub target_type: String,
    /// Object acted on.
    pub target_id: String,
    /// Details (never secrets).
    #[schema(value_type = Object)]
    pub details: Value,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        AuditView {
            id: e.id,
            workspace: e.workspace,
            at: rfc3339(e.at),
            actor_key_id: e.actor_key_id,
            action: e.action,
            target_type: e.target_type,
            target_id: e.target_id,
            details: e.details,
        }
    }
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Another workspace's log (root key only).
    pub workspace: Option<String>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
    /// Page size, 1–1000.
    pub limit: Option<usize>,
}

/// The audit log of the key's workspace, oldest first (admin keys).
#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), tag = "audit",
    responses((status = 200, description = "`{data: [AuditEntry], next_cursor}`"), (status = 403)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<AuditQuery>) -> Result<Json<List<AuditView>>, ApiError> {
    who.require_admin()?;
    let ws = match q.workspace {
        Some(w) if w != who.workspace.as_str() => {
            who.require_root().map_err(|_| ApiError::forbidden("only the root key can read another workspace's audit log"))?;
            w
        }
        _ => who.workspace.to_string(),
    };
    let page = st.store.list_audit(&ws, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }))
}
