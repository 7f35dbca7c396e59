//! Billing cycles: where a subscription's periods begin and end, in the
//! workspace's time zone.
//!
//! A cycle is a sequence of boundaries, each at 00:00 local time of a date
//! computed from one **anchor date**: boundary k is the anchor date plus k
//! intervals, each computed from the anchor (never from the previous
//! boundary), with the day clamped to the month's length. So an anniversary
//! on January 31 gives Feb 29 (or 28), then Mar 31, Apr 30: the 31st comes
//! back. A `calendar` cycle's anchor is the first day of the interval that
//! holds the start (Monday for weeks, the 1st of the month, of the quarter,
//! January 1st); an `anniversary` cycle's anchor is the start's own date.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use chrono_tz::Tz;
use sluice_metering::usage::local_start;

use crate::plan::Interval;

sluice_core::named_enum! {
    /// Where a subscription's periods begin.
    pub enum Anchor / UnknownAnchor ("a billing anchor") {
        /// The first day of each period of the calendar (the 1st of the month...).
        Calendar = "calendar",
        /// The start's day, every interval (clamped to short months).
        Anniversary = "anniversary",
    }
}

/// A cycle's boundaries.
#[derive(Debug, Clone, Copy)]
pub struct Cycle {
    tz: Tz,
    interval: Interval,
    anchor: NaiveDate,
}

impl Cycle {
    /// The cycle of a subscription starting at `start`.
    pub fn new(tz: Tz, interval: Interval, anchor: Anchor, start: DateTime<Utc>) -> Cycle {
        let d = start.with_timezone(&tz).date_naive();
        let anchor = match anchor {
            Anchor::Anniversary => d,
            Anchor::Calendar => match interval {
                Interval::Week => d - Days::new(u64::from(d.weekday().num_days_from_monday())),
                Interval::Month => d.with_day(1).unwrap_or(d),
                Interval::Quarter => NaiveDate::from_ymd_opt(d.year(), (d.month0() / 3) * 3 + 1, 1).unwrap_or(d),
                Interval::Year => NaiveDate::from_ymd_opt(d.year(), 1, 1).unwrap_or(d),
            },
        };
        Cycle { tz, interval, anchor }
    }

    fn months(&self) -> Option<u32> {
        match self.interval {
            Interval::Week => None,
            Interval::Month => Some(1),
            Interval::Quarter => Some(3),
            Interval::Year => Some(12),
        }
    }

    /// The local date of boundary `k` (0 = the anchor).
    pub fn date(&self, k: i64) -> NaiveDate {
        let step = |n: u64| -> Option<NaiveDate> {
            match self.months() {
                None => {
                    if k >= 0 {
                        self.anchor.checked_add_days(Days::new(7 * n))
                    } else {
                        self.anchor.checked_sub_days(Days::new(7 * n))
                    }
                }
                Some(m) => {
                    let months = Months::new(u32::try_from(n).ok()?.checked_mul(m)?);
                    if k >= 0 {
                        self.anchor.checked_add_months(months)
                    } else {
                        self.anchor.checked_sub_months(months)
                    }
                }
            }
        };
        step(k.unsigned_abs()).unwrap_or(if k >= 0 { NaiveDate::MAX } else { NaiveDate::MIN })
    }

    /// Boundary `k`: 00:00 local of [`Cycle::date`].
    pub fn boundary(&self, k: i64) -> DateTime<Utc> {
        local_start(self.tz, self.date(k), 0)
    }

    /// The k whose period `[boundary(k), boundary(k+1))` holds `t`.
    pub fn index_of(&self, t: DateTime<Utc>) -> i64 {
        let local = t.with_timezone(&self.tz).date_naive();
        let mut k = match self.months() {
            None => (local - self.anchor).num_days().div_euclid(7),
            Some(m) => {
                let months = (i64::from(local.year()) * 12 + i64::from(local.month0()))
                    - (i64::from(self.anchor.year()) * 12 + i64::from(self.anchor.month0()));
                months.div_euclid(i64::from(m))
            }
        };
        // The estimate is off by at most one either way (a clamped day, a
        // time before midnight of a boundary date).
        while self.boundary(k) > t {
            k -= 1;
        }
        while self.boundary(k + 1) <= t {
            k += 1;
        }
        k
    }

    /// The cycle period holding `t`.
    pub fn period_of(&self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let k = self.index_of(t);
        (self.boundary(k), self.boundary(k + 1))
    }

    /// The first boundary strictly after `t`.
    pub fn next_boundary(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.boundary(self.index_of(t) + 1)
    }

    /// Whether `t` is a boundary of this cycle.
    pub fn is_boundary(&self, t: DateTime<Utc>) -> bool {
        self.period_of(t).0 == t
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn anniversary_on_the_31st_comes_back_after_short_months() {
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        // 2024-01-31 10:00 JST
        let c = Cycle::new(tz, Interval::Month, Anchor::Anniversary, t("2024-01-31T01:00:00Z"));
        let dates: Vec<String> = (0..4).map(|k| c.date(k).to_string()).collect();
        assert_eq!(dates, ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30"]);
        // Periods start at 00:00 JST (15:00 UTC the day before).
        assert_eq!(c.boundary(1), t("2024-02-28T15:00:00Z"));
        assert_eq!(c.next_boundary(t("2024-01-31T01:00:00Z")), t("2024-02-28T15:00:00Z"));
        assert_eq!(c.period_of(t("2024-03-01T00:00:00Z")), (t("2024-02-28T15:00:00Z"), t("2024-03-30T15:00:00Z")));
        let c = Cycle::new(tz, Interval::Month, Anchor::Anniversary, t("2023-01-31T01:00:00Z"));
        assert_eq!(c.date(1).to_string(), "2023-02-28");
    }

    #[test]
    fn calendar_cycles_start_on_the_first_local_day() {
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        let start = t("2024-05-14T20:00:00Z"); // 2024-05-15 05:00 JST
        let m = Cycle::new(tz, Interval::Month, Anchor::Calendar, start);
        assert_eq!(m.period_of(start), (t("2024-04-30T15:00:00Z"), t("2024-05-31T15:00:00Z")));
        let q = Cycle::new(tz, Interval::Quarter, Anchor::Calendar, start);
        assert_eq!(q.period_of(start), (t("2024-03-31T15:00:00Z"), t("2024-06-30T15:00:00Z")));
        let y = Cycle::new(tz, Interval::Year, Anchor::Calendar, start);
        assert_eq!(y.next_boundary(start), t("2024-12-31T15:00:00Z"));
        let w = Cycle::new(tz, Interval::Week, Anchor::Calendar, start);
        // 2024-05-15 is a Wednesday: the week began Monday 13th.
        assert_eq!(w.period_of(start).0, t("2024-05-12T15:00:00Z"));
        assert!(m.is_boundary(t("2024-05-31T15:00:00Z")));
        assert!(!m.is_boundary(start));
    }
}
