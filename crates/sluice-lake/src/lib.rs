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
pub use sluice_columnar::columns;
