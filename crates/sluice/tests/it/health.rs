//! Customer health end to end (issue 9), on the state store the suite runs
//! against: measures of 1,000 customers against an independent computation
//! at window edges in Asia/Tokyo, stage rules and overrides, weight sharing,
//! time alone changing band and stage, exactness across kill -9 and a
//! rebuild, transition webhooks with a cooldown, and a backtest.
//!
//! The independent computation uses only the fixed +09:00 offset of
//! Asia/Tokyo (no DST) and plain arithmetic on dates, not the server's code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Dur, FixedOffset, NaiveDate, TimeZone, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{Api, Server};

async fn send(api: &Api, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    api.send(api.req(method, path).json(&body)).await
}

fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).unwrap()
}

/// 00:00 JST of a date, in UTC.
fn jst_midnight(d: NaiveDate) -> DateTime<Utc> {
    jst().from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap()).unwrap().with_timezone(&Utc)
}

fn jst_date(t: DateTime<Utc>) -> NaiveDate {
    t.with_timezone(&jst()).date_naive()
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A Tokyo workspace with an admin key.
async fn tokyo(s: &Server, name: &str) -> Api {
    let root = s.root();
    let (st, v) = root.post("/v1/workspaces", json!({"name": name, "time_zone": "Asia/Tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (_, key) = root.post("/v1/keys", json!({"name": "a", "scope": "admin", "workspace": name})).await;
    s.api(key["secret"].as_str().unwrap())
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the health consumer has applied everything in the log.
async fn caught_up(s: &Server) {
    let root = s.root();
    wait_for("the health consumer to catch up", 120, move || {
        let root = root.clone();
        Box::pin(async move {
            let (_, c) = root.get("/v1/consumers").await;
            c["data"].as_array().unwrap().iter().any(|c| c["name"] == "health" && c["lag"] == json!(0))
        })
    })
    .await;
}

/// Applies a configuration and waits for its recompute job.
async fn apply(api: &Api, cfg: Value) -> i64 {
    apply_job(api, cfg).await.0
}

/// [`apply`], answering the version and the recompute job.
async fn apply_job(api: &Api, cfg: Value) -> (i64, Value) {
    let (st, v) = send(api, Method::PUT, "/v1/health/config", cfg).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let job = v["recompute_job"]["id"].as_str().unwrap().to_owned();
    let a = api.clone();
    let path = format!("/v1/jobs/{job}");
    wait_for("the recompute job", 120, move || {
        let (a, path) = (a.clone(), path.clone());
        Box::pin(async move { a.get(&path).await.1["status"] == "succeeded" })
    })
    .await;
    (v["version"].as_i64().unwrap(), api.get(&format!("/v1/jobs/{job}")).await.1)
}

fn measure<'a>(h: &'a Value, name: &str) -> &'a Value {
    h["measures"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("no measure {name} in {h}"))
}

async fn health_at(api: &Api, id: &str, t: DateTime<Utc>) -> Value {
    let (st, v) = api.get(&format!("/v1/customers/{id}/health?as_of={}", urlencode(&rfc(t)))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// A deterministic generator (no dependency on the server's randomness).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone)]
struct Ev {
    customer: String,
    kind: &'static str,
    at: DateTime<Utc>,
    user: String,
    plan: &'static str,
}

/// The independent computation of the measures at `t`.
fn expected(evs: &[&Ev], t: DateTime<Utc>) -> BTreeMap<&'static str, Option<f64>> {
    let today = jst_date(t);
    let start = |days: i64| jst_midnight(today - Dur::days(days - 1));
    let count = |kind: &str, from: DateTime<Utc>, to_excl: Option<DateTime<Utc>>, plan: Option<&str>| {
        evs.iter()
            .filter(|e| e.kind == kind && e.at >= from && e.at <= t && to_excl.is_none_or(|x| e.at < x) && plan.is_none_or(|p| e.plan == p))
            .count()
    };
    let mut m = BTreeMap::new();
    m.insert("reports_30d", Some(count("report.created", start(30), None, None) as f64));
    m.insert("pro_reports_7d", Some(count("report.created", start(7), None, Some("pro")) as f64));
    let users: HashSet<&str> = evs.iter().filter(|e| e.kind == "page" && e.at >= start(7) && e.at <= t).map(|e| e.user.as_str()).collect();
    m.insert("active_users", Some(users.len() as f64));
    let last = evs.iter().filter(|e| e.kind == "login" && e.at <= t).map(|e| e.at).max();
    m.insert("idle_days", last.map(|l| (today - jst_date(l)).num_days() as f64));
    let (cur, prev) = (count("api.call", start(14), None, None), count("api.call", start(28), Some(start(14)), None));
    m.insert("usage_trend", (prev > 0).then(|| (cur as f64 - prev as f64) / prev as f64 * 100.0));
    m
}

fn health_config() -> Value {
    json!({"measures": {
        "reports_30d":  {"kind": "count", "event_type": "report.created", "days": 30},
        "pro_reports_7d": {"kind": "count", "event_type": "report.created", "days": 7, "properties": {"plan": "pro"}},
        "active_users": {"kind": "distinct_users", "event_type": "page", "days": 7},
        "idle_days":    {"kind": "days_since_last", "event_type": "login"},
        "usage_trend":  {"kind": "trend", "event_type": "api.call", "days": 14},
        "to_renewal":   {"kind": "days_until", "attribute": "renewal_date"}},
      "stages": [
        {"name": "renewal",    "rule": {"all": [{"measure": "to_renewal", "op": "<=", "value": 60}]}},
        {"name": "onboarding", "rule": {"any": [{"measure": "reports_30d", "op": "<", "value": 5}]}},
        {"name": "adoption",   "rule": {"all": []}}],
      "scorecards": {
        "adoption": [
          {"measure": "reports_30d", "weight": 2, "thresholds": [{"min": 10, "points": 100}, {"min": 3, "points": 50}, {"min": null, "points": 0}]},
          {"measure": "idle_days",   "weight": 1, "linear": {"from": 30, "to": 0}}],
        "onboarding": [{"measure": "active_users", "weight": 1, "linear": {"from": 0, "to": 5}}]},
      "bands": {"good": 70, "normal": 40}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_of_1000_customers_equal_an_independent_computation_at_tokyo_midnights() {
    let s = Server::start().await;
    let api = tokyo(&s, "hm").await;
    // 40 days of history ending 2026-11-20 (JST), with events placed on
    // local midnight and on the last microsecond before it.
    let base = NaiveDate::from_ymd_opt(2026, 10, 12).unwrap();
    let mut rng = Lcg(42);
    let kinds = ["report.created", "page", "login", "api.call"];
    let mut evs = Vec::new();
    for c in 0..1000 {
        let n = 5 + rng.below(30);
        for _ in 0..n {
            let day = base + Dur::days(rng.below(40) as i64);
            let at = match rng.below(4) {
                0 => jst_midnight(day),
                1 => jst_midnight(day + Dur::days(1)) - Dur::microseconds(1),
                _ => jst_midnight(day) + Dur::seconds(rng.below(86_400) as i64),
            };
            evs.push(Ev {
                customer: format!("c{c:04}"),
                kind: kinds[rng.below(4) as usize],
                at,
                user: format!("u{}", rng.below(6)),
                plan: if rng.below(2) == 0 { "pro" } else { "free" },
            });
        }
    }
    let body: Vec<Value> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({"id": format!("e{i}"), "type": e.kind, "customer_id": e.customer, "user_id": e.user, "timestamp": rfc(e.at),
                "properties": {"plan": e.plan}})
        })
        .collect();
    for chunk in body.chunks(5000) {
        api.ingest(Value::Array(chunk.to_vec())).await;
    }
    caught_up(&s).await;
    let (version, job) = apply_job(&api, health_config()).await;
    let ids: Vec<String> = (0..1000).map(|c| format!("c{c:04}")).collect();
    // It found each customer once (stepping through the events' key).
    assert_eq!((&job["result"]["customers_total"], &job["result"]["customers_done"]), (&json!(1000), &json!(1000)), "{job}");
    // The recompute (batches of 500, two at a time) left every customer
    // evaluated under this version, each as the log says at its time.
    for id in ids.iter().step_by(25) {
        let (st, h) = api.get(&format!("/v1/customers/{id}/health")).await;
        assert_eq!(st, StatusCode::OK, "{id}: {h}");
        assert_eq!(h["config_version"], json!(version), "{id}: {h}");
        let t: DateTime<Utc> = h["as_of"].as_str().unwrap().parse().unwrap();
        let re = health_at(&api, id, t).await;
        let values = |v: &Value| v["measures"].as_array().unwrap().iter().map(|m| (m["name"].clone(), m["value"].clone())).collect::<Vec<_>>();
        assert_eq!((&re["stage"], &re["score"], &re["band"]), (&h["stage"], &h["score"], &h["band"]), "{id}: live {h} vs log {re}");
        assert_eq!(values(&re), values(&h), "{id}");
    }
    let mut by_customer: HashMap<&str, Vec<&Ev>> = HashMap::new();
    for e in &evs {
        by_customer.entry(e.customer.as_str()).or_default().push(e);
    }
    // Just before and exactly at two local midnights, and mid-day.
    let edge = jst_midnight(NaiveDate::from_ymd_opt(2026, 11, 10).unwrap());
    let times =
        [edge - Dur::microseconds(1), edge, jst_midnight(NaiveDate::from_ymd_opt(2026, 11, 21).unwrap()), edge + Dur::hours(13) + Dur::seconds(7)];
    for (ti, t) in times.iter().enumerate() {
        // Every customer at the first time; a third of them at the others.
        let chosen: Vec<&String> = ids.iter().enumerate().filter(|(i, _)| ti == 0 || i % 3 == ti % 3).map(|(_, id)| id).collect();
        for chunk in chosen.chunks(16) {
            let got = futures::future::join_all(chunk.iter().map(|id| health_at(&api, id, *t))).await;
            for (id, h) in chunk.iter().zip(got) {
                let want = expected(&by_customer[id.as_str()], *t);
                for (name, w) in want {
                    let v = &measure(&h, name)["value"];
                    match w {
                        None => assert!(v.is_null(), "{id} {name} at {t}: want no data, got {v}"),
                        Some(w) => assert!((v.as_f64().unwrap_or(f64::NAN) - w).abs() < 1e-3, "{id} {name} at {t}: want {w}, got {v}"),
                    }
                }
                // The explanation adds up.
                if let Some(score) = h["score"].as_f64() {
                    let sum: f64 = h["measures"].as_array().unwrap().iter().filter_map(|m| m["contribution"].as_f64()).sum();
                    assert!((sum - score).abs() < 1e-6, "{id}: contributions {sum} vs score {score}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_rules_overrides_and_weight_sharing() {
    let s = Server::start().await;
    let api = tokyo(&s, "hs").await;
    // Invalid configurations: 400 naming the path, nothing applied.
    for (cfg, path) in [
        (
            json!({"measures": {"m": {"kind": "count", "event_type": "x", "days": 0}}, "stages": [{"name": "a", "rule": {"all": []}}]}),
            "measures.m.days",
        ),
        (
            json!({"measures": {}, "stages": [{"name": "a", "rule": {"all": [{"measure": "nope", "op": "<", "value": 1}]}}]}),
            "stages[0].rule.all[0].measure",
        ),
        (
            json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": [{"name": "a", "rule": {"all": []}}],
                "scorecards": {"a": [{"measure": "m", "weight": 0, "linear": {"from": 0, "to": 1}}]}}),
            "scorecards.a",
        ),
        (
            // A weight of zero beside others is refused too.
            json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": [{"name": "a", "rule": {"all": []}}],
                "scorecards": {"a": [{"measure": "m", "weight": 1, "linear": {"from": 0, "to": 1}},
                                     {"measure": "m", "weight": 0, "linear": {"from": 0, "to": 1}}]}}),
            "scorecards.a[1].weight",
        ),
        (json!({"measures": {"m": {"kind": "nope"}}, "stages": []}), "measures.m"),
    ] {
        let (st, v) = send(&api, Method::PUT, "/v1/health/config", cfg).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(path), "{path} not named in {v}");
    }
    assert_eq!(api.get("/v1/health/config").await.0, StatusCode::NOT_FOUND, "nothing half-applied");

    let cfg = json!({"measures": {
            "logins_7d": {"kind": "count", "event_type": "login", "days": 7},
            "idle": {"kind": "days_since_last", "event_type": "report.created"},
            "seats": {"kind": "attribute", "attribute": "seats"}},
        "stages": [
            {"name": "trial", "rule": {"all": [{"attribute": "plan", "op": "==", "value": "trial"}]}},
            {"name": "risky", "rule": {"any": [{"measure": "logins_7d", "op": "<", "value": 1}, {"attribute": "flagged", "op": "==", "value": true}]}},
            {"name": "big", "rule": {"not": {"measure": "seats", "op": "<", "value": 100}}},
            {"name": "adoption", "rule": {"all": []}}],
        "scorecards": {"adoption": [
            {"measure": "logins_7d", "weight": 3, "thresholds": [{"min": 5, "points": 100}, {"min": null, "points": 20}]},
            {"measure": "idle", "weight": 1, "linear": {"from": 10, "to": 0}}]}});
    let v1 = apply(&api, cfg).await;
    assert_eq!(v1, 1);
    let now = Utc::now();
    let logins = |c: &str, n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"id": format!("{c}-l{i}"), "type": "login", "customer_id": c, "timestamp": rfc(now - Dur::minutes(i as i64 + 1))}))
            .collect()
    };
    let mut body = logins("a", 6);
    body.extend(logins("b", 2));
    body.extend(logins("t", 2));
    body.extend(logins("g", 2));
    api.ingest(Value::Array(body)).await;
    for (c, attrs) in [("t", json!({"plan": "trial"})), ("g", json!({"seats": 150})), ("a", json!({"seats": 10}))] {
        let (st, v) = send(&api, Method::PATCH, &format!("/v1/customers/{c}"), attrs).await;
        assert_eq!(st, StatusCode::OK, "{v}");
    }
    caught_up(&s).await;
    let stage_of = |api: Api, c: &'static str| async move { api.get(&format!("/v1/customers/{c}/health")).await.1 };
    // Live evaluations arrive through the evaluator.
    let a2 = api.clone();
    wait_for("customers evaluated", 30, move || {
        let a = a2.clone();
        Box::pin(async move {
            let (_, l) = a.get("/v1/customers?sort=priority").await;
            l["data"].as_array().map(|d| d.len()) == Some(4)
        })
    })
    .await;
    assert_eq!(stage_of(api.clone(), "t").await["stage"], "trial", "the first stage whose rule holds wins, even if later ones hold too");
    assert_eq!(stage_of(api.clone(), "g").await["stage"], "big", "not(seats < 100)");
    let a = stage_of(api.clone(), "a").await;
    assert_eq!(a["stage"], "adoption");
    assert_eq!(a["stage_rule"], json!({"all": []}));
    // idle has no data (no report.created): logins carries the whole weight.
    assert_eq!(a["score"], json!(100), "{a}");
    assert_eq!(measure(&a, "idle")["has_data"], false);
    assert_eq!(measure(&a, "logins_7d")["contribution"], json!(100));
    assert!(a["explanation"].to_string().contains("shared"), "{a}");
    // b: 2 logins -> 20 points, weight 3 of 3 -> score 20; with a report
    // today idle = 0 -> 100 points: 20*0.75 + 100*0.25 = 40.
    let b = stage_of(api.clone(), "b").await;
    assert_eq!(b["score"], json!(20), "{b}");
    api.ingest(json!([{"id": "b-r", "type": "report.created", "customer_id": "b", "timestamp": rfc(now)}])).await;
    let a2 = api.clone();
    wait_for("b re-evaluated after its event", 30, move || {
        let a = a2.clone();
        Box::pin(async move { a.get("/v1/customers/b/health").await.1["score"] == json!(40) })
    })
    .await;
    let b = stage_of(api.clone(), "b").await;
    let sum: f64 = b["measures"].as_array().unwrap().iter().filter_map(|m| m["contribution"].as_f64()).sum();
    assert_eq!(sum, 40.0, "{b}");
    assert_eq!(b["band"], "normal", "40 reaches the normal threshold (≥ 40)");
    // `any`: flagged moves b to risky.
    send(&api, Method::PATCH, "/v1/customers/b", json!({"flagged": true})).await;
    assert_eq!(stage_of(api.clone(), "b").await["stage"], "risky");
    // A manual override beats the rules, records who set it, expires.
    let until = Utc::now() + Dur::seconds(3);
    let (st, o) =
        send(&api, Method::PUT, "/v1/customers/b/stage-override", json!({"stage": "adoption", "reason": "call went well", "until": rfc(until)}))
            .await;
    assert_eq!(st, StatusCode::OK, "{o}");
    assert_eq!(o["health"]["stage"], "adoption");
    assert_eq!(o["health"]["stage_reason"], "override");
    assert!(o["override"]["set_by"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(send(&api, Method::PUT, "/v1/customers/b/stage-override", json!({"stage": "nope"})).await.0, StatusCode::BAD_REQUEST);
    // as_of after the expiry: the rules again; the live path follows at the expiry.
    assert_eq!(health_at(&api, "b", until + Dur::seconds(1)).await["stage"], "risky");
    let a2 = api.clone();
    wait_for("the override to expire on its own", 30, move || {
        let a = a2.clone();
        Box::pin(async move { a.get("/v1/customers/b/health").await.1["stage"] == "risky" })
    })
    .await;
    // Lifting: set again, then DELETE.
    send(&api, Method::PUT, "/v1/customers/b/stage-override", json!({"stage": "trial"})).await;
    assert_eq!(stage_of(api.clone(), "b").await["stage"], "trial");
    let (st, d) = api.delete("/v1/customers/b/stage-override").await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(d["health"]["stage"], "risky");
    assert_eq!(api.delete("/v1/customers/b/stage-override").await.0, StatusCode::NOT_FOUND);
    // Filters and sorts.
    let (_, l) = api.get("/v1/customers?stage=adoption").await;
    assert_eq!(l["data"].as_array().unwrap().iter().map(|c| c["customer_id"].clone()).collect::<Vec<_>>(), vec![json!("a")]);
    let (_, l) = api.get("/v1/customers?sort=-score&limit=1").await;
    assert_eq!(l["data"][0]["customer_id"], "a");
    assert!(l["next_cursor"].is_string());
    assert_eq!(api.get("/v1/customers?sort=nope").await.0, StatusCode::BAD_REQUEST);
    // A read key reads, cannot change.
    let (_, rk) = s.root().post("/v1/keys", json!({"name": "r", "scope": "read", "workspace": "hs"})).await;
    let read = s.api(rk["secret"].as_str().unwrap());
    assert_eq!(read.get("/v1/customers/a/health").await.0, StatusCode::OK);
    assert_eq!(send(&read, Method::PATCH, "/v1/customers/a", json!({"x": 1})).await.0, StatusCode::FORBIDDEN);
    // Bad attribute values name the attribute.
    let (st, v) = send(&api, Method::PATCH, "/v1/customers/a", json!({"renewal_date": "2027-02-30"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v.to_string().contains("renewal_date"), "{v}");
    // History and SQL.
    let (_, h) = api.get("/v1/customers/b/health/history").await;
    let stages: Vec<Value> = h["data"].as_array().unwrap().iter().map(|r| r["stage"].clone()).collect();
    assert!(stages.windows(2).any(|w| w[0] == "risky" && w[1] == "adoption"), "{h}");
    // Each row's `previous` is the row before it (the first has none), and
    // a row is written only when stage, band or version changed or the
    // score moved by more than the step (the default, 5) since that row.
    let rows = h["data"].as_array().unwrap();
    assert_eq!(rows[0]["previous"], json!({"stage": null, "band": null, "score": null}), "{h}");
    for w in rows.windows(2) {
        assert_eq!(w[1]["previous"], json!({"stage": w[0]["stage"], "band": w[0]["band"], "score": w[0]["score"]}), "{h}");
        let moved = match (w[0]["score"].as_f64(), w[1]["score"].as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() > 5.0,
            (a, b) => a.is_some() != b.is_some(),
        };
        assert!(moved || w[0]["stage"] != w[1]["stage"] || w[0]["band"] != w[1]["band"] || w[0]["config_version"] != w[1]["config_version"], "{h}");
    }
    let (st, q) = api
        .post("/v1/sql", json!({"query": "SELECT stage, count(*) AS n FROM health_history WHERE customer_id = 'b' GROUP BY stage ORDER BY stage"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert!(q.to_string().contains("risky"), "{q}");
    // None of a, b, g, t sent a `group` call: they are customers all the
    // same, in the list by id and in the SQL `customers` table, with the
    // stages their health pages show.
    let stages: Vec<(String, Value)> = {
        let mut out = Vec::new();
        for c in ["a", "b", "g", "t"] {
            out.push((c.to_owned(), stage_of(api.clone(), c).await["stage"].clone()));
        }
        out
    };
    let (st, l) = api.get("/v1/customers").await;
    assert_eq!(st, StatusCode::OK, "{l}");
    let listed: Vec<(String, Value)> =
        l["data"].as_array().unwrap().iter().map(|c| (c["customer_id"].as_str().unwrap().to_owned(), c["stage"].clone())).collect();
    assert_eq!(listed, stages, "{l}");
    let (_, p1) = api.get("/v1/customers?limit=3").await;
    assert_eq!(p1["data"].as_array().unwrap().len(), 3, "{p1}");
    let (_, p2) = api.get(&format!("/v1/customers?limit=3&cursor={}", p1["next_cursor"].as_str().unwrap())).await;
    assert_eq!(p2["data"].as_array().unwrap().iter().map(|c| c["customer_id"].clone()).collect::<Vec<_>>(), vec![json!("t")], "{p2}");
    assert!(p2["next_cursor"].is_null(), "{p2}");
    let (st, q) = api.post("/v1/sql", json!({"query": "SELECT customer_id, stage, attributes FROM customers ORDER BY customer_id"})).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    let rows: Vec<(String, Value)> =
        q["data"].as_array().unwrap().iter().map(|r| (r["customer_id"].as_str().unwrap().to_owned(), r["stage"].clone())).collect();
    assert_eq!(rows, stages, "{q}");
    assert!(q["data"][0]["attributes"].is_null(), "no `group` call, no traits: {q}");
    let (st, q) = api.post("/v1/sql", json!({"query": "SELECT stage FROM customers WHERE customer_id = 'g'"})).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["data"], json!([{"stage": "big"}]), "{q}");
    // The configuration reads back with its fields at the top level too.
    let (_, c) = api.get("/v1/health/config").await;
    assert_eq!(c["measures"], c["config"]["measures"], "{c}");
    assert!(c["measures"]["logins_7d"].is_object(), "{c}");
    assert_eq!(c["stages"][2]["rule"], json!({"not": {"measure": "seats", "op": "<", "value": 100}}), "{c}");
    // A date as `as_of` is 00:00 of that date in the workspace time zone.
    let today = jst_date(Utc::now());
    let by_date = api.get(&format!("/v1/customers/a/health?as_of={today}")).await;
    assert_eq!(by_date.0, StatusCode::OK, "{}", by_date.1);
    let by_time = health_at(&api, "a", jst_midnight(today)).await;
    assert_eq!(by_date.1["as_of"], by_time["as_of"], "{} vs {by_time}", by_date.1);
    assert_eq!(by_date.1["measures"], by_time["measures"]);
    assert_eq!(api.get("/v1/customers/a/health?as_of=2026-13-01").await.0, StatusCode::BAD_REQUEST);
    // `not` over a list reads as not(all(list)); a cooldown in seconds.
    let mut v2 = c["config"].clone();
    v2["stages"][2]["rule"] = json!({"not": [{"measure": "seats", "op": "<", "value": 100}]});
    v2["transition_cooldown"] = json!(600);
    assert_eq!(apply(&api, v2).await, 2);
    let (_, c2) = api.get("/v1/health/config").await;
    assert_eq!(c2["transition_cooldown"], "600s", "{c2}");
    assert_eq!(c2["stages"][2]["rule"], json!({"not": {"all": [{"measure": "seats", "op": "<", "value": 100}]}}), "{c2}");
    assert_eq!(stage_of(api.clone(), "g").await["stage"], "big");
    assert_eq!(stage_of(api.clone(), "a").await["stage"], "adoption");
    // Older versions stay readable.
    let (st, c1) = api.get("/v1/health/config?version=1").await;
    assert_eq!((st, c1["version"].clone()), (StatusCode::OK, json!(1)), "{c1}");
    assert!(c1["transition_cooldown"].is_null(), "{c1}");
    assert_eq!(api.get("/v1/health/config?version=9").await.0, StatusCode::NOT_FOUND);
    // sort=score: lowest first, customers without a score last.
    let (_, l) = api.get("/v1/customers?sort=score").await;
    let scores: Vec<Option<f64>> = l["data"].as_array().unwrap().iter().map(|c| c["score"].as_f64()).collect();
    assert_eq!(scores.len(), 4, "{l}");
    let scored: Vec<f64> = scores.iter().map_while(|s| *s).collect();
    assert!(scored.windows(2).all(|w| w[0] <= w[1]), "{l}");
    assert!(scores[scored.len()..].iter().all(Option::is_none), "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_alone_moves_good_to_bad_and_adoption_to_renewal_at_the_exact_moment() {
    let s = Server::start().await;
    let api = tokyo(&s, "ht").await;
    apply(&api, health_config()).await;
    let today = jst_date(Utc::now());
    // 12 reports at noon two days ago; renewal in 70 days.
    let day = today - Dur::days(2);
    let body: Vec<Value> = (0..12)
        .map(
            |i| json!({"id": format!("r{i}"), "type": "report.created", "customer_id": "acme", "timestamp": rfc(jst_midnight(day) + Dur::hours(12))}),
        )
        .collect();
    api.ingest(Value::Array(body)).await;
    let renewal = today + Dur::days(70);
    send(&api, Method::PATCH, "/v1/customers/acme", json!({"renewal_date": renewal.format("%Y-%m-%d").to_string(), "mrr": 50000})).await;
    caught_up(&s).await;
    let now = Utc::now() + Dur::seconds(1);
    let h = health_at(&api, "acme", now).await;
    assert_eq!(h["stage"], "adoption", "{h}");
    // reports 12 -> 100 points (weight 2/2, idle has no data).
    assert_eq!(h["band"], "good");
    // reports_30d: the reports leave the window at 00:00 JST of day + 30.
    let edge = jst_midnight(day + Dur::days(30));
    let before = health_at(&api, "acme", edge - Dur::microseconds(1)).await;
    let after = health_at(&api, "acme", edge).await;
    assert_eq!(measure(&before, "reports_30d")["value"], json!(12));
    assert_eq!(measure(&after, "reports_30d")["value"], json!(0));
    // Renewal: to_renewal <= 60 from 00:00 JST of renewal - 60 days.
    let r_edge = jst_midnight(renewal - Dur::days(60));
    assert!(r_edge < edge);
    assert_eq!(health_at(&api, "acme", r_edge - Dur::microseconds(1)).await["stage"], "adoption");
    let at = health_at(&api, "acme", r_edge).await;
    assert_eq!(at["stage"], "renewal", "{at}");
    assert_eq!(measure(&at, "to_renewal")["value"], json!(60));
    // good -> bad without events: a renewal-free configuration version.
    let mut cfg = health_config();
    cfg["stages"] = json!([{"name": "adoption", "rule": {"all": []}}]);
    cfg["scorecards"] =
        json!({"adoption": [{"measure": "reports_30d", "weight": 1, "thresholds": [{"min": 10, "points": 100}, {"min": null, "points": 0}]}]});
    let v2 = apply(&api, cfg).await;
    let (_, live) = api.get("/v1/customers/acme/health").await;
    assert_eq!(live["config_version"], json!(v2));
    assert_eq!(live["band"], "good");
    let b = health_at(&api, "acme", edge - Dur::microseconds(1)).await;
    let a = health_at(&api, "acme", edge).await;
    assert_eq!((b["band"].as_str(), a["band"].as_str()), (Some("good"), Some("bad")), "{b} {a}");
    // The live path plans its next look at the next local midnight.
    let next: DateTime<Utc> = live["next_change_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(next, jst_midnight(jst_date(Utc::now()) + Dur::days(1)).min(next));
    assert_eq!(next.with_timezone(&jst()).time(), chrono::NaiveTime::MIN);
    // An older version is still readable.
    let (_, old) = api.get(&format!("/v1/customers/acme/health?config_version=1&as_of={}", urlencode(&rfc(r_edge)))).await;
    assert_eq!(old["stage"], "renewal");
    assert_eq!(old["config_version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_equal_after_kill9_and_after_a_rebuild_from_the_log() {
    let _heavy = crate::helpers::heavy().await;
    let mut s = Server::start().await;
    let mut api = tokyo(&s, "hk").await;
    apply(&api, health_config()).await;
    let now = Utc::now();
    let mut rng = Lcg(7);
    let kinds = ["report.created", "page", "login", "api.call"];
    let mut batches = Vec::new();
    for b in 0..20 {
        let batch: Vec<Value> = (0..500)
            .map(|i| {
                json!({"id": format!("k{b}-{i}"), "type": kinds[rng.below(4) as usize], "customer_id": format!("k{}", rng.below(200)),
                "user_id": format!("u{}", rng.below(5)), "timestamp": rfc(now - Dur::seconds(rng.below(20 * 86_400) as i64))})
            })
            .collect();
        batches.push(batch);
    }
    for (i, b) in batches.iter().enumerate() {
        api.ingest(Value::Array(b.clone())).await;
        if i == 10 {
            s.kill9();
            s.restart();
            api = s.api(api.key.as_deref().unwrap());
        }
    }
    caught_up(&s).await;
    // Every live score equals the evaluation from the log at its time.
    let live = |api: Api| async move {
        let mut m = BTreeMap::new();
        for c in 0..200 {
            let (st, h) = api.get(&format!("/v1/customers/k{c}/health")).await;
            if st == StatusCode::OK {
                m.insert(c, h);
            }
        }
        m
    };
    let a2 = api.clone();
    wait_for("every customer evaluated after the restart", 60, move || {
        let a = a2.clone();
        Box::pin(async move {
            let (_, l) = a.get("/v1/customers?sort=priority&limit=1000").await;
            l["data"].as_array().map(|d| d.len()) >= Some(195)
        })
    })
    .await;
    // Let the evaluator take what the last commits marked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = live(api.clone()).await;
    assert!(before.len() >= 195);
    // What the evaluator did shows in /metrics: this process (restarted
    // after batch 10) scored the customers of the later batches, and once
    // settled nobody waits for it.
    let root = s.root();
    wait_for("the health queue gauges at 0", 20, move || {
        let root = root.clone();
        Box::pin(async move {
            let (_, text) = root.get("/metrics").await;
            let text = text.as_str().unwrap_or_default().to_owned();
            metric(&text, "sluice_health_marked_customers") == Some(0.0) && metric(&text, "sluice_health_oldest_mark_seconds") == Some(0.0)
        })
    })
    .await;
    let (_, text) = s.root().get("/metrics").await;
    let text = text.as_str().unwrap().to_owned();
    let by_events = metric(&text, "sluice_health_evaluations_total{cause=\"events\"}");
    assert!(by_events.is_some_and(|n| n >= 150.0), "evaluations after the restart: {by_events:?}\n{text}");
    for (c, h) in before.iter().take(60) {
        let t: DateTime<Utc> = h["as_of"].as_str().unwrap().parse().unwrap();
        let re = health_at(&api, &format!("k{c}"), t).await;
        assert_eq!((&re["stage"], &re["score"], &re["band"]), (&h["stage"], &h["score"], &h["band"]), "k{c}: live {h} vs log {re}");
    }
    // A full rebuild of the read model from the log gives the same scores.
    let (st, r) = s.root().post("/v1/consumers/health/reset", json!({"to": "earliest"})).await;
    assert!(st.is_success(), "{r}");
    caught_up(&s).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = live(api.clone()).await;
    for (c, h) in &before {
        let a = &after[c];
        let (t0, t1): (DateTime<Utc>, DateTime<Utc>) = (h["as_of"].as_str().unwrap().parse().unwrap(), a["as_of"].as_str().unwrap().parse().unwrap());
        if jst_date(t0) == jst_date(t1) {
            assert_eq!((&a["stage"], &a["score"]), (&h["stage"], &h["score"]), "k{c} after the rebuild");
        } else {
            // Tokyo's midnight passed between the two: the windows moved, so
            // the rebuilt score is checked against the log at its own time.
            let re = health_at(&api, &format!("k{c}"), t1).await;
            assert_eq!((&a["stage"], &a["score"], &a["band"]), (&re["stage"], &re["score"], &re["band"]), "k{c} after the rebuild: {a} vs log {re}");
        }
    }
}

/// The value of a Prometheus series (`name` with its labels as written).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A webhook receiver collecting event bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(serde_json::from_str(&body).unwrap_or(Value::Null));
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_fires_one_webhook_and_the_cooldown_holds_a_flapping_customer() {
    let s = Server::start_with(&[("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let api = tokyo(&s, "hw").await;
    let (url, got) = receiver().await;
    let (st, v) = api.post("/v1/webhooks", json!({"url": url, "event_types": ["customer.stage_changed", "customer.health_changed"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    apply(
        &api,
        json!({"measures": {"tier": {"kind": "attribute", "attribute": "tier"}},
        "stages": [{"name": "vip", "rule": {"all": [{"attribute": "tier", "op": "==", "value": "gold"}]}}, {"name": "standard", "rule": {"all": []}}],
        "transition_cooldown": "10m"}),
    )
    .await;
    let patch = |tier: &'static str| {
        let api = api.clone();
        async move {
            let (st, v) = send(&api, Method::PATCH, "/v1/customers/flap", json!({"tier": tier})).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            v
        }
    };
    // The first evaluation is no transition.
    assert_eq!(patch("silver").await["health"]["stage"], "standard");
    assert_eq!(patch("gold").await["health"]["stage"], "vip");
    // Flapping within the cooldown: held.
    patch("silver").await;
    patch("gold").await;
    patch("silver").await;
    let g2 = got.clone();
    wait_for("the webhook", 30, move || {
        let g = g2.clone();
        Box::pin(async move { !g.lock().unwrap().is_empty() })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bodies = got.lock().unwrap().clone();
    let stage_changes: Vec<&Value> = bodies.iter().filter(|b| b["data"]["type"] == "customer.stage_changed").collect();
    assert_eq!(stage_changes.len(), 1, "{bodies:?}");
    let p = &stage_changes[0]["data"]["properties"];
    assert_eq!((p["from"].as_str(), p["to"].as_str()), (Some("standard"), Some("vip")), "{p}");
    assert_eq!(stage_changes[0]["data"]["customer_id"], "flap");
    // The history has every change, held or not.
    let (_, h) = api.get("/v1/customers/flap/health/history").await;
    assert!(h["data"].as_array().unwrap().len() >= 5, "{h}");
    // The events are in the log too.
    let events = api.all_events("&type=customer.stage_changed").await;
    assert_eq!(events.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backtest_ranks_quiet_churners_bad_and_changes_nothing_live() {
    let s = Server::start().await;
    let api = tokyo(&s, "hb").await;
    // 60 customers over 90 days; 20 churn on day 60..80 and go quiet 45
    // days before they churn.
    let base = NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
    let mut rng = Lcg(3);
    let mut body = Vec::new();
    let mut churn: HashMap<String, NaiveDate> = HashMap::new();
    for c in 0..60 {
        let id = format!("b{c:02}");
        let churn_day = (c < 20).then(|| base + Dur::days(60 + rng.below(20) as i64));
        let quiet_from = churn_day.map(|d| d - Dur::days(45));
        for d in 0..90 {
            let day = base + Dur::days(d);
            if quiet_from.is_some_and(|q| day >= q) {
                continue;
            }
            for i in 0..(1 + rng.below(2)) {
                body.push(json!({"id": format!("{id}-{d}-{i}"), "type": "login", "customer_id": id,
                    "timestamp": rfc(jst_midnight(day) + Dur::hours(10))}));
            }
        }
        if let Some(d) = churn_day {
            churn.insert(id, d);
        }
    }
    for chunk in body.chunks(5000) {
        api.ingest(Value::Array(chunk.to_vec())).await;
    }
    for (id, d) in &churn {
        send(&api, Method::PATCH, &format!("/v1/customers/{id}"), json!({"churned_at": d.format("%Y-%m-%d").to_string()})).await;
    }
    caught_up(&s).await;
    let cfg = json!({"measures": {"logins_14d": {"kind": "count", "event_type": "login", "days": 14}},
        "stages": [{"name": "all", "rule": {"all": []}}],
        "scorecards": {"all": [{"measure": "logins_14d", "weight": 1, "linear": {"from": 0, "to": 14}}]}});
    apply(&api, cfg.clone()).await;
    // What the live path shows (the evaluator may still be taking the
    // last marks: let it settle).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live = |api: Api| async move {
        let (_, l) = api.get("/v1/customers?sort=priority&limit=1000").await;
        l["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["customer_id"].clone(), c["stage"].clone(), c["band"].clone(), c["score"].clone()))
            .collect::<Vec<_>>()
    };
    let live_before = live(api.clone()).await;
    assert_eq!(live_before.len(), 60);
    let history_before = api.post("/v1/sql", json!({"query": "SELECT count(*) AS n FROM health_history"})).await.1["data"].clone();
    let (st, bt) = api
        .post(
            "/v1/health/backtest?wait=true",
            json!({"config": {"measures": {"logins_14d": {"kind": "count", "event_type": "login", "days": 14}},
                "stages": [{"name": "all", "rule": {"all": []}}],
                "scorecards": {"all": [{"measure": "logins_14d", "weight": 1, "thresholds": [{"min": 5, "points": 100}, {"min": 1, "points": 50}, {"min": null, "points": 0}]}]}},
            "from": rfc(jst_midnight(base + Dur::days(30))), "to": rfc(jst_midnight(base + Dur::days(80))), "step_days": 7, "horizon_days": 30}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{bt}");
    assert_eq!(bt["status"], "succeeded", "{bt}");
    let auc = bt["auc"].as_f64().unwrap();
    assert!(auc > 0.75, "AUC {auc}: {bt}");
    let band = |b: &str| bt["bands"].as_array().unwrap().iter().find(|x| x["band"] == b).cloned().unwrap();
    let bad = band("bad");
    assert!(bad["churned"].as_u64().unwrap() > 0, "{bt}");
    assert!(bad["churn_rate"].as_f64().unwrap() > band("good")["churn_rate"].as_f64().unwrap_or(0.0), "{bt}");
    // Independent check: every churned customer-step is bad (quiet for
    // the whole 14-day window), so the bad band holds every churn.
    let churned: u64 = bt["bands"].as_array().unwrap().iter().map(|b| b["churned"].as_u64().unwrap()).sum();
    assert_eq!(bad["churned"].as_u64().unwrap(), churned, "{bt}");
    // Nothing live changed.
    assert_eq!(live(api.clone()).await, live_before);
    assert_eq!(api.post("/v1/sql", json!({"query": "SELECT count(*) AS n FROM health_history"})).await.1["data"], history_before);
    assert_eq!(api.get("/v1/health/config").await.1["version"], 1);
    // Bad requests.
    let (st, v) = api.post("/v1/health/backtest", json!({"from": "yesterday", "to": rfc(Utc::now())})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) =
        api.post("/v1/health/backtest", json!({"config": {"measures": {}, "stages": []}, "from": rfc(Utc::now()), "to": rfc(Utc::now())})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v.to_string().contains("config.stages"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_vs_entitlement_over_an_attribute_and_over_the_plans_included_units() {
    let s = Server::start().await;
    let api = tokyo(&s, "hu").await;
    let (st, v) = api.post("/v1/meters", json!({"key": "seats", "event_type": "seat.used", "aggregation": "sum", "value_property": "n"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = api
        .post(
            "/v1/plans",
            json!({"code": "team", "name": "Team", "currency": "JPY", "interval": "month",
            "charges": [{"meter": "seats", "model": "per_unit", "unit_price": "100", "tax_rate": "0.10", "free_units": "10"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let start = Utc::now() - Dur::minutes(5);
    let (st, v) = api.post("/v1/subscriptions", json!({"customer_id": "sc", "plan": "team", "start": rfc(start)})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let now = Utc::now();
    api.ingest(json!([
        {"id": "s1", "type": "seat.used", "customer_id": "sc", "timestamp": rfc(now - Dur::seconds(30)), "properties": {"n": 4, "tier": "x"}},
        {"id": "s2", "type": "seat.used", "customer_id": "sc", "timestamp": rfc(now - Dur::seconds(20)), "properties": {"n": 4, "tier": "y"}}]))
        .await;
    send(&api, Method::PATCH, "/v1/customers/sc", json!({"seats_bought": 16})).await;
    apply(
        &api,
        json!({"measures": {
            "by_attribute": {"kind": "usage_vs_entitlement", "meter": "seats", "attribute": "seats_bought"},
            "by_plan": {"kind": "usage_vs_entitlement", "meter": "seats"},
            // Two days, not one: the events are 30 s old, and a one-day window
            // starts at Tokyo's midnight (a run just after 15:00 UTC lost them).
            "x_uses": {"kind": "count", "event_type": "seat.used", "days": 2, "filter": {"tier": "x"}}},
        "stages": [{"name": "all", "rule": {"all": []}}]}),
    )
    .await;
    let root = s.root();
    wait_for("the meters consumer", 60, move || {
        let root = root.clone();
        Box::pin(async move {
            let (_, c) = root.get("/v1/consumers").await;
            c["data"].as_array().unwrap().iter().any(|c| c["name"] == "meters" && c["lag"] == json!(0))
        })
    })
    .await;
    caught_up(&s).await;
    let h = health_at(&api, "sc", Utc::now() + Dur::seconds(1)).await;
    assert_eq!(measure(&h, "by_attribute")["value"], json!(0.5), "8 of 16: {h}");
    assert_eq!(measure(&h, "by_plan")["value"], json!(0.8), "8 of the plan's 10 included: {h}");
    assert_eq!(measure(&h, "x_uses")["value"], json!(1), "{h}");
    // Not in a scorecard: weight 0, contribution 0.
    assert_eq!((measure(&h, "by_plan")["weight"].as_f64(), measure(&h, "by_plan")["contribution"].as_f64()), (Some(0.0), Some(0.0)));
    // Before the subscription started there is no plan to measure against.
    let before = health_at(&api, "sc", start - Dur::seconds(1)).await;
    assert!(measure(&before, "by_plan")["value"].is_null(), "{before}");
}

/// A transition event that a crash (or a full log) left in the outbox,
/// written with the evaluation that decided it, enters the log once when
/// the server starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_left_in_the_outbox_by_a_crash_enters_the_log_once_at_restart() {
    let mut s = Server::start().await;
    let ws = "h-outbox";
    let api = tokyo(&s, ws).await;
    s.kill9();
    let id = "customer.stage_changed:acme:1796637600000000";
    let event = json!({"workspace": ws, "id": id, "type": "customer.stage_changed", "timestamp": "2026-12-07T10:00:00Z",
        "received_at": "2026-12-07T10:00:00Z", "customer_id": "acme",
        "properties": {"customer_id": "acme", "from": "onboarding", "to": "adoption", "config_version": 1}, "context": {}});
    let store = sluice_store::Store::connect(&s.state_url()).await.unwrap();
    let row = sluice_store::OutboxRow::of_event(ws, "customer.stage_changed", id, event.to_string());
    store.save_customer_health_many(ws, &[], &[], &[row]).await.unwrap();
    store.close().await;
    s.restart();
    let api = Api { base: s.url.clone(), ..api };
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let got = api.all_events("&type=customer.stage_changed").await;
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "the outbox's transition never reached the log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0]["id"].clone(), seen[0]["customer_id"].clone(), seen[0]["properties"]["to"].clone()),
        (json!(id), json!("acme"), json!("adoption"))
    );
    // Sent, it leaves the outbox (the relay deletes the row right after the
    // log took the event: wait for that, the server still running).
    let store = sluice_store::Store::connect(&s.state_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = store.event_outbox(10).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the sent transition stays in the outbox: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
}
