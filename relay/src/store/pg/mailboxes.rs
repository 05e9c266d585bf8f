//! [`MailboxStore`] on PostgreSQL (schema: `migrations/V2__mailboxes.sql`).
//!
//! - Appends and removals go through the [writer](super::writer): queued, batched
//!   with whatever else is queued, committed in one transaction; the sync trait
//!   methods wait for that commit through [`PgBackend::run`].
//! - A mailbox's seqs come from its `mailbox_heads` row, taken under the row's lock
//!   in the inserting transaction: per mailbox, seq order is commit order on every
//!   node, so a reader that saw seq n saw everything below it.
//! - `usage` is exact; `totals` (and the totals of `usage_and_totals`) come from a
//!   cache at most [`TOTALS_MAX_AGE`] old that this node's own commits keep current,
//!   so relay-wide limits are soft across nodes by about a second of other nodes'
//!   accepts. Each send's mailbox usage likewise (a per-node cache filled by reads and
//!   this node's commits), so per-device limits are soft across nodes the same way.
//! - `expire` and `purge` are a transaction each, heads row locked first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_platform::clock::UnixMillis;
use tern_proto::DeviceAddress;
use tokio::sync::{mpsc, oneshot};

use super::bodies::{deleted_cols, deleted_counts, release};
use super::keys::params;
use super::writer::{AccountCheck, CommitNotes, Op, Writer, WriterStats, ADD_TOTALS};
use super::PgBackend;
use crate::store::{
    Envelope, Expired, MailboxStore, ReadLater, SharedAppend, Staged, StoreError, StoreResult,
    StoredMessage, Totals, Usage, VisibleHook,
};

/// How old cached totals may be.
pub(crate) const TOTALS_MAX_AGE: Duration = Duration::from_secs(1);

/// Messages one purge transaction deletes at most.
pub(super) const PURGE_PAGE_ROWS: u64 = 10_000;

/// Pages one purge call takes at most (a mailbox holds far fewer messages than
/// this many pages; a purge that still finds more fails and is retried).
const MAX_PURGE_PAGES: usize = 10_000;

/// The oldest page of a mailbox: everything up to its `PURGE_PAGE_ROWS`th seq (an
/// init plan, then one range of the primary key), or all of it when it holds fewer.
pub(super) const PURGE_PAGE: &str = concat!(
    "WITH d AS (DELETE FROM messages \
     WHERE account = $1 AND device = $2 AND seq <= coalesce((SELECT seq FROM messages \
       WHERE account = $1 AND device = $2 ORDER BY seq OFFSET 10000 - 1 LIMIT 1), \
       9223372036854775807) \
     RETURNING ",
    deleted_cols!(),
    ")",
    release!(),
    deleted_counts!()
);

const PURGE_REST: &str = concat!(
    "WITH d AS (DELETE FROM messages WHERE account = $1 AND device = $2 RETURNING ",
    deleted_cols!(),
    ")",
    release!(),
    deleted_counts!()
);

/// Only what is still expired: an entry names its expiry, and a message's expiry never
/// moves, so a stale entry deletes nothing newer.
const EXPIRE: &str = concat!(
    "WITH d AS (DELETE FROM messages m USING unnest($3::int8[], $4::int8[]) e(s, x) \
     WHERE m.account = $1 AND m.device = $2 AND m.seq = e.s AND m.expires_at <= e.x \
     RETURNING ",
    deleted_cols!(),
    ")",
    release!(),
    deleted_counts!()
);

/// Locks a mailbox's head (creating it if need be) and closes it: no send takes a seq
/// from it again (V15). Returns the messages it counted.
pub(super) const CLOSE_HEAD: &str =
    "INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes, closed_at) \
     VALUES ($1, $2, 0, 0, 0, (extract(epoch FROM clock_timestamp()) * 1000)::int8) \
     ON CONFLICT (account, device) DO UPDATE SET closed_at = coalesce(h.closed_at, EXCLUDED.closed_at) \
     RETURNING messages";

/// Locks a totals slot (`$1`): after the heads and before any shared body, as every
/// transaction orders them.
const LOCK_SLOT: &str = "SELECT 1 FROM mailbox_totals WHERE slot = $1 FOR UPDATE";

/// How long a failed usage prefetch answers for the read under the device lock.
const PREFETCH_FAILURE_HOLDS: Duration = Duration::from_millis(100);

fn lock_or_inner<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mailboxes whose usage the cache keeps; past it, the cache starts afresh.
const USAGE_CACHE_MAX: usize = 100_000;

/// A mailbox store's per-node state: the writer's queue and the caches.
pub(super) struct MailState {
    queue: mpsc::UnboundedSender<(Instant, Op)>,
    pub(super) totals: Arc<TotalsCache>,
    pub(super) usage: Arc<UsageCache>,
    stats: Arc<WriterStats>,
    /// This node's row of `mailbox_totals`.
    pub(super) slot: i32,
    /// Entries reads skipped because their shared body was gone.
    pub(super) skipped: AtomicU64,
    /// Told of appends once committed, before they are durable.
    visible: Arc<std::sync::OnceLock<VisibleHook>>,
    /// What a batch with sends tells the other nodes after its commit.
    notes: Arc<std::sync::OnceLock<CommitNotes>>,
}

impl MailState {
    /// Starts the writer on the backend's runtime.
    pub(super) fn start(backend: &PgBackend) -> StoreResult<MailState> {
        // Whether the accounts schema is there, and which planner settings the engine
        // knows.
        let (schema, plans) = backend.run(async {
            let c = backend.client().await?;
            let row = c
                .query_one(
                    "SELECT to_regclass('account_deletions') IS NOT NULL, \
                     current_setting('plan_cache_mode', true) IS NOT NULL, \
                     current_setting('enable_seqscan', true) IS NOT NULL",
                    &[],
                )
                .await
                .map_err(|e| backend.classify(&e))?;
            let col = |i| {
                row.try_get::<_, bool>(i)
                    .map_err(|e| StoreError::Backend(format!("schema check: {e}")))
            };
            let plans = super::writer::Plans {
                generic: col(1)?,
                keyed: col(2)?,
            };
            Ok((col(0)?, plans))
        })?;
        let accounts = match (schema, backend.require_accounts) {
            (false, _) => AccountCheck::None,
            (true, false) => AccountCheck::Intents,
            (true, true) => AccountCheck::IntentsAndRows,
        };
        let totals = Arc::new(TotalsCache::default());
        let usage = Arc::new(UsageCache::default());
        let stats = Arc::new(WriterStats::default());
        let visible = Arc::new(std::sync::OnceLock::new());
        let notes = Arc::new(std::sync::OnceLock::new());
        let slot = slot_of(backend.node_id());
        let writer = Writer {
            pool: backend.pool.clone(),
            hosts: backend.hosts.clone(),
            deadline: backend.deadline,
            slot,
            send_sql: super::writer::send_sql(accounts),
            statement_timeout: backend.statement_timeout,
            totals: totals.clone(),
            usage: usage.clone(),
            stats: stats.clone(),
            lazy: backend.lazy_commit_pool(super::writer::PIPELINE + 1, plans)?,
            barrier: backend.durable.then(Default::default),
            visible: visible.clone(),
            notes: notes.clone(),
        };
        let (queue, rx) = mpsc::unbounded_channel();
        backend.handle()?.spawn(writer.serve(rx));
        Ok(MailState {
            queue,
            totals,
            usage,
            stats,
            slot,
            skipped: AtomicU64::new(0),
            visible,
            notes,
        })
    }
}

/// This node's row of `mailbox_totals`: FNV-1a of its name, mod 64.
fn slot_of(node: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in node.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h % 64) as i32
}

/// A change to the totals.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TotalsDelta {
    pub(super) messages: i64,
    pub(super) bytes: i64,
    pub(super) mailboxes: i64,
}

impl TotalsDelta {
    pub(super) fn is_zero(&self) -> bool {
        self.messages == 0 && self.bytes == 0 && self.mailboxes == 0
    }
}

/// The relay-wide totals as last read, plus this node's commits since.
#[derive(Default)]
pub(super) struct TotalsCache {
    cached: Mutex<Option<(Instant, Totals)>>,
    /// Bumped by every commit applied, so a read that raced one is not kept long.
    changes: AtomicU64,
}

impl TotalsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Totals)>> {
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self) -> Option<Totals> {
        self.lock()
            .filter(|(at, _)| at.elapsed() < TOTALS_MAX_AGE)
            .map(|(_, t)| t)
    }

    /// Adds a committed change.
    pub(super) fn apply(&self, d: TotalsDelta) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        if let Some((_, t)) = self.lock().as_mut() {
            t.messages = t.messages.saturating_add_signed(d.messages);
            t.bytes = t.bytes.saturating_add_signed(d.bytes);
            t.mailboxes = t.mailboxes.saturating_add_signed(d.mailboxes);
        }
    }
}

/// Mailboxes' usage as this node last knew it (from a read or its own commit), for
/// the check every send makes; an entry serves for [`TOTALS_MAX_AGE`].
#[derive(Default)]
pub(super) struct UsageCache {
    entries: Mutex<std::collections::HashMap<DeviceAddress, (Instant, Usage)>>,
    /// When a prefetch last failed, and why: the read under the device lock that
    /// follows fails at once instead of waiting out a second deadline.
    failed: Mutex<Option<(Instant, String)>>,
}

impl UsageCache {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<DeviceAddress, (Instant, Usage)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn fresh(&self, of: &DeviceAddress) -> Option<Usage> {
        self.lock()
            .get(of)
            .filter(|(at, _)| at.elapsed() < TOTALS_MAX_AGE)
            .map(|(_, u)| *u)
    }

    /// Records what a mailbox holds as of a read or a commit.
    pub(super) fn set(&self, of: DeviceAddress, usage: Usage) {
        let mut entries = self.lock();
        if entries.len() >= USAGE_CACHE_MAX && !entries.contains_key(&of) {
            entries.clear();
        }
        entries.insert(of, (Instant::now(), usage));
    }

    pub(super) fn forget(&self, of: &DeviceAddress) {
        self.lock().remove(of);
    }
}

/// A mailbox's usage from its head's counts (`messages`, `bytes`).
pub(super) fn usage_of(messages: i64, bytes: i64) -> Usage {
    Usage {
        messages: messages.max(0) as u64,
        bytes: bytes.max(0) as u64,
    }
}

/// A mailbox address from its columns.
pub(super) fn addr_of(account: &[u8], device: i64) -> StoreResult<DeviceAddress> {
    let device = u32::try_from(device).map_err(|_| StoreError::Corrupt("device id"))?;
    DeviceAddress::from_wire(account, device).map_err(|_| StoreError::Corrupt("address"))
}

/// Unix ms as `bigint`: clamped, with `u64::MAX` ("never") kept as `i64::MAX`.
pub(super) fn to_db(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

pub(crate) fn from_db(t: i64) -> u64 {
    if t == i64::MAX {
        u64::MAX
    } else {
        t.max(0) as u64
    }
}

/// Seqs live below 2^63; a cursor at or past it is past everything.
fn cursor(after: u64) -> Option<i64> {
    i64::try_from(after).ok()
}

fn limit(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX)
}

impl PgBackend {
    pub(super) fn mail(&self) -> StoreResult<&MailState> {
        self.mail
            .as_ref()
            .ok_or_else(|| StoreError::Backend("mailbox writer not started".into()))
    }

    /// Queues an append for the writer; the receiver hears its seqs after COMMIT (or
    /// why it failed). Appends staged in one order to one mailbox get seqs in that order.
    pub fn queue_append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<oneshot::Receiver<StoreResult<Vec<u64>>>> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Append {
            to: *to,
            msgs: msgs.to_vec(),
            accepted_at: to_db(accepted_at),
            expires_at: to_db(expires_at),
            reply,
        };
        self.enqueue(op)?;
        Ok(rx)
    }

    /// Queues a removal for the writer; the receiver hears what it deleted after COMMIT.
    pub fn queue_remove(
        &self,
        of: &DeviceAddress,
        seqs: &[u64],
    ) -> StoreResult<oneshot::Receiver<StoreResult<Usage>>> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Op::Remove {
            of: *of,
            seqs: seqs.to_vec(),
            reply,
        })?;
        Ok(rx)
    }

    pub(super) fn enqueue(&self, op: Op) -> StoreResult<()> {
        self.mail()?
            .queue
            .send((Instant::now(), op))
            .map_err(|_| StoreError::Unavailable("mailbox writer stopped".into()))
    }

    /// Transactions the mailbox writer committed, and the rows in them.
    pub fn writer_stats(&self) -> (u64, u64) {
        self.mail().map_or((0, 0), |m| {
            (
                m.stats.commits.load(Ordering::Relaxed),
                m.stats.rows.load(Ordering::Relaxed),
            )
        })
    }

    /// Waits for the writer's answer. The writer answers every item within about
    /// three deadlines (in its queue, taking the locks, finishing), so waiting as long
    /// means a caller never hears "failed" for a write that then commits.
    fn wait_for_writer<T: Send>(&self, staged: Staged<T>) -> StoreResult<T> {
        self.run_within(
            self.deadline.saturating_mul(3) + Duration::from_secs(1),
            staged.wait(),
        )
    }

    /// Reads the totals from the database into the cache.
    fn refresh_totals(&self) -> StoreResult<Totals> {
        let mail = self.mail()?;
        let before = mail.totals.changes.load(Ordering::Acquire);
        let rows = self.run(self.rows(
            "SELECT coalesce(sum(messages), 0)::int8, coalesce(sum(bytes), 0)::int8, \
             coalesce(sum(mailboxes), 0)::int8 FROM mailbox_totals",
            &[],
        ))?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Backend("mailbox totals: no row".into()))?;
        let get = |i| self.col::<i64>(row, i).map(|n| n.max(0) as u64);
        let totals = Totals {
            messages: get(0)?,
            bytes: get(1)?,
            mailboxes: get(2)?,
        };
        // A commit that landed meanwhile may or may not be in the sum: read again soon.
        let at = if mail.totals.changes.load(Ordering::Acquire) == before {
            Instant::now()
        } else {
            Instant::now()
                .checked_sub(TOTALS_MAX_AGE)
                .unwrap_or_else(Instant::now)
        };
        *mail.totals.lock() = Some((at, totals));
        Ok(totals)
    }

    /// Deletes from one mailbox in a transaction of its own: heads row locked first,
    /// then the totals slot, then `delete` (which returns the count, the mailbox's
    /// bytes and the relay's, and releases shared bodies), then heads and totals.
    fn delete_in_mailbox(
        &self,
        of: &DeviceAddress,
        delete: &str,
        extra: Option<(Vec<i64>, Vec<i64>)>,
        close_head: bool,
    ) -> StoreResult<Usage> {
        let mail = self.mail()?;
        let (account, device) = params(of);
        let slot = mail.slot;
        let extra = extra.as_ref();
        let (delta, freed) = self.run(async {
            let mut client = self.client().await?;
            let k = (account, device);
            match delete_tx(&mut client, slot, k, delete, extra, close_head).await {
                // A deadlock victim: once more.
                Err(e) if super::is_retryable(&e) => {
                    delete_tx(&mut client, slot, k, delete, extra, close_head).await
                }
                r => r,
            }
            .map_err(|e| self.classify(&e))
        })?;
        mail.totals.apply(delta);
        mail.usage.forget(of);
        Ok(freed)
    }
}

/// The transaction of [`PgBackend::delete_in_mailbox`].
async fn delete_tx(
    client: &mut deadpool_postgres::Object,
    slot: i32,
    (account, device): (&[u8], i64),
    delete: &str,
    extra: Option<&(Vec<i64>, Vec<i64>)>,
    close_head: bool,
) -> Result<(TotalsDelta, Usage), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let delete = async {
        let row = match extra {
            Some((seqs, until)) => {
                tx.query_one(delete, &[&account, &device, seqs, until])
                    .await?
            }
            None => tx.query_one(delete, &[&account, &device]).await?,
        };
        Ok::<(i64, i64, i64), tokio_postgres::Error>((
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
        ))
    };
    // The head first, as every mailbox transaction takes it: a batch that holds it
    // (it passed the deletion check) has committed before the rows are read.
    let before: i64 = if close_head {
        Some(tx.query_one(CLOSE_HEAD, &[&account, &device]).await?)
    } else {
        tx.query_opt(
            "SELECT messages FROM mailbox_heads WHERE account = $1 AND device = $2 FOR UPDATE",
            &[&account, &device],
        )
        .await?
    }
    .map_or(Ok(0), |r| r.try_get(0))?;
    // The slot before the bodies `delete` releases (pipelined with it). The
    // mailbox's bytes (entries with their bodies), and the relay's (parts, and the
    // bodies deleted with their last entry).
    let lock_slot: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let (_, (n, bytes, relay_bytes)) =
        futures::try_join!(tx.execute(LOCK_SLOT, &lock_slot), delete)?;
    if n == 0 && !close_head {
        tx.commit().await?;
        return Ok(Default::default());
    }
    // A closed head's mailbox is empty (its rows all deleted under its lock): counted
    // as such, even had its counts drifted.
    tx.execute(
        "UPDATE mailbox_heads SET messages = CASE WHEN $5 THEN 0 ELSE messages - $3 END, \
         bytes = CASE WHEN $5 THEN 0 ELSE bytes - $4 END WHERE account = $1 AND device = $2",
        &[&account, &device, &n, &bytes, &close_head],
    )
    .await?;
    let after = if close_head { 0 } else { before - n };
    let delta = TotalsDelta {
        messages: -n,
        bytes: -relay_bytes,
        mailboxes: i64::from(after > 0) - i64::from(before > 0),
    };
    let freed = Usage {
        messages: n.max(0) as u64,
        bytes: bytes.max(0) as u64,
    };
    if !delta.is_zero() {
        tx.execute(
            ADD_TOTALS,
            &[&slot, &delta.messages, &delta.bytes, &delta.mailboxes],
        )
        .await?;
    }
    tx.commit().await?;
    Ok((delta, freed))
}

impl PgBackend {
    /// Has every batch with sends NOTIFY the other nodes of its mailboxes right after
    /// its `COMMIT`, pipelined behind it on the same connection (see [`CommitNotes`]);
    /// false if a hook was set already or the mailboxes are not on this backend. The
    /// NOTIFY is a transaction of its own: a full notification queue fails it, never
    /// the batch, and a hint lost so is found by the nodes' re-check.
    pub fn notify_after_commits(&self, notes: CommitNotes) -> bool {
        self.mail
            .as_ref()
            .is_some_and(|m| m.notes.set(notes).is_ok())
    }
}

impl MailboxStore for PgBackend {
    /// The writer tells of a batch's mailboxes after its COMMIT, before the durability
    /// barrier: recipients read the messages as soon as they are readable. Safe since
    /// a commit lost with the WAL's tail never gives its seqs to others (seq epochs).
    fn on_visible(&self, hook: VisibleHook) -> bool {
        self.mail
            .as_ref()
            .is_some_and(|m| m.visible.set(hook).is_ok())
    }

    fn stage_append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Staged<Vec<u64>>> {
        if msgs.is_empty() {
            return Ok(Staged::Applied(Vec::new()));
        }
        self.queue_append(to, msgs, accepted_at, expires_at)
            .map(Staged::Pending)
    }

    fn stage_remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Staged<Usage>> {
        if seqs.is_empty() {
            return Ok(Staged::Applied(Usage::default()));
        }
        self.queue_remove(of, seqs).map(Staged::Pending)
    }

    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        let staged = self.stage_append(to, msgs, accepted_at, expires_at)?;
        self.wait_for_writer(staged)
    }

    fn stage_append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Staged<Vec<u64>>> {
        if append.entries.is_empty() {
            return Ok(Staged::Applied(Vec::new()));
        }
        self.queue_append_shared(append).map(Staged::Pending)
    }

    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        let staged = self.stage_append_shared(append)?;
        self.wait_for_writer(staged)
    }

    fn shared_bodies(&self) -> u64 {
        match self.count_bodies() {
            Ok(n) => n,
            // Tests compare the count with 0: a failed count must not pass for none.
            #[cfg(test)]
            Err(e) => panic!("counting shared bodies failed: {e}"),
            #[cfg(not(test))]
            Err(e) => {
                tracing::debug!(error = %e, "counting shared bodies failed");
                0
            }
        }
    }

    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        let Some(after) = cursor(after) else {
            return Ok(Vec::new());
        };
        self.read_page(params(of), after, limit(max))
    }

    fn read_later(&self, of: &DeviceAddress, after: u64, max: usize) -> Option<ReadLater<'_>> {
        let Some(after) = cursor(after) else {
            return Some(Box::pin(async { Ok(Vec::new()) }));
        };
        Some(Box::pin(self.read_page_later(*of, after, limit(max))))
    }

    /// Shared bodies whose count drifted (see [`PgBackend::sweep_leaked_bodies`]).
    fn sweep_files(&self, now: UnixMillis) -> StoreResult<()> {
        self.sweep_leaked_bodies(now).map(|_| ())
    }

    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        let Some(after) = cursor(after) else {
            return Ok(Vec::new());
        };
        let (account, device) = params(of);
        let rows = self.run(self.rows(
            "SELECT seq FROM messages WHERE account = $1 AND device = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4",
            &[&account, &device, &after, &limit(max)],
        ))?;
        rows.iter()
            .map(|r| Ok(self.col::<i64>(r, 0)? as u64))
            .collect()
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        let staged = self.stage_remove(of, seqs)?;
        self.wait_for_writer(staged)
    }

    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        let (account, device) = params(of);
        let rows = self.run(self.rows(
            "SELECT messages, bytes FROM mailbox_heads WHERE account = $1 AND device = $2",
            &[&account, &device],
        ))?;
        let Some(r) = rows.first() else {
            return Ok(Usage::default());
        };
        Ok(usage_of(self.col(r, 0)?, self.col(r, 1)?))
    }

    fn usage_and_totals(&self, of: &DeviceAddress) -> StoreResult<(Usage, Totals)> {
        let cache = &self.mail()?.usage;
        let usage = match cache.fresh(of) {
            Some(u) => u,
            None => {
                if let Some((at, why)) = lock_or_inner(&cache.failed).as_ref() {
                    if at.elapsed() < PREFETCH_FAILURE_HOLDS {
                        return Err(StoreError::Unavailable(why.clone()));
                    }
                }
                let u = self.usage(of)?;
                self.mail()?.usage.set(*of, u);
                u
            }
        };
        Ok((usage, self.totals()))
    }

    fn prefetch_usage(&self, of: &DeviceAddress) {
        let Ok(mail) = self.mail() else {
            return;
        };
        if mail.usage.fresh(of).is_none() {
            match self.usage(of) {
                Ok(u) => mail.usage.set(*of, u),
                Err(e) => {
                    *lock_or_inner(&mail.usage.failed) = Some((Instant::now(), e.to_string()));
                    return;
                }
            }
        }
        // Refreshed here when stale (a failure is logged there).
        let _ = self.totals();
    }

    fn totals(&self) -> Totals {
        let Ok(mail) = self.mail() else {
            return Totals::default();
        };
        if let Some(t) = mail.totals.fresh() {
            return t;
        }
        match self.refresh_totals() {
            Ok(t) => t,
            // The last known totals (or none): the send that asked fails on its own
            // write while the database is away.
            Err(e) => {
                tracing::debug!(error = %e, "reading mailbox totals failed");
                mail.totals.lock().map(|(_, t)| t).unwrap_or_default()
            }
        }
    }

    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        let rows = self.run(self.rows(
            "SELECT account, device, seq, expires_at FROM messages WHERE expires_at <= $1 \
             ORDER BY expires_at, account, device, seq LIMIT $2",
            &[&to_db(now), &limit(max)],
        ))?;
        rows.iter()
            .map(|r| {
                Ok(Expired {
                    to: addr_of(self.col(r, 0)?, self.col(r, 1)?)?,
                    seq: self.col::<i64>(r, 2)? as u64,
                    expires_at: from_db(self.col(r, 3)?),
                })
            })
            .collect()
    }

    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        let (seqs, until): (Vec<i64>, Vec<i64>) = entries
            .iter()
            .filter(|e| e.to == *of)
            .filter_map(|e| Some((cursor(e.seq)?, to_db(e.expires_at))))
            .unzip();
        if seqs.is_empty() {
            return Ok(Usage::default());
        }
        self.delete_in_mailbox(of, EXPIRE, Some((seqs, until)), false)
    }

    fn purge(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        // What was staged before the purge commits first, so the purge deletes it too.
        let barrier = self.queue_remove(of, &[])?;
        self.wait_for_writer(Staged::Pending(barrier))?;
        // Account deletion, a page per transaction so that each statement stays
        // within the statement timeout however full the mailbox is. Every page locks
        // the head first, so a batch that passed the deletion check has committed.
        let mut purged = Usage::default();
        for _ in 0..MAX_PURGE_PAGES {
            let page = self.delete_in_mailbox(of, PURGE_PAGE, None, false)?;
            purged.messages += page.messages;
            purged.bytes += page.bytes;
            if page.messages < PURGE_PAGE_ROWS {
                // The head is closed (V15: no send takes a seq from it again; ids
                // are never reused), with anything appended since the last page.
                let last = self.delete_in_mailbox(of, PURGE_REST, None, true)?;
                purged.messages += last.messages;
                purged.bytes += last.bytes;
                return Ok(purged);
            }
        }
        Err(StoreError::Unavailable(
            "mailbox purge did not finish; the deletion is retried".into(),
        ))
    }
}
