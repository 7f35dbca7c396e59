//! The lake's columns, and events turned into Arrow record batches.
//!
//! Every file holds the base columns (see [`base_fields`]) plus one typed
//! column `p_<name>` per property declared for its event type
//! (`PUT /v1/schemas/{type}`). The Hive partition columns (`content_type`,
//! `year`, `month`, `day`, `hour`) are in the path, not in the files.
//!
//! The raw client IP is never written: `ip` holds the anonymized address,
//! and every `ip` key in `context` (at any depth) is replaced by it too.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde_json::Value;
use sluice_core::lake::PropertyType;
use sluice_core::Event;
use sluice_enrich::Enricher;

/// Names of the Hive partition columns, in path order (after `workspace`).
pub const PARTITION_COLUMNS: [&str; 5] = ["content_type", "year", "month", "day", "hour"];

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The columns every lake file has, in file order.
pub fn base_fields() -> Vec<Field> {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("timestamp", ts(), false),
        Field::new("received_at", ts(), false),
        s("customer_id"),
        s("subscription_id"),
        s("user_id"),
        Field::new("properties", DataType::Utf8, false),
        Field::new("context", DataType::Utf8, false),
        s("ua_browser"),
        s("ua_browser_version"),
        s("ua_os"),
        s("ua_device"),
        s("referrer_host"),
        s("referrer_medium"),
        s("referrer_source"),
        s("utm_source"),
        s("utm_medium"),
        s("utm_campaign"),
        s("utm_term"),
        s("utm_content"),
        s("ip"),
    ]
}

/// The Arrow type of a declared property.
pub fn arrow_type(t: PropertyType) -> DataType {
    match t {
        PropertyType::Int64 => DataType::Int64,
        PropertyType::Float64 => DataType::Float64,
        PropertyType::Bool => DataType::Boolean,
        PropertyType::String => DataType::Utf8,
        PropertyType::Timestamp => ts(),
    }
}

/// Column name of a declared property: `p_` + the name with every character
/// other than ASCII letters, digits and `_` replaced by `_`.
pub fn typed_column(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    format!("p_{clean}")
}

/// Schema of a file: the base columns plus the typed columns.
pub fn file_schema(typed: &[(String, PropertyType)]) -> SchemaRef {
    let mut fields = base_fields();
    fields.extend(typed.iter().map(|(n, t)| Field::new(typed_column(n), arrow_type(*t), true)));
    Arc::new(Schema::new(fields))
}

/// The fields of one event as the lake writes them.
pub struct Fields<'a> {
    /// Event id.
    pub id: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Event time, microseconds since the epoch.
    pub timestamp: i64,
    /// Receive time, microseconds since the epoch.
    pub received_at: i64,
    /// Customer.
    pub customer_id: Option<&'a str>,
    /// Subscription.
    pub subscription_id: Option<&'a str>,
    /// User.
    pub user_id: Option<&'a str>,
    /// Properties (JSON object text).
    pub properties: &'a str,
    /// Context (JSON object text).
    pub context: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of `e`.
    pub fn of(e: &'a Event) -> Fields<'a> {
        Fields {
            id: e.id.as_str(),
            event_type: e.event_type.as_str(),
            timestamp: e.timestamp.timestamp_micros(),
            received_at: e.received_at.timestamp_micros(),
            customer_id: e.customer_id.as_deref(),
            subscription_id: e.subscription_id.as_deref(),
            user_id: e.user_id.as_deref(),
            properties: e.properties.get(),
            context: e.context.get(),
        }
    }
}

enum Typed {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Time(TimestampMicrosecondBuilder),
}

/// Builds one record batch from events (all of one file schema).
pub struct BatchBuilder {
    schema: SchemaRef,
    typed_names: Vec<String>,
    strings: Vec<StringBuilder>,
    times: [TimestampMicrosecondBuilder; 2],
    typed: Vec<Typed>,
    rows: usize,
    /// The last context enriched: its text, the context written and the
    /// enrichment columns. Events of a batch (a CSV import) share their
    /// context, so they are enriched once.
    last_context: Option<(String, String, Vec<Option<String>>)>,
}

// Indexes into `strings`, in file order without the two timestamps.
const S_ID: usize = 0;
const S_TYPE: usize = 1;
const S_CUSTOMER: usize = 2;
const S_SUBSCRIPTION: usize = 3;
const S_USER: usize = 4;
const S_PROPERTIES: usize = 5;
const S_CONTEXT: usize = 6;
const S_ENRICH: usize = 7;
const N_STRINGS: usize = 20;

impl BatchBuilder {
    /// A builder for files with these typed columns.
    pub fn new(typed: &[(String, PropertyType)], capacity: usize) -> BatchBuilder {
        let t = || TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC");
        BatchBuilder {
            schema: file_schema(typed),
            typed_names: typed.iter().map(|(n, _)| n.clone()).collect(),
            strings: (0..N_STRINGS).map(|_| StringBuilder::with_capacity(capacity, capacity * 16)).collect(),
            times: [t(), t()],
            typed: typed
                .iter()
                .map(|(_, ty)| match ty {
                    PropertyType::Int64 => Typed::Int(Int64Builder::with_capacity(capacity)),
                    PropertyType::Float64 => Typed::Float(Float64Builder::with_capacity(capacity)),
                    PropertyType::Bool => Typed::Bool(BooleanBuilder::with_capacity(capacity)),
                    PropertyType::String => Typed::Str(StringBuilder::with_capacity(capacity, capacity * 8)),
                    PropertyType::Timestamp => Typed::Time(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC")),
                })
                .collect(),
            rows: 0,
            last_context: None,
        }
    }

    /// Rows added so far.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds one event. Typed columns are filled only for the properties in
    /// `declared` (the schema of the event's type); the others are null.
    pub fn push(&mut self, e: &Event, enricher: &mut Enricher, declared: &[(String, PropertyType)]) {
        self.push_fields(&Fields::of(e), enricher, declared);
    }

    /// Adds one event given by its fields (a row of a batch record is
    /// written this way, without building an [`Event`]).
    pub fn push_fields(&mut self, e: &Fields<'_>, enricher: &mut Enricher, declared: &[(String, PropertyType)]) {
        let s = &mut self.strings;
        s[S_ID].append_value(e.id);
        s[S_TYPE].append_value(e.event_type);
        self.times[0].append_value(e.timestamp);
        self.times[1].append_value(e.received_at);
        s[S_CUSTOMER].append_option(e.customer_id);
        s[S_SUBSCRIPTION].append_option(e.subscription_id);
        s[S_USER].append_option(e.user_id);
        s[S_PROPERTIES].append_value(e.properties);
        let ctx_text = e.context;
        if ctx_text.len() <= 2 {
            // `{}`: nothing to enrich.
            s[S_CONTEXT].append_value(ctx_text);
            for b in &mut s[S_ENRICH..] {
                b.append_null();
            }
        } else if let Some((_, out, vals)) = self.last_context.as_ref().filter(|(text, _, _)| text == ctx_text) {
            s[S_CONTEXT].append_value(out);
            for (b, v) in s[S_ENRICH..].iter_mut().zip(vals) {
                b.append_option(v.as_deref());
            }
        } else {
            let mut ctx: Value = serde_json::from_str(ctx_text).unwrap_or(Value::Null);
            let en = enricher.enrich(&ctx);
            let out = if contains_ip(&ctx) {
                scrub_ip(&mut ctx, en.ip.as_deref());
                ctx.to_string()
            } else {
                ctx_text.to_owned()
            };
            s[S_CONTEXT].append_value(&out);
            let vals: [Option<&str>; 13] = [
                en.ua_browser.as_deref(),
                en.ua_browser_version.as_deref(),
                en.ua_os.as_deref(),
                en.ua_device.as_deref(),
                en.referrer_host.as_deref(),
                en.referrer_medium,
                en.referrer_source.as_deref(),
                en.utm_source.as_deref(),
                en.utm_medium.as_deref(),
                en.utm_campaign.as_deref(),
                en.utm_term.as_deref(),
                en.utm_content.as_deref(),
                en.ip.as_deref(),
            ];
            for (b, v) in s[S_ENRICH..].iter_mut().zip(vals) {
                b.append_option(v);
            }
            self.last_context = Some((ctx_text.to_owned(), out, vals.iter().map(|v| v.map(str::to_owned)).collect()));
        }
        if !self.typed.is_empty() {
            let props: serde_json::Map<String, Value> =
                if declared.is_empty() { serde_json::Map::new() } else { serde_json::from_str(e.properties).unwrap_or_default() };
            for (name, b) in self.typed_names.iter().zip(self.typed.iter_mut()) {
                let v = if declared.iter().any(|(n, _)| n == name) { props.get(name) } else { None };
                match b {
                    Typed::Int(b) => b.append_option(v.and_then(Value::as_i64)),
                    Typed::Float(b) => b.append_option(v.and_then(Value::as_f64)),
                    Typed::Bool(b) => b.append_option(v.and_then(Value::as_bool)),
                    Typed::Str(b) => b.append_option(v.and_then(Value::as_str)),
                    Typed::Time(b) => b.append_option(
                        v.and_then(Value::as_str).and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.timestamp_micros()),
                    ),
                }
            }
        }
        self.rows += 1;
    }

    /// The batch of every row added; the builder is empty afterwards.
    pub fn finish(&mut self) -> RecordBatch {
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let s = &mut self.strings;
        cols.push(Arc::new(s[S_ID].finish()));
        cols.push(Arc::new(s[S_TYPE].finish()));
        cols.push(Arc::new(self.times[0].finish()));
        cols.push(Arc::new(self.times[1].finish()));
        for b in &mut s[S_CUSTOMER..] {
            cols.push(Arc::new(b.finish()));
        }
        for b in &mut self.typed {
            cols.push(match b {
                Typed::Int(b) => Arc::new(b.finish()),
                Typed::Float(b) => Arc::new(b.finish()),
                Typed::Bool(b) => Arc::new(b.finish()),
                Typed::Str(b) => Arc::new(b.finish()),
                Typed::Time(b) => Arc::new(b.finish()),
            });
        }
        self.rows = 0;
        RecordBatch::try_new(self.schema.clone(), cols).expect("columns match the schema by construction")
    }

    /// The file schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

fn contains_ip(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| k == "ip" || contains_ip(v)),
        Value::Array(a) => a.iter().any(contains_ip),
        _ => false,
    }
}

/// Replaces every `ip` key's value by the anonymized address (or null).
fn scrub_ip(v: &mut Value, anonymized: Option<&str>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if k == "ip" {
                    *v = match v.as_str().and_then(sluice_enrich::anonymize_ip) {
                        Some(a) => Value::String(a),
                        None => anonymized.map_or(Value::Null, |a| Value::String(a.to_owned())),
                    };
                } else {
                    scrub_ip(v, anonymized);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| scrub_ip(v, anonymized)),
        _ => {}
    }
}
