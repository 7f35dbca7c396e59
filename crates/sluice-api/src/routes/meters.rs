//! `/v1/meters`: meter definitions and usage queries.

use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sluice_metering::usage::{Granularity, UsageQuery};
use sluice_metering::{consumer, MeterSpec, MetersConsumer};
use sluice_store::{Meter, StoreError};

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

/// Body of `POST /v1/meters`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMeter {
    /// Key: 1–64 of `A-Z a-z 0-9 _ - .`.
    pub key: String,
    /// Event type to meter.
    pub event_type: String,
    /// `sum`, `count`, `unique_count`, `max`, `min` or `latest`.
    pub aggregation: String,
    /// Dot path in `properties` (not for `count`).
    pub value_property: Option<String>,
    /// Property paths to group usage by.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Property equalities an event must match.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: Map<String, Value>,
}

/// A meter.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MeterView {
    /// Key.
    pub key: String,
    /// Event type.
    pub event_type: String,
    /// Aggregation.
    pub aggregation: String,
    /// Value path.
    pub value_property: Option<String>,
    /// Group-by paths.
    pub group_by: Vec<String>,
    /// Filter.
    #[schema(value_type = Object)]
    pub filter: Map<String, Value>,
    /// RFC 3339.
    pub created_at: String,
    /// The job that applies the meter to events from before its creation
    /// (only in the creation response).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill_job: Option<String>,
}

impl From<Meter> for MeterView {
    fn from(m: Meter) -> Self {
        MeterView {
            key: m.key,
            event_type: m.event_type,
            aggregation: m.aggregation.as_str().to_owned(),
            value_property: m.value_property,
            group_by: m.group_by,
            filter: m.filter,
            created_at: rfc3339(m.created_at),
            backfill_job: None,
        }
    }
}

/// Creates a meter. It counts new events at once; a `meter.backfill` job
/// applies it to the events already in the log.
#[utoipa::path(post, path = "/v1/meters", request_body = CreateMeter, tag = "meters",
    responses((status = 201, body = MeterView), (status = 400), (status = 409)), security(("bearer" = [])))]
pub async fn create(State(st): State<AppState>, who: Principal, Json(b): Json<CreateMeter>) -> Result<(StatusCode, Json<MeterView>), ApiError> {
    who.require_admin()?;
    // Parsed here, not by serde: the error names the field like every other
    // meter error.
    let aggregation: sluice_core::Aggregation = b.aggregation.parse().map_err(|_| {
        let reason = "must be one of sum, count, unique_count, max, min, latest";
        ApiError::bad_request(format!("aggregation: {reason}")).with_details(vec![json!({"field": "aggregation", "reason": reason})])
    })?;
    let spec =
        MeterSpec { key: b.key, event_type: b.event_type, aggregation, value_property: b.value_property, group_by: b.group_by, filter: b.filter };
    sluice_metering::validate(&spec).map_err(|(field, reason)| {
        ApiError::bad_request(format!("{field}: {reason}")).with_details(vec![json!({"field": field, "reason": reason})])
    })?;
    let existing = st.store.list_meters(Some(who.workspace.as_str())).await?.len();
    crate::ApiLimits::check(existing, st.limits.workspace.meters, "meters", "limits.meters")?;
    // Pause the meters consumer so that its position is exact: events from
    // there on are metered live, events before it by the backfill job.
    st.consumers.stop(consumer::NAME).await;
    let started = async {
        let cps = st.store.checkpoints(consumer::NAME).await?;
        let log = st.consumers.log();
        let start: Vec<(u32, u64)> = (0..log.partitions()).map(|p| (p, cps.get(&p).copied().unwrap_or(0))).collect();
        let m = Meter {
            workspace: who.workspace.to_string(),
            key: spec.key.clone(),
            event_type: spec.event_type.clone(),
            aggregation: spec.aggregation,
            value_property: spec.value_property.clone(),
            group_by: spec.group_by.clone(),
            filter: spec.filter.clone(),
            start_offsets: start,
            created_at: chrono::Utc::now(),
        };
        let audit = who.audit("meter.create", "meter", &m.key, json!({"event_type": m.event_type, "aggregation": m.aggregation}));
        st.store.create_meter(&m, &who.key_id, &audit).await?;
        st.meters.add(m.clone());
        Ok::<Meter, StoreError>(m)
    }
    .await;
    st.consumers.start(std::sync::Arc::new(MetersConsumer { cache: st.meters.clone() }));
    let m = started?;
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_metering::backfill::KIND.into(),
            payload: sluice_jobs::JobPayload::to_value(&sluice_metering::backfill::BackfillPayload {
                v: 1,
                workspace: who.workspace.clone(),
                meter: m.key.clone(),
            }),
            max_attempts: 5,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    let mut view = MeterView::from(m);
    view.backfill_job = Some(job.id);
    Ok((StatusCode::CREATED, Json(view)))
}

/// Meters of the workspace.
#[utoipa::path(get, path = "/v1/meters", tag = "meters", responses((status = 200)), security(("bearer" = [])))]
pub async fn list(State(st): State<AppState>, who: Principal) -> Result<Json<List<MeterView>>, ApiError> {
    who.require_read()?;
    let meters = st.store.list_meters(Some(who.workspace.as_str())).await?;
    Ok(Json(List { data: meters.into_iter().map(Into::into).collect(), next_cursor: None }))
}

fn not_found(key: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("meter {key:?} not found")),
        other => other.into(),
    }
}

/// One meter.
#[utoipa::path(get, path = "/v1/meters/{key}", tag = "meters", responses((status = 200, body = MeterView), (status = 404)), security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Path(key): Path<String>) -> Result<Json<MeterView>, ApiError> {
    who.require_read()?;
    Ok(Json(st.store.get_meter(who.workspace.as_str(), &key).await.map_err(not_found(&key))?.into()))
}

/// `GET /v1/meters/{key}/usage` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UsageParams {
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Only this subscription.
    pub subscription_id: Option<String>,
    /// From (RFC 3339, inclusive).
    pub from: Option<String>,
    /// To (RFC 3339, exclusive).
    pub to: Option<String>,
    /// `hour`, `day`, `month` (of the workspace time zone) or `total` (default).
    pub granularity: Option<String>,
    /// Comma-separated group-by paths of the meter to break usage down by.
    pub group_by: Option<String>,
}

/// Usage of a meter per customer, subscription, period (and group). Values
/// are exact decimals as JSON strings.
#[utoipa::path(get, path = "/v1/meters/{key}/usage", params(UsageParams), tag = "meters",
    responses((status = 200, description = "`{data: [{customer_id, subscription_id, period_start, period_end, value, group}]}`"), (status = 400), (status = 404)),
    security(("bearer" = [])))]
pub async fn usage(
    State(st): State<AppState>,
    who: Principal,
    Path(key): Path<String>,
    Query(q): Query<UsageParams>,
) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let meter = st.store.get_meter(who.workspace.as_str(), &key).await.map_err(not_found(&key))?;
    let ws = st.store.get_workspace(who.workspace.as_str()).await?;
    let tz = chrono_tz::Tz::from_str(&ws.time_zone).map_err(ApiError::internal)?;
    let time = |name: &str, v: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        v.as_deref().map(|s| sluice_ingest::formats::parse_time(s).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))).transpose()
    };
    let granularity =
        q.granularity.as_deref().map(Granularity::from_str).transpose().map_err(|e| ApiError::bad_request(format!("granularity: {e}")))?;
    let group_by: Vec<String> = q.group_by.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    if let Some(g) = group_by.iter().find(|g| !meter.group_by.contains(g)) {
        return Err(ApiError::bad_request(format!("group_by: {g:?} is not a group_by path of meter {key:?} ({:?})", meter.group_by)));
    }
    let query = UsageQuery {
        customer_id: q.customer_id.clone(),
        subscription_id: q.subscription_id.clone(),
        from: time("from", &q.from)?,
        to: time("to", &q.to)?,
        granularity,
        group_by,
    };
    let data = sluice_metering::usage::query(&st.store, &meter, tz, &query).await.map_err(|e| match e {
        sluice_metering::usage::UsageQueryError::Store(e) => ApiError::from(e),
        e @ sluice_metering::usage::UsageQueryError::Overflow { .. } => {
            ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, "usage_overflow", e.to_string())
        }
    })?;
    Ok(Json(json!({"data": data, "next_cursor": null, "time_zone": ws.time_zone})))
}
