//! Invoices: their document, how their lines are made from a plan and the
//! usage of a period, and their totals (tax once per rate).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::cycle::Cycle;
use crate::money::{Currency, TaxRounding};
use crate::plan::{Charge, FeeTiming, PlanSpec, TierAmount};
use crate::subscription::{Period, Subscription};

/// An invoice's status (the store keeps it, so the store declares it).
pub use sluice_store::{InvoiceStatus, UnknownInvoiceStatus};

sluice_core::named_enum! {
    /// What an invoice line bills.
    pub enum LineKind / UnknownLineKind ("a line kind") {
        /// A plan's fixed fee (prorated for a partial period).
        FixedFee = "fixed_fee",
        /// A usage charge for the invoice's period.
        Usage = "usage",
        /// A correction: late usage of an earlier, finalized period, or the
        /// unused part of a fee paid in advance.
        Adjustment = "adjustment",
    }
}

/// One line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// Kind.
    pub kind: LineKind,
    /// What it is.
    pub description: String,
    /// The meter (usage and late-usage lines).
    pub meter: Option<String>,
    /// Quantity (units; 1 for a fee).
    pub quantity: Decimal,
    /// Price per unit, where one price applies to every unit.
    pub unit_price: Option<Decimal>,
    /// Amount, rounded to the currency's minor unit.
    pub amount: Decimal,
    /// Tax rate.
    pub tax_rate: Decimal,
    /// Japan's reduced rate (軽減税率, 8 %): marked ※ on the invoice.
    pub reduced_rate: bool,
    /// Period this line bills.
    pub period_start: DateTime<Utc>,
    /// End of that period.
    pub period_end: DateTime<Utc>,
    /// Per-tier breakdown (graduated, volume).
    pub tiers: Vec<TierAmount>,
    /// Share of a full period billed (fees and minimums of partial periods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proration: Option<Decimal>,
    /// Free units taken off the quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_units: Option<Decimal>,
    /// The (prorated) minimum, when the charge has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_amount: Option<Decimal>,
    /// Whether the minimum set the amount.
    #[serde(default)]
    pub minimum_applied: bool,
    /// SQL over the `usage` table that reproduces the quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
}

/// Tax of one rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaxLine {
    /// Rate.
    pub rate: Decimal,
    /// Japan's reduced rate.
    pub reduced_rate: bool,
    /// Sum of the lines at this rate.
    pub taxable_amount: Decimal,
    /// Tax on it, rounded once.
    pub tax: Decimal,
}

/// The issuer, as it was when the invoice was finalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issuer {
    /// Name.
    pub name: Option<String>,
    /// Registration number (T + 13 digits).
    pub registration_number: Option<String>,
    /// Address.
    pub address: Option<String>,
}

/// An invoice document (the columns status, number and times are the
/// store's; [`crate::engine`] joins them for the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    /// Id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// The customer's name (its `name` trait), for the recipient.
    pub customer_name: Option<String>,
    /// Subscription.
    pub subscription_id: String,
    /// Plan code.
    pub plan: String,
    /// The plan version it was computed from.
    pub plan_version: i64,
    /// Currency.
    pub currency: String,
    /// Period start.
    pub period_start: DateTime<Utc>,
    /// Period end.
    pub period_end: DateTime<Utc>,
    /// Lines.
    pub lines: Vec<Line>,
    /// Tax per rate.
    pub taxes: Vec<TaxLine>,
    /// Sum of the lines.
    pub subtotal: Decimal,
    /// Sum of the taxes.
    pub tax: Decimal,
    /// subtotal + tax.
    pub total: Decimal,
    /// How tax was rounded.
    pub tax_rounding: TaxRounding,
    /// The workspace time zone its periods are in.
    pub time_zone: String,
    /// When it was computed.
    pub computed_at: DateTime<Utc>,
    /// The meters consumer's position in each log partition when computed:
    /// the usage it saw is exactly the events before these offsets.
    pub log_position: BTreeMap<u32, u64>,
    /// Billed early (`until: "now"`): the period ends before its cycle end.
    #[serde(default)]
    pub early: bool,
    /// The issuer (set at finalization).
    #[serde(default)]
    pub issuer: Option<Issuer>,
    /// The voided invoice this one replaces.
    #[serde(default)]
    pub replaces: Option<String>,
    /// Made by auto-billing.
    #[serde(default)]
    pub auto_billed: bool,
    /// A draft only because its period ended within the workspace's grace
    /// period: finalized automatically once it has passed (drafts made on
    /// purpose with `finalize: false` are left alone).
    #[serde(default)]
    pub finalize_after_grace: bool,
}

impl Invoice {
    /// Computes the tax per rate (rounded once per rate), the subtotal, the
    /// tax and the total from the lines.
    pub fn total_up(&mut self, currency: Currency, rounding: TaxRounding) {
        let mut by_rate: BTreeMap<Decimal, (Decimal, Decimal, bool)> = BTreeMap::new();
        for l in &self.lines {
            let e = by_rate.entry(l.tax_rate.normalize()).or_insert((l.tax_rate, Decimal::ZERO, l.reduced_rate));
            e.1 += l.amount;
        }
        self.taxes = by_rate
            .into_values()
            .map(|(rate, taxable, reduced)| TaxLine {
                rate,
                reduced_rate: reduced,
                taxable_amount: currency.exact(taxable),
                tax: currency.exact(currency.round_tax(taxable * rate, rounding)),
            })
            .collect();
        self.subtotal = currency.exact(self.lines.iter().map(|l| l.amount).sum());
        self.tax = currency.exact(self.taxes.iter().map(|t| t.tax).sum());
        self.total = currency.exact(self.subtotal + self.tax);
        self.tax_rounding = rounding;
    }
}

/// Japan's reduced consumption tax rate (8 %), marked on qualified invoices.
fn reduced(currency: Currency, rate: Decimal) -> bool {
    currency.code() == "JPY" && rate.normalize() == Decimal::new(8, 2).normalize()
}

fn seconds(a: DateTime<Utc>, b: DateTime<Utc>) -> Decimal {
    Decimal::from((b - a).num_microseconds().unwrap_or(i64::MAX).max(0))
}

/// A part of a cycle period as an exact fraction (microseconds over
/// microseconds). Amounts are multiplied before they are divided: 25.5 days
/// of a 31-day month is not a finite decimal, and a fee of 62,000 times
/// the rounded-off quotient came to 51,062.4999… (rounded to 51,062) where
/// the exact 51,062.5 rounds half up to 51,063.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Share {
    num: Decimal,
    den: Decimal,
}

impl Share {
    /// The whole period.
    pub const ONE: Share = Share { num: Decimal::ONE, den: Decimal::ONE };
    /// Nothing.
    pub const ZERO: Share = Share { num: Decimal::ZERO, den: Decimal::ONE };

    /// `[a, b)` of `[cs, ce)`.
    fn of_period(a: DateTime<Utc>, b: DateTime<Utc>, cs: DateTime<Utc>, ce: DateTime<Utc>) -> Share {
        if (a, b) == (cs, ce) {
            return Share::ONE;
        }
        let den = seconds(cs, ce);
        if den.is_zero() {
            return Share::ZERO;
        }
        Share { num: seconds(a, b), den }
    }

    /// `amount` times the share (multiplied first; divided first only if
    /// the product would not fit a decimal).
    pub fn of(self, amount: Decimal) -> Decimal {
        match amount.checked_mul(self.num) {
            Some(p) => p / self.den,
            None => amount * (self.num / self.den),
        }
    }

    /// The share as a decimal (for display: `proration`).
    pub fn value(self) -> Decimal {
        self.num / self.den
    }

    fn is_zero(self) -> bool {
        self.num.is_zero()
    }

    fn neg(self) -> Share {
        Share { num: -self.num, den: self.den }
    }
}

/// The share of the cycle period `(cs, ce)` that `[a, b)` is, leaving out
/// the trial: prorated by time (microseconds), exact.
fn share(sub: &Subscription, (cs, ce): (DateTime<Utc>, DateTime<Utc>), a: DateTime<Utc>, b: DateTime<Utc>) -> Share {
    let a = sub.trial_end.map_or(a, |t| a.max(t));
    if b <= a || ce <= cs {
        return Share::ZERO;
    }
    Share::of_period(a, b, cs, ce)
}

/// What a period's invoice is computed from.
pub struct PeriodBill<'a> {
    /// The subscription.
    pub sub: &'a Subscription,
    /// Its cycle.
    pub cycle: &'a Cycle,
    /// The invoice period.
    pub period: Period,
    /// The plan of the phase the period is in.
    pub plan: &'a PlanSpec,
    /// Currency.
    pub currency: Currency,
}

impl PeriodBill<'_> {
    /// The fixed fee lines: fees in arrears for the period; fees in
    /// advance for the next cycle period when the period ends on a cycle
    /// boundary, for the phase's own first period on its first invoice, and
    /// a credit for the unused part when a phase or the subscription ends
    /// before its cycle end.
    pub fn fee_lines(&self) -> Vec<Line> {
        let Period { start: a, end: b } = self.period;
        let cp = self.cycle.period_of(a);
        let phase = self.sub.phase_at(a);
        let mut lines = Vec::new();
        let ends_phase = self.sub.phases.iter().any(|p| p.from == b) || self.sub.end == Some(b);
        for fee in &self.plan.fixed_fees {
            let mut line = |desc: String, frac: Share, from: DateTime<Utc>, to: DateTime<Utc>, kind: LineKind| {
                if frac.is_zero() {
                    return;
                }
                let amount = self.currency.round_line(frac.of(fee.amount));
                lines.push(Line {
                    kind,
                    description: desc,
                    meter: None,
                    quantity: Decimal::ONE,
                    unit_price: Some(fee.amount),
                    amount: self.currency.exact(amount),
                    tax_rate: fee.tax_rate,
                    reduced_rate: reduced(self.currency, fee.tax_rate),
                    period_start: from,
                    period_end: to,
                    tiers: Vec::new(),
                    proration: (frac.value().abs() != Decimal::ONE).then(|| frac.value().abs().round_dp(6).normalize()),
                    free_units: None,
                    minimum_amount: None,
                    minimum_applied: false,
                    sql: None,
                });
            };
            match fee.timing {
                FeeTiming::InArrears => line(fee.name.clone(), share(self.sub, cp, a, b), a, b, LineKind::FixedFee),
                FeeTiming::InAdvance => {
                    if a == phase.from || a == self.sub.start {
                        let to = self.sub.end.map_or(cp.1, |e| e.min(cp.1));
                        line(format!("{} (in advance)", fee.name), share(self.sub, cp, a, to), a, to, LineKind::FixedFee);
                    }
                    if b == cp.1 && self.sub.continues_after(b) && self.sub.phase_at(b) == phase {
                        let next = self.cycle.period_of(b);
                        let to = self.sub.end.map_or(next.1, |e| e.min(next.1));
                        line(format!("{} (in advance)", fee.name), share(self.sub, next, b, to), b, to, LineKind::FixedFee);
                    }
                    if b < cp.1 && ends_phase {
                        let unused = share(self.sub, cp, b, cp.1).neg();
                        line(format!("{} (unused, credited)", fee.name), unused, b, cp.1, LineKind::Adjustment);
                    }
                }
            }
        }
        lines
    }

    /// The share of a full cycle period this invoice period is (minimums
    /// are prorated by it; the trial does not reduce them).
    pub fn period_share(&self) -> Share {
        let cp = self.cycle.period_of(self.period.start);
        Share::of_period(self.period.start, self.period.end, cp.0, cp.1)
    }

    /// A usage line of `charge` for `quantity` in this period; `sql`
    /// reproduces the quantity.
    pub fn usage_line(&self, charge: &Charge, quantity: Decimal, sql: Option<String>) -> Line {
        charge_line(self.currency, charge, quantity, self.period, self.period_share(), sql)
    }
}

/// A usage line: the charge's price of `quantity`, at least its minimum
/// prorated by `share`, rounded to the minor unit.
pub fn charge_line(currency: Currency, charge: &Charge, quantity: Decimal, p: Period, share: Share, sql: Option<String>) -> Line {
    let priced = charge.price(quantity);
    let minimum = charge.minimum_amount.map(|m| share.of(m));
    let minimum_applied = minimum.is_some_and(|m| m > priced.amount);
    let exact = if minimum_applied { minimum.unwrap_or_default() } else { priced.amount };
    Line {
        kind: LineKind::Usage,
        description: charge.name.clone().unwrap_or_else(|| charge.meter.clone()),
        meter: Some(charge.meter.clone()),
        quantity: quantity.normalize(),
        unit_price: priced.unit_price,
        amount: currency.exact(currency.round_line(exact)),
        tax_rate: charge.tax_rate,
        reduced_rate: reduced(currency, charge.tax_rate),
        period_start: p.start,
        period_end: p.end,
        tiers: priced.tiers,
        proration: (share != Share::ONE && charge.minimum_amount.is_some()).then(|| share.value().round_dp(6).normalize()),
        free_units: charge.free_units,
        minimum_amount: minimum.map(|m| currency.exact(currency.round_line(m))),
        minimum_applied,
        sql,
    }
}

/// A late-usage line: what `charge` costs for the earlier period `p` at
/// `quantity` now, less what finalized invoices already billed for it.
/// `None` when nothing changed.
pub fn late_line(
    currency: Currency,
    charge: &Charge,
    quantity: Decimal,
    p: Period,
    share: Share,
    billed: (Decimal, Decimal),
    sql: Option<String>,
) -> Option<Line> {
    let (billed_q, billed_amount) = billed;
    if quantity == billed_q {
        return None;
    }
    let full = charge_line(currency, charge, quantity, p, share, sql);
    Some(Line {
        kind: LineKind::Adjustment,
        description: format!("Late usage: {}", full.description),
        quantity: (quantity - billed_q).normalize(),
        unit_price: None,
        amount: currency.exact(full.amount - billed_amount),
        tiers: Vec::new(),
        ..full
    })
}

/// On an invoice that bills a period again (its first invoice was voided):
/// what other finalized invoices already billed for that period (late
/// usage on later invoices), taken off, so that the period is billed once
/// in all. `on` names those invoices. `None` when they billed nothing.
pub fn billed_elsewhere_line(currency: Currency, charge: &Charge, p: Period, billed: (Decimal, Decimal), on: &[String]) -> Option<Line> {
    let (billed_q, billed_amount) = billed;
    if billed_q.is_zero() && billed_amount.is_zero() {
        return None;
    }
    let name = charge.name.clone().unwrap_or_else(|| charge.meter.clone());
    Some(Line {
        kind: LineKind::Adjustment,
        description: format!("Already billed on {}: {name}", on.join(", ")),
        meter: Some(charge.meter.clone()),
        quantity: (-billed_q).normalize(),
        unit_price: None,
        amount: currency.exact(-billed_amount),
        tax_rate: charge.tax_rate,
        reduced_rate: reduced(currency, charge.tax_rate),
        period_start: p.start,
        period_end: p.end,
        tiers: Vec::new(),
        proration: None,
        free_units: None,
        minimum_amount: None,
        minimum_applied: false,
        sql: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cycle::Anchor;
    use crate::plan::Interval;
    use crate::subscription::Phase;

    #[test]
    fn a_share_multiplies_before_it_divides() {
        // 2026-12-06 02:15 UTC to the end of December in Tokyo: 2,205,900 s
        // of 2,678,400. 62,000 × that is exactly 51,062.5.
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let (cs, ce) = (t("2026-11-30T15:00:00Z"), t("2026-12-31T15:00:00Z"));
        let sh = Share::of_period(t("2026-12-06T02:15:00Z"), ce, cs, ce);
        assert_eq!(sh.of(Decimal::from(62000)), Decimal::new(510625, 1));
        assert_eq!(Currency::of("JPY").unwrap().round_line(sh.of(Decimal::from(62000))), Decimal::from(51063));
        // Dividing first loses the midpoint.
        assert!(Decimal::from(62000) * sh.value() < Decimal::new(510625, 1));
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn plan() -> PlanSpec {
        crate::plan::parse(serde_json::json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month",
            "fixed_fees": [{"name": "Base", "amount": "31000", "tax_rate": "0.10"},
                           {"name": "Support", "amount": "3100", "tax_rate": "0.10", "timing": "in_advance"}],
            "charges": [{"meter": "m", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"}]}))
        .unwrap()
    }

    fn sub(start: &str) -> Subscription {
        Subscription {
            id: "s".into(),
            customer_id: "c".into(),
            start: t(start),
            billing_anchor: Anchor::Calendar,
            end: None,
            interval: Interval::Month,
            currency: "JPY".into(),
            trial_end: None,
            phases: vec![Phase { plan: "p".into(), plan_version: 1, from: t(start) }],
            cuts: vec![],
            cancelled_at: None,
            reissue: Vec::new(),
            created_at: t(start),
        }
    }

    #[test]
    fn fees_prorate_by_time_and_in_advance_fees_bill_the_next_period() {
        let tz: chrono_tz::Tz = "Asia/Tokyo".parse().unwrap();
        // Starts 2024-01-11 00:00 JST: 21 of January's 31 days.
        let s = sub("2024-01-10T15:00:00Z");
        let cycle = s.cycle(tz);
        let p = plan();
        let jpy = Currency::of("JPY").unwrap();
        let bill = PeriodBill { sub: &s, cycle: &cycle, period: Period { start: s.start, end: t("2024-01-31T15:00:00Z") }, plan: &p, currency: jpy };
        let lines = bill.fee_lines();
        let amounts: Vec<(String, Decimal)> = lines.iter().map(|l| (l.description.clone(), l.amount)).collect();
        assert_eq!(
            amounts,
            vec![("Base".into(), d("21000")), ("Support (in advance)".into(), d("2100")), ("Support (in advance)".into(), d("3100")),]
        );
        let mut inv = Invoice {
            id: "i".into(),
            customer_id: "c".into(),
            customer_name: None,
            subscription_id: "s".into(),
            plan: "p".into(),
            plan_version: 1,
            currency: "JPY".into(),
            period_start: bill.period.start,
            period_end: bill.period.end,
            lines,
            taxes: vec![],
            subtotal: Decimal::ZERO,
            tax: Decimal::ZERO,
            total: Decimal::ZERO,
            tax_rounding: TaxRounding::Floor,
            time_zone: "Asia/Tokyo".into(),
            computed_at: t("2024-02-01T00:00:00Z"),
            log_position: BTreeMap::new(),
            early: false,
            issuer: None,
            replaces: None,
            auto_billed: false,
            finalize_after_grace: false,
        };
        inv.lines.push(bill.usage_line(&p.charges[0], d("3"), None));
        inv.total_up(jpy, TaxRounding::Floor);
        // 10 %: 26200 → 2620; 8 %: 1620 → 129.6 → 129 (floor, once).
        assert_eq!(inv.taxes.iter().map(|t| (t.taxable_amount, t.tax)).collect::<Vec<_>>(), vec![(d("1620"), d("129")), (d("26200"), d("2620"))]);
        assert_eq!((inv.subtotal, inv.tax, inv.total), (d("27820"), d("2749"), d("30569")));
        assert!(inv.taxes[0].reduced_rate && inv.lines[3].reduced_rate);
    }
}
