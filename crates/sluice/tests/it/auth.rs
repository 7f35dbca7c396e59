//! Keys, scopes and workspace isolation.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::Server;

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let s = Server::start().await;
    for path in ["/v1/events", "/v1/keys", "/v1/workspaces"] {
        let (st, v) = s.anonymous().get(path).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(v["error"]["code"], "unauthorized");
        let (st, _) = s.api("sk_wrong").get(path).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (st, _) = s.anonymous().post("/v1/events", json!({"type": "t"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = s.api("").post("/v1/events", json!({"type": "t"})).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn scopes_limit_what_a_key_can_do() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("acme").await;
    let (ingest, read, admin) = (s.api(&k.ingest), s.api(&k.read), s.api(&k.admin));
    assert_eq!(ingest.ingest(json!({"id": "e1", "type": "t"})).await, (1, 0));
    // An ingest key cannot read anything.
    for path in ["/v1/events", "/v1/events/e1", "/v1/keys", "/v1/workspaces"] {
        let (st, v) = ingest.get(path).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{path}: {v}");
        assert_eq!(v["error"]["code"], "forbidden");
    }
    // A read key reads but cannot write.
    assert_eq!(read.get("/v1/events/e1").await.0, StatusCode::OK);
    let (st, _) = read.post("/v1/events", json!({"id": "e2", "type": "t"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = read.post("/v1/keys", json!({"name": "x", "scope": "read"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // Admin keys manage keys of their workspace only, and cannot make workspaces.
    let (st, v) = admin.post("/v1/keys", json!({"name": "ci", "scope": "ingest"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["workspace"], "acme");
    assert!(v["secret"].as_str().unwrap().starts_with("sk_"));
    let (st, _) = admin.post("/v1/keys", json!({"name": "x", "scope": "admin", "workspace": "default"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = admin.post("/v1/keys", json!({"name": "x", "scope": "root"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = admin.post("/v1/workspaces", json!({"name": "mine"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = admin.get("/v1/keys").await;
    assert_eq!(st, StatusCode::OK);
    assert!(v["data"].as_array().unwrap().iter().all(|k| k["workspace"] == "acme"));
    assert!(v["data"].as_array().unwrap().iter().all(|k| k.get("secret").is_none()));
    assert_eq!(admin.get("/v1/keys?workspace=default").await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn workspaces_are_isolated() {
    let s = Server::start().await;
    let a = s.workspace_with_keys("alpha").await;
    let b = s.workspace_with_keys("beta").await;
    s.api(&a.ingest).ingest(json!([{"id": "shared-id", "type": "a.only", "customer_id": "c"}, {"id": "a2", "type": "a.only"}])).await;
    s.api(&b.ingest).ingest(json!({"id": "shared-id", "type": "b.only", "customer_id": "c"})).await;
    let a_events = s.api(&a.read).all_events("").await;
    assert_eq!(a_events.len(), 2);
    assert!(a_events.iter().all(|e| e["type"] == "a.only" && e["workspace"] == "alpha"));
    let b_events = s.api(&b.read).all_events("&customer_id=c").await;
    assert_eq!(b_events.len(), 1);
    assert_eq!(b_events[0]["type"], "b.only");
    let (_, e) = s.api(&b.read).get("/v1/events/shared-id").await;
    assert_eq!(e["type"], "b.only");
    assert_eq!(s.api(&b.read).get("/v1/events/a2").await.0, StatusCode::NOT_FOUND);
    // Keys and workspaces of another workspace are invisible.
    let (st, v) = s.api(&b.read).get("/v1/workspaces").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["name"], "beta");
    assert_eq!(s.api(&b.read).get("/v1/workspaces/alpha").await.0, StatusCode::NOT_FOUND);
    let (_, keys_a) = s.api(&a.admin).get("/v1/keys").await;
    let a_key_id = keys_a["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.api(&b.admin).delete(&format!("/v1/keys/{a_key_id}")).await.0, StatusCode::NOT_FOUND);
    // The default workspace (root key) does not see alpha's events either.
    assert!(s.root().all_events("").await.is_empty());
}

#[tokio::test]
async fn workspaces_and_key_lifecycle() {
    let s = Server::start().await;
    let root = s.root();
    let (st, v) = root.post("/v1/workspaces", json!({"name": "tokyo", "time_zone": "Asia/Tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["time_zone"], "Asia/Tokyo");
    assert_eq!(root.post("/v1/workspaces", json!({"name": "tokyo"})).await.0, StatusCode::CONFLICT);
    let (st, v) = root.post("/v1/workspaces", json!({"name": "x", "time_zone": "Mars/Olympus"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("time_zone"));
    assert_eq!(root.post("/v1/workspaces", json!({"name": "Bad Name"})).await.0, StatusCode::BAD_REQUEST);
    let (_, v) = root.post("/v1/workspaces", json!({"name": "utc-default"})).await;
    assert_eq!(v["time_zone"], "UTC");
    let (_, v) = root.get("/v1/workspaces").await;
    let names: Vec<&str> = v["data"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "tokyo", "utc-default"]);
    // Keys: create, use, list, revoke; revoked keys stop working at once.
    let (st, k) = root.post("/v1/keys", json!({"name": "tmp", "scope": "read", "workspace": "tokyo"})).await;
    assert_eq!(st, StatusCode::CREATED);
    let secret = k["secret"].as_str().unwrap();
    assert_eq!(s.api(secret).get("/v1/events").await.0, StatusCode::OK);
    let (_, list) = root.get("/v1/keys?workspace=tokyo").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(list["data"][0].get("secret").is_none());
    assert_eq!(root.delete(&format!("/v1/keys/{}", k["id"].as_str().unwrap())).await.0, StatusCode::NO_CONTENT);
    assert_eq!(s.api(secret).get("/v1/events").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(root.delete(&format!("/v1/keys/{}", k["id"].as_str().unwrap())).await.0, StatusCode::NOT_FOUND);
    assert_eq!(root.post("/v1/keys", json!({"name": "x", "scope": "read", "workspace": "nope"})).await.0, StatusCode::NOT_FOUND);
    assert_eq!(root.post("/v1/keys", json!({"name": "x", "scope": "superuser"})).await.0, StatusCode::BAD_REQUEST);
    // The last root key cannot be revoked.
    let (_, list) = root.get("/v1/keys?workspace=default").await;
    let root_id = list["data"].as_array().unwrap().iter().find(|k| k["scope"] == "root").unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(root.delete(&format!("/v1/keys/{root_id}")).await.0, StatusCode::CONFLICT);
    // HTTP Basic with the key as user name works too (Segment clients).
    let (st, _) = s.anonymous().send(s.anonymous().req(reqwest::Method::GET, "/v1/events").basic_auth(&s.key, Some(""))).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn admin_actions_are_in_the_audit_log_with_the_acting_key() {
    let s = Server::start().await;
    let k = s.workspace_with_keys("audited").await;
    let admin = s.api(&k.admin);
    let (_, keys) = admin.get("/v1/keys").await;
    let admin_key_id = keys["data"].as_array().unwrap().iter().find(|x| x["scope"] == "admin").unwrap()["id"].as_str().unwrap().to_owned();
    let (_, created) = admin.post("/v1/keys", json!({"name": "temp", "scope": "ingest"})).await;
    let temp_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(admin.delete(&format!("/v1/keys/{temp_id}")).await.0, StatusCode::NO_CONTENT);
    // A refused action is not recorded.
    assert_eq!(admin.delete("/v1/keys/key_missing").await.0, StatusCode::NOT_FOUND);

    let (st, log) = admin.get("/v1/audit").await;
    assert_eq!(st, StatusCode::OK, "{log}");
    let entries = log["data"].as_array().unwrap();
    let actions: Vec<(&str, &str)> = entries.iter().map(|e| (e["action"].as_str().unwrap(), e["target_id"].as_str().unwrap())).collect();
    // Three keys made by root when the workspace was set up, then ours.
    assert_eq!(actions.len(), 5, "{log}");
    assert_eq!(actions[3], ("key.create", temp_id.as_str()));
    assert_eq!(actions[4], ("key.revoke", temp_id.as_str()));
    assert_eq!(entries[4]["actor_key_id"], admin_key_id.as_str());
    assert_eq!(entries[3]["details"]["scope"], "ingest");
    let secret = created["secret"].as_str().unwrap();
    assert!(entries.iter().all(|e| !e.to_string().contains(secret)), "no secrets in the audit log");
    // Root's own workspace holds the workspace creation; root can read any log.
    let (_, root_log) = s.root().get("/v1/audit").await;
    assert!(root_log["data"].as_array().unwrap().iter().any(|e| e["action"] == "workspace.create" && e["target_id"] == "audited"));
    assert_eq!(s.root().get("/v1/audit?workspace=audited").await.1["data"].as_array().unwrap().len(), 5);
    // Read keys and other workspaces' admins cannot read it.
    assert_eq!(s.api(&k.read).get("/v1/audit").await.0, StatusCode::FORBIDDEN);
    assert_eq!(admin.get("/v1/audit?workspace=default").await.0, StatusCode::FORBIDDEN);
}
