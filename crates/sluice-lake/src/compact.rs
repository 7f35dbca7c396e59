//! Compaction: merges the small files of closed hour partitions into files
//! of at least `target_bytes` (64 MiB by default) or the whole partition.
//!
//! A partition is closed when its hour ended more than
//! [`CompactConfig::closed_after`] ago (late events can still add small
//! files to it later; the next run merges those too). Per partition the job
//!
//! 1. reads the partition's committed files in order and writes merged
//!    files (schemas are unified by column name: a column missing in an
//!    older file is null),
//! 2. swaps them in the manifest in one transaction (old rows out, new rows
//!    in — the swap fails and changes nothing if a file vanished meanwhile),
//! 3. waits until queries that started before the swap have finished (they
//!    read the old files: [`crate::sql::FileGuard`]), then deletes the old
//!    files.
//!
//! So a query sees either the old files or the new ones, every row exactly
//! once. A crash between 2 and 3 leaves unlisted files, removed on start; a
//! crash before 2 leaves unlisted new files, removed on start too.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_columnar::files::merge;
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload as _, JobResult as _};
use sluice_store::{Job, LakeFile, Store};

use crate::sql::FileGuard;
use crate::LakeError;

/// Kind of the compaction job.
pub const KIND: &str = "lake.compact";

/// Settings of compaction.
#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// Lake root.
    pub root: PathBuf,
    /// Size a merged file grows to before the next one starts.
    pub target_bytes: u64,
    /// A partition is closed this long after its hour ended.
    pub closed_after: std::time::Duration,
    /// Rows per row group.
    pub row_group_rows: usize,
}

/// The `lake.compact` job handler.
pub struct Compaction {
    /// Settings.
    pub cfg: CompactConfig,
    /// Held by queries; taken before old files are deleted.
    pub guard: FileGuard,
}

/// What to merge: per closed partition with more than one file under the
/// target size, those small files.
pub fn candidates(files: Vec<LakeFile>, now: DateTime<Utc>, cfg: &CompactConfig) -> Vec<Vec<LakeFile>> {
    let mut parts: BTreeMap<(String, String, DateTime<Utc>), Vec<LakeFile>> = BTreeMap::new();
    for f in files {
        parts.entry((f.workspace.clone(), f.content_type.clone(), f.hour_start)).or_default().push(f);
    }
    let closed_before = now - chrono::Duration::hours(1) - chrono::Duration::from_std(cfg.closed_after).unwrap_or_default();
    // Only the small files are merged: files already at the target stay.
    parts
        .into_iter()
        .filter(|((_, _, hour), _)| *hour <= closed_before)
        .map(|(_, fs)| fs.into_iter().filter(|f| f.bytes < cfg.target_bytes).collect::<Vec<_>>())
        .filter(|small| small.len() > 1)
        .collect()
}

/// The payload of a `lake.compact` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompactPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// The workspace whose files are compacted (`None`: every workspace).
    #[serde(default)]
    pub workspace: Option<String>,
}

impl sluice_jobs::JobPayload for CompactPayload {
    const KIND: &'static str = KIND;
}

/// The result of a `lake.compact` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompactResult {
    /// Partitions with small files to merge.
    pub partitions: i64,
    /// Files merged away.
    pub files_merged: u64,
    /// Files written in their place.
    pub files_written: u64,
    /// Rows in the files written.
    pub rows: u64,
}

impl sluice_jobs::JobResult for CompactResult {}

#[async_trait]
impl JobHandler for Compaction {
    fn kind(&self) -> &str {
        KIND
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let payload = CompactPayload::of(job)?;
        let workspace = payload.workspace.as_deref();
        let files = ctx.store().lake_files(workspace).await?;
        let parts = candidates(files, Utc::now(), &self.cfg);
        let total = parts.len() as i64;
        ctx.progress(0, Some(total)).await;
        let (mut merged_in, mut merged_out, mut rows) = (0u64, 0u64, 0u64);
        for (i, part) in parts.into_iter().enumerate() {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let (n_in, out) = compact_partition(ctx.store(), &self.cfg, &self.guard, part).await.map_err(JobError::retryable)?;
            merged_in += n_in;
            merged_out += out.len() as u64;
            rows += out.iter().map(|f| f.row_count).sum::<u64>();
            ctx.progress(i as i64 + 1, Some(total)).await;
        }
        Ok(CompactResult { partitions: total, files_merged: merged_in, files_written: merged_out, rows }.to_value())
    }
}

/// Compacts one partition; returns how many files were replaced and the new files.
pub async fn compact_partition(
    store: &Store,
    cfg: &CompactConfig,
    guard: &FileGuard,
    part: Vec<LakeFile>,
) -> Result<(u64, Vec<LakeFile>), LakeError> {
    let root = cfg.root.clone();
    let (target, rg) = (cfg.target_bytes, cfg.row_group_rows);
    let inputs = part.clone();
    let written = tokio::task::spawn_blocking(move || merge(&root, &inputs, target, rg)).await??;
    let removed: Vec<String> = part.iter().map(|f| f.path.clone()).collect();
    if let Err(e) = store.lake_swap(&written, &removed).await {
        for f in &written {
            let _ = std::fs::remove_file(cfg.root.join(&f.path));
        }
        return Err(LakeError::Swap(e));
    }
    // Queries that took their snapshot before the swap may still read the
    // old files: wait for them, then delete.
    let _exclusive = guard.exclusive().await;
    for p in &removed {
        let _ = std::fs::remove_file(cfg.root.join(p));
    }
    metrics::counter!("sluice_lake_files_compacted_total").increment(removed.len() as u64);
    Ok((removed.len() as u64, written))
}
