//! A workspace's billing settings (`PATCH /v1/workspaces/{name}` with
//! `billing`), and the qualified-invoice registration number check.

use serde::{Deserialize, Serialize};

use crate::money::TaxRounding;
use crate::plan::FieldError;

/// Billing settings of a workspace. Every field has a default, so a
/// workspace that never set them bills with these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// The issuer's name on invoices (適格請求書発行事業者の氏名又は名称).
    #[serde(default)]
    pub issuer_name: Option<String>,
    /// The issuer's registration number: `T` and 13 digits (登録番号).
    #[serde(default)]
    pub registration_number: Option<String>,
    /// The issuer's address.
    #[serde(default)]
    pub issuer_address: Option<String>,
    /// Invoice numbers are `{invoice_prefix}-{YYYYMM}-{000001}`.
    #[serde(default = "default_prefix")]
    pub invoice_prefix: String,
    /// How each tax rate's tax is rounded (once per rate per invoice).
    #[serde(default = "default_rounding")]
    pub tax_rounding: TaxRounding,
    /// Days after a period's end during which auto-billing keeps its
    /// invoice a draft, recomputed with late usage.
    #[serde(default)]
    pub grace_period_days: u32,
    /// Bill every subscription automatically at its cycle end.
    #[serde(default = "yes")]
    pub auto_billing: bool,
    /// When auto-billing was last switched on (periods ending before it
    /// are billed only by explicit runs). Kept by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_billing_since: Option<chrono::DateTime<chrono::Utc>>,
}

fn default_prefix() -> String {
    "INV".into()
}

fn default_rounding() -> TaxRounding {
    TaxRounding::Floor
}

fn yes() -> bool {
    true
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            issuer_name: None,
            registration_number: None,
            issuer_address: None,
            invoice_prefix: default_prefix(),
            tax_rounding: default_rounding(),
            grace_period_days: 0,
            auto_billing: true,
            auto_billing_since: None,
        }
    }
}

impl BillingSettings {
    /// Applies a `billing` patch (only the fields it names; `null` clears an
    /// optional one); the error names the field.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<BillingSettings, FieldError> {
        let serde_json::Value::Object(p) = patch else {
            return Err(FieldError::new("billing", "must be an object"));
        };
        let mut merged = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for (k, v) in p {
            if k == "auto_billing_since" {
                return Err(FieldError::new("billing.auto_billing_since", "is kept by the server"));
            }
            merged.insert(k.clone(), v.clone());
        }
        let mut s: BillingSettings = serde_path_to_error::deserialize(serde_json::Value::Object(merged)).map_err(|e| {
            let path = e.path().to_string();
            FieldError::new(if path == "." { "billing".into() } else { format!("billing.{path}") }, e.into_inner().to_string())
        })?;
        if let Some(r) = &s.registration_number {
            check_registration_number(r).map_err(|reason| FieldError::new("billing.registration_number", reason.to_string()))?;
        }
        let prefix_ok = !s.invoice_prefix.is_empty()
            && s.invoice_prefix.len() <= 20
            && s.invoice_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !prefix_ok {
            return Err(FieldError::new("billing.invoice_prefix", "must be 1-20 characters of A-Z a-z 0-9 - _"));
        }
        if s.grace_period_days > 365 {
            return Err(FieldError::new("billing.grace_period_days", "must be at most 365"));
        }
        for (name, v) in [("issuer_name", &s.issuer_name), ("issuer_address", &s.issuer_address)] {
            if v.as_ref().is_some_and(|v| v.chars().count() > 500) {
                return Err(FieldError::new(format!("billing.{name}"), "must be at most 500 characters"));
            }
        }
        if s.auto_billing && (!self.auto_billing || self.auto_billing_since.is_none()) {
            s.auto_billing_since = Some(chrono::Utc::now());
        }
        Ok(s)
    }
}

/// Checks a qualified-invoice registration number: `T` and 13 digits whose
/// first is the check digit of the other twelve, computed as for Japan's
/// corporate numbers (法人番号): 9 − (Σ Pn × Qn mod 9), Pn the n-th digit
/// from the right of the twelve, Qn 1 for odd n and 2 for even n.
pub fn check_registration_number(s: &str) -> Result<(), RegistrationNumberError> {
    let digits = s.strip_prefix('T').ok_or(RegistrationNumberError::NoT)?;
    if digits.len() != 13 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistrationNumberError::NotThirteenDigits);
    }
    let d: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
    let sum: u32 = d[1..].iter().rev().enumerate().map(|(i, &p)| p * if i % 2 == 0 { 1 } else { 2 }).sum();
    let check = 9 - sum % 9;
    if d[0] != check {
        return Err(RegistrationNumberError::CheckDigit(check));
    }
    Ok(())
}

/// Why a registration number is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationNumberError {
    /// It does not start with `T`.
    #[error("must start with T (then 13 digits), such as T7000012050002")]
    NoT,
    /// Not 13 digits after the `T`.
    #[error("must be T followed by exactly 13 digits")]
    NotThirteenDigits,
    /// The check digit (the first of the 13) is not the one computed.
    #[error("the check digit is wrong: the first digit should be {0} for these 12 digits")]
    CheckDigit(u32),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn registration_numbers() {
        // The National Tax Agency's own corporate number.
        assert_eq!(check_registration_number("T7000012050002"), Ok(()));
        assert_eq!(check_registration_number("T8000012050002"), Err(RegistrationNumberError::CheckDigit(7)));
        assert!(check_registration_number("T8000012050002").unwrap_err().to_string().contains("should be 7"));
        assert!(check_registration_number("7000012050002").is_err());
        assert!(check_registration_number("T700001205000").is_err());
    }

    #[test]
    fn patches_name_the_field() {
        let s = BillingSettings::default();
        let e = s.patched(&serde_json::json!({"tax_rounding": "up"})).unwrap_err();
        assert_eq!(e.field, "billing.tax_rounding");
        let e = s.patched(&serde_json::json!({"registration_number": "T1234567890123"})).unwrap_err();
        assert_eq!(e.field, "billing.registration_number");
        let e = s.patched(&serde_json::json!({"colour": "red"})).unwrap_err();
        assert!(e.reason.contains("colour"), "{e}");
        let p = s.patched(&serde_json::json!({"issuer_name": "株式会社スルース", "grace_period_days": 3})).unwrap();
        assert_eq!((p.issuer_name.as_deref(), p.grace_period_days, p.invoice_prefix.as_str()), (Some("株式会社スルース"), 3, "INV"));
    }
}
