//! A database per test, and backends on it as nodes of one relay.

#![allow(clippy::expect_used)]

use std::time::Duration;

use super::{PgBackend, PgOptions};
use crate::testing::TestPostgres;

/// A fresh cluster with database `tern`, and options for it with short deadlines.
pub(crate) fn db() -> (TestPostgres, PgOptions) {
    let pg = TestPostgres::start();
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

/// Stages one envelope to each of `first` and `second` (queued one after the other,
/// so that they can share a batch) and returns each one's answer.
pub(crate) fn append_pair(
    b: &PgBackend,
    first: (&tern_proto::DeviceAddress, crate::store::Envelope),
    second: (&tern_proto::DeviceAddress, crate::store::Envelope),
) -> (
    crate::store::StoreResult<Vec<u64>>,
    crate::store::StoreResult<Vec<u64>>,
) {
    let stage = |(to, m): (&tern_proto::DeviceAddress, crate::store::Envelope)| {
        b.queue_append(to, &[m], 1_000, 9_000).expect("stage")
    };
    let (x, y) = (stage(first), stage(second));
    let x = b.run(async { Ok(x.await.expect("answer")) }).expect("run");
    let y = b.run(async { Ok(y.await.expect("answer")) }).expect("run");
    (x, y)
}
