//! A batch of acks alone: one round trip on a connection that commits without
//! waiting for the flush, then the durability barrier (`barrier.rs`) before the
//! callers hear.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tern_proto::DeviceAddress;

use super::super::mailboxes::usage_of;
use super::sql::{HeadCols, LOCK_HEADS, REMOVE};
use super::{
    addr_of, removal_cols, Failure, Lane, Open, Outcome, Part, TotalsDelta, UsageCache, Writer,
};

impl Writer {
    /// A batch of removals (acks): one round trip, a transaction that locks their
    /// heads in (account, device) order, then deletes the rows, updates the heads and
    /// the totals slot in one statement, and commits without waiting for the flush, so
    /// the heads are free at once; then a [`Barrier`] before the callers hear.
    pub(super) async fn remove(
        &self,
        parts: &BTreeMap<DeviceAddress, Part>,
        lane: Lane,
    ) -> Result<Outcome, Failure> {
        let started = Instant::now();
        let totals_slot = lane.totals_row(self.slot);
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
        drop(lane);
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
/// statement took from the totals slot), and records the usage of the mailboxes it
/// changed, exact as of this commit. A send batch on another lane may have committed
/// after it and recorded its newer value first: then the next send's check counts
/// that batch's messages short, once, and its own commit records the exact value
/// again (the usage check is soft, as across nodes). Forgetting the usage instead
/// cost every send after an ack a read before it could be appended. Returns the
/// mailboxes whose usage it recorded.
pub(super) fn removed(
    rows: &[tokio_postgres::Row],
    out: &mut Outcome,
    delta: &mut TotalsDelta,
    usage: &UsageCache,
) -> Result<std::collections::HashSet<DeviceAddress>, Failure> {
    let mut recorded = std::collections::HashSet::new();
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
            usage.set(to, usage_of(a, b));
            recorded.insert(to);
        }
    }
    Ok(recorded)
}
