//! `sluice plans|subscriptions|invoices|billing …`: billing from the
//! command line, over the HTTP API (docs/billing.md).

use std::io::Read as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};
use sluice_client::{urlencode, Client};

use crate::client::{progress, Conn};

#[derive(Subcommand)]
pub enum PlansCmd {
    /// List plans (latest versions).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a plan.
    // Its own --version (the plan's) replaces the program's.
    #[command(disable_version_flag = true)]
    Show {
        /// Plan code.
        code: String,
        /// A version (default: the latest).
        #[arg(long)]
        version: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create a plan, or a new version of one, from a JSON file (`-`: stdin).
    Create {
        /// File with the plan's JSON.
        file: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum SubscriptionsCmd {
    /// List subscriptions.
    List {
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
        /// Only those on this plan.
        #[arg(long)]
        plan: Option<String>,
        /// Only this status (active, trialing, cancelled, ended).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a subscription.
    Show {
        /// Subscription id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Create one subscription (a JSON object) or many (a JSON array) from a file (`-`: stdin).
    Create {
        /// File with the JSON.
        file: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a subscription to another plan.
    Change {
        /// Subscription id.
        id: String,
        /// The new plan's code.
        #[arg(long)]
        plan: String,
        /// `now` (default) or an RFC 3339 time.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a subscription.
    Cancel {
        /// Subscription id.
        id: String,
        /// `period_end` (default), `now` or an RFC 3339 time.
        #[arg(long)]
        at: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The current period's invoice from usage so far.
    Upcoming {
        /// Subscription id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum InvoicesCmd {
    /// List invoices.
    List {
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
        /// Only this subscription's.
        #[arg(long)]
        subscription: Option<String>,
        /// Only this status (draft, finalized, paid, void).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show an invoice (JSON).
    Show {
        /// Invoice id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Save an invoice as PDF.
    Pdf {
        /// Invoice id.
        id: String,
        /// Output file.
        #[arg(short, long)]
        output: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Save an invoice as HTML.
    Html {
        /// Invoice id.
        id: String,
        /// Output file.
        #[arg(short, long)]
        output: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Finalize a draft (numbers it).
    Finalize {
        /// Invoice id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Void an invoice (it keeps its number).
    Void {
        /// Invoice id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Mark a finalized invoice paid.
    MarkPaid {
        /// Invoice id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum BillingCmd {
    /// Start a billing run, follow its progress, then print the summary and
    /// each failure (exit status 1 when any subscription failed).
    Run {
        /// Every subscription with an ended period not invoiced yet.
        #[arg(long)]
        due: bool,
        /// These subscriptions (repeat the flag).
        #[arg(long = "subscription")]
        subscriptions: Vec<String>,
        /// Only subscriptions on this plan.
        #[arg(long)]
        plan: Option<String>,
        /// Only these customers' subscriptions (repeat the flag).
        #[arg(long = "customer")]
        customers: Vec<String>,
        /// Bill periods ending by this RFC 3339 time; `now` also bills the current period early.
        #[arg(long)]
        until: Option<String>,
        /// Leave drafts instead of finalizing.
        #[arg(long)]
        no_finalize: bool,
        /// Print the invoices that would be made; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List billing runs, newest first.
    Runs {
        #[command(flatten)]
        conn: Conn,
    },
    /// Usage that no subscription bills, per customer, meter and reason
    /// (docs/billing.md, "Unattributed usage").
    Unattributed {
        /// Usage from this RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// Usage before this RFC 3339 time.
        #[arg(long)]
        to: Option<String>,
        /// Only this customer's.
        #[arg(long)]
        customer: Option<String>,
        /// Print the JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// A JSON file (`-`: stdin).
pub(crate) fn read_json(file: &str) -> Result<Value> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    }
    serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))
}

/// Pretty JSON on stdout.
pub(crate) fn print(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A JSON value as a cell: strings bare, null empty.
pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let q: Vec<String> = pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", urlencode(v)))).collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

async fn save(client: &Client, path: &str, output: &str) -> Result<()> {
    let resp = client.send(client.request(Method::GET, path)).await?;
    let bytes = resp.bytes().await?;
    std::fs::write(output, &bytes).with_context(|| format!("writing {output}"))?;
    eprintln!("wrote {output} ({} bytes)", bytes.len());
    Ok(())
}

pub fn plans(cmd: PlansCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            PlansCmd::List { conn } => {
                let rows: Vec<Value> = conn.client()?.list_all("/v1/plans").await?;
                println!("{:<20}  {:>7}  {:<8}  {:<8}  NAME", "CODE", "VERSION", "CURRENCY", "INTERVAL");
                for p in rows {
                    println!("{:<20}  {:>7}  {:<8}  {:<8}  {}", s(&p["code"]), s(&p["version"]), s(&p["currency"]), s(&p["interval"]), s(&p["name"]));
                }
                Ok(())
            }
            PlansCmd::Show { code, version, conn } => {
                let v = version.map(|v| format!("?version={v}")).unwrap_or_default();
                print(&conn.client()?.get_json(&format!("/v1/plans/{}{v}", urlencode(&code))).await?)
            }
            PlansCmd::Create { file, conn } => print(&conn.client()?.call(Method::POST, "/v1/plans", Some(read_json(&file)?)).await?),
        }
    })
}

pub fn subscriptions(cmd: SubscriptionsCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            SubscriptionsCmd::List { customer, plan, status, conn } => {
                let q = query(&[("customer_id", &customer), ("plan", &plan), ("status", &status)]);
                let rows: Vec<Value> = conn.client()?.list_all(&format!("/v1/subscriptions{q}")).await?;
                println!("{:<28}  {:<20}  {:<12}  {:<10}  {:<26}  NEXT INVOICE PERIOD", "ID", "CUSTOMER", "PLAN", "STATUS", "BILLED UNTIL");
                for r in rows {
                    println!(
                        "{:<28}  {:<20}  {:<12}  {:<10}  {:<26}  {} – {}",
                        s(&r["id"]),
                        s(&r["customer_id"]),
                        format!("{} v{}", s(&r["plan"]), s(&r["plan_version"])),
                        s(&r["status"]),
                        s(&r["billed_until"]),
                        s(&r["next_invoice_period_start"]),
                        s(&r["next_invoice_period_end"])
                    );
                }
                Ok(())
            }
            SubscriptionsCmd::Show { id, conn } => print(&conn.client()?.get_json(&format!("/v1/subscriptions/{}", urlencode(&id))).await?),
            SubscriptionsCmd::Create { file, conn } => print(&conn.client()?.call(Method::POST, "/v1/subscriptions", Some(read_json(&file)?)).await?),
            SubscriptionsCmd::Change { id, plan, at, conn } => {
                let body = json!({"plan": plan, "at": at});
                print(&conn.client()?.call(Method::POST, &format!("/v1/subscriptions/{}/change", urlencode(&id)), Some(body)).await?)
            }
            SubscriptionsCmd::Cancel { id, at, conn } => {
                let body = json!({"at": at});
                print(&conn.client()?.call(Method::POST, &format!("/v1/subscriptions/{}/cancel", urlencode(&id)), Some(body)).await?)
            }
            SubscriptionsCmd::Upcoming { id, conn } => {
                print(&conn.client()?.get_json(&format!("/v1/subscriptions/{}/upcoming-invoice", urlencode(&id))).await?)
            }
        }
    })
}

pub fn invoices(cmd: InvoicesCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            InvoicesCmd::List { customer, subscription, status, conn } => {
                let q = query(&[("customer_id", &customer), ("subscription_id", &subscription), ("status", &status)]);
                let rows: Vec<Value> = conn.client()?.list_all(&format!("/v1/invoices{q}")).await?;
                println!("{:<36}  {:<22}  {:<10}  {:<20}  {:<24}  {:>14}", "ID", "NUMBER", "STATUS", "SUBSCRIPTION", "PERIOD START", "TOTAL");
                for r in rows {
                    println!(
                        "{:<36}  {:<22}  {:<10}  {:<20}  {:<24}  {:>10} {}",
                        s(&r["id"]),
                        s(&r["number"]),
                        s(&r["status"]),
                        s(&r["subscription_id"]),
                        s(&r["period_start"]),
                        s(&r["total"]),
                        s(&r["currency"])
                    );
                }
                Ok(())
            }
            InvoicesCmd::Show { id, conn } => print(&conn.client()?.get_json(&format!("/v1/invoices/{}", urlencode(&id))).await?),
            InvoicesCmd::Pdf { id, output, conn } => save(&conn.client()?, &format!("/v1/invoices/{}.pdf", urlencode(&id)), &output).await,
            InvoicesCmd::Html { id, output, conn } => save(&conn.client()?, &format!("/v1/invoices/{}.html", urlencode(&id)), &output).await,
            InvoicesCmd::Finalize { id, conn } => {
                print(&conn.client()?.call(Method::POST, &format!("/v1/invoices/{}/finalize", urlencode(&id)), None).await?)
            }
            InvoicesCmd::Void { id, conn } => {
                print(&conn.client()?.call(Method::POST, &format!("/v1/invoices/{}/void", urlencode(&id)), None).await?)
            }
            InvoicesCmd::MarkPaid { id, conn } => {
                print(&conn.client()?.call(Method::POST, &format!("/v1/invoices/{}/mark-paid", urlencode(&id)), None).await?)
            }
        }
    })
}

pub fn billing(cmd: BillingCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            BillingCmd::Unattributed { from, to, customer, json, conn } => {
                let q = query(&[("from", &from), ("to", &to), ("customer_id", &customer)]);
                let r = conn.client()?.get_json(&format!("/v1/billing/unattributed-usage{q}")).await?;
                if json {
                    return print(&r);
                }
                let rows = r["data"].as_array().cloned().unwrap_or_default();
                println!(
                    "{:<20}  {:<16}  {:<22}  {:<20}  {:>12}  {:>8}  FROM … TO",
                    "CUSTOMER", "METER", "REASON", "SUBSCRIPTION", "QUANTITY", "EVENTS"
                );
                for r in &rows {
                    let subs = match r["subscription_ids"].as_array() {
                        Some(ids) if !ids.is_empty() => ids.iter().map(s).collect::<Vec<_>>().join(","),
                        _ => s(&r["subscription_id"]),
                    };
                    println!(
                        "{:<20}  {:<16}  {:<22}  {:<20}  {:>12}  {:>8}  {} … {}",
                        s(&r["customer_id"]),
                        s(&r["meter"]),
                        s(&r["reason"]),
                        subs,
                        s(&r["quantity"]),
                        s(&r["events"]),
                        s(&r["from"]),
                        s(&r["to"])
                    );
                }
                if rows.is_empty() {
                    eprintln!("every unit of usage on a charged meter is billed by a subscription");
                } else if r["truncated"] == true {
                    eprintln!("(more rows than shown: narrow --from/--to or ask per --customer)");
                }
                Ok(())
            }
            BillingCmd::Runs { conn } => {
                let rows: Vec<Value> = conn.client()?.list_all("/v1/billing-runs?order=desc").await?;
                println!("{:<36}  {:<10}  {:>15}  {:>8}  {:>6}  CREATED", "ID", "STATUS", "SUBSCRIPTIONS", "INVOICES", "ERRORS");
                for r in rows {
                    println!(
                        "{:<36}  {:<10}  {:>15}  {:>8}  {:>6}  {}",
                        s(&r["id"]),
                        s(&r["status"]),
                        format!("{}/{}", s(&r["subscriptions_done"]), s(&r["subscriptions_total"])),
                        s(&r["invoices_created"]),
                        r["errors"].as_array().map_or(0, Vec::len),
                        s(&r["created_at"])
                    );
                }
                Ok(())
            }
            BillingCmd::Run { due, subscriptions, plan, customers, until, no_finalize, dry_run, conn } => {
                let mut body = json!({"finalize": !no_finalize, "dry_run": dry_run});
                if let Some(u) = until {
                    body["until"] = json!(u);
                }
                if !subscriptions.is_empty() {
                    body["subscription_ids"] = json!(subscriptions);
                } else if due || plan.is_some() || !customers.is_empty() {
                    body["filter"] =
                        json!({"due": due, "plan": plan, "customer_ids": if customers.is_empty() { Value::Null } else { json!(customers) }});
                } else {
                    bail!("say what to bill: --due, --subscription ID, --plan CODE or --customer ID");
                }
                let client = conn.client()?;
                let run = client.call(Method::POST, "/v1/billing-runs", Some(body)).await?;
                if dry_run {
                    return print(&run);
                }
                let id = s(&run["id"]);
                eprintln!("billing run {id}");
                let bar = progress::bar("{msg:10} [{bar:30}] {pos}/{len} subscriptions {percent}% ETA {eta}");
                let run = loop {
                    let r = client.get_json(&format!("/v1/billing-runs/{}", urlencode(&id))).await?;
                    bar.set_length(r["subscriptions_total"].as_u64().unwrap_or(0));
                    bar.set_position(r["subscriptions_done"].as_u64().unwrap_or(0));
                    bar.set_message(s(&r["status"]));
                    if matches!(r["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                        bar.finish();
                        break r;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                };
                let errors = run["errors"].as_array().cloned().unwrap_or_default();
                println!(
                    "run {id} {}: {} subscriptions, {} invoices created, {} failed{}",
                    s(&run["status"]),
                    s(&run["subscriptions_total"]),
                    s(&run["invoices_created"]),
                    errors.len(),
                    run["duration_ms"].as_u64().map(|ms| format!(", {ms} ms")).unwrap_or_default()
                );
                for e in &errors {
                    println!("  {}: {}", s(&e["subscription_id"]), s(&e["message"]));
                }
                if run["status"] != "succeeded" {
                    bail!("billing run {id} ended {}: {}", s(&run["status"]), s(&run["error"]));
                }
                if !errors.is_empty() {
                    bail!("{} subscription(s) could not be billed", errors.len());
                }
                Ok(())
            }
        }
    })
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}
