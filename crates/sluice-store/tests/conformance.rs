//! The state store conformance suite: every test runs against SQLite and
//! against PostgreSQL (a fresh database each). Backends may not differ.

#![allow(clippy::unwrap_used)]

use sluice_core::Scope;
use sluice_store::testing::TestDatabase;
use sluice_store::{NewApiKey, NewAudit, Store, StoreError};

enum Guard {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] TestDatabase),
}

async fn sqlite_store() -> (Store, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    (Store::connect(&url).await.unwrap(), Guard::Dir(dir))
}

async fn postgres_store() -> Option<(Store, Guard)> {
    let db = TestDatabase::create().await?;
    let store = Store::connect(&db.url).await.unwrap();
    Some((store, Guard::Pg(db)))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() {
                let (store, _guard) = super::sqlite_store().await;
                super::$name(store).await;
            } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() {
                let Some((store, _guard)) = super::postgres_store().await else { return };
                super::$name(store.clone()).await;
                store.close().await;
            } )*
        }
    };
}

conformance!(
    bootstrap_happens_once,
    workspaces_unique_and_paged,
    keys_lifecycle,
    log_effects_and_progress,
    migrations_are_idempotent_on_reconnect,
    audit_entries_are_recorded_with_their_action,
    jobs_are_claimed_once_in_order,
    jobs_of_a_one_per_workspace_kind_run_one_at_a_time_per_workspace_in_order,
    jobs_retry_fail_cancel_and_reclaim,
    lake_manifest_commits_with_checkpoints_and_swaps_atomically,
    usage_commits_merge_into_stored_buckets,
    count_commits_add_to_stored_counts,
    every_id_the_validator_accepts_round_trips_and_nul_is_refused,
    usage_overflow_is_refused_whole_and_names_every_bucket,
    bulk_cancel_and_retry_change_the_selection_of_one_workspace,
    bulk_dead_letters_walk_the_matching_entries_once_in_chunks,
    health_marks_keep_their_place_and_only_evaluated_marks_clear,
    attribute_changes_come_back_whole_in_time_and_reference_order,
    latest_history_rows_come_back_exactly,
    health_batch_reads_step_through_customers_and_read_each_type_over_its_window,
    planner_statistics_are_refreshed_only_where_missing_or_stale,
    customer_lists_page_through_every_order_and_filter,
    health_transitions_enter_the_outbox_with_their_evaluation_and_leave_once_sent,
);

fn lake_file(path: &str, ws: &str) -> sluice_store::LakeFile {
    let t = chrono::DateTime::parse_from_rfc3339("2026-01-01T05:00:00Z").unwrap().with_timezone(&chrono::Utc);
    sluice_store::LakeFile {
        path: path.into(),
        workspace: ws.into(),
        content_type: "page".into(),
        hour_start: t,
        row_count: 10,
        bytes: 100,
        min_time: t,
        max_time: t,
        created_at: t,
    }
}

async fn lake_manifest_commits_with_checkpoints_and_swaps_atomically(store: Store) {
    store.lake_commit("lake", &[lake_file("a", "w1"), lake_file("b", "w1"), lake_file("c", "w2")], &[(0, 5), (1, 7)]).await.unwrap();
    let snap = store.lake_snapshot("w1", "lake").await.unwrap();
    assert_eq!(snap.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(snap.checkpoints.get(&1), Some(&7));
    assert_eq!(snap.files[0], lake_file("a", "w1"));
    // A file committed twice is refused and the checkpoint does not move.
    assert!(store.lake_commit("lake", &[lake_file("a", "w1")], &[(0, 99)]).await.is_err());
    assert_eq!(store.lake_snapshot("w1", "lake").await.unwrap().checkpoints.get(&0), Some(&5));
    // A swap whose inputs changed meanwhile changes nothing.
    assert!(matches!(store.lake_swap(&[lake_file("ab", "w1")], &["a".into(), "gone".into()]).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.lake_files(Some("w1")).await.unwrap().len(), 2);
    store.lake_swap(&[lake_file("ab", "w1")], &["a".into(), "b".into()]).await.unwrap();
    assert_eq!(store.lake_files(Some("w1")).await.unwrap().iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["ab"]);
    assert_eq!(store.lake_files(None).await.unwrap().len(), 2);
}

fn job(kind: &str, n: u32) -> sluice_store::NewJob {
    sluice_store::NewJob { workspace: "w1".into(), kind: kind.into(), payload: serde_json::json!({"n": n}), max_attempts: 2, created_by: None }
}

async fn jobs_of_a_one_per_workspace_kind_run_one_at_a_time_per_workspace_in_order(store: Store) {
    let lease = std::time::Duration::from_secs(30);
    let new = |ws: &str, n: u32| sluice_store::NewJob { workspace: ws.into(), ..job("serial", n) };
    let a1 = store.enqueue_job(&new("wa", 1)).await.unwrap().id;
    let a2 = store.enqueue_job(&new("wa", 2)).await.unwrap().id;
    let b1 = store.enqueue_job(&new("wb", 1)).await.unwrap().id;
    let b2 = store.enqueue_job(&new("wb", 2)).await.unwrap().id;
    // One of each workspace, the oldest, however many are asked for.
    let first = store.claim_jobs_one_per_workspace("serial", 4, lease).await.unwrap();
    assert_eq!(first.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![a1.clone(), b1.clone()]);
    assert!(store.claim_jobs_one_per_workspace("serial", 4, lease).await.unwrap().is_empty(), "both workspaces have one running");
    // wb's first ends: its second comes; wa's still waits behind a1.
    let end = sluice_store::JobEnd::Succeeded(serde_json::json!({}));
    store.finish_job(&b1, 1, &end).await.unwrap();
    let next = store.claim_jobs_one_per_workspace("serial", 4, lease).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![b2.clone()]);
    store.finish_job(&a1, 1, &end).await.unwrap();
    let next = store.claim_jobs_one_per_workspace("serial", 4, lease).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![a2]);
}

async fn jobs_are_claimed_once_in_order(store: Store) {
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(store.enqueue_job(&job("k", n)).await.unwrap().id);
    }
    store.enqueue_job(&job("other", 99)).await.unwrap();
    let first = store.claim_jobs("k", 3, std::time::Duration::from_secs(30)).await.unwrap();
    assert_eq!(first.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), ids[..3]);
    assert!(first.iter().all(|j| j.state == "running" && j.attempts == 1 && j.started_at.is_some()));
    // Concurrent claimers never get the same job.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let c = s.claim_jobs("k", 2, std::time::Duration::from_secs(30)).await.unwrap();
                if c.is_empty() {
                    return got;
                }
                got.extend(c.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut all: Vec<String> = first.into_iter().map(|j| j.id).collect();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 40, "every job claimed exactly once");
    assert_eq!(unique.len(), 40);
    assert_eq!(store.list_jobs("w1", Some("other"), Some(sluice_core::JobState::Queued), None, 10).await.unwrap().data.len(), 1);
}

async fn jobs_retry_fail_cancel_and_reclaim(store: Store) {
    use sluice_store::JobEnd;
    use std::time::Duration;
    let j = store.enqueue_job(&job("k", 1)).await.unwrap();
    let c = store.claim_jobs("k", 1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(c[0].id, j.id);
    store.job_progress(&j.id, 1, 5, Some(10)).await.unwrap();
    assert_eq!(store.get_job(Some("w1"), &j.id).await.unwrap().progress_total, Some(10));
    // First failure: queued again, not before its backoff.
    let after = store.finish_job(&j.id, 1, &JobEnd::Failed { error: "boom".into(), retry_in: Duration::from_secs(3600) }).await.unwrap();
    assert_eq!((after.state.as_str(), after.error.as_deref()), ("queued", Some("boom")));
    assert!(store.claim_jobs("k", 1, Duration::from_secs(30)).await.unwrap().is_empty());
    // Retry makes it due at once; the second failure is final.
    assert!(matches!(store.retry_job("w1", &j.id).await, Err(StoreError::Conflict(_))));
    let j2 = store.enqueue_job(&job("k2", 2)).await.unwrap();
    store.claim_jobs("k2", 1, Duration::from_secs(30)).await.unwrap();
    store.finish_job(&j2.id, 1, &JobEnd::Failed { error: "e1".into(), retry_in: Duration::ZERO }).await.unwrap();
    store.claim_jobs("k2", 1, Duration::from_secs(30)).await.unwrap();
    let failed = store.finish_job(&j2.id, 2, &JobEnd::Failed { error: "e2".into(), retry_in: Duration::ZERO }).await.unwrap();
    assert_eq!(failed.state, "failed");
    assert_eq!(failed.errors, vec!["attempt 1: e1".to_string(), "attempt 2: e2".to_string()]);
    assert!(failed.finished_at.is_some());
    let again = store.retry_job("w1", &j2.id).await.unwrap();
    assert_eq!((again.state.as_str(), again.attempts), ("queued", 0));
    // Cancel: queued at once; running by request.
    let cancelled = store.cancel_job("w1", &j2.id).await.unwrap();
    assert_eq!(cancelled.state, "cancelled");
    assert!(matches!(store.cancel_job("w1", &j2.id).await, Err(StoreError::Conflict(_))));
    let j3 = store.enqueue_job(&job("k3", 3)).await.unwrap();
    store.claim_jobs("k3", 1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(store.heartbeat_job(&j3.id, 1, Duration::from_secs(30)).await.unwrap(), Some(false));
    assert!(store.cancel_job("w1", &j3.id).await.unwrap().cancel_requested);
    assert_eq!(store.heartbeat_job(&j3.id, 1, Duration::from_secs(30)).await.unwrap(), Some(true));
    assert_eq!(store.finish_job(&j3.id, 1, &JobEnd::Cancelled).await.unwrap().state, "cancelled");
    // A job whose process died is reclaimed when its lease expires.
    let j4 = store.enqueue_job(&job("k4", 4)).await.unwrap();
    store.claim_jobs("k4", 1, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.reclaim_expired_jobs().await.unwrap(), 1);
    let back = store.get_job(None, &j4.id).await.unwrap();
    assert_eq!((back.state.as_str(), back.attempts), ("queued", 1));
    // The stale attempt 1 (a process that lost its lease but still runs) can
    // neither renew, report progress, nor end the job: only attempt 2 can.
    store.claim_jobs("k4", 1, Duration::from_millis(1)).await.unwrap();
    assert_eq!(store.heartbeat_job(&j4.id, 1, Duration::from_millis(1)).await.unwrap(), None);
    store.job_progress(&j4.id, 1, 99, None).await.unwrap();
    assert_eq!(store.get_job(None, &j4.id).await.unwrap().progress_done, 0);
    assert!(matches!(store.finish_job(&j4.id, 1, &JobEnd::Succeeded(serde_json::json!({}))).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.get_job(None, &j4.id).await.unwrap().state, "running");
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.reclaim_expired_jobs().await.unwrap();
    assert_eq!(store.get_job(None, &j4.id).await.unwrap().state, "failed", "no attempts left after the second lease expired");
    // Workspaces are separate.
    assert!(matches!(store.get_job(Some("other"), &j4.id).await, Err(StoreError::NotFound)));
}

async fn audit_entries_are_recorded_with_their_action(store: Store) {
    store.create_workspace("w1", "UTC", &audit("workspace.create")).await.unwrap();
    store.create_key(&key("key_a", "w1", Scope::Read, "sa"), &audit("key.create")).await.unwrap();
    // A failed action leaves no audit entry.
    assert!(store.create_key(&key("key_b", "w1", Scope::Read, "sa"), &audit("key.create")).await.is_err());
    assert!(store.revoke_key("nope", &audit("key.revoke")).await.is_err());
    store.revoke_key("key_a", &audit("key.revoke")).await.unwrap();
    store.record_audit(&audit("other")).await.unwrap();
    let p1 = store.list_audit("w1", None, 2).await.unwrap();
    let p2 = store.list_audit("w1", p1.next_cursor.as_deref(), 10).await.unwrap();
    let actions: Vec<String> = p1.data.iter().chain(&p2.data).map(|e| e.action.clone()).collect();
    assert_eq!(actions, ["workspace.create", "key.create", "key.revoke", "other"]);
    assert!(p2.next_cursor.is_none());
    assert_eq!(p1.data[0].actor_key_id.as_deref(), Some("key_actor"));
    assert_eq!(p1.data[0].details, serde_json::json!({"n": 1}));
    assert!(store.list_audit("elsewhere", None, 10).await.unwrap().data.is_empty());
}

fn audit(action: &str) -> NewAudit {
    NewAudit {
        workspace: "w1".into(),
        actor_key_id: Some("key_actor".into()),
        action: action.into(),
        target_type: "test".into(),
        target_id: "t".into(),
        details: serde_json::json!({"n": 1}),
    }
}

fn key(id: &str, ws: &str, scope: Scope, secret: &str) -> NewApiKey {
    use sha2_shim::digest;
    NewApiKey {
        id: id.into(),
        workspace: ws.into(),
        name: format!("{id} key"),
        scope,
        key_hash: digest(secret),
        prefix: secret.chars().take(8).collect(),
        created_by: None,
    }
}

/// A stand-in digest: the store does not care how the hash was made.
mod sha2_shim {
    pub fn digest(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.resize(32, 0);
        v
    }
}

async fn bootstrap_happens_once(store: Store) {
    assert!(store.bootstrap(&key("key_root", "default", Scope::Root, "root-secret")).await.unwrap());
    assert!(!store.bootstrap(&key("key_root2", "default", Scope::Root, "other")).await.unwrap());
    let ws = store.get_workspace("default").await.unwrap();
    assert_eq!(ws.time_zone, "UTC");
    assert_eq!(store.count_root_keys().await.unwrap(), 1);
    let (k, _) = store.find_key_by_hash(&sha2_shim::digest("root-secret")).await.unwrap().unwrap();
    assert_eq!(k.scope, Scope::Root);
    assert!(store.find_key_by_hash(&sha2_shim::digest("other")).await.unwrap().is_none());
}

async fn workspaces_unique_and_paged(store: Store) {
    for n in ["b", "a", "c"] {
        store.create_workspace(n, "Asia/Tokyo", &audit("workspace.create")).await.unwrap();
    }
    assert!(matches!(store.create_workspace("a", "UTC", &audit("workspace.create")).await, Err(StoreError::Conflict(_))));
    let p1 = store.list_workspaces(None, 2).await.unwrap();
    assert_eq!(p1.data.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    let p2 = store.list_workspaces(p1.next_cursor.as_deref(), 2).await.unwrap();
    assert_eq!(p2.data.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["c"]);
    assert!(p2.next_cursor.is_none());
    assert!(matches!(store.get_workspace("zz").await, Err(StoreError::NotFound)));
    assert_eq!(store.get_workspace("b").await.unwrap().time_zone, "Asia/Tokyo");
}

async fn keys_lifecycle(store: Store) {
    store.create_workspace("w1", "UTC", &audit("workspace.create")).await.unwrap();
    store.create_workspace("w2", "UTC", &audit("workspace.create")).await.unwrap();
    store.create_key(&key("key_1", "w1", Scope::Ingest, "s1"), &audit("key.create")).await.unwrap();
    store.create_key(&key("key_2", "w1", Scope::Read, "s2"), &audit("key.create")).await.unwrap();
    store.create_key(&key("key_3", "w2", Scope::Admin, "s3"), &audit("key.create")).await.unwrap();
    assert!(matches!(store.create_key(&key("key_4", "nope", Scope::Admin, "s4"), &audit("key.create")).await, Err(StoreError::NotFound)));
    assert!(matches!(store.create_key(&key("key_5", "w1", Scope::Admin, "s1"), &audit("key.create")).await, Err(StoreError::Conflict(_))));
    let w1 = store.list_keys(Some("w1"), None, 10).await.unwrap();
    assert_eq!(w1.data.len(), 2);
    assert!(w1.data.iter().all(|k| k.workspace == "w1"));
    let all = store.list_keys(None, None, 2).await.unwrap();
    assert_eq!(all.data.len(), 2);
    let rest = store.list_keys(None, all.next_cursor.as_deref(), 2).await.unwrap();
    assert_eq!(rest.data.len(), 1);
    store.revoke_key("key_1", &audit("key.revoke")).await.unwrap();
    assert!(store.find_key_by_hash(&sha2_shim::digest("s1")).await.unwrap().is_none());
    assert!(matches!(store.revoke_key("key_1", &audit("key.revoke")).await, Err(StoreError::NotFound)));
    assert!(matches!(store.get_key("key_1").await, Err(StoreError::NotFound)));
    assert_eq!(store.get_key("key_2").await.unwrap().scope, Scope::Read);
    assert_eq!(store.list_keys(Some("w1"), None, 10).await.unwrap().data.len(), 1);
}

async fn log_effects_and_progress(store: Store) {
    assert!(store.log_progress().await.unwrap().is_empty());
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let traits = |v: &str| serde_json::json!({"plan": v}).as_object().unwrap().clone();
    let upsert =
        |v: &str, at| sluice_core::RecordEffect::UpsertCustomer { workspace: "a".into(), customer_id: "c1".into(), attributes: traits(v), at };
    store.apply_log_effects(&[upsert("pro", at)], &[(0, 2), (1, 1)]).await.unwrap();
    assert_eq!(store.log_progress().await.unwrap(), vec![(0, 2), (1, 1)]);
    // Applying the same effects again (a rebuild after a crash) changes
    // nothing; an older effect does not win over a newer one.
    store.apply_log_effects(&[upsert("pro", at)], &[(0, 3)]).await.unwrap();
    store.apply_log_effects(&[upsert("free", at - chrono::Duration::days(1))], &[]).await.unwrap();
    let c = store.get_customer("a", "c1").await.unwrap().unwrap();
    assert_eq!(c.attributes["plan"], "pro");
    assert_eq!(store.log_progress().await.unwrap(), vec![(0, 3), (1, 1)]);
}

async fn migrations_are_idempotent_on_reconnect(store: Store) {
    store.create_workspace("x", "UTC", &audit("workspace.create")).await.unwrap();
    // Connecting again runs the migrator again; it must find nothing to do.
    let url = match &store {
        Store::Sqlite(pool) => format!("sqlite://{}", pool.connect_options().get_filename().display()),
        Store::Postgres(pool) => {
            let o = pool.connect_options();
            format!("postgres://{}@{}:{}/{}", o.get_username(), o.get_host(), o.get_port(), o.get_database().unwrap_or(""))
        }
    };
    let again = Store::connect(&url).await.unwrap();
    assert_eq!(again.get_workspace("x").await.unwrap().name, "x");
    again.close().await;
}

/// A usage delta of `value` at `at` (seconds) in bucket `i` of customer `c`.
fn delta(c: &str, i: i64, value: &str, at: i64) -> sluice_store::UsageDelta {
    let v: rust_decimal::Decimal = value.parse().unwrap();
    sluice_store::UsageDelta {
        workspace: "w".into(),
        meter: "gb".into(),
        customer_id: c.into(),
        subscription_id: "s".into(),
        group_key: "".into(),
        bucket_start: i * 900_000_000,
        count: 1,
        sum: v,
        min: Some(v),
        max: Some(v),
        latest_at: Some(at * 1_000_000),
        latest_value: Some(v),
        unique: None,
    }
}

async fn usage_commits_merge_into_stored_buckets(store: Store) {
    // More buckets than one statement reads or writes (4,096 per chunk,
    // and on SQLite 256 rows per statement with a remainder of odd size).
    let n = 4_419;
    let commit = |usage| sluice_store::ConsumerCommit { consumer: "meters".into(), usage, ..Default::default() };
    store.commit_consumer(&commit((0..n).map(|i| delta(&format!("c{}", i % 7), i, "0.1", 10)).collect())).await.unwrap();
    // Again, plus three new buckets: stored aggregates merge with the new ones.
    let mut again: Vec<_> = (0..n).map(|i| delta(&format!("c{}", i % 7), i, if i % 2 == 0 { "0.2" } else { "0.05" }, 20)).collect();
    again.extend((n..n + 3).map(|i| delta("new", i, "7", 5)));
    store.commit_consumer(&commit(again)).await.unwrap();

    let buckets = store.usage_buckets("w", "gb", None, None, None, None).await.unwrap();
    assert_eq!(buckets.len(), n as usize + 3);
    let total: rust_decimal::Decimal = buckets.iter().map(|b| b.sum).sum();
    assert_eq!(
        total,
        "0.1".parse::<rust_decimal::Decimal>().unwrap() * rust_decimal::Decimal::from(n)
            + "0.2".parse::<rust_decimal::Decimal>().unwrap() * rust_decimal::Decimal::from(2210)
            + "0.05".parse::<rust_decimal::Decimal>().unwrap() * rust_decimal::Decimal::from(2209)
            + rust_decimal::Decimal::from(21)
    );
    let at = |c: &str, i: i64| buckets.iter().find(|b| b.customer_id == c && b.bucket_start.timestamp_micros() == i * 900_000_000).unwrap();
    let b = at("c3", 10);
    assert_eq!((b.count, b.sum.to_string(), b.min.unwrap().to_string(), b.max.unwrap().to_string()), (2, "0.3".into(), "0.1".into(), "0.2".into()));
    assert_eq!((b.latest_at.unwrap().timestamp(), b.latest_value.unwrap().to_string()), (20, "0.2".into()));
    let b = at("c4", 11);
    assert_eq!((b.count, b.sum.to_string(), b.min.unwrap().to_string(), b.max.unwrap().to_string()), (2, "0.15".into(), "0.05".into(), "0.1".into()));
    let b = at("new", n + 1);
    assert_eq!((b.count, b.sum.to_string(), b.latest_value.unwrap().to_string()), (1, "7".into(), "7".into()));
    // Another customer's filter reads only theirs.
    let c6 = store.usage_buckets("w", "gb", Some("c6"), None, None, None).await.unwrap();
    assert_eq!(c6.len(), (0..n).filter(|i| i % 7 == 6).count());
}

async fn count_commits_add_to_stored_counts(store: Store) {
    // More keys than one statement writes (on SQLite 256 rows a statement,
    // then a remainder of odd size), a key repeated within a commit, and a
    // second commit that adds to stored counts and creates new ones.
    let key = |c: usize, day: usize| sluice_store::CountKey {
        workspace: "w".into(),
        event_type: "t".into(),
        customer_id: format!("c{c}"),
        day: format!("2026-01-{:02}", day % 28 + 1),
    };
    let n = 701;
    let commit = |counts| sluice_store::ConsumerCommit { consumer: "event_counts".into(), counts, ..Default::default() };
    let mut first: Vec<_> = (0..n).map(|i| (key(i, i / 100), 2)).collect();
    first.push((key(0, 0), 5));
    store.commit_consumer(&commit(first)).await.unwrap();
    store.commit_consumer(&commit((0..n + 9).map(|i| (key(i, i / 100), 1)).collect())).await.unwrap();

    let rows = store.event_counts("w", None, None).await.unwrap();
    assert_eq!(rows.len(), n + 9);
    assert_eq!(rows.iter().map(|r| r.3).sum::<i64>(), 2 * n as i64 + 5 + (n + 9) as i64);
    let count = |c: &str| rows.iter().find(|r| r.1 == c).unwrap().3;
    assert_eq!((count("c0"), count("c1"), count("c705")), (8, 3, 1));
}

/// Issue 11: a value the validator accepted but PostgreSQL could not store
/// (a NUL in a customer id) stopped ingest for every workspace. Property
/// test: random ids and trait keys drawn from a wide mix of characters;
/// every one that `check_storable` accepts (control characters included)
/// round-trips through the store exactly (records, usage buckets, counts),
/// and every refused one holds a NUL.
async fn every_id_the_validator_accepts_round_trips_and_nul_is_refused(store: Store) {
    use rand::{Rng, SeedableRng};
    let pool: Vec<char> = "aZ09 -_.:/@+'\"\\%&<>{}[]~`|;,=?!#$^*()\u{0}\u{0}\u{0}\u{1}\u{9}\u{a}\u{d}\u{1b}\u{7f}\u{85}\u{9f}\u{a0}\u{ad}\u{e9}\u{df}\u{300}\u{5d0}\u{627}\u{200b}\u{200d}\u{2028}\u{202e}\u{3000}株式会社日本\u{ff21}\u{fe0f}\u{fffd}\u{fffe}\u{ffff}\u{1f600}\u{1f468}\u{10ffff}"
        .chars()
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..300 {
        let len = rng.random_range(1..=24);
        let s: String = (0..len).map(|_| pool[rng.random_range(0..pool.len())]).collect();
        match sluice_core::check_storable(&s) {
            Err(_) => {
                assert!(s.contains('\0'), "refused without a NUL: {s:?}");
                refused += 1;
                continue;
            }
            Ok(()) => accepted += 1,
        }
        let ws = format!("w{i}");
        let traits = serde_json::json!({ s.clone(): s.clone() }).as_object().unwrap().clone();
        let effects = [
            sluice_core::RecordEffect::UpsertCustomer { workspace: ws.clone(), customer_id: s.clone(), attributes: traits.clone(), at },
            sluice_core::RecordEffect::UpsertUser { workspace: ws.clone(), user_id: s.clone(), traits: traits.clone(), at },
            sluice_core::RecordEffect::LinkUser { workspace: ws.clone(), user_id: s.clone(), customer_id: s.clone(), at },
            sluice_core::RecordEffect::Alias { workspace: ws.clone(), previous_id: format!("{s}-prev"), user_id: s.clone(), at },
        ];
        assert!(effects.iter().all(|e| e.is_storable()));
        store.apply_log_effects(&effects, &[]).await.unwrap_or_else(|e| panic!("{s:?}: {e}"));
        let c = store.get_customer(&ws, &s).await.unwrap().unwrap_or_else(|| panic!("customer {s:?} not found"));
        assert_eq!((c.customer_id.as_str(), &c.attributes[&s], &c.users), (s.as_str(), &serde_json::json!(s), &vec![s.clone()]));
        let u = store.get_user(&ws, &s).await.unwrap().unwrap();
        assert_eq!((u.customer_id.as_deref(), &u.aliases), (Some(s.as_str()), &vec![format!("{s}-prev")]));
        let mut d = delta(&s, 1, "1.5", 1);
        d.workspace = ws.as_str().into();
        d.subscription_id = s.as_str().into();
        d.group_key = serde_json::json!({ "g": s.clone() }).to_string().into();
        let count = sluice_store::CountKey { workspace: ws.clone(), event_type: "t".into(), customer_id: s.clone(), day: "2026-01-01".into() };
        store
            .commit_consumer(&sluice_store::ConsumerCommit {
                consumer: "c".into(),
                usage: vec![d.clone()],
                counts: vec![(count, 1)],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
        let b = store.usage_buckets(&ws, "gb", Some(&s), Some(&s), None, None).await.unwrap();
        assert_eq!(b.len(), 1, "{s:?}");
        assert_eq!((b[0].customer_id.as_str(), b[0].subscription_id.as_str(), b[0].group_key.as_str()), (s.as_str(), s.as_str(), &*d.group_key));
        let counts = store.event_counts(&ws, None, None).await.unwrap();
        assert_eq!(counts.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec![s.as_str()]);
    }
    assert!(accepted > 50 && refused > 50, "the draw must exercise both sides: {accepted} accepted, {refused} refused");
    // The finding itself: a NUL is refused with a reason that names it.
    assert!(sluice_core::check_storable("g\u{0}").unwrap_err().0.contains("U+0000"));
}

/// Issue 11: two values of 5e28 in one bucket made the meters worker panic
/// (`Addition overflowed`) and restart forever. A commit whose usage would
/// overflow stored buckets is refused as a whole, permanently, naming each
/// such bucket; nothing of it is written.
async fn usage_overflow_is_refused_whole_and_names_every_bucket(store: Store) {
    let big = "50000000000000000000000000000";
    let commit = |usage, next| sluice_store::ConsumerCommit { consumer: "meters".into(), usage, checkpoint: Some((0, next)), ..Default::default() };
    store.commit_consumer(&commit(vec![delta("a", 1, big, 1), delta("b", 1, big, 1)], 1)).await.unwrap();
    let e = store.commit_consumer(&commit(vec![delta("a", 1, big, 2), delta("ok", 1, "1", 2), delta("b", 1, big, 2)], 2)).await.unwrap_err();
    assert!(e.is_permanent(), "{e}");
    let StoreError::UsageOverflow(list) = &e else { panic!("{e}") };
    let mut customers: Vec<&str> = list.iter().map(|o| o.bucket.customer_id.as_str()).collect();
    customers.sort();
    assert_eq!(customers, ["a", "b"]);
    assert!(e.to_string().contains(big), "{e}");
    // Nothing of the refused commit: no new bucket, sums and checkpoint as before.
    let buckets = store.usage_buckets("w", "gb", None, None, None, None).await.unwrap();
    assert_eq!(buckets.len(), 2);
    assert!(buckets.iter().all(|b| b.sum.to_string() == big && b.count == 1));
    assert_eq!(store.checkpoints("meters").await.unwrap().get(&0), Some(&1));
    // In one commit, two deltas of one bucket that overflow together are refused too.
    assert!(store.commit_consumer(&commit(vec![delta("c", 1, big, 1), delta("c", 1, big, 2)], 3)).await.unwrap_err().is_permanent());
}

async fn bulk_cancel_and_retry_change_the_selection_of_one_workspace(store: Store) {
    use sluice_core::JobState;
    use sluice_store::JobSelection;
    use std::time::Duration;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(store.enqueue_job(&job("k", n)).await.unwrap().id);
    }
    let other = store.enqueue_job(&sluice_store::NewJob { workspace: "w2".into(), ..job("k", 9) }).await.unwrap().id;
    let running = store.claim_jobs("k", 1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(running[0].id, ids[0]);
    let queued = JobSelection::Filter { kind: Some("k".into()), state: Some(JobState::Queued) };
    let all = JobSelection::Filter { kind: Some("k".into()), state: None };
    assert_eq!(store.count_bulk_jobs("w1", &queued, true).await.unwrap(), 3);
    assert_eq!(store.count_bulk_jobs("w1", &all, true).await.unwrap(), 4);
    assert_eq!(store.count_bulk_jobs("w1", &all, false).await.unwrap(), 0);
    // By ids: another workspace's job and an unknown id are skipped.
    let sel = JobSelection::Ids(vec![ids[1].clone(), other.clone(), "job_nope".into()]);
    assert_eq!(store.count_bulk_jobs("w1", &sel, true).await.unwrap(), 1);
    let done = store.cancel_jobs("w1", &sel, &audit("job.cancel_bulk")).await.unwrap();
    assert_eq!(done.changed, vec![ids[1].clone()]);
    assert_eq!(done.skipped, vec![(other.clone(), "not found".to_owned()), ("job_nope".to_owned(), "not found".to_owned())]);
    // By filter: queued ones at once, the running one by request.
    let mut done = store.cancel_jobs("w1", &all, &audit("job.cancel_bulk")).await.unwrap();
    done.changed.sort();
    assert_eq!(done.changed, ids[..].iter().filter(|id| **id != ids[1]).cloned().collect::<Vec<_>>());
    assert!(done.skipped.is_empty());
    let run = store.get_job(Some("w1"), &ids[0]).await.unwrap();
    assert_eq!((run.state, run.cancel_requested), (JobState::Running, true));
    assert_eq!(store.get_job(Some("w1"), &ids[3]).await.unwrap().state, JobState::Cancelled);
    assert_eq!(store.get_job(None, &other).await.unwrap().state, JobState::Queued, "w2 untouched");
    // Retry: the cancelled ones; the running one is skipped with its state.
    let sel = JobSelection::Ids(ids.clone());
    let done = store.retry_jobs("w1", &sel, &audit("job.retry_bulk")).await.unwrap();
    assert_eq!(done.changed.len(), 3);
    assert_eq!(done.skipped, vec![(ids[0].clone(), "job is running; only failed or cancelled jobs can be retried".to_owned())]);
    let again = store.get_job(Some("w1"), &ids[3]).await.unwrap();
    assert_eq!((again.state, again.attempts, again.finished_at), (JobState::Queued, 0, None));
    // One audit entry per call that changed something, with its count.
    let log = store.list_audit("w1", None, 100).await.unwrap().data;
    let counts: Vec<(String, serde_json::Value)> = log.iter().map(|e| (e.action.clone(), e.details["count"].clone())).collect();
    assert_eq!(counts, [("job.cancel_bulk", 1), ("job.cancel_bulk", 3), ("job.retry_bulk", 3)].map(|(a, n)| (a.to_owned(), serde_json::json!(n))));
}

async fn bulk_dead_letters_walk_the_matching_entries_once_in_chunks(store: Store) {
    use sluice_store::{ConsumerCommit, DeadLetterAction, DeadLetterFilter, NewDeadLetter};
    let now = chrono::Utc::now();
    let dl = |ws: &str, i: u64, error: &str| NewDeadLetter {
        consumer: "c".into(),
        workspace: ws.into(),
        event_id: format!("e{i}"),
        event_type: if i.is_multiple_of(2) { "even".into() } else { "odd".into() },
        partition: 0,
        offset: i,
        error: error.into(),
        attempts: 1,
        first_failed_at: now,
        last_failed_at: now,
    };
    let mut dead_letters: Vec<NewDeadLetter> = (0..7).map(|i| dl("w1", i, if i < 5 { "HTTP 500_x" } else { "timeout" })).collect();
    dead_letters.push(dl("w2", 100, "HTTP 500_x"));
    store.commit_consumer(&ConsumerCommit { consumer: "c".into(), dead_letters, ..Default::default() }).await.unwrap();
    let f = |error: Option<&str>, event_type: Option<&str>| DeadLetterFilter {
        error_contains: error.map(str::to_owned),
        event_type: event_type.map(str::to_owned),
        ..Default::default()
    };
    assert_eq!(store.count_dead_letters("w1", &f(None, None)).await.unwrap(), 7);
    // `_` and `%` are literal text, case does not matter.
    assert_eq!(store.count_dead_letters("w1", &f(Some("http 500_"), None)).await.unwrap(), 5);
    assert_eq!(store.count_dead_letters("w1", &f(Some("500%"), None)).await.unwrap(), 0);
    assert_eq!(store.count_dead_letters("w1", &f(Some("500_x"), Some("even"))).await.unwrap(), 3);
    let listed = store
        .list_dead_letters_where(
            "w1",
            &f(Some("500_x"), Some("even")),
            Some(sluice_store::DeadLetterStatus::Dead),
            sluice_core::SortOrder::Desc,
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(listed.data.iter().map(|d| d.event_id.as_str()).collect::<Vec<_>>(), ["e4", "e2", "e0"]);
    // Ids of another workspace match nothing.
    let w2 = store.list_dead_letters("w2", None, None, None, 10).await.unwrap().data;
    let theirs = DeadLetterFilter { ids: Some(vec![w2[0].id.clone()]), ..Default::default() };
    assert_eq!(store.count_dead_letters("w1", &theirs).await.unwrap(), 0);
    assert!(store.bulk_dead_letters("w1", DeadLetterAction::Discard, &theirs, "", 10, None).await.unwrap().is_empty());
    // Chunks of 2 after a cursor, oldest first; the audit entry once.
    let sel = f(Some("500"), None);
    let (mut after, mut seen) = (String::new(), Vec::new());
    let a = audit("dlq.replay_bulk");
    loop {
        let chunk = store.bulk_dead_letters("w1", DeadLetterAction::Replay, &sel, &after, 2, seen.is_empty().then_some(&a)).await.unwrap();
        assert!(chunk.len() <= 2);
        seen.extend(chunk.iter().cloned());
        match chunk.iter().max() {
            Some(last) if chunk.len() == 2 => after.clone_from(last),
            _ => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let replaying = store.list_dead_letters("w1", None, Some(sluice_store::DeadLetterStatus::Replaying), None, 10).await.unwrap().data;
    assert_eq!(replaying.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), seen);
    assert_eq!(store.count_dead_letters("w1", &sel).await.unwrap(), 0, "only `dead` entries match");
    assert_eq!(store.count_dead_letters("w2", &f(None, None)).await.unwrap(), 1);
    let log = store.list_audit("w1", None, 10).await.unwrap().data;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].details["count"], 2);
    // Discard the rest by ids.
    let rest = DeadLetterFilter {
        ids: Some(
            store
                .list_dead_letters("w1", None, Some(sluice_store::DeadLetterStatus::Dead), None, 10)
                .await
                .unwrap()
                .data
                .into_iter()
                .map(|d| d.id)
                .collect(),
        ),
        ..Default::default()
    };
    assert_eq!(store.bulk_dead_letters("w1", DeadLetterAction::Discard, &rest, "", 500, None).await.unwrap().len(), 2);
    assert_eq!(store.list_dead_letters("w1", None, Some(sluice_store::DeadLetterStatus::Discarded), None, 10).await.unwrap().data.len(), 2);
}

struct Mark(Vec<(&'static str, &'static str)>, i64);

impl sluice_store::TxWork for Mark {
    fn run<'a>(&'a self, tx: sluice_store::Tx<'a>) -> sluice_store::TxFuture<'a> {
        Box::pin(sluice_store::health::mark_health_dirty(tx, &self.0, self.1))
    }
}

/// A customer with steady traffic keeps its place in the evaluator's queue
/// (it used to go to the back with every event and, under load, wait
/// forever); clearing what an evaluation read leaves a newer mark.
async fn health_marks_keep_their_place_and_only_evaluated_marks_clear(store: Store) {
    store.write_tx(&Mark(vec![("w1", "a")], 1)).await.unwrap();
    store.write_tx(&Mark(vec![("w1", "b"), ("w2", "a")], 2)).await.unwrap();
    store.write_tx(&Mark(vec![("w1", "a"), ("w1", "c")], 3)).await.unwrap();
    let all = store.health_dirty(10).await.unwrap();
    assert_eq!(all[0], ("w1".to_owned(), "a".to_owned(), 3), "first marked first, with its newest mark: {all:?}");
    let mut rest: Vec<_> = all[1..3].to_vec();
    rest.sort();
    assert_eq!(rest, vec![("w1".to_owned(), "b".to_owned(), 2), ("w2".to_owned(), "a".to_owned(), 2)]);
    assert_eq!(all[3], ("w1".to_owned(), "c".to_owned(), 3));
    assert_eq!(store.health_dirty(1).await.unwrap(), vec![("w1".to_owned(), "a".to_owned(), 3)]);
    // An evaluation read b at 2 and a at 3; meanwhile b was marked again.
    let read = vec![("w1".to_owned(), "a".to_owned(), 3), ("w1".to_owned(), "b".to_owned(), 2)];
    store.write_tx(&Mark(vec![("w1", "b")], 4)).await.unwrap();
    store.clear_health_dirty(&read).await.unwrap();
    let left = store.health_dirty(10).await.unwrap();
    assert_eq!(left.len(), 3, "{left:?}");
    assert_eq!(left[2], ("w1".to_owned(), "c".to_owned(), 3), "b keeps its place (since 2), ahead of c: {left:?}");
    let mut first: Vec<_> = left[..2].to_vec();
    first.sort();
    assert_eq!(first, vec![("w1".to_owned(), "b".to_owned(), 4), ("w2".to_owned(), "a".to_owned(), 2)], "b keeps its new mark");
    // Many marks in one commit and one clear (more than a statement holds).
    let many: Vec<(&'static str, &'static str)> = (0..1200).map(|i| ("w3", &*Box::leak(format!("c{i}").into_boxed_str()))).collect();
    store.write_tx(&Mark(many, 5)).await.unwrap();
    let marks = store.health_dirty(5000).await.unwrap();
    assert_eq!(marks.len(), 1203);
    store.clear_health_dirty(&marks).await.unwrap();
    assert!(store.health_dirty(10).await.unwrap().is_empty());
}

/// What an evaluation reads of attributes (on SQLite packed as JSON, one row
/// per 500 customers): every patch exactly as written (quotes, non-ASCII,
/// nesting, large numbers), in (customer, time, reference) order whatever
/// order they were written in, up to `until`, across more customers than
/// one list holds.
async fn attribute_changes_come_back_whole_in_time_and_reference_order(store: Store) {
    use chrono::{TimeZone, Utc};
    let t = |s: i64| Utc.timestamp_opt(1_790_000_000 + s, 0).unwrap();
    let odd = serde_json::json!({"owner": "O'Brien \"the\" 担当者 ✓", "mrr": 12_345_678_901_234_i64, "nested": {"a": [1, null, "x"]}, "gone": null});
    let ids: Vec<String> = (0..600).map(|i| format!("c{i:03}")).collect();
    for id in ids.iter().rev() {
        // Later first, and two references at one time written b before a.
        store.add_attribute_change("w", id, t(20), "b", &serde_json::json!({"plan": "pro"}), None).await.unwrap();
        store.add_attribute_change("w", id, t(20), "a", &odd, Some("key_1")).await.unwrap();
        store.add_attribute_change("w", id, t(10), "z", &serde_json::json!({"plan": "trial"}), None).await.unwrap();
        store.add_attribute_change("w", id, t(30), "a", &serde_json::json!({"plan": "late"}), None).await.unwrap();
    }
    store.add_attribute_change("other", "c000", t(10), "a", &serde_json::json!({"plan": "elsewhere"}), None).await.unwrap();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let got = store.attribute_changes_of("w", &refs, Some(t(20))).await.unwrap();
    let want: Vec<(String, chrono::DateTime<Utc>, serde_json::Value)> = ids
        .iter()
        .flat_map(|id| {
            [
                (id.clone(), t(10), serde_json::json!({"plan": "trial"})),
                (id.clone(), t(20), odd.clone()),
                (id.clone(), t(20), serde_json::json!({"plan": "pro"})),
            ]
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    assert_eq!(store.attribute_changes_of("w", &["c001"], None).await.unwrap().len(), 4, "every change without a bound");
}

/// The batch reads of a health evaluation's previous state (packed into
/// JSON on SQLite): the latest history row of each of 600 customers (more
/// than one list holds) comes back exactly — scores as the engine makes
/// them (decimals of up to 4 places, 0–100, as `f64`), text with quotes and
/// non-ASCII, JSON —, and the live rows without the explanation, score and
/// priority, the rest exactly.
async fn latest_history_rows_come_back_exactly(store: Store) {
    use chrono::{TimeZone, Utc};
    use sluice_store::{CustomerHealthRow, HealthHistoryRow};
    let t = |s: i64| Utc.timestamp_opt(1_790_000_000 + s, 123_456_000).unwrap();
    let ids: Vec<String> = (0..600).map(|i| format!("c{i:03}")).collect();
    // k / 10^4 as rust_decimal's `to_f64` makes it (one correctly rounded
    // division), k spread over 0..=1_000_000 (0.0000 … 100.0000).
    let score = |i: usize| ((i * 1667 + 1) % 1_000_001) as f64 / 10_000.0;
    let history = |i: usize, id: &str, at: i64, s: Option<f64>| HealthHistoryRow {
        id: format!("hh_{}_{id}_{at:04}", ids[i]),
        customer_id: ids[i].clone(),
        at: t(at),
        config_version: at,
        stage: Some(format!("stage \"{i}\" 更新")),
        stage_since: i.is_multiple_of(2).then(|| t(at - 5)),
        band: Some("bad".into()),
        score: s,
        previous: serde_json::json!({"stage": "trial", "band": null, "score": 12.5}),
        cause: format!("O'Brien's event {i}"),
    };
    let mut rows = Vec::new();
    let mut older = Vec::new();
    let mut newer = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        rows.push(CustomerHealthRow {
            customer_id: id.clone(),
            config_version: 7,
            stage: (!i.is_multiple_of(3)).then(|| "adoption".to_owned()),
            stage_since: Some(t(1)),
            score: Some(score(i)),
            band: Some("good".into()),
            priority: Some(score(i) * 1.000_000_000_1),
            doc: serde_json::value::to_raw_value(&serde_json::json!({"customer_id": id, "measures": [1, 2, 3]})).unwrap(),
            evaluated_at: t(2),
            next_eval_at: t(3 + i as i64),
            emitted: serde_json::json!({"stage": {"value": "adoption", "at": 1_790_000_000_123_456_i64}, "version": 7}),
            history_score: (!i.is_multiple_of(7)).then(|| score(i)),
        });
        older.push(history(i, "a", 10, Some(1.0)));
        newer.push(history(i, "b", 20, (!i.is_multiple_of(7)).then(|| score(i))));
    }
    store.save_customer_health_many("w", &rows, &older, &[]).await.unwrap();
    store.save_customer_health_many("w", &[], &newer, &[]).await.unwrap();
    store.save_customer_health_many("other", &rows[..1], &[history(0, "z", 99, Some(3.0))], &[]).await.unwrap();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();

    let mut got = store.latest_history_of("w", &refs).await.unwrap();
    got.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    assert_eq!(got.len(), 600);
    for (g, w) in got.iter().zip(&newer) {
        assert_eq!((&g.id, &g.customer_id, g.at, g.config_version), (&w.id, &w.customer_id, w.at, w.config_version));
        assert_eq!((&g.stage, g.stage_since, &g.band, &g.previous, &g.cause), (&w.stage, w.stage_since, &w.band, &w.previous, &w.cause));
        // Bit for bit, not within a tolerance.
        assert_eq!(g.score.map(f64::to_bits), w.score.map(f64::to_bits), "score of {}", w.customer_id);
    }

    let mut state = store.customers_health_state("w", &refs).await.unwrap();
    state.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    assert_eq!(state.len(), 600);
    for (g, w) in state.iter().zip(&rows) {
        assert_eq!((&g.customer_id, g.config_version, &g.stage, g.stage_since), (&w.customer_id, w.config_version, &w.stage, w.stage_since));
        assert_eq!((&g.band, g.evaluated_at, g.next_eval_at, &g.emitted), (&w.band, w.evaluated_at, w.next_eval_at, &w.emitted));
        assert_eq!((g.doc.get(), g.score, g.priority), ("null", None, None), "left out of the state read");
        // What an evaluation compares with its latest history: bit for bit.
        assert_eq!(g.history_score.map(f64::to_bits), w.history_score.map(f64::to_bits), "history score of {}", w.customer_id);
    }
    // The full rows keep the priority exactly (not packed).
    let full = store.customers_health("w", &refs[..3]).await.unwrap();
    for g in full {
        let w = rows.iter().find(|r| r.customer_id == g.customer_id).unwrap();
        assert_eq!((g.priority.map(f64::to_bits), g.doc.get()), (w.priority.map(f64::to_bits), w.doc.get()));
    }

    // Saved again twice, the indexed columns (priority, next evaluation)
    // moving in some rows only, to and from none: every row reads back as
    // saved the last time, the due customers and the priority order follow
    // the new values, the other workspace's row is untouched.
    let mut last = rows.clone();
    for round in 0..2 {
        for (i, r) in last.iter_mut().enumerate() {
            r.config_version = 8 + round;
            r.doc = serde_json::value::to_raw_value(&serde_json::json!({"customer_id": r.customer_id, "round": round})).unwrap();
            match (i % 4, round) {
                (0, _) => r.priority = Some(score(i) * 3.0 + 0.25 + round as f64),
                (1, 0) if i % 8 == 1 => r.priority = None,
                (1, 1) if i % 8 == 1 => r.priority = Some(0.125),
                (2, 1) => r.next_eval_at = t(-(i as i64)),
                _ => {}
            }
        }
        store.save_customer_health_many("w", &last, &[], &[]).await.unwrap();
    }
    let mut full = store.customers_health("w", &refs).await.unwrap();
    full.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    assert_eq!(full.len(), 600);
    for (g, w) in full.iter().zip(&last) {
        assert_eq!((&g.customer_id, g.config_version, g.doc.get()), (&w.customer_id, w.config_version, w.doc.get()));
        assert_eq!((g.priority.map(f64::to_bits), g.next_eval_at), (w.priority.map(f64::to_bits), w.next_eval_at), "{}", w.customer_id);
    }
    let mut due: Vec<String> = store.health_due(t(0), 10_000).await.unwrap().into_iter().map(|(ws, c)| format!("{ws}/{c}")).collect();
    due.sort();
    let mut want: Vec<String> = last.iter().filter(|r| r.next_eval_at <= t(0)).map(|r| format!("w/{}", r.customer_id)).collect();
    want.sort();
    assert_eq!(due.len(), 150, "a quarter of the rows moved into the past");
    assert_eq!(due, want);
    let (listed, _) = store.list_customer_health("w", None, None, sluice_store::HealthSort::Priority, None, 1000).await.unwrap();
    let mut by_priority: Vec<&CustomerHealthRow> = last.iter().collect();
    by_priority.sort_by(|a, b| b.priority.unwrap_or(-1.0).total_cmp(&a.priority.unwrap_or(-1.0)).then(a.customer_id.cmp(&b.customer_id)));
    assert_eq!(
        listed.iter().map(|r| r.customer_id.as_str()).collect::<Vec<_>>(),
        by_priority.iter().map(|r| r.customer_id.as_str()).collect::<Vec<_>>()
    );
    let other = store.customer_health("other", &rows[0].customer_id).await.unwrap().unwrap();
    assert_eq!((other.config_version, other.priority.map(f64::to_bits)), (7, rows[0].priority.map(f64::to_bits)));
}

/// `GET /v1/customers` by health: every order (priority, score, -score, id)
/// with every combination of the stage and band filters, paged with the
/// position each page returns (through its text form, as the API's cursor
/// carries it), gives the rows a plain sort of the same rows gives: NULL
/// priorities and scores last, ties by id, no row twice or missing, no row
/// of another workspace.
async fn customer_lists_page_through_every_order_and_filter(store: Store) {
    use chrono::{TimeZone, Utc};
    use sluice_store::{CustomerHealthRow, HealthSort};
    use std::cmp::Ordering;
    let t = Utc.timestamp_opt(1_790_000_000, 0).unwrap();
    let stages = [Some("trial"), Some("adoption"), Some("renewal"), None];
    let bands = [Some("good"), Some("normal"), Some("bad")];
    // Few distinct values, so that ties cross page boundaries; a priority
    // of 0 and -0 sorts as one value.
    let rows: Vec<CustomerHealthRow> = (0..300)
        .map(|i: usize| CustomerHealthRow {
            customer_id: format!("c{:04}", (i * 37) % 300),
            config_version: 1,
            stage: stages[i % 4].map(str::to_owned),
            stage_since: None,
            score: (i % 11 != 3).then_some((i % 5) as f64 * 12.5),
            band: bands[i % 3].map(str::to_owned),
            priority: (i % 13 != 5).then(|| if i.is_multiple_of(9) { 0.0 } else { (i % 6) as f64 * 0.75 }),
            doc: serde_json::value::to_raw_value(&serde_json::json!({"i": i})).unwrap(),
            evaluated_at: t,
            next_eval_at: t,
            emitted: serde_json::json!({}),
            history_score: None,
        })
        .collect();
    store.save_customer_health_many("w", &rows, &[], &[]).await.unwrap();
    store.save_customer_health_many("other", &rows[..50], &[], &[]).await.unwrap();

    // NULL last in each order, then by id.
    let last = |v: Option<f64>, desc: bool| match v {
        Some(v) => (0, if desc { -v } else { v }),
        None => (1, 0.0),
    };
    let key = |r: &CustomerHealthRow, sort: HealthSort| match sort {
        HealthSort::Priority => last(r.priority, true),
        HealthSort::Score => last(r.score, false),
        HealthSort::ScoreDesc => last(r.score, true),
        HealthSort::Id => (0, 0.0),
    };
    for sort in [HealthSort::Priority, HealthSort::Score, HealthSort::ScoreDesc, HealthSort::Id] {
        for stage in [None, Some("adoption")] {
            for band in [None, Some("bad")] {
                let mut want: Vec<&CustomerHealthRow> = rows
                    .iter()
                    .filter(|r| stage.is_none_or(|s| r.stage.as_deref() == Some(s)) && band.is_none_or(|b| r.band.as_deref() == Some(b)))
                    .collect();
                want.sort_by(|a, b| {
                    let (ka, kb) = (key(a, sort), key(b, sort));
                    ka.0.cmp(&kb.0).then(ka.1.partial_cmp(&kb.1).unwrap_or(Ordering::Equal)).then(a.customer_id.cmp(&b.customer_id))
                });
                let want: Vec<&str> = want.iter().map(|r| r.customer_id.as_str()).collect();
                for page in [7, 1000] {
                    let mut got: Vec<String> = Vec::new();
                    let mut after = None;
                    loop {
                        let (rows, next) = store.list_customer_health("w", stage, band, sort, after, page).await.unwrap();
                        assert!(rows.len() <= page);
                        got.extend(rows.into_iter().map(|r| r.customer_id));
                        let Some((v, id)) = next else { break };
                        let v: f64 = v.to_string().parse().unwrap();
                        after = Some((v, id));
                        assert!(got.len() <= want.len(), "{sort:?} {stage:?} {band:?} {page}: more rows than there are");
                    }
                    assert_eq!(got, want, "{sort:?}, stage {stage:?}, band {band:?}, pages of {page}");
                }
            }
        }
    }
}

/// The user of the `i`th row of [`HealthEvents`] (none for every fifth).
fn health_user(i: usize) -> Option<String> {
    (i % 5 != 4).then(|| format!("u{}", i % 3))
}

/// The properties of the `i`th row of [`HealthEvents`] (JSON text with
/// quotes and non-ASCII for every fourth, none for the others).
fn health_props(i: usize) -> Option<String> {
    i.is_multiple_of(4).then(|| serde_json::json!({"plan": format!("プラン \"{i}\""), "n": i}).to_string())
}

/// Events as the health read model keeps them: (workspace, customer, type, time).
struct HealthEvents(Vec<(String, String, &'static str, i64)>);

impl sluice_store::TxWork for HealthEvents {
    fn run<'a>(&'a self, tx: sluice_store::Tx<'a>) -> sluice_store::TxFuture<'a> {
        Box::pin(async move {
            sluice_store::on_tx!(tx, conn => {
                for (i, (ws, c, t, ts)) in self.0.iter().enumerate() {
                    sqlx::query("INSERT INTO health_events (workspace, customer_id, event_type, ts, event_id, user_id, properties) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7)")
                        .bind(ws).bind(c).bind(*t).bind(*ts).bind(format!("e{i}")).bind(health_user(i)).bind(health_props(i))
                        .execute(&mut *conn).await?;
                }
                Ok::<(), sqlx::Error>(())
            })?;
            Ok(())
        })
    }
}

/// The batch reads of a health evaluation against a plain filter of the
/// same rows: every customer a workspace has (events, attribute changes,
/// live rows; stepped through one seek a customer), each wanted type only
/// from the start of its own window, the last event of a type per
/// customer (one seek each), across more customers than one list holds.
async fn health_batch_reads_step_through_customers_and_read_each_type_over_its_window(store: Store) {
    use chrono::{TimeZone, Utc};
    use sluice_store::EventsWanted;
    const DAY: i64 = 86_400_000_000;
    let t0 = 1_790_000_000_000_000_i64;
    let at = |us: i64| Utc.timestamp_micros(us).unwrap();
    // 600 customers with ids that sort in no simple order ("c10" < "c2"),
    // quotes and non-ASCII; 0–9 events each over 12 days, of types a, b, c.
    let ids: Vec<String> = (0..600).map(|i| if i % 50 == 7 { format!("顧客 \"{i}\"") } else { format!("c{i}") }).collect();
    let mut rows = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for k in 0..(i % 10) {
            let ts = t0 - ((i * 7 + k * 13) % 12) as i64 * DAY - (k as i64) * 1_000;
            rows.push(("w".to_owned(), id.clone(), ["a", "b", "c"][(i + k) % 3], ts));
        }
    }
    rows.push(("other".to_owned(), "elsewhere".to_owned(), "a", t0));
    rows.push(("w".to_owned(), "late".to_owned(), "a", t0 + DAY));
    store.write_tx(&HealthEvents(rows.clone())).await.unwrap();
    store.add_attribute_change("w", "attributes only", at(t0), "r", &serde_json::json!({"plan": "pro"}), None).await.unwrap();
    store.add_attribute_change("other", "not here", at(t0), "r", &serde_json::json!({"plan": "pro"}), None).await.unwrap();

    // Every customer once, in order: those with events (the ones with
    // none among the 600 are not customers health knows), the late one,
    // the one with only attributes.
    let mut want: Vec<String> = rows.iter().filter(|r| r.0 == "w").map(|r| r.1.clone()).collect();
    want.push("attributes only".to_owned());
    want.sort();
    want.dedup();
    assert_eq!(store.health_customer_ids("w").await.unwrap(), want);
    assert!(store.health_customer_ids("nobody").await.unwrap().is_empty());

    // Type a over 2 days, b over 5, c not at all; up to t0.
    let refs: Vec<&str> = ids.iter().map(String::as_str).chain(["late"]).collect();
    let start = |days: u32| at(t0 - i64::from(days) * DAY);
    let wanted = EventsWanted { types: Some(vec![("a", 2), ("b", 5)]), days: 5, user_id: true, properties: false };
    // Runs flattened to events: one run per (customer, type), its users
    // beside its times.
    let flat = |runs: Vec<(String, sluice_store::HealthEventRun)>| -> Vec<(String, String, i64, Option<String>)> {
        let mut keys: Vec<(String, String)> = runs.iter().map(|(c, r)| (c.clone(), r.event_type.clone())).collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "one run per (customer, type)");
        runs.into_iter()
            .flat_map(|(c, r)| {
                assert!(r.user_ids.is_empty() || r.user_ids.len() == r.ts.len(), "a user per event, or none read");
                (0..r.ts.len()).map(move |i| (c.clone(), r.event_type.clone(), r.ts[i], r.user_id(i).map(str::to_owned))).collect::<Vec<_>>()
            })
            .collect()
    };
    let mut got = flat(store.health_events_of("w", &refs, at(t0), &wanted, start).await.unwrap());
    got.sort();
    let window = |t: &str| match t {
        "a" => Some(t0 - 2 * DAY),
        "b" => Some(t0 - 5 * DAY),
        _ => None,
    };
    let mut expected: Vec<(String, String, i64, Option<String>)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 == "w" && r.3 <= t0 && window(r.2).is_some_and(|from| r.3 >= from))
        .map(|(i, r)| (r.1.clone(), r.2.to_owned(), r.3, health_user(i)))
        .collect();
    expected.sort();
    assert!(expected.len() > 300, "the data reaches both windows: {}", expected.len());
    assert!(expected.iter().any(|e| e.3.is_none()), "some events have no user");
    assert_eq!(got, expected, "each event with its own user");
    // Properties, each beside its own event's time.
    let with_props = EventsWanted { types: Some(vec![("a", 12), ("c", 12)]), days: 12, user_id: false, properties: true };
    let mut got: Vec<(String, i64, Option<String>)> = store
        .health_events_of("w", &refs, at(t0), &with_props, start)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|(c, r)| {
            assert!(r.user_ids.is_empty(), "users not read");
            assert_eq!(r.properties.len(), r.ts.len(), "properties per event when read");
            (0..r.ts.len()).map(move |i| (c.clone(), r.ts[i], r.properties(i).map(str::to_owned))).collect::<Vec<_>>()
        })
        .collect();
    got.sort();
    let mut expected: Vec<(String, i64, Option<String>)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 == "w" && r.3 <= t0 && r.3 >= t0 - 12 * DAY && (r.2 == "a" || r.2 == "c"))
        .map(|(i, r)| (r.1.clone(), r.3, health_props(i)))
        .collect();
    expected.sort();
    assert!(expected.iter().filter(|e| e.2.is_some()).count() > 50, "the data has properties");
    assert_eq!(got, expected, "each event with its own properties, exactly");
    // Every type, over the longest window, without users.
    let all = EventsWanted { types: None, days: 3, user_id: false, properties: false };
    let mut got = flat(store.health_events_of("w", &refs, at(t0), &all, start).await.unwrap());
    got.sort();
    let mut expected: Vec<(String, String, i64, Option<String>)> =
        rows.iter().filter(|r| r.0 == "w" && r.3 <= t0 && r.3 >= t0 - 3 * DAY).map(|r| (r.1.clone(), r.2.to_owned(), r.3, None)).collect();
    expected.sort();
    assert_eq!(got, expected, "every type over the longest window, no users read");
    let none = EventsWanted { types: Some(Vec::new()), days: 3, user_id: false, properties: false };
    assert!(store.health_events_of("w", &refs, at(t0), &none, start).await.unwrap().is_empty());

    // The last `b` of each customer at or before t0 - 1 day.
    let to = t0 - DAY;
    let mut got = store.health_last_seen_of_type("w", &refs, "b", at(to)).await.unwrap();
    got.sort();
    let mut last: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.0 == "w" && r.2 == "b" && r.3 <= to) {
        let l = last.entry(r.1.clone()).or_insert(r.3);
        *l = (*l).max(r.3);
    }
    assert!(last.len() > 100 && last.len() < 600, "some customers have no b: {}", last.len());
    assert_eq!(got, last.into_iter().map(|(c, ts)| (c, at(ts))).collect::<Vec<_>>());
}

/// Large health recomputes and billing runs first refresh PostgreSQL's
/// planner statistics, but only of tables that have none yet or changed by
/// more than 50 + 10 % of their rows since (autovacuum's rule); SQLite has
/// nothing to refresh.
async fn planner_statistics_are_refreshed_only_where_missing_or_stale(store: Store) {
    let health = store.analyze_health_tables().await.unwrap();
    let billing = store.analyze_billing_tables().await.unwrap();
    if store.backend() == "sqlite" {
        assert!(health.is_empty() && billing.is_empty());
        return;
    }
    // A fresh database: no table was ever analyzed.
    assert_eq!(health, ["customer_attribute_changes", "customer_health", "health_events", "health_history", "stage_overrides"]);
    assert_eq!(billing, ["invoices", "subscriptions", "usage_buckets", "usage_unique"]);
    assert!(store.analyze_health_tables().await.unwrap().is_empty(), "nothing changed since");
    assert!(store.analyze_billing_tables().await.unwrap().is_empty(), "nothing changed since");

    // 200 events: more than 50 + 10 % of the none counted. PostgreSQL shows
    // a connection's changes in its statistics views once the connection
    // reports them (when idle, within about 10 s): wait for that.
    let rows: Vec<_> = (0..200).map(|i| ("w".to_owned(), format!("c{}", i % 7), "a", 1_790_000_000_000_000_i64 + i)).collect();
    store.write_tx(&HealthEvents(rows)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let analyzed = loop {
        let a = store.analyze_health_tables().await.unwrap();
        if !a.is_empty() || std::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(analyzed, ["health_events"], "only the table that changed");
    assert!(store.analyze_health_tables().await.unwrap().is_empty(), "analyzed: fresh again");
    assert!(store.analyze_billing_tables().await.unwrap().is_empty(), "billing's tables did not change");
}

/// A health evaluation's transition events are written to the outbox in the
/// evaluation's transaction (whole, as JSON), listed oldest first, and gone
/// once deleted; saving the same event again does not duplicate it.
async fn health_transitions_enter_the_outbox_with_their_evaluation_and_leave_once_sent(store: Store) {
    use sluice_store::OutboxRow;
    assert!(store.event_outbox(10).await.unwrap().is_empty());
    let a = OutboxRow::of_event("w", "customer.stage_changed", "customer.stage_changed:c1:1", r#"{"id":"customer.stage_changed:c1:1"}"#.into());
    let b = OutboxRow::of_event(
        "w",
        "customer.health_changed",
        "customer.health_changed:c2:2",
        r#"{"id":"customer.health_changed:c2:2","n":"日本"}"#.into(),
    );
    store.save_customer_health_many("w", &[], &[], std::slice::from_ref(&a)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    store.save_customer_health_many("w", &[], &[], &[b.clone(), a.clone()]).await.unwrap();
    assert_eq!(store.event_outbox(10).await.unwrap(), vec![a.clone(), b.clone()]);
    assert_eq!(store.event_outbox(1).await.unwrap(), vec![a.clone()]);
    store.delete_event_outbox(std::slice::from_ref(&a)).await.unwrap();
    assert_eq!(store.event_outbox(10).await.unwrap(), vec![b.clone()]);
    store.delete_event_outbox(&[b]).await.unwrap();
    assert!(store.event_outbox(10).await.unwrap().is_empty());
}
