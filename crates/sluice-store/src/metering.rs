//! Meters and the usage read model.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::audit::NewAudit;
use crate::in_lists::Arg;
use crate::BeginWrite as _;
use crate::{from_micros, on_pool, to_micros, Result, Store, StoreError};

/// A meter definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Meter {
    /// Workspace.
    pub workspace: String,
    /// Key, unique in the workspace.
    pub key: String,
    /// Events of this type are metered.
    pub event_type: String,
    /// How values fold.
    pub aggregation: sluice_core::Aggregation,
    /// Dot path of the value in `properties` (not for `count`).
    pub value_property: Option<String>,
    /// Property paths that split usage into groups.
    pub group_by: Vec<String>,
    /// Property equalities an event must match.
    pub filter: serde_json::Map<String, Value>,
    /// Per partition, the first offset the live consumer applies this meter
    /// to; earlier events are applied by the backfill job.
    pub start_offsets: Vec<(u32, u64)>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// One event's (or several events') contribution to one usage bucket.
///
/// The bucket's names are shared (`Arc<str>`): a batch record's deltas
/// point at its meter's names and at the customer ids of its dictionary,
/// so that making, carrying and folding a delta per row allocates nothing
/// (a 1,000,000-row import makes about a million of them).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDelta {
    /// Workspace.
    pub workspace: Arc<str>,
    /// Meter key.
    pub meter: Arc<str>,
    /// Customer (`""` when none).
    pub customer_id: Arc<str>,
    /// Subscription (`""` when none).
    pub subscription_id: Arc<str>,
    /// Group values as a JSON object text (`""` without group_by).
    pub group_key: Arc<str>,
    /// Start of the 15-minute UTC bucket, microseconds.
    pub bucket_start: i64,
    /// Events.
    pub count: i64,
    /// Sum of values.
    pub sum: Decimal,
    /// Smallest value.
    pub min: Option<Decimal>,
    /// Largest value.
    pub max: Option<Decimal>,
    /// Event time of the latest value, microseconds.
    pub latest_at: Option<i64>,
    /// The latest value.
    pub latest_value: Option<Decimal>,
    /// For unique_count: the value counted.
    pub unique: Option<String>,
}

impl UsageDelta {
    pub(crate) fn bucket_id(&self) -> (String, String, String, String, String, i64) {
        let k = self.key();
        (k.0.to_owned(), k.1.to_owned(), k.2.to_owned(), k.3.to_owned(), k.4.to_owned(), k.5)
    }

    /// The bucket, borrowed (for sorting and comparing without copies).
    pub(crate) fn key(&self) -> (&str, &str, &str, &str, &str, i64) {
        (&self.workspace, &self.meter, &self.customer_id, &self.subscription_id, &self.group_key, self.bucket_start)
    }

    /// The bucket, borrowed, in the order deltas are sorted by (a commit
    /// sorts the buckets it reads and writes): within a meter, the order of
    /// the table's primary key, so that the B-tree lookups and inserts of a
    /// commit go through the key space in order and touch neighbouring pages
    /// (inserts are faster than in time order; measured: docs/BENCHMARKS.md,
    /// "CSV usage import").
    /// The meter and workspace come last: they rarely differ within a commit.
    pub(crate) fn sort_key(&self) -> (&str, &str, &str, i64, &str, &str) {
        (&self.customer_id, &self.subscription_id, &self.group_key, self.bucket_start, &self.meter, &self.workspace)
    }

    /// Takes the aggregates (not the bucket) of `other`.
    pub(crate) fn set_aggregates(&mut self, other: &UsageDelta) {
        self.count = other.count;
        self.sum = other.sum;
        self.min = other.min;
        self.max = other.max;
        self.latest_at = other.latest_at;
        self.latest_value = other.latest_value;
    }

    /// Folds `other` (same bucket) into `self`, exactly: a count or sum
    /// beyond what `i64` / [`Decimal`] hold is an [`UsageOverflow`], and
    /// `self` is left as it was (no partial merge, no panic).
    pub fn merge(&mut self, other: &UsageDelta) -> std::result::Result<(), UsageOverflow> {
        let count = self.count.checked_add(other.count);
        let sum = self.sum.checked_add(other.sum);
        let (Some(count), Some(sum)) = (count, sum) else {
            return Err(UsageOverflow { bucket: Box::new(self.bucket_key()), value: other.sum, total: self.sum });
        };
        self.count = count;
        self.sum = sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if other.latest_at.is_some() && other.latest_at >= self.latest_at {
            self.latest_at = other.latest_at;
            self.latest_value = other.latest_value;
        }
        Ok(())
    }

    /// The bucket's identity as an [`UsageBucketKey`].
    pub fn bucket_key(&self) -> UsageBucketKey {
        UsageBucketKey {
            workspace: self.workspace.to_string(),
            meter: self.meter.to_string(),
            customer_id: self.customer_id.to_string(),
            subscription_id: self.subscription_id.to_string(),
            group_key: self.group_key.to_string(),
            bucket_start: self.bucket_start,
        }
    }
}

/// A usage bucket, by value (what an overflow names).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageBucketKey {
    /// Workspace.
    pub workspace: String,
    /// Meter key.
    pub meter: String,
    /// Customer (`""` when none).
    pub customer_id: String,
    /// Subscription (`""` when none).
    pub subscription_id: String,
    /// Group values as JSON text (`""` without group_by).
    pub group_key: String,
    /// Start of the 15-minute UTC bucket, microseconds.
    pub bucket_start: i64,
}

/// Adding usage to a bucket would exceed the largest exact decimal
/// (about 7.9e28) or the largest event count: the addition is refused, never
/// rounded or wrapped. Caused by the data, so it is permanent: the consumer
/// dead-letters the event that would overflow instead of retrying it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("usage of meter {meter:?} for customer {customer:?} overflows: adding {value} to {total} exceeds the largest exact decimal (about 7.9e28)", meter = .bucket.meter, customer = .bucket.customer_id)]
pub struct UsageOverflow {
    /// The bucket (boxed: the error stays small on the hot path's `Result`s).
    pub bucket: Box<UsageBucketKey>,
    /// The value being added.
    pub value: Decimal,
    /// What the bucket held.
    pub total: Decimal,
}

/// Sorts `plain` (deltas without a unique value, owned or borrowed) by
/// bucket and merges equal buckets, in their order in `plain` (the sort is
/// stable); `own` turns the first delta of each bucket into the result's.
pub(crate) fn fold_sorted<D: std::borrow::Borrow<UsageDelta>>(
    mut plain: Vec<D>,
    own: impl Fn(D) -> UsageDelta,
    overflows: &mut Vec<UsageOverflow>,
) -> Vec<UsageDelta> {
    plain.sort_by(|a, b| a.borrow().sort_key().cmp(&b.borrow().sort_key()));
    let mut out: Vec<UsageDelta> = Vec::with_capacity(plain.len());
    for d in plain {
        match out.last_mut() {
            Some(last) if last.sort_key() == d.borrow().sort_key() => {
                if let Err(o) = last.merge(d.borrow()) {
                    overflows.push(o);
                }
            }
            _ => out.push(own(d)),
        }
    }
    out
}

/// The advisory-lock key of a meter's usage on PostgreSQL (see
/// `apply_usage!`): a stable 64-bit hash (FNV-1a) of the workspace and
/// meter, the same in every process.
pub(crate) fn usage_lock_key(workspace: &str, meter: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in workspace.bytes().chain([0u8]).chain(meter.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// A meter's usage of one customer and subscription, summarized
/// ([`Store::usage_outline`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageOutline {
    /// Customer (`""` when none).
    pub customer_id: String,
    /// Subscription (`""` when none).
    pub subscription_id: String,
    /// The first bucket's start.
    pub first: DateTime<Utc>,
    /// The last bucket's start.
    pub last: DateTime<Utc>,
    /// Buckets (or distinct values, for `unique_count`).
    pub rows: i64,
}

/// A stored bucket, as read by the usage query.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageBucket {
    /// Customer (`""` when none).
    pub customer_id: String,
    /// Subscription (`""` when none).
    pub subscription_id: String,
    /// Group values (JSON object text, `""` when none).
    pub group_key: String,
    /// Bucket start.
    pub bucket_start: DateTime<Utc>,
    /// Events.
    pub count: i64,
    /// Sum.
    pub sum: Decimal,
    /// Min.
    pub min: Option<Decimal>,
    /// Max.
    pub max: Option<Decimal>,
    /// Latest value's event time.
    pub latest_at: Option<DateTime<Utc>>,
    /// Latest value.
    pub latest_value: Option<Decimal>,
}

fn bucket(r: BucketRow) -> UsageBucket {
    UsageBucket {
        customer_id: r.0,
        subscription_id: r.1,
        group_key: r.2,
        bucket_start: from_micros(r.3),
        count: r.4,
        sum: r.5.parse().unwrap_or_default(),
        min: dec(r.6),
        max: dec(r.7),
        latest_at: r.8.map(from_micros),
        latest_value: dec(r.9),
    }
}

fn dec(s: Option<String>) -> Option<Decimal> {
    s.and_then(|s| s.parse().ok())
}

/// Usage buckets read and written together when a commit applies usage
/// (one statement each on PostgreSQL; on SQLite split further, see
/// [`values_ranges`]).
pub(crate) const USAGE_CHUNK: usize = 4096;
/// Buckets per page when a usage query reads them from SQLite.
const USAGE_PAGE: usize = 50_000;

/// Rows per multi-row `VALUES` statement when a commit reads and writes
/// usage buckets on SQLite (12 parameters a row, far below SQLite's limit
/// of 32,766).
pub(crate) const SQLITE_VALUES_ROWS: usize = 256;

/// Splits rows `0..n` into the ranges of one statement each: full
/// statements of [`SQLITE_VALUES_ROWS`] rows, then powers of two, so that a
/// connection prepares (and keeps in its statement cache) at most nine
/// texts per kind.
pub(crate) fn values_ranges(n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let size = match n - at {
            0 => return None,
            left if left >= SQLITE_VALUES_ROWS => SQLITE_VALUES_ROWS,
            left => 1 << left.ilog2(),
        };
        at += size;
        Some(at - size..at)
    })
}

/// The SQLite statement that reads (`upsert` false) or writes (`upsert`
/// true) `rows` usage buckets, `rows` the length of one of
/// [`values_ranges`].
///
/// Multi-row `VALUES` with bound parameters, not one JSON parameter taken
/// apart by `json_each`: SQLite parses the JSON text once per `->>`, and
/// bound values need no parsing, so inserts, updates and reads are all
/// faster (measured: docs/BENCHMARKS.md, "CSV usage import").
/// The read returns its rows as one JSON array in one row: sqlx hands every
/// SQLite row from its worker thread to the task through a channel, copying
/// each value (a wake-up, a context switch and a dozen allocations per row),
/// which made a commit's read of its buckets slow during an import.
///
/// The read joins from the keys (`CROSS JOIN` keeps them the outer loop):
/// for `(…) IN (…)` SQLite's planner searched the primary key on its first
/// five columns only and filtered `bucket_start`, scanning every bucket of
/// a customer per key.
pub(crate) fn sqlite_usage_sql(upsert: bool, rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<[String; 2]>> = std::sync::OnceLock::new();
    let texts = SQL.get_or_init(|| {
        (0..=SQLITE_VALUES_ROWS.ilog2())
            .map(|p| {
                let n = 1usize << p;
                let keys = vec!["(?, ?, ?, ?, ?, ?)"; n].join(", ");
                let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
                [
                    format!(
                        "WITH k(w, m, c, s, g, t) AS (VALUES {keys}) \
                         SELECT json_group_array(json_array(b.workspace, b.meter_key, b.customer_id, b.subscription_id, b.group_key, \
                         b.bucket_start, b.count, b.sum, b.min, b.max, b.latest_at, b.latest_value)) \
                         FROM k CROSS JOIN usage_buckets b ON b.workspace = k.w AND b.meter_key = k.m AND b.customer_id = k.c \
                         AND b.subscription_id = k.s AND b.group_key = k.g AND b.bucket_start = k.t"
                    ),
                    format!(
                        "INSERT INTO usage_buckets (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start, \
                         count, sum, min, max, latest_at, latest_value) VALUES {rows} \
                         ON CONFLICT (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start) DO UPDATE SET \
                         count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max, \
                         latest_at = excluded.latest_at, latest_value = excluded.latest_value"
                    ),
                ]
            })
            .collect()
    });
    debug_assert!(rows.is_power_of_two() && rows <= SQLITE_VALUES_ROWS);
    &texts[rows.ilog2() as usize][usize::from(upsert)]
}

/// A stored bucket row: the six key columns, count, sum, min, max, latest_at, latest_value.
pub(crate) type StoredBucket =
    (String, String, String, String, String, i64, i64, String, Option<String>, Option<String>, Option<i64>, Option<String>);

type MeterRow = (String, String, String, String, Option<String>, String, String, String, i64);
type BucketRow = (String, String, String, i64, i64, String, Option<String>, Option<String>, Option<i64>, Option<String>);

fn meter(r: MeterRow) -> Result<Meter> {
    // Stored by this code: an unknown name means a newer binary wrote it (or
    // the row was edited by hand), and is an error, never another
    // aggregation.
    let aggregation = r.3.parse().map_err(|e: sluice_core::UnknownAggregation| StoreError::Corrupt(format!("meter {:?}: {e}", r.1)))?;
    Ok(Meter {
        workspace: r.0,
        key: r.1,
        event_type: r.2,
        aggregation,
        value_property: r.4,
        group_by: serde_json::from_str(&r.5).unwrap_or_default(),
        filter: serde_json::from_str(&r.6).unwrap_or_default(),
        start_offsets: serde_json::from_str(&r.7).unwrap_or_default(),
        created_at: from_micros(r.8),
    })
}

const METER_COLUMNS: &str = "workspace, meter_key, event_type, aggregation, value_property, group_by, filter, start_offsets, created_at";

/// Applies usage deltas inside an open transaction `$tx`: merge the batch's
/// deltas per bucket in memory, read the existing buckets of each chunk of
/// [`USAGE_CHUNK`], merge in Rust (exact decimals), write them back.
/// `$backend` is `sqlite` (rows travel as multi-row `VALUES`, see
/// [`sqlite_usage_sql`]) or `postgres` (as arrays).
macro_rules! apply_usage {
    ($backend:ident, $tx:ident, $deltas:expr) => {{
        // Fold per bucket by sorting references: one copy per bucket.
        let mut plain: Vec<&$crate::metering::UsageDelta> = Vec::new();
        let mut uniques = Vec::new();
        for d in $deltas {
            match &d.unique {
                Some(u) => uniques.push((d.bucket_id(), u.clone())),
                None => plain.push(d),
            }
        }
        $crate::metering::apply_usage!(@lock $backend, $tx, $deltas);
        // Every bucket that would overflow is collected (not only the
        // first), so that the consumer learns them all from one failed
        // commit; nothing is written then.
        let mut overflows: Vec<$crate::metering::UsageOverflow> = Vec::new();
        let mut merged = $crate::metering::fold_sorted(plain, |d| d.clone(), &mut overflows);
        // A few thousand buckets at a time: the parameters of their
        // statements are built in memory, so a commit that touches a
        // million buckets must not build them all at once.
        for chunk in merged.chunks_mut($crate::metering::USAGE_CHUNK) {
            let keys: Vec<(&str, &str, &str, &str, &str, i64)> = chunk.iter().map(|d| d.key()).collect();
            let existing: Vec<$crate::metering::StoredBucket> = $crate::metering::apply_usage!(@select $backend, $tx, &keys);
            // Existing buckets: stored aggregates, then this commit's.
            for b in existing {
                let id = (b.2.as_str(), b.3.as_str(), b.4.as_str(), b.5, b.1.as_str(), b.0.as_str());
                if let Ok(i) = chunk.binary_search_by(|m| m.sort_key().cmp(&id)) {
                    let mut total = $crate::metering::UsageDelta {
                        workspace: Default::default(),
                        meter: Default::default(),
                        customer_id: Default::default(),
                        subscription_id: Default::default(),
                        group_key: Default::default(),
                        bucket_start: b.5,
                        count: b.6,
                        sum: b.7.parse().unwrap_or_default(),
                        min: b.8.and_then(|v| v.parse().ok()),
                        max: b.9.and_then(|v| v.parse().ok()),
                        latest_at: b.10,
                        latest_value: b.11.and_then(|v| v.parse().ok()),
                        unique: None,
                    };
                    match total.merge(&chunk[i]) {
                        Ok(()) => chunk[i].set_aggregates(&total),
                        Err(mut o) => {
                            // `total` was read without its names.
                            o.bucket = Box::new(chunk[i].bucket_key());
                            overflows.push(o);
                        }
                    }
                }
            }
            if overflows.is_empty() {
                $crate::metering::apply_usage!(@upsert $backend, $tx, &*chunk);
            }
        }
        if !overflows.is_empty() {
            return Err($crate::StoreError::UsageOverflow(overflows));
        }
        for (id, value) in uniques {
            sqlx::query(
                "INSERT INTO usage_unique (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start, value) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING")
                .bind(&id.0).bind(&id.1).bind(&id.2).bind(&id.3).bind(&id.4).bind(id.5).bind(value)
                .execute(&mut *$tx).await?;
        }
    }};
    (@select sqlite, $tx:ident, $keys:expr) => {{
        let keys = $keys;
        let mut existing: Vec<$crate::metering::StoredBucket> = Vec::new();
        for range in $crate::metering::values_ranges(keys.len()) {
            let mut q = sqlx::query_as::<_, (String,)>($crate::metering::sqlite_usage_sql(false, range.len()));
            for k in &keys[range] {
                q = q.bind(k.0).bind(k.1).bind(k.2).bind(k.3).bind(k.4).bind(k.5);
            }
            let (found,) = q.fetch_one(&mut *$tx).await?;
            existing.extend(serde_json::from_str::<Vec<$crate::metering::StoredBucket>>(&found).map_err(|e| sqlx::Error::Decode(Box::new(e)))?);
        }
        existing
    }};
    (@lock sqlite, $tx:ident, $deltas:expr) => {{
        // SQLite has one writer: the read and the write of a bucket are
        // never interleaved with another commit's.
    }};
    (@lock postgres, $tx:ident, $deltas:expr) => {{
        // A commit reads stored buckets, adds in Rust and writes the totals
        // back; two commits on one bucket at once (the customer-less bucket
        // is written from every partition, and a replay or a backfill beside
        // the live consumer) would lose one's usage at read committed.
        // A transaction-scoped advisory lock per (workspace, meter), taken
        // in key order, serialises them (as SQLite's single writer does).
        let mut locks: Vec<i64> = $deltas.iter().map(|d: &$crate::metering::UsageDelta| $crate::metering::usage_lock_key(&d.workspace, &d.meter)).collect();
        locks.sort_unstable();
        locks.dedup();
        for k in locks {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(k).execute(&mut *$tx).await?;
        }
    }};
    (@select postgres, $tx:ident, $keys:expr) => {{
        let col = |i: usize| $keys.iter().map(|k| [k.0, k.1, k.2, k.3, k.4][i]).collect::<Vec<&str>>();
        sqlx::query_as(
            "SELECT b.workspace, b.meter_key, b.customer_id, b.subscription_id, b.group_key, b.bucket_start, b.count, b.sum, b.min, b.max, \
             b.latest_at, b.latest_value FROM usage_buckets b JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[]) \
             AS k(w, m, c, s, g, t) ON b.workspace = k.w AND b.meter_key = k.m AND b.customer_id = k.c AND b.subscription_id = k.s \
             AND b.group_key = k.g AND b.bucket_start = k.t")
            .bind(col(0)).bind(col(1)).bind(col(2)).bind(col(3))
            .bind(col(4)).bind($keys.iter().map(|k| k.5).collect::<Vec<i64>>())
            .fetch_all(&mut *$tx).await?
    }};
    (@upsert sqlite, $tx:ident, $rows:expr) => {{
        let rows = $rows;
        let dec = |v: &Option<rust_decimal::Decimal>| v.map(|v| v.normalize().to_string());
        for range in $crate::metering::values_ranges(rows.len()) {
            let mut q = sqlx::query($crate::metering::sqlite_usage_sql(true, range.len()));
            for d in &rows[range] {
                q = q.bind(&*d.workspace).bind(&*d.meter).bind(&*d.customer_id).bind(&*d.subscription_id)
                    .bind(&*d.group_key).bind(d.bucket_start).bind(d.count).bind(d.sum.normalize().to_string())
                    .bind(dec(&d.min)).bind(dec(&d.max)).bind(d.latest_at).bind(dec(&d.latest_value));
            }
            q.execute(&mut *$tx).await?;
        }
    }};
    (@upsert postgres, $tx:ident, $rows:expr) => {{
        let s = |f: fn(&$crate::metering::UsageDelta) -> String| $rows.iter().map(f).collect::<Vec<String>>();
        let o = |f: fn(&$crate::metering::UsageDelta) -> Option<String>| $rows.iter().map(f).collect::<Vec<Option<String>>>();
        sqlx::query(
            "INSERT INTO usage_buckets (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start, count, sum, min, max, latest_at, latest_value) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::text[], $9::text[], \
             $10::text[], $11::int8[], $12::text[]) \
             ON CONFLICT (workspace, meter_key, customer_id, subscription_id, group_key, bucket_start) DO UPDATE SET \
             count = excluded.count, sum = excluded.sum, min = excluded.min, max = excluded.max, \
             latest_at = excluded.latest_at, latest_value = excluded.latest_value")
            .bind(s(|d| d.workspace.to_string())).bind(s(|d| d.meter.to_string())).bind(s(|d| d.customer_id.to_string()))
            .bind(s(|d| d.subscription_id.to_string())).bind(s(|d| d.group_key.to_string()))
            .bind($rows.iter().map(|d| d.bucket_start).collect::<Vec<i64>>())
            .bind($rows.iter().map(|d| d.count).collect::<Vec<i64>>())
            .bind(s(|d| d.sum.normalize().to_string()))
            .bind(o(|d| d.min.map(|v| v.normalize().to_string())))
            .bind(o(|d| d.max.map(|v| v.normalize().to_string())))
            .bind($rows.iter().map(|d| d.latest_at).collect::<Vec<Option<i64>>>())
            .bind(o(|d| d.latest_value.map(|v| v.normalize().to_string())))
            .execute(&mut *$tx).await?;
    }};
}
pub(crate) use apply_usage;

impl Store {
    /// Creates a meter (with its audit entry); [`StoreError::Conflict`] if the key exists.
    pub async fn create_meter(&self, m: &Meter, created_by: &str, audit: &NewAudit) -> Result<()> {
        let conflict = |e| StoreError::conflict_on_unique(e, format!("meter {:?} already exists", m.key));
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(&format!("INSERT INTO {} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                "meters (workspace, meter_key, event_type, aggregation, value_property, group_by, filter, start_offsets, created_at, created_by)"))
                .bind(&m.workspace).bind(&m.key).bind(&m.event_type).bind(m.aggregation.as_str()).bind(&m.value_property)
                .bind(serde_json::to_string(&m.group_by).unwrap_or_else(|_| "[]".into()))
                .bind(Value::Object(m.filter.clone()).to_string())
                .bind(serde_json::to_string(&m.start_offsets).unwrap_or_else(|_| "[]".into()))
                .bind(to_micros(m.created_at)).bind(created_by)
                .execute(&mut *tx).await.map_err(conflict)?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Meters of a workspace, or of every workspace with `None`.
    pub async fn list_meters(&self, workspace: Option<&str>) -> Result<Vec<Meter>> {
        let sql = format!("SELECT {METER_COLUMNS} FROM meters WHERE ($1 IS NULL OR workspace = $1) ORDER BY workspace, meter_key");
        let rows: Vec<MeterRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).fetch_all(pool).await)?;
        rows.into_iter().map(meter).collect()
    }

    /// One meter.
    pub async fn get_meter(&self, workspace: &str, key: &str) -> Result<Meter> {
        let sql = format!("SELECT {METER_COLUMNS} FROM meters WHERE workspace = $1 AND meter_key = $2");
        let row: Option<MeterRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(key).fetch_optional(pool).await)?;
        row.map(meter).ok_or(StoreError::NotFound)?
    }

    /// Usage buckets of a meter in `[from, to)`, optionally of one customer and subscription.
    pub async fn usage_buckets(
        &self,
        workspace: &str,
        meter: &str,
        customer_id: Option<&str>,
        subscription_id: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageBucket>> {
        let (from, to) = (from.map(to_micros).unwrap_or(i64::MIN), to.map(to_micros).unwrap_or(i64::MAX));
        let rows: Vec<BucketRow> = match self {
            Store::Sqlite(pool) => {
                // Pages of buckets in primary-key order, each page one row of
                // JSON: sqlx passes every SQLite row from its worker thread
                // through a channel, a wake-up and a dozen allocations per
                // row, which one row a page avoids (measured:
                // docs/BENCHMARKS.md, "CSV usage import").
                let mut rows: Vec<BucketRow> = Vec::new();
                let mut after: Option<(String, String, String, i64)> = None;
                loop {
                    let sql = format!(
                        "SELECT json_group_array(json_array(customer_id, subscription_id, group_key, bucket_start, count, sum, min, max, \
                         latest_at, latest_value)) FROM (SELECT * FROM usage_buckets WHERE workspace = $1 AND meter_key = $2 \
                         AND bucket_start >= $3 AND bucket_start < $4 AND {} AND {} AND {} \
                         ORDER BY customer_id, subscription_id, group_key, bucket_start LIMIT {USAGE_PAGE})",
                        if customer_id.is_some() { "customer_id = $5" } else { "$5 IS NULL" },
                        if subscription_id.is_some() { "subscription_id = $6" } else { "$6 IS NULL" },
                        if after.is_some() {
                            "(customer_id, subscription_id, group_key, bucket_start) > ($7, $8, $9, $10)"
                        } else {
                            "$7 IS NULL AND $8 IS NULL AND $9 IS NULL AND $10 IS NULL"
                        },
                    );
                    let a = after.as_ref();
                    let (page,): (String,) = sqlx::query_as(&sql)
                        .bind(workspace)
                        .bind(meter)
                        .bind(from)
                        .bind(to)
                        .bind(customer_id)
                        .bind(subscription_id)
                        .bind(a.map(|a| &a.0))
                        .bind(a.map(|a| &a.1))
                        .bind(a.map(|a| &a.2))
                        .bind(a.map(|a| a.3))
                        .fetch_one(pool)
                        .await?;
                    let page: Vec<BucketRow> = serde_json::from_str(&page).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    let full = page.len() >= USAGE_PAGE;
                    // The page's last key in primary-key order, whatever order
                    // json_group_array saw the rows in.
                    after = page.iter().map(|r| (&r.0, &r.1, &r.2, r.3)).max().map(|k| (k.0.clone(), k.1.clone(), k.2.clone(), k.3));
                    rows.extend(page);
                    if !full {
                        break rows;
                    }
                }
            }
            Store::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT customer_id, subscription_id, group_key, bucket_start, count, sum, min, max, latest_at, latest_value \
                 FROM usage_buckets WHERE workspace = $1 AND meter_key = $2 AND ($3::text IS NULL OR customer_id = $3) \
                 AND ($4::text IS NULL OR subscription_id = $4) AND bucket_start >= $5 AND bucket_start < $6",
                )
                .bind(workspace)
                .bind(meter)
                .bind(customer_id)
                .bind(subscription_id)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await?
            }
        };
        Ok(rows.into_iter().map(bucket).collect())
    }

    /// Where a meter has usage in `[from, to)`, per (customer, subscription)
    /// — `""` for usage naming no subscription —: the first and last
    /// bucket start and the number of buckets (of distinct values for a
    /// `unique_count` meter). Aggregated by the database, so the answer has
    /// a row per customer and subscription, not per bucket (the billing
    /// report of unattributed usage starts here).
    pub async fn usage_outline(
        &self,
        workspace: &str,
        meter: &str,
        unique: bool,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageOutline>> {
        let table = if unique { "usage_unique" } else { "usage_buckets" };
        let sql = format!(
            "SELECT customer_id, subscription_id, MIN(bucket_start), MAX(bucket_start), COUNT(*) FROM {table} \
             WHERE workspace = $1 AND meter_key = $2 AND bucket_start >= $3 AND bucket_start < $4 \
             GROUP BY customer_id, subscription_id ORDER BY customer_id, subscription_id"
        );
        let rows: Vec<(String, String, i64, i64, i64)> =
            on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(meter).bind(to_micros(from)).bind(to_micros(to)).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| UsageOutline { customer_id: r.0, subscription_id: r.1, first: from_micros(r.2), last: from_micros(r.3), rows: r.4 })
            .collect())
    }

    /// Usage buckets of a meter in `[from, to)` of several customers (a
    /// billing run reads its batch's usage this way), 500 customers a query.
    pub async fn usage_buckets_of_customers(
        &self,
        workspace: &str,
        meter: &str,
        customers: &[&str],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageBucket>> {
        let select = "SELECT customer_id, subscription_id, group_key, bucket_start, count, sum, min, max, latest_at, latest_value FROM usage_buckets";
        let rows: Vec<BucketRow> = self.usage_of_customers(select, workspace, meter, customers, (from, to)).await?;
        Ok(rows.into_iter().map(bucket).collect())
    }

    /// Distinct values of a unique_count meter in `[from, to)` of several
    /// customers: (customer, subscription, bucket start, value).
    pub async fn usage_unique_of_customers(
        &self,
        workspace: &str,
        meter: &str,
        customers: &[&str],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(String, String, DateTime<Utc>, String)>> {
        let select = "SELECT customer_id, subscription_id, bucket_start, value FROM usage_unique";
        let rows: Vec<(String, String, i64, String)> = self.usage_of_customers(select, workspace, meter, customers, (from, to)).await?;
        Ok(rows.into_iter().map(|r| (r.0, r.1, from_micros(r.2), r.3)).collect())
    }

    /// The rows of `select` (columns of a usage table) of a meter's buckets
    /// in `[from, to)` of these customers, 500 customers a query.
    async fn usage_of_customers<T>(
        &self,
        select: &str,
        workspace: &str,
        meter: &str,
        customers: &[&str],
        (from, to): (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let sql =
            format!("{select} WHERE workspace = $1 AND meter_key = $2 AND bucket_start >= $3 AND bucket_start < $4 AND customer_id IN ({{in}})");
        let leading = [Arg::Text(workspace), Arg::Text(meter), Arg::Int(to_micros(from)), Arg::Int(to_micros(to))];
        self.select_in_after(&sql, &leading, customers).await
    }

    /// Distinct values of a unique_count meter in `[from, to)`:
    /// (customer, subscription, group key, bucket start, value).
    pub async fn usage_unique_values(
        &self,
        workspace: &str,
        meter: &str,
        customer_id: Option<&str>,
        subscription_id: Option<&str>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, String, String, DateTime<Utc>, String)>> {
        let rows: Vec<(String, String, String, i64, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT customer_id, subscription_id, group_key, bucket_start, value FROM usage_unique \
             WHERE workspace = $1 AND meter_key = $2 AND ($3 IS NULL OR customer_id = $3) \
             AND ($4 IS NULL OR subscription_id = $4) AND bucket_start >= $5 AND bucket_start < $6")
            .bind(workspace).bind(meter).bind(customer_id).bind(subscription_id)
            .bind(from.map(to_micros).unwrap_or(i64::MIN)).bind(to.map(to_micros).unwrap_or(i64::MAX))
            .fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|r| (r.0, r.1, r.2, from_micros(r.3), r.4)).collect())
    }
}
