//! `event_counts`: the built-in state-writing consumer. It counts events
//! per workspace, type, customer and UTC day into the `event_counts` table,
//! exactly once (each count commits with the checkpoint). A reset to
//! `earliest` clears the table and rebuilds it from the log.

use async_trait::async_trait;
use sluice_core::{Event, EventBatch};
use sluice_store::CountKey;

use crate::runtime::{Attempt, Consumer, Effect};

/// Name of the consumer (and of its checkpoints).
pub const NAME: &str = "event_counts";

/// The event_counts consumer.
pub struct EventCounts;

#[async_trait]
impl Consumer for EventCounts {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(&self, e: &Event, _attempt: Attempt) -> Result<Effect, String> {
        Ok(Effect::Count(CountKey {
            workspace: e.workspace.to_string(),
            event_type: e.event_type.to_string(),
            customer_id: e.customer_id.clone().unwrap_or_default(),
            day: e.timestamp.format("%Y-%m-%d").to_string(),
        }))
    }

    async fn handle_batch(&self, b: &EventBatch, _attempt: Attempt) -> Option<Result<Effect, String>> {
        // Count per (customer, UTC day) first: a batch has few distinct ones.
        let mut n: foldhash::HashMap<(Option<&str>, chrono::NaiveDate), i64> = foldhash::HashMap::default();
        for r in &b.rows {
            *n.entry((r.customer_id.as_deref(), r.timestamp.date_naive())).or_default() += 1;
        }
        let counts = n
            .into_iter()
            .map(|((customer, day), n)| {
                let key = CountKey {
                    workspace: b.header.workspace.to_string(),
                    event_type: b.header.event_type.to_string(),
                    customer_id: customer.unwrap_or_default().to_owned(),
                    day: day.format("%Y-%m-%d").to_string(),
                };
                (key, n)
            })
            .collect();
        Some(Ok(Effect::Counts(counts)))
    }
}
