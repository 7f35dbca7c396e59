//! `sluice`: the one binary. This file is only the table of contents: parse
//! the command line, then hand over to the module that does the work.

/// mimalloc: DataFusion queries and the lake writer allocate many small
/// buffers; glibc's allocator showed up as ~15 % of the writer's profile.
/// The `system-alloc` feature keeps the system allocator instead, for heap
/// profilers that hook `malloc` (heaptrack, see docs/BENCHMARKS.md).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3 keeps freed memory for 1 s before it returns it to the OS
/// (`purge_delay`). Under a large import's allocation churn that held
/// 150 MB or more of freed memory: the server peaked at 422 MB on a
/// 2M-row import, and at 260 MB with 10 ms, mimalloc 2's default, at the
/// same speed (docs/BENCHMARKS.md). `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
#[cfg(not(feature = "system-alloc"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (mimalloc.h).
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an integer option of the
        // statically linked mimalloc (libmimalloc-sys); any value is valid
        // for purge_delay, and it may be changed at any time.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
}

#[cfg(feature = "system-alloc")]
fn tune_allocator() {}

mod bench;
mod client;
mod config;
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
    tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Events(cmd) => client::run(client::Cmd::Events(cmd)),
        Command::Keys(cmd) => client::run(client::Cmd::Keys(cmd)),
        Command::Workspaces(cmd) => client::run(client::Cmd::Workspaces(cmd)),
        Command::Consumers { cmd, conn } => {
            client::run(client::Cmd::Consumers(cmd.unwrap_or(client::ConsumersCmd::List { conn })))
        }
        Command::Dlq(cmd) => client::run(client::Cmd::Dlq(cmd)),
        Command::Jobs(cmd) => client::run(client::Cmd::Jobs(cmd)),
        Command::Import(args) => client::run(client::Cmd::Import(args)),
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
