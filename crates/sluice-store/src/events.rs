//! Record effects of the event log: user and customer records derived from
//! `identify`, `group` and `alias` events, and how far the log has been
//! applied (`log_progress`).
//!
//! The event log is the source of truth. The ingest pipeline appends to the
//! log first (durably), then applies the record effects of the new events
//! here together with `log_progress` in one transaction. If the process dies
//! in between, the effects are applied again on start from the log records
//! at and after `log_progress` (see `sluice-ingest`); applying them twice is
//! harmless (last-writer-wins by event time).
//!
//! The dedup index (where every event id is in the log) is not here: it is
//! the log's own id index (`sluice_log::index`), which takes a million ids
//! at once far faster than a B-tree table, where each id costs a random page
//! write (measured: docs/BENCHMARKS.md, "Ingest").
//! Migration 0008 drops the `event_index` table of earlier versions.

use sluice_core::RecordEffect;

use crate::BeginWrite as _;
use crate::{on_pool, Result, Store};

impl Store {
    /// Applies record effects and moves `log_progress` of the given
    /// partitions to the given next offsets, in one transaction.
    pub async fn apply_log_effects(&self, effects: &[RecordEffect], progress: &[(u32, u64)]) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for &(p, next) in progress {
                sqlx::query(
                    "INSERT INTO log_progress (log_partition, next_offset) VALUES ($1, $2) \
                     ON CONFLICT (log_partition) DO UPDATE SET next_offset = excluded.next_offset",
                )
                .bind(p as i32)
                .bind(next as i64)
                .execute(&mut *tx)
                .await?;
            }
            crate::people::apply_effects!(tx, effects);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Next offset whose record effects are not applied yet, per partition
    /// that has any progress.
    pub async fn log_progress(&self) -> Result<Vec<(u32, u64)>> {
        let rows: Vec<(i32, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT log_partition, next_offset FROM log_progress ORDER BY log_partition").fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(p, o)| (p as u32, o as u64)).collect())
    }
}
