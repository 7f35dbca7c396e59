//! One consumer per webhook endpoint (`webhook:<id>`), so a slow or failing
//! receiver only delays its own deliveries.
//!
//! Deliveries follow Standard Webhooks: the body is
//! `{"type", "timestamp", "data": <event>}`, the `webhook-id` is derived from
//! the webhook and the event (stable across retries and replays, so a
//! receiver can drop repeats), `webhook-timestamp` is the attempt time and
//! `webhook-signature` is `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`.
//! A non-2xx answer, a timeout or a refused target is a failed attempt:
//! retried with backoff, then dead-lettered.
//!
//! Webhooks have external effects, so they cannot commit with the
//! checkpoint: a delivery may repeat after a crash (at-least-once), with the
//! same `webhook-id`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sha2::{Digest, Sha256};
use sluice_core::Event;
use sluice_store::{Delivery, DeliveryStatus, Store, Webhook};

use super::{sign, ssrf, WebhookError};
use crate::runtime::{Attempt, Consumer, Effect, HandleError, RetryPolicy, Start};

/// Consumer name of a webhook.
pub fn consumer_name(webhook_id: &str) -> String {
    format!("webhook:{webhook_id}")
}

/// The stable `webhook-id` of (webhook, event).
pub fn message_id(webhook_id: &str, workspace: &str, event_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [webhook_id, workspace, event_id] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let hex: String = d[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

/// Delivers the events of one webhook.
pub struct WebhookConsumer {
    name: String,
    hook: Webhook,
    store: Store,
    http: reqwest::Client,
    allow_private: bool,
    policy: RetryPolicy,
}

impl WebhookConsumer {
    /// A consumer for `hook`.
    pub fn new(hook: Webhook, store: Store, allow_private: bool, timeout: Duration, policy: RetryPolicy) -> Self {
        WebhookConsumer { name: consumer_name(&hook.id), http: ssrf::client(allow_private, timeout), hook, store, allow_private, policy }
    }

    fn wants(&self, e: &Event) -> bool {
        e.workspace.as_str() == self.hook.workspace && self.hook.event_types.iter().any(|t| t == "*" || t == e.event_type.as_str())
    }

    async fn send(&self, msg_id: &str, body: &str) -> Result<u16, WebhookError> {
        let url = reqwest::Url::parse(&self.hook.url).map_err(WebhookError::StoredUrl)?;
        ssrf::check_before_send(&url, self.allow_private)?;
        let ts = Utc::now().timestamp();
        let signature = sign::sign(&self.hook.secret, msg_id, ts, body.as_bytes())?;
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| WebhookError::Request(describe(&e)))?;
        Ok(resp.status().as_u16())
    }
}

/// A readable reason for a failed request (reqwest's Display hides the cause).
fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = if e.is_timeout() { "timed out".to_owned() } else { e.to_string() };
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[async_trait]
impl Consumer for WebhookConsumer {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(&self) -> Start {
        // A new webhook receives events from its creation on.
        Start::Latest
    }

    async fn handle(&self, e: &Event, attempt: Attempt) -> Result<Effect, HandleError> {
        if !self.wants(e) {
            return Ok(Effect::None);
        }
        let msg_id = message_id(&self.hook.id, e.workspace.as_str(), e.id.as_str());
        let body = serde_json::json!({
            "type": e.event_type.as_str(),
            "timestamp": e.timestamp.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "data": e,
        })
        .to_string();
        let result = self.send(&msg_id, &body).await;
        let now = Utc::now();
        let previous = self.store.get_delivery(&msg_id).await.ok().flatten();
        let mut d = Delivery {
            id: msg_id.clone(),
            webhook_id: self.hook.id.clone(),
            event_id: e.id.to_string(),
            event_type: e.event_type.to_string(),
            status: DeliveryStatus::Pending,
            attempts: previous.as_ref().map_or(0, |p| p.attempts) + 1,
            last_status_code: None,
            last_error: None,
            next_retry_at: None,
            created_at: previous.as_ref().map_or(now, |p| p.created_at),
            updated_at: now,
        };
        let outcome = match result {
            Ok(code) if (200..300).contains(&code) => {
                d.status = DeliveryStatus::Succeeded;
                d.last_status_code = Some(i32::from(code));
                Ok(Effect::None)
            }
            Ok(code) => {
                d.last_status_code = Some(i32::from(code));
                Err(format!("receiver answered HTTP {code}"))
            }
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = &outcome {
            d.last_error = Some(err.clone());
            if attempt.last {
                d.status = DeliveryStatus::Dead;
            } else {
                d.status = DeliveryStatus::Retrying;
                d.next_retry_at = chrono::Duration::from_std(self.policy.delay(attempt.n)).ok().map(|x| now + x);
            }
        }
        if let Err(err) = self.store.upsert_delivery(&d).await {
            tracing::warn!(webhook = %self.hook.id, error = %err, "could not record the delivery");
        }
        // A receiver that is down or answers an error may work later: a
        // transient failure, retried (it holds only this webhook's own
        // worker: every webhook is its own consumer of one workspace).
        outcome.map_err(HandleError::Transient)
    }
}
