//! Opening a log directory: configuration checks, the meta file, and crash
//! recovery of each partition's tail segment.

use crate::format::{
    encode_meta, encode_segment_header, parse_meta, parse_partition_dir_name, parse_segment_file_name, segment_file_name, META_FILE,
    SEGMENT_HEADER_LEN,
};
use crate::segment::scan_segment;
use crate::state::{partition_dir, sync_dir, PartitionState, SegmentInfo};
use crate::writer::{ActiveSegment, SegState};
use crate::{LogConfig, RecoveryReport, TailRepair};
use sluice_core::LogError;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, RwLock};

/// Smallest accepted `segment_bytes`.
pub(crate) const MIN_SEGMENT_BYTES: u64 = 1024;

/// Largest accepted partition count (directory names have four digits).
pub(crate) const MAX_PARTITIONS: u32 = 10_000;

/// A partition as recovered from disk.
pub(crate) struct OpenedPartition {
    pub state: PartitionState,
    pub active: ActiveSegment,
    pub repair: Option<TailRepair>,
}

/// Checks the configuration and the meta file, creating a fresh log if the
/// directory holds none.
pub(crate) fn prepare_dir(cfg: &LogConfig) -> Result<(), LogError> {
    if cfg.partitions == 0 || cfg.partitions > MAX_PARTITIONS {
        return Err(LogError::Config(format!("partitions must be between 1 and {MAX_PARTITIONS}, got {}", cfg.partitions)));
    }
    if cfg.segment_bytes < MIN_SEGMENT_BYTES {
        return Err(LogError::Config(format!("segment_bytes must be at least {MIN_SEGMENT_BYTES}, got {}", cfg.segment_bytes)));
    }
    fs::create_dir_all(&cfg.dir)?;
    let meta_path = cfg.dir.join(META_FILE);
    let mut existing_partitions = Vec::new();
    for entry in fs::read_dir(&cfg.dir)? {
        let entry = entry?;
        if let Some(p) = entry.file_name().to_str().and_then(parse_partition_dir_name) {
            existing_partitions.push(p);
        }
    }
    match fs::read_to_string(&meta_path) {
        Ok(text) => {
            let stored = parse_meta(&text).map_err(|why| LogError::Config(format!("cannot read {}: {why}", meta_path.display())))?;
            if stored != cfg.partitions {
                return Err(LogError::Config(format!(
                    "the log in {} has {stored} partitions but the configuration asks for {}; \
                     the partition count of a log cannot change (records would be routed to other partitions)",
                    cfg.dir.display(),
                    cfg.partitions
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !existing_partitions.is_empty() {
                return Err(LogError::Config(format!(
                    "{} holds partition directories but no {META_FILE}; refusing to guess the partition count",
                    cfg.dir.display()
                )));
            }
            write_meta(&cfg.dir, cfg.partitions)?;
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(p) = existing_partitions.iter().find(|&&p| p >= cfg.partitions) {
        return Err(LogError::Config(format!(
            "{} holds a directory for partition {p} but the log has {} partitions",
            cfg.dir.display(),
            cfg.partitions
        )));
    }
    Ok(())
}

/// Writes the meta file atomically (temporary file, fsync, rename, fsync dir).
fn write_meta(dir: &Path, partitions: u32) -> io::Result<()> {
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(encode_meta(partitions).as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(META_FILE))?;
    sync_dir(dir)
}

/// Opens one partition: lists its segments, repairs the tail segment and
/// opens it for appending.
pub(crate) fn open_partition(cfg: &LogConfig, id: u32) -> Result<OpenedPartition, LogError> {
    let dir = partition_dir(&cfg.dir, id);
    if !dir.is_dir() {
        fs::create_dir_all(&dir)?;
        sync_dir(&cfg.dir)?;
    }
    let mut files: Vec<(u64, u64)> = Vec::new();
    for entry in fs::read_dir(&dir)? {
        let entry = entry?;
        let Some(base) = entry.file_name().to_str().and_then(parse_segment_file_name) else {
            continue; // not ours (editor backups, `.tmp` files): ignored
        };
        files.push((base, entry.metadata()?.len()));
    }
    files.sort_unstable();
    if files.is_empty() {
        // A new partition, or a crash before its first segment was durable.
        let path = dir.join(segment_file_name(0));
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&path)?;
        f.write_all(&encode_segment_header(id, 0))?;
        f.sync_all()?;
        sync_dir(&dir)?;
        files.push((0, SEGMENT_HEADER_LEN));
    }

    let (tail_base, tail_len) = files[files.len() - 1];
    let tail_path = dir.join(segment_file_name(tail_base));
    let scan = scan_segment(&tail_path, id, tail_base, tail_len)?;
    let mut repair = None;
    let (valid_len, scan) = if let Some(why) = &scan.header_problem {
        // A crash while the segment was being created: the file holds no
        // acknowledged record (the header and the first records are written
        // and fsynced together). Rewrite the header, keeping the base offset
        // the file name gives, so offsets stay monotonic.
        tracing::warn!(
            partition = id,
            segment = %tail_path.display(),
            cut_bytes = tail_len,
            at_offset = tail_base,
            "log segment header is torn ({why}); truncating {tail_len} bytes at offset {tail_base} and rewriting the header"
        );
        let mut f = OpenOptions::new().write(true).open(&tail_path)?;
        f.set_len(0)?;
        f.write_all(&encode_segment_header(id, tail_base))?;
        f.sync_all()?;
        repair = Some(TailRepair { partition: id, segment: tail_path.clone(), cut_bytes: tail_len, at_offset: tail_base, reason: why.to_string() });
        (SEGMENT_HEADER_LEN, scan)
    } else {
        if scan.valid_len < tail_len {
            let cut = tail_len - scan.valid_len;
            let why = scan.problem.clone().unwrap_or_else(|| "trailing bytes".into());
            tracing::warn!(
                partition = id,
                segment = %tail_path.display(),
                cut_bytes = cut,
                at_offset = scan.end,
                "torn log tail ({why}); truncating {cut} bytes at offset {}",
                scan.end
            );
            let f = OpenOptions::new().write(true).open(&tail_path)?;
            f.set_len(scan.valid_len)?;
            f.sync_all()?;
            repair = Some(TailRepair { partition: id, segment: tail_path.clone(), cut_bytes: cut, at_offset: scan.end, reason: why });
        }
        (scan.valid_len, scan)
    };

    let mut segments = Vec::with_capacity(files.len());
    for w in files.windows(2) {
        let ((base, len), (next_base, _)) = (w[0], w[1]);
        segments.push(SegmentInfo { base, end: next_base, len, max_ts: None, index: None, last_used: AtomicU64::new(0) });
    }
    segments.push(SegmentInfo {
        base: tail_base,
        end: scan.end,
        len: valid_len,
        max_ts: scan.max_ts,
        index: Some(scan.index),
        last_used: AtomicU64::new(0),
    });
    let file = OpenOptions::new().append(true).open(&tail_path)?;
    let active = ActiveSegment {
        file,
        st: SegState { base: tail_base, len: valid_len, end: scan.end, last_index_pos: scan.last_index_pos, max_ts: scan.max_ts },
    };
    let start = files[0].0;
    let state = PartitionState {
        id,
        dir,
        next: AtomicU64::new(scan.end),
        durable: AtomicU64::new(scan.end),
        start: AtomicU64::new(start),
        segments: RwLock::new(segments),
        tick: AtomicU64::new(1),
        read_hints: Mutex::new(VecDeque::new()),
    };
    Ok(OpenedPartition { state, active, repair })
}

/// Opens every partition, in parallel (recovery reads each tail segment).
pub(crate) fn open_partitions(cfg: &LogConfig) -> Result<(Vec<OpenedPartition>, RecoveryReport), LogError> {
    let results: Vec<Result<OpenedPartition, LogError>> = std::thread::scope(|s| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(cfg.partitions as usize);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || (0..cfg.partitions).filter(|p| *p as usize % threads == t).map(|p| (p, open_partition(cfg, p))).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<(u32, Result<OpenedPartition, LogError>)> = Vec::new();
        for h in handles {
            match h.join() {
                Ok(v) => all.extend(v),
                Err(_) => all.push((u32::MAX, Err(LogError::Io(io::Error::other("log recovery thread panicked"))))),
            }
        }
        all.sort_by_key(|(p, _)| *p);
        all.into_iter().map(|(_, r)| r).collect()
    });
    let mut parts = Vec::with_capacity(results.len());
    let mut report = RecoveryReport::default();
    for r in results {
        let p = r?;
        if let Some(rep) = &p.repair {
            report.truncated_bytes += rep.cut_bytes;
            report.partitions_repaired.push(rep.partition);
            report.repairs.push(rep.clone());
        }
        parts.push(p);
    }
    Ok((parts, report))
}
