//! The overview's time series: every `interval` (config
//! `dashboard.overview_interval`, 10 s by default) the sampler takes each
//! workspace's activity counters ([`sluice_core::activity`]: events
//! accepted, ingest requests refused, jobs failed, events dead-lettered),
//! the work waiting in the state store (jobs queued and running, dead
//! letters) and the shared consumers' lag, and keeps the last hour in
//! memory. `GET /v1/overview` answers a workspace's samples beside its
//! figures now ([`crate::routes::overview`]).
//!
//! Why in memory and not from Prometheus: the series must be per workspace
//! (Prometheus series carry no workspace ids) and need no other service. A
//! restart starts the series again; the figures "now" come from the state
//! store and survive it. Memory is bounded: a workspace keeps only samples
//! that are not all zero, at most one hour's worth.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::state::AppState;

/// How much history is kept.
pub const KEEP: Duration = Duration::from_secs(3600);
/// Most samples kept, whatever the interval.
const MAX_SAMPLES: usize = 3600;

/// One workspace's activity over one interval, and what waited at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Events newly stored during the interval.
    pub events: u64,
    /// Ingest requests refused during the interval.
    pub ingest_rejected: u64,
    /// Jobs that ended `failed` during the interval.
    pub jobs_failed: u64,
    /// Events dead-lettered during the interval.
    pub dead_lettered: u64,
    /// Jobs queued at the sample.
    pub jobs_queued: u64,
    /// Jobs running at the sample.
    pub jobs_running: u64,
    /// Dead letters waiting (status `dead`) at the sample.
    pub dead_letters_waiting: u64,
}

impl Sample {
    fn is_zero(&self) -> bool {
        *self == Sample::default()
    }

    /// Failures of the interval: refused requests, failed jobs, dead letters.
    pub fn errors(&self) -> u64 {
        self.ingest_rejected + self.jobs_failed + self.dead_lettered
    }
}

/// One tick of the sampler: when, and the largest lag of the shared consumers.
#[derive(Debug, Clone, Copy)]
struct Tick {
    n: u64,
    at: DateTime<Utc>,
    consumer_lag: u64,
}

#[derive(Debug, Default)]
struct Inner {
    interval: Duration,
    next: u64,
    ticks: VecDeque<Tick>,
    /// Per workspace, the samples that are not all zero, by tick number.
    by_workspace: HashMap<String, VecDeque<(u64, Sample)>>,
}

/// The samples of every workspace.
#[derive(Debug)]
pub struct Overview {
    inner: Mutex<Inner>,
}

/// A point of a workspace's series.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// End of the interval (RFC 3339).
    pub at: String,
    /// The workspace's sample (zeros when nothing happened).
    #[serde(flatten)]
    pub sample: Sample,
    /// `ingest_rejected + jobs_failed + dead_lettered`.
    pub errors: u64,
    /// Largest lag (records not yet processed) of the consumers every
    /// workspace shares, at the sample.
    pub consumer_lag: u64,
}

impl Default for Overview {
    fn default() -> Self {
        Overview::new(Duration::from_secs(10))
    }
}

impl Overview {
    /// An empty history sampled every `interval`.
    pub fn new(interval: Duration) -> Self {
        Overview { inner: Mutex::new(Inner { interval, ..Inner::default() }) }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.lock().interval
    }

    /// Sets the sampling interval (before the sampler starts).
    pub fn set_interval(&self, interval: Duration) {
        self.lock().interval = interval;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one tick: `samples` of the workspaces that had any activity
    /// or waiting work, and the shared consumers' largest lag.
    pub fn record(&self, at: DateTime<Utc>, consumer_lag: u64, samples: HashMap<String, Sample>) {
        let mut g = self.lock();
        let keep = ((KEEP.as_secs_f64() / g.interval.as_secs_f64().max(0.001)).ceil() as usize).clamp(1, MAX_SAMPLES);
        let n = g.next;
        g.next += 1;
        g.ticks.push_back(Tick { n, at, consumer_lag });
        while g.ticks.len() > keep {
            g.ticks.pop_front();
        }
        let oldest = g.ticks.front().map_or(n, |t| t.n);
        for (ws, s) in samples {
            if !s.is_zero() {
                g.by_workspace.entry(ws).or_default().push_back((n, s));
            }
        }
        g.by_workspace.retain(|_, q| {
            while q.front().is_some_and(|(t, _)| *t < oldest) {
                q.pop_front();
            }
            !q.is_empty()
        });
    }

    /// `workspace`'s points of the last `within` (oldest first), one per tick.
    pub fn series(&self, workspace: &str, within: Duration) -> Vec<Point> {
        let g = self.lock();
        let Some(last) = g.ticks.back() else { return Vec::new() };
        let from = last.at - chrono::Duration::from_std(within).unwrap_or(chrono::Duration::MAX);
        let samples: HashMap<u64, Sample> = g.by_workspace.get(workspace).map(|q| q.iter().copied().collect()).unwrap_or_default();
        g.ticks
            .iter()
            .filter(|t| t.at > from)
            .map(|t| {
                let sample = samples.get(&t.n).copied().unwrap_or_default();
                Point { at: crate::routes::rfc3339(t.at), errors: sample.errors(), sample, consumer_lag: t.consumer_lag }
            })
            .collect()
    }
}

/// Samples every workspace every interval until the task is aborted.
pub async fn sample(st: AppState) {
    let mut every = tokio::time::interval(st.overview.interval());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(e) = sample_once(&st).await {
            tracing::warn!(error = %e, "overview: sampling failed; the next interval tries again");
        }
    }
}

async fn sample_once(st: &AppState) -> Result<(), sluice_store::StoreError> {
    let active = sluice_core::activity::drain();
    let waiting = st.store.waiting(None).await?;
    let lag = shared_consumer_lag(st).await?;
    let mut samples: HashMap<String, Sample> = HashMap::with_capacity(active.len() + waiting.len());
    for (ws, c) in active {
        let s = samples.entry(ws).or_default();
        s.events = c.events_accepted;
        s.ingest_rejected = c.ingest_rejected;
        s.jobs_failed = c.jobs_failed;
        s.dead_lettered = c.dead_lettered;
    }
    for (ws, w) in waiting {
        let s = samples.entry(ws).or_default();
        s.jobs_queued = w.jobs_queued;
        s.jobs_running = w.jobs_running;
        s.dead_letters_waiting = w.dead_letters;
    }
    st.overview.record(Utc::now(), lag, samples);
    Ok(())
}

/// The largest lag of the consumers every workspace shares (not webhooks,
/// which belong to one workspace), the lake writer included.
pub async fn shared_consumer_lag(st: &AppState) -> Result<u64, sluice_store::StoreError> {
    let log = st.consumers.log().clone();
    let mut names: Vec<String> = st.consumers.states().into_iter().map(|(n, _)| n).filter(|n| !n.starts_with("webhook:")).collect();
    if st.lake.is_some() {
        names.push(sluice_lake::writer::CHECKPOINT.to_owned());
    }
    let mut max = 0;
    for name in names {
        let cps = st.store.checkpoints(&name).await?;
        let lag: u64 = crate::routes::consumers::partition_views(&*log, &cps).iter().map(|p| p.lag).sum();
        max = max.max(lag);
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(events: u64) -> Sample {
        Sample { events, ..Sample::default() }
    }

    #[test]
    fn a_workspace_series_has_a_point_per_tick_zeros_included_and_keeps_one_hour() {
        let o = Overview::new(Duration::from_secs(600)); // 6 ticks an hour
        let t0 = DateTime::parse_from_rfc3339("2026-12-06T00:00:00Z").expect("a valid time").with_timezone(&Utc);
        for i in 0..8i64 {
            let mut m = HashMap::new();
            if i % 2 == 0 {
                m.insert("a".to_owned(), s(i as u64 + 1));
            }
            m.insert("b".to_owned(), Sample::default());
            o.record(t0 + chrono::Duration::minutes(10 * i), i as u64, m);
        }
        let a = o.series("a", KEEP);
        // 8 ticks, 6 kept: ticks 2..=7.
        assert_eq!(a.len(), 6);
        assert_eq!(a.iter().map(|p| p.sample.events).collect::<Vec<_>>(), vec![3, 0, 5, 0, 7, 0]);
        assert_eq!(a.iter().map(|p| p.consumer_lag).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(a[0].at, "2026-12-06T00:20:00Z");
        // An all-zero workspace keeps nothing, yet still gets its zeros.
        assert!(!o.lock().by_workspace.contains_key("b"));
        assert!(o.series("b", KEEP).iter().all(|p| p.sample.is_zero()));
        // A shorter window: the points after now - 30 min.
        assert_eq!(o.series("a", Duration::from_secs(1800)).len(), 3);
    }

    #[test]
    fn old_samples_are_dropped_with_their_ticks() {
        let o = Overview::new(Duration::from_secs(1800)); // 2 ticks an hour
        let t0 = Utc::now();
        o.record(t0, 0, HashMap::from([("a".to_owned(), s(1))]));
        o.record(t0 + chrono::Duration::minutes(30), 0, HashMap::new());
        o.record(t0 + chrono::Duration::minutes(60), 0, HashMap::new());
        assert!(o.lock().by_workspace.is_empty());
        assert_eq!(o.series("a", KEEP).iter().map(|p| p.sample.events).sum::<u64>(), 0);
    }
}
