//! The Sluice HTTP API (v1).
//!
//! [`router`] wires every route; handlers live in [`routes`], one module per
//! API area, and all return `Result<_, ApiError>` so errors have one JSON
//! shape. Authentication is the [`auth::Principal`] extractor: a handler that
//! takes a `Principal` requires a valid key, and checks its scope first thing.

pub mod auth;
pub mod error;
pub mod json;
pub mod overview;
pub mod routes;
pub mod server;
pub mod state;

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

pub use error::ApiError;
pub use server::HttpSettings;
pub use state::{ApiLimits, AppState, DashboardSettings, MetricsSettings, WebhookSettings, WorkspaceLimits};

#[derive(OpenApi)]
#[openapi(
    info(title = "Sluice API", description = "Events, usage and lake: the Sluice HTTP API (v1). \
        Authenticate with `Authorization: Bearer <key>`. Errors are `{\"error\": {\"code\", \"message\", \"details\"}}`."),
    paths(
        routes::events::ingest, routes::events::list, routes::events::get,
        routes::workspaces::create, routes::workspaces::list, routes::workspaces::get, routes::billing::patch_workspace,
        routes::billing::create_plan, routes::billing::list_plans, routes::billing::get_plan,
        routes::billing::create_subscription, routes::billing::list_subscriptions, routes::billing::get_subscription,
        routes::billing::change_plan, routes::billing::cancel_subscription, routes::billing::upcoming_invoice, routes::billing::unattributed_usage,
        routes::billing::list_invoices, routes::billing::get_invoice, routes::billing::finalize_invoice,
        routes::billing::void_invoice, routes::billing::mark_paid,
        routes::billing::create_run, routes::billing::list_runs, routes::billing::get_run, routes::billing::cancel_run,
        routes::keys::create, routes::keys::list, routes::keys::delete,
        routes::sessions::create, routes::sessions::current, routes::sessions::delete,
        routes::audit::list,
        routes::overview::get,
        routes::live::live,
        routes::consumers::list, routes::consumers::reset, routes::consumers::dlq_list, routes::consumers::dlq_get,
        routes::consumers::dlq_replay, routes::consumers::dlq_replay_bulk, routes::consumers::dlq_discard,
        routes::consumers::dlq_bulk,
        routes::consumers::event_counts,
        routes::meters::create, routes::meters::list, routes::meters::get, routes::meters::usage,
        routes::imports::create, routes::imports::list, routes::imports::get,
        routes::jobs::list, routes::jobs::get, routes::jobs::cancel, routes::jobs::retry, routes::jobs::events,
        routes::jobs::cancel_bulk, routes::jobs::retry_bulk,
        routes::webhooks::create, routes::webhooks::list, routes::webhooks::delete, routes::webhooks::deliveries,
        routes::people::list_customers, routes::people::get_customer, routes::people::get_user,
        routes::health::patch_customer, routes::health::get_health, routes::health::get_history,
        routes::health::put_override, routes::health::delete_override, routes::health::get_config, routes::health::put_config,
        routes::health::create_backtest, routes::health::get_backtest,
        routes::segment::track, routes::segment::identify, routes::segment::group, routes::segment::page,
        routes::segment::screen, routes::segment::alias, routes::segment::batch,
        routes::lake::sql, routes::lake::put_schema, routes::lake::list_schemas, routes::lake::get_schema,
        routes::lake::delete_schema, routes::lake::files, routes::lake::compact, routes::lake::ddl,
        routes::lake::create_query, routes::lake::list_queries, routes::lake::get_query, routes::lake::delete_query,
        routes::lake::run_query,
        routes::ops::healthz, routes::ops::readyz, routes::ops::metrics,
    ),
    components(schemas(error::ErrorBody)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("basic", SecurityScheme::Http(Http::new(HttpAuthScheme::Basic)));
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Cookie(utoipa::openapi::security::ApiKeyValue::new(auth::SESSION_COOKIE))),
        );
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    // The benchmark's parse-and-discard endpoint exists only on a server
    // started for a benchmark: in production it would let any ingest key
    // burn CPU for nothing, and it is not part of the API (not in OpenAPI).
    let bench = if state.bench_endpoints { Router::new().route("/v1/bench/discard", post(routes::events::discard)) } else { Router::new() };
    bench
        .route("/v1/events", post(routes::events::ingest).get(routes::events::list))
        .route("/v1/events/{id}", get(routes::events::get))
        .route("/v1/workspaces", post(routes::workspaces::create).get(routes::workspaces::list))
        .route("/v1/workspaces/{name}", get(routes::workspaces::get).patch(routes::billing::patch_workspace))
        .route("/v1/plans", post(routes::billing::create_plan).get(routes::billing::list_plans))
        .route("/v1/plans/{code}", get(routes::billing::get_plan))
        .route("/v1/subscriptions", post(routes::billing::create_subscription).get(routes::billing::list_subscriptions))
        .route("/v1/subscriptions/{id}", get(routes::billing::get_subscription))
        .route("/v1/subscriptions/{id}/change", post(routes::billing::change_plan))
        .route("/v1/subscriptions/{id}/cancel", post(routes::billing::cancel_subscription))
        .route("/v1/subscriptions/{id}/upcoming-invoice", get(routes::billing::upcoming_invoice))
        .route("/v1/invoices", get(routes::billing::list_invoices))
        .route("/v1/invoices/{id}", get(routes::billing::get_invoice))
        .route("/v1/invoices/{id}/finalize", post(routes::billing::finalize_invoice))
        .route("/v1/invoices/{id}/void", post(routes::billing::void_invoice))
        .route("/v1/invoices/{id}/mark-paid", post(routes::billing::mark_paid))
        .route("/v1/billing/unattributed-usage", get(routes::billing::unattributed_usage))
        .route("/v1/billing-runs", post(routes::billing::create_run).get(routes::billing::list_runs))
        .route("/v1/billing-runs/{id}", get(routes::billing::get_run))
        .route("/v1/billing-runs/{id}/cancel", post(routes::billing::cancel_run))
        .route("/v1/keys", post(routes::keys::create).get(routes::keys::list))
        .route("/v1/keys/{id}", delete(routes::keys::delete))
        .route("/v1/sessions", post(routes::sessions::create))
        .route("/v1/sessions/current", get(routes::sessions::current).delete(routes::sessions::delete))
        .route("/v1/audit", get(routes::audit::list))
        .route("/v1/overview", get(routes::overview::get))
        .route("/v1/live", get(routes::live::live))
        .route("/v1/consumers", get(routes::consumers::list))
        .route("/v1/consumers/{name}/reset", post(routes::consumers::reset))
        .route("/v1/dlq", get(routes::consumers::dlq_list))
        .route("/v1/dlq/replay", post(routes::consumers::dlq_replay_bulk))
        .route("/v1/dlq/bulk", post(routes::consumers::dlq_bulk))
        .route("/v1/dlq/{id}", get(routes::consumers::dlq_get))
        .route("/v1/dlq/{id}/replay", post(routes::consumers::dlq_replay))
        .route("/v1/dlq/{id}/discard", post(routes::consumers::dlq_discard))
        .route("/v1/event-counts", get(routes::consumers::event_counts))
        .route("/v1/meters", post(routes::meters::create).get(routes::meters::list))
        .route("/v1/meters/{key}", get(routes::meters::get))
        .route("/v1/meters/{key}/usage", get(routes::meters::usage))
        .route(
            "/v1/imports",
            post(routes::imports::create)
                // Uploads are streamed to disk; the limit is MAX_UPLOAD, also for multipart.
                .layer(axum::extract::DefaultBodyLimit::max(routes::imports::MAX_UPLOAD as usize))
                .get(routes::imports::list),
        )
        .route("/v1/imports/{id}", get(routes::imports::get))
        .route("/v1/jobs", get(routes::jobs::list))
        .route("/v1/jobs/cancel", post(routes::jobs::cancel_bulk))
        .route("/v1/jobs/retry", post(routes::jobs::retry_bulk))
        .route("/v1/jobs/{id}", get(routes::jobs::get))
        .route("/v1/jobs/{id}/cancel", post(routes::jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(routes::jobs::retry))
        .route("/v1/jobs/{id}/events", get(routes::jobs::events))
        .route("/v1/webhooks", post(routes::webhooks::create).get(routes::webhooks::list))
        .route("/v1/webhooks/{id}", delete(routes::webhooks::delete))
        .route("/v1/webhooks/{id}/deliveries", get(routes::webhooks::deliveries))
        .route("/v1/customers", get(routes::people::list_customers))
        .route("/v1/customers/{id}", get(routes::people::get_customer).patch(routes::health::patch_customer))
        .route("/v1/customers/{id}/health", get(routes::health::get_health))
        .route("/v1/customers/{id}/health/history", get(routes::health::get_history))
        .route("/v1/customers/{id}/stage-override", put(routes::health::put_override).delete(routes::health::delete_override))
        .route("/v1/health/config", get(routes::health::get_config).put(routes::health::put_config))
        .route("/v1/health/backtest", post(routes::health::create_backtest))
        .route("/v1/health/backtests/{id}", get(routes::health::get_backtest))
        .route("/v1/users/{id}", get(routes::people::get_user))
        .route("/v1/track", post(routes::segment::track))
        .route("/v1/identify", post(routes::segment::identify))
        .route("/v1/group", post(routes::segment::group))
        .route("/v1/page", post(routes::segment::page))
        .route("/v1/screen", post(routes::segment::screen))
        .route("/v1/alias", post(routes::segment::alias))
        .route("/v1/batch", post(routes::segment::batch))
        .route("/v1/sql", post(routes::lake::sql))
        .route("/v1/schemas", get(routes::lake::list_schemas))
        .route("/v1/schemas/{type}", put(routes::lake::put_schema).get(routes::lake::get_schema).delete(routes::lake::delete_schema))
        .route("/v1/lake/files", get(routes::lake::files))
        .route("/v1/lake/compact", post(routes::lake::compact))
        .route("/v1/lake/ddl", get(routes::lake::ddl))
        .route("/v1/queries", post(routes::lake::create_query).get(routes::lake::list_queries))
        .route("/v1/queries/{name}", get(routes::lake::get_query).delete(routes::lake::delete_query))
        .route("/v1/queries/{name}/run", post(routes::lake::run_query))
        .route("/", get(routes::ops::dashboard))
        .route("/healthz", get(routes::ops::healthz))
        .route("/readyz", get(routes::ops::readyz))
        .route("/metrics", get(routes::ops::metrics))
        .route("/openapi.json", get(routes::ops::openapi))
        .fallback(|| async { ApiError::not_found("no such endpoint; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        })
        .layer(axum::middleware::from_fn(record_http_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| ApiError::internal("handler panicked").into_response()))
        .with_state(state)
}

async fn record_http_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("sluice_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("sluice_http_request_seconds", "method" => method, "route" => route).record(started.elapsed().as_secs_f64());
    resp
}

/// Histogram buckets (seconds) for latency metrics.
pub const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Installs the process-wide Prometheus recorder and returns its handle.
pub fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .ok()?
        .set_buckets_for_metric(Matcher::Full("sluice_ingest_group_events".into()), &[1.0, 10.0, 100.0, 1000.0, 10_000.0, 50_000.0])
        .ok()?
        .install_recorder()
        .ok()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}
