//! The one embedded font (IPAex Gothic) and what the writer needs from it:
//! glyph lookup, advance widths, descriptor metrics and the subset to embed.
//!
//! The font is compiled into the library so that rendering never depends on
//! what happens to be installed on the host (a container image usually has no
//! Japanese font at all). See `fonts/README.md` for its origin and licence.

use std::sync::OnceLock;

use ttf_parser::{name_id, Face, GlyphId};

use crate::PdfError;

/// IPAex Gothic 004.01, unmodified (about 6 MB; only a subset goes into a PDF).
static FONT_DATA: &[u8] = include_bytes!("../fonts/ipaexg.ttf");

/// Used when the font's name table has no readable PostScript name; it is the
/// name IPAex Gothic declares, so the PDF says the same either way.
const FALLBACK_POSTSCRIPT_NAME: &str = "IPAexGothic";

/// The parsed font, shared by every document: parsing the table directory is
/// cheap, but there is no reason to repeat it for each line of text.
static FONT: OnceLock<Result<Font, ttf_parser::FaceParsingError>> = OnceLock::new();

/// A glyph of the original font together with the character it was looked
/// up for, which the ToUnicode map needs to give text extraction back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Glyph {
    /// Glyph id in the full font (0 is `.notdef`).
    pub(crate) id: u16,
    /// The character the caller wrote.
    pub(crate) ch: char,
}

/// The parsed font.
pub(crate) struct Font {
    face: Face<'static>,
    units_per_em: f32,
}

/// The parsed embedded font, or why it cannot be parsed (which would mean a
/// corrupt build: the bytes are a compile-time constant checked by the tests).
pub(crate) fn get() -> Result<&'static Font, PdfError> {
    FONT.get_or_init(|| {
        let face = Face::parse(FONT_DATA, 0)?;
        let units_per_em = f32::from(face.units_per_em());
        Ok(Font { face, units_per_em })
    })
    .as_ref()
    .map_err(|e| PdfError::Font(e.to_string()))
}

impl Font {
    /// The glyphs for `s`, one per character. A character the font lacks gets
    /// `.notdef` (glyph 0): an invoice with one odd character should still
    /// render, and a visible box tells the reader something is missing.
    pub(crate) fn glyphs(&self, s: &str) -> Vec<Glyph> {
        s.chars().map(|ch| Glyph { id: self.face.glyph_index(ch).map_or(0, |g| g.0), ch }).collect()
    }

    /// Advance width of a glyph in PDF glyph space (1/1000 of the font size).
    pub(crate) fn advance(&self, id: u16) -> f32 {
        let units = self.face.glyph_hor_advance(GlyphId(id)).unwrap_or(0);
        self.to_pdf_units(f32::from(units))
    }

    /// Width of a run of glyphs in points at `size_pt`.
    pub(crate) fn width_pt(&self, glyphs: &[Glyph], size_pt: f32) -> f32 {
        glyphs.iter().map(|g| self.advance(g.id)).sum::<f32>() * size_pt / 1000.0
    }

    /// The PostScript name, which (with a subset tag) names the font in the PDF.
    pub(crate) fn postscript_name(&self) -> String {
        self.face
            .names()
            .into_iter()
            .filter(|n| n.name_id == name_id::POST_SCRIPT_NAME)
            .find_map(|n| n.to_string())
            // A PDF name must not contain whitespace or delimiters; the
            // PostScript name never should, but a bad one must not break the file.
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_graphic() && !"()<>[]{}/%#".contains(c)))
            .unwrap_or_else(|| FALLBACK_POSTSCRIPT_NAME.to_owned())
    }

    /// Metrics for the font descriptor, in PDF glyph space.
    pub(crate) fn metrics(&self) -> Metrics {
        let f = &self.face;
        let bbox = f.global_bounding_box();
        let ascent = self.to_pdf_units(f32::from(f.ascender()));
        Metrics {
            bbox: [bbox.x_min, bbox.y_min, bbox.x_max, bbox.y_max].map(|v| self.to_pdf_units(f32::from(v))),
            italic_angle: f.italic_angle(),
            ascent,
            descent: self.to_pdf_units(f32::from(f.descender())),
            cap_height: f.capital_height().map_or(ascent, |h| self.to_pdf_units(f32::from(h))),
            // The font has no stem width; this is the usual estimate from the
            // weight class (the one typst uses), which viewers only use when
            // they must substitute the font.
            stem_v: 10.0 + 0.244 * (f32::from(f.weight().to_number()) - 50.0),
            monospaced: f.is_monospaced(),
        }
    }

    fn to_pdf_units(&self, font_units: f32) -> f32 {
        font_units * 1000.0 / self.units_per_em
    }
}

/// The subset of the font with only `mapper`'s glyphs, renumbered as it says.
pub(crate) fn subset(mapper: &subsetter::GlyphRemapper) -> Result<Vec<u8>, PdfError> {
    subsetter::subset(FONT_DATA, 0, mapper).map_err(|e| PdfError::Subset(e.to_string()))
}

/// Font-wide metrics for the PDF font descriptor.
pub(crate) struct Metrics {
    pub(crate) bbox: [f32; 4],
    pub(crate) italic_angle: f32,
    pub(crate) ascent: f32,
    pub(crate) descent: f32,
    pub(crate) cap_height: f32,
    pub(crate) stem_v: f32,
    pub(crate) monospaced: bool,
}
