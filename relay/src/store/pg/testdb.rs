//! A database per test, and backends on it as nodes of one relay.

#![allow(clippy::expect_used)]

use std::time::Duration;

use tokio::sync::oneshot;

use super::{PgBackend, PgOptions};
use crate::store::StoreResult;
use crate::testing::TestPostgres;

/// A fresh cluster with database `tern`, and options for it with short deadlines.
pub(crate) fn db() -> (TestPostgres, PgOptions) {
    db_with(&[])
}

/// [`db`] on a cluster with extra server `settings`.
pub(crate) fn db_with(settings: &[(&str, &str)]) -> (TestPostgres, PgOptions) {
    let pg = TestPostgres::start_with(settings);
    pg.create_db("tern");
    let mut opts = PgOptions::new(pg.conn_str("tern"));
    opts.connect_timeout = Duration::from_millis(500);
    opts.statement_timeout = Duration::from_millis(1000);
    // The mailbox conformance suite appends to accounts it never registers.
    opts.require_accounts = false;
    (pg, opts)
}

/// A backend (a relay node) named `id` on the database of `opts`.
pub(crate) fn node(opts: &PgOptions, id: &str) -> PgBackend {
    let mut opts = opts.clone();
    opts.node_id = id.to_owned();
    PgBackend::open(&opts).expect("open")
}

/// Creates the accounts schema's table of deletion intents (another package's; the
/// mailbox store alone does not), before the nodes that must see it start.
pub(crate) fn deletions_table(opts: &PgOptions) {
    sql(
        &node(opts, "setup"),
        "CREATE TABLE IF NOT EXISTS account_deletions \
         (account bytea PRIMARY KEY, devices bigint[] NOT NULL)",
    );
}

/// Records the intent to delete `account` (device 1), as a deletion on another node
/// leaves it before this node holds the tombstone.
pub(crate) fn begin_deletion(b: &PgBackend, account: &tern_proto::AccountId) -> u64 {
    execute(
        b,
        "INSERT INTO account_deletions VALUES ($1, '{1}')",
        &[&account.as_bytes().as_slice()],
    )
}

/// The rows of `statement` with `params`, through `b`'s pool (checks the traits do
/// not offer, and rows written behind the stores' backs).
pub(crate) fn query(
    b: &PgBackend,
    statement: &str,
    params: &super::rows::Params<'_>,
) -> Vec<tokio_postgres::Row> {
    b.run(b.rows(statement, params)).expect(statement)
}

/// [`query`] without parameters.
pub(crate) fn sql(b: &PgBackend, statement: &str) -> Vec<tokio_postgres::Row> {
    query(b, statement, &[])
}

/// The rows `statement` with `params` changed.
pub(crate) fn execute(b: &PgBackend, statement: &str, params: &super::rows::Params<'_>) -> u64 {
    b.run(b.exec(statement, params)).expect(statement)
}

/// A runtime and `n` sessions of its own on `pg`'s database `tern`: transactions a
/// test holds open beside the backends (locks they must wait for).
pub(crate) fn sessions(
    pg: &TestPostgres,
    n: usize,
) -> (tokio::runtime::Runtime, Vec<tokio_postgres::Client>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let clients = (0..n)
        .map(|_| {
            let (c, conn) = rt
                .block_on(tokio_postgres::connect(
                    &pg.conn_str("tern"),
                    tokio_postgres::NoTls,
                ))
                .expect("connect");
            rt.spawn(conn);
            c
        })
        .collect();
    (rt, clients)
}

/// Whether some session came to wait for a lock within about 400 ms, asked through `tx`
/// (a transaction holding the lock the test expects the writer to wait for).
pub(crate) async fn a_session_waits(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<bool, tokio_postgres::Error> {
    for _ in 0..400 {
        let r = tx
            .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
            .await?;
        if r.get::<_, i64>(0) > 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(false)
}

/// Runs `stage` (which queues writes) while the writer is held on a batch of its own,
/// so that everything it queues goes out in the next batch, one transaction. The
/// writer is held by a send to a gate mailbox whose head this session holds; the
/// gate's messages are removed again, so the totals are as if it had never been.
pub(crate) fn one_batch<T: Send + 'static>(
    b: &PgBackend,
    stage: impl FnOnce() -> StoreResult<T> + Send,
) -> T {
    use crate::store::conformance::{addr, msg};
    use crate::store::MailboxStore;
    let gate = addr(0xEE, 1);
    let mut seqs = b
        .append(&gate, &[msg(0xEE, 1)], 1_000, 9_000)
        .expect("gate");
    let key = super::keys::params(&gate);
    let (held, staged) = b
        .run(async {
            let e = |e: tokio_postgres::Error| b.classify(&e);
            let mut c = b.client().await?;
            let tx = c.transaction().await.map_err(e)?;
            tx.execute(
                "SELECT 1 FROM mailbox_heads WHERE account = $1 AND device = $2 FOR UPDATE",
                &[&key.0, &key.1],
            )
            .await
            .map_err(e)?;
            let held = b.queue_append(&gate, &[msg(0xEF, 1)], 1_000, 9_000)?;
            assert!(
                a_session_waits(&tx).await.map_err(e)?,
                "the gate never held"
            );
            let staged = stage()?;
            tx.rollback().await.map_err(e)?;
            Ok((held.await.expect("answer"), staged))
        })
        .expect("run");
    seqs.extend(held.expect("gate"));
    b.remove(&gate, &seqs).expect("gate removed");
    staged
}

/// The answer a queued write gets.
pub(crate) fn answer<R: Send + 'static>(b: &PgBackend, rx: oneshot::Receiver<R>) -> R {
    b.run(async { Ok(rx.await.expect("answer")) }).expect("run")
}

/// Stages one envelope to each of `first` and `second` in one batch ([`one_batch`])
/// and returns each one's answer.
pub(crate) fn append_pair(
    b: &PgBackend,
    first: (&tern_proto::DeviceAddress, crate::store::Envelope),
    second: (&tern_proto::DeviceAddress, crate::store::Envelope),
) -> (StoreResult<Vec<u64>>, StoreResult<Vec<u64>>) {
    let stage = |(to, m): (&tern_proto::DeviceAddress, crate::store::Envelope)| {
        b.queue_append(to, &[m], 1_000, 9_000)
    };
    let (x, y) = one_batch(b, || Ok((stage(first)?, stage(second)?)));
    (answer(b, x), answer(b, y))
}
