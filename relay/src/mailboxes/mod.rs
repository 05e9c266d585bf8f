//! Mailboxes: the messages queued for each device, with the rules of
//! [`crate::core`] applied to the [`MailboxStore`].
//!
//! - Appending is one call, [`Mailboxes::append`], that stores at once and returns an
//!   [`Appended`] whose [`Appended::commit`] waits for the group commit. A connection
//!   appends its sends in the order they arrive and waits for their commits
//!   concurrently, so pipelined sends keep their order without paying one commit each.
//! - Every call that changes a mailbox takes that device's ordering lock for the few
//!   microseconds of the store call, never across an `.await`: an append allocates its
//!   sequence numbers and inserts under it, so a reader that has seen sequence number
//!   `n` has seen every message below `n`.
//! - A connected device holds a [`Subscription`], woken by appends to its mailbox.
//! - An append first takes the sender's rate (per account, or for a sealed send per
//!   token and per address prefix), then, once the mailbox holds
//!   `intake_above_queued` messages, the rate of that sender into that mailbox: a
//!   flood from one sender stops at its own limit and the mailbox still takes its
//!   other contacts' messages (see [`crate::core::rate::RateLimits`]).
//! - [`Mailboxes::pull`] fills a delivery window, [`Mailboxes::ack`] deletes,
//!   [`Mailboxes::sweep`] deletes what expired.
//! - Deletion (P2): an acked message leaves the store's reads at once and is marked
//!   deleted on disk before `ack` returns; the returned [`Acked::commit`] shares the
//!   sends' group commit, so under `durability = "fsync"` an ack answered after it
//!   survives any crash (see `store::log` for the disk side).

use std::collections::BTreeMap;
use std::sync::Arc;

use tern_platform::clock::Clock;
use tern_proto::DeviceAddress;

use crate::accounts::Recipient;
use crate::cluster::Cluster;
use crate::core::auth::AuthenticatedDevice;
use crate::core::budget::Budget;
use crate::core::delivery::DeliveryWindow;
use crate::core::expiry::{is_expired, Ttl};
use crate::core::limits::Limits;
use crate::core::rate::{RateLimits, SenderKey};
use crate::deletion::Tombstones;
use crate::error::{Error, Result};
use crate::push::Waker;
use crate::store::{Envelope, GroupCommit, MailboxStore, Staged, StoreError, StoredMessage, Usage};

mod active;
pub(crate) mod carried;
mod multi;

pub(crate) use self::active::ActiveMailboxes;
pub use self::active::Subscription;
pub use self::carried::Carried;
use self::carried::Taken;
pub use self::multi::{append_multi, MultiAppended, COMMIT_RESERVE};

/// The mailboxes service. See the module docs.
pub struct Mailboxes {
    store: Arc<dyn MailboxStore>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    ttl: Ttl,
    commit: Arc<GroupCommit>,
    rates: Arc<RateLimits>,
    budget: Arc<Budget>,
    active: Arc<ActiveMailboxes>,
    tombstones: Arc<Tombstones>,
    cluster: Arc<std::sync::OnceLock<Arc<Cluster>>>,
    /// Wake-ups for recipients with no connection (`crate::push`).
    push: std::sync::OnceLock<Waker>,
    /// The store tells of staged appends as soon as they are readable
    /// ([`MailboxStore::on_visible`]): those woke their recipients, here and on the
    /// other nodes, before they were durable.
    early: bool,
}

impl std::fmt::Debug for Mailboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailboxes")
            .field("limits", &self.limits)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Messages [`Mailboxes::append`] stored or queued: visible and durable once
/// [`Appended::commit`] resolves (the embedded stores show them at once).
#[derive(Debug)]
#[must_use = "the messages are not known to be durable until `commit` is awaited"]
pub struct Appended {
    accepted: usize,
    /// Joined only when awaited: a reader that appends a burst of requests before it
    /// yields lets all of them share one flush, instead of starting a flush after the
    /// first.
    commit: Arc<GroupCommit>,
    staged: Staged<Vec<u64>>,
    to: DeviceAddress,
    sealed: bool,
    active: Arc<ActiveMailboxes>,
    /// Told after the commit, so the other nodes wake the recipient.
    cluster: Option<Arc<Cluster>>,
    /// Told after the commit when the recipient has no connection here.
    push: Option<Waker>,
    /// Whether the store tells of its appends as they become readable.
    early: bool,
}

impl Appended {
    /// How many messages were stored.
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// Waits until the messages are durable as configured (one group commit shared by
    /// every caller waiting at the time, or the shared backend's batch commit);
    /// returns how many there were.
    pub async fn commit(self) -> Result<usize> {
        let (_, seen) = settle(self.staged, &self.commit, self.sealed, self.early).await?;
        let hints = (self.cluster.as_deref(), self.push.as_ref());
        tell(&self.active, hints, [&self.to], seen);
        Ok(self.accepted)
    }
}

/// When a write's mailboxes were told of it, and so what [`tell`] has left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Visible at once (an embedded store): woken when staged; the other nodes and
    /// push are left.
    AtStaging,
    /// Visible only now (a shared backend's commit): everything is left.
    Now,
    /// Told by the store as its commit made it readable ([`MailboxStore::on_visible`]):
    /// only push, which waits for durability, is left.
    ByStore,
}

/// Waits until `staged` is durable as configured (the group commit every embedded
/// write shares, or the shared backend's transaction); returns the store's answer, and
/// when its mailboxes saw it (`early`: the store tells of its commits).
async fn settle<T>(
    staged: Staged<T>,
    commit: &GroupCommit,
    sealed: bool,
    early: bool,
) -> Result<(T, Seen)> {
    match staged {
        Staged::Applied(v) => {
            commit.commit_mailboxes().await?;
            Ok((v, Seen::AtStaging))
        }
        pending => {
            let v = pending.wait().await.map_err(|e| refused(e, sealed))?;
            Ok((v, if early { Seen::ByStore } else { Seen::Now }))
        }
    }
}

/// A mailbox read's injected fault, if any (tests).
fn read_fault() -> Result<()> {
    crate::store::fault::check(crate::store::fault::Site::MailboxRead)
        .map_err(|e| StoreError::Unavailable(format!("injected: {e}")).into())
}

/// Tells the mailboxes `to` of a write, as far as `seen` leaves to do: one visible only
/// now wakes them here, other nodes hear of them through `cluster`, and those with no
/// connection here get a push wake-up (given a `push`, only once durable).
fn tell<'a>(
    active: &ActiveMailboxes,
    (cluster, push): (Option<&Cluster>, Option<&Waker>),
    to: impl IntoIterator<Item = &'a DeviceAddress>,
    seen: Seen,
) {
    for a in to {
        // The wake-up answers whether a connection here takes the device's mail
        // (one look at the table, not two).
        let connected = if seen == Seen::Now {
            active.wake(a)
        } else {
            push.is_some() && active.has_subscriber(a)
        };
        if let (Some(cluster), false) = (cluster, seen == Seen::ByStore) {
            cluster.mail(a);
        }
        // The delivery hook: only once durable, and never waiting (a full queue drops).
        if let (Some(push), false) = (push, connected) {
            push.mail(a);
        }
    }
}

/// Messages [`Mailboxes::ack`] deleted or queued for deletion: gone from reads, and
/// durable, once [`Acked::commit`] resolves (the embedded stores: gone from reads at
/// once).
#[derive(Debug)]
#[must_use = "the deletion is not known to be durable until `commit` is awaited"]
pub struct Acked {
    staged: Staged<Usage>,
    commit: Arc<GroupCommit>,
}

impl Acked {
    /// Waits until the deletion is durable as configured (the group commit that sends
    /// share, or the shared backend's batch commit); returns what was deleted.
    pub async fn commit(self) -> Result<Usage> {
        match self.staged {
            Staged::Applied(deleted) => {
                self.commit.commit_mailboxes().await?;
                Ok(deleted)
            }
            pending => Ok(pending.wait().await?),
        }
    }
}

/// A store's refusal of an append to an account being deleted, as a tombstone's.
fn refused(e: StoreError, sealed: bool) -> Error {
    match e {
        StoreError::Deleted if sealed => Error::Unauthorized,
        StoreError::Deleted => Error::UnknownRecipient,
        e => Error::from(e),
    }
}

/// What [`Mailboxes::pull`] found.
#[derive(Debug, Default)]
pub struct Pull {
    /// Messages to push, in order; already recorded in the window.
    pub messages: Vec<StoredMessage>,
    /// The backlog is drained for the first time on this window: tell the client.
    pub queue_empty: bool,
    /// The last read came back short: everything stored then is pushed (or skipped as
    /// expired). Until a wake-up for new mail, pulling again finds nothing, even when
    /// acks free room.
    pub drained: bool,
    /// A read after the first failed: `messages` holds what the earlier ones found
    /// (recorded in the window, so they must be pushed); pull again later for the rest.
    pub read_failed: Option<Error>,
}

impl Mailboxes {
    /// Mailboxes kept in `store`, under `limits`, `rates` and the relay-wide `budget`,
    /// each message kept for `ttl`; appends are made durable through `commit`.
    pub fn new(
        store: Arc<dyn MailboxStore>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        commit: Arc<GroupCommit>,
        rates: Arc<RateLimits>,
        budget: Arc<Budget>,
    ) -> Self {
        let active: Arc<ActiveMailboxes> = Arc::default();
        let cluster: Arc<std::sync::OnceLock<Arc<Cluster>>> = Arc::default();
        // Weak: the store holds the hook, and the cluster holds the store. Push waits
        // for durability: the commit's own `tell` does it.
        let (here, nodes) = (Arc::downgrade(&active), Arc::downgrade(&cluster));
        let early = store.on_visible(Arc::new(move |to: &[DeviceAddress]| {
            let (Some(here), nodes) = (here.upgrade(), nodes.upgrade()) else {
                return;
            };
            let cluster = nodes.as_ref().and_then(|n| n.get()).map(|c| &**c);
            tell(&here, (cluster, None), to, Seen::Now);
        }));
        Mailboxes {
            store,
            clock,
            limits,
            ttl,
            commit,
            rates,
            budget,
            active,
            tombstones: Arc::default(),
            cluster,
            push: std::sync::OnceLock::new(),
            early,
        }
    }

    /// These mailboxes refuse appends to the accounts in `tombstones`, as to unknown
    /// ones.
    pub(crate) fn with_tombstones(mut self, tombstones: Arc<Tombstones>) -> Self {
        self.tombstones = tombstones;
        self
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Queues `msgs` for `to`, all or nothing, in the order of calls, and wakes a
    /// connected recipient. Await the returned [`Appended::commit`] before telling the
    /// sender they are stored.
    pub fn append(&self, recipient: &Recipient, msgs: &[Envelope]) -> Result<Appended> {
        let (to, from) = (recipient.address(), recipient.sender());
        self.limits
            .check_batch(msgs.iter().map(|m| m.payload.len()))?;
        let n = u32::try_from(msgs.len()).unwrap_or(u32::MAX);
        let bytes: u64 = msgs.iter().map(|m| m.payload.len() as u64).sum();
        let now = self.clock.now();
        let sealed = matches!(from, SenderKey::Prefix(_));
        // A shared backend's read happens here, not under the device lock.
        self.store.prefetch_usage(to);
        let staged = self.active.ordered(to, || {
            // Checked under the device lock, which a deletion's purge takes too: a
            // send that resolved its recipient before the deletion (of the account
            // or of this device) began cannot queue after the purge.
            if self.tombstones.contains(&to.account) || self.tombstones.contains_device(to) {
                return Err(match from {
                    SenderKey::Account(_) => Error::UnknownRecipient,
                    SenderKey::Prefix(_) => Error::Unauthorized,
                });
            }
            // A deleted account's connection, not yet closed, sends no more.
            if matches!(from, SenderKey::Account(a) if self.tombstones.contains(a)) {
                return Err(Error::Unauthorized);
            }
            // Capacity first: a send refused for a full mailbox or relay does not
            // use up its sender's rate.
            let (usage, totals) = self.store.usage_and_totals(to)?;
            self.limits.check_enqueue(usage, msgs.len() as u64, bytes)?;
            self.budget
                .check_enqueue(totals, msgs.len() as u64, bytes)?;
            self.rates.send(from, to, n)?;
            self.rates.intake(from, to, usage.messages, n)?;
            // A shared backend queues it for a commit shared with other sends; another
            // node's deletion intent refuses it as a tombstone here would.
            self.store
                .stage_append(to, msgs, now, self.ttl.expires_at(now))
                .map_err(|e| refused(e, sealed))
        })?;
        // Woken once its messages are visible: now for a store that applied them;
        // for a shared one as its commit makes them readable (by the store, if it tells
        // of them then), else after the commit (a wake now would read nothing).
        if matches!(staged, Staged::Applied(_)) {
            self.active.wake(to);
        }
        Ok(Appended {
            accepted: msgs.len(),
            commit: self.commit.clone(),
            early: self.early,
            staged,
            to: *to,
            sealed,
            active: self.active.clone(),
            cluster: self.cluster.get().cloned(),
            push: self.push.get().cloned(),
        })
    }

    /// The table of mailboxes in use (for the cluster's cross-node wake-ups).
    pub(crate) fn active(&self) -> Arc<ActiveMailboxes> {
        self.active.clone()
    }

    /// Joins these mailboxes to the other nodes of the relay: appends are announced
    /// to them after their commit. Once; later calls are ignored.
    pub(crate) fn join_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Sends push wake-ups through `waker` for mail committed to a device with no
    /// connection here. Once; later calls are ignored.
    pub(crate) fn set_push(&self, waker: Waker) {
        let _ = self.push.set(waker);
    }

    /// `device`'s connection here ended with mail unread or unacknowledged: a
    /// wake-up, as for mail queued while it is away (the phone that dropped off
    /// silently learns of what was pushed into its dead connection).
    pub(crate) fn left_with_mail(&self, device: &DeviceAddress) {
        if let Some(push) = self.push.get() {
            push.mail(device);
        }
    }

    /// The cluster these mailboxes joined, if the relay has several nodes.
    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Claims deliveries for a device, displacing any earlier connection of it.
    pub fn subscribe(&self, device: &AuthenticatedDevice) -> Subscription {
        if let Some(push) = self.push.get() {
            push.seen(device.address());
        }
        self.active.subscribe(*device.address())
    }

    /// Fills `window` with the next messages to push to `device`, in order. Expired
    /// messages are skipped, never returned, even before the sweeper deletes them.
    pub fn pull(&self, device: &AuthenticatedDevice, window: &mut DeliveryWindow) -> Result<Pull> {
        let mut pull = Pull::default();
        while window.room() > 0 {
            let want = window.room();
            let batch = self.read(device, window.cursor(), want);
            if !self.took(&mut pull, window, batch, want)? {
                break;
            }
        }
        Ok(pull)
    }

    /// [`Mailboxes::pull`] for a delivery task: a store whose reads are round trips
    /// ([`MailboxStore::read_later`]) is awaited, not waited for on this thread.
    pub async fn pull_later(
        &self,
        device: &AuthenticatedDevice,
        window: &mut DeliveryWindow,
    ) -> Result<Pull> {
        self.pull_taken(device, Taken::default(), window).await
    }

    /// [`Mailboxes::pull_later`] for `sub`'s delivery, which first pushes the rows
    /// hints from other nodes carried to it ([`Carried`]) when they come right after
    /// the window's cursor, and reads the mailbox only if anything else woke it.
    pub async fn pull_for(
        &self,
        device: &AuthenticatedDevice,
        sub: &Subscription,
        window: &mut DeliveryWindow,
    ) -> Result<Pull> {
        let taken = sub.take_carried();
        let pull = self.pull_taken(device, taken, window).await;
        if !matches!(&pull, Ok(p) if p.read_failed.is_none()) {
            // The wake-up that brought this pull is spent: the retry must read.
            sub.read_next();
        }
        pull
    }

    async fn pull_taken(
        &self,
        device: &AuthenticatedDevice,
        taken: Taken,
        window: &mut DeliveryWindow,
    ) -> Result<Pull> {
        let mut pull = Pull::default();
        if let Some(c) = taken.chain.filter(|c| c.after == window.cursor()) {
            let rows = c.rows.len();
            // Nothing else woke the delivery: these rows are all there is after the
            // cursor as of their commit (later commits send their own hints), so
            // taking fewer than asked for ends the pull as a short read would.
            let want = if taken.read { rows } else { rows + 1 };
            let more = self.took(&mut pull, window, Ok(c.rows), want)?;
            crate::metrics::carried(pull.messages.len());
            if !more {
                return Ok(pull);
            }
        }
        while window.room() > 0 {
            let want = window.room();
            let batch = match self.fault_or_read_later(device, window.cursor(), want) {
                Ok(Some(read)) => read.await.map_err(Error::from),
                Ok(None) => self
                    .store
                    .read(device.address(), window.cursor(), want)
                    .map_err(Error::from),
                Err(e) => Err(e),
            };
            if !self.took(&mut pull, window, batch, want)? {
                break;
            }
        }
        Ok(pull)
    }

    /// Takes a read of up to `want` messages into `pull` and `window`; true if the
    /// window may take more and the mailbox may hold more.
    fn took(
        &self,
        pull: &mut Pull,
        window: &mut DeliveryWindow,
        batch: Result<Vec<StoredMessage>>,
        want: usize,
    ) -> Result<bool> {
        let batch = match batch {
            Ok(batch) => batch,
            // The window already counts what earlier reads found: returning only
            // the error would drop those messages from this connection.
            Err(e) if !pull.messages.is_empty() => {
                pull.read_failed = Some(e);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let now = self.clock.now();
        let short = batch.len() < want;
        for m in batch {
            if is_expired(now, m.expires_at) {
                window.on_skipped(m.seq);
            } else if window.on_pushed(m.seq, usize::try_from(m.len()).unwrap_or(usize::MAX)) {
                pull.messages.push(m);
            } else {
                // Past the window's byte bound: the rest waits for acks.
                return Ok(false);
            }
        }
        if short {
            pull.drained = true;
            pull.queue_empty = window.on_drained();
            return Ok(false);
        }
        Ok(true)
    }

    /// The store's read as a future, if it has one, after the injected faults.
    fn fault_or_read_later(
        &self,
        device: &AuthenticatedDevice,
        after: u64,
        max: usize,
    ) -> Result<Option<crate::store::ReadLater<'_>>> {
        read_fault()?;
        Ok(self.store.read_later(device.address(), after, max))
    }

    fn read(
        &self,
        device: &AuthenticatedDevice,
        after: u64,
        max: usize,
    ) -> Result<Vec<StoredMessage>> {
        read_fault()?;
        Ok(self.store.read(device.address(), after, max)?)
    }

    /// Deletes acknowledged messages from the device's own mailbox: gone from reads at
    /// once, marked deleted on disk before this returns (for the log), and durable
    /// once the returned [`Acked::commit`] resolves. Answer the ack only then.
    pub fn ack(&self, device: &AuthenticatedDevice, seqs: &[u64]) -> Result<Acked> {
        let addr = device.address();
        let staged = self
            .active
            .ordered(addr, || self.store.stage_remove(addr, seqs))?;
        Ok(Acked {
            staged,
            commit: self.commit.clone(),
        })
    }

    /// Deletes every message of a mailbox under its device lock (account deletion, on
    /// a blocking thread).
    pub(crate) fn purge(&self, addr: &DeviceAddress) -> Result<Usage> {
        Ok(self
            .active
            .ordered_blocking(addr, || self.store.purge(addr))?)
    }

    /// Finishes the store's deferred removal work now (the log's scrub).
    pub(crate) fn settle(&self) -> Result<()> {
        Ok(self.store.settle()?)
    }

    /// What a device's mailbox holds.
    pub fn usage(&self, device: &AuthenticatedDevice) -> Result<Usage> {
        Ok(self.store.usage(device.address())?)
    }

    /// Deletes up to `batch` expired messages; returns how many it deleted. Costs what
    /// is expired, not what is stored. Called on a blocking thread.
    pub fn sweep(&self, batch: usize) -> Result<u64> {
        let now = self.clock.now();
        // Kept files first: a kept segment whose deadline passed is then deleted as
        // soon as this sweep expires its last messages.
        self.store.sweep_files(now)?;
        let due = self.store.expired(now, batch)?;
        let mut by_device: BTreeMap<DeviceAddress, Vec<_>> = BTreeMap::new();
        for e in due {
            by_device.entry(e.to).or_default().push(e);
        }
        let mut deleted = 0;
        for (addr, entries) in by_device {
            let removed = self
                .active
                .ordered_blocking(&addr, || self.store.expire(&addr, &entries))?;
            deleted += removed.messages;
        }
        Ok(deleted)
    }

    /// For a clean shutdown: finishes the store's deferred work (acknowledged messages
    /// still on disk are scrubbed), then flushes every store.
    pub fn close(&self) -> Result<()> {
        self.store.settle()?;
        Ok(self.commit.flush_now()?)
    }

    /// Entries in the per-device table; for tests of its cleanup.
    #[cfg(test)]
    pub(crate) fn tracked_devices(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod budget_tests;
#[cfg(test)]
mod multi_tests;
#[cfg(test)]
mod rate_tests;
#[cfg(test)]
mod tests;
