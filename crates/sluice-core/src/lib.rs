//! Domain types and traits shared by every Sluice component.
//!
//! This crate does no I/O. It defines what an event *is* once it has passed
//! the edge (validated newtypes, [`Event`]), who may do what ([`Scope`]), how
//! events are spread over log partitions ([`partition_for`]) and the
//! [`EventLog`] trait that the embedded log and (later) NATS JetStream
//! implement.

pub mod activity;
pub mod aggregation;
pub mod batch;
pub mod duration;
pub mod event;
pub mod ids;
pub mod job_state;
pub mod lake;
pub mod log;
pub mod named;
pub mod people;
pub mod retry;
pub mod scope;

pub use aggregation::{Aggregation, UnknownAggregation};
pub use batch::{decode_events, hex_event_id, BatchHeader, BatchRow, BatchRows, EventBatch, Payload, PayloadError};
pub use event::{partition_for, Event};
pub use ids::{check_storable, EventId, EventType, IdError, WorkspaceName};
pub use job_state::{JobState, UnknownJobState};
pub use log::{
    fetch_event, fetch_record, read_decoded, undecodable, AppendRecord, BurstGuard, Bursts, Busy, Bytes, DecodedRecord, EventLog, LogError, LogStats,
    Record, RetentionReport,
};
pub use named::{SortOrder, UnknownSortOrder};
pub use people::{has_record_effects, record_effects, RecordEffect};
pub use retry::{Backoff, Jitter};
pub use scope::Scope;

#[doc(hidden)]
pub mod __private {
    pub use serde;
}
