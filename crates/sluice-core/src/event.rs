//! The stored form of an event.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::{EventId, EventType, WorkspaceName};

/// An accepted event, exactly as it is written to the event log (as JSON) and
/// returned by the read API.
///
/// `properties` and `context` are kept as raw JSON text: they were checked to
/// be JSON objects at the edge and are never re-parsed on the hot path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Tenant the event belongs to.
    pub workspace: WorkspaceName,
    /// Idempotency key, unique per workspace within the dedup window.
    pub id: EventId,
    /// Event type, e.g. `api.call`.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Event time as given by the client, or the receive time.
    #[serde(with = "rfc3339")]
    pub timestamp: DateTime<Utc>,
    /// When Sluice accepted the request that carried the event.
    #[serde(with = "rfc3339")]
    pub received_at: DateTime<Utc>,
    /// The SaaS customer (account) the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// The customer's subscription, for usage events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<String>,
    /// The end user who caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Free-form properties (a JSON object).
    pub properties: Box<RawValue>,
    /// Request context (a JSON object: ip, user_agent, page_url, referrer, …).
    pub context: Box<RawValue>,
}

impl Event {
    /// The empty JSON object, used when `properties` or `context` is absent.
    pub fn empty_object() -> Box<RawValue> {
        RawValue::from_string("{}".to_owned()).expect("{} is valid JSON")
    }
}

/// Times are written as RFC 3339 in UTC with `Z` and as many fractional
/// digits as needed (0, 3, 6 or 9), so they round-trip exactly.
pub(crate) mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = <&str>::deserialize(d)?;
        DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
    }
}

/// The log partition of an event: a stable hash (FNV-1a, 64 bit) of the
/// workspace and the customer id, so all events of one customer are in one
/// partition and keep their order. Events without a customer are spread by
/// their id.
///
/// The hash is part of the on-disk contract (a changed function would split a
/// customer's history over two partitions), so it is written out here rather
/// than taken from a library whose output may change between versions.
pub fn partition_for(workspace: &str, customer_id: Option<&str>, id: &str, partitions: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let key = customer_id.unwrap_or(id);
    for b in workspace.bytes().chain([0u8]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        // Pinned values: changing the function breaks per-customer ordering of existing logs.
        assert_eq!(partition_for("default", Some("acme"), "x", 1), 0);
        let p = partition_for("default", Some("acme"), "x", 8);
        assert_eq!(p, partition_for("default", Some("acme"), "other-id", 8));
        assert!(p < 8);
        assert_eq!(partition_for("default", Some("acme"), "x", 1024), 220);
    }

    #[test]
    fn event_round_trips() {
        let json = r#"{"workspace":"default","id":"e1","type":"a.b","timestamp":"2024-01-02T03:04:05.123Z","received_at":"2024-01-02T03:04:06Z","customer_id":"c1","properties":{"n":1},"context":{}}"#;
        let e: Event = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&e).unwrap(), json);
    }
}
