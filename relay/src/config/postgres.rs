//! `[postgres]`: the shared database of relay nodes (`storage.backend = "postgres"`).
//! See ARCHITECTURE.md "Beyond one machine".

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a node reaches its PostgreSQL database.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq connection string, as keywords (`host=/run/pg,db2 port=5432,5432
    /// dbname=tern user=tern target_session_attrs=read-write`) or a URL
    /// (`postgresql://tern@db1,db2/tern?target_session_attrs=read-write`). Several
    /// hosts are tried in order, so a node finds the primary after a failover. Put a
    /// password in `password_file`, not here.
    pub url: Option<String>,
    /// A file holding the database password (kept out of the configuration).
    pub password_file: Option<PathBuf>,
    /// Connections this node keeps to the database, at most.
    pub pool_size: usize,
    /// How long to wait for a connection (and for a free one from the pool).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// How long one statement may run; past it the request fails as UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub statement_timeout: Duration,
    /// PEM certificates to trust for TLS to the database; TLS is used (and
    /// required) when set. Without it the connection is plain, which suits a Unix
    /// socket or a private network only.
    pub ca_file: Option<PathBuf>,
    /// This node's name in the database (leases, connected devices); the host name
    /// and a random suffix when unset.
    pub node_id: Option<String>,
    /// How often a node re-reads the mailboxes of its connected devices, so a lost
    /// notification delays a delivery by at most this much.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub recheck_interval: Duration,
    /// Whether nodes tell each other of new mail at once (LISTEN/NOTIFY). Off for an
    /// engine without it (CockroachDB): deliveries across nodes then wait for the
    /// re-check.
    pub notify: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            password_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(2),
            ca_file: None,
            node_id: None,
            recheck_interval: Duration::from_secs(1),
            notify: true,
        }
    }
}

// The URL may hold a password: never print it.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("ca_file", &self.ca_file)
            .field("node_id", &self.node_id)
            .field("recheck_interval", &self.recheck_interval)
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// Checks the values; `required` when the relay stores on PostgreSQL.
    pub fn validate(&self, required: bool) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if required && self.url.is_none() {
            return bad("storage.backend = \"postgres\" needs postgres.url");
        }
        if self.pool_size < 2 || self.pool_size > 1024 {
            return bad("postgres.pool_size must be from 2 to 1024");
        }
        let second = Duration::from_secs(1);
        let ms = Duration::from_millis(100);
        if self.connect_timeout < ms || self.statement_timeout < ms {
            return bad("postgres timeouts must be at least 100ms");
        }
        if self.recheck_interval < ms || self.recheck_interval > 60 * second {
            return bad("postgres.recheck_interval must be from 100ms to 1m");
        }
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return bad("postgres.node_id: 1 to 64 of A-Z a-z 0-9 - _ .");
            }
        }
        Ok(())
    }
}
