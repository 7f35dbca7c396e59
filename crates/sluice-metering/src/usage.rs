//! Usage queries: buckets aggregated into periods of the workspace's time zone.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sluice_store::{Meter, Store, StoreError};

/// `hour`, `day`, `month` or `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// Hours of the time zone.
    Hour,
    /// Days of the time zone.
    Day,
    /// Calendar months of the time zone.
    Month,
    /// One period: the whole range.
    Total,
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "month" => Ok(Granularity::Month),
            "total" => Ok(Granularity::Total),
            _ => Err("must be hour, day, month or total".into()),
        }
    }
}

fn local_start(tz: Tz, d: NaiveDate, hour: u32) -> DateTime<Utc> {
    let naive = d.and_hms_opt(hour, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.with_timezone(&Utc),
        // A gap (DST): the period starts at the first instant that exists.
        LocalResult::None => tz.from_utc_datetime(&(naive - Duration::hours(1))).with_timezone(&Utc) + Duration::hours(1),
    }
}

/// The period of `t`: (start, end) in UTC.
pub fn period(tz: Tz, g: Granularity, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let local = t.with_timezone(&tz);
    let d = local.date_naive();
    match g {
        Granularity::Hour => {
            let start = local_start(tz, d, chrono::Timelike::hour(&local));
            (start, start + Duration::hours(1))
        }
        Granularity::Day => (local_start(tz, d, 0), local_start(tz, d.succ_opt().unwrap_or(d), 0)),
        Granularity::Month => {
            let first = NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d);
            let next = if d.month() == 12 {
                NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
            }
            .unwrap_or(first);
            (local_start(tz, first, 0), local_start(tz, next, 0))
        }
        Granularity::Total => (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC),
    }
}

/// Filters of a usage query.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Only this subscription.
    pub subscription_id: Option<String>,
    /// From (inclusive; rounded down to 15 minutes by the buckets).
    pub from: Option<DateTime<Utc>>,
    /// To (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// Period length.
    pub granularity: Option<Granularity>,
    /// Group-by paths (a subset of the meter's) to break the usage down by.
    pub group_by: Vec<String>,
}

/// Rows `{customer_id, subscription_id, period_start, period_end, value, group}`.
pub async fn query(store: &Store, meter: &Meter, tz: Tz, q: &UsageQuery) -> Result<Vec<Value>, StoreError> {
    let g = q.granularity.unwrap_or(Granularity::Total);
    let project = |group_key: &str| -> Value {
        if q.group_by.is_empty() {
            return Value::Null;
        }
        let all: Map<String, Value> = serde_json::from_str(group_key).unwrap_or_default();
        Value::Object(q.group_by.iter().map(|p| (p.clone(), all.get(p).cloned().unwrap_or(Value::Null))).collect())
    };
    let (cust, sub) = (q.customer_id.as_deref(), q.subscription_id.as_deref());
    type Key = (String, String, String, DateTime<Utc>, DateTime<Utc>);
    let key_of = |c: &str, s: &str, gk: &str, t: DateTime<Utc>| -> Key {
        let (start, end) = match g {
            Granularity::Total => (q.from.unwrap_or(DateTime::<Utc>::MIN_UTC), q.to.unwrap_or(DateTime::<Utc>::MAX_UTC)),
            _ => period(tz, g, t),
        };
        (c.to_owned(), s.to_owned(), project(gk).to_string(), start, end)
    };
    let mut out: BTreeMap<Key, Decimal> = BTreeMap::new();
    if meter.aggregation == "unique_count" {
        let mut seen: BTreeMap<Key, HashSet<String>> = BTreeMap::new();
        for (c, s, gk, t, v) in store.usage_unique_values(&meter.workspace, &meter.key, cust, sub, q.from, q.to).await? {
            seen.entry(key_of(&c, &s, &gk, t)).or_default().insert(v);
        }
        out = seen.into_iter().map(|(k, v)| (k, Decimal::from(v.len()))).collect();
    } else {
        let mut latest: BTreeMap<Key, (i64, Decimal)> = BTreeMap::new();
        for b in store.usage_buckets(&meter.workspace, &meter.key, cust, sub, q.from, q.to).await? {
            let k = key_of(&b.customer_id, &b.subscription_id, &b.group_key, b.bucket_start);
            match meter.aggregation.as_str() {
                "count" => *out.entry(k).or_default() += Decimal::from(b.count),
                "sum" => *out.entry(k).or_default() += b.sum,
                "max" => {
                    if let Some(v) = b.max {
                        let e = out.entry(k).or_insert(v);
                        *e = (*e).max(v);
                    }
                }
                "min" => {
                    if let Some(v) = b.min {
                        let e = out.entry(k).or_insert(v);
                        *e = (*e).min(v);
                    }
                }
                _ => {
                    if let (Some(at), Some(v)) = (b.latest_at, b.latest_value) {
                        let at = at.timestamp_micros();
                        let e = latest.entry(k).or_insert((at, v));
                        if at >= e.0 {
                            *e = (at, v);
                        }
                    }
                }
            }
        }
        out.extend(latest.into_iter().map(|(k, (_, v))| (k, v)));
    }
    let time = |t: DateTime<Utc>| -> Value {
        if t == DateTime::<Utc>::MIN_UTC || t == DateTime::<Utc>::MAX_UTC {
            Value::Null
        } else {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
    };
    Ok(out
        .into_iter()
        .map(|((c, s, gk, start, end), v)| {
            json!({
                "customer_id": if c.is_empty() { Value::Null } else { Value::String(c) },
                "subscription_id": if s.is_empty() { Value::Null } else { Value::String(s) },
                "period_start": time(start),
                "period_end": time(end),
                "value": v.normalize().to_string(),
                "group": serde_json::from_str::<Value>(&gk).unwrap_or(Value::Null),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokyo_months_and_days_start_at_local_midnight() {
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        let t: DateTime<Utc> = "2024-01-31T16:30:00Z".parse().unwrap(); // 2024-02-01 01:30 JST
        let (s, e) = period(tz, Granularity::Month, t);
        assert_eq!(s.to_rfc3339(), "2024-01-31T15:00:00+00:00");
        assert_eq!(e.to_rfc3339(), "2024-02-29T15:00:00+00:00");
        let (s, _) = period(tz, Granularity::Day, t);
        assert_eq!(s.to_rfc3339(), "2024-01-31T15:00:00+00:00");
        let ny: Tz = "America/New_York".parse().unwrap();
        let (s, e) = period(ny, Granularity::Day, "2024-03-10T12:00:00Z".parse().unwrap()); // DST day: 23 hours
        assert_eq!((e - s).num_hours(), 23);
    }
}
