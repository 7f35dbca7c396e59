//! The example read model (written only against the public engine API)
//! receives every event exactly once across `kill -9`, and its poison
//! records end in the dead letters: on SQLite and on PostgreSQL.
//!
//! Rounds of: append events to the log (the host is down), start
//! `readmodel-host`, kill it with SIGKILL at a random moment while it is
//! handling them. Then a last run to the end. Each event's `seen` counts the
//! commits of its delivery: any event counted twice or lost fails the test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sluice_core::{AppendRecord, EventLog};
use sluice_readmodel_example::NAME;
use sluice_store::Store;

const ROUNDS: usize = 6;
const PER_ROUND: usize = 400;

fn event(id: &str, poison: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "workspace": "w", "id": id, "type": "t", "timestamp": "2024-01-01T00:00:00Z",
        "received_at": "2024-01-01T00:00:00Z", "properties": {"poison": poison}, "context": {}
    }))
    .unwrap()
}

/// Appends events to the log while no host runs; returns (good, poisoned) ids.
async fn append(log_dir: &std::path::Path, round: usize) -> (Vec<String>, Vec<String>) {
    let log = sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(log_dir, 2)).unwrap();
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    let mut records = Vec::new();
    for i in 0..PER_ROUND {
        let id = format!("r{round}e{i}");
        let poison = i % 97 == 13;
        records.push(AppendRecord { partition: (i % 2) as u32, timestamp_ms: 0, payload: event(&id, poison) });
        if poison {
            bad.push(id)
        } else {
            good.push(id)
        }
    }
    // One record per append call: many small records, many commits.
    for r in records {
        log.append(vec![r]).await.unwrap();
    }
    drop(log);
    (good, bad)
}

fn host(log_dir: &std::path::Path, url: &str, delay_ms: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_readmodel-host"))
        .arg(log_dir)
        .arg(url)
        .env("SLUICE_EXAMPLE_HANDLE_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// (event id, seen) of every row of the read model.
async fn seen(url: &str) -> Vec<(String, i64)> {
    let sql = "SELECT event_id, seen FROM example_seen";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap_or_default();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows = sqlx::query_as(sql).fetch_all(&pool).await.unwrap_or_default();
        pool.close().await;
        rows
    }
}

async fn dead_letters(store: &Store) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list_dead_letters("w", Some(NAME), None, cursor.as_deref(), 500).await.unwrap();
        out.extend(page.data.into_iter().map(|d| (d.event_id, d.error, d.attempts)));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

async fn exactly_once_across_kill_9(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let (mut good, mut bad) = (BTreeSet::new(), BTreeSet::new());
    let mut rng = rand::rng();
    let mut killed_midway = 0;
    for round in 0..ROUNDS {
        let (g, b) = append(&log_dir, round).await;
        good.extend(g);
        bad.extend(b);
        // 5 ms per event: a round's backlog (200 events per partition, and
        // what earlier rounds left) takes over a second, commits come every
        // 250 ms, and the kill lands in between, whatever the machine's speed.
        let mut child = host(&log_dir, url, 5);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = seen(url).await.len();
        eprintln!("round {round}: killed with {n} of {} good events committed", good.len());
        if n > 0 && n < good.len() {
            killed_midway += 1;
        }
    }
    assert!(killed_midway > 0, "no kill landed while events were being handled: the test proves nothing");
    // The last run, to the end.
    let mut child = host(&log_dir, url, 0);
    let store = Store::connect(url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = seen(url).await;
        let dead = dead_letters(&store).await;
        if rows.len() >= good.len() && dead.len() >= bad.len() {
            break;
        }
        assert!(Instant::now() < deadline, "timed out: {} of {} events seen, {} of {} dead letters", rows.len(), good.len(), dead.len(), bad.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a late duplicate commit, if there were one, land before checking.
    tokio::time::sleep(Duration::from_millis(600)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let rows = seen(url).await;
    let twice: Vec<_> = rows.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "events committed more than once: {twice:?}");
    let ids: BTreeSet<String> = rows.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, good, "the read model holds exactly the good events");
    let dead = dead_letters(&store).await;
    let dead_ids: BTreeSet<String> = dead.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(dead.len(), dead_ids.len(), "a poison record dead-lettered twice: {dead:?}");
    assert_eq!(dead_ids, bad, "exactly the poison records are in the dead letters");
    for (id, error, attempts) in &dead {
        assert_eq!(error, &format!("event {id} is poisoned"));
        assert_eq!(*attempts, 1, "a permanent failure is not retried");
    }
    // Checkpoints at the end of both partitions.
    let log: Arc<dyn EventLog> = Arc::new(sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(&log_dir, 2)).unwrap());
    let cp = store.checkpoints(NAME).await.unwrap();
    for p in 0..2 {
        assert_eq!(cp.get(&p), Some(&log.next_offset(p)), "partition {p} checkpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_event_exactly_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once_across_kill_9(&format!("sqlite://{}", dir.path().join("state.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_event_exactly_once_across_kill_9() {
    let Some(db) = sluice_store::testing::TestDatabase::create().await else { return };
    exactly_once_across_kill_9(&db.url).await;
}
