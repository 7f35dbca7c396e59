//! `/v1/webhooks`: signed deliveries of events to HTTP endpoints.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_consumers::webhooks::{consumer_name, sign, ssrf, WebhookConsumer};
use sluice_store::{Delivery, StoreError, Webhook};

use super::{rfc3339, List, PageQuery};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// Body of `POST /v1/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http://` or `https://` URL. Loopback, private, link-local and metadata
    /// addresses are refused unless `SLUICE_WEBHOOK_ALLOW_PRIVATE=1`.
    pub url: String,
    /// Event types to deliver; `["*"]` for all.
    pub event_types: Vec<String>,
}

/// A webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    /// `wh_…`.
    pub id: String,
    /// Target URL.
    pub url: String,
    /// Event types delivered.
    pub event_types: Vec<String>,
    /// Its consumer (see `/v1/consumers`).
    pub consumer: String,
    /// RFC 3339.
    pub created_at: String,
    /// The signing secret (`whsec_…`): only in the creation response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl From<Webhook> for WebhookView {
    fn from(w: Webhook) -> Self {
        WebhookView {
            consumer: consumer_name(&w.id),
            id: w.id,
            url: w.url,
            event_types: w.event_types,
            created_at: rfc3339(w.created_at),
            secret: None,
        }
    }
}

/// Registers a webhook; the response carries the signing secret, once.
#[utoipa::path(post, path = "/v1/webhooks", request_body = CreateWebhook, tag = "webhooks",
    responses((status = 201, body = WebhookView), (status = 400), (status = 409), (status = 422)), security(("bearer" = [])))]
pub async fn create(
    State(st): State<AppState>,
    who: Principal,
    Json(body): Json<CreateWebhook>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
    who.require_admin()?;
    if body.event_types.is_empty() {
        return Err(ApiError::bad_request("event_types: list at least one event type, or \"*\" for all"));
    }
    if let Some(t) = body.event_types.iter().find(|t| t.is_empty() || t.len() > 128) {
        return Err(ApiError::bad_request(format!("event_types: {t:?} is not an event type")));
    }
    let existing = st.store.list_webhooks(Some(who.workspace.as_str())).await?.len();
    crate::ApiLimits::check(existing, st.limits.workspace.webhooks, "webhooks", "limits.webhooks")?;
    let allow = st.webhooks.allow_private;
    let url =
        ssrf::check_url(&body.url, allow).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "forbidden_target", format!("url: {e}")))?;
    ssrf::check_resolved(&url, allow).await.map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "forbidden_target", format!("url: {e}")))?;
    let hook = Webhook {
        id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
        workspace: who.workspace.to_string(),
        url: url.to_string(),
        event_types: body.event_types,
        secret: sign::generate_secret(),
        created_at: chrono::Utc::now(),
    };
    let audit = who.audit("webhook.create", "webhook", &hook.id, json!({"url": hook.url, "event_types": hook.event_types}));
    // The consumer starts at the log's end as of now, recorded with the
    // webhook: every event accepted after this response is delivered.
    let log = st.consumers.log();
    let start: Vec<(u32, u64)> = (0..log.partitions()).map(|p| (p, log.next_offset(p))).collect();
    st.store.create_webhook(&hook, &consumer_name(&hook.id), &start, &who.key_id, &audit).await?;
    start_webhook(&st, hook.clone());
    let mut view = WebhookView::from(hook.clone());
    view.secret = Some(hook.secret);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Starts the consumer of a webhook.
pub fn start_webhook(st: &AppState, hook: Webhook) {
    let w = st.webhooks;
    st.consumers.start(std::sync::Arc::new(WebhookConsumer::new(hook, st.store.clone(), w.allow_private, w.timeout, w.retry)));
}

/// Webhooks of the workspace (without secrets).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", responses((status = 200)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal) -> Result<Json<List<WebhookView>>, ApiError> {
    who.require_read()?;
    let hooks = st.store.list_webhooks(Some(who.workspace.as_str())).await?;
    Ok(Json(List { data: hooks.into_iter().map(Into::into).collect(), next_cursor: None }))
}

fn not_found(id: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("webhook {id:?} not found")),
        other => other.into(),
    }
}

/// Deletes a webhook; its deliveries stop.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub async fn delete(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    let audit = who.audit("webhook.delete", "webhook", &id, json!({}));
    st.store.delete_webhook(who.workspace.as_str(), &id, &audit).await.map_err(not_found(&id))?;
    st.consumers.stop(&consumer_name(&id)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A delivery and its attempts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// The `webhook-id` header (stable across retries).
    pub id: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// `retrying`, `succeeded` or `dead` (then in the dead-letter queue).
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last attempt.
    pub status_code: Option<i32>,
    /// Error of the last attempt.
    pub error: Option<String>,
    /// When the next attempt is due.
    pub next_retry_at: Option<String>,
    /// First attempt.
    pub created_at: String,
    /// Last attempt.
    pub updated_at: String,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        DeliveryView {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            status: d.status.to_string(),
            attempts: d.attempts,
            status_code: d.last_status_code,
            error: d.last_error,
            next_retry_at: d.next_retry_at.map(rfc3339),
            created_at: rfc3339(d.created_at),
            updated_at: rfc3339(d.updated_at),
        }
    }
}

/// Deliveries of a webhook, oldest first.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", params(PageQuery), tag = "webhooks",
    responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn deliveries(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<List<DeliveryView>>, ApiError> {
    who.require_read()?;
    st.store.get_webhook(who.workspace.as_str(), &id).await.map_err(not_found(&id))?;
    let page = st.store.list_deliveries(&id, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(Into::into).collect(), next_cursor: page.next_cursor }))
}
