//! The health read model (consumer `health`), on the consumer engine: it
//! keeps every event that names a customer (`health_events`), the traits
//! of `group` calls with their event time (`customer_attribute_changes`,
//! source `group`), and marks the customers it touched (`health_dirty`),
//! all in the transaction that moves its checkpoint, so nothing is counted
//! twice or missed across `kill -9`. The evaluator
//! ([`crate::engine::evaluator`]) then re-evaluates the marked customers.
//! A reset empties all three and rebuilds them from the log.
//!
//! Only workspaces with a health configuration are kept ([`Enabled`]):
//! most workspaces never use health, and keeping every event of every
//! workspace a second time in the state store made every other writer
//! (the meters of other tenants among them) wait on SQLite. A workspace's
//! first configuration enables it and backfills its history from the log
//! (`health.recompute` with `backfill_until`, [`crate::jobs`]); the primary
//! keys make the backfill and the consumer meet without counting twice.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sluice_consumers::{on_tx, HandleError, ReadModel, Tx};
use sluice_core::Event;
use sluice_store::StoreError;
use tokio::sync::Notify;

/// The consumer's name.
pub const NAME: &str = "health";

/// Event types health writes itself: not kept (they would count in
/// "any event" measures and re-trigger the customer they describe).
pub const OWN_TYPES: [&str; 2] = ["customer.stage_changed", "customer.health_changed"];

/// The workspaces with a health configuration (shared by the read model,
/// the API and the jobs of one process).
#[derive(Clone, Default)]
pub struct Enabled(Arc<std::sync::RwLock<std::collections::HashSet<String>>>);

impl Enabled {
    /// Whether `ws` is kept.
    pub fn contains(&self, ws: &str) -> bool {
        self.0.read().map(|s| s.contains(ws)).unwrap_or(true)
    }
    /// Keeps `ws` from now on; false when it already was.
    pub fn insert(&self, ws: &str) -> bool {
        self.0.write().map(|mut s| s.insert(ws.to_owned())).unwrap_or(false)
    }
}

/// The read model.
pub struct HealthModel {
    /// Woken after a commit marked customers.
    pub wake: Arc<Notify>,
    /// The workspaces kept.
    pub enabled: Enabled,
}

/// One kept event.
#[derive(Debug, Clone)]
pub struct Row {
    workspace: String,
    customer_id: String,
    event_type: String,
    ts: i64,
    event_id: String,
    user_id: Option<String>,
    properties: Option<String>,
}

/// Events and trait changes since the last commit.
#[derive(Debug, Default)]
pub struct Effect {
    events: Vec<Row>,
    /// (workspace, customer, at, event id, traits JSON) of `group` calls.
    traits: Vec<(String, String, i64, String, String)>,
}

/// What health keeps of one event (none: it names no customer, or health
/// wrote it).
pub fn effect_of(event: &Event) -> Result<Option<Effect>, HandleError> {
    let Some(customer) = &event.customer_id else { return Ok(None) };
    if OWN_TYPES.contains(&event.event_type.as_str()) {
        return Ok(None);
    }
    for (what, s) in [("customer_id", Some(customer.as_str())), ("user_id", event.user_id.as_deref())] {
        if let Some(e) = s.and_then(|s| sluice_core::check_storable(s).err()) {
            return Err(HandleError::Permanent(format!("event {}: {what} {e}", event.id)));
        }
    }
    let props = event.properties.get();
    let properties = (props.trim() != "{}").then(|| props.to_owned());
    if properties.as_deref().is_some_and(|p| p.contains("\\u0000")) {
        return Err(HandleError::Permanent(format!("event {}: properties contain NUL, which the state store cannot hold", event.id)));
    }
    let ts = event.timestamp.timestamp_micros();
    let mut effect = Effect::default();
    if event.event_type.as_str() == sluice_core::people::GROUP {
        if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(props) {
            if !m.is_empty() {
                effect.traits.push((event.workspace.to_string(), customer.clone(), ts, event.id.to_string(), Value::Object(m).to_string()));
            }
        }
    }
    effect.events.push(Row {
        workspace: event.workspace.to_string(),
        customer_id: customer.clone(),
        event_type: event.event_type.to_string(),
        ts,
        event_id: event.id.to_string(),
        user_id: event.user_id.clone(),
        properties,
    });
    Ok(Some(effect))
}

impl Effect {
    /// Adds `other`'s rows.
    pub fn extend(&mut self, other: Effect) {
        self.events.extend(other.events);
        self.traits.extend(other.traits);
    }
    /// Rows held.
    pub fn len(&self) -> usize {
        self.events.len() + self.traits.len()
    }
    /// Holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes an effect's rows (inserting what is already there changes
/// nothing); with `mark`, marks the customers for evaluation.
async fn write(effect: &Effect, mark: Option<i64>, mut tx: Tx<'_>) -> Result<(), StoreError> {
    let mut touched: Vec<(&str, &str)> = effect.events.iter().map(|r| (r.workspace.as_str(), r.customer_id.as_str())).collect();
    touched.sort_unstable();
    touched.dedup();
    // In key order: neighbouring rows land on the same pages.
    let mut rows: Vec<&Row> = effect.events.iter().collect();
    rows.sort_unstable_by(|a, b| (&a.workspace, &a.customer_id, &a.event_type, a.ts).cmp(&(&b.workspace, &b.customer_id, &b.event_type, b.ts)));
    // Placeholders as `sluice_store::values_rows` says (anonymous on SQLite).
    let sqlite = matches!(tx, Tx::Sqlite(_));
    on_tx!(tx.reborrow(), conn => {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let values = sluice_store::values_rows(sqlite, chunk.len(), "(?, ?, ?, ?, ?, ?, ?)");
            let sql = format!("INSERT INTO health_events (workspace, customer_id, event_type, ts, event_id, user_id, properties) VALUES {values} \
                ON CONFLICT (workspace, customer_id, event_type, ts, event_id) DO NOTHING");
            let mut q = sqlx::query(&sql);
            for r in chunk.iter() {
                q = q.bind(&r.workspace).bind(&r.customer_id).bind(&r.event_type).bind(r.ts).bind(&r.event_id).bind(&r.user_id).bind(&r.properties);
            }
            q.execute(&mut *conn).await?;
        }
        for (ws, c, at, id, patch) in &effect.traits {
            sqlx::query("INSERT INTO customer_attribute_changes (workspace, customer_id, at, ref, source, patch, set_by) \
                VALUES ($1, $2, $3, $4, 'group', $5, NULL) ON CONFLICT (workspace, customer_id, at, ref) DO NOTHING")
                .bind(ws).bind(c).bind(at).bind(id).bind(patch).execute(&mut *conn).await?;
        }
    });
    if let Some(mark) = mark {
        sluice_store::health::mark_health_dirty(tx, &touched, mark).await?;
    }
    Ok(())
}

/// An effect written outside the consumer (the backfill of a workspace's
/// history), without marks: the recompute that follows evaluates everyone.
pub struct Backfill(pub Effect);

impl sluice_store::TxWork for Backfill {
    fn run<'a>(&'a self, tx: Tx<'a>) -> sluice_store::TxFuture<'a> {
        Box::pin(write(&self.0, None, tx))
    }
}

/// Rows per INSERT statement (7 parameters each; SQLite allows 32,766).
const ROWS_PER_STATEMENT: usize = 400;

#[async_trait]
impl ReadModel for HealthModel {
    type Effect = Effect;

    fn name(&self) -> &str {
        NAME
    }

    async fn handle(&self, event: &Event) -> Result<Option<Effect>, HandleError> {
        if !self.enabled.contains(event.workspace.as_str()) {
            return Ok(None);
        }
        effect_of(event)
    }

    fn merge(&self, into: &mut Effect, from: Effect) {
        into.extend(from);
    }

    fn entries(&self, effect: &Effect) -> usize {
        effect.len()
    }

    async fn commit(&self, effect: &Effect, tx: Tx<'_>) -> Result<(), StoreError> {
        write(effect, Some(chrono::Utc::now().timestamp_micros()), tx).await?;
        if !effect.events.is_empty() {
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn clear(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        on_tx!(tx, conn => {
            sqlx::query("DELETE FROM health_events").execute(&mut *conn).await?;
            sqlx::query("DELETE FROM customer_attribute_changes WHERE source = 'group'").execute(&mut *conn).await?;
            sqlx::query("DELETE FROM health_dirty").execute(&mut *conn).await?;
        });
        Ok(())
    }
}
