//! The audit log: every operator and admin action, written in the same
//! transaction as the action (an action without its audit entry cannot
//! commit).

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, Page, Result, Store};

/// An action to record.
#[derive(Debug, Clone)]
pub struct NewAudit {
    /// Workspace the action concerns (its admins can read the entry).
    pub workspace: String,
    /// Key that acted (None for the system, e.g. bootstrap).
    pub actor_key_id: Option<String>,
    /// What happened, e.g. `key.create`, `key.revoke`, `workspace.create`.
    pub action: String,
    /// Kind of the object acted on, e.g. `key`, `workspace`.
    pub target_type: String,
    /// Id of the object acted on.
    pub target_id: String,
    /// Anything else worth keeping (never secrets).
    pub details: Value,
}

impl NewAudit {
    /// This entry with `count` (how many objects a bulk action changed)
    /// added to its details.
    pub(crate) fn with_count(&self, count: u64) -> NewAudit {
        let mut a = self.clone();
        a.details["count"] = Value::from(count);
        a
    }
}

/// A recorded action.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Time-ordered id, `aud_…`.
    pub id: String,
    /// Workspace.
    pub workspace: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor_key_id: Option<String>,
    /// What.
    pub action: String,
    /// On what kind of object.
    pub target_type: String,
    /// On which object.
    pub target_id: String,
    /// Details.
    pub details: Value,
}

/// Inserts an audit entry inside an open transaction `$tx` (either backend).
macro_rules! insert_audit {
    ($tx:expr, $a:expr) => {{
        let a: &$crate::audit::NewAudit = $a;
        sqlx::query(
            "INSERT INTO audit_log (id, workspace, at, actor_key_id, action, target_type, target_id, details) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(format!("aud_{}", uuid::Uuid::now_v7().simple()))
        .bind(&a.workspace)
        .bind($crate::to_micros(chrono::Utc::now()))
        .bind(&a.actor_key_id)
        .bind(&a.action)
        .bind(&a.target_type)
        .bind(&a.target_id)
        .bind(a.details.to_string())
        .execute(&mut *$tx)
        .await?;
    }};
}
pub(crate) use insert_audit;

type AuditRow = (String, String, i64, Option<String>, String, String, String, String);

impl Store {
    /// Records an action on its own (for actions that are not a single store write).
    pub async fn record_audit(&self, a: &NewAudit) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            insert_audit!(tx, a);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Audit entries of a workspace, oldest first, after `cursor` (an entry id).
    pub async fn list_audit(&self, workspace: &str, cursor: Option<&str>, limit: usize) -> Result<Page<AuditEntry>> {
        let limit = clamp_limit(limit);
        let rows: Vec<AuditRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, workspace, at, actor_key_id, action, target_type, target_id, details FROM audit_log \
             WHERE workspace = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(workspace).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        let rows = rows
            .into_iter()
            .map(|(id, workspace, at, actor_key_id, action, target_type, target_id, details)| AuditEntry {
                id,
                workspace,
                at: from_micros(at),
                actor_key_id,
                action,
                target_type,
                target_id,
                details: serde_json::from_str(&details).unwrap_or(Value::Null),
            })
            .collect();
        Ok(Page::from_overfetch(rows, limit, |e: &AuditEntry| e.id.clone()))
    }
}
