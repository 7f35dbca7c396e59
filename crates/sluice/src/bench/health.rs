//! `sluice bench health` (issue 9): a configuration with 4 stages and 6
//! measures, then N customers (each with a `group` call carrying
//! `renewal_date`, `mrr` and `plan`) and E events over 90 days ingested over
//! HTTP into a server started here (the read model keeps them and the
//! evaluator scores customers as they come); once the lake writer has
//! written every event too, a changed configuration is applied and its full
//! recompute (the `health.recompute` job) is timed. Beside it, in the same run, DuckDB
//! computes the same measures and stages for every customer from the lake's
//! Parquet files, compacted first (the reference), and the customers per
//! stage must be equal.
//! Last, events are ingested at a fixed rate while probe events are sent to
//! quiet customers, and the time until each probe shows in its customer's
//! health is measured (p50/p99).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use reqwest::Method;
use serde_json::{json, Value};
use sluice_client::Client;

const DUCKDB_SCRIPT: &str = include_str!("health_duckdb.py");

#[derive(Args, Clone)]
pub struct HealthBenchArgs {
    /// Customers.
    #[arg(long, default_value_t = 100_000)]
    customers: usize,
    /// Events over 90 days (besides one `group` call per customer).
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// State store of the server started here (default: SQLite in the temp
    /// dir). For PostgreSQL give an empty database.
    #[arg(long)]
    state_url: Option<String>,
    /// Python with the `duckdb` package, for the reference.
    #[arg(long, env = "SLUICE_TEST_PYTHON", default_value = "python3")]
    python: String,
    /// Ingest rate of the latency phase, events per second.
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Length of the latency phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    latency_duration: Duration,
    /// Full recomputes timed one after another, each after a change of the
    /// configuration (its bands); the median is set beside DuckDB.
    #[arg(long, default_value_t = 3)]
    recomputes: usize,
}

/// The configuration: 4 stages, 6 measures.
pub fn config() -> Value {
    json!({"measures": {
        "reports_30d":  {"kind": "count", "event_type": "report.created", "days": 30},
        "active_users": {"kind": "distinct_users", "event_type": "page", "days": 7},
        "idle_days":    {"kind": "days_since_last", "event_type": "login"},
        "usage_trend":  {"kind": "trend", "event_type": "api.call", "days": 14},
        "to_renewal":   {"kind": "days_until", "attribute": "renewal_date"},
        "mrr":          {"kind": "attribute", "attribute": "mrr"}},
      "stages": [
        {"name": "renewal",    "rule": {"all": [{"measure": "to_renewal", "op": "<=", "value": 60}, {"measure": "to_renewal", "op": ">=", "value": 0}]}},
        {"name": "trial",      "rule": {"all": [{"attribute": "plan", "op": "==", "value": "trial"}]}},
        {"name": "onboarding", "rule": {"any": [{"measure": "reports_30d", "op": "<", "value": 3}]}},
        {"name": "adoption",   "rule": {"all": []}}],
      "scorecards": {
        "adoption": [
          {"measure": "reports_30d", "weight": 2, "thresholds": [{"min": 10, "points": 100}, {"min": 3, "points": 50}, {"min": null, "points": 0}]},
          {"measure": "idle_days", "weight": 1, "linear": {"from": 30, "to": 0}},
          {"measure": "usage_trend", "weight": 1, "linear": {"from": -50, "to": 0}},
          {"measure": "active_users", "weight": 1, "linear": {"from": 0, "to": 5}}],
        "renewal": [{"measure": "idle_days", "weight": 1, "linear": {"from": 14, "to": 0}}, {"measure": "active_users", "weight": 1, "linear": {"from": 0, "to": 5}}],
        "onboarding": [{"measure": "reports_30d", "weight": 1, "linear": {"from": 0, "to": 3}}],
        "trial": [{"measure": "active_users", "weight": 1, "linear": {"from": 0, "to": 3}}]},
      "bands": {"good": 70, "normal": 40}})
}

fn rand(state: &mut u64) -> u64 {
    // xorshift64*: the same data on every run.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

const TYPES: [&str; 10] = ["report.created", "page", "page", "page", "page", "page", "login", "login", "api.call", "api.call"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Events `from..to` of the generated history (event 0..customers are the
/// `group` calls).
fn events(from: usize, to: usize, customers: usize, total: usize, t0: DateTime<Utc>, today: chrono::NaiveDate) -> Vec<Value> {
    let span = 90 * 86_400_000_000i64;
    (from..to)
        .map(|i| {
            if i < customers {
                let renewal = today + chrono::Duration::days(((i * 7) % 400) as i64 - 30);
                return json!({"id": format!("g{i}"), "type": "group", "customer_id": format!("c{i}"), "user_id": format!("u{i}_0"),
                    "timestamp": ts(t0 - chrono::Duration::days(91)),
                    "properties": {"renewal_date": renewal.format("%Y-%m-%d").to_string(), "mrr": (i % 50 + 1) * 1000,
                        "plan": if i % 10 == 0 { "trial" } else { "pro" }}});
            }
            let mut r = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let c = rand(&mut r) % customers as u64;
            // Later events are denser (usage grows), so trends differ.
            let frac = (rand(&mut r) % 1_000_000) as f64 / 1_000_000.0;
            let at = t0 - chrono::Duration::hours(1) - chrono::Duration::microseconds(((1.0 - frac.sqrt()) * span as f64) as i64);
            let _ = total;
            json!({"id": format!("e{i}"), "type": TYPES[(rand(&mut r) % 10) as usize], "customer_id": format!("c{c}"),
                "user_id": format!("u{c}_{}", rand(&mut r) % 8), "timestamp": ts(at)})
        })
        .collect()
}

async fn wait_job(client: &Client, id: &str) -> Result<Value> {
    loop {
        let j = client.get_json(&format!("/v1/jobs/{id}")).await?;
        match j["status"].as_str() {
            Some("succeeded") => return Ok(j),
            Some("failed") | Some("cancelled") => bail!("job {id} ended {}: {}", j["status"], j["error"]),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const HEALTH_CONSUMER: &str = "health";

async fn consumer_lag(root: &Client, name: &str) -> Result<u64> {
    let c = root.get_json("/v1/consumers").await?;
    Ok(c["data"].as_array().and_then(|a| a.iter().find(|c| c["name"] == name)).and_then(|c| c["lag"].as_u64()).unwrap_or(u64::MAX))
}

pub async fn run(args: HealthBenchArgs) -> Result<()> {
    let (n, e) = (args.customers, args.events);
    ensure!(n > 0 && e > 0, "give --customers and --events above 0");
    let (url, key, server) = super::spawn_server_with(args.state_url.as_deref(), &[("SLUICE_LAKE_FLUSH_INTERVAL", "2s")]).await?;
    let root = Client::new(&url, Some(&key))?;
    root.create_workspace("bench", Some("Asia/Tokyo")).await.context("creating the workspace")?;
    let admin = root.create_key("bench", sluice_core::Scope::Admin, Some("bench")).await?.secret;
    let client = Client::new(&url, Some(&admin))?;
    let t0 = Utc::now();
    let tokyo: chrono_tz::Tz = chrono_tz::Asia::Tokyo;
    let today = t0.with_timezone(&tokyo).date_naive();
    let total = n + e;
    eprintln!("health bench: {n} customers, {e} events over 90 days (+{n} group calls)");

    // 0. A first configuration, so that the read model keeps the events
    // as they arrive (a first configuration on an existing history copies
    // it from the log instead: not what this measures).
    let mut first = config();
    first["bands"] = json!({"good": 75, "normal": 45});
    let put = client.call(Method::PUT, "/v1/health/config", Some(first)).await.context("applying the first configuration")?;
    wait_job(&client, put["recompute_job"]["id"].as_str().context("no recompute job")?).await?;

    // 1. Ingest.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(5000, Ordering::Relaxed) as usize;
                if from >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                let batch = events(from, (from + 5000).min(total), n, total, t0, today);
                client.send_events(&batch).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let ingest_s = started.elapsed().as_secs_f64();
    eprintln!("ingested {total} events in {ingest_s:.1} s ({:.0}/s)", total as f64 / ingest_s);
    while consumer_lag(&root, HEALTH_CONSUMER).await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fold_s = started.elapsed().as_secs_f64();
    eprintln!("health read model caught up {fold_s:.1} s after the first event");

    // The live evaluations of the ingest settle first.
    let mut last = Value::Null;
    loop {
        let q = client
            .call(
                Method::POST,
                "/v1/sql",
                Some(json!({"query": "SELECT count(*) AS n, max(evaluated_at) AS t FROM customers WHERE evaluated_at IS NOT NULL"})),
            )
            .await?;
        let now = q["data"][0].clone();
        if now == last && now["n"].as_u64() == Some(n as u64) {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let settled_s = started.elapsed().as_secs_f64();
    eprintln!("live evaluations settled {settled_s:.1} s after the first event");

    // The lake writer's backlog is written first: timed beside it, the
    // recompute shared the two cores with the Parquet writing of the whole
    // history (DuckDB, the reference, runs on a quiet machine too).
    loop {
        let f = client.get_json("/v1/lake/files").await?;
        let rows: u64 = f["data"].as_array().map(|a| a.iter().filter_map(|f| f["rows"].as_u64()).sum()).unwrap_or(0);
        if rows >= total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("lake holds every event {:.1} s after the first event", started.elapsed().as_secs_f64());

    // 2. Full recomputes after configuration changes: the bands move each
    // time (so every customer is evaluated under a new version), the last
    // is `config()`. Stages do not depend on bands: DuckDB's stages are
    // compared with the last.
    ensure!(args.recomputes > 0, "give --recomputes above 0");
    let mut times = Vec::new();
    for i in (0..args.recomputes).rev() {
        let mut cfg = config();
        cfg["bands"] = json!({"good": 70 + i, "normal": 40});
        let started = Instant::now();
        let put = client.call(Method::PUT, "/v1/health/config", Some(cfg)).await.context("applying the configuration")?;
        let job = put["recompute_job"]["id"].as_str().context("no recompute job")?.to_owned();
        let done = wait_job(&client, &job).await?;
        let s = started.elapsed().as_secs_f64();
        eprintln!("recompute of {} customers: {s:.2} s", done["result"]["customers_total"]);
        times.push(s);
    }
    let all = times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(", ");
    times.sort_by(f64::total_cmp);
    let recompute_s = times[times.len() / 2];

    // Customers per stage and band, as Sluice has them.
    let mut sluice_stages: BTreeMap<String, u64> = BTreeMap::new();
    let q = client.call(Method::POST, "/v1/sql", Some(json!({"query": "SELECT stage, count(*) AS n FROM customers GROUP BY stage"}))).await?;
    for r in q["data"].as_array().context("sql rows")? {
        sluice_stages.insert(r["stage"].as_str().unwrap_or("").to_owned(), r["n"].as_u64().unwrap_or(0));
    }

    // 3. The reference: DuckDB over the lake (every event is in it: see above).
    // Compacted, as a lake is read in production (hourly files merged).
    let compact = client.call(Method::POST, "/v1/lake/compact", None).await.context("compacting the lake")?;
    wait_job(&client, compact["id"].as_str().context("no compaction job")?).await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("health_duckdb.py");
    std::fs::write(&script, DUCKDB_SCRIPT)?;
    let out = std::process::Command::new(&args.python)
        .arg(&script)
        .arg(server.dir().join("lake"))
        .arg("bench")
        .arg(ts(Utc::now()))
        .output()
        .with_context(|| format!("running {} (needs the duckdb package)", args.python))?;
    ensure!(out.status.success(), "DuckDB reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let reference: Value = serde_json::from_slice(&out.stdout).context("DuckDB's answer")?;
    let duck_s = reference["seconds"].as_f64().unwrap_or(f64::NAN);
    let mut duck_stages: BTreeMap<String, u64> = BTreeMap::new();
    for (k, v) in reference["stages"].as_object().context("stages")? {
        duck_stages.insert(k.clone(), v.as_u64().unwrap_or(0));
    }
    println!("\nrecompute: sluice {recompute_s:.2} s (median of {all}), duckdb {duck_s:.2} s, ratio {:.2}", recompute_s / duck_s);
    println!("customers per stage: sluice {sluice_stages:?}, duckdb {duck_stages:?}");
    ensure!(sluice_stages == duck_stages, "the customers per stage differ between Sluice and DuckDB");

    // 4. Latency while ingesting at a fixed rate.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, stop, sent, rate) = (client.clone(), stop.clone(), sent.clone(), args.rate);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut i = total;
            while !stop.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                if sent.load(Ordering::Relaxed) >= due {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                let batch: Vec<Value> = events(i, i + 1000, n, total, Utc::now() + chrono::Duration::hours(1), today)
                    .into_iter()
                    .map(|mut e| {
                        e["timestamp"] = json!(ts(Utc::now()));
                        e
                    })
                    .collect();
                i += 1000;
                if client.send_events(&batch).await.is_err() {
                    break;
                }
                sent.fetch_add(1000, Ordering::Relaxed);
            }
        })
    };
    // A probe every 200 ms, each on its own task: a slow one does not delay
    // the next, so the percentiles stand on ~5 probes a second.
    let mut lat = hdrhistogram::Histogram::<u64>::new(3)?;
    let phase = Instant::now();
    // Where the time goes: the health read model's lag, sampled each second.
    let lag_sampler = {
        let (root, stop) = (root.clone(), stop.clone());
        tokio::spawn(async move {
            let mut max = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(l) = consumer_lag(&root, HEALTH_CONSUMER).await {
                    if l != u64::MAX {
                        max = max.max(l);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            max
        })
    };
    let mut probes = tokio::task::JoinSet::new();
    let mut k = 0;
    while phase.elapsed() < args.latency_duration {
        k += 1;
        let client = client.clone();
        probes.spawn(async move {
            let probe = format!("probe{k}");
            let sent_at = Instant::now();
            client
                .send_events(&[json!({"id": format!("p{k}"), "type": "report.created", "customer_id": probe, "timestamp": ts(Utc::now())})])
                .await?;
            loop {
                if let Ok(resp) = client.send(client.request(Method::GET, &format!("/v1/customers/{probe}/health"))).await {
                    let h = resp.json::<Value>().await.unwrap_or(Value::Null);
                    if h["measures"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "reports_30d" && m["value"] == json!(1))) {
                        return Ok::<_, anyhow::Error>(sent_at.elapsed());
                    }
                }
                if sent_at.elapsed() > Duration::from_secs(120) {
                    bail!("probe {probe} not reflected within 120 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The load goes on until the last probe showed.
    while let Some(r) = probes.join_next().await {
        lat.record(r??.as_micros() as u64)?;
    }
    let load_s = phase.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let max_lag = lag_sampler.await.unwrap_or(0);
    let achieved = sent.load(Ordering::Relaxed) as f64 / load_s;
    println!(
        "latency while ingesting {achieved:.0} events/s (asked {:.0}): event → score p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} probes",
        args.rate,
        lat.value_at_quantile(0.5) as f64 / 1000.0,
        lat.value_at_quantile(0.99) as f64 / 1000.0,
        lat.max() as f64 / 1000.0,
        lat.len()
    );
    println!("health read model lag during the latency phase: at most {max_lag} records");
    println!("ingest {total} events {ingest_s:.1} s; read model caught up at {fold_s:.1} s; live evaluations settled at {settled_s:.1} s");
    drop(server);
    Ok(())
}
