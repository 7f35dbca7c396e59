//! The event lake's manifest (which Parquet files make up the lake), declared
//! event schemas, and saved queries.
//!
//! The manifest is the lake's source of truth: a query reads exactly the
//! files listed here, read in the same snapshot as the lake writer's
//! checkpoints, so every event is either in a listed file or after the
//! checkpoint (and read from the log) — never both, never neither.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::consumers::UPSERT_CHECKPOINT;
use crate::BeginWrite as _;
use crate::{from_micros, on_pool, to_micros, Result, Store, StoreError};

pub use sluice_core::lake::LakeFile;

/// What a query reads: the committed files of a workspace and the lake
/// writer's checkpoints, from one consistent snapshot.
#[derive(Debug, Clone, Default)]
pub struct LakeSnapshot {
    /// Committed files.
    pub files: Vec<LakeFile>,
    /// Lake writer checkpoints: partition → next offset not yet in a file.
    pub checkpoints: HashMap<u32, u64>,
}

/// Declared property types of one event type.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSchema {
    /// Workspace.
    pub workspace: String,
    /// Event type.
    pub event_type: String,
    /// Property name → `int64` | `float64` | `bool` | `string` | `timestamp`, in declaration order.
    pub properties: Vec<(String, String)>,
    /// Refuse events that violate the schema at ingest.
    pub enforce: bool,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// A saved query.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedQuery {
    /// Workspace.
    pub workspace: String,
    /// Name, unique in the workspace.
    pub name: String,
    /// The SQL.
    pub sql: String,
    /// Cron schedule, if scheduled.
    pub schedule: Option<String>,
    /// Export settings (JSON: `format`, `path`), if exported.
    pub export: Option<serde_json::Value>,
    /// Next scheduled run.
    pub next_run_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

type FileRow = (String, String, String, i64, i64, i64, i64, i64, i64);
const FILE_COLUMNS: &str = "path, workspace, content_type, hour_start, row_count, bytes, min_time, max_time, created_at";

fn file(r: FileRow) -> LakeFile {
    LakeFile {
        path: r.0,
        workspace: r.1,
        content_type: r.2,
        hour_start: from_micros(r.3),
        row_count: r.4 as u64,
        bytes: r.5 as u64,
        min_time: from_micros(r.6),
        max_time: from_micros(r.7),
        created_at: from_micros(r.8),
    }
}

type SchemaRow = (String, String, String, bool, i64);

fn schema(r: SchemaRow) -> EventSchema {
    let props: Vec<(String, String)> = serde_json::from_str(&r.2).unwrap_or_default();
    EventSchema { workspace: r.0, event_type: r.1, properties: props, enforce: r.3, updated_at: from_micros(r.4) }
}

type QueryRow = (String, String, String, Option<String>, Option<String>, Option<i64>, i64, i64);
const QUERY_COLUMNS: &str = "workspace, name, sql, schedule, export, next_run_at, created_at, updated_at";

fn saved(r: QueryRow) -> SavedQuery {
    SavedQuery {
        workspace: r.0,
        name: r.1,
        sql: r.2,
        schedule: r.3,
        export: r.4.and_then(|e| serde_json::from_str(&e).ok()),
        next_run_at: r.5.map(from_micros),
        created_at: from_micros(r.6),
        updated_at: from_micros(r.7),
    }
}

macro_rules! insert_files {
    ($tx:ident, $files:expr) => {
        for f in $files {
            sqlx::query(&format!("INSERT INTO lake_files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"))
                .bind(&f.path)
                .bind(&f.workspace)
                .bind(&f.content_type)
                .bind(to_micros(f.hour_start))
                .bind(f.row_count as i64)
                .bind(f.bytes as i64)
                .bind(to_micros(f.min_time))
                .bind(to_micros(f.max_time))
                .bind(to_micros(f.created_at))
                .execute(&mut *$tx)
                .await?;
        }
    };
}

impl Store {
    /// Commits new lake files together with the lake writer's checkpoints
    /// (`consumer` is the writer's checkpoint name): both or neither.
    pub async fn lake_commit(&self, consumer: &str, added: &[LakeFile], checkpoints: &[(u32, u64)]) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            insert_files!(tx, added);
            for (p, next) in checkpoints {
                sqlx::query(UPSERT_CHECKPOINT).bind(consumer).bind(*p as i32).bind(*next as i64).bind(now).execute(&mut *tx).await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// Replaces files (compaction): removes `removed` and adds `added` in one
    /// transaction. Fails with a conflict, changing nothing, if any of
    /// `removed` is no longer in the manifest.
    pub async fn lake_swap(&self, added: &[LakeFile], removed: &[String]) -> Result<()> {
        let ok = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut all = true;
            for p in removed {
                let n = sqlx::query("DELETE FROM lake_files WHERE path = $1").bind(p).execute(&mut *tx).await?.rows_affected();
                all &= n == 1;
            }
            if all {
                insert_files!(tx, added);
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok::<bool, sqlx::Error>(all)
        })?;
        if !ok {
            return Err(StoreError::Conflict("the files to replace changed meanwhile".into()));
        }
        Ok(())
    }

    /// Committed files (of one workspace, when given), by partition and path.
    pub async fn lake_files(&self, workspace: Option<&str>) -> Result<Vec<LakeFile>> {
        let sql =
            format!("SELECT {FILE_COLUMNS} FROM lake_files WHERE ($1 IS NULL OR workspace = $1) ORDER BY workspace, content_type, hour_start, path");
        let rows: Vec<FileRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(file).collect())
    }

    /// A workspace's committed files and the lake writer's checkpoints, read
    /// in one snapshot.
    pub async fn lake_snapshot(&self, workspace: &str, consumer: &str) -> Result<LakeSnapshot> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM lake_files WHERE workspace = $1 ORDER BY content_type, hour_start, path");
        let cps = "SELECT log_partition, next_offset FROM consumer_checkpoints WHERE consumer = $1";
        let (rows, cp): (Vec<FileRow>, Vec<(i32, i64)>) = match self {
            Store::Sqlite(pool) => {
                // A deferred transaction in WAL mode reads one snapshot from its first read.
                let mut tx = pool.begin().await?;
                let rows = sqlx::query_as(&sql).bind(workspace).fetch_all(&mut *tx).await?;
                let cp = sqlx::query_as(cps).bind(consumer).fetch_all(&mut *tx).await?;
                tx.commit().await?;
                (rows, cp)
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
                let rows = sqlx::query_as(&sql).bind(workspace).fetch_all(&mut *tx).await?;
                let cp = sqlx::query_as(cps).bind(consumer).fetch_all(&mut *tx).await?;
                tx.commit().await?;
                (rows, cp)
            }
        };
        Ok(LakeSnapshot { files: rows.into_iter().map(file).collect(), checkpoints: cp.into_iter().map(|(p, o)| (p as u32, o as u64)).collect() })
    }

    /// Declares (or replaces) the property types of an event type.
    pub async fn put_event_schema(&self, s: &EventSchema) -> Result<()> {
        let props = serde_json::to_string(&s.properties).unwrap_or_else(|_| "[]".into());
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO event_schemas (workspace, event_type, properties, enforce, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (workspace, event_type) DO UPDATE SET properties = excluded.properties, enforce = excluded.enforce, \
             updated_at = excluded.updated_at")
            .bind(&s.workspace).bind(&s.event_type).bind(props).bind(s.enforce).bind(to_micros(s.updated_at))
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Removes an event type's schema.
    pub async fn delete_event_schema(&self, workspace: &str, event_type: &str) -> Result<()> {
        let n = on_pool!(self, pool => sqlx::query("DELETE FROM event_schemas WHERE workspace = $1 AND event_type = $2")
            .bind(workspace).bind(event_type).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Declared schemas (of one workspace, when given).
    pub async fn event_schemas(&self, workspace: Option<&str>) -> Result<Vec<EventSchema>> {
        let rows: Vec<SchemaRow> = on_pool!(self, pool => sqlx::query_as(
            "SELECT workspace, event_type, properties, enforce, updated_at FROM event_schemas \
             WHERE ($1 IS NULL OR workspace = $1) ORDER BY workspace, event_type")
            .bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(schema).collect())
    }

    /// Creates or replaces a saved query.
    pub async fn put_saved_query(&self, q: &SavedQuery) -> Result<()> {
        let export = q.export.as_ref().map(|e| e.to_string());
        on_pool!(self, pool => sqlx::query(&format!(
            "INSERT INTO saved_queries ({QUERY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (workspace, name) DO UPDATE SET sql = excluded.sql, schedule = excluded.schedule, \
             export = excluded.export, next_run_at = excluded.next_run_at, updated_at = excluded.updated_at"))
            .bind(&q.workspace).bind(&q.name).bind(&q.sql).bind(&q.schedule).bind(export)
            .bind(q.next_run_at.map(to_micros)).bind(to_micros(q.created_at)).bind(to_micros(q.updated_at))
            .execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Saved queries (of one workspace, when given), by name.
    pub async fn saved_queries(&self, workspace: Option<&str>) -> Result<Vec<SavedQuery>> {
        let rows: Vec<QueryRow> = on_pool!(self, pool => sqlx::query_as(&format!(
            "SELECT {QUERY_COLUMNS} FROM saved_queries WHERE ($1 IS NULL OR workspace = $1) ORDER BY workspace, name"))
            .bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(saved).collect())
    }

    /// One saved query.
    pub async fn saved_query(&self, workspace: &str, name: &str) -> Result<SavedQuery> {
        let row: Option<QueryRow> = on_pool!(self, pool => sqlx::query_as(&format!(
            "SELECT {QUERY_COLUMNS} FROM saved_queries WHERE workspace = $1 AND name = $2"))
            .bind(workspace).bind(name).fetch_optional(pool).await)?;
        row.map(saved).ok_or(StoreError::NotFound)
    }

    /// Deletes a saved query.
    pub async fn delete_saved_query(&self, workspace: &str, name: &str) -> Result<()> {
        let n = on_pool!(self, pool => sqlx::query("DELETE FROM saved_queries WHERE workspace = $1 AND name = $2")
            .bind(workspace).bind(name).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Moves a scheduled query's next run, only if it is still `expected`
    /// (so two processes never both run one occurrence).
    pub async fn advance_saved_query(&self, workspace: &str, name: &str, expected: DateTime<Utc>, next: Option<DateTime<Utc>>) -> Result<bool> {
        let n = on_pool!(self, pool => sqlx::query(
            "UPDATE saved_queries SET next_run_at = $1 WHERE workspace = $2 AND name = $3 AND next_run_at = $4")
            .bind(next.map(to_micros)).bind(workspace).bind(name).bind(to_micros(expected))
            .execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
    }
}
