//! Versioned schema migrations (refinery), applied at start under an advisory lock.
//!
//! refinery takes no lock of its own, so nodes starting together would race to apply the
//! same version; the first to take [`MIGRATION_LOCK`] migrates, the others then find every
//! version applied. Versions are reserved per package so parallel branches never collide:
//! V1 cluster facts, V2 mailboxes, V3–V4 accounts, keys, discovery, V5 blobs, V6 nodes,
//! V7 the object GC queue, V8 the published discovery filter.
//! The files are plain SQL: no triggers, sequences or `LISTEN` (Citus and its peers).

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("src/store/pg/migrations");
}

/// The `pg_advisory_lock` key held while migrating (the digits name issue 15).
pub const MIGRATION_LOCK: i64 = 7263_0015;

/// A migration that could not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database refused or lost the connection (taking or releasing the lock).
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// A migration failed, or the database's history differs from this binary's.
    #[error("migration: {0}")]
    Migration(#[from] refinery::Error),
}

/// Applies every migration this binary has that the database lacks, one transaction for
/// them all, and returns the versions it applied (none when another node got there first).
pub async fn migrate(client: &mut Client) -> Result<Vec<u32>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner()
        .set_grouped(true)
        .set_abort_divergent(true)
        .run_async(client)
        .await;
    // Released even when a migration failed; a lost connection releases it too.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = report?;
    unlocked?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPostgres;

    async fn client(pg: &TestPostgres) -> Client {
        let (client, conn) = tokio_postgres::connect(&pg.conn_str("tern"), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_migrating_at_once_apply_each_version_once() {
        let pg = TestPostgres::start();
        pg.create_db("tern");
        let (mut a, mut b) = (client(&pg).await, client(&pg).await);
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { migrate(&mut a).await.map(|v| (v, a)) }),
            tokio::spawn(async move { migrate(&mut b).await.map(|v| (v, b)) }),
        );
        let (va, mut a) = ra.expect("join a").expect("migrate a");
        let (vb, _b) = rb.expect("join b").expect("migrate b");
        let mut applied = [va, vb].concat();
        applied.sort();
        let mut all: Vec<u32> = embedded::migrations::runner()
            .get_migrations()
            .iter()
            .map(|m| m.version())
            .collect();
        all.sort();
        assert_eq!(applied, all, "exactly one node applied each version");

        let rows = a
            .query(
                "SELECT version, count(*) FROM refinery_schema_history GROUP BY version",
                &[],
            )
            .await
            .expect("history");
        let history: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(history.len(), all.len());
        assert!(history.iter().all(|(_, n)| *n == 1), "{history:?}");
        for table in ["cluster", "leases", "nodes"] {
            let n: i64 = a
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .expect(table)
                .get(0);
            assert_eq!(n, 0);
        }
        // A restart finds nothing to do.
        assert_eq!(migrate(&mut a).await.expect("again"), Vec::<u32>::new());
    }

    /// A node of an older release (one that lacks a version the database has) does
    /// not start: refinery refuses a version it does not know (`abort_missing`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_binary_older_than_the_schema_refuses_it() {
        let pg = TestPostgres::start();
        pg.create_db("tern");
        let mut a = client(&pg).await;
        migrate(&mut a).await.expect("migrate");
        a.execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (9999, 'from_a_newer_release', '2026-11-30T00:00:00Z', '0')",
            &[],
        )
        .await
        .expect("a newer version");
        let refused = migrate(&mut a).await;
        assert!(
            matches!(&refused, Err(MigrateError::Migration(e)) if e.to_string().contains("9999")),
            "{refused:?}"
        );
    }
}
