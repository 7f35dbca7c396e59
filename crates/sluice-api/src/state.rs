//! Shared state of all handlers.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sluice_consumers::{RetryPolicy, Runtime};
use sluice_core::EventLog;
use sluice_ingest::Ingestor;
use sluice_store::Store;
use tokio::sync::Semaphore;

use crate::auth::KeyCache;

/// Request size limits of the HTTP API, and per-workspace limits on
/// configuration objects (one tenant must not slow the others down).
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest request body, compressed or decompressed. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest single event. Default 1 MiB.
    pub max_event_bytes: usize,
    /// Most events per request. Default 10,000.
    pub max_events: usize,
    /// Request bodies buffered at once over all requests; beyond it ingest
    /// answers 503. Default 512 MiB.
    pub max_buffered_body_bytes: usize,
    /// Segment-compatible endpoints: largest message. Default 32 KiB.
    pub segment_max_message_bytes: usize,
    /// Segment-compatible endpoints: largest request. Default 500 KiB.
    pub segment_max_batch_bytes: usize,
    /// Most configuration objects per workspace (`[limits]`).
    pub workspace: WorkspaceLimits,
}

impl ApiLimits {
    /// The HTTP edge's limits from the `[ingest]` and `[limits]` sections.
    pub fn new(ingest: &sluice_ingest::IngestSettings, workspace: WorkspaceLimits) -> ApiLimits {
        ApiLimits {
            max_body_bytes: ingest.max_body_bytes,
            max_event_bytes: ingest.max_event_bytes,
            max_events: ingest.max_events,
            max_buffered_body_bytes: ingest.max_buffered_body_bytes,
            segment_max_message_bytes: ingest.segment_max_message_bytes,
            segment_max_batch_bytes: ingest.segment_max_batch_bytes,
            workspace,
        }
    }
}

/// The `[dashboard]` section of the server's configuration (the binary's
/// `defaults.toml` documents it; a test checks it agrees with [`Default`]).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSettings {
    /// How long a dashboard session lasts (at least 1 s). Default 12 h.
    #[serde(with = "sluice_core::duration")]
    pub session_ttl: std::time::Duration,
    /// How often the overview samples each workspace (at least 100 ms). Default 10 s.
    #[serde(with = "sluice_core::duration")]
    pub overview_interval: std::time::Duration,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings { session_ttl: DEFAULT_SESSION_TTL, overview_interval: std::time::Duration::from_secs(10) }
    }
}

/// The `[metrics]` section of the server's configuration.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// `GET /metrics` asks for a key (any scope). Default false.
    pub require_key: bool,
}

/// Most configuration objects per workspace: the `[limits]` section of the
/// configuration (defaults in the binary's `defaults.toml`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceLimits {
    /// Most webhooks (`limits.webhooks`). Default 50: every webhook is one
    /// more consumer reading every event of the log.
    pub webhooks: usize,
    /// Most event schemas (`limits.schemas`). Default 200.
    pub schemas: usize,
    /// Most meters (`limits.meters`). Default 500.
    pub meters: usize,
    /// Most saved queries (`limits.saved_queries`). Default 200.
    pub saved_queries: usize,
}

impl Default for WorkspaceLimits {
    fn default() -> Self {
        WorkspaceLimits { webhooks: 50, schemas: 200, meters: 500, saved_queries: 200 }
    }
}

impl ApiLimits {
    /// Fails with 409 `limit_exceeded` when a workspace that has `existing`
    /// objects of a kind may not get one more; the message names the
    /// configuration key that raises the limit. Two concurrent creations
    /// may both pass: the limit guards against runaway numbers, not by one.
    pub fn check(existing: usize, limit: usize, what: &str, config_key: &str) -> Result<(), crate::ApiError> {
        if existing < limit {
            return Ok(());
        }
        Err(crate::ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "limit_exceeded",
            format!(
                "this workspace already has {existing} {what}, the most allowed ({config_key} = {limit}); delete one first or raise {config_key}"
            ),
        ))
    }
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 16 << 20,
            max_event_bytes: 1 << 20,
            max_events: 10_000,
            max_buffered_body_bytes: 512 << 20,
            segment_max_message_bytes: 32 * 1024,
            segment_max_batch_bytes: 500 * 1024,
            workspace: WorkspaceLimits::default(),
        }
    }
}

/// How webhooks are delivered.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSettings {
    /// Allow targets on loopback, private and link-local addresses.
    pub allow_private: bool,
    /// Per-attempt timeout.
    pub timeout: std::time::Duration,
    /// Retries before the dead-letter queue.
    pub retry: RetryPolicy,
}

/// Everything a handler may need.
#[derive(Clone)]
pub struct AppState {
    /// The state store.
    pub store: Store,
    /// The event log.
    pub log: Arc<dyn EventLog>,
    /// The ingest writer.
    pub ingestor: Ingestor,
    /// Verified-key cache.
    pub keys: Arc<KeyCache>,
    /// Size limits.
    pub limits: ApiLimits,
    /// Renders `/metrics`; `None` when no recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
    /// `/metrics` needs a read, admin or root key (`metrics.require_key`).
    pub metrics_require_key: bool,
    /// Serve `POST /v1/bench/discard` (only when the server was started for
    /// a benchmark: `SLUICE_BENCH_ENDPOINTS=1`, as `sluice bench ingest`
    /// does for the server it starts).
    pub bench_endpoints: bool,
    /// Bytes of request bodies that may be buffered at once.
    pub body_budget: Arc<Semaphore>,
    /// False while starting or draining: `/readyz` answers 503.
    pub ready: Arc<AtomicBool>,
    /// The consumer runtime.
    pub consumers: Arc<Runtime>,
    /// Webhook delivery settings.
    pub webhooks: WebhookSettings,
    /// The job runner (woken after an enqueue).
    pub jobs: Arc<sluice_jobs::Runner>,
    /// Meters, shared with the meters consumer.
    pub meters: sluice_metering::MeterCache,
    /// Where uploads wait for their import job (`<data-dir>/imports`).
    pub imports_dir: std::path::PathBuf,
    /// The lake and SQL (set by `serve` once the lake is open).
    pub lake: Option<LakeHandle>,
    /// How long a dashboard session lasts after sign-in
    /// (`dashboard.session_ttl`). Default [`DEFAULT_SESSION_TTL`].
    pub session_ttl: std::time::Duration,
    /// Billing (plans, subscriptions, invoices, runs).
    pub billing: sluice_billing::Billing,
    /// Customer health (configuration, evaluation, overrides).
    pub health: sluice_health::Health,
    /// The overview's samples (`GET /v1/overview`).
    pub overview: Arc<crate::overview::Overview>,
}

/// Default lifetime of a dashboard session: 12 hours.
pub const DEFAULT_SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// The lake as the API sees it.
#[derive(Clone)]
pub struct LakeHandle {
    /// Runs SQL.
    pub sql: sluice_lake::sql::SqlEngine,
    /// Declared schemas, shared with ingest and the lake writer.
    pub schemas: sluice_ingest::Schemas,
    /// Lake root.
    pub root: std::path::PathBuf,
}

impl AppState {
    /// Builds the state; the server is not ready until [`AppState::ready`] is set.
    // One argument per component keeps the wiring in `serve.rs` explicit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        log: Arc<dyn EventLog>,
        ingestor: Ingestor,
        limits: ApiLimits,
        metrics: Option<PrometheusHandle>,
        consumers: Arc<Runtime>,
        webhooks: WebhookSettings,
        jobs: Arc<sluice_jobs::Runner>,
        meters: sluice_metering::MeterCache,
        imports_dir: std::path::PathBuf,
    ) -> Self {
        let store_for_billing = store.clone();
        let health = sluice_health::Health::new(store.clone());
        AppState {
            store,
            log,
            ingestor,
            keys: Arc::new(KeyCache::default()),
            body_budget: Arc::new(Semaphore::new(limits.max_buffered_body_bytes)),
            limits,
            metrics,
            metrics_require_key: false,
            bench_endpoints: false,
            ready: Arc::new(AtomicBool::new(false)),
            consumers,
            webhooks,
            jobs,
            meters,
            imports_dir,
            lake: None,
            session_ttl: DEFAULT_SESSION_TTL,
            billing: sluice_billing::Billing { store: store_for_billing, events: None },
            health,
            overview: Arc::new(crate::overview::Overview::default()),
        }
    }
}
