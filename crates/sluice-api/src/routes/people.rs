//! `/v1/customers` and `/v1/users`: records derived from `identify`,
//! `group` and `alias` events (see `sluice_core::people`).

use crate::json::Query;
use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::Value;
use sluice_store::{CustomerRecord, UserRecord};

use super::{rfc3339, List, PageQuery};
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

/// Customers of the workspace, by id.
#[utoipa::path(get, path = "/v1/customers", params(PageQuery), tag = "customers",
    responses((status = 200, description = "`{data: [Customer], next_cursor}`")), security(("bearer" = [])))]
pub async fn list_customers(State(st): State<AppState>, who: Principal, Query(q): Query<PageQuery>) -> Result<Json<List<CustomerView>>, ApiError> {
    who.require_read()?;
    let page = st.store.list_customers(who.workspace.as_str(), q.cursor.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(Json(List { data: page.data.into_iter().map(|c| CustomerView::new(c, false)).collect(), next_cursor: page.next_cursor }))
}

/// One customer with its users.
#[utoipa::path(get, path = "/v1/customers/{id}", tag = "customers",
    responses((status = 200, body = CustomerView), (status = 404)), security(("bearer" = [])))]
pub async fn get_customer(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<CustomerView>, ApiError> {
    who.require_read()?;
    st.store
        .get_customer(who.workspace.as_str(), &id)
        .await?
        .map(|c| Json(CustomerView::new(c, true)))
        .ok_or_else(|| ApiError::not_found(format!("customer {id:?} not found")))
}

/// One user.
#[utoipa::path(get, path = "/v1/users/{id}", tag = "customers",
    responses((status = 200, body = UserView), (status = 404)), security(("bearer" = [])))]
pub async fn get_user(State(st): State<AppState>, who: Principal, Path(id): Path<String>) -> Result<Json<UserView>, ApiError> {
    who.require_read()?;
    st.store.get_user(who.workspace.as_str(), &id).await?.map(|u| Json(u.into())).ok_or_else(|| ApiError::not_found(format!("user {id:?} not found")))
}
