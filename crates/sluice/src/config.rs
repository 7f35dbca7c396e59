//! Configuration in layers: embedded defaults < `--config` file <
//! `SLUICE_*` environment variables < command-line flags.
//!
//! The defaults file (`defaults.toml`, embedded in the binary, printed by
//! `sluice config defaults`) is also the schema: a key that is not in it is
//! an error in a file, and every key in it can be set from the environment
//! by its upper-cased path (`ingest.max_events` -> `SLUICE_INGEST_MAX_EVENTS`).
//!
//! Each section is owned by its component, which declares its type
//! (`[log]`: `sluice_log::LogSettings`, `[ingest]`:
//! `sluice_ingest::IngestSettings`, `[lake]`: `sluice_lake::LakeSettings`,
//! `[sql]`: `sluice_lake::sql::SqlLimits`, `[http]`:
//! `sluice_api::HttpSettings`, `[limits]`: `sluice_api::WorkspaceLimits`,
//! `[metrics]`/`[dashboard]`: `sluice_api::{MetricsSettings,
//! DashboardSettings}`, `[billing]`:
//! `sluice_billing::run::AutoBillingSettings`, `[health]`:
//! `sluice_health::HealthSettings`), deserialized here straight from the
//! merged layers and turned into the component's runtime configuration by
//! the component; the defaults stay in the one commented `defaults.toml` (a
//! test checks that they equal each component's `Default`). Only the
//! top-level keys are the binary's own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::{Table, Value};

/// The embedded, commented defaults.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub state_url: Secret,
    pub log_format: String,
    #[serde(with = "sluice_core::duration")]
    pub shutdown_timeout: Duration,
    pub retry_attempts: u32,
    pub retry_base_ms: u64,
    pub consumer_batch: usize,
    #[serde(with = "sluice_core::duration")]
    pub job_lease: Duration,
    #[serde(with = "sluice_core::duration")]
    pub webhook_timeout: Duration,
    pub webhook_allow_private: bool,
    pub log: sluice_log::LogSettings,
    pub ingest: sluice_ingest::IngestSettings,
    pub lake: sluice_lake::LakeSettings,
    pub sql: sluice_lake::sql::SqlLimits,
    pub http: sluice_api::HttpSettings,
    pub limits: sluice_api::WorkspaceLimits,
    pub metrics: sluice_api::MetricsSettings,
    pub dashboard: sluice_api::DashboardSettings,
    pub billing: sluice_billing::run::AutoBillingSettings,
    pub health: sluice_health::HealthSettings,
}

/// A string that may hold a password: printed with the password hidden.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The real value, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_owned()
}

/// Flags that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub state_url: Option<String>,
}

impl Config {
    /// Loads the layers. `env` is passed in so tests can supply their own.
    pub fn load(file: Option<&Path>, env: &[(String, String)], flags: &Overrides) -> Result<Config> {
        let mut table: Table = DEFAULTS.parse().context("embedded defaults are invalid TOML")?;
        let schema = table.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
            let file_table: Table = text.parse().with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            merge_checked(&mut table, file_table, &schema, "").with_context(|| format!("in config file {}", path.display()))?;
        }
        apply_env(&mut table, &schema, env, "")?;
        let set = |t: &mut Table, k: &str, v: String| {
            t.insert(k.to_owned(), Value::String(v));
        };
        if let Some(v) = &flags.listen {
            set(&mut table, "listen", v.clone());
        }
        if let Some(v) = &flags.data_dir {
            set(&mut table, "data_dir", v.display().to_string());
        }
        if let Some(v) = &flags.state_url {
            set(&mut table, "state_url", v.clone());
        }
        let mut cfg: Config = Value::Table(table).try_into().context("invalid configuration")?;
        if cfg.state_url.expose().is_empty() {
            cfg.state_url = Secret(format!("sqlite://{}", cfg.data_dir.join("state.db").display()));
        }
        if cfg.log.url.is_empty() {
            cfg.log.url = format!("file://{}", cfg.data_dir.join("log").display());
        }
        if cfg.retry_attempts == 0 {
            bail!("retry_attempts must be at least 1");
        }
        if cfg.log.partitions == 0 || cfg.log.partitions > 1024 {
            bail!("log.partitions must be between 1 and 1024 (got {})", cfg.log.partitions);
        }
        if cfg.ingest.max_buffered_body_bytes < 2 * cfg.ingest.max_body_bytes {
            bail!(
                "ingest.max_buffered_body_bytes ({}) must be at least twice ingest.max_body_bytes ({})",
                cfg.ingest.max_buffered_body_bytes,
                cfg.ingest.max_body_bytes
            );
        }
        if cfg.http.header_timeout.is_zero() || cfg.http.body_timeout.is_zero() || cfg.http.idle_timeout.is_zero() {
            bail!("http.header_timeout, http.body_timeout and http.idle_timeout must be more than 0s");
        }
        if cfg.http.max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        if !matches!(cfg.log_format.as_str(), "text" | "json") {
            bail!("log_format must be \"text\" or \"json\" (got {:?})", cfg.log_format);
        }
        Ok(cfg)
    }

    /// Directory of the embedded log (from `log.url`).
    pub fn log_dir(&self) -> Result<PathBuf> {
        match self.log.url.strip_prefix("file://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => bail!("log.url {:?} is not supported by this build; use file://PATH (NATS JetStream is planned)", self.log.url),
        }
    }
}

/// Merges `over` into `base`, refusing keys that the schema does not have
/// and values of another type than the default's.
fn merge_checked(base: &mut Table, over: Table, schema: &Table, prefix: &str) -> Result<()> {
    for (k, v) in over {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let Some(default) = schema.get(&k) else {
            let known: Vec<&str> = schema.keys().map(String::as_str).collect();
            bail!("unknown configuration key `{path}` (known keys here: {})", known.join(", "));
        };
        match (default, v) {
            (Value::Table(sub_schema), Value::Table(sub)) => {
                let Some(Value::Table(base_sub)) = base.get_mut(&k) else { bail!("`{path}` must be a table") };
                merge_checked(base_sub, sub, sub_schema, &path)?;
            }
            (Value::Table(_), _) => bail!("`{path}` must be a table ([{path}])"),
            (d, v) if std::mem::discriminant(d) != std::mem::discriminant(&v) => {
                bail!("`{path}` must be a {} (got {})", d.type_str(), v.type_str())
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    Ok(())
}

/// Sets every key that has a `SLUICE_<PATH>` variable.
fn apply_env(table: &mut Table, schema: &Table, env: &[(String, String)], prefix: &str) -> Result<()> {
    for (k, default) in schema {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}_{k}") };
        if let Value::Table(sub_schema) = default {
            if let Some(Value::Table(sub)) = table.get_mut(k) {
                apply_env(sub, sub_schema, env, &path)?;
            }
            continue;
        }
        let var = format!("SLUICE_{}", path.to_ascii_uppercase());
        let Some((_, raw)) = env.iter().find(|(n, _)| *n == var) else { continue };
        let value = match default {
            Value::Integer(_) => Value::Integer(raw.trim().parse().with_context(|| format!("{var}={raw:?} is not an integer"))?),
            Value::Boolean(_) => Value::Boolean(match raw.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => bail!("{var}={raw:?} is not a boolean (true/false)"),
            }),
            _ => Value::String(raw.clone()),
        };
        table.insert(k.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn defaults_load() {
        let c = Config::load(None, &[], &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8680");
        assert_eq!(c.state_url.expose(), "sqlite://./sluice-data/state.db");
        assert_eq!(c.ingest.dedup_window, Duration::from_secs(35 * 86400));
        assert_eq!(c.log.partitions, 4);
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.max_connections, 1024);
        assert_eq!(c.limits.webhooks, 50);
        assert!(!c.metrics.require_key);
        let e = env(&[("SLUICE_HTTP_HEADER_TIMEOUT", "2s"), ("SLUICE_LIMITS_METERS", "3"), ("SLUICE_METRICS_REQUIRE_KEY", "true")]);
        let c = Config::load(None, &e, &Overrides::default()).unwrap();
        assert_eq!(c.http.header_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.meters, 3);
        assert!(c.metrics.require_key);
    }

    #[test]
    fn layers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sluice.toml");
        std::fs::write(&f, "listen = \"0.0.0.0:1\"\ndata_dir = \"/d\"\n[log]\npartitions = 8\n[ingest]\nmax_events = 5\n").unwrap();
        let e = env(&[("SLUICE_LISTEN", "127.0.0.1:2"), ("SLUICE_INGEST_MAX_EVENTS", "7"), ("SLUICE_UNRELATED", "x")]);
        let c = Config::load(Some(&f), &e, &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2");
        assert_eq!(c.ingest.max_events, 7);
        assert_eq!(c.log.partitions, 8);
        assert_eq!(c.state_url.expose(), "sqlite:///d/state.db");
        let flags = Overrides { listen: Some("127.0.0.1:3".into()), ..Default::default() };
        assert_eq!(Config::load(Some(&f), &e, &flags).unwrap().listen, "127.0.0.1:3");
    }

    #[test]
    fn unknown_and_mistyped_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sluice.toml");
        std::fs::write(&f, "[log]\npartitons = 8\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f), &[], &Overrides::default()).unwrap_err());
        assert!(err.contains("unknown configuration key `log.partitons`"), "{err}");
        std::fs::write(&f, "listen = 5\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f), &[], &Overrides::default()).unwrap_err());
        assert!(err.contains("`listen` must be a string"), "{err}");
        let err = format!("{:#}", Config::load(None, &env(&[("SLUICE_LOG_PARTITIONS", "many")]), &Overrides::default()).unwrap_err());
        assert!(err.contains("SLUICE_LOG_PARTITIONS"), "{err}");
    }

    /// The sections owned by components: `defaults.toml` (the one commented
    /// source of defaults) agrees with each component's `Default`.
    #[test]
    fn component_sections_default_like_their_components() {
        let c = Config::load(None, &[], &Overrides::default()).unwrap();
        let http = sluice_api::HttpSettings::default();
        assert_eq!(
            (c.http.header_timeout, c.http.body_timeout, c.http.idle_timeout, c.http.max_connections),
            (http.header_timeout, http.body_timeout, http.idle_timeout, http.max_connections)
        );
        let l = sluice_api::WorkspaceLimits::default();
        assert_eq!(
            (c.limits.webhooks, c.limits.schemas, c.limits.meters, c.limits.saved_queries),
            (l.webhooks, l.schemas, l.meters, l.saved_queries)
        );
        let sql = sluice_lake::sql::SqlLimits::default();
        assert_eq!(
            (c.sql.timeout, c.sql.max_rows, c.sql.max_bytes, c.sql.memory, c.sql.max_tail_events, c.sql.max_live_rows),
            (sql.timeout, sql.max_rows, sql.max_bytes, sql.memory, sql.max_tail_events, sql.max_live_rows)
        );
        // (`log.url` is derived from `data_dir` when empty.)
        let log = sluice_log::LogSettings::default();
        assert_eq!(
            (c.log.partitions, c.log.segment_bytes, c.log.retention_max_age, c.log.retention_max_bytes, c.log.retention_interval),
            (log.partitions, log.segment_bytes, log.retention_max_age, log.retention_max_bytes, log.retention_interval)
        );
        let i = sluice_ingest::IngestSettings::default();
        let ci = &c.ingest;
        assert_eq!(
            (ci.max_body_bytes, ci.max_event_bytes, ci.max_events, ci.max_buffered_body_bytes, ci.max_inflight_bytes, ci.dedup_window),
            (i.max_body_bytes, i.max_event_bytes, i.max_events, i.max_buffered_body_bytes, i.max_inflight_bytes, i.dedup_window)
        );
        assert_eq!((ci.segment_max_message_bytes, ci.segment_max_batch_bytes), (i.segment_max_message_bytes, i.segment_max_batch_bytes));
        let lake = sluice_lake::LakeSettings::default();
        let cl = &c.lake;
        assert_eq!(
            (&cl.url, cl.flush_interval, cl.flush_bytes, cl.row_group_rows, cl.target_file_bytes, cl.compact_interval, cl.compact_after),
            (
                &lake.url,
                lake.flush_interval,
                lake.flush_bytes,
                lake.row_group_rows,
                lake.target_file_bytes,
                lake.compact_interval,
                lake.compact_after
            )
        );
        let d = sluice_api::DashboardSettings::default();
        assert_eq!((c.dashboard.session_ttl, c.dashboard.overview_interval), (d.session_ttl, d.overview_interval));
        assert_eq!(c.metrics.require_key, sluice_api::MetricsSettings::default().require_key);
        assert_eq!(c.billing.auto_interval, sluice_billing::run::AutoBillingSettings::default().auto_interval);
        assert_eq!(c.health.transition_cooldown, sluice_health::HealthSettings::default().transition_cooldown);
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(format!("{:?}", Secret("postgres://u:pw@h/db".into())), "postgres://u:***@h/db");
    }
}
