//! Writes a sample Japanese invoice page, to look at in a viewer:
//! `cargo run -p sluice-pdf --example sample_invoice -- /tmp/invoice.pdf`

use sluice_pdf::{text_width_mm, Document, A4_WIDTH_MM};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "sample_invoice.pdf".into());
    let (left, right) = (20.0, A4_WIDTH_MM - 20.0);

    let mut doc = Document::new();
    doc.set_title("適格請求書 INV-2024-0001");
    let page = doc.add_page();
    page.text_center(A4_WIDTH_MM / 2.0, 25.0, 20.0, "適格請求書");
    page.text(left, 45.0, 12.0, "株式会社スルース 御中");
    page.line(left, 47.0, left + text_width_mm(12.0, "株式会社スルース 御中"), 47.0, 0.5);
    page.text_right(right, 45.0, 9.0, "請求書番号 INV-2024-0001");
    page.text_right(right, 50.0, 9.0, "発行日 2024年10月31日");
    page.text_right(right, 55.0, 9.0, "登録番号 T7000012050002");

    let mut y = 75.0;
    page.line(left, y - 5.0, right, y - 5.0, 0.8);
    for (item, amount) in
        [("APIリクエスト（10月分）", "¥1,000,000"), ("※お弁当（軽減税率対象）", "¥10,000"), ("消費税 10%", "¥100,000"), ("消費税 8%", "¥800")]
    {
        page.text(left, y, 10.0, item);
        page.text_right(right, y, 10.0, amount);
        y += 7.0;
    }
    page.line(left, y - 4.0, right, y - 4.0, 0.5);
    page.text(left, y + 2.0, 12.0, "合計 （税込）");
    page.text_right(right, y + 2.0, 12.0, "¥1,110,800");
    page.text(left, y + 12.0, 8.0, "※軽減税率対象");
    page.text_center(A4_WIDTH_MM / 2.0, 285.0, 8.0, "1 / 1");

    let started = std::time::Instant::now();
    let pdf = doc.finish()?;
    let took = started.elapsed();
    std::fs::write(&path, &pdf)?;
    println!("wrote {path}: {} bytes, finish() took {took:?}", pdf.len());
    Ok(())
}
