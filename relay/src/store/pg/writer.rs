//! The mailbox writer: one task per backend that turns every append and removal
//! queued meanwhile into one transaction, so concurrent sends and acks share commits
//! (a node is not capped at one commit per message).
//!
//! A batch takes at most [`MAX_ROWS`] rows or [`MAX_BYTES`] of payload. Its mailboxes
//! are sorted by (account, device) and their `mailbox_heads` rows locked in that
//! order first (every mailbox transaction locks heads first), so batches on two
//! nodes wait for one another rather than deadlock. A batch of removals only (acks)
//! is one round trip on a connection that commits without waiting for the flush,
//! answered after a durability barrier (`Barrier`). Up to [`PIPELINE`] transactions are in
//! flight: each batch takes its locks after the one before it, so within a mailbox
//! seqs follow queue order, and batches are answered in queue order. Each caller
//! hears after COMMIT; a failed transaction fails every item in it with
//! [`StoreError::Unavailable`], and nothing in it was acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tern_proto::{AccountId, DeviceAddress};
use tokio::sync::{mpsc, oneshot, Semaphore};

use bytes::Bytes;
use tern_proto::MessageId;

use super::bodies::INSERT_BODIES;
use super::classify;
use super::mailboxes::{addr_of, TotalsCache, TotalsDelta, UsageCache};
use super::rows::account_of;
use crate::store::{Envelope, SharedEntry, StoreError, StoreResult, Usage};

mod acks;
mod answer;
mod inserts;
mod sql;
use acks::Barrier;
use answer::totals_delta;
use inserts::inserts;
pub(super) use sql::ADD_TOTALS;
use sql::*;

/// In the error of an op failed before anything of it was written (it waited in the
/// queue past the deadline).
pub(super) const STALE: &str = "queued longer than";

/// Rows (messages appended plus seqs removed) one transaction takes at most.
pub const MAX_ROWS: usize = 4096;
/// Payload bytes one transaction takes at most.
pub const MAX_BYTES: usize = 8 << 20;

/// What a caller hands the writer.
pub(super) enum Op {
    Append {
        to: DeviceAddress,
        msgs: Vec<Envelope>,
        accepted_at: i64,
        expires_at: i64,
        reply: oneshot::Sender<StoreResult<Vec<u64>>>,
    },
    Remove {
        of: DeviceAddress,
        seqs: Vec<u64>,
        reply: oneshot::Sender<StoreResult<Usage>>,
    },
    /// A body stored once (as `id`) and one entry per mailbox pointing at it.
    AppendShared {
        id: [u8; 16],
        message_id: MessageId,
        body: Bytes,
        entries: Vec<SharedEntry>,
        accepted_at: i64,
        expires_at: i64,
        reply: oneshot::Sender<StoreResult<Vec<u64>>>,
    },
}

impl Op {
    fn rows(&self) -> usize {
        match self {
            Op::Append { msgs, .. } => msgs.len(),
            Op::Remove { seqs, .. } => seqs.len(),
            Op::AppendShared { entries, .. } => entries.len() + 1,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Append { msgs, .. } => msgs.iter().map(|m| m.payload.len()).sum(),
            Op::Remove { .. } => 0,
            Op::AppendShared { body, entries, .. } => {
                body.len() + entries.iter().map(|e| e.part.len()).sum::<usize>()
            }
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(e))),
            Op::Remove { reply, .. } => drop(reply.send(Err(e))),
            Op::AppendShared { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Counters of the writer's work, for tests and benches.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Rows (appended messages and removed seqs) in them.
    pub rows: AtomicU64,
}

/// What the writer task needs.
pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) hosts: String,
    pub(super) deadline: Duration,
    pub(super) slot: i32,
    /// Which appends the transaction refuses as to a deleted account.
    pub(super) accounts: AccountCheck,
    pub(super) totals: Arc<TotalsCache>,
    pub(super) usage: Arc<UsageCache>,
    pub(super) stats: Arc<WriterStats>,
    /// Connections whose commits do not wait for the WAL flush: a batch of acks
    /// releases its heads at once instead of holding them through an fsync.
    pub(super) lazy: Pool,
    /// Makes those commits durable before their callers hear (`None`: commits are
    /// not durable at once anyway, under `durability = "os"`).
    pub(super) barrier: Option<Barrier>,
}

/// Which appends a batch refuses, checked after the head locks (a purge locks the
/// heads before deleting, so it sees whatever passed the check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AccountCheck {
    /// None (the accounts schema is not applied).
    None,
    /// Appends to an account with a deletion intent.
    Intents,
    /// Those, and appends to an account without an `accounts` row: a send queued
    /// before a deletion on another node and committed after it finished (its
    /// intent removed) leaves nothing behind.
    IntentsAndRows,
}

/// One mailbox's part of a batch.
#[derive(Default)]
struct Part {
    /// Messages and payload bytes appended.
    appended: (i64, i64),
    /// The batch's appends to it, in queue order: the op's index, and for a shared
    /// append the index of this mailbox's entry.
    appends: Vec<(usize, usize)>,
    /// Seqs to remove, each with the index of the first removal naming it.
    removes: BTreeMap<u64, usize>,
}

/// What the transaction reports.
#[derive(Default)]
struct Outcome {
    /// Heads after the upsert: last seq, messages, bytes.
    heads: HashMap<DeviceAddress, (i64, i64, i64)>,
    refused: HashSet<DeviceAddress>,
    /// Deleted (mailbox, seq, the mailbox's bytes: payload, or part and body).
    deleted: Vec<(DeviceAddress, u64, u64)>,
}

/// How long a batch of fewer than [`ACK_GATHER_ROWS`] acks alone waits for more, at most.
const ACK_GATHER: Duration = Duration::from_millis(2);
/// See [`ACK_GATHER`].
const ACK_GATHER_ROWS: usize = 64;

/// Transactions in flight at once: the next batch takes its head locks while the ones
/// before it commit (their fsync), so commits overlap. Batches take their locks one
/// after another in queue order and are answered in queue order.
pub const PIPELINE: usize = 4;

/// A pooled connection inside a transaction of ours. Dropped before COMMIT (an error,
/// a deadline), it leaves the pool and closes, which rolls the transaction back: a
/// connection inside a transaction never goes back to the pool.
struct Open(Option<deadpool_postgres::Object>);

impl Open {
    /// A connection from `pool`, pooled again only once [`Open::committed`]: a
    /// statement given up at the deadline (a database that hangs) may still be
    /// answered later, and its connection must then not serve anyone else.
    async fn from(pool: &Pool, hosts: &str) -> Result<Open, Failure> {
        let client = pool
            .get()
            .await
            .map_err(|e| Failure::Other(super::pool_error(e, hosts)))?;
        Ok(Open(Some(client)))
    }

    fn client(&self) -> Result<&deadpool_postgres::Object, Failure> {
        self.0.as_ref().ok_or(Failure::Other(StoreError::Backend(
            "transaction closed".into(),
        )))
    }

    /// Committed: the connection may serve others again.
    fn committed(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// A batch's ops and its per-mailbox plan.
fn plan(ops: &[Op]) -> BTreeMap<DeviceAddress, Part> {
    let mut parts: BTreeMap<DeviceAddress, Part> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Append { to, msgs, .. } => {
                let part = parts.entry(*to).or_default();
                part.appended.0 += msgs.len() as i64;
                part.appended.1 += msgs.iter().map(|m| m.payload.len() as i64).sum::<i64>();
                part.appends.push((i, 0));
            }
            Op::AppendShared { body, entries, .. } => {
                for (j, e) in entries.iter().enumerate() {
                    let part = parts.entry(e.to).or_default();
                    part.appended.0 += 1;
                    part.appended.1 += SharedEntry::bytes(&e.part, body) as i64;
                    part.appends.push((i, j));
                }
            }
            // An empty removal is a barrier: answered once what was queued before it
            // has committed (batches are answered in order).
            Op::Remove { seqs, .. } if seqs.is_empty() => {}
            Op::Remove { of, seqs, .. } => {
                let part = parts.entry(*of).or_default();
                for &s in seqs.iter().filter(|&&s| (1..1 << 63).contains(&s)) {
                    part.removes.entry(s).or_insert(i);
                }
            }
        }
    }
    parts
}

/// How a batch is written.
enum Step {
    /// Nothing to write (barriers only).
    Nothing,
    /// Appends, maybe with removals: the heads are locked, the rest follows.
    Locked(Box<Locked>),
    /// Removals only: one statement.
    Removals,
}

/// What the first half of a batch's transaction leaves for the second.
struct Locked {
    open: Open,
    heads: HashMap<DeviceAddress, (i64, i64, i64)>,
    refused: HashSet<DeviceAddress>,
}

impl Writer {
    /// Serves `rx` until every sender is gone.
    pub(super) async fn serve(self, mut rx: mpsc::UnboundedReceiver<(Instant, Op)>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(PIPELINE));
        let mut previous: Option<oneshot::Receiver<()>> = None;
        let mut batch_no: i32 = 0;
        while let Some((queued, first)) = rx.recv().await {
            // Waiting for a slot lets the queue grow: a bigger batch next.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            // An op that waited in the queue past the deadline (the database is slow
            // or away) fails before anything of it is written: its caller hears
            // within a bounded time, and never "failed" for what then commits.
            let stale = |at: Instant| at.elapsed() > this.deadline;
            let mut ops = Vec::new();
            let (mut rows, mut bytes) = (0, 0);
            let mut next = Some((queued, first));
            // When a batch of acks alone stops waiting for more.
            let mut gather: Option<tokio::time::Instant> = None;
            // Whether every op kept is a removal (acks only).
            let mut removals = true;
            while let Some((at, op)) = next.take() {
                if stale(at) {
                    op.fail(this.stale());
                } else {
                    rows += op.rows();
                    bytes += op.bytes();
                    removals &= matches!(op, Op::Remove { .. });
                    ops.push(op);
                }
                if rows < MAX_ROWS && bytes < MAX_BYTES {
                    next = rx.try_recv().ok();
                    // A few acks alone wait a moment for more: each batch of them
                    // costs a transaction and a barrier, and nobody waits on an
                    // ack's answer to see a message.
                    if next.is_none() && rows < ACK_GATHER_ROWS && removals {
                        let until =
                            *gather.get_or_insert_with(|| tokio::time::Instant::now() + ACK_GATHER);
                        next = tokio::time::timeout_at(until, rx.recv())
                            .await
                            .ok()
                            .flatten();
                    }
                }
            }
            if ops.is_empty() {
                drop(slot);
                continue;
            }
            // Each transaction in flight adds into a totals row of its own: with one
            // row per node, its lock (held through COMMIT) would serialise the
            // pipeline's commits. Batches finish in order, so the PIPELINE in flight
            // are consecutive and their rows distinct.
            let totals_slot = (this.slot + batch_no) % TOTAL_SLOTS;
            batch_no = (batch_no + 1) % PIPELINE as i32;
            let parts = plan(&ops);
            // The locks are taken here, one batch after another: within a mailbox,
            // a later batch waits for an earlier one's commit, so seqs follow the queue.
            // A batch of removals only takes no seqs: its one statement needs no turn.
            let locked = if parts.is_empty() {
                Ok(Step::Nothing)
            } else if removals {
                Ok(Step::Removals)
            } else {
                this.bounded(this.lock(&parts))
                    .await
                    .map(|l| Step::Locked(Box::new(l)))
            };
            let (done, next) = oneshot::channel();
            let before = previous.replace(next);
            let this = this.clone();
            tokio::spawn(async move {
                let outcome = match locked {
                    Ok(Step::Nothing) => Ok(Outcome::default()),
                    Ok(Step::Locked(locked)) => {
                        this.bounded(this.finish(*locked, &ops, &parts, totals_slot))
                            .await
                    }
                    Ok(Step::Removals) => this.bounded(this.remove(&parts, totals_slot)).await,
                    Err(f) => Err(f),
                };
                if let Some(before) = before {
                    let _ = before.await;
                }
                match outcome {
                    Ok(outcome) => this.answer(ops, &parts, outcome),
                    Err(f) => this.fail(ops, f),
                }
                let _ = done.send(());
                drop(slot);
            });
        }
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Other(self.too_slow())),
        }
    }

    /// Why an op that waited in the queue past the deadline failed (nothing of it
    /// was sent to the database).
    fn stale(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL at {}: {STALE} {:?}, not written",
            self.hosts, self.deadline
        ))
    }

    fn too_slow(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "PostgreSQL at {}: no commit within {:?}",
            self.hosts, self.deadline
        ))
    }

    /// Fails every item of a batch whose transaction failed: nothing in it is
    /// acknowledged.
    fn fail(&self, ops: Vec<Op>, f: Failure) {
        let message = match f {
            Failure::Db(e) => classify(&e, &self.hosts).to_string(),
            Failure::Other(e) => e.to_string(),
        };
        for op in ops {
            op.fail(StoreError::Unavailable(message.clone()));
        }
    }

    /// BEGIN, the head locks (and counts), the deletion check: one round trip, as
    /// the three are pipelined (the server runs them in order, so the check runs
    /// after the locks are held).
    async fn lock(&self, parts: &BTreeMap<DeviceAddress, Part>) -> Result<Locked, Failure> {
        // Wrapped before BEGIN: a BEGIN given up at the deadline must not leave its
        // connection in the pool inside a transaction nobody commits.
        let open = Open::from(&self.pool, &self.hosts).await?;
        let tx = open.client()?;
        // Prepared first (once per connection), so that each statement below goes
        // out when first polled, in the order written.
        let upsert = tx.prepare_cached(UPSERT_HEADS).await?;
        let check = match self.accounts {
            AccountCheck::None => None,
            AccountCheck::Intents => Some(tx.prepare_cached(INTENTS).await?),
            AccountCheck::IntentsAndRows => Some(tx.prepare_cached(INTENTS_OR_NO_ROW).await?),
        };
        // 1. Lock (and create) every head of the batch, in order; count the appends.
        let mut cols = HeadCols::default();
        for (to, part) in parts {
            cols.push(to, part.appended.0, part.appended.0, part.appended.1);
        }
        // 2. After the locks: accounts being deleted (or gone) take no more messages
        //    (a purge locks the heads before deleting, so it sees whatever passed).
        let (accounts, devices): (Vec<&[u8]>, Vec<i64>) = parts
            .iter()
            .filter(|(_, p)| !p.appends.is_empty())
            .map(|(to, _)| (to.account.as_bytes().as_slice(), i64::from(to.device.get())))
            .unzip();
        let checked = async {
            match &check {
                Some(st) if !accounts.is_empty() => tx.query(st, &[&accounts, &devices]).await,
                _ => Ok(Vec::new()),
            }
        };
        let (began, rows, gone_rows) = futures::join!(
            tx.batch_execute("BEGIN"),
            async {
                tx.query(
                    &upsert,
                    &[&cols.accounts, &cols.devices, &cols.a, &cols.b, &cols.c],
                )
                .await
            },
            checked,
        );
        began?;
        let mut heads = HashMap::new();
        for row in rows? {
            let to = addr_of(row.try_get(0)?, row.try_get(1)?).map_err(Failure::Other)?;
            heads.insert(to, (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?));
        }
        // Each row a refused mailbox: its account, and its device (NULL: every device).
        let mut gone: HashSet<(AccountId, Option<u32>)> = HashSet::new();
        for r in gone_rows? {
            let account = account_of(r.try_get(0)?).map_err(Failure::Other)?;
            let device = r
                .try_get::<_, Option<i64>>(1)?
                .and_then(|d| u32::try_from(d).ok());
            gone.insert((account, device));
        }
        // And the appends to a closed head (its mailbox deleted): it returned no row.
        let refused = parts
            .iter()
            .filter(|(to, part)| {
                gone.contains(&(to.account, None))
                    || gone.contains(&(to.account, Some(to.device.get())))
                    || (!part.appends.is_empty() && !heads.contains_key(*to))
            })
            .map(|(to, _)| *to)
            .collect();
        Ok(Locked {
            open,
            heads,
            refused,
        })
    }

    /// The messages, the heads' and totals' changes, COMMIT.
    async fn finish(
        &self,
        locked: Locked,
        ops: &[Op],
        parts: &BTreeMap<DeviceAddress, Part>,
        totals_slot: i32,
    ) -> Result<Outcome, Failure> {
        let Locked {
            open,
            heads,
            refused,
        } = locked;
        let tx = open.client()?;
        // 3. The inserts and the deletions, pipelined.
        let (ins, bodies, mut shared_bytes) = inserts(ops, parts, &heads, &refused);
        let del = removal_cols(parts);
        // Prepared first (once per connection), so that each statement below goes out
        // when first polled, in the order written: the round trips are the inserts
        // and deletions (only when the batch deletes: the heads' decrements need
        // their answer), then the rest with COMMIT.
        let insert_st = tx.prepare_cached(INSERT_MESSAGES).await?;
        let bodies_st = tx.prepare_cached(INSERT_BODIES).await?;
        let delete_st = tx.prepare_cached(DELETE_MESSAGES).await?;
        let decrement_st = tx.prepare_cached(DECREMENT_HEADS).await?;
        let totals_st = tx.prepare_cached(ADD_TOTALS).await?;
        let forget_st = tx.prepare_cached(FORGET_EMPTY_HEADS).await?;
        let insert_bodies = async {
            if bodies.is_empty() {
                return Ok(0);
            }
            let ids: Vec<&[u8]> = bodies.iter().map(|b| b.id).collect();
            let payloads: Vec<&[u8]> = bodies.iter().map(|b| b.payload).collect();
            let expires: Vec<i64> = bodies.iter().map(|b| b.expires_at).collect();
            let refs: Vec<i64> = bodies.iter().map(|b| b.refs).collect();
            tx.execute(&bodies_st, &[&ids, &payloads, &expires, &refs])
                .await
        };
        let insert_messages = async {
            if ins.accounts.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &insert_st,
                &[
                    &ins.accounts,
                    &ins.devices,
                    &ins.seqs,
                    &ins.ids,
                    &ins.payloads,
                    &ins.accepted,
                    &ins.expires,
                    &ins.body_ids,
                    &ins.body_lens,
                ],
            )
            .await
        };
        let insert = async {
            let (b, m) = futures::join!(insert_bodies, insert_messages);
            Ok::<u64, tokio_postgres::Error>(b? + m?)
        };
        // With deletions, the inserts go out beside them; without, beside COMMIT.
        let mut deleted = Vec::new();
        let later = if del.accounts.is_empty() {
            Some(insert)
        } else {
            let delete = async {
                tx.query(&delete_st, &[&del.accounts, &del.devices, &del.a])
                    .await
            };
            let (inserted, deleted_rows) = futures::join!(insert, delete);
            inserted?;
            for row in deleted_rows? {
                // A body deleted with its last entry: the relay's bytes lose it.
                if row.try_get::<_, i32>(0)? == 2 {
                    shared_bytes -= row.try_get::<_, i64>(3)?;
                    continue;
                }
                let to = addr_of(row.try_get(1)?, row.try_get(2)?).map_err(Failure::Other)?;
                let seq: i64 = row.try_get(3)?;
                let (len, own): (i64, i64) = (row.try_get(4)?, row.try_get(5)?);
                // The relay's bytes keep an entry's body (other entries hold it).
                shared_bytes += len - own;
                deleted.push((to, seq as u64, len.max(0) as u64));
            }
            None
        };
        // 4. Heads less what was deleted or refused, and this node's totals slot.
        let mut less: BTreeMap<DeviceAddress, (i64, i64)> = BTreeMap::new();
        for (to, _, len) in &deleted {
            let e = less.entry(*to).or_default();
            e.0 += 1;
            e.1 += *len as i64;
        }
        // (A closed head took nothing: it has nothing to give back.)
        for to in refused.iter().filter(|to| heads.contains_key(*to)) {
            if let Some(part) = parts.get(to) {
                let e = less.entry(*to).or_default();
                e.0 += part.appended.0;
                e.1 += part.appended.1;
            }
        }
        let mut dec = HeadCols::default();
        for (to, (m, b)) in &less {
            dec.push(to, *m, *b, 0);
        }
        // A deleted account's heads leave nothing behind (the purge removed them).
        let mut gone = HeadCols::default();
        for to in &refused {
            gone.push(to, 0, 0, 0);
        }
        let mut delta = totals_delta(parts, &heads, &less);
        delta.bytes += shared_bytes;
        let inserted = async {
            match later {
                Some(insert) => insert.await,
                None => Ok(0),
            }
        };
        let decrement = async {
            if dec.accounts.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &decrement_st,
                &[&dec.accounts, &dec.devices, &dec.a, &dec.b],
            )
            .await
        };
        let totals = async {
            if delta.is_zero() {
                return Ok(0);
            }
            tx.execute(
                &totals_st,
                &[
                    &totals_slot,
                    &delta.messages,
                    &delta.bytes,
                    &delta.mailboxes,
                ],
            )
            .await
        };
        let forget = async {
            if gone.accounts.is_empty() {
                return Ok(0);
            }
            tx.execute(&forget_st, &[&gone.accounts, &gone.devices])
                .await
        };
        // COMMIT goes out behind them. Should one of them fail, the server answers the
        // COMMIT of the aborted transaction with a rollback: every result is checked
        // before the batch counts as committed.
        let (i, d, t, f, c) = futures::join!(
            inserted,
            decrement,
            totals,
            forget,
            tx.batch_execute("COMMIT")
        );
        i?;
        d?;
        t?;
        f?;
        c?;
        open.committed();
        self.totals.apply(delta);
        // Exact as of this commit: the heads were locked and changed by it.
        for (to, &(_, messages, bytes)) in &heads {
            if refused.contains(to) {
                continue;
            }
            let (m, b) = less.get(to).copied().unwrap_or_default();
            let usage = Usage {
                messages: (messages - m).max(0) as u64,
                bytes: (bytes - b).max(0) as u64,
            };
            self.usage.set(*to, usage);
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let rows = ops.iter().map(Op::rows).sum::<usize>() as u64;
        self.stats.rows.fetch_add(rows, Ordering::Relaxed);
        Ok(Outcome {
            heads,
            refused,
            deleted,
        })
    }
}

enum Failure {
    Db(tokio_postgres::Error),
    Other(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

/// The seqs a batch removes, as (account, device, seq) columns.
fn removal_cols(parts: &BTreeMap<DeviceAddress, Part>) -> HeadCols<'_> {
    let mut del = HeadCols::default();
    for (to, part) in parts {
        for &s in part.removes.keys() {
            del.push(to, s as i64, 0, 0);
        }
    }
    del
}
