//! Group epochs in PostgreSQL (`migrations/V12__groups.sql`): one row per handle,
//! moved by a compare-and-set `UPDATE`, and a per-handle advisory lock that a commit
//! holds across nodes while it appends and moves the epoch.

use tokio_postgres::error::SqlState;

use super::rows::{col, fixed, signed, u32_of, unsigned};
use super::PgBackend;
use crate::store::{GroupLock, GroupState, GroupStore, HandleBytes, StoreError, StoreResult};

/// The first key of a handle's advisory lock (PostgreSQL's two-key space; see
/// `blobs::BLOB_LOCKS`). The second is the handle's first four bytes: handles are
/// random, and two sharing them only wait for each other.
const GROUP_LOCKS: i32 = 7263_0018;

fn state_of(row: &tokio_postgres::Row) -> StoreResult<GroupState> {
    Ok(GroupState {
        epoch: unsigned(col(row, 0)?, "group epoch")?,
        token_hash: fixed(col::<&[u8]>(row, 1)?)?,
        last_commit_id: fixed(col::<&[u8]>(row, 2)?)?,
        touched_day: u32_of(col(row, 3)?, "group day")?,
    })
}

/// A pooled connection in a transaction holding a handle's lock; rolled back (which
/// releases it) when dropped.
struct Held(Option<deadpool_postgres::Object>);

impl Drop for Held {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            // Never back to the pool mid-transaction: closing the connection ends it.
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

impl GroupStore for PgBackend {
    fn insert_group(&self, handle: &HandleBytes, state: &GroupState) -> StoreResult<()> {
        let (epoch, day) = (signed(state.epoch)?, i64::from(state.touched_day));
        let n = self.run(self.exec(
            "INSERT INTO group_epochs (handle, epoch, token_hash, last_commit_id, touched_day) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (handle) DO NOTHING",
            &[
                &&handle[..],
                &epoch,
                &&state.token_hash[..],
                &&state.last_commit_id[..],
                &day,
            ],
        ))?;
        if n == 0 {
            return Err(StoreError::Exists);
        }
        Ok(())
    }

    fn group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupState>> {
        let rows = self.run(self.rows(
            "SELECT epoch, token_hash, last_commit_id, touched_day FROM group_epochs \
             WHERE handle = $1",
            &[&&handle[..]],
        ))?;
        rows.first().map(state_of).transpose()
    }

    fn advance_group(
        &self,
        handle: &HandleBytes,
        from: &GroupState,
        to: &GroupState,
    ) -> StoreResult<bool> {
        let (from_epoch, to_epoch) = (signed(from.epoch)?, signed(to.epoch)?);
        let (from_day, to_day) = (i64::from(from.touched_day), i64::from(to.touched_day));
        let n = self.run(self.exec(
            "UPDATE group_epochs SET epoch = $5, token_hash = $6, last_commit_id = $7, \
             touched_day = $8 WHERE handle = $1 AND epoch = $2 AND token_hash = $3 \
             AND last_commit_id = $4 AND touched_day = $9",
            &[
                &&handle[..],
                &from_epoch,
                &&from.token_hash[..],
                &&from.last_commit_id[..],
                &to_epoch,
                &&to.token_hash[..],
                &&to.last_commit_id[..],
                &to_day,
                &from_day,
            ],
        ))?;
        Ok(n == 1)
    }

    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64> {
        let (day, max) = (i64::from(before_day), signed(max as u64)?);
        self.run(self.exec(
            "DELETE FROM group_epochs WHERE handle IN ( \
               SELECT handle FROM group_epochs WHERE touched_day < $1 LIMIT $2 \
               FOR UPDATE SKIP LOCKED) AND touched_day < $1",
            &[&day, &max],
        ))
    }

    fn groups_after(
        &self,
        after: Option<&HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(HandleBytes, GroupState)>> {
        let after: &[u8] = after.map_or(&[], |a| &a[..]);
        let max = signed(max as u64)?;
        let rows = self.run(self.rows(
            "SELECT epoch, token_hash, last_commit_id, touched_day, handle FROM group_epochs \
             WHERE handle > $1 ORDER BY handle LIMIT $2",
            &[&after, &max],
        ))?;
        rows.iter()
            .map(|r| Ok((fixed(col::<&[u8]>(r, 4)?)?, state_of(r)?)))
            .collect()
    }

    fn lock_group(&self, handle: &HandleBytes) -> StoreResult<GroupLock> {
        let key = i32::from_be_bytes([handle[0], handle[1], handle[2], handle[3]]);
        let held = self.run(async {
            let client = self.client().await?;
            let locked = async {
                client.batch_execute("BEGIN").await?;
                let lock = client
                    .prepare_cached("SELECT pg_advisory_xact_lock($1, $2)")
                    .await?;
                client.execute(&lock, &[&GROUP_LOCKS, &key]).await
            }
            .await;
            match locked {
                Ok(_) => Ok(Held(Some(client))),
                Err(e) => {
                    // Inside a transaction: never back to the pool.
                    drop(deadpool_postgres::Object::take(client));
                    if e.code() == Some(&SqlState::QUERY_CANCELED) {
                        return Err(StoreError::Unavailable(
                            "a group's lock is held too long by another node".into(),
                        ));
                    }
                    Err(self.classify(&e))
                }
            }
        })?;
        Ok(GroupLock(Some(Box::new(held))))
    }
}

#[cfg(test)]
mod tests;
