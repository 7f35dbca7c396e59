//! Billing's tables: settings, plan versions, subscriptions, invoices and
//! invoice numbers. The documents (plan specs, subscriptions, invoices) are
//! JSON whose shape belongs to `sluice-billing`; this module only keeps
//! them, with the guarantees that need the database: one invoice per
//! (subscription, period), gapless numbers, no write made from a stale
//! read of a subscription, and an outbox row for each invoice event written
//! with the change it announces.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, to_micros, NewAudit, Page, Result, Store, StoreError};

/// Inside an open transaction: `kind`'s event of invoice `id` waits in the
/// outbox until it is in the log.
macro_rules! outbox {
    ($tx:ident, $workspace:expr, $kind:expr, $id:expr, $now:expr) => {
        sqlx::query("INSERT INTO event_outbox (workspace, kind, subject, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
            .bind($workspace)
            .bind($kind)
            .bind($id)
            .bind($now)
            .execute(&mut *$tx)
            .await?
    };
}

/// A plan version.
#[derive(Debug, Clone)]
pub struct PlanRow {
    /// Plan code.
    pub code: String,
    /// 1, 2, … (each edit adds one).
    pub version: i64,
    /// The plan's definition.
    pub spec: Value,
    /// When this version was made.
    pub created_at: DateTime<Utc>,
}

/// A subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    /// Id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// Current plan code.
    pub plan_code: String,
    /// Where the next invoice period starts.
    pub billed_until: DateTime<Utc>,
    /// End, if any.
    pub end_at: Option<DateTime<Utc>>,
    /// The start of the earliest voided period waiting to be billed again
    /// (the document's `reissue`), if any: a run of due subscriptions
    /// includes it.
    pub reissue_from: Option<DateTime<Utc>>,
    /// The subscription document.
    pub doc: Value,
    /// Bumped by every write.
    pub revision: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

sluice_core::named_enum! {
    /// An invoice's status: `draft` → `finalized` → `paid`; a draft or a
    /// finalized invoice can become `void` (keeping its number).
    pub enum InvoiceStatus / UnknownInvoiceStatus ("an invoice status") {
        /// Recomputed with late usage until finalized.
        Draft = "draft",
        /// Numbered and frozen.
        Finalized = "finalized",
        /// Marked paid.
        Paid = "paid",
        /// Cancelled; keeps its number.
        Void = "void",
    }
}

impl InvoiceStatus {
    /// Finalized or paid: numbered, and never edited again.
    pub fn is_final(self) -> bool {
        matches!(self, InvoiceStatus::Finalized | InvoiceStatus::Paid)
    }
}

/// An invoice.
#[derive(Debug, Clone)]
pub struct InvoiceRow {
    /// Id.
    pub id: String,
    /// Subscription.
    pub subscription_id: String,
    /// Customer.
    pub customer_id: String,
    /// Status.
    pub status: InvoiceStatus,
    /// Number, once finalized.
    pub number: Option<String>,
    /// Period start.
    pub period_start: DateTime<Utc>,
    /// Period end.
    pub period_end: DateTime<Utc>,
    /// The billing run that made it.
    pub run_id: Option<String>,
    /// The invoice document.
    pub doc: Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Finalization time.
    pub finalized_at: Option<DateTime<Utc>>,
    /// Void time.
    pub voided_at: Option<DateTime<Utc>>,
    /// Paid time.
    pub paid_at: Option<DateTime<Utc>>,
}

/// An invoice to insert.
#[derive(Debug, Clone)]
pub struct NewInvoice {
    /// Id.
    pub id: String,
    /// Period start.
    pub period_start: DateTime<Utc>,
    /// Period end.
    pub period_end: DateTime<Utc>,
    /// The document.
    pub doc: Value,
    /// Finalize (and number) it with the commit; else it stays a draft.
    pub finalize: bool,
}

/// Filters of an invoice list.
#[derive(Debug, Clone, Default)]
pub struct InvoiceFilter {
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Only this subscription.
    pub subscription_id: Option<String>,
    /// Only this status.
    pub status: Option<InvoiceStatus>,
    /// Only made by this run.
    pub run_id: Option<String>,
}

/// A billing commit: a subscription's new state and the invoices of the
/// periods it billed, written together or not at all.
#[derive(Clone)]
pub struct BillingCommit<'a> {
    /// Workspace.
    pub workspace: &'a str,
    /// Subscription id.
    pub subscription_id: &'a str,
    /// Customer.
    pub customer_id: &'a str,
    /// The revision the invoices were computed from; another write since
    /// then refuses the commit ([`StoreError::Conflict`]).
    pub revision: i64,
    /// The new billed-until.
    pub billed_until: DateTime<Utc>,
    /// The earliest voided period still to bill again, after this commit.
    pub reissue_from: Option<DateTime<Utc>>,
    /// The new subscription document.
    pub doc: &'a Value,
    /// The invoices.
    pub invoices: &'a [NewInvoice],
    /// The run making them.
    pub run_id: Option<&'a str>,
    /// How invoices to finalize are numbered: `number(n)` for the
    /// workspace's next counter value `n` (none: every invoice stays a draft).
    pub number: Option<&'a (dyn Fn(i64) -> String + Sync)>,
}

/// `code, version, spec, created_at` of `plans`.
type PlanTuple = (String, i64, String, i64);

fn plan_row(r: PlanTuple) -> Result<PlanRow> {
    Ok(PlanRow { code: r.0, version: r.1, spec: json(&r.2)?, created_at: from_micros(r.3) })
}

type SubscriptionTuple = (String, String, String, i64, Option<i64>, String, i64, i64, Option<i64>);
const SUBSCRIPTION_COLUMNS: &str = "id, customer_id, plan_code, billed_until, end_at, doc, revision, created_at, reissue_from";

fn subscription(r: SubscriptionTuple) -> Result<SubscriptionRow> {
    Ok(SubscriptionRow {
        id: r.0,
        customer_id: r.1,
        plan_code: r.2,
        billed_until: from_micros(r.3),
        end_at: r.4.map(from_micros),
        doc: json(&r.5)?,
        revision: r.6,
        created_at: from_micros(r.7),
        reissue_from: r.8.map(from_micros),
    })
}

#[derive(sqlx::FromRow)]
struct InvoiceTuple {
    id: String,
    subscription_id: String,
    customer_id: String,
    status: String,
    number: Option<String>,
    period_start: i64,
    period_end: i64,
    run_id: Option<String>,
    doc: String,
    created_at: i64,
    finalized_at: Option<i64>,
    voided_at: Option<i64>,
    paid_at: Option<i64>,
}
const INVOICE_COLUMNS: &str =
    "id, subscription_id, customer_id, status, number, period_start, period_end, run_id, doc, created_at, finalized_at, voided_at, paid_at";

fn invoice(r: InvoiceTuple) -> Result<InvoiceRow> {
    let status = r.status.parse().map_err(|e| StoreError::Corrupt(format!("invoice {}: {e}", r.id)))?;
    Ok(InvoiceRow {
        id: r.id,
        subscription_id: r.subscription_id,
        customer_id: r.customer_id,
        status,
        number: r.number,
        period_start: from_micros(r.period_start),
        period_end: from_micros(r.period_end),
        run_id: r.run_id,
        doc: json(&r.doc)?,
        created_at: from_micros(r.created_at),
        finalized_at: r.finalized_at.map(from_micros),
        voided_at: r.voided_at.map(from_micros),
        paid_at: r.paid_at.map(from_micros),
    })
}

fn json(s: &str) -> Result<Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("a billing document is not JSON: {e}")))
}

/// Takes the workspace's next invoice number, in the caller's transaction.
macro_rules! next_number {
    ($tx:expr, $workspace:expr) => {{
        let (n,): (i64,) = sqlx::query_as(
            "INSERT INTO invoice_counters (workspace, last) VALUES ($1, 1) \
             ON CONFLICT (workspace) DO UPDATE SET last = invoice_counters.last + 1 RETURNING last",
        )
        .bind($workspace)
        .fetch_one(&mut *$tx)
        .await?;
        n
    }};
}

impl Store {
    /// The workspace's billing settings document, if set.
    pub async fn billing_settings(&self, workspace: &str) -> Result<Option<Value>> {
        let row: Option<(String,)> = on_pool!(self, pool => sqlx::query_as("SELECT settings FROM billing_settings WHERE workspace = $1")
            .bind(workspace).fetch_optional(pool).await)?;
        row.map(|r| json(&r.0)).transpose()
    }

    /// Replaces the workspace's billing settings.
    pub async fn put_billing_settings(&self, workspace: &str, settings: &Value, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query("INSERT INTO billing_settings (workspace, settings, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (workspace) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at")
                .bind(workspace).bind(settings.to_string()).bind(now).execute(&mut *tx).await?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        Ok(())
    }

    /// Adds a version of plan `code` (1 for a new code) and returns it.
    pub async fn create_plan_version(&self, workspace: &str, code: &str, spec: &Value, created_by: &str, audit: &NewAudit) -> Result<PlanRow> {
        let now = Utc::now();
        let version = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (last,): (Option<i64>,) = sqlx::query_as("SELECT MAX(version) FROM plans WHERE workspace = $1 AND code = $2")
                .bind(workspace).bind(code).fetch_one(&mut *tx).await?;
            let version = last.unwrap_or(0) + 1;
            sqlx::query("INSERT INTO plans (workspace, code, version, spec, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(workspace).bind(code).bind(version).bind(spec.to_string()).bind(to_micros(now)).bind(created_by)
                .execute(&mut *tx).await
                .map_err(|e| StoreError::conflict_on_unique(e, format!("plan {code:?} was edited at the same time; send the edit again")))?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            version
        });
        Ok(PlanRow { code: code.to_owned(), version, spec: spec.clone(), created_at: from_micros(to_micros(now)) })
    }

    /// A plan's version (the latest when `None`).
    pub async fn plan(&self, workspace: &str, code: &str, version: Option<i64>) -> Result<PlanRow> {
        let row: Option<PlanTuple> = on_pool!(self, pool => sqlx::query_as(
            "SELECT code, version, spec, created_at FROM plans WHERE workspace = $1 AND code = $2 AND ($3 IS NULL OR version = $3) \
             ORDER BY version DESC LIMIT 1")
            .bind(workspace).bind(code).bind(version).fetch_optional(pool).await)?;
        plan_row(row.ok_or(StoreError::NotFound)?)
    }

    /// The latest version of every plan of the workspace, by code.
    pub async fn list_plans(&self, workspace: &str) -> Result<Vec<PlanRow>> {
        let rows: Vec<PlanTuple> = on_pool!(self, pool => sqlx::query_as(
            "SELECT p.code, p.version, p.spec, p.created_at FROM plans p WHERE p.workspace = $1 \
             AND p.version = (SELECT MAX(q.version) FROM plans q WHERE q.workspace = p.workspace AND q.code = p.code) ORDER BY p.code")
            .bind(workspace).fetch_all(pool).await)?;
        rows.into_iter().map(plan_row).collect()
    }

    /// Every version of every plan of a workspace, by code and version.
    pub async fn plan_versions(&self, workspace: &str) -> Result<Vec<PlanRow>> {
        let rows: Vec<PlanTuple> = on_pool!(self, pool => sqlx::query_as(
            "SELECT code, version, spec, created_at FROM plans WHERE workspace = $1 ORDER BY code, version")
            .bind(workspace).fetch_all(pool).await)?;
        rows.into_iter().map(plan_row).collect()
    }

    /// Creates subscriptions, all or none; [`StoreError::Conflict`] naming
    /// the first id that is taken.
    pub async fn create_subscriptions(&self, workspace: &str, subs: &[SubscriptionRow], audit: &NewAudit) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for s in subs {
                sqlx::query("INSERT INTO subscriptions (workspace, id, customer_id, plan_code, billed_until, end_at, doc, revision, created_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(workspace).bind(&s.id).bind(&s.customer_id).bind(&s.plan_code).bind(to_micros(s.billed_until))
                    .bind(s.end_at.map(to_micros)).bind(s.doc.to_string()).bind(s.revision).bind(to_micros(s.created_at))
                    .execute(&mut *tx).await
                    .map_err(|e| StoreError::conflict_on_unique(e, format!("subscription {:?} already exists", s.id)))?;
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        Ok(())
    }

    /// One subscription.
    pub async fn subscription(&self, workspace: &str, id: &str) -> Result<SubscriptionRow> {
        let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE workspace = $1 AND id = $2");
        let row: Option<SubscriptionTuple> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(id).fetch_optional(pool).await)?;
        subscription(row.ok_or(StoreError::NotFound)?)
    }

    /// Subscriptions by id, after `cursor` (an id), optionally of one
    /// customer or plan.
    pub async fn list_subscriptions(
        &self,
        workspace: &str,
        customer_id: Option<&str>,
        plan_code: Option<&str>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<SubscriptionRow>> {
        let limit = clamp_limit(limit);
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE workspace = $1 AND ($2 IS NULL OR customer_id = $2) \
             AND ($3 IS NULL OR plan_code = $3) AND id > $4 ORDER BY id LIMIT $5"
        );
        let rows: Vec<SubscriptionTuple> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(customer_id).bind(plan_code)
            .bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        let rows = rows.into_iter().map(subscription).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, limit, |s: &SubscriptionRow| s.id.clone()))
    }

    /// Ids of the workspace's subscriptions, optionally only those on
    /// `plan_code`, of `customer_ids`, or not billed up to their end and
    /// billed until before `billed_before`.
    pub async fn subscription_ids(
        &self,
        workspace: &str,
        plan_code: Option<&str>,
        customer_ids: Option<&[String]>,
        billed_before: Option<DateTime<Utc>>,
    ) -> Result<Vec<String>> {
        let rows: Vec<(String, String)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT id, customer_id FROM subscriptions WHERE workspace = $1 AND ($2 IS NULL OR plan_code = $2) \
             AND ($3 IS NULL OR (billed_until < $3 AND (end_at IS NULL OR billed_until < end_at)) OR reissue_from < $3) ORDER BY id")
            .bind(workspace).bind(plan_code).bind(billed_before.map(to_micros)).fetch_all(pool).await)?;
        Ok(rows.into_iter().filter(|(_, c)| customer_ids.is_none_or(|ids| ids.contains(c))).map(|(id, _)| id).collect())
    }

    /// Writes a subscription's document (a plan change, a cancellation) if
    /// nothing else wrote it since `revision`; else [`StoreError::Conflict`].
    pub async fn update_subscription(&self, workspace: &str, s: &SubscriptionRow, audit: &NewAudit) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query("UPDATE subscriptions SET plan_code = $3, billed_until = $4, end_at = $5, doc = $6, reissue_from = $8, \
                                 revision = revision + 1 WHERE workspace = $1 AND id = $2 AND revision = $7")
                .bind(workspace).bind(&s.id).bind(&s.plan_code).bind(to_micros(s.billed_until)).bind(s.end_at.map(to_micros))
                .bind(s.doc.to_string()).bind(s.revision).bind(s.reissue_from.map(to_micros)).execute(&mut *tx).await?.rows_affected();
            if n == 0 {
                return Err(StoreError::Conflict(format!("subscription {:?} changed at the same time; read it and try again", s.id)));
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        Ok(())
    }

    /// One invoice.
    pub async fn invoice(&self, workspace: &str, id: &str) -> Result<InvoiceRow> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE workspace = $1 AND id = $2");
        let row: Option<InvoiceTuple> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(id).fetch_optional(pool).await)?;
        invoice(row.ok_or(StoreError::NotFound)?)
    }

    /// Invoices by id (ids grow with time), oldest first, after `cursor`.
    pub async fn list_invoices(&self, workspace: &str, f: &InvoiceFilter, cursor: Option<&str>, limit: usize) -> Result<Page<InvoiceRow>> {
        self.list_invoices_in(workspace, f, sluice_core::SortOrder::Asc, cursor, limit).await
    }

    /// Invoices in `order` of their ids (newest first with `Desc`).
    pub async fn list_invoices_in(
        &self,
        workspace: &str,
        f: &InvoiceFilter,
        order: sluice_core::SortOrder,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<InvoiceRow>> {
        let limit = clamp_limit(limit);
        let page = match order {
            sluice_core::SortOrder::Asc => "AND id > $6 ORDER BY id",
            sluice_core::SortOrder::Desc => "AND ($6 = '' OR id < $6) ORDER BY id DESC",
        };
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE workspace = $1 AND ($2 IS NULL OR customer_id = $2) \
             AND ($3 IS NULL OR subscription_id = $3) AND ($4 IS NULL OR status = $4) AND ($5 IS NULL OR run_id = $5) \
             {page} LIMIT $7"
        );
        let rows: Vec<InvoiceTuple> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(&f.customer_id)
            .bind(&f.subscription_id).bind(f.status.map(InvoiceStatus::as_str)).bind(&f.run_id).bind(cursor.unwrap_or("")).bind(limit as i64 + 1)
            .fetch_all(pool).await)?;
        let rows = rows.into_iter().map(invoice).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_overfetch(rows, limit, |i: &InvoiceRow| i.id.clone()))
    }

    /// Ids of the invoices a run made.
    pub async fn run_invoice_ids(&self, run_id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            on_pool!(self, pool => sqlx::query_as("SELECT id FROM invoices WHERE run_id = $1 ORDER BY id").bind(run_id).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Replaces a draft's document (recomputed with late usage);
    /// [`StoreError::Conflict`] when it is no longer a draft.
    pub async fn update_draft(&self, workspace: &str, id: &str, doc: &Value) -> Result<()> {
        let n = on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query("UPDATE invoices SET doc = $3 WHERE workspace = $1 AND id = $2 AND status = 'draft'")
                .bind(workspace).bind(id).bind(doc.to_string()).execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            n
        });
        if n == 0 {
            return Err(StoreError::Conflict(format!("invoice {id:?} is not a draft")));
        }
        Ok(())
    }

    /// Finalizes a draft with its final document: takes the next number in
    /// the same short transaction. [`StoreError::Conflict`] when it is not a
    /// draft.
    pub async fn finalize_invoice(
        &self,
        workspace: &str,
        id: &str,
        doc: &Value,
        number: &(dyn Fn(i64) -> String + Sync),
        audit: &NewAudit,
    ) -> Result<InvoiceRow> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (status,): (String,) = sqlx::query_as("SELECT status FROM invoices WHERE workspace = $1 AND id = $2")
                .bind(workspace).bind(id).fetch_optional(&mut *tx).await?.ok_or(StoreError::NotFound)?;
            if status != "draft" {
                return Err(StoreError::Conflict(format!("invoice {id:?} is {status}; only a draft can be finalized")));
            }
            let n = next_number!(tx, workspace);
            sqlx::query("UPDATE invoices SET status = 'finalized', number = $3, doc = $4, finalized_at = $5 WHERE workspace = $1 AND id = $2")
                .bind(workspace).bind(id).bind(number(n)).bind(doc.to_string()).bind(now).execute(&mut *tx).await?;
            outbox!(tx, workspace, "invoice.finalized", id, now);
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        self.invoice(workspace, id).await
    }

    /// Moves an invoice from one of `from` to `to` (`void` or `paid`),
    /// stamping the time; [`StoreError::Conflict`] from any other status.
    pub async fn set_invoice_status(
        &self,
        workspace: &str,
        id: &str,
        from: &[InvoiceStatus],
        to: InvoiceStatus,
        audit: &NewAudit,
    ) -> Result<InvoiceRow> {
        let now = to_micros(Utc::now());
        let column = match to {
            InvoiceStatus::Void => "voided_at",
            InvoiceStatus::Paid => "paid_at",
            other => return Err(StoreError::Conflict(format!("an invoice cannot be set {other} this way"))),
        };
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (status,): (String,) = sqlx::query_as("SELECT status FROM invoices WHERE workspace = $1 AND id = $2")
                .bind(workspace).bind(id).fetch_optional(&mut *tx).await?.ok_or(StoreError::NotFound)?;
            if !from.iter().any(|f| f.as_str() == status) {
                return Err(StoreError::Conflict(format!("invoice {id:?} is {status}; it cannot become {to}")));
            }
            sqlx::query(&format!("UPDATE invoices SET status = $3, {column} = $4 WHERE workspace = $1 AND id = $2"))
                .bind(workspace).bind(id).bind(to.as_str()).bind(now).execute(&mut *tx).await?;
            if to == InvoiceStatus::Void {
                outbox!(tx, workspace, "invoice.voided", id, now);
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        self.invoice(workspace, id).await
    }
}

/// What billing reads for a batch of subscriptions, in a few queries per
/// 500 instead of several per subscription (a billing run of 100,000).
impl Store {
    /// The subscriptions with these ids (those that exist).
    pub async fn subscriptions_by_ids(&self, workspace: &str, ids: &[&str]) -> Result<Vec<SubscriptionRow>> {
        let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE workspace = $1 AND id IN ({{in}})");
        self.select_in::<SubscriptionTuple>(&sql, workspace, ids).await?.into_iter().map(subscription).collect()
    }

    /// Every subscription of these customers.
    pub async fn subscriptions_of_customers(&self, workspace: &str, customers: &[&str]) -> Result<Vec<SubscriptionRow>> {
        let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE workspace = $1 AND customer_id IN ({{in}})");
        self.select_in::<SubscriptionTuple>(&sql, workspace, customers).await?.into_iter().map(subscription).collect()
    }

    /// Every invoice of these subscriptions.
    pub async fn invoices_of_subscriptions(&self, workspace: &str, ids: &[&str]) -> Result<Vec<InvoiceRow>> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE workspace = $1 AND subscription_id IN ({{in}}) ORDER BY period_start, id");
        self.select_in::<InvoiceTuple>(&sql, workspace, ids).await?.into_iter().map(invoice).collect()
    }

    /// The `name` attribute of these customers (those that have one).
    pub async fn customer_names(&self, workspace: &str, customers: &[&str]) -> Result<Vec<(String, String)>> {
        let rows: Vec<(String, String)> = self
            .select_in("SELECT customer_id, attributes FROM customers WHERE workspace = $1 AND customer_id IN ({in})", workspace, customers)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(c, attrs)| {
                let name = serde_json::from_str::<Value>(&attrs).ok()?.get("name")?.as_str()?.to_owned();
                Some((c, name))
            })
            .collect())
    }

    /// Commits subscriptions' billing in one short transaction, all or
    /// none: each one's invoices (finalized and numbered when asked) and its
    /// new billed-until. [`StoreError::Conflict`] when any of them changed
    /// since it was read or already has an invoice for one of the periods;
    /// nothing is written then, and the caller commits them one by one.
    ///
    /// A few statements per batch, not a few per subscription: on
    /// PostgreSQL one `UPDATE … FROM (VALUES …)` per 500 subscriptions (each
    /// row guarded by its revision; fewer rows updated than subscriptions is
    /// a conflict; SQLite keeps one primary-key UPDATE each), one
    /// counter move per workspace reserving the batch's invoice numbers in
    /// commit order (gapless: the range is taken in this transaction), and
    /// multi-row `INSERT`s. On PostgreSQL each statement is a round trip, so
    /// with per-row statements a large run spent most of its time on round
    /// trips (measured: docs/BENCHMARKS.md, "Billing").
    pub async fn commit_billing_many(&self, commits: &[BillingCommit<'_>]) -> Result<Vec<Vec<InvoiceRow>>> {
        const UPDATE_ROWS: usize = 500;
        const INSERT_ROWS: usize = 1000;
        if commits.is_empty() {
            return Ok(Vec::new());
        }
        let now = to_micros(Utc::now());
        let who = |what: &str| match commits {
            [one] => format!("subscription {:?} {what}", one.subscription_id),
            _ => format!("a subscription of this batch {what}"),
        };
        // How many numbers each workspace needs, in order of first appearance.
        let mut wanted: Vec<(&str, i64)> = Vec::new();
        for c in commits.iter().filter(|c| c.number.is_some()) {
            let n = c.invoices.iter().filter(|i| i.finalize).count() as i64;
            match wanted.iter_mut().find(|(w, _)| *w == c.workspace) {
                Some(e) => e.1 += n,
                None if n > 0 => wanted.push((c.workspace, n)),
                None => {}
            }
        }
        let mut out: Vec<Vec<InvoiceRow>> = Vec::with_capacity(commits.len());
        // SQLite runs in-process (a statement costs no round trip) and plans
        // `UPDATE … FROM (VALUES …)` as a scan of the subscriptions per
        // batch, which made a large run slower (measured: docs/BENCHMARKS.md,
        // "Billing"): there each subscription keeps its own primary-key UPDATE.
        let sqlite = matches!(self, Store::Sqlite(_));
        let per_row = sqlite;
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            if per_row {
                for c in commits {
                    let n = sqlx::query("UPDATE subscriptions SET billed_until = $3, doc = $4, reissue_from = $6, revision = revision + 1 \
                                         WHERE workspace = $1 AND id = $2 AND revision = $5")
                        .bind(c.workspace).bind(c.subscription_id).bind(to_micros(c.billed_until)).bind(c.doc.to_string()).bind(c.revision)
                        .bind(c.reissue_from.map(to_micros))
                        .execute(&mut *tx).await?.rows_affected();
                    if n == 0 {
                        return Err(StoreError::Conflict(format!("subscription {:?} was billed or changed at the same time", c.subscription_id)));
                    }
                }
            }
            for chunk in commits.chunks(UPDATE_ROWS).filter(|_| !per_row) {
                let values = crate::values_rows(
                    false,
                    chunk.len(),
                    "(CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS BIGINT))",
                );
                // VALUES columns are column1… on both backends.
                let sql = format!(
                    "UPDATE subscriptions SET billed_until = u.column3, doc = u.column4, reissue_from = u.column6, revision = subscriptions.revision + 1 \
                     FROM (VALUES {values}) AS u WHERE subscriptions.workspace = u.column1 AND subscriptions.id = u.column2 \
                     AND subscriptions.revision = u.column5"
                );
                let docs: Vec<String> = chunk.iter().map(|c| c.doc.to_string()).collect();
                let mut q = sqlx::query(&sql);
                for (c, doc) in chunk.iter().zip(&docs) {
                    q = q
                        .bind(c.workspace)
                        .bind(c.subscription_id)
                        .bind(to_micros(c.billed_until))
                        .bind(doc.as_str())
                        .bind(c.revision)
                        .bind(c.reissue_from.map(to_micros));
                }
                if q.execute(&mut *tx).await?.rows_affected() != chunk.len() as u64 {
                    return Err(StoreError::Conflict(who("was billed or changed at the same time")));
                }
            }
            // The first number of each workspace's reserved range.
            let mut next: Vec<(&str, i64)> = Vec::with_capacity(wanted.len());
            for (ws, n) in &wanted {
                let (last,): (i64,) = sqlx::query_as(
                    "INSERT INTO invoice_counters (workspace, last) VALUES ($1, $2) \
                     ON CONFLICT (workspace) DO UPDATE SET last = invoice_counters.last + $2 RETURNING last",
                )
                .bind(*ws).bind(*n).fetch_one(&mut *tx).await?;
                next.push((*ws, last - n + 1));
            }
            for c in commits {
                let mut rows = Vec::with_capacity(c.invoices.len());
                for inv in c.invoices {
                    let (status, number, finalized_at) = match c.number {
                        Some(f) if inv.finalize => {
                            let Some(slot) = next.iter_mut().find(|(w, _)| *w == c.workspace) else {
                                return Err(StoreError::Corrupt(format!("no invoice numbers were reserved for workspace {:?}", c.workspace)));
                            };
                            slot.1 += 1;
                            (InvoiceStatus::Finalized, Some(f(slot.1 - 1)), Some(now))
                        }
                        _ => (InvoiceStatus::Draft, None, None),
                    };
                    rows.push(InvoiceRow {
                        id: inv.id.clone(),
                        subscription_id: c.subscription_id.to_owned(),
                        customer_id: c.customer_id.to_owned(),
                        status,
                        number,
                        period_start: from_micros(to_micros(inv.period_start)),
                        period_end: from_micros(to_micros(inv.period_end)),
                        run_id: c.run_id.map(str::to_owned),
                        doc: inv.doc.clone(),
                        created_at: from_micros(now),
                        finalized_at: finalized_at.map(from_micros),
                        voided_at: None,
                        paid_at: None,
                    });
                }
                out.push(rows);
            }
            let all: Vec<(&BillingCommit<'_>, &InvoiceRow, String)> = commits
                .iter()
                .zip(&out)
                .flat_map(|(c, rows)| rows.iter().map(move |r| (c, r, r.doc.to_string())))
                .collect();
            for chunk in all.chunks(INSERT_ROWS) {
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
                let sql = format!(
                    "INSERT INTO invoices (workspace, id, subscription_id, customer_id, status, number, period_start, period_end, \
                     run_id, doc, created_at, finalized_at) VALUES {values}"
                );
                let mut q = sqlx::query(&sql);
                for (c, r, doc) in chunk {
                    q = q.bind(c.workspace).bind(&r.id).bind(&r.subscription_id).bind(&r.customer_id).bind(r.status.as_str()).bind(&r.number)
                        .bind(to_micros(r.period_start)).bind(to_micros(r.period_end)).bind(&r.run_id).bind(doc.as_str())
                        .bind(now).bind(r.finalized_at.map(to_micros));
                }
                q.execute(&mut *tx).await.map_err(|e| StoreError::conflict_on_unique(e, who("already has an invoice for one of its periods")))?;
            }
            // Their `invoice.finalized` events, sent after the commit.
            let finalized: Vec<(&str, &str)> =
                all.iter().filter(|(_, r, _)| r.status == InvoiceStatus::Finalized).map(|(c, r, _)| (c.workspace, r.id.as_str())).collect();
            for chunk in finalized.chunks(INSERT_ROWS) {
                let values = crate::values_rows(sqlite, chunk.len(), "(?, 'invoice.finalized', ?, ?)");
                let sql = format!("INSERT INTO event_outbox (workspace, kind, subject, created_at) VALUES {values} ON CONFLICT DO NOTHING");
                let mut q = sqlx::query(&sql);
                for (ws, id) in chunk {
                    q = q.bind(*ws).bind(*id).bind(now);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(out)
    }

    /// Events waiting to be sent (oldest first), written in the transaction
    /// that finalized or voided the invoice, or that saved the health
    /// evaluation which decided a transition (migrations 0018, 0019).
    pub async fn event_outbox(&self, limit: usize) -> Result<Vec<OutboxRow>> {
        let rows: Vec<(String, String, String, Option<String>)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT workspace, kind, subject, event FROM event_outbox ORDER BY created_at, workspace, kind, subject LIMIT $1")
            .bind(limit as i64).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(workspace, kind, subject, event)| OutboxRow { workspace, kind, subject, event }).collect())
    }

    /// Removes sent events from the outbox (in the write queue, as every
    /// write that may meet a large commit: `write_tx!`).
    pub async fn delete_event_outbox(&self, rows: &[OutboxRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let sqlite = matches!(self, Store::Sqlite(_));
        crate::write_tx!(self, tx => {
            for chunk in rows.chunks(300) {
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?)");
                let sql = format!(
                    "DELETE FROM event_outbox WHERE (workspace, kind, subject) IN (SELECT column1, column2, column3 FROM (VALUES {values}) AS v)"
                );
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q.bind(&r.workspace).bind(&r.kind).bind(&r.subject);
                }
                q.execute(&mut *tx).await?;
            }
        })?;
        Ok(())
    }
}

/// An event waiting in the outbox: an invoice's (made from the invoice when
/// sent) or a health transition (the event itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The event's workspace.
    pub workspace: String,
    /// The event type: `invoice.finalized`, `invoice.voided`,
    /// `customer.stage_changed`, `customer.health_changed`.
    pub kind: String,
    /// The invoice, or the event's id when `event` holds it.
    pub subject: String,
    /// The whole event (JSON), for events not made from an invoice.
    pub event: Option<String>,
}

impl OutboxRow {
    /// A row that holds its event.
    pub fn of_event(workspace: &str, kind: &str, id: &str, event: String) -> OutboxRow {
        OutboxRow { workspace: workspace.to_owned(), kind: kind.to_owned(), subject: id.to_owned(), event: Some(event) }
    }
}

impl Store {
    /// Refreshes PostgreSQL's planner statistics of the tables a billing run
    /// reads (a no-op on SQLite, whose plans follow the primary keys).
    /// Right after a bulk import the statistics of `usage_buckets` are
    /// missing until autovacuum gets to it, and PostgreSQL then reads a
    /// batch's usage by scanning the meter's whole key range instead of
    /// seeking each customer, far slower per batch (`sluice bench billing`;
    /// measured: docs/BENCHMARKS.md, "Billing"). Only tables whose
    /// statistics are missing or stale are analyzed
    /// ([`crate::analyze_stale`]); returns them.
    pub async fn analyze_billing_tables(&self) -> Result<Vec<String>> {
        crate::analyze_stale(self, &["usage_buckets", "usage_unique", "subscriptions", "invoices"]).await
    }
}
