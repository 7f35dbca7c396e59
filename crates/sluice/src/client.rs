//! CLI commands that talk to a running server over HTTP: `events`, `keys`,
//! `workspaces`, `consumers`, `dlq`, `jobs`. They read `--url`/`SLUICE_URL`
//! and `--key`/`SLUICE_KEY`.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

/// Where the server is and which key to use.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// Server URL.
    #[arg(long, env = "SLUICE_URL", default_value = "http://127.0.0.1:8680", global = true)]
    pub url: String,
    /// API key.
    #[arg(long, env = "SLUICE_KEY", hide_env_values = true, global = true)]
    pub key: Option<String>,
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Send events from a file (JSON object, JSON array or NDJSON) or `-` for stdin.
    Send {
        /// File path, or `-` for standard input.
        file: String,
        /// Events per request.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print events as they arrive (NDJSON on stdout).
    Tail {
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only this customer.
        #[arg(long)]
        customer_id: Option<String>,
        /// Start at the oldest event instead of the end of the log.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events (default: follow forever).
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print one event by id.
    Get {
        /// Event id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        /// Human name.
        #[arg(long)]
        name: String,
        /// admin, read or ingest.
        #[arg(long)]
        scope: String,
        /// Workspace (root key only; default the caller's).
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List keys.
    List {
        /// Only this workspace (root key).
        #[arg(long)]
        workspace: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a key by id.
    #[command(alias = "revoke")]
    Delete {
        /// Key id (`key_…`).
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum WorkspacesCmd {
    /// Create a workspace (root key).
    Create {
        /// Name: a-z, 0-9, - and _.
        name: String,
        /// IANA time zone, e.g. Asia/Tokyo.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List workspaces.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum ConsumersCmd {
    /// List consumers with status, lag and dead letters.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Move a consumer's checkpoints (event_counts: clears and rebuilds its read model).
    Reset {
        /// Consumer name, e.g. event_counts or webhook:wh_….
        name: String,
        /// earliest, latest or an RFC 3339 time.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum DlqCmd {
    /// List dead letters.
    List {
        /// Only this consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Only this status: dead, replaying, replayed, discarded.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one dead letter with its event.
    Show {
        /// Dead letter id (dlq_…).
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replay one dead letter, or with --all every waiting one that matches the filters.
    Replay {
        /// Dead letter id (omit with --all).
        id: Option<String>,
        /// Replay every waiting dead letter matching the filters.
        #[arg(long)]
        all: bool,
        /// Filter: consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// Filter: event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Filter: text contained in the error.
        #[arg(long)]
        error: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Discard a dead letter.
    Discard {
        /// Dead letter id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub enum JobsCmd {
    /// List jobs.
    List {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one job.
    Show {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job's progress until it ends (exit status 1 unless it succeeded).
    Watch {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Queue a failed or cancelled job again.
    Retry {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `sluice import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// CSV file, or `-` for standard input.
    pub file: String,
    /// `strict` (any invalid row: nothing imported) or `skip_invalid`.
    #[arg(long, default_value = "strict")]
    pub mode: String,
    #[command(flatten)]
    pub conn: Conn,
}

pub enum Cmd {
    Import(ImportArgs),
    Jobs(JobsCmd),
    Events(EventsCmd),
    Keys(KeysCmd),
    Workspaces(WorkspacesCmd),
    Consumers(ConsumersCmd),
    Dlq(DlqCmd),
}

pub fn run(cmd: Cmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            Cmd::Events(EventsCmd::Send { file, batch, conn }) => send(&Client::new(&conn)?, &file, batch).await,
            Cmd::Events(EventsCmd::Tail { event_type, customer_id, from_start, count, conn }) => {
                tail(&Client::new(&conn)?, event_type, customer_id, from_start, count).await
            }
            Cmd::Events(EventsCmd::Get { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::GET, &format!("/v1/events/{}", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Keys(KeysCmd::Create { name, scope, workspace, conn }) => {
                let body = json!({"name": name, "scope": scope, "workspace": workspace});
                let v = Client::new(&conn)?.call(Method::POST, "/v1/keys", Some(body)).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                eprintln!("The secret is shown once; store it now.");
                Ok(())
            }
            Cmd::Keys(KeysCmd::List { workspace, conn }) => {
                let path = match workspace {
                    Some(w) => format!("/v1/keys?workspace={}", urlencode(&w)),
                    None => "/v1/keys".into(),
                };
                let rows = Client::new(&conn)?.list_all(&path).await?;
                println!("{:<36}  {:<8}  {:<16}  {:<10}  NAME", "ID", "SCOPE", "WORKSPACE", "PREFIX");
                for k in rows {
                    println!("{:<36}  {:<8}  {:<16}  {:<10}  {}", s(&k["id"]), s(&k["scope"]), s(&k["workspace"]), s(&k["prefix"]), s(&k["name"]));
                }
                Ok(())
            }
            Cmd::Keys(KeysCmd::Delete { id, conn }) => {
                Client::new(&conn)?.call(Method::DELETE, &format!("/v1/keys/{}", urlencode(&id)), None).await?;
                eprintln!("revoked {id}");
                Ok(())
            }
            Cmd::Workspaces(WorkspacesCmd::Create { name, time_zone, conn }) => {
                let v = Client::new(&conn)?.call(Method::POST, "/v1/workspaces", Some(json!({"name": name, "time_zone": time_zone}))).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Consumers(ConsumersCmd::List { conn }) => {
                let rows = Client::new(&conn)?.list_all("/v1/consumers").await?;
                println!("{:<48}  {:<9}  {:>10}  {:>5}  LAST ERROR", "NAME", "STATUS", "LAG", "DLQ");
                for c in rows {
                    println!(
                        "{:<48}  {:<9}  {:>10}  {:>5}  {}",
                        s(&c["name"]),
                        s(&c["status"]),
                        s(&c["lag"]),
                        s(&c["dlq_size"]),
                        s(&c["last_error"])
                    );
                }
                Ok(())
            }
            Cmd::Consumers(ConsumersCmd::Reset { name, to, conn }) => {
                let v = Client::new(&conn)?.call(Method::POST, &format!("/v1/consumers/{}/reset", urlencode(&name)), Some(json!({"to": to}))).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Dlq(DlqCmd::List { consumer, status, conn }) => {
                let mut path = "/v1/dlq?limit=1000".to_owned();
                if let Some(c) = consumer {
                    path.push_str(&format!("&consumer={}", urlencode(&c)));
                }
                if let Some(st) = status {
                    path.push_str(&format!("&status={}", urlencode(&st)));
                }
                let rows = Client::new(&conn)?.list_all(&path).await?;
                println!("{:<36}  {:<10}  {:<32}  {:<24}  {:>3}  ERROR", "ID", "STATUS", "CONSUMER", "EVENT", "TRY");
                for d in rows {
                    println!(
                        "{:<36}  {:<10}  {:<32}  {:<24}  {:>3}  {}",
                        s(&d["id"]),
                        s(&d["status"]),
                        s(&d["consumer"]),
                        s(&d["event_id"]),
                        s(&d["attempts"]),
                        s(&d["error"])
                    );
                }
                Ok(())
            }
            Cmd::Dlq(DlqCmd::Show { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::GET, &format!("/v1/dlq/{}", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Dlq(DlqCmd::Replay { id, all, consumer, event_type, error, conn }) => {
                let client = Client::new(&conn)?;
                let v = match (id, all) {
                    (Some(id), false) => client.call(Method::POST, &format!("/v1/dlq/{}/replay", urlencode(&id)), None).await?,
                    (None, true) => {
                        let body = json!({"consumer": consumer, "event_type": event_type, "error": error});
                        client.call(Method::POST, "/v1/dlq/replay", Some(body)).await?
                    }
                    _ => bail!("give either a dead letter id or --all (with optional --consumer, --type, --error)"),
                };
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Dlq(DlqCmd::Discard { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::POST, &format!("/v1/dlq/{}/discard", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Import(args) => import(args).await,
            Cmd::Jobs(JobsCmd::List { kind, status, conn }) => {
                let mut path = "/v1/jobs?limit=1000".to_owned();
                if let Some(k) = kind {
                    path.push_str(&format!("&kind={}", urlencode(&k)));
                }
                if let Some(st) = status {
                    path.push_str(&format!("&status={}", urlencode(&st)));
                }
                let rows = Client::new(&conn)?.list_all(&path).await?;
                println!("{:<36}  {:<18}  {:<10}  {:>15}  CREATED", "ID", "KIND", "STATUS", "PROGRESS");
                for j in rows {
                    let progress = format!("{}/{}", s(&j["progress"]["done"]), s(&j["progress"]["total"]));
                    println!("{:<36}  {:<18}  {:<10}  {:>15}  {}", s(&j["id"]), s(&j["kind"]), s(&j["status"]), progress, s(&j["created_at"]));
                }
                Ok(())
            }
            Cmd::Jobs(JobsCmd::Show { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::GET, &format!("/v1/jobs/{}", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Jobs(JobsCmd::Watch { id, conn }) => {
                let client = Client::new(&conn)?;
                let bar = progress::bar("{msg:10} [{bar:30}] {pos}/{len} {percent}% ETA {eta}");
                loop {
                    let j = client.call(Method::GET, &format!("/v1/jobs/{}", urlencode(&id)), None).await?;
                    let status = s(&j["status"]);
                    bar.set_length(j["progress"]["total"].as_u64().unwrap_or(0));
                    bar.set_position(j["progress"]["done"].as_u64().unwrap_or(0));
                    bar.set_message(status.clone());
                    if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                        bar.finish();
                        println!("{}", serde_json::to_string_pretty(&j)?);
                        if status != "succeeded" {
                            bail!("job {id} ended {status}: {}", s(&j["error"]));
                        }
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Cmd::Jobs(JobsCmd::Cancel { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::POST, &format!("/v1/jobs/{}/cancel", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Jobs(JobsCmd::Retry { id, conn }) => {
                let v = Client::new(&conn)?.call(Method::POST, &format!("/v1/jobs/{}/retry", urlencode(&id)), None).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(())
            }
            Cmd::Workspaces(WorkspacesCmd::List { conn }) => {
                let rows = Client::new(&conn)?.list_all("/v1/workspaces").await?;
                println!("{:<24}  {:<24}  CREATED", "NAME", "TIME ZONE");
                for w in rows {
                    println!("{:<24}  {:<24}  {}", s(&w["name"]), s(&w["time_zone"]), s(&w["created_at"]));
                }
                Ok(())
            }
        }
    })
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_else(|| if v.is_null() { String::new() } else { v.to_string() })
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A small JSON-over-HTTP client that turns API errors into readable messages.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
}

impl Client {
    pub fn new(conn: &Conn) -> Result<Client> {
        let key = conn.key.clone().context("no API key: pass --key or set SLUICE_KEY")?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        Ok(Client { http, base: conn.url.trim_end_matches('/').to_owned(), key })
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        decode(resp).await
    }

    /// Like [`Client::call`], but returns the body as text (CSV, DDL…).
    pub async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> Result<String> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp.text().await?);
        }
        decode(resp).await.map(|v| v.to_string())
    }

    pub async fn list_all(&self, path: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let p = match &cursor {
                Some(c) => format!("{path}{sep}cursor={}", urlencode(c)),
                None => path.to_owned(),
            };
            let v = self.call(Method::GET, &p, None).await?;
            out.extend(v["data"].as_array().cloned().unwrap_or_default());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return Ok(out),
            }
        }
    }
}

async fn decode(resp: reqwest::Response) -> Result<Value> {
    let status = resp.status();
    let text = resp.text().await?;
    if status.is_success() {
        return Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) });
    }
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": {"message": text}}));
    let mut msg = format!("{} {}: {}", status.as_u16(), s(&v["error"]["code"]), s(&v["error"]["message"]));
    if let Some(details) = v["error"]["details"].as_array() {
        for d in details.iter().take(50) {
            msg.push_str(&format!("\n  {d}"));
        }
    }
    bail!(msg)
}

/// Reads events from a file: a JSON array, one JSON object, or NDJSON.
fn read_events(file: &str) -> Result<Vec<Value>> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    }
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return Ok(match v {
            Value::Array(a) => a,
            other => vec![other],
        });
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{file}: line {} is not JSON", i + 1)))
        .collect()
}

async fn send(client: &Client, file: &str, batch: usize) -> Result<()> {
    let events = read_events(file)?;
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    for (n, chunk) in events.chunks(batch.max(1)).enumerate() {
        let v = client.call(Method::POST, "/v1/events", Some(Value::Array(chunk.to_vec()))).await.with_context(|| {
            format!("batch {} (events {}..{}; indexes in errors are within the batch)", n + 1, n * batch, n * batch + chunk.len())
        })?;
        accepted += v["accepted"].as_u64().unwrap_or(0);
        duplicates += v["duplicates"].as_u64().unwrap_or(0);
    }
    println!("{}", json!({"accepted": accepted, "duplicates": duplicates}));
    Ok(())
}

async fn tail(client: &Client, ty: Option<String>, customer: Option<String>, from_start: bool, count: Option<usize>) -> Result<()> {
    let mut cursor = if from_start { None } else { Some("latest".to_owned()) };
    let mut printed = 0usize;
    loop {
        let mut path = "/v1/events?limit=1000".to_owned();
        if let Some(t) = &ty {
            path.push_str(&format!("&type={}", urlencode(t)));
        }
        if let Some(c) = &customer {
            path.push_str(&format!("&customer_id={}", urlencode(c)));
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", urlencode(c)));
        }
        let v = client.call(Method::GET, &path, None).await?;
        let data = v["data"].as_array().cloned().unwrap_or_default();
        for e in &data {
            println!("{e}");
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        cursor = v["tail_cursor"].as_str().map(str::to_owned);
        if v["next_cursor"].is_null() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Uploads a usage CSV, follows the import with a progress line on stderr,
/// then prints the import (JSON) on stdout and its errors on stderr.
async fn import(args: ImportArgs) -> Result<()> {
    let client = Client::new(&args.conn)?;
    let body = if args.file == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        reqwest::Body::from(buf)
    } else {
        let f = tokio::fs::File::open(&args.file).await.with_context(|| format!("opening {}", args.file))?;
        let size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        let upload = progress::bar("uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}");
        upload.set_length(size);
        reqwest::Body::wrap_stream(tokio_util_shim::file_stream(f, upload))
    };
    let resp = client
        .http
        .post(format!("{}/v1/imports?kind=usage&wait=true&mode={}", client.base, urlencode(&args.mode)))
        .bearer_auth(&client.key)
        .header("content-type", "text/csv")
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", client.base))?;
    let mut v = decode(resp).await?;
    let id = s(&v["id"]);
    let rows = progress::bar("{msg:10} [{bar:30}] {pos}/{len} rows ETA {eta}");
    while !matches!(s(&v["status"]).as_str(), "succeeded" | "failed" | "cancelled") {
        rows.set_length(v["rows_total"].as_u64().unwrap_or(0));
        rows.set_position(v["rows_processed"].as_u64().unwrap_or(0));
        rows.set_message(s(&v["status"]));
        tokio::time::sleep(Duration::from_millis(500)).await;
        v = client.call(Method::GET, &format!("/v1/imports/{}", urlencode(&id)), None).await?;
    }
    rows.finish_and_clear();
    eprintln!(
        "{}: {} rows, {} imported, {} duplicate, {} rejected",
        s(&v["status"]),
        s(&v["rows_total"]),
        s(&v["rows_imported"]),
        s(&v["rows_duplicate"]),
        s(&v["rows_rejected"])
    );
    for e in v["errors"].as_array().into_iter().flatten() {
        eprintln!("  row {} {}: {} ({:?})", s(&e["row"]), s(&e["column"]), s(&e["message"]), s(&e["value"]));
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    if s(&v["status"]) != "succeeded" {
        bail!("import {id} {}: {}", s(&v["status"]), s(&v["error"]));
    }
    Ok(())
}

/// Progress bars on stderr (indicatif): drawn only when stderr is a
/// terminal, so scripts and logs get the summary lines alone.
mod progress {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

    /// A bar with `template` (indicatif's syntax).
    pub fn bar(template: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("#>-"));
        }
        bar
    }
}

/// Streams a file in 1 MiB chunks (bounded memory for any file size),
/// advancing `bar` by the bytes sent.
mod tokio_util_shim {
    use tokio::io::AsyncReadExt;

    pub fn file_stream(f: tokio::fs::File, bar: indicatif::ProgressBar) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
        futures::stream::unfold(Some(f), move |f| {
            let bar = bar.clone();
            async move {
                let mut f = f?;
                let mut buf = vec![0u8; 1 << 20];
                match f.read(&mut buf).await {
                    Ok(0) => {
                        bar.finish_and_clear();
                        None
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        bar.inc(n as u64);
                        Some((Ok(buf), Some(f)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        })
    }
}
