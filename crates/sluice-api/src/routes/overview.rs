//! `GET /v1/overview`: the dashboard's first section — a workspace's ingest
//! rate, consumer lags, jobs running, dead letters waiting and errors of the
//! last hour, now and as time series ([`crate::overview`]).

use std::time::Duration;

use axum::extract::State;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::{Json, Query};
use crate::overview::{Point, KEEP};
use crate::state::AppState;

/// `GET /v1/overview` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct OverviewQuery {
    /// Minutes of series to return, 1–60 (default 60).
    pub minutes: Option<u32>,
}

/// The workspace's activity now and over the last hour.
///
/// Figures now (`jobs_running`, `jobs_queued`, `dead_letters_waiting`,
/// `errors_last_hour`'s failed jobs and dead letters, `consumers`) are read
/// from the state store at the request. `series`, `ingest_rate`,
/// `events_last_hour` and refused ingest requests come from the server's
/// own samples (every `dashboard.overview_interval`), kept in memory since
/// the process started, for at most an hour; `since` is the oldest sample.
#[utoipa::path(get, path = "/v1/overview", params(OverviewQuery), tag = "operations",
    responses((status = 200, description = "`{ingest_rate, events_last_hour, jobs_running, jobs_queued, dead_letters_waiting, errors_last_hour, errors, consumer_lag, consumers, interval_seconds, since, series: [{at, events, ingest_rejected, jobs_failed, dead_lettered, errors, jobs_queued, jobs_running, dead_letters_waiting, consumer_lag}]}`"),
        (status = 400), (status = 401), (status = 403)),
    security(("bearer" = [])))]
pub async fn get(State(st): State<AppState>, who: Principal, Query(q): Query<OverviewQuery>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let minutes = q.minutes.unwrap_or(60);
    if !(1..=60).contains(&minutes) {
        return Err(ApiError::bad_request(format!("minutes: {minutes} is not between 1 and 60")));
    }
    let ws = who.workspace.as_str();
    let now = Utc::now();
    let interval = st.overview.interval();
    let hour: Vec<Point> = st.overview.series(ws, KEEP);
    let series: Vec<Point> = st.overview.series(ws, Duration::from_secs(u64::from(minutes) * 60));
    // Events per second over the last minute of samples (or over what there
    // is, right after a start).
    let last_minute: Vec<&Point> = hour.iter().rev().take((60.0 / interval.as_secs_f64().max(0.001)).ceil().max(1.0) as usize).collect();
    let covered = last_minute.len() as f64 * interval.as_secs_f64();
    let ingest_rate = if covered > 0.0 { last_minute.iter().map(|p| p.sample.events).sum::<u64>() as f64 / covered } else { 0.0 };
    let waiting = st.store.waiting(Some(ws)).await?.remove(ws).unwrap_or_default();
    let (jobs_failed, dead_lettered) = st.store.failures_since(ws, now - chrono::Duration::hours(1)).await?;
    let ingest_rejected: u64 = hour.iter().map(|p| p.sample.ingest_rejected).sum();
    let consumers: Vec<Value> = super::consumers::list(State(st.clone()), who.clone())
        .await?
        .0
        .data
        .into_iter()
        .map(|c| json!({"name": c.name, "lag": c.lag, "status": c.status, "dlq_size": c.dlq_size}))
        .collect();
    let consumer_lag = consumers.iter().filter_map(|c| c["lag"].as_u64()).max().unwrap_or(0);
    Ok(Json(json!({
        "workspace": ws,
        "at": super::rfc3339(now),
        "interval_seconds": interval.as_secs_f64(),
        "since": hour.first().map(|p| p.at.clone()),
        "ingest_rate": (ingest_rate * 1000.0).round() / 1000.0,
        "events_last_hour": hour.iter().map(|p| p.sample.events).sum::<u64>(),
        "jobs_running": waiting.jobs_running,
        "jobs_queued": waiting.jobs_queued,
        "dead_letters_waiting": waiting.dead_letters,
        "errors_last_hour": ingest_rejected + jobs_failed + dead_lettered,
        "errors": {"ingest_rejected": ingest_rejected, "jobs_failed": jobs_failed, "dead_lettered": dead_lettered},
        "consumer_lag": consumer_lag,
        "consumers": consumers,
        "series": series,
    })))
}
