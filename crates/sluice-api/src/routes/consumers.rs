//! `/v1/consumers`, `/v1/dlq` and `/v1/event-counts`: operating consumers.
//!
//! Consumers are shared by all workspaces (one log). Every key with read
//! scope sees the built-in consumers and its own workspace's webhook
//! consumers; dead letters are per workspace. Resetting the built-in
//! `event_counts` consumer rebuilds a read model of every workspace, so it
//! needs the root key; an admin key may reset its own webhooks' consumers.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_store::{DeadLetter, DeadLetterFilter, DeadLetterStatus, NewAudit, StoreError};

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// One partition of a consumer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionView {
    /// Partition number.
    pub partition: u32,
    /// Next offset the consumer will process.
    pub checkpoint: u64,
    /// Next offset the log will assign.
    pub end_offset: u64,
    /// Records not yet processed.
    pub lag: u64,
}

/// A consumer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsumerView {
    /// Name (`event_counts`, `webhook:<id>`).
    pub name: String,
    /// `running`, `retrying` or `stopped`.
    pub status: String,
    /// Most recent error (shown when it concerns the key's workspace, or to
    /// a root key: an error of another workspace's event is not shown).
    pub last_error: Option<String>,
    /// Total lag over partitions.
    pub lag: u64,
    /// Dead letters waiting (status `dead`) in the key's workspace.
    pub dlq_size: i64,
    /// Times a worker of this consumer crashed and was restarted since the
    /// server started (a failing event never restarts it: it is
    /// dead-lettered).
    pub restarts: u64,
    /// When a worker was last restarted.
    pub last_restart_at: Option<String>,
    /// A worker was restarted in the last 5 minutes (also in `/readyz`).
    pub restarting: bool,
    /// Per partition checkpoint and lag.
    pub partitions: Vec<PartitionView>,
}

async fn owns_webhook(st: &AppState, who: &Principal, name: &str) -> Result<bool, ApiError> {
    match name.strip_prefix("webhook:") {
        None => Ok(true),
        Some(id) => Ok(who.scope.is_root() || st.store.get_webhook(who.workspace.as_str(), id).await.is_ok()),
    }
}

/// Consumers with per-partition checkpoint and lag, status and DLQ size.
#[utoipa::path(get, path = "/v1/consumers", tag = "consumers",
    responses((status = 200, description = "`{data: [Consumer], next_cursor: null}`")), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal) -> Result<Json<List<ConsumerView>>, ApiError> {
    who.require_read()?;
    let dlq = st.store.dead_letter_counts(Some(who.workspace.as_str())).await?;
    let log = st.consumers.log().clone();
    let mut out = Vec::new();
    for (name, state) in st.consumers.states() {
        // Webhook consumers are visible to their own workspace (and root).
        if !owns_webhook(&st, &who, &name).await? {
            continue;
        }
        let partitions = partition_views(&*log, &st.store.checkpoints(&name).await?);
        let visible = who.scope.is_root() || state.last_error_workspace.as_deref().is_none_or(|w| w == who.workspace.as_str());
        out.push(ConsumerView {
            lag: partitions.iter().map(|p| p.lag).sum(),
            dlq_size: dlq.get(&name).copied().unwrap_or(0),
            name,
            status: state.status.to_string(),
            last_error: if visible { state.last_error.clone() } else { Some("an event of another workspace failed".into()) },
            restarts: state.restarts,
            last_restart_at: state.last_restart_at.map(super::rfc3339),
            restarting: state.restarted_recently(),
            partitions,
        });
    }
    if st.lake.is_some() {
        // The lake writer keeps checkpoints like a consumer (moved with each
        // file commit), so its lag is shown the same way.
        let partitions = partition_views(&*log, &st.store.checkpoints(sluice_lake::writer::CHECKPOINT).await?);
        out.push(ConsumerView {
            lag: partitions.iter().map(|p| p.lag).sum(),
            dlq_size: 0,
            name: sluice_lake::writer::CHECKPOINT.to_owned(),
            status: "running".into(),
            last_error: None,
            restarts: 0,
            last_restart_at: None,
            restarting: false,
            partitions,
        });
    }
    Ok(Json(List { data: out, next_cursor: None }))
}

/// Checkpoint, end and lag of every partition for a consumer's checkpoints.
pub(crate) fn partition_views(log: &dyn sluice_core::EventLog, cps: &std::collections::HashMap<u32, u64>) -> Vec<PartitionView> {
    (0..log.partitions())
        .map(|p| {
            let end = log.next_offset(p);
            // No checkpoint yet: nothing processed since the start of the log.
            let cp = cps.get(&p).copied().unwrap_or_else(|| log.start_offset(p));
            PartitionView { partition: p, checkpoint: cp, end_offset: end, lag: end.saturating_sub(cp) }
        })
        .collect()
}

/// Body of a reset.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    /// `earliest`, `latest` or an RFC 3339 time.
    pub to: String,
}

/// Moves a consumer's checkpoints. Resetting `event_counts` clears its read
/// model and rebuilds it from the new position (root key).
#[utoipa::path(post, path = "/v1/consumers/{name}/reset", request_body = ResetBody, tag = "consumers",
    responses((status = 200), (status = 400), (status = 403), (status = 404)), security(("bearer" = [])))]
pub async fn reset(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    Json(body): Json<ResetBody>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    if let Some(why) = st.consumers.refuses_reset(&name) {
        return Err(ApiError::conflict(why));
    }
    if !name.starts_with("webhook:") {
        who.require_root().map_err(|_| ApiError::forbidden(format!("resetting {name:?} rebuilds data of every workspace; it needs the root key")))?;
    }
    if !owns_webhook(&st, &who, &name).await? {
        return Err(ApiError::not_found(format!("consumer {name:?} not found")));
    }
    let audit = who.audit("consumer.reset", "consumer", &name, json!({"to": body.to}));
    let log = st.consumers.log().clone();
    let done = st.consumers.reset(&name, &body.to, &audit).await.map_err(|e| match e {
        sluice_consumers::RuntimeError::NoSuchConsumer(_) => ApiError::not_found(format!("consumer {name:?} not found")),
        sluice_consumers::RuntimeError::BadPosition => ApiError::bad_request(format!("to: {e}")),
        sluice_consumers::RuntimeError::NotResettable(why) => ApiError::conflict(why),
        other => ApiError::internal(other),
    })?;
    tracing::info!(consumer = %name, to = %body.to, by = %who.key_id, "consumer reset");
    // A job follows the rebuild, so its progress is visible in /v1/jobs.
    let until: Vec<(u32, u64)> = (0..log.partitions()).map(|p| (p, log.next_offset(p))).collect();
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_consumers::rebuild::KIND.into(),
            payload: sluice_consumers::rebuild::payload(&name, &body.to, &done.positions, &until),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    Ok(Json(json!({
        "name": name,
        "to": body.to,
        "job": job.id,
        "cleared_read_model": done.cleared,
        "partitions": done.positions.iter().map(|(p, o)| json!({"partition": p, "checkpoint": o})).collect::<Vec<_>>(),
    })))
}

/// A dead letter.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    /// `dlq_…`.
    pub id: String,
    /// Consumer that gave up.
    pub consumer: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Log partition.
    pub partition: u32,
    /// Log offset.
    pub offset: u64,
    /// Last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// First failure (RFC 3339).
    pub first_failed_at: String,
    /// Last failure.
    pub last_failed_at: String,
    /// `dead`, `replaying`, `replayed` or `discarded`.
    pub status: String,
    /// The event (single reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub event: Option<Value>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            id: d.id,
            consumer: d.consumer,
            event_id: d.event_id,
            event_type: d.event_type,
            partition: d.partition,
            offset: d.offset,
            error: d.error,
            attempts: d.attempts,
            first_failed_at: rfc3339(d.first_failed_at),
            last_failed_at: rfc3339(d.last_failed_at),
            status: d.status.to_string(),
            event: None,
        }
    }
}

/// `GET /v1/dlq` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DlqQuery {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this status (`dead`, `replaying`, `replayed`, `discarded`); default all.
    pub status: Option<String>,
    /// Only this event type (also accepted as `type`).
    #[serde(alias = "type")]
    pub event_type: Option<String>,
    /// Only entries whose error contains this text, case-insensitive (also
    /// accepted as `error_contains`).
    #[serde(alias = "error_contains")]
    pub error: Option<String>,
    /// `asc` (oldest first, the default) or `desc` (newest first).
    pub order: Option<String>,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
    /// Page size, 1–1000.
    pub limit: Option<usize>,
}

/// Dead letters of the key's workspace, oldest first (`order=desc`: newest
/// first), filtered like a bulk replay or discard.
#[utoipa::path(get, path = "/v1/dlq", params(DlqQuery), tag = "consumers",
    responses((status = 200, description = "`{data: [DeadLetter], next_cursor}`")), security(("bearer" = [])))]
pub async fn dlq_list(State(st): State<AppState>, who: Principal, Query(q): Query<DlqQuery>) -> Result<Json<List<DeadLetterView>>, ApiError> {
    who.require_read()?;
    let order = super::jobs::sort_order(q.order.as_deref())?;
    // Empty texts are filters not given (as in `POST /v1/dlq/bulk`).
    let given = |s: Option<String>| s.filter(|s| !s.is_empty());
    let f = DeadLetterFilter { ids: None, consumer: q.consumer, event_type: given(q.event_type), error_contains: given(q.error) };
    let status = match given(q.status) {
        Some(s) => Some(s.parse::<DeadLetterStatus>().map_err(|e| ApiError::bad_request(format!("status: {e}")))?),
        None => None,
    };
    let page = st.store.list_dead_letters_where(who.workspace.as_str(), &f, status, order, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }))
}

fn dlq_not_found(id: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("dead letter {id:?} not found")),
        other => other.into(),
    }
}

/// One dead letter, with its event.
#[utoipa::path(get, path = "/v1/dlq/{id}", tag = "consumers",
    responses((status = 200, body = DeadLetterView), (status = 404)), security(("bearer" = [])))]
pub async fn dlq_get(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<DeadLetterView>, ApiError> {
    who.require_read()?;
    let d = st.store.get_dead_letter(who.workspace.as_str(), &id).await.map_err(dlq_not_found(&id))?;
    let event = sluice_core::fetch_event(st.log.as_ref(), "dlq_api", d.partition, d.offset, &d.event_id)
        .await
        .ok()
        .flatten()
        .and_then(|e| serde_json::to_value(e).ok());
    let mut view = DeadLetterView::from(d);
    view.event = event;
    Ok(Json(view))
}

fn audit(who: &Principal, action: &str, target: &str, details: Value) -> NewAudit {
    who.audit(action, "dead_letter", target, details)
}

/// Replays one dead letter through its consumer (status `dead` → `replaying`).
#[utoipa::path(post, path = "/v1/dlq/{id}/replay", tag = "consumers",
    responses((status = 202, body = DeadLetterView), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn dlq_replay(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<(StatusCode, Json<DeadLetterView>), ApiError> {
    who.require_admin()?;
    let d = st.store.get_dead_letter(who.workspace.as_str(), &id).await.map_err(dlq_not_found(&id))?;
    let a = audit(&who, "dlq.replay", &id, json!({"consumer": d.consumer, "event_id": d.event_id}));
    let n = st.store.claim_replays(who.workspace.as_str(), Some(&id), None, None, None, &a).await?;
    if n == 0 {
        return Err(ApiError::conflict(format!("dead letter {id:?} is {}; only `dead` entries can be replayed", d.status)));
    }
    let d = st.store.get_dead_letter(who.workspace.as_str(), &id).await?;
    Ok((StatusCode::ACCEPTED, Json(d.into())))
}

/// Body of a bulk replay: every filter is optional; all must match.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkReplay {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this event type (also accepted as `type`).
    #[serde(alias = "type")]
    pub event_type: Option<String>,
    /// Only entries whose error contains this text (also accepted as
    /// `error_contains`).
    #[serde(alias = "error_contains")]
    pub error: Option<String>,
}

/// Replays every waiting dead letter that matches the filter.
#[utoipa::path(post, path = "/v1/dlq/replay", request_body = BulkReplay, tag = "consumers",
    responses((status = 202, description = "`{\"replaying\": n}`")), security(("bearer" = [])))]
pub async fn dlq_replay_bulk(State(st): State<AppState>, who: Principal, Json(f): Json<BulkReplay>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let a = audit(&who, "dlq.replay_bulk", "*", json!({"consumer": f.consumer, "event_type": f.event_type, "error": f.error}));
    let n = st.store.claim_replays(who.workspace.as_str(), None, f.consumer.as_deref(), f.event_type.as_deref(), f.error.as_deref(), &a).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"replaying": n}))))
}

/// Body of `POST /v1/dlq/bulk`: what to do, and to which waiting (`dead`)
/// entries; every filter given must match.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DlqBulk {
    /// `replay` or `discard`.
    pub action: String,
    /// Only these entries (at most 1000).
    pub ids: Option<Vec<String>>,
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this event type (also accepted as `type`).
    #[serde(alias = "type")]
    pub event_type: Option<String>,
    /// Only entries whose error contains this text (also accepted as
    /// `error_contains`).
    #[serde(alias = "error_contains")]
    pub error: Option<String>,
    /// Only count the matching entries: answers `{"matching": n}`.
    #[serde(default)]
    pub dry_run: bool,
}

/// Replays or discards every waiting dead letter that matches, as a
/// `dlq.bulk` job with progress (`GET /v1/jobs/{id}`); with `dry_run`,
/// only counts them.
#[utoipa::path(post, path = "/v1/dlq/bulk", request_body = DlqBulk, tag = "consumers",
    responses((status = 202, description = "`{\"job\": Job, \"matching\": n}`"), (status = 200, description = "`{\"matching\": n}` (dry run)"),
        (status = 400), (status = 403)), security(("bearer" = [])))]
pub async fn dlq_bulk(State(st): State<AppState>, who: Principal, Json(b): Json<DlqBulk>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let action = match b.action.as_str() {
        "replay" => sluice_consumers::dlq_bulk::Action::Replay,
        "discard" => sluice_consumers::dlq_bulk::Action::Discard,
        other => return Err(ApiError::bad_request(format!("action: expected `replay` or `discard`, got {other:?}"))),
    };
    let ids = b.ids.map(super::jobs::bulk_ids).transpose()?;
    // An empty filter text would match everything: treat it as not given,
    // as the dashboard's empty inputs mean.
    let given = |s: Option<String>| s.filter(|s| !s.is_empty());
    let payload = sluice_consumers::dlq_bulk::BulkPayload {
        v: 1,
        action,
        ids,
        consumer: given(b.consumer),
        event_type: given(b.event_type),
        error: given(b.error),
        matching: 0,
    };
    let matching = st.store.count_dead_letters(who.workspace.as_str(), &payload.filter()).await?;
    if b.dry_run {
        return Ok((StatusCode::OK, Json(json!({"matching": matching}))));
    }
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_consumers::dlq_bulk::KIND.into(),
            payload: sluice_jobs::JobPayload::to_value(&sluice_consumers::dlq_bulk::BulkPayload { matching, ..payload }),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    tracing::info!(job = %job.id, action = %b.action, matching, by = %who.key_id, "bulk dead-letter job queued");
    let job = serde_json::to_value(super::jobs::JobView::from(job)).map_err(ApiError::internal)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job, "matching": matching}))))
}

/// Discards a dead letter (it will not be processed).
#[utoipa::path(post, path = "/v1/dlq/{id}/discard", tag = "consumers",
    responses((status = 200, body = DeadLetterView), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn dlq_discard(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<DeadLetterView>, ApiError> {
    who.require_admin()?;
    let d = st.store.get_dead_letter(who.workspace.as_str(), &id).await.map_err(dlq_not_found(&id))?;
    let a = audit(&who, "dlq.discard", &id, json!({"consumer": d.consumer, "event_id": d.event_id}));
    st.store.discard_dead_letter(who.workspace.as_str(), &id, &a).await?;
    let d = st.store.get_dead_letter(who.workspace.as_str(), &id).await?;
    Ok(Json(d.into()))
}

/// `GET /v1/event-counts` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CountsQuery {
    /// Only this event type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Only this customer (`""` for events without one).
    pub customer_id: Option<String>,
}

/// The event_counts read model: events per type, customer and UTC day.
#[utoipa::path(get, path = "/v1/event-counts", params(CountsQuery), tag = "consumers",
    responses((status = 200, description = "`{data: [{type, customer_id, day, count}], total}`")), security(("bearer" = [])))]
pub async fn event_counts(State(st): State<AppState>, who: Principal, Query(q): Query<CountsQuery>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let rows = st.store.event_counts(who.workspace.as_str(), q.event_type.as_deref(), q.customer_id.as_deref()).await?;
    let total: i64 = rows.iter().map(|r| r.3).sum();
    let data: Vec<Value> = rows
        .into_iter()
        .map(|(t, c, d, n)| json!({"type": t, "customer_id": if c.is_empty() { Value::Null } else { Value::String(c) }, "day": d, "count": n}))
        .collect();
    Ok(Json(json!({"data": data, "next_cursor": null, "total": total})))
}
