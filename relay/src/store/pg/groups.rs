//! Group epochs in PostgreSQL (`migrations/V12__groups.sql`): one row per handle,
//! moved by a compare-and-set `UPDATE`. A commit locks its handle's row (`SELECT …
//! FOR UPDATE`) in a transaction on one pooled connection, holds it across nodes
//! while it appends, and moves the epoch and commits on that same connection: one
//! connection per commit, taken only for a handle that exists. The sweep skips
//! locked rows.

use tokio_postgres::error::SqlState;

use super::rows::{col, fixed, signed, u32_of, unsigned};
use super::PgBackend;
use crate::store::{GroupLock, GroupState, GroupStore, HandleBytes, StoreError, StoreResult};

/// The compare-and-set that moves an epoch: $1 the handle, $2–$4 and $9 the state
/// as read, $5–$8 the new one.
const ADVANCE: &str = "UPDATE group_epochs SET epoch = $5, token_hash = $6, \
    last_commit_id = $7, touched_day = $8 WHERE handle = $1 AND epoch = $2 \
    AND token_hash = $3 AND last_commit_id = $4 AND touched_day = $9";

/// A handle's row, locked until the transaction ends.
const LOCK: &str = "SELECT epoch, token_hash, last_commit_id, touched_day FROM group_epochs \
    WHERE handle = $1 FOR UPDATE";

fn state_of(row: &tokio_postgres::Row) -> StoreResult<GroupState> {
    Ok(GroupState {
        epoch: unsigned(col(row, 0)?, "group epoch")?,
        token_hash: fixed(col::<&[u8]>(row, 1)?)?,
        last_commit_id: fixed(col::<&[u8]>(row, 2)?)?,
        touched_day: u32_of(col(row, 3)?, "group day")?,
    })
}

/// How long a dropped [`Held`] waits for its `ROLLBACK` (which may queue behind a
/// lock wait given up at its deadline) before it closes the connection instead.
const ROLLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A pooled connection in a transaction (or about to begin one) holding a handle's
/// lock; rolled back (which releases it) when dropped, or closed.
struct Held(Option<deadpool_postgres::Object>);

impl Drop for Held {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    // Bounded: a database that does not answer keeps no pool slot.
                    let rolled =
                        tokio::time::timeout(ROLLBACK_WAIT, client.batch_execute("ROLLBACK")).await;
                    if !matches!(rolled, Ok(Ok(()))) {
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
        let values = Advance::of(handle, from, to)?;
        let n = self.run(self.exec(ADVANCE, &values.params()))?;
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

    fn lock_slots(&self) -> Option<usize> {
        // A quarter of the pool: the rest serves the appends the locks wait on.
        Some((self.pool.status().max_size / 4).max(1))
    }

    fn count_groups(&self) -> StoreResult<u64> {
        let rows = self.run(self.rows("SELECT count(*) FROM group_epochs", &[]))?;
        let n: i64 = col(rows.first().ok_or(StoreError::Corrupt("no count"))?, 0)?;
        unsigned(n, "group count")
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

    fn lock_group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupLock>> {
        self.run(self.lock_row(handle))
    }

    fn advance_locked(
        &self,
        handle: &HandleBytes,
        lock: GroupLock,
        to: &GroupState,
    ) -> StoreResult<bool> {
        let values = Advance::of(handle, lock.state(), to)?;
        let Some(mut held) = lock.into_held().and_then(|h| h.downcast::<Held>().ok()) else {
            return self
                .run(self.exec(ADVANCE, &values.params()))
                .map(|n| n == 1);
        };
        self.run(async move {
            let Some(client) = held.0.as_ref() else {
                return Err(StoreError::Backend(
                    "a group lock without its connection".into(),
                ));
            };
            let moved = async {
                let advance = client.prepare_cached(ADVANCE).await?;
                let n = client.execute(&advance, &values.params()).await?;
                client.batch_execute("COMMIT").await?;
                Ok(n)
            }
            .await;
            match moved {
                // Committed: the connection goes back to the pool.
                Ok(n) => {
                    drop(held.0.take());
                    Ok(n == 1)
                }
                // Rolled back (or closed) as `held` drops.
                Err(e) => Err(self.classify(&e)),
            }
        })
    }
}

impl PgBackend {
    /// [`GroupStore::lock_group`] as a future. The connection is in [`Held`] from
    /// the moment it is taken: a call given up at its deadline (the future dropped
    /// between `BEGIN` and the lock's answer) rolls back or closes it, never pools
    /// it inside the transaction.
    async fn lock_row(&self, handle: &HandleBytes) -> StoreResult<Option<GroupLock>> {
        let mut held = Held(Some(self.client().await?));
        let Some(client) = held.0.as_ref() else {
            return Err(StoreError::Backend(
                "a group lock without its connection".into(),
            ));
        };
        let read = async {
            client.batch_execute("BEGIN").await?;
            let lock = client.prepare_cached(LOCK).await?;
            client.query_opt(&lock, &[&&handle[..]]).await
        }
        .await;
        match read {
            Ok(Some(row)) => {
                let state = state_of(&row)?;
                Ok(Some(GroupLock::held(state, Box::new(held))))
            }
            Ok(None) => {
                // No row, no lock: the connection goes back at once.
                let rolled = client.batch_execute("ROLLBACK").await;
                if let Some(client) = held.0.take() {
                    if rolled.is_err() {
                        drop(deadpool_postgres::Object::take(client));
                    }
                }
                Ok(None)
            }
            Err(e) => {
                // Inside a transaction: never back to the pool.
                if let Some(client) = held.0.take() {
                    drop(deadpool_postgres::Object::take(client));
                }
                if e.code() == Some(&SqlState::QUERY_CANCELED) {
                    return Err(StoreError::Unavailable(
                        "a group's lock is held too long by another node".into(),
                    ));
                }
                Err(self.classify(&e))
            }
        }
    }
}

/// The values of one compare-and-set ([`ADVANCE`]), as PostgreSQL takes them.
struct Advance {
    handle: Vec<u8>,
    from: (i64, Vec<u8>, Vec<u8>, i64),
    to: (i64, Vec<u8>, Vec<u8>, i64),
}

impl Advance {
    fn of(handle: &HandleBytes, from: &GroupState, to: &GroupState) -> StoreResult<Advance> {
        let row = |s: &GroupState| -> StoreResult<(i64, Vec<u8>, Vec<u8>, i64)> {
            Ok((
                signed(s.epoch)?,
                s.token_hash.to_vec(),
                s.last_commit_id.to_vec(),
                i64::from(s.touched_day),
            ))
        };
        Ok(Advance {
            handle: handle.to_vec(),
            from: row(from)?,
            to: row(to)?,
        })
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        let (f, t) = (&self.from, &self.to);
        [&self.handle, &f.0, &f.1, &f.2, &t.0, &t.1, &t.2, &t.3, &f.3]
    }
}

#[cfg(test)]
mod tests;
