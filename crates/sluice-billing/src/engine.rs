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
use sluice_store::{BillingCommit, InvoiceRow, Meter, NewAudit, NewInvoice, Store, StoreError, SubscriptionRow};

use crate::invoice::{late_line, Invoice, InvoiceStatus, Issuer, LineKind, PeriodBill};
use crate::money::Currency;
use crate::plan::PlanSpec;
use crate::settings::BillingSettings;
use crate::subscription::{bucket_floor, Period, Subscription};
use crate::BillingError;

/// Most periods one subscription is billed for in one call (a subscription
/// started years ago on weekly billing); the rest on the next run.
pub const MAX_PERIODS: usize = 1000;

/// Where billing's events go (the ingest pipeline in the server).
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Appends `events`; failures are the sink's to log (an event with the
    /// same id is deduplicated, so emitting again is safe).
    async fn emit(&self, events: Vec<sluice_core::Event>);
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
struct Plans(HashMap<(String, i64), Arc<PlanSpec>>);

impl Plans {
    async fn get(&mut self, store: &Store, ws: &str, code: &str, version: i64) -> Result<Arc<PlanSpec>, BillingError> {
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

/// What finalized invoices billed for one meter and earlier period:
/// quantity, amount, and the plan (code, version) that priced it.
type Billed = (Decimal, Decimal, String, i64);

/// Usage of one meter for one customer over a range, read once and summed
/// per invoice period in memory.
enum MeterUsage {
    Buckets(Vec<sluice_store::UsageBucket>),
    Unique(Vec<(String, DateTime<Utc>, String)>),
}

impl MeterUsage {
    async fn load(store: &Store, ws: &str, m: &Meter, customer: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<MeterUsage, BillingError> {
        Ok(if m.aggregation == Aggregation::UniqueCount {
            let rows = store.usage_unique_values(ws, &m.key, Some(customer), None, Some(from), Some(to)).await?;
            MeterUsage::Unique(rows.into_iter().map(|(_, s, _, t, v)| (s, t, v)).collect())
        } else {
            MeterUsage::Buckets(store.usage_buckets(ws, &m.key, Some(customer), None, Some(from), Some(to)).await?)
        })
    }

    /// The meter's value in `p` over the usage of `subs`: the usage
    /// buckets (15 minutes) that start in `[floor(p.start), floor(p.end))`,
    /// so that consecutive periods share every bucket out exactly once even
    /// when a subscription starts or ends between two bucket boundaries.
    fn quantity(&self, m: &Meter, subs: &[&str], p: Period) -> Result<Decimal, BillingError> {
        let (from, to) = (bucket_floor(p.start), bucket_floor(p.end));
        let inside = |s: &str, t: DateTime<Utc>| subs.contains(&s) && t >= from && t < to;
        match self {
            MeterUsage::Unique(rows) => {
                let distinct: std::collections::HashSet<&str> = rows.iter().filter(|r| inside(&r.0, r.1)).map(|r| r.2.as_str()).collect();
                Ok(Decimal::from(distinct.len()))
            }
            MeterUsage::Buckets(b) => {
                let v = sluice_metering::usage::fold_buckets(m.aggregation, b.iter().filter(|b| inside(&b.subscription_id, b.bucket_start)))
                    .map_err(|(a, b)| BillingError::Overflow(format!("meter {:?}: {a} + {b} is beyond the largest exact decimal", m.key)))?;
                Ok(v.unwrap_or_default())
            }
        }
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
    /// The workspace's time zone, billing settings and meters.
    pub async fn workspace(&self, name: &str) -> Result<Ws, BillingError> {
        let w = self.store.get_workspace(name).await?;
        let tz: Tz = w.time_zone.parse().map_err(|_| BillingError::Corrupt(format!("workspace time zone {:?}", w.time_zone)))?;
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
            let (row, mut sub) = self.subscription(&ws.name, id).await?;
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
                let cut = bucket_floor(o.until);
                if let Some(p) = sub.period_from(&cycle, b) {
                    if cut > p.start && cut < p.end {
                        if !sub.cuts.contains(&cut) {
                            sub.cuts.push(cut);
                            sub.cuts.sort();
                        }
                        periods.push(Period { start: p.start, end: cut });
                        b = cut;
                    }
                }
            }
            if let (Some(nb), Some(first)) = (o.not_before, periods.first()) {
                if first.end < nb.max(sub.created_at) {
                    return Ok(Vec::new());
                }
            }
            if periods.is_empty() {
                return Ok(Vec::new());
            }
            let mut invoices = self.compute(ws, &sub, &periods, None).await?;
            for i in &mut invoices {
                i.auto_billed = o.not_before.is_some();
            }
            if o.dry_run {
                return Ok(invoices.iter().map(unstored_view).collect());
            }
            let news: Vec<NewInvoice> = invoices
                .iter()
                .map(|i| NewInvoice {
                    id: i.id.clone(),
                    period_start: i.period_start,
                    period_end: i.period_end,
                    doc: finalize_doc(i, ws, o.finalize),
                })
                .collect();
            let doc = serde_json::to_value(&sub).map_err(|e| BillingError::Corrupt(e.to_string()))?;
            let number = numbering(ws);
            let commit = BillingCommit {
                workspace: &ws.name,
                subscription_id: &sub.id,
                customer_id: &sub.customer_id,
                revision: row.revision,
                billed_until: b,
                doc: &doc,
                invoices: &news,
                run_id: o.run_id.as_deref(),
                number: if o.finalize { Some(&number) } else { None },
            };
            match self.store.commit_billing(&commit).await {
                Ok(rows) => {
                    if o.finalize {
                        self.emit_finalized(ws, &rows).await;
                    }
                    return Ok(rows.iter().map(view).collect());
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BillingError::Busy(format!("subscription {id:?} kept changing while it was billed; run again")))
    }

    /// The invoices of `periods` (consecutive, of one subscription).
    /// Late usage of earlier finalized periods goes on the first, unless an
    /// earlier draft exists (it carries them); `replacing` is the id of a
    /// draft being recomputed (kept).
    async fn compute(&self, ws: &Ws, sub: &Subscription, periods: &[Period], replacing: Option<&str>) -> Result<Vec<Invoice>, BillingError> {
        let store = &self.store;
        let mut plans = Plans::default();
        let cycle = sub.cycle(ws.tz);
        let history = store.subscription_invoices(&ws.name, &sub.id).await?;
        let first_start = periods.first().map(|p| p.start).unwrap_or(sub.start);
        let earlier_draft = history.iter().any(|i| i.status == "draft" && i.period_start < first_start && Some(i.id.as_str()) != replacing);
        // What finalized invoices billed per (meter, period): quantity,
        // amount, and the plan version that priced it.
        let mut billed: BTreeMap<(String, DateTime<Utc>, DateTime<Utc>), Billed> = BTreeMap::new();
        for inv in history.iter().filter(|i| i.status == "finalized" || i.status == "paid") {
            let doc: Invoice = serde_json::from_value(inv.doc.clone()).map_err(|e| BillingError::Corrupt(format!("invoice {}: {e}", inv.id)))?;
            for l in doc.lines.iter().filter(|l| matches!(l.kind, LineKind::Usage | LineKind::Adjustment)) {
                let Some(meter) = &l.meter else { continue };
                let e = billed.entry((meter.clone(), l.period_start, l.period_end)).or_insert((
                    Decimal::ZERO,
                    Decimal::ZERO,
                    doc.plan.clone(),
                    doc.plan_version,
                ));
                e.0 += l.quantity;
                e.1 += l.amount;
                if l.kind == LineKind::Usage {
                    (e.2, e.3) = (doc.plan.clone(), doc.plan_version);
                }
            }
        }
        let late_wanted = !earlier_draft;
        let range_start = bucket_floor(billed.keys().map(|k| k.1).filter(|_| late_wanted).min().unwrap_or(first_start).min(first_start));
        let range_end = bucket_floor(periods.last().map(|p| p.end).unwrap_or(first_start));
        // Which subscriptions' usage counts: its own, and usage that names
        // only the customer while this is the customer's only subscription
        // charging that meter in the period.
        let siblings: Vec<Subscription> = store
            .customer_subscriptions(&ws.name, &sub.customer_id)
            .await?
            .iter()
            .filter(|r| r.id != sub.id)
            .map(parse_sub)
            .collect::<Result<_, _>>()?;
        let mut usage: HashMap<String, MeterUsage> = HashMap::new();
        let customer_name =
            store.get_customer(&ws.name, &sub.customer_id).await?.and_then(|c| c.attributes.get("name").and_then(Value::as_str).map(str::to_owned));
        let log_position: BTreeMap<u32, u64> = store.checkpoints(sluice_metering::consumer::NAME).await?.into_iter().collect();
        let now = Utc::now();
        let mut out = Vec::with_capacity(periods.len());
        for (n, &p) in periods.iter().enumerate() {
            let phase = sub.phase_at(p.start);
            let plan = plans.get(store, &ws.name, &phase.plan, phase.plan_version).await?;
            let currency = Currency::of(&plan.currency).ok_or_else(|| BillingError::Corrupt(format!("currency {:?}", plan.currency)))?;
            let bill = PeriodBill { sub, cycle: &cycle, period: p, plan: &plan, currency };
            let mut lines = bill.fee_lines();
            for charge in &plan.charges {
                let meter = ws.meters.get(&charge.meter).ok_or_else(|| BillingError::Corrupt(format!("meter {:?} is missing", charge.meter)))?;
                if !usage.contains_key(&charge.meter) {
                    usage.insert(charge.meter.clone(), MeterUsage::load(store, &ws.name, meter, &sub.customer_id, range_start, range_end).await?);
                }
                let shared = self.unattributed_counts(ws, &mut plans, sub, &siblings, &charge.meter, p).await?;
                let subs: Vec<&str> = if shared { vec![sub.id.as_str(), ""] } else { vec![sub.id.as_str()] };
                let q = usage[&charge.meter].quantity(meter, &subs, p)?;
                lines.push(bill.usage_line(charge, q, Some(usage_sql(meter, sub, shared, p))));
            }
            if n == 0 && late_wanted {
                for ((meter_key, ps, pe), (bq, bamount, code, version)) in &billed {
                    let ep = Period { start: *ps, end: *pe };
                    if ep.start >= p.start {
                        continue;
                    }
                    let Some(meter) = ws.meters.get(meter_key) else { continue };
                    let old_plan = plans.get(store, &ws.name, code, *version).await?;
                    let Some(charge) = old_plan.charges.iter().find(|c| &c.meter == meter_key) else { continue };
                    if !usage.contains_key(meter_key) {
                        usage.insert(meter_key.clone(), MeterUsage::load(store, &ws.name, meter, &sub.customer_id, range_start, range_end).await?);
                    }
                    let shared = self.unattributed_counts(ws, &mut plans, sub, &siblings, meter_key, ep).await?;
                    let subs: Vec<&str> = if shared { vec![sub.id.as_str(), ""] } else { vec![sub.id.as_str()] };
                    let q = usage[meter_key].quantity(meter, &subs, ep)?;
                    let share = PeriodBill { sub, cycle: &cycle, period: ep, plan: &old_plan, currency }.period_share();
                    if let Some(l) = late_line(currency, charge, q, ep, share, (*bq, *bamount), Some(usage_sql(meter, sub, shared, ep))) {
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
                replaces: history.iter().rev().find(|i| i.status == "void" && i.period_start == p.start).map(|i| i.id.clone()),
                auto_billed: false,
            };
            inv.total_up(currency, ws.settings.tax_rounding);
            out.push(inv);
        }
        Ok(out)
    }

    /// Whether usage naming only the customer counts for `sub` on `meter`
    /// in `p`: no other subscription of the customer charges that meter
    /// then.
    async fn unattributed_counts(
        &self,
        ws: &Ws,
        plans: &mut Plans,
        sub: &Subscription,
        siblings: &[Subscription],
        meter: &str,
        p: Period,
    ) -> Result<bool, BillingError> {
        for other in siblings {
            if other.start >= p.end || other.end.is_some_and(|e| e <= p.start) {
                continue;
            }
            let ph = other.phase_at(p.start.max(other.start));
            let plan = plans.get(&self.store, &ws.name, &ph.plan, ph.plan_version).await?;
            if plan.charges.iter().any(|c| c.meter == meter) {
                return Ok(false);
            }
        }
        let _ = sub;
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
        let mut inv = self.compute(ws, &sub, &[p], None).await?;
        Ok(inv.pop().as_ref().map(unstored_view).unwrap_or(Value::Null))
    }

    /// A stored invoice, a draft recomputed first (late usage may have
    /// arrived for its period).
    pub async fn invoice(&self, ws: &Ws, id: &str) -> Result<InvoiceRow, BillingError> {
        let row = self.store.invoice(&ws.name, id).await.map_err(|e| match e {
            StoreError::NotFound => BillingError::NotFound(format!("invoice {id:?} not found")),
            e => e.into(),
        })?;
        if row.status != "draft" {
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
        let mut inv = self.compute(ws, &sub, &[Period { start: row.period_start, end: row.period_end }], Some(&row.id)).await?;
        let mut inv = inv.pop().ok_or_else(|| BillingError::Corrupt("no invoice computed".into()))?;
        if inv.lines == old.lines && inv.taxes == old.taxes {
            return Ok(row.doc.clone());
        }
        inv.replaces = old.replaces;
        inv.early = old.early;
        inv.auto_billed = old.auto_billed;
        serde_json::to_value(&inv).map_err(|e| BillingError::Corrupt(e.to_string()))
    }

    /// Finalizes a draft: recomputed, the issuer recorded, numbered.
    pub async fn finalize(&self, ws: &Ws, id: &str, audit: &NewAudit) -> Result<InvoiceRow, BillingError> {
        let row = self.invoice(ws, id).await?;
        if row.status != "draft" {
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
        let row = self.store.set_invoice_status(&ws.name, id, &["draft", "finalized"], "void", audit).await.map_err(conflict)?;
        // The period is open again: the subscription bills it next.
        self.reopen(ws, &row).await?;
        if let Some(sink) = &self.events {
            sink.emit(invoice_event(ws, &row, "invoice.voided").into_iter().collect()).await;
        }
        Ok(row)
    }

    /// After a void: when the voided period is the subscription's last
    /// billed one, billed_until moves back to its start so that the next
    /// run bills it again (the new invoice `replaces` the voided one). An
    /// earlier period stays unbilled (docs/billing.md, "Voiding").
    async fn reopen(&self, ws: &Ws, voided: &InvoiceRow) -> Result<(), BillingError> {
        for _ in 0..5 {
            let (mut row, _) = self.subscription(&ws.name, &voided.subscription_id).await?;
            if row.billed_until != voided.period_end {
                return Ok(());
            }
            row.billed_until = voided.period_start;
            let audit = NewAudit {
                workspace: ws.name.clone(),
                actor_key_id: None,
                action: "subscription.reopen".into(),
                target_type: "subscription".into(),
                target_id: row.id.clone(),
                details: json!({"voided_invoice": voided.id}),
            };
            match self.store.update_subscription(&ws.name, &row, &audit).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BillingError::Busy(format!("subscription {:?} kept changing; void again", voided.subscription_id)))
    }

    /// Marks a finalized invoice paid.
    pub async fn mark_paid(&self, ws: &Ws, id: &str, audit: &NewAudit) -> Result<InvoiceRow, BillingError> {
        self.store.set_invoice_status(&ws.name, id, &["finalized"], "paid", audit).await.map_err(conflict)
    }

    async fn emit_finalized(&self, ws: &Ws, rows: &[InvoiceRow]) {
        if let Some(sink) = &self.events {
            let events: Vec<_> = rows.iter().filter(|r| r.status == "finalized").filter_map(|r| invoice_event(ws, r, "invoice.finalized")).collect();
            if !events.is_empty() {
                sink.emit(events).await;
            }
        }
    }
}

fn conflict(e: StoreError) -> BillingError {
    match e {
        StoreError::NotFound => BillingError::NotFound("invoice not found".into()),
        StoreError::Conflict(m) => BillingError::Conflict(m),
        e => e.into(),
    }
}

fn parse_sub(row: &SubscriptionRow) -> Result<Subscription, BillingError> {
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

/// The SQL over the `usage` table that gives a usage line's quantity.
fn usage_sql(m: &Meter, sub: &Subscription, shared: bool, p: Period) -> String {
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
    let t = |t: DateTime<Utc>| bucket_floor(t).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    format!(
        "SELECT {value} AS quantity FROM usage WHERE meter = '{}' AND customer_id = '{}' AND {subs} AND period_start >= '{}' AND period_start < '{}'",
        q(&m.key),
        q(&sub.customer_id),
        t(p.start),
        t(p.end)
    )
}

/// The event an invoice's change of status enters the log as.
fn invoice_event(ws: &Ws, r: &InvoiceRow, kind: &str) -> Option<sluice_core::Event> {
    let props = json!({
        "invoice_id": r.id, "number": r.number, "status": r.status,
        "currency": r.doc.get("currency"), "total": r.doc.get("total"), "subtotal": r.doc.get("subtotal"), "tax": r.doc.get("tax"),
        "period_start": r.period_start, "period_end": r.period_end, "run_id": r.run_id,
    });
    crate::make_event(&ws.name, &format!("{kind}:{}", r.id), kind, Some(&r.customer_id), Some(&r.subscription_id), props)
        .inspect_err(|e| tracing::error!(error = %e, invoice = %r.id, "could not make the {kind} event"))
        .ok()
}
