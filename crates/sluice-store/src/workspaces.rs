//! Workspaces: the tenant boundary.

use chrono::{DateTime, Utc};

use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, to_micros, NewApiKey, NewAudit, Page, Result, Store, StoreError};

/// A workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    /// Unique, immutable name.
    pub name: String,
    /// IANA time zone used for every period boundary.
    pub time_zone: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct WorkspaceRow {
    name: String,
    time_zone: String,
    created_at: i64,
}

impl From<WorkspaceRow> for Workspace {
    fn from(r: WorkspaceRow) -> Self {
        Workspace { name: r.name, time_zone: r.time_zone, created_at: from_micros(r.created_at) }
    }
}

impl Store {
    /// Creates a workspace; [`StoreError::Conflict`] if the name is taken.
    pub async fn create_workspace(&self, name: &str, time_zone: &str, audit: &NewAudit) -> Result<Workspace> {
        let now = Utc::now();
        let conflict = |e| StoreError::conflict_on_unique(e, format!("workspace {name:?} already exists"));
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query("INSERT INTO workspaces (name, time_zone, created_at) VALUES ($1, $2, $3)")
                .bind(name).bind(time_zone).bind(to_micros(now))
                .execute(&mut *tx).await.map_err(conflict)?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        Ok(Workspace { name: name.to_owned(), time_zone: time_zone.to_owned(), created_at: from_micros(to_micros(now)) })
    }

    /// One workspace by name.
    pub async fn get_workspace(&self, name: &str) -> Result<Workspace> {
        let row: Option<WorkspaceRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT name, time_zone, created_at FROM workspaces WHERE name = $1")
            .bind(name).fetch_optional(pool).await)?;
        row.map(Into::into).ok_or(StoreError::NotFound)
    }

    /// Workspaces ordered by name, after `cursor` (a name).
    pub async fn list_workspaces(&self, cursor: Option<&str>, limit: usize) -> Result<Page<Workspace>> {
        let limit = clamp_limit(limit);
        let rows: Vec<WorkspaceRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT name, time_zone, created_at FROM workspaces WHERE name > $1 ORDER BY name LIMIT $2")
            .bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        let rows = rows.into_iter().map(Workspace::from).collect();
        Ok(Page::from_overfetch(rows, limit, |w: &Workspace| w.name.clone()))
    }

    /// On an empty store, creates workspace `default` (UTC) and the root key
    /// in one transaction and returns `true`. Returns `false`, changing
    /// nothing, if any workspace exists. Safe to race from several processes.
    pub async fn bootstrap(&self, root_key: &NewApiKey) -> Result<bool> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM workspaces").fetch_one(&mut *tx).await?;
            if n > 0 {
                return Ok(false);
            }
            let inserted = sqlx::query(
                "INSERT INTO workspaces (name, time_zone, created_at) VALUES ('default', 'UTC', $1) ON CONFLICT DO NOTHING")
                .bind(now).execute(&mut *tx).await?.rows_affected();
            if inserted == 0 {
                return Ok(false);
            }
            crate::keys::insert_key_query(root_key, now).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }
}
