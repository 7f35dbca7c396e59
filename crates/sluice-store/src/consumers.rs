//! Consumer state: checkpoints, dead letters, the event_counts read model,
//! webhooks and webhook deliveries.
//!
//! A state-writing consumer commits its effects, its checkpoint and any dead
//! letter it creates or replay it completes in one transaction
//! ([`Store::commit_consumer`]), which is what makes its effects
//! exactly-once under at-least-once delivery.

use std::collections::HashMap;
use std::hash::BuildHasher as _;

use chrono::{DateTime, Utc};

use crate::audit::NewAudit;
use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, to_micros, Page, Result, Store, StoreError};

/// One event counted by the event_counts consumer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CountKey {
    /// Workspace.
    pub workspace: String,
    /// Event type.
    pub event_type: String,
    /// Customer id, `""` when none.
    pub customer_id: String,
    /// UTC day of the event time, `YYYY-MM-DD`.
    pub day: String,
}

/// Folds effects into a [`ConsumerCommit`] as they arrive: each usage delta
/// and count is merged into the entry of its bucket or key (found by hash,
/// without copying a key), so the commit always holds one entry per bucket
/// and key, each in the order of its first entry (`unique_count` values stay
/// one entry each). A consumer that carries the effects of many reads into
/// one commit adds them through a folder instead of folding the whole carry
/// again and again; the commit writes the same state either way.
///
/// A folder indexes the entries of one commit: use it with the commit it
/// started with (empty, or folded by [`Folder::of`]) and add every effect
/// through it.
#[derive(Default)]
pub struct Folder {
    state: foldhash::fast::RandomState,
    /// Deltas without a unique value, by bucket: positions in `usage`.
    usage: KeyIndex,
    /// Positions in `counts`.
    counts: KeyIndex,
}

/// Positions of entries by key, the keys encoded as bytes one after
/// another in one buffer. Comparing a key is one `memcmp` of bytes that sit
/// together, not a comparison per string of strings that sit wherever their
/// entries were allocated: those cache misses showed in an import's
/// profile (docs/BENCHMARKS.md, "CSV usage import").
#[derive(Default)]
struct KeyIndex {
    /// Position of the entry, and where its key is in `keys` (start, length).
    table: hashbrown::HashTable<(usize, usize, usize)>,
    keys: Vec<u8>,
    /// The key being looked up.
    probe: Vec<u8>,
}

impl KeyIndex {
    /// The position of the entry whose key `encode` writes; `None` when
    /// there is none, after indexing that key at position `next`.
    fn find_or_insert(&mut self, state: &foldhash::fast::RandomState, next: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Option<usize> {
        let KeyIndex { table, keys, probe } = self;
        probe.clear();
        encode(probe);
        let h = state.hash_one(probe.as_slice());
        if let Some(&(i, _, _)) = table.find(h, |&(_, at, len)| keys[at..at + len] == probe[..]) {
            return Some(i);
        }
        let at = keys.len();
        keys.extend_from_slice(probe);
        let keys = &*keys;
        table.insert_unique(h, (next, at, probe.len()), |&(_, at, len)| state.hash_one(&keys[at..at + len]));
        None
    }

    /// Forgets the key `encode` writes (it must be indexed). Its bytes stay
    /// in `keys` until the caller truncates them.
    fn remove(&mut self, state: &foldhash::fast::RandomState, encode: impl FnOnce(&mut Vec<u8>)) {
        let KeyIndex { table, keys, probe } = self;
        probe.clear();
        encode(probe);
        let h = state.hash_one(probe.as_slice());
        if let Ok(entry) = table.find_entry(h, |&(_, at, len)| keys[at..at + len] == probe[..]) {
            entry.remove();
        }
    }
}

/// Appends strings, each with its length first (so that distinct keys never
/// encode alike).
fn encode_strs<'a>(out: &mut Vec<u8>, strs: impl IntoIterator<Item = &'a str>) {
    for s in strs {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
}

impl Folder {
    /// A folder of `commit`'s current entries (folding them first).
    pub fn of(commit: &mut ConsumerCommit) -> Folder {
        let usage = std::mem::take(&mut commit.usage);
        let counts = std::mem::take(&mut commit.counts);
        let mut f = Folder::default();
        // Entries that cannot be folded stay as they are: the commit that
        // writes them reports the overflow.
        for d in usage {
            if f.add_usage(commit, [d.clone()]).is_err() {
                commit.usage.push(d);
            }
        }
        f.add_counts(commit, counts);
        f
    }

    /// Adds usage deltas to `commit`, all or nothing: when one would
    /// overflow its bucket, every delta of this call is taken back (the
    /// commit and the folder are as before the call) and the overflow is
    /// returned, so that a consumer can dead-letter the event (or fall back
    /// from a batch to its events) without half of its usage counted.
    pub fn add_usage(
        &mut self,
        commit: &mut ConsumerCommit,
        deltas: impl IntoIterator<Item = crate::metering::UsageDelta>,
    ) -> std::result::Result<(), crate::metering::UsageOverflow> {
        let out = &mut commit.usage;
        let (len_before, keys_before) = (out.len(), self.usage.keys.len());
        // Entries that existed before this call and were merged into, with
        // their value before the first merge.
        let mut changed: Vec<(usize, crate::metering::UsageDelta)> = Vec::new();
        let mut changed_at: foldhash::HashSet<usize> = foldhash::HashSet::default();
        for d in deltas {
            if d.unique.is_some() {
                out.push(d); // unique values stay one entry each
                continue;
            }
            let found = self.usage.find_or_insert(&self.state, out.len(), |k| Self::usage_key(k, &d));
            let Some(i) = found else {
                out.push(d);
                continue;
            };
            if i < len_before && changed_at.insert(i) {
                changed.push((i, out[i].clone()));
            }
            if let Err(overflow) = out[i].merge(&d) {
                // Take the call back: entries it added leave the index and
                // the commit, entries it merged into get their old values.
                for e in &out[len_before..] {
                    if e.unique.is_none() {
                        self.usage.remove(&self.state, |k| Self::usage_key(k, e));
                    }
                }
                out.truncate(len_before);
                self.usage.keys.truncate(keys_before);
                for (j, old) in changed {
                    out[j] = old;
                }
                return Err(overflow);
            }
        }
        Ok(())
    }

    fn usage_key(k: &mut Vec<u8>, d: &crate::metering::UsageDelta) {
        encode_strs(k, [&*d.workspace, &*d.meter, &*d.customer_id, &*d.subscription_id, &*d.group_key]);
        k.extend_from_slice(&d.bucket_start.to_le_bytes());
    }

    /// Adds counts to `commit`.
    pub fn add_counts(&mut self, commit: &mut ConsumerCommit, counts: impl IntoIterator<Item = (CountKey, i64)>) {
        let out = &mut commit.counts;
        for (k, n) in counts {
            let found = self.counts.find_or_insert(&self.state, out.len(), |b| {
                encode_strs(b, [k.workspace.as_str(), &k.event_type, &k.customer_id, &k.day]);
            });
            match found {
                Some(i) => out[i].1 += n,
                None => out.push((k, n)),
            }
        }
    }
}

/// A dead letter to create.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// Consumer that gave up.
    pub consumer: String,
    /// Workspace of the event.
    pub workspace: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Log position.
    pub partition: u32,
    /// Log position.
    pub offset: u64,
    /// Last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// First failure.
    pub first_failed_at: DateTime<Utc>,
    /// Last failure.
    pub last_failed_at: DateTime<Utc>,
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// `dlq_…`.
    pub id: String,
    /// Consumer.
    pub consumer: String,
    /// Workspace.
    pub workspace: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Log partition.
    pub partition: u32,
    /// Log offset.
    pub offset: u64,
    /// Last error.
    pub error: String,
    /// Attempts made so far (including replays).
    pub attempts: u32,
    /// First failure.
    pub first_failed_at: DateTime<Utc>,
    /// Last failure.
    pub last_failed_at: DateTime<Utc>,
    /// Status.
    pub status: DeadLetterStatus,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

sluice_core::named_enum! {
    /// A dead letter's status: `dead` until an operator replays it
    /// (`replaying`, then `replayed`, or `dead` again when it fails again)
    /// or discards it.
    pub enum DeadLetterStatus / UnknownDeadLetterStatus ("a dead letter status") {
        /// Failed; waits for an operator.
        Dead = "dead",
        /// Claimed for replay; its consumer processes it again.
        Replaying = "replaying",
        /// Processed by the replay.
        Replayed = "replayed",
        /// Dropped by an operator.
        Discarded = "discarded",
    }
}

sluice_core::named_enum! {
    /// A webhook delivery's status.
    pub enum DeliveryStatus / UnknownDeliveryStatus ("a delivery status") {
        /// Not attempted yet.
        Pending = "pending",
        /// Failed; tried again at `next_retry_at`.
        Retrying = "retrying",
        /// The receiver answered 2xx.
        Succeeded = "succeeded",
        /// Out of attempts: its event is in the webhook consumer's dead letters.
        Dead = "dead",
    }
}

/// What a bulk operation does to each dead letter it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// `dead` → `replaying`, as [`Store::claim_replays`] does: the consumer
    /// processes it again.
    Replay,
    /// `dead` → `discarded`, as [`Store::discard_dead_letter`] does.
    Discard,
}

impl DeadLetterAction {
    fn status(self) -> DeadLetterStatus {
        match self {
            DeadLetterAction::Replay => DeadLetterStatus::Replaying,
            DeadLetterAction::Discard => DeadLetterStatus::Discarded,
        }
    }
}

/// Which dead letters of a workspace a list or bulk operation concerns:
/// every given condition must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// Only these ids.
    pub ids: Option<Vec<String>>,
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only entries whose error contains this text (case-insensitive).
    pub error_contains: Option<String>,
}

impl DeadLetterFilter {
    /// The condition over `$1` (workspace) to `$5` of [`DeadLetterFilter::params`].
    fn sql(store: &Store) -> String {
        format!(
            "workspace = $1 AND ($2 IS NULL OR id {}) AND ($3 IS NULL OR consumer = $3) AND ($4 IS NULL OR event_type = $4) \
             AND ($5 IS NULL OR lower(error) LIKE lower($5) ESCAPE '\\')",
            store.in_json_array(2)
        )
    }

    /// `$2` (ids as a JSON array) and `$5` (the LIKE pattern of the error).
    fn params(&self) -> (Option<String>, Option<String>) {
        (self.ids.as_ref().map(|ids| serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())), like_pattern(self.error_contains.as_deref()))
    }
}

/// `%text%` with LIKE's wildcards escaped (`ESCAPE '\'`).
fn like_pattern(contains: Option<&str>) -> Option<String> {
    contains.map(|e| format!("%{}%", e.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")))
}

/// What a consumer commits in one transaction.
#[derive(Debug, Default)]
pub struct ConsumerCommit {
    /// Consumer name.
    pub consumer: String,
    /// New checkpoint: (partition, next offset).
    pub checkpoint: Option<(u32, u64)>,
    /// Events counted (event_counts consumer): key and how many.
    pub counts: Vec<(CountKey, i64)>,
    /// Dead letters created.
    pub dead_letters: Vec<NewDeadLetter>,
    /// Dead letters whose replay succeeded.
    pub replayed: Vec<String>,
    /// Usage of meters (the meters consumer and meter backfills).
    pub usage: Vec<crate::metering::UsageDelta>,
    /// The effects of a read model outside this crate (written after the
    /// counts and usage, before the checkpoint, in the same transaction).
    pub model: Option<Box<dyn crate::ModelEffect>>,
}

/// A webhook endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// `wh_…`.
    pub id: String,
    /// Workspace whose events it receives.
    pub workspace: String,
    /// Target URL.
    pub url: String,
    /// Event types (`*` = all).
    pub event_types: Vec<String>,
    /// Signing secret `whsec_…`.
    pub secret: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// One delivery (a webhook and an event) and its attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stable `webhook-id`.
    pub id: String,
    /// Webhook.
    pub webhook_id: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Status.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last attempt, if any answer came.
    pub last_status_code: Option<i32>,
    /// Error of the last attempt.
    pub last_error: Option<String>,
    /// When the next attempt is due.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// First attempt.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Sets one checkpoint: ($1 consumer, $2 partition, $3 next offset, $4 now).
pub(crate) const UPSERT_CHECKPOINT: &str = "INSERT INTO consumer_checkpoints (consumer, log_partition, next_offset, updated_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, log_partition) DO UPDATE SET next_offset = excluded.next_offset, \
     updated_at = excluded.updated_at";

type DlqRow = (String, String, String, String, String, i32, i64, String, i32, i64, i64, String, i64);
const DLQ_COLUMNS: &str = "id, consumer, workspace, event_id, event_type, log_partition, log_offset, error, attempts, \
                           first_failed_at, last_failed_at, status, updated_at";

fn dlq(r: DlqRow) -> Result<DeadLetter> {
    let status = r.11.parse().map_err(|e| StoreError::Corrupt(format!("dead letter {}: {e}", r.0)))?;
    Ok(DeadLetter {
        id: r.0,
        consumer: r.1,
        workspace: r.2,
        event_id: r.3,
        event_type: r.4,
        partition: r.5 as u32,
        offset: r.6 as u64,
        error: r.7,
        attempts: r.8 as u32,
        first_failed_at: from_micros(r.9),
        last_failed_at: from_micros(r.10),
        status,
        updated_at: from_micros(r.12),
    })
}

type WebhookRow = (String, String, String, String, String, i64);
type DeliveryRow = (String, String, String, String, String, i32, Option<i32>, Option<String>, Option<i64>, i64, i64);

fn webhook(r: WebhookRow) -> Webhook {
    Webhook {
        id: r.0,
        workspace: r.1,
        url: r.2,
        event_types: serde_json::from_str(&r.3).unwrap_or_default(),
        secret: r.4,
        created_at: from_micros(r.5),
    }
}

/// The statement that inserts `rows` dead letters (a length of one of
/// `metering::values_ranges`: at most 9 texts per backend; placeholders as
/// [`crate::values_rows`] says).
fn dlq_insert_sql(sqlite: bool, rows: usize) -> &'static str {
    static SQL: [std::sync::OnceLock<Vec<String>>; 2] = [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let texts = SQL[usize::from(sqlite)].get_or_init(|| {
        (0..=crate::metering::SQLITE_VALUES_ROWS.ilog2())
            .map(|p| {
                let values = crate::values_rows(sqlite, 1 << p, "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'dead', ?)");
                format!("INSERT INTO dead_letters ({DLQ_COLUMNS}) VALUES {values}")
            })
            .collect()
    });
    debug_assert!(rows.is_power_of_two() && rows <= crate::metering::SQLITE_VALUES_ROWS);
    &texts[rows.ilog2() as usize]
}

/// The SQLite statement that adds `rows` event counts (a length of one of
/// `metering::values_ranges`: at most 9 statement texts are cached).
fn sqlite_counts_sql(rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let texts = SQL.get_or_init(|| {
        (0..=crate::metering::SQLITE_VALUES_ROWS.ilog2())
            .map(|p| {
                format!(
                    "INSERT INTO event_counts (workspace, event_type, customer_id, day, count) VALUES {} \
                     ON CONFLICT (workspace, event_type, customer_id, day) DO UPDATE SET count = event_counts.count + excluded.count",
                    vec!["(?, ?, ?, ?, ?)"; 1 << p].join(", ")
                )
            })
            .collect()
    });
    debug_assert!(rows.is_power_of_two() && rows <= crate::metering::SQLITE_VALUES_ROWS);
    &texts[rows.ilog2() as usize]
}

impl Store {
    /// Checkpoints of a consumer: partition → next offset to process.
    pub async fn checkpoints(&self, consumer: &str) -> Result<HashMap<u32, u64>> {
        let rows: Vec<(i32, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT log_partition, next_offset FROM consumer_checkpoints WHERE consumer = $1")
            .bind(consumer).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(p, o)| (p as u32, o as u64)).collect())
    }

    /// Names of every consumer that has a checkpoint.
    pub async fn consumer_names(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT DISTINCT consumer FROM consumer_checkpoints ORDER BY consumer").fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(c,)| c).collect())
    }

    /// Commits a consumer's effects, checkpoint, new dead letters and
    /// completed replays in one transaction.
    pub async fn commit_consumer(&self, c: &ConsumerCommit) -> Result<()> {
        let now = to_micros(Utc::now());
        let mut counts: HashMap<&CountKey, i64> = HashMap::new();
        for (k, n) in &c.counts {
            *counts.entry(k).or_default() += n;
        }
        let mut keys: Vec<(&CountKey, i64)> = counts.into_iter().collect();
        // In the table's key order: the B-tree writes go through it in order.
        fn order(c: &CountKey) -> (&str, &str, &str, &str) {
            (&c.workspace, &c.event_type, &c.customer_id, &c.day)
        }
        keys.sort_unstable_by(|a, b| order(a.0).cmp(&order(b.0)));
        // The statements after the counts are the same on both backends.
        macro_rules! rest_of_commit {
            ($tx:ident) => {{
                if let Some(m) = &c.model {
                    m.run(crate::Tx::from(&mut *$tx)).await?;
                }
                // Many rows a statement: a hostile workspace's thousands of
                // dead letters must not hold the partition (and the other
                // workspaces on it) for a round trip each.
                for range in crate::metering::values_ranges(c.dead_letters.len()) {
                    let mut q = sqlx::query(dlq_insert_sql(matches!(self, Store::Sqlite(_)), range.len()));
                    for d in &c.dead_letters[range] {
                        q = q
                            .bind(format!("dlq_{}", uuid::Uuid::now_v7().simple()))
                            .bind(&d.consumer)
                            .bind(&d.workspace)
                            .bind(&d.event_id)
                            .bind(&d.event_type)
                            .bind(d.partition as i32)
                            .bind(d.offset as i64)
                            .bind(&d.error)
                            .bind(d.attempts as i32)
                            .bind(to_micros(d.first_failed_at))
                            .bind(to_micros(d.last_failed_at))
                            .bind(now);
                    }
                    q.execute(&mut *$tx).await?;
                }
                for id in &c.replayed {
                    sqlx::query("UPDATE dead_letters SET status = 'replayed', updated_at = $1 WHERE id = $2 AND status = 'replaying'")
                        .bind(now)
                        .bind(id)
                        .execute(&mut *$tx)
                        .await?;
                }
                if let Some((p, next)) = c.checkpoint {
                    sqlx::query(UPSERT_CHECKPOINT).bind(&c.consumer).bind(p as i32).bind(next as i64).bind(now).execute(&mut *$tx).await?;
                }
            }};
        }
        // The counts go as multi-row VALUES on SQLite (see
        // `metering::sqlite_usage_sql`: bound values need no JSON parsing),
        // as arrays on PostgreSQL.
        match self {
            Store::Sqlite(pool) => {
                let mut tx = pool.begin_write().await?;
                for range in crate::metering::values_ranges(keys.len()) {
                    let mut q = sqlx::query(sqlite_counts_sql(range.len()));
                    for (k, n) in &keys[range] {
                        q = q.bind(&k.workspace).bind(&k.event_type).bind(&k.customer_id).bind(&k.day).bind(*n);
                    }
                    q.execute(&mut *tx).await?;
                }
                crate::metering::apply_usage!(sqlite, tx, &c.usage);
                rest_of_commit!(tx);
                tx.commit().await?;
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin_write().await?;
                if !keys.is_empty() {
                    let col = |f: fn(&CountKey) -> &String| keys.iter().map(|(k, _)| f(k).clone()).collect::<Vec<String>>();
                    sqlx::query(
                        "INSERT INTO event_counts (workspace, event_type, customer_id, day, count) \
                             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
                             ON CONFLICT (workspace, event_type, customer_id, day) DO UPDATE SET count = event_counts.count + excluded.count",
                    )
                    .bind(col(|k| &k.workspace))
                    .bind(col(|k| &k.event_type))
                    .bind(col(|k| &k.customer_id))
                    .bind(col(|k| &k.day))
                    .bind(keys.iter().map(|(_, n)| *n).collect::<Vec<i64>>())
                    .execute(&mut *tx)
                    .await?;
                }
                crate::metering::apply_usage!(postgres, tx, &c.usage);
                rest_of_commit!(tx);
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Moves every checkpoint of `consumer` to the given positions; with
    /// `clear`, also empties its read model (it is then rebuilt by the
    /// consumer from those positions). One transaction, with its audit
    /// entry.
    pub async fn reset_consumer(&self, consumer: &str, positions: &[(u32, u64)], clear: Option<&dyn crate::TxWork>, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if let Some(clear) = clear {
                clear.run(crate::Tx::from(&mut *tx)).await?;
            }
            for &(p, next) in positions {
                sqlx::query(UPSERT_CHECKPOINT)
                    .bind(consumer).bind(p as i32).bind(next as i64).bind(now)
                    .execute(&mut *tx).await?;
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Counts of the event_counts read model for a workspace:
    /// (event type, customer id, day, count), optionally filtered.
    pub async fn event_counts(
        &self,
        workspace: &str,
        event_type: Option<&str>,
        customer_id: Option<&str>,
    ) -> Result<Vec<(String, String, String, i64)>> {
        let rows = on_pool!(self, pool => sqlx::query_as(
            "SELECT event_type, customer_id, day, count FROM event_counts WHERE workspace = $1 \
             AND ($2 IS NULL OR event_type = $2) AND ($3 IS NULL OR customer_id = $3) \
             ORDER BY event_type, customer_id, day LIMIT 10000")
            .bind(workspace).bind(event_type).bind(customer_id).fetch_all(pool).await)?;
        Ok(rows)
    }

    /// Dead letters of a workspace, oldest first, optionally of one consumer
    /// and one status.
    pub async fn list_dead_letters(
        &self,
        workspace: &str,
        consumer: Option<&str>,
        status: Option<DeadLetterStatus>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<DeadLetter>> {
        let f = DeadLetterFilter { consumer: consumer.map(str::to_owned), ..Default::default() };
        self.list_dead_letters_where(workspace, &f, status, sluice_core::SortOrder::Asc, cursor, limit).await
    }

    /// Dead letters of a workspace matching `f` (and `status`, when
    /// given), in `order` of their ids (which grow with time).
    pub async fn list_dead_letters_where(
        &self,
        workspace: &str,
        f: &DeadLetterFilter,
        status: Option<DeadLetterStatus>,
        order: sluice_core::SortOrder,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<DeadLetter>> {
        let limit = clamp_limit(limit);
        let page = match order {
            sluice_core::SortOrder::Asc => "AND id > $7 ORDER BY id",
            sluice_core::SortOrder::Desc => "AND ($7 = '' OR id < $7) ORDER BY id DESC",
        };
        let sql =
            format!("SELECT {DLQ_COLUMNS} FROM dead_letters WHERE {} AND ($6 IS NULL OR status = $6) {page} LIMIT $8", DeadLetterFilter::sql(self));
        let (ids, pattern) = f.params();
        let rows: Vec<DlqRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(workspace).bind(&ids).bind(&f.consumer).bind(&f.event_type).bind(&pattern).bind(status.map(DeadLetterStatus::as_str))
            .bind(cursor.unwrap_or("")).bind(limit as i64 + 1)
            .fetch_all(pool).await)?;
        Ok(Page::from_overfetch(rows.into_iter().map(dlq).collect::<Result<Vec<_>>>()?, limit, |d: &DeadLetter| d.id.clone()))
    }

    /// How many dead letters of a workspace waiting (`dead`) match `f`:
    /// what a bulk replay or discard of `f` would touch.
    pub async fn count_dead_letters(&self, workspace: &str, f: &DeadLetterFilter) -> Result<u64> {
        let sql = format!("SELECT COUNT(*) FROM dead_letters WHERE {} AND status = 'dead'", DeadLetterFilter::sql(self));
        let (ids, pattern) = f.params();
        let n: i64 = on_pool!(self, pool => sqlx::query_scalar(&sql)
            .bind(workspace).bind(&ids).bind(&f.consumer).bind(&f.event_type).bind(&pattern).fetch_one(pool).await)?;
        Ok(n.max(0) as u64)
    }

    /// One chunk of a bulk replay or discard: the first `limit` waiting
    /// (`dead`) dead letters matching `f` with an id after `after`, moved
    /// by `action` in one statement; returns their ids. `audit` (when
    /// given) is written in the same transaction if any changed, with the
    /// chunk's `count` added to its details. Entries a replay sends back to
    /// `dead` have ids before the next chunk's `after`, so a bulk run walks
    /// the ids once and never loops on them.
    pub async fn bulk_dead_letters(
        &self,
        workspace: &str,
        action: DeadLetterAction,
        f: &DeadLetterFilter,
        after: &str,
        limit: usize,
        audit: Option<&NewAudit>,
    ) -> Result<Vec<String>> {
        let now = to_micros(Utc::now());
        // The outer `status = 'dead'` is checked again on the row itself
        // (PostgreSQL re-reads a row another transaction changed meanwhile).
        let sql = format!(
            "UPDATE dead_letters SET status = $6, updated_at = $7 WHERE status = 'dead' AND id IN \
             (SELECT id FROM dead_letters WHERE {} AND status = 'dead' AND id > $8 ORDER BY id LIMIT $9) RETURNING id",
            DeadLetterFilter::sql(self)
        );
        let (ids, pattern) = f.params();
        let changed: Vec<String> = crate::write_tx!(self, tx => {
            let changed: Vec<String> = sqlx::query_scalar(&sql)
                .bind(workspace).bind(&ids).bind(&f.consumer).bind(&f.event_type).bind(&pattern)
                .bind(action.status().as_str()).bind(now).bind(after).bind(limit.max(1) as i64)
                .fetch_all(&mut *tx).await?;
            if let Some(audit) = audit.filter(|_| !changed.is_empty()) {
                let a = audit.with_count(changed.len() as u64);
                crate::audit::insert_audit!(tx, &a);
            }
            changed
        })?;
        Ok(changed)
    }

    /// One dead letter of a workspace.
    pub async fn get_dead_letter(&self, workspace: &str, id: &str) -> Result<DeadLetter> {
        let sql = format!("SELECT {DLQ_COLUMNS} FROM dead_letters WHERE workspace = $1 AND id = $2");
        let row: Option<DlqRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(id).fetch_optional(pool).await)?;
        row.map(dlq).ok_or(StoreError::NotFound)?
    }

    /// Number of dead letters waiting (`dead`) per consumer, for a workspace
    /// (or all workspaces with `None`).
    pub async fn dead_letter_counts(&self, workspace: Option<&str>) -> Result<HashMap<String, i64>> {
        let rows: Vec<(String, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT consumer, COUNT(*) FROM dead_letters WHERE status = 'dead' AND ($1 IS NULL OR workspace = $1) GROUP BY consumer")
            .bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().collect())
    }

    /// Marks dead letters for replay (status `dead` → `replaying`) and
    /// returns how many: one by id, or all matching the filters. The
    /// consumer picks them up; each is processed once. One transaction with
    /// its audit entry.
    pub async fn claim_replays(
        &self,
        workspace: &str,
        id: Option<&str>,
        consumer: Option<&str>,
        event_type: Option<&str>,
        error_contains: Option<&str>,
        audit: &NewAudit,
    ) -> Result<u64> {
        let now = to_micros(Utc::now());
        let pattern = like_pattern(error_contains);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query(
                "UPDATE dead_letters SET status = 'replaying', updated_at = $1 WHERE workspace = $2 AND status = 'dead' \
                 AND ($3 IS NULL OR id = $3) AND ($4 IS NULL OR consumer = $4) AND ($5 IS NULL OR event_type = $5) \
                 AND ($6 IS NULL OR lower(error) LIKE lower($6) ESCAPE '\\')")
                .bind(now).bind(workspace).bind(id).bind(consumer).bind(event_type).bind(&pattern)
                .execute(&mut *tx).await?.rows_affected();
            if n > 0 {
                let a = audit.with_count(n);
                crate::audit::insert_audit!(tx, &a);
            }
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Discards a waiting dead letter (`dead` → `discarded`), with its audit entry.
    pub async fn discard_dead_letter(&self, workspace: &str, id: &str, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query("UPDATE dead_letters SET status = 'discarded', updated_at = $1 WHERE workspace = $2 AND id = $3 AND status = 'dead'")
                .bind(now).bind(workspace).bind(id).execute(&mut *tx).await?.rows_affected();
            if n == 0 {
                return Err(StoreError::Conflict("only a dead letter in status `dead` can be discarded".into()));
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Dead letters of `consumer` claimed for replay, oldest first.
    pub async fn replays_for(&self, consumer: &str, limit: i64) -> Result<Vec<DeadLetter>> {
        let sql = format!("SELECT {DLQ_COLUMNS} FROM dead_letters WHERE consumer = $1 AND status = 'replaying' ORDER BY id LIMIT $2");
        let rows: Vec<DlqRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(consumer).bind(limit).fetch_all(pool).await)?;
        rows.into_iter().map(dlq).collect()
    }

    /// A replay failed again: back to `dead` with the new error and attempts.
    pub async fn replay_failed(&self, id: &str, error: &str, attempts: u32) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => sqlx::query(
            "UPDATE dead_letters SET status = 'dead', error = $1, attempts = attempts + $2, last_failed_at = $3, updated_at = $3 \
             WHERE id = $4 AND status = 'replaying'")
            .bind(error).bind(attempts as i32).bind(now).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    // ---- webhooks ----

    /// Registers a webhook with the starting checkpoints of its consumer
    /// (the log's end: it receives events accepted after this call) and its
    /// audit entry, in one transaction.
    pub async fn create_webhook(&self, w: &Webhook, consumer: &str, start: &[(u32, u64)], created_by: &str, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for &(p, next) in start {
                sqlx::query(UPSERT_CHECKPOINT)
                    .bind(consumer).bind(p as i32).bind(next as i64).bind(now)
                    .execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO webhooks (id, workspace, url, event_types, secret, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(&w.id).bind(&w.workspace).bind(&w.url)
                .bind(serde_json::to_string(&w.event_types).unwrap_or_else(|_| "[]".into()))
                .bind(&w.secret).bind(to_micros(w.created_at)).bind(created_by)
                .execute(&mut *tx).await?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Live webhooks of a workspace, or of all workspaces with `None`.
    pub async fn list_webhooks(&self, workspace: Option<&str>) -> Result<Vec<Webhook>> {
        let rows: Vec<WebhookRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, workspace, url, event_types, secret, created_at FROM webhooks \
             WHERE deleted_at IS NULL AND ($1 IS NULL OR workspace = $1) ORDER BY id")
            .bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(webhook).collect())
    }

    /// One live webhook of a workspace.
    pub async fn get_webhook(&self, workspace: &str, id: &str) -> Result<Webhook> {
        let row: Option<WebhookRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, workspace, url, event_types, secret, created_at FROM webhooks \
             WHERE deleted_at IS NULL AND workspace = $1 AND id = $2")
            .bind(workspace).bind(id).fetch_optional(pool).await)?;
        row.map(webhook).ok_or(StoreError::NotFound)
    }

    /// Deletes a webhook (deliveries stop), with its audit entry.
    pub async fn delete_webhook(&self, workspace: &str, id: &str, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query("UPDATE webhooks SET deleted_at = $1 WHERE workspace = $2 AND id = $3 AND deleted_at IS NULL")
                .bind(now).bind(workspace).bind(id).execute(&mut *tx).await?.rows_affected();
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records the state of a delivery after an attempt.
    pub async fn upsert_delivery(&self, d: &Delivery) -> Result<()> {
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type, status, attempts, last_status_code, last_error, \
             next_retry_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, attempts = excluded.attempts, \
             last_status_code = excluded.last_status_code, last_error = excluded.last_error, \
             next_retry_at = excluded.next_retry_at, updated_at = excluded.updated_at")
            .bind(&d.id).bind(&d.webhook_id).bind(&d.event_id).bind(&d.event_type).bind(d.status.as_str())
            .bind(d.attempts as i32).bind(d.last_status_code).bind(&d.last_error)
            .bind(d.next_retry_at.map(to_micros)).bind(to_micros(d.created_at)).bind(to_micros(d.updated_at))
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// A delivery by id.
    pub async fn get_delivery(&self, id: &str) -> Result<Option<Delivery>> {
        let row: Option<DeliveryRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, webhook_id, event_id, event_type, status, attempts, last_status_code, last_error, next_retry_at, \
             created_at, updated_at FROM webhook_deliveries WHERE id = $1")
            .bind(id).fetch_optional(pool).await)?;
        row.map(delivery).transpose()
    }

    /// Deliveries of a webhook, oldest first.
    pub async fn list_deliveries(&self, webhook_id: &str, cursor: Option<&str>, limit: usize) -> Result<Page<Delivery>> {
        let limit = clamp_limit(limit);
        let rows: Vec<DeliveryRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, webhook_id, event_id, event_type, status, attempts, last_status_code, last_error, next_retry_at, \
             created_at, updated_at FROM webhook_deliveries WHERE webhook_id = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(webhook_id).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        Ok(Page::from_overfetch(rows.into_iter().map(delivery).collect::<Result<Vec<_>>>()?, limit, |d: &Delivery| d.id.clone()))
    }
}

fn delivery(r: DeliveryRow) -> Result<Delivery> {
    let status = r.4.parse().map_err(|e| StoreError::Corrupt(format!("delivery {}: {e}", r.0)))?;
    Ok(Delivery {
        id: r.0,
        webhook_id: r.1,
        event_id: r.2,
        event_type: r.3,
        status,
        attempts: r.5 as u32,
        last_status_code: r.6,
        last_error: r.7,
        next_retry_at: r.8.map(from_micros),
        created_at: from_micros(r.9),
        updated_at: from_micros(r.10),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::metering::UsageDelta;
    use rust_decimal::Decimal;

    fn delta(customer: &str, bucket: i64, v: &str, at: i64, unique: Option<&str>) -> UsageDelta {
        let v: Decimal = v.parse().unwrap();
        UsageDelta {
            workspace: "w".into(),
            meter: "m".into(),
            customer_id: customer.into(),
            subscription_id: "".into(),
            group_key: "".into(),
            bucket_start: bucket,
            count: 1,
            sum: v,
            min: Some(v),
            max: Some(v),
            latest_at: Some(at),
            latest_value: Some(v),
            unique: unique.map(str::to_owned),
        }
    }

    #[test]
    fn a_folder_folds_step_by_step_as_all_at_once() {
        let key = |c: &str| CountKey { workspace: "w".into(), event_type: "t".into(), customer_id: c.into(), day: "2024-01-01".into() };
        let usage = || {
            vec![
                delta("a", 0, "0.1", 5, None),
                delta("b", 0, "2", 1, None),
                delta("a", 0, "0.2", 5, None),
                delta("a", 900, "7", 9, None),
                delta("a", 0, "1", 0, Some("x")),
                delta("a", 0, "1", 0, Some("x")),
            ]
        };
        let mut compacted = ConsumerCommit { usage: usage(), counts: vec![(key("a"), 1), (key("b"), 2), (key("a"), 3)], ..Default::default() };
        Folder::of(&mut compacted);
        // The same effects added in three steps, one of them an unfolded commit.
        let mut c = ConsumerCommit { usage: usage()[..2].to_vec(), counts: vec![(key("a"), 1), (key("a"), 0)], ..Default::default() };
        let mut folder = Folder::of(&mut c);
        assert_eq!(c.usage.len(), 2);
        assert_eq!(c.counts, vec![(key("a"), 1)]);
        folder.add_usage(&mut c, usage()[2..].to_vec()).expect("no overflow");
        folder.add_counts(&mut c, [(key("b"), 2), (key("a"), 3)]);
        let sorted = |v: &[UsageDelta]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| (a.unique.is_some(), a.sort_key()).cmp(&(b.unique.is_some(), b.sort_key())));
            v
        };
        assert_eq!(sorted(&c.usage), sorted(&compacted.usage));
        assert_eq!(c.counts, compacted.counts);
        assert_eq!(c.usage.len(), 5);
    }

    #[test]
    fn folding_merges_equal_buckets_and_keeps_uniques() {
        let key = |c: &str| CountKey { workspace: "w".into(), event_type: "t".into(), customer_id: c.into(), day: "2024-01-01".into() };
        let mut c = ConsumerCommit {
            usage: vec![
                delta("a", 0, "0.1", 5, None),
                delta("b", 0, "2", 1, None),
                delta("a", 0, "0.2", 5, None), // same latest_at: the later one wins
                delta("a", 900, "7", 9, None),
                delta("a", 0, "1", 0, Some("x")),
                delta("a", 0, "1", 0, Some("x")),
            ],
            counts: vec![(key("a"), 1), (key("b"), 2), (key("a"), 3)],
            ..Default::default()
        };
        Folder::of(&mut c);
        assert_eq!(c.usage.len(), 5);
        let find = |cust: &str, at: i64| {
            c.usage.iter().filter(|d| d.unique.is_none() && &*d.customer_id == cust && d.bucket_start == at).collect::<Vec<_>>()
        };
        let a0 = find("a", 0);
        assert_eq!(a0.len(), 1);
        let a0 = a0[0];
        assert_eq!(a0.count, 2);
        assert_eq!(a0.sum, "0.3".parse::<Decimal>().unwrap());
        assert_eq!(a0.min, Some("0.1".parse().unwrap()));
        assert_eq!(a0.max, Some("0.2".parse().unwrap()));
        assert_eq!(a0.latest_value, Some("0.2".parse().unwrap()));
        assert_eq!(find("b", 0).len(), 1);
        assert_eq!(find("a", 900)[0].sum, "7".parse::<Decimal>().unwrap());
        assert_eq!(c.usage.iter().filter(|d| d.unique.is_some()).count(), 2);
        assert_eq!(c.counts, vec![(key("a"), 4), (key("b"), 2)]);
    }
}
