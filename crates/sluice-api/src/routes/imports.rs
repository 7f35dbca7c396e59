//! `/v1/imports`: CSV usage imports. The upload is streamed to a file
//! (bounded memory), then an `import.usage` job imports it; `?wait=true`
//! waits for small files so they take one round trip.

use std::time::Duration;

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_store::{Job, StoreError};
use tokio::io::AsyncWriteExt;

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// Largest upload, bytes (8 GiB).
pub const MAX_UPLOAD: u64 = 8 << 30;
/// How long `?wait=true` waits before answering 202.
pub const WAIT: Duration = Duration::from_secs(30);

/// `POST /v1/imports` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ImportQuery {
    /// `usage` (the only kind so far).
    pub kind: Option<String>,
    /// `strict` (default) or `skip_invalid`.
    pub mode: Option<String>,
    /// Wait (up to 30 s) for the import to finish.
    pub wait: Option<bool>,
}

/// An import as returned by the API (a view of its job).
pub fn view(j: &Job) -> Value {
    let r = j.result.clone().unwrap_or(Value::Null);
    let n = |k: &str| r.get(k).cloned().unwrap_or(json!(0));
    json!({
        "id": j.id,
        "kind": "usage",
        "status": j.state,
        "mode": j.payload["mode"],
        "filename": j.payload["filename"],
        "bytes": j.payload["bytes"],
        "rows_total": if r.is_null() { j.progress_total.map_or(Value::Null, Value::from) } else { n("rows_total") },
        "rows_processed": if r.is_null() { json!(j.progress_done) } else { n("rows_processed") },
        "rows_imported": n("rows_imported"),
        "rows_duplicate": n("rows_duplicate"),
        "rows_rejected": n("rows_rejected"),
        "errors": r.get("errors").cloned().unwrap_or(json!([])),
        "errors_total": n("errors_total"),
        "error": j.error,
        "created_at": rfc3339(j.created_at),
        "started_at": j.started_at.map(rfc3339),
        "finished_at": j.finished_at.map(rfc3339),
        "duration_ms": r.get("duration_ms").cloned().unwrap_or(Value::Null),
    })
}

/// Uploads a usage CSV (raw body, or multipart field `file`) and imports it
/// as a job: `202` with the import, or with `?wait=true` the finished import.
#[utoipa::path(post, path = "/v1/imports", params(ImportQuery), tag = "imports",
    request_body(content = String, content_type = "text/csv"),
    responses((status = 202, description = "the import (queued or running)"), (status = 200, description = "the finished import (wait=true)"),
        (status = 400), (status = 413)),
    security(("bearer" = [])))]
pub async fn create(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<ImportQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    if q.kind.as_deref().unwrap_or("usage") != "usage" {
        return Err(ApiError::bad_request("kind: only `usage` imports exist"));
    }
    let mode: sluice_metering::import::ImportMode = match q.mode.as_deref() {
        None => Default::default(),
        Some(m) => m.parse().map_err(|()| ApiError::bad_request("mode: must be strict or skip_invalid"))?,
    };
    tokio::fs::create_dir_all(&st.imports_dir).await.map_err(ApiError::internal)?;
    let path = st.imports_dir.join(format!("{}.csv", uuid::Uuid::now_v7().simple()));
    let multipart = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    let (bytes, filename) = if multipart {
        let mut mp = Multipart::from_request(req, &st).await.map_err(|e| ApiError::bad_request(format!("multipart: {}", e.body_text())))?;
        let mut found = None;
        while let Some(field) = mp.next_field().await.map_err(|e| ApiError::bad_request(format!("multipart: {e}")))? {
            if field.name() == Some("file") {
                let name = field.file_name().map(str::to_owned);
                found = Some((save(field, &path).await?, name));
                break;
            }
        }
        found.ok_or_else(|| ApiError::bad_request("multipart: no field named `file`"))?
    } else {
        (save(req.into_body().into_data_stream(), &path).await?, None)
    };
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_metering::import::KIND.into(),
            payload: sluice_jobs::JobPayload::to_value(&sluice_metering::import::ImportPayload { v: 1, file: path.clone(), mode, bytes, filename }),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    let audit = who.audit("import.create", "import", &job.id, json!({"bytes": bytes, "mode": mode}));
    super::record_audit(&st, &audit).await;
    if q.wait == Some(true) {
        let (j, ended) = super::jobs::wait_for(&st, who.workspace.as_str(), &job.id).await?;
        return Ok((if ended { StatusCode::OK } else { StatusCode::ACCEPTED }, Json(view(&j))));
    }
    Ok((StatusCode::ACCEPTED, Json(view(&job))))
}

async fn save<S, E>(stream: S, path: &std::path::Path) -> Result<u64, ApiError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>>,
    E: std::fmt::Display,
{
    let mut stream = std::pin::pin!(stream);
    let mut f = tokio::fs::File::create(path).await.map_err(ApiError::internal)?;
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("could not read the upload: {e}")))?;
        n += chunk.len() as u64;
        if n > MAX_UPLOAD {
            let _ = tokio::fs::remove_file(path).await;
            return Err(ApiError::too_large(format!("upload exceeds {MAX_UPLOAD} bytes")));
        }
        f.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    f.sync_all().await.map_err(ApiError::internal)?;
    if n == 0 {
        let _ = tokio::fs::remove_file(path).await;
        return Err(ApiError::bad_request("the upload is empty; send the CSV file as the body (or multipart field `file`)"));
    }
    Ok(n)
}

/// One import.
#[utoipa::path(get, path = "/v1/imports/{id}", tag = "imports", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let j = st.store.get_job(Some(who.workspace.as_str()), &id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("import {id:?} not found")),
        o => o.into(),
    })?;
    if j.kind != sluice_metering::import::KIND {
        return Err(ApiError::not_found(format!("import {id:?} not found")));
    }
    Ok(Json(view(&j)))
}

/// `GET /v1/imports` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ImportListQuery {
    /// Cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
    /// `asc` (oldest first, the default) or `desc` (newest first).
    pub order: Option<String>,
}

/// Imports of the workspace, oldest first (`order=desc`: newest first).
#[utoipa::path(get, path = "/v1/imports", params(ImportListQuery), tag = "imports", responses((status = 200)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<ImportListQuery>) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let order = super::jobs::sort_order(q.order.as_deref())?;
    let kind = Some(sluice_metering::import::KIND);
    let page = st.store.list_jobs_in(who.workspace.as_str(), kind, None, order, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.iter().map(view).collect(), next_cursor: page.next_cursor }))
}
