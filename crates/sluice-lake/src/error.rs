//! The errors of the lake outside SQL queries ([`crate::sql::SqlError`]):
//! configuration, DDL, export specs and schedules, writing, compacting and
//! recovering files. The messages are stable: they are shown to API clients
//! and written to job results.

use crate::ddl::ENGINES;
use crate::sql::SqlError;

/// Errors of the lake (other than queries).
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// `lake.url` is `file://` without a path.
    #[error("lake.url: `file://` needs a path, e.g. file:///var/lib/sluice/lake")]
    UrlWithoutPath,
    /// `lake.url` has a scheme other than `file://`.
    #[error("lake.url: {0:?} is not supported in this version; use file:///path (s3:// comes later)")]
    UnsupportedUrl(String),
    /// DDL asked for an engine it cannot print.
    #[error("engine {0:?} is not one of {engines}", engines = ENGINES.join(", "))]
    UnknownEngine(String),
    /// An export's format is not `parquet` or `csv`.
    #[error("format {0:?} is not parquet or csv")]
    ExportFormat(String),
    /// An export has no `path`.
    #[error("path: required, a relative path such as daily/signups.parquet")]
    ExportPathMissing,
    /// An export's path is empty, absolute or climbs out with `..`.
    #[error("path {0:?} must be relative, without `..`")]
    ExportPathNotRelative(String),
    /// A schedule is not five cron fields.
    #[error("{0:?} is not a 5-field cron expression (minute hour day month weekday), e.g. \"0 6 * * *\"")]
    ScheduleFields(String),
    /// A schedule has five fields that cron does not accept.
    #[error("{schedule:?}: {reason}")]
    ScheduleInvalid {
        /// The schedule.
        schedule: String,
        /// What the cron parser found wrong.
        reason: String,
    },
    /// A schedule that never comes due.
    #[error("{0:?} never runs")]
    ScheduleNever(String),
    /// An export's destination has no parent directory.
    #[error("export path has no directory")]
    ExportNoDirectory,
    /// Writing an export file failed; `step` names the step and the
    /// directory or file relative to the lake root (never an absolute path).
    #[error("{step}: {kind}")]
    ExportWrite {
        /// E.g. `creating exports/ws/daily`.
        step: String,
        /// What went wrong (the I/O error kind only).
        kind: std::io::ErrorKind,
    },
    /// Encoding a query result for an export failed.
    #[error("{0}")]
    Encode(#[from] SqlError),
    /// Writing, making durable or merging lake files failed.
    #[error(transparent)]
    Columnar(#[from] sluice_columnar::ColumnarError),
    /// The state store failed.
    #[error("{0}")]
    Store(#[from] sluice_store::StoreError),
    /// Committing written files to the manifest failed (they were removed).
    #[error("committing lake files: {0}")]
    Commit(#[source] sluice_store::StoreError),
    /// Swapping compacted files into the manifest failed (the new ones were removed).
    #[error("swapping compacted files: {0}")]
    Swap(#[source] sluice_store::StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

sluice_core::error_codes!(LakeError { UrlWithoutPath => "lake.url_without_path", UnsupportedUrl => "lake.unsupported_url", UnknownEngine => "lake.unknown_engine", ExportFormat => "lake.export_format", ExportPathMissing => "lake.export_path_missing", ExportPathNotRelative => "lake.export_path_not_relative", ScheduleFields => "lake.schedule_fields", ScheduleInvalid => "lake.schedule_invalid", ScheduleNever => "lake.schedule_never", ExportNoDirectory => "lake.export_no_directory", ExportWrite => "lake.export_write", Encode => "lake.encode", Commit => "lake.commit", Swap => "lake.swap", Task => "lake.task" } wraps { Columnar, Store });
