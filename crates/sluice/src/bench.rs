//! `sluice bench …`: load generators whose results are recorded in
//! docs/BENCHMARKS.md. Each reports a reference run beside the measured one,
//! in the same session, so results are ratios rather than lone times.

mod billing;
mod health;
mod lake;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use sluice_client::Client;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Ingest throughput and acknowledgement latency over loopback, beside the
    /// parse-and-discard ceiling of the same server.
    Ingest(IngestArgs),
    /// A state-writing consumer (event_counts, one state update per event)
    /// under sustained ingest at a fixed rate: its lag and throughput.
    Consumer(ConsumerArgs),
    /// Empty jobs enqueued and completed per second through the job runner.
    Jobs(JobsArgs),
    /// A usage CSV imported end to end: upload → durable → meters updated →
    /// total queried; and a 10-row file with wait=true.
    Import(ImportBenchArgs),
    /// Lake writer throughput and 10 analytical queries through Sluice's SQL
    /// beside DuckDB on the same Parquet files.
    Lake(lake::LakeBenchArgs),
    /// One billing run over N subscriptions (invoices finalized and
    /// numbered) beside one PostgreSQL statement computing the same totals.
    Billing(billing::BillingBenchArgs),
    /// Customer health: the full recompute of N customers after a
    /// configuration change beside DuckDB computing the same measures over
    /// the lake, and event-to-score latency under a steady ingest rate.
    Health(health::HealthBenchArgs),
}

#[derive(Args, Clone)]
pub struct ImportBenchArgs {
    /// Rows of the generated file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    /// Also write the generated file here (for the reference runs).
    #[arg(long)]
    keep_csv: Option<std::path::PathBuf>,
    /// State store of the server started here (default: SQLite in the temp dir).
    #[arg(long)]
    state_url: Option<String>,
}

#[derive(Args, Clone)]
pub struct JobsArgs {
    /// State store URL (default: a temporary SQLite file). Use an empty
    /// PostgreSQL database: the bench creates its tables there.
    #[arg(long)]
    state_url: Option<String>,
    /// Jobs to run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Jobs running at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Args, Clone)]
pub struct ConsumerArgs {
    /// Ingest rate, events per second.
    #[arg(long, default_value_t = 100_000.0)]
    rate: f64,
    /// State store of the server started here (default: SQLite in the temp dir).
    #[arg(long)]
    state_url: Option<String>,
    /// How long to ingest.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args, Clone)]
pub struct IngestArgs {
    /// Server URL. Without it, a server is started in a temporary directory.
    #[arg(long, env = "SLUICE_URL")]
    url: Option<String>,
    /// Key with ingest scope (needed with --url).
    #[arg(long, env = "SLUICE_KEY", hide_env_values = true)]
    key: Option<String>,
    /// State store of the server started here (default: SQLite in the temp dir).
    #[arg(long)]
    state_url: Option<String>,
    /// Duration of each phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent requests.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Event ids: `ordered` (run-worker-sequence, like UUIDv7 or database
    /// ids) or `random` (UUIDv4, like Segment's messageIds). Random ids cost
    /// more: every insert into the dedup index lands on a different page.
    #[arg(long, default_value = "ordered", value_parser = ["ordered", "random"])]
    ids: String,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cmd {
        BenchCmd::Ingest(args) => rt.block_on(ingest(args)),
        BenchCmd::Consumer(args) => rt.block_on(consumer(args)),
        BenchCmd::Jobs(args) => rt.block_on(jobs(args)),
        BenchCmd::Import(args) => rt.block_on(import_bench(args)),
        BenchCmd::Lake(args) => rt.block_on(lake::run(args)),
        BenchCmd::Billing(args) => rt.block_on(billing::run(args)),
        BenchCmd::Health(args) => rt.block_on(health::run(args)),
    }
}

struct Spawned {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// The server's data directory.
    fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}

async fn spawn_server(state_url: Option<&str>) -> Result<(String, String, Spawned)> {
    spawn_server_with(state_url, &[]).await
}

/// [`spawn_server`] with extra environment (settings).
async fn spawn_server_with(state_url: Option<&str>, env: &[(&str, &str)]) -> Result<(String, String, Spawned)> {
    let dir = tempfile::tempdir()?;
    let key = format!("sk_bench_{}", uuid::Uuid::new_v4().simple());
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("SLUICE_BOOTSTRAP_KEY", &key)
        .env("SLUICE_BENCH_ENDPOINTS", "1")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(u) = state_url {
        cmd.arg("--state-url").arg(u);
    }
    let mut child = cmd.spawn().context("starting sluice serve")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.context("server start timed out")?? else {
            bail!("server exited during start")
        };
        if let Some(u) = line.strip_prefix("sluice listening on ") {
            break u.trim().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((url, key, Spawned { child, _dir: dir }))
}

/// A body of `batch` events of about 250 bytes each, with unique ids.
fn body(run: &str, worker: usize, seq: u64, batch: usize, random_ids: bool) -> String {
    let mut s = String::with_capacity(batch * 260 + 2);
    s.push('[');
    for i in 0..batch {
        if i > 0 {
            s.push(',');
        }
        let n = seq * batch as u64 + i as u64;
        let id = if random_ids { uuid::Uuid::new_v4().to_string() } else { format!("{run}-{worker}-{n}") };
        s.push_str(&format!(
            r#"{{"id":"{id}","type":"api.call","customer_id":"cust-{c}","timestamp":"2026-11-01T12:00:00Z","properties":{{"endpoint":"/v1/things","status":200,"duration_ms":{d},"region":"ap-northeast-1"}},"context":{{"ip":"203.0.113.7","user_agent":"bench/1.0"}}}}"#,
            c = n % 1000,
            d = n % 977
        ));
    }
    s.push(']');
    s
}

struct PhaseResult {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn phase(url: &str, key: &str, path: &str, args: &IngestArgs, rate: Option<f64>) -> Result<PhaseResult> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let events = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + args.duration;
    // With a target rate, each worker sends one batch every `interval`.
    let interval = rate.map(|r| Duration::from_secs_f64(args.concurrency as f64 * args.batch as f64 / r));
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let (http, url, key, path, run) = (http.clone(), url.to_owned(), key.to_owned(), path.to_owned(), run.clone());
        let (events, errors, batch, conc) = (events.clone(), errors.clone(), args.batch, args.concurrency);
        let random_ids = args.ids == "random";
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut seq = 0u64;
            if let Some(iv) = interval {
                // Stagger the workers evenly over one interval.
                tokio::time::sleep(iv.mul_f64(w as f64 / conc as f64)).await;
            }
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if let Some(iv) = interval {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    next += iv;
                }
                let b = body(&run, w, seq, batch, random_ids);
                seq += 1;
                let t = Instant::now();
                let r = http.post(format!("{url}{path}")).bearer_auth(&key).header("content-type", "application/json").body(b).send().await;
                let ok = matches!(&r, Ok(resp) if resp.status().is_success());
                if let Ok(resp) = r {
                    let _ = resp.bytes().await;
                }
                if ok {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    events.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(PhaseResult {
        events_per_s: events.load(Ordering::Relaxed) as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        errors: errors.load(Ordering::Relaxed),
    })
}

async fn ingest(args: IngestArgs) -> Result<()> {
    let (url, key, _server) = match &args.url {
        Some(u) => (u.clone(), args.key.clone().context("--key (or SLUICE_KEY) is required with --url")?, None),
        None => {
            let (u, k, s) = spawn_server(args.state_url.as_deref()).await?;
            eprintln!("started a server at {u} (temporary data directory)");
            (u, k, Some(s))
        }
    };
    eprintln!("batch {} events (~250 B each, {} ids), concurrency {}, {:?} per phase", args.batch, args.ids, args.concurrency, args.duration);
    let discard = phase(&url, &key, "/v1/bench/discard", &args, None).await?;
    let durable = phase(&url, &key, "/v1/events", &args, None).await?;
    let half = phase(&url, &key, "/v1/events", &args, Some(durable.events_per_s / 2.0)).await?;
    println!("| phase | events/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in [("parse+discard (ceiling)", &discard), ("durable ingest (max)", &durable), ("durable ingest at 50% of max", &half)] {
        println!("| {name} | {:.0} | {:.1} | {:.1} | {} |", r.events_per_s, r.p50_ms, r.p99_ms, r.errors);
    }
    println!("\ndurable / ceiling = {:.2}", durable.events_per_s / discard.events_per_s.max(1.0));
    if let Some(mut s) = _server {
        let _ = s.child.kill().await;
    }
    Ok(())
}

/// The lag of consumer `name`.
async fn consumer_lag(client: &Client, name: &str) -> Result<u64> {
    client.consumers().await?.into_iter().find(|c| c.name == name).map(|c| c.lag).with_context(|| format!("no {name} consumer"))
}

async fn consumer(args: ConsumerArgs) -> Result<()> {
    let (url, key, mut server) = spawn_server(args.state_url.as_deref()).await?;
    eprintln!("started a server at {url}; ingesting {} events/s for {:?}", args.rate, args.duration);
    let ingest_args = IngestArgs {
        url: Some(url.clone()),
        key: Some(key.clone()),
        state_url: None,
        duration: args.duration,
        batch: 1000,
        concurrency: 16,
        ids: "ordered".into(),
    };
    let client = Client::new(&url, Some(&key))?;
    let started = Instant::now();
    let load = {
        let (url, key) = (url.clone(), key.clone());
        let rate = args.rate;
        tokio::spawn(async move { phase(&url, &key, "/v1/events", &ingest_args, Some(rate)).await })
    };
    let mut max_lag = 0u64;
    let mut samples = Vec::new();
    while !load.is_finished() {
        let lag = consumer_lag(&client, "event_counts").await?;
        max_lag = max_lag.max(lag);
        samples.push(lag);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingest = load.await??;
    let ingest_end = started.elapsed();
    loop {
        let lag = consumer_lag(&client, "event_counts").await?;
        if lag == 0 {
            break;
        }
        max_lag = max_lag.max(lag);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    let total = client.get_json("/v1/event-counts").await?;
    let counted = total["total"].as_i64().unwrap_or(0) as f64;
    samples.sort_unstable();
    let p50 = samples.get(samples.len() / 2).copied().unwrap_or(0);
    println!("| ingest events/s (achieved) | counted events | consumer events/s | lag p50 (records) | lag max (records) | lag max (s at this rate) | drain after ingest stopped (s) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} |",
        ingest.events_per_s,
        counted,
        counted / drained.as_secs_f64(),
        p50,
        max_lag,
        max_lag as f64 / ingest.events_per_s.max(1.0),
        (drained - ingest_end).as_secs_f64()
    );
    let _ = server.child.kill().await;
    Ok(())
}

struct Noop(usize);

#[async_trait::async_trait]
impl sluice_jobs::JobHandler for Noop {
    fn kind(&self) -> &str {
        "bench.noop"
    }
    fn concurrency(&self) -> usize {
        self.0
    }
    async fn run(&self, _job: &sluice_store::Job, _ctx: &sluice_jobs::JobContext) -> Result<serde_json::Value, sluice_jobs::JobError> {
        Ok(serde_json::Value::Null)
    }
}

async fn jobs(args: JobsArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = args.state_url.clone().unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let store = sluice_store::Store::connect(&url).await?;
    let new = sluice_store::NewJob {
        workspace: "default".into(),
        kind: "bench.noop".into(),
        payload: serde_json::Value::Null,
        max_attempts: 1,
        created_by: None,
    };
    let started = Instant::now();
    for _ in 0..args.jobs {
        store.enqueue_job(&new).await?;
    }
    let enqueued = started.elapsed();
    let run_started = Instant::now();
    let runner = sluice_jobs::Runner::start(
        store.clone(),
        vec![std::sync::Arc::new(Noop(args.concurrency))],
        sluice_jobs::RunnerConfig { poll: Duration::from_millis(5), ..Default::default() },
    );
    loop {
        let left = store.list_jobs("default", Some("bench.noop"), Some(sluice_core::JobState::Queued), None, 1).await?.data.len()
            + store.list_jobs("default", Some("bench.noop"), Some(sluice_core::JobState::Running), None, 1).await?.data.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = run_started.elapsed();
    runner.stop().await;
    println!("| store | jobs | enqueue jobs/s | run+complete jobs/s | concurrency |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.0} | {:.0} | {} |",
        store.backend(),
        args.jobs,
        args.jobs as f64 / enqueued.as_secs_f64(),
        args.jobs as f64 / ran.as_secs_f64(),
        args.concurrency
    );
    Ok(())
}

/// The generated usage file: 1,000 customers, one meter, a month of
/// timestamps, quantities with one decimal.
fn usage_csv(rows: usize) -> String {
    let mut s = String::with_capacity(rows * 60 + 64);
    s.push_str("customer_id,subscription_id,meter,timestamp,quantity\n");
    for i in 0..rows {
        s.push_str(&format!(
            "cust-{},sub-{},gb,2024-03-{:02}T{:02}:{:02}:00Z,{}.{}\n",
            i % 1000,
            i % 1000,
            i % 28 + 1,
            i % 24,
            i % 60,
            i % 97,
            i % 10
        ));
    }
    s
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/{pid}/stat` (Linux; `None` elsewhere). Less noisy than wall time
/// on a shared machine, so it tells whether a change saved work.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th; in clock ticks (USER_HZ, 100).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

async fn import_bench(args: ImportBenchArgs) -> Result<()> {
    let (url, key, mut server) = spawn_server(args.state_url.as_deref()).await?;
    let root = Client::new(&url, Some(&key))?;
    root.create_workspace("bench", Some("Asia/Tokyo")).await.context("creating the workspace")?;
    let admin = root.create_key("bench", sluice_core::Scope::Admin, Some("bench")).await?.secret;
    let client = Client::new(&url, Some(&admin))?;
    let meter = serde_json::json!({"key": "gb", "event_type": "storage.used", "aggregation": "sum", "value_property": "gb"});
    client.call(reqwest::Method::POST, "/v1/meters", Some(meter)).await.context("creating the meter")?;

    // A 10-row file, wait=true: one round trip.
    let small = usage_csv(10);
    let mut small_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let import = client.import_usage(small.clone().into(), "strict", true).await?;
        anyhow::ensure!(import.status == sluice_core::JobState::Succeeded, "small import: {import:?}");
        small_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    small_ms.sort_by(f64::total_cmp);

    let csv = usage_csv(args.rows);
    if let Some(p) = &args.keep_csv {
        std::fs::write(p, &csv)?;
    }
    let bytes = csv.len();
    let pid = server.child.id();
    let cpu_before = pid.and_then(cpu_seconds);
    let t = Instant::now();
    let id = client.import_usage(csv.into(), "strict", false).await?.id;
    let uploaded = t.elapsed();
    loop {
        let import = client.import(&id).await?;
        match import.status {
            sluice_core::JobState::Succeeded => break,
            s if s.is_terminal() => anyhow::bail!("import ended {s}: {import:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let imported = t.elapsed();
    // Meters updated: wait for the meters consumer, then query the total.
    while consumer_lag(&client, "meters").await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let u = client.get_json("/v1/meters/gb/usage?granularity=total").await?;
    let total = t.elapsed();
    let cpu = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => format!("{:.2}", b - a),
        _ => "n/a".into(),
    };
    let sum: rust_decimal::Decimal =
        u["data"].as_array().into_iter().flatten().filter_map(|r| r["value"].as_str().and_then(|v| v.parse::<rust_decimal::Decimal>().ok())).sum();
    println!("| rows | bytes | upload (s) | import job done (s) | meters updated + total queried (s) | rows/s end to end | server CPU (s) | metered total | 10-row wait=true p50 / max (ms) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} | {:.1} / {:.1} |",
        args.rows,
        bytes,
        uploaded.as_secs_f64(),
        imported.as_secs_f64(),
        total.as_secs_f64(),
        args.rows as f64 / total.as_secs_f64(),
        cpu,
        sum,
        small_ms[small_ms.len() / 2],
        small_ms[small_ms.len() - 1]
    );
    let _ = server.child.kill().await;
    Ok(())
}
