//! `/v1/customers` and `/v1/users`: records derived from `identify`,
//! `group` and `alias` events (see `sluice_core::people`).

use crate::json::Query;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sluice_store::{CustomerRecord, HealthSort, UserRecord};

use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

/// A customer (account).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CustomerView {
    /// Customer id (Segment `groupId`).
    pub customer_id: String,
    /// Attributes (traits of `group` calls, merged, last write wins by event time).
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// Users linked to the customer (single-customer reads only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// Earliest event time seen (RFC 3339).
    pub first_seen_at: String,
    /// Event time of the latest attribute update.
    pub updated_at: String,
}

impl CustomerView {
    fn new(c: CustomerRecord, with_users: bool) -> Self {
        CustomerView {
            customer_id: c.customer_id,
            attributes: c.attributes,
            users: with_users.then_some(c.users),
            first_seen_at: rfc3339(c.first_seen),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// A user.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    /// User id.
    pub user_id: String,
    /// Traits (of `identify` calls, merged, last write wins by event time).
    #[schema(value_type = Object)]
    pub traits: Value,
    /// Customer of the user's latest `group` call.
    pub customer_id: Option<String>,
    /// Every customer the user was linked to.
    pub customers: Vec<String>,
    /// Earlier ids (`alias` `previousId`) of this user.
    pub aliases: Vec<String>,
    /// Earliest event time seen.
    pub first_seen_at: String,
    /// Event time of the latest trait update.
    pub updated_at: String,
}

impl From<UserRecord> for UserView {
    fn from(u: UserRecord) -> Self {
        UserView {
            user_id: u.user_id,
            traits: u.traits,
            customer_id: u.customer_id,
            customers: u.customers,
            aliases: u.aliases,
            first_seen_at: rfc3339(u.first_seen),
            updated_at: rfc3339(u.updated_at),
        }
    }
}

/// `GET /v1/customers` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CustomersQuery {
    /// Cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
    /// Only customers in this stage (health).
    pub stage: Option<String>,
    /// Only customers in this band: `good`, `normal` or `bad`.
    pub band: Option<String>,
    /// `priority` (highest first), `score` (lowest first), `-score`
    /// (highest first) or `id` (the default).
    pub sort: Option<String>,
}

/// The health summary of a customer: its fields at the top level of the
/// customer, and the same under `health` for a list row.
fn summary(h: &sluice_store::CustomerHealthRow) -> Map<String, Value> {
    let v = json!({"stage": h.stage, "band": h.band, "score": h.score, "priority": h.priority, "config_version": h.config_version,
        "evaluated_at": h.evaluated_at});
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn add_summary(v: &mut Value, h: &sluice_store::CustomerHealthRow) {
    if let Value::Object(m) = v {
        let s = summary(h);
        m.extend(s.clone());
        m.insert("health".into(), Value::Object(s));
    }
}

/// Customers of the workspace: by id, or by health (`stage`, `band`,
/// `sort=priority|score|-score`; priority is (100 − score) / 100 × mrr).
#[utoipa::path(get, path = "/v1/customers", params(CustomersQuery), tag = "customers",
    responses((status = 200, description = "`{data: [Customer], next_cursor}`")), security(("bearer" = [])))]
pub async fn list_customers(State(st): State<AppState>, who: Principal, Query(q): Query<CustomersQuery>) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let ws = who.workspace.as_str();
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let sort = match q.sort.as_deref() {
        None | Some("id") => HealthSort::Id,
        Some("priority") => HealthSort::Priority,
        Some("score") => HealthSort::Score,
        Some("-score") => HealthSort::ScoreDesc,
        Some(o) => return Err(ApiError::bad_request(format!("sort: {o:?} is not one of priority, score, -score, id"))),
    };
    if let Some(b) = q.band.as_deref() {
        if !["good", "normal", "bad"].contains(&b) {
            return Err(ApiError::bad_request(format!("band: {b:?} is not one of good, normal, bad")));
        }
    }
    let by_health = q.stage.is_some() || q.band.is_some() || sort != HealthSort::Id;
    if by_health {
        let after = match q.cursor.as_deref() {
            None => None,
            Some(c) => {
                let bad = || ApiError::bad_request("cursor: not a cursor of this list; start without one");
                let (v, id) = c.strip_prefix("h:").and_then(|c| c.split_once('|')).ok_or_else(bad)?;
                Some((v.parse::<f64>().map_err(|_| bad())?, id.to_owned()))
            }
        };
        let (rows, next) = st.store.list_customer_health(ws, q.stage.as_deref(), q.band.as_deref(), sort, after, limit).await?;
        let ids: Vec<&str> = rows.iter().map(|r| r.customer_id.as_str()).collect();
        let records = st.store.customers_by_ids(ws, &ids).await?;
        let kept = st.health.attributes_of(ws, &ids, None).await?;
        let mut data = Vec::with_capacity(rows.len());
        for h in &rows {
            let rec = records.iter().find(|c| c.customer_id == h.customer_id);
            let attributes = super::health::merged_attributes(rec.map(|c| &c.attributes), kept.get(&h.customer_id));
            // Known to health only (no `group` call): first seen by its events.
            let (first, updated) = match rec {
                Some(c) => (Some(c.first_seen), Some(c.updated_at)),
                None => {
                    let f = st.store.health_first_seen(ws, &h.customer_id).await?;
                    (f, f)
                }
            };
            let mut v = json!({"customer_id": h.customer_id, "attributes": attributes,
                "first_seen_at": first.map(rfc3339), "updated_at": updated.map(rfc3339)});
            add_summary(&mut v, h);
            data.push(v);
        }
        return Ok(Json(List { data, next_cursor: next.map(|(v, id)| format!("h:{v}|{id}")) }));
    }
    // By id: the customers of `group` calls and those known to health only
    // (events or API attributes), in one list ordered by the database.
    let page = st.store.customer_ids_with_health(ws, q.cursor.as_deref(), limit).await?;
    let ids: Vec<&str> = page.data.iter().map(String::as_str).collect();
    let records = st.store.customers_by_ids(ws, &ids).await?;
    let health = st.store.customers_health(ws, &ids).await?;
    let kept = st.health.attributes_of(ws, &ids, None).await?;
    let mut data = Vec::with_capacity(ids.len());
    for id in &ids {
        let mut v = match records.iter().find(|c| c.customer_id == *id) {
            Some(c) => {
                let attributes = super::health::merged_attributes(Some(&c.attributes), kept.get(*id));
                let mut v = serde_json::to_value(CustomerView::new(c.clone(), false)).unwrap_or(Value::Null);
                v["attributes"] = Value::Object(attributes);
                v
            }
            None => {
                let attributes = super::health::merged_attributes(None, kept.get(*id));
                let first = st.store.health_first_seen(ws, id).await?;
                json!({"customer_id": id, "attributes": attributes, "first_seen_at": first.map(rfc3339), "updated_at": first.map(rfc3339)})
            }
        };
        if let Some(h) = health.iter().find(|h| h.customer_id == *id) {
            add_summary(&mut v, h);
        }
        data.push(v);
    }
    Ok(Json(List { data, next_cursor: page.next_cursor }))
}

/// One customer with its users, its attributes (traits of `group` calls
/// and attributes set through the API) and its health.
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers",
    responses((status = 200, body = CustomerView), (status = 404)), security(("bearer" = [])))]
pub async fn get_customer(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let ws = who.workspace.as_str();
    let rec = st.store.get_customer(ws, &id).await?;
    let health = st.store.customer_health(ws, &id).await?;
    let mut v = match rec {
        Some(c) => {
            let attributes = super::health::current_attributes(&st, ws, &id, Some(&c.attributes)).await?;
            let mut v = serde_json::to_value(CustomerView::new(c, true)).unwrap_or(Value::Null);
            v["attributes"] = Value::Object(attributes);
            v
        }
        // Known to health only (events or attributes, no `group` call).
        None if st.store.health_customer_exists(ws, &id).await? => {
            let attributes = super::health::current_attributes(&st, ws, &id, None).await?;
            let first = st.store.health_first_seen(ws, &id).await?;
            json!({"customer_id": id, "attributes": attributes, "users": [], "first_seen_at": first.map(rfc3339), "updated_at": first.map(rfc3339)})
        }
        None => return Err(ApiError::not_found(format!("customer {id:?} not found"))),
    };
    if let (Value::Object(m), Some(h)) = (&mut v, &health) {
        m.extend(summary(h));
        m.insert("health".into(), serde_json::from_str(h.doc.get()).map_err(ApiError::internal)?);
    }
    Ok(Json(v))
}

/// One user.
#[utoipa::path(get, path = "/v1/users/{id}", tag = "customers",
    responses((status = 200, body = UserView), (status = 404)), security(("bearer" = [])))]
pub async fn get_user(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<UserView>, ApiError> {
    who.require_read()?;
    st.store.get_user(who.workspace.as_str(), &id).await?.map(|u| Json(u.into())).ok_or_else(|| ApiError::not_found(format!("user {id:?} not found")))
}
