//! `sluice sql` and `sluice lake …`: SQL over the lake from the terminal.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{urlencode, Conn};

/// `sluice sql "<query>"`.
#[derive(Args)]
pub struct SqlArgs {
    /// One read-only SQL query, e.g. "SELECT type, count(*) FROM events GROUP BY type".
    pub query: String,
    /// `table` (aligned columns, default), `csv` or `json` (one JSON array of rows).
    #[arg(long, default_value = "table")]
    pub format: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `sluice lake …`.
#[derive(Subcommand)]
pub enum LakeCmd {
    /// Print the table definition of the lake for another engine.
    Ddl {
        /// athena, trino, duckdb or spark.
        #[arg(long)]
        engine: String,
        /// Lake location as that engine sees it (e.g. s3://bucket/lake); default the server's lake path.
        #[arg(long)]
        location: Option<String>,
        /// Table name.
        #[arg(long, default_value = "sluice_events")]
        table: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the lake's committed files.
    Files {
        #[command(flatten)]
        conn: Conn,
    },
    /// Merge small files of closed hour partitions now (a job).
    Compact {
        #[command(flatten)]
        conn: Conn,
    },
}

/// Runs `sluice sql`.
pub fn sql(args: SqlArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = args.conn.client()?;
        match args.format.as_str() {
            "csv" => {
                let text = client.text(Method::POST, "/v1/sql", Some(json!({"query": args.query, "format": "csv"}))).await?;
                print!("{text}");
            }
            "json" => {
                let v = client.call(Method::POST, "/v1/sql", Some(json!({"query": args.query, "format": "json"}))).await?;
                println!("{}", serde_json::to_string_pretty(&v["data"])?);
            }
            "table" => {
                let v = client.call(Method::POST, "/v1/sql", Some(json!({"query": args.query, "format": "json"}))).await?;
                print!("{}", table(&v));
                eprintln!("({} row{}, {} ms)", v["row_count"], if v["row_count"] == 1 { "" } else { "s" }, v["elapsed_ms"]);
            }
            other => bail!("--format {other:?}: use table, csv or json"),
        }
        Ok(())
    })
}

/// Renders a `POST /v1/sql` JSON answer as an aligned text table.
pub fn table(v: &Value) -> String {
    let names: Vec<String> =
        v["columns"].as_array().map(|c| c.iter().map(|c| c["name"].as_str().unwrap_or("").to_owned()).collect()).unwrap_or_default();
    let rows: Vec<Vec<String>> = v["data"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    names
                        .iter()
                        .map(|n| match &r[n] {
                            Value::Null => "NULL".to_owned(),
                            Value::String(s) => s.replace('\n', "\\n"),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).chain([names[i].chars().count()]).max().unwrap_or(0).min(60);
    let widths: Vec<usize> = (0..names.len()).map(width).collect();
    let cell = |s: &str, w: usize| {
        let t: String = if s.chars().count() > w { s.chars().take(w.saturating_sub(1)).chain(['…']).collect() } else { s.to_owned() };
        format!("{t:<w$}")
    };
    let line = |cells: &[String]| cells.iter().zip(&widths).map(|(c, w)| cell(c, *w)).collect::<Vec<_>>().join(" | ").trim_end().to_owned() + "\n";
    let mut out = line(&names);
    out.push_str(&(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-") + "\n"));
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

/// Runs `sluice lake …`.
pub fn lake(cmd: LakeCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            LakeCmd::Ddl { engine, location, table, conn } => {
                let mut path = format!("/v1/lake/ddl?engine={}&table={}", urlencode(&engine), urlencode(&table));
                if let Some(l) = location {
                    path.push_str(&format!("&location={}", urlencode(&l)));
                }
                print!("{}", conn.client()?.text(Method::GET, &path, None).await?);
            }
            LakeCmd::Files { conn } => {
                let v = conn.client()?.call(Method::GET, "/v1/lake/files", None).await?;
                for f in v["data"].as_array().cloned().unwrap_or_default() {
                    println!("{:>10} rows {:>12} bytes  {}", f["rows"], f["bytes"], f["path"].as_str().unwrap_or(""));
                }
            }
            LakeCmd::Compact { conn } => {
                let v = conn.client()?.call(Method::POST, "/v1/lake/compact", None).await?;
                println!("compaction job {} queued; follow it with `sluice jobs watch {}`", s(&v["id"]), s(&v["id"]));
            }
        }
        Ok(())
    })
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}
