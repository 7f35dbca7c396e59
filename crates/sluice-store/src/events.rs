//! The event id index: deduplication by `(workspace, id)` and the position
//! of every accepted event in the log.
//!
//! The event log is the source of truth; this index is derived from it. The
//! ingest pipeline appends to the log first (durably) and then records the
//! new rows here together with `log_progress` in one transaction. If the
//! process dies in between, the rows are rebuilt on start from the log
//! records at and after `log_progress` (see `sluice-ingest`), so the index
//! never lags the log once the server is ready.

use std::collections::HashSet;

use sluice_core::RecordEffect;

use crate::{on_pool, Result, Store};

/// One accepted event's entry in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    /// Workspace name.
    pub workspace: String,
    /// Event id.
    pub event_id: String,
    /// Log partition.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Receive time, Unix microseconds (drives the dedup window).
    pub received_at_us: i64,
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping of a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// The part of the index transaction after the rows, the same on both
/// backends: record effects, the log progress, commit.
macro_rules! finish_index_tx {
    ($tx:ident, $effects:expr, $progress:expr) => {{
        crate::people::apply_effects!($tx, $effects);
        for &(p, next) in $progress {
            sqlx::query(
                "INSERT INTO log_progress (log_partition, next_offset) VALUES ($1, $2) \
                 ON CONFLICT (log_partition) DO UPDATE SET next_offset = excluded.next_offset",
            )
            .bind(p as i32)
            .bind(next as i64)
            .execute(&mut *$tx)
            .await?;
        }
        $tx.commit().await?;
    }};
}

impl Store {
    /// Which of `ids` (all in `workspace`) are already in the index.
    pub async fn existing_event_ids(&self, workspace: &str, ids: &[&str]) -> Result<HashSet<String>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let found: Vec<(String,)> = match self {
            Store::Sqlite(pool) => {
                let json = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
                sqlx::query_as(
                    "SELECT event_id FROM event_index WHERE workspace = $1 \
                     AND event_id IN (SELECT value FROM json_each($2))",
                )
                .bind(workspace)
                .bind(json)
                .fetch_all(pool)
                .await?
            }
            Store::Postgres(pool) => {
                sqlx::query_as("SELECT event_id FROM event_index WHERE workspace = $1 AND event_id = ANY($2)")
                    .bind(workspace)
                    .bind(ids)
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(found.into_iter().map(|(id,)| id).collect())
    }

    /// Inserts index rows and moves `log_progress` of the given partitions to
    /// the given next offsets, in one transaction. Rows whose id is already
    /// indexed are left as they are (this is what makes rebuilding from the
    /// log idempotent).
    ///
    /// `effects` (user and customer records derived from the same events,
    /// see `sluice_core::people`) are applied in the same transaction.
    pub async fn index_events(&self, rows: &[IndexRow], effects: &[RecordEffect], progress: &[(u32, u64)]) -> Result<()> {
        match self {
            Store::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                if !rows.is_empty() {
                    // One JSON array of rows bound as a single parameter: one
                    // small prepared statement whatever the group size.
                    let mut json = String::with_capacity(rows.len() * 96);
                    json.push('[');
                    for (i, r) in rows.iter().enumerate() {
                        if i > 0 {
                            json.push(',');
                        }
                        json.push('[');
                        push_json_str(&mut json, &r.workspace);
                        json.push(',');
                        push_json_str(&mut json, &r.event_id);
                        json.push_str(&format!(",{},{},{}]", r.partition, r.offset, r.received_at_us));
                    }
                    json.push(']');
                    sqlx::query(
                        "INSERT INTO event_index (workspace, event_id, log_partition, log_offset, received_at) \
                         SELECT value->>0, value->>1, value->>2, value->>3, value->>4 FROM json_each($1) WHERE 1 \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(json)
                    .execute(&mut *tx)
                    .await?;
                }
                finish_index_tx!(tx, effects, progress);
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                if !rows.is_empty() {
                    let ws: Vec<&str> = rows.iter().map(|r| r.workspace.as_str()).collect();
                    let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
                    let parts: Vec<i32> = rows.iter().map(|r| r.partition as i32).collect();
                    let offs: Vec<i64> = rows.iter().map(|r| r.offset as i64).collect();
                    let recv: Vec<i64> = rows.iter().map(|r| r.received_at_us).collect();
                    sqlx::query(
                        "INSERT INTO event_index (workspace, event_id, log_partition, log_offset, received_at) \
                         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[]) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(ws)
                    .bind(ids)
                    .bind(parts)
                    .bind(offs)
                    .bind(recv)
                    .execute(&mut *tx)
                    .await?;
                }
                finish_index_tx!(tx, effects, progress);
            }
        }
        Ok(())
    }

    /// Next offset not yet indexed, per partition that has any progress.
    pub async fn log_progress(&self) -> Result<Vec<(u32, u64)>> {
        let rows: Vec<(i32, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT log_partition, next_offset FROM log_progress ORDER BY log_partition").fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(p, o)| (p as u32, o as u64)).collect())
    }

    /// Forgets index rows at or after `offset` of `partition` and sets its
    /// progress there. Used when the log lost a tail (repaired corruption) so
    /// that the index never points past the end of the log.
    pub async fn truncate_event_index(&self, partition: u32, offset: u64) -> Result<u64> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let n = sqlx::query("DELETE FROM event_index WHERE log_partition = $1 AND log_offset >= $2")
                .bind(partition as i32).bind(offset as i64).execute(&mut *tx).await?.rows_affected();
            sqlx::query("UPDATE log_progress SET next_offset = $1 WHERE log_partition = $2 AND next_offset > $1")
                .bind(offset as i64).bind(partition as i32).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Where the event `(workspace, id)` is in the log.
    pub async fn event_position(&self, workspace: &str, id: &str) -> Result<Option<(u32, u64)>> {
        let row: Option<(i32, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT log_partition, log_offset FROM event_index WHERE workspace = $1 AND event_id = $2")
            .bind(workspace).bind(id).fetch_optional(pool).await)?;
        Ok(row.map(|(p, o)| (p as u32, o as u64)))
    }

    /// Deletes up to `limit` index rows received before `before_us` (the dedup
    /// window has passed for them). Returns how many were deleted.
    pub async fn expire_event_index(&self, before_us: i64, limit: i64) -> Result<u64> {
        let n = on_pool!(self, pool => sqlx::query(
            "DELETE FROM event_index WHERE (workspace, event_id) IN \
             (SELECT workspace, event_id FROM event_index WHERE received_at < $1 LIMIT $2)")
            .bind(before_us).bind(limit).execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Number of indexed events (for tests and metrics).
    pub async fn count_indexed_events(&self) -> Result<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as("SELECT COUNT(*) FROM event_index").fetch_one(pool).await)?;
        Ok(n)
    }
}
