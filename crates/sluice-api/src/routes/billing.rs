//! Billing's API (docs/billing.md): `/v1/plans`, `/v1/subscriptions`,
//! `/v1/invoices`, `/v1/billing-runs`, and the `billing` settings of
//! `PATCH /v1/workspaces/{name}`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_billing::engine::view;
use sluice_billing::invoice::Invoice;
use sluice_billing::run::{RunFilter, RunPayload, RunResult};
use sluice_billing::subscription::{bucket_floor, Phase, Status};
use sluice_billing::{BillOptions, BillingError, PlanSpec, Subscription};
use sluice_jobs::JobPayload;
use sluice_store::{InvoiceFilter, Job, StoreError, SubscriptionRow};

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::state::AppState;

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::Store(e) => e.into(),
            BillingError::Invalid(errs) => {
                let message = errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                let details = errs.iter().map(|e| json!({"field": e.field, "reason": e.reason})).collect();
                ApiError::bad_request(message).with_details(details)
            }
            BillingError::NotFound(m) => ApiError::not_found(m),
            BillingError::Conflict(m) => ApiError::conflict(m),
            BillingError::Busy(m) => ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m) },
            BillingError::Overflow(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "overflow", m),
            e @ BillingError::Corrupt(_) => ApiError::internal(e),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
    BillingError::invalid(field, reason).into()
}

// ---------------------------------------------------------------- plans

fn plan_view(row: &sluice_store::PlanRow) -> Value {
    let mut v = row.spec.clone();
    if let Value::Object(m) = &mut v {
        m.insert("version".into(), json!(row.version));
        m.insert("created_at".into(), json!(rfc3339(row.created_at)));
    }
    v
}

/// Creates a plan, or a new version of an existing code (subscriptions
/// keep the version they are on until changed).
#[utoipa::path(post, path = "/v1/plans", tag = "billing", request_body(content = Object),
    responses((status = 201, description = "the plan version"), (status = 400)), security(("bearer" = [])))]
pub async fn create_plan(State(st): State<AppState>, who: Principal, Json(body): Json<Value>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    // A plan as `GET /v1/plans/{code}` shows it can be posted back as the
    // next version: the fields the server sets (`version`, `created_at`)
    // are dropped, not refused.
    let mut body = body;
    if let Value::Object(m) = &mut body {
        m.remove("version");
        m.remove("created_at");
    }
    let spec = sluice_billing::plan::parse(body).map_err(BillingError::from)?;
    let meters: Vec<String> = st.store.list_meters(Some(who.workspace.as_str())).await?.into_iter().map(|m| m.key).collect();
    spec.validate(&meters).map_err(BillingError::Invalid)?;
    let doc = serde_json::to_value(&spec).map_err(ApiError::internal)?;
    let audit = who.audit("plan.create", "plan", &spec.code, json!({"currency": spec.currency, "interval": spec.interval}));
    let row = st.store.create_plan_version(who.workspace.as_str(), &spec.code, &doc, &who.key_id, &audit).await?;
    Ok((StatusCode::CREATED, Json(plan_view(&row))))
}

/// The latest version of each plan.
#[utoipa::path(get, path = "/v1/plans", tag = "billing", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_plans(State(st): State<AppState>, who: Principal) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let rows = st.store.list_plans(who.workspace.as_str()).await?;
    Ok(Json(List { data: rows.iter().map(plan_view).collect(), next_cursor: None }))
}

/// `?version=` of `GET /v1/plans/{code}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct VersionQuery {
    /// A version (default: the latest).
    pub version: Option<i64>,
}

/// One plan (its latest version, or `?version=`).
#[utoipa::path(get, path = "/v1/plans/{code}", params(VersionQuery), tag = "billing", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_plan(
    State(st): State<AppState>,
    who: Principal,
    Path(code): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let row = st.store.plan(who.workspace.as_str(), &code, q.version).await.map_err(|e| match e {
        StoreError::NotFound => {
            ApiError::not_found(format!("plan {code:?}{} not found", q.version.map(|v| format!(" version {v}")).unwrap_or_default()))
        }
        e => e.into(),
    })?;
    Ok(Json(plan_view(&row)))
}

async fn plan_spec(st: &AppState, ws: &str, code: &str, field: &str) -> Result<(i64, PlanSpec), ApiError> {
    let row = st.store.plan(ws, code, None).await.map_err(|e| match e {
        StoreError::NotFound => invalid(field, format!("no plan with code {code:?}")),
        e => e.into(),
    })?;
    let spec: PlanSpec = serde_json::from_value(row.spec).map_err(ApiError::internal)?;
    Ok((row.version, spec))
}

// -------------------------------------------------------- subscriptions

/// Body of `POST /v1/subscriptions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// Id (default: generated `sub_…`).
    pub id: Option<String>,
    /// Customer.
    pub customer_id: String,
    /// Plan code (its latest version).
    pub plan: String,
    /// RFC 3339 (default: now).
    pub start: Option<DateTime<Utc>>,
    /// `calendar` (default) or `anniversary`.
    pub billing_anchor: Option<String>,
    /// RFC 3339 end (exclusive).
    pub end: Option<DateTime<Utc>>,
}

fn check_id(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(invalid(field, format!("must be 1-{max} characters without control characters")));
    }
    Ok(())
}

fn sub_view(st_tz: chrono_tz::Tz, row: &SubscriptionRow, s: &Subscription) -> Value {
    let now = Utc::now();
    let cycle = s.cycle(st_tz);
    let next = s.period_from(&cycle, row.billed_until);
    let current = (s.status(now) != Status::Ended).then(|| cycle.period_of(now.max(s.start)));
    let cur = s.current();
    json!({
        "id": s.id, "customer_id": s.customer_id, "plan": cur.plan, "plan_version": cur.plan_version,
        "start": s.start, "end": s.end, "billing_anchor": s.billing_anchor, "status": s.status(now),
        "trial_end": s.trial_end, "currency": s.currency, "interval": s.interval,
        "billed_until": row.billed_until,
        "current_period_start": current.map(|c| c.0), "current_period_end": current.map(|c| c.1),
        "next_invoice_period_start": next.map(|p| p.start), "next_invoice_period_end": next.map(|p| p.end),
        "phases": s.phases, "cancelled_at": s.cancelled_at, "created_at": s.created_at,
        "reissue": s.reissue,
    })
}

async fn ws(st: &AppState, who: &Principal) -> Result<sluice_billing::Ws, ApiError> {
    Ok(st.billing.workspace(who.workspace.as_str()).await?)
}

/// Most subscriptions one request creates.
pub const MAX_BULK_SUBSCRIPTIONS: usize = 10_000;

/// Creates a subscription, or with a JSON array up to 10,000 of them, all
/// or none (`{"data": [...]}`).
#[utoipa::path(post, path = "/v1/subscriptions", request_body = CreateSubscription, tag = "billing",
    responses((status = 201), (status = 400), (status = 409)), security(("bearer" = [])))]
pub async fn create_subscription(State(st): State<AppState>, who: Principal, Json(body): Json<Value>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let (items, bulk) = match body {
        Value::Array(items) => (items, true),
        one => (vec![one], false),
    };
    if items.is_empty() || items.len() > MAX_BULK_SUBSCRIPTIONS {
        return Err(invalid("body", format!("send 1 to {MAX_BULK_SUBSCRIPTIONS} subscriptions")));
    }
    let w = ws(&st, &who).await?;
    let now = Utc::now();
    let mut plans: std::collections::HashMap<String, (i64, PlanSpec)> = std::collections::HashMap::new();
    let mut rows = Vec::with_capacity(items.len());
    let mut subs = Vec::with_capacity(items.len());
    let mut ids = std::collections::HashSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = |f: &str| if bulk { format!("[{i}].{f}") } else { f.to_owned() };
        let b: CreateSubscription = serde_path_to_error::deserialize(item).map_err(|e| {
            let path = e.path().to_string();
            invalid(&if path == "." { at("body") } else { at(&path) }, e.into_inner().to_string())
        })?;
        let id = b.id.unwrap_or_else(|| format!("sub_{}", uuid::Uuid::now_v7().simple()));
        check_id(&at("id"), &id, 128)?;
        check_id(&at("customer_id"), &b.customer_id, 256)?;
        if !ids.insert(id.clone()) {
            return Err(invalid(&at("id"), format!("{id:?} appears twice in this request")));
        }
        let anchor = match b.billing_anchor.as_deref() {
            None => sluice_billing::cycle::Anchor::Calendar,
            Some(a) => a.parse().map_err(|e: sluice_billing::cycle::UnknownAnchor| invalid(&at("billing_anchor"), e.to_string()))?,
        };
        // Times are kept to the microsecond (as the store keeps them).
        let micros = |t: DateTime<Utc>| DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t);
        let start = micros(b.start.unwrap_or(now));
        let end = b.end.map(micros);
        if end.is_some_and(|e| e <= start) {
            return Err(invalid(&at("end"), "must be after start"));
        }
        if !plans.contains_key(&b.plan) {
            let p = plan_spec(&st, &w.name, &b.plan, &at("plan")).await?;
            plans.insert(b.plan.clone(), p);
        }
        let (version, plan) = &plans[&b.plan];
        let sub = Subscription {
            id: id.clone(),
            customer_id: b.customer_id.clone(),
            start,
            billing_anchor: anchor,
            end,
            interval: plan.interval,
            currency: plan.currency.clone(),
            trial_end: Subscription::trial_end_of(start, plan.trial_days),
            phases: vec![Phase { plan: plan.code.clone(), plan_version: *version, from: start }],
            cuts: Vec::new(),
            cancelled_at: None,
            reissue: Vec::new(),
            created_at: now,
        };
        rows.push(SubscriptionRow {
            id,
            customer_id: b.customer_id,
            plan_code: plan.code.clone(),
            billed_until: start,
            end_at: end,
            reissue_from: None,
            doc: serde_json::to_value(&sub).map_err(ApiError::internal)?,
            revision: 0,
            created_at: now,
        });
        subs.push(sub);
    }
    let audit = if bulk {
        who.audit(
            "subscription.create",
            "subscription",
            format!("{} subscriptions", rows.len()),
            json!({"ids": rows.iter().take(100).map(|r| &r.id).collect::<Vec<_>>()}),
        )
    } else {
        who.audit("subscription.create", "subscription", &rows[0].id, json!({"plan": rows[0].plan_code}))
    };
    st.store.create_subscriptions(&w.name, &rows, &audit).await?;
    let views: Vec<Value> = rows.iter().zip(&subs).map(|(r, s)| sub_view(w.tz, r, s)).collect();
    if bulk {
        return Ok((StatusCode::CREATED, Json(json!({"data": views, "created": rows.len()}))));
    }
    Ok((StatusCode::CREATED, Json(views.into_iter().next().unwrap_or(Value::Null))))
}

/// `GET /v1/subscriptions` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SubscriptionQuery {
    /// Only this customer's.
    pub customer_id: Option<String>,
    /// Only those on this plan now.
    pub plan: Option<String>,
    /// Only those with this status (filters the page).
    pub status: Option<String>,
    /// Cursor.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
}

/// Subscriptions by id.
#[utoipa::path(get, path = "/v1/subscriptions", params(SubscriptionQuery), tag = "billing", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_subscriptions(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<SubscriptionQuery>,
) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let status: Option<Status> =
        q.status.as_deref().map(str::parse).transpose().map_err(|e: sluice_billing::subscription::UnknownStatus| invalid("status", e.to_string()))?;
    let w = ws(&st, &who).await?;
    let page = st.store.list_subscriptions(&w.name, q.customer_id.as_deref(), q.plan.as_deref(), q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    let now = Utc::now();
    let mut data = Vec::with_capacity(page.data.len());
    for row in &page.data {
        let s = sluice_billing::engine::parse_sub(row)?;
        if status.is_none_or(|st| s.status(now) == st) {
            data.push(sub_view(w.tz, row, &s));
        }
    }
    Ok(Json(List { data, next_cursor: page.next_cursor }))
}

/// One subscription.
#[utoipa::path(get, path = "/v1/subscriptions/{id}", tag = "billing", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_subscription(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let w = ws(&st, &who).await?;
    let (row, s) = st.billing.subscription(&w.name, &id).await?;
    Ok(Json(sub_view(w.tz, &row, &s)))
}

/// Body of `POST /v1/subscriptions/{id}/change`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlan {
    /// The new plan's code (its latest version).
    pub plan: String,
    /// `"now"` (default) or an RFC 3339 time, not in the past.
    pub at: Option<String>,
}

/// `"now"` or an RFC 3339 time, rounded down to its 15-minute usage bucket.
fn when(field: &str, v: Option<&str>, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    match v {
        None | Some("now") => Ok(bucket_floor(now)),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map(|t| bucket_floor(t.with_timezone(&Utc)))
            .map_err(|_| invalid(field, "must be \"now\" or an RFC 3339 time such as 2026-01-31T15:00:00Z")),
    }
}

/// Moves a subscription to another plan from `at`: the running period is
/// cut there, fixed fees prorated on both sides (docs/billing.md).
#[utoipa::path(post, path = "/v1/subscriptions/{id}/change", request_body = ChangePlan, tag = "billing",
    responses((status = 200), (status = 400), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn change_plan(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Json(b): Json<ChangePlan>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let w = ws(&st, &who).await?;
    let (mut row, mut s) = st.billing.subscription(&w.name, &id).await?;
    let now = Utc::now();
    // "now" on a subscription invoiced up to now (or created a moment ago)
    // means from there.
    let at = match b.at.as_deref() {
        None | Some("now") => bucket_floor(now).max(row.billed_until),
        other => when("at", other, now)?,
    };
    if at < bucket_floor(now) {
        return Err(invalid("at", "a plan change cannot be in the past"));
    }
    if at < row.billed_until {
        return Err(invalid(
            "at",
            format!("the subscription is already invoiced until {}; a change must be at or after it", rfc3339(row.billed_until)),
        ));
    }
    if s.end.is_some_and(|e| at >= e) {
        return Err(invalid("at", "the subscription ends before then"));
    }
    let (version, plan) = plan_spec(&st, &w.name, &b.plan, "plan").await?;
    if plan.currency != s.currency {
        return Err(invalid(
            "plan",
            format!("currency mismatch: the subscription bills in {}, plan {:?} in {}", s.currency, plan.code, plan.currency),
        ));
    }
    if plan.interval != s.interval {
        return Err(invalid(
            "plan",
            format!("interval mismatch: the subscription bills every {}, plan {:?} every {}", s.interval, plan.code, plan.interval),
        ));
    }
    // A change replaces any change scheduled at or after it.
    s.phases.retain(|p| p.from < at || p.from == s.start);
    if s.phases.len() == 1 && s.phases[0].from >= at {
        s.phases.clear();
    }
    s.phases.push(Phase { plan: plan.code.clone(), plan_version: version, from: at.max(s.start) });
    if at > s.start && !s.cuts.contains(&at) {
        s.cuts.push(at);
        s.cuts.sort();
    }
    row.plan_code = plan.code.clone();
    row.doc = serde_json::to_value(&s).map_err(ApiError::internal)?;
    let audit = who.audit("subscription.change", "subscription", &id, json!({"plan": plan.code, "plan_version": version, "at": at}));
    st.store.update_subscription(&w.name, &row, &audit).await?;
    let (row, s) = st.billing.subscription(&w.name, &id).await?;
    Ok(Json(sub_view(w.tz, &row, &s)))
}

/// Body of `POST /v1/subscriptions/{id}/cancel`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// `"now"`, `"period_end"` (default) or an RFC 3339 time.
    pub at: Option<String>,
}

/// Cancels a subscription now, at its period's end, or at a time: it ends
/// there; the final invoice prorates its fees and credits fees paid in
/// advance for the rest of the period.
#[utoipa::path(post, path = "/v1/subscriptions/{id}/cancel", request_body = Cancel, tag = "billing",
    responses((status = 200), (status = 400), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn cancel_subscription(
    State(st): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Json(b): Json<Cancel>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let w = ws(&st, &who).await?;
    let (mut row, mut s) = st.billing.subscription(&w.name, &id).await?;
    let now = Utc::now();
    if s.status(now) == Status::Ended {
        return Err(ApiError::conflict(format!("subscription {id:?} has already ended")));
    }
    let end = match b.at.as_deref() {
        None | Some("period_end") => s.cycle(w.tz).next_boundary(now.max(s.start)),
        other => {
            let t = when("at", other, now)?;
            if t < bucket_floor(now) {
                return Err(invalid("at", "a cancellation cannot be in the past"));
            }
            t
        }
    };
    // Never before what is already invoiced, never before the start.
    let end = end.max(row.billed_until).max(s.start);
    let end = s.end.map_or(end, |e| e.min(end));
    s.end = Some(end);
    s.cancelled_at = Some(now);
    row.end_at = Some(end);
    row.doc = serde_json::to_value(&s).map_err(ApiError::internal)?;
    let audit = who.audit("subscription.cancel", "subscription", &id, json!({"end": end}));
    st.store.update_subscription(&w.name, &row, &audit).await?;
    let (row, s) = st.billing.subscription(&w.name, &id).await?;
    Ok(Json(sub_view(w.tz, &row, &s)))
}

/// The draft of the current period from usage so far.
#[utoipa::path(get, path = "/v1/subscriptions/{id}/upcoming-invoice", tag = "billing", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn upcoming_invoice(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let w = ws(&st, &who).await?;
    Ok(Json(st.billing.upcoming(&w, &id).await?))
}

/// `GET /v1/billing/unattributed-usage` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UnattributedQuery {
    /// Usage from this time (RFC 3339; default: all).
    pub from: Option<String>,
    /// Usage before this time (RFC 3339; default: all).
    pub to: Option<String>,
    /// Only this customer's (`""`: usage naming no customer).
    pub customer_id: Option<String>,
}

/// Usage that no subscription bills, per customer, meter and reason
/// (docs/billing.md, "Unattributed usage").
#[utoipa::path(get, path = "/v1/billing/unattributed-usage", params(UnattributedQuery), tag = "billing", responses((status = 200), (status = 400)),
    security(("bearer" = [])))]
pub async fn unattributed_usage(State(st): State<AppState>, who: Principal, Query(q): Query<UnattributedQuery>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let time = |field: &str, v: Option<&str>, default: DateTime<Utc>| match v {
        None => Ok(default),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| invalid(field, format!("{t:?} is not an RFC 3339 time such as 2026-01-31T15:00:00Z"))),
    };
    let from = time("from", q.from.as_deref(), DateTime::UNIX_EPOCH)?;
    // Far enough for any event time the API accepts.
    let to = time("to", q.to.as_deref(), DateTime::UNIX_EPOCH + chrono::Duration::days(365 * 200))?;
    if from >= to {
        return Err(invalid("to", "must be after from"));
    }
    let w = ws(&st, &who).await?;
    let report = st.billing.unattributed(&w, from, to, q.customer_id.as_deref()).await?;
    Ok(Json(serde_json::to_value(report).map_err(ApiError::internal)?))
}

// ------------------------------------------------------------- invoices

/// `GET /v1/invoices` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct InvoiceQuery {
    /// Only this customer's.
    pub customer_id: Option<String>,
    /// Only this subscription's.
    pub subscription_id: Option<String>,
    /// `draft`, `finalized`, `paid` or `void`.
    pub status: Option<String>,
    /// Only made by this billing run.
    pub run_id: Option<String>,
    /// Cursor.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
    /// `asc` (oldest first, the default) or `desc`.
    pub order: Option<String>,
}

/// Invoices, oldest first (`order=desc`: newest first).
#[utoipa::path(get, path = "/v1/invoices", params(InvoiceQuery), tag = "billing", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_invoices(State(st): State<AppState>, who: Principal, Query(q): Query<InvoiceQuery>) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let status = match &q.status {
        Some(s) => Some(s.parse::<sluice_billing::invoice::InvoiceStatus>().map_err(|e| invalid("status", e.to_string()))?),
        None => None,
    };
    let f = InvoiceFilter { customer_id: q.customer_id, subscription_id: q.subscription_id, status, run_id: q.run_id };
    let order = super::jobs::sort_order(q.order.as_deref())?;
    let page = st.store.list_invoices_in(who.workspace.as_str(), &f, order, q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.iter().map(view).collect(), next_cursor: page.next_cursor }))
}

/// One invoice (a draft is recomputed with late usage first);
/// `{id}.html` renders it, `{id}.pdf` as PDF.
#[utoipa::path(get, path = "/v1/invoices/{id}", tag = "billing", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_invoice(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Response, ApiError> {
    who.require_read()?;
    let w = ws(&st, &who).await?;
    if let Some(id) = id.strip_suffix(".html") {
        let row = st.billing.invoice(&w, id).await?;
        let inv: Invoice = serde_json::from_value(row.doc.clone()).map_err(ApiError::internal)?;
        let html = sluice_billing::render::html(&inv, row.status, row.number.as_deref(), row.finalized_at);
        return Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response());
    }
    if let Some(id) = id.strip_suffix(".pdf") {
        let row = st.billing.invoice(&w, id).await?;
        let inv: Invoice = serde_json::from_value(row.doc.clone()).map_err(ApiError::internal)?;
        let (status, number, issued) = (row.status, row.number.clone(), row.finalized_at);
        let pdf = tokio::task::spawn_blocking(move || sluice_billing::render::pdf(&inv, status, number.as_deref(), issued))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
        let name = format!("attachment; filename=\"{}.pdf\"", row.number.as_deref().unwrap_or(&row.id));
        return Ok(([(header::CONTENT_TYPE, "application/pdf".to_owned()), (header::CONTENT_DISPOSITION, name)], pdf).into_response());
    }
    let row = st.billing.invoice(&w, &id).await?;
    Ok(Json(view(&row)).into_response())
}

/// Finalizes a draft: recomputed, numbered, frozen.
#[utoipa::path(post, path = "/v1/invoices/{id}/finalize", tag = "billing", responses((status = 200), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn finalize_invoice(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let w = ws(&st, &who).await?;
    let row = st.billing.finalize(&w, &id, &who.audit("invoice.finalize", "invoice", &id, json!({}))).await?;
    Ok(Json(view(&row)))
}

/// Voids a draft or finalized invoice (it keeps its number).
#[utoipa::path(post, path = "/v1/invoices/{id}/void", tag = "billing", responses((status = 200), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn void_invoice(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let w = ws(&st, &who).await?;
    let row = st.billing.void(&w, &id, &who.audit("invoice.void", "invoice", &id, json!({}))).await?;
    Ok(Json(view(&row)))
}

/// Marks a finalized invoice paid.
#[utoipa::path(post, path = "/v1/invoices/{id}/mark-paid", tag = "billing", responses((status = 200), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn mark_paid(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    let w = ws(&st, &who).await?;
    let row = st.billing.mark_paid(&w, &id, &who.audit("invoice.mark_paid", "invoice", &id, json!({}))).await?;
    Ok(Json(view(&row)))
}

// --------------------------------------------------------- billing runs

/// Body of `POST /v1/billing-runs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// Subscriptions to bill.
    pub subscription_ids: Option<Vec<String>>,
    /// Or those matching this (`plan`, `customer_ids`, `due`).
    #[schema(value_type = Object)]
    pub filter: Option<RunFilter>,
    /// Finalize the invoices (default true).
    pub finalize: Option<bool>,
    /// RFC 3339, or `"now"` (also bills the current period early).
    pub until: Option<String>,
    /// Compute and return the invoices without writing anything.
    pub dry_run: Option<bool>,
}

/// `?wait=true`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WaitQuery {
    /// Wait (up to 30 s) for the run to finish.
    pub wait: Option<bool>,
}

/// Most subscriptions a dry run computes (it answers in the request).
pub const DRY_RUN_MAX: usize = 1000;

async fn run_view(st: &AppState, j: &Job, all_ids: bool) -> Result<Value, ApiError> {
    let p = RunPayload::of(j).ok();
    let r: Option<RunResult> = j.result.clone().and_then(|r| serde_json::from_value(r).ok());
    let mut ids = st.store.run_invoice_ids(&j.id).await?;
    let created = ids.len();
    let truncated = !all_ids && ids.len() > 100;
    if truncated {
        ids.truncate(100);
    }
    Ok(json!({
        "id": j.id,
        "status": j.state,
        "subscriptions_total": r.as_ref().map(|r| r.subscriptions_total as i64).or(j.progress_total),
        "subscriptions_done": r.as_ref().map_or(j.progress_done, |r| r.subscriptions_done as i64),
        "invoices_created": created,
        "invoice_ids": ids,
        "invoice_ids_truncated": truncated,
        "errors": r.as_ref().map(|r| json!(r.errors)).unwrap_or(json!([])),
        "error": j.error,
        "finalize": p.as_ref().map(|p| p.finalize),
        "until": p.as_ref().map(|p| p.until),
        "early": p.as_ref().map(|p| p.early),
        "auto": p.as_ref().map(|p| p.auto),
        "filter": p.as_ref().and_then(|p| p.filter.clone()),
        "subscription_ids": p.as_ref().and_then(|p| p.subscription_ids.clone()),
        "created_at": rfc3339(j.created_at),
        "started_at": j.started_at.map(rfc3339),
        "finished_at": j.finished_at.map(rfc3339),
        "duration_ms": r.as_ref().map(|r| r.duration_ms),
    }))
}

/// Starts a billing run (a `billing.run` job): `202` with the run, or with
/// `?wait=true` the finished run; `dry_run: true` answers `200` with the
/// invoices it would make and writes nothing.
#[utoipa::path(post, path = "/v1/billing-runs", request_body = CreateRun, params(WaitQuery), tag = "billing",
    responses((status = 202), (status = 200), (status = 400)), security(("bearer" = [])))]
pub async fn create_run(
    State(st): State<AppState>,
    who: Principal,
    Query(q): Query<WaitQuery>,
    Json(b): Json<CreateRun>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    let now = Utc::now();
    let (until, early) = match b.until.as_deref() {
        None => (now, false),
        Some("now") => (now, true),
        Some(t) => (
            DateTime::parse_from_rfc3339(t)
                .map_err(|_| invalid("until", "must be \"now\" or an RFC 3339 time such as 2026-01-31T15:00:00Z"))?
                .with_timezone(&Utc),
            false,
        ),
    };
    match (&b.subscription_ids, &b.filter) {
        (None, None) => return Err(invalid("subscription_ids", "give subscription_ids or a filter (for example {\"due\": true})")),
        (Some(_), Some(_)) => return Err(invalid("filter", "give either subscription_ids or a filter, not both")),
        (Some(ids), None) if ids.is_empty() => return Err(invalid("subscription_ids", "must not be empty")),
        (Some(ids), None) if ids.len() > 1_000_000 => return Err(invalid("subscription_ids", "at most 1,000,000")),
        _ => {}
    }
    let payload = RunPayload {
        v: 1,
        workspace: who.workspace.clone(),
        subscription_ids: b.subscription_ids,
        filter: b.filter,
        finalize: b.finalize.unwrap_or(true),
        respect_grace: b.finalize.is_none(),
        until,
        early,
        auto: false,
    };
    if b.dry_run == Some(true) {
        let w = ws(&st, &who).await?;
        let ids = sluice_billing::run::select(&st.billing, &payload).await?;
        if ids.len() > DRY_RUN_MAX {
            return Err(invalid("dry_run", format!("a dry run computes at most {DRY_RUN_MAX} subscriptions; this selection has {}", ids.len())));
        }
        let opts = BillOptions {
            until,
            early,
            finalize: payload.finalize,
            respect_grace: payload.respect_grace,
            run_id: None,
            dry_run: true,
            not_before: None,
        };
        let mut invoices = Vec::new();
        let mut errors = Vec::new();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        for (id, r) in st.billing.bill_many(&w, &refs, &opts).await? {
            match r {
                Ok(v) => invoices.extend(v),
                Err(BillingError::Store(e)) if !e.is_permanent() => return Err(e.into()),
                Err(e) => errors.push(json!({"subscription_id": id, "message": e.to_string()})),
            }
        }
        return Ok((
            StatusCode::OK,
            Json(json!({"dry_run": true, "subscriptions_total": ids.len(), "invoices": invoices, "errors": errors, "until": until, "early": early})),
        ));
    }
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_billing::run::KIND.into(),
            payload: payload.to_value(),
            max_attempts: 5,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    let audit = who.audit("billing_run.create", "billing_run", &job.id, json!({"finalize": payload.finalize, "until": until, "early": early}));
    super::record_audit(&st, &audit).await;
    if q.wait == Some(true) {
        let (j, ended) = super::jobs::wait_for(&st, who.workspace.as_str(), &job.id).await?;
        return Ok((if ended { StatusCode::OK } else { StatusCode::ACCEPTED }, Json(run_view(&st, &j, true).await?)));
    }
    Ok((StatusCode::ACCEPTED, Json(run_view(&st, &job, true).await?)))
}

async fn run_job(st: &AppState, who: &Principal, id: &str) -> Result<Job, ApiError> {
    let j = st.store.get_job(Some(who.workspace.as_str()), id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("billing run {id:?} not found")),
        o => o.into(),
    })?;
    if j.kind != sluice_billing::run::KIND {
        return Err(ApiError::not_found(format!("billing run {id:?} not found")));
    }
    Ok(j)
}

/// One billing run with its progress, invoices and errors (live progress:
/// `GET /v1/jobs/{id}/events`).
#[utoipa::path(get, path = "/v1/billing-runs/{id}", tag = "billing", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_run(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let j = run_job(&st, &who, &id).await?;
    Ok(Json(run_view(&st, &j, true).await?))
}

/// `GET /v1/billing-runs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct RunListQuery {
    /// Cursor.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
}

/// Billing runs (each with its first 100 invoice ids).
#[utoipa::path(get, path = "/v1/billing-runs", params(RunListQuery), tag = "billing", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_runs(State(st): State<AppState>, who: Principal, Query(q): Query<RunListQuery>) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let order = super::jobs::sort_order(q.order.as_deref())?;
    let page = st
        .store
        .list_jobs_in(who.workspace.as_str(), Some(sluice_billing::run::KIND), None, order, q.cursor.as_deref(), q.limit.unwrap_or(100))
        .await?;
    let mut data = Vec::with_capacity(page.data.len());
    for j in &page.data {
        data.push(run_view(&st, j, false).await?);
    }
    Ok(Json(List { data, next_cursor: page.next_cursor }))
}

/// Cancels a queued run at once, a running one after the subscription it
/// is billing (what it billed stays billed).
#[utoipa::path(post, path = "/v1/billing-runs/{id}/cancel", tag = "billing", responses((status = 200), (status = 404), (status = 409)), security(("bearer" = [])))]
pub async fn cancel_run(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    run_job(&st, &who, &id).await?;
    let j = st.store.cancel_job(who.workspace.as_str(), &id).await?;
    let audit = who.audit("billing_run.cancel", "billing_run", &id, json!({}));
    super::record_audit(&st, &audit).await;
    Ok(Json(run_view(&st, &j, true).await?))
}

// ------------------------------------------------------------- settings

/// Body of `PATCH /v1/workspaces/{name}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchWorkspace {
    /// Billing settings to change (only the fields given).
    #[schema(value_type = Object)]
    pub billing: Option<Value>,
}

/// Changes a workspace's settings (admin of it, or root).
#[utoipa::path(patch, path = "/v1/workspaces/{name}", request_body = PatchWorkspace, tag = "workspaces",
    responses((status = 200), (status = 400), (status = 404)), security(("bearer" = [])))]
pub async fn patch_workspace(
    State(st): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    Json(b): Json<PatchWorkspace>,
) -> Result<Json<Value>, ApiError> {
    if !who.scope.is_root() {
        who.require_admin()?;
        if name != who.workspace.as_str() {
            return Err(ApiError::not_found(format!("workspace {name:?} not found")));
        }
    }
    let w = st.store.get_workspace(&name).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("workspace {name:?} not found")),
        other => other.into(),
    })?;
    if let Some(patch) = &b.billing {
        let current = st.billing.settings(&name).await?;
        let next = current.patched(patch).map_err(BillingError::from)?;
        let doc = serde_json::to_value(&next).map_err(ApiError::internal)?;
        let audit = sluice_store::NewAudit { workspace: name.clone(), ..who.audit("workspace.billing", "workspace", &name, patch.clone()) };
        st.store.put_billing_settings(&name, &doc, &audit).await?;
    }
    let billing = st.billing.settings(&name).await?;
    Ok(Json(json!({"name": w.name, "time_zone": w.time_zone, "created_at": rfc3339(w.created_at), "billing": billing})))
}
