//! The HTTP server: an accept loop around hyper with timeouts and a
//! connection cap, so that no client can hold the server's sockets.
//!
//! `axum::serve` has neither: a client that connects and sends nothing, sends
//! its headers one byte a minute, stalls in the middle of a body or keeps an
//! idle keep-alive socket holds a file descriptor for as long as it likes.
//! About 300 such connections exhausted the descriptors, and `/healthz` and
//! ingest stopped answering. Here every connection is always under exactly
//! one clock:
//!
//! - **Waiting for headers** (a new connection, or the first byte of a later
//!   request has arrived): the complete headers must arrive within
//!   [`HttpSettings::header_timeout`] of the accept (or of that first byte);
//!   otherwise the server answers `408 Request Timeout` and closes.
//! - **Idle keep-alive** (a response was sent, nothing new has arrived): closed
//!   without an answer after [`HttpSettings::idle_timeout`].
//! - **In a request**: the handler runs as long as it needs, but the request
//!   body must make progress: a body that sends nothing for
//!   [`HttpSettings::body_timeout`] fails the read (tower-http's
//!   [`TimeoutBody`]), and whatever the handler made of that error, the
//!   client gets `408` and the connection is closed.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a
//! keep-alive connection is idle, so idle and header timeouts could not
//! differ, and it closes without a `408`. The clocks are kept by a small
//! per-connection watchdog instead ([`Activity`]), fed by the socket wrapper
//! (first byte of a request) and by the service (request start, end of the
//! response body).
//!
//! **Connection cap.** At [`HttpSettings::max_connections`] open connections
//! a new connection is accepted, answered `503` with `Retry-After: 1` and
//! closed at once rather than left waiting in the backlog, so clients fail
//! fast and retry. (The answer is written without reading the request; a
//! few rejected sockets linger up to a second to let the client read it.)
//!
//! **Graceful shutdown** is what `axum::serve` did: when `shutdown` completes
//! the listener is closed, idle connections are closed, requests in flight
//! finish (their connections close after the response), and [`serve`]
//! returns when the last connection is gone. The caller bounds the wait;
//! dropping the [`serve`] future aborts every connection task.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::ApiError;

/// Timeouts and the connection cap: the `[http]` section of the
/// configuration (its defaults are in the binary's `defaults.toml`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Time to send a request's complete headers. Default 10 s.
    #[serde(with = "sluice_core::duration")]
    pub header_timeout: Duration,
    /// Longest pause while a request body is being received. Default 60 s.
    #[serde(with = "sluice_core::duration")]
    pub body_timeout: Duration,
    /// An idle keep-alive connection is closed after this. Default 60 s.
    #[serde(with = "sluice_core::duration")]
    pub idle_timeout: Duration,
    /// Most open connections; more are answered 503. Default 1024.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Rejected connections that may linger at once (to let their client read
/// the 503); beyond it a rejected socket is closed right after the write.
const MAX_LINGERING: usize = 64;
/// How long a rejected or timed-out socket lingers after its answer.
const LINGER: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` completes, then drains
/// (see the module documentation). Returns when every connection is closed.
pub async fn serve<F>(listener: TcpListener, router: Router, settings: HttpSettings, shutdown: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send,
{
    let settings = HttpSettings { max_connections: settings.max_connections.max(1), ..settings };
    let mut conns = JoinSet::new();
    let (drain_tx, drain_rx) = watch::channel(false);
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if conns.len() >= settings.max_connections {
                        metrics::counter!("sluice_http_connections_rejected_total").increment(1);
                        reject(stream, &lingering);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(stream, router.clone(), settings, drain_rx.clone(), lingering.clone()));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Typically EMFILE: out of file descriptors. Back off
                    // instead of spinning; open connections will time out.
                    tracing::warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    let _ = drain_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}

/// An HTTP/1.1 answer written straight to a socket, outside hyper.
fn raw_response(status: StatusCode, code: &str, message: &str, retry_after: bool) -> Vec<u8> {
    let body = serde_json::json!({"error": {"code": code, "message": message, "details": []}}).to_string();
    let reason = status.canonical_reason().unwrap_or("");
    let retry = if retry_after { "retry-after: 1\r\n" } else { "" };
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    )
    .into_bytes()
}

/// Answers 503 to a connection over the cap and closes it, without waiting:
/// the answer fits in the empty socket buffer.
fn reject(stream: TcpStream, lingering: &Arc<Semaphore>) {
    let busy =
        raw_response(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many open connections (http.max_connections); retry in a second", true);
    let _ = stream.try_write(&busy);
    if let Ok(permit) = lingering.clone().try_acquire_owned() {
        tokio::spawn(async move {
            let _permit = permit;
            linger_close(stream).await;
        });
    }
}

/// Closes our side, then reads (and drops) what the client still sends for
/// up to [`LINGER`], so that closing does not reset the connection before
/// the client has read our answer.
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut buf = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// What the watchdog of a connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// Headers did not arrive in time: answer 408, close.
    Headers,
    /// Idle keep-alive: close.
    Idle,
}

/// The clocks of one connection (see the module documentation). Times are
/// milliseconds since the accept.
struct Activity {
    accepted: Instant,
    /// Requests whose response body has not been dropped yet.
    active: AtomicUsize,
    /// Requests completed.
    served: AtomicU64,
    /// When the last response ended.
    idle_since: AtomicU64,
    /// First byte read while no request was active, or `UNSET`.
    first_byte: AtomicU64,
    /// Wakes the watchdog when a clock changes.
    changed: Notify,
}

const UNSET: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Activity {
            accepted: Instant::now(),
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(UNSET),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(UNSET - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.accepted + Duration::from_millis(ms)
    }

    fn on_read(&self, n: usize) {
        if n > 0
            && self.active.load(Ordering::Acquire) == 0
            && self.first_byte.compare_exchange(UNSET, self.now_ms(), Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.changed.notify_one();
        }
    }

    /// When the connection expires and how, or `None` while a request runs.
    fn deadline(&self, s: &HttpSettings) -> Option<(Instant, Expired)> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.served.load(Ordering::Acquire) == 0 {
            return Some((self.accepted + s.header_timeout, Expired::Headers));
        }
        match self.first_byte.load(Ordering::Acquire) {
            UNSET => Some((self.at(self.idle_since.load(Ordering::Acquire)) + s.idle_timeout, Expired::Idle)),
            first => Some((self.at(first) + s.header_timeout, Expired::Headers)),
        }
    }
}

/// Marks a request as running from the call of the service until its
/// response body is dropped (hyper drops it once written, or on error).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.active.fetch_add(1, Ordering::AcqRel);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::Release);
        a.first_byte.store(UNSET, Ordering::Release);
        a.served.fetch_add(1, Ordering::AcqRel);
        if a.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.changed.notify_one();
        }
    }
}

/// The socket, reporting reads to the watchdog.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.activity.on_read(buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves one connection under its watchdog.
async fn connection(stream: TcpStream, router: Router, s: HttpSettings, mut drain: watch::Receiver<bool>, lingering: Arc<Semaphore>) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { stream, activity: activity.clone() });
    let service = TowerToHyperService::new(ConnService { router, activity: activity.clone(), body_timeout: s.body_timeout });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog keeps the header and idle clocks (module documentation).
    builder.header_read_timeout(None);
    // `Connection` is `Unpin`: it stays a plain value so that its socket can
    // be taken back to answer 408.
    let mut conn = builder.serve_connection(io, service);
    let mut draining = *drain.borrow();
    if draining {
        Pin::new(&mut conn).graceful_shutdown();
    }
    let expired = loop {
        let deadline = activity.deadline(&s);
        let sleep = tokio::time::sleep_until(deadline.map_or_else(|| Instant::now() + Duration::from_secs(3600), |d| d.0));
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            changed = drain.changed(), if !draining => {
                // An error means the server is gone: drain as well.
                let _ = changed;
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            () = activity.changed.notified() => {}
            () = sleep, if deadline.is_some() => {
                if let Some((at, how)) = activity.deadline(&s) {
                    if Instant::now() >= at {
                        break how;
                    }
                }
            }
        }
    };
    let Watched { stream, .. } = conn.into_parts().io.into_inner();
    match expired {
        Expired::Idle => metrics::counter!("sluice_http_idle_closed_total").increment(1),
        Expired::Headers => {
            metrics::counter!("sluice_http_header_timeouts_total").increment(1);
            let answer = raw_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request headers did not arrive in time (http.header_timeout)",
                false,
            );
            let _ = stream.try_write(&answer);
            if let Ok(_permit) = lingering.try_acquire() {
                linger_close(stream).await;
            }
        }
    }
}

/// The router as the service of one connection: marks requests busy for
/// the watchdog and puts the body timeout on request bodies.
#[derive(Clone)]
struct ConnService {
    router: Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
}

impl tower::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(self.activity.clone());
        let stalled = Arc::new(AtomicBool::new(false));
        let timeout = self.body_timeout;
        let flag = stalled.clone();
        let req = req.map(move |b| Body::new(StallBody { inner: Box::pin(TimeoutBody::new(timeout, b)), stalled: flag }));
        let router = self.router.clone();
        Box::pin(async move {
            let Ok(resp) = router.oneshot(req).await;
            let resp = if stalled.load(Ordering::Acquire) {
                metrics::counter!("sluice_http_body_timeouts_total").increment(1);
                let mut r =
                    ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the request body stalled (http.body_timeout)").into_response();
                // The rest of the body is not read: the connection cannot be reused.
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            } else {
                resp
            };
            Ok(resp.map(|b| Body::new(BusyBody { inner: b, _busy: busy })))
        })
    }
}

/// A request body under [`TimeoutBody`] that remembers whether it stalled.
struct StallBody {
    inner: Pin<Box<TimeoutBody<Incoming>>>,
    stalled: Arc<AtomicBool>,
}

impl HttpBody for StallBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if e.is::<TimeoutError>() {
                self.stalled.store(true, Ordering::Release);
            }
        }
        polled
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request marked busy until dropped.
struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn clocks() {
        let s = HttpSettings::default();
        let a = Arc::new(Activity::new());
        assert_eq!(a.deadline(&s).unwrap(), (a.accepted + s.header_timeout, Expired::Headers));
        let busy = Busy::new(a.clone());
        assert!(a.deadline(&s).is_none());
        drop(busy);
        let (at, how) = a.deadline(&s).unwrap();
        assert_eq!(how, Expired::Idle);
        assert!(at >= a.accepted + s.idle_timeout);
        a.on_read(3);
        assert_eq!(a.deadline(&s).unwrap().1, Expired::Headers);
    }

    #[test]
    fn raw_responses_are_http() {
        let r = String::from_utf8(raw_response(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "busy", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("retry-after: 1\r\n") && r.contains("connection: close\r\n"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{r}");
    }
}
