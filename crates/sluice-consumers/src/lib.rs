//! Consumers of the event log: the runtime (checkpoints, retries, dead
//! letters, replay, reset), the built-in `event_counts` read model, and
//! signed webhooks.

pub mod counts;
pub mod dlq_bulk;
pub mod engine;
pub mod rebuild;
pub mod runtime;
pub mod webhooks;

pub use engine::ReadModel;
pub use runtime::{
    Attempt, Consumer, ConsumerState, ConsumerStatus, Effect, HandleError, OnReset, ResetDone, RetryPolicy, Runtime, RuntimeError, Start,
};
pub use sluice_store::{on_tx, Tx};
