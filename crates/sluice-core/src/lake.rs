//! What the lake's files are, as the state store's manifest lists them
//! ([`LakeFile`]), and the types a schema declares for properties
//! ([`PropertyType`], the lake's typed columns).
//!
//! Here rather than in `sluice-store`, so that `sluice-columnar` (which
//! writes the files) does not depend on the store: a change in the store
//! then does not rebuild the columnar code, which is compiled whole
//! (non-incrementally) for speed.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// The type of a declared property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyType {
    /// A JSON integer that fits in 64 bits.
    Int64,
    /// Any JSON number.
    Float64,
    /// `true` or `false`.
    Bool,
    /// A JSON string.
    String,
    /// An RFC 3339 string.
    Timestamp,
}

impl PropertyType {
    /// Parses `int64`, `float64`, `bool`, `string`, `timestamp`.
    pub fn parse(s: &str) -> Option<PropertyType> {
        Some(match s {
            "int64" => PropertyType::Int64,
            "float64" => PropertyType::Float64,
            "bool" => PropertyType::Bool,
            "string" => PropertyType::String,
            "timestamp" => PropertyType::Timestamp,
            _ => return None,
        })
    }

    /// The declared name.
    pub fn name(self) -> &'static str {
        match self {
            PropertyType::Int64 => "int64",
            PropertyType::Float64 => "float64",
            PropertyType::Bool => "bool",
            PropertyType::String => "string",
            PropertyType::Timestamp => "timestamp",
        }
    }

    /// Whether `v` (not null) is a value of this type.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            PropertyType::Int64 => v.as_i64().is_some(),
            PropertyType::Float64 => v.is_number(),
            PropertyType::Bool => v.is_boolean(),
            PropertyType::String => v.is_string(),
            PropertyType::Timestamp => v.as_str().is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
        }
    }
}

/// One committed Parquet file of the lake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeFile {
    /// Path relative to the lake root, e.g.
    /// `workspace=default/content_type=page/year=2026/month=11/day=22/hour=05/<name>.parquet`.
    pub path: String,
    /// Workspace.
    pub workspace: String,
    /// Event type (the `content_type` partition).
    pub content_type: String,
    /// Start of the UTC hour partition.
    pub hour_start: DateTime<Utc>,
    /// Rows in the file.
    pub row_count: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Earliest and latest event `timestamp` in the file.
    pub min_time: DateTime<Utc>,
    /// See `min_time`.
    pub max_time: DateTime<Utc>,
    /// When the file was committed.
    pub created_at: DateTime<Utc>,
}
