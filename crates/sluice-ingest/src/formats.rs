//! Wire formats of `POST /v1/events` and their validation.
//!
//! Every event of a body is parsed and validated independently, so one
//! response can name every bad event (by index, and by line for NDJSON) with
//! the field and the reason. A body is accepted only if every event is valid.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sluice_core::{Event, EventId, EventType, WorkspaceName};

/// Maximum number of per-event errors listed in one response.
pub const MAX_LISTED_ERRORS: usize = 1000;
/// Maximum length of `customer_id`, `subscription_id` and `user_id`.
pub const MAX_REF_CHARS: usize = 256;

/// Which wire format a body is in (from its `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON event object or a JSON array of them (`application/json`, and
    /// the fallback for any other content type).
    Json,
    /// One JSON event per line (`application/x-ndjson`, `application/jsonl`).
    Ndjson,
    /// One structured-mode CloudEvent (`application/cloudevents+json`).
    CloudEvent,
    /// A JSON array of CloudEvents (`application/cloudevents-batch+json`).
    CloudEventsBatch,
}

impl BodyFormat {
    /// Chooses the format from a `Content-Type` header value.
    pub fn from_content_type(ct: Option<&str>) -> BodyFormat {
        let mime = ct.and_then(|c| c.split(';').next()).map(|m| m.trim().to_ascii_lowercase()).unwrap_or_default();
        match mime.as_str() {
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/x-jsonlines" => BodyFormat::Ndjson,
            "application/cloudevents+json" => BodyFormat::CloudEvent,
            "application/cloudevents-batch+json" => BodyFormat::CloudEventsBatch,
            _ => BodyFormat::Json,
        }
    }
}

/// Size limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// Largest single event (its JSON text), bytes. Default 1 MiB.
    pub max_event_bytes: usize,
    /// Most events in one request. Default 10,000.
    pub max_events: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits { max_event_bytes: 1 << 20, max_events: 10_000 }
    }
}

/// One invalid field of one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// 0-based position of the event in the request.
    pub index: usize,
    /// 1-based line of the event, for NDJSON bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The field at fault (`""` when the event as a whole is not an object).
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

/// Why a body was refused. Nothing of a refused body is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The body is not JSON (or not NDJSON) at all.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// Some events are invalid; every one is listed (up to [`MAX_LISTED_ERRORS`]).
    #[error("{} invalid event(s)", .invalid_events)]
    Invalid {
        /// The errors, in event order.
        errors: Vec<FieldError>,
        /// How many events were invalid in total.
        invalid_events: usize,
    },
    /// A size limit was exceeded.
    #[error("{message}")]
    TooLarge {
        /// Name of the limit (`max_event_bytes`, `max_events`).
        limit: &'static str,
        /// Its value.
        max: usize,
        /// Human explanation.
        message: String,
    },
}

/// Parses and validates a whole body. `received_at` becomes every event's
/// `received_at` and the `timestamp` of events without one.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    workspace: &WorkspaceName,
    received_at: DateTime<Utc>,
    limits: IngestLimits,
) -> Result<Vec<Event>, ParseError> {
    let items: Vec<(Option<usize>, &RawValue)> = match format {
        BodyFormat::Ndjson => split_ndjson(body)?,
        BodyFormat::Json | BodyFormat::CloudEvent | BodyFormat::CloudEventsBatch => {
            let text = std::str::from_utf8(body).map_err(|e| ParseError::Malformed(format!("body is not valid UTF-8: {e}")))?;
            let first = text.trim_start().as_bytes().first().copied();
            match (first, format) {
                (Some(b'['), BodyFormat::CloudEvent) => {
                    return Err(ParseError::Malformed(
                        "application/cloudevents+json carries one event; send arrays as application/cloudevents-batch+json".into(),
                    ))
                }
                (Some(b'['), _) => serde_json::from_str::<Vec<&RawValue>>(text)
                    .map_err(|e| ParseError::Malformed(format!("invalid JSON array: {e}")))?
                    .into_iter()
                    .map(|r| (None, r))
                    .collect(),
                (Some(b'{'), BodyFormat::CloudEventsBatch) => {
                    return Err(ParseError::Malformed("application/cloudevents-batch+json must be a JSON array of events".into()))
                }
                (Some(b'{'), _) => {
                    let raw: &RawValue = serde_json::from_str(text).map_err(|e| ParseError::Malformed(format!("invalid JSON: {e}")))?;
                    vec![(None, raw)]
                }
                (None, _) => return Err(ParseError::Malformed("body is empty".into())),
                _ => return Err(ParseError::Malformed("body must be a JSON object (one event) or a JSON array of events".into())),
            }
        }
    };
    if items.is_empty() {
        return Err(ParseError::Malformed("body contains no events".into()));
    }
    if items.len() > limits.max_events {
        return Err(ParseError::TooLarge {
            limit: "max_events",
            max: limits.max_events,
            message: format!("request has {} events; at most {} events per request (limit max_events)", items.len(), limits.max_events),
        });
    }
    if let Some((i, (_, raw))) = items.iter().enumerate().find(|(_, (_, r))| r.get().len() > limits.max_event_bytes) {
        return Err(ParseError::TooLarge {
            limit: "max_event_bytes",
            max: limits.max_event_bytes,
            message: format!(
                "event at index {i} is {} bytes; at most {} bytes per event (limit max_event_bytes)",
                raw.get().len(),
                limits.max_event_bytes
            ),
        });
    }

    let cloud = matches!(format, BodyFormat::CloudEvent | BodyFormat::CloudEventsBatch);
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    let mut invalid_events = 0;
    for (index, (line, raw)) in items.into_iter().enumerate() {
        let parsed = if cloud { parse_cloudevent(raw, workspace, received_at) } else { parse_native(raw, workspace, received_at) };
        let parsed = parsed.and_then(|e| {
            let mut errs = Errs::new();
            let names =
                if cloud { ["subject", "subscription_id", "user_id", "data"] } else { ["customer_id", "subscription_id", "user_id", "properties"] };
            check_storable_fields(&e, names, &mut errs);
            if errs.is_empty() {
                Ok(e)
            } else {
                Err(errs)
            }
        });
        match parsed {
            Ok(e) => events.push(e),
            Err(errs) => {
                invalid_events += 1;
                for (field, reason) in errs {
                    if errors.len() < MAX_LISTED_ERRORS {
                        errors.push(FieldError { index, line, field, reason });
                    }
                }
            }
        }
    }
    if invalid_events > 0 {
        return Err(ParseError::Invalid { errors, invalid_events });
    }
    Ok(events)
}

fn split_ndjson(body: &[u8]) -> Result<Vec<(Option<usize>, &RawValue)>, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let line = body[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        ParseError::Malformed(format!("line {line} is not valid UTF-8"))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let raw: &RawValue = serde_json::from_str(line).map_err(|e| ParseError::Malformed(format!("line {}: invalid JSON: {e}", i + 1)))?;
        out.push((Some(i + 1), raw));
    }
    Ok(out)
}

pub(crate) type Errs = Vec<(String, String)>;

/// The native event object. Unknown fields are refused (a typo such as
/// `customerId` must not silently lose the customer); custom data belongs in
/// `properties`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeIn<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subscription_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
}

fn parse_native(raw: &RawValue, workspace: &WorkspaceName, received_at: DateTime<Utc>) -> Result<Event, Errs> {
    if !raw.get().starts_with('{') {
        return Err(vec![(String::new(), "event must be a JSON object".into())]);
    }
    let input: NativeIn<'_> = serde_json::from_str(raw.get()).map_err(|e| vec![serde_field_error(&e)])?;
    let mut errs = Errs::new();
    let id = opt_string(input.id, "id", &mut errs).and_then(|s| EventId::parse(s).map_err(|e| errs.push(("id".into(), e.0))).ok());
    let event_type = match opt_string(input.event_type, "type", &mut errs) {
        Some(s) => EventType::parse(s).map_err(|e| errs.push(("type".into(), e.0))).ok(),
        None => {
            if input.event_type.is_none_or(|r| r.get() == "null") {
                errs.push(("type".into(), "is required".into()));
            }
            None
        }
    };
    let timestamp = opt_string(input.timestamp, "timestamp", &mut errs)
        .and_then(|s| parse_time(&s).map_err(|reason| errs.push(("timestamp".into(), reason.to_string()))).ok());
    let customer_id = opt_ref(input.customer_id, "customer_id", &mut errs);
    let subscription_id = opt_ref(input.subscription_id, "subscription_id", &mut errs);
    let user_id = opt_ref(input.user_id, "user_id", &mut errs);
    let properties = opt_object(input.properties, "properties", &mut errs);
    let context = opt_object(input.context, "context", &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Event {
        workspace: workspace.clone(),
        id: id.unwrap_or_else(EventId::generate),
        event_type: event_type.ok_or_else(|| vec![("type".to_owned(), "is required".to_owned())])?,
        timestamp: timestamp.unwrap_or(received_at),
        received_at,
        customer_id,
        subscription_id,
        user_id,
        properties: properties.unwrap_or_else(Event::empty_object),
        context: context.unwrap_or_else(Event::empty_object),
    })
}

/// Maps CloudEvents (structured mode, spec 1.0) onto events:
/// `id`→`id`, `type`→`type`, `time`→`timestamp`, `subject`→`customer_id`,
/// `data`→`properties` (a non-object `data` becomes `{"data": …}`,
/// `data_base64` becomes `{"data_base64": …}`), `source`→`context.source`;
/// `datacontenttype`, `dataschema` and extension attributes are kept in
/// `context` under their own names.
fn parse_cloudevent(raw: &RawValue, workspace: &WorkspaceName, received_at: DateTime<Utc>) -> Result<Event, Errs> {
    let mut obj: Map<String, Value> = match serde_json::from_str(raw.get()) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(vec![(String::new(), "CloudEvent must be a JSON object".into())]),
        Err(e) => return Err(vec![(String::new(), format!("invalid JSON: {e}"))]),
    };
    let mut errs = Errs::new();
    let mut take_str = |name: &str, required: bool, errs: &mut Errs| -> Option<String> {
        match obj.remove(name) {
            Some(Value::String(s)) => Some(s),
            None | Some(Value::Null) => {
                if required {
                    errs.push((name.into(), "is required by CloudEvents 1.0".into()));
                }
                None
            }
            Some(_) => {
                errs.push((name.into(), "must be a string".into()));
                None
            }
        }
    };
    match take_str("specversion", true, &mut errs).as_deref() {
        Some("1.0") | None => {}
        Some(v) => errs.push(("specversion".into(), format!("unsupported CloudEvents version {v:?}; expected \"1.0\""))),
    }
    let id = take_str("id", true, &mut errs).and_then(|s| EventId::parse(s).map_err(|e| errs.push(("id".into(), e.0))).ok());
    let source = take_str("source", true, &mut errs);
    let event_type = take_str("type", true, &mut errs).and_then(|s| EventType::parse(s).map_err(|e| errs.push(("type".into(), e.0))).ok());
    let timestamp =
        take_str("time", false, &mut errs).and_then(|s| parse_time(&s).map_err(|reason| errs.push(("time".into(), reason.to_string()))).ok());
    let customer_id = take_str("subject", false, &mut errs);
    if customer_id.as_ref().is_some_and(|s| s.is_empty() || s.chars().count() > MAX_REF_CHARS) {
        errs.push(("subject".into(), format!("must be 1-{MAX_REF_CHARS} characters")));
    }
    let properties = match (obj.remove("data"), obj.remove("data_base64")) {
        (Some(Value::Object(m)), None) => Value::Object(m),
        (Some(Value::Null) | None, None) => Value::Object(Map::new()),
        (Some(other), None) => serde_json::json!({ "data": other }),
        (None | Some(Value::Null), Some(b64)) => serde_json::json!({ "data_base64": b64 }),
        (Some(_), Some(_)) => {
            errs.push(("data_base64".into(), "data and data_base64 are mutually exclusive".into()));
            Value::Null
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let mut context = Map::new();
    if let Some(s) = source {
        context.insert("source".into(), Value::String(s));
    }
    context.extend(obj);
    let to_raw = |v: Value| RawValue::from_string(v.to_string()).unwrap_or_else(|_| Event::empty_object());
    Ok(Event {
        workspace: workspace.clone(),
        id: id.ok_or_else(|| vec![("id".to_owned(), "is required".to_owned())])?,
        event_type: event_type.ok_or_else(|| vec![("type".to_owned(), "is required".to_owned())])?,
        timestamp: timestamp.unwrap_or(received_at),
        received_at,
        customer_id,
        subscription_id: None,
        user_id: None,
        properties: to_raw(properties),
        context: to_raw(Value::Object(context)),
    })
}

/// Why a time field was refused. The message is the `reason` a client
/// sees for the field, and stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Not an RFC 3339 time ([`parse_time`]).
    #[error("must be an RFC 3339 time such as 2024-05-01T12:00:00Z ({reason}): {value:?}")]
    NotRfc3339 {
        /// The text refused.
        value: String,
        /// What chrono found wrong with it.
        reason: chrono::ParseError,
    },
    /// Not an ISO 8601 time, with or without an offset (Segment's formats).
    #[error("must be an ISO 8601 time such as 2024-05-01T12:00:00Z: {0:?}")]
    NotIso8601(String),
}

/// RFC 3339 only, e.g. `2024-05-01T12:00:00Z` or `2024-05-01T21:00:00+09:00`.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, TimeError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).map_err(|reason| TimeError::NotRfc3339 { value: s.to_owned(), reason })
}

fn opt_string(raw: Option<&RawValue>, field: &str, errs: &mut Errs) -> Option<String> {
    let raw = raw?;
    if raw.get() == "null" {
        return None;
    }
    match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => Some(s),
        Err(_) => {
            errs.push((field.into(), format!("must be a string, got {}", json_kind(raw.get()))));
            None
        }
    }
}

/// Refuses what a state store cannot hold (NUL and other control
/// characters, see [`sluice_core::check_storable`]) in the ids that are
/// stored as keys — customer, subscription and user — and, for events that
/// update user and customer records (`identify`, `group`, `alias`), in the
/// trait keys and the alias's previous id. `names` are the client's names
/// of the customer, subscription, user and properties fields.
pub(crate) fn check_storable_fields(e: &Event, names: [&str; 4], errs: &mut Errs) {
    let ids = [e.customer_id.as_deref(), e.subscription_id.as_deref(), e.user_id.as_deref()];
    for (name, id) in names.iter().zip(ids) {
        if let Some(Err(err)) = id.map(sluice_core::check_storable) {
            errs.push(((*name).into(), err.0));
        }
    }
    if !sluice_core::has_record_effects(e.event_type.as_str()) {
        return;
    }
    if let Ok(Value::Object(props)) = serde_json::from_str::<Value>(e.properties.get()) {
        for (k, v) in &props {
            if let Err(err) = sluice_core::check_storable(k) {
                errs.push((format!("{}.{}", names[3], k.escape_debug()), format!("key {}", err.0)));
            }
            if e.event_type.as_str() == sluice_core::people::ALIAS && k == "previous_id" {
                if let Some(Err(err)) = v.as_str().map(sluice_core::check_storable) {
                    errs.push((format!("{}.previous_id", names[3]), err.0));
                }
            }
        }
    }
}

fn opt_ref(raw: Option<&RawValue>, field: &str, errs: &mut Errs) -> Option<String> {
    let s = opt_string(raw, field, errs)?;
    if s.is_empty() || s.chars().count() > MAX_REF_CHARS {
        errs.push((field.into(), format!("must be 1-{MAX_REF_CHARS} characters")));
        return None;
    }
    Some(s)
}

fn opt_object(raw: Option<&RawValue>, field: &str, errs: &mut Errs) -> Option<Box<RawValue>> {
    let raw = raw?;
    if raw.get() == "null" {
        return None;
    }
    if !raw.get().starts_with('{') {
        errs.push((field.into(), format!("must be a JSON object, got {}", json_kind(raw.get()))));
        return None;
    }
    Some(raw.to_owned())
}

fn json_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Turns serde's message into (field, reason), e.g. for unknown fields.
fn serde_field_error(e: &serde_json::Error) -> (String, String) {
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("").to_owned();
        return (
            field,
            "unknown field; allowed: id, type, timestamp, customer_id, subscription_id, user_id, properties, context (put custom data in properties)"
                .into(),
        );
    }
    if let Some(rest) = msg.strip_prefix("duplicate field `") {
        let field = rest.split('`').next().unwrap_or("").to_owned();
        return (field, "appears more than once".into());
    }
    (String::new(), msg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ws() -> WorkspaceName {
        WorkspaceName::parse("default").unwrap()
    }
    fn parse(body: &str, f: BodyFormat) -> Result<Vec<Event>, ParseError> {
        parse_body(body.as_bytes(), f, &ws(), Utc::now(), IngestLimits::default())
    }

    #[test]
    fn single_array_and_ndjson() {
        assert_eq!(parse(r#"{"type":"a"}"#, BodyFormat::Json).unwrap().len(), 1);
        assert_eq!(parse(r#"[{"type":"a"},{"type":"b","id":"x"}]"#, BodyFormat::Json).unwrap().len(), 2);
        let nd = "{\"type\":\"a\"}\r\n\n{\"type\":\"b\"}\n\n";
        assert_eq!(parse(nd, BodyFormat::Ndjson).unwrap().len(), 2);
    }

    #[test]
    fn defaults_generated() {
        let e = &parse(r#"{"type":"a"}"#, BodyFormat::Json).unwrap()[0];
        assert_eq!(e.id.as_str().len(), 36);
        assert_eq!(e.timestamp, e.received_at);
        assert_eq!(e.properties.get(), "{}");
    }

    #[test]
    fn every_bad_event_is_named() {
        let body =
            r#"[{"type":"ok"},{"type":"bad type"},{"id":5,"type":"x","timestamp":"yesterday"},{"customerId":"c","type":"y"},{"properties":[]}, 7]"#;
        let ParseError::Invalid { errors, invalid_events } = parse(body, BodyFormat::Json).unwrap_err() else { panic!() };
        assert_eq!(invalid_events, 5);
        let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(got, [(1, "type"), (2, "id"), (2, "timestamp"), (3, "customerId"), (4, "type"), (4, "properties"), (5, "")]);
    }

    #[test]
    fn ndjson_errors_carry_lines() {
        let ParseError::Invalid { errors, .. } = parse("{\"type\":\"a\"}\n\n{\"type\":1}\n", BodyFormat::Ndjson).unwrap_err() else { panic!() };
        assert_eq!((errors[0].index, errors[0].line), (1, Some(3)));
        assert!(matches!(parse("{\"type\":\"a\"}\n{oops\n", BodyFormat::Ndjson), Err(ParseError::Malformed(m)) if m.starts_with("line 2")));
    }

    #[test]
    fn malformed_and_limits() {
        assert!(matches!(parse("{", BodyFormat::Json), Err(ParseError::Malformed(_))));
        assert!(matches!(parse("", BodyFormat::Json), Err(ParseError::Malformed(_))));
        assert!(matches!(parse("[]", BodyFormat::Json), Err(ParseError::Malformed(_))));
        assert!(matches!(parse("42", BodyFormat::Json), Err(ParseError::Malformed(_))));
        let limits = IngestLimits { max_event_bytes: 30, max_events: 2 };
        let r = parse_body(br#"[{"type":"a"},{"type":"a"},{"type":"a"}]"#, BodyFormat::Json, &ws(), Utc::now(), limits);
        assert!(matches!(r, Err(ParseError::TooLarge { limit: "max_events", .. })));
        let r = parse_body(br#"[{"type":"a","properties":{"long":"xxxxxxxxxxxx"}}]"#, BodyFormat::Json, &ws(), Utc::now(), limits);
        assert!(matches!(r, Err(ParseError::TooLarge { limit: "max_event_bytes", .. })));
    }

    #[test]
    fn cloudevents_mapping() {
        let body = r#"{"specversion":"1.0","id":"ce-1","source":"/app","type":"com.example.created","time":"2024-01-01T09:00:00+09:00","subject":"cust-1","data":{"n":1},"tenant":"t1"}"#;
        let e = &parse(body, BodyFormat::CloudEvent).unwrap()[0];
        assert_eq!(e.id.as_str(), "ce-1");
        assert_eq!(e.event_type.as_str(), "com.example.created");
        assert_eq!(e.timestamp.to_rfc3339(), "2024-01-01T00:00:00+00:00");
        assert_eq!(e.customer_id.as_deref(), Some("cust-1"));
        assert_eq!(e.properties.get(), r#"{"n":1}"#);
        let ctx: Value = serde_json::from_str(e.context.get()).unwrap();
        assert_eq!(ctx, serde_json::json!({"source": "/app", "tenant": "t1"}));
        let batch = r#"[{"specversion":"1.0","id":"1","source":"s","type":"t","data":"text"},{"specversion":"0.3","type":"t"}]"#;
        let ParseError::Invalid { errors, .. } = parse(batch, BodyFormat::CloudEventsBatch).unwrap_err() else { panic!() };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["specversion", "id", "source"]);
        assert!(errors.iter().all(|e| e.index == 1));
        let ok = &parse(r#"[{"specversion":"1.0","id":"1","source":"s","type":"t","data":"text"}]"#, BodyFormat::CloudEventsBatch).unwrap()[0];
        assert_eq!(ok.properties.get(), r#"{"data":"text"}"#);
    }

    #[test]
    fn content_types() {
        assert_eq!(BodyFormat::from_content_type(Some("application/x-ndjson; charset=utf-8")), BodyFormat::Ndjson);
        assert_eq!(BodyFormat::from_content_type(Some("application/cloudevents-batch+json")), BodyFormat::CloudEventsBatch);
        assert_eq!(BodyFormat::from_content_type(None), BodyFormat::Json);
    }
}
