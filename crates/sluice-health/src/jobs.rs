//! Health's jobs: `health.recompute` evaluates every customer under a new
//! configuration version (with progress; no transition events, since a
//! customer's first evaluation under a version emits none), and
//! `health.backtest` replays history under a configuration and reports how
//! well its bands predicted churn, writing nothing live.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Days, Utc};
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::WorkspaceName;
use sluice_jobs::{payload_v1, JobContext, JobError, JobHandler, JobPayload, JobResult};
use sluice_store::Job;

use crate::engine::{Cause, Health, WsCtx};
use crate::eval::Val;
use crate::{HealthConfig, HealthError};

/// The recompute job's kind.
pub const RECOMPUTE: &str = "health.recompute";
/// The backtest job's kind.
pub const BACKTEST: &str = "health.backtest";

fn job_error(e: HealthError) -> JobError {
    match e {
        HealthError::Store(e) => e.into(),
        e => JobError::permanent(e),
    }
}

/// `health.recompute` (version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecomputePayload {
    /// Payload version.
    #[serde(default = "payload_v1")]
    pub v: u32,
    /// Workspace.
    pub workspace: WorkspaceName,
    /// The configuration version to evaluate with.
    pub version: i64,
    /// The workspace's first configuration: first copy its history from
    /// the log up to these (partition, next offset) positions, where the
    /// read model started keeping its events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill_until: Option<Vec<(u32, u64)>>,
}

impl JobPayload for RecomputePayload {
    const KIND: &'static str = RECOMPUTE;
}

/// Batches of a recompute evaluated at a time: one reads and evaluates
/// while the other writes. Three or four are no faster on 2 cores with
/// SQLite: the cores are the limit, not waiting (measured:
/// docs/BENCHMARKS.md, "Customer health").
const RECOMPUTE_PARALLEL: usize = 2;

/// Runs `health.recompute`.
pub struct Recompute {
    /// Health.
    pub health: Health,
    /// The log, for backfills.
    pub log: Option<std::sync::Arc<dyn sluice_core::EventLog>>,
}

/// Copies a workspace's events before `until` from the log into the read
/// model (idempotent: rows already there stay as they are), for a
/// workspace health starts keeping ([`crate::model::Enabled`]). Returns the
/// records read.
async fn backfill(
    health: &Health,
    log: Option<&std::sync::Arc<dyn sluice_core::EventLog>>,
    ws: &str,
    until: &[(u32, u64)],
    ctx: &JobContext,
) -> Result<u64, JobError> {
    let Some(log) = log else { return Ok(0) };
    let total: u64 = until.iter().map(|(p, u)| u.saturating_sub(log.start_offset(*p))).sum();
    let mut done = 0u64;
    for &(p, until) in until {
        let mut next = log.start_offset(p);
        while next < until {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let records = sluice_core::read_decoded(log.as_ref(), "health_backfill", p, next, 5000, 8 << 20).await.map_err(JobError::retryable)?;
            let Some(last) = records.last().map(|r| r.offset) else { break };
            let mut effect = crate::model::Effect::default();
            for r in records.into_iter().filter(|r| r.offset < until) {
                // Undecodable records are logged by the reader; the
                // consumer dead-letters them.
                let Ok(payload) = r.payload else { continue };
                for e in payload.into_events() {
                    if e.workspace.as_str() != ws {
                        continue;
                    }
                    // Events the consumer would dead-letter are left to it.
                    if let Ok(Some(x)) = crate::model::effect_of(&e) {
                        effect.extend(x);
                    }
                }
            }
            if !effect.is_empty() {
                health.store.write_tx(&crate::model::Backfill(effect)).await?;
            }
            let new_next = (last + 1).min(until);
            done += new_next - next;
            next = new_next;
            ctx.progress(done as i64, Some(total as i64)).await;
        }
    }
    Ok(total)
}

/// Before a job reads more than one batch of customers: fresh planner
/// statistics (see [`sluice_store::Store::analyze_health_tables`]).
async fn fresh_statistics(h: &crate::Health, customers: usize) {
    if customers > crate::engine::BATCH {
        if let Err(e) = h.store.analyze_health_tables().await {
            tracing::warn!(error = %e, "could not refresh the planner statistics of the health tables");
        }
    }
}

#[async_trait]
impl JobHandler for Recompute {
    fn kind(&self) -> &str {
        RECOMPUTE
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let p = RecomputePayload::of(job)?;
        let h = &self.health;
        let Some(wctx) = h.ctx(&p.workspace, Some(p.version)).await.map_err(job_error)? else {
            return Err(JobError::permanent(format!("configuration version {} not found", p.version)));
        };
        // A first configuration: the history first (progress: the first half).
        let backfilled = match &p.backfill_until {
            Some(until) => backfill(h, self.log.as_ref(), &p.workspace, until, ctx).await?,
            None => 0,
        };
        let ids = h.store.health_customer_ids(&p.workspace).await?;
        let total = ids.len();
        fresh_statistics(h, total).await;
        let mut done = 0usize;
        let (mut superseded, mut cancelled) = (false, false);
        // Batches on tasks of their own, `RECOMPUTE_PARALLEL` at a time: one
        // reads and evaluates while another writes (the state store's reads
        // do not wait for its writer), on both cores. Progress counts them
        // in order.
        let mut running = std::collections::VecDeque::new();
        let mut chunks = ids.chunks(crate::engine::BATCH);
        loop {
            while !(superseded || cancelled) && running.len() < RECOMPUTE_PARALLEL {
                let Some(chunk) = chunks.next() else { break };
                cancelled = ctx.is_cancelled();
                // A newer version has its own recompute: stop here.
                superseded = !cancelled && h.store.health_config(&p.workspace, None).await?.is_some_and(|c| c.version != p.version);
                if superseded || cancelled {
                    break;
                }
                let (h, wctx, chunk) = (h.clone(), wctx.clone(), chunk.to_vec());
                running.push_back(tokio::spawn(async move {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    h.refresh_many(&wctx, &refs, Cause::Config(wctx.version)).await.map(|_| refs.len())
                }));
            }
            let Some(batch) = running.pop_front() else { break };
            done += batch.await.map_err(JobError::retryable)?.map_err(job_error)?;
            ctx.progress(done as i64, Some(total as i64)).await;
        }
        if cancelled {
            return Err(JobError::Cancelled);
        }
        Ok(RecomputeResult {
            customers_total: total,
            customers_done: done,
            config_version: p.version,
            superseded,
            log_records_backfilled: backfilled,
        }
        .to_value())
    }
}

/// The result of a `health.recompute` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecomputeResult {
    /// Customers to evaluate.
    pub customers_total: usize,
    /// Customers evaluated.
    pub customers_done: usize,
    /// The configuration version evaluated.
    pub config_version: i64,
    /// A newer version came and took over.
    pub superseded: bool,
    /// Log records read into the read model first (a first configuration).
    pub log_records_backfilled: u64,
}

impl JobResult for RecomputeResult {}

/// `health.backtest` (version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacktestPayload {
    /// Payload version.
    #[serde(default = "payload_v1")]
    pub v: u32,
    /// Workspace.
    pub workspace: WorkspaceName,
    /// The configuration tested (validated when the job was made).
    pub config: Value,
    /// Its version, when it is a stored one.
    #[serde(default)]
    pub config_version: Option<i64>,
    /// First step.
    pub from: DateTime<Utc>,
    /// Last step (inclusive).
    pub to: DateTime<Utc>,
    /// Days between steps.
    pub step_days: u32,
    /// A customer that churns within this many days after a step counts as churned for it.
    pub horizon_days: u32,
    /// The attribute holding the churn date.
    pub outcome_attribute: String,
    /// The workspace had no health data yet: copy its history from the log
    /// first (as [`RecomputePayload::backfill_until`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill_until: Option<Vec<(u32, u64)>>,
}

impl JobPayload for BacktestPayload {
    const KIND: &'static str = BACKTEST;
}

/// One band of a backtest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BandResult {
    /// good / normal / bad.
    pub band: String,
    /// Customer-steps in the band.
    pub customers: usize,
    /// Of which churned within the horizon.
    pub churned: usize,
    /// churned / customers.
    pub churn_rate: Option<f64>,
}

/// The result of a backtest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacktestResult {
    /// Per band.
    pub bands: Vec<BandResult>,
    /// Area under the ROC curve of the score as a predictor of not churning
    /// (0.5: no better than chance; none without both outcomes).
    pub auc: Option<f64>,
    /// Steps replayed.
    pub steps: usize,
    /// Customer-steps scored.
    pub samples: usize,
    /// Customer-steps without a score (no scorecard or no data).
    pub unscored: usize,
    /// The steps' times.
    pub step_times: Vec<DateTime<Utc>>,
}

impl JobResult for BacktestResult {}

/// The area under the ROC curve: the chance that a random positive
/// scores above a random negative (ties count half), by ranks.
pub fn auc(samples: &[(f64, bool)]) -> Option<f64> {
    let pos = samples.iter().filter(|s| s.1).count();
    let neg = samples.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut sorted: Vec<&(f64, bool)> = samples.iter().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Average ranks over ties.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].0 == sorted[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += sorted[i..=j].iter().filter(|s| s.1).count() as f64 * avg;
        i = j + 1;
    }
    let (p, n) = (pos as f64, neg as f64);
    Some((rank_sum_pos - p * (p + 1.0) / 2.0) / (p * n))
}

/// Runs `health.backtest`.
pub struct Backtest {
    /// Health.
    pub health: Health,
    /// The log, for backfills.
    pub log: Option<std::sync::Arc<dyn sluice_core::EventLog>>,
}

#[async_trait]
impl JobHandler for Backtest {
    fn kind(&self) -> &str {
        BACKTEST
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let p = BacktestPayload::of(job)?;
        let h = &self.health;
        let config = HealthConfig::load(&p.config).map_err(|e| JobError::permanent(e.to_string()))?;
        if let Some(until) = &p.backfill_until {
            backfill(h, self.log.as_ref(), &p.workspace, until, ctx).await?;
        }
        let tz = h.tz(&p.workspace).await.map_err(job_error)?;
        let wctx = WsCtx { name: p.workspace.to_string(), tz, version: p.config_version.unwrap_or(0), config: std::sync::Arc::new(config) };
        let mut steps = Vec::new();
        let mut t = p.from;
        while t <= p.to && steps.len() < 10_000 {
            steps.push(t);
            t = t.checked_add_days(Days::new(u64::from(p.step_days.max(1)))).unwrap_or(DateTime::<Utc>::MAX_UTC);
        }
        let ids = h.store.health_customer_ids(&p.workspace).await?;
        let total = ids.len();
        ctx.progress(0, Some(total as i64)).await;
        fresh_statistics(h, total).await;
        let horizon = chrono::Duration::days(i64::from(p.horizon_days));
        let mut samples: Vec<(f64, bool)> = Vec::new();
        let mut bands: HashMap<&'static str, (usize, usize)> = HashMap::new();
        let mut unscored = 0usize;
        let first_seen = h.store.health_first_seen_all(&p.workspace).await?;
        let mut done = 0usize;
        for chunk in ids.chunks(crate::engine::BATCH) {
            if ctx.is_cancelled() {
                return Err(JobError::Cancelled);
            }
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            // The outcome is what really happened: the attribute's value now.
            let now_attrs = h.attributes_of(&p.workspace, &refs, None).await.map_err(job_error)?;
            let churned_at: HashMap<&str, DateTime<Utc>> = refs
                .iter()
                .filter_map(|c| {
                    let t = match Val::from_json(now_attrs.get(*c)?.get(&p.outcome_attribute)?)? {
                        Val::Date(d) => Some(sluice_metering::usage::local_start(tz, d, 0)),
                        Val::Str(s) => DateTime::parse_from_rfc3339(&s).ok().map(|t| t.with_timezone(&Utc)),
                        _ => None,
                    }?;
                    Some((*c, t))
                })
                .collect();
            // Each customer's steps in order, so days_in_stage follows the
            // stages of this replay, not the live ones.
            let mut previous: HashMap<&str, (Option<String>, Option<DateTime<Utc>>)> = HashMap::new();
            for &t in &steps {
                let live: Vec<&str> = refs
                    .iter()
                    .copied()
                    .filter(|c| first_seen.get(*c).is_some_and(|f| *f <= t) && churned_at.get(c).is_none_or(|ch| *ch > t))
                    .collect();
                if live.is_empty() {
                    continue;
                }
                let loaded = h.load(&wctx, &live, t).await.map_err(job_error)?;
                for c in live {
                    let e = h.evaluate_loaded(&wctx, &loaded, c, t, previous.get(c).cloned());
                    previous.insert(c, (e.stage.clone(), e.stage_since));
                    let churned = churned_at.get(c).is_some_and(|ch| *ch > t && *ch <= t + horizon);
                    match (e.score.and_then(|s| s.to_f64()), e.band) {
                        (Some(s), Some(b)) => {
                            samples.push((s, !churned));
                            let entry = bands.entry(b).or_default();
                            entry.0 += 1;
                            entry.1 += usize::from(churned);
                        }
                        _ => unscored += 1,
                    }
                }
            }
            done += chunk.len();
            ctx.progress(done as i64, Some(total as i64)).await;
        }
        let result = BacktestResult {
            bands: ["good", "normal", "bad"]
                .iter()
                .map(|b| {
                    let (n, ch) = bands.get(b).copied().unwrap_or_default();
                    BandResult { band: (*b).into(), customers: n, churned: ch, churn_rate: (n > 0).then(|| ch as f64 / n as f64) }
                })
                .collect(),
            auc: auc(&samples),
            steps: steps.len(),
            samples: samples.len(),
            unscored,
            step_times: steps,
        };
        Ok(result.to_value())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::auc;

    #[test]
    fn auc_by_ranks() {
        assert_eq!(auc(&[(1.0, false), (2.0, true)]), Some(1.0));
        assert_eq!(auc(&[(2.0, false), (1.0, true)]), Some(0.0));
        assert_eq!(auc(&[(1.0, false), (1.0, true)]), Some(0.5));
        // 3 positives, 2 negatives: pairs (p > n) = 5 of 6 → 5/6.
        let a = auc(&[(0.1, false), (0.4, false), (0.35, true), (0.8, true), (0.9, true)]).unwrap();
        assert!((a - 5.0 / 6.0).abs() < 1e-12, "{a}");
        assert_eq!(auc(&[(1.0, true)]), None);
    }
}
