//! What the account, key and blob stores share: statements through the pool with one
//! retry, transactions with one retry, and checked conversions between the traits'
//! unsigned values and PostgreSQL's signed columns.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{is_retryable, PgBackend, StoreError, StoreResult};

/// Parameters of a statement.
pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// A failure inside a transaction: the database's (retried once when it is a
/// serialization failure or deadlock) or the store's own (a record that does not
/// decode, ids exhausted), which rolls back.
#[derive(Debug)]
pub(super) enum TxError {
    /// From the database.
    Db(tokio_postgres::Error),
    /// From the store's rules.
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

/// Runs `$body` inside a transaction `$tx` on the pooled client `$client` and commits;
/// runs it once more when the database chose it as a deadlock or serialization
/// victim. `$body` may use `?` on both database and store errors; an error rolls
/// back (the transaction is dropped uncommitted). Evaluates to a `StoreResult`.
macro_rules! transaction {
    ($backend:expr, $client:expr, |$tx:ident| $body:expr) => {{
        let mut retried = false;
        loop {
            let attempt: Result<_, $crate::store::pg::rows::TxError> = async {
                let $tx = $client.transaction().await?;
                let out = $body;
                $tx.commit().await?;
                Ok(out)
            }
            .await;
            match attempt {
                Ok(v) => break Ok(v),
                Err($crate::store::pg::rows::TxError::Db(e))
                    if !retried && $crate::store::pg::is_retryable(&e) =>
                {
                    retried = true;
                }
                Err($crate::store::pg::rows::TxError::Db(e)) => break Err($backend.classify(&e)),
                Err($crate::store::pg::rows::TxError::Store(e)) => break Err(e),
            }
        }
    }};
}
pub(super) use transaction;

impl PgBackend {
    /// One statement on a pooled connection (prepared once per connection), retried
    /// once on a serialization failure or deadlock; its rows.
    pub(super) async fn rows(&self, sql: &str, params: &Params<'_>) -> StoreResult<Vec<Row>> {
        let client = self.client().await?;
        self.retrying(|| async {
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        })
        .await
    }

    /// [`PgBackend::rows`] for a statement whose row count is the answer.
    pub(super) async fn exec(&self, sql: &str, params: &Params<'_>) -> StoreResult<u64> {
        let client = self.client().await?;
        self.retrying(|| async {
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, params).await
        })
        .await
    }

    /// [`col`], for the statements' callers.
    pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
        &self,
        row: &'a Row,
        i: usize,
    ) -> StoreResult<T> {
        col(row, i)
    }
}

/// Column `i` of `row` as `T`. A column missing, NULL where a value is wanted, or of
/// another type (a schema that drifted from the code) is [`StoreError::Backend`],
/// never a panic, and never `Unavailable` (a retry would not help). Converts into the
/// transactions' error types with `?`.
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
) -> StoreResult<T> {
    // The message names the column and the types, never a value.
    row.try_get(i)
        .map_err(|e| StoreError::Backend(format!("unexpected column: {e}")))
}

/// A u64 for a bigint column; beyond `i64::MAX` is refused, not wrapped.
pub(super) fn signed(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} is beyond a bigint")))
}

/// A bigint column as u64; a negative value is a corrupt record.
pub(super) fn unsigned(v: i64, what: &'static str) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

/// A bigint column holding a u32 (device id, key id, day).
pub(super) fn u32_of(v: i64, what: &'static str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(what))
}

/// A device id column.
pub(super) fn device_of(v: i64) -> StoreResult<tern_proto::DeviceId> {
    tern_proto::DeviceId::new(u32_of(v, "device id")?).ok_or(StoreError::Corrupt("device id"))
}

/// A day column: `NULL` is unknown.
pub(super) fn day_of(v: Option<i64>) -> StoreResult<Option<u32>> {
    v.map(|d| u32_of(d, "day")).transpose()
}

/// A bytea column of a fixed length.
pub(super) fn fixed<const N: usize>(v: &[u8]) -> StoreResult<[u8; N]> {
    crate::store::codec::fixed(v)
}

/// An account id column.
pub(super) fn account_of(v: &[u8]) -> StoreResult<tern_proto::AccountId> {
    Ok(tern_proto::AccountId(fixed(v)?))
}

/// A statement in a transaction, prepared once per connection; its row count.
pub(super) async fn exec_in(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.execute(&statement, params).await
}

/// A statement in a transaction, prepared once per connection; its rows.
pub(super) async fn query_in(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query(&statement, params).await
}

/// [`query_in`] for at most one row.
pub(super) async fn opt_in(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_opt(&statement, params).await
}

/// [`query_in`] for exactly one row.
pub(super) async fn one_in(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<Row, tokio_postgres::Error> {
    let statement = tx.prepare_cached(sql).await?;
    tx.query_one(&statement, params).await
}

/// A u64 as the bigint column holding it (times and TATs clamp at `i64::MAX`).
pub(super) fn db_time(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored time back (a negative one, which this code never writes, reads as 0).
pub(super) fn time_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A discovery tag from its column.
pub(super) fn tag_of(v: &[u8]) -> StoreResult<tern_proto::discovery::Tag> {
    fixed(v).map(tern_proto::discovery::Tag)
}

/// Runs of a transaction that lost a race before [`PgBackend::tx_retrying`] gives up.
const ATTEMPTS: usize = 5;

/// Whether a transaction that failed with `e` lost a race and may run again.
fn lost_race(e: &tokio_postgres::Error) -> bool {
    is_retryable(e) || e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

impl PgBackend {
    /// Runs `op` on a fresh transaction until it commits, or fails with something
    /// other than a lost race, or has lost [`ATTEMPTS`] times.
    pub(super) async fn tx_retrying<T, F>(&self, op: F) -> StoreResult<T>
    where
        F: for<'t> Fn(&'t deadpool_postgres::Transaction<'t>) -> TxFuture<'t, T>,
    {
        let mut client = self.client().await?;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let result = async {
                let tx = client.transaction().await.map_err(TxError::Db)?;
                let out = op(&tx).await?;
                tx.commit().await.map_err(TxError::Db)?;
                Ok(out)
            }
            .await;
            match result {
                Ok(out) => return Ok(out),
                Err(TxError::Db(e)) if lost_race(&e) => last = Some(e),
                Err(TxError::Db(e)) => return Err(self.classify(&e)),
                Err(TxError::Store(e)) => return Err(e),
            }
        }
        Err(match last {
            Some(e) => self.classify(&e),
            None => StoreError::Backend("transaction did not run".into()),
        })
    }
}

/// One run of a transaction body.
pub(super) type TxFuture<'t, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, TxError>> + Send + 't>>;

/// Fixes a closure's signature as a transaction body (closures do not infer
/// higher-ranked lifetimes on their own).
pub(super) fn body<T, F>(f: F) -> F
where
    F: for<'t> Fn(&'t deadpool_postgres::Transaction<'t>) -> TxFuture<'t, T>,
{
    f
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::pg::testdb;

    #[test]
    fn a_column_of_another_type_or_null_is_a_backend_error_not_a_panic() {
        let (_pg, opts) = testdb::db();
        let backend = testdb::node(&opts, "a");
        let rows = backend
            .run(backend.rows("SELECT 7::int4, NULL::bigint, 'x'::text", &[]))
            .expect("rows");
        let row = &rows[0];
        assert_eq!(col::<i32>(row, 0).expect("right type"), 7);
        for e in [
            col::<i64>(row, 0).expect_err("int4 is no bigint"),
            col::<i64>(row, 1).expect_err("NULL"),
            col::<&[u8]>(row, 2).expect_err("text is no bytea"),
            col::<i64>(row, 9).expect_err("no such column"),
            backend.col::<i64>(row, 0).expect_err("through the backend"),
        ] {
            assert!(matches!(e, StoreError::Backend(_)), "{e:?}");
        }
        assert_eq!(col::<Option<i64>>(row, 1).expect("optional"), None);
    }
}
