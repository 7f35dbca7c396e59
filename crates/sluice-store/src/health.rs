//! Customer health's tables (migration 0012): configuration versions,
//! attribute changes, stage overrides, the live evaluation of each customer
//! and its history, and what the health consumer keeps of the log (its
//! events per customer and the customers still to evaluate). The documents
//! (configurations, explanations) are JSON whose shape belongs to
//! `sluice-health`; this module keeps them and answers the queries the
//! evaluation needs: a customer's events in a window, the last event of
//! each type, attributes and overrides as they were at a time.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::in_lists::Arg;
use crate::BeginWrite as _;
use crate::{from_micros, on_pool, to_micros, Result, Store};

/// A stored configuration version.
#[derive(Debug, Clone)]
pub struct HealthConfigRow {
    /// 1, 2, …
    pub version: i64,
    /// The configuration document.
    pub config: Value,
    /// When it was applied.
    pub created_at: DateTime<Utc>,
    /// Key that applied it.
    pub created_by: Option<String>,
}

/// A customer's events of one type as the measures read them: their
/// times, and their users and properties when wanted
/// ([`Store::health_events_of`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthEventRun {
    /// Event type.
    pub event_type: String,
    /// Event times (Unix microseconds), in no particular order.
    pub ts: Vec<i64>,
    /// The user of each event, in the order of `ts` (empty when not read).
    pub user_ids: Vec<Option<String>>,
    /// The properties (JSON text) of each event, in the order of `ts`
    /// (empty when not read; `None` for an event without any).
    pub properties: Vec<Option<String>>,
}

impl HealthEventRun {
    /// Events held.
    pub fn len(&self) -> usize {
        self.ts.len()
    }
    /// Holds none.
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }
    /// The user of the `i`th event (none when not read).
    pub fn user_id(&self, i: usize) -> Option<&str> {
        self.user_ids.get(i).and_then(Option::as_deref)
    }
    /// The properties of the `i`th event (none when not read).
    pub fn properties(&self, i: usize) -> Option<&str> {
        self.properties.get(i).and_then(Option::as_deref)
    }
}

/// What of a customer's events an evaluation reads
/// ([`Store::health_events_of`]): the measures of a configuration name
/// the types they count and whether they look at users or properties.
#[derive(Debug, Clone, Default)]
pub struct EventsWanted<'a> {
    /// Only these types, each with the longest window (in local days) of
    /// the measures that count it: a type is read only as far back as its
    /// own measures look (`None`: every type, [`EventsWanted::days`] back).
    pub types: Option<Vec<(&'a str, u32)>>,
    /// The longest window of all the measures (at least 1).
    pub days: u32,
    /// `user_id` is read (else [`HealthEventRun::user_ids`] is empty).
    pub user_id: bool,
    /// `properties` are read (else [`HealthEventRun::properties`] is empty).
    pub properties: bool,
}

/// A stage override as set (stage `None`: lifted).
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideRow {
    /// When it was set.
    pub set_at: DateTime<Utc>,
    /// The stage, or `None` when this row lifted the override.
    pub stage: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// Until when it holds.
    pub until: Option<DateTime<Utc>>,
    /// Key that set it.
    pub set_by: Option<String>,
}

/// The live evaluation of a customer.
#[derive(Debug, Clone)]
pub struct CustomerHealthRow {
    /// Customer.
    pub customer_id: String,
    /// Configuration version it was evaluated with.
    pub config_version: i64,
    /// Stage (none when no stage's rule holds).
    pub stage: Option<String>,
    /// When the customer entered the stage.
    pub stage_since: Option<DateTime<Utc>>,
    /// Score 0–100 (none without a scorecard or data).
    pub score: Option<f64>,
    /// `good`, `normal` or `bad`.
    pub band: Option<String>,
    /// Priority (risk × value).
    pub priority: Option<f64>,
    /// The full explanation (the API's view, as JSON text: written and
    /// served as it is).
    pub doc: Box<serde_json::value::RawValue>,
    /// When it was evaluated.
    pub evaluated_at: DateTime<Utc>,
    /// When it must be evaluated again even without events.
    pub next_eval_at: DateTime<Utc>,
    /// The last transitions written to the log (cooldown state).
    pub emitted: Value,
    /// The score of the customer's latest history row. Its stage, band
    /// and configuration version are this row's: both rows are written
    /// only together ([`Store::save_customer_health_many`]), and a history
    /// row is written whenever one of them changes, so an evaluation
    /// compares with its latest history without reading it.
    pub history_score: Option<f64>,
}

/// A change of stage, band or score.
#[derive(Debug, Clone)]
pub struct HealthHistoryRow {
    /// Id.
    pub id: String,
    /// Customer.
    pub customer_id: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Configuration version.
    pub config_version: i64,
    /// Stage after the change.
    pub stage: Option<String>,
    /// When that stage was entered.
    pub stage_since: Option<DateTime<Utc>>,
    /// Band after the change.
    pub band: Option<String>,
    /// Score after the change.
    pub score: Option<f64>,
    /// Stage, band and score before (JSON object).
    pub previous: Value,
    /// Why: the event, the time or the configuration that changed it.
    pub cause: String,
}

/// How a health list is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthSort {
    /// Highest priority first.
    Priority,
    /// Lowest score first.
    Score,
    /// Highest score first.
    ScoreDesc,
    /// By customer id.
    Id,
}

type HealthTuple = (String, i64, Option<String>, Option<i64>, Option<f64>, Option<String>, Option<f64>, String, i64, i64, String, Option<f64>);
const HEALTH_COLUMNS: &str =
    "customer_id, config_version, stage, stage_since, score, band, priority, doc, evaluated_at, next_eval_at, emitted, history_score";

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// JSON text kept as it is (`null` for text that is not JSON, as [`json`]
/// reads it).
fn raw_json(s: String) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(s).unwrap_or_default()
}

fn health_row(r: HealthTuple) -> CustomerHealthRow {
    CustomerHealthRow {
        customer_id: r.0,
        config_version: r.1,
        stage: r.2,
        stage_since: r.3.map(from_micros),
        score: r.4,
        band: r.5,
        priority: r.6,
        doc: raw_json(r.7),
        evaluated_at: from_micros(r.8),
        next_eval_at: from_micros(r.9),
        emitted: json(&r.10),
        history_score: r.11,
    }
}

type HistoryTuple = (String, String, i64, i64, Option<String>, Option<i64>, Option<String>, Option<f64>, String, String);
const HISTORY_COLUMNS: &str = "id, customer_id, at, config_version, stage, stage_since, band, score, previous, cause";

/// The distinct customers of workspace `$1` in `table`, whose primary key
/// starts with (workspace, customer_id): a recursive step from each
/// customer to the next one up the key, one index seek per customer
/// ([`Store::health_customer_ids`]). Both dialects.
fn loose_customers(table: &str) -> String {
    format!(
        "WITH RECURSIVE c(id) AS (SELECT MIN(customer_id) FROM {table} WHERE workspace = $1 \
         UNION ALL SELECT (SELECT MIN(t.customer_id) FROM {table} t WHERE t.workspace = $1 AND t.customer_id > c.id) FROM c WHERE c.id IS NOT NULL) \
         SELECT id FROM c WHERE id IS NOT NULL"
    )
}

fn history_row(r: HistoryTuple) -> HealthHistoryRow {
    HealthHistoryRow {
        id: r.0,
        customer_id: r.1,
        at: from_micros(r.2),
        config_version: r.3,
        stage: r.4,
        stage_since: r.5.map(from_micros),
        band: r.6,
        score: r.7,
        previous: json(&r.8),
        cause: r.9,
    }
}

impl Store {
    /// A configuration version (`None`: the current one).
    pub async fn health_config(&self, workspace: &str, version: Option<i64>) -> Result<Option<HealthConfigRow>> {
        let row: Option<(i64, String, i64, Option<String>)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT version, config, created_at, created_by FROM health_configs WHERE workspace = $1 AND ($2 IS NULL OR version = $2) \
             ORDER BY version DESC LIMIT 1")
            .bind(workspace).bind(version).fetch_optional(pool).await)?;
        Ok(row.map(|r| HealthConfigRow { version: r.0, config: json(&r.1), created_at: from_micros(r.2), created_by: r.3 }))
    }

    /// Stores a new configuration version; returns its number.
    pub async fn put_health_config(&self, workspace: &str, config: &Value, by: Option<&str>) -> Result<i64> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let (max,): (Option<i64>,) = sqlx::query_as("SELECT MAX(version) FROM health_configs WHERE workspace = $1")
                .bind(workspace).fetch_one(&mut *tx).await?;
            let version = max.unwrap_or(0) + 1;
            sqlx::query("INSERT INTO health_configs (workspace, version, config, created_at, created_by) VALUES ($1, $2, $3, $4, $5)")
                .bind(workspace).bind(version).bind(config.to_string()).bind(now).bind(by).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(version)
        })
    }

    /// Workspaces with a health configuration.
    pub async fn health_workspaces(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> =
            on_pool!(self, pool => sqlx::query_as("SELECT DISTINCT workspace FROM health_configs ORDER BY workspace").fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Records an attribute patch (JSON object; a null value removes the
    /// attribute) at `at`.
    pub async fn add_attribute_change(
        &self,
        workspace: &str,
        customer_id: &str,
        at: DateTime<Utc>,
        reference: &str,
        patch: &Value,
        set_by: Option<&str>,
    ) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query("INSERT INTO customer_attribute_changes (workspace, customer_id, at, ref, source, patch, set_by) \
                VALUES ($1, $2, $3, $4, 'api', $5, $6) ON CONFLICT (workspace, customer_id, at, ref) DO NOTHING")
                .bind(workspace).bind(customer_id).bind(to_micros(at)).bind(reference).bind(patch.to_string()).bind(set_by)
                .execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// When a customer was first seen: its first event or attribute change.
    pub async fn health_first_seen(&self, workspace: &str, customer_id: &str) -> Result<Option<DateTime<Utc>>> {
        let row: (Option<i64>, Option<i64>) = on_pool!(self, pool => sqlx::query_as(
            "SELECT (SELECT MIN(ts) FROM health_events WHERE workspace = $1 AND customer_id = $2), \
                    (SELECT MIN(at) FROM customer_attribute_changes WHERE workspace = $1 AND customer_id = $2)")
            .bind(workspace).bind(customer_id).fetch_one(pool).await)?;
        Ok(match row {
            (Some(a), Some(b)) => Some(from_micros(a.min(b))),
            (a, b) => a.or(b).map(from_micros),
        })
    }

    /// Every customer of a workspace that health knows: from `group`
    /// calls, events and attribute changes.
    ///
    /// The customers of `health_events` and `customer_attribute_changes`
    /// are read by stepping from one customer to the next along the
    /// primary key (one seek per customer, a "loose index scan"): neither
    /// SQLite nor PostgreSQL 15 skips through an index for `DISTINCT`, and
    /// `SELECT DISTINCT customer_id` read every event of the workspace, a
    /// recompute's first step (measured: docs/BENCHMARKS.md, "Customer
    /// health").
    pub async fn health_customer_ids(&self, workspace: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT customer_id FROM customers WHERE workspace = $1 \
             UNION SELECT id FROM ({}) e UNION SELECT id FROM ({}) a \
             UNION SELECT customer_id FROM customer_health WHERE workspace = $1 ORDER BY 1",
            loose_customers("health_events"),
            loose_customers("customer_attribute_changes")
        );
        let rows: Vec<(String,)> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Whether health knows the customer at all.
    pub async fn health_customer_exists(&self, workspace: &str, customer_id: &str) -> Result<bool> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM customers WHERE workspace = $1 AND customer_id = $2) \
                  + (SELECT COUNT(*) FROM customer_health WHERE workspace = $1 AND customer_id = $2) \
                  + (SELECT COUNT(*) FROM (SELECT 1 FROM health_events WHERE workspace = $1 AND customer_id = $2 LIMIT 1) e) \
                  + (SELECT COUNT(*) FROM (SELECT 1 FROM customer_attribute_changes WHERE workspace = $1 AND customer_id = $2 LIMIT 1) a)")
            .bind(workspace).bind(customer_id).fetch_one(pool).await)?;
        Ok(n > 0)
    }

    /// Sets (or, with `stage: None`, lifts) a stage override.
    pub async fn set_stage_override(&self, workspace: &str, customer_id: &str, o: &OverrideRow) -> Result<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query("INSERT INTO stage_overrides (workspace, customer_id, set_at, stage, reason, until_at, set_by) \
                VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (workspace, customer_id, set_at) DO UPDATE SET \
                stage = excluded.stage, reason = excluded.reason, until_at = excluded.until_at, set_by = excluded.set_by")
                .bind(workspace).bind(customer_id).bind(to_micros(o.set_at)).bind(&o.stage).bind(&o.reason)
                .bind(o.until.map(to_micros)).bind(&o.set_by).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The live evaluation of a customer.
    pub async fn customer_health(&self, workspace: &str, customer_id: &str) -> Result<Option<CustomerHealthRow>> {
        Ok(self.customers_health(workspace, &[customer_id]).await?.pop())
    }

    /// The live evaluations of several customers.
    pub async fn customers_health(&self, workspace: &str, customer_ids: &[&str]) -> Result<Vec<CustomerHealthRow>> {
        let sql = format!("SELECT {HEALTH_COLUMNS} FROM customer_health WHERE workspace = $1 AND customer_id IN ({{in}})");
        // Not packed: JSON would print a priority with 15 significant
        // digits, and a priority (a score times a customer's value) may
        // have more.
        let rows: Vec<HealthTuple> = self.select_in(&sql, workspace, customer_ids).await?;
        Ok(rows.into_iter().map(health_row).collect())
    }

    /// What evaluating these customers again needs of their live rows:
    /// every column but the explanation (`doc`), the score and the
    /// priority (`Null`, `None`, `None`), which the evaluation replaces; the
    /// explanation is most of a row's bytes. Packed on SQLite
    /// ([`Store::select_in_packed`]): the one float left, `history_score`,
    /// is a score (a decimal of at most 4 places between 0 and 100), which
    /// SQLite's JSON prints exactly (conformance test
    /// `latest_history_rows_come_back_exactly`).
    pub async fn customers_health_state(&self, workspace: &str, customer_ids: &[&str]) -> Result<Vec<CustomerHealthRow>> {
        let columns = HEALTH_COLUMNS
            .replace(" doc,", " CAST('null' AS TEXT) AS doc,")
            .replace(" score,", " CAST(NULL AS DOUBLE PRECISION) AS score,")
            .replace(" priority,", " CAST(NULL AS DOUBLE PRECISION) AS priority,");
        let sql = format!("SELECT {columns} FROM customer_health WHERE workspace = $1 AND customer_id IN ({{in}})");
        let rows: Vec<HealthTuple> = self.select_in_packed(&sql, HEALTH_COLUMNS, &[Arg::Text(workspace)], customer_ids).await?;
        Ok(rows.into_iter().map(health_row).collect())
    }

    /// The latest history row of a customer at or before `at`.
    pub async fn health_history_at(&self, workspace: &str, customer_id: &str, at: DateTime<Utc>) -> Result<Option<HealthHistoryRow>> {
        let sql = format!(
            "SELECT {HISTORY_COLUMNS} FROM health_history WHERE workspace = $1 AND customer_id = $2 AND at <= $3 ORDER BY at DESC, id DESC LIMIT 1"
        );
        let row: Option<HistoryTuple> =
            on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(customer_id).bind(to_micros(at)).fetch_optional(pool).await)?;
        Ok(row.map(history_row))
    }

    /// The history of a customer (or of every customer), oldest first,
    /// after `after` (a history id; ids grow with time).
    pub async fn health_history(
        &self,
        workspace: &str,
        customer_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<HealthHistoryRow>> {
        let sql = format!(
            "SELECT {HISTORY_COLUMNS} FROM health_history WHERE workspace = $1 AND ($2 IS NULL OR customer_id = $2) AND ($3 IS NULL OR id > $3) \
             ORDER BY id LIMIT $4"
        );
        let rows: Vec<HistoryTuple> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(customer_id).bind(after)
            .bind(limit.clamp(1, 10_000) as i64).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(history_row).collect())
    }

    /// Up to `limit` customers marked by the health consumer, those
    /// waiting longest first: (workspace, customer, mark).
    pub async fn health_dirty(&self, limit: usize) -> Result<Vec<(String, String, i64)>> {
        Ok(on_pool!(self, pool => sqlx::query_as("SELECT workspace, customer_id, marked FROM health_dirty ORDER BY since LIMIT $1")
            .bind(limit as i64).fetch_all(pool).await)?)
    }

    /// Refreshes PostgreSQL's planner statistics of the tables health
    /// evaluations read where they are missing or stale (a no-op on
    /// SQLite; [`crate::analyze_stale`] says when), as
    /// [`Store::analyze_billing_tables`] does for billing; returns the
    /// tables analyzed. Without them (autovacuum off, or not yet run after
    /// a bulk load) PostgreSQL read a batch's events by scanning the
    /// workspace's whole key range and filtering on the 500 customers, far
    /// slower than seeking them (`sluice bench health`; measured:
    /// docs/BENCHMARKS.md, "Customer health").
    pub async fn analyze_health_tables(&self) -> Result<Vec<String>> {
        crate::analyze_stale(self, &["health_events", "customer_attribute_changes", "customer_health", "health_history", "stage_overrides"]).await
    }

    /// How many customers are marked and not evaluated yet, and since when
    /// the one waiting longest was marked (Unix microseconds).
    pub async fn health_dirty_summary(&self) -> Result<(i64, Option<i64>)> {
        Ok(on_pool!(self, pool => sqlx::query_as("SELECT COUNT(*), MIN(since) FROM health_dirty").fetch_one(pool).await)?)
    }

    /// Removes the marks that were evaluated: a mark that moved on since
    /// [`Store::health_dirty`] read it (a newer event) stays.
    pub async fn clear_health_dirty(&self, marks: &[(String, String, i64)]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        let sqlite = matches!(self, Store::Sqlite(..));
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in marks.chunks(MARKS_PER_STATEMENT) {
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?)");
                let sql = format!("DELETE FROM health_dirty WHERE (workspace, customer_id, marked) IN (VALUES {values})");
                let mut q = sqlx::query(&sql);
                for (ws, c, m) in chunk {
                    q = q.bind(ws).bind(c).bind(m);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Customers whose evaluation is due by `now` even without events.
    pub async fn health_due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<(String, String)>> {
        Ok(on_pool!(self, pool => sqlx::query_as(
            "SELECT workspace, customer_id FROM customer_health WHERE next_eval_at <= $1 ORDER BY next_eval_at LIMIT $2")
            .bind(to_micros(now)).bind(limit as i64).fetch_all(pool).await)?)
    }

    /// Evaluated customers of a workspace, filtered and ordered, after a
    /// position (the last row's sort value and id, as this function gave
    /// it for the previous page).
    pub async fn list_customer_health(
        &self,
        workspace: &str,
        stage: Option<&str>,
        band: Option<&str>,
        sort: HealthSort,
        after: Option<(f64, String)>,
        limit: usize,
    ) -> Result<(Vec<CustomerHealthRow>, Option<(f64, String)>)> {
        // Every order is ascending over one key (a descending order sorts
        // the negated value; NULL scores and priorities go last in each),
        // then the id, so that a page starts with one seek at the previous
        // page's last (key, id). The priority order, the list's default, is
        // the index `customer_health_by_priority_key` (migration 0017): a
        // page reads its rows, not the workspace (docs/health.md).
        let key = match sort {
            HealthSort::Priority => "-COALESCE(priority, -1.0)",
            HealthSort::Score => "COALESCE(score, 1000000.0)",
            HealthSort::ScoreDesc => "-COALESCE(score, -1.0)",
            HealthSort::Id => "CAST(0 AS DOUBLE PRECISION)",
        };
        let mut filter = String::new();
        if stage.is_some() {
            filter.push_str(" AND stage = $2");
        }
        if band.is_some() {
            filter.push_str(" AND band = $3");
        }
        let order = if sort == HealthSort::Id {
            if after.is_some() {
                filter.push_str(" AND customer_id > $5");
            }
            "customer_id".to_owned()
        } else {
            if after.is_some() {
                // `(key, id) > ($4, $5)`, spelled so that both databases seek
                // to `key >= $4` in the index instead of filtering from its start.
                filter.push_str(&format!(" AND {key} >= $4 AND ({key} > $4 OR customer_id > $5)"));
            }
            format!("{key}, customer_id")
        };
        let (after_v, after_id) = match after {
            None => (None, None),
            Some((v, id)) => (Some(v), Some(id)),
        };
        let sql = format!("SELECT {HEALTH_COLUMNS}, {key} FROM customer_health WHERE workspace = $1{filter} ORDER BY {order} LIMIT $6");
        let limit = limit.clamp(1, 1000);
        type Keyed = (String, i64, Option<String>, Option<i64>, Option<f64>, Option<String>, Option<f64>, String, i64, i64, String, Option<f64>, f64);
        let rows: Vec<Keyed> = on_pool!(self, pool => sqlx::query_as(&sql).bind(workspace).bind(stage).bind(band).bind(after_v).bind(after_id)
            .bind(limit as i64 + 1).fetch_all(pool).await)?;
        let more = rows.len() > limit;
        let mut out = Vec::new();
        let mut next = None;
        for r in rows.into_iter().take(limit) {
            next = Some((r.12, r.0.clone()));
            out.push(health_row((r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9, r.10, r.11)));
        }
        Ok((out, if more { next } else { None }))
    }

    // ---------------------------------------------------------- batches
    // What the evaluation of many customers reads (a recompute, the
    // evaluator's passes, a backtest step), in a few queries per 500
    // customers instead of several per customer. Times are bound as
    // literals: `select_in` binds only the workspace and the keys.

    /// Events of these customers up to `to`, one run per (customer, type),
    /// with only the types and columns `wanted` (an event of another type
    /// is not read at all: the key starts with the type after the
    /// customer), each type from `start(days)` of its longest window on.
    ///
    /// A run is one row (SQLite: one JSON array of rows per 500 customers,
    /// see [`Store::select_in_packed`]): a customer's events of a type cost
    /// one row, not one each (rows, not bytes, are the read's cost on both
    /// stores; measured: docs/BENCHMARKS.md, "Customer health").
    pub async fn health_events_of(
        &self,
        workspace: &str,
        customers: &[&str],
        to: DateTime<Utc>,
        wanted: &EventsWanted<'_>,
        start: impl Fn(u32) -> DateTime<Utc>,
    ) -> Result<Vec<(String, HealthEventRun)>> {
        // Types that start at the same time are read by one range each; a
        // group of every type when no list is given.
        let mut groups: std::collections::BTreeMap<i64, Vec<&str>> = std::collections::BTreeMap::new();
        match wanted.types.as_deref() {
            Some([]) => return Ok(Vec::new()),
            Some(types) => {
                for (t, days) in types {
                    groups.entry(to_micros(start(*days))).or_default().push(*t);
                }
            }
            None => {
                groups.insert(to_micros(start(wanted.days)), Vec::new());
            }
        }
        let sqlite = matches!(self, Store::Sqlite(_));
        // JSON arrays of a run's values, each aggregate fed the group's
        // rows in the one order they were read in: users and properties
        // line up with the times (checked event by event by the
        // conformance test on both stores).
        let agg = |col: &str| if sqlite { format!("json_group_array({col})") } else { format!("json_agg({col})::text") };
        let ts = agg("ts");
        let users = if wanted.user_id { agg("user_id") } else { "CAST(NULL AS TEXT)".to_owned() };
        let props = if wanted.properties { agg("properties") } else { "CAST(NULL AS TEXT)".to_owned() };
        let mut leading = vec![Arg::Text(workspace)];
        let mut parts = Vec::new();
        for (from, types) in groups {
            let types = if types.is_empty() {
                String::new()
            } else {
                let list = crate::in_lists::placeholders(leading.len() + 1, types.len());
                leading.extend(types.into_iter().map(Arg::Text));
                format!("AND event_type IN ({list})")
            };
            parts.push(format!(
                "SELECT customer_id, event_type, {ts} AS ts, {users} AS users, {props} AS props FROM health_events WHERE workspace = $1 {types} \
                 AND customer_id IN ({{in}}) AND ts >= {from} AND ts <= {} GROUP BY customer_id, event_type",
                to_micros(to)
            ));
        }
        let sql = parts.join(" UNION ALL ");
        type Run = (String, String, Vec<i64>, Option<Vec<Option<String>>>, Option<Vec<Option<String>>>);
        let runs: Vec<Run> = if sqlite {
            // The runs' arrays are JSON text already: joined as text, not
            // parsed again by json() (which cost SQLite more than reading
            // the events row by row).
            let packed = format!(
                "SELECT '[' || group_concat('[' || json_quote(customer_id) || ',' || json_quote(event_type) || ',' || ts || ',' \
                 || coalesce(users, 'null') || ',' || coalesce(props, 'null') || ']', ',') || ']' FROM ({sql}) packed"
            );
            // No runs: one NULL row.
            let pages: Vec<(Option<String>,)> = self.select_in_after(&packed, &leading, customers).await?;
            let mut out = Vec::new();
            for page in pages.into_iter().filter_map(|p| p.0) {
                out.extend(crate::in_lists::decode_json::<Vec<Run>>(&page)?);
            }
            out
        } else {
            // (customer, type, times, users, properties), the arrays as JSON text.
            type RunText = (String, String, String, Option<String>, Option<String>);
            let rows: Vec<RunText> = self.select_in_after(&sql, &leading, customers).await?;
            use crate::in_lists::decode_json as parse;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let users = r.3.as_deref().map(parse).transpose()?;
                let props = r.4.as_deref().map(parse).transpose()?;
                out.push((r.0, r.1, parse(&r.2)?, users, props));
            }
            out
        };
        Ok(runs
            .into_iter()
            .map(|r| (r.0, HealthEventRun { event_type: r.1, ts: r.2, user_ids: r.3.unwrap_or_default(), properties: r.4.unwrap_or_default() }))
            .collect())
    }

    /// The last event time of each (customer, type) at or before `to`.
    pub async fn health_last_seen_of(&self, workspace: &str, customers: &[&str], to: DateTime<Utc>) -> Result<Vec<(String, String, DateTime<Utc>)>> {
        let sql = format!(
            "SELECT customer_id, event_type, MAX(ts) FROM health_events WHERE workspace = $1 AND customer_id IN ({{in}}) AND ts <= {} \
             GROUP BY customer_id, event_type",
            to_micros(to)
        );
        let rows: Vec<(String, String, i64)> = self.select_in(&sql, workspace, customers).await?;
        Ok(rows.into_iter().map(|r| (r.0, r.1, from_micros(r.2))).collect())
    }

    /// The last time of an event of type `event_type` of each of these
    /// customers at or before `to`: one seek per customer to the end of its
    /// range of the key (`MAX` of a correlated subquery), not every event
    /// of the type as a `GROUP BY` reads, nor every type's events
    /// ([`Store::health_last_seen_of`]).
    pub async fn health_last_seen_of_type(
        &self,
        workspace: &str,
        customers: &[&str],
        event_type: &str,
        to: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>> {
        let keys = crate::in_lists::key_rows(matches!(self, Store::Sqlite(_)));
        // Customers without such an event come back with `NULL` (a `WHERE`
        // on it made SQLite run the subquery twice).
        let sql = format!(
            "SELECT k.value AS customer_id, (SELECT MAX(e.ts) FROM health_events e WHERE e.workspace = $1 \
             AND e.customer_id = k.value AND e.event_type = $2 AND e.ts <= {}) AS last FROM {keys}",
            to_micros(to)
        );
        let rows: Vec<(String, Option<i64>)> =
            self.select_in_packed(&sql, "customer_id, last", &[Arg::Text(workspace), Arg::Text(event_type)], customers).await?;
        Ok(rows.into_iter().filter_map(|r| Some((r.0, from_micros(r.1?)))).collect())
    }

    /// Attribute patches of these customers up to `until` (every one when
    /// `None`), in order: (customer, at, patch).
    pub async fn attribute_changes_of(
        &self,
        workspace: &str,
        customers: &[&str],
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, DateTime<Utc>, Value)>> {
        let sql = format!(
            "SELECT customer_id, at, ref, patch FROM customer_attribute_changes WHERE workspace = $1 AND customer_id IN ({{in}}) AND at <= {}",
            until.map(to_micros).unwrap_or(i64::MAX)
        );
        let mut rows: Vec<(String, i64, String, String)> =
            self.select_in_packed(&sql, "customer_id, at, ref, patch", &[Arg::Text(workspace)], customers).await?;
        rows.sort_unstable_by(|a, b| (&a.0, a.1, &a.2).cmp(&(&b.0, b.1, &b.2)));
        Ok(rows.into_iter().map(|r| (r.0, from_micros(r.1), json(&r.3))).collect())
    }

    /// The override row in force at `at` of each of these customers that
    /// has one (the latest set at or before `at`; it may be a lift or
    /// expired: the caller decides).
    pub async fn stage_overrides_of(&self, workspace: &str, customers: &[&str], at: DateTime<Utc>) -> Result<Vec<(String, OverrideRow)>> {
        let sql = format!(
            "SELECT customer_id, set_at, stage, reason, until_at, set_by FROM stage_overrides WHERE workspace = $1 AND customer_id IN ({{in}}) \
             AND set_at <= {} ORDER BY customer_id, set_at",
            to_micros(at)
        );
        type Tuple = (String, i64, Option<String>, Option<String>, Option<i64>, Option<String>);
        let rows: Vec<Tuple> = self.select_in(&sql, workspace, customers).await?;
        let mut out: Vec<(String, OverrideRow)> = Vec::new();
        for r in rows {
            let o = OverrideRow { set_at: from_micros(r.1), stage: r.2, reason: r.3, until: r.4.map(from_micros), set_by: r.5 };
            // Ordered by set_at: the last row of a customer is in force.
            match out.last_mut() {
                Some(last) if last.0 == r.0 => last.1 = o,
                _ => out.push((r.0, o)),
            }
        }
        Ok(out)
    }

    /// The latest history row of each of these customers (ids grow with
    /// time). It reads every history row of each customer: an evaluation
    /// takes what it needs of the latest from the live row instead
    /// ([`CustomerHealthRow::history_score`]).
    pub async fn latest_history_of(&self, workspace: &str, customers: &[&str]) -> Result<Vec<HealthHistoryRow>> {
        let sql = format!(
            "SELECT {HISTORY_COLUMNS} FROM health_history WHERE workspace = $1 AND id IN \
             (SELECT MAX(id) FROM health_history WHERE workspace = $1 AND customer_id IN ({{in}}) GROUP BY customer_id)"
        );
        // Packed on SQLite, whose JSON prints a float with 15 significant
        // digits: exact for scores, which are decimals of at most 4 places
        // between 0 and 100 (conformance test
        // `latest_history_rows_come_back_exactly`).
        let rows: Vec<HistoryTuple> = self.select_in_packed(&sql, HISTORY_COLUMNS, &[Arg::Text(workspace)], customers).await?;
        Ok(rows.into_iter().map(history_row).collect())
    }

    /// When each customer of a workspace was first seen: its first event
    /// or attribute change.
    pub async fn health_first_seen_all(&self, workspace: &str) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
        let rows: Vec<(String, i64)> = on_pool!(self, pool => sqlx::query_as(
            "SELECT customer_id, MIN(t) FROM (SELECT customer_id, MIN(ts) AS t FROM health_events WHERE workspace = $1 GROUP BY customer_id \
             UNION ALL SELECT customer_id, MIN(at) AS t FROM customer_attribute_changes WHERE workspace = $1 GROUP BY customer_id) f GROUP BY customer_id")
            .bind(workspace).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|r| (r.0, from_micros(r.1))).collect())
    }

    /// Saves many evaluations and their history rows in one transaction.
    pub async fn save_customer_health_many(
        &self,
        workspace: &str,
        rows: &[CustomerHealthRow],
        history: &[HealthHistoryRow],
        outbox: &[crate::OutboxRow],
    ) -> Result<()> {
        if rows.is_empty() && history.is_empty() && outbox.is_empty() {
            return Ok(());
        }
        let now = to_micros(Utc::now());
        // Placeholders as `crate::values_rows` says (anonymous on SQLite).
        let sqlite = matches!(self, Store::Sqlite(_));
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for chunk in rows.chunks(200) {
                // On SQLite a row that is there keeps its indexed columns
                // (`priority`, `next_eval_at`) here: SQLite rewrites an index
                // entry whenever its column is in the SET list, moved or not,
                // and a batch's entries of the priority index lie all over it
                // (most of the pages a batch wrote: docs/BENCHMARKS.md,
                // "Customer health").
                // PostgreSQL compares the old and new values of indexed
                // columns itself, so it sets them here and needs no second
                // statement, whose join it planned as a scan of the table
                // when its statistics were of an emptier one.
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
                let indexed = if sqlite { "" } else { ", priority = excluded.priority, next_eval_at = excluded.next_eval_at" };
                let sql = format!("INSERT INTO customer_health ({HEALTH_COLUMNS}, workspace) VALUES {values} \
                    ON CONFLICT (workspace, customer_id) DO UPDATE SET config_version = excluded.config_version, stage = excluded.stage, \
                    stage_since = excluded.stage_since, score = excluded.score, band = excluded.band, doc = excluded.doc, \
                    evaluated_at = excluded.evaluated_at, emitted = excluded.emitted, history_score = excluded.history_score{indexed}");
                let mut q = sqlx::query(&sql);
                for h in chunk {
                    q = q.bind(&h.customer_id).bind(h.config_version).bind(&h.stage).bind(h.stage_since.map(to_micros)).bind(h.score).bind(&h.band)
                        .bind(h.priority).bind(h.doc.get()).bind(to_micros(h.evaluated_at)).bind(to_micros(h.next_eval_at))
                        .bind(h.emitted.to_string()).bind(h.history_score).bind(workspace);
                }
                q.execute(&mut *tx).await?;
                if !sqlite {
                    continue;
                }
                // Then those two, in the rows where they moved only.
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?)");
                let sql = format!("UPDATE customer_health SET priority = v.column2, next_eval_at = v.column3 FROM (VALUES {values}) AS v \
                    WHERE customer_health.workspace = ? AND customer_health.customer_id = v.column1 \
                    AND (customer_health.priority IS DISTINCT FROM v.column2 OR customer_health.next_eval_at IS DISTINCT FROM v.column3)");
                let mut q = sqlx::query(&sql);
                for h in chunk {
                    q = q.bind(&h.customer_id).bind(h.priority).bind(to_micros(h.next_eval_at));
                }
                q.bind(workspace).execute(&mut *tx).await?;
            }
            for chunk in history.chunks(200) {
                let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
                let sql = format!("INSERT INTO health_history ({HISTORY_COLUMNS}, workspace) VALUES {values}");
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q.bind(&r.id).bind(&r.customer_id).bind(to_micros(r.at)).bind(r.config_version).bind(&r.stage).bind(r.stage_since.map(to_micros))
                        .bind(&r.band).bind(r.score).bind(r.previous.to_string()).bind(&r.cause).bind(workspace);
                }
                q.execute(&mut *tx).await?;
            }
            // Transition events, sent after the commit (and deleted then),
            // or by the outbox relay if the process dies first.
            for o in outbox {
                sqlx::query("INSERT INTO event_outbox (workspace, kind, subject, created_at, event) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
                    .bind(&o.workspace).bind(&o.kind).bind(&o.subject).bind(now).bind(&o.event)
                    .execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

/// Marks per statement (3 parameters each).
const MARKS_PER_STATEMENT: usize = 500;

/// Marks customers for the health evaluator in the health read model's
/// transaction, `at` being the commit's time: a customer already marked
/// keeps its place in the queue (`since`) and takes the new mark.
pub async fn mark_health_dirty(tx: crate::Tx<'_>, customers: &[(&str, &str)], at: i64) -> Result<()> {
    let sqlite = matches!(tx, crate::Tx::Sqlite(_));
    crate::on_tx!(tx, conn => {
        for chunk in customers.chunks(MARKS_PER_STATEMENT) {
            let values = crate::values_rows(sqlite, chunk.len(), "(?, ?, ?, ?)");
            let sql = format!("INSERT INTO health_dirty (workspace, customer_id, marked, since) VALUES {values} \
                ON CONFLICT (workspace, customer_id) DO UPDATE SET marked = excluded.marked");
            let mut q = sqlx::query(&sql);
            for (ws, c) in chunk {
                q = q.bind(*ws).bind(*c).bind(at).bind(at);
            }
            q.execute(&mut *conn).await?;
        }
    });
    Ok(())
}
