//! `/v1/jobs`: durable background work with state, progress, errors,
//! retries and cancellation; `GET /v1/jobs/{id}/events` streams progress as
//! Server-Sent Events until the job ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_store::{Job, StoreError};

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// Progress of a job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Units done.
    pub done: i64,
    /// Units in all, when known.
    pub total: Option<i64>,
    /// `done / total` in percent, when the total is known.
    pub percent: Option<f64>,
    /// Estimated seconds left, from the rate so far.
    pub eta_seconds: Option<f64>,
}

/// A job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    /// `job_…`.
    pub id: String,
    /// Kind, e.g. `consumer.reset`.
    pub kind: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// Input.
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Output, once succeeded.
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// Last error.
    pub error: Option<String>,
    /// Errors of every attempt.
    pub errors: Vec<String>,
    /// Progress.
    pub progress: Progress,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// A cancellation was asked for.
    pub cancel_requested: bool,
    /// RFC 3339.
    pub created_at: String,
    /// First start.
    pub started_at: Option<String>,
    /// End.
    pub finished_at: Option<String>,
    /// Last change.
    pub updated_at: String,
}

impl From<Job> for JobView {
    fn from(j: Job) -> Self {
        let percent = j.progress_total.filter(|t| *t > 0).map(|t| (j.progress_done as f64 * 100.0 / t as f64).min(100.0));
        let eta_seconds = match (j.progress_total, j.started_at, j.state) {
            (Some(t), Some(s), sluice_core::JobState::Running) if j.progress_done > 0 => {
                let elapsed = (chrono::Utc::now() - s).num_milliseconds().max(1) as f64 / 1000.0;
                Some(elapsed / j.progress_done as f64 * (t - j.progress_done).max(0) as f64)
            }
            _ => None,
        };
        JobView {
            id: j.id,
            kind: j.kind,
            status: j.state.as_str().to_owned(),
            payload: j.payload,
            result: j.result,
            error: j.error,
            errors: j.errors,
            progress: Progress { done: j.progress_done, total: j.progress_total, percent, eta_seconds },
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            cancel_requested: j.cancel_requested,
            created_at: rfc3339(j.created_at),
            started_at: j.started_at.map(rfc3339),
            finished_at: j.finished_at.map(rfc3339),
            updated_at: rfc3339(j.updated_at),
        }
    }
}

/// `?wait=true` of the endpoints that make a job: the job once it ended
/// (`true`), or as it is after [`super::imports::WAIT`] (`false`).
pub(crate) async fn wait_for(st: &AppState, ws: &str, id: &str) -> Result<(Job, bool), ApiError> {
    let deadline = std::time::Instant::now() + super::imports::WAIT;
    loop {
        let j = st.store.get_job(Some(ws), id).await?;
        if j.is_terminal() {
            return Ok((j, true));
        }
        if std::time::Instant::now() > deadline {
            return Ok((j, false));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `GET /v1/jobs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct JobQuery {
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
    /// Page size, 1–1000.
    pub limit: Option<usize>,
    /// `asc` (oldest first, the default) or `desc` (newest first).
    pub order: Option<String>,
}

/// The `order` parameter of a list: `asc` (default) or `desc`; anything
/// else is a 400 naming it.
pub(crate) fn sort_order(order: Option<&str>) -> Result<sluice_core::SortOrder, ApiError> {
    let order = order.map(str::parse).transpose().map_err(|e: sluice_core::UnknownSortOrder| ApiError::bad_request(format!("order: {e}")))?;
    Ok(order.unwrap_or(sluice_core::SortOrder::Asc))
}

fn not_found(id: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("job {id:?} not found")),
        other => other.into(),
    }
}

/// Jobs of the workspace, oldest first (`order=desc`: newest first).
#[utoipa::path(get, path = "/v1/jobs", params(JobQuery), tag = "jobs", responses((status = 200)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal, Query(q): Query<JobQuery>) -> Result<Json<List<JobView>>, ApiError> {
    who.require_read()?;
    // An unknown status is a 400 naming it (it used to match nothing).
    let status =
        q.status.as_deref().map(str::parse::<sluice_core::JobState>).transpose().map_err(|e| ApiError::bad_request(format!("status: {e}")))?;
    let order = sort_order(q.order.as_deref())?;
    let page = st.store.list_jobs_in(who.workspace.as_str(), q.kind.as_deref(), status, order, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }))
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", responses((status = 200, body = JobView), (status = 404)), security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    who.require_read()?;
    Ok(Json(st.store.get_job(Some(who.workspace.as_str()), &id).await.map_err(not_found(&id))?.into()))
}

/// Cancels a queued job at once, or asks a running one to stop.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", responses((status = 200, body = JobView), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn cancel(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    who.require_admin()?;
    let job = st.store.cancel_job(who.workspace.as_str(), &id).await.map_err(not_found(&id))?;
    audit(&st, &who, "job.cancel", &job).await;
    Ok(Json(job.into()))
}

/// Queues a failed or cancelled job again.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", responses((status = 200, body = JobView), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn retry(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    who.require_admin()?;
    let j = st.store.retry_job(who.workspace.as_str(), &id).await.map_err(not_found(&id))?;
    audit(&st, &who, "job.retry", &j).await;
    st.jobs.wake();
    Ok(Json(j.into()))
}

/// Most ids one bulk request may name: a request stays one short
/// transaction; more is a filter's job.
pub const MAX_BULK_IDS: usize = 1000;

/// The filter of a bulk cancel or retry: the dashboard's kind and status
/// filters (each optional; `{}` is every job of the workspace).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this status.
    pub status: Option<String>,
}

/// Body of `POST /v1/jobs/cancel` and `POST /v1/jobs/retry`: exactly one
/// of `ids` and `filter`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkJobsBody {
    /// These jobs (at most 1000).
    pub ids: Option<Vec<String>>,
    /// Every job matching this filter.
    pub filter: Option<BulkFilter>,
    /// Only count what would change: answers `{"matching": n}`.
    #[serde(default)]
    pub dry_run: bool,
}

/// A job a bulk operation left alone.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Skipped {
    /// `job_…` as given.
    pub id: String,
    /// Why (`not found`, or the job's status and the rule).
    pub reason: String,
}

/// The `ids` of a bulk request, each once in the order given: at least
/// one and at most [`MAX_BULK_IDS`], or a 400 naming the field.
pub(crate) fn bulk_ids(ids: Vec<String>) -> Result<Vec<String>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request("ids: give at least one id (or a filter)"));
    }
    if ids.len() > MAX_BULK_IDS {
        return Err(ApiError::bad_request(format!("ids: at most {MAX_BULK_IDS} ids per request ({} given); use a filter", ids.len())));
    }
    // A repeated id counts once and is not reported as skipped.
    let mut seen = std::collections::HashSet::new();
    Ok(ids.into_iter().filter(|id| seen.insert(id.clone())).collect())
}

/// The store's selection of a bulk body (exactly one of `ids` and
/// `filter`) and whether it is a dry run; a 400 naming the field otherwise.
fn selection(body: BulkJobsBody) -> Result<(sluice_store::JobSelection, bool), ApiError> {
    let sel = match (body.ids, body.filter) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("ids: give either `ids` or `filter`, not both")),
        (None, None) => return Err(ApiError::bad_request("ids: give `ids` (a list of job ids) or `filter` (kind, status)")),
        (Some(ids), None) => sluice_store::JobSelection::Ids(bulk_ids(ids)?),
        (None, Some(f)) => {
            let state = f
                .status
                .as_deref()
                .map(str::parse::<sluice_core::JobState>)
                .transpose()
                .map_err(|e| ApiError::bad_request(format!("filter.status: {e}")))?;
            sluice_store::JobSelection::Filter { kind: f.kind, state }
        }
    };
    Ok((sel, body.dry_run))
}

/// What the audit entry of a bulk operation records of its selection.
fn selection_details(sel: &sluice_store::JobSelection) -> Value {
    match sel {
        sluice_store::JobSelection::Ids(ids) => serde_json::json!({"ids": ids}),
        sluice_store::JobSelection::Filter { kind, state } => serde_json::json!({"filter": {"kind": kind, "status": state.map(|s| s.as_str())}}),
    }
}

fn bulk_answer(key: &str, done: sluice_store::BulkJobs) -> Value {
    let skipped: Vec<Skipped> = done.skipped.into_iter().map(|(id, reason)| Skipped { id, reason }).collect();
    serde_json::json!({ key: done.changed.len(), "skipped": skipped })
}

/// Cancels several jobs: `ids`, or every queued or running job matching
/// `filter`. With `dry_run`, only counts them.
#[utoipa::path(post, path = "/v1/jobs/cancel", request_body = BulkJobsBody, tag = "jobs",
    responses((status = 200, description = "`{\"cancelled\": n, \"skipped\": [{id, reason}]}`, or `{\"matching\": n}` for a dry run"),
        (status = 400), (status = 403)), security(("bearer" = [])))]
pub async fn cancel_bulk(State(st): State<AppState>, who: Principal, Json(body): Json<BulkJobsBody>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let (sel, dry_run) = selection(body)?;
    if dry_run {
        return Ok(Json(serde_json::json!({"matching": st.store.count_bulk_jobs(who.workspace.as_str(), &sel, true).await?})));
    }
    let a = who.audit("job.cancel_bulk", "job", "*", selection_details(&sel));
    let done = st.store.cancel_jobs(who.workspace.as_str(), &sel, &a).await?;
    Ok(Json(bulk_answer("cancelled", done)))
}

/// Queues several failed or cancelled jobs again: `ids`, or every one
/// matching `filter`. With `dry_run`, only counts them.
#[utoipa::path(post, path = "/v1/jobs/retry", request_body = BulkJobsBody, tag = "jobs",
    responses((status = 200, description = "`{\"retried\": n, \"skipped\": [{id, reason}]}`, or `{\"matching\": n}` for a dry run"),
        (status = 400), (status = 403)), security(("bearer" = [])))]
pub async fn retry_bulk(State(st): State<AppState>, who: Principal, Json(body): Json<BulkJobsBody>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let (sel, dry_run) = selection(body)?;
    if dry_run {
        return Ok(Json(serde_json::json!({"matching": st.store.count_bulk_jobs(who.workspace.as_str(), &sel, false).await?})));
    }
    let a = who.audit("job.retry_bulk", "job", "*", selection_details(&sel));
    let done = st.store.retry_jobs(who.workspace.as_str(), &sel, &a).await?;
    if !done.changed.is_empty() {
        st.jobs.wake();
    }
    Ok(Json(bulk_answer("retried", done)))
}

/// Records a job operation in the audit log. It is written right after the
/// change (not in its transaction); a failure to write it is logged.
async fn audit(st: &AppState, who: &Principal, action: &str, job: &Job) {
    let entry = who.audit(action, "job", &job.id, serde_json::json!({"kind": job.kind, "status": job.state}));
    super::record_audit(st, &entry).await;
}

/// Server-Sent Events: a `progress` event whenever the job changes, then
/// one `end` event with the final job, then the stream closes.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", responses((status = 200, content_type = "text/event-stream")), security(("bearer" = [])))]
pub async fn events(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    who.require_read()?;
    let ws = who.workspace.to_string();
    st.store.get_job(Some(&ws), &id).await.map_err(not_found(&id))?;
    let store = st.store.clone();
    let stream = futures::stream::unfold((None::<chrono::DateTime<chrono::Utc>>, false), move |(last, ended)| {
        let (store, ws, id) = (store.clone(), ws.clone(), id.clone());
        async move {
            if ended {
                return None;
            }
            loop {
                let Ok(job) = store.get_job(Some(&ws), &id).await else {
                    return Some((Ok(Event::default().event("end").data("{}")), (last, true)));
                };
                let terminal = job.is_terminal();
                if last != Some(job.updated_at) || terminal {
                    let at = job.updated_at;
                    let data = serde_json::to_string(&JobView::from(job)).unwrap_or_default();
                    let kind = if terminal { "end" } else { "progress" };
                    return Some((Ok(Event::default().event(kind).data(data)), (Some(at), terminal)));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
