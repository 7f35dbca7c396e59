//! SQL queries in a child process with a memory limit.
//!
//! # Why a process
//!
//! DataFusion's memory pool only counts what its operators reserve (hash
//! tables, sorts, aggregation state). Scalar functions, constant folding and
//! the result batches allocate outside it: `SELECT length(repeat('x',
//! 1000000000))` allocates a gigabyte in the optimizer, and under a memory
//! limit the allocator's failure aborts the whole process. Guarding every
//! function (repeat, lpad, rpad, array_repeat, range, string_agg, `||`…) is
//! a list that is never complete. So each query runs in a child process of
//! the same binary (`sluice sql-worker`, hidden) that limits its own memory
//! before it allocates anything big: a query over the limit kills only the
//! child, and the server answers 413.
//!
//! # The limit
//!
//! The child sets `RLIMIT_DATA` to `sql.memory_limit` + [`HEADROOM`] + the
//! size of the inputs it is sent. `RLIMIT_DATA` rather than `RLIMIT_AS`:
//! since Linux 4.7 `RLIMIT_DATA` counts every private writable mapping —
//! which is where jemalloc (the binary's allocator, which takes its memory
//! with `mmap`, not `brk`) puts the heap — but not the executable, the shared
//! libraries or other file mappings, nor address space reserved without
//! write access. `RLIMIT_AS` counts all of those, so its value would depend
//! on the binary's size and on jemalloc's virtual reservations rather than on
//! the memory the query uses. The [`HEADROOM`] (256 MiB) covers the runtime
//! (threads' stacks, jemalloc's metadata, DataFusion's session with its
//! function registry), the Arrow buffers of the result and of Parquet
//! decoding, which the pool does not count. DataFusion's own pool
//! (`sql.memory_limit`) still applies inside the child, so joins, sorts and
//! aggregations over the limit fail with their usual clear error before the
//! rlimit is reached.
//!
//! When an allocation fails the child aborts (or is killed by a signal); the
//! parent answers [`SqlError::TooLarge`] (413). The child's stderr is read
//! (at most [`STDERR_LIMIT`] bytes), logged and never shown to clients. A
//! timeout drops the child (`kill_on_drop`); the child also exits by itself
//! shortly after the time limit, in case the server is gone.
//!
//! # Wire format
//!
//! Both directions are frames: a little-endian `u64` length, then that many
//! bytes. Server → child (stdin): a JSON [`Header`] (SQL, lake root, limits,
//! the committed files of `events`, the names of the live tables and the
//! length of every following frame), then one Arrow IPC stream per input:
//! the log tail of `events` (if the query reads `events`), then each live
//! table, in the header's order. Child → server (stdout): a JSON status
//! frame (`{"error": null}` or `{"error": {"kind", "message"}}`), then — for
//! a query that succeeded — one frame holding the result as an Arrow IPC
//! stream.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_core::lake::PropertyType;
use sluice_store::LakeFile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sql::{build_context, execute, read_only, EventsInput, Inputs, QueryResult, SqlError, SqlLimits};

/// Memory the child may use beyond `sql.memory_limit` and its inputs: the
/// runtime, Arrow buffers outside DataFusion's pool, the result.
pub const HEADROOM: u64 = 256 << 20;

/// Most bytes of the child's stderr kept for the log.
pub const STDERR_LIMIT: usize = 64 << 10;

/// The hidden subcommand of the `sluice` binary that runs [`worker_main`].
pub const WORKER_SUBCOMMAND: &str = "sql-worker";

/// Exit code of a child that stopped itself at its time limit.
const EXIT_TIMEOUT: u8 = 3;

/// Where queries run.
#[derive(Debug, Clone, Default)]
pub enum Isolation {
    /// In the server's process (unit tests, benchmarks): no memory bound on
    /// scalar functions.
    #[default]
    InProcess,
    /// In a child process: `<program> sql-worker`, with a memory limit.
    /// `program` is the `sluice` binary (`std::env::current_exe()`).
    Process {
        /// The binary that has the `sql-worker` subcommand.
        program: PathBuf,
    },
}

/// What the child does with the SQL.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    /// Run it and send the result.
    Query,
    /// Plan it only.
    Check,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    mode: Mode,
    sql: String,
    root: PathBuf,
    timeout_ms: u64,
    max_rows: usize,
    max_bytes: usize,
    memory: usize,
    events: Option<WireEvents>,
    tables: Vec<String>,
    sections: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireEvents {
    typed: Vec<(String, String)>,
    files: Vec<WireFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireFile {
    path: String,
    workspace: String,
    content_type: String,
    hour_start: i64,
    row_count: u64,
    bytes: u64,
    min_time: i64,
    max_time: i64,
    created_at: i64,
}

impl WireFile {
    fn from(f: &LakeFile) -> WireFile {
        WireFile {
            path: f.path.clone(),
            workspace: f.workspace.clone(),
            content_type: f.content_type.clone(),
            hour_start: f.hour_start.timestamp_micros(),
            row_count: f.row_count,
            bytes: f.bytes,
            min_time: f.min_time.timestamp_micros(),
            max_time: f.max_time.timestamp_micros(),
            created_at: f.created_at.timestamp_micros(),
        }
    }
    fn into_file(self) -> LakeFile {
        let t = |us: i64| DateTime::<Utc>::from_timestamp_micros(us).unwrap_or_default();
        LakeFile {
            path: self.path,
            workspace: self.workspace,
            content_type: self.content_type,
            hour_start: t(self.hour_start),
            row_count: self.row_count,
            bytes: self.bytes,
            min_time: t(self.min_time),
            max_time: t(self.max_time),
            created_at: t(self.created_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Status {
    error: Option<WireError>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireError {
    kind: String,
    message: String,
}

impl WireError {
    fn from(e: &SqlError) -> WireError {
        let (kind, message) = match e {
            SqlError::Invalid(m) => ("invalid", m.clone()),
            SqlError::ReadOnly(m) => ("read_only", m.clone()),
            SqlError::Timeout(d) => ("timeout", d.as_millis().to_string()),
            SqlError::TooLarge(m) => ("too_large", m.clone()),
            SqlError::Forbidden(m) => ("forbidden", m.clone()),
            SqlError::OutOfRange(m) => ("out_of_range", m.clone()),
            SqlError::Internal(m) => ("internal", m.clone()),
        };
        WireError { kind: kind.into(), message }
    }
    fn into_error(self) -> SqlError {
        match self.kind.as_str() {
            "invalid" => SqlError::Invalid(self.message),
            "read_only" => SqlError::ReadOnly(self.message),
            "timeout" => SqlError::Timeout(Duration::from_millis(self.message.parse().unwrap_or(0))),
            "too_large" => SqlError::TooLarge(self.message),
            "forbidden" => SqlError::Forbidden(self.message),
            "out_of_range" => SqlError::OutOfRange(self.message),
            _ => SqlError::Internal(self.message),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> SqlError {
    SqlError::Internal(e.to_string())
}

/// The message of a query that needed more memory than allowed.
pub fn memory_message(limit: usize) -> String {
    format!(
        "the query needed more memory than sql.memory_limit allows ({limit} bytes); narrow it (filter on timestamp or content_type, select fewer columns) or aggregate"
    )
}

/// Batches as one Arrow IPC stream.
pub(crate) fn ipc_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, SqlError> {
    let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema).map_err(internal)?;
    for b in batches {
        w.write(b).map_err(internal)?;
    }
    w.finish().map_err(internal)?;
    w.into_inner().map_err(internal)
}

/// An Arrow IPC stream as its schema and batches.
pub(crate) fn ipc_read(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
    let r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(internal)?;
    let schema = r.schema();
    let batches = r.collect::<Result<Vec<_>, _>>().map_err(internal)?;
    Ok((schema, batches))
}

/// Runs `sql` over `inputs` in a child process of `program`. `Ok(None)` in
/// [`Mode::Check`].
pub(crate) async fn run(
    program: &Path,
    mode: Mode,
    sql: &str,
    root: &Path,
    limits: SqlLimits,
    inputs: Inputs,
) -> Result<Option<QueryResult>, SqlError> {
    let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    // The inputs, encoded before the child starts.
    let mut sections: Vec<Vec<u8>> = Vec::new();
    let events = match inputs.events {
        Some(ev) => {
            sections.push(if ev.tail.is_empty() { Vec::new() } else { ipc_bytes(&ev.tail[0].schema(), &ev.tail)? });
            Some(WireEvents {
                typed: ev.typed.iter().map(|(n, t)| (n.clone(), t.name().to_owned())).collect(),
                files: ev.files.iter().map(WireFile::from).collect(),
            })
        }
        None => None,
    };
    let mut tables = Vec::new();
    for (name, batch) in &inputs.tables {
        tables.push(name.clone());
        sections.push(ipc_bytes(&batch.schema(), std::slice::from_ref(batch))?);
    }
    let header = Header {
        mode,
        sql: sql.to_owned(),
        root,
        timeout_ms: limits.timeout.as_millis().try_into().unwrap_or(u64::MAX),
        max_rows: limits.max_rows,
        max_bytes: limits.max_bytes,
        memory: limits.memory,
        events,
        tables,
        sections: sections.iter().map(|s| s.len() as u64).collect(),
    };
    let header = serde_json::to_vec(&header).map_err(internal)?;

    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(WORKER_SUBCOMMAND)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // The allocator's settings, if the operator changed them.
    if let Some(conf) = std::env::var_os("_RJEM_MALLOC_CONF") {
        cmd.env("_RJEM_MALLOC_CONF", conf);
    }
    let mut child = cmd.spawn().map_err(|e| SqlError::Internal(format!("starting the SQL worker {}: {e}", program.display())))?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
        return Err(SqlError::Internal("the SQL worker has no pipes".into()));
    };
    let write = async move {
        // A child that died early closes its stdin: the exit status says why.
        for frame in std::iter::once(&header).chain(sections.iter()) {
            stdin.write_all(&(frame.len() as u64).to_le_bytes()).await?;
            stdin.write_all(frame).await?;
        }
        stdin.shutdown().await
    };
    // The result may be at most max_bytes (Arrow memory) by the child's own
    // count; its IPC encoding is about as large. Anything beyond is refused.
    let cap = (limits.max_bytes as u64).saturating_add(limits.max_bytes as u64 / 8).saturating_add(16 << 20);
    let read = async {
        let mut out = Vec::new();
        (&mut stdout).take(cap + 1).read_to_end(&mut out).await.map(|_| out)
    };
    let errors = async {
        let mut kept = Vec::new();
        let r = (&mut stderr).take(STDERR_LIMIT as u64).read_to_end(&mut kept).await;
        // Drain the rest so the child never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        r.map(|_| kept)
    };
    let (written, out, err) = tokio::join!(write, read, errors);
    if let Ok(out) = &out {
        if out.len() as u64 > cap {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(too_many_bytes(limits.max_bytes));
        }
    }
    let status = child.wait().await.map_err(internal)?;
    let err = String::from_utf8_lossy(&err.unwrap_or_default()).into_owned();
    if !err.trim().is_empty() {
        tracing::warn!(status = %status, stderr = %err, "SQL worker wrote to stderr");
    }
    let out = out.map_err(internal)?;
    let mut frames = Frames(&out);
    let Some(status_frame) = frames.next() else {
        // No answer: the child died.
        return Err(died(status, &err, limits, written.err()));
    };
    let st: Status = serde_json::from_slice(status_frame).map_err(internal)?;
    if let Some(e) = st.error {
        return Err(e.into_error());
    }
    if mode == Mode::Check {
        return Ok(None);
    }
    let Some(result) = frames.next() else {
        return Err(died(status, &err, limits, written.err()));
    };
    let (schema, batches) = ipc_read(result)?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows > limits.max_rows {
        return Err(too_many_rows(limits.max_rows));
    }
    Ok(Some(QueryResult { schema, batches, rows, elapsed: Duration::ZERO }))
}

/// Why a child that gave no answer ended.
fn died(status: std::process::ExitStatus, stderr: &str, limits: SqlLimits, write: Option<std::io::Error>) -> SqlError {
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    #[cfg(not(unix))]
    let signal: Option<i32> = None;
    if status.code() == Some(i32::from(EXIT_TIMEOUT)) {
        return SqlError::Timeout(limits.timeout);
    }
    if signal.is_some() || stderr.contains("memory allocation of") || stderr.contains("capacity overflow") || stderr.contains("out of memory") {
        return SqlError::TooLarge(memory_message(limits.memory));
    }
    tracing::error!(status = %status, write_error = ?write, "the SQL worker ended without an answer");
    SqlError::Internal(format!("the SQL worker ended without an answer ({status})"))
}

pub(crate) fn too_many_rows(max: usize) -> SqlError {
    SqlError::TooLarge(format!("the result has more than {max} rows (sql.max_result_rows); add a LIMIT or aggregate"))
}

pub(crate) fn too_many_bytes(max: usize) -> SqlError {
    SqlError::TooLarge(format!("the result is larger than {max} bytes (sql.max_result_bytes); select fewer columns or rows"))
}

/// Frames of a buffer (a truncated last frame is not returned).
struct Frames<'a>(&'a [u8]);

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let len = u64::from_le_bytes(self.0.get(..8)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        let frame = self.0.get(8..8usize.checked_add(len)?)?;
        self.0 = &self.0[8 + len..];
        Some(frame)
    }
}

fn read_frame(r: &mut impl Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes, more than announced ({max})")));
    }
    let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_frame(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&(data.len() as u64).to_le_bytes())?;
    w.write_all(data)
}

/// Limits this process's data segment (heap and anonymous mappings).
#[cfg(target_os = "linux")]
fn limit_memory(bytes: u64) -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(Resource::Data, Rlimit { current: Some(bytes), maximum: Some(bytes) }).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn limit_memory(_bytes: u64) -> std::io::Result<()> {
    Err(std::io::Error::other("memory limits of SQL workers need Linux"))
}

/// The `sluice sql-worker` subcommand: reads a query and its inputs on
/// stdin, limits its own memory, runs the query and writes the answer on
/// stdout (see the module documentation). Exits 0 whenever it could write
/// an answer, errors included.
pub fn worker_main() -> std::process::ExitCode {
    match worker() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sql-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn worker() -> std::io::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let header = read_frame(&mut stdin, 1 << 30)?;
    let header: Header = serde_json::from_slice(&header).map_err(std::io::Error::other)?;
    let inputs_len: u64 = header.sections.iter().sum();
    limit_memory((header.memory as u64).saturating_add(HEADROOM).saturating_add(inputs_len))?;
    let timeout = Duration::from_millis(header.timeout_ms);
    // A backstop: whatever happens to the server, the child ends soon
    // after the time limit (a long constant folding does not yield to the
    // async timeout).
    std::thread::Builder::new().name("sql-deadline".into()).spawn(move || {
        std::thread::sleep(timeout + Duration::from_secs(2));
        std::process::exit(i32::from(EXIT_TIMEOUT));
    })?;
    let mut sections = header.sections.iter();
    let mut next = || -> std::io::Result<Vec<u8>> { read_frame(&mut stdin, sections.next().copied().unwrap_or(0)) };
    let answer = (|| -> Result<Inputs, SqlError> {
        let events = match header.events {
            Some(ev) => {
                let tail = next().map_err(internal)?;
                let tail = if tail.is_empty() { Vec::new() } else { ipc_read(&tail)?.1 };
                let typed = ev.typed.into_iter().filter_map(|(n, t)| Some((n, PropertyType::parse(&t)?))).collect();
                Some(EventsInput { typed, files: ev.files.into_iter().map(WireFile::into_file).collect(), tail })
            }
            None => None,
        };
        let mut tables = Vec::new();
        for name in &header.tables {
            let bytes = next().map_err(internal)?;
            let (schema, batches) = ipc_read(&bytes)?;
            let batch = match batches.len() {
                1 => batches.into_iter().next().unwrap_or_else(|| RecordBatch::new_empty(schema.clone())),
                _ => arrow::compute::concat_batches(&schema, &batches).map_err(internal)?,
            };
            tables.push((name.clone(), batch));
        }
        Ok(Inputs { events, tables })
    })();
    drop(stdin);
    let limits =
        SqlLimits { timeout, max_rows: header.max_rows, max_bytes: header.max_bytes, memory: header.memory, max_tail_events: 0, max_live_rows: 0 };
    let result = answer.and_then(|inputs| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("sql-worker")
            .enable_all()
            .build()
            .map_err(internal)?;
        rt.block_on(async {
            let ctx = build_context(&header.root, inputs, None, header.memory)?;
            match header.mode {
                Mode::Query => execute(ctx, &header.sql, limits).await.map(Some),
                Mode::Check => {
                    ctx.sql_with_options(&header.sql, read_only()).await?;
                    Ok(None)
                }
            }
        })
    });
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match result {
        Ok(r) => {
            write_frame(&mut out, &serde_json::to_vec(&Status { error: None }).map_err(std::io::Error::other)?)?;
            if let Some(r) = r {
                let bytes = ipc_bytes(&r.schema, &r.batches).map_err(std::io::Error::other)?;
                write_frame(&mut out, &bytes)?;
            }
        }
        Err(e) => {
            let e = e.scrub(&header.root);
            write_frame(&mut out, &serde_json::to_vec(&Status { error: Some(WireError::from(&e)) }).map_err(std::io::Error::other)?)?;
        }
    }
    out.flush()?;
    // Do not wait for the runtime's threads or free the inputs one by one.
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_stop_at_a_truncated_frame() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"abc").unwrap_or_default();
        write_frame(&mut buf, b"").unwrap_or_default();
        write_frame(&mut buf, b"defg").unwrap_or_default();
        buf.truncate(buf.len() - 1);
        let frames: Vec<&[u8]> = Frames(&buf).collect();
        assert_eq!(frames, vec![&b"abc"[..], &b""[..]]);
    }

    #[test]
    fn errors_cross_the_pipe_with_their_kind() {
        for e in [
            SqlError::Invalid("a".into()),
            SqlError::ReadOnly("b".into()),
            SqlError::TooLarge("c".into()),
            SqlError::Forbidden("d".into()),
            SqlError::OutOfRange("e".into()),
            SqlError::Internal("f".into()),
            SqlError::Timeout(Duration::from_millis(1500)),
        ] {
            let back = WireError::from(&e).into_error();
            assert_eq!(format!("{e:?}"), format!("{back:?}"));
        }
    }
}
