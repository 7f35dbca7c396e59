//! Users and customers as derived from events.
//!
//! Three event types change records besides being stored as events,
//! whichever API they arrive through (the Segment-compatible endpoints produce
//! them, and the native API may send them too):
//!
//! | event type | record effect |
//! |---|---|
//! | `identify` with `user_id` | upsert the user; `properties` are its traits |
//! | `group` with `customer_id` | upsert the customer; `properties` are its attributes; with `user_id`, link the user to the customer |
//! | `alias` with `user_id` and `properties.previous_id` | record that `previous_id` is now `user_id` |
//!
//! Effects are applied in the same state-store transaction that indexes the
//! event, and again (idempotently) when the index is rebuilt from the log.
//! Upserts merge by event time, last write wins: a newer update overwrites
//! the keys it names and keeps the others; an older, late-arriving update
//! only fills keys the record does not have yet. The same events in any order
//! give the same record.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::Event;

/// The event types that change records.
pub const IDENTIFY: &str = "identify";
/// See [`IDENTIFY`].
pub const GROUP: &str = "group";
/// See [`IDENTIFY`].
pub const ALIAS: &str = "alias";

/// A change to user or customer records caused by one event.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordEffect {
    /// Merge `traits` into the user.
    UpsertUser {
        /// Workspace.
        workspace: String,
        /// User id.
        user_id: String,
        /// Traits to merge.
        traits: Map<String, Value>,
        /// Event time of the update.
        at: DateTime<Utc>,
    },
    /// Merge `attributes` into the customer.
    UpsertCustomer {
        /// Workspace.
        workspace: String,
        /// Customer id (Segment `groupId`).
        customer_id: String,
        /// Attributes to merge.
        attributes: Map<String, Value>,
        /// Event time of the update.
        at: DateTime<Utc>,
    },
    /// The user belongs to the customer; the latest link is the user's customer.
    LinkUser {
        /// Workspace.
        workspace: String,
        /// User id.
        user_id: String,
        /// Customer id.
        customer_id: String,
        /// Event time of the link.
        at: DateTime<Utc>,
    },
    /// `previous_id` (e.g. an anonymous id) is now known as `user_id`.
    Alias {
        /// Workspace.
        workspace: String,
        /// The earlier id.
        previous_id: String,
        /// The user id it maps to.
        user_id: String,
        /// Event time.
        at: DateTime<Utc>,
    },
}

/// True for the event types that have record effects ([`record_effects`]
/// returns nothing for every other type, without looking at the event).
pub fn has_record_effects(event_type: &str) -> bool {
    matches!(event_type, IDENTIFY | GROUP | ALIAS)
}

/// The record effects of one event (none for most events).
pub fn record_effects(e: &Event) -> Vec<RecordEffect> {
    let ws = e.workspace.as_str().to_owned();
    let props = || match serde_json::from_str::<Value>(e.properties.get()) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut out = Vec::new();
    match e.event_type.as_str() {
        IDENTIFY => {
            if let Some(u) = &e.user_id {
                out.push(RecordEffect::UpsertUser { workspace: ws, user_id: u.clone(), traits: props(), at: e.timestamp });
            }
        }
        GROUP => {
            if let Some(c) = &e.customer_id {
                out.push(RecordEffect::UpsertCustomer { workspace: ws.clone(), customer_id: c.clone(), attributes: props(), at: e.timestamp });
                if let Some(u) = &e.user_id {
                    out.push(RecordEffect::LinkUser { workspace: ws, user_id: u.clone(), customer_id: c.clone(), at: e.timestamp });
                }
            }
        }
        ALIAS => {
            if let (Some(u), Some(Value::String(prev))) = (&e.user_id, props().get("previous_id")) {
                out.push(RecordEffect::Alias { workspace: ws, previous_id: prev.clone(), user_id: u.clone(), at: e.timestamp });
            }
        }
        _ => {}
    }
    // Events accepted before ids were checked for what a store can hold
    // (issue 11) may still be in the log: their record effects are left
    // out, so that one such event cannot stop the indexer (and with it
    // ingest) for every workspace.
    out.retain(|r| {
        let ok = r.is_storable();
        if !ok {
            tracing::warn!(workspace = %e.workspace, event = %e.id, "record effect with an id a state store cannot hold; skipped");
        }
        ok
    });
    out
}

impl RecordEffect {
    /// True when every id of the effect can be stored
    /// ([`crate::check_storable`]).
    pub fn is_storable(&self) -> bool {
        let ok = |s: &str| crate::check_storable(s).is_ok();
        match self {
            RecordEffect::UpsertUser { user_id, traits, .. } => ok(user_id) && traits.keys().all(|k| ok(k)),
            RecordEffect::UpsertCustomer { customer_id, attributes, .. } => ok(customer_id) && attributes.keys().all(|k| ok(k)),
            RecordEffect::LinkUser { user_id, customer_id, .. } => ok(user_id) && ok(customer_id),
            RecordEffect::Alias { previous_id, user_id, .. } => ok(previous_id) && ok(user_id),
        }
    }
}

/// Merges an update into a stored map by the last-write-wins rule above.
/// Returns the merged map and the record's new `updated_at`.
pub fn merge_lww(
    stored: Map<String, Value>,
    stored_at: DateTime<Utc>,
    update: &Map<String, Value>,
    update_at: DateTime<Utc>,
) -> (Map<String, Value>, DateTime<Utc>) {
    let mut merged = stored;
    if update_at >= stored_at {
        for (k, v) in update {
            merged.insert(k.clone(), v.clone());
        }
        (merged, update_at)
    } else {
        for (k, v) in update {
            merged.entry(k.clone()).or_insert_with(|| v.clone());
        }
        (merged, stored_at)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn lww_merge_is_order_independent() {
        let t1 = DateTime::from_timestamp(100, 0).unwrap();
        let t2 = DateTime::from_timestamp(200, 0).unwrap();
        let a = map(json!({"plan": "free", "name": "A"}));
        let b = map(json!({"plan": "pro", "seats": 3}));
        let (m1, at1) = merge_lww(Map::new(), DateTime::<Utc>::MIN_UTC, &a, t1);
        let (m1, at1) = merge_lww(m1, at1, &b, t2);
        let (m2, at2) = merge_lww(Map::new(), DateTime::<Utc>::MIN_UTC, &b, t2);
        let (m2, at2) = merge_lww(m2, at2, &a, t1);
        assert_eq!(m1, m2);
        assert_eq!(at1, at2);
        assert_eq!(Value::Object(m1), json!({"plan": "pro", "name": "A", "seats": 3}));
    }
}
