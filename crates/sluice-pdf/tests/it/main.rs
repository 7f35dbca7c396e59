//! Black-box tests of sluice-pdf: the PDFs it writes are read back by an
//! independent implementation, poppler's `pdftotext`, which must give back
//! the exact text, Japanese included.

use std::process::Command;

use sluice_pdf::{text_width_mm, Document, PdfError, A4_WIDTH_MM};

/// Text that an invoice puts on a page: kanji, kana, full-width and
/// half-width punctuation, digits, ¥ and ※.
const INVOICE_LINES: &[&str] =
    &["株式会社スルース 御中", "適格請求書", "登録番号 T7000012050002", "合計 ¥1,234,567", "※軽減税率", "（税込）１０％対象：￥９８０"];

/// The text `pdftotext -layout` extracts from `pdf`, or `None` when poppler
/// is missing outside CI.
fn pdftotext(pdf: &[u8]) -> Option<String> {
    poppler("pdftotext", &["-layout", "-enc", "UTF-8"], pdf, &["-"])
}

/// Runs a poppler-utils tool on `pdf` (written to a fresh temp dir) and
/// returns its standard output, or `None` when the tool is missing outside
/// CI. Under CI a missing tool fails the test: CI must not pass while
/// checking nothing.
fn poppler(tool: &str, args_before: &[&str], pdf: &[u8], args_after: &[&str]) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("test.pdf");
    std::fs::write(&path, pdf).expect("write pdf");
    match Command::new(tool).args(args_before).arg(&path).args(args_after).output() {
        Ok(out) => {
            assert!(out.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
            // poppler complains on stderr about fonts and objects it cannot
            // read, even when it still gives an answer: a clean stderr is
            // part of the check.
            assert!(out.stderr.is_empty(), "{tool} warned: {}", String::from_utf8_lossy(&out.stderr));
            Some(String::from_utf8(out.stdout).expect("poppler output is UTF-8"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var_os("CI").is_some_and(|v| v == "true") {
                panic!("{tool} is not installed but CI=true: install poppler-utils (apt-get install -y poppler-utils)");
            }
            eprintln!("NOTICE: {tool} not found (install poppler-utils); skipping this check");
            None
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

fn invoice_pdf() -> Vec<u8> {
    let mut doc = Document::new();
    doc.set_title("適格請求書 INV-2024-0001");
    let page = doc.add_page();
    let mut y = 25.0;
    for line in INVOICE_LINES {
        page.text(20.0, y, 12.0, line);
        y += 10.0;
    }
    page.text_right(A4_WIDTH_MM - 20.0, y, 10.0, "小計 ¥1,122,334");
    // Not a bare "1 / 1": pdftotext -layout drops the spaces of a line made
    // only of one-character words (it takes them for letter-spaced text).
    page.text_center(A4_WIDTH_MM / 2.0, 280.0, 8.0, "ページ 1 / 1");
    page.line(20.0, y + 2.0, A4_WIDTH_MM - 20.0, y + 2.0, 0.5);
    doc.finish().expect("finish")
}

#[test]
fn invoice_text_is_extracted_exactly_by_pdftotext() {
    let pdf = invoice_pdf();
    assert!(pdf.starts_with(b"%PDF-"), "not a PDF header");
    let Some(text) = pdftotext(&pdf) else { return };
    println!("pdftotext -layout output:\n{text}");
    for line in INVOICE_LINES.iter().chain(&["小計 ¥1,122,334", "ページ 1 / 1"]) {
        assert!(text.contains(line), "pdftotext output lacks {line:?}:\n{text}");
    }
}

#[test]
fn only_the_used_glyphs_are_embedded() {
    let pdf = invoice_pdf();
    println!("invoice PDF: {} bytes", pdf.len());
    // The whole font is ~6 MB; a subset of a few dozen glyphs is a few KB.
    assert!(pdf.len() < 200 * 1024, "PDF is {} bytes: the font was not subset", pdf.len());
    assert!(pdf.len() < 60 * 1024, "PDF is {} bytes, more than a one-page invoice should take", pdf.len());
}

#[test]
fn title_is_written_to_document_info() {
    let Some(info) = poppler("pdfinfo", &[], &invoice_pdf(), &[]) else { return };
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_owned();
    assert_eq!(field("Title:"), "適格請求書 INV-2024-0001", "{info}");
    assert_eq!(field("Pages:"), "1", "{info}");
    assert!(field("Page size:").ends_with("(A4)"), "{info}");
}

#[test]
fn output_is_deterministic() {
    assert_eq!(invoice_pdf(), invoice_pdf());
}

#[test]
fn right_aligned_text_ends_at_the_given_x() {
    // Full-width characters of IPAex Gothic are 1 em wide: 10 pt each.
    let w = text_width_mm(10.0, "請求書");
    assert!((w - 30.0 * 25.4 / 72.0).abs() < 0.01, "width {w} mm");
    assert_eq!(text_width_mm(10.0, ""), 0.0);
    // Proportional Latin: a digit is narrower than a kanji.
    assert!(text_width_mm(10.0, "1") < text_width_mm(10.0, "請"));
}

#[test]
fn characters_missing_from_the_font_do_not_fail() {
    let mut doc = Document::new();
    // An emoji, a control character and a private-use character are not in
    // IPAex Gothic: they become .notdef, the rest still extracts.
    doc.add_page().text(20.0, 20.0, 12.0, "請求\u{1F600}書\u{7}\u{E000} OK");
    let pdf = doc.finish().expect("missing glyphs are not an error");
    let Some(text) = pdftotext(&pdf) else { return };
    assert!(text.contains("請求") && text.contains("書") && text.contains("OK"), "{text}");
}

#[test]
fn several_pages_and_an_empty_document() {
    let mut doc = Document::new();
    doc.add_page().text(20.0, 20.0, 12.0, "一頁目");
    doc.add_page().text(20.0, 20.0, 12.0, "二頁目");
    let pdf = doc.finish().expect("finish");
    if let Some(text) = pdftotext(&pdf) {
        let pages: Vec<&str> = text.split('\u{c}').collect();
        assert!(pages[0].contains("一頁目") && pages[1].contains("二頁目"), "{text:?}");
    }

    let empty = Document::new().finish().expect("empty document");
    assert!(empty.starts_with(b"%PDF-"));
    if let Some(text) = pdftotext(&empty) {
        assert!(text.trim().is_empty(), "{text:?}");
    }
}

#[test]
fn non_finite_numbers_are_refused_not_written() {
    let mut doc = Document::new();
    doc.add_page();
    doc.add_page().text(f32::NAN, 20.0, 12.0, "x");
    match doc.finish() {
        Err(PdfError::InvalidNumber { page: 2, what }) => assert_eq!(what, "a text position"),
        other => panic!("expected InvalidNumber on page 2, got {other:?}"),
    }

    let mut doc = Document::new();
    doc.add_page().line(0.0, 0.0, 10.0, 10.0, -1.0);
    assert!(matches!(doc.finish(), Err(PdfError::InvalidNumber { page: 1, what: "a line width" })));
}
