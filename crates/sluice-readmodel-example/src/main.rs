//! `readmodel-host LOG_DIR STORE_URL`: runs [`SeenEvents`] over an embedded
//! log until killed — the process `tests/kill9.rs` kills with `SIGKILL`.
//!
//! `SLUICE_EXAMPLE_HANDLE_DELAY_MS` slows each event down, so that a kill
//! lands between commits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_consumers::{HandleError, ReadModel, RetryPolicy, Runtime, Tx};
use sluice_core::{Event, EventLog};
use sluice_readmodel_example::SeenEvents;
use sluice_store::StoreError;

/// [`SeenEvents`], each event delayed.
struct Slowed(SeenEvents, Duration);

#[async_trait]
impl ReadModel for Slowed {
    type Effect = <SeenEvents as ReadModel>::Effect;
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn init(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        self.0.init(tx).await
    }
    async fn handle(&self, event: &Event) -> Result<Option<Self::Effect>, HandleError> {
        tokio::time::sleep(self.1).await;
        self.0.handle(event).await
    }
    fn merge(&self, into: &mut Self::Effect, from: Self::Effect) {
        self.0.merge(into, from)
    }
    fn entries(&self, effect: &Self::Effect) -> usize {
        self.0.entries(effect)
    }
    async fn commit(&self, effect: &Self::Effect, tx: Tx<'_>) -> Result<(), StoreError> {
        self.0.commit(effect, tx).await
    }
    async fn clear(&self, tx: Tx<'_>) -> Result<(), StoreError> {
        self.0.clear(tx).await
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(log_dir), Some(store_url)) = (args.next(), args.next()) else {
        return Err("usage: readmodel-host LOG_DIR STORE_URL".into());
    };
    let log: Arc<dyn EventLog> = Arc::new(sluice_log::EmbeddedLog::open(sluice_log::LogConfig::new(log_dir, 2))?);
    let store = sluice_store::Store::connect(&store_url).await?;
    let policy = RetryPolicy { attempts: 3, base: Duration::from_millis(5), max: Duration::from_millis(20) };
    // Small reads: many commits, so that a kill lands between two of them.
    let runtime = Runtime::new(log, store, policy, 4);
    let delay = std::env::var("SLUICE_EXAMPLE_HANDLE_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    runtime.start_model(Slowed(SeenEvents, Duration::from_millis(delay))).await?;
    println!("ready");
    tokio::signal::ctrl_c().await?;
    runtime.stop_all().await;
    Ok(())
}
