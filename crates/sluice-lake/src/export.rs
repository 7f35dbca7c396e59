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
//!
//! The temp file (`.<uuid>.tmp` beside the destination) is removed on every
//! failure; [`sweep_temp_files`], called when the server starts, removes any
//! left by a crash. Saved queries run with admin scope (`audit_log`
//! included): only admin keys can create or run them, and their output goes
//! to a file the admin chose. Job results and errors name paths relative to
//! the lake root (`exports/<workspace>/<path>`), never absolute ones.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload as _, JobResult as _};
use sluice_store::{Job, NewJob, Store};

use crate::sql::{encode, Access, Format, SqlEngine};
use crate::LakeError;

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
    pub fn parse(v: &Value) -> Result<ExportSpec, LakeError> {
        let format = match v.get("format").and_then(Value::as_str).unwrap_or("parquet") {
            "parquet" => Format::Parquet,
            "csv" => Format::Csv,
            other => return Err(LakeError::ExportFormat(other.to_owned())),
        };
        let path = v.get("path").and_then(Value::as_str).ok_or(LakeError::ExportPathMissing)?;
        let p = PathBuf::from(path);
        if path.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(LakeError::ExportPathNotRelative(path.to_owned()));
        }
        Ok(ExportSpec { format, path: p })
    }
}

/// The next run of a 5-field cron schedule strictly after `after` (UTC).
pub fn next_run(schedule: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, LakeError> {
    let fields: Vec<&str> = schedule.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(LakeError::ScheduleFields(schedule.to_owned()));
    }
    // The cron crate wants seconds first.
    let s = cron::Schedule::from_str(&format!("0 {schedule}"))
        .map_err(|e| LakeError::ScheduleInvalid { schedule: schedule.to_owned(), reason: e.to_string() })?;
    s.after(&after).next().ok_or_else(|| LakeError::ScheduleNever(schedule.to_owned()))
}

/// Runs saved queries and writes their exports.
pub struct QueryExport {
    /// The SQL engine.
    pub sql: SqlEngine,
    /// Lake root (exports go under `exports/`).
    pub root: PathBuf,
}

/// The payload of a saved query's run (`lake.export` jobs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// The saved query's name.
    pub query: String,
    /// For a scheduled run: the time it was due (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<String>,
}

impl sluice_jobs::JobPayload for ExportPayload {
    const KIND: &'static str = KIND;
}

/// The result of a `query.export` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ExportResult {
    /// The query of an export written to the lake.
    Exported {
        /// Rows the query returned.
        rows: usize,
        /// Bytes written.
        bytes: u64,
        /// Where, relative to the lake root.
        path: String,
    },
    /// A saved query without an export, run.
    Ran {
        /// Rows the query returned.
        rows: usize,
        /// How long the query took.
        elapsed_ms: u64,
    },
}

impl sluice_jobs::JobResult for ExportResult {}

#[async_trait]
impl JobHandler for QueryExport {
    fn kind(&self) -> &str {
        KIND
    }

    fn concurrency(&self) -> usize {
        2
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let payload = ExportPayload::of(job)?;
        let name = payload.query.as_str();
        let q = ctx
            .store()
            .saved_query(&job.workspace, name)
            .await
            .map_err(|e| JobError::Permanent { error: format!("saved query {name:?}: {e}"), result: json!({}) })?;
        let result = self
            .sql
            .query_as(&job.workspace, &q.sql, Access::Admin)
            .await
            .map_err(|e| JobError::Permanent { error: e.to_string(), result: json!({}) })?;
        let rows = result.rows;
        let Some(spec) = q.export.as_ref().map(ExportSpec::parse).transpose().map_err(JobError::permanent)? else {
            let elapsed_ms = u64::try_from(result.elapsed.as_millis()).unwrap_or(u64::MAX);
            return Ok(ExportResult::Ran { rows, elapsed_ms }.to_value());
        };
        let shown = Path::new("exports").join(&job.workspace).join(&spec.path);
        let dest = self.root.join(&shown);
        let bytes = tokio::task::spawn_blocking({
            let (dest, shown) = (dest.clone(), shown.clone());
            move || -> Result<u64, LakeError> {
                let data = encode(&result, spec.format)?;
                write_atomically(&dest, &shown, &data)?;
                Ok(data.len() as u64)
            }
        })
        .await
        .map_err(JobError::retryable)?
        .map_err(JobError::retryable)?;
        Ok(ExportResult::Exported { rows, bytes, path: shown.display().to_string() }.to_value())
    }
}

/// Writes `data` to `dest` through a temp file in the same directory,
/// removed if anything fails. Errors name `shown` (relative to the lake
/// root), not `dest`.
fn write_atomically(dest: &Path, shown: &Path, data: &[u8]) -> Result<(), LakeError> {
    let dir = dest.parent().ok_or(LakeError::ExportNoDirectory)?;
    let shown_dir = shown.parent().unwrap_or(shown).display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| LakeError::ExportWrite { step: format!("creating {shown_dir}"), kind: e.kind() })?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
    let write = || -> Result<(), LakeError> {
        std::fs::write(&tmp, data).map_err(|e| LakeError::ExportWrite { step: format!("writing a temp file in {shown_dir}"), kind: e.kind() })?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| LakeError::ExportWrite { step: format!("syncing a temp file in {shown_dir}"), kind: e.kind() })?;
        std::fs::rename(&tmp, dest).map_err(|e| LakeError::ExportWrite { step: format!("renaming into {}", shown.display()), kind: e.kind() })
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes the temp files of exports that never finished (`.<name>.tmp`
/// under `<root>/exports/`, left by a crash); returns how many. Called once
/// at start, before any export job runs.
pub fn sweep_temp_files(root: &Path) -> usize {
    fn walk(dir: &Path, n: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            if ft.is_dir() {
                walk(&path, n);
            } else if ft.is_file() && is_temp_name(&e.file_name().to_string_lossy()) && std::fs::remove_file(&path).is_ok() {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(&root.join("exports"), &mut n);
    n
}

/// `.<32 hex digits>.tmp`, the names `write_atomically` uses.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.').and_then(|s| s.strip_suffix(".tmp")).is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
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
                    payload: ExportPayload { v: 1, query: q.name.clone(), scheduled_for: Some(due.to_rfc3339()) }.to_value(),
                    max_attempts: 3,
                    created_by: None,
                })
                .await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_export_leaves_no_temp_file_and_names_no_absolute_path() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // The destination is a directory: the rename fails after the write.
        let dest = dir.path().join("exports/ws/out.parquet");
        std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("{e}"));
        let err = write_atomically(&dest, Path::new("exports/ws/out.parquet"), b"data").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("exports/ws/out.parquet") && !err.contains(&dir.path().display().to_string()), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("exports/ws")).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert_eq!(left, vec![std::ffi::OsString::from("out.parquet")]);
    }

    #[test]
    fn leftover_temp_files_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sub = dir.path().join("exports/ws/daily");
        std::fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("{e}"));
        let tmp = sub.join(format!(".{}.tmp", uuid::Uuid::now_v7().simple()));
        std::fs::write(&tmp, b"x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(sub.join("keep.tmp"), b"x").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(sub.join("a.parquet"), b"x").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sweep_temp_files(dir.path()), 1);
        assert!(!tmp.exists() && sub.join("keep.tmp").exists() && sub.join("a.parquet").exists());
    }
}
