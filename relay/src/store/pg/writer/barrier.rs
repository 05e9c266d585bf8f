//! The durability barrier: what makes a batch committed without waiting for the flush
//! durable before its callers hear, sends and acks alike.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use deadpool_postgres::Pool;

use super::{Failure, Open, Writer};
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

/// The barrier's transaction: a WAL record, and the live epoch's seq floor.
const BARRIER: &str = "SELECT (SELECT (epoch - 1) << 40 FROM seq_epoch_live WHERE id = 0) \
     FROM pg_logical_emit_message(true, 'tern', '')";

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
            let client = open.client()?;
            // Prepared once per connection: a barrier is one round trip, not three
            // (parse, execute, close).
            let st = client.prepare_cached(BARRIER).await?;
            let row = client.query_one(&st, &[]).await?;
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
