//! A batch of acks alone: one round trip on a connection that commits without
//! waiting for the flush, then a durability barrier before the callers hear.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use deadpool_postgres::Pool;
use tern_proto::DeviceAddress;

use super::sql::{HeadCols, LOCK_HEADS, REMOVE};
use super::{addr_of, removal_cols, Failure, Open, Outcome, Part, TotalsDelta, UsageCache, Writer};
use crate::store::StoreError;

/// A durability barrier shared by every caller waiting at the time: one transaction
/// that commits synchronously. It writes a record to the WAL (a transactional logical
/// message, which takes no lock; a transaction that only takes an id would commit
/// without waiting), so its commit waits for the flush and for a synchronous standby.
/// The WAL is flushed in order, so it makes durable every commit that returned
/// before it began, on the same server with nothing lost in between: it also reads
/// the live seq epoch, which a crash or failover replaces (V16), and a caller whose
/// batch committed under another epoch is failed (its commit may be gone).
///
/// When callers came while the last barrier ran (traffic, not one client waiting on
/// each answer), the next waits [`GATHER`] before it begins, so that the batches
/// committing meanwhile share it: fewer synchronous transactions, for a millisecond
/// more before a sender hears (deliveries never wait for a barrier).
pub(in crate::store::pg) struct Barrier {
    /// One barrier at a time.
    turn: tokio::sync::Mutex<()>,
    /// Barriers begun.
    begun: AtomicU64,
    /// The last barrier that completed.
    done: AtomicU64,
    /// The seq floor of the live epoch the last completed barrier found (`NONE`: none).
    live: AtomicI64,
    /// Calls so far, and how many there had been when the last barrier began.
    arrived: AtomicU64,
    arrived_at_last: AtomicU64,
}

/// See [`Barrier`].
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);

impl Default for Barrier {
    fn default() -> Self {
        Barrier {
            turn: Default::default(),
            begun: AtomicU64::new(0),
            done: AtomicU64::new(0),
            live: AtomicI64::new(NONE),
            arrived: AtomicU64::new(0),
            arrived_at_last: AtomicU64::new(0),
        }
    }
}

/// No live epoch (never a floor: floors are multiples of 2^40, at least 0).
const NONE: i64 = -1;

impl Barrier {
    /// Returns once a barrier begun after this call has committed, on the server that
    /// committed the caller's batch under the seq floor `floor` without losing
    /// anything since (`None`: the batch changed nothing, so there is nothing to lose).
    pub(super) async fn after(
        &self,
        pool: &Pool,
        hosts: &str,
        floor: Option<i64>,
    ) -> Result<(), Failure> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let need = self.begun.load(Ordering::SeqCst) + 1;
        let turn = self.turn.lock().await;
        if self.done.load(Ordering::SeqCst) < need {
            // Others came since the last barrier began: wait for company. Who comes
            // meanwhile needs this barrier (it has not begun) and shares it.
            let since =
                self.arrived.load(Ordering::SeqCst) - self.arrived_at_last.load(Ordering::SeqCst);
            if since > 1 {
                tokio::time::sleep(GATHER).await;
            }
            self.arrived_at_last
                .store(self.arrived.load(Ordering::SeqCst), Ordering::SeqCst);
            let no = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
            let open = Open::from(pool, hosts).await?;
            let row = open
                .client()?
                .query_one(
                    "SELECT (SELECT (epoch - 1) << 40 FROM seq_epoch_live WHERE id = 0) \
                     FROM pg_logical_emit_message(true, 'tern', '')",
                    &[],
                )
                .await?;
            open.committed();
            let live: Option<i64> = row.try_get(0)?;
            // Before `done`: whoever sees this barrier done sees its epoch (or a newer one).
            self.live.store(live.unwrap_or(NONE), Ordering::SeqCst);
            self.done.store(no, Ordering::SeqCst);
        }
        drop(turn);
        match floor {
            Some(f) if f != self.live.load(Ordering::SeqCst) => {
                Err(Failure::Epoch(StoreError::Unavailable(format!(
                    "PostgreSQL at {hosts}: the server restarted or failed over before \
                     the commit was durable (it may be lost)"
                ))))
            }
            _ => Ok(()),
        }
    }
}

impl Writer {
    /// Returns once a barrier covers a batch committed under the seq floor `floor`
    /// (at once under `durability = "os"`). When the live epoch changed under it, the
    /// lazy pool's idle connections go too: their floors are stale, and every batch on
    /// them would fail here again.
    pub(super) async fn durable(&self, floor: Option<i64>) -> Result<(), Failure> {
        let Some(barrier) = &self.barrier else {
            return Ok(());
        };
        let result = barrier.after(&self.pool, &self.hosts, floor).await;
        if matches!(result, Err(Failure::Epoch(_))) {
            self.lazy.retain(|_, _| false);
        }
        result
    }

    /// A batch of removals (acks): one round trip, a transaction that locks their
    /// heads in (account, device) order, then deletes the rows, updates the heads and
    /// the totals slot in one statement, and commits without waiting for the flush, so
    /// the heads are free at once; then a [`Barrier`] before the callers hear.
    pub(super) async fn remove(
        &self,
        parts: &BTreeMap<DeviceAddress, Part>,
        totals_slot: i32,
    ) -> Result<Outcome, Failure> {
        let started = Instant::now();
        let del = removal_cols(parts);
        if del.accounts.is_empty() {
            return Ok(Outcome::default());
        }
        let mut heads = HeadCols::default();
        for to in parts
            .iter()
            .filter(|(_, p)| !p.removes.is_empty())
            .map(|(to, _)| to)
        {
            heads.push(to, 0);
        }
        let open = Open::from(&self.lazy, &self.hosts).await?;
        let tx = open.client()?;
        let lock_st = tx.prepare_cached(LOCK_HEADS).await?;
        let remove_st = tx.prepare_cached(REMOVE).await?;
        let begin = self.begin(started)?;
        // One round trip: the heads first, in (account, device) order, as every
        // mailbox transaction takes them; then the rows.
        let (began, locked, deleted, committed) = futures::join!(
            tx.batch_execute(&begin),
            async { tx.query(&lock_st, &[&heads.accounts, &heads.devices]).await },
            async {
                tx.query(
                    &remove_st,
                    &[&del.accounts, &del.devices, &del.a, &totals_slot],
                )
                .await
            },
            tx.batch_execute("COMMIT"),
        );
        began?;
        let locked = locked?;
        let rows = deleted?;
        committed?;
        let floor = match locked.first() {
            Some(row) => Some(row.try_get::<_, i64>(0)?),
            None => None,
        };
        open.committed();
        let mut out = Outcome::default();
        let mut delta = TotalsDelta::default();
        removed(&rows, &mut out, &mut delta, &self.usage)?;
        // Committed (visible to every node, the heads free again): counted now, even
        // should the barrier fail.
        self.totals.apply(delta);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .rows
            .fetch_add(del.accounts.len() as u64, Ordering::Relaxed);
        // Durable before answered.
        self.durable(floor).await?;
        Ok(out)
    }
}

/// Reads the rows of [`REMOVE`] into `out` (what was deleted) and `delta` (what the
/// statement took from the totals slot), and forgets the usage of the mailboxes it
/// changed (read again when next needed: a batch on another lane may set a newer
/// value meanwhile).
pub(super) fn removed(
    rows: &[tokio_postgres::Row],
    out: &mut Outcome,
    delta: &mut TotalsDelta,
    usage: &UsageCache,
) -> Result<(), Failure> {
    for row in rows {
        let kind: i32 = row.try_get(0)?;
        let (a, b): (i64, i64) = (row.try_get(3)?, row.try_get(4)?);
        // A body deleted with its last entry.
        if kind == 2 {
            delta.bytes -= a;
            continue;
        }
        let to = addr_of(row.try_get(1)?, row.try_get(2)?).map_err(Failure::Other)?;
        if kind == 0 {
            out.deleted.push((to, a as u64, b.max(0) as u64));
            delta.messages -= 1;
            // The relay's bytes: the part (the body goes with its last entry).
            delta.bytes -= row.try_get::<_, i64>(5)?;
        } else {
            delta.mailboxes -= i64::from(a == 0);
            usage.forget(&to);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::Barrier;
    use crate::store::pg::testdb::{db, execute, node, sql};

    /// A barrier answers only batches committed under the live epoch: after a crash
    /// (which empties the live epoch) or under another epoch, the batch may be lost.
    #[test]
    fn a_barrier_fails_a_batch_committed_under_another_epoch() {
        let (_pg, opts) = db();
        let b = node(&opts, "a");
        execute(&b, "INSERT INTO seq_epoch_live VALUES (0, 3)", &[]);
        let barrier = Barrier::default();
        let after = |floor: Option<i64>| {
            b.run(async { Ok(barrier.after(&b.pool, "db", floor).await.is_ok()) })
                .expect("run")
        };
        assert!(after(Some(2 << 40)), "the live epoch's floor");
        assert!(after(None), "a batch that changed nothing");
        assert!(!after(Some(1 << 40)), "an older epoch's floor");
        sql(&b, "DELETE FROM seq_epoch_live");
        assert!(
            !after(Some(2 << 40)),
            "no live epoch: the server lost its tail"
        );
        // The first epoch's floor is 0, which must not pass for "none live".
        assert!(!after(Some(0)), "floor 0 with no live epoch");
        execute(&b, "INSERT INTO seq_epoch_live VALUES (0, 1)", &[]);
        assert!(after(Some(0)), "floor 0 under the first epoch");
    }
}
