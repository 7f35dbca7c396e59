//! Occurrence numbers of repeated rows, in bounded memory.
//!
//! The id of an import row without `id` hashes its content and `n`, the
//! number of earlier rows of the file with the same content (see
//! [`crate::import`]). Most rows are unique (`n` = 0); only contents that
//! occur more than once need counting. A counter per content in memory
//! would grow with the file: a 1 GiB file whose rows each appear twice has
//! about 11 million repeated contents, close to 1 GB of hash tables. So:
//!
//! 1. **Pass 1** (while validating) puts every content into a Bloom filter
//!    `seen`; a content `seen` may have had before also goes into a second
//!    filter, `twice`. Every content that really occurs twice is in `twice`
//!    (no false negatives); a few unique ones are too (false positives).
//! 2. **Numbering.** When pass 1 found few possible repeats (at most
//!    [`MEMORY_HITS`], the usual case), pass 2 simply counts the candidates
//!    (contents in `twice`) in memory. Otherwise a numbering pass reads the
//!    spool once and writes the content of every row in `twice` (a
//!    *candidate*) to one of K bucket files, chosen by the content hash, so
//!    equal contents share a bucket. Each bucket is then read in file order
//!    with a counter per content in memory (a bucket holds at most about
//!    2¹⁸ candidate rows, about 10–20 MiB of counters), and its `n`s are
//!    written to a second file, in the same order.
//! 3. **Pass 2** reads, for each candidate row, the next `n` of its
//!    bucket. Rows that are not candidates are unique: `n` = 0.
//!
//! A false positive costs 36 bytes of disk and a little time, never memory
//! or a wrong id: a unique content gets `n` = 0 from its bucket too. The
//! filters take at most 16 MiB each.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Up to this many possible repeats, candidates are counted in memory
/// (at most a few MiB of counters).
const MEMORY_HITS: u64 = 1 << 16;
/// Candidate rows per bucket the number of buckets is chosen for.
const BUCKET_ROWS: u64 = 1 << 18;
/// Most buckets (open files while numbering).
const MAX_BUCKETS: u64 = 256;

/// A blocked Bloom filter over row contents (SHA-256 hashes).
pub(crate) struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    /// A filter for a file of `file_bytes`: half as many bits as the file
    /// has bytes (about 25 bits per row of 50 bytes, 0.005 % false
    /// positives), at least 64 Kibit, at most 16 MiB.
    pub(crate) fn for_bytes(file_bytes: u64) -> Bloom {
        let bits = (file_bytes / 2).clamp(1 << 16, 1 << 27);
        Bloom { bits: vec![0; (bits / 512 + 1) as usize * 8] }
    }

    /// The 7 bits of a content: all in one 512-bit block (one cache line).
    fn bits(&self, h: &[u8; 32]) -> impl Iterator<Item = (usize, u64)> {
        let blocks = (self.bits.len() / 8) as u64;
        let block = (u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8])) % blocks) as usize * 8;
        let mut x = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8]));
        (0..7).map(move |_| {
            let bit = (x & 511) as usize;
            x >>= 9;
            (block + bit / 64, 1u64 << (bit % 64))
        })
    }

    /// Inserts; returns true if it may have been there already.
    pub(crate) fn insert(&mut self, h: &[u8; 32]) -> bool {
        let mut present = true;
        for (w, m) in self.bits(h) {
            present &= self.bits[w] & m != 0;
            self.bits[w] |= m;
        }
        present
    }

    /// True if `h` may have been inserted.
    pub(crate) fn contains(&self, h: &[u8; 32]) -> bool {
        self.bits(h).all(|(w, m)| self.bits[w] & m != 0)
    }
}

/// Pass 1's side: finds the contents that may repeat.
pub(crate) struct RepeatFinder {
    seen: Bloom,
    twice: Bloom,
    hits: u64,
}

impl RepeatFinder {
    /// A finder for a file of `file_bytes`.
    pub(crate) fn for_bytes(file_bytes: u64) -> RepeatFinder {
        RepeatFinder { seen: Bloom::for_bytes(file_bytes), twice: Bloom::for_bytes(file_bytes), hits: 0 }
    }

    /// Adds the content of a row without `id`.
    pub(crate) fn add(&mut self, content: &[u8; 32]) {
        if self.seen.insert(content) {
            self.twice.insert(content);
            self.hits += 1;
        }
    }

    /// Done with pass 1 (frees the `seen` filter).
    pub(crate) fn finish(self) -> Repeats {
        Repeats { twice: self.twice, hits: self.hits }
    }
}

/// The contents that may repeat.
pub(crate) struct Repeats {
    twice: Bloom,
    /// Rows whose content pass 1 may have seen before.
    hits: u64,
}

impl Repeats {
    /// True when the candidates are few enough to count in memory in pass
    /// 2 ([`Occurrences::in_memory`]); otherwise [`Repeats::number`] them.
    pub(crate) fn few(&self) -> bool {
        self.hits <= MEMORY_HITS
    }

    /// True if rows of this content need an occurrence number.
    pub(crate) fn candidate(&self, content: &[u8; 32]) -> bool {
        self.hits > 0 && self.twice.contains(content)
    }

    fn buckets(&self) -> u64 {
        (self.hits.saturating_mul(2) / BUCKET_ROWS + 1).min(MAX_BUCKETS)
    }

    /// Numbers the candidates. `contents` yields the content of every row
    /// without `id`, in file order; bucket files go to `dir` (created, and
    /// removed when the [`Occurrences`] are dropped).
    pub(crate) fn number(&self, dir: &Path, contents: impl Iterator<Item = io::Result<[u8; 32]>>, cancel: &AtomicBool) -> io::Result<Occurrences> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        // From here on, the directory goes whatever happens.
        let mut occ = Occurrences { dir: Some(dir.to_path_buf()), buckets: self.buckets(), readers: Vec::new(), counts: HashMap::new() };
        let input = |k: u64| dir.join(format!("{k}.in"));
        let output = |k: u64| dir.join(format!("{k}.n"));
        let mut writers =
            (0..occ.buckets).map(|k| File::create(input(k)).map(|f| BufWriter::with_capacity(32 << 10, f))).collect::<io::Result<Vec<_>>>()?;
        for (i, c) in contents.enumerate() {
            let c = c?;
            if self.candidate(&c) {
                writers[occ.bucket(&c)].write_all(&c)?;
            }
            if i % 65_536 == 0 && cancel.load(Ordering::Acquire) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
        }
        for w in writers {
            w.into_inner().map_err(|e| e.into_error())?;
        }
        for k in 0..occ.buckets {
            let mut r = BufReader::with_capacity(64 << 10, File::open(input(k))?);
            let mut w = BufWriter::with_capacity(64 << 10, File::create(output(k))?);
            let mut counts: HashMap<[u8; 32], u32> = HashMap::new();
            let mut c = [0u8; 32];
            loop {
                match r.read_exact(&mut c) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
                let n = counts.entry(c).or_insert(0);
                w.write_all(&n.to_le_bytes())?;
                *n += 1;
            }
            w.flush()?;
            drop(r);
            std::fs::remove_file(input(k))?;
            if cancel.load(Ordering::Acquire) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
        }
        occ.readers =
            (0..occ.buckets).map(|k| File::open(output(k)).map(|f| BufReader::with_capacity(16 << 10, f))).collect::<io::Result<Vec<_>>>()?;
        Ok(occ)
    }
}

/// The occurrence numbers of the candidates, read in file order: counted
/// in memory as the rows come, or read from the bucket files.
pub(crate) struct Occurrences {
    /// The bucket files' directory (none: counted in memory).
    dir: Option<PathBuf>,
    buckets: u64,
    readers: Vec<BufReader<File>>,
    counts: HashMap<[u8; 32], u32>,
}

impl Occurrences {
    /// Counting in memory (for [`Repeats::few`] candidates).
    pub(crate) fn in_memory() -> Occurrences {
        Occurrences { dir: None, buckets: 1, readers: Vec::new(), counts: HashMap::new() }
    }

    fn bucket(&self, c: &[u8; 32]) -> usize {
        // Bytes the Bloom filter does not use, so buckets and filter
        // positions are independent.
        (u32::from_le_bytes(c[16..20].try_into().unwrap_or([0; 4])) as u64 % self.buckets) as usize
    }

    /// The occurrence number of the next candidate row, whose content is `c`.
    pub(crate) fn next(&mut self, c: &[u8; 32]) -> io::Result<u32> {
        if self.dir.is_none() {
            let n = self.counts.entry(*c).or_insert(0);
            *n += 1;
            return Ok(*n - 1);
        }
        let k = self.bucket(c);
        let mut b = [0u8; 4];
        self.readers[k].read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl Drop for Occurrences {
    fn drop(&mut self) {
        self.readers.clear();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sha2::{Digest, Sha256};

    use super::*;

    fn content(i: u64) -> [u8; 32] {
        Sha256::digest(i.to_le_bytes()).into()
    }

    #[test]
    fn the_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::for_bytes(1 << 20);
        for i in 0..20_000 {
            b.insert(&content(i));
        }
        assert!((0..20_000).all(|i| b.contains(&content(i)) && b.insert(&content(i))));
        let fp = (20_000..40_000).filter(|&i| b.contains(&content(i))).count();
        assert!(fp < 1000, "{fp} false positives of 20,000");
    }

    /// Numbers a file's contents the bounded way and the obvious way (a
    /// counter per content) and compares them, for a small filter (many
    /// false positives, several buckets) and a large one.
    fn check(rows: &[u64], file_bytes: u64) {
        let mut f = RepeatFinder::for_bytes(file_bytes);
        for &r in rows {
            f.add(&content(r));
        }
        let repeats = f.finish();
        let dir = tempfile::tempdir().unwrap();
        let occ_dir = dir.path().join("occ");
        let mut occ = if repeats.few() {
            Occurrences::in_memory()
        } else {
            repeats.number(&occ_dir, rows.iter().map(|&r| Ok(content(r))), &AtomicBool::new(false)).unwrap()
        };
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for (i, &r) in rows.iter().enumerate() {
            let want = {
                let n = counts.entry(r).or_insert(0);
                *n += 1;
                *n - 1
            };
            if want > 0 {
                assert!(repeats.candidate(&content(r)), "row {i}: a repeat is always a candidate");
            }
            let got = if repeats.candidate(&content(r)) { occ.next(&content(r)).unwrap() } else { 0 };
            assert_eq!(got, want, "row {i} (content {r})");
        }
        drop(occ);
        assert!(!occ_dir.exists(), "the bucket files are removed");
    }

    #[test]
    fn occurrence_numbers_match_a_counter_per_content() {
        // 300,000 rows, a third of them repeats, in a scrambled order.
        let rows: Vec<u64> = (0..300_000u64).map(|i| (i.wrapping_mul(0x9E37_79B9) % 200_000) ^ (i % 3)).collect();
        check(&rows, 1 << 14); // the smallest filter: many false positives
        check(&rows, 1 << 30);
        let repeats = {
            let mut f = RepeatFinder::for_bytes(1 << 14);
            rows.iter().for_each(|&r| f.add(&content(r)));
            f.finish()
        };
        assert!(!repeats.few() && repeats.buckets() > 1, "several buckets on disk are exercised");
        // Few repeats: counted in memory.
        let few: Vec<u64> = (0..50_000u64).map(|i| if i % 1000 == 999 { i - 500 } else { i }).collect();
        check(&few, 1 << 30);
    }

    #[test]
    fn a_file_without_repeats_has_few_candidates() {
        let mut f = RepeatFinder::for_bytes(50 << 20);
        (0..1_000_000).for_each(|i| f.add(&content(i)));
        let r = f.finish();
        assert!(r.few() && r.hits < 100, "{} possible repeats", r.hits);
    }
}
