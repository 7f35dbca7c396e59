//! `sluice bench billing` (issue 8): N subscriptions on three metered
//! charges (graduated, volume, package) and a fixed fee, their usage already
//! metered, billed by one run: invoices finalized and numbered. Beside it,
//! in the same run, a single PostgreSQL statement computes the same totals
//! from the same usage (the reference), and the two sums of totals must be
//! equal. Also `GET /v1/subscriptions/{id}/upcoming-invoice` latencies.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::{Datelike, TimeZone};
use clap::Args;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_client::Client;

#[derive(Args, Clone)]
pub struct BillingBenchArgs {
    /// Subscriptions (one customer each).
    #[arg(long, default_value_t = 100_000)]
    subscriptions: usize,
    /// State store of the server started here (default: SQLite in the temp
    /// dir). For PostgreSQL give an empty database.
    #[arg(long)]
    state_url: Option<String>,
    /// psql connection string of the PostgreSQL server that runs the
    /// reference statement (a scratch database is made and dropped there).
    #[arg(long, default_value = "postgresql://postgres@127.0.0.1:5432/postgres")]
    reference: String,
}

/// The plan: a fixed fee and one charge of each tiered model, all at 10 %.
fn plan() -> Value {
    json!({"code": "bench", "name": "Bench", "currency": "JPY", "interval": "month",
        "fixed_fees": [{"name": "Base fee", "amount": "10000", "tax_rate": "0.10"}],
        "charges": [
            {"meter": "storage_gb", "model": "graduated", "tax_rate": "0.10",
             "tiers": [{"up_to": "100", "unit_price": "0"}, {"up_to": "1000", "unit_price": "5"}, {"up_to": null, "unit_price": "3"}]},
            {"meter": "api_calls", "model": "volume", "tax_rate": "0.10",
             "tiers": [{"up_to": "10000", "unit_price": "0.5"}, {"up_to": null, "unit_price": "0.2"}]},
            {"meter": "seats", "model": "package", "package_size": "10", "package_price": "3000", "tax_rate": "0.10"}]})
}

/// The same totals in one SQL statement: each line rounded half up to the
/// yen, tax at 10 % floored once per invoice, summed over subscriptions.
const REFERENCE_SQL: &str = "WITH q AS (SELECT subscription_id, \
    COALESCE(SUM(quantity) FILTER (WHERE meter = 'storage_gb'), 0) AS storage, \
    COALESCE(SUM(quantity) FILTER (WHERE meter = 'api_calls'), 0) AS api, \
    COALESCE(SUM(quantity) FILTER (WHERE meter = 'seats'), 0) AS seats FROM usage GROUP BY subscription_id), \
  t AS (SELECT 10000 \
    + ROUND(GREATEST(LEAST(storage, 1000) - 100, 0) * 5 + GREATEST(storage - 1000, 0) * 3, 0) \
    + ROUND(CASE WHEN api = 0 THEN 0 WHEN api <= 10000 THEN api * 0.5 ELSE api * 0.2 END, 0) \
    + CEIL(seats / 10.0) * 3000 AS subtotal FROM q) \
  SELECT count(*), SUM(subtotal + FLOOR(subtotal * 0.10)) FROM t";

fn quantities(i: usize) -> [(&'static str, usize); 3] {
    [("storage_gb", (i * 37) % 1500), ("api_calls", (i * 7919) % 20_000), ("seats", i % 25)]
}

fn psql(conn: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("psql")
        .arg(conn)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
        .context("running psql (Debian's postgresql-client) for the reference statement")?;
    if !out.status.success() {
        bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn run(args: BillingBenchArgs) -> Result<()> {
    let n = args.subscriptions;
    let (url, key, mut server) = super::spawn_server(args.state_url.as_deref()).await?;
    let root = Client::new(&url, Some(&key))?;
    root.create_workspace("bench", Some("Asia/Tokyo")).await.context("creating the workspace")?;
    let admin = root.create_key("bench", sluice_core::Scope::Admin, Some("bench")).await?.secret;
    let client = Client::new(&url, Some(&admin))?;
    for m in ["storage_gb", "api_calls", "seats"] {
        client.call(Method::POST, "/v1/meters", Some(json!({"key": m, "event_type": m, "aggregation": "sum", "value_property": "n"}))).await?;
    }
    client.call(Method::POST, "/v1/plans", Some(plan())).await.context("creating the plan")?;
    // Last month in Tokyo: it has ended, so every subscription is due.
    let jst = chrono::FixedOffset::east_opt(9 * 3600).context("offset")?;
    let today = chrono::Utc::now().with_timezone(&jst).date_naive();
    let this_month = chrono::NaiveDate::from_ymd_opt(today.year(), today.month(), 1).context("date")?;
    let last_month = this_month.checked_sub_months(chrono::Months::new(1)).context("date")?;
    let at = |d: chrono::NaiveDate, h: u32| jst.from_local_datetime(&d.and_hms_opt(h, 0, 0).unwrap_or_default()).single().map(|t| t.to_rfc3339());
    let (start, until, mid) =
        (at(last_month, 0).context("start")?, at(this_month, 0).context("until")?, at(last_month + chrono::Days::new(14), 12).context("mid")?);
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let subs: Vec<Value> =
            chunk.iter().map(|i| json!({"id": format!("s{i:07}"), "customer_id": format!("c{i:07}"), "plan": "bench", "start": start})).collect();
        client.call(Method::POST, "/v1/subscriptions", Some(Value::Array(subs))).await.context("creating subscriptions")?;
    }
    eprintln!("{n} subscriptions created in {:.1} s", t.elapsed().as_secs_f64());
    // Usage: three rows per subscription, imported and metered.
    let mut csv = String::with_capacity(n * 3 * 60);
    csv.push_str("customer_id,subscription_id,meter,timestamp,quantity\n");
    let dir = tempfile::tempdir()?;
    let ref_csv = dir.path().join("usage.csv");
    let mut reference = std::io::BufWriter::new(std::fs::File::create(&ref_csv)?);
    for i in 0..n {
        for (meter, q) in quantities(i) {
            csv.push_str(&format!("c{i:07},s{i:07},{meter},{mid},{q}\n"));
            writeln!(reference, "s{i:07},{meter},{q}")?;
        }
    }
    reference.flush()?;
    drop(reference);
    let t = Instant::now();
    let import = client.import_usage(csv.into(), "strict", false).await?;
    loop {
        let i = client.import(&import.id).await?;
        match i.status {
            sluice_core::JobState::Succeeded => break,
            s if s.is_terminal() => bail!("usage import ended {s}: {i:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    while super::consumer_lag(&client, "meters").await? > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} usage rows imported and metered in {:.1} s", n * 3, t.elapsed().as_secs_f64());

    // The run.
    let t = Instant::now();
    let run = client.call(Method::POST, "/v1/billing-runs", Some(json!({"filter": {"due": true}, "until": until}))).await?;
    let id = run["id"].as_str().context("run id")?.to_owned();
    let run = loop {
        let r = client.get_json(&format!("/v1/billing-runs/{id}")).await?;
        if matches!(r["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let billed = t.elapsed().as_secs_f64();
    ensure!(run["status"] == "succeeded", "the run ended {}: {}", run["status"], run["error"]);
    ensure!(run["invoices_created"] == json!(n), "invoices created: {} of {n}; errors {}", run["invoices_created"], run["errors"]);
    // Every invoice's total, read back through SQL over the live table.
    let sums = client.call(Method::POST, "/v1/sql", Some(json!({"query": "SELECT count(*) AS n, sum(total) AS total, count(DISTINCT number) AS numbers FROM invoices WHERE status = 'finalized'"}))).await?;
    let row = &sums["data"][0];
    let sluice_total: Decimal = row["total"].to_string().trim_matches('"').parse().context("sum of totals")?;
    ensure!(row["n"] == json!(n) && row["numbers"] == json!(n), "finalized and numbered: {row}");

    // upcoming-invoice latency (the current period, from usage so far).
    let mut lat = Vec::new();
    for k in 0..200 {
        let t = Instant::now();
        client.get_json(&format!("/v1/subscriptions/s{:07}/upcoming-invoice", (k * 7919) % n)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);

    // The reference: the same usage in a scratch PostgreSQL database, one statement.
    let db = format!("sluice_bench_ref_{}", std::process::id());
    psql(&args.reference, &["-c", &format!("CREATE DATABASE {db}")])?;
    let ref_conn = {
        let base = args.reference.rsplit_once('/').map(|(b, _)| b).unwrap_or(&args.reference);
        format!("{base}/{db}")
    };
    let result = (|| -> Result<(f64, String)> {
        psql(&ref_conn, &["-c", "CREATE TABLE usage (subscription_id text, meter text, quantity numeric)"])?;
        psql(&ref_conn, &["-c", &format!("\\copy usage FROM '{}' WITH (FORMAT csv)", ref_csv.display())])?;
        psql(&ref_conn, &["-c", "ANALYZE usage"])?;
        // Best of three, as psql's \timing reports it (server round trip).
        let mut best = f64::MAX;
        let mut answer = String::new();
        for _ in 0..3 {
            let out = psql(&ref_conn, &["-A", "-t", "-c", "\\timing on", "-c", REFERENCE_SQL])?;
            let ms: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix("Time: "))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .context("psql timing")?;
            best = best.min(ms);
            answer = out.lines().next().unwrap_or_default().to_owned();
        }
        Ok((best / 1000.0, answer))
    })();
    let _ = psql(&args.reference, &["-c", &format!("DROP DATABASE IF EXISTS {db}")]);
    let (ref_s, answer) = result?;
    let ref_total: Decimal = answer.split('|').nth(1).map(str::trim).context("reference answer")?.parse()?;
    ensure!(ref_total == sluice_total, "the totals differ: Sluice {sluice_total}, the reference statement {ref_total}");
    let store = if args.state_url.as_deref().is_some_and(|u| u.starts_with("postgres")) { "PostgreSQL" } else { "SQLite" };
    println!("| state store | subscriptions | run (s) | invoices/s | reference statement (s) | run / reference | sum of totals (equal) | upcoming-invoice p50 / p99 (ms) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {store} | {n} | {billed:.2} | {:.0} | {ref_s:.3} | {:.1}× | {sluice_total} | {:.1} / {:.1} |",
        n as f64 / billed,
        billed / ref_s,
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
    let _ = server.child.kill().await;
    Ok(())
}
