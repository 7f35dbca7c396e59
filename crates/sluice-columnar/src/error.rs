//! The errors of writing and merging lake files. Their messages are shown
//! as they are in the lake's errors (`sluice_lake::LakeError` wraps them
//! transparently): the lake writer's log and compaction job results.

/// Errors of writing or merging lake files.
#[derive(Debug, thiserror::Error)]
pub enum ColumnarError {
    /// A file or directory operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Reading or writing Parquet failed.
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An Arrow operation failed.
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// An operation on a named lake file failed (`path` relative to the root).
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: Box<ColumnarError>,
    },
    /// A step on a named path failed, e.g. `creating /lake/_tmp` or
    /// `renaming into /lake/workspace=…`.
    #[error("{step}: {source}")]
    Step {
        /// What was being done, and to what.
        step: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Written files could not be made durable.
    #[error("making lake files durable: {0}")]
    Sync(#[source] std::io::Error),
    /// A lake writer thread panicked.
    #[error("a lake writer thread panicked")]
    WriterPanicked,
}

sluice_core::error_codes!(ColumnarError { Io => "columnar.io", Parquet => "columnar.parquet", Arrow => "columnar.arrow", File => "columnar.file", Step => "columnar.step", Sync => "columnar.sync", WriterPanicked => "columnar.writer_panicked" });

impl ColumnarError {
    /// An error of the lake file `path` (relative to the root).
    pub(crate) fn in_file<E: Into<ColumnarError>>(path: &str) -> impl FnOnce(E) -> ColumnarError + '_ {
        move |e| ColumnarError::File { path: path.to_owned(), source: Box::new(e.into()) }
    }
}
