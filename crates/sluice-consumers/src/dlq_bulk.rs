//! The `dlq.bulk` job: replays or discards every waiting dead letter of a
//! workspace that matches a filter (and optionally a list of ids), in
//! chunks, with progress, so an operator can act on thousands of entries
//! from the dashboard and watch it happen.
//!
//! Each chunk is one statement ([`sluice_store::Store::bulk_dead_letters`]):
//! the next [`CHUNK`] matching `dead` entries after the last id done. The
//! job walks the ids once, so a replayed entry that fails again (back to
//! `dead`) is not replayed a second time by the same run. Between chunks it
//! honours cancellation; what the chunks before did stays done.
//!
//! The audit entry (`dlq.replay_bulk` or `dlq.discard_bulk`) is written in
//! the transaction of the first chunk that changes something, so no change
//! commits without it. Running the job again after a crash starts over
//! with what is still `dead` and matching: harmless, since a replay or
//! discard applies only to `dead` entries.

use async_trait::async_trait;
use serde_json::{json, Value};
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload, JobResult};
use sluice_store::{DeadLetterAction, DeadLetterFilter, Job, NewAudit};

/// Kind of the job.
pub const KIND: &str = "dlq.bulk";

/// Dead letters changed per statement: small enough that each transaction
/// is short (other writers wait behind it on SQLite) and progress moves.
pub const CHUNK: usize = 500;

/// What the job does to each entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Back to the consumer (`dead` → `replaying`).
    Replay,
    /// Given up on (`dead` → `discarded`).
    Discard,
}

impl Action {
    /// The audit action of a bulk run.
    pub fn audit_action(self) -> &'static str {
        match self {
            Action::Replay => "dlq.replay_bulk",
            Action::Discard => "dlq.discard_bulk",
        }
    }

    fn store(self) -> DeadLetterAction {
        match self {
            Action::Replay => DeadLetterAction::Replay,
            Action::Discard => DeadLetterAction::Discard,
        }
    }
}

/// The payload of a `dlq.bulk` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BulkPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// Replay or discard.
    pub action: Action,
    /// Only these ids (all other conditions must hold too).
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    /// Only this consumer.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Only this event type.
    #[serde(default)]
    pub event_type: Option<String>,
    /// Only entries whose error contains this text.
    #[serde(default)]
    pub error: Option<String>,
    /// How many matched when the job was asked for (what the operator
    /// confirmed); the job counts again when it starts.
    #[serde(default)]
    pub matching: u64,
}

impl JobPayload for BulkPayload {
    const KIND: &'static str = KIND;
}

impl BulkPayload {
    /// The store's filter of this payload.
    pub fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            ids: self.ids.clone(),
            consumer: self.consumer.clone(),
            event_type: self.event_type.clone(),
            error_contains: self.error.clone(),
        }
    }
}

/// Handler of `dlq.bulk` jobs.
pub struct DlqBulk;

#[async_trait]
impl JobHandler for DlqBulk {
    fn kind(&self) -> &str {
        KIND
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let p = BulkPayload::of(job)?;
        let f = p.filter();
        let store = ctx.store();
        let total = store.count_dead_letters(&job.workspace, &f).await?;
        ctx.progress(0, Some(total as i64)).await;
        let audit = NewAudit {
            workspace: job.workspace.clone(),
            actor_key_id: job.created_by.clone(),
            action: p.action.audit_action().to_owned(),
            target_type: "dead_letter".into(),
            target_id: "*".into(),
            details: json!({
                "job": job.id,
                "filter": {"consumer": p.consumer, "event_type": p.event_type, "error": p.error},
                "ids": p.ids.as_ref().map(Vec::len),
                "matched": total,
            }),
        };
        let (mut done, mut after, mut audited) = (0u64, String::new(), false);
        loop {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let changed = store.bulk_dead_letters(&job.workspace, p.action.store(), &f, &after, CHUNK, (!audited).then_some(&audit)).await?;
            audited |= !changed.is_empty();
            done += changed.len() as u64;
            if let Some(last) = changed.iter().max() {
                after.clone_from(last);
            }
            if changed.len() < CHUNK {
                break;
            }
            // Entries may have become `dead` since the count: never report
            // more done than the total.
            ctx.progress(done as i64, Some(total.max(done) as i64)).await;
        }
        // The last report is the truth: what this run changed.
        ctx.progress(done as i64, Some(done as i64)).await;
        Ok(BulkResult::of(p.action, done).to_value())
    }
}

/// The result of a bulk dead-letter job: `{"replaying": n}` for a replay
/// (the key of `POST /v1/dlq/replay`'s response), `{"discarded": n}` for a
/// discard.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BulkResult {
    /// Entries set replaying (a replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaying: Option<u64>,
    /// Entries discarded (a discard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<u64>,
}

impl BulkResult {
    /// `done` entries changed by `action`.
    pub fn of(action: Action, done: u64) -> BulkResult {
        match action {
            Action::Replay => BulkResult { replaying: Some(done), discarded: None },
            Action::Discard => BulkResult { replaying: None, discarded: Some(done) },
        }
    }
}

impl JobResult for BulkResult {}
