//! The errors of metering: why an event cannot be metered, why a usage
//! import file is refused, why a query parameter is not understood. The
//! messages are stable: they are written to dead letters and job results
//! and shown to API clients.

use sluice_core::IdError;
use sluice_store::UsageOverflow;

use crate::meter::MAX_KEY_BYTES;

/// Errors of the metering crate.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The meter's group-by values of an event are too long to be part of a
    /// usage bucket's key.
    #[error("meter {meter:?}: the group_by values take {bytes} bytes; at most {MAX_KEY_BYTES} (they are part of the usage bucket's key)")]
    GroupKeyTooLong {
        /// Meter key.
        meter: String,
        /// Size of the group key.
        bytes: usize,
    },
    /// The event has no value at the meter's value property.
    #[error("meter {meter:?}: properties.{path} is missing")]
    MissingValue {
        /// Meter key.
        meter: String,
        /// The value property.
        path: String,
    },
    /// A `unique_count` value is too long or holds NUL.
    #[error("meter {meter:?}: properties.{path} must be at most {MAX_KEY_BYTES} bytes without NUL to be counted as a unique value")]
    BadUniqueValue {
        /// Meter key.
        meter: String,
        /// The value property.
        path: String,
    },
    /// The value is not a number an exact decimal holds.
    #[error("meter {meter:?}: properties.{path} = {shown} is not a number (or not one an exact decimal holds: at most about 7.9e28, 28 digits after the point)")]
    NotANumber {
        /// Meter key.
        meter: String,
        /// The value property.
        path: String,
        /// The value as found (JSON text, or quoted for a batch row).
        shown: String,
    },
    /// Usage folded together would overflow.
    #[error("{0}")]
    Overflow(#[from] UsageOverflow),
    /// The uploaded import file cannot be opened.
    #[error("cannot open the uploaded file: {0}")]
    OpenFile(#[source] std::io::Error),
    /// The import file's header row lacks a required column.
    #[error("the header row has no `{0}` column (required: customer_id, meter, timestamp, quantity)")]
    MissingColumn(&'static str),
    /// A meter's filter and value property overlap, so imported rows cannot
    /// carry both.
    #[error("meter {0:?}: its filter and value property overlap")]
    FilterValueOverlap(String),
    /// A meter's event type is not a valid event type.
    #[error("{0}")]
    EventType(#[from] IdError),
    /// A granularity other than hour, day, month or total.
    #[error("must be hour, day, month or total")]
    UnknownGranularity,
}

sluice_core::error_codes!(MeterError { GroupKeyTooLong => "meter.group_key_too_long", MissingValue => "meter.missing_value", BadUniqueValue => "meter.bad_unique_value", NotANumber => "meter.not_a_number", Overflow => "meter.overflow", OpenFile => "meter.open_file", MissingColumn => "meter.missing_column", FilterValueOverlap => "meter.filter_value_overlap", EventType => "meter.event_type", UnknownGranularity => "meter.unknown_granularity" });
