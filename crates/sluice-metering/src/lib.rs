//! Usage metering.
//!
//! A **meter** says which events count and how: an event type, an
//! aggregation (`sum`, `count`, `unique_count`, `max`, `min`, `latest`), the
//! dot path of the value in `properties`, optional group-by paths and
//! property equality filters. Usage is a read model kept by the `meters`
//! consumer in 15-minute UTC buckets, committed with the consumer's
//! checkpoint (exactly once). A new meter starts at the consumer's position
//! at creation time; a `meter.backfill` job applies it to the events before
//! that, with its own checkpoint, so no event is counted twice or missed.
//! Queries aggregate buckets into hours, days or months of the workspace's
//! time zone (every UTC offset is a multiple of 15 minutes). Values are
//! exact decimals ([`rust_decimal::Decimal`]), serialised as JSON strings.

pub mod backfill;
pub mod consumer;
mod error;
pub mod import;
pub mod meter;
mod repeats;
pub mod usage;

pub use consumer::{MeterCache, MetersConsumer};
pub use error::MeterError;
pub use meter::{validate, MeterSpec};
