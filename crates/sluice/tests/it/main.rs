//! End-to-end tests: each starts real `sluice serve` processes (own temp data
//! directory, own port, own database) and talks to them over HTTP and the CLI.
//!
//! The state backend comes from `SLUICE_TEST_STATE` (`sqlite`, the default,
//! or `postgres`: a fresh PostgreSQL database per server, see
//! `sluice_store::testing`). `.ci/run` runs this suite once per backend.

#![allow(clippy::unwrap_used)]

mod helpers;

mod imports;

mod auth;
mod billing;
mod browser;
mod cli;
mod consumers;
mod durability;
mod health;
mod health_cli;
mod ingest;
mod jobs;
mod lake;
mod limits;
mod metering;
mod ops;
mod segment;
mod sessions;

// Issue 11 (no tenant can stall, crash or slow the others).
mod hardening;
mod hostile_sql;
mod isolation;
