//! What a run cost the PostgreSQL database the relays use: WAL bytes written, write
//! transactions (transaction ids assigned), the CPU of the server's processes and,
//! where `pg_stat_statements` is loaded, the statements run, each per message.
//!
//! One connection of its own (tokio-postgres, no TLS: a Unix socket or loopback). The
//! server's processes are those `pg_stat_activity` lists (backends, WAL writer,
//! checkpointer, …), read from `/proc`, so the CPU figure needs the server on this
//! machine; without it that figure is left out.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::{Client, NoTls};

use super::relay::process_cpu_seconds;
use super::LoadError;

/// A connection to the database under the relays, for readings before and after.
pub struct PgProbe {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

/// The database's counters at one moment.
pub struct PgReading {
    lsn: String,
    xid: i64,
    cpu_by_pid: HashMap<u32, f64>,
    /// Statements run so far (`pg_stat_statements`), if the server tracks them.
    statements: Option<i64>,
}

/// The WAL position, and a transaction id (assigned to this reading's own
/// transaction: ids go only to transactions that write, so the difference between two
/// readings, less one, counts the write transactions in between, at once and exactly;
/// `pg_stat_database` lags by up to ten seconds).
const POSITION: &str = "SELECT pg_current_wal_lsn()::text, pg_current_xact_id()::text::bigint";

impl PgProbe {
    /// Connects with the libpq connection string the relays use.
    pub async fn connect(conn_str: &str) -> Result<PgProbe, LoadError> {
        let (client, connection) = tokio_postgres::connect(conn_str, NoTls)
            .await
            .map_err(|e| format!("connecting to PostgreSQL for the WAL reading: {e}"))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        // Counts statements where the server preloads the module (`tern-load`'s own
        // database does); elsewhere the figure is left out.
        let _ = client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await;
        Ok(PgProbe { client, task })
    }

    /// The counters now.
    pub async fn read(&self) -> Result<PgReading, LoadError> {
        let position = self.client.query_one(POSITION, &[]).await?;
        let pids = self
            .client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
                &[],
            )
            .await?;
        let cpu_by_pid = pids
            .iter()
            .filter_map(|r| u32::try_from(r.get::<_, i32>(0)).ok())
            .filter_map(|pid| Some((pid, process_cpu_seconds(pid)?)))
            .collect();
        let statements = self
            .client
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get(0));
        Ok(PgReading {
            lsn: position.get(0),
            xid: position.get(1),
            cpu_by_pid,
            statements,
        })
    }

    /// The figures per message since `before`, for `messages` moved, as report fields:
    /// `wal_bytes_per_msg`, `pg_write_xacts_per_msg`, (with the server on this
    /// machine) `pg_cpu_us_per_msg` and (with `pg_stat_statements` loaded)
    /// `pg_statements_per_msg`.
    pub async fn since(
        &self,
        before: &PgReading,
        messages: u64,
    ) -> Result<BTreeMap<String, f64>, LoadError> {
        let wal: f64 = self
            .client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
                &[&before.lsn],
            )
            .await?
            .get(0);
        let now = self.read().await?;
        // A backend that started during the run counts in full; one that ended is
        // missed (the relays' pools keep theirs).
        let cpu: f64 = now
            .cpu_by_pid
            .iter()
            .map(|(pid, c)| c - before.cpu_by_pid.get(pid).copied().unwrap_or(0.0))
            .sum();
        let per = |x: f64| x / messages.max(1) as f64;
        let mut out = BTreeMap::new();
        out.insert("wal_bytes_per_msg".into(), per(wal));
        // Less the id of `before`'s own transaction.
        let xacts = (now.xid - before.xid - 1).max(0);
        out.insert("pg_write_xacts_per_msg".into(), per(xacts as f64));
        if !now.cpu_by_pid.is_empty() {
            out.insert("pg_cpu_us_per_msg".into(), per(cpu * 1e6));
        }
        if let (Some(a), Some(b)) = (before.statements, now.statements) {
            // Less this probe's own three per reading.
            out.insert(
                "pg_statements_per_msg".into(),
                per((b - a - 3).max(0) as f64),
            );
        }
        Ok(out)
    }
}

impl Drop for PgProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
