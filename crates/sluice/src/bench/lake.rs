//! `sluice bench lake`: lake writer throughput and 10 analytical queries
//! through Sluice's SQL engine beside DuckDB on the same Parquet files.
//!
//! Everything runs in this process on a temporary data directory: events
//! with realistic user agents, referrers, UTM tags and a typed `amount` are
//! appended to an embedded log, the lake writer drains the log (timed:
//! writer throughput), compaction merges every partition's files (the
//! share of files at the target size or whole partitions is reported),
//! then each query runs `--runs` times through the same
//! engine as `POST /v1/sql` and through DuckDB (`--python` with the `duckdb`
//! package) on the same files; the best time of each is reported with the
//! ratio and the geometric mean of the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::json;
use sluice_core::{AppendRecord, Bytes, EventLog, RecordEffect};
use sluice_store::{EventSchema, Store};

const DUCKDB_SCRIPT: &str = include_str!("lake_duckdb.py");

#[derive(Args, Clone)]
pub struct LakeBenchArgs {
    /// Events to generate.
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Runs per query (the best is kept).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Python with the `duckdb` package, for the reference.
    #[arg(long, env = "SLUICE_TEST_PYTHON", default_value = "python3")]
    python: String,
    /// Keep the data directory here instead of a temporary one.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

const UAS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edg/120.0.2210.61",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0",
];
const REFERRERS: &[&str] = &[
    "",
    "https://www.google.com/search?q=usage+billing",
    "https://www.google.co.jp/search?q=sluice",
    "https://search.yahoo.co.jp/search?p=sluice",
    "https://www.bing.com/search?q=events",
    "https://duckduckgo.com/",
    "https://t.co/x1",
    "https://www.linkedin.com/feed/",
    "https://news.ycombinator.com/item?id=1",
    "https://mail.google.com/mail/u/0/",
    "https://app.example.com/docs",
    "https://blog.example.org/post",
];
const PLANS: [&str; 3] = ["free", "pro", "team"];
const TYPES: &[&str] = &["page", "page", "page", "api.call", "api.call", "signup", "purchase", "login", "export", "invite"];

fn rand(state: &mut u64) -> u64 {
    // xorshift64*: deterministic data for every run.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn event(i: usize, start: DateTime<Utc>, span_secs: i64, n: usize, r: &mut u64) -> serde_json::Value {
    let t = start + chrono::Duration::milliseconds((i as i64 * span_secs * 1000) / n as i64);
    let ty = TYPES[(rand(r) % TYPES.len() as u64) as usize];
    let customer = rand(r) % 1000;
    let user = customer * 50 + rand(r) % 50;
    let referrer = REFERRERS[(rand(r) % REFERRERS.len() as u64) as usize];
    let utm = if rand(r).is_multiple_of(4) { "?utm_source=newsletter&utm_medium=email&utm_campaign=spring" } else { "" };
    json!({
        "workspace": "bench",
        "id": format!("e{i:010}"),
        "type": ty,
        "timestamp": t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "received_at": t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "customer_id": format!("cus_{customer:04}"),
        "user_id": format!("u{user}"),
        "properties": {"amount": (rand(r) % 100_000) as f64 / 100.0, "plan": PLANS[(customer % 3) as usize]},
        "context": {
            "user_agent": UAS[(rand(r) % UAS.len() as u64) as usize],
            "referrer": referrer,
            "page_url": format!("https://app.example.com/pricing{utm}"),
            "ip": format!("203.0.{}.{}", rand(r) % 256, rand(r) % 256),
        },
    })
}

/// The queries: name, Sluice SQL, DuckDB SQL.
fn queries() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "counts_by_type_and_day",
            "SELECT type, date_trunc('day', timestamp) AS d, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 1, 2",
            "SELECT type, date_trunc('day', timezone('UTC', timestamp)) AS d, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 1, 2",
        ),
        (
            "distinct_users_per_customer",
            "SELECT customer_id, count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20",
            "SELECT customer_id, count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20",
        ),
        (
            "funnel_window",
            "WITH s AS (SELECT type, lead(type) OVER (PARTITION BY user_id ORDER BY timestamp, id) AS next FROM events \
             WHERE type IN ('page', 'signup', 'purchase')) SELECT type, next, count(*) AS n FROM s GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
            "WITH s AS (SELECT type, lead(type) OVER (PARTITION BY user_id ORDER BY timestamp, id) AS next FROM events \
             WHERE type IN ('page', 'signup', 'purchase')) SELECT type, next, count(*) AS n FROM s GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
        ),
        (
            "top_referrers",
            "SELECT referrer_source, referrer_medium, count(*) AS n FROM events WHERE referrer_medium IS NOT NULL GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
            "SELECT referrer_source, referrer_medium, count(*) AS n FROM events WHERE referrer_medium IS NOT NULL GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
        ),
        (
            "p95_amount",
            "SELECT approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY p_amount) AS p95 FROM events WHERE content_type = 'purchase'",
            "SELECT approx_quantile(p_amount, 0.95) AS p95 FROM events WHERE content_type = 'purchase'",
        ),
        (
            "join_customers",
            "SELECT c.plan, count(*) AS n, count(DISTINCT e.user_id) AS users FROM events e JOIN customers c ON e.customer_id = c.customer_id \
             WHERE e.type = 'api.call' GROUP BY 1 ORDER BY 1",
            "SELECT c.plan, count(*) AS n, count(DISTINCT e.user_id) AS users FROM events e JOIN customers c ON e.customer_id = c.customer_id \
             WHERE e.type = 'api.call' GROUP BY 1 ORDER BY 1",
        ),
        (
            "daily_active_users",
            "SELECT date_trunc('day', timestamp) AS d, count(DISTINCT user_id) AS dau FROM events GROUP BY 1 ORDER BY 1",
            "SELECT date_trunc('day', timezone('UTC', timestamp)) AS d, count(DISTINCT user_id) AS dau FROM events GROUP BY 1 ORDER BY 1",
        ),
        (
            "utm_campaigns",
            "SELECT utm_source, utm_campaign, count(*) AS n FROM events WHERE utm_source IS NOT NULL GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
            "SELECT utm_source, utm_campaign, count(*) AS n FROM events WHERE utm_source IS NOT NULL GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
        ),
        (
            "devices_and_browsers",
            "SELECT ua_device, ua_browser, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 3 DESC",
            "SELECT ua_device, ua_browser, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 3 DESC",
        ),
        (
            "one_day_pruned",
            "SELECT hour, count(*) AS n, sum(p_amount) AS amount FROM events WHERE content_type = 'purchase' \
             AND timestamp >= '2026-01-10T00:00:00Z' AND timestamp < '2026-01-11T00:00:00Z' GROUP BY 1 ORDER BY 1",
            "SELECT hour, count(*) AS n, sum(p_amount) AS amount FROM events WHERE content_type = 'purchase' \
             AND timestamp >= TIMESTAMPTZ '2026-01-10T00:00:00Z' AND timestamp < TIMESTAMPTZ '2026-01-11T00:00:00Z' GROUP BY 1 ORDER BY 1",
        ),
    ]
}

pub async fn run(args: LakeBenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let store = Store::connect(&format!("sqlite://{}", dir.join("state.db").display())).await?;
    let log_dir = dir.join("log");
    let log: Arc<dyn EventLog> =
        Arc::new(tokio::task::spawn_blocking(move || sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(log_dir, 4))).await??);
    let partitions = log.partitions();
    let root = dir.join("lake");

    // Customers (as Segment `group` calls would make them) and a typed property.
    let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse()?;
    let effects: Vec<RecordEffect> = (0..1000)
        .map(|c| RecordEffect::UpsertCustomer {
            workspace: "bench".into(),
            customer_id: format!("cus_{c:04}"),
            attributes: json!({"name": format!("Customer {c}"), "plan": PLANS[c % 3]}).as_object().cloned().unwrap_or_default(),
            at: start,
        })
        .collect();
    store.apply_log_effects(&effects, &[]).await?;
    let customers_csv = dir.join("customers.csv");
    let mut csv = String::from("customer_id,name,plan\n");
    for c in 0..1000 {
        csv.push_str(&format!("cus_{c:04},Customer {c},{}\n", PLANS[c % 3]));
    }
    std::fs::write(&customers_csv, csv)?;
    let schema = EventSchema {
        workspace: "bench".into(),
        event_type: "purchase".into(),
        properties: vec![("amount".into(), "float64".into())],
        enforce: true,
        updated_at: Utc::now(),
    };
    store.put_event_schema(&schema).await?;
    let schemas = sluice_ingest::Schemas::load(&store).await?;

    // Generate and append (not timed as lake writing).
    eprintln!("generating {} events over 30 days …", args.events);
    let t = Instant::now();
    let mut r = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = 0usize;
    for chunk_start in (0..args.events).step_by(20_000) {
        let end = (chunk_start + 20_000).min(args.events);
        let recs: Vec<AppendRecord> = (chunk_start..end)
            .map(|i| {
                let e = event(i, start, 30 * 86_400, args.events, &mut r);
                let payload = serde_json::to_vec(&e).expect("json");
                bytes += payload.len();
                let p = sluice_core::partition_for("bench", e["customer_id"].as_str(), e["id"].as_str().unwrap_or(""), partitions);
                AppendRecord { partition: p, timestamp_ms: Utc::now().timestamp_millis(), payload: Bytes::from(payload) }
            })
            .collect();
        log.append(recs).await?;
    }
    eprintln!("  appended {} events ({:.0} MB of JSON) in {:.1} s", args.events, bytes as f64 / 1e6, t.elapsed().as_secs_f64());

    // The lake writer drains the log.
    let (stop, stop_rx) = tokio::sync::watch::channel(true);
    let writer = sluice_lake::writer::LakeWriter {
        log: log.clone(),
        store: store.clone(),
        schemas: schemas.clone(),
        cfg: sluice_lake::writer::WriterConfig {
            root: root.clone(),
            flush_interval: Duration::from_secs(3600),
            flush_bytes: 64 << 20,
            row_group_rows: 131_072,
        },
        bursts: sluice_core::Bursts::default(),
    };
    let t = Instant::now();
    writer.run(stop_rx).await;
    drop(stop);
    let write_secs = t.elapsed().as_secs_f64();
    let files = store.lake_files(Some("bench")).await?;
    let file_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let rows: u64 = files.iter().map(|f| f.row_count).sum();
    anyhow::ensure!(rows == args.events as u64, "the lake holds {rows} rows, expected {}", args.events);
    println!(
        "lake writer: {} events in {:.2} s = {:.0} events/s; {} files, {:.0} MB Parquet",
        args.events,
        write_secs,
        args.events as f64 / write_secs,
        files.len(),
        file_bytes as f64 / 1e6
    );

    // Compaction of every (closed) partition, then the share of files that
    // are at the target size or the whole partition.
    let ccfg =
        sluice_lake::compact::CompactConfig { root: root.clone(), target_bytes: 64 << 20, closed_after: Duration::ZERO, row_group_rows: 131_072 };
    let guard = sluice_lake::sql::FileGuard::default();
    let t = Instant::now();
    let parts = sluice_lake::compact::candidates(store.lake_files(Some("bench")).await?, Utc::now(), &ccfg);
    let (mut merged, mut written) = (0u64, 0usize);
    for part in parts {
        let (n, out) = sluice_lake::compact::compact_partition(&store, &ccfg, &guard, part).await.map_err(anyhow::Error::msg)?;
        merged += n;
        written += out.len();
    }
    let files = store.lake_files(Some("bench")).await?;
    let mut per_part: std::collections::HashMap<(String, DateTime<Utc>), usize> = std::collections::HashMap::new();
    for f in &files {
        *per_part.entry((f.content_type.clone(), f.hour_start)).or_default() += 1;
    }
    let good = files.iter().filter(|f| f.bytes >= ccfg.target_bytes || per_part[&(f.content_type.clone(), f.hour_start)] == 1).count();
    println!(
        "compaction: {merged} files merged into {written} in {:.1} s; {} files in {} partitions; {:.1} % are >= 64 MiB or the whole partition",
        t.elapsed().as_secs_f64(),
        files.len(),
        per_part.len(),
        100.0 * good as f64 / files.len().max(1) as f64
    );

    // Queries: Sluice beside DuckDB.
    let sql = sluice_lake::sql::SqlEngine::new(
        store.clone(),
        log.clone(),
        schemas,
        root.clone(),
        sluice_lake::sql::FileGuard::default(),
        sluice_lake::sql::SqlLimits {
            timeout: Duration::from_secs(600),
            max_rows: 1_000_000,
            max_bytes: 1 << 30,
            memory: 8 << 30,
            max_tail_events: 1_000_000,
            max_live_rows: 10_000_000,
        },
    );
    let qs = queries();
    let mut ours = Vec::new();
    for (name, q, _) in &qs {
        let mut best = f64::MAX;
        let mut n = 0;
        for _ in 0..args.runs.max(1) {
            let t = Instant::now();
            let r = sql.query("bench", q).await.map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            best = best.min(t.elapsed().as_secs_f64());
            n = r.rows;
        }
        ours.push((name.to_string(), best, n));
    }
    let qfile = dir.join("queries.json");
    let map: serde_json::Map<String, serde_json::Value> = qs.iter().map(|(n, _, d)| (n.to_string(), json!(d))).collect();
    std::fs::write(&qfile, serde_json::to_vec(&map)?)?;
    let script = dir.join("lake_duckdb.py");
    std::fs::write(&script, DUCKDB_SCRIPT)?;
    let out = std::process::Command::new(&args.python)
        .arg(&script)
        .arg(&root)
        .arg("bench")
        .arg(&customers_csv)
        .arg(&qfile)
        .arg(args.runs.max(1).to_string())
        .output()
        .with_context(|| format!("running {} (needs the duckdb package)", args.python))?;
    anyhow::ensure!(out.status.success(), "DuckDB reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let duck: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("\n{:<30} {:>10} {:>10} {:>8} {:>8}", "query", "sluice s", "duckdb s", "ratio", "rows");
    let mut log_sum = 0.0;
    for (name, secs, n) in &ours {
        let d = duck[name]["seconds"].as_f64().unwrap_or(f64::NAN);
        let ratio = secs / d;
        log_sum += ratio.ln();
        let dn = duck[name]["rows"].as_u64().unwrap_or(0);
        let check = if dn as usize == *n { "" } else { "  (row counts differ!)" };
        println!("{name:<30} {secs:>10.3} {d:>10.3} {ratio:>8.2} {n:>8}{check}");
    }
    println!("{:<30} {:>41.2}", "geometric mean of ratios", (log_sum / ours.len() as f64).exp());
    store.close().await;
    Ok(())
}
