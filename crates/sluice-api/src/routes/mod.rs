//! Route handlers, one module per API area.

pub mod audit;
pub mod billing;
pub mod consumers;
pub mod events;
pub mod health;
pub mod imports;
pub mod jobs;
pub mod keys;
pub mod lake;
pub mod live;
pub mod meters;
pub mod ops;
pub mod overview;
pub mod people;
pub mod segment;
pub mod sessions;
pub mod webhooks;
pub mod workspaces;

use serde::{Deserialize, Serialize};

/// `?cursor=&limit=` of list endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    /// Cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<usize>,
}

/// The list shape of every list endpoint.
#[derive(Debug, Serialize)]
pub struct List<T> {
    /// Items.
    pub data: Vec<T>,
    /// Cursor of the next page, `null` on the last page.
    pub next_cursor: Option<String>,
}

pub(crate) fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Writes the audit entry of an action that already happened (outside its
/// transaction: imports, job operations, sign-ins, …). A failure is logged,
/// never the request's error: the action itself succeeded.
pub(crate) async fn record_audit(st: &crate::state::AppState, entry: &sluice_store::NewAudit) {
    if let Err(e) = st.store.record_audit(entry).await {
        tracing::error!(error = %e, action = %entry.action, target = %entry.target_id, workspace = %entry.workspace, "could not write an audit entry");
    }
}
