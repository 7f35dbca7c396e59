//! Dashboard sessions (issue #10): sign-in with a key, an HttpOnly cookie,
//! CSRF tokens on cookie writes, sign-out, revocation and expiry.

use std::time::Duration;

use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::Server;

/// A signed-in browser: the cookie and the CSRF token.
struct Signed {
    cookie: String,
    csrf: String,
    set_cookie: String,
    body: Value,
}

async fn sign_in(s: &Server, key: &str, headers: &[(&str, &str)]) -> Result<Signed, (StatusCode, Value)> {
    let mut rb = reqwest::Client::new().post(format!("{}/v1/sessions", s.url)).json(&json!({"key": key}));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.unwrap();
    let st = resp.status();
    let set_cookie = resp.headers().get(SET_COOKIE).map(|v| v.to_str().unwrap().to_owned());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if st != StatusCode::CREATED {
        return Err((st, body));
    }
    let set_cookie = set_cookie.expect("sign-in sets a cookie");
    let cookie = set_cookie.split(';').next().unwrap().trim().to_owned();
    Ok(Signed { cookie, csrf: body["csrf_token"].as_str().unwrap().to_owned(), set_cookie, body })
}

/// A request with the session cookie (and the CSRF token if given), no key.
async fn with_cookie(
    s: &Server,
    method: Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value, Option<String>) {
    let mut rb = reqwest::Client::new().request(method, format!("{}{path}", s.url)).header(COOKIE, cookie);
    if let Some(t) = csrf {
        rb = rb.header("X-CSRF-Token", t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let st = resp.status();
    let set_cookie = resp.headers().get(SET_COOKIE).map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::String(text)), set_cookie)
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_and_returns_the_csrf_token() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let signed = sign_in(&s, &k.admin, &[]).await.unwrap();
    let attrs: Vec<&str> = signed.set_cookie.split(';').map(str::trim).collect();
    let token = signed.cookie.strip_prefix("sluice_session=").unwrap();
    assert_eq!(token.len(), 43, "32 bytes, URL-safe base64: {token}");
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{token}");
    for a in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(attrs.contains(&a), "{a} missing from {}", signed.set_cookie);
    }
    assert!(!attrs.contains(&"Secure"), "plain HTTP: no Secure: {}", signed.set_cookie);
    assert_eq!(signed.body["workspace"], "acme");
    assert_eq!(signed.body["scope"], "admin");
    assert!(signed.body["key_id"].as_str().unwrap().starts_with("key_"));
    assert!(signed.body["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(signed.csrf.len() >= 32);
    // The secret never comes back.
    assert!(!signed.body.to_string().contains(&k.admin));

    // Behind a TLS proxy the cookie is Secure.
    let tls = sign_in(&s, &k.admin, &[("X-Forwarded-Proto", "https")]).await.unwrap();
    assert!(tls.set_cookie.split(';').map(str::trim).any(|a| a == "Secure"), "{}", tls.set_cookie);
    assert_ne!(tls.cookie, signed.cookie);

    // The cookie alone authenticates reads, and /v1/sessions/current gives the CSRF token back.
    let (st, v, _) = with_cookie(&s, Method::GET, "/v1/sessions/current", &signed.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["csrf_token"], signed.csrf.as_str());
    assert_eq!(v["workspace"], "acme");
    let (st, v, _) = with_cookie(&s, Method::GET, "/v1/consumers", &signed.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // No cookie, or a made-up one: 401.
    let (st, _) = s.anonymous().get("/v1/sessions/current").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v, _) = with_cookie(&s, Method::GET, "/v1/consumers", "sluice_session=AAAA", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn cookie_writes_without_the_csrf_token_are_refused_with_403_csrf() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let signed = sign_in(&s, &k.admin, &[]).await.unwrap();
    let body = json!({"name": "ci", "scope": "ingest"});
    for csrf in [None, Some("wrong"), Some("")] {
        let (st, v, _) = with_cookie(&s, Method::POST, "/v1/keys", &signed.cookie, csrf, Some(body.clone())).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{csrf:?}: {v}");
        assert_eq!(v["error"]["code"], "csrf", "{v}");
    }
    // Nothing was created.
    let (_, v) = s.api(&k.admin).get("/v1/keys").await;
    assert!(v["data"].as_array().unwrap().iter().all(|k| k["name"] != "ci"), "{v}");
    // With the token it works; reads never need it; bearer keys never need it.
    let (st, v, _) = with_cookie(&s, Method::POST, "/v1/keys", &signed.cookie, Some(&signed.csrf), Some(body.clone())).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, _, _) = with_cookie(&s, Method::GET, "/v1/keys", &signed.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = s.api(&k.admin).post("/v1/keys", json!({"name": "ci2", "scope": "ingest"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Another session's token does not fit this session.
    let other = sign_in(&s, &k.admin, &[]).await.unwrap();
    let (st, v, _) = with_cookie(&s, Method::POST, "/v1/keys", &signed.cookie, Some(&other.csrf), Some(body)).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "csrf");
}

#[tokio::test]
async fn sign_out_ends_the_session_and_clears_the_cookie() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let signed = sign_in(&s, &k.read, &[]).await.unwrap();
    // Sign-out changes state: it needs the CSRF token too.
    let (st, v, _) = with_cookie(&s, Method::DELETE, "/v1/sessions/current", &signed.cookie, None, None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "csrf");
    let (st, v, set_cookie) = with_cookie(&s, Method::DELETE, "/v1/sessions/current", &signed.cookie, Some(&signed.csrf), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{v}");
    let set_cookie = set_cookie.expect("sign-out clears the cookie");
    assert!(set_cookie.starts_with("sluice_session=;"), "{set_cookie}");
    assert!(set_cookie.contains("Max-Age=0"), "{set_cookie}");
    // The old cookie no longer works anywhere.
    for path in ["/v1/sessions/current", "/v1/consumers"] {
        let (st, _, _) = with_cookie(&s, Method::GET, path, &signed.cookie, None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (st, _, _) = with_cookie(&s, Method::DELETE, "/v1/sessions/current", &signed.cookie, Some(&signed.csrf), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Both are in the workspace's audit trail, by the key that signed in,
    // naming the same session, and the token is nowhere in it.
    let (st, audit) = s.api(&k.admin).get("/v1/audit?limit=1000").await;
    assert_eq!(st, StatusCode::OK, "{audit}");
    let entries = audit["data"].as_array().unwrap();
    let of = |action: &str| entries.iter().filter(|e| e["action"] == action).cloned().collect::<Vec<Value>>();
    let (created, deleted) = (of("session.create"), of("session.delete"));
    assert_eq!((created.len(), deleted.len()), (1, 1), "{audit}");
    assert_eq!(created[0]["actor_key_id"], signed.body["key_id"]);
    assert_eq!(deleted[0]["actor_key_id"], signed.body["key_id"]);
    assert_eq!(created[0]["target_type"], "session");
    assert_eq!(created[0]["target_id"], deleted[0]["target_id"]);
    assert!(created[0]["target_id"].as_str().unwrap().starts_with("ses_"));
    let token = signed.cookie.trim_start_matches("sluice_session=");
    assert!(!audit.to_string().contains(token));
}

#[tokio::test]
async fn ingest_keys_and_unknown_keys_cannot_sign_in_and_read_sessions_stay_read_only() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let (st, v) = sign_in(&s, &k.ingest, &[]).await.err().unwrap();
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    let (st, v) = sign_in(&s, "sk_not_a_key", &[]).await.err().unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let (st, v) = sign_in(&s, "", &[]).await.err().unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    // A read key signs in, reads, and cannot write even with the CSRF token.
    let read = sign_in(&s, &k.read, &[]).await.unwrap();
    assert_eq!(read.body["scope"], "read");
    let (st, _, _) = with_cookie(&s, Method::GET, "/v1/dlq", &read.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v, _) = with_cookie(&s, Method::POST, "/v1/keys", &read.cookie, Some(&read.csrf), Some(json!({"name": "x", "scope": "read"}))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    // The root key may sign in too (its workspace is `default`).
    let root = sign_in(&s, &s.key, &[]).await.unwrap();
    assert_eq!(root.body["scope"], "root");
}

#[tokio::test]
async fn revoking_the_key_ends_its_sessions() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let signed = sign_in(&s, &k.admin, &[]).await.unwrap();
    let other = sign_in(&s, &k.read, &[]).await.unwrap();
    let key_id = signed.body["key_id"].as_str().unwrap();
    let (st, v) = s.root().delete(&format!("/v1/keys/{key_id}")).await;
    assert!(st.is_success(), "{st} {v}");
    for path in ["/v1/sessions/current", "/v1/consumers"] {
        let (st, _, _) = with_cookie(&s, Method::GET, path, &signed.cookie, None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Sessions of other keys go on.
    let (st, _, _) = with_cookie(&s, Method::GET, "/v1/consumers", &other.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn sessions_expire_after_dashboard_session_ttl() {
    let s = Server::start_with(&[("SLUICE_DASHBOARD_SESSION_TTL", "2s")]).await;
    let k = s.workspace_with_keys("acme").await;
    let signed = sign_in(&s, &k.admin, &[]).await.unwrap();
    assert!(signed.set_cookie.contains("Max-Age=2"), "{}", signed.set_cookie);
    let (st, _, _) = with_cookie(&s, Method::GET, "/v1/consumers", &signed.cookie, None, None).await;
    assert_eq!(st, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for path in ["/v1/sessions/current", "/v1/consumers"] {
        let (st, v, _) = with_cookie(&s, Method::GET, path, &signed.cookie, None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}: {v}");
    }
    // Signing in again works (and clears out the expired session).
    sign_in(&s, &k.admin, &[]).await.unwrap();
}
