//! Billing against the state store: a subscription's due periods become
//! invoices in one short transaction each; drafts are recomputed with late
//! usage; finalization numbers them; every finalized invoice and finished
//! run enters the log as an event.
//!
//! Idempotency does not rest on the caller: a subscription's `billed_until`
//! and `revision` move in the same transaction as its invoices are
//! inserted, a commit computed from a stale read is refused and recomputed,
//! and the store allows one invoice that is not void per (subscription,
//! period start). Retries, overlapping runs and `kill -9` therefore bill
//! each period at most once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_core::Aggregation;
use sluice_store::{BillingCommit, InvoiceRow, Meter, NewAudit, NewInvoice, OutboxRow, Store, StoreError, SubscriptionRow};

use crate::invoice::{billed_elsewhere_line, late_line, Invoice, InvoiceStatus, Issuer, LineKind, PeriodBill};
use crate::money::Currency;
use crate::plan::PlanSpec;
use crate::settings::BillingSettings;
use crate::subscription::{bucket_ceil, bucket_floor, Period, Reissue, Subscription};
use crate::BillingError;

/// Most periods one subscription is billed for in one call (a subscription
/// started years ago on weekly billing); the rest on the next run.
pub const MAX_PERIODS: usize = 1000;

/// Where billing's events go (the ingest pipeline in the server).
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Appends `events`; `Ok` once they are in the log. Failures are the
    /// sink's to log (an event with the same id is deduplicated, so
    /// emitting again is safe).
    async fn emit(&self, events: Vec<sluice_core::Event>) -> Result<(), NotSent>;
}

/// Why events did not go into the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// The log cannot take them now (unavailable, or overloaded for long):
    /// send them again later.
    Later,
    /// They are refused (an enforced property schema of the workspace, too
    /// large): sending them again would not help.
    Refused,
}

/// What billing works with in one workspace.
#[derive(Debug, Clone)]
pub struct Ws {
    /// Name.
    pub name: String,
    /// Time zone.
    pub tz: Tz,
    /// Billing settings.
    pub settings: BillingSettings,
    /// Meters by key.
    pub meters: HashMap<String, Meter>,
}

/// How a subscription is billed.
#[derive(Debug, Clone)]
pub struct BillOptions {
    /// Bill periods that end at or before this.
    pub until: DateTime<Utc>,
    /// Also bill the current period up to `until` (`until: "now"`).
    pub early: bool,
    /// Finalize (and number) the invoices.
    pub finalize: bool,
    /// ... except those whose period ended less than the workspace's
    /// `grace_period_days` ago: they stay drafts (recomputed with late
    /// usage) and are finalized once the grace period has passed. Runs that
    /// do not say `finalize` and auto-billing respect it; `finalize: true`
    /// finalizes at once.
    pub respect_grace: bool,
    /// The run billing.
    pub run_id: Option<String>,
    /// Compute only; write nothing.
    pub dry_run: bool,
    /// Auto-billing: leave a subscription whose next period ended before
    /// this (or before the subscription was created) to explicit runs.
    pub not_before: Option<DateTime<Utc>>,
}

/// Billing, on a state store.
#[derive(Clone)]
pub struct Billing {
    /// The state store.
    pub store: Store,
    /// Where events go (none in tests of the engine alone).
    pub events: Option<Arc<dyn EventSink>>,
}

/// Plan versions read once per call.
#[derive(Default)]
pub(crate) struct Plans(HashMap<(String, i64), Arc<PlanSpec>>);

impl Plans {
    pub(crate) async fn get(&mut self, store: &Store, ws: &str, code: &str, version: i64) -> Result<Arc<PlanSpec>, BillingError> {
        if let Some(p) = self.0.get(&(code.to_owned(), version)) {
            return Ok(p.clone());
        }
        let row = store.plan(ws, code, Some(version)).await.map_err(|e| match e {
            StoreError::NotFound => BillingError::Corrupt(format!("plan {code:?} version {version} is missing")),
            e => e.into(),
        })?;
        let spec: PlanSpec = serde_json::from_value(row.spec).map_err(|e| BillingError::Corrupt(format!("plan {code:?} version {version}: {e}")))?;
        let spec = Arc::new(spec);
        self.0.insert((code.to_owned(), version), spec.clone());
        Ok(spec)
    }
}

/// What finalized invoices billed for one meter and earlier period.
struct Billed {
    quantity: Decimal,
    amount: Decimal,
    /// The plan (code, version) that priced the period's usage line.
    plan: (String, i64),
    /// The numbers of the invoices with those lines.
    on: Vec<String>,
}

/// Usage of one meter for one customer over the batch's range, read once
/// and summed per invoice period in memory.
#[derive(Default)]
enum MeterUsage {
    #[default]
    None,
    Buckets(Vec<sluice_store::UsageBucket>),
    Unique(Vec<(String, DateTime<Utc>, String)>),
}

impl MeterUsage {
    /// The meter's value over the usage of `parts`, each a customer's usage
    /// and the subscriptions (`""`: none named) whose usage of it counts, in
    /// the usage buckets (15 minutes) that start in `[from, to)` (a period's
    /// [`Subscription::usage_window`]). Distinct values are counted once
    /// across the parts.
    fn quantity(parts: &[(&MeterUsage, &[&str])], m: &Meter, (from, to): (DateTime<Utc>, DateTime<Utc>)) -> Result<Decimal, BillingError> {
        let inside = |t: DateTime<Utc>| t >= from && t < to;
        if m.aggregation == Aggregation::UniqueCount {
            let mut distinct: std::collections::HashSet<&str> = std::collections::HashSet::new();
            for (u, subs) in parts {
                if let MeterUsage::Unique(rows) = u {
                    distinct.extend(rows.iter().filter(|r| subs.contains(&r.0.as_str()) && inside(r.1)).map(|r| r.2.as_str()));
                }
            }
            return Ok(Decimal::from(distinct.len()));
        }
        let buckets = parts.iter().flat_map(|(u, subs)| {
            let rows = match u {
                MeterUsage::Buckets(b) => b.as_slice(),
                _ => &[],
            };
            rows.iter().filter(move |b| subs.contains(&b.subscription_id.as_str()) && inside(b.bucket_start))
        });
        let v = sluice_metering::usage::fold_buckets(m.aggregation, buckets)
            .map_err(|(a, b)| BillingError::Overflow(format!("meter {:?}: {a} + {b} is beyond the largest exact decimal", m.key)))?;
        Ok(v.unwrap_or_default())
    }

    /// Whether any usage of `subs` lies in the buckets `[from, to)`.
    fn any(&self, subs: &[&str], (from, to): (DateTime<Utc>, DateTime<Utc>)) -> bool {
        let inside = |s: &str, t: DateTime<Utc>| subs.contains(&s) && t >= from && t < to;
        match self {
            MeterUsage::None => false,
            MeterUsage::Unique(rows) => rows.iter().any(|r| inside(&r.0, r.1)),
            MeterUsage::Buckets(b) => b.iter().any(|b| inside(&b.subscription_id, b.bucket_start)),
        }
    }
}

/// Everything computing the invoices of a batch of subscriptions reads,
/// read once for the batch: their invoices so far, every subscription of
/// their customers, the customers' names, plan versions, and each meter's
/// usage of all the batch's customers over the batch's range. One
/// subscription is a batch of one; a billing run reads 500 at a time.
struct Batch {
    history: HashMap<String, Vec<InvoiceRow>>,
    siblings: HashMap<String, Vec<Subscription>>,
    names: HashMap<String, String>,
    customers: Vec<String>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    usage: HashMap<String, HashMap<String, MeterUsage>>,
    plans: Plans,
    log_position: BTreeMap<u32, u64>,
}

impl Batch {
    async fn load(store: &Store, ws: &Ws, items: &[(&Subscription, &[Period])]) -> Result<Batch, BillingError> {
        let ids: Vec<&str> = items.iter().map(|(s, _)| s.id.as_str()).collect();
        let mut customers: Vec<&str> = items.iter().map(|(s, _)| s.customer_id.as_str()).collect();
        customers.sort_unstable();
        customers.dedup();
        let mut history: HashMap<String, Vec<InvoiceRow>> = HashMap::new();
        for inv in store.invoices_of_subscriptions(&ws.name, &ids).await? {
            history.entry(inv.subscription_id.clone()).or_default().push(inv);
        }
        let mut siblings: HashMap<String, Vec<Subscription>> = HashMap::new();
        for row in store.subscriptions_of_customers(&ws.name, &customers).await? {
            siblings.entry(row.customer_id.clone()).or_default().push(parse_sub(&row)?);
        }
        let names = store.customer_names(&ws.name, &customers).await?.into_iter().collect();
        // The range: every period billed, and every finalized period whose
        // late usage may be added.
        let firsts = items.iter().filter_map(|(_, ps)| ps.first().map(|p| p.start));
        let finalized = || history.values().flatten().filter(|i| i.status.is_final());
        let from = firsts.chain(finalized().map(|i| i.period_start)).min().map(bucket_floor).unwrap_or(DateTime::<Utc>::MIN_UTC);
        // A voided period billed again comes before periods billed since,
        // whose late usage it may carry: the range covers them too.
        let lasts = items.iter().filter_map(|(_, ps)| ps.iter().map(|p| p.end).max());
        // (Up to the end of the last bucket: an early bill's period takes
        // the bucket of its cut whole.)
        let to = lasts.chain(finalized().map(|i| i.period_end)).max().map(bucket_ceil).unwrap_or(from);
        Ok(Batch {
            history,
            siblings,
            names,
            // Usage that names a subscription but no customer is kept under
            // the customer `""`: read with the batch's.
            customers: customers.iter().copied().chain((!customers.contains(&"")).then_some("")).map(str::to_owned).collect(),
            from,
            to,
            usage: HashMap::new(),
            plans: Plans::default(),
            log_position: store.checkpoints(sluice_metering::consumer::NAME).await?.into_iter().collect(),
        })
    }

    /// `meter`'s usage of `customer`; [`Batch::load_usage`] first.
    fn usage(&self, m: &Meter, customer: &str) -> &MeterUsage {
        static NONE: MeterUsage = MeterUsage::None;
        self.usage.get(&m.key).and_then(|u| u.get(customer)).unwrap_or(&NONE)
    }

    /// Reads `meter`'s usage of all the batch's customers, once.
    async fn load_usage(&mut self, store: &Store, ws: &str, m: &Meter) -> Result<(), BillingError> {
        if !self.usage.contains_key(&m.key) {
            let customers: Vec<&str> = self.customers.iter().map(String::as_str).collect();
            let mut by_customer: HashMap<String, MeterUsage> = HashMap::new();
            if m.aggregation == Aggregation::UniqueCount {
                for (c, s, t, v) in store.usage_unique_of_customers(ws, &m.key, &customers, self.from, self.to).await? {
                    if let MeterUsage::Unique(rows) = by_customer.entry(c).or_insert_with(|| MeterUsage::Unique(Vec::new())) {
                        rows.push((s, t, v));
                    }
                }
            } else {
                for b in store.usage_buckets_of_customers(ws, &m.key, &customers, self.from, self.to).await? {
                    if let MeterUsage::Buckets(rows) = by_customer.entry(b.customer_id.clone()).or_insert_with(|| MeterUsage::Buckets(Vec::new())) {
                        rows.push(b);
                    }
                }
            }
            self.usage.insert(m.key.clone(), by_customer);
        }
        Ok(())
    }
}

/// An invoice view for the API: the document with the store's status,
/// number and times.
pub fn view(row: &InvoiceRow) -> Value {
    let mut v = row.doc.clone();
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), json!(row.id));
        m.insert("status".into(), json!(row.status));
        m.insert("number".into(), json!(row.number));
        m.insert("run_id".into(), json!(row.run_id));
        m.insert("created_at".into(), json!(row.created_at));
        m.insert("finalized_at".into(), json!(row.finalized_at));
        m.insert("voided_at".into(), json!(row.voided_at));
        m.insert("paid_at".into(), json!(row.paid_at));
    }
    v
}

/// The view of an invoice that is not stored (dry runs, upcoming).
pub fn unstored_view(inv: &Invoice) -> Value {
    let mut v = serde_json::to_value(inv).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("status".into(), json!(InvoiceStatus::Draft));
        m.insert("number".into(), Value::Null);
    }
    v
}

impl Billing {
    /// The workspace's time zone.
    pub async fn tz(&self, name: &str) -> Result<Tz, BillingError> {
        let w = self.store.get_workspace(name).await?;
        w.time_zone.parse().map_err(|_| BillingError::Corrupt(format!("workspace time zone {:?}", w.time_zone)))
    }

    /// The workspace's time zone, billing settings and meters.
    pub async fn workspace(&self, name: &str) -> Result<Ws, BillingError> {
        let tz = self.tz(name).await?;
        let settings = self.settings(name).await?;
        let meters = self.store.list_meters(Some(name)).await?.into_iter().map(|m| (m.key.clone(), m)).collect();
        Ok(Ws { name: name.to_owned(), tz, settings, meters })
    }

    /// The workspace's billing settings (defaults when never set).
    pub async fn settings(&self, ws: &str) -> Result<BillingSettings, BillingError> {
        match self.store.billing_settings(ws).await? {
            Some(v) => serde_json::from_value(v).map_err(|e| BillingError::Corrupt(format!("billing settings: {e}"))),
            None => Ok(BillingSettings::default()),
        }
    }

    /// A stored subscription.
    pub async fn subscription(&self, ws: &str, id: &str) -> Result<(SubscriptionRow, Subscription), BillingError> {
        let row = self.store.subscription(ws, id).await.map_err(|e| match e {
            StoreError::NotFound => BillingError::NotFound(format!("subscription {id:?} not found")),
            e => e.into(),
        })?;
        let sub = parse_sub(&row)?;
        Ok((row, sub))
    }

    /// Bills subscription `id`: every period not invoiced yet that ends at
    /// or before `o.until` (and, early, the current one up to it). Returns
    /// the invoice views (computed only, for a dry run).
    pub async fn bill(&self, ws: &Ws, id: &str, o: &BillOptions) -> Result<Vec<Value>, BillingError> {
        // A commit refused because another run or a plan change wrote the
        // subscription meanwhile is recomputed from the new state (which
        // usually has nothing left to bill).
        for _ in 0..5 {
            match self.bill_batch(ws, &[id], o).await {
                Ok(mut results) => return results.pop().map(|(_, r)| r).unwrap_or(Ok(Vec::new())),
                Err(BillingError::Store(StoreError::Conflict(_))) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(BillingError::Busy(format!("subscription {id:?} kept changing while it was billed; run again")))
    }

    /// Bills several subscriptions: read together, computed, and committed
    /// in one transaction (a billing run's batches of 500). When that commit
    /// meets a concurrent change (another run, a plan change), each
    /// subscription is billed again on its own. One result per id, in order.
    pub async fn bill_many(&self, ws: &Ws, ids: &[&str], o: &BillOptions) -> Result<Vec<(String, Result<Vec<Value>, BillingError>)>, BillingError> {
        match self.bill_batch(ws, ids, o).await {
            Err(BillingError::Store(StoreError::Conflict(_))) => {}
            other => return other,
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.bill(ws, id, o).await {
                Err(BillingError::Store(e)) if !e.is_permanent() => return Err(BillingError::Store(e)),
                r => out.push(((*id).to_owned(), r)),
            }
        }
        Ok(out)
    }

    /// One attempt of [`Billing::bill_many`]: `Err(Store(Conflict))` when
    /// the commit met a concurrent change (nothing was written).
    async fn bill_batch(&self, ws: &Ws, ids: &[&str], o: &BillOptions) -> Result<Vec<(String, Result<Vec<Value>, BillingError>)>, BillingError> {
        let rows: HashMap<String, SubscriptionRow> =
            self.store.subscriptions_by_ids(&ws.name, ids).await?.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut results: HashMap<&str, Result<Vec<Value>, BillingError>> = HashMap::new();
        // (row, subscription with any new cut, periods, new billed-until)
        let mut work: Vec<(&SubscriptionRow, Subscription, Vec<Period>, DateTime<Utc>)> = Vec::new();
        for &id in ids {
            let Some(row) = rows.get(id) else {
                results.insert(id, Err(BillingError::NotFound(format!("subscription {id:?} not found"))));
                continue;
            };
            match parse_sub(row) {
                Err(e) => {
                    results.insert(id, Err(e));
                }
                Ok(sub) => match due_periods(ws, row, sub, o) {
                    Some((sub, periods, b)) => work.push((row, sub, periods, b)),
                    None => {
                        results.insert(id, Ok(Vec::new()));
                    }
                },
            }
        }
        if !work.is_empty() {
            let items: Vec<(&Subscription, &[Period])> = work.iter().map(|(_, s, p, _)| (s, p.as_slice())).collect();
            let mut batch = Batch::load(&self.store, ws, &items).await?;
            let mut computed: Vec<(&SubscriptionRow, &Subscription, DateTime<Utc>, Vec<Invoice>)> = Vec::new();
            // (The grace period is decided per invoice at commit below.)
            for (row, sub, periods, b) in &work {
                match self.compute(ws, sub, periods, None, &mut batch).await {
                    Ok(mut invoices) => {
                        for i in &mut invoices {
                            i.auto_billed = o.not_before.is_some();
                        }
                        computed.push((row, sub, *b, invoices));
                    }
                    Err(BillingError::Store(e)) => return Err(BillingError::Store(e)),
                    Err(e) => {
                        results.insert(row.id.as_str(), Err(e));
                    }
                }
            }
            if o.dry_run {
                for (row, _, _, invoices) in &computed {
                    results.insert(row.id.as_str(), Ok(invoices.iter().map(unstored_view).collect()));
                }
            } else {
                let grace = chrono::Duration::days(i64::from(ws.settings.grace_period_days));
                let now = Utc::now();
                let news: Vec<Vec<NewInvoice>> = computed
                    .iter_mut()
                    .map(|(_, _, _, invoices)| {
                        invoices
                            .iter_mut()
                            .map(|i| {
                                // An early run was asked at `until`: its invoices'
                                // grace counts from then (a period it bills whole
                                // because its cycle end is in the current usage
                                // bucket ends minutes ahead).
                                let ended = if o.early { i.period_end.min(o.until) } else { i.period_end };
                                let in_grace = o.respect_grace && ended + grace > now;
                                let finalize = o.finalize && !in_grace;
                                i.finalize_after_grace = o.finalize && in_grace;
                                NewInvoice {
                                    id: i.id.clone(),
                                    period_start: i.period_start,
                                    period_end: i.period_end,
                                    doc: finalize_doc(i, ws, finalize),
                                    finalize,
                                }
                            })
                            .collect()
                    })
                    .collect();
                let docs: Vec<Value> = computed
                    .iter()
                    .map(|(_, sub, _, _)| serde_json::to_value(sub).map_err(|e| BillingError::Corrupt(e.to_string())))
                    .collect::<Result<_, _>>()?;
                let number = numbering(ws);
                let commits: Vec<BillingCommit> = computed
                    .iter()
                    .zip(&news)
                    .zip(&docs)
                    .map(|(((row, sub, b, _), news), doc)| BillingCommit {
                        workspace: &ws.name,
                        subscription_id: &sub.id,
                        customer_id: &sub.customer_id,
                        revision: row.revision,
                        billed_until: *b,
                        reissue_from: sub.reissue_from(),
                        doc,
                        invoices: news,
                        run_id: o.run_id.as_deref(),
                        number: if o.finalize { Some(&number) } else { None },
                    })
                    .collect();
                let committed = self.store.commit_billing_many(&commits).await?;
                if o.finalize {
                    self.emit_finalized(ws, &committed.iter().flatten().cloned().collect::<Vec<_>>()).await;
                }
                for ((row, _, _, _), rows) in computed.iter().zip(committed) {
                    results.insert(row.id.as_str(), Ok(rows.iter().map(view).collect()));
                }
            }
        }
        Ok(ids.iter().map(|id| ((*id).to_owned(), results.remove(id).unwrap_or(Ok(Vec::new())))).collect())
    }

    /// The invoices of `periods` (consecutive, of one subscription).
    /// Late usage of earlier finalized periods goes on the first, unless an
    /// earlier draft exists (it carries them); `replacing` is the id of a
    /// draft being recomputed (kept).
    async fn compute(
        &self,
        ws: &Ws,
        sub: &Subscription,
        periods: &[Period],
        replacing: Option<&str>,
        b: &mut Batch,
    ) -> Result<Vec<Invoice>, BillingError> {
        let store = &self.store;
        let cycle = sub.cycle(ws.tz);
        // Each subscription is computed once per batch: its history is taken.
        let history = b.history.remove(&sub.id).unwrap_or_default();
        let first_start = periods.first().map(|p| p.start).unwrap_or(sub.start);
        let earlier_draft =
            history.iter().any(|i| i.status == InvoiceStatus::Draft && i.period_start < first_start && Some(i.id.as_str()) != replacing);
        // What finalized invoices billed per (meter, period): quantity,
        // amount, and the plan version that priced it.
        let mut billed: BTreeMap<(String, DateTime<Utc>, DateTime<Utc>), Billed> = BTreeMap::new();
        for inv in history.iter().filter(|i| i.status.is_final()) {
            let doc: Invoice = serde_json::from_value(inv.doc.clone()).map_err(|e| BillingError::Corrupt(format!("invoice {}: {e}", inv.id)))?;
            for l in doc.lines.iter().filter(|l| matches!(l.kind, LineKind::Usage | LineKind::Adjustment)) {
                let Some(meter) = &l.meter else { continue };
                let e = billed.entry((meter.clone(), l.period_start, l.period_end)).or_insert_with(|| Billed {
                    quantity: Decimal::ZERO,
                    amount: Decimal::ZERO,
                    plan: (doc.plan.clone(), doc.plan_version),
                    on: Vec::new(),
                });
                e.quantity += l.quantity;
                e.amount += l.amount;
                if l.kind == LineKind::Usage {
                    e.plan = (doc.plan.clone(), doc.plan_version);
                }
                let number = inv.number.clone().unwrap_or_else(|| inv.id.clone());
                if !e.on.contains(&number) {
                    e.on.push(number);
                }
            }
        }
        let late_wanted = !earlier_draft;
        // The customer's subscriptions decide whether usage naming only the
        // customer counts for this one ([`Billing::counted`]).
        let customer_subs: Vec<Subscription> = b.siblings.get(&sub.customer_id).cloned().unwrap_or_default();
        let customer_name = b.names.get(&sub.customer_id).cloned();
        let log_position = b.log_position.clone();
        let now = Utc::now();
        let mut out = Vec::with_capacity(periods.len());
        for (n, &p) in periods.iter().enumerate() {
            let phase = sub.phase_at(p.start);
            let plan = b.plans.get(store, &ws.name, &phase.plan, phase.plan_version).await?;
            let currency = Currency::of(&plan.currency).ok_or_else(|| BillingError::Corrupt(format!("currency {:?}", plan.currency)))?;
            let bill = PeriodBill { sub, cycle: &cycle, period: p, plan: &plan, currency };
            // A voided period billed again names the invoice it replaces.
            let replaces = history.iter().rev().find(|i| i.status == InvoiceStatus::Void && i.period_start == p.start).map(|i| i.id.clone());
            let mut lines = bill.fee_lines();
            for charge in &plan.charges {
                let meter = ws.meters.get(&charge.meter).ok_or_else(|| BillingError::Corrupt(format!("meter {:?} is missing", charge.meter)))?;
                let (q, sql) = self.counted(ws, b, &customer_subs, sub, meter, p).await?;
                lines.push(bill.usage_line(charge, q, Some(sql)));
                // A period billed again (its invoice voided) whose late
                // usage a later invoice already billed: that is taken off
                // here, so the period is billed once in all.
                if let Some(e) = billed.get(&(charge.meter.clone(), p.start, p.end)) {
                    if let Some(l) = billed_elsewhere_line(currency, charge, p, (e.quantity, e.amount), &e.on) {
                        lines.push(l);
                    }
                }
            }
            if n == 0 && late_wanted {
                for ((meter_key, ps, pe), e) in &billed {
                    let ep = Period { start: *ps, end: *pe };
                    // Periods billed in this call, or waiting to be billed
                    // again, are billed whole there, not as late usage.
                    let billed_again = periods.iter().any(|q| q.start == ep.start) || sub.reissue.iter().any(|r| r.period_start == ep.start);
                    // A voided period billed again may precede periods billed
                    // since: their late usage goes on it as well.
                    if (ep.start >= p.start && replaces.is_none()) || billed_again {
                        continue;
                    }
                    let Some(meter) = ws.meters.get(meter_key) else { continue };
                    let old_plan = b.plans.get(store, &ws.name, &e.plan.0, e.plan.1).await?;
                    let Some(charge) = old_plan.charges.iter().find(|c| &c.meter == meter_key) else { continue };
                    let (q, sql) = self.counted(ws, b, &customer_subs, sub, meter, ep).await?;
                    let share = PeriodBill { sub, cycle: &cycle, period: ep, plan: &old_plan, currency }.period_share();
                    if let Some(l) = late_line(currency, charge, q, ep, share, (e.quantity, e.amount), Some(sql)) {
                        lines.push(l);
                    }
                }
            }
            let mut inv = Invoice {
                id: match (n, replacing) {
                    (0, Some(id)) => id.to_owned(),
                    _ => format!("in_{}", uuid::Uuid::now_v7().simple()),
                },
                customer_id: sub.customer_id.clone(),
                customer_name: customer_name.clone(),
                subscription_id: sub.id.clone(),
                plan: phase.plan.clone(),
                plan_version: phase.plan_version,
                currency: plan.currency.clone(),
                period_start: p.start,
                period_end: p.end,
                lines,
                taxes: Vec::new(),
                subtotal: Decimal::ZERO,
                tax: Decimal::ZERO,
                total: Decimal::ZERO,
                tax_rounding: ws.settings.tax_rounding,
                time_zone: ws.tz.name().to_owned(),
                computed_at: now,
                log_position: log_position.clone(),
                early: !cycle.is_boundary(p.end) && sub.end != Some(p.end) && sub.phases.iter().all(|ph| ph.from != p.end),
                issuer: None,
                replaces,
                auto_billed: false,
                finalize_after_grace: false,
            };
            inv.total_up(currency, ws.settings.tax_rounding);
            out.push(inv);
        }
        Ok(out)
    }

    /// `meter`'s quantity for `sub` in `p` — its own usage, and usage
    /// naming only the customer when that counts for it — with the SQL
    /// that reproduces it. `customer_subs`: every subscription of the
    /// customer.
    async fn counted(
        &self,
        ws: &Ws,
        b: &mut Batch,
        customer_subs: &[Subscription],
        sub: &Subscription,
        meter: &Meter,
        p: Period,
    ) -> Result<(Decimal, String), BillingError> {
        let shared = self.unattributed_counts(ws, &mut b.plans, customer_subs, &sub.id, &meter.key, p).await?;
        let subs: Vec<&str> = if shared { vec![sub.id.as_str(), ""] } else { vec![sub.id.as_str()] };
        b.load_usage(&self.store, &ws.name, meter).await?;
        // Usage naming the subscription and no customer counts too.
        let anonymous: &[&str] = if sub.customer_id.is_empty() { &[] } else { &[sub.id.as_str()] };
        let window = sub.usage_window(p);
        let q = MeterUsage::quantity(&[(b.usage(meter, &sub.customer_id), &subs), (b.usage(meter, ""), anonymous)], meter, window)?;
        Ok((q, usage_sql(meter, sub, shared, b.usage(meter, "").any(anonymous, window), window)))
    }

    /// Whether usage naming only the customer counts for subscription
    /// `sub_id` on `meter` in `p`: no other of the customer's
    /// subscriptions (`customer_subs`, which may include it) charges that
    /// meter then.
    pub(crate) async fn unattributed_counts(
        &self,
        ws: &Ws,
        plans: &mut Plans,
        customer_subs: &[Subscription],
        sub_id: &str,
        meter: &str,
        p: Period,
    ) -> Result<bool, BillingError> {
        for other in customer_subs.iter().filter(|o| o.id != sub_id) {
            if other.start >= p.end || other.end.is_some_and(|e| e <= p.start) {
                continue;
            }
            let ph = other.phase_at(p.start.max(other.start));
            let plan = plans.get(&self.store, &ws.name, &ph.plan, ph.plan_version).await?;
            if plan.charges.iter().any(|c| c.meter == meter) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The invoice of the current period from usage so far (not stored):
    /// equal to the invoice the period will get if no more usage arrives.
    pub async fn upcoming(&self, ws: &Ws, id: &str) -> Result<Value, BillingError> {
        let (row, sub) = self.subscription(&ws.name, id).await?;
        let cycle = sub.cycle(ws.tz);
        let Some(p) = sub.period_from(&cycle, row.billed_until) else {
            return Err(BillingError::NotFound(format!("subscription {id:?} is billed to its end; it has no upcoming invoice")));
        };
        let mut batch = Batch::load(&self.store, ws, &[(&sub, &[p])]).await?;
        let mut inv = self.compute(ws, &sub, &[p], None, &mut batch).await?;
        Ok(inv.pop().as_ref().map(unstored_view).unwrap_or(Value::Null))
    }

    /// A stored invoice, a draft recomputed first (late usage may have
    /// arrived for its period).
    pub async fn invoice(&self, ws: &Ws, id: &str) -> Result<InvoiceRow, BillingError> {
        let row = self.store.invoice(&ws.name, id).await.map_err(|e| match e {
            StoreError::NotFound => BillingError::NotFound(format!("invoice {id:?} not found")),
            e => e.into(),
        })?;
        if row.status != InvoiceStatus::Draft {
            return Ok(row);
        }
        let doc = self.recompute(ws, &row).await?;
        if doc != row.doc {
            match self.store.update_draft(&ws.name, id, &doc).await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(self.store.invoice(&ws.name, id).await?);
        }
        Ok(row)
    }

    /// A draft's document recomputed from today's usage (same period, id
    /// and plan phase).
    async fn recompute(&self, ws: &Ws, row: &InvoiceRow) -> Result<Value, BillingError> {
        let (_, sub) = self.subscription(&ws.name, &row.subscription_id).await?;
        let old: Invoice = serde_json::from_value(row.doc.clone()).map_err(|e| BillingError::Corrupt(format!("invoice {}: {e}", row.id)))?;
        let p = Period { start: row.period_start, end: row.period_end };
        let mut batch = Batch::load(&self.store, ws, &[(&sub, &[p])]).await?;
        let mut inv = self.compute(ws, &sub, &[p], Some(&row.id), &mut batch).await?;
        let mut inv = inv.pop().ok_or_else(|| BillingError::Corrupt("no invoice computed".into()))?;
        if inv.lines == old.lines && inv.taxes == old.taxes {
            return Ok(row.doc.clone());
        }
        inv.replaces = old.replaces;
        inv.early = old.early;
        inv.auto_billed = old.auto_billed;
        inv.finalize_after_grace = old.finalize_after_grace;
        serde_json::to_value(&inv).map_err(|e| BillingError::Corrupt(e.to_string()))
    }

    /// Finalizes a draft: recomputed, the issuer recorded, numbered.
    pub async fn finalize(&self, ws: &Ws, id: &str, audit: &NewAudit) -> Result<InvoiceRow, BillingError> {
        let row = self.invoice(ws, id).await?;
        if row.status != InvoiceStatus::Draft {
            return Err(BillingError::Conflict(format!("invoice {id:?} is {}; only a draft can be finalized", row.status)));
        }
        let inv: Invoice = serde_json::from_value(row.doc.clone()).map_err(|e| BillingError::Corrupt(format!("invoice {id}: {e}")))?;
        let doc = finalize_doc(&inv, ws, true);
        let number = numbering(ws);
        let row = self.store.finalize_invoice(&ws.name, id, &doc, &number, audit).await.map_err(conflict)?;
        self.emit_finalized(ws, std::slice::from_ref(&row)).await;
        Ok(row)
    }

    /// Voids a draft or finalized invoice (it keeps its number); the period
    /// can then be billed again by a new invoice that names it.
    pub async fn void(&self, ws: &Ws, id: &str, audit: &NewAudit) -> Result<InvoiceRow, BillingError> {
        let row = self
            .store
            .set_invoice_status(&ws.name, id, &[InvoiceStatus::Draft, InvoiceStatus::Finalized], InvoiceStatus::Void, audit)
            .await
            .map_err(conflict)?;
        // The period is open again: the subscription bills it next. (A
        // crash before this leaves the void's outbox row, and the relay
        // reopens the period before it sends the event.)
        self.reopen(&ws.name, &row).await?;
        self.send(&ws.name, INVOICE_VOIDED, &[&row]).await;
        Ok(row)
    }

    /// After a void, the period is billed again by the next run (the new
    /// invoice `replaces` the voided one): when it is the subscription's
    /// last billed period, billed_until moves back to its start; an earlier
    /// period joins the subscription's `reissue` list, which the next
    /// explicit run bills first (docs/billing.md, "Voiding"). Done once:
    /// nothing when the period is open already or billed again since.
    async fn reopen(&self, ws: &str, voided: &InvoiceRow) -> Result<(), BillingError> {
        for _ in 0..5 {
            // The subscription first, then its invoices: a run that bills
            // the period again after this read moves the subscription's
            // revision, and the update below is refused (and looked at again).
            let (mut row, mut sub) = self.subscription(ws, &voided.subscription_id).await?;
            let billed_again = self
                .store
                .invoices_of_subscriptions(ws, &[voided.subscription_id.as_str()])
                .await?
                .iter()
                .any(|i| i.status != InvoiceStatus::Void && i.period_start == voided.period_start);
            if billed_again {
                return Ok(());
            }
            let action = if row.billed_until == voided.period_end {
                row.billed_until = voided.period_start;
                "subscription.reopen"
            } else if voided.period_end < row.billed_until && !sub.reissue.iter().any(|r| r.period_start == voided.period_start) {
                sub.reissue.push(Reissue { period_start: voided.period_start, period_end: voided.period_end, voided_invoice: voided.id.clone() });
                sub.reissue.sort_by_key(|r| r.period_start);
                row.reissue_from = sub.reissue_from();
                row.doc = serde_json::to_value(&sub).map_err(|e| BillingError::Corrupt(e.to_string()))?;
                "subscription.reissue"
            } else {
                return Ok(());
            };
            let audit = NewAudit {
                workspace: ws.to_owned(),
                actor_key_id: None,
                action: action.into(),
                target_type: "subscription".into(),
                target_id: row.id.clone(),
                details: json!({"voided_invoice": voided.id, "period_start": voided.period_start, "period_end": voided.period_end}),
            };
            match self.store.update_subscription(ws, &row, &audit).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BillingError::Busy(format!("subscription {:?} kept changing; void again", voided.subscription_id)))
    }

    /// Marks a finalized invoice paid.
    pub async fn mark_paid(&self, ws: &Ws, id: &str, audit: &NewAudit) -> Result<InvoiceRow, BillingError> {
        self.store.set_invoice_status(&ws.name, id, &[InvoiceStatus::Finalized], InvoiceStatus::Paid, audit).await.map_err(conflict)
    }

    async fn emit_finalized(&self, ws: &Ws, rows: &[InvoiceRow]) {
        let finalized: Vec<&InvoiceRow> = rows.iter().filter(|r| r.status == InvoiceStatus::Finalized).collect();
        self.send(&ws.name, INVOICE_FINALIZED, &finalized).await;
    }

    /// Sends the `kind` events of `rows` and, once they are in the log,
    /// deletes their outbox rows, written with the invoices' change; what is
    /// not sent now is sent by [`Billing::relay_outbox`].
    async fn send(&self, ws: &str, kind: &str, rows: &[&InvoiceRow]) {
        let Some(sink) = &self.events else { return };
        if rows.is_empty() {
            return;
        }
        let events = rows.iter().filter_map(|r| invoice_event(ws, r, kind)).collect();
        if sink.emit(events).await.is_ok() {
            let sent: Vec<OutboxRow> =
                rows.iter().map(|r| OutboxRow { workspace: ws.to_owned(), kind: kind.to_owned(), subject: r.id.clone(), event: None }).collect();
            if let Err(e) = self.store.delete_event_outbox(&sent).await {
                tracing::warn!(error = %e, "could not clear sent billing events from the outbox; they are sent again (and deduplicated) later");
            }
        }
    }

    /// Sends the events the outbox still holds (invoices', and health
    /// transitions, written whole) — those whose send
    /// failed, or that a crash cut off between the invoice's commit and the
    /// send — and deletes their rows; returns how many were sent. Run at
    /// start and by every auto-billing pass.
    pub async fn relay_outbox(&self) -> Result<usize, BillingError> {
        const PAGE: usize = 500;
        let Some(sink) = &self.events else { return Ok(0) };
        let mut sent = 0;
        loop {
            let rows = self.store.event_outbox(PAGE).await?;
            let mut events = Vec::with_capacity(rows.len());
            // Rows kept for the next pass (their void could not be completed).
            let mut kept: Vec<&OutboxRow> = Vec::new();
            for o in &rows {
                // A health transition: the event itself.
                if let Some(doc) = &o.event {
                    match serde_json::from_str::<sluice_core::Event>(doc) {
                        Ok(e) => events.push((o, e)),
                        Err(e) => {
                            tracing::error!(workspace = %o.workspace, id = %o.subject, error = %e, "an outbox event does not parse; it is dropped")
                        }
                    }
                    continue;
                }
                match self.store.invoice(&o.workspace, &o.subject).await {
                    Ok(inv) => {
                        // A void whose period was not reopened (a crash
                        // between its two steps) is completed first.
                        if o.kind == INVOICE_VOIDED && inv.status == InvoiceStatus::Void {
                            if let Err(e) = self.reopen(&o.workspace, &inv).await {
                                tracing::warn!(workspace = %o.workspace, invoice = %o.subject, error = %e,
                                    "could not reopen the period of a voided invoice; trying again with the next pass");
                                kept.push(o);
                                continue;
                            }
                        }
                        events.extend(invoice_event(&o.workspace, &inv, &o.kind).map(|e| (o, e)))
                    }
                    // Its workspace was deleted: nothing left to tell.
                    Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match sink.emit(events.iter().map(|(_, e)| e.clone()).collect()).await {
                Ok(()) => {}
                Err(NotSent::Later) => return Ok(sent),
                // One refused event must not hold up the rest (the oldest
                // page is read first): one by one, and a refused one is
                // logged and dropped from the outbox.
                Err(NotSent::Refused) => {
                    for (o, e) in events {
                        match sink.emit(vec![e]).await {
                            Ok(()) => {}
                            Err(NotSent::Later) => return Ok(sent),
                            Err(NotSent::Refused) => tracing::error!(
                                workspace = %o.workspace, subject = %o.subject, kind = %o.kind,
                                "the log refuses this event (an enforced property schema of the workspace?); it is dropped from the outbox"
                            ),
                        }
                    }
                }
            }
            let done: Vec<OutboxRow> = rows.iter().filter(|r| !kept.contains(r)).cloned().collect();
            self.store.delete_event_outbox(&done).await?;
            sent += done.len();
            if rows.len() < PAGE || done.is_empty() {
                return Ok(sent);
            }
        }
    }
}

/// The periods of a subscription due by `o` (from its billed-until), with
/// the subscription as it must be stored after billing them (an early bill
/// adds its cut) and its new billed-until; `None` when nothing is due.
fn due_periods(ws: &Ws, row: &SubscriptionRow, mut sub: Subscription, o: &BillOptions) -> Option<(Subscription, Vec<Period>, DateTime<Utc>)> {
    let cycle = sub.cycle(ws.tz);
    let mut periods = Vec::new();
    let mut b = row.billed_until;
    while let Some(p) = sub.period_from(&cycle, b) {
        if p.end > o.until || periods.len() >= MAX_PERIODS {
            break;
        }
        periods.push(p);
        b = p.end;
    }
    if o.early && periods.len() < MAX_PERIODS {
        // Cut at the request (to the microsecond, as the store keeps
        // times); the cut's bucket goes whole to this invoice
        // (`Subscription::usage_bound`). A period whose cycle boundary lies
        // in that bucket is billed whole instead: a cut there would give the
        // bucket to both sides.
        let now = chrono::SubsecRound::trunc_subsecs(o.until, 6);
        if let Some(p) = sub.period_from(&cycle, b) {
            // Not a subscription that starts later.
            if p.start < now {
                let end = if bucket_ceil(now) >= p.end { p.end } else { now };
                if end < p.end && !sub.cuts.contains(&end) {
                    sub.cuts.push(end);
                    sub.cuts.sort();
                }
                periods.push(Period { start: p.start, end });
                b = end;
            }
        }
    }
    if let (Some(nb), Some(first)) = (o.not_before, periods.first()) {
        if first.end < nb.max(sub.created_at) {
            return None;
        }
    }
    // Voided periods to bill again come first, in an explicit run only
    // (auto-billing leaves them to the operator who voided the invoice).
    if o.not_before.is_none() && !sub.reissue.is_empty() {
        let (now, later): (Vec<Reissue>, Vec<Reissue>) = std::mem::take(&mut sub.reissue).into_iter().partition(|r| r.period_end <= o.until);
        sub.reissue = later;
        periods.splice(0..0, now.iter().map(Reissue::period));
    }
    (!periods.is_empty()).then_some((sub, periods, b))
}

fn conflict(e: StoreError) -> BillingError {
    match e {
        StoreError::NotFound => BillingError::NotFound("invoice not found".into()),
        StoreError::Conflict(m) => BillingError::Conflict(m),
        e => e.into(),
    }
}

/// A stored subscription's document.
pub fn parse_sub(row: &SubscriptionRow) -> Result<Subscription, BillingError> {
    let sub: Subscription = serde_json::from_value(row.doc.clone()).map_err(|e| BillingError::Corrupt(format!("subscription {}: {e}", row.id)))?;
    sub.check()
}

/// The document stored for an invoice: finalized ones record the issuer
/// as it is now.
fn finalize_doc(inv: &Invoice, ws: &Ws, finalize: bool) -> Value {
    let mut inv = inv.clone();
    if finalize {
        let s = &ws.settings;
        inv.issuer =
            Some(Issuer { name: s.issuer_name.clone(), registration_number: s.registration_number.clone(), address: s.issuer_address.clone() });
    }
    serde_json::to_value(&inv).unwrap_or(Value::Null)
}

/// `{prefix}-{YYYYMM}-{n:06}`: the month of finalization in the
/// workspace's time zone, `n` the workspace's counter (gapless, never
/// reset).
fn numbering(ws: &Ws) -> impl Fn(i64) -> String + Sync {
    let prefix = ws.settings.invoice_prefix.clone();
    let month = Utc::now().with_timezone(&ws.tz).format("%Y%m").to_string();
    move |n| format!("{prefix}-{month}-{n:06}")
}

/// The SQL over the `usage` table that gives a usage line's quantity. Usage naming the subscription and no
/// customer is in it only when there is some: `customer_id = '…'` alone is
/// a filter the live `usage` table's loading applies (`sluice_lake::pushdown`),
/// an `OR` is not.
fn usage_sql(m: &Meter, sub: &Subscription, shared: bool, anonymous: bool, (from, to): (DateTime<Utc>, DateTime<Utc>)) -> String {
    let q = |s: &str| s.replace('\'', "''");
    let value = match m.aggregation {
        Aggregation::Sum => "SUM(sum)",
        Aggregation::Count => "SUM(count)",
        Aggregation::Max => "MAX(max)",
        Aggregation::Min => "MIN(min)",
        Aggregation::Latest => "LAST_VALUE(latest ORDER BY period_start)",
        // Distinct values do not add up across buckets: the events table
        // has them.
        Aggregation::UniqueCount => "NULL /* unique_count: count distinct values in the events table */",
    };
    let subs = if shared {
        format!("(subscription_id = '{}' OR subscription_id IS NULL)", q(&sub.id))
    } else {
        format!("subscription_id = '{}'", q(&sub.id))
    };
    let t = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let who = if anonymous {
        format!("((customer_id = '{}' AND {subs}) OR (customer_id IS NULL AND subscription_id = '{}'))", q(&sub.customer_id), q(&sub.id))
    } else {
        format!("customer_id = '{}' AND {subs}", q(&sub.customer_id))
    };
    format!(
        "SELECT {value} AS quantity FROM usage WHERE meter = '{}' AND {who} AND period_start >= '{}' AND period_start < '{}'",
        q(&m.key),
        t(from),
        t(to)
    )
}

/// The event an invoice's change of status enters the log as.
/// `invoice.finalized`.
pub const INVOICE_FINALIZED: &str = "invoice.finalized";
/// `invoice.voided`.
pub const INVOICE_VOIDED: &str = "invoice.voided";

/// The `kind` event of an invoice. Its status is the one the event
/// announces, also when it is sent later (from the outbox) and the invoice
/// has moved on since (a finalized invoice voided, or paid).
fn invoice_event(ws: &str, r: &InvoiceRow, kind: &str) -> Option<sluice_core::Event> {
    let status = match kind {
        INVOICE_FINALIZED => InvoiceStatus::Finalized,
        INVOICE_VOIDED => InvoiceStatus::Void,
        _ => r.status,
    };
    let props = json!({
        "invoice_id": r.id, "number": r.number, "status": status,
        "currency": r.doc.get("currency"), "total": r.doc.get("total"), "subtotal": r.doc.get("subtotal"), "tax": r.doc.get("tax"),
        "period_start": r.period_start, "period_end": r.period_end, "run_id": r.run_id,
    });
    crate::make_event(ws, &format!("{kind}:{}", r.id), kind, Some(&r.customer_id), Some(&r.subscription_id), props)
        .inspect_err(|e| tracing::error!(error = %e, invoice = %r.id, "could not make the {kind} event"))
        .ok()
}
