//! Small PDF documents (A4 portrait pages of positioned text and lines) with
//! correctly embedded Japanese text, written in-process.
//!
//! Invoices must render as PDF without an external service or a headless
//! browser, and Japanese invoices (適格請求書) must both look right and give
//! back their exact text when a reader or an accounting tool extracts it.
//!
//! ```
//! let mut doc = sluice_pdf::Document::new();
//! doc.set_title("請求書 INV-0001");
//! let page = doc.add_page();
//! page.text(20.0, 30.0, 18.0, "請求書");
//! page.text_right(190.0, 30.0, 10.0, "合計 ¥1,234,567");
//! page.line(20.0, 33.0, 190.0, 33.0, 0.5);
//! let pdf = doc.finish()?;
//! assert!(pdf.starts_with(b"%PDF-"));
//! # Ok::<(), sluice_pdf::PdfError>(())
//! ```
//!
//! # Why pdf-writer and not a higher-level crate
//!
//! This is written on `pdf-writer` (typst's low-level object writer),
//! `subsetter` (typst's font subsetter) and `ttf-parser`: four small crates
//! in all, with flate2. The font part (a subset CID font with widths and a
//! `/ToUnicode` map) is the only hard part of the job and is about a hundred
//! lines here. The higher-level crates weighed were `krilla` (typst's own
//! high-level crate on the same foundations, which does this right, but
//! needs Rust 1.92 where the workspace's minimum is 1.89, and brings a
//! shaping stack and image decoders by default) and `printpdf` (whose current
//! versions bring azul's layout engine and fontconfig for their text
//! features). An invoice is a page of positioned lines and needs neither.
//!
//! # What is in a file
//!
//! One font, IPAex Gothic (see `fonts/README.md`), embedded as a Type0 font
//! with `Identity-H` encoding over a CIDFontType2 descendant whose CIDs are
//! the glyph ids of a subset holding only the glyphs the document uses
//! (`CIDToGIDMap /Identity`), with a `/W` array of their advance widths and
//! a `/ToUnicode` CMap from each glyph back to its character. Content
//! streams, the CMap and the font program are Flate-compressed. The output
//! is deterministic: the same calls give the same bytes (there is no
//! creation date), which keeps golden tests and content hashes stable.
//!
//! # What it does not do
//!
//! - No shaping: each character is one glyph found through the font's cmap,
//!   laid out by its advance width, without kerning, ligatures, vertical
//!   text or right-to-left text. That is right for Japanese and Latin
//!   invoice text, digits, punctuation and full-width forms.
//! - No line wrapping, pagination or tables: the caller places each line
//!   (use [`text_width_mm`] to measure).
//! - A character the font lacks is drawn as the font's `.notdef` glyph; it
//!   is never an error. When two characters share one glyph, text
//!   extraction gives back the first of them the document used.
//! - One font, one weight, black on white.

mod font;

use std::io::Write as _;

use flate2::write::ZlibEncoder;
use flate2::Compression;
use pdf_writer::types::{CidFontType, FontFlags, SystemInfo, UnicodeCmap};
use pdf_writer::{Content, Filter, Finish as _, Name, Pdf, Rect, Ref, Str, TextStr};

use crate::font::{Font, Glyph};

/// Width of an A4 page in millimetres.
pub const A4_WIDTH_MM: f32 = 210.0;
/// Height of an A4 page in millimetres.
pub const A4_HEIGHT_MM: f32 = 297.0;

const PT_PER_MM: f32 = 72.0 / 25.4;
const PAGE_WIDTH_PT: f32 = A4_WIDTH_MM * PT_PER_MM;
const PAGE_HEIGHT_PT: f32 = A4_HEIGHT_MM * PT_PER_MM;

/// The resource name of the one font on every page.
const FONT_RESOURCE: Name<'static> = Name(b"F1");

/// Character collection of an `Identity` CID font: CIDs mean nothing beyond
/// "glyph id of the embedded program".
const IDENTITY: SystemInfo<'static> = SystemInfo { registry: Str(b"Adobe"), ordering: Str(b"Identity"), supplement: 0 };

/// Why a PDF could not be written. None of these is the reader's fault: they
/// are either a caller bug (a non-finite number) or a broken build.
#[derive(Debug, thiserror::Error)]
pub enum PdfError {
    /// The embedded font cannot be parsed. The font is a compile-time
    /// constant covered by the tests, so this means a corrupt build.
    #[error("the embedded font cannot be read: {0}")]
    Font(String),
    /// The font subsetter failed on the glyphs the document uses.
    #[error("cannot subset the embedded font: {0}")]
    Subset(String),
    /// A position, size or line width was NaN, infinite or negative; the
    /// item was left out, and the document is refused rather than written
    /// with something missing.
    #[error("page {page}: {what} is not a finite non-negative number")]
    InvalidNumber {
        /// 1-based page number.
        page: usize,
        /// Which argument was wrong.
        what: &'static str,
    },
    /// Compressing a stream failed.
    #[error("cannot compress a PDF stream: {0}")]
    Compress(#[from] std::io::Error),
}

sluice_core::error_codes!(PdfError { Font => "pdf.font", Subset => "pdf.subset", InvalidNumber => "pdf.invalid_number", Compress => "pdf.compress" });

/// A PDF document of A4 portrait pages. Build it with [`Document::add_page`]
/// and the [`Page`] methods, then [`Document::finish`] it into bytes.
#[derive(Debug, Default)]
pub struct Document {
    pages: Vec<Page>,
    title: Option<String>,
}

impl Document {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the document title (the `/Title` of the document information,
    /// which viewers show instead of the file name).
    pub fn set_title(&mut self, title: impl Into<String>) -> &mut Self {
        self.title = Some(title.into());
        self
    }

    /// Appends a blank A4 portrait page and returns it for drawing.
    pub fn add_page(&mut self) -> &mut Page {
        let index = self.pages.len();
        self.pages.push(Page::default());
        &mut self.pages[index]
    }

    /// Writes the PDF. A document without pages gets one blank page, since a
    /// PDF without pages is not one that viewers open.
    ///
    /// This is CPU work (subsetting and compressing, a few milliseconds for a
    /// page): from async code, call it inside `spawn_blocking`.
    pub fn finish(mut self) -> Result<Vec<u8>, PdfError> {
        let font = font::get()?;
        for (i, page) in self.pages.iter().enumerate() {
            if let Some(what) = page.invalid {
                return Err(PdfError::InvalidNumber { page: i + 1, what });
            }
        }
        if self.pages.is_empty() {
            self.pages.push(Page::default());
        }

        let mut glyphs = GlyphSet::new();
        let contents: Vec<Vec<u8>> = self.pages.iter().map(|page| page.content(font, &mut glyphs)).collect();

        let mut ids = Ref::new(1);
        let catalog_id = ids.bump();
        let page_tree_id = ids.bump();
        let info_id = ids.bump();
        let type0_id = ids.bump();
        let cid_font_id = ids.bump();
        let descriptor_id = ids.bump();
        let to_unicode_id = ids.bump();
        let font_file_id = ids.bump();
        let page_ids: Vec<(Ref, Ref)> = contents.iter().map(|_| (ids.bump(), ids.bump())).collect();

        let mut pdf = Pdf::new();
        let mut catalog = pdf.catalog(catalog_id);
        catalog.pages(page_tree_id);
        if self.title.is_some() {
            catalog.viewer_preferences().display_doc_title(true);
        }
        catalog.finish();

        let mut info = pdf.document_info(info_id);
        if let Some(title) = &self.title {
            info.title(TextStr(title));
        }
        info.producer(TextStr("Sluice"));
        info.finish();

        pdf.pages(page_tree_id).kids(page_ids.iter().map(|(page, _)| *page)).count(page_ids.len() as i32);

        // A subset font must be named with a tag of six capital letters that
        // differs between different subsets (ISO 32000-1, 9.6.4).
        let base_font = format!("{}+{}", subset_tag(&glyphs.mapper), font.postscript_name());
        let base_font = Name(base_font.as_bytes());

        pdf.type0_font(type0_id).base_font(base_font).encoding_predefined(Name(b"Identity-H")).descendant_font(cid_font_id).to_unicode(to_unicode_id);

        let mut cid_font = pdf.cid_font(cid_font_id);
        cid_font
            .subtype(CidFontType::Type2)
            .base_font(base_font)
            .system_info(IDENTITY)
            .font_descriptor(descriptor_id)
            .cid_to_gid_map_predefined(Name(b"Identity"));
        cid_font.widths().consecutive(0, glyphs.mapper.remapped_gids().map(|old| font.advance(old)));
        cid_font.finish();

        let m = font.metrics();
        let mut flags = FontFlags::SYMBOLIC;
        flags.set(FontFlags::FIXED_PITCH, m.monospaced);
        let [x0, y0, x1, y1] = m.bbox;
        pdf.font_descriptor(descriptor_id)
            .name(base_font)
            .flags(flags)
            .bbox(Rect::new(x0, y0, x1, y1))
            .italic_angle(m.italic_angle)
            .ascent(m.ascent)
            .descent(m.descent)
            .cap_height(m.cap_height)
            .stem_v(m.stem_v)
            .font_file2(font_file_id);

        // The font program: the subset, with its uncompressed size as
        // /Length1, which the spec requires for embedded TrueType.
        let program = font::subset(&glyphs.mapper)?;
        let compressed = deflate(&program)?;
        pdf.stream(font_file_id, &compressed).filter(Filter::FlateDecode).pair(Name(b"Length1"), program.len() as i32);

        let mut to_unicode = UnicodeCmap::new(Name(b"Adobe-Identity-UCS"), IDENTITY);
        for (new_id, ch) in glyphs.unicode.iter().enumerate() {
            if let (Some(ch), Ok(new_id)) = (ch, u16::try_from(new_id)) {
                to_unicode.pair(new_id, *ch);
            }
        }
        pdf.cmap(to_unicode_id, &deflate(&to_unicode.finish())?).filter(Filter::FlateDecode);

        for ((page_id, content_id), content) in page_ids.iter().zip(&contents) {
            let mut page = pdf.page(*page_id);
            page.media_box(Rect::new(0.0, 0.0, PAGE_WIDTH_PT, PAGE_HEIGHT_PT)).parent(page_tree_id).contents(*content_id);
            page.resources().fonts().pair(FONT_RESOURCE, type0_id);
            page.finish();
            pdf.stream(*content_id, &deflate(content)?).filter(Filter::FlateDecode);
        }

        Ok(pdf.finish())
    }
}

/// The glyphs a document uses, renumbered 0..n in order of first use so the
/// subset is dense; content streams and the /W array use the new ids, which
/// are also the CIDs (Identity-H, CIDToGIDMap /Identity).
struct GlyphSet {
    mapper: subsetter::GlyphRemapper,
    /// The first character seen for each new glyph id, for /ToUnicode.
    unicode: Vec<Option<char>>,
}

impl GlyphSet {
    fn new() -> Self {
        // The remapper starts with .notdef as new glyph 0.
        Self { mapper: subsetter::GlyphRemapper::new(), unicode: vec![None] }
    }

    /// The new id of `g`, adding it to the subset on first use.
    fn add(&mut self, g: Glyph) -> u16 {
        let new = self.mapper.remap(g.id);
        let index = usize::from(new);
        if index >= self.unicode.len() {
            self.unicode.resize(index + 1, None);
        }
        // .notdef stands for every missing character, so it maps to none.
        if g.id != 0 && self.unicode[index].is_none() {
            self.unicode[index] = Some(g.ch);
        }
        new
    }
}

/// One page: text and lines at positions in millimetres, measured from the
/// top-left corner of the page (so `y` grows downwards, as on paper).
#[derive(Debug, Default)]
pub struct Page {
    items: Vec<Item>,
    /// The first invalid argument, reported by [`Document::finish`].
    invalid: Option<&'static str>,
}

#[derive(Debug)]
enum Item {
    Text { x_mm: f32, y_mm: f32, size_pt: f32, align: Align, text: String },
    Line { x1_mm: f32, y1_mm: f32, x2_mm: f32, y2_mm: f32, width_pt: f32 },
}

#[derive(Debug, Clone, Copy)]
enum Align {
    Left,
    Center,
    Right,
}

impl Page {
    /// Draws `s` on one line starting at `x_mm`, with its baseline at `y_mm`
    /// from the top of the page, in a font of `size_pt` points.
    pub fn text(&mut self, x_mm: f32, y_mm: f32, size_pt: f32, s: &str) {
        self.push_text(x_mm, y_mm, size_pt, Align::Left, s);
    }

    /// Like [`Page::text`], but the text ends at `right_x_mm` (for amounts in
    /// a column).
    pub fn text_right(&mut self, right_x_mm: f32, y_mm: f32, size_pt: f32, s: &str) {
        self.push_text(right_x_mm, y_mm, size_pt, Align::Right, s);
    }

    /// Like [`Page::text`], but the text is centred on `center_x_mm`.
    pub fn text_center(&mut self, center_x_mm: f32, y_mm: f32, size_pt: f32, s: &str) {
        self.push_text(center_x_mm, y_mm, size_pt, Align::Center, s);
    }

    /// Draws a straight black line from (`x1_mm`, `y1_mm`) to (`x2_mm`,
    /// `y2_mm`), measured from the top-left corner, `width_pt` points thick.
    pub fn line(&mut self, x1_mm: f32, y1_mm: f32, x2_mm: f32, y2_mm: f32, width_pt: f32) {
        if !valid_numbers(&[x1_mm, y1_mm, x2_mm, y2_mm]) {
            self.invalid.get_or_insert("a line position");
        } else if !valid_numbers(&[width_pt]) || width_pt < 0.0 {
            self.invalid.get_or_insert("a line width");
        } else {
            self.items.push(Item::Line { x1_mm, y1_mm, x2_mm, y2_mm, width_pt });
        }
    }

    fn push_text(&mut self, x_mm: f32, y_mm: f32, size_pt: f32, align: Align, s: &str) {
        if !valid_numbers(&[x_mm, y_mm]) {
            self.invalid.get_or_insert("a text position");
        } else if !valid_numbers(&[size_pt]) || size_pt < 0.0 {
            self.invalid.get_or_insert("a font size");
        } else if !s.is_empty() {
            self.items.push(Item::Text { x_mm, y_mm, size_pt, align, text: s.to_owned() });
        }
    }

    /// The page's content stream, adding the glyphs it uses to `glyphs`.
    fn content(&self, font: &Font, glyphs: &mut GlyphSet) -> Vec<u8> {
        let mut content = Content::new();
        for item in &self.items {
            match item {
                Item::Text { x_mm, y_mm, size_pt, align, text } => {
                    let run = font.glyphs(text);
                    let shift = match align {
                        Align::Left => 0.0,
                        Align::Center => font.width_pt(&run, *size_pt) / 2.0,
                        Align::Right => font.width_pt(&run, *size_pt),
                    };
                    // Identity-H: each glyph is its two-byte big-endian CID.
                    let encoded: Vec<u8> = run.iter().flat_map(|g| glyphs.add(*g).to_be_bytes()).collect();
                    content
                        .begin_text()
                        .set_font(FONT_RESOURCE, *size_pt)
                        .set_text_matrix([1.0, 0.0, 0.0, 1.0, x_mm * PT_PER_MM - shift, to_pdf_y(*y_mm)])
                        .show(Str(&encoded))
                        .end_text();
                }
                Item::Line { x1_mm, y1_mm, x2_mm, y2_mm, width_pt } => {
                    content
                        .set_line_width(*width_pt)
                        .move_to(x1_mm * PT_PER_MM, to_pdf_y(*y1_mm))
                        .line_to(x2_mm * PT_PER_MM, to_pdf_y(*y2_mm))
                        .stroke();
                }
            }
        }
        content.finish().into_vec()
    }
}

/// The width of `s` in millimetres when drawn at `size_pt` points, as
/// [`Page::text`] lays it out (for right-aligning, centring or wrapping).
pub fn text_width_mm(size_pt: f32, s: &str) -> f32 {
    // The font parses or finish() reports the failure; a width of 0 in the
    // meantime cannot end up in a written file.
    font::get().map_or(0.0, |font| font.width_pt(&font.glyphs(s), size_pt) / PT_PER_MM)
}

fn valid_numbers(values: &[f32]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// A distance from the top of the page in millimetres, as PDF's y (points
/// from the bottom).
fn to_pdf_y(y_mm: f32) -> f32 {
    PAGE_HEIGHT_PT - y_mm * PT_PER_MM
}

/// Six capital letters derived from the set of glyphs, so that two different
/// subsets of the same font in one viewer (say, two invoices open at once)
/// never share a name and get each other's glyphs.
fn subset_tag(mapper: &subsetter::GlyphRemapper) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for gid in mapper.remapped_gids() {
        for byte in gid.to_be_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    (0..6)
        .map(|_| {
            let letter = b'A' + (hash % 26) as u8;
            hash /= 26;
            char::from(letter)
        })
        .collect()
}

/// zlib-compresses a stream for `/Filter /FlateDecode`.
fn deflate(data: &[u8]) -> Result<Vec<u8>, PdfError> {
    let mut encoder = ZlibEncoder::new(Vec::with_capacity(data.len() / 2), Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}
