//! CLI commands that talk to a running server over HTTP: `events`, `keys`,
//! `workspaces`, `consumers`, `dlq`, `jobs`. They read `--url`/`SLUICE_URL`
//! and `--key`/`SLUICE_KEY`.

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use sluice_client::EventFilter;
pub use sluice_client::{urlencode, Client};
use sluice_core::JobState;

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

impl Conn {
    /// A client of the server with the key.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.url, self.key.as_deref())?)
    }
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
            Cmd::Events(EventsCmd::Send { file, batch, conn }) => send(&conn.client()?, &file, batch).await,
            Cmd::Events(EventsCmd::Tail { event_type, customer_id, from_start, count, conn }) => {
                tail(&conn.client()?, event_type, customer_id, from_start, count).await
            }
            Cmd::Events(EventsCmd::Get { id, conn }) => print_json(conn.client()?.get_json(&format!("/v1/events/{}", urlencode(&id))).await?),
            Cmd::Keys(KeysCmd::Create { name, scope, workspace, conn }) => {
                let body = json!({"name": name, "scope": scope, "workspace": workspace});
                print_json(conn.client()?.call(Method::POST, "/v1/keys", Some(body)).await?)?;
                eprintln!("The secret is shown once; store it now.");
                Ok(())
            }
            Cmd::Keys(KeysCmd::List { workspace, conn }) => {
                let rows = conn.client()?.keys(workspace.as_deref()).await?;
                println!("{:<36}  {:<8}  {:<16}  {:<10}  NAME", "ID", "SCOPE", "WORKSPACE", "PREFIX");
                for k in rows {
                    println!("{:<36}  {:<8}  {:<16}  {:<10}  {}", k.id, k.scope, k.workspace, k.prefix, k.name);
                }
                Ok(())
            }
            Cmd::Keys(KeysCmd::Delete { id, conn }) => {
                conn.client()?.call(Method::DELETE, &format!("/v1/keys/{}", urlencode(&id)), None).await?;
                eprintln!("revoked {id}");
                Ok(())
            }
            Cmd::Workspaces(WorkspacesCmd::Create { name, time_zone, conn }) => {
                print_json(conn.client()?.create_workspace(&name, Some(&time_zone)).await?)
            }
            Cmd::Consumers(ConsumersCmd::List { conn }) => {
                let rows = conn.client()?.consumers().await?;
                println!("{:<48}  {:<9}  {:>10}  {:>5}  LAST ERROR", "NAME", "STATUS", "LAG", "DLQ");
                for c in rows {
                    println!("{:<48}  {:<9}  {:>10}  {:>5}  {}", c.name, c.status, c.lag, c.dlq_size, c.last_error.unwrap_or_default());
                }
                Ok(())
            }
            Cmd::Consumers(ConsumersCmd::Reset { name, to, conn }) => {
                print_json(conn.client()?.call(Method::POST, &format!("/v1/consumers/{}/reset", urlencode(&name)), Some(json!({"to": to}))).await?)
            }
            Cmd::Dlq(DlqCmd::List { consumer, status, conn }) => {
                let rows = conn.client()?.dead_letters(consumer.as_deref(), status.as_deref()).await?;
                println!("{:<36}  {:<10}  {:<32}  {:<24}  {:>3}  ERROR", "ID", "STATUS", "CONSUMER", "EVENT", "TRY");
                for d in rows {
                    println!("{:<36}  {:<10}  {:<32}  {:<24}  {:>3}  {}", d.id, d.status, d.consumer, d.event_id, d.attempts, d.error);
                }
                Ok(())
            }
            Cmd::Dlq(DlqCmd::Show { id, conn }) => print_json(conn.client()?.get_json(&format!("/v1/dlq/{}", urlencode(&id))).await?),
            Cmd::Dlq(DlqCmd::Replay { id, all, consumer, event_type, error, conn }) => {
                let client = conn.client()?;
                let v = match (id, all) {
                    (Some(id), false) => client.call(Method::POST, &format!("/v1/dlq/{}/replay", urlencode(&id)), None).await?,
                    (None, true) => {
                        let body = json!({"consumer": consumer, "event_type": event_type, "error": error});
                        client.call(Method::POST, "/v1/dlq/replay", Some(body)).await?
                    }
                    _ => bail!("give either a dead letter id or --all (with optional --consumer, --type, --error)"),
                };
                print_json(v)
            }
            Cmd::Dlq(DlqCmd::Discard { id, conn }) => {
                print_json(conn.client()?.call(Method::POST, &format!("/v1/dlq/{}/discard", urlencode(&id)), None).await?)
            }
            Cmd::Import(args) => import(args).await,
            Cmd::Jobs(JobsCmd::List { kind, status, conn }) => {
                let rows = conn.client()?.jobs(kind.as_deref(), status.as_deref()).await?;
                println!("{:<36}  {:<18}  {:<10}  {:>15}  CREATED", "ID", "KIND", "STATUS", "PROGRESS");
                for j in rows {
                    let total = j.progress.total.map(|t| t.to_string()).unwrap_or_default();
                    let progress = format!("{}/{total}", j.progress.done);
                    println!("{:<36}  {:<18}  {:<10}  {:>15}  {}", j.id, j.kind, j.status, progress, j.created_at);
                }
                Ok(())
            }
            Cmd::Jobs(JobsCmd::Show { id, conn }) => print_json(conn.client()?.get_json(&format!("/v1/jobs/{}", urlencode(&id))).await?),
            Cmd::Jobs(JobsCmd::Watch { id, conn }) => {
                let client = conn.client()?;
                let bar = progress::bar("{msg:10} [{bar:30}] {pos}/{len} {percent}% ETA {eta}");
                loop {
                    let j = client.job(&id).await?;
                    bar.set_length(j.progress.total.unwrap_or(0));
                    bar.set_position(j.progress.done);
                    bar.set_message(j.status.to_string());
                    if j.status.is_terminal() {
                        bar.finish();
                        print_json(client.get_json(&format!("/v1/jobs/{}", urlencode(&id))).await?)?;
                        if j.status != JobState::Succeeded {
                            bail!("job {id} ended {}: {}", j.status, j.error.unwrap_or_default());
                        }
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Cmd::Jobs(JobsCmd::Cancel { id, conn }) => {
                print_json(conn.client()?.call(Method::POST, &format!("/v1/jobs/{}/cancel", urlencode(&id)), None).await?)
            }
            Cmd::Jobs(JobsCmd::Retry { id, conn }) => {
                print_json(conn.client()?.call(Method::POST, &format!("/v1/jobs/{}/retry", urlencode(&id)), None).await?)
            }
            Cmd::Workspaces(WorkspacesCmd::List { conn }) => {
                let rows = conn.client()?.workspaces().await?;
                println!("{:<24}  {:<24}  CREATED", "NAME", "TIME ZONE");
                for w in rows {
                    println!("{:<24}  {:<24}  {}", w.name, w.time_zone, w.created_at);
                }
                Ok(())
            }
        }
    })
}

fn print_json(v: Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
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
        let r = client.send_events(chunk).await.with_context(|| {
            format!("batch {} (events {}..{}; indexes in errors are within the batch)", n + 1, n * batch, n * batch + chunk.len())
        })?;
        accepted += r.accepted;
        duplicates += r.duplicates;
    }
    println!("{}", json!({"accepted": accepted, "duplicates": duplicates}));
    Ok(())
}

async fn tail(client: &Client, event_type: Option<String>, customer_id: Option<String>, from_start: bool, count: Option<usize>) -> Result<()> {
    let mut filter = EventFilter { event_type, customer_id, cursor: (!from_start).then(|| "latest".to_owned()), limit: 1000 };
    let mut printed = 0usize;
    loop {
        let page = client.events(&filter).await?;
        for e in &page.data {
            println!("{e}");
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(());
            }
        }
        filter.cursor = page.tail_cursor;
        if page.next_cursor.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Uploads a usage CSV, follows the import with a progress bar on stderr,
/// then prints the import (JSON) on stdout and its errors on stderr.
async fn import(args: ImportArgs) -> Result<()> {
    let client = args.conn.client()?;
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
    let mut import = client.import_usage(body, &args.mode, true).await?;
    let rows = progress::bar("{msg:10} [{bar:30}] {pos}/{len} rows ETA {eta}");
    while !import.status.is_terminal() {
        rows.set_length(import.rows_total.unwrap_or(0));
        rows.set_position(import.rows_processed);
        rows.set_message(import.status.to_string());
        tokio::time::sleep(Duration::from_millis(500)).await;
        import = client.import(&import.id).await?;
    }
    rows.finish_and_clear();
    let total = import.rows_total.map(|t| t.to_string()).unwrap_or_default();
    eprintln!(
        "{}: {total} rows, {} imported, {} duplicate, {} rejected",
        import.status, import.rows_imported, import.rows_duplicate, import.rows_rejected
    );
    for e in &import.errors {
        let row = e.row.map(|r| r.to_string()).unwrap_or_default();
        let value = e.value.as_ref().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).unwrap_or_default();
        eprintln!("  row {row} {}: {} ({value:?})", e.column.as_deref().unwrap_or(""), e.message);
    }
    print_json(client.get_json(&format!("/v1/imports/{}", urlencode(&import.id))).await?)?;
    if import.status != JobState::Succeeded {
        bail!("import {} {}: {}", import.id, import.status, import.error.unwrap_or_default());
    }
    Ok(())
}

/// Progress bars on stderr (indicatif): drawn only when stderr is a
/// terminal, so scripts and logs get the summary lines alone.
pub(crate) mod progress {
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
