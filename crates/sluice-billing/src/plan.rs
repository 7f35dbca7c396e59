//! Plans: fixed fees and usage charges, their validation, and how a
//! quantity is priced by each charge model (docs/billing.md, "Charge
//! models", with a worked example of each).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{de_decimal, de_opt_decimal, Currency};

sluice_core::named_enum! {
    /// A plan's billing interval.
    pub enum Interval / UnknownInterval ("an interval") {
        /// Seven days.
        Week = "week",
        /// A calendar month.
        Month = "month",
        /// Three calendar months.
        Quarter = "quarter",
        /// Twelve calendar months.
        Year = "year",
    }
}

sluice_core::named_enum! {
    /// When a fixed fee is billed.
    pub enum FeeTiming / UnknownFeeTiming ("a fee timing") {
        /// On the period's own invoice (the default).
        InArrears = "in_arrears",
        /// On the invoice before the period; a subscription's first period
        /// on its first invoice, prorated.
        InAdvance = "in_advance",
    }
}

sluice_core::named_enum! {
    /// How a usage charge prices a quantity.
    pub enum ChargeModel / UnknownChargeModel ("a charge model") {
        /// Quantity × `unit_price`.
        PerUnit = "per_unit",
        /// Each tier's units at that tier's price (plus its `flat_price` when
        /// any unit falls in it).
        Graduated = "graduated",
        /// The whole quantity at the price of the tier it reaches.
        Volume = "volume",
        /// `package_price` per started block of `package_size` units.
        Package = "package",
        /// `amount` once the quantity is above 0.
        Flat = "flat",
    }
}

fn zero() -> Decimal {
    Decimal::ZERO
}

/// A plan version's definition: the request body of `POST /v1/plans`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// Code, unique in the workspace.
    pub code: String,
    /// Display name.
    pub name: String,
    /// ISO 4217 currency.
    pub currency: String,
    /// Billing interval.
    pub interval: Interval,
    /// Days of trial (fixed fees are not charged in them; usage is).
    #[serde(default)]
    pub trial_days: u32,
    /// Fixed fees.
    #[serde(default)]
    pub fixed_fees: Vec<FixedFee>,
    /// Usage charges, billed in arrears.
    #[serde(default)]
    pub charges: Vec<Charge>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A fixed fee.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedFee {
    /// Shown on the invoice line.
    pub name: String,
    /// Per full period.
    #[serde(deserialize_with = "de_decimal")]
    pub amount: Decimal,
    /// `in_arrears` (default) or `in_advance`.
    #[serde(default = "in_arrears")]
    pub timing: FeeTiming,
    /// Tax rate, e.g. `0.10`.
    #[serde(default = "zero", deserialize_with = "de_decimal")]
    pub tax_rate: Decimal,
}

fn in_arrears() -> FeeTiming {
    FeeTiming::InArrears
}

/// A usage charge on a meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// Meter key.
    pub meter: String,
    /// Model.
    pub model: ChargeModel,
    /// Shown on the invoice line (default: the meter key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tax rate, e.g. `0.10`.
    #[serde(default = "zero", deserialize_with = "de_decimal")]
    pub tax_rate: Decimal,
    /// Units per period that are not charged (taken off the quantity first).
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub free_units: Option<Decimal>,
    /// The least the charge costs per full period (prorated like fixed fees).
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub minimum_amount: Option<Decimal>,
    /// per_unit: price per unit.
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
    /// graduated, volume: tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<Tier>>,
    /// package: units per package.
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub package_size: Option<Decimal>,
    /// package: price per started package.
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub package_price: Option<Decimal>,
    /// flat: the amount.
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
}

/// A tier of a graduated or volume charge: quantities above the previous
/// tier's `up_to` (0 for the first) up to this `up_to`, inclusive; `null`
/// on the last tier only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Optional, for readers who write both ends: must equal the previous
    /// tier's `up_to` (0 for the first).
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub from: Option<Decimal>,
    /// Upper bound, inclusive; `null` = no bound.
    #[serde(deserialize_with = "de_opt_decimal")]
    pub up_to: Option<Decimal>,
    /// Price per unit in this tier.
    #[serde(default = "zero", deserialize_with = "de_decimal")]
    pub unit_price: Decimal,
    /// Added once when the tier is used.
    #[serde(default, deserialize_with = "de_opt_decimal", skip_serializing_if = "Option::is_none")]
    pub flat_price: Option<Decimal>,
}

/// A field of a request that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the field, e.g. `charges[0].tiers[1].up_to`.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl FieldError {
    /// Builds one.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError { field: field.into(), reason: reason.into() }
    }
}

/// Parses a plan body; the error names the field (`charges[1].model`).
pub fn parse(body: serde_json::Value) -> Result<PlanSpec, FieldError> {
    serde_path_to_error::deserialize::<_, PlanSpec>(body).map_err(|e| {
        let path = e.path().to_string();
        FieldError::new(if path == "." { "body".into() } else { path }, e.into_inner().to_string())
    })
}

impl PlanSpec {
    /// Checks everything a plan must satisfy, given the workspace's meter
    /// keys; every problem is reported, each naming its field.
    pub fn validate(&self, meters: &[String]) -> Result<Currency, Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut err = |f: String, r: &str| errs.push(FieldError::new(f, r));
        if self.code.is_empty() || self.code.len() > 64 || !self.code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
            err("code".into(), "must be 1-64 characters of A-Z a-z 0-9 _ - .");
        }
        if self.name.trim().is_empty() || self.name.len() > 200 {
            err("name".into(), "must be 1-200 characters");
        }
        let currency = Currency::of(&self.currency);
        if currency.is_none() {
            err("currency".into(), "must be an ISO 4217 code in upper case, such as JPY or USD");
        }
        if self.trial_days > 3650 {
            err("trial_days".into(), "must be at most 3650");
        }
        for (i, f) in self.fixed_fees.iter().enumerate() {
            if f.name.trim().is_empty() {
                err(format!("fixed_fees[{i}].name"), "must not be empty");
            }
            if f.amount.is_sign_negative() {
                err(format!("fixed_fees[{i}].amount"), "must not be negative");
            }
            check_rate(&mut err, format!("fixed_fees[{i}].tax_rate"), f.tax_rate);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.charges.iter().enumerate() {
            let at = |f: &str| format!("charges[{i}].{f}");
            if !meters.contains(&c.meter) {
                err(at("meter"), "no meter with this key in the workspace");
            } else if !seen.insert(&c.meter) {
                err(at("meter"), "another charge of this plan is on the same meter");
            }
            check_rate(&mut err, at("tax_rate"), c.tax_rate);
            for (name, v) in [("free_units", c.free_units), ("minimum_amount", c.minimum_amount)] {
                if v.is_some_and(|v| v.is_sign_negative()) {
                    err(at(name), "must not be negative");
                }
            }
            // Each model's own fields are required, the others refused: a
            // `unit_price` on a graduated charge is a mistake, not a default.
            let fields: [(&str, bool); 5] = [
                ("unit_price", c.unit_price.is_some()),
                ("tiers", c.tiers.is_some()),
                ("package_size", c.package_size.is_some()),
                ("package_price", c.package_price.is_some()),
                ("amount", c.amount.is_some()),
            ];
            let wanted: &[&str] = match c.model {
                ChargeModel::PerUnit => &["unit_price"],
                ChargeModel::Graduated | ChargeModel::Volume => &["tiers"],
                ChargeModel::Package => &["package_size", "package_price"],
                ChargeModel::Flat => &["amount"],
            };
            for (name, present) in fields {
                if wanted.contains(&name) && !present {
                    err(at(name), &format!("is required for the {} model", c.model));
                } else if !wanted.contains(&name) && present {
                    err(at(name), &format!("does not belong to the {} model", c.model));
                }
            }
            for (name, v) in [("unit_price", c.unit_price), ("package_price", c.package_price), ("amount", c.amount)] {
                if v.is_some_and(|v| v.is_sign_negative()) {
                    err(at(name), "must not be negative");
                }
            }
            if c.package_size.is_some_and(|s| s <= Decimal::ZERO) {
                err(at("package_size"), "must be above 0");
            }
            if let Some(tiers) = &c.tiers {
                if tiers.is_empty() {
                    err(at("tiers"), "needs at least one tier");
                }
                let mut lower = Decimal::ZERO;
                for (j, t) in tiers.iter().enumerate() {
                    let tat = |f: &str| format!("charges[{i}].tiers[{j}].{f}");
                    if let Some(from) = t.from {
                        if from != lower {
                            err(
                                tat("from"),
                                &if j == 0 {
                                    "tiers must start at 0".to_owned()
                                } else {
                                    format!("must equal the previous tier's up_to ({lower}): tiers may not overlap or leave gaps")
                                },
                            );
                        }
                    }
                    if t.unit_price.is_sign_negative() {
                        err(tat("unit_price"), "must not be negative");
                    }
                    if t.flat_price.is_some_and(|p| p.is_sign_negative()) {
                        err(tat("flat_price"), "must not be negative");
                    }
                    match t.up_to {
                        Some(up) if up <= lower => err(
                            tat("up_to"),
                            &if j == 0 {
                                "must be above 0 (the first tier starts at 0)".to_owned()
                            } else {
                                format!("must be above the previous tier's up_to ({lower}): tiers may not overlap")
                            },
                        ),
                        Some(up) => lower = up,
                        None if j + 1 != tiers.len() => err(tat("up_to"), "only the last tier may have no upper bound (null)"),
                        None => {}
                    }
                }
                if tiers.last().is_some_and(|t| t.up_to.is_some()) {
                    err(format!("charges[{i}].tiers[{}].up_to", tiers.len() - 1), "the last tier must have no upper bound (null)");
                }
            }
        }
        // One error per field: the first found says what to fix first.
        let mut seen_fields = std::collections::HashSet::new();
        errs.retain(|e| seen_fields.insert(e.field.clone()));
        match (currency, errs.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(errs),
        }
    }
}

fn check_rate(err: &mut impl FnMut(String, &str), field: String, rate: Decimal) {
    if rate.is_sign_negative() || rate >= Decimal::ONE {
        err(field, "must be a fraction from 0 to below 1, such as 0.10");
    }
}

/// One tier's part of a price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierAmount {
    /// 1-based.
    pub tier: usize,
    /// Lower bound (exclusive; 0 for the first tier).
    pub from: Decimal,
    /// Upper bound (inclusive), `null` for the last.
    pub up_to: Option<Decimal>,
    /// Units priced in this tier.
    pub units: Decimal,
    /// Price per unit.
    pub unit_price: Decimal,
    /// Flat price added.
    pub flat_price: Decimal,
    /// units × unit_price + flat_price, exact.
    pub amount: Decimal,
}

/// A quantity priced by a charge, exact (not rounded).
#[derive(Debug, Clone, PartialEq)]
pub struct Priced {
    /// The quantity after free units.
    pub billable: Decimal,
    /// The amount before the minimum.
    pub amount: Decimal,
    /// The per-unit price when one price applies to every unit (per_unit,
    /// and volume: the tier reached).
    pub unit_price: Option<Decimal>,
    /// Per tier (graduated and volume).
    pub tiers: Vec<TierAmount>,
}

impl Charge {
    /// Prices `quantity` (free units first taken off). Quantities below 0
    /// (a meter of corrections) price as 0.
    pub fn price(&self, quantity: Decimal) -> Priced {
        let free = self.free_units.unwrap_or_default();
        let q = (quantity - free).max(Decimal::ZERO);
        let mut tiers = Vec::new();
        let (amount, unit_price) = match self.model {
            ChargeModel::PerUnit => {
                let p = self.unit_price.unwrap_or_default();
                (q * p, Some(p))
            }
            ChargeModel::Flat => (if q > Decimal::ZERO { self.amount.unwrap_or_default() } else { Decimal::ZERO }, None),
            ChargeModel::Package => {
                let size = self.package_size.unwrap_or(Decimal::ONE);
                let blocks = (q / size).ceil();
                (blocks * self.package_price.unwrap_or_default(), None)
            }
            ChargeModel::Graduated => {
                let mut lower = Decimal::ZERO;
                let mut total = Decimal::ZERO;
                for (i, t) in self.tiers.iter().flatten().enumerate() {
                    let units = match t.up_to {
                        Some(up) => (q.min(up) - lower).max(Decimal::ZERO),
                        None => (q - lower).max(Decimal::ZERO),
                    };
                    if units > Decimal::ZERO {
                        let flat = t.flat_price.unwrap_or_default();
                        let amount = units * t.unit_price + flat;
                        total += amount;
                        tiers.push(TierAmount {
                            tier: i + 1,
                            from: lower,
                            up_to: t.up_to,
                            units,
                            unit_price: t.unit_price,
                            flat_price: flat,
                            amount,
                        });
                    }
                    match t.up_to {
                        Some(up) => lower = up,
                        None => break,
                    }
                }
                (total, None)
            }
            ChargeModel::Volume => {
                // `up_to` is inclusive: a quantity equal to it is in that tier.
                let mut lower = Decimal::ZERO;
                let mut found = None;
                for (i, t) in self.tiers.iter().flatten().enumerate() {
                    if t.up_to.is_none_or(|up| q <= up) {
                        found = Some((i, lower, t));
                        break;
                    }
                    lower = t.up_to.unwrap_or(lower);
                }
                match found {
                    Some((i, from, t)) if q > Decimal::ZERO => {
                        let flat = t.flat_price.unwrap_or_default();
                        let amount = q * t.unit_price + flat;
                        tiers.push(TierAmount { tier: i + 1, from, up_to: t.up_to, units: q, unit_price: t.unit_price, flat_price: flat, amount });
                        (amount, Some(t.unit_price))
                    }
                    _ => (Decimal::ZERO, None),
                }
            }
        };
        Priced { billable: q, amount, unit_price, tiers }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn example() -> PlanSpec {
        parse(json!({"code": "pro", "name": "Pro", "currency": "JPY", "interval": "month", "trial_days": 0,
         "fixed_fees": [{"name": "Base fee", "amount": "10000", "tax_rate": "0.10"}],
         "charges": [
           {"meter": "storage_gb", "model": "graduated", "tax_rate": "0.10", "free_units": "0",
            "tiers": [{"up_to": "100", "unit_price": "0"}, {"up_to": "1000", "unit_price": "5"},
                      {"up_to": null, "unit_price": "3", "flat_price": "0"}]},
           {"meter": "api_calls", "model": "volume", "tax_rate": "0.10",
            "tiers": [{"up_to": "10000", "unit_price": "0.5"}, {"up_to": null, "unit_price": "0.2"}]},
           {"meter": "seats", "model": "package", "package_size": "10", "package_price": "3000",
            "tax_rate": "0.10", "minimum_amount": "3000"},
           {"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"},
           {"meter": "support_tickets", "model": "flat", "amount": "2000", "tax_rate": "0.10"}]}))
        .unwrap()
    }

    fn meters() -> Vec<String> {
        ["storage_gb", "api_calls", "seats", "lunch_boxes", "support_tickets"].map(String::from).to_vec()
    }

    #[test]
    fn the_issue_example_is_valid_and_prices_by_hand() {
        let p = example();
        assert_eq!(p.validate(&meters()).unwrap().code(), "JPY");
        let price = |i: usize, q: &str| p.charges[i].price(d(q)).amount;
        // graduated: 100 free-priced, then 5 up to 1000 (inclusive), then 3.
        assert_eq!(price(0, "100"), d("0"));
        assert_eq!(price(0, "1000"), d("4500"));
        assert_eq!(price(0, "1001"), d("4503"));
        // volume: 10000 is in the first tier (inclusive), 10001 all at 0.2.
        assert_eq!(price(1, "10000"), d("5000"));
        assert_eq!(price(1, "10001"), d("2000.2"));
        assert_eq!(price(1, "0"), d("0"));
        // package: per started block of 10.
        assert_eq!(price(2, "10"), d("3000"));
        assert_eq!(price(2, "11"), d("6000"));
        assert_eq!(price(2, "0"), d("0"));
        assert_eq!(price(3, "3"), d("1620"));
        assert_eq!(price(4, "0"), d("0"));
        assert_eq!(price(4, "0.5"), d("2000"));
        // Graduated and volume differ exactly on a boundary.
        let tiers = p.charges[0].price(d("1000")).tiers;
        assert_eq!(tiers.iter().map(|t| t.units).collect::<Vec<_>>(), vec![d("100"), d("900")]);
    }

    #[test]
    fn free_units_come_off_first() {
        let mut c = example().charges[3].clone();
        c.free_units = Some(d("2"));
        assert_eq!(c.price(d("5")).amount, d("1620"));
        assert_eq!(c.price(d("1")).amount, d("0"));
    }

    #[test]
    fn bad_plans_name_their_field() {
        let mut p = example();
        p.charges[0].tiers.as_mut().unwrap()[1].up_to = Some(d("50"));
        p.charges[1].meter = "nope".into();
        p.charges[3].unit_price = Some(d("-1"));
        p.currency = "yen".into();
        let errs = p.validate(&meters()).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["currency", "charges[0].tiers[1].up_to", "charges[1].meter", "charges[3].unit_price"]);
        let mut p = example();
        p.charges[0].tiers.as_mut().unwrap()[0].from = Some(d("1"));
        assert_eq!(p.validate(&meters()).unwrap_err()[0].reason, "tiers must start at 0");
        let e = parse(json!({"code": "x", "name": "x", "currency": "JPY", "interval": "month",
            "charges": [{"meter": "seats", "model": "per_unit", "unit_price": 0.1}]}))
        .unwrap_err();
        assert_eq!(e.field, "charges[0].unit_price");
        let e = parse(json!({"code": "x", "name": "x", "currency": "JPY", "interval": "day"})).unwrap_err();
        assert_eq!(e.field, "interval");
    }
}
