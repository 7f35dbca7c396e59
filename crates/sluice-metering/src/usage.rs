//! Usage queries: buckets aggregated into periods of the workspace's time zone.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sluice_core::Aggregation;
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
    type Err = crate::MeterError;
    fn from_str(s: &str) -> Result<Self, crate::MeterError> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "month" => Ok(Granularity::Month),
            "total" => Ok(Granularity::Total),
            _ => Err(crate::MeterError::UnknownGranularity),
        }
    }
}

/// The instant a local date's `hour` begins in `tz` (in a DST gap: the first
/// instant that exists). Billing cycles start at local midnights with it.
pub fn local_start(tz: Tz, d: NaiveDate, hour: u32) -> DateTime<Utc> {
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
            let next =
                if d.month() == 12 { NaiveDate::from_ymd_opt(d.year() + 1, 1, 1) } else { NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1) }
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

/// A period's value while buckets fold into it: `value` for count, sum,
/// max and min (none yet: no bucket had a max or min), `latest` (event
/// time in microseconds, value) for latest.
#[derive(Debug, Clone, Copy)]
struct Acc {
    value: Option<Decimal>,
    latest: Option<(i64, Decimal)>,
}

impl Acc {
    /// A bucket's contribution.
    fn of(agg: Aggregation, count: i64, sum: Decimal, min: Option<Decimal>, max: Option<Decimal>, latest: Option<(i64, Decimal)>) -> Acc {
        let value = match agg {
            Aggregation::Count => Some(Decimal::from(count)),
            Aggregation::Sum => Some(sum),
            Aggregation::Max => max,
            Aggregation::Min => min,
            Aggregation::Latest | Aggregation::UniqueCount => None,
        };
        Acc { value, latest: if agg == Aggregation::Latest { latest } else { None } }
    }

    /// Folds `other` in; for latest, the later value wins (the later of
    /// equal times: buckets come in key order). A count or sum beyond the
    /// largest exact decimal is an `Err` of the two addends; `self` is then
    /// unchanged.
    fn merge(&mut self, agg: Aggregation, other: Acc) -> Result<(), (Decimal, Decimal)> {
        self.value = match (agg, self.value, other.value) {
            (Aggregation::Count | Aggregation::Sum, a, b) => {
                let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
                Some(a.checked_add(b).ok_or((a, b))?)
            }
            (Aggregation::Max, Some(a), Some(b)) => Some(a.max(b)),
            (Aggregation::Min, Some(a), Some(b)) => Some(a.min(b)),
            (_, a, b) => a.or(b),
        };
        if let Some((at, v)) = other.latest {
            if self.latest.is_none_or(|(t, _)| at >= t) {
                self.latest = Some((at, v));
            }
        }
        Ok(())
    }

    /// The period's value: none if no bucket had one (max or min of no
    /// value, latest of no value).
    fn value(&self) -> Option<Decimal> {
        self.value.or(self.latest.map(|(_, v)| v))
    }
}

/// The value of `buckets` folded into one period, as a usage query with
/// `granularity=total` gives it (billing uses it for an invoice period):
/// `None` when no bucket holds a value (a max of nothing). A count or sum
/// beyond the largest exact decimal is an `Err` of the two addends.
pub fn fold_buckets<'a>(
    agg: Aggregation,
    buckets: impl IntoIterator<Item = &'a sluice_store::UsageBucket>,
) -> Result<Option<Decimal>, (Decimal, Decimal)> {
    let mut acc: Option<Acc> = None;
    for b in buckets {
        let one = Acc::of(agg, b.count, b.sum, b.min, b.max, b.latest_at.zip(b.latest_value).map(|(at, v)| (at.timestamp_micros(), v)));
        match &mut acc {
            Some(a) => a.merge(agg, one)?,
            None => acc = Some(one),
        }
    }
    Ok(acc.and_then(|a| a.value()))
}

/// Why a usage query failed.
#[derive(Debug, thiserror::Error)]
pub enum UsageQueryError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A period's total is beyond the largest exact decimal: refused, never
    /// rounded (a client error: 422).
    #[error("the usage of meter {meter:?} for customer {customer_id:?} in the period from {period_start} is beyond the largest exact decimal (about 7.9e28): {total} + {value}; ask for a finer granularity or a shorter period")]
    Overflow {
        /// Meter key.
        meter: String,
        /// Customer (`""` when none).
        customer_id: String,
        /// Start of the period (RFC 3339, or `-` for the whole range).
        period_start: String,
        /// What the period held so far.
        total: Decimal,
        /// What was being added.
        value: Decimal,
    },
}

/// Rows `{customer_id, subscription_id, period_start, period_end, value, group}`.
pub async fn query(store: &Store, meter: &Meter, tz: Tz, q: &UsageQuery) -> Result<Vec<Value>, UsageQueryError> {
    let g = q.granularity.unwrap_or(Granularity::Total);
    let project = |group_key: &str| -> Value {
        if q.group_by.is_empty() {
            return Value::Null;
        }
        let all: Map<String, Value> = serde_json::from_str(group_key).unwrap_or_default();
        Value::Object(q.group_by.iter().map(|p| (p.clone(), all.get(p).cloned().unwrap_or(Value::Null))).collect())
    };
    let (cust, sub) = (q.customer_id.as_deref(), q.subscription_id.as_deref());
    let period_of = |t: DateTime<Utc>| -> (DateTime<Utc>, DateTime<Utc>) {
        match g {
            Granularity::Total => (q.from.unwrap_or(DateTime::<Utc>::MIN_UTC), q.to.unwrap_or(DateTime::<Utc>::MAX_UTC)),
            _ => period(tz, g, t),
        }
    };
    type Key = (String, String, String, DateTime<Utc>, DateTime<Utc>);
    let out: BTreeMap<Key, Decimal>;
    if meter.aggregation == Aggregation::UniqueCount {
        let mut seen: BTreeMap<Key, HashSet<String>> = BTreeMap::new();
        for (c, s, gk, t, v) in store.usage_unique_values(&meter.workspace, &meter.key, cust, sub, q.from, q.to).await? {
            let (start, end) = period_of(t);
            seen.entry((c, s, project(&gk).to_string(), start, end)).or_default().insert(v);
        }
        out = seen.into_iter().map(|(k, v)| (k, Decimal::from(v.len()))).collect();
    } else {
        // Buckets first fold per stored group key, with keys borrowed from
        // the buckets (owned keys cost four strings a bucket and as many
        // string comparisons in the map; measured: docs/BENCHMARKS.md, "CSV
        // usage import"); the few folded periods are then folded again by
        // the requested groups.
        let agg = meter.aggregation;
        let buckets = store.usage_buckets(&meter.workspace, &meter.key, cust, sub, q.from, q.to).await?;
        let overflow = |customer: &str, start: DateTime<Utc>, (total, value): (Decimal, Decimal)| UsageQueryError::Overflow {
            meter: meter.key.clone(),
            customer_id: customer.to_owned(),
            period_start: if start == DateTime::<Utc>::MIN_UTC { "-".into() } else { start.to_rfc3339() },
            total,
            value,
        };
        // (meter, customer, group, period start, period end)
        type PeriodKey<'a> = (&'a str, &'a str, &'a str, DateTime<Utc>, DateTime<Utc>);
        let mut folded: BTreeMap<PeriodKey, Acc> = BTreeMap::new();
        for b in &buckets {
            let (start, end) = period_of(b.bucket_start);
            let acc = Acc::of(agg, b.count, b.sum, b.min, b.max, b.latest_at.zip(b.latest_value).map(|(at, v)| (at.timestamp_micros(), v)));
            match folded.entry((&b.customer_id, &b.subscription_id, &b.group_key, start, end)) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    e.get_mut().merge(agg, acc).map_err(|v| overflow(&b.customer_id, start, v))?;
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(acc);
                }
            }
        }
        let mut grouped: BTreeMap<Key, Acc> = BTreeMap::new();
        for ((c, s, gk, start, end), acc) in folded {
            match grouped.entry((c.to_owned(), s.to_owned(), project(gk).to_string(), start, end)) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    e.get_mut().merge(agg, acc).map_err(|v| overflow(c, start, v))?;
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(acc);
                }
            }
        }
        out = grouped.into_iter().filter_map(|(k, acc)| acc.value().map(|v| (k, v))).collect();
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
    fn buckets_fold_per_aggregation() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let buckets = [
            (2, d("1.5"), Some(d("0.5")), Some(d("1")), Some((10, d("1")))),
            (1, d("0.25"), Some(d("0.25")), Some(d("0.25")), Some((20, d("0.25")))),
            (3, d("0"), None, None, None),
        ];
        let fold = |agg| {
            let mut it = buckets.iter().map(|&(c, s, mn, mx, l)| Acc::of(agg, c, s, mn, mx, l));
            let mut a = it.next().unwrap();
            for b in it {
                a.merge(agg, b).unwrap();
            }
            a.value()
        };
        assert_eq!(fold(Aggregation::Count), Some(d("6")));
        assert_eq!(fold(Aggregation::Sum), Some(d("1.75")));
        assert_eq!(fold(Aggregation::Max), Some(d("1")));
        assert_eq!(fold(Aggregation::Min), Some(d("0.25")));
        assert_eq!(fold(Aggregation::Latest), Some(d("0.25")));
        // A period whose buckets hold no value has none, not zero.
        assert_eq!(Acc::of(Aggregation::Max, 1, Decimal::ZERO, None, None, None).value(), None);
        assert_eq!(Acc::of(Aggregation::Latest, 1, Decimal::ZERO, None, None, None).value(), None);
    }

    #[test]
    fn a_sum_beyond_the_largest_decimal_is_an_error_not_a_panic() {
        let big: Decimal = "50000000000000000000000000000".parse().unwrap();
        let mut a = Acc::of(Aggregation::Sum, 1, big, None, None, None);
        assert_eq!(a.merge(Aggregation::Sum, Acc::of(Aggregation::Sum, 1, big, None, None, None)), Err((big, big)));
        assert_eq!(a.value(), Some(big), "unchanged after the refused merge");
    }

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
