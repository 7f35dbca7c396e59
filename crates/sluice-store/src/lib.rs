//! The Sluice state store: workspaces, keys, the event id index, and (in
//! later components) read models, jobs and checkpoints.
//!
//! One type, [`Store`], with one backend per variant: SQLite for the embedded
//! default and PostgreSQL for scale-out. Both run the same SQL where the
//! dialects agree (`$1` placeholders work on both, see [`on_pool!`]); where
//! they differ (bulk inserts, array parameters) a method has one arm per
//! backend. The conformance suite in `tests/conformance.rs` runs every test
//! against both, so backends cannot drift apart.
//!
//! Times are stored as Unix microseconds (`BIGINT`) on both backends so that
//! ordering, comparison and round-tripping are identical.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sluice_core::Scope;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub mod audit;
pub mod billing;
mod consumers;
mod events;
pub mod health;
mod in_lists;
mod jobs;
mod keys;
mod lake;
pub(crate) mod metering;
mod model;
mod overview;
mod people;
pub mod schemas;
mod sessions;
pub mod testing;
mod workspaces;

pub use audit::{AuditEntry, NewAudit};
pub use billing::{BillingCommit, InvoiceFilter, InvoiceRow, InvoiceStatus, NewInvoice, OutboxRow, PlanRow, SubscriptionRow, UnknownInvoiceStatus};
pub use consumers::{
    ConsumerCommit, CountKey, DeadLetter, DeadLetterAction, DeadLetterFilter, DeadLetterStatus, Delivery, DeliveryStatus, Folder, NewDeadLetter,
    UnknownDeadLetterStatus, UnknownDeliveryStatus, Webhook,
};
pub use health::{CustomerHealthRow, EventsWanted, HealthConfigRow, HealthEventRun, HealthHistoryRow, HealthSort, OverrideRow};
pub use jobs::{BulkJobs, Job, JobEnd, JobSelection, NewJob};
pub use keys::{ApiKey, NewApiKey};
pub use lake::{EventSchema, LakeFile, LakeSnapshot, SavedQuery};
pub use metering::{Meter, UsageBucket, UsageBucketKey, UsageDelta, UsageOutline, UsageOverflow};
pub use model::{ClearEventCounts, ModelEffect, Tx, TxFuture, TxWork};
pub use overview::{ChangeMarks, Waiting};
pub use people::{CustomerRecord, UserRecord};
pub use sessions::{NewSession, Session};
pub use workspaces::Workspace;

/// Errors of the state store. Each maps to a stable API error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint was violated (e.g. a workspace name already taken).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database URL could not be understood.
    #[error("invalid state store URL: {0}")]
    InvalidUrl(String),
    /// Anything the database reported. Never shown to API clients.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Schema migration failed on start.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value this version cannot read (e.g. an unknown meter
    /// aggregation): never replaced by a default.
    #[error("unreadable stored value: {0}")]
    Corrupt(String),
    /// A commit would overflow these usage buckets; nothing was written.
    /// Permanent: caused by the events' values, not by the store.
    #[error("usage would overflow in {} bucket(s): {}", .0.len(), .0.first().map(|o| o.to_string()).unwrap_or_default())]
    UsageOverflow(Vec<crate::metering::UsageOverflow>),
}

sluice_core::error_codes!(StoreError { NotFound => "store.not_found", Conflict => "store.conflict", InvalidUrl => "store.invalid_url", Database => "store.database", Migrate => "store.migrate", Corrupt => "store.corrupt", UsageOverflow => "store.usage_overflow" });

impl StoreError {
    /// True when the failure comes from the data written, not from the
    /// store (retrying the same write cannot succeed): usage overflow, and
    /// values the database refuses (PostgreSQL's classes 22, data exception,
    /// such as a NUL character in text, 23, a constraint, and 54, a value
    /// too large for an index; SQLite's TOOBIG, CONSTRAINT and MISMATCH).
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::UsageOverflow(_) => true,
            StoreError::Database(sqlx::Error::Database(db)) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                // PostgreSQL: 22 data exception, 23 integrity constraint,
                // 54 program limit (an index row too large); SQLite: 18
                // TOOBIG, 19 CONSTRAINT, 20 MISMATCH.
                code.starts_with("22") || code.starts_with("23") || code.starts_with("54") || ["18", "19", "20"].contains(&code.as_str())
            }
            _ => false,
        }
    }
}

impl StoreError {
    /// Turns a unique-violation into [`StoreError::Conflict`] with the given message.
    fn conflict_on_unique(e: sqlx::Error, what: impl Into<String>) -> StoreError {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what.into()),
            _ => StoreError::Database(e),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A page of a list, with the cursor of the next page.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// Items of this page.
    pub data: Vec<T>,
    /// Opaque cursor of the next page, `None` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from `limit + 1` fetched rows: the extra row only tells
    /// that there is a next page.
    fn from_overfetch(mut rows: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> Self {
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(cursor_of)
        } else {
            None
        };
        Page { data: rows, next_cursor }
    }
}

/// The state store, on one of its backends.
#[derive(Clone, Debug)]
pub enum Store {
    /// Embedded SQLite database file (WAL mode).
    Sqlite(SqlitePool),
    /// PostgreSQL server.
    Postgres(PgPool),
}

/// Runs the same code against whichever pool the store has. The body is
/// type-checked once per backend, so shared SQL must be valid on both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::Store::Sqlite($pool) => $body,
            $crate::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Runs statements on `&mut *$tx` in one write transaction
/// ([`BeginWrite`]) and commits; evaluates to the body's value.
///
/// A single write that may wait behind a large commit (a consumer writing
/// thousands of usage buckets) uses this rather than an autocommit
/// statement on the pool: on SQLite an autocommit write waits for the write
/// lock in the busy handler (sleeps of up to 100 ms), not in the write
/// queue, and job claims and progress would wait there during imports.
/// Short writes that rarely meet a large commit (a job's enqueue and end,
/// heartbeats) stay autocommit statements: the transaction's extra round
/// trips cost the job runner a large share of its throughput on SQLite and
/// PostgreSQL (measured: docs/BENCHMARKS.md, "Jobs").
macro_rules! write_tx {
    ($store:expr, $tx:ident => $body:expr) => {
        $crate::on_pool!($store, pool => {
            let mut $tx = pool.begin_write().await?;
            let value = $body;
            $tx.commit().await?;
            Ok::<_, sqlx::Error>(value)
        })
    };
}
pub(crate) use write_tx;

/// Runs one autocommit write statement `$body` on `$pool`; on SQLite after
/// waiting for the write lock of [`BeginWrite`], so that it waits in that
/// FIFO rather than in SQLite's busy handler (sleeps of up to 100 ms). For
/// writes that meet large commits but need no transaction: a job's end
/// comes right when an import's consumers commit, so in the busy handler it
/// would sleep through their commits (measured: docs/BENCHMARKS.md, "CSV
/// usage import"), and one statement costs a third of the round trips of
/// `BEGIN`, statement, `COMMIT`.
macro_rules! write_stmt {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::Store::Sqlite($pool) => {
                let _gate = $crate::sqlite_gate($pool).lock_owned().await;
                $body
            }
            $crate::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use write_stmt;

/// Starting a write transaction on either backend (`pool.begin_write()`).
///
/// On SQLite, only one transaction writes at a time. Write transactions
/// first take an async lock per database file (FIFO, woken at once when the
/// previous writer commits), then `BEGIN IMMEDIATE`. Without the lock, the
/// waiting happened in SQLite's busy handler, which sleeps in steps of up to
/// 100 ms: under a burst (an import with three consumers, the lake writer
/// and the job runner all writing) most of the time went to those sleeps.
/// And without `IMMEDIATE`, a transaction that reads first and writes later
/// fails at once with "database is locked" when another connection
/// committed in between (SQLite cannot wait there: its snapshot is stale).
pub(crate) trait BeginWrite {
    type Db: sqlx::Database;
    fn begin_write(&self) -> impl std::future::Future<Output = std::result::Result<WriteTx<Self::Db>, sqlx::Error>> + Send + '_;
}

/// A write transaction (see [`BeginWrite`]); dereferences to the connection
/// like a `sqlx::Transaction`.
pub(crate) struct WriteTx<DB: sqlx::Database> {
    tx: sqlx::Transaction<'static, DB>,
    _gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<DB: sqlx::Database> std::ops::Deref for WriteTx<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for WriteTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

impl<DB: sqlx::Database> WriteTx<DB> {
    /// Commits (and lets the next writer in).
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls back (and lets the next writer in).
    pub(crate) async fn rollback(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// The write lock of every SQLite database file this process opened.
pub(crate) fn sqlite_gate(pool: &sqlx::SqlitePool) -> Arc<tokio::sync::Mutex<()>> {
    static GATES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        std::sync::LazyLock::new(Default::default);
    let file = pool.connect_options().get_filename().display().to_string();
    GATES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(file).or_default().clone()
}

impl BeginWrite for sqlx::SqlitePool {
    type Db = sqlx::Sqlite;
    async fn begin_write(&self) -> std::result::Result<WriteTx<sqlx::Sqlite>, sqlx::Error> {
        let gate = sqlite_gate(self).lock_owned().await;
        let tx = self.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx { tx, _gate: Some(gate) })
    }
}

impl BeginWrite for sqlx::PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> std::result::Result<WriteTx<sqlx::Postgres>, sqlx::Error> {
        Ok(WriteTx { tx: self.begin().await?, _gate: None })
    }
}

impl Store {
    /// Connects to `sqlite://path` or `postgres://…` and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: keys, workspaces and revocations cannot be rebuilt from
                // the log, so a commit must survive a power loss. Ingest commits
                // once per group, so this costs one fsync per group, not per event.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // 2 MiB of page cache per connection (SQLite's default; 16 MiB
                // for the pool): every connection caches what it touched, so
                // the cache multiplies by the pool size in the server's
                // memory. Pages beyond it come from the
                // OS page cache, a copy away.
                .pragma("cache_size", "-2048");
            let pool = SqlitePoolOptions::new().max_connections(8).connect_with(opts).await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Store::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
            let pool = PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect_with(opts).await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            Store::Postgres(pool)
        } else {
            return Err(StoreError::InvalidUrl(format!("{url:?}: expected sqlite://… or postgres://…")));
        };
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Is the database reachable? Used by `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Closes all connections.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}

/// Microseconds since the Unix epoch.
pub fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`].
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `rows` copies of `row` joined by commas, for a multi-row `VALUES` list
/// whose parameters are all bound in order: `row` marks each parameter
/// with `?`. PostgreSQL gets them numbered `$1, $2, …`; SQLite keeps the
/// anonymous `?`. Why not `$n` on SQLite too: SQLite keeps named
/// parameters (`$n`, and `?n`) in a list it searches linearly, when it
/// parses the statement and again for each parameter sqlx binds
/// (`sqlite3_bind_parameter_name`), so a statement of n named parameters
/// costs O(n²): in a commit of 256 dead letters (3,072 parameters) that
/// search is most of the work, which held the partition, and every
/// workspace on it, behind a hostile workspace's bad events (measured:
/// docs/BENCHMARKS.md, "Consumers"). Anonymous parameters are numbered as
/// they come, with no list.
pub fn values_rows(sqlite: bool, rows: usize, row: &str) -> String {
    let mut out = String::with_capacity((row.len() + 2) * rows);
    let mut n = 0usize;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        if sqlite {
            out.push_str(row);
            continue;
        }
        for (i, part) in row.split('?').enumerate() {
            if i > 0 {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            out.push_str(part);
        }
    }
    out
}

impl Store {
    /// `IN (…)` over the texts of a JSON array bound as parameter `$n` (a
    /// string): one statement for a whole set of ids on both backends,
    /// without a statement text per list length. `$n` may be NULL (SQLite's
    /// `json_each(NULL)` and PostgreSQL's `jsonb_array_elements_text(NULL)`
    /// yield no rows), so callers can write `($n IS NULL OR id {in})`.
    pub(crate) fn in_json_array(&self, n: usize) -> String {
        match self {
            Store::Sqlite(_) => format!("IN (SELECT value FROM json_each(${n}))"),
            Store::Postgres(_) => format!("IN (SELECT jsonb_array_elements_text(${n}::jsonb))"),
        }
    }
}

/// Refreshes PostgreSQL's planner statistics of those of `tables` (names
/// of this crate's tables, never user input) whose statistics are missing
/// or stale, by autovacuum's own default rule: more rows changed since the
/// last `ANALYZE` than 50 + 10 % of the rows it counted then. Returns the
/// tables it analyzed. Why not simply `ANALYZE` them all: a large run (a
/// billing run, a health recompute) needs fresh statistics when a bulk
/// load or autovacuum being off left them missing, but analyzing a table
/// that did not change costs the same sample every time and tells the
/// planner nothing new (docs/BENCHMARKS.md, "Customer health"). SQLite
/// has nothing to refresh (its plans follow the primary keys).
pub(crate) async fn analyze_stale(store: &Store, tables: &[&str]) -> Result<Vec<String>> {
    let Store::Postgres(pool) = store else { return Ok(Vec::new()) };
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema() \
         LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE c.relname = ANY($1) AND c.relkind = 'r' AND (s.relid IS NULL \
            OR COALESCE(s.last_analyze, s.last_autoanalyze) IS NULL \
            OR s.n_mod_since_analyze > 50 + 0.1 * GREATEST(c.reltuples, 0)) \
         ORDER BY c.relname",
    )
    .bind(tables)
    .fetch_all(pool)
    .await?;
    if !stale.is_empty() {
        // The names came from `tables`, this crate's constants, through the catalog.
        sqlx::query(&format!("ANALYZE {}", stale.join(", "))).execute(pool).await?;
        tracing::info!(tables = ?stale, "refreshed the planner statistics of stale tables");
    }
    Ok(stale)
}

fn parse_scope(s: &str) -> Scope {
    // The CHECK constraint makes anything else impossible.
    s.parse().unwrap_or(Scope::Read)
}

fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, 1000)
}

/// Re-export so the API can recognise pool exhaustion without depending on sqlx.
pub use sqlx as sqlx_reexport;

#[cfg(test)]
mod values_rows_tests {
    use super::values_rows;

    #[test]
    fn numbers_parameters_on_postgres_and_keeps_them_anonymous_on_sqlite() {
        assert_eq!(values_rows(false, 2, "(?, 'dead', ?)"), "($1, 'dead', $2), ($3, 'dead', $4)");
        assert_eq!(values_rows(true, 2, "(?, 'dead', ?)"), "(?, 'dead', ?), (?, 'dead', ?)");
        assert_eq!(values_rows(false, 1, "(CAST(? AS TEXT))"), "(CAST($1 AS TEXT))");
        assert_eq!(values_rows(true, 0, "(?)"), "");
    }
}
