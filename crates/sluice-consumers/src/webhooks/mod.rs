//! Webhooks: Standard Webhooks signing, SSRF-guarded delivery, and one
//! consumer per endpoint.

pub mod consumer;
pub mod sign;
pub mod ssrf;

pub use consumer::{consumer_name, message_id, WebhookConsumer};
