//! Byte-level encoding of the log: file names, the meta file, segment headers
//! and records. Everything here is pure (no I/O) so it can be tested alone.
//! `docs/log-format.md` describes the same layout for humans; keep both in
//! step and bump [`FORMAT_VERSION`] on any incompatible change.

/// The first eight bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"SLUICELG";

/// Version of the segment and meta formats written by this crate.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// Size of the segment header in bytes.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 32;

/// Size of a record header in bytes (`crc`, `len`, `offset`, `timestamp`).
pub(crate) const RECORD_HEADER_LEN: u64 = 24;

/// Largest payload one record may carry (64 MiB). Larger appends are refused
/// before anything is written.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// The sparse index holds one entry per this many bytes of segment data.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 64 << 10;

/// Name of the file that records the format version and partition count.
pub(crate) const META_FILE: &str = "meta.json";

/// Directory name of a partition: `p-0000`, `p-0001`, ...
pub(crate) fn partition_dir_name(partition: u32) -> String {
    format!("p-{partition:04}")
}

/// Parses a partition directory name back into its number.
pub(crate) fn parse_partition_dir_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("p-")?;
    if digits.len() < 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// File name of the segment whose first record has offset `base`.
pub(crate) fn segment_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Parses a segment file name (`<20 digits>.log`) back into its base offset.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Encodes the 32-byte segment header.
///
/// ```text
/// 0..8    magic "SLUICELG"
/// 8..12   format version, u32 LE
/// 12..16  partition, u32 LE
/// 16..24  base offset, u64 LE
/// 24..28  reserved, zero
/// 28..32  CRC32 (IEEE) of bytes 0..28, u32 LE
/// ```
pub(crate) fn encode_segment_header(partition: u32, base: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&partition.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Why a segment header or the meta file is unusable. The messages are
/// part of [`sluice_core::LogError::Corrupt`] and [`sluice_core::LogError::Config`]
/// texts, and stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FormatError {
    /// The segment file is shorter than its header.
    #[error("short segment header ({0} of {SEGMENT_HEADER_LEN} bytes)")]
    ShortHeader(usize),
    /// The segment does not start with the magic bytes.
    #[error("bad segment magic")]
    BadMagic,
    /// The segment header's CRC does not match.
    #[error("segment header checksum mismatch")]
    HeaderChecksum,
    /// The segment was written in a format version this build cannot read.
    #[error("unsupported segment format version {0} (this build reads {FORMAT_VERSION})")]
    SegmentVersion(u32),
    /// The segment header names another partition than its directory.
    #[error("segment header names partition {found}, expected {expected}")]
    WrongPartition {
        /// In the header.
        found: u32,
        /// From the directory.
        expected: u32,
    },
    /// The segment header names another base offset than its file name.
    #[error("segment header names base offset {found}, expected {expected}")]
    WrongBase {
        /// In the header.
        found: u64,
        /// From the file name.
        expected: u64,
    },
    /// The meta file is not a flat JSON object.
    #[error("not a JSON object")]
    MetaNotObject,
    /// A meta field is not `"key": value`.
    #[error("malformed field {0:?}")]
    MetaMalformedField(String),
    /// The meta `version` is not a number.
    #[error("bad version {0:?}")]
    MetaBadVersion(String),
    /// The meta `partitions` is not a number.
    #[error("bad partition count {0:?}")]
    MetaBadPartitions(String),
    /// The meta file has a field this build does not know.
    #[error("unknown field {0}")]
    MetaUnknownField(String),
    /// The meta `format` is missing or not `"sluice-log"`.
    #[error("missing or wrong \"format\" (expected \"sluice-log\")")]
    MetaWrongFormat,
    /// The meta file records a format version this build cannot read.
    #[error("unsupported format version {0} (this build reads {FORMAT_VERSION})")]
    MetaVersion(u32),
    /// The meta file has no `version`.
    #[error("missing \"version\"")]
    MetaMissingVersion,
    /// The meta file has no `partitions`.
    #[error("missing \"partitions\"")]
    MetaMissingPartitions,
}

/// Checks a segment header against the partition and base offset the file is
/// expected to hold. The error says what is wrong, for logs and
/// [`sluice_core::LogError::Corrupt`].
pub(crate) fn check_segment_header(h: &[u8], partition: u32, base: u64) -> Result<(), FormatError> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(FormatError::ShortHeader(h.len()));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let crc = u32_at(h, 28);
    if crc != crc32fast::hash(&h[0..28]) {
        return Err(FormatError::HeaderChecksum);
    }
    let version = u32_at(h, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::SegmentVersion(version));
    }
    let p = u32_at(h, 12);
    if p != partition {
        return Err(FormatError::WrongPartition { found: p, expected: partition });
    }
    let b = u64_at(h, 16);
    if b != base {
        return Err(FormatError::WrongBase { found: b, expected: base });
    }
    Ok(())
}

/// Appends one encoded record to `buf`.
///
/// ```text
/// 0..4    CRC32 (IEEE) of bytes 4..24+len, u32 LE
/// 4..8    payload length, u32 LE
/// 8..16   offset, u64 LE
/// 16..24  timestamp (ms since the Unix epoch), i64 LE
/// 24..    payload
/// ```
///
/// The caller has checked `payload.len() <= MAX_PAYLOAD_BYTES`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, offset: u64, timestamp_ms: i64, payload: &[u8]) {
    let start = buf.len();
    let len = u32::try_from(payload.len()).expect("payload length checked against MAX_PAYLOAD_BYTES");
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes one record occupies on disk.
pub(crate) fn record_size(payload_len: usize) -> u64 {
    RECORD_HEADER_LEN + payload_len as u64
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    /// Stored checksum.
    pub crc: u32,
    /// Payload length.
    pub len: u32,
    /// Offset of the record.
    pub offset: u64,
    /// Timestamp in ms.
    pub timestamp_ms: i64,
}

impl RecordHeader {
    /// Decodes the 24 header bytes.
    pub(crate) fn decode(h: &[u8; RECORD_HEADER_LEN as usize]) -> RecordHeader {
        RecordHeader { crc: u32_at(h, 0), len: u32_at(h, 4), offset: u64_at(h, 8), timestamp_ms: i64::from_le_bytes(array8(h, 16)) }
    }

    /// Whether the stored checksum matches the header fields and `payload`.
    pub(crate) fn checksum_ok(&self, raw: &[u8; RECORD_HEADER_LEN as usize], payload: &[u8]) -> bool {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&raw[4..]);
        hasher.update(payload);
        hasher.finalize() == self.crc
    }
}

/// Text of the meta file for a log with `partitions` partitions.
pub(crate) fn encode_meta(partitions: u32) -> String {
    format!("{{\"format\": \"sluice-log\", \"version\": {FORMAT_VERSION}, \"partitions\": {partitions}}}\n")
}

/// Parses the meta file and returns the partition count it records.
///
/// Only the flat object written by [`encode_meta`] is accepted (whitespace
/// may differ); anything else is an error with a reason.
pub(crate) fn parse_meta(text: &str) -> Result<u32, FormatError> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let body = compact.strip_prefix('{').and_then(|s| s.strip_suffix('}')).ok_or(FormatError::MetaNotObject)?;
    let mut format = None;
    let mut version = None;
    let mut partitions = None;
    for field in body.split(',') {
        let (key, value) = field.split_once(':').ok_or_else(|| FormatError::MetaMalformedField(field.to_owned()))?;
        match key {
            "\"format\"" => format = Some(value.to_owned()),
            "\"version\"" => version = Some(value.parse::<u32>().map_err(|_| FormatError::MetaBadVersion(value.to_owned()))?),
            "\"partitions\"" => partitions = Some(value.parse::<u32>().map_err(|_| FormatError::MetaBadPartitions(value.to_owned()))?),
            other => return Err(FormatError::MetaUnknownField(other.to_owned())),
        }
    }
    if format.as_deref() != Some("\"sluice-log\"") {
        return Err(FormatError::MetaWrongFormat);
    }
    match version {
        Some(FORMAT_VERSION) => {}
        Some(v) => return Err(FormatError::MetaVersion(v)),
        None => return Err(FormatError::MetaMissingVersion),
    }
    partitions.ok_or(FormatError::MetaMissingPartitions)
}

fn array8(b: &[u8], at: usize) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    a
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array8(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(0), "00000000000000000000.log");
        assert_eq!(segment_file_name(1234), "00000000000000001234.log");
        assert_eq!(parse_segment_file_name("00000000000000001234.log"), Some(1234));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("1234.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000123x.log"), None);
        assert_eq!(parse_segment_file_name("00000000000000001234.log.tmp"), None);
        assert_eq!(partition_dir_name(7), "p-0007");
        assert_eq!(parse_partition_dir_name("p-0007"), Some(7));
        assert_eq!(parse_partition_dir_name("p-12345"), Some(12345));
        assert_eq!(parse_partition_dir_name("p-7"), None);
        assert_eq!(parse_partition_dir_name("q-0007"), None);
    }

    #[test]
    fn segment_header_round_trip_and_checks() {
        let h = encode_segment_header(3, 4096);
        assert_eq!(&h[0..8], b"SLUICELG");
        assert!(check_segment_header(&h, 3, 4096).is_ok());
        assert!(check_segment_header(&h, 2, 4096).unwrap_err().to_string().contains("partition 3"));
        assert!(check_segment_header(&h, 3, 0).unwrap_err().to_string().contains("base offset 4096"));
        assert!(check_segment_header(&h[..31], 3, 4096).unwrap_err().to_string().contains("short"));
        let mut bad = h;
        bad[17] ^= 1;
        assert!(check_segment_header(&bad, 3, 4096).unwrap_err().to_string().contains("checksum"));
        let mut bad = h;
        bad[0] = b'X';
        assert!(check_segment_header(&bad, 3, 4096).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn record_layout_is_as_documented() {
        let mut buf = vec![0xAA];
        encode_record(&mut buf, 0x0102_0304_0506_0708, -5, b"hey");
        let rec = &buf[1..];
        assert_eq!(rec.len(), 24 + 3);
        assert_eq!(&rec[4..8], &3u32.to_le_bytes());
        assert_eq!(&rec[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&rec[16..24], &(-5i64).to_le_bytes());
        assert_eq!(&rec[24..], b"hey");
        assert_eq!(&rec[0..4], &crc32fast::hash(&rec[4..]).to_le_bytes());
        let raw: [u8; 24] = rec[..24].try_into().unwrap();
        let h = RecordHeader::decode(&raw);
        assert_eq!(h.len, 3);
        assert_eq!(h.offset, 0x0102_0304_0506_0708);
        assert_eq!(h.timestamp_ms, -5);
        assert!(h.checksum_ok(&raw, b"hey"));
        assert!(!h.checksum_ok(&raw, b"hez"));
    }

    #[test]
    fn meta_round_trip_and_errors() {
        assert_eq!(parse_meta(&encode_meta(8)), Ok(8));
        assert_eq!(parse_meta("{ \"partitions\": 2, \"version\": 1, \"format\": \"sluice-log\" }"), Ok(2));
        assert!(parse_meta("{\"format\": \"sluice-log\", \"version\": 2, \"partitions\": 8}").unwrap_err().to_string().contains("version 2"));
        assert!(parse_meta("{\"format\": \"sluice-log\", \"version\": 1}").is_err());
        assert!(parse_meta("partitions=8").is_err());
        assert!(parse_meta("{\"format\": \"x\", \"version\": 1, \"partitions\": 8}").is_err());
        assert!(parse_meta("{\"format\": \"sluice-log\", \"version\": 1, \"partitions\": 8, \"y\": 1}").is_err());
    }
}
