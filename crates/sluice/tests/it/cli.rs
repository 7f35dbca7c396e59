//! The CLI as an HTTP client of a running server.

use serde_json::Value;

use crate::helpers::{cli, Server};

#[tokio::test]
async fn events_send_tail_and_keys_through_the_cli() {
    let s = Server::start().await;
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", s.key.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    let lines: Vec<String> = (0..25).map(|i| format!(r#"{{"id":"cli-{i}","type":"cli.test","customer_id":"c1"}}"#)).collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (ok, out, err) = cli(&["events", "send", file.to_str().unwrap(), "--batch", "10"], &env, None);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["accepted"], 25);
    // Sending again from stdin: all duplicates.
    let (ok, out, _) = cli(&["events", "send", "-"], &env, Some(&lines.join("\n")));
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap()["duplicates"], 25);
    // An invalid file is refused with the server's explanation.
    let (ok, _, err) = cli(&["events", "send", "-"], &env, Some(r#"[{"type":"bad type"}]"#));
    assert!(!ok);
    assert!(err.contains("invalid_events") && err.contains("\"field\":\"type\""), "{err}");
    // Tail from the start prints the events as NDJSON.
    let (ok, out, err) = cli(&["events", "tail", "--from-start", "--count", "25", "--type", "cli.test"], &env, None);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 25);
    assert!(out.lines().all(|l| serde_json::from_str::<Value>(l).unwrap()["type"] == "cli.test"));
    // Keys and workspaces.
    let (ok, _, err) = cli(&["workspaces", "create", "cli-ws", "--time-zone", "Asia/Tokyo"], &env, None);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["keys", "create", "--name", "reader", "--scope", "read", "--workspace", "cli-ws"], &env, None);
    assert!(ok, "{err}");
    let key: Value = serde_json::from_str(&out).unwrap();
    assert!(key["secret"].as_str().unwrap().starts_with("sk_"));
    let (ok, out, _) = cli(&["keys", "list"], &env, None);
    assert!(ok);
    assert!(out.contains("reader") && out.contains("cli-ws"), "{out}");
    let (ok, _, _) = cli(&["keys", "delete", key["id"].as_str().unwrap()], &env, None);
    assert!(ok);
    let (ok, out, _) = cli(&["workspaces", "list"], &env, None);
    assert!(ok);
    assert!(out.contains("Asia/Tokyo"));
    // A missing key is a readable error.
    let (ok, _, err) = cli(&["keys", "list"], &[("SLUICE_URL", s.url.as_str())], None);
    assert!(!ok);
    assert!(err.contains("SLUICE_KEY"), "{err}");
}

#[tokio::test]
async fn consumers_and_dlq_through_the_cli() {
    let s = Server::start_with(&[("SLUICE_RETRY_ATTEMPTS", "2"), ("SLUICE_RETRY_BASE_MS", "10"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1")]).await;
    let env = [("SLUICE_URL", s.url.as_str()), ("SLUICE_KEY", s.key.as_str())];
    // A webhook whose target refuses connections: its events end up dead-lettered.
    let (st, _) = s.root().post("/v1/webhooks", serde_json::json!({"url": "http://127.0.0.1:9/none", "event_types": ["*"]})).await;
    assert_eq!(st, reqwest::StatusCode::CREATED);
    s.root().ingest(serde_json::json!([{"id": "d1", "type": "t"}])).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let id = loop {
        let (_, v) = s.root().get("/v1/dlq?status=dead").await;
        if let Some(id) = v["data"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let (ok, out, err) = cli(&["consumers"], &env, None);
    assert!(ok, "{err}");
    assert!(out.contains("event_counts") && out.contains("webhook:"), "{out}");
    let (ok, out, _) = cli(&["dlq", "list", "--status", "dead"], &env, None);
    assert!(ok);
    assert!(out.contains(&id) && out.contains("d1"), "{out}");
    let (ok, out, _) = cli(&["dlq", "show", &id], &env, None);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["event"]["id"], "d1");
    let (ok, out, _) = cli(&["dlq", "discard", &id], &env, None);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "discarded");
    let (ok, _, err) = cli(&["dlq", "replay", &id], &env, None);
    assert!(!ok);
    assert!(err.contains("409"), "{err}");
    let (ok, out, err) = cli(&["consumers", "reset", "event_counts", "--to", "earliest"], &env, None);
    assert!(ok, "{err}");
    assert!(out.contains("cleared_read_model"), "{out}");
}
