//! Billing end to end (issue 8), on the state store the suite runs against:
//! every charge model on its tier boundaries against hand-computed amounts,
//! a qualified invoice with 10 % and 8 % lines, cycles in Asia/Tokyo,
//! selections, idempotent and ordered runs, late usage, early billing.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{Api, Server};

/// The example plan.
fn pro_plan() -> Value {
    json!({"code": "pro", "name": "Pro", "currency": "JPY", "interval": "month", "trial_days": 0,
     "fixed_fees": [{"name": "Base fee", "amount": "10000", "tax_rate": "0.10"}],
     "charges": [
       {"meter": "storage_gb", "model": "graduated", "tax_rate": "0.10", "free_units": "0",
        "tiers": [{"up_to": "100", "unit_price": "0"}, {"up_to": "1000", "unit_price": "5"},
                  {"up_to": null, "unit_price": "3", "flat_price": "0"}]},
       {"meter": "api_calls", "model": "volume", "tax_rate": "0.10",
        "tiers": [{"up_to": "10000", "unit_price": "0.5"}, {"up_to": null, "unit_price": "0.2"}]},
       {"meter": "seats", "model": "package", "package_size": "10", "package_price": "3000",
        "tax_rate": "0.10", "minimum_amount": "3000"},
       {"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"},
       {"meter": "support_tickets", "model": "flat", "amount": "2000", "tax_rate": "0.10"}]})
}

/// A Tokyo workspace with an admin key and the five meters of the plan
/// (each sums `properties.n` of events of its own type).
async fn tokyo(s: &Server, name: &str) -> Api {
    let root = s.root();
    let (st, v) = root.post("/v1/workspaces", json!({"name": name, "time_zone": "Asia/Tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (_, key) = root.post("/v1/keys", json!({"name": "a", "scope": "admin", "workspace": name})).await;
    let api = s.api(key["secret"].as_str().unwrap());
    for m in ["storage_gb", "api_calls", "seats", "lunch_boxes", "support_tickets"] {
        let (st, v) = api.post("/v1/meters", json!({"key": m, "event_type": m, "aggregation": "sum", "value_property": "n"})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    api
}

/// Waits until the meters consumer has applied everything in the log.
async fn metered(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, c) = s.root().get("/v1/consumers").await;
        let lag = c["data"].as_array().unwrap().iter().find(|c| c["name"] == "meters").map(|c| c["lag"].clone());
        if lag == Some(json!(0)) {
            return;
        }
        assert!(Instant::now() < deadline, "meters consumer lags: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Usage events: (customer or "", subscription or "", meter, quantity, time).
async fn usage(api: &Api, events: &[(&str, &str, &str, &str, &str)]) {
    let body: Vec<Value> = events
        .iter()
        .map(|(c, s, m, n, t)| {
            let mut e = json!({"id": crate::helpers::uuid_like(), "type": m, "timestamp": t, "properties": {"n": n}});
            if !c.is_empty() {
                e["customer_id"] = json!(c);
            }
            if !s.is_empty() {
                e["subscription_id"] = json!(s);
            }
            e
        })
        .collect();
    for chunk in body.chunks(5000) {
        api.ingest(Value::Array(chunk.to_vec())).await;
    }
}

async fn run(api: &Api, body: Value) -> Value {
    let (st, v) = api.post("/v1/billing-runs?wait=true", body).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    v
}

/// The end of `t`'s 15-minute usage bucket (`t` itself on a boundary),
/// computed here independently of billing's own.
fn quarter_hour_after(t: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let us = t.timestamp_micros();
    let q = 900 * 1_000_000;
    let r = us.rem_euclid(q);
    chrono::DateTime::from_timestamp_micros(if r == 0 { us } else { us - r + q }).unwrap()
}

/// Voids invoice `id` of `ws` in the state store directly, with the server
/// stopped (`kill -9`): the first step of a void (the status and its outbox
/// row, one transaction) committed, and nothing after it. Restarts the
/// server; its new address is in `s.url`.
async fn void_then_crash(s: &mut Server, ws: &str, id: &str) {
    s.kill9();
    let store = sluice_store::Store::connect(&s.state_url()).await.unwrap();
    let audit = sluice_store::NewAudit {
        workspace: ws.into(),
        actor_key_id: None,
        action: "invoice.void".into(),
        target_type: "invoice".into(),
        target_id: id.into(),
        details: json!({}),
    };
    let (draft, finalized, void) = (sluice_store::InvoiceStatus::Draft, sluice_store::InvoiceStatus::Finalized, sluice_store::InvoiceStatus::Void);
    store.set_invoice_status(ws, id, &[draft, finalized], void, &audit).await.unwrap();
    store.close().await;
    s.restart();
}

async fn invoices(api: &Api, q: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (st, v) = api.get(&format!("/v1/invoices?limit=1000{q}{cursor}")).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        out.extend(v["data"].as_array().unwrap().iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// The text of a PDF by poppler's `pdftotext`; `None` (skipped, with a
/// notice) when the tool is missing outside CI, a failure under `CI=true`.
fn pdftotext(pdf: &[u8]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("invoice.pdf");
    std::fs::write(&path, pdf).unwrap();
    match std::process::Command::new("pdftotext").arg("-layout").arg(&path).arg("-").output() {
        Ok(out) => {
            assert!(out.status.success(), "pdftotext failed: {}", String::from_utf8_lossy(&out.stderr));
            Some(String::from_utf8(out.stdout).unwrap())
        }
        Err(e) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "pdftotext (Debian's poppler-utils) is required under CI=true: {e}");
            eprintln!("skipping the PDF text check: pdftotext is not installed ({e})");
            None
        }
    }
}

fn line<'a>(inv: &'a Value, meter: &str) -> &'a Value {
    inv["lines"].as_array().unwrap().iter().find(|l| l["meter"] == meter && l["kind"] == "usage").unwrap_or_else(|| panic!("no {meter} line: {inv}"))
}

fn amounts(inv: &Value) -> Vec<(String, String)> {
    inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["description"].as_str().unwrap().to_owned(), l["amount"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_charge_model_on_its_boundaries_and_a_qualified_invoice_with_tax_per_rate() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-models").await;
    let (st, v) = api
        .send(api.req(reqwest::Method::PATCH, "/v1/workspaces/bill-models").json(&json!({"billing": {"issuer_name": "株式会社スルース",
            "registration_number": "T7000012050002", "issuer_address": "東京都千代田区1-1", "tax_rounding": "floor", "invoice_prefix": "SLC"}})))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["billing"]["registration_number"], "T7000012050002");
    // A bad registration number is refused, naming the field.
    let (st, v) = api
        .send(api.req(reqwest::Method::PATCH, "/v1/workspaces/bill-models").json(&json!({"billing": {"registration_number": "T7000012050003"}})))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["details"][0]["field"], "billing.registration_number");

    let (st, plan) = api.post("/v1/plans", pro_plan()).await;
    assert_eq!(st, StatusCode::CREATED, "{plan}");
    assert_eq!(plan["version"], 1);
    // The customer's name for the recipient, from `group` traits.
    api.ingest(json!([{"type": "group", "customer_id": "acme", "properties": {"name": "株式会社テスト商事"}}])).await;
    let (st, v) = api
        .post(
            "/v1/subscriptions",
            json!([
                {"id": "on-bounds", "customer_id": "acme", "plan": "pro", "start": "2024-01-01T00:00:00+09:00"},
                {"id": "past-bounds", "customer_id": "beta", "plan": "pro", "start": "2024-01-01T00:00:00+09:00"},
            ]),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Quantities exactly on the tier boundaries for one customer, one past
    // them for the other; events split over the month (and one in February,
    // which is not January's).
    usage(
        &api,
        &[
            ("acme", "on-bounds", "storage_gb", "600", "2024-01-05T10:00:00+09:00"),
            ("acme", "on-bounds", "storage_gb", "400", "2024-01-31T23:59:59+09:00"),
            ("acme", "on-bounds", "api_calls", "10000", "2024-01-10T00:00:00+09:00"),
            ("acme", "on-bounds", "seats", "11", "2024-01-10T00:00:00+09:00"),
            ("acme", "on-bounds", "lunch_boxes", "3", "2024-01-01T00:00:00+09:00"),
            ("acme", "on-bounds", "support_tickets", "1", "2024-01-20T00:00:00+09:00"),
            ("acme", "on-bounds", "storage_gb", "5", "2024-02-01T00:00:00+09:00"),
            // Only the customer: it has one subscription, so this counts.
            ("beta", "", "storage_gb", "1001", "2024-01-15T00:00:00+09:00"),
            ("beta", "past-bounds", "api_calls", "10001", "2024-01-15T00:00:00+09:00"),
            ("beta", "past-bounds", "seats", "10", "2024-01-15T00:00:00+09:00"),
        ],
    )
    .await;
    metered(&s).await;
    let r = run(&api, json!({"subscription_ids": ["on-bounds", "past-bounds"], "until": "2024-02-01T00:00:00+09:00"})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(2), json!(2)), "{r}");
    let all = invoices(&api, "").await;
    let a = all.iter().find(|i| i["subscription_id"] == "on-bounds").unwrap();
    let b = all.iter().find(|i| i["subscription_id"] == "past-bounds").unwrap();
    // Hand-computed: graduated 1000 = 100×0 + 900×5; volume 10000 all in
    // tier 1 (up_to inclusive) = ×0.5; package 11 = 2 started packs;
    // per_unit 3×540; flat 2000.
    assert_eq!(
        amounts(a),
        [
            ("Base fee", "10000"),
            ("storage_gb", "4500"),
            ("api_calls", "5000"),
            ("seats", "6000"),
            ("lunch_boxes", "1620"),
            ("support_tickets", "2000")
        ]
        .map(|(d, a)| (d.to_owned(), a.to_owned()))
    );
    // 1001: one unit in tier 3 (4503); 10001: all at 0.2 (2000.2 → 2000);
    // 10 seats: exactly one pack; nothing else (no minimum needed).
    assert_eq!(line(b, "storage_gb")["amount"], "4503");
    let tiers: Vec<(&str, &str)> =
        line(b, "storage_gb")["tiers"].as_array().unwrap().iter().map(|t| (t["units"].as_str().unwrap(), t["amount"].as_str().unwrap())).collect();
    assert_eq!(tiers, [("100", "0"), ("900", "4500"), ("1", "3")], "{b}");
    assert_eq!(line(b, "api_calls")["amount"], "2000");
    assert_eq!(line(b, "api_calls")["unit_price"], "0.2");
    assert_eq!(line(b, "seats")["amount"], "3000");
    assert_eq!(line(b, "lunch_boxes")["amount"], "0");
    assert_eq!(line(b, "support_tickets")["amount"], "0");
    assert_eq!(line(a, "storage_gb")["quantity"], "1000", "February's 5 GB are not January's");
    // Taxes per rate, rounded once (floor): 10 % of 27500 = 2750; 8 % of
    // 1620 = 129.6 → 129. The figures add up to the total.
    let taxes: Vec<(String, String, String)> = a["taxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["rate"].as_str().unwrap().to_owned(), t["taxable_amount"].as_str().unwrap().to_owned(), t["tax"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(taxes, [("0.08", "1620", "129"), ("0.10", "27500", "2750")].map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned())));
    assert_eq!((a["subtotal"].as_str(), a["tax"].as_str(), a["total"].as_str()), (Some("29120"), Some("2879"), Some("31999")));
    assert_eq!(
        a["period_start"],
        "2024-01-01T00:00:00+09:00".parse::<chrono::DateTime<chrono::Utc>>().unwrap().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    );
    assert_eq!(a["status"], "finalized");
    assert_eq!(a["issuer"]["registration_number"], "T7000012050002");
    assert!(a["lines"].as_array().unwrap().iter().any(|l| l["reduced_rate"] == true));
    assert!(a["log_position"].is_object() && a["plan_version"] == 1, "{a}");
    // Numbers: prefix, month of finalization, gapless from 1.
    let mut numbers: Vec<String> = all.iter().map(|i| i["number"].as_str().unwrap().to_owned()).collect();
    numbers.sort();
    let month = chrono::Utc::now().with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap()).format("%Y%m").to_string();
    assert_eq!(numbers, [format!("SLC-{month}-000001"), format!("SLC-{month}-000002")]);
    // The usage line's SQL reproduces its quantity.
    let (st, q) = api.post("/v1/sql", json!({"query": line(a, "storage_gb")["sql"]})).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    let got = q["data"][0]["quantity"].to_string().trim_matches('"').parse::<rust_decimal::Decimal>().unwrap();
    assert_eq!(got, rust_decimal::Decimal::from(1000), "{q}");

    // invoices and subscriptions are SQL tables too.
    let (st, q) = api.post("/v1/sql", json!({"query": "SELECT subscription_id, number, total, status FROM invoices ORDER BY subscription_id"})).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    let rows: Vec<(String, String, rust_decimal::Decimal, String)> = q["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let total = r["total"].to_string().trim_matches('"').parse().unwrap();
            (
                r["subscription_id"].as_str().unwrap().to_owned(),
                r["number"].as_str().unwrap().to_owned(),
                total,
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, rust_decimal::Decimal, String)> = [a, b]
        .iter()
        .map(|i| {
            let total = i["total"].as_str().unwrap().parse().unwrap();
            (i["subscription_id"].as_str().unwrap().to_owned(), i["number"].as_str().unwrap().to_owned(), total, "finalized".to_owned())
        })
        .collect();
    assert_eq!(rows, want);
    let (st, q) = api.post("/v1/sql", json!({"query": "SELECT id, plan, status FROM subscriptions WHERE customer_id = 'acme'"})).await;
    assert_eq!((st, q["data"].clone()), (StatusCode::OK, json!([{"id": "on-bounds", "plan": "pro", "status": "active"}])), "{q}");

    // The HTML form is a qualified invoice.
    let html = api.req(reqwest::Method::GET, &format!("/v1/invoices/{}.html", a["id"].as_str().unwrap())).send().await.unwrap().text().await.unwrap();
    for want in ["適格請求書", "T7000012050002", "株式会社スルース", "株式会社テスト商事", "31,999", "129", "2,750", a["number"].as_str().unwrap()]
    {
        assert!(html.contains(want), "{want:?} missing from the HTML invoice");
    }

    // The PDF, generated in-process: its text (extracted by poppler's
    // pdftotext) has the Japanese names, the number and the totals.
    let resp = api.req(reqwest::Method::GET, &format!("/v1/invoices/{}.pdf", a["id"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/pdf");
    let pdf = resp.bytes().await.unwrap();
    assert!(pdf.starts_with(b"%PDF-"));
    if let Some(text) = pdftotext(&pdf) {
        for want in [
            "適格請求書",
            "株式会社テスト商事 御中",
            "株式会社スルース",
            "T7000012050002",
            a["number"].as_str().unwrap(),
            "31,999 JPY",
            "2,750 JPY",
            "129 JPY",
            "29,120 JPY",
        ] {
            assert!(text.contains(want), "{want:?} missing from the PDF's text:\n{text}");
        }
    }

    // Billing again finds nothing new.
    let again = run(&api, json!({"subscription_ids": ["on-bounds", "past-bounds"], "until": "2024-02-01T00:00:00+09:00"})).await;
    assert_eq!(again["invoices_created"], 0, "{again}");
    assert_eq!(invoices(&api, "").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_and_changes_get_a_4xx_naming_the_field_and_change_nothing() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-bad").await;
    let mut p = pro_plan();
    p["charges"][0]["meter"] = json!("no_such_meter");
    p["charges"][1]["tiers"][1]["up_to"] = json!("5000");
    p["charges"][3]["unit_price"] = json!("-1");
    let (st, v) = api.post("/v1/plans", p).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let fields: Vec<&str> = v["error"]["details"].as_array().unwrap().iter().map(|d| d["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["charges[0].meter", "charges[1].tiers[1].up_to", "charges[3].unit_price"], "{v}");
    let mut p = pro_plan();
    p["charges"][0]["tiers"][0]["from"] = json!("1");
    let (st, v) = api.post("/v1/plans", p).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("charges[0].tiers[0].from")), "{v}");
    let (st, v) = api.post("/v1/plans", json!({"code": "x", "name": "x", "currency": "JPY", "interval": "fortnight"})).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("interval")), "{v}");
    assert_eq!(api.get("/v1/plans").await.1["data"], json!([]), "nothing was written");

    assert_eq!(api.post("/v1/plans", pro_plan()).await.0, StatusCode::CREATED);
    let mut usd = pro_plan();
    usd["code"] = json!("usd");
    usd["currency"] = json!("USD");
    assert_eq!(api.post("/v1/plans", usd).await.0, StatusCode::CREATED);
    // A plan read back, edited and posted again is its next version (the
    // server's `version` and `created_at` in it are ignored).
    let (_, mut read_back) = api.get("/v1/plans/usd").await;
    assert_eq!(read_back["version"], 1, "{read_back}");
    read_back["name"] = json!("Pro (USD)");
    let (st, v) = api.post("/v1/plans", read_back).await;
    assert_eq!((st, v["version"].clone(), v["name"].clone()), (StatusCode::CREATED, json!(2), json!("Pro (USD)")), "{v}");
    // Editing makes a new version.
    let mut pro2 = pro_plan();
    pro2["fixed_fees"][0]["amount"] = json!("12000");
    let (st, v) = api.post("/v1/plans", pro2).await;
    assert_eq!((st, v["version"].clone()), (StatusCode::CREATED, json!(2)), "{v}");
    assert_eq!(api.get("/v1/plans/pro?version=1").await.1["fixed_fees"][0]["amount"], "10000");
    assert_eq!(api.get("/v1/plans/pro").await.1["fixed_fees"][0]["amount"], "12000");

    let (st, v) = api.post("/v1/subscriptions", json!({"id": "s1", "customer_id": "c", "plan": "nope"})).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("plan")), "{v}");
    let (st, v) = api.post("/v1/subscriptions", json!({"id": "s1", "customer_id": "c", "plan": "pro"})).await;
    assert_eq!((st, v["plan_version"].clone(), v["status"].clone()), (StatusCode::CREATED, json!(2), json!("active")), "{v}");
    assert_eq!(api.post("/v1/subscriptions", json!({"id": "s1", "customer_id": "c", "plan": "pro"})).await.0, StatusCode::CONFLICT);
    let (st, v) = api.post("/v1/subscriptions/s1/change", json!({"plan": "usd"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("currency mismatch"), "{v}");
    let (st, v) = api.post("/v1/subscriptions/s1/change", json!({"plan": "pro", "at": "2020-01-01T00:00:00Z"})).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("at")), "{v}");
    // A bulk request with one bad item writes none.
    let (st, v) =
        api.post("/v1/subscriptions", json!([{"id": "s2", "customer_id": "c", "plan": "pro"}, {"id": "s3", "customer_id": "", "plan": "pro"}])).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("[1].customer_id")), "{v}");
    assert_eq!(api.get("/v1/subscriptions/s2").await.0, StatusCode::NOT_FOUND);
    // A run needs a selection.
    let (st, v) = api.post("/v1/billing-runs", json!({})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anniversary_cycles_in_tokyo_bill_the_31st_on_short_months_and_proration_is_exact() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-cycles").await;
    let plan = json!({"code": "flat", "name": "Flat", "currency": "JPY", "interval": "month",
        "fixed_fees": [{"name": "Fee", "amount": "29000", "tax_rate": "0.10"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    let (st, v) = api
        .post(
            "/v1/subscriptions",
            json!([
                {"id": "anniv", "customer_id": "c", "plan": "flat", "billing_anchor": "anniversary", "start": "2024-01-31T10:00:00+09:00"},
                // Calendar, starting mid-month: the first period is prorated.
                {"id": "cal", "customer_id": "d", "plan": "flat", "start": "2024-02-11T00:00:00+09:00"},
            ]),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let r = run(&api, json!({"subscription_ids": ["anniv", "cal"], "until": "2024-05-01T00:00:00+09:00"})).await;
    assert_eq!(r["invoices_created"], 6, "{r}");
    let t = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let anniv: Vec<(String, String, String)> = invoices(&api, "&subscription_id=anniv")
        .await
        .iter()
        .map(|i| {
            (i["period_start"].as_str().unwrap().to_owned(), i["period_end"].as_str().unwrap().to_owned(), i["subtotal"].as_str().unwrap().to_owned())
        })
        .collect();
    // 10:00 start to Feb 29 00:00 (JST): 28 days 14 hours of 29 days.
    // 29000 × (28×24+14)/(29×24) = 29000 × 686/696 = 28583.33… → 28583.
    assert_eq!(
        anniv,
        vec![
            (t("2024-01-31T10:00:00+09:00"), t("2024-02-29T00:00:00+09:00"), "28583".to_owned()),
            (t("2024-02-29T00:00:00+09:00"), t("2024-03-31T00:00:00+09:00"), "29000".to_owned()),
            (t("2024-03-31T00:00:00+09:00"), t("2024-04-30T00:00:00+09:00"), "29000".to_owned()),
        ]
    );
    let cal: Vec<(String, String)> = invoices(&api, "&subscription_id=cal")
        .await
        .iter()
        .map(|i| (i["period_start"].as_str().unwrap().to_owned(), i["subtotal"].as_str().unwrap().to_owned()))
        .collect();
    // February 2024 has 29 days; from the 11th: 19 of them → 19000.
    assert_eq!(
        cal,
        vec![
            (t("2024-02-11T00:00:00+09:00"), "19000".to_owned()),
            (t("2024-03-01T00:00:00+09:00"), "29000".to_owned()),
            (t("2024-04-01T00:00:00+09:00"), "29000".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_cycle_plan_change_prorates_both_plans_fees_to_the_microsecond() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-change").await;
    for (code, fee) in [("small", "31000"), ("big", "62000")] {
        let p = json!({"code": code, "name": code, "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": fee, "tax_rate": "0.10"}]});
        assert_eq!(api.post("/v1/plans", p).await.0, StatusCode::CREATED);
    }
    let start = chrono::Utc::now() - chrono::Duration::hours(3);
    let (st, sub) = api.post("/v1/subscriptions", json!({"id": "s", "customer_id": "c", "plan": "small", "start": start.to_rfc3339()})).await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let (st, v) = api.post("/v1/subscriptions/s/change", json!({"plan": "big", "at": "2024-01-01T00:00:00Z"})).await;
    assert_eq!((st, v["error"]["details"][0]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("at")), "a change into the past: {v}");
    let (st, changed) = api.post("/v1/subscriptions/s/change", json!({"plan": "big"})).await;
    assert_eq!(st, StatusCode::OK, "{changed}");
    assert_eq!(changed["plan"], "big");
    let time = |v: &Value| v.as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let cut = time(&changed["phases"].as_array().unwrap().last().unwrap()["from"]);
    assert!(cut > start && cut <= chrono::Utc::now(), "{changed}");
    let period_end = time(&changed["current_period_end"]);
    run(&api, json!({"subscription_ids": ["s"], "until": period_end.to_rfc3339()})).await;
    let inv = invoices(&api, "&subscription_id=s").await;
    // Independently: Tokyo has no daylight saving time, so its months run
    // from the 1st at 00:00 +09:00; each invoice's fee is the plan's fee
    // times its share of that month, to the microsecond, rounded once.
    let jst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let month = |t: chrono::DateTime<chrono::Utc>| {
        use chrono::{Datelike, TimeZone};
        let l = t.with_timezone(&jst).date_naive();
        let first = chrono::NaiveDate::from_ymd_opt(l.year(), l.month(), 1).unwrap();
        let next = first.checked_add_months(chrono::Months::new(1)).unwrap();
        let at = |d: chrono::NaiveDate| jst.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap()).unwrap().with_timezone(&chrono::Utc);
        (at(first), at(next))
    };
    let us = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| rust_decimal::Decimal::from((b - a).num_microseconds().unwrap());
    let mut ends = Vec::new();
    for i in &inv {
        let (ps, pe) = (time(&i["period_start"]), time(&i["period_end"]));
        let (ms, me) = month(ps);
        let fee = rust_decimal::Decimal::from(if ps < cut { 31000 } else { 62000 });
        let want = (fee * us(ps, pe) / us(ms, me)).round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        assert_eq!(i["lines"][0]["amount"].as_str().unwrap(), want.to_string(), "{i}");
        assert_eq!(i["plan"], if ps < cut { "small" } else { "big" });
        ends.push(pe);
    }
    assert!(ends.contains(&cut), "an invoice ends at the change: {inv:?}");
    assert_eq!(time(&inv[0]["period_start"]), time(&sub["start"]));
    assert_eq!(*ends.last().unwrap(), period_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_of_five_are_billed_once_failures_are_reported_and_runs_queue_in_order() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-select").await;
    let plan = json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": "1000", "tax_rate": "0.10"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    let subs: Vec<Value> =
        (1..=5).map(|i| json!({"id": format!("s{i}"), "customer_id": format!("c{i}"), "plan": "p", "start": "2024-01-01T00:00:00+09:00"})).collect();
    assert_eq!(api.post("/v1/subscriptions", Value::Array(subs)).await.0, StatusCode::CREATED);
    let until = "2024-02-01T00:00:00+09:00";
    // A dry run writes nothing.
    let (st, dry) = api.post("/v1/billing-runs", json!({"subscription_ids": ["s1", "s2"], "until": until, "dry_run": true})).await;
    assert_eq!((st, dry["invoices"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)), "{dry}");
    assert_eq!(dry["invoices"][0]["total"], "1100");
    assert!(invoices(&api, "").await.is_empty());
    // Three of five, one of them unknown: two billed, the unknown reported.
    let r = run(&api, json!({"subscription_ids": ["s1", "missing", "s3"], "until": until})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(3), json!(2)), "{r}");
    assert_eq!(r["errors"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["errors"][0]["subscription_id"], "missing");
    assert_eq!(r["invoice_ids"].as_array().unwrap().len(), 2);
    let r = run(&api, json!({"subscription_ids": ["s1", "s2", "s3"], "until": until})).await;
    assert_eq!(r["invoices_created"], 1, "only s2 is new: {r}");
    let billed: std::collections::BTreeSet<String> =
        invoices(&api, "").await.iter().map(|i| i["subscription_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(billed, ["s1", "s2", "s3"].map(String::from).into());
    // Two runs queued at once run in order.
    let (_, a) = api.post("/v1/billing-runs", json!({"filter": {"due": true}, "until": until})).await;
    let (_, b) = api.post("/v1/billing-runs", json!({"subscription_ids": ["s4", "s5"], "until": until})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (a, b) = loop {
        let (_, a2) = api.get(&format!("/v1/billing-runs/{}", a["id"].as_str().unwrap())).await;
        let (_, b2) = api.get(&format!("/v1/billing-runs/{}", b["id"].as_str().unwrap())).await;
        if a2["status"] == "succeeded" && b2["status"] == "succeeded" {
            break (a2, b2);
        }
        assert!(Instant::now() < deadline, "{a2} {b2}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(a["finished_at"].as_str().unwrap() <= b["started_at"].as_str().unwrap(), "{a} {b}");
    assert_eq!((a["invoices_created"].clone(), b["invoices_created"].clone()), (json!(2), json!(0)), "the first run took s4 and s5: {a} {b}");
    assert_eq!(a["subscriptions_total"], 2, "due: only s4 and s5 had an ended period not invoiced: {a}");
    assert_eq!(invoices(&api, "").await.len(), 5);
    // Billing's events are in the log: one invoice.finalized per invoice
    // (naming it), one billing_run.finished per run.
    let all = invoices(&api, "").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let finalized = api.all_events("&type=invoice.finalized").await;
        let finished = api.all_events("&type=billing_run.finished").await;
        let mut named: Vec<String> = finalized.iter().map(|e| e["properties"]["invoice_id"].as_str().unwrap_or("").to_owned()).collect();
        named.sort();
        let mut want: Vec<String> = all.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect();
        want.sort();
        if named == want && finished.len() == 4 {
            assert!(finalized.iter().all(|e| e["customer_id"].is_string() && e["properties"]["number"].is_string()), "{finalized:?}");
            break;
        }
        assert!(Instant::now() < deadline, "events: {named:?} want {want:?}; {} runs finished", finished.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The CLI: a run with a failing subscription prints the summary and the
    // failure and exits 1; an invoice saved as PDF.
    assert_eq!(
        api.post("/v1/subscriptions", json!({"id": "s6", "customer_id": "c6", "plan": "p", "start": "2024-01-01T00:00:00+09:00"})).await.0,
        StatusCode::CREATED
    );
    let key = api.key.clone().unwrap();
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", key.as_str())];
    let (ok, out, err) = crate::helpers::cli(&["billing", "run", "--subscription", "s6", "--subscription", "gone", "--until", until], &env, None);
    assert!(!ok, "{out}\n{err}");
    assert!(out.contains("2 subscriptions, 1 invoices created, 1 failed"), "{out}\n{err}");
    assert!(out.contains("gone: subscription \"gone\" not found"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s6.pdf");
    let id = invoices(&api, "&subscription_id=s6").await[0]["id"].as_str().unwrap().to_owned();
    let (ok, out, err) = crate::helpers::cli(&["invoices", "pdf", &id, "-o", file.to_str().unwrap()], &env, None);
    assert!(ok, "{out}\n{err}");
    assert!(std::fs::read(&file).unwrap().starts_with(b"%PDF-"));
    let (ok, out, _) = crate::helpers::cli(&["invoices", "list", "--subscription", "s6"], &env, None);
    assert!(ok && out.contains(&id) && out.contains("1100 JPY"), "{out}");

    // `due` selects the subscriptions whose period has ended: s7's first
    // period (anniversary, from Jan 20) ends on Feb 20, so on Feb 1 nothing
    // is due (s1–s6 are billed to Feb 1), on Feb 21 only s7.
    let s7 = json!({"id": "s7", "customer_id": "c7", "plan": "p", "start": "2024-01-20T00:00:00+09:00", "billing_anchor": "anniversary"});
    assert_eq!(api.post("/v1/subscriptions", s7).await.0, StatusCode::CREATED);
    let r = run(&api, json!({"filter": {"due": true}, "until": until})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(0), json!(0)), "{r}");
    let r = run(&api, json!({"filter": {"due": true}, "until": "2024-02-21T00:00:00+09:00"})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(1), json!(1)), "{r}");
    let end = invoices(&api, "&subscription_id=s7").await[0]["period_end"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert_eq!(end, "2024-02-20T00:00:00+09:00".parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    // With `"until": "now"`, `due` still leaves out a subscription in the
    // middle of its first period: nothing is billed early for it.
    let start = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    assert_eq!(api.post("/v1/subscriptions", json!({"id": "s8", "customer_id": "c8", "plan": "p", "start": start})).await.0, StatusCode::CREATED);
    let (st, dry) = api.post("/v1/billing-runs", json!({"filter": {"due": true, "customer_ids": ["c8"]}, "until": "now", "dry_run": true})).await;
    assert_eq!(st, StatusCode::OK, "{dry}");
    assert_eq!((dry["subscriptions_total"].clone(), dry["invoices"].clone()), (json!(0), json!([])), "{dry}");
    let (st, dry) = api.post("/v1/billing-runs", json!({"subscription_ids": ["s8"], "until": "now", "dry_run": true})).await;
    assert_eq!((st, dry["invoices"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "named, s8 is billed early: {dry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_updates_the_draft_then_lands_once_on_the_next_invoice_and_early_billing_loses_nothing() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-late").await;
    let plan = json!({"code": "pay", "name": "PAYG", "currency": "JPY", "interval": "month",
        "charges": [{"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    assert_eq!(
        api.post("/v1/subscriptions", json!({"id": "s", "customer_id": "c", "plan": "pay", "start": "2024-01-01T00:00:00+09:00"})).await.0,
        StatusCode::CREATED
    );
    usage(&api, &[("c", "s", "lunch_boxes", "2", "2024-01-10T12:00:00+09:00")]).await;
    metered(&s).await;
    // A draft (finalize: false) is recomputed when late usage arrives.
    let r = run(&api, json!({"subscription_ids": ["s"], "until": "2024-02-01T00:00:00+09:00", "finalize": false})).await;
    let id = r["invoice_ids"][0].as_str().unwrap().to_owned();
    let (_, d) = api.get(&format!("/v1/invoices/{id}")).await;
    assert_eq!((d["status"].as_str(), d["number"].clone(), d["subtotal"].as_str()), (Some("draft"), Value::Null, Some("1080")), "{d}");
    usage(&api, &[("c", "s", "lunch_boxes", "1", "2024-01-31T23:00:00+09:00")]).await;
    metered(&s).await;
    let (_, d) = api.get(&format!("/v1/invoices/{id}")).await;
    assert_eq!(d["subtotal"], "1620", "{d}");
    let (st, f) = api.post(&format!("/v1/invoices/{id}/finalize"), json!({})).await;
    assert_eq!((st, f["status"].as_str(), f["subtotal"].as_str()), (StatusCode::OK, Some("finalized"), Some("1620")), "{f}");
    assert!(f["number"].as_str().unwrap().ends_with("-000001"));
    assert_eq!(api.post(&format!("/v1/invoices/{id}/finalize"), json!({})).await.0, StatusCode::CONFLICT);
    // After finalization, late usage for January goes on February's invoice
    // as a separate line naming its period, once.
    usage(&api, &[("c", "s", "lunch_boxes", "4", "2024-01-20T00:00:00+09:00"), ("c", "s", "lunch_boxes", "1", "2024-02-03T00:00:00+09:00")]).await;
    metered(&s).await;
    let (_, f2) = api.get(&format!("/v1/invoices/{id}")).await;
    assert_eq!(f2["subtotal"], "1620", "a finalized invoice is never edited");
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-03-01T00:00:00+09:00"})).await;
    let all = invoices(&api, "&subscription_id=s").await;
    assert_eq!(all.len(), 2);
    let feb = &all[1];
    let late: Vec<&Value> = feb["lines"].as_array().unwrap().iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(late.len(), 1, "{feb}");
    assert_eq!((late[0]["quantity"].as_str(), late[0]["amount"].as_str()), (Some("4"), Some("2160")));
    assert_eq!(late[0]["period_start"], all[0]["period_start"]);
    assert_eq!(line(feb, "lunch_boxes")["quantity"], "1");
    // Nothing more arrives: March's invoice has no adjustment.
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-04-01T00:00:00+09:00"})).await;
    let all = invoices(&api, "&subscription_id=s").await;
    assert!(all[2]["lines"].as_array().unwrap().iter().all(|l| l["kind"] != "adjustment"), "{}", all[2]);
    // Every unit billed exactly once: 3 + 4 + 1 boxes.
    let units: rust_decimal::Decimal = all
        .iter()
        .flat_map(|i| i["lines"].as_array().unwrap().clone())
        .filter(|l| l["meter"] == "lunch_boxes")
        .map(|l| l["quantity"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(units, rust_decimal::Decimal::from(8));

    // until: "now" bills the current period early; the regular end then
    // bills the rest: every unit once across both. (Anniversary cycles, so
    // that no cycle end falls in the current 15 minutes whatever the hour.)
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let (_, sub) = api
        .post("/v1/subscriptions", json!({"id": "now", "customer_id": "n", "plan": "pay", "start": two_hours_ago, "billing_anchor": "anniversary"}))
        .await;
    let start = sub["start"].as_str().unwrap().to_owned();
    let end = sub["current_period_end"].as_str().unwrap().to_owned();
    usage(&api, &[("n", "now", "lunch_boxes", "2", &start)]).await;
    metered(&s).await;
    let early = run(&api, json!({"subscription_ids": ["now"], "until": "now"})).await;
    let mut inv = invoices(&api, "&subscription_id=now").await;
    let early_count = inv.len();
    assert!(early["early"] == true && early_count >= 1, "{early}");
    assert_eq!(inv.last().unwrap()["early"], true, "{inv:?}");
    // Usage after the cut's bucket (whose usage the early invoice took).
    let cut = inv.last().unwrap()["period_end"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    usage(&api, &[("n", "now", "lunch_boxes", "3", &quarter_hour_after(cut).to_rfc3339())]).await;
    metered(&s).await;
    let (_, up) = api.get("/v1/subscriptions/now/upcoming-invoice").await;
    run(&api, json!({"subscription_ids": ["now"], "until": end})).await;
    inv = invoices(&api, "&subscription_id=now").await;
    assert_eq!(inv.len(), early_count + 1);
    assert_eq!(inv.last().unwrap()["total"], up["total"], "the upcoming invoice equals the final one: {up}");
    let units: rust_decimal::Decimal = inv
        .iter()
        .flat_map(|i| i["lines"].as_array().unwrap().clone())
        .filter(|l| l["meter"] == "lunch_boxes")
        .map(|l| l["quantity"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(units, rust_decimal::Decimal::from(5), "{inv:?}");

    // A subscription started a minute ago, its usage sent just now: the
    // early bill ends at the end of the current 15-minute usage bucket, so
    // that usage is on it; usage still arriving in that bucket after the
    // bill is on the next invoice once, as late usage naming the early period.
    let minute_ago = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let (st, sub) = api
        .post("/v1/subscriptions", json!({"id": "young", "customer_id": "y", "plan": "pay", "start": minute_ago, "billing_anchor": "anniversary"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let end = sub["current_period_end"].as_str().unwrap().to_owned();
    usage(&api, &[("y", "young", "lunch_boxes", "4", &chrono::Utc::now().to_rfc3339())]).await;
    metered(&s).await;
    let asked = chrono::Utc::now();
    let r = run(&api, json!({"subscription_ids": ["young"], "until": "now"})).await;
    assert_eq!(r["invoices_created"], json!(1), "{r}");
    let inv = invoices(&api, "&subscription_id=young").await;
    assert_eq!(
        (inv.len(), inv[0]["early"].clone(), line(&inv[0], "lunch_boxes")["quantity"].clone(), inv[0]["status"].clone()),
        (1, json!(true), json!("4"), json!("finalized")),
        "an early invoice is final at once (no grace period here): {inv:?}"
    );
    // The period ends at the request; the next one starts there.
    let cut = inv[0]["period_end"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(cut >= asked - chrono::Duration::milliseconds(1) && cut <= chrono::Utc::now(), "cut {cut}, asked {asked}");
    let (_, sub) = api.get("/v1/subscriptions/young").await;
    assert_eq!(sub["billed_until"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap(), cut, "{sub}");
    let sent_at = chrono::Utc::now();
    usage(&api, &[("y", "young", "lunch_boxes", "6", &sent_at.to_rfc3339())]).await;
    metered(&s).await;
    run(&api, json!({"subscription_ids": ["young"], "until": end})).await;
    let inv = invoices(&api, "&subscription_id=young").await;
    assert_eq!(inv.len(), 2, "{inv:?}");
    let lines: Vec<&Value> = inv.iter().flat_map(|i| i["lines"].as_array().unwrap()).filter(|l| l["meter"] == "lunch_boxes").collect();
    let units: rust_decimal::Decimal = lines.iter().map(|l| l["quantity"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap()).sum();
    assert_eq!(units, rust_decimal::Decimal::from(10), "{inv:?}");
    if sent_at < quarter_hour_after(cut) {
        // The usage sent after the bill fell in the cut's bucket, the early
        // period's: billed on the next invoice, on a line naming that period.
        let late = inv[1]["lines"].as_array().unwrap().iter().find(|l| l["meter"] == "lunch_boxes" && l["quantity"] == "6");
        assert!(late.is_some_and(|l| l["period_end"] == inv[0]["period_end"]), "{}", inv[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_runs_and_a_kill9_mid_run_leave_one_invoice_per_period_numbered_gaplessly() {
    let mut s = Server::start_with(&[("SLUICE_JOB_LEASE", "2s")]).await;
    let api = tokyo(&s, "bill-crash").await;
    let plan = json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": "1000", "tax_rate": "0.10"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    const N: usize = 10_000;
    let subs: Vec<Value> = (0..N)
        .map(|i| json!({"id": format!("s{i:05}"), "customer_id": format!("c{i}"), "plan": "p", "start": "2024-01-01T00:00:00+09:00"}))
        .collect();
    let (st, v) = api.post("/v1/subscriptions", Value::Array(subs)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let until = "2024-02-01T00:00:00+09:00";
    // Two overlapping runs over the same subscriptions (the runner takes
    // them in order; the second finds them billed) and one kill -9 while
    // the first is running.
    let (_, a) = api.post("/v1/billing-runs", json!({"filter": {"due": true}, "until": until})).await;
    let (_, b) = api.post("/v1/billing-runs", json!({"filter": {"due": true}, "until": until})).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let (_, r) = api.get(&format!("/v1/billing-runs/{}", a["id"].as_str().unwrap())).await;
        if r["invoices_created"].as_i64().unwrap_or(0) > 0 {
            break r;
        }
        assert!(Instant::now() < deadline, "{r}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    s.kill9();
    // The kill landed while the run was billing (it bills 500 at a time).
    assert!(at_kill["invoices_created"].as_u64().unwrap() < N as u64, "{at_kill}");
    s.restart();
    let api = Api { base: s.url.clone(), ..api };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, ra) = api.get(&format!("/v1/billing-runs/{}", a["id"].as_str().unwrap())).await;
        let (_, rb) = api.get(&format!("/v1/billing-runs/{}", b["id"].as_str().unwrap())).await;
        if ra["status"] == "succeeded" && rb["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{ra} {rb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = invoices(&api, "").await;
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|i| i["id"].as_str().unwrap()).collect();
    let by_sub: std::collections::BTreeSet<&str> = all.iter().map(|i| i["subscription_id"].as_str().unwrap()).collect();
    assert_eq!((ids.len(), by_sub.len()), (N, N));
    assert_eq!(all.len(), N, "one invoice per subscription and period");
    let subs: std::collections::BTreeSet<&str> = all.iter().map(|i| i["subscription_id"].as_str().unwrap()).collect();
    assert_eq!(subs.len(), N);
    let mut seq: Vec<u64> = all.iter().map(|i| i["number"].as_str().unwrap().rsplit('-').next().unwrap().parse().unwrap()).collect();
    seq.sort_unstable();
    assert_eq!(seq, (1..=N as u64).collect::<Vec<_>>(), "numbers are gapless from 1");
    // Every invoice's `invoice.finalized` event is in the log exactly once,
    // those of a batch the kill cut off between its commit and its send
    // included (the outbox, sent again at start; the ids deduplicate).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = api.all_events("&type=invoice.finalized").await;
        let named: Vec<&str> = events.iter().map(|e| e["properties"]["invoice_id"].as_str().unwrap_or("")).collect();
        let distinct: std::collections::BTreeSet<&str> = named.iter().copied().collect();
        assert_eq!(named.len(), distinct.len(), "an invoice.finalized event twice");
        if distinct == ids {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {N} invoices have their event", distinct.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_keeps_recent_periods_as_drafts_unless_finalize_is_asked() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-grace").await;
    let (st, v) = api.send(api.req(reqwest::Method::PATCH, "/v1/workspaces/bill-grace").json(&json!({"billing": {"grace_period_days": 3}}))).await;
    assert_eq!((st, v["billing"]["grace_period_days"].clone()), (StatusCode::OK, json!(3)), "{v}");
    let plan = json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month",
        "charges": [{"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    let start = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let subs = json!([{"id": "g1", "customer_id": "c1", "plan": "p", "start": start}, {"id": "g2", "customer_id": "c2", "plan": "p", "start": start},
        {"id": "old", "customer_id": "c3", "plan": "p", "start": "2024-01-01T00:00:00+09:00"}]);
    assert_eq!(api.post("/v1/subscriptions", subs).await.0, StatusCode::CREATED);
    usage(&api, &[("c1", "g1", "lunch_boxes", "1", &start)]).await;
    metered(&s).await;
    // Without `finalize`: the period that just ended is in the grace period,
    // so its invoice stays a draft (recomputed with late usage).
    let r = run(&api, json!({"subscription_ids": ["g1"], "until": "now"})).await;
    let (_, d) = api.get(&format!("/v1/invoices/{}", r["invoice_ids"][0].as_str().unwrap())).await;
    assert_eq!((d["status"].as_str(), d["number"].clone(), d["finalize_after_grace"].clone()), (Some("draft"), Value::Null, json!(true)), "{d}");
    usage(&api, &[("c1", "g1", "lunch_boxes", "2", &start)]).await;
    metered(&s).await;
    let (_, d) = api.get(&format!("/v1/invoices/{}", r["invoice_ids"][0].as_str().unwrap())).await;
    assert_eq!(d["subtotal"], "1620", "late usage in the grace period updates the draft: {d}");
    // Periods that ended long ago are past the grace period: finalized.
    let r = run(&api, json!({"subscription_ids": ["old"], "until": "2024-02-01T00:00:00+09:00"})).await;
    let (_, f) = api.get(&format!("/v1/invoices/{}", r["invoice_ids"][0].as_str().unwrap())).await;
    assert_eq!(f["status"], "finalized", "{f}");
    // finalize: true finalizes at once, grace or not.
    let r = run(&api, json!({"subscription_ids": ["g2"], "until": "now", "finalize": true})).await;
    let (_, f) = api.get(&format!("/v1/invoices/{}", r["invoice_ids"][0].as_str().unwrap())).await;
    assert_eq!(f["status"], "finalized", "{f}");
}

/// For each period start: (units of `meter`, their amount) over the
/// invoices that are not void, and how many fixed-fee lines bill it.
fn billed_per_period(all: &[Value], meter: &str) -> std::collections::BTreeMap<String, (rust_decimal::Decimal, rust_decimal::Decimal, usize)> {
    let dec = |v: &Value| v.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap();
    let mut out = std::collections::BTreeMap::new();
    for inv in all.iter().filter(|i| i["status"] != "void") {
        for l in inv["lines"].as_array().unwrap() {
            let e =
                out.entry(l["period_start"].as_str().unwrap().to_owned()).or_insert((rust_decimal::Decimal::ZERO, rust_decimal::Decimal::ZERO, 0));
            if l["kind"] == "fixed_fee" {
                e.2 += 1;
            } else if l["meter"] == meter {
                e.0 += dec(&l["quantity"]);
                e.1 += dec(&l["amount"]);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voiding_an_earlier_invoice_bills_its_period_again_once_beside_its_late_usage() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-void").await;
    let plan = json!({"code": "box", "name": "Boxes", "currency": "JPY", "interval": "month",
        "fixed_fees": [{"name": "Base fee", "amount": "1000", "tax_rate": "0.10"}],
        "charges": [{"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    assert_eq!(
        api.post("/v1/subscriptions", json!({"id": "s", "customer_id": "c", "plan": "box", "start": "2024-01-01T00:00:00+09:00"})).await.0,
        StatusCode::CREATED
    );
    let jan = "2024-01-10T12:00:00+09:00";
    usage(
        &api,
        &[
            ("c", "s", "lunch_boxes", "2", jan),
            ("c", "s", "lunch_boxes", "1", "2024-02-10T00:00:00+09:00"),
            ("c", "s", "lunch_boxes", "1", "2024-03-10T00:00:00+09:00"),
        ],
    )
    .await;
    metered(&s).await;
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-04-01T00:00:00+09:00"})).await;
    // Late usage for January lands on April's invoice.
    usage(&api, &[("c", "s", "lunch_boxes", "4", jan)]).await;
    metered(&s).await;
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-05-01T00:00:00+09:00"})).await;
    let all = invoices(&api, "&subscription_id=s").await;
    assert_eq!(all.len(), 4);
    let (january, april) = (all[0].clone(), all[3].clone());
    assert!(april["lines"].as_array().unwrap().iter().any(|l| l["kind"] == "adjustment" && l["quantity"] == "4"), "{april}");

    // Every period billed once, whatever is voided: per period, the units on
    // invoices that are not void equal the usage, at 540 each, and one fee.
    let usage_per_month = [("2023-12-31T15:00:00Z", 6), ("2024-01-31T15:00:00Z", 1), ("2024-02-29T15:00:00Z", 1), ("2024-03-31T15:00:00Z", 0)];
    let check = |all: &[Value]| {
        let billed = billed_per_period(all, "lunch_boxes");
        for (start, units) in usage_per_month {
            let (q, amount, fees) = billed.get(start).cloned().unwrap_or_else(|| panic!("period {start} is not billed: {all:?}"));
            assert_eq!((q, amount, fees), (units.into(), (540 * units).into(), 1), "period {start}: {all:?}");
        }
    };
    check(&all);

    // Void January's invoice: it is not the latest, so its period waits to
    // be billed again (the subscription says so) and a due run bills it.
    let jan_id = january["id"].as_str().unwrap();
    let (st, v) = api.post(&format!("/v1/invoices/{jan_id}/void"), json!({})).await;
    assert_eq!((st, v["status"].as_str(), &v["number"]), (StatusCode::OK, Some("void"), &january["number"]), "{v}");
    let (_, sub) = api.get("/v1/subscriptions/s").await;
    assert_eq!(sub["reissue"][0]["voided_invoice"], jan_id, "{sub}");
    assert_eq!(sub["reissue"][0]["period_start"], january["period_start"], "{sub}");
    // A dry run shows it and changes nothing.
    let (st, dry) =
        api.post("/v1/billing-runs?wait=true", json!({"filter": {"due": true}, "until": "2024-05-01T00:00:00+09:00", "dry_run": true})).await;
    assert_eq!(st, StatusCode::OK, "{dry}");
    assert_eq!(invoices(&api, "&subscription_id=s").await.len(), 4);
    let r = run(&api, json!({"filter": {"due": true}, "until": "2024-05-01T00:00:00+09:00"})).await;
    assert_eq!(r["invoices_created"], 1, "{r}");
    let all = invoices(&api, "&subscription_id=s").await;
    assert_eq!(all.len(), 5);
    let again = &all[4];
    assert_eq!((again["period_start"].clone(), again["period_end"].clone()), (january["period_start"].clone(), january["period_end"].clone()));
    assert_eq!(again["replaces"], jan_id, "{again}");
    assert_eq!(again["status"], "finalized");
    assert!(again["number"].as_str().unwrap().ends_with("-000005"), "{again}");
    // The whole month's usage, less what April's invoice billed as late usage (named).
    assert_eq!(line(again, "lunch_boxes")["quantity"], "6");
    let taken: Vec<&Value> = again["lines"].as_array().unwrap().iter().filter(|l| l["kind"] == "adjustment").collect();
    assert_eq!(taken.len(), 1, "{again}");
    assert_eq!((taken[0]["quantity"].as_str(), taken[0]["amount"].as_str()), (Some("-4"), Some("-2160")));
    assert!(taken[0]["description"].as_str().unwrap().contains(april["number"].as_str().unwrap()), "{again}");
    // Tax once per rate: 10 % of 1,000 and 8 % of 3,240 − 2,160.
    assert_eq!((again["subtotal"].as_str(), again["tax"].as_str(), again["total"].as_str()), (Some("2080"), Some("186"), Some("2266")), "{again}");
    check(&all);
    let (_, sub) = api.get("/v1/subscriptions/s").await;
    assert_eq!(sub["reissue"], json!([]), "{sub}");
    // Again: nothing new.
    let r = run(&api, json!({"filter": {"due": true}, "until": "2024-05-01T00:00:00+09:00"})).await;
    assert_eq!(r["invoices_created"], 0, "{r}");

    // Now void the latest (April, with the late line): billed again by the
    // next run, its late usage for January still billed once in all.
    let april_id = april["id"].as_str().unwrap();
    assert_eq!(api.post(&format!("/v1/invoices/{april_id}/void"), json!({})).await.0, StatusCode::OK);
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-05-01T00:00:00+09:00"})).await;
    let all = invoices(&api, "&subscription_id=s").await;
    assert_eq!(all.len(), 6);
    assert_eq!(all[5]["replaces"], april_id);
    check(&all);
    // And February, in the middle, with nothing late: the same month again.
    let feb_id = all[1]["id"].as_str().unwrap();
    assert_eq!(api.post(&format!("/v1/invoices/{feb_id}/void"), json!({})).await.0, StatusCode::OK);
    run(&api, json!({"subscription_ids": ["s"], "until": "2024-05-01T00:00:00+09:00"})).await;
    let all = invoices(&api, "&subscription_id=s").await;
    assert_eq!(all.len(), 7);
    assert_eq!((all[6]["replaces"].as_str(), all[6]["subtotal"].as_str()), (Some(feb_id), Some("1540")));
    check(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_no_subscription_bills_is_reported_by_reason_and_with_what_is_billed_adds_up_to_all_usage() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-unattributed").await;
    for plan in [
        json!({"code": "box", "name": "Boxes", "currency": "JPY", "interval": "month",
            "charges": [{"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08"}]}),
        json!({"code": "calls", "name": "Calls", "currency": "JPY", "interval": "month",
            "charges": [{"meter": "api_calls", "model": "per_unit", "unit_price": "1", "tax_rate": "0.10"}]}),
    ] {
        assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    }
    let start = "2024-01-01T00:00:00+09:00";
    for (id, customer, plan) in [("s1", "one", "box"), ("t1", "two", "box"), ("t2", "two", "box"), ("u1", "three", "calls")] {
        let (st, v) = api.post("/v1/subscriptions", json!({"id": id, "customer_id": customer, "plan": plan, "start": start})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let jan = "2024-01-15T10:00:00+09:00";
    let sent = [
        ("one", "", "2", jan),                            // billed by s1
        ("one", "s1", "3", jan),                          // billed by s1
        ("one", "", "1", "2023-12-20T10:00:00+09:00"),    // before s1: no_subscription
        ("two", "", "4", jan),                            // t1 and t2: several_subscriptions
        ("two", "t1", "5", jan),                          // billed by t1
        ("three", "", "6", jan),                          // u1 does not charge boxes: no_subscription
        ("three", "u1", "7", jan),                        // not_charged
        ("four", "ghost", "8", jan),                      // unknown_subscription
        ("four", "", "9", jan),                           // no_subscription
        ("one", "t1", "10", "2024-01-16T10:00:00+09:00"), // another customer's: unknown_subscription
        ("", "s1", "11", jan),                            // names s1 and no customer: billed by s1
        ("", "ghost", "12", jan),                         // no customer, no such subscription: unknown_subscription
        ("", "", "13", jan),                              // names nobody: no_subscription
    ];
    let events: Vec<(&str, &str, &str, &str, &str)> = sent.iter().map(|(c, s, n, t)| (*c, *s, "lunch_boxes", *n, *t)).collect();
    usage(&api, &events).await;
    metered(&s).await;

    let (st, report) = api.get("/v1/billing/unattributed-usage").await;
    assert_eq!(st, StatusCode::OK, "{report}");
    assert_eq!(report["truncated"], false);
    let rows: Vec<(String, String, String, String)> = report["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["meter"], "lunch_boxes", "{r}");
            let subs = match r["reason"].as_str().unwrap() {
                "several_subscriptions" => {
                    r["subscription_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join("+")
                }
                _ => r["subscription_id"].as_str().unwrap_or("").to_owned(),
            };
            (
                r["customer_id"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
                subs,
                r["quantity"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, String)> = [
        ("", "no_subscription", "", "13"),
        ("", "unknown_subscription", "ghost", "12"),
        ("four", "no_subscription", "", "9"),
        ("four", "unknown_subscription", "ghost", "8"),
        ("one", "no_subscription", "", "1"),
        ("one", "unknown_subscription", "t1", "10"),
        ("three", "no_subscription", "", "6"),
        ("three", "not_charged", "u1", "7"),
        ("two", "several_subscriptions", "t1+t2", "4"),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    assert_eq!(rows, want, "{report}");
    let one = &report["data"][4];
    assert_eq!(
        (one["from"].as_str(), one["to"].as_str(), &one["buckets"], &one["events"]),
        (Some("2023-12-20T01:00:00Z"), Some("2023-12-20T01:15:00Z"), &json!(1), &json!(1))
    );

    // Independently: every unit sent is either billed or reported, never both.
    run(&api, json!({"filter": {"due": true}, "until": "2024-02-01T00:00:00+09:00"})).await;
    let billed: rust_decimal::Decimal = invoices(&api, "")
        .await
        .iter()
        .flat_map(|i| i["lines"].as_array().unwrap().clone())
        .filter(|l| l["meter"] == "lunch_boxes")
        .map(|l| l["quantity"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    let reported: rust_decimal::Decimal = rows.iter().map(|r| r.3.parse::<rust_decimal::Decimal>().unwrap()).sum();
    let all: rust_decimal::Decimal = sent.iter().map(|r| r.2.parse::<rust_decimal::Decimal>().unwrap()).sum();
    assert_eq!((billed, billed + reported), (21.into(), all), "billed {billed}, reported {reported}");
    // s1's line counts the usage that names it without a customer, and its
    // SQL reproduces that.
    let s1 = invoices(&api, "&subscription_id=s1").await;
    assert_eq!(line(&s1[0], "lunch_boxes")["quantity"], "16", "{}", s1[0]);
    let (st, q) = api.post("/v1/sql", json!({"query": line(&s1[0], "lunch_boxes")["sql"]})).await;
    assert_eq!(st, StatusCode::OK, "{q}");
    assert_eq!(q["data"][0]["quantity"].to_string().trim_matches('"').parse::<rust_decimal::Decimal>().unwrap(), 16.into(), "{q}");

    // Narrowed by customer and time; bad input named.
    let (_, two) = api.get("/v1/billing/unattributed-usage?customer_id=two").await;
    assert_eq!(two["data"].as_array().unwrap().len(), 1, "{two}");
    let (_, jan_only) = api.get("/v1/billing/unattributed-usage?from=2024-01-01T00:00:00%2B09:00&to=2024-02-01T00:00:00%2B09:00").await;
    assert!(jan_only["data"].as_array().unwrap().iter().all(|r| r["customer_id"] != "one" || r["reason"] != "no_subscription"), "{jan_only}");
    assert_eq!(jan_only["data"].as_array().unwrap().len(), 8, "{jan_only}");
    let (st, bad) = api.get("/v1/billing/unattributed-usage?from=yesterday").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}");
    assert!(bad.to_string().contains("from"), "{bad}");

    // The CLI prints the same rows.
    let key = api.key.clone().unwrap();
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", key.as_str())];
    let (ok, out, err) = crate::helpers::cli(&["billing", "unattributed", "--customer", "two"], &env, None);
    assert!(ok, "{out}\n{err}");
    let row = out.lines().find(|l| l.starts_with("two ")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("several_subscriptions") && row.contains("t1,t2") && row.split_whitespace().any(|w| w == "4"), "{out}");

    // A meter that only an earlier version of a plan charges is reported too.
    let tix = |charges: Value| json!({"code": "tix", "name": "Tickets", "currency": "JPY", "interval": "month", "charges": charges});
    assert_eq!(
        api.post("/v1/plans", tix(json!([{"meter": "support_tickets", "model": "flat", "amount": "2000", "tax_rate": "0.10"}]))).await.0,
        StatusCode::CREATED
    );
    assert_eq!(api.post("/v1/plans", tix(json!([]))).await.0, StatusCode::CREATED);
    usage(&api, &[("four", "", "support_tickets", "2", jan)]).await;
    metered(&s).await;
    let (_, four) = api.get("/v1/billing/unattributed-usage?customer_id=four").await;
    let tickets: Vec<&Value> = four["data"].as_array().unwrap().iter().filter(|r| r["meter"] == "support_tickets").collect();
    assert_eq!(tickets.len(), 1, "{four}");
    assert_eq!((tickets[0]["reason"].as_str(), tickets[0]["quantity"].as_str()), (Some("no_subscription"), Some("2")), "{four}");
}

/// Free units, a graduated tier's flat price, a volume tier's flat price,
/// a minimum that sets the amount, and the three tax rounding modes, each
/// against figures computed by hand; then mark-paid, void (its event), the
/// invoice list's filters and a run selecting by plan and by customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_units_flat_prices_minimums_and_the_three_tax_roundings_against_hand_computed_invoices() {
    let s = Server::start().await;
    let api = tokyo(&s, "bill-more").await;
    let plan = json!({"code": "m", "name": "M", "currency": "JPY", "interval": "month",
        "charges": [
            {"meter": "storage_gb", "model": "graduated", "tax_rate": "0.10", "free_units": "50",
             "tiers": [{"up_to": "100", "unit_price": "0"}, {"up_to": "1000", "unit_price": "5", "flat_price": "200"},
                       {"up_to": null, "unit_price": "3"}]},
            {"meter": "api_calls", "model": "volume", "tax_rate": "0.10",
             "tiers": [{"up_to": "10000", "unit_price": "0.5", "flat_price": "100"}, {"up_to": null, "unit_price": "0.2"}]},
            {"meter": "seats", "model": "package", "package_size": "10", "package_price": "3000", "tax_rate": "0.10", "minimum_amount": "3000"},
            {"meter": "lunch_boxes", "model": "per_unit", "unit_price": "540", "tax_rate": "0.08", "free_units": "2"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    let other = json!({"code": "o", "name": "O", "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": "500", "tax_rate": "0.10"}]});
    assert_eq!(api.post("/v1/plans", other).await.0, StatusCode::CREATED);
    let start = "2024-01-01T00:00:00+09:00";
    let mut subs: Vec<Value> = ["a", "xf", "yf", "xh", "yh", "xc", "yc"]
        .iter()
        .map(|c| json!({"id": format!("s-{c}"), "customer_id": c, "plan": "m", "start": start}))
        .collect();
    subs.push(json!({"id": "s-z", "customer_id": "z", "plan": "o", "start": start}));
    assert_eq!(api.post("/v1/subscriptions", Value::Array(subs)).await.0, StatusCode::CREATED);
    let t = "2024-01-15T12:00:00+09:00";
    let mut events = vec![("a", "", "storage_gb", "160", t), ("a", "", "api_calls", "10000", t), ("a", "", "lunch_boxes", "3", t)];
    for c in ["xf", "xh", "xc"] {
        events.push((c, "", "lunch_boxes", "3", t));
    }
    for c in ["yf", "yh", "yc"] {
        events.push((c, "", "lunch_boxes", "5", t));
    }
    usage(&api, &events).await;
    metered(&s).await;
    let until = "2024-02-01T00:00:00+09:00";
    let set_rounding = |mode: &'static str| {
        let api = api.clone();
        async move {
            let (st, v) =
                api.send(api.req(reqwest::Method::PATCH, "/v1/workspaces/bill-more").json(&json!({"billing": {"tax_rounding": mode}}))).await;
            assert_eq!((st, v["billing"]["tax_rounding"].clone()), (StatusCode::OK, json!(mode)), "{v}");
        }
    };
    let one = |api: Api, sub: &'static str| async move { invoices(&api, &format!("&subscription_id={sub}")).await.remove(0) };
    // floor (the default) for a, xf, yf.
    let r = run(&api, json!({"subscription_ids": ["s-a", "s-xf", "s-yf"], "until": until})).await;
    assert_eq!(r["invoices_created"], 3, "{r}");
    set_rounding("half_up").await;
    run(&api, json!({"subscription_ids": ["s-xh", "s-yh"], "until": until})).await;
    set_rounding("ceiling").await;
    run(&api, json!({"subscription_ids": ["s-xc", "s-yc"], "until": until})).await;

    // a: storage 160 − 50 free = 110 GB: 100 × 0, then 10 × 5 = 50 plus the
    // second tier's flat 200 = 250. api_calls 10,000 is in the first tier
    // (up_to inclusive): 10,000 × 0.5 = 5,000 plus its flat 100 = 5,100.
    // seats 0: the minimum, 3,000. lunch boxes 3 − 2 free = 1 × 540 = 540.
    // 10 %: 8,350 → 835; 8 %: 540 → 43.2 → 43 (floor). Total 8,890 + 878.
    let a = one(api.clone(), "s-a").await;
    assert_eq!(line(&a, "storage_gb")["amount"], "250", "{a}");
    assert_eq!(line(&a, "api_calls")["amount"], "5100", "{a}");
    assert_eq!((line(&a, "seats")["amount"].clone(), line(&a, "seats")["minimum_applied"].clone()), (json!("3000"), json!(true)), "{a}");
    assert_eq!(line(&a, "lunch_boxes")["amount"], "540", "{a}");
    assert_eq!((a["subtotal"].as_str(), a["tax"].as_str(), a["total"].as_str()), (Some("8890"), Some("878"), Some("9768")), "{a}");
    // x: 540 at 8 % = 43.2; y: 3 × 540 = 1,620 at 8 % = 129.6; both 3,000
    // (the minimum) at 10 % = 300. Rounded once per rate per invoice:
    // floor 43 / 129, half_up 43 / 130, ceiling 44 / 130.
    for (x, y, tx, ty) in [("s-xf", "s-yf", 43, 129), ("s-xh", "s-yh", 43, 130), ("s-xc", "s-yc", 44, 130)] {
        for (sub, subtotal, t8) in [(x, 3540, tx), (y, 4620, ty)] {
            let inv = one(api.clone(), sub).await;
            let eight = inv["taxes"].as_array().unwrap().iter().find(|t| t["rate"] == "0.08").cloned().unwrap();
            assert_eq!(eight["tax"], json!(t8.to_string()), "{sub}: {inv}");
            assert_eq!(inv["subtotal"], json!(subtotal.to_string()), "{sub}: {inv}");
            assert_eq!(inv["total"], json!((subtotal + 300 + t8).to_string()), "{sub}: {inv}");
        }
    }

    // Paid and void; the list's filters; the void's event in the log.
    let a_id = a["id"].as_str().unwrap().to_owned();
    let (st, v) = api.post(&format!("/v1/invoices/{a_id}/mark-paid"), json!({})).await;
    assert_eq!((st, v["status"].clone()), (StatusCode::OK, json!("paid")), "{v}");
    let xf = one(api.clone(), "s-xf").await;
    let xf_id = xf["id"].as_str().unwrap().to_owned();
    let (st, v) = api.post(&format!("/v1/invoices/{xf_id}/void"), json!({})).await;
    assert_eq!(
        (st, v["status"].clone(), v["number"].clone()),
        (StatusCode::OK, json!("void"), xf["number"].clone()),
        "a voided invoice keeps its number: {v}"
    );
    let ids = |list: Vec<Value>| list.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(invoices(&api, "&status=paid").await), vec![a_id.clone()]);
    assert_eq!(ids(invoices(&api, "&status=void").await), vec![xf_id.clone()]);
    assert_eq!(ids(invoices(&api, "&customer_id=a").await), vec![a_id.clone()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let voided = api.all_events("&type=invoice.voided").await;
        if let Some(e) = voided.iter().find(|e| e["properties"]["invoice_id"] == json!(xf_id)) {
            assert_eq!((e["properties"]["status"].clone(), e["customer_id"].clone()), (json!("void"), json!("xf")), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "no invoice.voided event for {xf_id}: {voided:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Selection by plan and by customer.
    let r = run(&api, json!({"filter": {"plan": "o"}, "until": until})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(1), json!(1)), "{r}");
    assert_eq!(one(api.clone(), "s-z").await["total"], "550");
    let r = run(&api, json!({"filter": {"customer_ids": ["a", "z"]}, "until": until})).await;
    assert_eq!((r["subscriptions_total"].clone(), r["invoices_created"].clone()), (json!(2), json!(0)), "billed already: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_cut_off_by_a_crash_before_its_period_reopened_is_completed_at_restart() {
    let mut s = Server::start().await;
    let ws = "bill-void-crash";
    let api = tokyo(&s, ws).await;
    let plan = json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": "1000", "tax_rate": "0.10"}]});
    assert_eq!(api.post("/v1/plans", plan).await.0, StatusCode::CREATED);
    let start = "2024-01-01T00:00:00+09:00";
    assert_eq!(api.post("/v1/subscriptions", json!({"id": "s", "customer_id": "c", "plan": "p", "start": start})).await.0, StatusCode::CREATED);
    let until = "2024-02-01T00:00:00+09:00";
    let r = run(&api, json!({"subscription_ids": ["s"], "until": until})).await;
    let id = r["invoice_ids"][0].as_str().unwrap().to_owned();
    // The void's first step committed, then the process died before the
    // second (the period opened again on the subscription).
    void_then_crash(&mut s, ws, &id).await;
    let api = Api { base: s.url.clone(), ..api };
    // The outbox relay at start opens the period before it sends
    // invoice.voided; a run then bills it again, once, naming the void.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, sub) = api.get("/v1/subscriptions/s").await;
        let voided = api.all_events("&type=invoice.voided").await;
        let reopened = sub["billed_until"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap()
            == start.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
        if reopened && voided.iter().any(|e| e["properties"]["invoice_id"] == json!(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "not reopened or no invoice.voided: {sub} {voided:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = run(&api, json!({"subscription_ids": ["s"], "until": until})).await;
    assert_eq!(r["invoices_created"], json!(1), "{r}");
    let all = invoices(&api, "&subscription_id=s").await;
    let seen: Vec<(Value, Value)> = all.iter().map(|i| (i["status"].clone(), i["replaces"].clone())).collect();
    assert_eq!(seen, vec![(json!("void"), Value::Null), (json!("finalized"), json!(id))], "{all:?}");
    // The void's outbox row again (as if its send had failed and the period
    // had been billed again meanwhile): the relay at the next start must not
    // reopen a period billed again.
    s.kill9();
    let store = sluice_store::Store::connect(&s.state_url()).await.unwrap();
    let row = sluice_store::OutboxRow { workspace: ws.into(), kind: "invoice.voided".into(), subject: id.clone(), event: None };
    store.save_customer_health_many(ws, &[], &[], &[row]).await.unwrap();
    store.close().await;
    s.restart();
    let api = Api { base: s.url.clone(), ..api };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let store = sluice_store::Store::connect(&s.state_url()).await.unwrap();
        let left = store.event_outbox(10).await.unwrap();
        store.close().await;
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the relay left {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, sub) = api.get("/v1/subscriptions/s").await;
    assert_eq!(
        sub["billed_until"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap(),
        until.parse::<chrono::DateTime<chrono::Utc>>().unwrap(),
        "the period billed again stays billed: {sub}"
    );
    let r = run(&api, json!({"subscription_ids": ["s"], "until": until})).await;
    assert_eq!(r["invoices_created"], json!(0), "the period is billed once: {r}");
}

/// An invoice event the log refuses (here: the workspace enforces a schema
/// that `invoice.finalized` does not meet) fails nothing: the run succeeds,
/// the event waits in the outbox, and the relay drops it, logged, without
/// holding up another workspace's events queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoice_event_the_log_refuses_is_dropped_and_holds_up_no_other_workspaces_events() {
    let mut s = Server::start().await;
    let (a, b) = (tokyo(&s, "bill-refused").await, tokyo(&s, "bill-behind").await);
    let (st, v) =
        a.send(a.req(reqwest::Method::PUT, "/v1/schemas/invoice.finalized").json(&json!({"properties": {"total": "int64"}, "enforce": true}))).await;
    assert!(st.is_success(), "{v}");
    let plan = json!({"code": "p", "name": "P", "currency": "JPY", "interval": "month", "fixed_fees": [{"name": "Fee", "amount": "1000", "tax_rate": "0.10"}]});
    let until = "2024-02-01T00:00:00+09:00";
    let mut ids = Vec::new();
    for api in [&a, &b] {
        assert_eq!(api.post("/v1/plans", plan.clone()).await.0, StatusCode::CREATED);
        let sub = json!({"id": "s", "customer_id": "c", "plan": "p", "start": "2024-01-01T00:00:00+09:00"});
        assert_eq!(api.post("/v1/subscriptions", sub).await.0, StatusCode::CREATED);
        let r = run(api, json!({"subscription_ids": ["s"], "until": until})).await;
        assert_eq!(r["invoices_created"], json!(1), "{r}");
        ids.push(r["invoice_ids"][0].as_str().unwrap().to_owned());
    }
    let (_, inv) = a.get(&format!("/v1/invoices/{}", ids[0])).await;
    assert_eq!(inv["status"], "finalized", "the refused event changes nothing: {inv}");
    // bill-behind's void lands in the outbox after bill-refused's refused
    // event (the process dies before sending it), so the relay at the next
    // start reads both in one page.
    void_then_crash(&mut s, "bill-behind", &ids[1]).await;
    let b = Api { base: s.url.clone(), ..b };
    let a = Api { base: s.url.clone(), ..a };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let voided = b.all_events("&type=invoice.voided").await;
        if voided.iter().any(|e| e["properties"]["invoice_id"] == json!(ids[1])) {
            break;
        }
        assert!(Instant::now() < deadline, "bill-behind's invoice.voided never reached the log: {voided:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.all_events("&type=invoice.finalized").await.is_empty(), "the refused event is not in the log");
    let logged = s.stderr.lock().unwrap().iter().any(|l| l.contains("dropped from the outbox") && l.contains(&ids[0]));
    assert!(logged, "the drop is logged naming the invoice: {:?}", s.stderr.lock().unwrap());
}
