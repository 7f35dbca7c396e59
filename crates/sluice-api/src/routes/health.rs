//! Customer health's API (docs/health.md): customer attributes, the
//! versioned configuration, a customer's health (live or `as_of`), its
//! history, stage overrides and backtests. The customer list's filters and
//! sorts (`stage`, `band`, `sort`) are in `people.rs`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_health::engine::Cause;
use sluice_health::jobs::{BacktestPayload, RecomputePayload};
use sluice_health::{HealthConfig, HealthError};
use sluice_jobs::JobPayload;
use sluice_store::OverrideRow;

use super::jobs::JobView;
use super::List;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

impl From<HealthError> for ApiError {
    fn from(e: HealthError) -> Self {
        match e {
            HealthError::Store(e) => e.into(),
            HealthError::Invalid(errs) => {
                let message = errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                let details = errs.iter().map(|e| json!({"path": e.path, "field": e.path, "reason": e.message})).collect();
                ApiError::bad_request(message).with_details(details)
            }
            HealthError::NotFound(m) => ApiError::not_found(m),
            e @ HealthError::Corrupt(_) => ApiError::internal(e),
        }
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> ApiError {
    HealthError::invalid(path, reason).into()
}

/// A time parameter: an RFC 3339 time, or a date (`YYYY-MM-DD`), which
/// means 00:00 of that date in the workspace time zone — the moment the
/// windows of that local day start (docs/health.md).
async fn parse_time(st: &AppState, ws: &str, field: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(sluice_metering::usage::local_start(st.health.tz(ws).await?, d, 0));
    }
    Err(invalid(field, format!("{s:?} is neither an RFC 3339 time such as 2026-12-01T00:00:00+09:00 nor a date such as 2026-12-01")))
}

fn check_customer_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 256 {
        return Err(invalid("id", "a customer id has 1 to 256 bytes"));
    }
    sluice_core::check_storable(id).map_err(|e| invalid("id", e.to_string()))
}

async fn known(st: &AppState, who: &Principal, id: &str) -> Result<(), ApiError> {
    if st.store.health_customer_exists(who.workspace.as_str(), id).await? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("customer {id:?} not found")))
    }
}

/// A customer's attributes now: the traits of its `group` calls, then the
/// attributes health keeps with their time (`Health::attributes_of`, read
/// for a whole page at once), applied over them.
pub fn merged_attributes(traits: Option<&Value>, kept: Option<&Map<String, Value>>) -> Map<String, Value> {
    let mut out = match traits {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    out.extend(kept.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// One customer's [`merged_attributes`].
pub async fn current_attributes(st: &AppState, ws: &str, id: &str, traits: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let kept = st.health.attributes_of(ws, &[id], None).await?;
    Ok(merged_attributes(traits, kept.get(id)))
}

/// `PATCH /v1/customers/{id}`: sets attributes (`{"mrr": 5000,
/// "renewal_date": "2027-03-31"}` or the same inside `{"attributes": …}`);
/// `null` removes one. Numbers, strings (dates as `YYYY-MM-DD`) and booleans.
#[utoipa::path(patch, path = "/v1/customers/{id}", tag = "customers",
    responses((status = 200, description = "The customer with its attributes and health"), (status = 400)), security(("bearer" = [])))]
pub async fn patch_customer(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    check_customer_id(&id)?;
    let ws = who.workspace.as_str();
    let attrs = match body {
        Value::Object(mut m) if m.len() == 1 && m.get("attributes").is_some_and(Value::is_object) => match m.remove("attributes") {
            Some(Value::Object(a)) => a,
            _ => Map::new(),
        },
        Value::Object(m) => m,
        _ => return Err(invalid("", "the body must be a JSON object of attributes, e.g. {\"mrr\": 5000, \"renewal_date\": \"2027-03-31\"}")),
    };
    if attrs.is_empty() {
        return Err(invalid("", "give at least one attribute"));
    }
    if attrs.len() > 200 {
        return Err(invalid("", "at most 200 attributes at once"));
    }
    let mut errs = Vec::new();
    for (k, v) in &attrs {
        if k.is_empty() || k.len() > 100 || sluice_core::check_storable(k).is_err() {
            errs.push(sluice_health::FieldError { path: k.clone(), message: "an attribute name has 1 to 100 bytes and no NUL".into() });
        }
        match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
            Value::String(s) if s.len() <= 2000 && sluice_core::check_storable(s).is_ok() => {}
            Value::String(_) => {
                errs.push(sluice_health::FieldError { path: k.clone(), message: "a text value has at most 2000 bytes and no NUL".into() })
            }
            _ => errs.push(sluice_health::FieldError {
                path: k.clone(),
                message: "must be a number, a string (a date as YYYY-MM-DD), a boolean or null (to remove it)".into(),
            }),
        }
        // A value that looks like a date must be one.
        if let Value::String(s) = v {
            if s.len() == 10
                && s.as_bytes().get(4) == Some(&b'-')
                && s.as_bytes().get(7) == Some(&b'-')
                && NaiveDate::parse_from_str(s, "%Y-%m-%d").is_err()
            {
                errs.push(sluice_health::FieldError { path: k.clone(), message: format!("{s:?} is not a valid date (YYYY-MM-DD)") });
            }
        }
    }
    if !errs.is_empty() {
        return Err(HealthError::Invalid(errs).into());
    }
    let now = Utc::now();
    let reference = format!("api_{}", uuid::Uuid::now_v7().simple());
    st.store.add_attribute_change(ws, &id, now, &reference, &Value::Object(attrs.clone()), Some(&who.key_id)).await?;
    let audit = who.audit("customer.attributes", "customer", &id, json!({"attributes": attrs}));
    super::record_audit(&st, &audit).await;
    let health = st.health.refresh_one(ws, &id, Cause::Attributes).await?;
    let traits = st.store.get_customer(ws, &id).await?.map(|c| c.attributes);
    let attributes = current_attributes(&st, ws, &id, traits.as_ref()).await?;
    Ok(Json(json!({"customer_id": id, "attributes": attributes, "health": health})))
}

/// Makes health keep the workspace's events from now on; when it did not
/// yet, the log's end positions up to which the job must copy its history
/// (docs/health.md, "How it is computed").
fn enable(st: &AppState, ws: &str) -> Option<Vec<(u32, u64)>> {
    if !st.health.enabled.insert(ws) {
        return None;
    }
    // Read after the read model starts keeping the workspace: everything
    // it skipped is before these positions.
    Some((0..st.log.partitions()).map(|p| (p, st.log.next_offset(p))).collect())
}

/// `GET /v1/customers/{id}/health` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HealthQuery {
    /// Evaluate at this past time from the log: RFC 3339, or a date (00:00
    /// of it in the workspace time zone).
    pub as_of: Option<String>,
    /// Evaluate with this configuration version.
    pub config_version: Option<i64>,
}

/// A customer's health: stage and the rule that put it there, score, band,
/// and every measure's value, points, weight and contribution.
#[utoipa::path(get, path = "/v1/customers/{id}/health", params(HealthQuery), tag = "health",
    responses((status = 200, description = "The health and its explanation"), (status = 404)), security(("bearer" = [])))]
pub async fn get_health(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<HealthQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    who.require_read()?;
    let ws = who.workspace.as_str();
    known(&st, &who, &id).await?;
    if q.as_of.is_some() || q.config_version.is_some() {
        let at = match q.as_of.as_deref() {
            Some(s) => parse_time(&st, ws, "as_of", s).await?,
            None => Utc::now(),
        };
        return Ok(Json(st.health.as_of(ws, &id, at, q.config_version).await?).into_response());
    }
    let Some(ctx) = st.health.ctx(ws, None).await? else {
        return Err(ApiError::not_found("no health configuration yet: PUT /v1/health/config"));
    };
    if let Some(row) = st.store.customer_health(ws, &id).await? {
        if row.config_version == ctx.version {
            // The stored text as it is: not parsed to be written again.
            return Ok(Json(row.doc).into_response());
        }
    }
    Ok(Json(st.health.refresh(&ctx, &id, Cause::Events).await?).into_response())
}

/// `?cursor=&limit=` of the history.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// 1–1000 (default 100).
    pub limit: Option<usize>,
}

/// Every change of a customer's stage, band, or score by more than the
/// configured step, oldest first, with its time and cause.
#[utoipa::path(get, path = "/v1/customers/{id}/health/history", params(HistoryQuery), tag = "health",
    responses((status = 200, description = "`{data: [change], next_cursor}`")), security(("bearer" = [])))]
pub async fn get_history(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    known(&st, &who, &id).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = st.store.health_history(who.workspace.as_str(), Some(&id), q.cursor.as_deref(), limit + 1).await?;
    let more = rows.len() > limit;
    let data: Vec<Value> = rows
        .iter()
        .take(limit)
        .map(|h| {
            json!({"id": h.id, "customer_id": h.customer_id, "at": h.at, "stage": h.stage, "stage_since": h.stage_since, "band": h.band,
                "score": h.score, "previous": h.previous, "cause": h.cause, "config_version": h.config_version})
        })
        .collect();
    let next_cursor = if more { rows.get(limit - 1).map(|h| h.id.clone()) } else { None };
    Ok(Json(List { data, next_cursor }))
}

/// `PUT /v1/customers/{id}/stage-override`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetOverride {
    /// A stage of the current configuration.
    pub stage: String,
    /// Why (shown in the explanation).
    #[serde(default)]
    pub reason: Option<String>,
    /// Until when (RFC 3339, or a date: 00:00 of it in the workspace time
    /// zone); the rules decide again from then.
    #[serde(default)]
    pub until: Option<String>,
}

/// Puts a customer in a stage by hand, beating the rules (until `until`).
#[utoipa::path(put, path = "/v1/customers/{id}/stage-override", request_body = SetOverride, tag = "health",
    responses((status = 200, description = "The override and the health"), (status = 400)), security(("bearer" = [])))]
pub async fn put_override(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Json(b): Json<SetOverride>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    check_customer_id(&id)?;
    let ws = who.workspace.as_str();
    let Some(ctx) = st.health.ctx(ws, None).await? else {
        return Err(invalid("stage", "no health configuration yet: PUT /v1/health/config first"));
    };
    if !ctx.config.stages.iter().any(|s| s.name == b.stage) {
        let names: Vec<&str> = ctx.config.stages.iter().map(|s| s.name.as_str()).collect();
        return Err(invalid("stage", format!("no stage {:?} in configuration version {}; stages: {}", b.stage, ctx.version, names.join(", "))));
    }
    let now = Utc::now();
    let until = match b.until.as_deref() {
        None => None,
        Some(s) => {
            let t = parse_time(&st, ws, "until", s).await?;
            if t <= now {
                return Err(invalid("until", "must be in the future"));
            }
            Some(t)
        }
    };
    if b.reason.as_ref().is_some_and(|r| r.len() > 2000 || sluice_core::check_storable(r).is_err()) {
        return Err(invalid("reason", "at most 2000 bytes, no NUL"));
    }
    let o = OverrideRow { set_at: now, stage: Some(b.stage.clone()), reason: b.reason.clone(), until, set_by: Some(who.key_id.clone()) };
    st.store.set_stage_override(ws, &id, &o).await?;
    let audit = who.audit("customer.stage_override", "customer", &id, json!({"stage": b.stage, "reason": b.reason, "until": until}));
    super::record_audit(&st, &audit).await;
    let health = st.health.refresh(&ctx, &id, Cause::Override).await?;
    Ok(Json(json!({"override": {"stage": b.stage, "reason": b.reason, "until": until, "set_by": who.key_id, "set_at": now}, "health": health})))
}

/// Lifts a customer's stage override.
#[utoipa::path(delete, path = "/v1/customers/{id}/stage-override", tag = "health",
    responses((status = 200, description = "The health without the override"), (status = 404)), security(("bearer" = [])))]
pub async fn delete_override(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    check_customer_id(&id)?;
    let ws = who.workspace.as_str();
    let now = Utc::now();
    let current = st.store.stage_overrides_of(ws, &[id.as_str()], now).await?.pop().map(|(_, o)| o);
    if !current.is_some_and(|o| o.stage.is_some() && o.until.is_none_or(|u| u > now)) {
        return Err(ApiError::not_found(format!("customer {id:?} has no stage override in force")));
    }
    st.store
        .set_stage_override(ws, &id, &OverrideRow { set_at: now, stage: None, reason: None, until: None, set_by: Some(who.key_id.clone()) })
        .await?;
    let audit = who.audit("customer.stage_override_lifted", "customer", &id, json!({}));
    super::record_audit(&st, &audit).await;
    let health = st.health.refresh_one(ws, &id, Cause::Override).await?;
    Ok(Json(json!({"override": null, "health": health})))
}

/// `GET /v1/health/config` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConfigQuery {
    /// A version (default: the current one).
    pub version: Option<i64>,
}

/// `{version, config, created_at, created_by}`, and the configuration's own
/// fields (`measures`, `stages`, `scorecards`, `bands`, …) at the top level
/// too, so that the document also reads as the one that was PUT.
fn config_view(r: &sluice_store::HealthConfigRow) -> Value {
    let mut v = json!({"version": r.version, "config": r.config, "created_at": r.created_at, "created_by": r.created_by});
    if let (Value::Object(top), Value::Object(cfg)) = (&mut v, &r.config) {
        for (k, x) in cfg {
            top.entry(k.clone()).or_insert_with(|| x.clone());
        }
    }
    v
}

/// The health configuration (a version, or the current one).
#[utoipa::path(get, path = "/v1/health/config", params(ConfigQuery), tag = "health",
    responses((status = 200, description = "`{version, config, created_at, created_by}` and the configuration's fields at the top level"), (status = 404)), security(("bearer" = [])))]
pub async fn get_config(State(st): State<AppState>, who: Principal, Query(q): Query<ConfigQuery>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    match st.store.health_config(who.workspace.as_str(), q.version).await? {
        Some(r) => Ok(Json(config_view(&r))),
        None => Err(ApiError::not_found(match q.version {
            Some(v) => format!("health configuration version {v} not found"),
            None => "no health configuration yet: PUT /v1/health/config".into(),
        })),
    }
}

/// Applies a configuration as a new version and recomputes every customer
/// (a `health.recompute` job).
#[utoipa::path(put, path = "/v1/health/config", tag = "health",
    responses((status = 201, description = "`{version, config, created_at, recompute_job}`"), (status = 400)), security(("bearer" = [])))]
pub async fn put_config(State(st): State<AppState>, who: Principal, Json(body): Json<Value>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let ws = who.workspace.as_str();
    let cfg = HealthConfig::parse(&body)?;
    let stored = serde_json::to_value(&cfg).map_err(ApiError::internal)?;
    let backfill_until = enable(&st, ws);
    let version = st.store.put_health_config(ws, &stored, Some(&who.key_id)).await?;
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: ws.to_owned(),
            kind: sluice_health::jobs::RECOMPUTE.into(),
            payload: RecomputePayload { v: 1, workspace: who.workspace.clone(), version, backfill_until }.to_value(),
            max_attempts: 5,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    let audit = who.audit("health.config", "health_config", version.to_string(), json!({"version": version}));
    super::record_audit(&st, &audit).await;
    let row = st.store.health_config(ws, Some(version)).await?.ok_or_else(|| ApiError::internal("configuration vanished"))?;
    let mut v = config_view(&row);
    v["recompute_job"] = serde_json::to_value(JobView::from(job)).unwrap_or(Value::Null);
    Ok((StatusCode::CREATED, Json(v)))
}

/// `POST /v1/health/backtest`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBacktest {
    /// The configuration to test (default: the current one).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub config: Option<Value>,
    /// First step (RFC 3339, or a date: its local 00:00).
    pub from: String,
    /// Last step (RFC 3339, or a date: its local 00:00).
    pub to: String,
    /// Days between steps (default 7).
    #[serde(default)]
    pub step_days: Option<u32>,
    /// Churn within this many days after a step counts (default 30).
    #[serde(default)]
    pub horizon_days: Option<u32>,
    /// The attribute with the churn date (default `churned_at`).
    #[serde(default)]
    pub outcome_attribute: Option<String>,
}

/// `?wait=true`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Wait (up to 30 s) for the job to finish.
    pub wait: Option<bool>,
}

/// Replays history under a configuration and reports churn per band and
/// the AUC (a `health.backtest` job; nothing live changes).
#[utoipa::path(post, path = "/v1/health/backtest", request_body = CreateBacktest, params(WaitQuery), tag = "health",
    responses((status = 202, description = "The job"), (status = 200, description = "The finished job (wait=true)"), (status = 400)),
    security(("bearer" = [])))]
pub async fn create_backtest(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<WaitQuery>,
    Json(b): Json<CreateBacktest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let ws = who.workspace.as_str();
    let (config, version) = match b.config {
        Some(c) => {
            let parsed = HealthConfig::parse(&c).map_err(|e| match e {
                HealthError::Invalid(errs) => HealthError::Invalid(
                    errs.into_iter()
                        .map(|e| sluice_health::FieldError { path: format!("config.{}", e.path).trim_end_matches('.').to_owned(), ..e })
                        .collect(),
                ),
                e => e,
            })?;
            (serde_json::to_value(&parsed).map_err(ApiError::internal)?, None)
        }
        None => match st.store.health_config(ws, None).await? {
            Some(r) => (r.config, Some(r.version)),
            None => return Err(invalid("config", "no current configuration: give one")),
        },
    };
    let from = parse_time(&st, ws, "from", &b.from).await?;
    let to = parse_time(&st, ws, "to", &b.to).await?;
    if to < from {
        return Err(invalid("to", "must not be before from"));
    }
    let step_days = b.step_days.unwrap_or(7);
    if step_days == 0 || step_days > 366 {
        return Err(invalid("step_days", "1 to 366"));
    }
    let horizon_days = b.horizon_days.unwrap_or(30);
    if horizon_days == 0 || horizon_days > 3660 {
        return Err(invalid("horizon_days", "1 to 3660"));
    }
    if (to - from).num_days() / i64::from(step_days) > 1000 {
        return Err(invalid("step_days", "at most 1000 steps between from and to"));
    }
    let payload = BacktestPayload {
        v: 1,
        workspace: who.workspace.clone(),
        config,
        config_version: version,
        from,
        to,
        step_days,
        horizon_days,
        outcome_attribute: b.outcome_attribute.unwrap_or_else(|| "churned_at".into()),
        backfill_until: enable(&st, ws),
    };
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: ws.to_owned(),
            kind: sluice_health::jobs::BACKTEST.into(),
            payload: payload.to_value(),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    if q.wait == Some(true) {
        let (j, ended) = super::jobs::wait_for(&st, ws, &job.id).await?;
        return Ok((if ended { StatusCode::OK } else { StatusCode::ACCEPTED }, Json(backtest_view(j))));
    }
    Ok((StatusCode::ACCEPTED, Json(backtest_view(job))))
}

/// A backtest job with its result's fields at the top (`bands`, `auc`).
fn backtest_view(j: sluice_store::Job) -> Value {
    let result = j.result.clone();
    let mut v = serde_json::to_value(JobView::from(j)).unwrap_or(Value::Null);
    if let (Value::Object(m), Some(Value::Object(r))) = (&mut v, result) {
        for (k, x) in r {
            m.entry(k).or_insert(x);
        }
    }
    v
}

/// A backtest (its job), with `bands` and `auc` once finished.
#[utoipa::path(get, path = "/v1/health/backtests/{id}", tag = "health",
    responses((status = 200, description = "The backtest job"), (status = 404)), security(("bearer" = [])))]
pub async fn get_backtest(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let j = st.store.get_job(Some(who.workspace.as_str()), &id).await.map_err(|e| match e {
        sluice_store::StoreError::NotFound => ApiError::not_found(format!("backtest {id:?} not found")),
        o => o.into(),
    })?;
    if j.kind != sluice_health::jobs::BACKTEST {
        return Err(ApiError::not_found(format!("backtest {id:?} not found")));
    }
    Ok(Json(backtest_view(j)))
}
