//! `event_counts`: the built-in state-writing consumer. It counts events
//! per workspace, type, customer and UTC day into the `event_counts` table,
//! exactly once (each count commits with the checkpoint). A reset to
//! `earliest` clears the table and rebuilds it from the log.

use async_trait::async_trait;
use sluice_core::{Event, EventBatch};
use sluice_store::CountKey;

use crate::runtime::{Attempt, Consumer, Effect, HandleError, OnReset};

/// Name of the consumer (and of its checkpoints).
pub const NAME: &str = "event_counts";

/// The event_counts consumer.
pub struct EventCounts;

/// A UTC day as `YYYY-MM-DD` (years 0-9999, as the `event_counts` table
/// keeps them).
fn day_text(day: chrono::NaiveDate) -> String {
    use chrono::Datelike as _;
    use std::fmt::Write as _;
    let mut s = String::with_capacity(10);
    let _ = write!(s, "{:04}-{:02}-{:02}", day.year(), day.month(), day.day());
    s
}

#[async_trait]
impl Consumer for EventCounts {
    fn name(&self) -> &str {
        NAME
    }

    fn on_reset(&self) -> OnReset {
        OnReset::Clear(Box::new(sluice_store::ClearEventCounts))
    }

    async fn handle(&self, e: &Event, _attempt: Attempt) -> Result<Effect, HandleError> {
        Ok(Effect::Count(CountKey {
            workspace: e.workspace.to_string(),
            event_type: e.event_type.to_string(),
            customer_id: e.customer_id.clone().unwrap_or_default(),
            day: day_text(e.timestamp.date_naive()),
        }))
    }

    async fn handle_batch(&self, b: &EventBatch, _attempt: Attempt) -> Option<Result<Effect, HandleError>> {
        // Count per (customer, UTC day) first: a batch usually has few
        // distinct ones (a generated file cycling through 1,000 customers
        // and 28 days has thousands: hence the sized map and the day
        // written without chrono's format parser).
        let mut n: foldhash::HashMap<(Option<&str>, chrono::NaiveDate), i64> =
            foldhash::HashMap::with_capacity_and_hasher(b.rows.len().min(4096), Default::default());
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
                    day: day_text(day),
                };
                (key, n)
            })
            .collect();
        Some(Ok(Effect::Counts(counts)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn days_are_written_like_chrono_formats_them() {
        for d in ["2024-03-01", "0001-01-01", "9999-12-31", "1970-01-01"] {
            let day: chrono::NaiveDate = d.parse().unwrap();
            assert_eq!(super::day_text(day), day.format("%Y-%m-%d").to_string());
        }
    }
}
