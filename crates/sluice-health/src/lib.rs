//! Customer health (docs/health.md): every customer gets a lifecycle
//! **stage** from ordered rules over measures of its events and attributes,
//! and a **score** (0–100) and **band** (good / normal / bad) from the
//! stage's scorecard, with an explanation of every point.
//!
//! - [`config`]: the configuration, parsed and validated with paths;
//! - [`eval`]: the evaluation itself, a pure function of a customer's
//!   events, attributes and overrides at a time `T` (live, `as_of`, a
//!   recompute and a backtest all call it, so they agree);
//! - [`model`]: the read model on the consumer engine that keeps each
//!   customer's events and `group` traits, exactly once with its checkpoint;
//! - [`engine`]: reading what an evaluation needs from the state store,
//!   saving live results, history and transition events, and the evaluator
//!   loop that re-evaluates customers when events arrive and when time
//!   alone changes them (local midnight, override expiry, cooldown end);
//! - [`jobs`]: `health.recompute` (a new configuration) and
//!   `health.backtest`.
//!
//! The measures are computed from a table of the customer's events rather
//! than from pre-aggregated counters: a window "the last N days up to T"
//! ends at any T (an `as_of` in the middle of a day), which day counters
//! cannot answer exactly. One indexed range read per customer holds every
//! window of its configuration.

pub mod config;
pub mod engine;
pub mod eval;
pub mod jobs;
pub mod model;

pub use config::HealthConfig;
pub use engine::{Health, HealthSettings};

/// One bad part of a request, by path.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    /// Where, e.g. `stages[1].rule.all[0].measure`.
    pub path: String,
    /// Why.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a health operation failed. Each maps to an API status.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    /// A request part is wrong (400).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// Not found (404).
    #[error("{0}")]
    NotFound(String),
    /// A stored document this version cannot read.
    #[error("unreadable health data: {0}")]
    Corrupt(String),
}

sluice_core::error_codes!(HealthError { Invalid => "health.invalid", NotFound => "health.not_found", Corrupt => "health.corrupt" } wraps { Store });

impl HealthError {
    /// One invalid part.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> HealthError {
        HealthError::Invalid(vec![FieldError { path: path.into(), message: message.into() }])
    }
}
