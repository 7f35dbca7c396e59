//! Per-workspace activity counters behind the dashboard's overview.
//!
//! Prometheus series carry no workspace ids (an unbounded label set, and a
//! scraper would see every tenant's names), yet a workspace's overview needs
//! its own figures: events it sent, requests refused, jobs that failed,
//! events dead-lettered. The components that see those things add them here;
//! the API's overview sampler drains the counters every few seconds into a
//! one-hour ring per workspace. Nothing here is exported or persisted: the
//! figures are this process's, since it started (documented in
//! docs/dashboard.md#overview).
//!
//! Memory stays bounded: only workspaces active since the last drain hold an
//! entry, and a drain empties the map.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Events newly stored (duplicates not counted).
    EventsAccepted,
    /// Ingest requests refused (invalid events, over a limit, …).
    IngestRejected,
    /// Jobs that ended `failed` (after their last attempt).
    JobFailed,
    /// Events a consumer gave up on.
    DeadLettered,
}

/// Counts since the last drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// [`Activity::EventsAccepted`].
    pub events_accepted: u64,
    /// [`Activity::IngestRejected`].
    pub ingest_rejected: u64,
    /// [`Activity::JobFailed`].
    pub jobs_failed: u64,
    /// [`Activity::DeadLettered`].
    pub dead_lettered: u64,
}

impl Counts {
    fn add(&mut self, what: Activity, n: u64) {
        let c = match what {
            Activity::EventsAccepted => &mut self.events_accepted,
            Activity::IngestRejected => &mut self.ingest_rejected,
            Activity::JobFailed => &mut self.jobs_failed,
            Activity::DeadLettered => &mut self.dead_lettered,
        };
        *c = c.saturating_add(n);
    }
}

static COUNTS: Mutex<Option<HashMap<String, Counts>>> = Mutex::new(None);

/// Adds `n` of `what` to `workspace`'s counters.
pub fn record(workspace: &str, what: Activity, n: u64) {
    if n == 0 {
        return;
    }
    let mut map = COUNTS.lock().unwrap_or_else(PoisonError::into_inner);
    let map = map.get_or_insert_with(HashMap::new);
    match map.get_mut(workspace) {
        Some(c) => c.add(what, n),
        None => {
            let mut c = Counts::default();
            c.add(what, n);
            map.insert(workspace.to_owned(), c);
        }
    }
}

/// Takes every workspace's counts since the last drain, leaving them at zero.
pub fn drain() -> HashMap<String, Counts> {
    COUNTS.lock().unwrap_or_else(PoisonError::into_inner).take().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_workspace_and_a_drain_starts_again() {
        // The only test touching the process-wide map, so no other test's
        // counts can mix in.
        record("a", Activity::EventsAccepted, 3);
        record("a", Activity::EventsAccepted, 2);
        record("a", Activity::JobFailed, 1);
        record("b", Activity::DeadLettered, 4);
        record("b", Activity::IngestRejected, 0);
        let d = drain();
        assert_eq!(d.len(), 2);
        assert_eq!(d["a"], Counts { events_accepted: 5, jobs_failed: 1, ..Counts::default() });
        assert_eq!(d["b"], Counts { dead_lettered: 4, ..Counts::default() });
        assert!(drain().is_empty());
    }
}
