//! Reads behind the dashboard's overview: what waits now, per workspace, and
//! what failed recently. Indexed by migration `0013_overview.sql`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::{on_pool, to_micros, Result, Store};

/// Work waiting in one workspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Jobs `queued`.
    pub jobs_queued: u64,
    /// Jobs `running`.
    pub jobs_running: u64,
    /// Dead letters with status `dead`.
    pub dead_letters: u64,
}

/// When a workspace's lists last changed; see [`Store::change_marks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeMarks {
    /// Latest `updated_at` of its jobs (imports and billing runs included).
    pub jobs: Option<i64>,
    /// Latest `updated_at` of its dead letters.
    pub dead_letters: Option<i64>,
}

impl Store {
    /// Waiting work of `workspace`, or of every workspace that has any.
    pub async fn waiting(&self, workspace: Option<&str>) -> Result<HashMap<String, Waiting>> {
        let jobs: Vec<(String, String, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT workspace, state, COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND ($1 IS NULL OR workspace = $1) \
             GROUP BY workspace, state")
            .bind(workspace).fetch_all(pool).await)?;
        let dead: Vec<(String, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT workspace, COUNT(*) FROM dead_letters WHERE status = 'dead' AND ($1 IS NULL OR workspace = $1) GROUP BY workspace")
            .bind(workspace).fetch_all(pool).await)?;
        let mut out: HashMap<String, Waiting> = HashMap::new();
        for (ws, state, n) in jobs {
            let w = out.entry(ws).or_default();
            let n = u64::try_from(n).unwrap_or(0);
            if state == "queued" {
                w.jobs_queued = n;
            } else {
                w.jobs_running = n;
            }
        }
        for (ws, n) in dead {
            out.entry(ws).or_default().dead_letters = u64::try_from(n).unwrap_or(0);
        }
        Ok(out)
    }

    /// When `workspace`'s jobs and dead letters last changed (Unix µs; every
    /// insert and update sets `updated_at`): `GET /v1/live` tells a
    /// dashboard which lists to read again when these move.
    pub async fn change_marks(&self, workspace: &str) -> Result<ChangeMarks> {
        let (jobs,): (Option<i64>,) =
            on_pool!(self, pool => sqlx::query_as("SELECT MAX(updated_at) FROM jobs WHERE workspace = $1").bind(workspace).fetch_one(pool).await)?;
        let (dead_letters,): (Option<i64>,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT MAX(updated_at) FROM dead_letters WHERE workspace = $1").bind(workspace).fetch_one(pool).await)?;
        Ok(ChangeMarks { jobs, dead_letters })
    }

    /// Jobs of `workspace` that ended `failed`, and events dead-lettered
    /// for it, since `since`.
    pub async fn failures_since(&self, workspace: &str, since: DateTime<Utc>) -> Result<(u64, u64)> {
        let since = to_micros(since);
        let (jobs,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM jobs WHERE workspace = $1 AND state = 'failed' AND finished_at >= $2")
            .bind(workspace).bind(since).fetch_one(pool).await)?;
        let (dead,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM dead_letters WHERE workspace = $1 AND first_failed_at >= $2")
            .bind(workspace).bind(since).fetch_one(pool).await)?;
        Ok((u64::try_from(jobs).unwrap_or(0), u64::try_from(dead).unwrap_or(0)))
    }
}
