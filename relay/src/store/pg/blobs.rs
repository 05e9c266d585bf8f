//! The blob index in PostgreSQL (`migrations/V5__blobs.sql`), with the contract of
//! [`BlobIndex`]: a blob's row names no account; charges (one row per account and UTC
//! day) and unfinished uploads are all that tie an account to media. Deleted blobs
//! whose objects may remain wait in `object_gc` (`migrations/V7__object_gc.sql`).

use tern_platform::clock::UnixMillis;
use tern_proto::AccountId;
use tokio_postgres::error::SqlState;

use super::lease::NOW_MS;
use super::rows::{account_of, exec_in, fixed, query_in, signed, transaction, unsigned};
use super::PgBackend;
use crate::store::{utc_day, BlobId, BlobIndex, BlobMeta, StoreResult, UploadMeta};

const BLOB_COLUMNS: &str = "size, created_at, last_used_at, expires_at";

/// The first key of every blob's advisory lock (see `BlobIndex::with_blob_lock`), in
/// PostgreSQL's two-key space, which never overlaps the single-key space of
/// [`super::migrate::MIGRATION_LOCK`]. The second key is the id's first four bytes:
/// ids are SHA-256 digests, and two blobs sharing them only wait for each other.
pub(crate) const BLOB_LOCKS: i32 = 7263_0015;

/// Blob `id`'s advisory lock keys.
pub(crate) fn blob_lock_key(id: &BlobId) -> (i32, i32) {
    (BLOB_LOCKS, i32::from_be_bytes([id[0], id[1], id[2], id[3]]))
}

/// Begins a transaction on `client` and takes the advisory lock `key` in it (with
/// `wait`, for at most the session's statement timeout); whether it got it.
async fn lock_in_transaction(
    client: &deadpool_postgres::Object,
    (class, key): (i32, i32),
    wait: bool,
) -> Result<bool, tokio_postgres::Error> {
    // The holder calls the object store meanwhile (a copy may take minutes): no idle
    // limit in this transaction. The lock ends with it, or with the session.
    client
        .batch_execute("BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0")
        .await?;
    if wait {
        let lock = client
            .prepare_cached("SELECT pg_advisory_xact_lock($1, $2)")
            .await?;
        match client.execute(&lock, &[&class, &key]).await {
            Ok(_) => Ok(true),
            // The statement timeout: held by another for that long.
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => Ok(false),
            Err(e) => Err(e),
        }
    } else {
        let lock = client
            .prepare_cached("SELECT pg_try_advisory_xact_lock($1, $2)")
            .await?;
        client.query_one(&lock, &[&class, &key]).await?.try_get(0)
    }
}

impl PgBackend {
    fn blob_meta(&self, row: &tokio_postgres::Row) -> StoreResult<BlobMeta> {
        let at = |i| unsigned(self.col(row, i)?, "blob record");
        Ok(BlobMeta {
            size: at(0)?,
            created_at: at(1)?,
            last_used_at: at(2)?,
            expires_at: at(3)?,
        })
    }

    fn one_blob(&self, rows: &[tokio_postgres::Row]) -> StoreResult<Option<BlobMeta>> {
        rows.first().map(|row| self.blob_meta(row)).transpose()
    }

    /// Deletes blob `id`'s record if it expires at or before `before`, and queues its
    /// object for deletion in the same transaction.
    fn remove_blob_before(&self, id: &BlobId, before: i64) -> StoreResult<Option<BlobMeta>> {
        let delete = format!(
            "DELETE FROM blobs WHERE blob_id = $1 AND expires_at <= $2 RETURNING {BLOB_COLUMNS}"
        );
        let queue = format!(
            "INSERT INTO object_gc (blob_id, queued_ms) VALUES ($1, {NOW_MS}) \
             ON CONFLICT (blob_id) DO NOTHING"
        );
        let blob = &id[..];
        let rows = self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                let rows = query_in(&tx, &delete, &[&blob, &before]).await?;
                // Queued with the deletion: a crash before the object goes leaves
                // this row for the next sweep, never an object no row names.
                if !rows.is_empty() {
                    exec_in(&tx, &queue, &[&blob]).await?;
                }
                rows
            })
        })?;
        self.one_blob(&rows)
    }
}

fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

impl BlobIndex for PgBackend {
    fn blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        let sql = format!("SELECT {BLOB_COLUMNS} FROM blobs WHERE blob_id = $1");
        let rows = self.run(self.rows(&sql, &[&&id[..]]))?;
        self.one_blob(&rows)
    }

    fn insert_blob(&self, id: &BlobId, meta: &BlobMeta, uploader: &AccountId) -> StoreResult<()> {
        let (size, created, used, expires) = (
            signed(meta.size)?,
            signed(meta.created_at)?,
            signed(meta.last_used_at)?,
            signed(meta.expires_at)?,
        );
        let day = signed(utc_day(meta.expires_at))?;
        let (blob, account) = (&id[..], &uploader.as_bytes()[..]);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "INSERT INTO blobs (blob_id, size, created_at, last_used_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (blob_id) DO UPDATE SET \
                     size = EXCLUDED.size, created_at = EXCLUDED.created_at, \
                     last_used_at = EXCLUDED.last_used_at, expires_at = EXCLUDED.expires_at",
                    &[&blob, &size, &created, &used, &expires],
                )
                .await?;
                // Saturating, as the embedded store's counter.
                exec_in(
                    &tx,
                    "INSERT INTO blob_charges (account, day, bytes) VALUES ($1, $2, $3) \
                     ON CONFLICT (account, day) DO UPDATE SET bytes = \
                     CASE WHEN blob_charges.bytes > 9223372036854775807 - EXCLUDED.bytes \
                     THEN 9223372036854775807 ELSE blob_charges.bytes + EXCLUDED.bytes END",
                    &[&account, &day, &size],
                )
                .await?;
                exec_in(
                    &tx,
                    "DELETE FROM uploads WHERE account = $1 AND blob_id = $2",
                    &[&account, &blob],
                )
                .await?;
                // Uploaded again after an expiry: the object is this blob's now.
                exec_in(&tx, "DELETE FROM object_gc WHERE blob_id = $1", &[&blob]).await?;
            })
        })
    }

    fn touch_blob(
        &self,
        id: &BlobId,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Option<BlobMeta>> {
        let sql = format!(
            "UPDATE blobs SET last_used_at = $2, expires_at = greatest(expires_at, $3) \
             WHERE blob_id = $1 RETURNING {BLOB_COLUMNS}"
        );
        let (now, expires_at) = (signed(now)?, signed(expires_at)?);
        let rows = self.run(self.rows(&sql, &[&&id[..], &now, &expires_at]))?;
        self.one_blob(&rows)
    }

    fn remove_blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        self.remove_blob_before(id, i64::MAX)
    }

    fn remove_expired_blob(&self, id: &BlobId, now: UnixMillis) -> StoreResult<Option<BlobMeta>> {
        self.remove_blob_before(id, signed(now).unwrap_or(i64::MAX))
    }

    fn blob_bytes(&self) -> StoreResult<Option<u64>> {
        let rows = self.run(self.rows(
            "SELECT least(coalesce(sum(size), 0), 9223372036854775807)::bigint FROM blobs",
            &[],
        ))?;
        match rows.first() {
            Some(row) => unsigned(self.col(row, 0)?, "blob bytes").map(Some),
            None => Ok(Some(0)),
        }
    }

    fn object_gc_pending(&self, max: usize) -> StoreResult<Vec<BlobId>> {
        // `queued_ms` is when the entry is due (see `queue_object_gc`).
        let sql = format!(
            "SELECT blob_id FROM object_gc WHERE queued_ms <= {NOW_MS} \
             ORDER BY queued_ms, blob_id LIMIT $1"
        );
        let rows = self.run(self.rows(&sql, &[&limit(max)]))?;
        rows.iter()
            .map(|row| fixed(self.col::<&[u8]>(row, 0)?))
            .collect()
    }

    fn object_gc_done(&self, id: &BlobId) -> StoreResult<()> {
        self.run(self.exec("DELETE FROM object_gc WHERE blob_id = $1", &[&&id[..]]))
            .map(drop)
    }

    fn queue_object_gc(&self, id: &BlobId, after: std::time::Duration) -> StoreResult<()> {
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX / 2);
        let sql = format!(
            "INSERT INTO object_gc (blob_id, queued_ms) VALUES ($1, {NOW_MS} + $2) \
             ON CONFLICT (blob_id) DO UPDATE SET \
             queued_ms = greatest(object_gc.queued_ms, EXCLUDED.queued_ms)"
        );
        self.run(self.exec(&sql, &[&&id[..], &after])).map(drop)
    }

    fn expired_blobs(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<BlobId>> {
        let now = signed(now).unwrap_or(i64::MAX);
        let rows = self.run(self.rows(
            "SELECT blob_id FROM blobs WHERE expires_at <= $1 \
             ORDER BY expires_at, blob_id LIMIT $2",
            &[&now, &limit(max)],
        ))?;
        rows.iter()
            .map(|row| fixed(self.col::<&[u8]>(row, 0)?))
            .collect()
    }

    fn account_bytes(&self, account: &AccountId, now: UnixMillis) -> StoreResult<u64> {
        let today = signed(utc_day(now))?;
        let rows = self.run(self.rows(
            "SELECT least(coalesce(sum(bytes), 0), 9223372036854775807)::bigint \
             FROM blob_charges WHERE account = $1 AND day >= $2",
            &[&&account.as_bytes()[..], &today],
        ))?;
        match rows.first() {
            Some(row) => unsigned(self.col(row, 0)?, "charge"),
            None => Ok(0),
        }
    }

    fn expire_charges(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let today = signed(utc_day(now))?;
        let n = self.run(self.exec(
            "DELETE FROM blob_charges WHERE (account, day) IN ( \
             SELECT account, day FROM blob_charges WHERE day < $1 \
             ORDER BY day LIMIT $2)",
            &[&today, &limit(max)],
        ))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<Option<UploadMeta>> {
        let rows = self.run(self.rows(
            "SELECT size, started_at, touched_at FROM uploads \
             WHERE account = $1 AND blob_id = $2",
            &[&&account.as_bytes()[..], &&id[..]],
        ))?;
        rows.first()
            .map(|row| {
                let at = |i| unsigned(self.col(row, i)?, "upload record");
                Ok(UploadMeta {
                    size: at(0)?,
                    started_at: at(1)?,
                    touched_at: at(2)?,
                })
            })
            .transpose()
    }

    fn put_upload(&self, account: &AccountId, id: &BlobId, meta: &UploadMeta) -> StoreResult<()> {
        let (size, started, touched) = (
            signed(meta.size)?,
            signed(meta.started_at)?,
            signed(meta.touched_at)?,
        );
        self.run(self.exec(
            "INSERT INTO uploads (account, blob_id, size, started_at, touched_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, blob_id) DO UPDATE SET \
             size = EXCLUDED.size, started_at = EXCLUDED.started_at, \
             touched_at = EXCLUDED.touched_at",
            &[
                &&account.as_bytes()[..],
                &&id[..],
                &size,
                &started,
                &touched,
            ],
        ))
        .map(drop)
    }

    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<()> {
        self.run(self.exec(
            "DELETE FROM uploads WHERE account = $1 AND blob_id = $2",
            &[&&account.as_bytes()[..], &&id[..]],
        ))
        .map(drop)
    }

    fn uploads_of(&self, account: &AccountId) -> StoreResult<Vec<(BlobId, u64)>> {
        let rows = self.run(self.rows(
            "SELECT blob_id, size FROM uploads WHERE account = $1 ORDER BY blob_id",
            &[&&account.as_bytes()[..]],
        ))?;
        rows.iter()
            .map(|row| {
                Ok((
                    fixed(self.col::<&[u8]>(row, 0)?)?,
                    unsigned(self.col(row, 1)?, "upload record")?,
                ))
            })
            .collect()
    }

    fn with_blob_lock(&self, id: &BlobId, wait: bool, f: &mut dyn FnMut()) -> StoreResult<bool> {
        let held = self.run(async {
            let client = self.client().await?;
            match lock_in_transaction(&client, blob_lock_key(id), wait).await {
                Ok(true) => Ok(Some(client)),
                Ok(false) => {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                    Ok(None)
                }
                // Inside a transaction: never back to the pool.
                Err(e) => {
                    drop(deadpool_postgres::Object::take(client));
                    Err(self.classify(&e))
                }
            }
        })?;
        let Some(client) = held else {
            return Ok(false);
        };
        f();
        // Nothing was written in it: its end only releases the lock. A failed end
        // leaves the connection in the transaction; dropped, it ends the session.
        let ended = self.run(async {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| self.classify(&e))
        });
        if let Err(e) = ended {
            tracing::debug!(error = %e, "a blob lock's transaction did not end; its connection is dropped");
            drop(deadpool_postgres::Object::take(client));
        }
        Ok(true)
    }

    // Every change above committed before it returned.
    fn flush_blobs(&self) -> StoreResult<()> {
        Ok(())
    }

    fn stale_uploads(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> StoreResult<Vec<(AccountId, BlobId)>> {
        let before = signed(before).unwrap_or(i64::MAX);
        let rows = self.run(self.rows(
            "SELECT account, blob_id FROM uploads WHERE touched_at < $1 \
             ORDER BY touched_at LIMIT $2",
            &[&before, &limit(max)],
        ))?;
        rows.iter()
            .map(|row| {
                Ok((
                    account_of(self.col::<&[u8]>(row, 0)?)?,
                    fixed(self.col::<&[u8]>(row, 1)?)?,
                ))
            })
            .collect()
    }

    fn charges_of(&self, account: &AccountId) -> StoreResult<Vec<(u64, u64)>> {
        let rows = self.run(self.rows(
            "SELECT day, bytes FROM blob_charges WHERE account = $1 ORDER BY day",
            &[&&account.as_bytes()[..]],
        ))?;
        rows.iter()
            .map(|row| {
                Ok((
                    unsigned(self.col(row, 0)?, "charge")?,
                    unsigned(self.col(row, 1)?, "charge")?,
                ))
            })
            .collect()
    }

    fn remove_account_media(&self, account: &AccountId) -> StoreResult<Vec<BlobId>> {
        let account = &account.as_bytes()[..];
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "DELETE FROM blob_charges WHERE account = $1",
                    &[&account],
                )
                .await?;
                let rows = query_in(
                    &tx,
                    "DELETE FROM uploads WHERE account = $1 RETURNING blob_id",
                    &[&account],
                )
                .await?;
                let mut ids = Vec::with_capacity(rows.len());
                for row in &rows {
                    ids.push(fixed(super::rows::col::<&[u8]>(row, 0)?)?);
                }
                ids
            })
        })
    }
}
