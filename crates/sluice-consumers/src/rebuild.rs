//! The `consumer.reset` job: after a reset, follows the consumer until it
//! has processed everything that was in the log at the time of the reset,
//! so the rebuild shows progress (done / total records, ETA) in the jobs API
//! and the job ends when the read model is complete again.
//!
//! The job only observes: the consumer does the work. Running it again
//! (after a crash) is harmless; cancelling it stops the observation, not
//! the consumer.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sluice_jobs::{JobContext, JobError, JobHandler, JobPayload, JobResult};
use sluice_store::Job;

/// Kind of the job.
pub const KIND: &str = "consumer.reset";

/// Handler of `consumer.reset` jobs.
pub struct ConsumerRebuild;

/// The payload of a `consumer.reset` job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResetPayload {
    /// Payload version (1).
    #[serde(default = "sluice_jobs::payload_v1")]
    pub v: u32,
    /// The consumer that was reset.
    pub consumer: String,
    /// Where it was moved: `earliest`, `latest` or an RFC 3339 time.
    pub to: String,
    /// Per partition, the checkpoint it was moved to.
    pub from: Vec<(u32, u64)>,
    /// Per partition, the end of the log at the reset: the rebuild is done
    /// when the consumer has passed it.
    pub until: Vec<(u32, u64)>,
}

impl JobPayload for ResetPayload {
    const KIND: &'static str = KIND;
}

/// The payload of a `consumer.reset` job, as stored.
pub fn payload(consumer: &str, to: &str, from: &[(u32, u64)], until: &[(u32, u64)]) -> Value {
    ResetPayload { v: 1, consumer: consumer.to_owned(), to: to.to_owned(), from: from.to_vec(), until: until.to_vec() }.to_value()
}

#[async_trait]
impl JobHandler for ConsumerRebuild {
    fn kind(&self) -> &str {
        KIND
    }

    fn concurrency(&self) -> usize {
        4
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let ResetPayload { consumer, from, until, .. } = ResetPayload::of(job)?;
        let total: u64 = until.iter().zip(&from).map(|((_, u), (_, f))| u.saturating_sub(*f)).sum();
        loop {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let cps = ctx.store().checkpoints(&consumer).await?;
            let done: u64 = until.iter().zip(&from).map(|((p, u), (_, f))| cps.get(p).copied().unwrap_or(*f).min(*u).saturating_sub(*f)).sum();
            ctx.progress(done as i64, Some(total as i64)).await;
            if done >= total {
                return Ok(ResetResult { consumer, records: total }.to_value());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The result of a consumer reset job: the records it read again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResetResult {
    /// The consumer.
    pub consumer: String,
    /// Records between the reset position and where the consumer was.
    pub records: u64,
}

impl JobResult for ResetResult {}
