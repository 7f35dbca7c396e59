//! `sluice serve`: build every component from the configuration and run
//! until SIGTERM/SIGINT, then drain and flush.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_api::{ApiLimits, AppState, WebhookSettings};
use sluice_consumers::{RetryPolicy, Runtime};
use sluice_core::EventLog;
use sluice_ingest::Ingestor;
use sluice_log::index::{IdIndex, IdIndexConfig};
use sluice_log::EmbeddedLog;
use sluice_store::{NewApiKey, Store};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, Overrides};
use crate::ServeArgs;

pub fn load_config(args: &ServeArgs) -> Result<Config> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let flags = Overrides { listen: args.listen.clone(), data_dir: args.data_dir.clone(), state_url: args.state_url.clone() };
    Config::load(args.config.as_deref(), &env, &flags)
}

pub fn main(args: ServeArgs) -> Result<()> {
    let cfg = load_config(&args)?;
    init_tracing(&cfg.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("sluice").build()?;
    rt.block_on(run(cfg))
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn run(cfg: Config) -> Result<()> {
    // Before anything is created: what Sluice writes is for its own user only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    secure_data_dir(&cfg.data_dir).with_context(|| format!("restricting access to the data directory {}", cfg.data_dir.display()))?;
    raise_fd_limit(cfg.http.max_connections);
    // One process per data directory: the embedded log has a single writer.
    // The OS releases the lock when the process dies, even on kill -9.
    let lock_path = cfg.data_dir.join("sluice.lock");
    let _lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    _lock.try_lock().map_err(|_| anyhow::anyhow!("another sluice process is using the data directory {}", cfg.data_dir.display()))?;
    let metrics = sluice_api::install_metrics();

    tracing::info!(state = %cfg.state_url, "opening state store");
    let store = Store::connect(cfg.state_url.expose()).await.with_context(|| format!("connecting to the state store {}", cfg.state_url))?;

    let log_dir = cfg.log_dir()?;
    let log_cfg = cfg.log.log_config(log_dir.clone());
    tracing::info!(dir = %log_dir.display(), partitions = cfg.log.partitions, "opening event log");
    let log = tokio::task::spawn_blocking(move || EmbeddedLog::open(log_cfg))
        .await?
        .with_context(|| format!("opening the event log in {}", log_dir.display()))?;
    let log: Arc<dyn EventLog> = Arc::new(log);

    bootstrap(&store).await?;

    let schemas = sluice_ingest::Schemas::load(&store).await.context("loading event schemas")?;
    // The id index lives beside the log it indexes; a damaged one is
    // started over (it is rebuilt from the log).
    let index_dir = cfg.log_dir()?.join("id-index");
    let index = {
        let dir = index_dir.clone();
        tokio::task::spawn_blocking(move || match IdIndex::open(&dir, IdIndexConfig::default()) {
            Ok(i) => Ok(i),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "the id index cannot be read; rebuilding it from the log");
                IdIndex::reset(&dir)?;
                IdIndex::open(&dir, IdIndexConfig::default())
            }
        })
        .await?
        .with_context(|| format!("opening the id index in {}", index_dir.display()))?
    };
    let (ingestor, writer) = Ingestor::start(log.clone(), store.clone(), Arc::new(index), cfg.ingest.ingestor_config(), schemas.clone()).await?;

    let retention = tokio::spawn(run_retention(log.clone(), cfg.log.retention_interval));

    let retry = RetryPolicy { attempts: cfg.retry_attempts, base: Duration::from_millis(cfg.retry_base_ms), ..RetryPolicy::default() };
    let consumers = Runtime::new(log.clone(), store.clone(), retry, cfg.consumer_batch);
    consumers.start(Arc::new(sluice_consumers::counts::EventCounts));
    let webhooks = WebhookSettings { allow_private: cfg.webhook_allow_private, timeout: cfg.webhook_timeout, retry };

    let limits = ApiLimits::new(&cfg.ingest, cfg.limits);
    let meters = sluice_metering::MeterCache::load(&store).await.context("loading meters")?;
    consumers.start(Arc::new(sluice_metering::MetersConsumer { cache: meters.clone() }));
    // The lake: remove what a crash left, start the writer, and the SQL engine.
    let lake_root = sluice_lake::layout::root_from_url(&cfg.lake.url, &cfg.data_dir).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&lake_root).with_context(|| format!("creating the lake at {}", lake_root.display()))?;
    let removed = sluice_lake::writer::recover(&store, &lake_root).await.map_err(anyhow::Error::msg).context("recovering the lake")?;
    if removed > 0 {
        tracing::warn!(
            files = removed,
            "removed lake files that were written but not committed before an unclean stop; their events are written again"
        );
    }
    let swept = sluice_lake::export::sweep_temp_files(&lake_root);
    if swept > 0 {
        tracing::info!(files = swept, "removed temporary export files left by an earlier run");
    }
    let file_guard = sluice_lake::sql::FileGuard::default();
    let (lake_stop, lake_stop_rx) = tokio::sync::watch::channel(false);
    let lake_writer = tokio::spawn(
        sluice_lake::writer::LakeWriter {
            log: log.clone(),
            store: store.clone(),
            schemas: schemas.clone(),
            cfg: cfg.lake.writer_config(lake_root.clone()),
            bursts: consumers.bursts().clone(),
        }
        .run(lake_stop_rx),
    );
    let sql = sluice_lake::sql::SqlEngine::new(store.clone(), log.clone(), schemas.clone(), lake_root.clone(), file_guard.clone(), cfg.sql)
        // Each query in a `sluice sql-worker` child with a memory limit.
        .with_isolation(sluice_lake::sandbox::Isolation::Process {
            program: std::env::current_exe().context("locating the sluice binary for SQL workers")?,
        });
    // Billing writes invoice.finalized, invoice.voided and
    // billing_run.finished through the ingest pipeline (deduplicated by id).
    let billing = sluice_billing::Billing { store: store.clone(), events: Some(Arc::new(sluice_billing::IngestSink(ingestor.clone()))) };
    // Health: its read model on the consumer engine, and the evaluator
    // that re-evaluates the customers it marks (and those time changes).
    // Only workspaces with a health configuration are kept (model.rs).
    let enabled = sluice_health::model::Enabled::default();
    for ws in store.health_workspaces().await.context("loading the health workspaces")? {
        enabled.insert(&ws);
    }
    let health = sluice_health::Health {
        events: Some(Arc::new(sluice_billing::IngestSink(ingestor.clone()))),
        default_cooldown: cfg.health.transition_cooldown,
        enabled: enabled.clone(),
        ..sluice_health::Health::new(store.clone())
    };
    consumers.start_model(sluice_health::model::HealthModel { wake: health.wake.clone(), enabled }).await.context("starting the health consumer")?;
    let jobs = Arc::new(sluice_jobs::Runner::start(
        store.clone(),
        vec![
            Arc::new(sluice_billing::run::BillingRun { billing: billing.clone() }),
            Arc::new(sluice_health::jobs::Recompute { health: health.clone(), log: Some(log.clone()) }),
            Arc::new(sluice_health::jobs::Backtest { health: health.clone(), log: Some(log.clone()) }),
            Arc::new(sluice_consumers::rebuild::ConsumerRebuild),
            Arc::new(sluice_consumers::dlq_bulk::DlqBulk),
            Arc::new(sluice_metering::backfill::MeterBackfill { log: log.clone() }),
            Arc::new(sluice_metering::import::UsageImport { ingestor: ingestor.clone(), bursts: consumers.bursts().clone() }),
            Arc::new(sluice_lake::compact::Compaction { cfg: cfg.lake.compact_config(lake_root.clone()), guard: file_guard.clone() }),
            Arc::new(sluice_lake::export::QueryExport { sql: sql.clone(), root: lake_root.clone() }),
        ],
        sluice_jobs::RunnerConfig { lease: cfg.job_lease.max(Duration::from_millis(300)), ..Default::default() },
    ));
    let swept = sluice_metering::import::sweep_uploads(&cfg.data_dir.join("imports"), sluice_metering::import::KEEP_FAILED_UPLOADS);
    if swept > 0 {
        tracing::info!(files = swept, "removed import uploads older than 7 days");
    }
    let mut state = AppState::new(
        store.clone(),
        log.clone(),
        ingestor,
        limits,
        metrics,
        consumers.clone(),
        webhooks,
        jobs.clone(),
        meters,
        cfg.data_dir.join("imports"),
    );
    state.metrics_require_key = cfg.metrics.require_key;
    // "0s" would make every sign-in expire at once: a session lasts at least a second.
    state.session_ttl = cfg.dashboard.session_ttl.max(Duration::from_secs(1));
    // Not a configuration key: only `sluice bench` starts servers with it.
    state.bench_endpoints = std::env::var("SLUICE_BENCH_ENDPOINTS").is_ok_and(|v| v == "1");
    state.lake = Some(sluice_api::state::LakeHandle { sql, schemas: schemas.clone(), root: lake_root.clone() });
    state.billing = billing.clone();
    state.health = health.clone();
    let (health_stop, health_stop_rx) = tokio::sync::watch::channel(false);
    let evaluator = tokio::spawn(sluice_health::engine::evaluator(health, health_stop_rx));
    let schedulers = tokio::spawn(run_schedulers(store.clone(), jobs.clone(), cfg.lake.compact_interval));
    let (billing_stop, billing_stop_rx) = tokio::sync::watch::channel(false);
    let auto_billing = {
        let jobs = jobs.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || jobs.wake());
        tokio::spawn(sluice_billing::run::auto_billing(billing, wake, cfg.billing.auto_interval.max(Duration::from_millis(100)), billing_stop_rx))
    };
    for hook in store.list_webhooks(None).await.context("loading webhooks")? {
        sluice_api::routes::webhooks::start_webhook(&state, hook);
    }
    state.overview.set_interval(cfg.dashboard.overview_interval.max(Duration::from_millis(100)));
    let overview = tokio::spawn(sluice_api::overview::sample(state.clone()));
    let ready = state.ready.clone();
    let app = sluice_api::router(state);

    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let stop_signal = shutdown_signal();
    ready.store(true, Ordering::Release);
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "sluice is ready");
    // A plain line for scripts and tests that start the server on port 0.
    eprintln!("sluice listening on http://{addr}");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ready_on_stop = ready.clone();
    let server = tokio::spawn(sluice_api::server::serve(listener, app, cfg.http, async move {
        let _ = stop_rx.await;
        ready_on_stop.store(false, Ordering::Release);
    }));
    let signal = stop_signal.await;
    // Plain, like the listening line: whoever started the server sees why
    // it stopped accepting, whatever RUST_LOG filters.
    eprintln!("sluice received {signal}: draining in-flight requests, then stopping");
    tracing::info!(signal, "shutting down: draining in-flight requests");
    let _ = stop_tx.send(());
    let abort = server.abort_handle();
    let mut clean = true;
    match tokio::time::timeout(cfg.shutdown_timeout, server).await {
        Ok(r) => r?.context("HTTP server failed")?,
        Err(_) => {
            tracing::warn!(timeout = ?cfg.shutdown_timeout, "in-flight requests did not finish in time; no longer waiting for them");
            abort.abort();
            clean = false;
        }
    }
    retention.abort();
    overview.abort();
    schedulers.abort();
    let _ = billing_stop.send(true);
    auto_billing.abort();
    let _ = health_stop.send(true);
    evaluator.abort();
    // The lake writer commits what it buffered, so a clean stop leaves
    // nothing for the next start to rewrite.
    let _ = lake_stop.send(true);
    if tokio::time::timeout(Duration::from_secs(30), lake_writer).await.is_err() {
        tracing::warn!("lake writer did not finish in time; its buffer is written again on the next start");
    }
    // Consumers stop where they are; what they had not committed is
    // delivered again on the next start.
    // Bounded, like every step here: a stop that hangs would leave a
    // process that no longer accepts connections and never exits.
    if tokio::time::timeout(Duration::from_secs(30), consumers.stop_all()).await.is_err() {
        tracing::warn!("consumers did not stop in 30 s; what they had not committed is delivered again on the next start");
        clean = false;
    }
    if tokio::time::timeout(Duration::from_secs(30), jobs.stop()).await.is_err() {
        tracing::warn!("job runners did not stop in 30 s; their jobs are reclaimed when their lease expires");
        clean = false;
    }
    // The router (and with it every Ingestor handle) is gone: the writer
    // finishes what is queued and stops.
    if tokio::time::timeout(Duration::from_secs(10), writer).await.is_err() {
        tracing::warn!("ingest writer did not finish in time");
        clean = false;
    }
    log.close().await.context("flushing the event log")?;
    store.close().await;
    if clean {
        tracing::info!("stopped cleanly");
    } else {
        // Requests still open were not acknowledged; clients retry them and
        // dedup makes the retry safe.
        tracing::warn!("stopped; some requests were still open and were not acknowledged");
    }
    Ok(())
}

/// Makes the data directory `0700` and everything in it owner-only
/// (directories `0700`, files `0600`): it holds webhook secrets, key hashes
/// and every tenant's events. New files get this from the umask set before;
/// this walk fixes what an older version created. Symbolic links are not
/// followed, and what is already private is left untouched.
///
/// The walk runs only while the directory itself is not `0700` yet, and the
/// directory is tightened last: once it is `0700`, everything below was
/// done, and later starts do not stat every log segment and lake file again.
fn secure_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode_of = |path: &std::path::Path| -> Result<(std::fs::Metadata, u32)> {
        let meta = std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        Ok((meta, mode))
    };
    let set = |path: &std::path::Path, want: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)).with_context(|| format!("chmod {:o} {}", want, path.display()))
    };
    if mode_of(dir)?.1 == 0o700 {
        return Ok(());
    }
    let list = |path: &std::path::Path, stack: &mut Vec<std::path::PathBuf>| -> Result<()> {
        for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            stack.push(entry?.path());
        }
        Ok(())
    };
    let mut stack = Vec::new();
    list(dir, &mut stack)?;
    let mut changed = 0usize;
    while let Some(path) = stack.pop() {
        let (meta, mode) = mode_of(&path)?;
        let want = if meta.is_dir() {
            0o700
        } else if meta.is_file() {
            mode & 0o700
        } else {
            continue;
        };
        if mode != want {
            set(&path, want)?;
            changed += 1;
        }
        if meta.is_dir() {
            list(&path, &mut stack)?;
        }
    }
    set(dir, 0o700)?;
    if changed > 0 {
        tracing::info!(dir = %dir.display(), paths = changed + 1, "made the data directory readable by its owner only (0700/0600)");
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every HTTP
/// connection holds a descriptor, and so do log segments, lake files and
/// the state store. Warns when even the hard limit leaves little room above
/// `http.max_connections`.
fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let mut soft = lim.current;
    // An unlimited hard limit is not accepted for open files; take 2^20 (the
    // usual fs.nr_open).
    let target = lim.maximum.unwrap_or(1 << 20);
    if lim.current.is_some_and(|c| c < target) {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: lim.maximum }) {
            Ok(()) => {
                tracing::info!(from = ?lim.current, to = target, "raised the open-files limit (RLIMIT_NOFILE) to its hard limit");
                soft = Some(target);
            }
            Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit (RLIMIT_NOFILE)"),
        }
    }
    if let Some(soft) = soft {
        if soft < max_connections as u64 + 256 {
            tracing::warn!(
                open_files = soft,
                max_connections,
                "the open-files limit leaves too little room above http.max_connections; raise `ulimit -n` or lower http.max_connections"
            );
        }
    }
}

/// On an empty store: creates workspace `default` and the root key. The key
/// is `SLUICE_BOOTSTRAP_KEY` if set, otherwise generated and printed once.
async fn bootstrap(store: &Store) -> Result<()> {
    let given = std::env::var("SLUICE_BOOTSTRAP_KEY").ok().filter(|k| !k.is_empty());
    let key = match &given {
        Some(k) => sluice_api::auth::hashed(k.clone()),
        None => sluice_api::auth::generate_key(),
    };
    let root = NewApiKey {
        id: sluice_api::auth::new_key_id(),
        workspace: "default".into(),
        name: "root".into(),
        scope: sluice_core::Scope::Root,
        key_hash: key.hash.clone(),
        prefix: key.prefix.clone(),
        created_by: None,
    };
    if store.bootstrap(&root).await.context("bootstrapping the store")? {
        if given.is_some() {
            tracing::info!(key = %root.id, "created workspace `default` and the root key from SLUICE_BOOTSTRAP_KEY");
        } else {
            eprintln!(
                "\n  Created workspace `default` and a root key. It is shown ONCE; store it now:\n\n    {}\n\n  Use it as `Authorization: Bearer <key>` (or SLUICE_KEY for the CLI).\n",
                key.secret
            );
        }
    } else if given.is_some() && store.find_key_by_hash(&key.hash).await?.is_none() {
        tracing::warn!("SLUICE_BOOTSTRAP_KEY is set but the store was bootstrapped earlier with another key; it is ignored");
    }
    Ok(())
}

/// Queues compaction (every `compact_every`, per workspace with lake files,
/// unless one is already waiting) and due scheduled queries (every 30 s).
async fn run_schedulers(store: Store, jobs: Arc<sluice_jobs::Runner>, compact_every: Duration) {
    let mut last_compaction = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        match sluice_lake::export::queue_due(&store).await {
            Ok(n) if n > 0 => {
                tracing::info!(queries = n, "queued scheduled queries");
                jobs.wake();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not queue scheduled queries"),
        }
        if compact_every.is_zero() || last_compaction.elapsed() < compact_every {
            continue;
        }
        last_compaction = tokio::time::Instant::now();
        if let Err(e) = queue_compactions(&store).await {
            tracing::warn!(error = %e, "could not queue lake compaction");
        }
        jobs.wake();
    }
}

async fn queue_compactions(store: &Store) -> Result<()> {
    let mut workspaces: Vec<String> = store.lake_files(None).await?.into_iter().map(|f| f.workspace).collect();
    workspaces.dedup();
    for ws in workspaces {
        let waiting = store.list_jobs(&ws, Some(sluice_lake::compact::KIND), Some(sluice_core::JobState::Queued), None, 1).await?;
        if waiting.data.is_empty() {
            store
                .enqueue_job(&sluice_store::NewJob {
                    workspace: ws.clone(),
                    kind: sluice_lake::compact::KIND.into(),
                    payload: sluice_jobs::JobPayload::to_value(&sluice_lake::compact::CompactPayload { v: 1, workspace: Some(ws.clone()) }),
                    max_attempts: 3,
                    created_by: None,
                })
                .await?;
        }
    }
    Ok(())
}

async fn run_retention(log: Arc<dyn EventLog>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    loop {
        tick.tick().await;
        match log.enforce_retention().await {
            Ok(r) if r.segments_deleted > 0 => tracing::info!(
                segments = r.segments_deleted,
                bytes = r.bytes_deleted,
                records = r.records_deleted,
                "log retention removed old segments"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "log retention failed"),
        }
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
fn shutdown_signal() -> impl std::future::Future<Output = &'static str> {
    // The handlers are registered here, at once, not when the future is
    // first polled: a SIGTERM that arrives right after the server announced
    // itself must drain it, not kill it (the default action).
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        let (term, int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
        async move {
            tokio::select! { _ = recv(term) => "SIGTERM", _ = recv(int) => "SIGINT" }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
