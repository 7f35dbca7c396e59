//! Money: currencies and their minor units, and the two places amounts are
//! rounded (docs/billing.md, "Rounding").
//!
//! Amounts are exact decimals ([`Decimal`]) from the plan to the invoice.
//! They are rounded to the currency's minor unit at exactly two points:
//! each invoice line's amount (half up: a line is money the customer owes),
//! and each tax rate's tax, once per rate per invoice, in the workspace's
//! `tax_rounding` mode. Every other figure on an invoice is a sum of those,
//! so the per-rate figures always add up to the total.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer};

/// ISO 4217 codes this version knows, with their minor units. A table
/// rather than a crate: the only fact needed is the number of decimals, and
/// the ISO list changes a few times a decade.
const CURRENCIES: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

/// A currency this version bills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

impl Currency {
    /// The currency of an ISO 4217 code (upper case), if known.
    pub fn of(code: &str) -> Option<Currency> {
        CURRENCIES.iter().find(|(c, _)| *c == code).map(|&(code, minor_units)| Currency { code, minor_units })
    }

    /// The code, e.g. `JPY`.
    pub fn code(self) -> &'static str {
        self.code
    }

    /// Decimals of the minor unit: JPY 0, USD 2, BHD 3.
    pub fn minor_units(self) -> u32 {
        self.minor_units
    }

    /// An invoice line's amount: rounded half up (away from zero) to the
    /// minor unit.
    pub fn round_line(self, amount: Decimal) -> Decimal {
        amount.round_dp_with_strategy(self.minor_units, RoundingStrategy::MidpointAwayFromZero)
    }

    /// A tax rate's tax on an invoice, rounded once in the workspace's mode.
    pub fn round_tax(self, tax: Decimal, mode: TaxRounding) -> Decimal {
        let strategy = match mode {
            TaxRounding::Floor => RoundingStrategy::ToNegativeInfinity,
            TaxRounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            TaxRounding::Ceiling => RoundingStrategy::ToPositiveInfinity,
        };
        tax.round_dp_with_strategy(self.minor_units, strategy)
    }

    /// `amount` with exactly the minor unit's decimals (`1000` → `1000.00`
    /// in USD), as every amount of an invoice is stored and shown. Only
    /// for amounts already rounded to the minor unit: it adds zeros.
    pub fn exact(self, amount: Decimal) -> Decimal {
        let mut a = amount;
        a.rescale(self.minor_units);
        a
    }
}

sluice_core::named_enum! {
    /// How a tax rate's tax is rounded to the minor unit (once per rate per
    /// invoice). Japan's qualified invoices allow any, consistently; `floor`
    /// (切り捨て) is the most common and the default.
    pub enum TaxRounding / UnknownTaxRounding ("a tax rounding mode") {
        /// Down (toward negative infinity).
        Floor = "floor",
        /// To the nearest, halves away from zero.
        HalfUp = "half_up",
        /// Up (toward positive infinity).
        Ceiling = "ceiling",
    }
}

/// Reads a decimal written as a JSON string (`"0.5"`) or integer (`100`);
/// a JSON fraction (`0.5`) is refused: JSON parsers read it as a binary
/// float, and money must stay exact.
pub fn de_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Str(String),
        Int(i64),
        Float(f64),
    }
    match Raw::deserialize(d)? {
        Raw::Str(s) => s.trim().parse::<Decimal>().map_err(|_| serde::de::Error::custom(format!("{s:?} is not a decimal number"))),
        Raw::Int(i) => Ok(Decimal::from(i)),
        Raw::Float(f) => Err(serde::de::Error::custom(format!("write {f} as a string (\"{f}\"): amounts must be exact decimals"))),
    }
}

/// [`de_decimal`] for an optional field (`null` or absent is `None`).
pub fn de_opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "de_decimal")] Decimal);
    Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn minor_units_and_rounding() {
        let jpy = Currency::of("JPY").unwrap();
        let usd = Currency::of("USD").unwrap();
        assert_eq!(jpy.round_line(d("6172.5")), d("6173"));
        assert_eq!(jpy.round_line(d("-6172.5")), d("-6173"));
        assert_eq!(usd.round_line(d("0.125")), d("0.13"));
        assert_eq!(jpy.round_tax(d("99.9"), TaxRounding::Floor), d("99"));
        assert_eq!(jpy.round_tax(d("99.5"), TaxRounding::HalfUp), d("100"));
        assert_eq!(jpy.round_tax(d("99.1"), TaxRounding::Ceiling), d("100"));
        assert_eq!(usd.exact(d("1000")).to_string(), "1000.00");
        assert_eq!(Currency::of("XXX"), None);
    }
}
