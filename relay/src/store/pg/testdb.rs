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
