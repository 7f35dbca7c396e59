//! Meter definitions and how an event becomes usage.

use std::sync::Arc;

use chrono::{DateTime, Timelike, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use sluice_core::{Aggregation, Event};
use sluice_store::{Meter, UsageDelta};

use crate::MeterError;

/// A meter as requested by a client.
#[derive(Debug, Clone)]
pub struct MeterSpec {
    /// Key.
    pub key: String,
    /// Event type.
    pub event_type: String,
    /// Aggregation.
    pub aggregation: Aggregation,
    /// Value path.
    pub value_property: Option<String>,
    /// Group-by paths.
    pub group_by: Vec<String>,
    /// Equality filter.
    pub filter: Map<String, Value>,
}

/// Checks a meter definition; the error names the field.
pub fn validate(m: &MeterSpec) -> Result<(), (String, String)> {
    let e = |f: &str, r: String| Err((f.to_owned(), r));
    if m.key.is_empty() || m.key.len() > 64 || !m.key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return e("key", "must be 1-64 characters of A-Z a-z 0-9 _ - .".into());
    }
    if sluice_core::EventType::parse(m.event_type.clone()).is_err() {
        return e("event_type", "must be an event type: 1-128 of A-Z a-z 0-9 _ . : -".into());
    }
    match (&m.value_property, m.aggregation) {
        (None, a) if a.reads_values() => return e("value_property", format!("is required for {a}")),
        (Some(p), _) if !valid_path(p) => return e("value_property", "must be a dot path such as usage.bytes".into()),
        _ => {}
    }
    if let Some(p) = m.group_by.iter().find(|p| !valid_path(p)) {
        return e("group_by", format!("{p:?} is not a dot path"));
    }
    if let Some((k, _)) = m.filter.iter().find(|(k, v)| !valid_path(k) || v.is_object() || v.is_array()) {
        return e("filter", format!("{k:?}: filters are property paths equal to a string, number, boolean or null"));
    }
    Ok(())
}

fn valid_path(p: &str) -> bool {
    !p.is_empty() && p.len() <= 256 && p.split('.').all(|s| !s.is_empty())
}

/// The value at a dot path of a JSON object.
pub fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, k| cur.get(k))
}

/// A JSON number or numeric string as an exact decimal (numbers are read
/// from their JSON text, so `0.1` is exactly 0.1).
pub fn decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => n.to_string().parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&n.to_string()).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Start of the 15-minute UTC bucket of `t`, microseconds: the time rounded
/// down to a multiple of 15 minutes since the epoch (the same as setting the
/// minute to a multiple of 15 and the seconds to zero, as UTC days have
/// 86,400 seconds in Unix time), without calendar arithmetic: this runs
/// for every imported row.
pub fn bucket_of(t: chrono::DateTime<chrono::Utc>) -> i64 {
    if t.nanosecond() >= 1_000_000_000 {
        // A leap second (chrono keeps it as an extra second of :59): the
        // calendar way, so it stays in the bucket of its minute.
        let t = t.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap_or(t);
        let m = t.minute() - t.minute() % 15;
        return t.with_minute(m).unwrap_or(t).timestamp_micros();
    }
    const QUARTER_US: i64 = 15 * 60 * 1_000_000;
    let us = t.timestamp_micros();
    us - us.rem_euclid(QUARTER_US)
}

/// The most bytes of a usage bucket's group key and of a `unique_count`
/// value: both are part of a primary key, and PostgreSQL refuses index rows
/// over about 2.7 KB (a hostile value would otherwise be refused by the store
/// at commit time instead of being dead-lettered here, by its event).
pub const MAX_KEY_BYTES: usize = 512;

/// The group key of an event with these properties (the JSON object of the
/// meter's `group_by` properties, empty without any); `None` when the
/// meter's filter leaves the event out.
fn filtered_group(m: &Meter, props: &Value) -> Result<Option<String>, MeterError> {
    if m.filter.iter().any(|(k, want)| at(props, k) != Some(want)) {
        return Ok(None);
    }
    let group_key = if m.group_by.is_empty() {
        String::new()
    } else {
        let g: Map<String, Value> = m.group_by.iter().map(|p| (p.clone(), at(props, p).cloned().unwrap_or(Value::Null))).collect();
        Value::Object(g).to_string()
    };
    if group_key.len() > MAX_KEY_BYTES {
        return Err(MeterError::GroupKeyTooLong { meter: m.key.clone(), bytes: group_key.len() });
    }
    Ok(Some(group_key))
}

/// The usage one event contributes to one meter: `Ok(None)` if the meter
/// does not apply to it, `Err` (naming the property) if it applies but its
/// value is missing or not a number.
pub fn usage_of(m: &Meter, e: &Event) -> Result<Option<UsageDelta>, MeterError> {
    if e.workspace.as_str() != m.workspace || e.event_type.as_str() != m.event_type {
        return Ok(None);
    }
    let props: Value = serde_json::from_str(e.properties.get()).unwrap_or(Value::Null);
    let Some(group_key) = filtered_group(m, &props)? else { return Ok(None) };
    let names = [
        m.workspace.as_str(),
        m.key.as_str(),
        e.customer_id.as_deref().unwrap_or_default(),
        e.subscription_id.as_deref().unwrap_or_default(),
        group_key.as_str(),
    ];
    let mut d = counted(names.map(Arc::from), e.timestamp);
    if m.aggregation == Aggregation::Count {
        return Ok(Some(d));
    }
    let path = m.value_property.as_deref().unwrap_or_default();
    let raw = at(&props, path).ok_or_else(|| MeterError::MissingValue { meter: m.key.clone(), path: path.to_owned() })?;
    if m.aggregation == Aggregation::UniqueCount {
        let v = match raw {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if v.len() > MAX_KEY_BYTES || v.contains('\0') {
            return Err(MeterError::BadUniqueValue { meter: m.key.clone(), path: path.to_owned() });
        }
        d.unique = Some(v);
        return Ok(Some(d));
    }
    let v = decimal(raw).ok_or_else(|| MeterError::NotANumber { meter: m.key.clone(), path: path.to_owned(), shown: raw.to_string() })?;
    set_value(&mut d, v, e.timestamp);
    Ok(Some(d))
}

/// One event's delta before its value: a count of 1 in its bucket.
/// `names`: workspace, meter, customer, subscription, group key.
fn counted(names: [Arc<str>; 5], at: DateTime<Utc>) -> UsageDelta {
    let [workspace, meter, customer_id, subscription_id, group_key] = names;
    UsageDelta {
        workspace,
        meter,
        customer_id,
        subscription_id,
        group_key,
        bucket_start: bucket_of(at),
        count: 1,
        sum: Decimal::ZERO,
        min: None,
        max: None,
        latest_at: None,
        latest_value: None,
        unique: None,
    }
}

/// One event's numeric value: its sum, min, max and latest.
fn set_value(d: &mut UsageDelta, v: Decimal, at: DateTime<Utc>) {
    d.sum = v;
    d.min = Some(v);
    d.max = Some(v);
    d.latest_at = Some(at.timestamp_micros());
    d.latest_value = Some(v);
}

/// The usage a batch record contributes to one meter, summed per bucket,
/// without expanding the batch into events. `None` when the meter's filter
/// or group-by reads the batch's varying value (then the caller meters the
/// expanded events one by one); `Err` if a row's value is not a number
/// (then the caller does the same, so that only that event fails).
pub fn batch_usage(m: &Meter, b: &sluice_core::EventBatch) -> Option<Result<Vec<UsageDelta>, MeterError>> {
    let h = &b.header;
    if h.workspace.as_str() != m.workspace || h.event_type.as_str() != m.event_type {
        return Some(Ok(Vec::new()));
    }
    let overlaps = |p: &str| {
        h.value_path
            .as_deref()
            .is_some_and(|v| p == v || v.strip_prefix(p).is_some_and(|r| r.starts_with('.')) || p.strip_prefix(v).is_some_and(|r| r.starts_with('.')))
    };
    if m.filter.keys().any(|k| overlaps(k)) || m.group_by.iter().any(|g| overlaps(g)) {
        return None;
    }
    // Filter and group are the same for every row: read them off the template.
    let template = Value::Object(h.properties.clone());
    let group_key = match filtered_group(m, &template) {
        Ok(Some(g)) => g,
        Ok(None) => return Some(Ok(Vec::new())),
        Err(e) => return Some(Err(e)),
    };
    let valued = m.aggregation.reads_values();
    if valued && m.value_property != h.value_path {
        // The value is not the row's: only the template can hold it, which
        // the per-event path handles.
        return None;
    }
    let unique = m.aggregation == Aggregation::UniqueCount;
    let path = m.value_property.as_deref().unwrap_or_default();
    // Every delta shares the meter's names and the batch's customer and
    // subscription ids (no allocation per row).
    let (workspace, meter, group_key): (Arc<str>, Arc<str>, Arc<str>) = (m.workspace.as_str().into(), m.key.as_str().into(), group_key.into());
    let none: Arc<str> = Arc::from("");
    let name = |s: &Option<Arc<str>>| s.clone().unwrap_or_else(|| none.clone());
    let mut at_row: foldhash::HashMap<(Option<&str>, Option<&str>, i64), usize> =
        foldhash::HashMap::with_capacity_and_hasher(b.rows.len().min(8192), Default::default());
    let mut out: Vec<UsageDelta> = Vec::with_capacity(b.rows.len().min(8192));
    for r in &b.rows {
        let mut d = counted([workspace.clone(), meter.clone(), name(&r.customer_id), name(&r.subscription_id), group_key.clone()], r.timestamp);
        if valued {
            let Some(raw) = r.value.as_deref() else {
                return Some(Err(MeterError::MissingValue { meter: m.key.clone(), path: path.to_owned() }));
            };
            if unique {
                if raw.len() > MAX_KEY_BYTES || raw.contains('\0') {
                    return Some(Err(MeterError::BadUniqueValue { meter: m.key.clone(), path: path.to_owned() }));
                }
                d.unique = Some(raw.to_owned());
            } else {
                let Ok(v) = raw.trim().parse::<Decimal>() else {
                    return Some(Err(MeterError::NotANumber { meter: m.key.clone(), path: path.to_owned(), shown: format!("{raw:?}") }));
                };
                set_value(&mut d, v, r.timestamp);
            }
        }
        if unique {
            out.push(d);
            continue;
        }
        // Rows of one bucket fold into its first delta.
        match at_row.entry((r.customer_id.as_deref(), r.subscription_id.as_deref(), d.bucket_start)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                if let Err(o) = out[*e.get()].merge(&d) {
                    // The caller meters the events one by one: only the
                    // event that overflows fails.
                    return Some(Err(o.into()));
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(d);
            }
        }
    }
    Some(Ok(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn decimals_are_exact() {
        let mut s = Decimal::ZERO;
        for _ in 0..10 {
            s += decimal(&serde_json::json!(0.1)).unwrap();
        }
        assert_eq!(s, Decimal::ONE);
        assert_eq!(decimal(&serde_json::json!("12.50")).unwrap().to_string(), "12.50");
        assert_eq!(decimal(&serde_json::json!(1e3)).unwrap(), Decimal::from(1000));
        assert!(decimal(&serde_json::json!("x")).is_none());
    }

    #[test]
    fn buckets_are_quarter_hours() {
        let t: chrono::DateTime<chrono::Utc> = "2024-05-01T10:44:59.9Z".parse().unwrap();
        assert_eq!(chrono::DateTime::from_timestamp_micros(bucket_of(t)).unwrap().to_rfc3339(), "2024-05-01T10:30:00+00:00");
        let before_1970: chrono::DateTime<chrono::Utc> = "1969-12-31T23:59:59.5Z".parse().unwrap();
        assert_eq!(chrono::DateTime::from_timestamp_micros(bucket_of(before_1970)).unwrap().to_rfc3339(), "1969-12-31T23:45:00+00:00");
        let leap: chrono::DateTime<chrono::Utc> = "2016-12-31T23:59:60.5Z".parse().unwrap();
        assert_eq!(chrono::DateTime::from_timestamp_micros(bucket_of(leap)).unwrap().to_rfc3339(), "2016-12-31T23:45:00+00:00");
        // The arithmetic agrees with the calendar rule (minute down to a
        // multiple of 15, seconds to zero) over many random times: stored
        // buckets of earlier versions stay the same buckets.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = chrono::DateTime::from_timestamp((x % 8_000_000_000) as i64 - 3_000_000_000, (x >> 34) as u32 % 1_000_000_000).unwrap();
            let c = t.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap();
            let calendar = c.with_minute(c.minute() - c.minute() % 15).unwrap().timestamp_micros();
            assert_eq!(bucket_of(t), calendar, "{t}");
        }
    }
}
