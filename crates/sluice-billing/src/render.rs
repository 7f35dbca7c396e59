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
    let a = c.map_or(a, |c| c.exact(a));
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
pub fn html(inv: &Invoice, status: crate::invoice::InvoiceStatus, number: Option<&str>, issued: Option<DateTime<Utc>>) -> String {
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
    let _ = write!(h, "<p>請求書番号 / Number: <strong id=\"number\">{}</strong> · 状態 / Status: {}</p>", esc(number.unwrap_or("(draft)")), status);
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

/// `s` cut to fit `max_mm` at `size` points, with an ellipsis when cut.
fn fit(s: &str, size: f32, max_mm: f32) -> String {
    if sluice_pdf::text_width_mm(size, s) <= max_mm {
        return s.to_owned();
    }
    let mut out: String = s.to_owned();
    while !out.is_empty() && sluice_pdf::text_width_mm(size, &format!("{out}…")) > max_mm {
        out.pop();
    }
    format!("{out}…")
}

/// The invoice as an A4 PDF, with the same content as [`html`]: generated
/// in-process (sluice-pdf, IPAex Gothic embedded), so Japanese text renders
/// and extracts correctly without any external service.
pub fn pdf(
    inv: &Invoice,
    status: crate::invoice::InvoiceStatus,
    number: Option<&str>,
    issued: Option<DateTime<Utc>>,
) -> Result<Vec<u8>, sluice_pdf::PdfError> {
    let tz: Tz = inv.time_zone.parse().unwrap_or(chrono_tz::UTC);
    let cur = Currency::of(&inv.currency);
    let money = |a: Decimal| format!("{} {}", amount(cur, a), inv.currency);
    let issuer = inv.issuer.clone().unwrap_or(crate::invoice::Issuer { name: None, registration_number: None, address: None });
    let qualified = issuer.registration_number.is_some();
    let title = if qualified { "適格請求書 / Qualified invoice" } else { "請求書 / Invoice" };
    let day_before = |t: DateTime<Utc>| date(t - chrono::Duration::microseconds(1), tz);
    let mut doc = sluice_pdf::Document::new();
    doc.set_title(format!("{title} {}", number.unwrap_or("(draft)")));
    // Rows of the line table, then the totals; pages break between rows.
    const LEFT: f32 = 15.0;
    const RIGHT: f32 = 195.0;
    const BOTTOM: f32 = 280.0;
    let rows: Vec<[String; 6]> = inv
        .lines
        .iter()
        .map(|l| {
            [
                format!("{}{}", l.description, if l.reduced_rate { " ※" } else { "" }),
                format!("{} – {}", date(l.period_start, tz), day_before(l.period_end)),
                l.quantity.normalize().to_string(),
                l.unit_price.map(|p| p.normalize().to_string()).unwrap_or_default(),
                percent(l.tax_rate),
                money(l.amount),
            ]
        })
        .collect();
    let mut next = 0;
    let mut first = true;
    loop {
        let page = doc.add_page();
        let mut y = 20.0;
        if first {
            page.text(LEFT, y, 18.0, title);
            page.text_right(RIGHT, y, 9.0, &format!("請求書番号 / No. {}", number.unwrap_or("(draft)")));
            y += 6.0;
            page.text_right(RIGHT, y, 9.0, &format!("発行日 / Issued {} · {status}", issued.map(|t| date(t, tz)).unwrap_or_else(|| "-".into())));
            y += 10.0;
            page.text(LEFT, y, 12.0, &format!("{} 御中", inv.customer_name.as_deref().unwrap_or(&inv.customer_id)));
            page.text_right(RIGHT, y, 10.0, issuer.name.as_deref().unwrap_or(""));
            y += 5.5;
            page.text(LEFT, y, 8.0, &inv.customer_id);
            page.text_right(RIGHT, y, 9.0, &format!("登録番号 / Registration No. {}", issuer.registration_number.as_deref().unwrap_or("-")));
            y += 5.0;
            page.text_right(RIGHT, y, 8.0, issuer.address.as_deref().unwrap_or(""));
            y += 8.0;
            page.text(
                LEFT,
                y,
                9.0,
                &format!("取引期間 / Period {} – {} ({})", date(inv.period_start, tz), day_before(inv.period_end), inv.time_zone),
            );
            y += 6.0;
            page.text(LEFT, y, 12.0, &format!("ご請求金額 / Amount due  {}", money(inv.total)));
            y += 10.0;
            first = false;
        }
        // The table header.
        let cols = [LEFT, 85.0, 118.0, 140.0, 160.0];
        for (x, h) in cols.iter().zip(["内容 / Description", "期間 / Period", "数量 / Qty", "単価 / Price", "税率 / Rate"]) {
            page.text(*x, y, 7.5, h);
        }
        page.text_right(RIGHT, y, 7.5, "金額 / Amount");
        y += 1.5;
        page.line(LEFT, y, RIGHT, y, 0.5);
        y += 5.0;
        while next < rows.len() && y < BOTTOM - 10.0 {
            let r = &rows[next];
            page.text(cols[0], y, 8.0, &fit(&r[0], 8.0, 68.0));
            page.text(cols[1], y, 7.0, &r[1]);
            page.text(cols[2], y, 8.0, &fit(&r[2], 8.0, 20.0));
            page.text(cols[3], y, 8.0, &fit(&r[3], 8.0, 18.0));
            page.text(cols[4], y, 8.0, &r[4]);
            page.text_right(RIGHT, y, 8.0, &r[5]);
            y += 5.0;
            next += 1;
        }
        let totals_height = 8.0 + 5.0 * (inv.taxes.len() as f32 + 5.0);
        if next < rows.len() || y + totals_height > BOTTOM {
            if next >= rows.len() {
                // The totals go on a page of their own.
                let page = doc.add_page();
                totals(page, 20.0, inv, &money);
                break;
            }
            continue;
        }
        page.line(LEFT, y - 3.0, RIGHT, y - 3.0, 0.3);
        totals(page, y + 3.0, inv, &money);
        break;
    }
    doc.finish()
}

/// The tax per rate, subtotal, tax and total, from `y` down.
fn totals(page: &mut sluice_pdf::Page, mut y: f32, inv: &Invoice, money: &dyn Fn(Decimal) -> String) {
    const RIGHT: f32 = 195.0;
    for t in &inv.taxes {
        let label = format!("{}対象 / taxable at {}{}", percent(t.rate), percent(t.rate), if t.reduced_rate { " ※軽減税率" } else { "" });
        page.text(95.0, y, 8.5, &label);
        page.text_right(RIGHT, y, 8.5, &format!("{}  消費税 / tax {}", money(t.taxable_amount), money(t.tax)));
        y += 5.0;
    }
    y += 2.0;
    page.text(95.0, y, 9.0, "小計 / Subtotal");
    page.text_right(RIGHT, y, 9.0, &money(inv.subtotal));
    y += 5.0;
    page.text(95.0, y, 9.0, "消費税 / Tax");
    page.text_right(RIGHT, y, 9.0, &money(inv.tax));
    y += 6.0;
    page.text(95.0, y, 11.0, "合計 / Total");
    page.text_right(RIGHT, y, 11.0, &money(inv.total));
    y += 8.0;
    if inv.lines.iter().any(|l| l.reduced_rate) {
        page.text(15.0, y, 7.5, "※は軽減税率対象 / ※ marks reduced-rate items");
        y += 4.5;
    }
    page.text(15.0, y, 7.5, &format!("税の端数処理 / Tax rounding: {} (once per rate)", inv.tax_rounding));
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
