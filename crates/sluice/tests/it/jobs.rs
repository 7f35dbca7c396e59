//! Bulk job operations (`POST /v1/jobs/cancel`, `POST /v1/jobs/retry`),
//! end to end, on the state backend of the run.
//!
//! Jobs that stay queued or running as long as a test needs them: a
//! `consumer.reset` job follows its consumer until it has caught up with the
//! log, and a webhook consumer whose target refuses every delivery, with a
//! minute of backoff between attempts, does not catch up. The runner runs
//! four of them at once; the others wait in the queue.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{eventually, Api, Server};

const STUCK: [(&str, &str); 4] =
    [("SLUICE_RETRY_ATTEMPTS", "50"), ("SLUICE_RETRY_BASE_MS", "60000"), ("SLUICE_WEBHOOK_ALLOW_PRIVATE", "1"), ("SLUICE_JOB_LEASE", "1s")];

/// A webhook to a closed port, and one event for it: its consumer is stuck.
async fn stuck_consumer(api: &Api, event: &str) -> String {
    let (st, hook) = api.post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/hook", "event_types": ["*"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{hook}");
    api.ingest(json!({"id": event, "type": "t"})).await;
    hook["consumer"].as_str().unwrap().to_owned()
}

/// A `consumer.reset` job that runs until cancelled.
async fn reset_job(api: &Api, consumer: &str) -> String {
    let (st, v) = api.post(&format!("/v1/consumers/{consumer}/reset"), json!({"to": "earliest"})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["job"].as_str().unwrap().to_owned()
}

/// Ids of the key's jobs of `kind` in `status`, from the list.
async fn listed(api: &Api, query: &str) -> Vec<String> {
    let (st, v) = api.get(&format!("/v1/jobs?limit=1000&{query}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect()
}

async fn status_of(api: &Api, id: &str) -> Value {
    let (st, v) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_cancel_and_retry_of_jobs_by_filter_and_ids_count_first_and_stay_in_their_workspace() {
    let s = Server::start_with(&STUCK).await;
    let a_keys = s.workspace_with_keys("bulk-a").await;
    let b_keys = s.workspace_with_keys("bulk-b").await;
    let (a, b) = (s.api(&a_keys.admin), s.api(&b_keys.admin));
    // Workspace B's job first: it takes one of the four slots.
    let b_consumer = stuck_consumer(&b, "b-1").await;
    let b_job = reset_job(&b, &b_consumer).await;
    eventually("B's job running", 30, || async { status_of(&b, &b_job).await["status"] == "running" }).await;
    let a_consumer = stuck_consumer(&a, "a-1").await;
    let mut a_jobs = Vec::new();
    for _ in 0..6 {
        a_jobs.push(reset_job(&a, &a_consumer).await);
    }
    eventually("three of A's jobs running, three queued", 30, || async {
        listed(&a, "kind=consumer.reset&status=running").await.len() == 3 && listed(&a, "kind=consumer.reset&status=queued").await.len() == 3
    })
    .await;

    // Bad requests change nothing and name the field.
    for (body, field) in [
        (json!({"ids": [a_jobs[0]], "filter": {"kind": "consumer.reset"}}), "ids"),
        (json!({}), "ids"),
        (json!({"ids": []}), "ids"),
        (json!({"ids": (0..1001).map(|i| format!("job_{i}")).collect::<Vec<_>>()}), "ids"),
        (json!({"filter": {"status": "sleeping"}}), "filter.status"),
        (json!({"filter": {"owner": "me"}}), "owner"),
    ] {
        for action in ["cancel", "retry"] {
            let (st, v) = a.post(&format!("/v1/jobs/{action}"), body.clone()).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{action} {body}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().contains(field), "{action} {body}: {v}");
        }
    }
    let read = s.api(&a_keys.read);
    assert_eq!(read.post("/v1/jobs/cancel", json!({"filter": {}})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(read.post("/v1/jobs/retry", json!({"filter": {}, "dry_run": true})).await.0, StatusCode::FORBIDDEN);
    assert_eq!(listed(&a, "kind=consumer.reset&status=queued").await.len(), 3, "nothing changed");

    // Dry runs count what the list shows for the same filter.
    let queued = listed(&a, "kind=consumer.reset&status=queued").await;
    let running = listed(&a, "kind=consumer.reset&status=running").await;
    let dry = |body: Value| {
        let a = a.clone();
        async move {
            let (st, v) = a.post("/v1/jobs/cancel", body).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            v["matching"].as_u64().unwrap() as usize
        }
    };
    assert_eq!(dry(json!({"filter": {"kind": "consumer.reset", "status": "queued"}, "dry_run": true})).await, queued.len());
    assert_eq!(dry(json!({"filter": {"kind": "consumer.reset"}, "dry_run": true})).await, queued.len() + running.len());
    assert_eq!(dry(json!({"filter": {"status": "succeeded"}, "dry_run": true})).await, 0, "only queued or running jobs can be cancelled");
    assert_eq!(dry(json!({"ids": [queued[0], b_job], "dry_run": true})).await, 1, "another workspace's job does not count");
    assert_eq!(listed(&a, "kind=consumer.reset&status=queued").await, queued, "a dry run changes nothing");

    // By ids: A's queued job is cancelled; B's job and an unknown id are
    // skipped as not found; a repeated id counts once.
    let (st, v) = a.post("/v1/jobs/cancel", json!({"ids": [queued[0], b_job, "job_nope", queued[0]]})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["cancelled"], 1, "{v}");
    assert_eq!(v["skipped"], json!([{"id": b_job, "reason": "not found"}, {"id": "job_nope", "reason": "not found"}]));
    assert_eq!(status_of(&a, &queued[0]).await["status"], "cancelled");
    let theirs = status_of(&b, &b_job).await;
    assert_eq!((theirs["status"].as_str(), theirs["cancel_requested"].as_bool()), (Some("running"), Some(false)), "{theirs}");

    // By filter: the queued ones, then every one left (the running ones stop).
    let (st, v) = a.post("/v1/jobs/cancel", json!({"filter": {"kind": "consumer.reset", "status": "queued"}})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"cancelled": queued.len() - 1, "skipped": []}));
    let (_, v) = a.post("/v1/jobs/cancel", json!({"filter": {"kind": "consumer.reset"}})).await;
    assert_eq!(v["cancelled"], running.len(), "{v}");
    eventually("all of A's jobs cancelled", 30, || async { listed(&a, "kind=consumer.reset&status=cancelled").await.len() == 6 }).await;
    assert_eq!(status_of(&b, &b_job).await["status"], "running", "B's job runs on");

    // Retry: one by id, then the rest by filter; a job that is queued again
    // is skipped with its status.
    let (st, v) = a.post("/v1/jobs/retry", json!({"filter": {"status": "cancelled"}, "dry_run": true})).await;
    assert_eq!((st, v["matching"].as_u64()), (StatusCode::OK, Some(6)), "{v}");
    let (_, v) = a.post("/v1/jobs/retry", json!({"ids": [a_jobs[5]]})).await;
    assert_eq!(v, json!({"retried": 1, "skipped": []}));
    let (_, v) = a.post("/v1/jobs/retry", json!({"ids": [a_jobs[5], b_job]})).await;
    assert_eq!(v["retried"], 0, "{v}");
    let reason = v["skipped"][0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("job is queued") || reason.starts_with("job is running"), "{v}");
    assert!(reason.contains("only failed or cancelled jobs can be retried"), "{v}");
    assert_eq!(v["skipped"][1], json!({"id": b_job, "reason": "not found"}));
    let (_, v) = a.post("/v1/jobs/retry", json!({"filter": {"kind": "consumer.reset", "status": "cancelled"}})).await;
    assert_eq!(v, json!({"retried": 5, "skipped": []}));
    eventually("A's jobs queued or running again", 30, || async {
        listed(&a, "kind=consumer.reset&status=running").await.len() + listed(&a, "kind=consumer.reset&status=queued").await.len() == 6
    })
    .await;

    // One audit entry per bulk request that changed something, with what it
    // selected and how many.
    let (_, audit) = a.get("/v1/audit?limit=1000").await;
    let entries: Vec<&Value> = audit["data"].as_array().unwrap().iter().filter(|e| e["action"].as_str().unwrap().ends_with("_bulk")).collect();
    let summary: Vec<(String, u64)> =
        entries.iter().map(|e| (e["action"].as_str().unwrap().to_owned(), e["details"]["count"].as_u64().unwrap())).collect();
    assert_eq!(
        summary,
        [("job.cancel_bulk", 1), ("job.cancel_bulk", 2), ("job.cancel_bulk", 3), ("job.retry_bulk", 1), ("job.retry_bulk", 5)]
            .map(|(a, n)| (a.to_owned(), n))
    );
    assert_eq!(entries[0]["details"]["ids"], json!([queued[0], b_job, "job_nope"]));
    assert_eq!(entries[1]["details"]["filter"], json!({"kind": "consumer.reset", "status": "queued"}));
    assert!(entries.iter().all(|e| e["actor_key_id"].as_str().is_some_and(|k| k.starts_with("key_"))));
    let (_, theirs) = b.get("/v1/audit?limit=1000").await;
    assert!(!theirs["data"].as_array().unwrap().iter().any(|e| e["action"].as_str().unwrap().starts_with("job.")), "{theirs}");
}
