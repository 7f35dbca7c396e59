//! `sluice customers …` and `sluice health …`: customer health from the
//! command line, over the HTTP API (like `billing_cli.rs`; `--url`/`SLUICE_URL`
//! and `--key`/`SLUICE_KEY`).
//!
//! - `customers list`: customers by health (`GET /v1/customers` with
//!   `band`, `stage`, `sort`), as a table: id, stage, band, score, priority
//!   and the `mrr` attribute;
//! - `customers why <id>`: one customer's health (`GET
//!   /v1/customers/{id}/health`, live or `--as-of`): the stage and the rule
//!   or override that decided it, the score and band, each measure's value,
//!   points, weight and contribution (they add up to the score) and the
//!   explanation's sentences;
//! - `health config apply|show`: `PUT`/`GET /v1/health/config`; an invalid
//!   configuration prints each bad part by its path (`measures.x.days: …`)
//!   and exits with status 1;
//! - `health backtest`: `POST /v1/health/backtest`, follows the job with a
//!   progress bar on stderr, then prints churn per band and the AUC.
//!
//! Tables are aligned text (numbers right-aligned), as `sluice sql` prints;
//! `--format json` prints the API's JSON instead.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_client::{urlencode, ClientError};

use crate::billing_cli::{read_json, s};
use crate::client::{progress, Conn};

#[derive(Subcommand)]
pub enum CustomersCmd {
    /// List customers with their health (stage, band, score, priority, mrr).
    List {
        /// Only customers in this band.
        #[arg(long, value_parser = ["bad", "normal", "good"])]
        band: Option<String>,
        /// Only customers in this stage.
        #[arg(long)]
        stage: Option<String>,
        /// `priority` (highest first: (100 − score) / 100 × mrr), `score`
        /// (lowest first), `-score` (highest first) or `id` (the default).
        #[arg(long, value_parser = ["priority", "score", "-score", "id"], allow_hyphen_values = true)]
        sort: Option<String>,
        /// At most this many customers (default: all).
        #[arg(long)]
        limit: Option<usize>,
        /// `table` (default) or `json` (the API's rows, one JSON array).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Why a customer has its stage, score and band: every measure's
    /// value, points, weight and contribution, and the explanation.
    Why {
        /// Customer id.
        id: String,
        /// Evaluate at this past time (RFC 3339) instead of now.
        #[arg(long)]
        as_of: Option<String>,
        /// Evaluate with this configuration version (default: the current one).
        #[arg(long)]
        config_version: Option<i64>,
        /// `table` (default) or `json` (the API's health document).
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum HealthCmd {
    /// The health configuration: apply a new version, show one.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Replay history under a configuration (the current one, or --config)
    /// and print churn per band and the AUC; nothing live changes.
    Backtest(BacktestArgs),
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Apply a configuration from a JSON file (`-`: stdin) as a new version;
    /// every customer is recomputed by a job (exit status 1 if invalid).
    Apply {
        /// File with the configuration's JSON.
        file: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a configuration's JSON (stdout) and its version (stderr).
    // Its own --version (the configuration's) replaces the program's.
    #[command(disable_version_flag = true)]
    Show {
        /// A version (default: the current one).
        #[arg(long)]
        version: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sluice health backtest`.
#[derive(Args)]
pub struct BacktestArgs {
    /// First step (RFC 3339).
    #[arg(long)]
    from: String,
    /// Last step (RFC 3339).
    #[arg(long)]
    to: String,
    /// Days between steps (server default 7).
    #[arg(long)]
    step_days: Option<u32>,
    /// A churn within this many days after a step counts (server default 30).
    #[arg(long)]
    horizon_days: Option<u32>,
    /// The attribute with the churn date (server default `churned_at`).
    #[arg(long)]
    outcome_attribute: Option<String>,
    /// Test this configuration (a JSON file, `-`: stdin) instead of the current one.
    #[arg(long)]
    config: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `sluice customers …`.
pub fn customers(cmd: CustomersCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            CustomersCmd::List { band, stage, sort, limit, format, conn } => list(&conn, band, stage, sort, limit, &format).await,
            CustomersCmd::Why { id, as_of, config_version, format, conn } => {
                let mut q = vec![];
                if let Some(t) = &as_of {
                    q.push(format!("as_of={}", urlencode(t)));
                }
                if let Some(v) = config_version {
                    q.push(format!("config_version={v}"));
                }
                let q = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
                let h = conn.client()?.get_json(&format!("/v1/customers/{}/health{q}", urlencode(&id))).await?;
                if format == "json" {
                    return crate::billing_cli::print(&h);
                }
                print!("{}", why(&h));
                Ok(())
            }
        }
    })
}

/// Runs `sluice health …`.
pub fn health(cmd: HealthCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            HealthCmd::Config(ConfigCmd::Apply { file, conn }) => {
                let cfg = read_json(&file)?;
                let v = conn
                    .client()?
                    .call(Method::PUT, "/v1/health/config", Some(cfg))
                    .await
                    .map_err(|e| invalid(&format!("the configuration in {file}"), e))?;
                let job = s(&v["recompute_job"]["id"]);
                println!("applied health configuration version {}", s(&v["version"]));
                println!("recompute job {job} (follow it with `sluice jobs watch {job}`)");
                Ok(())
            }
            HealthCmd::Config(ConfigCmd::Show { version, conn }) => {
                let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
                let v = conn.client()?.get_json(&format!("/v1/health/config{q}")).await?;
                eprintln!("health configuration version {}, created {} by {}", s(&v["version"]), s(&v["created_at"]), or_dash(&v["created_by"]));
                crate::billing_cli::print(&v["config"])
            }
            HealthCmd::Backtest(args) => backtest(args).await,
        }
    })
}

async fn list(conn: &Conn, band: Option<String>, stage: Option<String>, sort: Option<String>, limit: Option<usize>, format: &str) -> Result<()> {
    if limit == Some(0) {
        bail!("--limit: give at least 1");
    }
    let client = conn.client()?;
    let filters: String =
        [("band", band), ("stage", stage), ("sort", sort)].into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}&", urlencode(&v)))).collect();
    let mut rows: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_limit = limit.map_or(1000, |l| (l - rows.len()).min(1000));
        let mut path = format!("/v1/customers?{filters}limit={page_limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", urlencode(c)));
        }
        let page = client.get_json(&path).await?;
        rows.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) if limit.is_none_or(|l| rows.len() < l) => cursor = Some(c.to_owned()),
            _ => break,
        }
    }
    rows.truncate(limit.unwrap_or(usize::MAX));
    if format == "json" {
        return crate::billing_cli::print(&Value::Array(rows));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| vec![s(&r["customer_id"]), s(&r["stage"]), s(&r["band"]), s(&r["score"]), s(&r["priority"]), s(&r["attributes"]["mrr"])])
        .collect();
    print!("{}", table(&["customer_id", "stage", "band", "score", "priority", "mrr"], &cells, &[3, 4, 5]));
    eprintln!("({} customer{})", rows.len(), if rows.len() == 1 { "" } else { "s" });
    Ok(())
}

/// The text of `customers why`: a health document explained.
fn why(h: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<10}{v}\n", format!("{k}:")));
    line("customer", s(&h["customer_id"]));
    let since = h["stage_since"].as_str().map(|t| format!(", since {t}")).unwrap_or_default();
    let stage = match h["stage_reason"].as_str() {
        Some("override") => {
            let o = &h["override"];
            let mut by = format!("set by hand by {}", or_dash(&o["set_by"]));
            if let Some(r) = o["reason"].as_str() {
                by.push_str(&format!(": {r:?}"));
            }
            if let Some(u) = o["until"].as_str() {
                by.push_str(&format!(", until {u}"));
            }
            format!("{} (override, {by}){since}", s(&h["stage"]))
        }
        Some("rule") => format!("{} (rule: {}){since}", s(&h["stage"]), serde_json::to_string(&h["stage_rule"]).unwrap_or_default()),
        _ if h["stage"].is_null() => "- (no stage's rule holds)".into(),
        _ => format!("{}{since}", s(&h["stage"])),
    };
    line("stage", stage);
    line("score", if h["score"].is_null() { "- (no score)".into() } else { s(&h["score"]) });
    line("band", or_dash(&h["band"]));
    if !h["priority"].is_null() {
        line("priority", format!("{} (value {})", s(&h["priority"]), s(&h["value"])));
    }
    line("as of", format!("{} (configuration version {})", s(&h["as_of"]), s(&h["config_version"])));
    let measures = h["measures"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = measures
        .iter()
        .map(|m| {
            let share = m["effective_weight"].as_f64().filter(|_| !m["weight"].is_null()).map(|w| format!("{:.1}%", w * 100.0)).unwrap_or_default();
            vec![s(&m["name"]), or_dash(&m["value"]), s(&m["points"]), s(&m["weight"]), share, s(&m["contribution"]), s(&m["note"])]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["measure", "value", "points", "weight", "share", "contribution", "note"], &rows, &[1, 2, 3, 4, 5]));
    if !h["score"].is_null() {
        let sum: Decimal = measures.iter().filter_map(|m| decimal(&m["contribution"])).sum();
        let score = decimal(&h["score"]);
        if score == Some(sum) {
            out.push_str(&format!("the contributions add up to the score, {}\n", s(&h["score"])));
        } else {
            out.push_str(&format!("the contributions add up to {}; the score is {}\n", sum.normalize(), s(&h["score"])));
        }
    }
    let notes = h["explanation"].as_array().cloned().unwrap_or_default();
    if !notes.is_empty() {
        out.push_str("\nexplanation:\n");
        for n in &notes {
            out.push_str(&format!("  - {}\n", s(n)));
        }
    }
    out
}

async fn backtest(a: BacktestArgs) -> Result<()> {
    let mut body = json!({"from": a.from, "to": a.to});
    if let Some(d) = a.step_days {
        body["step_days"] = json!(d);
    }
    if let Some(d) = a.horizon_days {
        body["horizon_days"] = json!(d);
    }
    if let Some(o) = &a.outcome_attribute {
        body["outcome_attribute"] = json!(o);
    }
    if let Some(f) = &a.config {
        body["config"] = read_json(f)?;
    }
    let client = a.conn.client()?;
    let job = client.call(Method::POST, "/v1/health/backtest", Some(body)).await.map_err(|e| invalid("the backtest", e))?;
    let id = s(&job["id"]);
    eprintln!("backtest {id}");
    let bar = progress::bar("{msg:10} [{bar:30}] {pos}/{len} customers {percent}% ETA {eta}");
    let bt = loop {
        let j = client.get_json(&format!("/v1/health/backtests/{}", urlencode(&id))).await?;
        bar.set_length(j["progress"]["total"].as_u64().unwrap_or(0));
        bar.set_position(j["progress"]["done"].as_u64().unwrap_or(0));
        bar.set_message(s(&j["status"]));
        if matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            bar.finish();
            break j;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if bt["status"] != "succeeded" {
        bail!("backtest {id} ended {}: {}", s(&bt["status"]), s(&bt["error"]));
    }
    let steps = bt["steps"].as_u64().unwrap_or(0);
    println!(
        "backtest {id}: {steps} step{}, {} customer-steps scored, {} without a score",
        if steps == 1 { "" } else { "s" },
        s(&bt["samples"]),
        s(&bt["unscored"])
    );
    let rows: Vec<Vec<String>> = bt["bands"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            vec![
                s(&b["band"]),
                s(&b["customers"]),
                s(&b["churned"]),
                b["churn_rate"].as_f64().map(|r| format!("{r:.4}")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!("{}", table(&["band", "customers", "churned", "churn_rate"], &rows, &[1, 2, 3]));
    match bt["auc"].as_f64() {
        Some(auc) => println!("AUC: {auc:.4}"),
        None => println!("AUC: - (needs customers who churned and customers who did not)"),
    }
    Ok(())
}

/// A 400 with per-field details as one line per bad part (`path: reason`);
/// any other error as it is.
fn invalid(what: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { status: 400, details, .. } if !details.is_empty() => {
            let parts: String = details
                .iter()
                .map(|d| match d["path"].as_str().filter(|p| !p.is_empty()) {
                    Some(p) => format!("\n  {p}: {}", s(&d["reason"])),
                    None => format!("\n  {}", s(&d["reason"])),
                })
                .collect();
            anyhow!("{what} is invalid:{parts}")
        }
        ClientError::Api { status: 400, message, .. } => anyhow!("{what} is invalid: {message}"),
        e => e.into(),
    }
}

/// Aligned text columns, ` | ` between them, a rule under the header;
/// the columns in `right` are right-aligned (numbers).
fn table(headers: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let widths: Vec<usize> =
        (0..headers.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).chain([headers[i].chars().count()]).max().unwrap_or(0)).collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| if right.contains(&i) { format!("{c:>w$}") } else { format!("{c:<w$}") })
            .collect();
        // An empty last cell (a measure without a note) leaves no dangling `|`.
        let text = padded.join(" | ");
        let text = text.trim_end();
        text.strip_suffix(" |").unwrap_or(text).trim_end().to_owned() + "\n"
    };
    let mut out = line(&headers.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    out.push_str(&(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-") + "\n"));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Like [`s`], with `-` for null.
fn or_dash(v: &Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        s(v)
    }
}

/// A JSON number as an exact decimal (contributions have 4 decimals; a
/// float sum could miss the score by 1e-15).
fn decimal(v: &Value) -> Option<Decimal> {
    let t = v.as_number()?.to_string();
    t.parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&t).ok())
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}
