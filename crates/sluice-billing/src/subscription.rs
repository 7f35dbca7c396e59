//! Subscriptions: a customer on a plan, its cycle, its phases (plan
//! changes) and which period it bills next.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::cycle::{Anchor, Cycle};
use crate::plan::Interval;

sluice_core::named_enum! {
    /// Where a subscription is in its life, at a given time.
    pub enum Status / UnknownStatus ("a subscription status") {
        /// Billing normally.
        Active = "active",
        /// In its trial (fixed fees are not charged).
        Trialing = "trialing",
        /// Cancelled, ending at `end` (still billed until then).
        Cancelled = "cancelled",
        /// Past its end.
        Ended = "ended",
    }
}

/// A stretch of a subscription on one plan version, from `from` until the
/// next phase's `from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// Plan code.
    pub plan: String,
    /// Plan version.
    pub plan_version: i64,
    /// From (inclusive).
    pub from: DateTime<Utc>,
}

/// A subscription (the document the store keeps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Start.
    pub start: DateTime<Utc>,
    /// `calendar` or `anniversary`.
    pub billing_anchor: Anchor,
    /// End (exclusive), if any.
    pub end: Option<DateTime<Utc>>,
    /// The cycle's interval (every phase's plan has it).
    pub interval: Interval,
    /// The currency (every phase's plan has it).
    pub currency: String,
    /// End of the trial, if the plan has one.
    pub trial_end: Option<DateTime<Utc>>,
    /// Plan versions over time, the first from `start`.
    pub phases: Vec<Phase>,
    /// Times where an invoice period must end besides the cycle's
    /// boundaries: plan changes and early billing.
    #[serde(default)]
    pub cuts: Vec<DateTime<Utc>>,
    /// When it was cancelled, if it was.
    #[serde(default)]
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Earlier periods whose invoice was voided, oldest first: the next
    /// explicit billing run bills each again (docs/billing.md, "Voiding").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reissue: Vec<Reissue>,
}

/// A period to bill again because its invoice was voided while a later
/// period was already billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reissue {
    /// The voided invoice's period start (inclusive).
    pub period_start: DateTime<Utc>,
    /// Its period end (exclusive).
    pub period_end: DateTime<Utc>,
    /// The voided invoice; the new one `replaces` it.
    pub voided_invoice: String,
}

impl Reissue {
    /// Its period.
    pub fn period(&self) -> Period {
        Period { start: self.period_start, end: self.period_end }
    }
}

/// An invoice period of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// Start (inclusive).
    pub start: DateTime<Utc>,
    /// End (exclusive).
    pub end: DateTime<Utc>,
}

impl Subscription {
    /// The current phase at `t` (the first before the start).
    /// (Documents are checked to have a phase when read: [`Subscription::check`].)
    pub fn phase_at(&self, t: DateTime<Utc>) -> &Phase {
        &self.phases[self.phases.iter().rposition(|p| p.from <= t).unwrap_or(0)]
    }

    /// The plan it is on now (the last phase).
    pub fn current(&self) -> &Phase {
        &self.phases[self.phases.len() - 1]
    }

    /// The earliest period waiting to be billed again, for the store's
    /// `reissue_from` column.
    pub fn reissue_from(&self) -> Option<DateTime<Utc>> {
        self.reissue.iter().map(|r| r.period_start).min()
    }

    /// Its cycle.
    pub fn cycle(&self, tz: Tz) -> Cycle {
        Cycle::new(tz, self.interval, self.billing_anchor, self.start)
    }

    /// Its status at `now`.
    pub fn status(&self, now: DateTime<Utc>) -> Status {
        if self.end.is_some_and(|e| e <= now) {
            Status::Ended
        } else if self.cancelled_at.is_some() {
            Status::Cancelled
        } else if self.trial_end.is_some_and(|t| now < t) {
            Status::Trialing
        } else {
            Status::Active
        }
    }

    /// The invoice period that starts at `from` (the billed-until), or none
    /// when the subscription is billed to its end: it ends at the first of
    /// the next cycle boundary, the next cut and the subscription's end.
    pub fn period_from(&self, cycle: &Cycle, from: DateTime<Utc>) -> Option<Period> {
        if self.end.is_some_and(|e| e <= from) {
            return None;
        }
        let mut end = cycle.next_boundary(from);
        if let Some(c) = self.cuts.iter().copied().filter(|&c| c > from).min() {
            end = end.min(c);
        }
        if let Some(e) = self.end {
            end = end.min(e);
        }
        Some(Period { start: from, end })
    }

    /// The 15-minute usage-bucket boundary that stands for time `t` of this
    /// subscription's periods: a period `[a, b)` bills the buckets that
    /// start in `[usage_bound(a), usage_bound(b))`. That is the start of
    /// `t`'s bucket ([`bucket_floor`]), except at an early bill's cut
    /// (`"until": "now"` cuts at the request, inside a bucket), which takes
    /// its whole bucket ([`bucket_ceil`]): the usage sent up to the bill is
    /// on it. Consecutive periods share every bucket out exactly once
    /// whatever this maps a point to, as long as it is one function of the
    /// point and never decreases along a subscription's boundaries (an early
    /// bill never cuts in the bucket of the cycle boundary after it:
    /// `engine::due_periods` bills that period whole).
    pub fn usage_bound(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let floor = bucket_floor(t);
        if floor != t && self.cuts.contains(&t) {
            bucket_ceil(t)
        } else {
            floor
        }
    }

    /// The usage buckets `[from, to)` that period `p` bills ([`Subscription::usage_bound`]).
    pub fn usage_window(&self, p: Period) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.usage_bound(p.start), self.usage_bound(p.end))
    }

    /// Whether it continues past `t` (has no end at or before it).
    pub fn continues_after(&self, t: DateTime<Utc>) -> bool {
        self.end.is_none_or(|e| e > t)
    }

    /// The trial's end for a plan with `trial_days`, from `start`.
    pub fn trial_end_of(start: DateTime<Utc>, trial_days: u32) -> Option<DateTime<Utc>> {
        (trial_days > 0).then(|| start + Duration::days(i64::from(trial_days)))
    }
}

impl Subscription {
    /// Refuses a stored document without a phase.
    pub fn check(self) -> Result<Subscription, crate::BillingError> {
        if self.phases.is_empty() {
            return Err(crate::BillingError::Corrupt(format!("subscription {:?} has no plan phase", self.id)));
        }
        Ok(self)
    }
}

/// Rounds `t` down to the start of its 15-minute usage bucket: plan changes
/// cut there, so every event's usage lies wholly on one side of the cut.
pub fn bucket_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    let us = t.timestamp_micros();
    let q = 15 * 60 * 1_000_000;
    DateTime::from_timestamp_micros(us - us.rem_euclid(q)).unwrap_or(t)
}

/// Rounds `t` up to the end of its 15-minute usage bucket (`t` itself on a
/// boundary): the usage bound of an early bill's cut
/// ([`Subscription::usage_bound`]).
pub fn bucket_ceil(t: DateTime<Utc>) -> DateTime<Utc> {
    let f = bucket_floor(t);
    if f == t {
        t
    } else {
        f + chrono::Duration::minutes(15)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn usage_bucket_bounds_round_to_quarter_hours() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(bucket_floor(t("2026-12-07T10:04:59.999999Z")), t("2026-12-07T10:00:00Z"));
        assert_eq!(bucket_ceil(t("2026-12-07T10:04:59.999999Z")), t("2026-12-07T10:15:00Z"));
        assert_eq!(bucket_ceil(t("2026-12-07T10:00:00.000001Z")), t("2026-12-07T10:15:00Z"));
        // On a boundary both are the time itself.
        assert_eq!(bucket_floor(t("2026-12-07T10:15:00Z")), t("2026-12-07T10:15:00Z"));
        assert_eq!(bucket_ceil(t("2026-12-07T10:15:00Z")), t("2026-12-07T10:15:00Z"));
        // Before 1970 too (rem_euclid).
        assert_eq!(bucket_ceil(t("1969-12-31T23:50:00Z")), t("1970-01-01T00:00:00Z"));
    }
}
