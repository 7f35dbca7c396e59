//! `sluice`: the one binary. This file is only the table of contents: parse
//! the command line, then hand over to the module that does the work.

/// jemalloc (tikv-jemallocator). An import allocates and frees small
/// buffers on many threads (decoded rows, batches, SQLite rows); what the
/// allocator keeps of freed memory is what decides the server's peak RSS.
/// With the settings below, jemalloc keeps far less freed memory than
/// mimalloc or glibc under that churn of small allocations, at the same
/// import speed (measured: docs/BENCHMARKS.md, "Memory of a large import").
/// The `system-alloc` feature keeps the system allocator instead, for heap
/// profilers that hook `malloc` (heaptrack, see docs/BENCHMARKS.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's run-time options (its `malloc_conf` symbol; tikv-jemalloc-sys
/// prefixes jemalloc's names with `_rjem_`): a background thread returns
/// freed pages to the OS (`dirty_decay_ms`: within about 300 ms, instead
/// of 10 s; `muzzy_decay_ms:0`: then at once), so the application threads
/// never pay for purging; a longer decay only raised a large import's peak
/// memory, at the same speed. The environment variable `_RJEM_MALLOC_CONF`
/// (same syntax) overrides any of them.
#[cfg(not(feature = "system-alloc"))]
#[allow(unsafe_code, non_upper_case_globals)]
// SAFETY: jemalloc reads this symbol once, at its initialization, as a
// NUL-terminated C string (`const char *`); `&[u8; N]` is a thin pointer to
// static bytes that end with NUL and are never written.
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 59] = b"background_thread:true,dirty_decay_ms:300,muzzy_decay_ms:0\0";

mod bench;
mod billing_cli;
mod client;
mod config;
mod health_cli;
mod serve;
mod sql_cli;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Sluice: events, usage metering and an event lake in one binary.
#[derive(Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded SQLite, log and lake by default).
    Serve(ServeArgs),
    /// Send or follow events (HTTP client of a running server).
    #[command(subcommand)]
    Events(client::EventsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(client::KeysCmd),
    /// Manage workspaces (root key).
    #[command(subcommand)]
    Workspaces(client::WorkspacesCmd),
    /// Consumers: status, lag, reset (`sluice consumers` lists them).
    Consumers {
        #[command(subcommand)]
        cmd: Option<client::ConsumersCmd>,
        #[command(flatten)]
        conn: client::Conn,
    },
    /// Dead letters: list, show, replay, discard.
    #[command(subcommand)]
    Dlq(client::DlqCmd),
    /// Import a usage CSV (uploads, shows progress, prints the summary and errors).
    Import(client::ImportArgs),
    /// Background jobs: list, show, watch, cancel, retry.
    #[command(subcommand)]
    Jobs(client::JobsCmd),
    /// Billing plans (docs/billing.md).
    #[command(subcommand)]
    Plans(billing_cli::PlansCmd),
    /// Subscriptions to plans.
    #[command(subcommand)]
    Subscriptions(billing_cli::SubscriptionsCmd),
    /// Invoices: list, show, PDF, finalize, void.
    #[command(subcommand)]
    Invoices(billing_cli::InvoicesCmd),
    /// Billing runs.
    #[command(subcommand)]
    Billing(billing_cli::BillingCmd),
    /// Customers by health: list (bands, stages, priority), why (the explanation).
    #[command(subcommand)]
    Customers(health_cli::CustomersCmd),
    /// Customer health: configuration (apply, show) and backtests.
    #[command(subcommand)]
    Health(health_cli::HealthCmd),
    /// Run SQL over the lake and the live tables; prints a table (or --format csv|json).
    Sql(sql_cli::SqlArgs),
    /// The event lake: table definitions for other engines, files, compaction.
    #[command(subcommand)]
    Lake(sql_cli::LakeCmd),
    /// Benchmarks that anyone can rerun; results go to docs/BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Show configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Internal: runs one SQL query sent on stdin, in a process with a
    /// memory limit (started by the server; see sluice_lake::sandbox).
    #[command(name = "sql-worker", hide = true)]
    SqlWorker,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Configuration file (TOML); see `sluice config defaults`.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address [default 127.0.0.1:8680; env SLUICE_LISTEN].
    #[arg(long)]
    listen: Option<String>,
    /// Data directory [default ./sluice-data; env SLUICE_DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// State store URL, sqlite://… or postgres://… [env SLUICE_STATE_URL].
    #[arg(long)]
    state_url: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the embedded defaults (a commented sluice.toml).
    Defaults,
    /// Print the effective configuration after file, environment and flags.
    Show(ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::SqlWorker => return sluice_lake::sandbox::worker_main(),
        Command::Serve(args) => serve::main(args),
        Command::Events(cmd) => client::run(client::Cmd::Events(cmd)),
        Command::Keys(cmd) => client::run(client::Cmd::Keys(cmd)),
        Command::Workspaces(cmd) => client::run(client::Cmd::Workspaces(cmd)),
        Command::Consumers { cmd, conn } => client::run(client::Cmd::Consumers(cmd.unwrap_or(client::ConsumersCmd::List { conn }))),
        Command::Dlq(cmd) => client::run(client::Cmd::Dlq(cmd)),
        Command::Jobs(cmd) => client::run(client::Cmd::Jobs(cmd)),
        Command::Plans(cmd) => billing_cli::plans(cmd),
        Command::Subscriptions(cmd) => billing_cli::subscriptions(cmd),
        Command::Invoices(cmd) => billing_cli::invoices(cmd),
        Command::Billing(cmd) => billing_cli::billing(cmd),
        Command::Import(args) => client::run(client::Cmd::Import(args)),
        Command::Customers(cmd) => health_cli::customers(cmd),
        Command::Health(cmd) => health_cli::health(cmd),
        Command::Sql(args) => sql_cli::sql(args),
        Command::Lake(cmd) => sql_cli::lake(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Config(ConfigCmd::Defaults) => {
            print!("{}", config::DEFAULTS);
            Ok(())
        }
        Command::Config(ConfigCmd::Show(args)) => serve::load_config(&args).map(|c| println!("{c:#?}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
