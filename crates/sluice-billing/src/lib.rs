//! Usage billing (docs/billing.md): plans with fixed fees and usage
//! charges (per_unit, graduated, volume, package, flat), subscriptions
//! with calendar or anniversary cycles in the workspace's time zone,
//! invoices that are exact to the minor unit and satisfy Japan's
//! qualified-invoice rules (tax once per rate), and billing runs as jobs.
//!
//! - [`plan`]: plan definitions, validation, and pricing per model;
//! - [`cycle`] and [`subscription`]: where periods begin and end;
//! - [`invoice`]: lines, tax per rate, totals;
//! - [`engine`]: billing against the state store (idempotent per period,
//!   gapless numbering at finalization, late usage);
//! - [`run`]: the `billing.run` job and auto-billing;
//! - [`render`]: the invoice as HTML.
//!
//! Usage comes from the meters' read model (`usage_buckets`, kept by the
//! meters consumer on the consumer engine, exactly once); billing reads it
//! and never writes it.

pub mod cycle;
pub mod engine;
pub mod invoice;
pub mod money;
pub mod plan;
pub mod render;
pub mod run;
pub mod settings;
pub mod subscription;
pub mod unattributed;

pub use engine::{BillOptions, Billing, EventSink, NotSent, Ws};
pub use plan::{FieldError, PlanSpec};
pub use settings::BillingSettings;
pub use subscription::Subscription;

/// Why billing failed. Each maps to an API status.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The state store failed (retryable unless the data is at fault).
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    /// A request field is wrong (400).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// Not found (404).
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow it (409), e.g. finalizing a void invoice.
    #[error("{0}")]
    Conflict(String),
    /// A subscription kept changing while it was billed (retryable).
    #[error("{0}")]
    Busy(String),
    /// A usage total beyond the largest exact decimal (422).
    #[error("{0}")]
    Overflow(String),
    /// A stored document this version cannot read.
    #[error("unreadable billing data: {0}")]
    Corrupt(String),
}

sluice_core::error_codes!(BillingError { Invalid => "billing.invalid", NotFound => "billing.not_found", Conflict => "billing.conflict", Busy => "billing.busy", Overflow => "billing.overflow", Corrupt => "billing.corrupt" } wraps { Store });

impl BillingError {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> BillingError {
        BillingError::Invalid(vec![FieldError::new(field, reason)])
    }
}

impl From<FieldError> for BillingError {
    fn from(e: FieldError) -> Self {
        BillingError::Invalid(vec![e])
    }
}

/// An event billing writes to the log: its id is derived from what it
/// reports, so writing it again (a retry) is deduplicated.
pub fn make_event(
    workspace: &str,
    id: &str,
    kind: &str,
    customer_id: Option<&str>,
    subscription_id: Option<&str>,
    properties: serde_json::Value,
) -> Result<sluice_core::Event, sluice_core::IdError> {
    let now = chrono::Utc::now();
    let raw = serde_json::value::to_raw_value(&properties).unwrap_or_else(|_| sluice_core::Event::empty_object());
    Ok(sluice_core::Event {
        workspace: sluice_core::WorkspaceName::parse(workspace.to_owned())?,
        id: sluice_core::EventId::parse(id.to_owned())?,
        event_type: sluice_core::EventType::parse(kind.to_owned())?,
        timestamp: now,
        received_at: now,
        customer_id: customer_id.map(str::to_owned),
        subscription_id: subscription_id.map(str::to_owned),
        user_id: None,
        properties: raw,
        context: sluice_core::Event::empty_object(),
    })
}

/// Billing's events go through the ingest pipeline: durable, deduplicated
/// by id, seen by webhooks, the lake and the consumers like any event.
pub struct IngestSink(pub sluice_ingest::Ingestor);

#[async_trait::async_trait]
impl EventSink for IngestSink {
    async fn emit(&self, events: Vec<sluice_core::Event>) -> Result<(), NotSent> {
        use sluice_ingest::IngestError;
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        // A full ingest queue (an import at full speed) is waited out.
        match self.0.submit_waiting(events).await {
            Ok(_) => Ok(()),
            Err(e @ (IngestError::Invalid(_) | IngestError::TooLarge { .. })) => {
                tracing::error!(error = %e, events = n, "the log refuses these events (billing's or health transitions)");
                Err(NotSent::Refused)
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "could not write events to the log; the outbox keeps them for the next try");
                Err(NotSent::Later)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BillingError;
    use sluice_store::StoreError;

    #[test]
    fn error_codes_are_stable_and_a_wrapped_error_gives_its_own() {
        assert_eq!(BillingError::Busy("x".into()).code(), "billing.busy");
        assert_eq!(BillingError::NotFound("x".into()).code(), "billing.not_found");
        assert_eq!(BillingError::Store(StoreError::NotFound).code(), "store.not_found");
        assert_eq!(BillingError::Store(StoreError::Conflict("x".into())).code(), "store.conflict");
    }
}
