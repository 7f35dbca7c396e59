//! Starting, killing and restarting real server processes, and a tiny API client.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sluice_store::testing::TestDatabase;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Held by the tests that load the machine on purpose (a hostile tenant,
/// hostile SQL, a thousand connections) and measure latency meanwhile: they
/// run one at a time, so that one's load does not fail another's timing on
/// a 2-core machine. Other tests still run beside them.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Runs `f` with no other test's server running: waits until the servers
/// of other tests have stopped, and servers that other tests start
/// meanwhile wait until `f` is done. For a latency measurement that must
/// not share a 2-core machine with the rest of the suite (CI saw a tenant's
/// lag measured 1.2 s only because another test's server was busy). Take
/// [`heavy`] first, as every heavy test does; no test starts a server
/// before `heavy`, so neither waits for the other while holding what the
/// other needs.
pub async fn alone<F: std::future::Future>(f: F) -> F::Output {
    when_running(|r| {
        let free = r.servers == 0 && !r.alone;
        r.alone |= free;
        free
    })
    .await;
    // Reset even when `f` panics (a failed assertion), or every later
    // server would wait for ever.
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner).alone = false;
            RUNNING_CHANGED.notify_waiters();
        }
    }
    let _done = Done;
    ALONE.scope((), f).await
}

/// Servers running, and whether a test runs [`alone`].
struct Running {
    servers: usize,
    alone: bool,
}
static RUNNING: Mutex<Running> = Mutex::new(Running { servers: 0, alone: false });
static RUNNING_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();
tokio::task_local! {
    /// Set inside [`alone`]: that test's own servers do not wait.
    static ALONE: ();
}

/// Waits until `take` answers true for the state of [`RUNNING`] (which
/// it may change at that moment, under the lock).
async fn when_running(mut take: impl FnMut(&mut Running) -> bool) {
    loop {
        let changed = RUNNING_CHANGED.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if take(&mut RUNNING.lock().unwrap()) {
            return;
        }
        changed.await;
    }
}

/// One running server of a test, counted for [`alone`].
struct Counted;

impl Counted {
    async fn new() -> Option<Counted> {
        if ALONE.try_with(|_| ()).is_ok() {
            return None;
        }
        when_running(|r| {
            r.servers += usize::from(!r.alone);
            !r.alone
        })
        .await;
        Some(Counted)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner).servers -= 1;
        RUNNING_CHANGED.notify_waiters();
    }
}

/// Which state backend the suite runs against.
pub fn backend() -> String {
    std::env::var("SLUICE_TEST_STATE").unwrap_or_else(|_| "sqlite".into())
}

/// A running server and everything needed to restart it on the same data.
pub struct Server {
    pub url: String,
    pub key: String,
    pub dir: Arc<tempfile::TempDir>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    child: Option<Child>,
    /// The thread copying the child's stderr into `stderr`.
    reader: Option<std::thread::JoinHandle<()>>,
    db: Option<Arc<TestDatabase>>,
    env: Vec<(String, String)>,
    /// Dropped after the process is killed (`Drop for Server`).
    _counted: Option<Counted>,
}

impl Server {
    /// A fresh server with default settings.
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// A fresh server with extra environment variables.
    pub async fn start_with(env: &[(&str, &str)]) -> Server {
        let counted = Counted::new().await;
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let db = if backend() == "postgres" {
            Some(Arc::new(TestDatabase::create().await.expect("SLUICE_TEST_STATE=postgres but PostgreSQL is unavailable")))
        } else {
            None
        };
        let key = format!("sk_test_{}", uuid_like());
        let mut env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        env.push(("SLUICE_BOOTSTRAP_KEY".into(), key.clone()));
        let mut s = Server { url: String::new(), key, dir, stderr: Arc::default(), child: None, reader: None, db, env, _counted: counted };
        s.spawn();
        s
    }

    /// The state URL this server uses.
    pub fn state_url(&self) -> String {
        match &self.db {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{}", self.dir.path().join("state.db").display()),
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The `serve` command of this server, not yet started.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.dir.path())
            .arg("--state-url")
            .arg(self.state_url())
            .env_remove("SLUICE_BOOTSTRAP_KEY")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        let mut child = self.command().spawn().expect("spawn sluice serve");
        let stderr = child.stderr.take().unwrap();
        let lines = self.stderr.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(u) = line.strip_prefix("sluice listening on ") {
                    let _ = tx.send(u.trim().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        }));
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => self.url = url,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; stderr:\n{}", self.stderr.lock().unwrap().join("\n"));
            }
        }
        self.child = Some(child);
    }

    /// SIGKILL, like a crash or an OOM kill.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let st = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                // The last lines it wrote (its "stopped cleanly") may still
                // be on their way through the pipe: wait for the reader to
                // reach the end (bounded, in case something else holds it).
                if let Some(r) = self.reader.take() {
                    let until = Instant::now() + Duration::from_secs(10);
                    while !r.is_finished() && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory and database.
    pub fn restart(&mut self) {
        self.kill9();
        self.stderr.lock().unwrap().clear();
        self.spawn();
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// A client using the root key.
    pub fn root(&self) -> Api {
        self.api(&self.key)
    }

    pub fn api(&self, key: &str) -> Api {
        Api { http: http_client(), base: self.url.clone(), key: Some(key.to_owned()) }
    }

    pub fn anonymous(&self) -> Api {
        Api { http: http_client(), base: self.url.clone(), key: None }
    }

    /// Creates a workspace and returns keys of every scope in it.
    pub async fn workspace_with_keys(&self, name: &str) -> Keys {
        let (st, _) = self.root().post("/v1/workspaces", serde_json::json!({"name": name})).await;
        assert_eq!(st, StatusCode::CREATED);
        let mk = |scope: &'static str| {
            let root = self.root();
            let name = name.to_owned();
            async move {
                let (st, v) = root.post("/v1/keys", serde_json::json!({"name": format!("{name} {scope}"), "scope": scope, "workspace": name})).await;
                assert_eq!(st, StatusCode::CREATED, "{v}");
                v["secret"].as_str().unwrap().to_owned()
            }
        };
        Keys { admin: mk("admin").await, read: mk("read").await, ingest: mk("ingest").await }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Keys {
    pub admin: String,
    pub read: String,
    pub ingest: String,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{t:x}{:x}{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// JSON-over-HTTP with an optional bearer key.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub key: Option<String>,
}

impl Api {
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = rb.send().await.unwrap();
        let st = resp.status();
        let text = resp.text().await.unwrap();
        (st, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.req(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.req(Method::POST, path).json(&body)).await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.send(self.req(Method::POST, path).header("content-type", content_type).body(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.req(Method::DELETE, path)).await
    }

    /// POST /v1/events with a JSON body; asserts 200 and returns (accepted, duplicates).
    pub async fn ingest(&self, body: Value) -> (u64, u64) {
        let (st, v) = self.post("/v1/events", body).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        (v["accepted"].as_u64().unwrap(), v["duplicates"].as_u64().unwrap())
    }

    /// Every event of the key's workspace matching `query`, following cursors.
    pub async fn all_events(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/events?limit=1000{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (st, v) = self.get(&path).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            out.extend(v["data"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }
}

/// Runs the CLI with the given args and environment; returns (success, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::piped());
    cmd.env_remove("SLUICE_URL").env_remove("SLUICE_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Polls `f` every 50 ms until it holds; fails naming `what` after `secs`.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
