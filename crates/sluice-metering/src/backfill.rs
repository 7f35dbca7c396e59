//! The `meter.backfill` job: applies a new meter to the events that were in
//! the log before the meter existed (up to the meters consumer's position at
//! creation). It commits usage with its own checkpoint
//! (`backfill:<workspace>:<meter>`), so a restarted job resumes and nothing
//! counts twice.

use async_trait::async_trait;
use serde_json::{json, Value};
use sluice_core::{EventLog, Payload};
use sluice_jobs::{JobContext, JobError, JobHandler};
use sluice_store::{ConsumerCommit, Job};
use std::sync::Arc;

/// Kind of the job.
pub const KIND: &str = "meter.backfill";

/// Handler of `meter.backfill` jobs.
pub struct MeterBackfill {
    /// The log to read.
    pub log: Arc<dyn EventLog>,
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
        let ws = job.payload["workspace"].as_str().unwrap_or_default().to_owned();
        let key = job.payload["meter"].as_str().unwrap_or_default().to_owned();
        let meter = ctx.store().get_meter(&ws, &key).await?;
        let name = checkpoint_name(&ws, &key);
        let total: u64 = meter.start_offsets.iter().map(|(p, o)| o.saturating_sub(self.log.start_offset(*p))).sum();
        let mut done = 0u64;
        let cps = ctx.store().checkpoints(&name).await?;
        let mut counted = 0u64;
        for &(p, until) in &meter.start_offsets {
            let mut next = cps.get(&p).copied().unwrap_or(0).max(self.log.start_offset(p));
            done += next.saturating_sub(self.log.start_offset(p));
            while next < until {
                if ctx.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                let records = self.log.read(p, next, 5000, 8 << 20).await?;
                let Some(last) = records.last().map(|r| r.offset) else { break };
                let mut commit = ConsumerCommit { consumer: name.clone(), ..Default::default() };
                for r in records.iter().filter(|r| r.offset < until) {
                    let events = match Payload::decode(&r.payload) {
                        Ok(Payload::Batch(b)) => match crate::meter::batch_usage(&meter, &b) {
                            Some(Ok(d)) => {
                                counted += d.iter().map(|d| d.count as u64).sum::<u64>();
                                commit.usage.extend(d);
                                continue;
                            }
                            _ => b.events().collect(),
                        },
                        Ok(p) => p.into_events(),
                        Err(_) => continue,
                    };
                    for e in events {
                        match crate::meter::usage_of(&meter, &e) {
                            Ok(Some(d)) => {
                                counted += 1;
                                commit.usage.push(d);
                            }
                            Ok(None) => {}
                            Err(err) => tracing::warn!(meter = %key, event = %e.id, error = %err, "event not metered by the backfill"),
                        }
                    }
                }
                let new_next = (last + 1).min(until);
                commit.checkpoint = Some((p, new_next));
                ctx.store().commit_consumer(&commit).await?;
                done += new_next - next;
                next = new_next;
                ctx.progress(done as i64, Some(total as i64)).await;
            }
        }
        ctx.progress(total as i64, Some(total as i64)).await;
        Ok(json!({"meter": key, "records_read": total, "events_metered": counted}))
    }
}
