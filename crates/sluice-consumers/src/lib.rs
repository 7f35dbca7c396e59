//! Consumers of the event log: the runtime (checkpoints, retries, dead
//! letters, replay, reset), the built-in `event_counts` read model, and
//! signed webhooks.

pub mod counts;
pub mod rebuild;
pub mod runtime;
pub mod webhooks;

pub use runtime::{Attempt, Consumer, ConsumerState, Effect, HandleError, RetryPolicy, Runtime, RuntimeError, Start};
