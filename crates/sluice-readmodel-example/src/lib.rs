//! The smallest complete read model, written only against the public engine
//! API (`sluice_consumers::ReadModel`): it records which events it saw, in
//! its own table, and counts every delivery it commits. Exactly once means
//! every `seen` is 1, whatever crashed in between; `tests/kill9.rs` checks
//! that across `kill -9` on SQLite and PostgreSQL. An event with the
//! property `"poison": true` cannot be handled: it must end in the dead
//! letters, with its reason, and never in the table.
//!
//! docs/consumers.md ("Writing a read model") walks through this file.

use async_trait::async_trait;
use sluice_consumers::{on_tx, HandleError, ReadModel, Tx};
use sluice_core::Event;
use sluice_store::StoreError;

/// Its name: the key of its checkpoints and dead letters.
pub const NAME: &str = "example_seen";

/// Which events were seen, and how many times each was committed.
pub struct SeenEvents;

#[async_trait]
impl ReadModel for SeenEvents {
    /// (workspace, event id) of the events handled since the last commit.
    type Effect = Vec<(String, String)>;

    fn name(&self) -> &str {
        NAME
    }

    async fn init(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        on_tx!(tx, conn => sqlx::query(
            "CREATE TABLE IF NOT EXISTS example_seen (workspace TEXT NOT NULL, event_id TEXT NOT NULL, seen BIGINT NOT NULL, \
             PRIMARY KEY (workspace, event_id))").execute(&mut *conn).await.map(|_| ()))?;
        Ok(())
    }

    async fn handle(&self, event: &Event) -> Result<Option<Self::Effect>, HandleError> {
        // Properties stay raw JSON in the event until a reader needs them.
        let poisoned = serde_json::from_str::<serde_json::Value>(event.properties.get()).ok().and_then(|p| p.get("poison")?.as_bool());
        if poisoned == Some(true) {
            // Caused by the event: retrying cannot help.
            return Err(HandleError::Permanent(format!("event {} is poisoned", event.id)));
        }
        Ok(Some(vec![(event.workspace.to_string(), event.id.to_string())]))
    }

    fn merge(&self, into: &mut Self::Effect, from: Self::Effect) {
        into.extend(from);
    }

    fn entries(&self, effect: &Self::Effect) -> usize {
        effect.len()
    }

    async fn commit(&self, effect: &Self::Effect, tx: Tx<'_>) -> Result<(), StoreError> {
        // `seen` goes up on every delivery committed: a second delivery of
        // an event would show as 2.
        on_tx!(tx, conn => {
            for (workspace, id) in effect {
                sqlx::query(
                    "INSERT INTO example_seen (workspace, event_id, seen) VALUES ($1, $2, 1) \
                     ON CONFLICT (workspace, event_id) DO UPDATE SET seen = example_seen.seen + 1")
                    .bind(workspace).bind(id).execute(&mut *conn).await?;
            }
        });
        Ok(())
    }

    async fn clear(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        on_tx!(tx, conn => sqlx::query("DELETE FROM example_seen").execute(&mut *conn).await.map(|_| ()))?;
        Ok(())
    }
}
