//! Helpers for tests that need a real, private database.
//!
//! Every test gets its own SQLite file or its own freshly created PostgreSQL
//! database (random name), never a shared one. PostgreSQL is found through
//! `SLUICE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`,
//! used only to create and drop the per-test databases). When it is not
//! reachable, tests skip with a message, except under `CI=true`, where they
//! fail loudly: CI must never pass by skipping.

use sqlx::{Connection, Executor, PgConnection};

/// The URL of the server used to create per-test PostgreSQL databases.
pub fn postgres_admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// True when running in CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// A fresh PostgreSQL database, dropped when this value is dropped.
pub struct TestDatabase {
    /// Connection URL of the new database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates a new database with a random name. Returns `None` (after
    /// printing why) when PostgreSQL is unavailable outside CI; panics in CI.
    pub async fn create() -> Option<TestDatabase> {
        let admin_url = postgres_admin_url();
        let mut conn = match PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                if in_ci() {
                    panic!("CI=true but PostgreSQL at {admin_url} is unavailable: {e}");
                }
                eprintln!("SKIPPED: PostgreSQL at {admin_url} is unavailable ({e}); set CI=true to make this fatal");
                return None;
            }
        };
        let name = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
        let _ = conn.close().await;
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin_url.clone());
        Some(TestDatabase { url: format!("{base}/{name}"), name, admin_url })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop from a separate thread with its own runtime: Drop may run inside
        // or outside a Tokio runtime.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url).await {
                    let _ = conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
                }
            });
        })
        .join();
    }
}
