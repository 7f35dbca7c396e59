//! What a read model outside this crate writes in the state store's
//! transactions: its effects, committed with a consumer's checkpoint in one
//! transaction ([`ConsumerCommit::model`](crate::ConsumerCommit::model)),
//! the statements that create its tables, and the statements that clear it
//! when its consumer is reset.
//!
//! A read model gets the transaction's connection as a [`Tx`] and runs its
//! own SQL with `sqlx`; [`on_tx!`](crate::on_tx) runs one body on either
//! backend (`$1` placeholders work on both). The runtime that drives read
//! models is `sluice_consumers::ReadModel` (docs/consumers.md,
//! "Writing a read model").

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

use crate::Result;

/// The connection of a write transaction, on either backend.
pub enum Tx<'a> {
    /// The embedded SQLite store.
    Sqlite(&'a mut sqlx::SqliteConnection),
    /// PostgreSQL.
    Postgres(&'a mut sqlx::PgConnection),
}

impl Tx<'_> {
    /// The same connection for one step, keeping this `Tx` for the next
    /// (a read model that calls several helpers taking a `Tx`).
    pub fn reborrow(&mut self) -> Tx<'_> {
        match self {
            Tx::Sqlite(c) => Tx::Sqlite(c),
            Tx::Postgres(c) => Tx::Postgres(c),
        }
    }
}

/// Runs `$body` with `$conn` bound to the connection of a [`Tx`] (a
/// `&mut SqliteConnection` or a `&mut PgConnection`): the body is compiled
/// once per backend, so it must be SQL both accept.
///
/// ```ignore
/// sluice_store::on_tx!(tx, conn => sqlx::query("DELETE FROM seen").execute(&mut *conn).await.map(|_| ()))?;
/// ```
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Sqlite($conn) => $body,
            $crate::Tx::Postgres($conn) => $body,
        }
    };
}

/// A boxed future of a transaction's work.
pub type TxFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Statements run in a state-store write transaction.
pub trait TxWork: Send + Sync {
    /// Runs them; an error rolls the transaction back.
    fn run<'a>(&'a self, tx: Tx<'a>) -> TxFuture<'a>;
}

/// The effects of events on one read model, carried until the runtime
/// commits them with the consumer's checkpoint.
pub trait ModelEffect: TxWork + Any {
    /// Rows (or keys) the effect holds: the runtime commits a carry once it
    /// holds many, so that memory and the size of a commit stay bounded.
    fn entries(&self) -> usize;
    /// Adds `other`, an effect of the same read model, to this one.
    fn merge(&mut self, other: Box<dyn ModelEffect>);
}

impl std::fmt::Debug for dyn ModelEffect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelEffect({} entries)", self.entries())
    }
}

/// Empties the `event_counts` read model (a reset of its consumer, which
/// then rebuilds it from the log).
pub struct ClearEventCounts;

impl TxWork for ClearEventCounts {
    fn run<'a>(&'a self, tx: Tx<'a>) -> TxFuture<'a> {
        Box::pin(async move {
            on_tx!(tx, conn => sqlx::query("DELETE FROM event_counts").execute(&mut *conn).await.map(|_| ()))?;
            Ok(())
        })
    }
}

impl crate::Store {
    /// Runs `work` in one write transaction and commits it.
    pub async fn write_tx(&self, work: &dyn TxWork) -> Result<()> {
        crate::on_pool!(self, pool => {
            let mut tx = crate::BeginWrite::begin_write(pool).await?;
            work.run(crate::Tx::from(&mut *tx)).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl<'a> From<&'a mut sqlx::SqliteConnection> for Tx<'a> {
    fn from(c: &'a mut sqlx::SqliteConnection) -> Tx<'a> {
        Tx::Sqlite(c)
    }
}

impl<'a> From<&'a mut sqlx::PgConnection> for Tx<'a> {
    fn from(c: &'a mut sqlx::PgConnection) -> Tx<'a> {
        Tx::Postgres(c)
    }
}
