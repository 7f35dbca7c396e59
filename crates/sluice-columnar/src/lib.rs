//! Events as columns: the lake's Arrow schema and batches ([`columns`]),
//! where its files live ([`layout`]), and the writing of Parquet files from
//! decoded log records and the merging of small ones ([`files`]).
//!
//! A crate of its own, below `sluice-lake`, for build times: this is the
//! code the lake writer spends its time in (decoding into Arrow builders,
//! encoding Parquet), so it is compiled whole, not incrementally (built
//! incrementally, rustc stops copying `#[inline]` functions into each
//! codegen unit, and the writer was slower). It depends on no state store:
//! a change in `sluice-store` does not rebuild it, while `sluice-lake`
//! above it (the writer's loop and commits, compaction and export jobs,
//! SQL) builds incrementally. See docs/architecture.md, "Build profiles".

pub mod columns;
mod error;
pub mod files;
pub mod layout;

pub use error::ColumnarError;
