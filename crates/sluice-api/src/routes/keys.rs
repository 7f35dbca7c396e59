//! `/v1/keys`: admin keys manage the keys of their workspace; the root key
//! manages keys of every workspace. A secret is shown once, at creation.

use crate::json::Query;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::Scope;
use sluice_store::{ApiKey, NewApiKey, StoreError};

use super::{rfc3339, List};
use crate::auth::{generate_key, new_key_id, Principal};
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

/// Body of `POST /v1/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Human name, e.g. `web-app ingest`.
    pub name: String,
    /// `admin`, `read` or `ingest`.
    pub scope: String,
    /// Workspace of the new key; default the caller's. Only the root key may
    /// name another workspace.
    pub workspace: Option<String>,
}

/// A key as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    /// Key id (use it to revoke the key).
    pub id: String,
    /// Human name.
    pub name: String,
    /// `root`, `admin`, `read` or `ingest`.
    pub scope: String,
    /// Workspace.
    pub workspace: String,
    /// First characters of the secret.
    pub prefix: String,
    /// RFC 3339.
    pub created_at: String,
    /// Id of the key that created it.
    pub created_by: Option<String>,
    /// The secret: only in the response to `POST /v1/keys`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<ApiKey> for KeyView {
    fn from(k: ApiKey) -> Self {
        KeyView {
            id: k.id,
            name: k.name,
            scope: k.scope.as_str().to_owned(),
            workspace: k.workspace,
            prefix: k.prefix,
            created_at: rfc3339(k.created_at),
            created_by: k.created_by,
            secret: None,
        }
    }
}

/// `GET /v1/keys` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct KeyQuery {
    /// Only keys of this workspace (root key); admin keys always see their own.
    pub workspace: Option<String>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
    /// Page size, 1–1000.
    pub limit: Option<usize>,
}

/// Create a key. The response carries the secret, once.
#[utoipa::path(post, path = "/v1/keys", request_body = CreateKey, tag = "keys",
    responses((status = 201, body = KeyView), (status = 400), (status = 403), (status = 404)), security(("bearer" = [])))]
pub async fn create(State(st): State<AppState>, who: Principal, Json(body): Json<CreateKey>) -> Result<(StatusCode, Json<KeyView>), ApiError> {
    who.require_admin()?;
    let scope: Scope = body.scope.parse().map_err(|e: sluice_core::scope::UnknownScope| ApiError::bad_request(format!("scope: {e}")))?;
    if scope == Scope::Root {
        return Err(ApiError::bad_request("scope: root keys cannot be created through the API; use admin"));
    }
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_request("name: must be 1-200 characters"));
    }
    let workspace = body.workspace.unwrap_or_else(|| who.workspace.to_string());
    if workspace != who.workspace.as_str() {
        who.require_root().map_err(|_| ApiError::forbidden("only the root key can create keys in another workspace"))?;
    }
    let g = generate_key();
    let new = NewApiKey {
        id: new_key_id(),
        workspace: workspace.clone(),
        name: name.to_owned(),
        scope,
        key_hash: g.hash,
        prefix: g.prefix,
        created_by: Some(who.key_id.clone()),
    };
    let audit = sluice_store::NewAudit {
        workspace: workspace.clone(),
        ..who.audit("key.create", "key", &new.id, serde_json::json!({"name": new.name, "scope": new.scope.as_str(), "prefix": new.prefix}))
    };
    let key = st.store.create_key(&new, &audit).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("workspace {workspace:?} not found")),
        other => other.into(),
    })?;
    tracing::info!(key = %key.id, scope = %key.scope, workspace = %key.workspace, by = %who.key_id, "key created");
    let mut view = KeyView::from(key);
    view.secret = Some(g.secret);
    Ok((StatusCode::CREATED, Json(view)))
}

/// List live keys (never their secrets).
#[utoipa::path(get, path = "/v1/keys", params(KeyQuery), tag = "keys",
    responses((status = 200, description = "`{data: [Key], next_cursor}`"), (status = 403)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<KeyQuery>) -> Result<Json<List<KeyView>>, ApiError> {
    who.require_admin()?;
    let ws = if who.scope.is_root() {
        q.workspace
    } else {
        if q.workspace.as_deref().is_some_and(|w| w != who.workspace.as_str()) {
            return Err(ApiError::forbidden("an admin key can only list keys of its own workspace"));
        }
        Some(who.workspace.to_string())
    };
    let page = st.store.list_keys(ws.as_deref(), q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }))
}

/// Revoke a key. It stops working at once on this server.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    responses((status = 204), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn delete(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    let not_found = || ApiError::not_found(format!("key {id:?} not found"));
    let key = st.store.get_key(&id).await.map_err(|e| match e {
        StoreError::NotFound => not_found(),
        other => other.into(),
    })?;
    if !who.scope.is_root() && key.workspace != who.workspace.as_str() {
        return Err(not_found());
    }
    if key.scope == Scope::Root {
        if !who.scope.is_root() {
            return Err(ApiError::forbidden("only the root key can revoke a root key"));
        }
        if st.store.count_root_keys().await? <= 1 {
            return Err(ApiError::conflict("this is the last root key; it cannot be revoked"));
        }
    }
    let audit = sluice_store::NewAudit {
        workspace: key.workspace.clone(),
        ..who.audit("key.revoke", "key", &id, serde_json::json!({"name": key.name, "scope": key.scope.as_str()}))
    };
    st.store.revoke_key(&id, &audit).await.map_err(|e| match e {
        StoreError::NotFound => not_found(),
        other => other.into(),
    })?;
    st.keys.evict_key(&id);
    tracing::info!(key = %id, by = %who.key_id, "key revoked");
    Ok(StatusCode::NO_CONTENT)
}
