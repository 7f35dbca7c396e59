//! SQL over the lake and the workspace's live state tables (DataFusion).
//!
//! Every query gets a fresh DataFusion session holding only the key's
//! workspace's tables:
//!
//! - `events`: the committed Parquet files of the workspace (from the
//!   manifest, with Hive partition columns `content_type`, `year`, `month`,
//!   `day`, `hour`, pruned on them and on `timestamp` bounds), **plus** the
//!   events after the lake writer's checkpoint, read from the log — so an
//!   event is queryable as soon as it is acknowledged. Manifest and
//!   checkpoint come from one snapshot: every event appears exactly once.
//! - `customers`, `meters`, `usage`, `imports`, `jobs`, `audit_log`: read
//!   from the state store when the query names them.
//!
//! Read-only: DDL, DML, `COPY` and statements (`SET`, transactions…) are
//! refused by DataFusion's `SQLOptions`; URL tables (`SELECT … FROM
//! 'file.parquet'`) are off and no file-reading table function is
//! registered (the only table functions are `generate_series` and `range`).
//! There is no catalog but the session's, so no other workspace's files can
//! be named. A time limit and result-size limits end a query with a clear
//! error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Decimal128Builder, Int64Builder, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{project_schema, DFSchema, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType};
use datafusion::object_store::path::Path as ObjPath;
use datafusion::object_store::ObjectMeta;
use datafusion::physical_expr::{conjunction as phys_conjunction, PhysicalExpr};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast::Statement;
use futures::StreamExt;
use rust_decimal::Decimal;
use sluice_core::lake::PropertyType;
use sluice_core::{Event, EventLog};
use sluice_store::schemas::Schemas;
use sluice_store::{LakeFile, Store};

use crate::columns::{self, BatchBuilder, PARTITION_COLUMNS};
use crate::layout;
use crate::pushdown::LiveFilter;
use crate::sandbox::{self, Isolation, Mode};
use crate::writer::CHECKPOINT;

/// Queries hold it shared while they run; compaction holds it exclusively
/// before deleting replaced files, so no running query loses a file.
#[derive(Debug, Clone, Default)]
pub struct FileGuard(Arc<tokio::sync::RwLock<()>>);

impl FileGuard {
    /// Held by a query.
    pub async fn shared(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.0.clone().read_owned().await
    }
    /// Held while deleting replaced files.
    pub async fn exclusive(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.0.clone().write_owned().await
    }
}

/// Limits of one query: the `[sql]` section of the configuration (its keys
/// in parentheses; defaults in the binary's `defaults.toml`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlLimits {
    /// Longest run time (`timeout`).
    #[serde(with = "sluice_core::duration")]
    pub timeout: Duration,
    /// Most result rows (`max_result_rows`).
    #[serde(rename = "max_result_rows")]
    pub max_rows: usize,
    /// Most result bytes, Arrow memory of the result batches
    /// (`max_result_bytes`).
    #[serde(rename = "max_result_bytes")]
    pub max_bytes: usize,
    /// Memory for joins, sorts and aggregations of one query; with process
    /// isolation also the bound (plus [`sandbox::HEADROOM`]) of everything
    /// the query allocates (`memory_limit`).
    #[serde(rename = "memory_limit")]
    pub memory: usize,
    /// Most events read from the log tail (events not yet in a file).
    pub max_tail_events: usize,
    /// Most rows a live table (usage, customers, jobs…) may load for one
    /// query after the query's filters are pushed into the load
    /// (`max_live_rows`; [`crate::pushdown`]).
    pub max_live_rows: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            timeout: Duration::from_secs(30),
            max_rows: 100_000,
            max_bytes: 64 << 20,
            memory: 1 << 30,
            max_tail_events: 2_000_000,
            max_live_rows: 1_000_000,
        }
    }
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL is not valid, or names an unknown table, column or function.
    #[error("{0}")]
    Invalid(String),
    /// Not a read-only query (DDL, DML, COPY, SET…).
    #[error("{0}")]
    ReadOnly(String),
    /// The query ran longer than the limit.
    #[error("the query ran longer than {0:?} and was stopped; narrow it (e.g. filter on timestamp or content_type)")]
    Timeout(Duration),
    /// The result is larger than the limit, or the query needed more memory
    /// than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The caller's key may not read a table the query names (`audit_log`
    /// needs an admin key, as in REST).
    #[error("{0}")]
    Forbidden(String),
    /// A value of a live table cannot be represented in its SQL column (a
    /// usage value beyond `Decimal128(38, 12)`); never rounded.
    #[error("{0}")]
    OutOfRange(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        let root = e.find_root();
        // Storage failures are ours, not the query's.
        if matches!(root, DataFusionError::ParquetError(_) | DataFusionError::ObjectStore(_) | DataFusionError::IoError(_)) {
            return SqlError::Internal(root.to_string());
        }
        let e = root.to_string();
        if e.contains("Recursive CTEs are not enabled") {
            SqlError::Invalid("recursive queries (WITH RECURSIVE) are not allowed".into())
        } else if e.contains("not supported") && (e.contains("DDL") || e.contains("DML") || e.contains("Statement")) {
            SqlError::ReadOnly(format!("only read-only queries (SELECT, WITH, EXPLAIN, VALUES) are allowed: {e}"))
        } else if e.contains("Resources exhausted") {
            SqlError::TooLarge(format!("the query needs more memory than allowed: {e}"))
        } else {
            SqlError::Invalid(e)
        }
    }
}

impl SqlError {
    /// The same error with the lake root's absolute path taken out of its
    /// message (paths relative to the lake root only).
    pub fn scrub(self, root: &std::path::Path) -> SqlError {
        let abs = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let abs = abs.to_string_lossy().trim_end_matches('/').to_owned();
        if abs.is_empty() {
            return self;
        }
        // Object-store paths drop the leading `/`.
        let bare = abs.trim_start_matches('/').to_owned();
        let clean = |m: String| {
            let m = m.replace(&format!("{abs}/"), "").replace(&abs, "<lake>");
            if bare.is_empty() {
                m
            } else {
                m.replace(&format!("{bare}/"), "").replace(&bare, "<lake>")
            }
        };
        match self {
            SqlError::Invalid(m) => SqlError::Invalid(clean(m)),
            SqlError::ReadOnly(m) => SqlError::ReadOnly(clean(m)),
            SqlError::TooLarge(m) => SqlError::TooLarge(clean(m)),
            SqlError::Forbidden(m) => SqlError::Forbidden(clean(m)),
            SqlError::OutOfRange(m) => SqlError::OutOfRange(clean(m)),
            SqlError::Internal(m) => SqlError::Internal(clean(m)),
            t @ SqlError::Timeout(_) => t,
        }
    }
}

/// The result of a query.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Row count.
    pub rows: usize,
    /// Run time.
    pub elapsed: Duration,
}

/// What the caller's key may read: scopes in SQL equal scopes in REST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read key: every table but `audit_log`.
    Read,
    /// An admin or root key, and saved queries (only admin keys create and
    /// run them): every table.
    Admin,
}

/// Runs SQL for a workspace.
#[derive(Clone)]
pub struct SqlEngine {
    /// State store.
    pub store: Store,
    /// The log (for events not yet in a file).
    pub log: Arc<dyn EventLog>,
    /// Declared schemas (typed columns).
    pub schemas: Schemas,
    /// Lake root.
    pub root: PathBuf,
    /// Held while a query runs.
    pub guard: FileGuard,
    /// Limits.
    pub limits: SqlLimits,
    runtime: Arc<RuntimeEnv>,
    isolation: Isolation,
}

/// What a query reads, gathered by the server: the inputs of
/// [`build_context`], in this process or in a worker.
pub(crate) struct Inputs {
    pub(crate) events: Option<EventsInput>,
    pub(crate) tables: Vec<(String, RecordBatch)>,
}

/// The `events` table's inputs.
pub(crate) struct EventsInput {
    pub(crate) typed: Vec<(String, PropertyType)>,
    pub(crate) files: Vec<LakeFile>,
    pub(crate) tail: Vec<RecordBatch>,
}

impl SqlEngine {
    /// An engine with a memory pool of `limits.memory` bytes per query,
    /// running queries in this process; see [`SqlEngine::with_isolation`].
    pub fn new(store: Store, log: Arc<dyn EventLog>, schemas: Schemas, root: PathBuf, guard: FileGuard, limits: SqlLimits) -> SqlEngine {
        let runtime = RuntimeEnvBuilder::new().with_memory_limit(limits.memory, 1.0).build_arc().expect("a runtime with a memory limit");
        SqlEngine { store, log, schemas, root, guard, limits, runtime, isolation: Isolation::InProcess }
    }

    /// Where queries run: the server uses [`Isolation::Process`] (each query
    /// in a child process with a memory limit, see [`crate::sandbox`]).
    pub fn with_isolation(mut self, isolation: Isolation) -> SqlEngine {
        self.isolation = isolation;
        self
    }

    /// Runs `sql` over `workspace`'s tables with every table allowed (the
    /// operator's tools; requests use [`SqlEngine::query_as`]).
    pub async fn query(&self, workspace: &str, sql: &str) -> Result<QueryResult, SqlError> {
        self.query_as(workspace, sql, Access::Admin).await
    }

    /// Runs `sql` over `workspace`'s tables that `access` may read.
    pub async fn query_as(&self, workspace: &str, sql: &str, access: Access) -> Result<QueryResult, SqlError> {
        let started = Instant::now();
        let limits = self.limits;
        let work = async {
            let tables = referenced_tables(sql, access)?;
            let statement = parse_statement(sql).ok();
            let _files = self.guard.shared().await;
            // The state-store reads (snapshot, live tables, log tail) run
            // here; planning and execution run on the SQL runtime or in a
            // worker process, so a heavy query does not hold the threads
            // that serve ingest.
            let inputs = self.inputs(workspace, &tables, statement.as_ref(), true).await?;
            match &self.isolation {
                Isolation::InProcess => {
                    let ctx = build_context(&self.root, inputs, Some(self.runtime.clone()), limits.memory)?;
                    let sql = sql.to_owned();
                    let mut task = sql_runtime().spawn(async move { execute(ctx, &sql, limits).await });
                    let r = (&mut task).await;
                    r.map_err(|e| SqlError::Internal(format!("the query task failed: {e}")))?
                }
                Isolation::Process { program } => sandbox::run(program, Mode::Query, sql, &self.root, limits, inputs)
                    .await?
                    .ok_or_else(|| SqlError::Internal("the SQL worker sent no result".into())),
            }
        };
        let mut r = match tokio::time::timeout(limits.timeout, work).await {
            Ok(r) => r.map_err(|e| e.scrub(&self.root))?,
            // Dropping `work` kills a worker process (`kill_on_drop`). In
            // process, dropping the JoinHandle does not stop the task;
            // `execute` enforces the same time limit itself, so the task
            // ends (and frees its memory) at the latest then.
            Err(_) => return Err(SqlError::Timeout(limits.timeout)),
        };
        r.elapsed = started.elapsed();
        metrics::histogram!("sluice_sql_query_seconds").record(r.elapsed.as_secs_f64());
        Ok(r)
    }

    /// Plans `sql` without running it (as an admin: saved queries are
    /// created by admin keys): an `Err` says why it would fail. Planning
    /// folds constants, so it runs where queries run.
    pub async fn check(&self, workspace: &str, sql: &str) -> Result<(), SqlError> {
        let work = async {
            let tables = referenced_tables(sql, Access::Admin)?;
            let _files = self.guard.shared().await;
            let inputs = self.inputs(workspace, &tables, None, false).await?;
            match &self.isolation {
                Isolation::InProcess => {
                    let ctx = build_context(&self.root, inputs, Some(self.runtime.clone()), self.limits.memory)?;
                    ctx.sql_with_options(sql, read_only()).await?;
                    Ok(())
                }
                Isolation::Process { program } => sandbox::run(program, Mode::Check, sql, &self.root, self.limits, inputs).await.map(|_| ()),
            }
        };
        match tokio::time::timeout(self.limits.timeout, work).await {
            Ok(r) => r.map_err(|e| e.scrub(&self.root)),
            Err(_) => Err(SqlError::Timeout(self.limits.timeout)),
        }
    }

    /// The inputs of the tables `sql` names: the `events` snapshot and tail,
    /// the live tables (with their rows when `rows`, else empty: planning
    /// needs only their schemas).
    async fn inputs(&self, workspace: &str, tables: &[String], statement: Option<&Statement>, rows: bool) -> Result<Inputs, SqlError> {
        let internal = |e: sluice_store::StoreError| SqlError::Internal(e.to_string());
        let mut inputs = Inputs { events: None, tables: Vec::new() };
        if tables.iter().any(|t| t == "events") {
            let snap = self.store.lake_snapshot(workspace, CHECKPOINT).await.map_err(internal)?;
            let typed = self.schemas.columns(workspace);
            let tail = if rows { self.tail(workspace, &snap.checkpoints, &typed).await? } else { Vec::new() };
            inputs.events = Some(EventsInput { typed, files: snap.files, tail });
        }
        for (name, time, load) in LIVE_TABLES {
            if tables.iter().any(|t| t == name) {
                let filter = statement.map(|s| crate::pushdown::live_filter(s, name, time)).unwrap_or_default();
                let scan = Scan { ws: workspace.to_owned(), filter, max_rows: self.limits.max_live_rows, schema_only: !rows };
                let (_, batch) = load(self.store.clone(), scan).await?;
                inputs.tables.push(((*name).to_owned(), batch));
            }
        }
        Ok(inputs)
    }

    /// The workspace's events after the lake checkpoints, as batches of the
    /// table schema.
    async fn tail(&self, workspace: &str, checkpoints: &HashMap<u32, u64>, typed: &[(String, PropertyType)]) -> Result<Vec<RecordBatch>, SqlError> {
        let mut events: Vec<Event> = Vec::new();
        let mut read = 0usize;
        for p in 0..self.log.partitions() {
            let mut at = checkpoints.get(&p).copied().unwrap_or_else(|| self.log.start_offset(p));
            let end = self.log.next_offset(p);
            while at < end {
                let recs = sluice_core::read_decoded(self.log.as_ref(), "sql", p, at, 10_000, 16 << 20)
                    .await
                    .map_err(|e| SqlError::Internal(e.to_string()))?;
                let Some(last) = recs.last() else { break };
                at = last.offset + 1;
                for r in recs.into_iter().filter(|r| r.offset < end) {
                    if let Ok(payload) = r.payload {
                        read += payload.len();
                        if read > self.limits.max_tail_events {
                            return Err(SqlError::TooLarge(format!(
                                "more than {} events are waiting for the lake writer; try again in a few seconds",
                                self.limits.max_tail_events
                            )));
                        }
                        if payload.workspace().as_str() == workspace {
                            events.extend(payload.into_events());
                        }
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(vec![]);
        }
        let typed = typed.to_vec();
        let schemas = self.schemas.clone();
        let ws = workspace.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut enricher = sluice_enrich::Enricher::new();
            // Each event type's declared schema, looked up once per type.
            let mut declared: HashMap<String, Option<Arc<sluice_store::schemas::TypeSchema>>> = HashMap::new();
            let mut out = Vec::new();
            for chunk in events.chunks(8192) {
                let mut b = BatchBuilder::new(&typed, chunk.len());
                let mut parts: [StringBuilder; 5] = std::array::from_fn(|_| StringBuilder::new());
                for e in chunk {
                    let ty = e.event_type.as_str();
                    if !declared.contains_key(ty) {
                        declared.insert(ty.to_owned(), schemas.get(&ws, ty));
                    }
                    b.push(e, &mut enricher, declared[ty].as_ref().map_or(&[][..], |s| s.properties.as_slice()));
                    let [y, m, d, h] = layout::hour_values(layout::hour_start(e.timestamp));
                    for (pb, v) in parts.iter_mut().zip([e.event_type.as_str(), &y, &m, &d, &h]) {
                        pb.append_value(v);
                    }
                }
                let batch = b.finish();
                let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
                cols.extend(parts.iter_mut().map(|p| Arc::new(p.finish()) as ArrayRef));
                let mut fields: Vec<FieldRef> = batch.schema().fields().iter().cloned().collect();
                fields.extend(partition_fields());
                out.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| SqlError::Internal(e.to_string()))?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| SqlError::Internal(e.to_string()))?
    }
}

/// The one SQL statement of `sql`, parsed (no planning, nothing evaluated).
fn parse_statement(sql: &str) -> Result<Statement, SqlError> {
    let state = datafusion::execution::SessionStateBuilder::new().build();
    match state.sql_to_statement(sql, &datafusion::config::Dialect::Generic)? {
        datafusion::sql::parser::Statement::Statement(s) => Ok(*s),
        _ => Err(SqlError::Invalid("not a query".into())),
    }
}

/// The tables `sql` names (CTE names excluded), resolved by DataFusion's
/// parser rather than by searching the text; `Forbidden` if `access` may
/// not read one of them.
pub fn referenced_tables(sql: &str, access: Access) -> Result<Vec<String>, SqlError> {
    let state = datafusion::execution::SessionStateBuilder::new().build();
    let statement = state.sql_to_statement(sql, &datafusion::config::Dialect::Generic)?;
    let refs = state.resolve_table_references(&statement)?;
    let mut names: Vec<String> = refs.iter().map(|r| r.table().to_owned()).collect();
    names.sort();
    names.dedup();
    if access != Access::Admin && names.iter().any(|n| n == "audit_log") {
        return Err(SqlError::Forbidden("audit_log can be read with an admin key only (as GET /v1/audit); this key has scope \"read\"".into()));
    }
    Ok(names)
}

/// A session over `inputs`: `events` (files under `root` plus the tail),
/// the live tables, the JSON functions; recursive CTEs off. `runtime`:
/// the shared runtime (in process), or a new one with a pool of `memory`
/// bytes (worker).
pub(crate) fn build_context(
    root: &std::path::Path,
    inputs: Inputs,
    runtime: Option<Arc<RuntimeEnv>>,
    memory: usize,
) -> Result<SessionContext, SqlError> {
    let mut config = SessionConfig::new()
        .with_target_partitions(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .with_information_schema(false)
        .with_batch_size(8192);
    // A recursive CTE can grow without bound, out of the pool's sight.
    config.options_mut().execution.enable_recursive_ctes = false;
    let runtime = match runtime {
        Some(r) => r,
        None => RuntimeEnvBuilder::new().with_memory_limit(memory, 1.0).build_arc()?,
    };
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    register_json_functions(&ctx);
    let mut tables: HashMap<String, Arc<dyn TableProvider>> = HashMap::new();
    if let Some(ev) = inputs.events {
        tables.insert("events".into(), Arc::new(EventsTable::new(root, columns::file_schema(&ev.typed), ev.files, ev.tail)));
    }
    for (name, batch) in inputs.tables {
        tables.insert(name, Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?));
    }
    // The query's tables are the default schema of DataFusion's catalog:
    // names resolve through it, and nothing else is there.
    let catalog = ctx.catalog("datafusion").ok_or_else(|| SqlError::Internal("no default catalog".into()))?;
    catalog.register_schema("public", Arc::new(QueryTables(tables)))?;
    Ok(ctx)
}

/// The tables of one query (`events` and the live tables it names),
/// resolved by name through DataFusion's catalog.
#[derive(Debug)]
struct QueryTables(HashMap<String, Arc<dyn TableProvider>>);

#[async_trait]
impl datafusion::catalog::SchemaProvider for QueryTables {
    fn table_names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.0.get(name).cloned())
    }

    fn table_exist(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

fn partition_fields() -> Vec<FieldRef> {
    PARTITION_COLUMNS.iter().map(|n| Arc::new(Field::new(*n, DataType::Utf8, false))).collect()
}

/// What a query may do: no DDL, no DML or `COPY`, no statements (`SET`, …).
pub(crate) fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// The runtime that plans and executes queries: its own threads (one per
/// core), separate from the server's, and never dropped.
fn sql_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("sluice-sql")
            .enable_all()
            .build()
            .expect("starting the SQL runtime")
    })
}

/// Plans and runs `sql` in `ctx`, collecting the result within `limits`
/// (the time limit is enforced here too, so an abandoned query stops).
pub(crate) async fn execute(ctx: SessionContext, sql: &str, limits: SqlLimits) -> Result<QueryResult, SqlError> {
    let run = async {
        let opts = read_only();
        let df = ctx.sql_with_options(sql, opts).await?;
        let mut stream = df.execute_stream().await?;
        let schema = stream.schema();
        let (mut batches, mut rows, mut bytes) = (Vec::new(), 0usize, 0usize);
        while let Some(b) = stream.next().await {
            let b = b?;
            rows += b.num_rows();
            bytes += b.get_array_memory_size();
            if rows > limits.max_rows {
                return Err(sandbox::too_many_rows(limits.max_rows));
            }
            if bytes > limits.max_bytes {
                return Err(sandbox::too_many_bytes(limits.max_bytes));
            }
            batches.push(b);
        }
        Ok(QueryResult { schema, batches, rows, elapsed: Duration::ZERO })
    };
    match tokio::time::timeout(limits.timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(SqlError::Timeout(limits.timeout)),
    }
}

/// The `events` table: manifest files plus the log tail.
#[derive(Debug)]
pub struct EventsTable {
    root: PathBuf,
    file_schema: SchemaRef,
    table_schema: SchemaRef,
    files: Vec<LakeFile>,
    tail: Vec<RecordBatch>,
}

impl EventsTable {
    /// The table over `files` (relative to `root`) and `tail`.
    pub fn new(root: &std::path::Path, file_schema: SchemaRef, files: Vec<LakeFile>, tail: Vec<RecordBatch>) -> EventsTable {
        let mut all: Vec<FieldRef> = file_schema.fields().iter().cloned().collect();
        all.extend(partition_fields());
        let table_schema = Arc::new(Schema::new(all));
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        EventsTable { root, file_schema, table_schema, files, tail }
    }

    /// Files that may hold rows matching `filters`: by partition values and
    /// by the files' time range.
    fn prune(&self, filters: &[Expr]) -> Vec<&LakeFile> {
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        let mut types: Option<Vec<String>> = None;
        let mut parts: HashMap<&str, String> = HashMap::new();
        for f in filters {
            collect_bounds(f, &mut lo, &mut hi, &mut types, &mut parts);
        }
        self.files
            .iter()
            .filter(|f| f.max_time.timestamp_micros() >= lo && f.min_time.timestamp_micros() <= hi)
            .filter(|f| types.as_ref().is_none_or(|t| t.iter().any(|x| x == &f.content_type)))
            .filter(|f| {
                let [y, m, d, h] = layout::hour_values(f.hour_start);
                [("year", y), ("month", m), ("day", d), ("hour", h)]
                    .iter()
                    .all(|(k, v)| parts.get(k).is_none_or(|want| want.trim_start_matches('0') == v.trim_start_matches('0')))
            })
            .collect()
    }
}

/// Reads simple conjuncts: `timestamp <op> literal`, `content_type = 'x'`,
/// `content_type IN (…)`, `year|month|day|hour = 'n'`. Anything else is
/// left to DataFusion (the filters are inexact: it applies them all).
fn collect_bounds(e: &Expr, lo: &mut i64, hi: &mut i64, types: &mut Option<Vec<String>>, parts: &mut HashMap<&str, String>) {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            collect_bounds(left, lo, hi, types, parts);
            collect_bounds(right, lo, hi, types, parts);
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (col, lit, op) = match (strip(left), strip(right)) {
                (Expr::Column(c), Expr::Literal(v, _)) => (c.name.as_str(), v, *op),
                (Expr::Literal(v, _), Expr::Column(c)) => (c.name.as_str(), v, op.swap().unwrap_or(*op)),
                _ => return,
            };
            if col == "timestamp" {
                let Some(us) = micros(lit) else { return };
                match op {
                    Operator::Gt | Operator::GtEq => *lo = (*lo).max(us),
                    Operator::Lt | Operator::LtEq => *hi = (*hi).min(us),
                    Operator::Eq => {
                        *lo = (*lo).max(us);
                        *hi = (*hi).min(us);
                    }
                    _ => {}
                }
            } else if op == Operator::Eq {
                let Some(s) = text(lit) else { return };
                if col == "content_type" {
                    *types = Some(vec![s]);
                } else if let Some(k) = ["year", "month", "day", "hour"].into_iter().find(|k| *k == col) {
                    parts.insert(k, s);
                }
            }
        }
        Expr::InList(l) if !l.negated => {
            if let Expr::Column(c) = strip(&l.expr) {
                if c.name == "content_type" {
                    let v: Option<Vec<String>> = l.list.iter().map(|x| if let Expr::Literal(v, _) = strip(x) { text(v) } else { None }).collect();
                    if let Some(v) = v {
                        *types = Some(v);
                    }
                }
            }
        }
        _ => {}
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        other => other,
    }
}

fn micros(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000),
        ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1_000),
        ScalarValue::TimestampMicrosecond(Some(x), _) => Some(*x),
        ScalarValue::TimestampNanosecond(Some(x), _) => Some(x.div_euclid(1_000)),
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => {
            chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros())
        }
        _ => None,
    }
}

fn text(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        ScalarValue::Int64(Some(n)) => Some(n.to_string()),
        ScalarValue::Int32(Some(n)) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        self.table_schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Inexact: used for pruning here, applied again by DataFusion.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let files = self.prune(filters);
        if !files.is_empty() {
            let pfiles: Vec<PartitionedFile> = files
                .iter()
                .map(|f| {
                    // The object-store path of a local file, with its
                    // percent-encoding done by object_store itself (partition
                    // values may hold `%XX` escapes, spaces…).
                    let location = ObjPath::from_absolute_path(self.root.join(&f.path)).map_err(|e| DataFusionError::External(Box::new(e)))?;
                    let meta = ObjectMeta { location, last_modified: f.created_at, size: f.bytes, e_tag: None, version: None };
                    let [y, m, d, h] = layout::hour_values(f.hour_start);
                    Ok(PartitionedFile::new_from_meta(meta)
                        .with_partition_values([f.content_type.clone(), y, m, d, h].into_iter().map(|v| ScalarValue::Utf8(Some(v))).collect()))
                })
                .collect::<DfResult<_>>()?;
            let n = state.config().target_partitions().max(1);
            let groups: Vec<FileGroup> = FileGroup::new(pfiles).split_files(n);
            let table_schema = TableSchema::builder(self.file_schema.clone()).with_table_partition_cols(partition_fields()).build();
            let mut source = ParquetSource::new(table_schema).with_table_parquet_options(state.table_options().parquet.clone());
            let df_schema = DFSchema::try_from(self.table_schema.clone())?;
            let preds: Vec<Arc<dyn PhysicalExpr>> = filters.iter().filter_map(|e| state.create_physical_expr(e.clone(), &df_schema).ok()).collect();
            if !preds.is_empty() {
                source = source.with_predicate(phys_conjunction(preds));
            }
            let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source))
                .with_file_groups(groups)
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            inputs.push(DataSourceExec::from_data_source(config));
        }
        if !self.tail.is_empty() {
            // Tail batches carry the typed columns known now; cast to the table schema by name.
            let batches: Vec<RecordBatch> = self.tail.iter().map(|b| conform(b, &self.table_schema)).collect::<DfResult<_>>()?;
            let mem = MemorySourceConfig::try_new(&[batches], self.table_schema.clone(), projection.cloned())?.with_limit(limit);
            inputs.push(DataSourceExec::from_data_source(mem));
        }
        if inputs.is_empty() {
            return Ok(Arc::new(EmptyExec::new(project_schema(&self.table_schema, projection)?)));
        }
        UnionExec::try_new(inputs)
    }
}

fn conform(b: &RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    if b.schema().as_ref() == schema.as_ref() {
        return Ok(b.clone());
    }
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match b.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => c.clone(),
            _ => arrow::array::new_null_array(f.data_type(), b.num_rows()),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

// ---------------------------------------------------------------------------
// Live state tables.

type Loaded = Result<(SchemaRef, RecordBatch), SqlError>;

/// What a loader reads: the workspace, the query's filters on the table
/// ([`crate::pushdown`]) and the most rows it may hold in memory.
#[derive(Clone)]
struct Scan {
    ws: String,
    filter: LiveFilter,
    max_rows: usize,
    /// Planning: the table's columns only, nothing read from the store.
    schema_only: bool,
}

impl Scan {
    /// Fails once a table holds more rows than `sql.max_live_rows`.
    fn check(&self, table: &str, rows: usize) -> Result<(), SqlError> {
        if rows <= self.max_rows {
            return Ok(());
        }
        Err(SqlError::TooLarge(format!(
            "the {table} table of this workspace has more than {} rows for this query (sql.max_live_rows); filter it in the WHERE clause \
             (for usage: meter = '…', customer_id = '…', period_start >= '<RFC 3339 time with offset>') so that fewer rows are read",
            self.max_rows
        )))
    }
}

type Loader = fn(Store, Scan) -> std::pin::Pin<Box<dyn std::future::Future<Output = Loaded> + Send>>;

/// Tables read from the state store, by name, with the time column whose
/// range a query's filter narrows.
const LIVE_TABLES: &[(&str, &str, Loader)] = &[
    ("customers", "updated_at", |s, q| Box::pin(load_customers(s, q))),
    ("meters", "created_at", |s, q| Box::pin(load_meters(s, q))),
    ("usage", "period_start", |s, q| Box::pin(load_usage(s, q))),
    ("imports", "created_at", |s, q| Box::pin(load_jobs(s, q, true))),
    ("jobs", "created_at", |s, q| Box::pin(load_jobs(s, q, false))),
    ("invoices", "period_start", |s, q| Box::pin(load_invoices(s, q))),
    ("subscriptions", "created_at", |s, q| Box::pin(load_subscriptions(s, q))),
    ("audit_log", "at", |s, q| Box::pin(load_audit(s, q))),
    ("health_history", "at", |s, q| Box::pin(load_health_history(s, q))),
];

/// Scale of decimal columns of the `usage` table.
pub const USAGE_SCALE: u32 = 12;

/// `d` as the value of a `Decimal128(38, 12)` (its mantissa at scale 12),
/// exactly: `None` when `d` has more than 26 integer digits, or non-zero
/// digits beyond the 12th decimal. Never rounds.
pub fn usage_decimal(d: Decimal) -> Option<i128> {
    let (m, scale) = (d.mantissa(), d.scale());
    let v = if scale <= USAGE_SCALE {
        m.checked_mul(10i128.checked_pow(USAGE_SCALE - scale)?)?
    } else {
        let div = 10i128.checked_pow(scale - USAGE_SCALE)?;
        if m % div != 0 {
            return None;
        }
        m / div
    };
    (v.unsigned_abs() < 10u128.pow(38)).then_some(v)
}

impl From<sluice_store::StoreError> for SqlError {
    fn from(e: sluice_store::StoreError) -> Self {
        SqlError::Internal(e.to_string())
    }
}

fn ts_field(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), nullable)
}

struct Cols {
    fields: Vec<Field>,
    arrays: Vec<ArrayRef>,
}

impl Cols {
    fn new() -> Cols {
        Cols { fields: vec![], arrays: vec![] }
    }
    fn text<I: IntoIterator<Item = Option<String>>>(mut self, name: &str, v: I) -> Cols {
        self.fields.push(Field::new(name, DataType::Utf8, true));
        self.arrays.push(Arc::new(v.into_iter().collect::<StringArray>()));
        self
    }
    fn int<I: IntoIterator<Item = Option<i64>>>(mut self, name: &str, v: I) -> Cols {
        let mut b = Int64Builder::new();
        v.into_iter().for_each(|x| b.append_option(x));
        self.fields.push(Field::new(name, DataType::Int64, true));
        self.arrays.push(Arc::new(b.finish()));
        self
    }
    fn float<I: IntoIterator<Item = Option<f64>>>(mut self, name: &str, v: I) -> Cols {
        self.fields.push(Field::new(name, DataType::Float64, true));
        self.arrays.push(Arc::new(v.into_iter().collect::<arrow::array::Float64Array>()));
        self
    }
    fn time<I: IntoIterator<Item = Option<DateTime<Utc>>>>(mut self, name: &str, v: I) -> Cols {
        let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        v.into_iter().for_each(|x| b.append_option(x.map(|t| t.timestamp_micros())));
        self.fields.push(ts_field(name, true));
        self.arrays.push(Arc::new(b.finish()));
        self
    }
    /// A `Decimal128(38, 12)` column of values already converted with
    /// [`usage_decimal`].
    fn decimal(mut self, name: &str, v: Vec<Option<i128>>) -> Result<Cols, SqlError> {
        let b = Decimal128Builder::new().with_precision_and_scale(38, USAGE_SCALE as i8).map_err(|e| SqlError::Internal(e.to_string()))?;
        let mut b = b;
        v.into_iter().for_each(|x| b.append_option(x));
        self.fields.push(Field::new(name, DataType::Decimal128(38, USAGE_SCALE as i8), true));
        self.arrays.push(Arc::new(b.finish()));
        Ok(self)
    }
    fn done(self) -> Loaded {
        let schema = Arc::new(Schema::new(self.fields));
        let batch = RecordBatch::try_new(schema.clone(), self.arrays).map_err(|e| SqlError::Internal(e.to_string()))?;
        Ok((schema, batch))
    }
}

/// Every item of a paged store listing, following its cursors, up to the
/// scan's row limit.
async fn all_pages<T, F, Fut>(scan: &Scan, table: &str, mut page: F) -> Result<Vec<T>, SqlError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<sluice_store::Page<T>, sluice_store::StoreError>>,
{
    let mut all = Vec::new();
    if scan.schema_only {
        return Ok(all);
    }
    let mut cursor = None;
    loop {
        let p = page(cursor).await?;
        all.extend(p.data);
        scan.check(table, all.len())?;
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(all),
        }
    }
}

async fn load_customers(store: Store, scan: Scan) -> Loaded {
    let all = match scan.filter.eq("customer_id") {
        _ if scan.schema_only => Vec::new(),
        Some(id) => store.get_customer(&scan.ws, id).await?.into_iter().collect(),
        None => {
            all_pages(&scan, "customers", |c| {
                let (store, ws) = (store.clone(), scan.ws.clone());
                async move { store.list_customers(&ws, c.as_deref(), 1000).await }
            })
            .await?
        }
    };
    // Health (docs/health.md): the live evaluation of each customer. A
    // customer known to health only (its events or attributes set through
    // the API, no `group` call) is a row too, with the columns of a
    // `group` record empty.
    let mut health: std::collections::BTreeMap<String, sluice_store::CustomerHealthRow> = std::collections::BTreeMap::new();
    match scan.filter.eq("customer_id") {
        _ if scan.schema_only => {}
        Some(id) => health.extend(store.customer_health(&scan.ws, id).await?.map(|h| (h.customer_id.clone(), h))),
        None => {
            let mut after = None;
            loop {
                let (rows, next) = store.list_customer_health(&scan.ws, None, None, sluice_store::HealthSort::Id, after, 1000).await?;
                health.extend(rows.into_iter().map(|h| (h.customer_id.clone(), h)));
                scan.check("customers", health.len().max(all.len()))?;
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
    }
    let mut rows: std::collections::BTreeMap<&str, Option<&sluice_store::CustomerRecord>> = health.keys().map(|id| (id.as_str(), None)).collect();
    rows.extend(all.iter().map(|c| (c.customer_id.as_str(), Some(c))));
    scan.check("customers", rows.len())?;
    let rec = |f: fn(&sluice_store::CustomerRecord) -> Option<String>| rows.values().map(move |c| c.and_then(f)).collect::<Vec<_>>();
    let h = |id: &str| health.get(id);
    Cols::new()
        .text("customer_id", rows.keys().map(|id| Some((*id).to_owned())))
        .text("name", rec(|c| c.attributes.get("name").and_then(|v| v.as_str()).map(str::to_owned)))
        .text("plan", rec(|c| c.attributes.get("plan").and_then(|v| v.as_str()).map(str::to_owned)))
        .text("attributes", rec(|c| Some(c.attributes.to_string())))
        .time("first_seen", rows.values().map(|c| c.map(|c| c.first_seen)))
        .time("updated_at", rows.values().map(|c| c.map(|c| c.updated_at)))
        .text("stage", rows.keys().map(|id| h(id).and_then(|h| h.stage.clone())))
        .text("band", rows.keys().map(|id| h(id).and_then(|h| h.band.clone())))
        .float("score", rows.keys().map(|id| h(id).and_then(|h| h.score)))
        .float("priority", rows.keys().map(|id| h(id).and_then(|h| h.priority)))
        .int("config_version", rows.keys().map(|id| h(id).map(|h| h.config_version)))
        .time("evaluated_at", rows.keys().map(|id| h(id).map(|h| h.evaluated_at)))
        .done()
}

async fn load_health_history(store: Store, scan: Scan) -> Loaded {
    let customer = scan.filter.eq("customer_id").map(str::to_owned);
    let all = all_pages(&scan, "health_history", |c| {
        let (store, ws, customer) = (store.clone(), scan.ws.clone(), customer.clone());
        async move {
            let rows = store.health_history(&ws, customer.as_deref(), c.as_deref(), 1001).await?;
            let more = rows.len() > 1000;
            let data: Vec<_> = rows.into_iter().take(1000).collect();
            let next_cursor = if more { data.last().map(|h| h.id.clone()) } else { None };
            Ok(sluice_store::Page { data, next_cursor })
        }
    })
    .await?;
    Cols::new()
        .text("id", all.iter().map(|h| Some(h.id.clone())))
        .text("customer_id", all.iter().map(|h| Some(h.customer_id.clone())))
        .time("at", all.iter().map(|h| Some(h.at)))
        .text("stage", all.iter().map(|h| h.stage.clone()))
        .text("band", all.iter().map(|h| h.band.clone()))
        .float("score", all.iter().map(|h| h.score))
        .text("previous_stage", all.iter().map(|h| h.previous.get("stage").and_then(|v| v.as_str()).map(str::to_owned)))
        .text("previous_band", all.iter().map(|h| h.previous.get("band").and_then(|v| v.as_str()).map(str::to_owned)))
        .float("previous_score", all.iter().map(|h| h.previous.get("score").and_then(|v| v.as_f64())))
        .text("cause", all.iter().map(|h| Some(h.cause.clone())))
        .int("config_version", all.iter().map(|h| Some(h.config_version)))
        .done()
}

async fn load_meters(store: Store, scan: Scan) -> Loaded {
    let m = if scan.schema_only { Vec::new() } else { store.list_meters(Some(&scan.ws)).await? };
    scan.check("meters", m.len())?;
    Cols::new()
        .text("key", m.iter().map(|m| Some(m.key.clone())))
        .text("event_type", m.iter().map(|m| Some(m.event_type.clone())))
        .text("aggregation", m.iter().map(|m| Some(m.aggregation.as_str().to_owned())))
        .text("value_property", m.iter().map(|m| m.value_property.clone()))
        .text("group_by", m.iter().map(|m| Some(serde_json::to_string(&m.group_by).unwrap_or_default())))
        .text("filter", m.iter().map(|m| Some(serde_json::Value::Object(m.filter.clone()).to_string())))
        .time("created_at", m.iter().map(|m| Some(m.created_at)))
        .done()
}

async fn load_usage(store: Store, scan: Scan) -> Loaded {
    struct Row {
        meter: String,
        aggregation: sluice_core::Aggregation,
        b: sluice_store::UsageBucket,
        unique: Option<i64>,
    }
    let mut rows = Vec::new();
    let ws = &scan.ws;
    let f = &scan.filter;
    let customer = f.eq("customer_id");
    // Widened by a bucket on each side: the query's own filter decides the
    // edges (the pushed filter is inexact).
    let bucket = chrono::Duration::minutes(15);
    let (from, to) = (f.from.map(|t| t - bucket), f.until.map(|t| t + bucket));
    let meters = if scan.schema_only { Vec::new() } else { store.list_meters(Some(ws)).await? };
    for m in meters {
        if f.eq("meter").is_some_and(|k| k != m.key) {
            continue;
        }
        let mut uniques: HashMap<(String, String, String, i64), i64> = HashMap::new();
        if m.aggregation == sluice_core::Aggregation::UniqueCount {
            for (c, s, g, at, _) in store.usage_unique_values(ws, &m.key, customer, None, from, to).await? {
                *uniques.entry((c, s, g, at.timestamp_micros())).or_default() += 1;
            }
        }
        let buckets = store.usage_buckets(ws, &m.key, customer, None, from, to).await?;
        scan.check("usage", rows.len() + buckets.len())?;
        for b in buckets {
            let unique =
                uniques.get(&(b.customer_id.clone(), b.subscription_id.clone(), b.group_key.clone(), b.bucket_start.timestamp_micros())).copied();
            rows.push(Row { meter: m.key.clone(), aggregation: m.aggregation, b, unique });
        }
    }
    let opt = |s: &String| if s.is_empty() { None } else { Some(s.clone()) };
    // Every decimal exactly, or the query fails naming the value.
    let exact = |pick: &dyn Fn(&Row) -> Option<Decimal>, what: &str| -> Result<Vec<Option<i128>>, SqlError> {
        rows.iter()
            .map(|r| match pick(r) {
                None => Ok(None),
                Some(d) => usage_decimal(d).map(Some).ok_or_else(|| {
                    SqlError::OutOfRange(format!(
                        "meter `{}`, customer `{}`: the {what} {d} cannot be held exactly in the SQL usage table (Decimal128(38, 12): at most 26 digits before the point and 12 after); read it with GET /v1/meters/{}/usage",
                        r.meter, r.b.customer_id, r.meter
                    ))
                }),
            })
            .collect()
    };
    let value = exact(
        &|r: &Row| {
            use sluice_core::Aggregation as A;
            match r.aggregation {
                A::Sum => Some(r.b.sum),
                A::Count => Some(Decimal::from(r.b.count)),
                A::Max => r.b.max,
                A::Min => r.b.min,
                A::Latest => r.b.latest_value,
                A::UniqueCount => Some(Decimal::from(r.unique.unwrap_or(0))),
            }
        },
        "value",
    )?;
    let sum = exact(&|r: &Row| Some(r.b.sum), "sum")?;
    let min = exact(&|r: &Row| r.b.min, "min")?;
    let max = exact(&|r: &Row| r.b.max, "max")?;
    let latest = exact(&|r: &Row| r.b.latest_value, "latest value")?;
    Cols::new()
        .text("meter", rows.iter().map(|r| Some(r.meter.clone())))
        .text("customer_id", rows.iter().map(|r| opt(&r.b.customer_id)))
        .text("subscription_id", rows.iter().map(|r| opt(&r.b.subscription_id)))
        .text("group", rows.iter().map(|r| opt(&r.b.group_key)))
        .time("period_start", rows.iter().map(|r| Some(r.b.bucket_start)))
        .time("period_end", rows.iter().map(|r| Some(r.b.bucket_start + chrono::Duration::minutes(15))))
        .decimal("value", value)?
        .int("count", rows.iter().map(|r| Some(r.b.count)))
        .decimal("sum", sum)?
        .decimal("min", min)?
        .decimal("max", max)?
        .decimal("latest", latest)?
        .done()
}

async fn load_jobs(store: Store, scan: Scan, imports_only: bool) -> Loaded {
    let kind = if imports_only { Some("import.usage") } else { None };
    let table = if imports_only { "imports" } else { "jobs" };
    let all = all_pages(&scan, table, |c| {
        let (store, ws) = (store.clone(), scan.ws.clone());
        async move { store.list_jobs(&ws, kind, None, c.as_deref(), 1000).await }
    })
    .await?;
    let num = |j: &sluice_store::Job, k: &str| j.result.as_ref().and_then(|r| r.get(k)).and_then(|v| v.as_i64());
    let c = Cols::new().text("id", all.iter().map(|j| Some(j.id.clone())));
    let c = if imports_only {
        c.text("status", all.iter().map(|j| Some(j.state.as_str().to_owned())))
            .text("mode", all.iter().map(|j| j.payload["mode"].as_str().map(str::to_owned)))
            .text("filename", all.iter().map(|j| j.payload["filename"].as_str().map(str::to_owned)))
            .int("bytes", all.iter().map(|j| j.payload["bytes"].as_i64()))
            .int("rows_total", all.iter().map(|j| num(j, "rows_total").or(j.progress_total)))
            .int("rows_processed", all.iter().map(|j| num(j, "rows_processed").or(Some(j.progress_done))))
            .int("rows_imported", all.iter().map(|j| num(j, "rows_imported")))
            .int("rows_duplicate", all.iter().map(|j| num(j, "rows_duplicate")))
            .int("rows_rejected", all.iter().map(|j| num(j, "rows_rejected")))
            .int("errors_total", all.iter().map(|j| num(j, "errors_total")))
    } else {
        c.text("kind", all.iter().map(|j| Some(j.kind.clone())))
            .text("state", all.iter().map(|j| Some(j.state.as_str().to_owned())))
            .int("progress_done", all.iter().map(|j| Some(j.progress_done)))
            .int("progress_total", all.iter().map(|j| j.progress_total))
            .int("attempts", all.iter().map(|j| Some(j.attempts as i64)))
            .text("result", all.iter().map(|j| j.result.as_ref().map(|r| r.to_string())))
    };
    c.text("error", all.iter().map(|j| j.error.clone()))
        .time("created_at", all.iter().map(|j| Some(j.created_at)))
        .time("started_at", all.iter().map(|j| j.started_at))
        .time("finished_at", all.iter().map(|j| j.finished_at))
        .done()
}

/// A decimal string of a billing document as a `Decimal128(38, 12)` value
/// (billing amounts have at most 3 decimals; anything that does not fit is
/// an error, never rounded).
fn money_column(name: &str, values: impl Iterator<Item = Option<String>>) -> Result<Vec<Option<i128>>, SqlError> {
    values
        .map(|v| match v {
            None => Ok(None),
            Some(s) => s.parse::<Decimal>().ok().and_then(usage_decimal).map(Some).ok_or_else(|| {
                SqlError::Internal(format!("the invoice amount {s:?} in column {name} is not an exact decimal that fits the SQL table"))
            }),
        })
        .collect()
}

async fn load_invoices(store: Store, scan: Scan) -> Loaded {
    let filter = sluice_store::InvoiceFilter {
        customer_id: scan.filter.eq("customer_id").map(str::to_owned),
        subscription_id: scan.filter.eq("subscription_id").map(str::to_owned),
        ..Default::default()
    };
    let all = all_pages(&scan, "invoices", |c| {
        let (store, ws, filter) = (store.clone(), scan.ws.clone(), filter.clone());
        async move { store.list_invoices(&ws, &filter, c.as_deref(), 1000).await }
    })
    .await?;
    let doc = |i: &sluice_store::InvoiceRow, k: &str| i.doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Cols::new()
        .text("id", all.iter().map(|i| Some(i.id.clone())))
        .text("number", all.iter().map(|i| i.number.clone()))
        .text("status", all.iter().map(|i| Some(i.status.as_str().to_owned())))
        .text("customer_id", all.iter().map(|i| Some(i.customer_id.clone())))
        .text("subscription_id", all.iter().map(|i| Some(i.subscription_id.clone())))
        .text("plan", all.iter().map(|i| doc(i, "plan")))
        .int("plan_version", all.iter().map(|i| i.doc.get("plan_version").and_then(|v| v.as_i64())))
        .text("currency", all.iter().map(|i| doc(i, "currency")))
        .time("period_start", all.iter().map(|i| Some(i.period_start)))
        .time("period_end", all.iter().map(|i| Some(i.period_end)))
        .decimal("subtotal", money_column("subtotal", all.iter().map(|i| doc(i, "subtotal")))?)?
        .decimal("tax", money_column("tax", all.iter().map(|i| doc(i, "tax")))?)?
        .decimal("total", money_column("total", all.iter().map(|i| doc(i, "total")))?)?
        .text("lines", all.iter().map(|i| i.doc.get("lines").map(|l| l.to_string())))
        .text("taxes", all.iter().map(|i| i.doc.get("taxes").map(|l| l.to_string())))
        .text("run_id", all.iter().map(|i| i.run_id.clone()))
        .time("created_at", all.iter().map(|i| Some(i.created_at)))
        .time("finalized_at", all.iter().map(|i| i.finalized_at))
        .time("voided_at", all.iter().map(|i| i.voided_at))
        .time("paid_at", all.iter().map(|i| i.paid_at))
        .done()
}

async fn load_subscriptions(store: Store, scan: Scan) -> Loaded {
    let customer = scan.filter.eq("customer_id").map(str::to_owned);
    let all = all_pages(&scan, "subscriptions", |c| {
        let (store, ws, customer) = (store.clone(), scan.ws.clone(), customer.clone());
        async move { store.list_subscriptions(&ws, customer.as_deref(), None, c.as_deref(), 1000).await }
    })
    .await?;
    let s = |r: &sluice_store::SubscriptionRow, k: &str| r.doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let t = |r: &sluice_store::SubscriptionRow, k: &str| {
        r.doc.get(k).and_then(|v| v.as_str()).and_then(|v| DateTime::parse_from_rfc3339(v).ok()).map(|v| v.with_timezone(&Utc))
    };
    let phase = |r: &sluice_store::SubscriptionRow| r.doc.get("phases").and_then(|p| p.as_array()).and_then(|p| p.last()).cloned();
    let now = Utc::now();
    // The status as the API shows it (sluice_billing::subscription::Status).
    let status = |r: &sluice_store::SubscriptionRow| {
        if r.end_at.is_some_and(|e| e <= now) {
            "ended"
        } else if r.doc.get("cancelled_at").is_some_and(|v| !v.is_null()) {
            "cancelled"
        } else if t(r, "trial_end").is_some_and(|e| now < e) {
            "trialing"
        } else {
            "active"
        }
    };
    Cols::new()
        .text("id", all.iter().map(|r| Some(r.id.clone())))
        .text("customer_id", all.iter().map(|r| Some(r.customer_id.clone())))
        .text("plan", all.iter().map(|r| Some(r.plan_code.clone())))
        .int("plan_version", all.iter().map(|r| phase(r).and_then(|p| p.get("plan_version").and_then(|v| v.as_i64()))))
        .text("status", all.iter().map(|r| Some(status(r).to_owned())))
        .text("billing_anchor", all.iter().map(|r| s(r, "billing_anchor")))
        .text("interval", all.iter().map(|r| s(r, "interval")))
        .text("currency", all.iter().map(|r| s(r, "currency")))
        .time("start", all.iter().map(|r| t(r, "start")))
        .time("end", all.iter().map(|r| r.end_at))
        .time("trial_end", all.iter().map(|r| t(r, "trial_end")))
        .time("billed_until", all.iter().map(|r| Some(r.billed_until)))
        .time("created_at", all.iter().map(|r| Some(r.created_at)))
        .done()
}

async fn load_audit(store: Store, scan: Scan) -> Loaded {
    let all = all_pages(&scan, "audit_log", |c| {
        let (store, ws) = (store.clone(), scan.ws.clone());
        async move { store.list_audit(&ws, c.as_deref(), 1000).await }
    })
    .await?;
    Cols::new()
        .text("id", all.iter().map(|a| Some(a.id.clone())))
        .time("at", all.iter().map(|a| Some(a.at)))
        .text("actor_key_id", all.iter().map(|a| a.actor_key_id.clone()))
        .text("action", all.iter().map(|a| Some(a.action.clone())))
        .text("target_type", all.iter().map(|a| Some(a.target_type.clone())))
        .text("target_id", all.iter().map(|a| Some(a.target_id.clone())))
        .text("details", all.iter().map(|a| Some(a.details.to_string())))
        .done()
}

// ---------------------------------------------------------------------------
// Result formats.

/// Output formats of `POST /v1/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"columns": [...], "data": [{...}], "next_cursor": null, "row_count", "elapsed_ms"}`.
    Json,
    /// CSV with a header row.
    Csv,
    /// Arrow IPC stream.
    Arrow,
    /// A Parquet file.
    Parquet,
}

impl Format {
    /// Parses `json`, `csv`, `arrow`, `parquet`.
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "json" => Format::Json,
            "csv" => Format::Csv,
            "arrow" => Format::Arrow,
            "parquet" => Format::Parquet,
            _ => return None,
        })
    }

    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// The rows as a JSON array of objects (nulls kept).
pub fn rows_json(r: &QueryResult) -> Result<Vec<u8>, SqlError> {
    use arrow::json::writer::{JsonArray, WriterBuilder};
    let mut w = WriterBuilder::new().with_explicit_nulls(true).build::<_, JsonArray>(Vec::new());
    for b in &r.batches {
        w.write(b).map_err(|e| SqlError::Internal(e.to_string()))?;
    }
    w.finish().map_err(|e| SqlError::Internal(e.to_string()))?;
    let mut out = w.into_inner();
    if out.is_empty() {
        out = b"[]".to_vec();
    }
    Ok(out)
}

/// Encodes a result.
pub fn encode(r: &QueryResult, format: Format) -> Result<Vec<u8>, SqlError> {
    let err = |e: &dyn std::fmt::Display| SqlError::Internal(e.to_string());
    match format {
        Format::Json => {
            let cols: Vec<serde_json::Value> =
                r.schema.fields().iter().map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()})).collect();
            let mut out = Vec::with_capacity(64);
            out.extend_from_slice(b"{\"columns\":");
            out.extend_from_slice(serde_json::to_string(&cols).map_err(|e| err(&e))?.as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(&rows_json(r)?);
            out.extend_from_slice(format!(",\"next_cursor\":null,\"row_count\":{},\"elapsed_ms\":{}}}", r.rows, r.elapsed.as_millis()).as_bytes());
            Ok(out)
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(Vec::new());
            if r.batches.is_empty() {
                w.write(&RecordBatch::new_empty(r.schema.clone())).map_err(|e| err(&e))?;
            }
            for b in &r.batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            Ok(w.into_inner())
        }
        Format::Arrow => {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &r.schema).map_err(|e| err(&e))?;
            for b in &r.batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            w.finish().map_err(|e| err(&e))?;
            w.into_inner().map_err(|e| err(&e))
        }
        Format::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), r.schema.clone(), None).map_err(|e| err(&e))?;
            for b in &r.batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            w.into_inner().map_err(|e| err(&e))
        }
    }
}

// ---------------------------------------------------------------------------
// JSON functions over the `properties` and `context` text columns.

/// Registers `json_get_str(json, path)`, `json_get_int`, `json_get_float`
/// and `json_get_bool`: the value at a dot path (`'plan.name'`; array
/// indexes as numbers, `'items.0'`) of a JSON text, or NULL when absent or
/// of another type. `json_get_str` returns strings as they are and other
/// values as JSON text.
pub fn register_json_functions(ctx: &SessionContext) {
    use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
    fn at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
        path.split('.').filter(|p| !p.is_empty()).try_fold(v, |v, k| match v {
            serde_json::Value::Object(m) => m.get(k),
            serde_json::Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }
    fn apply<T>(
        args: &[ColumnarValue],
        out: impl Fn(Vec<Option<T>>) -> ArrayRef,
        f: impl Fn(&serde_json::Value) -> Option<T>,
    ) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let cast = |a: &ArrayRef| arrow::compute::cast(a, &DataType::Utf8);
        let (json, path) = (cast(&arrays[0])?, cast(&arrays[1])?);
        let (json, path) = (json.as_any().downcast_ref::<StringArray>(), path.as_any().downcast_ref::<StringArray>());
        let (Some(json), Some(path)) = (json, path) else { return Err(DataFusionError::Execution("json_get_*: arguments must be text".into())) };
        use arrow::array::Array;
        let mut values = Vec::with_capacity(json.len());
        for i in 0..json.len() {
            if json.is_null(i) || path.is_null(i) {
                values.push(None);
                continue;
            }
            let v: Option<serde_json::Value> = serde_json::from_str(json.value(i)).ok();
            values.push(v.as_ref().and_then(|v| at(v, path.value(i))).and_then(&f));
        }
        Ok(ColumnarValue::Array(out(values)))
    }
    let text = vec![DataType::Utf8, DataType::Utf8];
    ctx.register_udf(create_udf(
        "json_get_str",
        text.clone(),
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|a| apply(a, |v| Arc::new(StringArray::from(v)), |v| Some(v.as_str().map_or_else(|| v.to_string(), str::to_owned)))),
    ));
    ctx.register_udf(create_udf(
        "json_get_int",
        text.clone(),
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(|a| apply(a, |v| Arc::new(arrow::array::Int64Array::from(v)), |v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))),
    ));
    ctx.register_udf(create_udf(
        "json_get_float",
        text.clone(),
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(|a| apply(a, |v| Arc::new(arrow::array::Float64Array::from(v)), |v| v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))),
    ));
    ctx.register_udf(create_udf(
        "json_get_bool",
        text,
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(|a| apply(a, |v| Arc::new(arrow::array::BooleanArray::from(v)), serde_json::Value::as_bool)),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn exact(s: &str) -> Option<String> {
        usage_decimal(Decimal::from_str(s).ok()?).map(|v| {
            let a = arrow::array::Decimal128Array::from(vec![v]).with_precision_and_scale(38, USAGE_SCALE as i8).ok();
            a.map(|a| a.value_as_string(0)).unwrap_or_default()
        })
    }

    #[test]
    fn usage_decimals_are_exact_from_1e17_up() {
        assert_eq!(exact("123456789012345678.5").as_deref(), Some("123456789012345678.500000000000"));
        assert_eq!(exact("100000000000000000").as_deref(), Some("100000000000000000.000000000000"));
        // rust_decimal holds 28 digits: the widest values fit with 12 decimals.
        assert_eq!(exact("-9999999999999999.999999999999").as_deref(), Some("-9999999999999999.999999999999"));
        assert_eq!(exact("79228162514264337593543950335").as_deref(), None);
        assert_eq!(exact("99999999999999999999999999").as_deref(), Some("99999999999999999999999999.000000000000"));
        assert_eq!(exact("0.000000000001").as_deref(), Some("0.000000000001"));
        // Zeros beyond the 12th decimal are not a loss.
        assert_eq!(exact("1.50000000000000000").as_deref(), Some("1.500000000000"));
        assert_eq!(exact("0").as_deref(), Some("0.000000000000"));
    }

    #[test]
    fn usage_decimals_that_do_not_fit_are_refused_not_rounded() {
        // 27 integer digits.
        assert_eq!(exact("100000000000000000000000000"), None);
        assert_eq!(exact("50000000000000000000000000000"), None);
        assert_eq!(usage_decimal(Decimal::MAX), None);
        assert_eq!(usage_decimal(Decimal::MIN), None);
        // A 13th decimal.
        assert_eq!(exact("0.0000000000001"), None);
        assert_eq!(exact("1.1234567890123"), None);
    }

    #[test]
    fn tables_are_resolved_by_name_not_by_substring() {
        let t = |q: &str| referenced_tables(q, Access::Admin).unwrap_or_default();
        assert_eq!(t("SELECT 'usage' AS events_text"), Vec::<String>::new());
        assert_eq!(t("SELECT * FROM usage u JOIN meters m ON u.meter = m.key"), vec!["meters", "usage"]);
        assert_eq!(t("WITH events AS (SELECT 1 AS x) SELECT * FROM events"), Vec::<String>::new());
        assert_eq!(t("SELECT count(*) FROM (SELECT id FROM events) e"), vec!["events"]);
    }

    #[test]
    fn a_read_key_cannot_name_audit_log() {
        assert!(matches!(referenced_tables("SELECT * FROM audit_log", Access::Read), Err(SqlError::Forbidden(_))));
        assert!(matches!(referenced_tables("SELECT (SELECT count(*) FROM audit_log) AS n", Access::Read), Err(SqlError::Forbidden(_))));
        assert!(referenced_tables("SELECT * FROM audit_log", Access::Admin).is_ok());
        assert!(referenced_tables("SELECT 'audit_log' AS t", Access::Read).is_ok());
    }

    #[test]
    fn errors_do_not_show_the_lake_root() {
        let e = SqlError::Internal("Parquet error: /srv/sluice/lake/workspace=a/x.parquet: bad; object srv/sluice/lake/workspace=a/y.parquet".into());
        let m = e.scrub(std::path::Path::new("/srv/sluice/lake")).to_string();
        assert!(!m.contains("/srv") && !m.contains("srv/sluice"), "{m}");
        assert!(m.contains("workspace=a/x.parquet"), "{m}");
    }
}
