//! A typed client of the Sluice HTTP API (docs/api.md).
//!
//! Answers the CLI, the benchmarks and the tests read are typed structs
//! (unknown fields are ignored, so a newer server does not break an older
//! client); the rest is available as JSON ([`Client::get_json`],
//! [`Client::call`]). API errors come back as [`ClientError::Api`] with the
//! server's stable `code`, its message and details.

use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_core::JobState;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No API key was given.
    #[error("no API key: pass --key or set SLUICE_KEY")]
    NoKey,
    /// The server could not be reached (or the connection broke).
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        /// The server's URL.
        url: String,
        /// What failed.
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{status} {code}: {message}{}", details.iter().take(50).map(|d| format!("\n  {d}")).collect::<String>())]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable error code (`bad_request`, `not_found`, …).
        code: String,
        /// What the server said.
        message: String,
        /// Per-record or per-field details, if any.
        details: Vec<Value>,
    },
    /// The answer was not what this client expected.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

sluice_core::error_codes!(ClientError { NoKey => "client.no_key", Unreachable => "client.unreachable", Api => "client.api", Decode => "client.decode" });

/// Result alias of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A page of a list.
#[derive(Debug, Clone, Deserialize)]
pub struct Page<T> {
    /// Items of this page.
    pub data: Vec<T>,
    /// Cursor of the next page (`None` on the last page).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// What `POST /v1/events` did.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct IngestResult {
    /// Events appended.
    pub accepted: u64,
    /// Events already seen (not appended again).
    pub duplicates: u64,
}

/// A job's progress.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Progress {
    /// Units done.
    pub done: u64,
    /// Units in all, when known.
    pub total: Option<u64>,
    /// Percent done, when the total is known.
    pub percent: Option<f64>,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
}

/// A job (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    /// `job_…`.
    pub id: String,
    /// Kind, e.g. `consumer.reset`.
    pub kind: String,
    /// Where it is in its life.
    pub status: JobState,
    /// Output, once succeeded.
    #[serde(default)]
    pub result: Option<Value>,
    /// Last error.
    #[serde(default)]
    pub error: Option<String>,
    /// Progress.
    pub progress: Progress,
    /// RFC 3339.
    pub created_at: String,
}

/// One invalid row of an import.
#[derive(Debug, Clone, Deserialize)]
pub struct RowError {
    /// 1-based row number (the header is row 1).
    pub row: Option<u64>,
    /// Column name.
    #[serde(default)]
    pub column: Option<String>,
    /// The value refused.
    #[serde(default)]
    pub value: Option<Value>,
    /// Why.
    pub message: String,
}

/// A CSV import (`GET /v1/imports/{id}`).
#[derive(Debug, Clone, Deserialize)]
pub struct Import {
    /// The import's job id.
    pub id: String,
    /// Where it is in its life.
    pub status: JobState,
    /// Data rows in the file, once counted.
    #[serde(default)]
    pub rows_total: Option<u64>,
    /// Rows processed so far.
    #[serde(default)]
    pub rows_processed: u64,
    /// Rows imported.
    #[serde(default)]
    pub rows_imported: u64,
    /// Rows already imported before (same id).
    #[serde(default)]
    pub rows_duplicate: u64,
    /// Rows refused.
    #[serde(default)]
    pub rows_rejected: u64,
    /// Row errors.
    #[serde(default)]
    pub errors: Vec<RowError>,
    /// Why the import failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// A consumer (`GET /v1/consumers`).
#[derive(Debug, Clone, Deserialize)]
pub struct Consumer {
    /// Name.
    pub name: String,
    /// `running`, `retrying`, `stopped`.
    pub status: String,
    /// Records behind the end of the log.
    pub lag: u64,
    /// Dead letters waiting.
    #[serde(default)]
    pub dlq_size: u64,
    /// Most recent error.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A dead letter (`GET /v1/dlq`).
#[derive(Debug, Clone, Deserialize)]
pub struct DeadLetter {
    /// `dlq_…`.
    pub id: String,
    /// `dead`, `replaying`, `replayed`, `discarded`.
    pub status: String,
    /// Consumer.
    pub consumer: String,
    /// The event.
    pub event_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// Last error.
    pub error: String,
}

/// An API key as listed (never its secret).
#[derive(Debug, Clone, Deserialize)]
pub struct Key {
    /// `key_…`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Scope.
    pub scope: sluice_core::Scope,
    /// Workspace.
    pub workspace: String,
    /// The secret's first characters.
    pub prefix: String,
}

/// A key just created: the only time its secret is shown.
#[derive(Debug, Clone, Deserialize)]
pub struct NewKey {
    /// `key_…`.
    pub id: String,
    /// The secret (`sk_…`).
    pub secret: String,
}

/// A workspace.
#[derive(Debug, Clone, Deserialize)]
pub struct Workspace {
    /// Name.
    pub name: String,
    /// IANA time zone.
    pub time_zone: String,
    /// RFC 3339.
    pub created_at: String,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Clone, Deserialize)]
pub struct EventPage {
    /// The events, as JSON.
    pub data: Vec<Value>,
    /// Cursor of the next page (`None`: nothing more now).
    #[serde(default)]
    pub next_cursor: Option<String>,
    /// Cursor to follow new events from where this page ends.
    #[serde(default)]
    pub tail_cursor: Option<String>,
}

/// Filters of `GET /v1/events`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this type.
    pub event_type: Option<String>,
    /// Only this customer.
    pub customer_id: Option<String>,
    /// Where to continue (`latest`: only what comes from now on).
    pub cursor: Option<String>,
    /// Most events per page.
    pub limit: usize,
}

/// Percent-encodes `s` for a URL path segment or query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `path?k=v&…` with the given (name, value) pairs, values encoded.
fn with_query(path: &str, params: &[(&str, Option<&str>)]) -> String {
    let q: Vec<String> = params.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", urlencode(v)))).collect();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}{}{}", if path.contains('?') { '&' } else { '?' }, q.join("&"))
    }
}

/// A client of one server with one key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    /// A client of the server at `url` using `key`.
    pub fn new(url: &str, key: Option<&str>) -> Result<Client> {
        let key = key.ok_or(ClientError::NoKey)?.to_owned();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(Client { http, base: url.trim_end_matches('/').to_owned(), key })
    }

    /// The server's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` with the key.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{}", self.base, path)).bearer_auth(&self.key)
    }

    /// Sends a request, returning the response when it succeeded.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"error": {"message": text}}));
        let text_of = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_default();
        Err(ClientError::Api {
            status,
            code: text_of(&v["error"]["code"]),
            message: text_of(&v["error"]["message"]),
            details: v["error"]["details"].as_array().cloned().unwrap_or_default(),
        })
    }

    /// A JSON call; the answer as JSON (`null` for an empty body).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let text = self.send(req).await?.text().await.map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    /// A JSON call whose answer is `T`.
    pub async fn typed<T: DeserializeOwned>(&self, method: Method, path: &str, body: Option<Value>) -> Result<T> {
        let v = self.call(method, path, body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None).await
    }

    /// A call whose answer is text (CSV, DDL…).
    pub async fn text(&self, method: Method, path: &str, body: Option<Value>) -> Result<String> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await?.text().await.map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Every item of a paged list, following `next_cursor`.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page: Page<T> = self.typed(Method::GET, &with_query(path, &[("cursor", cursor.as_deref())]), None).await?;
            out.extend(page.data);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Sends events (`POST /v1/events`).
    pub async fn send_events(&self, events: &[Value]) -> Result<IngestResult> {
        self.typed(Method::POST, "/v1/events", Some(Value::Array(events.to_vec()))).await
    }

    /// A page of events (`GET /v1/events`), as JSON.
    pub async fn events(&self, f: &EventFilter) -> Result<EventPage> {
        let limit = f.limit.to_string();
        let path = with_query(
            "/v1/events",
            &[("limit", Some(&limit)), ("type", f.event_type.as_deref()), ("customer_id", f.customer_id.as_deref()), ("cursor", f.cursor.as_deref())],
        );
        self.typed(Method::GET, &path, None).await
    }

    /// Keys (of one workspace, or the key's own).
    pub async fn keys(&self, workspace: Option<&str>) -> Result<Vec<Key>> {
        self.list_all(&with_query("/v1/keys", &[("workspace", workspace)])).await
    }

    /// Creates a key.
    pub async fn create_key(&self, name: &str, scope: sluice_core::Scope, workspace: Option<&str>) -> Result<NewKey> {
        self.typed(Method::POST, "/v1/keys", Some(json!({"name": name, "scope": scope, "workspace": workspace}))).await
    }

    /// Workspaces.
    pub async fn workspaces(&self) -> Result<Vec<Workspace>> {
        self.list_all("/v1/workspaces").await
    }

    /// Creates a workspace.
    pub async fn create_workspace(&self, name: &str, time_zone: Option<&str>) -> Result<Value> {
        self.call(Method::POST, "/v1/workspaces", Some(json!({"name": name, "time_zone": time_zone}))).await
    }

    /// Consumers and their state.
    pub async fn consumers(&self) -> Result<Vec<Consumer>> {
        self.list_all("/v1/consumers").await
    }

    /// Dead letters, optionally of one consumer and status.
    pub async fn dead_letters(&self, consumer: Option<&str>, status: Option<&str>) -> Result<Vec<DeadLetter>> {
        self.list_all(&with_query("/v1/dlq?limit=1000", &[("consumer", consumer), ("status", status)])).await
    }

    /// Jobs, optionally of one kind and status.
    pub async fn jobs(&self, kind: Option<&str>, status: Option<&str>) -> Result<Vec<Job>> {
        self.list_all(&with_query("/v1/jobs?limit=1000", &[("kind", kind), ("status", status)])).await
    }

    /// One job.
    pub async fn job(&self, id: &str) -> Result<Job> {
        self.typed(Method::GET, &format!("/v1/jobs/{}", urlencode(id)), None).await
    }

    /// Uploads a usage CSV (`POST /v1/imports?kind=usage`); with `wait`,
    /// the server answers when the import ended (or after its wait limit).
    pub async fn import_usage(&self, body: reqwest::Body, mode: &str, wait: bool) -> Result<Import> {
        let path = format!("/v1/imports?kind=usage&wait={wait}&mode={}", urlencode(mode));
        let resp = self.send(self.request(Method::POST, &path).header("content-type", "text/csv").body(body)).await?;
        resp.json().await.map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// One import.
    pub async fn import(&self, id: &str) -> Result<Import> {
        self.typed(Method::GET, &format!("/v1/imports/{}", urlencode(id)), None).await
    }
}
