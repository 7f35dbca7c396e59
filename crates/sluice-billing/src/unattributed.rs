//! The report of usage that no invoice bills (`GET /v1/billing/unattributed-usage`).
//!
//! Usage counts for a subscription when its event names the subscription
//! (with its customer, or with no customer), or names only the customer
//! while exactly one of the customer's
//! subscriptions charges that meter in the period (docs/billing.md, "Which
//! usage counts"). Everything else is kept by the meters but billed by no
//! one, and without this report nobody would notice: usage of a customer
//! with two subscriptions on one meter, of a customer without one, naming a
//! subscription that does not exist (or is another customer's), outside a
//! subscription's life, or on a meter its plan does not charge.
//!
//! The rule is billing's own, bucket by bucket: a bucket belongs to a
//! subscription's invoice period when it starts in the period's
//! [`Subscription::usage_window`] (as [`crate::engine`] bills it), and usage
//! naming only the customer counts for that period when no other
//! subscription of the customer charging the meter overlaps it
//! (`unattributed_counts`). The database first summarizes each meter's usage
//! per (customer, subscription); a customer whose usage lies wholly inside
//! the life of its one subscription charging the meter is settled from that
//! summary, and only the others' buckets are read, 500 customers at a time.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_core::Aggregation;
use sluice_store::{Meter, UsageBucket, UsageOutline};

use crate::engine::{Billing, Plans, Ws};
use crate::subscription::{Period, Subscription};
use crate::BillingError;

/// Most rows one report returns (`truncated` says when more exist).
pub const MAX_ROWS: usize = 10_000;

/// Customers whose buckets are read in one go.
const CHUNK: usize = 500;

sluice_core::named_enum! {
    /// Why usage is billed by no subscription.
    pub enum Reason / UnknownReason ("a reason") {
        /// It names only the customer, and no subscription of the customer
        /// charges the meter at that time.
        NoSubscription = "no_subscription",
        /// It names only the customer, and several of the customer's
        /// subscriptions charge the meter in the period: it must name one.
        SeveralSubscriptions = "several_subscriptions",
        /// It names a subscription the customer does not have (or, naming
        /// no customer, one that does not exist).
        UnknownSubscription = "unknown_subscription",
        /// It names a subscription outside the subscription's life.
        OutsideSubscription = "outside_subscription",
        /// It names a subscription whose plan does not charge the meter then.
        NotCharged = "not_charged",
    }
}

/// Usage of one customer on one meter billed by no one, for one reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnattributedUsage {
    /// Customer (`""`: events that name none).
    pub customer_id: String,
    /// Meter.
    pub meter: String,
    /// Why.
    pub reason: Reason,
    /// The subscription the events name (`unknown_subscription`,
    /// `outside_subscription`, `not_charged`).
    pub subscription_id: Option<String>,
    /// The customer's subscriptions that charge the meter then
    /// (`several_subscriptions`).
    pub subscription_ids: Vec<String>,
    /// Start of the first 15-minute bucket with such usage.
    pub from: DateTime<Utc>,
    /// End of the last one.
    pub to: DateTime<Utc>,
    /// Buckets (distinct values, for a `unique_count` meter).
    pub buckets: i64,
    /// Events in them (`unique_count`: distinct values).
    pub events: i64,
    /// The meter's value over them where it adds up across buckets (`sum`,
    /// `count`; distinct values for `unique_count`); none for `max` and
    /// `latest`.
    pub quantity: Option<Decimal>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Usage times covered, `[from, to)`.
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Rows by customer, meter and reason.
    pub data: Vec<UnattributedUsage>,
    /// More rows exist than [`MAX_ROWS`].
    pub truncated: bool,
}

/// One bucket (or distinct value) of one customer, as classified.
struct Row<'a> {
    subscription_id: &'a str,
    at: DateTime<Utc>,
    count: i64,
    sum: Decimal,
    value: Option<&'a str>,
}

/// A subscription's invoice periods up to `to`, from its start, as billing
/// makes them one after the other.
fn invoice_periods(sub: &Subscription, ws: &Ws, to: DateTime<Utc>) -> Vec<Period> {
    let cycle = sub.cycle(ws.tz);
    let mut out = Vec::new();
    let mut b = sub.start;
    while let Some(p) = sub.period_from(&cycle, b) {
        if p.end <= b || sub.usage_bound(p.start) > to {
            break;
        }
        out.push(p);
        b = p.end;
    }
    out
}

/// The period whose buckets include one starting at `at`; `bound` maps a
/// period's ends to bucket boundaries ([`Subscription::usage_bound`]).
fn period_of(periods: &[Period], at: DateTime<Utc>, bound: impl Fn(DateTime<Utc>) -> DateTime<Utc>) -> Option<Period> {
    let i = periods.partition_point(|p| bound(p.end) <= at);
    periods.get(i).copied().filter(|p| bound(p.start) <= at)
}

type Key = (Reason, Option<String>, Vec<String>);

struct Acc {
    from: DateTime<Utc>,
    last: DateTime<Utc>,
    buckets: i64,
    events: i64,
    sum: Decimal,
    values: HashSet<String>,
}

impl Billing {
    /// Usage in `[from, to)` that no subscription bills, per customer,
    /// meter and reason (only meters that some version of a plan charges;
    /// only `customer`'s when given).
    pub async fn unattributed(&self, ws: &Ws, from: DateTime<Utc>, to: DateTime<Utc>, customer: Option<&str>) -> Result<Report, BillingError> {
        let store = &self.store;
        let mut plans = Plans::default();
        let mut charged: BTreeSet<String> = BTreeSet::new();
        for row in store.plan_versions(&ws.name).await? {
            let spec: crate::PlanSpec =
                serde_json::from_value(row.spec).map_err(|e| BillingError::Corrupt(format!("plan {:?} version {}: {e}", row.code, row.version)))?;
            charged.extend(spec.charges.iter().map(|c| c.meter.clone()));
        }
        let mut data = Vec::new();
        for key in &charged {
            let Some(meter) = ws.meters.get(key) else { continue };
            let unique = meter.aggregation == Aggregation::UniqueCount;
            let outline = store.usage_outline(&ws.name, key, unique, from, to).await?;
            let mut by_customer: Vec<(&str, Vec<&UsageOutline>)> = Vec::new();
            for o in outline.iter().filter(|o| customer.is_none_or(|c| c == o.customer_id)) {
                match by_customer.last_mut() {
                    Some((c, rows)) if *c == o.customer_id => rows.push(o),
                    _ => by_customer.push((o.customer_id.as_str(), vec![o])),
                }
            }
            for chunk in by_customer.chunks(CHUNK) {
                let ids: Vec<&str> = chunk.iter().map(|(c, _)| *c).collect();
                let mut subs: HashMap<String, Vec<Subscription>> = HashMap::new();
                for row in store.subscriptions_of_customers(&ws.name, &ids).await? {
                    subs.entry(row.customer_id.clone()).or_default().push(crate::engine::parse_sub(&row)?);
                }
                // Usage naming no customer counts for the subscription it
                // names, whoever's it is: those subscriptions are its.
                if let Some((_, rows)) = chunk.iter().find(|(c, _)| c.is_empty()) {
                    let named: BTreeSet<&str> = rows.iter().map(|r| r.subscription_id.as_str()).filter(|s| !s.is_empty()).collect();
                    let named: Vec<&str> = named.into_iter().collect();
                    for row in store.subscriptions_by_ids(&ws.name, &named).await? {
                        subs.entry(String::new()).or_default().push(crate::engine::parse_sub(&row)?);
                    }
                }
                let mut slow: Vec<&str> = Vec::new();
                for (c, rows) in chunk {
                    let mine = subs.get(*c).map(Vec::as_slice).unwrap_or_default();
                    if c.is_empty() || !self.settled(ws, &mut plans, mine, key, rows).await? {
                        slow.push(c);
                    }
                }
                if slow.is_empty() {
                    continue;
                }
                let buckets: Vec<UsageBucket>;
                let values: Vec<(String, String, DateTime<Utc>, String)>;
                let mut rows: HashMap<&str, Vec<Row<'_>>> = HashMap::new();
                if unique {
                    values = store.usage_unique_of_customers(&ws.name, key, &slow, from, to).await?;
                    for v in &values {
                        rows.entry(v.0.as_str()).or_default().push(Row {
                            subscription_id: &v.1,
                            at: v.2,
                            count: 1,
                            sum: Decimal::ZERO,
                            value: Some(&v.3),
                        });
                    }
                } else {
                    buckets = store.usage_buckets_of_customers(&ws.name, key, &slow, from, to).await?;
                    for b in &buckets {
                        rows.entry(b.customer_id.as_str()).or_default().push(Row {
                            subscription_id: &b.subscription_id,
                            at: b.bucket_start,
                            count: b.count,
                            sum: b.sum,
                            value: None,
                        });
                    }
                }
                for c in slow {
                    let mine = subs.get(c).map(Vec::as_slice).unwrap_or_default();
                    let rows = rows.remove(c).unwrap_or_default();
                    data.extend(self.classify(ws, &mut plans, meter, c, mine, rows).await?);
                }
            }
        }
        data.sort_by(|a, b| (&a.customer_id, &a.meter, a.reason.as_str()).cmp(&(&b.customer_id, &b.meter, b.reason.as_str())));
        let truncated = data.len() > MAX_ROWS;
        data.truncate(MAX_ROWS);
        Ok(Report { from, to, data, truncated })
    }

    /// Whether a customer's usage of `meter` is all billed, from its
    /// summary alone: one subscription charges the meter in every plan
    /// version it has had, no other subscription of the customer charges
    /// it, no usage names another subscription, and the usage lies inside
    /// the subscription's life. `false`: its buckets must be read.
    async fn settled(&self, ws: &Ws, plans: &mut Plans, subs: &[Subscription], meter: &str, rows: &[&UsageOutline]) -> Result<bool, BillingError> {
        let mut charging: Option<&Subscription> = None;
        for s in subs {
            let mut any = false;
            let mut all = true;
            for ph in &s.phases {
                let charges = plans.get(&self.store, &ws.name, &ph.plan, ph.plan_version).await?.charges.iter().any(|c| c.meter == meter);
                any |= charges;
                all &= charges;
            }
            if any {
                if charging.is_some() || !all {
                    return Ok(false);
                }
                charging = Some(s);
            }
        }
        let Some(s) = charging else { return Ok(false) };
        Ok(rows.iter().all(|r| {
            (r.subscription_id.is_empty() || r.subscription_id == s.id)
                && r.first >= s.usage_bound(s.start)
                && s.end.is_none_or(|e| r.last < s.usage_bound(e))
        }))
    }

    /// A customer's buckets of `meter`, each billed or not by billing's
    /// rule; those not billed, summed per reason.
    async fn classify(
        &self,
        ws: &Ws,
        plans: &mut Plans,
        meter: &Meter,
        customer: &str,
        subs: &[Subscription],
        rows: Vec<Row<'_>>,
    ) -> Result<Vec<UnattributedUsage>, BillingError> {
        // Periods are made up to the last bucket only.
        let Some(to) = rows.iter().map(|r| r.at).max() else { return Ok(Vec::new()) };
        let periods: HashMap<&str, Vec<Period>> = subs.iter().map(|s| (s.id.as_str(), invoice_periods(s, ws, to))).collect();
        // (subscription, period start) → whether its plan then charges the
        // meter, and whether usage naming only the customer counts for it.
        let mut known: HashMap<(&str, DateTime<Utc>), (bool, bool)> = HashMap::new();
        let mut acc: HashMap<Key, Acc> = HashMap::new();
        for row in rows {
            let period = |s: &Subscription| periods.get(s.id.as_str()).and_then(|ps| period_of(ps, row.at, |t| s.usage_bound(t)));
            let key: Option<Key> = if !row.subscription_id.is_empty() {
                match subs.iter().find(|s| s.id == row.subscription_id) {
                    None => Some((Reason::UnknownSubscription, Some(row.subscription_id.to_owned()), Vec::new())),
                    Some(s) => match period(s) {
                        None => Some((Reason::OutsideSubscription, Some(s.id.clone()), Vec::new())),
                        Some(p) => {
                            let (charges, _) = self.facts(ws, plans, subs, s, p, &meter.key, &mut known).await?;
                            (!charges).then(|| (Reason::NotCharged, Some(s.id.clone()), Vec::new()))
                        }
                    },
                }
            } else if customer.is_empty() {
                // Neither a customer nor a subscription: nobody's.
                Some((Reason::NoSubscription, None, Vec::new()))
            } else {
                let mut candidates = Vec::new();
                let mut counted = false;
                for s in subs {
                    let Some(p) = period(s) else { continue };
                    let (charges, counts) = self.facts(ws, plans, subs, s, p, &meter.key, &mut known).await?;
                    if charges {
                        candidates.push(s.id.clone());
                        counted |= counts;
                    }
                }
                match (counted, candidates.is_empty()) {
                    (true, _) => None,
                    (false, true) => Some((Reason::NoSubscription, None, Vec::new())),
                    (false, false) => Some((Reason::SeveralSubscriptions, None, candidates)),
                }
            };
            let Some(key) = key else { continue };
            let a = acc.entry(key).or_insert_with(|| Acc {
                from: row.at,
                last: row.at,
                buckets: 0,
                events: 0,
                sum: Decimal::ZERO,
                values: HashSet::new(),
            });
            a.from = a.from.min(row.at);
            a.last = a.last.max(row.at);
            a.buckets += 1;
            a.events += row.count;
            a.sum = a
                .sum
                .checked_add(row.sum)
                .ok_or_else(|| BillingError::Overflow(format!("meter {:?}: unattributed usage beyond the largest exact decimal", meter.key)))?;
            if let Some(v) = row.value {
                a.values.insert(v.to_owned());
            }
        }
        Ok(acc
            .into_iter()
            .map(|((reason, subscription_id, subscription_ids), a)| UnattributedUsage {
                customer_id: customer.to_owned(),
                meter: meter.key.clone(),
                reason,
                subscription_id,
                subscription_ids,
                from: a.from,
                to: a.last + Duration::minutes(15),
                buckets: a.buckets,
                events: a.events,
                quantity: match meter.aggregation {
                    Aggregation::Sum => Some(a.sum.normalize()),
                    Aggregation::Count => Some(Decimal::from(a.events)),
                    Aggregation::UniqueCount => Some(Decimal::from(a.values.len())),
                    _ => None,
                },
            })
            .collect())
    }

    /// Whether `s`'s plan charges `meter` in `p`, and whether usage naming
    /// only the customer counts for `s` there (as billing decides it).
    #[allow(clippy::too_many_arguments)]
    async fn facts<'s>(
        &self,
        ws: &Ws,
        plans: &mut Plans,
        subs: &'s [Subscription],
        s: &'s Subscription,
        p: Period,
        meter: &str,
        known: &mut HashMap<(&'s str, DateTime<Utc>), (bool, bool)>,
    ) -> Result<(bool, bool), BillingError> {
        if let Some(&f) = known.get(&(s.id.as_str(), p.start)) {
            return Ok(f);
        }
        let ph = s.phase_at(p.start);
        let charges = plans.get(&self.store, &ws.name, &ph.plan, ph.plan_version).await?.charges.iter().any(|c| c.meter == meter);
        let counts = if charges { self.unattributed_counts(ws, plans, subs, &s.id, meter, p).await? } else { false };
        known.insert((s.id.as_str(), p.start), (charges, counts));
        Ok((charges, counts))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::subscription::bucket_floor;

    #[test]
    fn a_bucket_belongs_to_the_period_it_starts_in_after_flooring() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // A period starting mid-bucket (10:07) owns the bucket from 10:00.
        let ps = [
            Period { start: t("2024-01-01T10:07:00Z"), end: t("2024-02-01T10:07:00Z") },
            Period { start: t("2024-02-01T10:07:00Z"), end: t("2024-03-01T00:00:00Z") },
        ];
        assert_eq!(period_of(&ps, t("2024-01-01T09:45:00Z"), bucket_floor), None);
        assert_eq!(period_of(&ps, t("2024-01-01T10:00:00Z"), bucket_floor), Some(ps[0]));
        assert_eq!(period_of(&ps, t("2024-01-31T23:45:00Z"), bucket_floor), Some(ps[0]));
        assert_eq!(period_of(&ps, t("2024-02-01T10:00:00Z"), bucket_floor), Some(ps[1]));
        assert_eq!(period_of(&ps, t("2024-02-29T23:45:00Z"), bucket_floor), Some(ps[1]));
        assert_eq!(period_of(&ps, t("2024-03-01T00:00:00Z"), bucket_floor), None);
    }
}
