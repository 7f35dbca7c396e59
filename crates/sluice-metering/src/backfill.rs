//! The `meter.backfill` job: applies a new meter to the events that were in
//! the log before the meter existed (up to the meters consumer's position at
//! creation). It commits usage with its own checkpoint
//! (`backfill:<workspace>:<meter>`), so a restarted job resumes and nothing
//! counts twice.
//!
//! An event the meter cannot take (a value that is not a number, usage that
//! would overflow its bucket) is skipped, logged at WARN and counted in the
//! job's result (`events_skipped`, with the first reasons), so that one bad
//! event cannot stop the backfill of all the others. It is not a dead letter:
//! a replay goes through the live `meters` consumer, which would apply every
//! meter of the event again, not this one.

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::{EventLog, Payload};
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload, JobResult};
use sluice_store::{ConsumerCommit, Folder, Job, StoreError};
use std::sync::Arc;

/// Kind of the job.
pub const KIND: &str = "meter.backfill";

/// Handler of `meter.backfill` jobs.
pub struct MeterBackfill {
    /// The log to read.
    pub log: Arc<dyn EventLog>,
}

/// The payload of a `meter.backfill` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackfillPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// The meter's workspace.
    pub workspace: sluice_core::WorkspaceName,
    /// The meter's key.
    pub meter: String,
}

impl JobPayload for BackfillPayload {
    const KIND: &'static str = KIND;
}

/// Consumer name (checkpoint key) of a meter's backfill.
pub fn checkpoint_name(workspace: &str, key: &str) -> String {
    format!("backfill:{workspace}:{key}")
}

#[async_trait]
impl JobHandler for MeterBackfill {
    fn kind(&self) -> &str {
        KIND
    }

    fn concurrency(&self) -> usize {
        2
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let BackfillPayload { workspace: ws, meter: key, .. } = BackfillPayload::of(job)?;
        let meter = ctx.store().get_meter(&ws, &key).await?;
        let name = checkpoint_name(&ws, &key);
        let total: u64 = meter.start_offsets.iter().map(|(p, o)| o.saturating_sub(self.log.start_offset(*p))).sum();
        let mut done = 0u64;
        let cps = ctx.store().checkpoints(&name).await?;
        let mut counted = 0u64;
        let mut skipped = 0u64;
        let mut reasons: Vec<String> = Vec::new();
        let mut skip = |n: u64, why: String, reasons: &mut Vec<String>| {
            skipped += n;
            if reasons.len() < 10 {
                reasons.push(why);
            }
        };
        for &(p, until) in &meter.start_offsets {
            let mut next = cps.get(&p).copied().unwrap_or(0).max(self.log.start_offset(p));
            done += next.saturating_sub(self.log.start_offset(p));
            while next < until {
                if ctx.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                let records = sluice_core::read_decoded(self.log.as_ref(), "meter_backfill", p, next, 5000, 8 << 20).await?;
                let Some(last) = records.last().map(|r| r.offset) else { break };
                let mut commit = ConsumerCommit { consumer: name.clone(), ..Default::default() };
                // Folded exactly: a delta that would overflow is refused
                // whole, and its event skipped.
                let mut folder = Folder::default();
                for r in records.into_iter().filter(|r| r.offset < until) {
                    let events = match r.payload {
                        Ok(Payload::Batch(b)) => match crate::meter::batch_usage(&meter, &b) {
                            Some(Ok(d)) => {
                                let n = d.iter().map(|d| d.count as u64).sum::<u64>();
                                if folder.add_usage(&mut commit, d).is_ok() {
                                    counted += n;
                                    continue;
                                }
                                b.events().collect()
                            }
                            _ => b.events().collect(),
                        },
                        Ok(p) => p.into_events(),
                        Err(e) => {
                            // Logged and counted by the reader; named in the job's result.
                            skip(1, format!("log record {}:{} cannot be decoded: {e}", r.partition, r.offset), &mut reasons);
                            continue;
                        }
                    };
                    for e in events {
                        let why = match crate::meter::usage_of(&meter, &e) {
                            Ok(Some(d)) => match folder.add_usage(&mut commit, [d]) {
                                Ok(()) => {
                                    counted += 1;
                                    continue;
                                }
                                Err(o) => o.to_string(),
                            },
                            Ok(None) => continue,
                            Err(err) => err.to_string(),
                        };
                        tracing::warn!(meter = %key, event = %e.id, error = %why, "event not metered by the backfill");
                        skip(1, format!("event {}: {why}", e.id), &mut reasons);
                    }
                }
                let new_next = (last + 1).min(until);
                commit.checkpoint = Some((p, new_next));
                loop {
                    match ctx.store().commit_consumer(&commit).await {
                        Ok(()) => break,
                        // Stored usage plus this commit's would overflow these
                        // buckets: their usage in this commit is skipped, the
                        // rest is committed.
                        Err(StoreError::UsageOverflow(list)) => {
                            let keys: std::collections::HashSet<_> = list.iter().map(|o| (*o.bucket).clone()).collect();
                            for o in &list {
                                tracing::warn!(meter = %key, error = %o, "usage not metered by the backfill");
                            }
                            let n: u64 = commit.usage.iter().filter(|d| keys.contains(&d.bucket_key())).map(|d| d.count as u64).sum();
                            commit.usage.retain(|d| !keys.contains(&d.bucket_key()));
                            counted = counted.saturating_sub(n);
                            skip(n, list.first().map(|o| o.to_string()).unwrap_or_default(), &mut reasons);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                done += new_next - next;
                next = new_next;
                ctx.progress(done as i64, Some(total as i64)).await;
            }
        }
        ctx.progress(total as i64, Some(total as i64)).await;
        Ok(BackfillResult { meter: key, records_read: total, events_metered: counted, events_skipped: skipped, skipped_reasons: reasons }.to_value())
    }
}

/// The result of a `meter.backfill` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackfillResult {
    /// The meter.
    pub meter: String,
    /// Log records read.
    pub records_read: u64,
    /// Events that count for the meter.
    pub events_metered: u64,
    /// Events of its type it could not count.
    pub events_skipped: u64,
    /// Why (the first few reasons).
    pub skipped_reasons: Vec<String>,
}

impl JobResult for BackfillResult {}
