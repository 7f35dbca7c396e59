//! Durations in configuration sections, written like `30s`, `5m`, `35d`
//! (`0s`: none): `#[serde(with = "sluice_core::duration")]` on a
//! `std::time::Duration` field of a component's config section.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Reads `30s`, `1m`, `35d`….
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 30s, 5m, 35d: {e}")))
}

/// Writes the duration the way it is read.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}
