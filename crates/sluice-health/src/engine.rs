//! Health against the state store: what an evaluation reads (a customer's
//! events, attributes and override as they were at `T`, meter usage), the
//! live evaluation with its history and transition events, and the
//! evaluator loop.
//!
//! The live path, `as_of`, recomputes and backtests share
//! [`Health::load`] (a batch's reads) and [`Health::evaluate_loaded`]; the live path
//! additionally keeps the result (`customer_health`), a history row when
//! the stage or band changed or the score moved by more than the step, and
//! writes `customer.stage_changed` / `customer.health_changed` to the log
//! (at most one per customer and kind per cooldown; none on a customer's
//! first evaluation under a configuration version).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sluice_billing::{EventSink, NotSent};
use sluice_store::{CustomerHealthRow, HealthHistoryRow, OutboxRow, Store, StoreError};
use tokio::sync::Notify;

use crate::config::{HealthConfig, Measure};
use crate::eval::{self, Evaluation, Inputs};
use crate::HealthError;

/// The transition cooldown when neither the configuration nor the server sets one.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(600);

/// The `[health]` section of the server's configuration (the binary's
/// `defaults.toml` documents it; a test checks it agrees with [`Default`]).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Transition cooldown of health configurations that set none.
    #[serde(with = "sluice_core::duration")]
    pub transition_cooldown: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings { transition_cooldown: DEFAULT_COOLDOWN }
    }
}

/// Customer health.
#[derive(Clone)]
pub struct Health {
    /// The state store.
    pub store: Store,
    /// Where transition events go (the ingest pipeline); none in tests of
    /// the API alone.
    pub events: Option<Arc<dyn EventSink>>,
    /// Wakes the evaluator (the read model commits marked customers).
    pub wake: Arc<Notify>,
    /// Transition cooldown of configurations that set none
    /// (`health.transition_cooldown`).
    pub default_cooldown: Duration,
    /// One customer is evaluated by one task at a time (the evaluator, a
    /// recompute and a request may meet): otherwise both could see the same
    /// previous state and both write a transition event or a first history row.
    pub locks: Arc<Busy>,
    /// The workspaces whose events the read model keeps.
    pub enabled: crate::model::Enabled,
}

/// The customers being evaluated now, by workspace. A batch takes all of
/// its customers at once or none and waits: two batches of different
/// customers never wait for each other (a recompute evaluates two batches
/// at a time beside the evaluator), and no task holds part of another's
/// batch while it waits for the rest (no deadlock). Striped mutexes did
/// the same with less code, but a batch of 500 held nearly every stripe,
/// so batches ran one at a time.
#[derive(Default)]
pub struct Busy {
    held: std::sync::Mutex<HashMap<String, std::collections::HashSet<String>>>,
    freed: Notify,
}

/// Customers taken by [`Busy::take`], given back when dropped.
pub struct Taken<'a> {
    busy: &'a Busy,
    ws: String,
    customers: Vec<String>,
}

impl Busy {
    /// Takes these customers of `ws` once none of them is taken.
    async fn take(&self, ws: &str, customers: &[&str]) -> Taken<'_> {
        loop {
            // Registered before looking, so a release in between wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let set = held.entry(ws.to_owned()).or_default();
                if customers.iter().all(|c| !set.contains(*c)) {
                    let customers: Vec<String> = customers.iter().map(|c| (*c).to_owned()).collect();
                    set.extend(customers.iter().cloned());
                    return Taken { busy: self, ws: ws.to_owned(), customers };
                }
            }
            freed.await;
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut held = self.busy.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(set) = held.get_mut(&self.ws) {
            for c in &self.customers {
                set.remove(c);
            }
            if set.is_empty() {
                held.remove(&self.ws);
            }
        }
        drop(held);
        self.busy.freed.notify_waiters();
    }
}

/// A workspace's configuration and time zone, read once for many customers.
#[derive(Clone)]
pub struct WsCtx {
    /// Workspace.
    pub name: String,
    /// Time zone.
    pub tz: Tz,
    /// Configuration version.
    pub version: i64,
    /// The configuration.
    pub config: Arc<HealthConfig>,
}

/// Why a customer is evaluated (the history's cause).
#[derive(Debug, Clone)]
pub enum Cause {
    /// New events.
    Events,
    /// Time passed (a window edge, a date, an override's end, a cooldown).
    Time,
    /// Its attributes changed.
    Attributes,
    /// Its stage override was set or lifted.
    Override,
    /// A new configuration version.
    Config(i64),
}

impl Cause {
    /// The metrics label of the cause.
    fn label(&self) -> &'static str {
        match self {
            Cause::Events => "events",
            Cause::Time => "time",
            Cause::Attributes => "attributes",
            Cause::Override => "override",
            Cause::Config(_) => "config",
        }
    }

    fn describe(&self) -> String {
        match self {
            Cause::Events => "new events".into(),
            Cause::Time => "time passed (a window edge, a date or an override's end)".into(),
            Cause::Attributes => "attributes changed".into(),
            Cause::Override => "stage override set or lifted".into(),
            Cause::Config(v) => format!("configuration version {v}"),
        }
    }
}

/// Applies attribute patches in order (a null value removes the attribute).
pub fn fold_attributes(changes: &[(DateTime<Utc>, Value)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (_, p) in changes {
        if let Value::Object(m) = p {
            for (k, v) in m {
                if v.is_null() {
                    out.remove(k);
                } else {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

fn f64_of(d: Option<Decimal>) -> Option<f64> {
    d.and_then(|d| d.to_f64())
}

impl Health {
    /// A new handle (no event sink).
    pub fn new(store: Store) -> Health {
        Health {
            store,
            events: None,
            wake: Arc::new(Notify::new()),
            default_cooldown: DEFAULT_COOLDOWN,
            locks: Arc::default(),
            enabled: Default::default(),
        }
    }

    /// The workspace's time zone.
    pub async fn tz(&self, ws: &str) -> Result<Tz, HealthError> {
        let w = self.store.get_workspace(ws).await?;
        w.time_zone.parse().map_err(|_| HealthError::Corrupt(format!("workspace time zone {:?}", w.time_zone)))
    }

    /// A configuration version (`None`: current) with its number.
    pub async fn config(&self, ws: &str, version: Option<i64>) -> Result<Option<(i64, HealthConfig)>, HealthError> {
        match self.store.health_config(ws, version).await? {
            None => Ok(None),
            Some(r) => {
                let cfg = HealthConfig::load(&r.config).map_err(|e| HealthError::Corrupt(format!("configuration version {}: {e}", r.version)))?;
                Ok(Some((r.version, cfg)))
            }
        }
    }

    /// The context of a workspace (none without a configuration).
    pub async fn ctx(&self, ws: &str, version: Option<i64>) -> Result<Option<WsCtx>, HealthError> {
        let Some((version, cfg)) = self.config(ws, version).await? else { return Ok(None) };
        Ok(Some(WsCtx { name: ws.to_owned(), tz: self.tz(ws).await?, version, config: Arc::new(cfg) }))
    }

    /// Customers' attributes as they were at `at` (now when `None`); a
    /// customer without any is absent.
    pub async fn attributes_of(
        &self,
        ws: &str,
        customers: &[&str],
        at: Option<DateTime<Utc>>,
    ) -> Result<HashMap<String, Map<String, Value>>, HealthError> {
        let mut changes: HashMap<String, Vec<(DateTime<Utc>, Value)>> = HashMap::new();
        for (c, t, p) in self.store.attribute_changes_of(ws, customers, at).await? {
            changes.entry(c).or_default().push((t, p));
        }
        Ok(changes.into_iter().map(|(c, ch)| (c, fold_attributes(&ch))).collect())
    }

    /// Reads what evaluating `customers` at `at` needs, in a few queries
    /// per 500 customers.
    pub async fn load(&self, ctx: &WsCtx, customers: &[&str], at: DateTime<Utc>) -> Result<Loaded, HealthError> {
        let cfg = &ctx.config;
        let ws = ctx.name.as_str();
        let mut l = Loaded::default();
        if customers.is_empty() {
            return Ok(l);
        }
        // Only the events the windowed measures count, each type as far
        // back as its measures look, and of them only the columns they
        // look at.
        let wanted = cfg.events_wanted();
        for (c, run) in self.store.health_events_of(ws, customers, at, &wanted, |days| eval::window_start(ctx.tz, at, days)).await? {
            l.events.entry(c).or_default().push(run);
        }
        let since_last: std::collections::BTreeSet<Option<&str>> = cfg
            .measures
            .values()
            .filter_map(|m| match m {
                Measure::DaysSinceLast { event_type } => Some(event_type.as_deref()),
                _ => None,
            })
            .collect();
        if since_last.contains(&None) {
            // The last event of any type: every type's last.
            for (c, t, ts) in self.store.health_last_seen_of(ws, customers, at).await? {
                let seen = l.last_seen.entry(c).or_default();
                let any = seen.entry(String::new()).or_insert(ts);
                *any = (*any).max(ts);
                seen.insert(t, ts);
            }
        } else {
            // Only the types measured: a customer's other events are not read.
            for t in since_last.into_iter().flatten() {
                for (c, ts) in self.store.health_last_seen_of_type(ws, customers, t, at).await? {
                    l.last_seen.entry(c).or_default().insert(t.to_owned(), ts);
                }
            }
        }
        l.attributes = self.attributes_of(ws, customers, Some(at)).await?;
        l.overrides = self.store.stage_overrides_of(ws, customers, at).await?.into_iter().collect();
        let mut meters_done = std::collections::HashSet::new();
        for m in cfg.measures.values() {
            let Measure::UsageVsEntitlement { meter, .. } = m else { continue };
            if !meters_done.insert(meter.clone()) {
                continue;
            }
            let agg = match self.store.get_meter(ws, meter).await {
                Ok(m) => m.aggregation,
                Err(StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            // Usage is kept in 15-minute buckets: the bucket holding `at`
            // counts whole.
            let mut by_customer: HashMap<String, Vec<sluice_store::UsageBucket>> = HashMap::new();
            for b in self
                .store
                .usage_buckets_of_customers(ws, meter, customers, eval::month_start(ctx.tz, at), at + chrono::Duration::microseconds(1))
                .await?
            {
                by_customer.entry(b.customer_id.clone()).or_default().push(b);
            }
            for (c, buckets) in by_customer {
                let v = sluice_metering::usage::fold_buckets(agg, buckets.iter())
                    .map_err(|(a, b)| HealthError::Corrupt(format!("usage of meter {meter:?} overflows: {a} + {b}")))?;
                l.usage.entry(c).or_default().insert(meter.clone(), v.unwrap_or_default());
            }
        }
        self.included_units(ctx, customers, at, &mut l).await?;
        Ok(l)
    }

    /// Evaluates a loaded customer.
    pub fn evaluate_loaded(
        &self,
        ctx: &WsCtx,
        l: &Loaded,
        customer: &str,
        at: DateTime<Utc>,
        previous: Option<(Option<String>, Option<DateTime<Utc>>)>,
    ) -> Evaluation {
        static NO_EVENTS: Vec<sluice_store::HealthEventRun> = Vec::new();
        let empty_seen = HashMap::new();
        let empty_attrs = Map::new();
        let empty_dec = HashMap::new();
        let inp = Inputs {
            at,
            tz: ctx.tz,
            events: l.events.get(customer).unwrap_or(&NO_EVENTS),
            last_seen: l.last_seen.get(customer).unwrap_or(&empty_seen),
            attributes: l.attributes.get(customer).unwrap_or(&empty_attrs),
            usage: l.usage.get(customer).unwrap_or(&empty_dec),
            included: l.included.get(customer).unwrap_or(&empty_dec),
            previous,
            override_row: l.overrides.get(customer),
        };
        eval::evaluate(&ctx.config, &inp)
    }

    /// Evaluates one customer at `at` from the state store, with the stage
    /// it held before (`previous`: stage and since when).
    pub async fn evaluate_at(
        &self,
        ctx: &WsCtx,
        customer: &str,
        at: DateTime<Utc>,
        previous: Option<(Option<String>, Option<DateTime<Utc>>)>,
    ) -> Result<Evaluation, HealthError> {
        let l = self.load(ctx, &[customer], at).await?;
        Ok(self.evaluate_loaded(ctx, &l, customer, at, previous))
    }

    /// Included units (`free_units`) per meter in the plan of each
    /// customer's subscriptions at `at` (for `usage_vs_entitlement` without
    /// an attribute); several subscriptions add up.
    async fn included_units(&self, ctx: &WsCtx, customers: &[&str], at: DateTime<Utc>, l: &mut Loaded) -> Result<(), HealthError> {
        let wanted: Vec<&str> = ctx
            .config
            .measures
            .values()
            .filter_map(|m| match m {
                Measure::UsageVsEntitlement { meter, attribute: None } => Some(meter.as_str()),
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut plans: HashMap<(String, i64), Option<sluice_billing::PlanSpec>> = HashMap::new();
        for row in self.store.subscriptions_of_customers(&ctx.name, customers).await? {
            let Ok(sub) = sluice_billing::engine::parse_sub(&row) else { continue };
            if sub.start > at || sub.end.is_some_and(|e| e <= at) {
                continue;
            }
            let phase = sub.phase_at(at);
            let key = (phase.plan.clone(), phase.plan_version);
            if !plans.contains_key(&key) {
                let spec = match self.store.plan(&ctx.name, &phase.plan, Some(phase.plan_version)).await {
                    Ok(p) => serde_json::from_value::<sluice_billing::PlanSpec>(p.spec).ok(),
                    Err(StoreError::NotFound) => None,
                    Err(e) => return Err(e.into()),
                };
                plans.insert(key.clone(), spec);
            }
            let Some(Some(spec)) = plans.get(&key) else { continue };
            for c in spec.charges.iter().filter(|c| wanted.contains(&c.meter.as_str())) {
                *l.included.entry(row.customer_id.clone()).or_default().entry(c.meter.clone()).or_insert(Decimal::ZERO) +=
                    c.free_units.unwrap_or_default();
            }
        }
        Ok(())
    }

    /// The stage a customer held just before `at`, from its history.
    pub async fn previous_at(
        &self,
        ws: &str,
        customer: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<(Option<String>, Option<DateTime<Utc>>)>, HealthError> {
        let h = self.store.health_history_at(ws, customer, at - chrono::Duration::microseconds(1)).await?;
        Ok(h.map(|h| (h.stage, h.stage_since)))
    }

    /// `GET /v1/customers/{id}/health?as_of=…&config_version=…`.
    pub async fn as_of(&self, ws: &str, customer: &str, at: DateTime<Utc>, version: Option<i64>) -> Result<Value, HealthError> {
        let ctx = self.ctx(ws, version).await?.ok_or_else(|| match version {
            Some(v) => HealthError::NotFound(format!("health configuration version {v} not found")),
            None => HealthError::NotFound("no health configuration yet: PUT /v1/health/config".into()),
        })?;
        let prev = self.previous_at(ws, customer, at).await?;
        let e = self.evaluate_at(&ctx, customer, at, prev).await?;
        Ok(e.view(customer, ctx.version))
    }

    /// Evaluates a customer now under `ctx`'s configuration, keeps the
    /// result, writes history and transition events; returns the view.
    pub async fn refresh(&self, ctx: &WsCtx, customer: &str, cause: Cause) -> Result<Value, HealthError> {
        let mut v = self.refresh_many(ctx, &[customer], cause).await?;
        let doc = v.pop().ok_or_else(|| HealthError::Corrupt("an evaluation went missing".into()))?;
        serde_json::from_str(doc.get()).map_err(|e| HealthError::Corrupt(format!("an evaluation's view: {e}")))
    }

    /// [`Health::refresh`] for many customers of one workspace: read
    /// together, saved in one transaction per call (callers pass at most a
    /// few hundred). Returns the views in the order of `customers`.
    pub async fn refresh_many(&self, ctx: &WsCtx, customers: &[&str], cause: Cause) -> Result<Vec<Box<RawValue>>, HealthError> {
        let ws = ctx.name.as_str();
        let _one_at_a_time = self.locks.take(ws, customers).await;
        // Microseconds, as the store keeps times: an `as_of` of this
        // evaluation's time then reads exactly what it read.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let rows: HashMap<String, CustomerHealthRow> =
            self.store.customers_health_state(ws, customers).await?.into_iter().map(|r| (r.customer_id.clone(), r)).collect();
        let loaded = self.load(ctx, customers, now).await?;
        let mut saved = Vec::with_capacity(customers.len());
        let mut history = Vec::new();
        let mut events = Vec::new();
        for &c in customers {
            let row = rows.get(c);
            let e = self.evaluate_loaded(ctx, &loaded, c, now, row.map(|r| (r.stage.clone(), r.stage_since)));
            let s = self.settle(ctx, c, row, &e, now, &cause)?;
            saved.push(s.0);
            history.extend(s.1);
            events.extend(s.2);
        }
        // Transitions are written to the outbox with the evaluation that
        // decided them, then sent: a crash or a full log between the two
        // loses none (the outbox relay sends what is left; the ids are
        // stable, so an event sent twice is dropped by the log).
        let outbox = match &self.events {
            Some(_) => events
                .iter()
                .map(|e| {
                    let doc = serde_json::to_string(e).map_err(|err| HealthError::Corrupt(format!("a transition event: {err}")))?;
                    Ok(OutboxRow::of_event(ws, e.event_type.as_str(), e.id.as_str(), doc))
                })
                .collect::<Result<Vec<_>, HealthError>>()?,
            None => Vec::new(),
        };
        self.store.save_customer_health_many(ws, &saved, &history, &outbox).await?;
        metrics::counter!("sluice_health_evaluations_total", "cause" => cause.label()).increment(saved.len() as u64);
        if let (Some(sink), false) = (&self.events, events.is_empty()) {
            match sink.emit(events).await {
                // Not now, or refused as a whole (an enforced schema of the
                // workspace on one of them?): the outbox relay sends them
                // again, one by one when refused, and drops only those the
                // log refuses.
                Err(NotSent::Later | NotSent::Refused) => {}
                Ok(()) => {
                    if let Err(e) = self.store.delete_event_outbox(&outbox).await {
                        tracing::warn!(error = %e, "could not clear sent transition events from the outbox; they are sent again (and deduplicated) later");
                    }
                }
            }
        }
        Ok(saved.into_iter().map(|r| r.doc).collect())
    }

    /// What an evaluation of the live path leaves: the row to keep, a
    /// history row when something changed, transition events (cooldown).
    /// The customer's latest history row is compared through its live row
    /// `row` ([`CustomerHealthRow::history_score`]).
    fn settle(
        &self,
        ctx: &WsCtx,
        customer: &str,
        row: Option<&CustomerHealthRow>,
        e: &Evaluation,
        now: DateTime<Utc>,
        cause: &Cause,
    ) -> Result<(CustomerHealthRow, Option<HealthHistoryRow>, Vec<sluice_core::Event>), HealthError> {
        let ws = ctx.name.as_str();
        let view = e.view_text(customer, ctx.version).map_err(|err| HealthError::Corrupt(format!("an evaluation's view: {err}")))?;
        let score_view = e.score.map(eval::num).unwrap_or(Value::Null);
        let first_under_version = row.is_none_or(|r| r.config_version != ctx.version);
        let cooldown = chrono::Duration::from_std(ctx.config.cooldown(self.default_cooldown)).unwrap_or(chrono::Duration::minutes(10));
        let mut emitted = row.map(|r| r.emitted.clone()).filter(|v| v.is_object()).unwrap_or_else(|| json!({}));
        let mut next = e.next_change;
        let mut out_events = Vec::new();
        let current = [("stage", e.stage.clone()), ("band", e.band.map(str::to_owned))];
        if first_under_version {
            for (k, v) in &current {
                emitted[*k] = json!({"value": v, "at": null});
            }
        } else {
            for (k, v) in &current {
                let last = emitted.get(*k).and_then(|x| x.get("value")).cloned().unwrap_or(Value::Null);
                let last_v: Option<String> = serde_json::from_value(last).unwrap_or(None);
                if &last_v == v {
                    continue;
                }
                let last_at = emitted.get(*k).and_then(|x| x.get("at")).and_then(Value::as_i64).map(sluice_store::from_micros);
                match last_at.map(|t| t + cooldown).filter(|end| *end > now) {
                    // Held by the cooldown: look again when it ends.
                    Some(end) => next = next.min(end),
                    None => {
                        let (kind, props) = if *k == "stage" {
                            (
                                "customer.stage_changed",
                                json!({"customer_id": customer, "from": last_v, "to": v, "stage_rule": e.stage_rule,
                                "stage_reason": e.stage_reason, "score": score_view, "band": e.band, "config_version": ctx.version, "at": now}),
                            )
                        } else {
                            (
                                "customer.health_changed",
                                json!({"customer_id": customer, "from": last_v, "to": v, "score": score_view,
                                "stage": e.stage, "config_version": ctx.version, "at": now}),
                            )
                        };
                        let id = format!("{kind}:{customer}:{}", now.timestamp_micros());
                        match sluice_billing::make_event(ws, &id, kind, Some(customer), None, props) {
                            Ok(ev) => out_events.push(ev),
                            Err(err) => tracing::warn!(customer, error = %err, "could not make a transition event"),
                        }
                        emitted[*k] = json!({"value": v, "at": now.timestamp_micros()});
                    }
                }
            }
        }
        emitted["version"] = json!(ctx.version);
        // History: the first evaluation, a stage or band change, or a score
        // that moved by more than the step since the last history row.
        let score = f64_of(e.score);
        let changed = match row {
            None => Some(format!("first evaluation ({})", cause.describe())),
            Some(h) => {
                let moved = match (h.history_score, score) {
                    (Some(a), Some(b)) => (a - b).abs() > ctx.config.history_score_step,
                    (None, None) => false,
                    _ => true,
                };
                (h.stage != e.stage || h.band.as_deref() != e.band || moved || h.config_version != ctx.version).then(|| cause.describe())
            }
        };
        let history = changed.map(|c| HealthHistoryRow {
            id: format!("hh_{}", uuid::Uuid::now_v7().simple()),
            customer_id: customer.to_owned(),
            at: now,
            config_version: ctx.version,
            stage: e.stage.clone(),
            stage_since: e.stage_since,
            band: e.band.map(str::to_owned),
            score,
            previous: json!({"stage": row.and_then(|h| h.stage.clone()), "band": row.and_then(|h| h.band.clone()),
                "score": row.and_then(|h| h.history_score)}),
            cause: c,
        });
        let saved = CustomerHealthRow {
            customer_id: customer.to_owned(),
            config_version: ctx.version,
            stage: e.stage.clone(),
            stage_since: e.stage_since,
            score,
            band: e.band.map(str::to_owned),
            priority: f64_of(e.priority),
            doc: view,
            evaluated_at: now,
            next_eval_at: next,
            emitted,
            history_score: if history.is_some() { score } else { row.and_then(|r| r.history_score) },
        };
        Ok((saved, history, out_events))
    }

    /// Refreshes a customer of a workspace if it has a configuration.
    pub async fn refresh_one(&self, ws: &str, customer: &str, cause: Cause) -> Result<Option<Value>, HealthError> {
        match self.ctx(ws, None).await? {
            Some(ctx) => Ok(Some(self.refresh(&ctx, customer, cause).await?)),
            None => Ok(None),
        }
    }

    /// One pass of the evaluator: customers marked by the read model, then
    /// those whose next change time has come, evaluated a workspace's batch
    /// at a time. Returns how many it evaluated.
    pub async fn evaluate_pending(&self, limit: usize) -> Result<usize, HealthError> {
        let mut ctxs: HashMap<String, Option<WsCtx>> = HashMap::new();
        let mut n = 0;
        let dirty = self.store.health_dirty(limit).await?;
        let due = self.store.health_due(Utc::now(), limit).await?;
        let mut by_ws: std::collections::BTreeMap<&str, Vec<(&str, bool)>> = Default::default();
        for (ws, c, _) in &dirty {
            by_ws.entry(ws.as_str()).or_default().push((c.as_str(), true));
        }
        for (ws, c) in &due {
            by_ws.entry(ws.as_str()).or_default().push((c.as_str(), false));
        }
        for (ws, list) in by_ws {
            if !ctxs.contains_key(ws) {
                ctxs.insert(ws.to_owned(), self.ctx(ws, None).await?);
            }
            let Some(ctx) = ctxs.get(ws).and_then(Option::as_ref) else { continue };
            for (marked, cause) in [(true, Cause::Events), (false, Cause::Time)] {
                let mut ids: Vec<&str> = list.iter().filter(|(_, d)| *d == marked).map(|(c, _)| *c).collect();
                ids.sort_unstable();
                ids.dedup();
                for chunk in ids.chunks(BATCH) {
                    self.refresh_many(ctx, chunk, cause.clone()).await?;
                    n += chunk.len();
                }
            }
        }
        self.store.clear_health_dirty(&dirty).await?;
        Ok(n)
    }
}

/// Customers evaluated together (read in a few queries, saved in one transaction).
pub const BATCH: usize = 500;

/// What evaluations of a batch of customers at one time read
/// ([`Health::load`]), by customer.
#[derive(Default)]
pub struct Loaded {
    events: HashMap<String, Vec<sluice_store::HealthEventRun>>,
    last_seen: HashMap<String, HashMap<String, DateTime<Utc>>>,
    attributes: HashMap<String, Map<String, Value>>,
    overrides: HashMap<String, sluice_store::OverrideRow>,
    usage: HashMap<String, HashMap<String, Decimal>>,
    included: HashMap<String, HashMap<String, Decimal>>,
}

/// The evaluator: re-evaluates customers when the read model marks them
/// and when time alone changes them, until `stop`.
pub async fn evaluator(health: Health, mut stop: tokio::sync::watch::Receiver<bool>) {
    // The queue gauges cost a COUNT over the marks: taken when a pass that
    // evaluated someone has emptied the queue, else at most once a second.
    let mut recorded: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = health.wake.notified() => {
                // The commit that woke us may still be finishing.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
        loop {
            let evaluated = match health.evaluate_pending(BATCH).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "health evaluation failed; trying again shortly");
                    0
                }
            };
            let more = evaluated >= BATCH;
            let drained = evaluated > 0 && !more;
            if drained || recorded.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                health.record_queue().await;
                recorded = Some(std::time::Instant::now());
            }
            if !more {
                break;
            }
        }
    }
}

impl Health {
    /// Sets the evaluator's queue gauges: customers marked by new events
    /// and not evaluated yet, and how long the one waiting longest has
    /// waited (0 when none waits) — how far live scores are behind.
    async fn record_queue(&self) {
        match self.store.health_dirty_summary().await {
            Ok((n, oldest)) => {
                metrics::gauge!("sluice_health_marked_customers").set(n as f64);
                let wait = oldest.map_or(0.0, |t| (Utc::now().timestamp_micros() - t).max(0) as f64 / 1e6);
                metrics::gauge!("sluice_health_oldest_mark_seconds").set(wait);
            }
            Err(e) => tracing::debug!(error = %e, "cannot count the health marks"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_of_other_customers_do_not_wait_and_a_shared_customer_waits_for_its_release() {
        let busy = Arc::new(Busy::default());
        let a = busy.take("ws", &["c1", "c2"]).await;
        // Other customers, and the same ids in another workspace: at once.
        let b = tokio::time::timeout(Duration::from_secs(1), busy.take("ws", &["c3"])).await.expect("not held");
        let c = tokio::time::timeout(Duration::from_secs(1), busy.take("other", &["c1"])).await.expect("not held");
        // A batch that shares one customer waits, holding none of its own.
        let waiter = {
            let busy = busy.clone();
            tokio::spawn(async move {
                let _t = busy.take("ws", &["c4", "c2"]).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "c2 is taken");
        tokio::time::timeout(Duration::from_secs(1), busy.take("ws", &["c4"])).await.expect("c4 is not held by the waiter");
        drop((b, c));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "c2 is still taken");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("woken by the release").expect("no panic");
        assert!(busy.held.lock().expect("lock").is_empty(), "everything given back");
    }
}
