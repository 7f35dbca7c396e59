//! User and customer records (derived from identify / group / alias events).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{clamp_limit, from_micros, on_pool, Page, Result, Store};

/// A user as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    /// User id.
    pub user_id: String,
    /// Traits (merged, last write wins).
    pub traits: Value,
    /// The customer of the user's latest group call.
    pub customer_id: Option<String>,
    /// Every customer the user was linked to.
    pub customers: Vec<String>,
    /// Earlier ids (aliases) that map to this user.
    pub aliases: Vec<String>,
    /// Earliest event time seen.
    pub first_seen: DateTime<Utc>,
    /// Event time of the latest trait update.
    pub updated_at: DateTime<Utc>,
}

/// A customer as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerRecord {
    /// Customer id.
    pub customer_id: String,
    /// Attributes (merged, last write wins).
    pub attributes: Value,
    /// Users linked to the customer (only filled by [`Store::get_customer`]).
    pub users: Vec<String>,
    /// Earliest event time seen.
    pub first_seen: DateTime<Utc>,
    /// Event time of the latest attribute update.
    pub updated_at: DateTime<Utc>,
}

pub(crate) fn parse_map(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Applies record effects inside an open transaction `$tx` (either backend).
/// Each effect reads the current row, merges in Rust and writes it back, so
/// the SQL is the same on both backends and re-applying an effect (rebuild
/// from the log) changes nothing.
macro_rules! apply_effects {
    ($tx:expr, $effects:expr) => {{
        use sluice_core::RecordEffect as E;
        for effect in $effects {
            match effect {
                E::UpsertUser { workspace, user_id, traits, at } => {
                    let row: Option<(String, i64, i64)> =
                        sqlx::query_as("SELECT traits, first_seen, updated_at FROM users WHERE workspace = $1 AND user_id = $2")
                            .bind(workspace)
                            .bind(user_id)
                            .fetch_optional(&mut *$tx)
                            .await?;
                    let (old, first, old_at) = match row {
                        Some((t, f, u)) => (crate::people::parse_map(&t), f, crate::from_micros(u)),
                        None => (serde_json::Map::new(), i64::MAX, chrono::DateTime::<chrono::Utc>::MIN_UTC),
                    };
                    let (merged, new_at) = sluice_core::people::merge_lww(old, old_at, traits, *at);
                    sqlx::query(
                        "INSERT INTO users (workspace, user_id, traits, first_seen, updated_at) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (workspace, user_id) DO UPDATE SET traits = excluded.traits, \
                         first_seen = excluded.first_seen, updated_at = excluded.updated_at",
                    )
                    .bind(workspace)
                    .bind(user_id)
                    .bind(serde_json::Value::Object(merged).to_string())
                    .bind(first.min(crate::to_micros(*at)))
                    .bind(crate::to_micros(new_at))
                    .execute(&mut *$tx)
                    .await?;
                }
                E::UpsertCustomer { workspace, customer_id, attributes, at } => {
                    let row: Option<(String, i64, i64)> =
                        sqlx::query_as("SELECT attributes, first_seen, updated_at FROM customers WHERE workspace = $1 AND customer_id = $2")
                            .bind(workspace)
                            .bind(customer_id)
                            .fetch_optional(&mut *$tx)
                            .await?;
                    let (old, first, old_at) = match row {
                        Some((t, f, u)) => (crate::people::parse_map(&t), f, crate::from_micros(u)),
                        None => (serde_json::Map::new(), i64::MAX, chrono::DateTime::<chrono::Utc>::MIN_UTC),
                    };
                    let (merged, new_at) = sluice_core::people::merge_lww(old, old_at, attributes, *at);
                    sqlx::query(
                        "INSERT INTO customers (workspace, customer_id, attributes, first_seen, updated_at) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (workspace, customer_id) DO UPDATE SET attributes = excluded.attributes, \
                         first_seen = excluded.first_seen, updated_at = excluded.updated_at",
                    )
                    .bind(workspace)
                    .bind(customer_id)
                    .bind(serde_json::Value::Object(merged).to_string())
                    .bind(first.min(crate::to_micros(*at)))
                    .bind(crate::to_micros(new_at))
                    .execute(&mut *$tx)
                    .await?;
                }
                E::LinkUser { workspace, user_id, customer_id, at } => {
                    let at = crate::to_micros(*at);
                    let link: Option<(i64,)> =
                        sqlx::query_as("SELECT linked_at FROM user_customers WHERE workspace = $1 AND user_id = $2 AND customer_id = $3")
                            .bind(workspace)
                            .bind(user_id)
                            .bind(customer_id)
                            .fetch_optional(&mut *$tx)
                            .await?;
                    if link.is_none_or(|(l,)| at > l) {
                        sqlx::query(
                            "INSERT INTO user_customers (workspace, user_id, customer_id, linked_at) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (workspace, user_id, customer_id) DO UPDATE SET linked_at = excluded.linked_at",
                        )
                        .bind(workspace)
                        .bind(user_id)
                        .bind(customer_id)
                        .bind(at)
                        .execute(&mut *$tx)
                        .await?;
                    }
                    let user: Option<(Option<String>, Option<i64>, i64)> =
                        sqlx::query_as("SELECT customer_id, customer_linked_at, first_seen FROM users WHERE workspace = $1 AND user_id = $2")
                            .bind(workspace)
                            .bind(user_id)
                            .fetch_optional(&mut *$tx)
                            .await?;
                    match user {
                        None => {
                            sqlx::query(
                                "INSERT INTO users (workspace, user_id, traits, customer_id, customer_linked_at, first_seen, updated_at) \
                                 VALUES ($1, $2, '{}', $3, $4, $4, $5)",
                            )
                            .bind(workspace)
                            .bind(user_id)
                            .bind(customer_id)
                            .bind(at)
                            .bind(at)
                            .execute(&mut *$tx)
                            .await?;
                        }
                        Some((cur, cur_at, first)) => {
                            // Latest link wins; ties go to the larger id so that
                            // the result does not depend on arrival order.
                            let newer = match (cur.as_deref(), cur_at) {
                                (Some(c), Some(t)) => at > t || (at == t && customer_id.as_str() > c),
                                _ => true,
                            };
                            if newer || at < first {
                                sqlx::query(
                                    "UPDATE users SET customer_id = $1, customer_linked_at = $2, first_seen = $3 \
                                     WHERE workspace = $4 AND user_id = $5",
                                )
                                .bind(if newer { Some(customer_id.clone()) } else { cur })
                                .bind(if newer { Some(at) } else { cur_at })
                                .bind(first.min(at))
                                .bind(workspace)
                                .bind(user_id)
                                .execute(&mut *$tx)
                                .await?;
                            }
                        }
                    }
                }
                E::Alias { workspace, previous_id, user_id, at } => {
                    let at = crate::to_micros(*at);
                    let cur: Option<(i64,)> = sqlx::query_as("SELECT aliased_at FROM user_aliases WHERE workspace = $1 AND previous_id = $2")
                        .bind(workspace)
                        .bind(previous_id)
                        .fetch_optional(&mut *$tx)
                        .await?;
                    if cur.is_none_or(|(t,)| at > t) {
                        sqlx::query(
                            "INSERT INTO user_aliases (workspace, previous_id, user_id, aliased_at) VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (workspace, previous_id) DO UPDATE SET user_id = excluded.user_id, aliased_at = excluded.aliased_at",
                        )
                        .bind(workspace)
                        .bind(previous_id)
                        .bind(user_id)
                        .bind(at)
                        .execute(&mut *$tx)
                        .await?;
                    }
                }
            }
        }
    }};
}
pub(crate) use apply_effects;

/// A customer row (id, attributes, first seen, updated), without its users.
fn customer_row((id, a, f, u): (String, String, i64, i64)) -> CustomerRecord {
    CustomerRecord {
        customer_id: id,
        attributes: Value::Object(parse_map(&a)),
        users: vec![],
        first_seen: from_micros(f),
        updated_at: from_micros(u),
    }
}

impl Store {
    /// One user with its customers and aliases.
    pub async fn get_user(&self, workspace: &str, user_id: &str) -> Result<Option<UserRecord>> {
        let row: Option<(String, Option<String>, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT traits, customer_id, first_seen, updated_at FROM users WHERE workspace = $1 AND user_id = $2")
            .bind(workspace).bind(user_id).fetch_optional(pool).await)?;
        let Some((traits, customer_id, first, updated)) = row else { return Ok(None) };
        let customers: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT customer_id FROM user_customers WHERE workspace = $1 AND user_id = $2 ORDER BY linked_at, customer_id")
            .bind(workspace).bind(user_id).fetch_all(pool).await)?;
        let aliases: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT previous_id FROM user_aliases WHERE workspace = $1 AND user_id = $2 ORDER BY previous_id")
            .bind(workspace).bind(user_id).fetch_all(pool).await)?;
        Ok(Some(UserRecord {
            user_id: user_id.to_owned(),
            traits: Value::Object(parse_map(&traits)),
            customer_id,
            customers: customers.into_iter().map(|(c,)| c).collect(),
            aliases: aliases.into_iter().map(|(a,)| a).collect(),
            first_seen: from_micros(first),
            updated_at: from_micros(updated),
        }))
    }

    /// One customer with its users.
    pub async fn get_customer(&self, workspace: &str, customer_id: &str) -> Result<Option<CustomerRecord>> {
        let row: Option<(String, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT attributes, first_seen, updated_at FROM customers WHERE workspace = $1 AND customer_id = $2")
            .bind(workspace).bind(customer_id).fetch_optional(pool).await)?;
        let Some((attrs, first, updated)) = row else { return Ok(None) };
        let users: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT user_id FROM user_customers WHERE workspace = $1 AND customer_id = $2 ORDER BY user_id")
            .bind(workspace).bind(customer_id).fetch_all(pool).await)?;
        Ok(Some(CustomerRecord {
            customer_id: customer_id.to_owned(),
            attributes: Value::Object(parse_map(&attrs)),
            users: users.into_iter().map(|(u,)| u).collect(),
            first_seen: from_micros(first),
            updated_at: from_micros(updated),
        }))
    }

    /// Customers of a workspace ordered by id.
    pub async fn list_customers(&self, workspace: &str, cursor: Option<&str>, limit: usize) -> Result<Page<CustomerRecord>> {
        let limit = clamp_limit(limit);
        let rows: Vec<(String, String, i64, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT customer_id, attributes, first_seen, updated_at FROM customers \
             WHERE workspace = $1 AND customer_id > $2 ORDER BY customer_id LIMIT $3")
            .bind(workspace).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        let rows = rows.into_iter().map(customer_row).collect();
        Ok(Page::from_overfetch(rows, limit, |c: &CustomerRecord| c.customer_id.clone()))
    }

    /// Ids of a workspace's customers — of `group` calls, and those
    /// customer health has evaluated (known from their events or API
    /// attributes only) — after `cursor`, in the database's order of ids
    /// (the same order its `>` pages by).
    pub async fn customer_ids_with_health(&self, workspace: &str, cursor: Option<&str>, limit: usize) -> Result<Page<String>> {
        let limit = clamp_limit(limit);
        let rows: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT customer_id FROM customers WHERE workspace = $1 AND customer_id > $2 \
             UNION SELECT customer_id FROM customer_health WHERE workspace = $1 AND customer_id > $2 \
             ORDER BY customer_id LIMIT $3")
            .bind(workspace).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        Ok(Page::from_overfetch(rows.into_iter().map(|(c,)| c).collect(), limit, String::clone))
    }

    /// The records of these customers (those that have one; no users).
    pub async fn customers_by_ids(&self, workspace: &str, ids: &[&str]) -> Result<Vec<CustomerRecord>> {
        let rows: Vec<(String, String, i64, i64)> = self
            .select_in(
                "SELECT customer_id, attributes, first_seen, updated_at FROM customers WHERE workspace = $1 AND customer_id IN ({in})",
                workspace,
                ids,
            )
            .await?;
        Ok(rows.into_iter().map(customer_row).collect())
    }

    /// The current customer of each of `user_ids` that has one.
    pub async fn customers_of_users(&self, workspace: &str, user_ids: &[&str]) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        for chunk in user_ids.chunks(500) {
            let rows: Vec<(String, String)> = match self {
                Store::Sqlite(pool) => {
                    sqlx::query_as(
                        "SELECT user_id, customer_id FROM users WHERE workspace = $1 AND customer_id IS NOT NULL \
                     AND user_id IN (SELECT value FROM json_each($2))",
                    )
                    .bind(workspace)
                    .bind(serde_json::to_string(chunk).unwrap_or_else(|_| "[]".into()))
                    .fetch_all(pool)
                    .await?
                }
                Store::Postgres(pool) => {
                    sqlx::query_as("SELECT user_id, customer_id FROM users WHERE workspace = $1 AND customer_id IS NOT NULL AND user_id = ANY($2)")
                        .bind(workspace)
                        .bind(chunk)
                        .fetch_all(pool)
                        .await?
                }
            };
            out.extend(rows);
        }
        Ok(out)
    }
}
