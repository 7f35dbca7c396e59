//! The event lake: events as Hive-partitioned Parquet files, and SQL over
//! them joined with live state tables.
//!
//! - [`columns`]: the lake's columns and events → Arrow batches (with
//!   enrichment from `sluice-enrich`), from `sluice-columnar`;
//! - [`layout`]: partition paths (from `sluice-columnar`) and the lake root;
//! - [`writer`]: the lake writer, a log reader whose files and checkpoint
//!   commit in one state-store transaction (exactly once);
//! - [`compact`]: the compaction job;
//! - [`sql`]: DataFusion over the manifest's files, the not-yet-written tail
//!   of the log, and the workspace's state tables; read-only and confined to
//!   one workspace;
//! - [`sandbox`]: each query in a child process with a memory limit, so no
//!   query (scalar functions included) can take the server down;
//! - [`export`]: saved queries run as jobs, on a cron schedule, exported;
//! - [`ddl`]: table definitions for other engines (Athena, Trino, DuckDB, Spark).

pub mod compact;
pub mod ddl;
mod error;
pub mod export;
pub mod layout;
pub mod pushdown;
pub mod sandbox;
pub mod sql;
pub mod writer;

pub use error::LakeError;

use std::path::PathBuf;
use std::time::Duration;

/// The `[lake]` section of the server's configuration (the binary's
/// `defaults.toml` documents each key; a test checks it agrees with
/// [`Default`]).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeSettings {
    /// Lake root, `file:///PATH` or a path; empty: `<data_dir>/lake`.
    pub url: String,
    /// Longest time an event waits in the writer's buffer (at least 10 ms). Default 60 s.
    #[serde(with = "sluice_core::duration")]
    pub flush_interval: Duration,
    /// Buffered bytes that make the writer flush. Default 32 MiB.
    pub flush_bytes: usize,
    /// Rows per Parquet row group (at least 1,024). Default 131,072.
    pub row_group_rows: usize,
    /// Compaction merges small files into files of at least this. Default 64 MiB.
    pub target_file_bytes: u64,
    /// How often compaction runs as a job; zero: only on request. Default 10 minutes.
    #[serde(with = "sluice_core::duration")]
    pub compact_interval: Duration,
    /// An hour partition is closed this long after its hour ended. Default 10 minutes.
    #[serde(with = "sluice_core::duration")]
    pub compact_after: Duration,
}

impl Default for LakeSettings {
    fn default() -> Self {
        LakeSettings {
            url: String::new(),
            flush_interval: Duration::from_secs(60),
            flush_bytes: 32 << 20,
            row_group_rows: 131_072,
            target_file_bytes: 64 << 20,
            compact_interval: Duration::from_secs(600),
            compact_after: Duration::from_secs(600),
        }
    }
}

impl LakeSettings {
    /// The lake writer's configuration for the lake at `root`.
    pub fn writer_config(&self, root: PathBuf) -> writer::WriterConfig {
        writer::WriterConfig {
            root,
            flush_interval: self.flush_interval.max(Duration::from_millis(10)),
            flush_bytes: self.flush_bytes.max(1),
            row_group_rows: self.row_group_rows.max(1024),
        }
    }

    /// Compaction's configuration for the lake at `root`.
    pub fn compact_config(&self, root: PathBuf) -> compact::CompactConfig {
        compact::CompactConfig {
            root,
            target_bytes: self.target_file_bytes,
            closed_after: self.compact_after,
            row_group_rows: self.row_group_rows.max(1024),
        }
    }
}
pub use sluice_columnar::columns;
