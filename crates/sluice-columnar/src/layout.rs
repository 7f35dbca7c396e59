//! Where lake files live.
//!
//! ```text
//! <lake>/workspace=<name>/content_type=<type>/year=YYYY/month=MM/day=DD/hour=HH/<uuid v7>.parquet
//! <lake>/_tmp/…        files being written (never read; removed on start)
//! <lake>/exports/…     outputs of saved queries
//! ```
//!
//! Partitions are by the event's `timestamp` in UTC (not the workspace time
//! zone: UTC partitions never overlap or repeat at DST changes). Partition
//! values are written as Hive does: characters outside `A-Z a-z 0-9 _ . -`
//! and space are escaped as `%XX` (event types from Segment can contain
//! spaces and other characters; `/` and `=` must not reach a path).

use std::path::Path;

use chrono::{DateTime, Datelike, Timelike, Utc};

/// Escapes a partition value.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b' ') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The partition values of an hour: `(year, month, day, hour)` as written in paths.
pub fn hour_values(hour: DateTime<Utc>) -> [String; 4] {
    [format!("{:04}", hour.year()), format!("{:02}", hour.month()), format!("{:02}", hour.day()), format!("{:02}", hour.hour())]
}

/// Start of the UTC hour of `t`.
pub fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    let us = t.timestamp_micros();
    let h = us.div_euclid(3_600_000_000) * 3_600_000_000;
    DateTime::from_timestamp_micros(h).unwrap_or(t)
}

/// Directory of a partition, relative to the lake root.
pub fn partition_dir(workspace: &str, content_type: &str, hour: DateTime<Utc>) -> String {
    let [y, m, d, h] = hour_values(hour);
    format!("workspace={}/content_type={}/year={y}/month={m}/day={d}/hour={h}", escape(workspace), escape(content_type))
}

/// A fresh file name in a partition, relative to the lake root.
pub fn new_file(workspace: &str, content_type: &str, hour: DateTime<Utc>) -> String {
    format!("{}/{}.parquet", partition_dir(workspace, content_type, hour), uuid::Uuid::now_v7().simple())
}

/// Every `.parquet` file under `dir` whose path (relative to `root`) starts
/// with `workspace=`, as relative paths with `/` separators.
pub fn list_lake_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return out };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("workspace=") {
            walk(root, &e.path(), &mut out);
        }
    }
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            if let Ok(rel) = p.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn partitions_by_utc_hour_with_escaped_values() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:59:59.999+09:00").unwrap().with_timezone(&Utc);
        assert_eq!(
            partition_dir("default", "Order Completed/x=1", hour_start(t)),
            "workspace=default/content_type=Order Completed%2Fx%3D1/year=2026/month=01/day=01/hour=18"
        );
        let before_epoch = DateTime::parse_from_rfc3339("1969-12-31T23:30:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(hour_start(before_epoch).to_rfc3339(), "1969-12-31T23:00:00+00:00");
    }
}
