//! Read models written against the consumer runtime: the open engine.
//!
//! A read model says how one event changes it (`handle`, an effect of its
//! own type), how two effects add up (`merge`), and how to write an effect
//! in a state-store transaction (`commit`). The runtime does everything
//! else, as for the built-in consumers: one worker per partition, effects of
//! many records carried and merged, then committed together with the
//! checkpoint and the new dead letters in **one transaction** (a crash
//! re-delivers only what was not committed, so nothing counts twice),
//! permanent failures to the dead letters at once, transient ones retried,
//! replay of dead letters, resets that empty the read model (`clear`) and
//! rebuild it from the log, lag metrics and state in `GET /v1/consumers`.
//!
//! Registration is one call, [`Runtime::start_model`], which creates the
//! read model's tables (`init`) first. The smallest complete example is in
//! docs/consumers.md ("Writing a read model") and, tested across `kill -9`,
//! in `crates/sluice-readmodel-example`.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::Event;
use sluice_store::{ModelEffect, StoreError, Tx, TxFuture, TxWork};

use crate::runtime::{Attempt, Consumer, Effect, HandleError, OnReset, Runtime, Start};

/// A read model: folds events into effects and commits them with the
/// consumer's checkpoint.
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// What events do to the read model, carried until a commit.
    type Effect: Send + Sync + 'static;

    /// Stable name: the key of its checkpoints and dead letters.
    fn name(&self) -> &str;

    /// Where to start without a checkpoint (default: the oldest record).
    fn start(&self) -> Start {
        Start::Earliest
    }

    /// Creates the read model's tables if they do not exist (run by
    /// [`Runtime::start_model`] before the first event).
    async fn init(&self, _tx: Tx<'_>) -> Result<(), StoreError> {
        Ok(())
    }

    /// The effect of one event (`None`: the event does not concern this
    /// read model). [`HandleError::Permanent`] sends the event to the dead
    /// letters at once; [`HandleError::Transient`] retries it.
    async fn handle(&self, event: &Event) -> Result<Option<Self::Effect>, HandleError>;

    /// Adds `from` to `into` (effects of later events come later).
    fn merge(&self, into: &mut Self::Effect, from: Self::Effect);

    /// Rows or keys an effect holds (default 1): the runtime commits a
    /// carry once it holds many, to bound memory and commit size.
    fn entries(&self, _effect: &Self::Effect) -> usize {
        1
    }

    /// Writes `effect` in the commit's transaction (the runtime writes the
    /// checkpoint in the same one). An error rolls the whole commit back.
    async fn commit(&self, effect: &Self::Effect, tx: Tx<'_>) -> Result<(), StoreError>;

    /// Empties the read model, in the transaction of a reset of its
    /// consumer; the runtime then rebuilds it from the reset's position.
    async fn clear(&self, tx: Tx<'_>) -> Result<(), StoreError>;
}

impl Runtime {
    /// Creates the read model's tables, then runs it like any consumer.
    pub async fn start_model<M: ReadModel>(self: &Arc<Self>, model: M) -> Result<(), StoreError> {
        let model = Arc::new(model);
        self.store().write_tx(&Init(model.clone())).await?;
        self.start(Arc::new(ModelConsumer(model)));
        Ok(())
    }
}

/// Runs a [`ReadModel`] as a [`Consumer`].
struct ModelConsumer<M>(Arc<M>);

/// An effect of `M`, with the model that merges and commits it.
struct Carried<M: ReadModel> {
    model: Arc<M>,
    effect: M::Effect,
}

impl<M: ReadModel> TxWork for Carried<M> {
    fn run<'a>(&'a self, tx: Tx<'a>) -> TxFuture<'a> {
        self.model.commit(&self.effect, tx)
    }
}

impl<M: ReadModel> ModelEffect for Carried<M> {
    fn entries(&self) -> usize {
        self.model.entries(&self.effect)
    }

    fn merge(&mut self, other: Box<dyn ModelEffect>) {
        let other: Box<dyn std::any::Any> = other;
        match other.downcast::<Carried<M>>() {
            Ok(other) => self.model.merge(&mut self.effect, other.effect),
            // The runtime carries one consumer's effects per commit.
            Err(_) => unreachable!("effects of two read models merged"),
        }
    }
}

struct Init<M>(Arc<M>);

impl<M: ReadModel> TxWork for Init<M> {
    fn run<'a>(&'a self, tx: Tx<'a>) -> TxFuture<'a> {
        self.0.init(tx)
    }
}

struct Clear<M>(Arc<M>);

impl<M: ReadModel> TxWork for Clear<M> {
    fn run<'a>(&'a self, tx: Tx<'a>) -> TxFuture<'a> {
        self.0.clear(tx)
    }
}

#[async_trait]
impl<M: ReadModel> Consumer for ModelConsumer<M> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn start(&self) -> Start {
        self.0.start()
    }

    async fn handle(&self, event: &Event, _attempt: Attempt) -> Result<Effect, HandleError> {
        Ok(match self.0.handle(event).await? {
            Some(effect) => Effect::Model(Box::new(Carried { model: self.0.clone(), effect })),
            None => Effect::None,
        })
    }

    fn on_reset(&self) -> OnReset {
        OnReset::Clear(Box::new(Clear(self.0.clone())))
    }
}
