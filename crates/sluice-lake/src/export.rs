//! Saved queries run as jobs (`query.export`), on request or on a cron
//! schedule, writing their result to `<lake>/exports/<workspace>/<path>` as
//! Parquet or CSV — files other tools read (the data-mart use case).
//!
//! Each run replaces the file atomically (temp file, fsync, rename), so a
//! reader sees the previous or the new result, never half a file. Schedules
//! are 5-field cron expressions in UTC (`minute hour day month weekday`,
//! e.g. `0 6 * * *`). The scheduler claims a due run by moving
//! `next_run_at` with a compare-and-set, so one run is queued per
//! occurrence even with several processes; a run missed while the server
//! was down is run once when it starts.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sluice_jobs::{JobContext, JobError, JobHandler};
use sluice_store::{Job, NewJob, Store};

use crate::sql::{encode, Format, SqlEngine};

/// Kind of the job.
pub const KIND: &str = "query.export";

/// Where and how a saved query's result is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// `parquet` or `csv`.
    pub format: Format,
    /// Path under `exports/<workspace>/`.
    pub path: PathBuf,
}

impl ExportSpec {
    /// Parses `{"format": "parquet"|"csv", "path": "relative/file"}`.
    pub fn parse(v: &Value) -> Result<ExportSpec, String> {
        let format = match v.get("format").and_then(Value::as_str).unwrap_or("parquet") {
            "parquet" => Format::Parquet,
            "csv" => Format::Csv,
            other => return Err(format!("format {other:?} is not parquet or csv")),
        };
        let path = v.get("path").and_then(Value::as_str).ok_or("path: required, a relative path such as daily/signups.parquet")?;
        let p = PathBuf::from(path);
        if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!("path {path:?} must be relative, without `..`"));
        }
        Ok(ExportSpec { format, path: p })
    }
}

/// The next run of a 5-field cron schedule strictly after `after` (UTC).
pub fn next_run(schedule: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("{schedule:?} is not a 5-field cron expression (minute hour day month weekday), e.g. \"0 6 * * *\""));
    }
    // The cron crate wants seconds first.
    let s = cron::Schedule::from_str(&format!("0 {schedule}")).map_err(|e| format!("{schedule:?}: {e}"))?;
    s.after(&after).next().ok_or_else(|| format!("{schedule:?} never runs"))
}

/// Runs saved queries and writes their exports.
pub struct QueryExport {
    /// The SQL engine.
    pub sql: SqlEngine,
    /// Lake root (exports go under `exports/`).
    pub root: PathBuf,
}

#[async_trait]
impl JobHandler for QueryExport {
    fn kind(&self) -> &str {
        KIND
    }

    fn concurrency(&self) -> usize {
        2
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let name = job.payload["query"].as_str().unwrap_or_default();
        let q = ctx.store().saved_query(&job.workspace, name).await.map_err(|e| JobError::Fatal { error: format!("saved query {name:?}: {e}"), result: json!({}) })?;
        let result = self.sql.query(&job.workspace, &q.sql).await.map_err(|e| JobError::Fatal { error: e.to_string(), result: json!({}) })?;
        let rows = result.rows;
        let Some(spec) = q.export.as_ref().map(ExportSpec::parse).transpose().map_err(JobError::Failed)? else {
            return Ok(json!({"rows": rows, "elapsed_ms": result.elapsed.as_millis() as u64}));
        };
        let dest = self.root.join("exports").join(&job.workspace).join(&spec.path);
        let bytes = tokio::task::spawn_blocking({
            let dest = dest.clone();
            move || -> Result<u64, String> {
                let data = encode(&result, spec.format).map_err(|e| e.to_string())?;
                write_atomically(&dest, &data)?;
                Ok(data.len() as u64)
            }
        })
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?
        .map_err(JobError::Failed)?;
        Ok(json!({"rows": rows, "bytes": bytes, "path": dest.display().to_string()}))
    }
}

fn write_atomically(dest: &Path, data: &[u8]) -> Result<(), String> {
    let dir = dest.parent().ok_or("export path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
    std::fs::write(&tmp, data).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dest).map_err(|e| format!("renaming into {}: {e}", dest.display()))
}

/// Queues due scheduled runs; returns how many were queued.
pub async fn queue_due(store: &Store) -> Result<usize, sluice_store::StoreError> {
    let now = Utc::now();
    let mut n = 0;
    for q in store.saved_queries(None).await? {
        let (Some(schedule), Some(due)) = (&q.schedule, q.next_run_at) else { continue };
        if due > now {
            continue;
        }
        let next = next_run(schedule, now).ok();
        if store.advance_saved_query(&q.workspace, &q.name, due, next).await? {
            store
                .enqueue_job(&NewJob {
                    workspace: q.workspace.clone(),
                    kind: KIND.into(),
                    payload: json!({"query": q.name, "scheduled_for": due.to_rfc3339()}),
                    max_attempts: 3,
                    created_by: None,
                })
                .await?;
            n += 1;
        }
    }
    Ok(n)
}
