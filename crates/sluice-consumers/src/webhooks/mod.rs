//! Webhooks: Standard Webhooks signing, SSRF-guarded delivery, and one
//! consumer per endpoint.

pub mod consumer;
mod error;
pub mod sign;
pub mod ssrf;

pub use consumer::{consumer_name, message_id, WebhookConsumer};
pub use error::WebhookError;
