//! The mailbox writer: one task per backend that turns every append and removal
//! queued meanwhile into one transaction, so concurrent sends and acks share commits
//! (a node is not capped at one commit per message).
//!
//! A batch takes at most [`MAX_ROWS`] rows or [`MAX_BYTES`] of payload. Its mailboxes
//! are sorted by (account, device) and their `mailbox_heads` rows locked in that
//! order first (every mailbox transaction locks heads first), so batches on two
//! nodes wait for one another rather than deadlock. A batch with sends is one
//! statement (heads, rows, bodies, totals: `send.rs`), its removals if any, and
//! COMMIT, sent at once; a batch of removals only (acks) is one round trip too. Both
//! commit without waiting for the flush, so a batch holds its heads for its round trip
//! only, not through an fsync (the next batch, and other nodes' acks, wait for them),
//! and are answered after a durability barrier (`Barrier`) that one synchronous commit
//! makes for every batch committed before it. Seen by readers before the flush, a send
//! may be delivered and then lost with the WAL's tail (a crash, a failover): its
//! connection's seq epoch (`take_epoch`) keeps its seqs from ever being handed out
//! again. Up to [`PIPELINE`] transactions are in flight (batches waiting for their
//! barrier, already committed, are not counted): each batch takes its locks after the
//! one before it, so within a mailbox seqs follow queue order, and batches are
//! answered in queue order. Each caller hears after its COMMIT and the barrier; a
//! failed transaction fails every item in it with [`StoreError::Unavailable`], and
//! nothing in it was acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tern_proto::DeviceAddress;
use tokio::sync::{mpsc, oneshot, Semaphore};

use bytes::Bytes;
use tern_proto::MessageId;

use super::classify;
use super::mailboxes::{addr_of, TotalsCache, TotalsDelta, UsageCache};
use crate::store::{Envelope, SharedEntry, StoreError, StoreResult, Usage};

mod acks;
mod answer;
mod barrier;
mod send;
mod sql;
use barrier::Barrier;
pub(super) use send::send_sql;
use sql::*;
pub(super) use sql::{Plans, ADD_TOTALS};

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
    /// Commits synchronously: the barrier's.
    pub(super) pool: Pool,
    pub(super) hosts: String,
    pub(super) deadline: Duration,
    pub(super) slot: i32,
    /// The statement of a batch with sends ([`send_sql`] for the backend's
    /// [`AccountCheck`]).
    pub(super) send_sql: String,
    /// The sessions' `statement_timeout`, the most a batch's statement gets.
    pub(super) statement_timeout: Duration,
    pub(super) totals: Arc<TotalsCache>,
    pub(super) usage: Arc<UsageCache>,
    pub(super) stats: Arc<WriterStats>,
    /// Connections whose commits do not wait for the WAL flush: a batch releases its
    /// heads at once instead of holding them through an fsync. Each took a seq epoch
    /// as it connected.
    pub(super) lazy: Pool,
    /// Makes those commits durable before their callers hear (`None`: commits are
    /// not durable at once anyway, under `durability = "os"`).
    pub(super) barrier: Option<Barrier>,
    /// Told of the mailboxes a batch appended to once it committed, before the
    /// barrier ([`crate::store::MailboxStore::on_visible`]).
    pub(super) visible: Arc<std::sync::OnceLock<crate::store::VisibleHook>>,
    /// What a batch with sends tells the other nodes right after its `COMMIT`
    /// ([`PgBackend::notify_after_commits`](super::PgBackend::notify_after_commits)).
    pub(super) notes: Arc<std::sync::OnceLock<CommitNotes>>,
}

/// The NOTIFY a batch with sends makes right after its `COMMIT`, on its own
/// connection in the same round trip: the other nodes hear of the batch's mailboxes,
/// with their new rows where small (see `send::notes_sql`), without a transaction of
/// their own on another connection.
pub struct CommitNotes {
    /// The channel.
    pub channel: &'static str,
    /// The origin that starts each note (`<8 hex>;`), or none: nobody to tell.
    pub origin: NoteOrigin,
}

/// See [`CommitNotes::origin`].
pub type NoteOrigin = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Which appends a batch refuses, checked by the send statement with its snapshot
/// (taken before it waits for any head: a deletion that finishes meanwhile is not
/// seen, and its closed head refuses the send instead; a purge locks the head before
/// deleting, so it deletes whatever passed the check).
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

/// Transactions in flight at once (each on a lane of the writer's): the next batch
/// takes its head locks while the ones before it commit, so commits overlap. Batches
/// take their locks one after another in queue order and are answered in queue order.
pub const PIPELINE: usize = 4;

/// Batches taken but not yet answered, at most: in a transaction (a lane each) or
/// committed and waiting for their durability barrier.
pub(super) const UNANSWERED: usize = 16 * PIPELINE;

/// A pooled connection inside a transaction of ours. Dropped before [`Open::committed`]
/// (an error, a deadline), it leaves the pool and closes: a connection inside a
/// transaction never goes back to the pool. Closed before its `COMMIT` was sent, the
/// transaction rolls back; closed after (the deadline passed while the `COMMIT` waited,
/// for the flush or a synchronous standby, which no `statement_timeout` bounds), it may
/// still commit: its callers hear `UNAVAILABLE` for writes that may be stored, a retry
/// stores a send again under its message id, and the recipient drops the copy.
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

/// One of the [`PIPELINE`] transactions in flight. Taken before a batch is formed and
/// given back once its transaction has committed (or failed), not once its callers
/// are answered: the durability barrier a batch then waits for holds no lane, so the
/// next batches commit meanwhile.
struct Lane {
    id: i32,
    free: mpsc::UnboundedSender<i32>,
}

impl Lane {
    /// The totals row this lane's transactions add into. Each transaction in flight
    /// has a row of its own: with one per node, its lock (held through COMMIT) would
    /// serialise the pipeline's commits.
    fn totals_row(&self, node_slot: i32) -> i32 {
        (node_slot + self.id) % TOTAL_SLOTS
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let _ = self.free.send(self.id);
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
    /// Sends, maybe with removals: one statement, then the removals, then COMMIT.
    Sends,
    /// Removals only: one statement.
    Removals,
}

impl Writer {
    /// Serves `rx` until every sender is gone.
    pub(super) async fn serve(self, mut rx: mpsc::UnboundedReceiver<(Instant, Op)>) {
        let this = Arc::new(self);
        let (free, mut lanes) = mpsc::unbounded_channel();
        for id in 0..PIPELINE as i32 {
            let _ = free.send(id);
        }
        let unanswered = Arc::new(Semaphore::new(UNANSWERED));
        let mut previous: Option<oneshot::Receiver<()>> = None;
        while let Some((queued, first)) = rx.recv().await {
            // Waiting for a lane lets the queue grow: a bigger batch next. Past
            // UNANSWERED batches committed and waiting for their barrier (a standby
            // gone, a stalled fsync), the writer stops taking more: the queue's ops
            // then fail as stale, unwritten, instead of committing unanswered.
            let Ok(answer_slot) = unanswered.clone().acquire_owned().await else {
                return;
            };
            let Some(id) = lanes.recv().await else {
                return;
            };
            let lane = Lane {
                id,
                free: free.clone(),
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
                continue;
            }
            let parts = plan(&ops);
            let step = if parts.is_empty() {
                Step::Nothing
            } else if removals {
                Step::Removals
            } else {
                Step::Sends
            };
            let (done, next) = oneshot::channel();
            let before = previous.replace(next);
            // A batch with sends takes its head locks after the one before it has
            // taken its own: within a mailbox, a later batch waits for an earlier
            // one's commit, so seqs follow the queue. A batch of removals only takes
            // no seqs: its one statement needs no turn.
            let (locked, turn) = oneshot::channel();
            let turn = matches!(step, Step::Sends).then_some(turn);
            let this = this.clone();
            tokio::spawn(async move {
                let outcome = match step {
                    Step::Nothing => {
                        drop(lane);
                        Ok(Outcome::default())
                    }
                    Step::Sends => this.bounded(this.send(&ops, &parts, lane, locked)).await,
                    Step::Removals => this.bounded(this.remove(&parts, lane)).await,
                };
                if let Some(before) = before {
                    let _ = before.await;
                }
                match outcome {
                    Ok(outcome) => this.answer(ops, &parts, outcome),
                    Err(f) => this.fail(ops, f),
                }
                let _ = done.send(());
                drop(answer_slot);
            });
            // Heard once the statement has answered, or dropped (failed, or given up
            // at the deadline).
            if let Some(turn) = turn {
                let _ = turn.await;
            }
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

    /// The `BEGIN` of a transaction whose work started at `started`. Its statements
    /// go out together with the `COMMIT`, so the server runs them all even after the
    /// writer gave up at its deadline: each of the (at most two) statements gets half
    /// the time left (less a margin for the round trip; at most `statement_timeout`),
    /// so the server has aborted the transaction before then, and a write answered
    /// `UNAVAILABLE` is not stored. Whatever the pool wait and the preparing took
    /// counts. (A `COMMIT` waiting for the flush or a standby past the deadline still
    /// may commit: no timeout covers that wait.) Too little left: fails, nothing sent.
    fn begin(&self, started: Instant) -> Result<String, Failure> {
        let margin = self.deadline / 20;
        let left = self.deadline.saturating_sub(started.elapsed() + margin);
        let each = (left / 2).min(self.statement_timeout);
        if each < Duration::from_millis(10) {
            return Err(Failure::Other(self.stale()));
        }
        Ok(begin_for(each))
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
            "PostgreSQL at {}: no commit within {:?} (it may yet commit)",
            self.hosts, self.deadline
        ))
    }

    /// Fails every item of a batch whose transaction failed: nothing in it is
    /// acknowledged.
    fn fail(&self, ops: Vec<Op>, f: Failure) {
        let message = match f {
            Failure::Db(e) => classify(&e, &self.hosts).to_string(),
            Failure::Other(e) | Failure::Epoch(e) => e.to_string(),
        };
        for op in ops {
            op.fail(StoreError::Unavailable(message.clone()));
        }
    }
}

enum Failure {
    Db(tokio_postgres::Error),
    Other(StoreError),
    /// The batch committed under a seq epoch that is no longer live: the server lost
    /// its tail (or is another server) before the barrier, and the batch may be gone.
    Epoch(StoreError),
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
            del.push(to, s as i64);
        }
    }
    del
}
