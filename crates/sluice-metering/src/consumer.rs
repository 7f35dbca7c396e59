//! The `meters` consumer: turns events into usage, exactly once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use sluice_consumers::{Attempt, Consumer, Effect, HandleError, OnReset};
use sluice_core::{Event, EventBatch};
use sluice_store::{Meter, Store};

/// Name of the consumer.
pub const NAME: &str = "meters";

/// The meters of every workspace, kept in memory for the consumer and
/// updated when a meter is created.
#[derive(Clone, Default)]
pub struct MeterCache(Arc<RwLock<HashMap<String, Vec<Meter>>>>);

impl MeterCache {
    /// Loads every meter.
    pub async fn load(store: &Store) -> Result<MeterCache, sluice_store::StoreError> {
        let cache = MeterCache::default();
        for m in store.list_meters(None).await? {
            cache.add(m);
        }
        Ok(cache)
    }

    /// Adds (or replaces) a meter.
    pub fn add(&self, m: Meter) {
        let mut map = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = map.entry(m.workspace.clone()).or_default();
        list.retain(|x| x.key != m.key);
        list.push(m);
    }

    fn of(&self, workspace: &str, event_type: &str) -> Vec<Meter> {
        let map = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(workspace).map(|l| l.iter().filter(|m| m.event_type == event_type).cloned().collect()).unwrap_or_default()
    }
}

/// The consumer.
pub struct MetersConsumer {
    /// Meters to apply.
    pub cache: MeterCache,
}

#[async_trait]
impl Consumer for MetersConsumer {
    fn name(&self) -> &str {
        NAME
    }

    fn on_reset(&self) -> OnReset {
        // Usage buckets are added to, not rebuilt: moving this consumer
        // would count events twice or skip them.
        OnReset::Refuse("the meters consumer cannot be reset: its usage is cumulative; meters are backfilled when created".into())
    }

    async fn handle(&self, e: &Event, at: Attempt) -> Result<Effect, HandleError> {
        let mut usage = Vec::new();
        for m in self.cache.of(e.workspace.as_str(), e.event_type.as_str()) {
            // Events before the meter's start position belong to its backfill.
            let start = m.start_offsets.iter().find(|(p, _)| *p == at.partition).map_or(0, |(_, o)| *o);
            if at.offset < start {
                continue;
            }
            // A value the meter cannot take is the event's fault: retrying
            // cannot help, so it goes to the dead letters at once.
            if let Some(d) = crate::meter::usage_of(&m, e).map_err(|e| HandleError::Permanent(e.to_string()))? {
                usage.push(d);
            }
        }
        Ok(if usage.is_empty() { Effect::None } else { Effect::Usage(usage) })
    }

    async fn handle_batch(&self, b: &EventBatch, at: Attempt) -> Option<Result<Effect, HandleError>> {
        let mut usage = Vec::new();
        for m in self.cache.of(b.header.workspace.as_str(), b.header.event_type.as_str()) {
            let start = m.start_offsets.iter().find(|(p, _)| *p == at.partition).map_or(0, |(_, o)| *o);
            if at.offset < start {
                continue;
            }
            match crate::meter::batch_usage(&m, b)? {
                Ok(d) => usage.extend(d),
                Err(e) => return Some(Err(HandleError::Permanent(e.to_string()))),
            }
        }
        Some(Ok(if usage.is_empty() { Effect::None } else { Effect::Usage(usage) }))
    }
}
