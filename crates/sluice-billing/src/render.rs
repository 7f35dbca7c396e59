//! An invoice as an HTML page (`GET /v1/invoices/{id}.html`): a qualified
//! invoice (適格請求書) when the issuer has a registration number — issuer
//! name and number, recipient, transaction period, each line with its tax
//! rate (reduced-rate lines marked ※), the total and the tax per rate —
//! and a plain invoice otherwise. Labels are Japanese and English.
//!
//! Written by hand rather than with a template engine: one page, about a
//! hundred lines, and every value passes through [`esc`].

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::invoice::Invoice;
use crate::money::Currency;

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An amount with thousands separators and the currency's decimals.
pub fn amount(c: Option<Currency>, a: Decimal) -> String {
    let mut a = a;
    if let Some(c) = c {
        a.rescale(c.minor_units());
    }
    let s = a.abs().to_string();
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if a.is_sign_negative() && !a.is_zero() { "-" } else { "" };
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// A rate as a percentage: `0.10` → `10%`.
pub fn percent(r: Decimal) -> String {
    format!("{}%", (r * Decimal::ONE_HUNDRED).normalize())
}

/// A date in the invoice's time zone.
pub fn date(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d").to_string()
}

/// The page. `status` and `number` are the store's.
pub fn html(inv: &Invoice, status: &str, number: Option<&str>, issued: Option<DateTime<Utc>>) -> String {
    let tz: Tz = inv.time_zone.parse().unwrap_or(chrono_tz::UTC);
    let cur = Currency::of(&inv.currency);
    let money = |a: Decimal| format!("{} {}", amount(cur, a), esc(&inv.currency));
    let issuer = inv.issuer.clone().unwrap_or(crate::invoice::Issuer { name: None, registration_number: None, address: None });
    let qualified = issuer.registration_number.is_some();
    // The period is [start, end): the last day shown is the day before the end.
    let last_day = inv.period_end - chrono::Duration::microseconds(1);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\"><title>{title} {num}</title>\
         <style>body{{font-family:system-ui,'Noto Sans JP',sans-serif;max-width:60rem;margin:2rem auto;color:#111}}\
         table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ccc;padding:.3rem .5rem;text-align:left}}\
         .n{{text-align:right;font-variant-numeric:tabular-nums}}.muted{{color:#555}}</style></head><body>\
         <h1>{title}</h1>",
        title = if qualified { "適格請求書 / Qualified invoice" } else { "請求書 / Invoice" },
        num = esc(number.unwrap_or("")),
    );
    let _ = write!(
        h,
        "<p>請求書番号 / Number: <strong id=\"number\">{}</strong> · 状態 / Status: {}</p>",
        esc(number.unwrap_or("(draft)")),
        esc(status)
    );
    let _ = write!(
        h,
        "<section><h2>発行者 / Issuer</h2><p id=\"issuer\">{}<br>登録番号 / Registration number: <span id=\"registration\">{}</span><br>{}</p></section>",
        esc(issuer.name.as_deref().unwrap_or("")),
        esc(issuer.registration_number.as_deref().unwrap_or("-")),
        esc(issuer.address.as_deref().unwrap_or(""))
    );
    let _ = write!(
        h,
        "<section><h2>宛先 / Bill to</h2><p id=\"recipient\">{} 御中<br><span class=\"muted\">{}</span></p></section>",
        esc(inv.customer_name.as_deref().unwrap_or(&inv.customer_id)),
        esc(&inv.customer_id)
    );
    let _ = write!(
        h,
        "<p>取引期間 / Period: {} – {} ({}) · 発行日 / Issued: {}</p>",
        date(inv.period_start, tz),
        date(last_day, tz),
        esc(&inv.time_zone),
        issued.map(|t| date(t, tz)).unwrap_or_else(|| "-".into())
    );
    h.push_str("<table><thead><tr><th>内容 / Description</th><th>期間 / Period</th><th class=\"n\">数量 / Qty</th><th class=\"n\">単価 / Unit price</th><th class=\"n\">税率 / Tax rate</th><th class=\"n\">金額 / Amount</th></tr></thead><tbody>");
    for l in &inv.lines {
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td>{} – {}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&l.description),
            if l.reduced_rate { " ※" } else { "" },
            date(l.period_start, tz),
            date(l.period_end - chrono::Duration::microseconds(1), tz),
            esc(&l.quantity.normalize().to_string()),
            l.unit_price.map(|p| esc(&p.normalize().to_string())).unwrap_or_default(),
            percent(l.tax_rate),
            money(l.amount)
        );
    }
    h.push_str("</tbody></table>");
    h.push_str("<table id=\"taxes\"><thead><tr><th>税率 / Rate</th><th class=\"n\">対象額 / Taxable</th><th class=\"n\">消費税 / Tax</th></tr></thead><tbody>");
    for t in &inv.taxes {
        let _ = write!(
            h,
            "<tr><td>{}{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            percent(t.rate),
            if t.reduced_rate { " ※軽減税率 / reduced" } else { "" },
            money(t.taxable_amount),
            money(t.tax)
        );
    }
    let _ = write!(
        h,
        "</tbody></table><p class=\"n\">小計 / Subtotal: {}<br>消費税 / Tax: {}<br><strong>合計 / Total: <span id=\"total\">{}</span></strong></p>",
        money(inv.subtotal),
        money(inv.tax),
        money(inv.total)
    );
    if inv.lines.iter().any(|l| l.reduced_rate) {
        h.push_str("<p class=\"muted\">※は軽減税率対象 / ※ marks reduced-rate items</p>");
    }
    let _ = write!(h, "<p class=\"muted\">税の端数処理 / Tax rounding: {} (once per rate)</p></body></html>", inv.tax_rounding);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_group_thousands() {
        let jpy = Currency::of("JPY");
        assert_eq!(amount(jpy, Decimal::new(1234567, 0)), "1,234,567");
        assert_eq!(amount(Currency::of("USD"), Decimal::new(-123456, 2)), "-1,234.56");
        assert_eq!(amount(jpy, Decimal::ZERO), "0");
        assert_eq!(percent(Decimal::new(8, 2)), "8%");
        assert_eq!(esc("<a&'\">"), "&lt;a&amp;&#39;&quot;&gt;");
    }
}
