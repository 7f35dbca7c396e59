//! `/v1/workspaces`: the root key creates workspaces; other keys see their own.

use std::str::FromStr;

use crate::json::Query;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_core::WorkspaceName;
use sluice_store::Workspace;

use super::{rfc3339, List, PageQuery};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

/// Body of `POST /v1/workspaces`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    /// 1–64 of `a-z 0-9 - _`, starting with a letter or digit; immutable.
    pub name: String,
    /// IANA time zone, e.g. `Asia/Tokyo`. Default `UTC`.
    pub time_zone: Option<String>,
}

/// A workspace.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkspaceView {
    /// Name (the identifier).
    pub name: String,
    /// IANA time zone used for period boundaries.
    pub time_zone: String,
    /// RFC 3339.
    pub created_at: String,
    /// Billing settings (`GET /v1/workspaces/{name}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub billing: Option<sluice_billing::BillingSettings>,
}

impl From<Workspace> for WorkspaceView {
    fn from(w: Workspace) -> Self {
        WorkspaceView { name: w.name, time_zone: w.time_zone, created_at: rfc3339(w.created_at), billing: None }
    }
}

/// Create a workspace (root key only).
#[utoipa::path(post, path = "/v1/workspaces", request_body = CreateWorkspace, tag = "workspaces",
    responses((status = 201, body = WorkspaceView), (status = 400), (status = 403), (status = 409)),
    security(("bearer" = [])))]
pub async fn create(
    State(st): State<AppState>,
    who: Principal,
    Json(body): Json<CreateWorkspace>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    who.require_root()?;
    let name = WorkspaceName::parse(body.name.clone()).map_err(|e| ApiError::bad_request(format!("name {:?} {}", body.name, e.0)))?;
    let tz = body.time_zone.unwrap_or_else(|| "UTC".to_owned());
    chrono_tz::Tz::from_str(&tz)
        .map_err(|_| ApiError::bad_request(format!("time_zone {tz:?} is not an IANA time zone name such as \"Asia/Tokyo\" or \"UTC\"")))?;
    let audit = who.audit("workspace.create", "workspace", name.to_string(), serde_json::json!({"time_zone": tz}));
    let ws = st.store.create_workspace(name.as_str(), &tz, &audit).await?;
    tracing::info!(workspace = %ws.name, by = %who.key_id, "workspace created");
    Ok((StatusCode::CREATED, Json(ws.into())))
}

/// List workspaces: all for the root key, the key's own for any other key.
#[utoipa::path(get, path = "/v1/workspaces", params(PageQuery), tag = "workspaces",
    responses((status = 200, description = "`{data: [Workspace], next_cursor}`")), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<PageQuery>) -> Result<Json<List<WorkspaceView>>, ApiError> {
    if who.scope.is_root() {
        let page = st.store.list_workspaces(q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
        return Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }));
    }
    who.require_read()?;
    let own = st.store.get_workspace(who.workspace.as_str()).await?;
    Ok(Json(List { data: vec![own.into()], next_cursor: None }))
}

/// One workspace. Keys other than root only see their own.
#[utoipa::path(get, path = "/v1/workspaces/{name}", tag = "workspaces",
    responses((status = 200, body = WorkspaceView), (status = 404)), security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Path(name): Path<String>) -> Result<Json<WorkspaceView>, ApiError> {
    if !who.scope.is_root() {
        who.require_read()?;
        if name != who.workspace.as_str() {
            return Err(ApiError::not_found(format!("workspace {name:?} not found")));
        }
    }
    let ws = st.store.get_workspace(&name).await.map_err(|e| match e {
        sluice_store::StoreError::NotFound => ApiError::not_found(format!("workspace {name:?} not found")),
        other => other.into(),
    })?;
    let mut view = WorkspaceView::from(ws);
    view.billing = Some(st.billing.settings(&name).await?);
    Ok(Json(view))
}
