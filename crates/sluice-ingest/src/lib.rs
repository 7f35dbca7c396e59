//! Ingest: from request bodies to durable, deduplicated events in the log.
//!
//! - [`formats`] turns a request body (native JSON, NDJSON, CloudEvents) into
//!   validated [`sluice_core::Event`]s, or a list of every bad event's index,
//!   field and reason.
//! - [`pipeline`] is the single writer: it groups concurrent requests,
//!   drops duplicates, appends the rest to the log (one fsync round per
//!   group), records them in the event id index and only then acknowledges.
//! - [`read`] reads events back by id or by scanning the log with filters.

pub mod formats;
pub mod pipeline;
pub mod read;
pub mod schemas;
pub mod segment;

pub use formats::{parse_body, BodyFormat, FieldError, IngestLimits, ParseError, TimeError};
pub use pipeline::{IngestError, IngestSettings, Ingestor, IngestorConfig, Outcome};
pub use read::{get_event, latest_cursor, list_events, EventFilter, EventPage, ReadError};
pub use schemas::{PropertyType, Schemas, TypeSchema};
