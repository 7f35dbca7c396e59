//! The Segment-compatible wire format (HTTP Tracking API): `track`,
//! `identify`, `group`, `page`, `screen`, `alias` and `batch`.
//!
//! Mapping to Sluice events (also in docs/segment.md):
//!
//! | Segment | Sluice event |
//! |---|---|
//! | `messageId` | `id` (a UUIDv7 when absent) |
//! | `track` `event` | `type` = the event name, verbatim |
//! | `page` / `screen` | `type` `page` / `screen`; `properties` plus `name` (and `category`) |
//! | `identify` | `type` `identify`, `properties` = `traits`; upserts the user |
//! | `group` | `type` `group`, `customer_id` = `groupId`, `properties` = `traits`; upserts the customer, links the user |
//! | `alias` | `type` `alias`, `properties` = `{"previous_id": previousId}`; records the alias |
//! | `userId` (else `anonymousId`) | `user_id`; `anonymousId` is kept in `context.anonymous_id` |
//! | `context.groupId` | `customer_id` (else the customer of the user's latest `group` call) |
//! | `timestamp`, `sentAt` | `timestamp` = receivedAt − (sentAt − timestamp) when both are given |
//! | `context.ip`, `context.userAgent`, `context.page.url`, `context.page.referrer`, `context.campaign` | `context.ip`, `context.user_agent`, `context.page_url`, `context.referrer`, `context.campaign` (the original context is kept too) |
//! | `integrations`, `writeKey`, `_metadata`, other fields | ignored |

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sluice_core::{people, Event, EventId, EventType, WorkspaceName};

use crate::formats::{FieldError, ParseError, TimeError, MAX_LISTED_ERRORS, MAX_REF_CHARS};

/// Which call an endpoint receives; `None` in [`parse_segment`] means `/v1/batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentCall {
    /// `/v1/track`
    Track,
    /// `/v1/identify`
    Identify,
    /// `/v1/group`
    Group,
    /// `/v1/page`
    Page,
    /// `/v1/screen`
    Screen,
    /// `/v1/alias`
    Alias,
}

impl SegmentCall {
    fn from_type(t: &str) -> Option<SegmentCall> {
        Some(match t {
            "track" => SegmentCall::Track,
            "identify" => SegmentCall::Identify,
            "group" => SegmentCall::Group,
            "page" => SegmentCall::Page,
            "screen" => SegmentCall::Screen,
            "alias" => SegmentCall::Alias,
            _ => return None,
        })
    }
}

/// Size limits of the Segment endpoints (Segment's own: 32 KB a message,
/// 500 KB a batch).
#[derive(Debug, Clone, Copy)]
pub struct SegmentLimits {
    /// Largest single message, bytes.
    pub max_message_bytes: usize,
    /// Largest request body, bytes.
    pub max_batch_bytes: usize,
}

impl Default for SegmentLimits {
    fn default() -> Self {
        SegmentLimits { max_message_bytes: 32 * 1024, max_batch_bytes: 500 * 1024 }
    }
}

/// A parsed request: events in order, and which of them still need their
/// customer resolved from the user's latest `group` call.
#[derive(Debug)]
pub struct SegmentBatch {
    /// The events, in message order.
    pub events: Vec<Event>,
    /// Indexes into `events` of events without a customer but with a user.
    pub unresolved: Vec<usize>,
}

/// The write key given in the body (`writeKey`), if any. Used when the
/// request has no `Authorization` header.
pub fn body_write_key(body: &Value) -> Option<String> {
    body.get("writeKey").and_then(Value::as_str).filter(|k| !k.is_empty()).map(str::to_owned)
}

/// Parses the JSON body of a Segment endpoint (already checked against
/// `max_batch_bytes`) into events.
pub fn parse_segment(
    body: &Value,
    call: Option<SegmentCall>,
    workspace: &WorkspaceName,
    received_at: DateTime<Utc>,
    limits: SegmentLimits,
) -> Result<SegmentBatch, ParseError> {
    let Value::Object(top) = body else {
        return Err(ParseError::Malformed("body must be a JSON object".into()));
    };
    let (messages, batch_context, batch_sent_at): (Vec<&Value>, Option<&Map<String, Value>>, Option<&Value>) = match call {
        Some(_) => (vec![body], None, None),
        None => {
            let Some(Value::Array(items)) = top.get("batch") else {
                return Err(ParseError::Malformed("a batch request needs a `batch` array".into()));
            };
            (items.iter().collect(), top.get("context").and_then(Value::as_object), top.get("sentAt"))
        }
    };
    if messages.is_empty() {
        return Err(ParseError::Malformed("`batch` is empty".into()));
    }
    let mut events = Vec::with_capacity(messages.len());
    let mut unresolved = Vec::new();
    let mut errors = Vec::new();
    let mut invalid_events = 0;
    for (index, msg) in messages.into_iter().enumerate() {
        let size = serde_json::to_string(msg).map(|s| s.len()).unwrap_or(0);
        if size > limits.max_message_bytes {
            return Err(ParseError::TooLarge {
                limit: "max_message_bytes",
                max: limits.max_message_bytes,
                message: format!("message at index {index} is {size} bytes; at most {} bytes per message", limits.max_message_bytes),
            });
        }
        match message_to_event(msg, call, batch_context, batch_sent_at, workspace, received_at) {
            Ok((e, needs_customer)) => {
                if needs_customer {
                    unresolved.push(events.len());
                }
                events.push(e);
            }
            Err(errs) => {
                invalid_events += 1;
                for (field, reason) in errs {
                    if errors.len() < MAX_LISTED_ERRORS {
                        errors.push(FieldError { index, line: None, field, reason });
                    }
                }
            }
        }
    }
    if invalid_events > 0 {
        return Err(ParseError::Invalid { errors, invalid_events });
    }
    Ok(SegmentBatch { events, unresolved })
}

type Errs = Vec<(String, String)>;

fn message_to_event(
    msg: &Value,
    call: Option<SegmentCall>,
    batch_context: Option<&Map<String, Value>>,
    batch_sent_at: Option<&Value>,
    workspace: &WorkspaceName,
    received_at: DateTime<Utc>,
) -> Result<(Event, bool), Errs> {
    let Value::Object(m) = msg else {
        return Err(vec![(String::new(), "message must be a JSON object".into())]);
    };
    let mut errs = Errs::new();
    let call = match call {
        Some(c) => c,
        None => match m.get("type").and_then(Value::as_str).and_then(SegmentCall::from_type) {
            Some(c) => c,
            None => return Err(vec![("type".into(), "must be one of track, identify, group, page, screen, alias".into())]),
        },
    };
    let id_text = |v: Option<&Value>| -> Option<String> {
        match v {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let user_id = id_text(m.get("userId"));
    let anonymous_id = id_text(m.get("anonymousId"));
    if user_id.is_none() && anonymous_id.is_none() {
        errs.push(("userId".into(), "one of userId or anonymousId is required".into()));
    }
    for (name, v) in [("userId", &user_id), ("anonymousId", &anonymous_id)] {
        if v.as_ref().is_some_and(|s| s.chars().count() > MAX_REF_CHARS) {
            errs.push((name.into(), format!("must be at most {MAX_REF_CHARS} characters")));
        }
    }
    let id = match m.get("messageId") {
        None | Some(Value::Null) => Some(EventId::generate()),
        Some(Value::String(s)) => EventId::parse(s.clone()).map_err(|e| errs.push(("messageId".into(), e.0))).ok(),
        Some(_) => {
            errs.push(("messageId".into(), "must be a string".into()));
            None
        }
    };
    let time = |field: &str, errs: &mut Errs| -> Option<DateTime<Utc>> {
        match m.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => parse_iso(s).map_err(|r| errs.push((field.into(), r.to_string()))).ok(),
            Some(_) => {
                errs.push((field.into(), "must be an ISO 8601 string".into()));
                None
            }
        }
    };
    let timestamp = time("timestamp", &mut errs).or_else(|| time("originalTimestamp", &mut Errs::new()));
    let sent_at = time("sentAt", &mut errs).or_else(|| match batch_sent_at {
        Some(Value::String(s)) => parse_iso(s).ok(),
        _ => None,
    });
    // Clock-skew correction: the client's clock may be off, but the
    // difference sentAt - timestamp is measured on one clock.
    let timestamp = match (timestamp, sent_at) {
        (Some(t), Some(sent)) => received_at - (sent - t),
        (Some(t), None) => t,
        (None, _) => received_at,
    };

    let obj = |field: &str, errs: &mut Errs| -> Map<String, Value> {
        match m.get(field) {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => {
                errs.push((field.into(), "must be a JSON object".into()));
                Map::new()
            }
        }
    };
    let mut context = batch_context.cloned().unwrap_or_default();
    for (k, v) in obj("context", &mut errs) {
        context.insert(k, v);
    }
    let group_id = id_text(context.get("groupId"));

    let mut customer_id = group_id.clone();
    let (event_type, properties) = match call {
        SegmentCall::Track => {
            let name = match m.get("event") {
                // These names carry record semantics (see sluice_core::people):
                // a track call must not update users or customers by accident.
                Some(Value::String(s)) if [people::IDENTIFY, people::GROUP, people::ALIAS].contains(&s.as_str()) => {
                    errs.push(("event".into(), format!("{s:?} is reserved; use the {s} call instead of track")));
                    None
                }
                Some(Value::String(s)) => EventType::from_name(s.clone()).map_err(|e| errs.push(("event".into(), e.0))).ok(),
                _ => {
                    errs.push(("event".into(), "is required for track (the event name)".into()));
                    None
                }
            };
            (name, obj("properties", &mut errs))
        }
        SegmentCall::Page | SegmentCall::Screen => {
            let mut props = obj("properties", &mut errs);
            for f in ["name", "category"] {
                if let Some(v @ Value::String(_)) = m.get(f) {
                    props.insert(f.into(), v.clone());
                }
            }
            let t = if call == SegmentCall::Page { "page" } else { "screen" };
            (EventType::parse(t).ok(), props)
        }
        SegmentCall::Identify => (EventType::parse(sluice_core::people::IDENTIFY).ok(), obj("traits", &mut errs)),
        SegmentCall::Group => {
            match id_text(m.get("groupId")) {
                Some(g) => customer_id = Some(g),
                None => errs.push(("groupId".into(), "is required for group".into())),
            }
            (EventType::parse(sluice_core::people::GROUP).ok(), obj("traits", &mut errs))
        }
        SegmentCall::Alias => {
            let mut props = Map::new();
            match id_text(m.get("previousId")) {
                Some(p) => {
                    props.insert("previous_id".into(), Value::String(p));
                }
                None => errs.push(("previousId".into(), "is required for alias".into())),
            }
            if user_id.is_none() {
                errs.push(("userId".into(), "is required for alias".into()));
            }
            (EventType::parse(sluice_core::people::ALIAS).ok(), props)
        }
    };
    if customer_id.as_ref().is_some_and(|c| c.chars().count() > MAX_REF_CHARS) {
        errs.push(("groupId".into(), format!("must be at most {MAX_REF_CHARS} characters")));
    }
    if !errs.is_empty() {
        return Err(errs);
    }

    // Normalised context keys, beside the original ones.
    let page = context.get("page").and_then(Value::as_object).cloned();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            context.insert(k.to_owned(), v);
        }
    };
    put("user_agent", m.get("context").and_then(|c| c.get("userAgent")).cloned().or_else(|| batch_context.and_then(|c| c.get("userAgent")).cloned()));
    put("page_url", page.as_ref().and_then(|p| p.get("url")).cloned());
    put("referrer", page.as_ref().and_then(|p| p.get("referrer")).cloned());
    put("anonymous_id", anonymous_id.clone().map(Value::String));
    put("group_id", group_id.map(Value::String));

    let to_raw = |m: Map<String, Value>| RawValue::from_string(Value::Object(m).to_string()).unwrap_or_else(|_| Event::empty_object());
    let needs_customer = customer_id.is_none() && (user_id.is_some() || anonymous_id.is_some());
    for (name, v) in [("anonymousId", &anonymous_id), ("previousId", &properties.get("previous_id").and_then(Value::as_str).map(str::to_owned))] {
        if let Some(Err(e)) = v.as_deref().map(sluice_core::check_storable) {
            errs.push((name.into(), e.0));
        }
    }
    let customer_field = if call == SegmentCall::Group { "groupId" } else { "context.groupId" };
    let traits_field = if matches!(call, SegmentCall::Identify | SegmentCall::Group) { "traits" } else { "properties" };
    let event = Event {
        workspace: workspace.clone(),
        id: id.unwrap_or_else(EventId::generate),
        event_type: event_type.ok_or_else(|| vec![("type".to_owned(), "could not be derived".to_owned())])?,
        timestamp,
        received_at,
        customer_id,
        subscription_id: None,
        user_id: user_id.or(anonymous_id),
        properties: to_raw(properties),
        context: to_raw(context),
    };
    crate::formats::check_storable_fields(
        &event,
        [
            customer_field,
            "subscription_id",
            if event.user_id.is_some() && m.get("userId").is_some() { "userId" } else { "anonymousId" },
            traits_field,
        ],
        &mut errs,
    );
    if !errs.is_empty() {
        errs.dedup();
        return Err(errs);
    }
    Ok((event, needs_customer))
}

/// ISO 8601 as clients send it: RFC 3339, or without an offset (taken as UTC).
fn parse_iso(s: &str) -> Result<DateTime<Utc>, TimeError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(TimeError::NotIso8601(s.to_owned()))
}

/// Fills `customer_id` of the events listed in `batch.unresolved` with the
/// customer of the user's latest `group` call: from `group` messages earlier
/// in the same request first, then from the state store. Events of users
/// that never sent a `group` call keep no customer.
pub async fn resolve_customers(batch: &mut SegmentBatch, store: &sluice_store::Store) -> Result<(), sluice_store::StoreError> {
    use std::collections::HashMap;
    if batch.unresolved.is_empty() {
        return Ok(());
    }
    let workspace = batch.events[0].workspace.as_str().to_owned();
    let users: Vec<&str> = batch.unresolved.iter().filter_map(|&i| batch.events[i].user_id.as_deref()).collect();
    let known = store.customers_of_users(&workspace, &users).await?;
    let mut in_batch: HashMap<String, String> = HashMap::new();
    let mut next = batch.unresolved.iter().peekable();
    for i in 0..batch.events.len() {
        let e = &mut batch.events[i];
        if e.event_type.as_str() == sluice_core::people::GROUP {
            if let (Some(u), Some(c)) = (&e.user_id, &e.customer_id) {
                in_batch.insert(u.clone(), c.clone());
            }
        }
        if next.peek() == Some(&&i) {
            next.next();
            if let Some(u) = e.user_id.clone() {
                e.customer_id = in_batch.get(&u).or_else(|| known.get(&u)).cloned();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn ws() -> WorkspaceName {
        WorkspaceName::parse("default").unwrap()
    }

    #[test]
    fn batch_with_skew_correction_and_context_merge() {
        let now: DateTime<Utc> = "2024-06-01T12:00:10Z".parse().unwrap();
        let body = json!({
            "batch": [
                {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1",
                 "timestamp": "2024-06-01T11:00:00Z", "properties": {"total": 12.5},
                 "context": {"page": {"url": "https://x.test/a", "referrer": "https://google.com/"}}},
                {"type": "group", "groupId": "acme", "userId": "u1", "traits": {"plan": "pro"}, "messageId": "m2"},
                {"type": "page", "name": "Home", "anonymousId": "anon-1", "properties": {"path": "/"}},
            ],
            "context": {"ip": "203.0.113.1", "userAgent": "UA"},
            "sentAt": "2024-06-01T11:00:05Z",
        });
        let b = parse_segment(&body, None, &ws(), now, SegmentLimits::default()).unwrap();
        assert_eq!(b.events.len(), 3);
        let t = &b.events[0];
        assert_eq!(t.event_type.as_str(), "Order Completed");
        assert_eq!(t.timestamp, "2024-06-01T12:00:05Z".parse::<DateTime<Utc>>().unwrap());
        let ctx: Value = serde_json::from_str(t.context.get()).unwrap();
        assert_eq!(ctx["ip"], "203.0.113.1");
        assert_eq!(ctx["user_agent"], "UA");
        assert_eq!(ctx["page_url"], "https://x.test/a");
        assert_eq!(ctx["referrer"], "https://google.com/");
        assert_eq!(b.events[1].customer_id.as_deref(), Some("acme"));
        assert_eq!(b.events[2].user_id.as_deref(), Some("anon-1"));
        assert_eq!(serde_json::from_str::<Value>(b.events[2].properties.get()).unwrap(), json!({"path": "/", "name": "Home"}));
        assert_eq!(b.unresolved, vec![0, 2]);
    }

    #[test]
    fn missing_identity_and_fields_are_named() {
        let body = json!({"batch": [
            {"type": "track", "event": "A", "userId": "u"},
            {"type": "track", "event": "B"},
            {"type": "group", "userId": "u"},
            {"type": "wat", "userId": "u"},
        ]});
        let ParseError::Invalid { errors, invalid_events } = parse_segment(&body, None, &ws(), Utc::now(), SegmentLimits::default()).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(invalid_events, 3);
        let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(got, [(1, "userId"), (2, "groupId"), (3, "type")]);
    }

    #[test]
    fn message_size_limit() {
        let big = json!({"userId": "u", "event": "E", "properties": {"pad": "x".repeat(40_000)}});
        let r = parse_segment(&big, Some(SegmentCall::Track), &ws(), Utc::now(), SegmentLimits::default());
        assert!(matches!(r, Err(ParseError::TooLarge { limit: "max_message_bytes", .. })));
    }
}
