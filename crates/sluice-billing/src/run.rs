//! Billing runs (`billing.run` jobs) and auto-billing.
//!
//! A run bills a selection of subscriptions in batches of [`BATCH`], each
//! committed in one transaction ([`crate::engine::Billing::bill_many`]),
//! two batches in flight: a failing subscription is reported and the others
//! go on; progress counts subscriptions; a workspace's runs run one at a
//! time, in the order they were queued (two workspaces' side by side). A
//! run that is
//! retried or resumed after `kill -9` bills again whatever is not billed
//! yet: periods already invoiced are skipped by the engine, so the result
//! counts the invoices of every attempt (by run id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_jobs::{payload_v1, JobContext, JobError, JobHandler, JobPayload, JobResult};
use sluice_store::{Job, NewJob, StoreError};

use crate::engine::{BillOptions, Billing};
use crate::BillingError;

/// The job kind.
pub const KIND: &str = "billing.run";

/// Subscriptions billed together: read in a few queries and committed in
/// one transaction (one fsync on SQLite instead of 500).
pub const BATCH: usize = 500;

/// Batches of a run in flight at once (see `BillingRun::run`).
const PIPELINE: usize = 2;

/// Which subscriptions a run bills besides an explicit list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    /// Only subscriptions currently on this plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// Only these customers' subscriptions.
    #[serde(default)]
    pub customer_ids: Option<Vec<String>>,
    /// Only subscriptions with a period that ended (by `until`) and is not
    /// invoiced yet.
    #[serde(default)]
    pub due: bool,
}

/// The payload of a `billing.run` job (version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPayload {
    /// Payload version.
    #[serde(default = "payload_v1")]
    pub v: u32,
    /// Workspace.
    pub workspace: sluice_core::WorkspaceName,
    /// Subscriptions to bill, in this order.
    #[serde(default)]
    pub subscription_ids: Option<Vec<String>>,
    /// Or those matching this.
    #[serde(default)]
    pub filter: Option<RunFilter>,
    /// Finalize the invoices.
    pub finalize: bool,
    /// Keep invoices of periods still in the grace period as drafts
    /// ([`BillOptions::respect_grace`]).
    #[serde(default)]
    pub respect_grace: bool,
    /// Bill periods ending at or before this (fixed when the run was made,
    /// so a retry bills the same periods).
    pub until: DateTime<Utc>,
    /// `until: "now"`: bill the current period early, up to `until` (the
    /// cut's usage bucket goes with it: `Subscription::usage_bound`).
    #[serde(default)]
    pub early: bool,
    /// Started by auto-billing.
    #[serde(default)]
    pub auto: bool,
}

impl JobPayload for RunPayload {
    const KIND: &'static str = KIND;
}

/// A subscription the run could not bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailure {
    /// The subscription.
    pub subscription_id: String,
    /// Why.
    pub message: String,
}

/// The result of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// Subscriptions selected.
    pub subscriptions_total: usize,
    /// Subscriptions handled (billed, nothing to bill, or failed).
    pub subscriptions_done: usize,
    /// Invoices the run made (over all its attempts).
    pub invoices_created: usize,
    /// Subscriptions that failed.
    pub errors: Vec<RunFailure>,
    /// Wall time of the last attempt.
    pub duration_ms: u64,
}

impl JobResult for RunResult {}

/// Runs `billing.run` jobs.
pub struct BillingRun {
    /// Billing.
    pub billing: Billing,
}

/// The subscriptions a run selects.
pub async fn select(billing: &Billing, p: &RunPayload) -> Result<Vec<String>, BillingError> {
    if let Some(ids) = &p.subscription_ids {
        let mut seen = std::collections::HashSet::new();
        return Ok(ids.iter().filter(|id| seen.insert(id.as_str())).cloned().collect());
    }
    let f = p.filter.clone().unwrap_or_default();
    let ids = billing.store.subscription_ids(&p.workspace, f.plan.as_deref(), f.customer_ids.as_deref(), f.due.then_some(p.until)).await?;
    if !f.due {
        return Ok(ids);
    }
    // `due`: a period has ended (by `until`) that is not invoiced yet, or a
    // voided one waits to be billed again. The store's filter (billed up to
    // before `until`) also holds for a subscription in the middle of its
    // period; its period end is known only from its cycle.
    let tz = billing.tz(&p.workspace).await?;
    let mut due = std::collections::HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH) {
        let keys: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for row in billing.store.subscriptions_by_ids(&p.workspace, &keys).await? {
            let ended = match crate::engine::parse_sub(&row) {
                Ok(sub) => {
                    sub.reissue.iter().any(|r| r.period_end <= p.until)
                        || sub.period_from(&sub.cycle(tz), row.billed_until).is_some_and(|period| period.end <= p.until)
                }
                // Selected, so that the run reports it as a failure.
                Err(_) => true,
            };
            if ended {
                due.insert(row.id);
            }
        }
    }
    Ok(ids.into_iter().filter(|id| due.contains(id)).collect())
}

fn job_error(e: BillingError) -> JobError {
    match e {
        BillingError::Store(e) => e.into(),
        BillingError::Busy(m) => JobError::retryable(m),
        e => JobError::permanent(e),
    }
}

#[async_trait]
impl JobHandler for BillingRun {
    fn kind(&self) -> &str {
        KIND
    }

    /// Two runs at once, of two workspaces: one tenant's long run does not
    /// hold up another's, and a workspace's runs still go in order.
    fn concurrency(&self) -> usize {
        2
    }

    fn one_per_workspace(&self) -> bool {
        true
    }

    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<Value, JobError> {
        let started = Instant::now();
        let p = RunPayload::of(job)?;
        let b = &self.billing;
        let ws = b.workspace(&p.workspace).await.map_err(job_error)?;
        let ids = select(b, &p).await.map_err(job_error)?;
        let total = ids.len();
        ctx.progress(0, Some(total as i64)).await;
        if total > BATCH {
            // Fresh planner statistics for a large run (see the store's docs).
            if let Err(e) = b.store.analyze_billing_tables().await {
                tracing::warn!(error = %e, "could not refresh the planner statistics of the billing tables");
            }
        }
        let opts = BillOptions {
            until: p.until,
            early: p.early,
            finalize: p.finalize,
            respect_grace: p.respect_grace,
            run_id: Some(job.id.clone()),
            dry_run: false,
            // Auto-billing bills only periods that end after the
            // subscription was created and while auto-billing was on.
            not_before: p.auto.then(|| ws.settings.auto_billing_since.unwrap_or(DateTime::<Utc>::MIN_UTC)),
        };
        let mut errors = Vec::new();
        let mut done = 0usize;
        // Batches of 500: read together, committed in one transaction each
        // (engine::Billing::bill_many); progress and cancellation per batch.
        // Two batches are in flight: one computes (CPU) while the other
        // commits (the state store's thread, or PostgreSQL), which uses
        // both cores of a small machine. Their subscriptions are disjoint,
        // and invoice numbers are reserved inside each commit, so they stay
        // gapless (in commit order). A batch that started is always awaited
        // to its end, never dropped half way: its commit and its
        // `invoice.finalized` events go together. After a cancellation or a
        // store failure no new batch starts.
        let mut halt: Option<JobError> = None;
        let mut chunks = ids.chunks(BATCH);
        let mut in_flight = futures::stream::FuturesOrdered::new();
        loop {
            while in_flight.len() < PIPELINE && halt.is_none() && !ctx.is_cancelled() {
                let Some(chunk) = chunks.next() else { break };
                let (ws, opts) = (&ws, &opts);
                in_flight.push_back(async move {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    (chunk, b.bill_many(ws, &refs, opts).await)
                });
            }
            let Some((chunk, outcome)) = in_flight.next().await else { break };
            match outcome {
                Ok(results) => {
                    for (id, r) in results {
                        if let Err(e) = r {
                            tracing::warn!(run = %job.id, subscription = %id, error = %e, "a subscription could not be billed");
                            errors.push(RunFailure { subscription_id: id, message: e.to_string() });
                        }
                    }
                }
                // The store is down: the whole run is retried (what it
                // billed stays billed, once).
                Err(BillingError::Store(e)) if !e.is_permanent() => {
                    halt.get_or_insert(JobError::retryable(e));
                    continue;
                }
                Err(e) => {
                    for id in chunk {
                        errors.push(RunFailure { subscription_id: id.clone(), message: e.to_string() });
                    }
                }
            }
            done += chunk.len();
            ctx.progress(done as i64, Some(total as i64)).await;
        }
        if let Some(e) = halt {
            return Err(e);
        }
        if done < total && ctx.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let invoices = b.store.run_invoice_ids(&job.id).await?;
        let result = RunResult {
            subscriptions_total: total,
            subscriptions_done: total,
            invoices_created: invoices.len(),
            errors,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        if let Some(sink) = &b.events {
            let props = json!({"run_id": job.id, "subscriptions_total": total, "invoices_created": result.invoices_created,
                "errors": result.errors.len(), "auto": p.auto});
            match crate::make_event(&p.workspace, &format!("billing_run.finished:{}", job.id), "billing_run.finished", None, None, props) {
                Ok(e) => {
                    // The log cannot take it now: another attempt (which
                    // bills nothing new) sends it. Refused (an enforced
                    // schema of the workspace): logged by the sink.
                    if sink.emit(vec![e]).await == Err(crate::engine::NotSent::Later) {
                        return Err(JobError::retryable("could not write the billing_run.finished event to the log"));
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not make the billing_run.finished event"),
            }
        }
        Ok(result.to_value())
    }
}

/// The `[billing]` section of the server's configuration (the binary's
/// `defaults.toml` documents it; a test checks it agrees with [`Default`]).
/// The per-workspace billing settings are not configuration
/// ([`crate::BillingSettings`]).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoBillingSettings {
    /// How often auto-billing (and the outbox relay) runs; at least 100 ms.
    /// Default 60 s.
    #[serde(with = "sluice_core::duration")]
    pub auto_interval: Duration,
}

impl Default for AutoBillingSettings {
    fn default() -> Self {
        AutoBillingSettings { auto_interval: Duration::from_secs(60) }
    }
}

/// Auto-billing (and the billing outbox's relay): every `every`, each workspace with `auto_billing` on gets
/// a run of its due subscriptions (unless one is already queued or
/// running), finalizing at once without a grace period; drafts whose grace
/// period has passed are finalized.
pub async fn auto_billing(billing: Billing, wake: Arc<dyn Fn() + Send + Sync>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        // Events a crash or a failed send left in the outbox (invoices',
        // health transitions'): first at start, then with every pass.
        match billing.relay_outbox().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "sent events left in the outbox"),
            Err(e) => tracing::warn!(error = %e, "could not send the events left in the outbox; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = auto_once(&billing, &*wake).await {
            tracing::warn!(error = %e, "auto-billing pass failed; trying again later");
        }
    }
}

/// One auto-billing pass over every workspace.
pub async fn auto_once(billing: &Billing, wake: &(dyn Fn() + Send + Sync)) -> Result<(), BillingError> {
    let store = &billing.store;
    let now = Utc::now();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list_workspaces(cursor.as_deref(), 1000).await?;
        for w in &page.data {
            let settings = billing.settings(&w.name).await?;
            if !settings.auto_billing {
                continue;
            }
            if settings.grace_period_days > 0 {
                finalize_after_grace(billing, &w.name, settings.grace_period_days, now).await?;
            }
            let since = settings.auto_billing_since.unwrap_or(DateTime::<Utc>::MIN_UTC);
            if !any_due(billing, &w.name, now, since).await? {
                continue;
            }
            let busy = [sluice_core::JobState::Queued, sluice_core::JobState::Running];
            let mut pending = false;
            for state in busy {
                let jobs = store.list_jobs(&w.name, Some(KIND), Some(state), None, 1000).await?;
                pending |= jobs.data.iter().any(|j| j.payload.get("auto").and_then(Value::as_bool) == Some(true));
            }
            if pending {
                continue;
            }
            // Names in the store were validated when the workspace was made.
            let Ok(workspace) = sluice_core::WorkspaceName::parse(w.name.as_str()) else {
                tracing::warn!(workspace = %w.name, "a stored workspace name is not valid; not billed automatically");
                continue;
            };
            let payload = RunPayload {
                v: 1,
                workspace,
                subscription_ids: None,
                filter: Some(RunFilter { due: true, ..RunFilter::default() }),
                finalize: true,
                respect_grace: true,
                until: now,
                early: false,
                auto: true,
            };
            store
                .enqueue_job(&NewJob { workspace: w.name.clone(), kind: KIND.into(), payload: payload.to_value(), max_attempts: 5, created_by: None })
                .await?;
            wake();
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(()),
        }
    }
}

/// Whether a subscription of the workspace has a period auto-billing bills
/// now: ended, not invoiced, and ending after the subscription was created
/// and after auto-billing was switched on. (Without this check every pass
/// would queue a run, and write its billing_run.finished event, for every
/// workspace with an active subscription.)
async fn any_due(billing: &Billing, ws_name: &str, now: DateTime<Utc>, since: DateTime<Utc>) -> Result<bool, BillingError> {
    let ws = billing.workspace(ws_name).await?;
    let mut cursor: Option<String> = None;
    loop {
        let page = billing.store.list_subscriptions(ws_name, None, None, cursor.as_deref(), 1000).await?;
        for row in &page.data {
            let sub = crate::engine::parse_sub(row)?;
            if let Some(p) = sub.period_from(&sub.cycle(ws.tz), row.billed_until) {
                if p.end <= now && p.end >= since.max(sub.created_at) {
                    return Ok(true);
                }
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(false),
        }
    }
}

async fn finalize_after_grace(billing: &Billing, ws_name: &str, grace_days: u32, now: DateTime<Utc>) -> Result<(), BillingError> {
    // Every draft, page by page: drafts kept on purpose (`finalize: false`)
    // may come first and must not hide those waiting for their grace.
    let filter = sluice_store::InvoiceFilter { status: Some(sluice_store::InvoiceStatus::Draft), ..Default::default() };
    let mut due = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = billing.store.list_invoices(ws_name, &filter, cursor.as_deref(), 1000).await?;
        due.extend(
            page.data
                .into_iter()
                .filter(|d| d.doc.get("finalize_after_grace") == Some(&Value::Bool(true)))
                .filter(|d| d.period_end + chrono::Duration::days(i64::from(grace_days)) <= now),
        );
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if due.is_empty() {
        return Ok(());
    }
    let ws = billing.workspace(ws_name).await?;
    for d in due {
        let audit = sluice_store::NewAudit {
            workspace: ws_name.to_owned(),
            actor_key_id: None,
            action: "invoice.finalize".into(),
            target_type: "invoice".into(),
            target_id: d.id.clone(),
            details: json!({"auto": true, "grace_period_days": grace_days}),
        };
        match billing.finalize(&ws, &d.id, &audit).await {
            Ok(_) | Err(BillingError::Conflict(_)) => {}
            Err(BillingError::Store(StoreError::Conflict(_))) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
