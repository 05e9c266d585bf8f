//! Storage behind narrow traits: [`MailboxStore`] for queued envelopes,
//! [`AccountStore`] for accounts and their device keys, [`KeyStore`] for published
//! prekeys, [`BlobIndex`] for media records, [`DiscoveryStore`] for discovery tags,
//! [`KeyPackageStore`] and [`GroupStore`] for MLS key packages and group epochs
//! (`store/groups.rs`), [`PushStore`] for devices' push targets (`store/push.rs`);
//! every backend also implements [`Flush`].
//!
//! - [`LogStore`]: the mailbox log (the default for mailboxes), segment files with
//!   the index in memory.
//! - [`SledStore`]: everything on disk in sled (the default for all but mailboxes);
//!   only `sled/` names `sled::`.
//! - [`MemoryStore`]: everything in memory, for tests.
//! - [`Stores`]: how the backends are put together for a relay.
//! - [`GroupCommit`]: makes every store durable, one flush shared by concurrent writers.
//! - [`fault`]: test-only injection of a full disk (ENOSPC) at chosen writes.
//!
//! # Contract
//! - Stores hold what the relay was given and nothing more: ciphertext, opaque ids,
//!   public keys. They never learn who sent a message.
//! - `remove` and `expire` really delete: after they return, no read returns the
//!   message and, once flushed, it is gone from disk as far as the backend allows.
//! - Each mutating call is atomic: a message, its expiry index entry and its device's
//!   usage counter change together or not at all.
//! - Writes are visible to reads at once, and durable after [`Flush::flush`].
//! - Sequence numbers are per mailbox (`store/seq.rs`): they increase across calls and
//!   restarts, a mailbox's seq is never handed out again (even after it emptied and
//!   the store restarted), and one mailbox's traffic never moves another's seqs.
//! - Callers serialise mutations per device (the relay holds a per-device lock), so a
//!   store need not guard the usage counter's read-modify-write against itself.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress, DeviceId, MessageId};

use tern_platform::clock::UnixMillis;

use crate::core::budget::DiskSample;

pub mod backup;
pub(crate) mod codec;
mod commit;
mod compose;
pub(crate) mod days;
mod discovery;
mod expiry;
pub mod fault;
mod groups;
mod log;
mod memory;
pub mod pg;
pub(crate) mod push;
mod seq;
mod shared;
mod sled;
mod slots;
pub mod version;

#[cfg(test)]
mod conformance;

pub use self::commit::{Durability, GroupCommit};

/// What a store calls with the mailboxes a commit made readable before it is durable
/// ([`MailboxStore::on_visible`]).
pub type VisibleHook = std::sync::Arc<dyn Fn(&[DeviceAddress]) + Send + Sync>;

/// A read in flight ([`MailboxStore::read_later`]).
pub type ReadLater<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = StoreResult<Vec<StoredMessage>>> + Send + 'a>,
>;
pub use self::compose::Stores;
pub use self::days::{AccountDays, DeviceDays};
pub use self::discovery::{DiscoveryStore, TagRecord, DETACHED_NUMBER_RETENTION_MS};
pub(crate) use self::expiry::{due, ExpiryIndex};
pub use self::groups::{
    FetchedPackage, GroupLock, GroupState, GroupStore, HandleBytes, KeyPackageCounts,
    KeyPackageStore,
};
pub use self::log::{LogOptions, LogStore, DEFAULT_SEGMENT_BYTES, SCRUB_INTERVAL};
pub use self::memory::MemoryStore;
pub use self::push::PushStore;
pub use self::shared::{SharedAppend, SharedEntry};
pub use self::sled::{DeviceKeysDump, DiscoveryDump, DumpedPackages, SledStore};
pub use self::slots::{MemorySlots, ProvisioningStore, SlotOpen, SlotTake};

/// A storage backend failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend reported an error.
    #[error("backend: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
    /// An id chosen for a new record is taken.
    #[error("id already exists")]
    Exists,
    /// A write found the disk full (ENOSPC): that write failed, and nothing stored
    /// before it was lost.
    #[error("no space left on the device")]
    NoSpace,
    /// Another process holds the store (sled's exclusive lock on its database): a
    /// running relay, or an admin command.
    #[error("data directory in use by a running relay; stop it")]
    Locked,
    /// A shared backend (the database, the object store) could not be reached in time,
    /// lost the connection, or is read-only (a standby during failover): nothing was
    /// changed, or the change is unknown and the caller acknowledged nothing. Worth a
    /// retry once the backend is back.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// An append to an account that is being deleted (a shared backend saw the
    /// deletion intent another node recorded): refused as to an unknown recipient.
    #[error("the recipient's account is being deleted")]
    Deleted,
}

impl StoreError {
    /// `e` as a store error: [`StoreError::NoSpace`] for ENOSPC, else a backend error
    /// with `context`.
    pub(crate) fn from_io(context: &str, e: &std::io::Error) -> StoreError {
        if is_no_space(e) {
            StoreError::NoSpace
        } else {
            StoreError::Backend(format!("{context}: {e}"))
        }
    }
}

/// Whether an I/O error is ENOSPC (matched on the errno: `ErrorKind::StorageFull` is
/// newer than the minimum Rust version).
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

/// Free space and size of the file system holding `path`. Free is what an
/// unprivileged writer may use (`f_bavail`): blocks reserved for root are not
/// counted, since root in a container may not be allowed them either.
pub(crate) fn disk_sample(path: &std::path::Path) -> std::io::Result<DiskSample> {
    let s = rustix::fs::statvfs(path)?;
    Ok(DiskSample {
        free: s.f_bavail.saturating_mul(s.f_frsize),
        size: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// Result with [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

/// An envelope to queue: the request's own type, stored without a copy.
pub use tern_proto::Envelope;
/// A public key with the account identity's signature over it, as published.
pub use tern_proto::SignedKey;

/// A queued envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the mailbox; increasing.
    pub seq: u64,
    /// The sender's id for it.
    pub message_id: MessageId,
    /// Ciphertext.
    pub payload: Bytes,
    /// When the relay accepted it.
    pub accepted_at: UnixMillis,
    /// When it expires.
    pub expires_at: UnixMillis,
    /// The body of a multi-recipient send, stored once for all its recipients;
    /// `payload` is then this mailbox's part (often empty). `None` for a message of
    /// its own.
    pub shared_body: Option<Bytes>,
}

/// What a mailbox holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Queued messages.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
}

/// What every mailbox holds together; kept as the stores change, so reading it is
/// O(1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Queued messages (a shared body's entries each count).
    pub messages: u64,
    /// Bytes stored: payloads and parts, and each shared body once (the mailboxes'
    /// usage counts a shared body once per entry).
    pub bytes: u64,
    /// Mailboxes holding at least one message.
    pub mailboxes: u64,
}

/// An entry of the expiry index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// The mailbox.
    pub to: DeviceAddress,
    /// The message.
    pub seq: u64,
    /// When it expired.
    pub expires_at: UnixMillis,
}

/// A backend that can make its changes durable. Its own trait so that a backend that
/// holds no mailboxes need not implement [`MailboxStore`] to be flushed.
pub trait Flush: Send + Sync + 'static {
    /// Makes every change so far durable (fsync).
    fn flush(&self) -> StoreResult<()>;

    /// [`Flush::flush`], with the outcome for the mailboxes apart from the rest's:
    /// where they are separate stores, a commit that wrote only mailboxes (a send, an
    /// ack) does not fail because the rest could not flush.
    fn flush_parts(&self) -> (StoreResult<()>, StoreResult<()>) {
        let all = self.flush();
        (all.clone(), all)
    }
}

/// A mailbox write: applied when the call returned (the embedded stores: durable at
/// the next [`Flush::flush`]), or pending a shared commit that the receiver reports
/// (PostgreSQL: visible and durable once it answers).
#[derive(Debug)]
pub enum Staged<T> {
    /// Done.
    Applied(T),
    /// Queued for a commit; the answer comes after it.
    Pending(tokio::sync::oneshot::Receiver<StoreResult<T>>),
}

impl<T> Staged<T> {
    /// The write's outcome, once committed (at once when applied).
    pub async fn wait(self) -> StoreResult<T> {
        match self {
            Staged::Applied(t) => Ok(t),
            Staged::Pending(rx) => rx
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("mailbox writer stopped".into()))),
        }
    }
}

/// Queued envelopes, one mailbox per device. See the module docs for the contract.
pub trait MailboxStore: Flush {
    /// [`MailboxStore::append`], or queued for a commit shared with other writes;
    /// appends staged in one order to one mailbox get their seqs in that order.
    fn stage_append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Staged<Vec<u64>>> {
        self.append(to, msgs, accepted_at, expires_at)
            .map(Staged::Applied)
    }

    /// [`MailboxStore::append_shared`], or queued for a commit shared with other
    /// writes (the body and every entry in one transaction).
    fn stage_append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Staged<Vec<u64>>> {
        self.append_shared(append).map(Staged::Applied)
    }

    /// Stores `append`'s body once and one entry per mailbox pointing at it, all or
    /// nothing; returns each entry's seq, in order. Each entry counts toward its
    /// mailbox's usage as one message of (part + body) bytes; the totals count the
    /// body once. The body is deleted with its last entry (ack, expiry, purge). One
    /// its entries no longer account for (deleted outside the store, a count that
    /// drifted) goes anyway: the embedded stores drop it when they recount at open,
    /// PostgreSQL's [`MailboxStore::sweep_files`] a day past its expiry whatever its
    /// count. An entry to a mailbox the backend refuses (PostgreSQL: an account being
    /// deleted, a closed mailbox) is not stored and gets seq 0 (all refused: the
    /// body is not stored either). Visible at once; durable after [`Flush::flush`].
    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>>;

    /// Shared bodies held now (for tests and the metrics).
    fn shared_bodies(&self) -> u64 {
        0
    }

    /// [`MailboxStore::remove`], or queued for a commit shared with other writes.
    fn stage_remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Staged<Usage>> {
        self.remove(of, seqs).map(Staged::Applied)
    }

    /// Queues `msgs` in order, accepted at `accepted_at` and expiring at `expires_at`,
    /// and returns their sequence numbers. Visible at once; durable after
    /// [`Flush::flush`].
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>>;

    /// Up to `max` messages with a sequence number above `after`, in order.
    /// Includes expired messages: filtering is the caller's rule.
    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>>;

    /// [`MailboxStore::read`] as a future, for a store whose reads are network round
    /// trips: the caller's thread serves other tasks meanwhile instead of blocking.
    /// `None` (the default): the store reads memory or a local disk; call `read`.
    fn read_later(&self, _of: &DeviceAddress, _after: u64, _max: usize) -> Option<ReadLater<'_>> {
        None
    }

    /// Deletes the given messages where present; returns what was deleted.
    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage>;

    /// What the mailbox holds now.
    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage>;

    /// What every mailbox holds together, in O(1) (for the relay-wide budgets).
    fn totals(&self) -> Totals;

    /// [`MailboxStore::usage`] and [`MailboxStore::totals`] in one read: a send checks
    /// both, and a store with one index answers them under one lock.
    fn usage_and_totals(&self, of: &DeviceAddress) -> StoreResult<(Usage, Totals)> {
        Ok((self.usage(of)?, self.totals()))
    }

    /// Readies what [`MailboxStore::usage_and_totals`] will read for `of`, before the
    /// caller takes the device's lock: a store whose reads go over the network fills
    /// its cache here, so the read under the lock is a memory lookup. Errors are left
    /// for that read to report.
    fn prefetch_usage(&self, _of: &DeviceAddress) {}

    /// Asks the store to call `hook` with the mailboxes that took messages as soon as
    /// staged appends are readable, before they are durable (a shared backend whose
    /// commits do not wait for the flush), so that connected recipients are woken
    /// without waiting for it. True if it will: the caller then wakes no one for those
    /// appends once they are durable, and does there only what must wait for
    /// durability (push wake-ups). Default: it will not.
    fn on_visible(&self, _hook: VisibleHook) -> bool {
        false
    }

    /// Up to `max` expiry index entries with `expires_at <= now`, oldest first.
    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>>;

    /// Deletes expired entries of one mailbox (from [`MailboxStore::expired`]) with
    /// their messages; returns what was deleted.
    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage>;

    /// Finishes deferred work (a removal's disk work) now rather than in the
    /// background, for a clean shutdown; [`Flush::flush`] makes it durable.
    fn settle(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Deletes what the store kept past its messages whose deadline is `now` or
    /// earlier (the log's segments kept for damage, PostgreSQL's shared bodies a day
    /// past their expiry); called by every sweep.
    fn sweep_files(&self, _now: UnixMillis) -> StoreResult<()> {
        Ok(())
    }

    /// Up to `max` seqs of the mailbox's messages after `after`, in order, without
    /// reading their payloads where the backend can (purge, export counts).
    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        Ok(self
            .read(of, after, max)?
            .into_iter()
            .map(|m| m.seq)
            .collect())
    }

    /// Deletes every message of the mailbox, as [`MailboxStore::remove`] does (on the
    /// log: dead headers at once, the bytes punched by the next scrub or
    /// [`MailboxStore::settle`]); returns what was deleted. For account deletion.
    /// It reads seqs only, [`PURGE_PAGE`] at a time: memory stays bounded whatever
    /// the mailbox holds.
    fn purge(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        let mut purged = Usage::default();
        let mut after = 0;
        // Each round moves `after` past the seqs it read, so the loop is bounded by
        // the mailbox's size.
        loop {
            let seqs = self.seqs(of, after, PURGE_PAGE)?;
            let Some(&last) = seqs.last() else {
                return Ok(purged);
            };
            after = last;
            let removed = self.remove(of, &seqs)?;
            if removed.messages == 0 {
                return Err(StoreError::Corrupt(
                    "purge: listed messages that remove cannot find",
                ));
            }
            purged.messages += removed.messages;
            purged.bytes += removed.bytes;
        }
    }
}

/// Seqs a purge lists and removes at a time (8 KiB of seqs).
pub const PURGE_PAGE: usize = 1024;

/// A blob id: SHA-256 of the blob's (encrypted) bytes.
pub type BlobId = [u8; 32];

/// A stored blob. It names no account: who uploaded it is forgotten when the upload
/// completes, and the uploader's quota is a [charge](BlobIndex::account_bytes) that
/// expires on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobMeta {
    /// Bytes.
    pub size: u64,
    /// When its upload completed.
    pub created_at: UnixMillis,
    /// Its last upload or forward.
    pub last_used_at: UnixMillis,
    /// When the sweeper deletes it.
    pub expires_at: UnixMillis,
}

/// An upload in progress (its bytes are in a file beside the blobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadMeta {
    /// The size the uploader announced.
    pub size: u64,
    /// When it started.
    pub started_at: UnixMillis,
    /// When bytes last arrived.
    pub touched_at: UnixMillis,
}

/// Milliseconds in a UTC day (Unix time has no leap seconds).
pub const DAY_MS: u64 = 86_400_000;

/// The UTC day `t` falls on, counted from the Unix epoch.
pub fn utc_day(t: UnixMillis) -> u64 {
    t / DAY_MS
}

/// What the relay knows about blobs; their bytes are files the caller keeps.
///
/// Privacy contract: a blob's record names no account. An account appears only in
/// its unfinished uploads (until they complete or are abandoned) and in its charges:
/// one amount per UTC day on which charged blobs expire, so at most 31 per account
/// with the 30-day cap on a blob's life, each deleted once its day has passed.
pub trait BlobIndex: Send + Sync + 'static {
    /// A blob's record.
    fn blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>>;
    /// Records a complete blob, in one atomic change: its record (naming no one), a
    /// charge of `meta.size` bytes to `uploader` until the end of the UTC day of
    /// `meta.expires_at`, and the end of `uploader`'s upload of it.
    fn insert_blob(&self, id: &BlobId, meta: &BlobMeta, uploader: &AccountId) -> StoreResult<()>;
    /// Moves a blob's expiry (a forward, or a repeated upload); `None` if absent.
    /// Charges no one.
    fn touch_blob(
        &self,
        id: &BlobId,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Option<BlobMeta>>;
    /// Deletes a blob's record. Uncharges no one: the charge expires on its own.
    fn remove_blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>>;
    /// Deletes a blob's record if it expired by `now` (a forward on another node may
    /// have moved it since the sweep listed it); returns the record it deleted.
    fn remove_expired_blob(&self, id: &BlobId, now: UnixMillis) -> StoreResult<Option<BlobMeta>> {
        match self.blob(id)? {
            Some(m) if m.expires_at <= now => self.remove_blob(id),
            _ => Ok(None),
        }
    }
    /// Up to `max` blobs with `expires_at <= now`, soonest first.
    fn expired_blobs(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<BlobId>>;
    /// Bytes charged to `account` that are still due at `now`: its charges for the
    /// UTC day of `now` and later.
    fn account_bytes(&self, account: &AccountId, now: UnixMillis) -> StoreResult<u64>;
    /// Deletes up to `max` charges for UTC days before that of `now`; returns how
    /// many it deleted.
    fn expire_charges(&self, now: UnixMillis, max: usize) -> StoreResult<usize>;
    /// An upload in progress.
    fn upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<Option<UploadMeta>>;
    /// Records an upload in progress.
    fn put_upload(&self, account: &AccountId, id: &BlobId, meta: &UploadMeta) -> StoreResult<()>;
    /// Forgets an upload.
    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<()>;
    /// `account`'s uploads in progress: blob id and announced size.
    fn uploads_of(&self, account: &AccountId) -> StoreResult<Vec<(BlobId, u64)>>;
    /// Makes every change so far durable.
    fn flush_blobs(&self) -> StoreResult<()>;
    /// Up to `max` uploads whose bytes last arrived before `before`.
    fn stale_uploads(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> StoreResult<Vec<(AccountId, BlobId)>>;
    /// `account`'s charges, due or not yet expired: (UTC day, bytes), by day.
    fn charges_of(&self, account: &AccountId) -> StoreResult<Vec<(u64, u64)>>;
    /// Deletes everything that ties `account` to media, in one atomic change: its
    /// charges (with their expiry entries) and its uploads in progress. Returns the
    /// ids of those uploads, whose partial files the caller deletes. Finished blobs
    /// name no one and are left to expire (ARCHITECTURE §14).
    fn remove_account_media(&self, account: &AccountId) -> StoreResult<Vec<BlobId>>;
    /// The size of every blob recorded, summed: what the relay-wide blob budget
    /// counts when the bytes live in a shared object store (`None`: the index cannot
    /// say cheaply; the bytes are counted where they live).
    fn blob_bytes(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }
    /// Up to `max` blobs whose records [`BlobIndex::remove_blob`] deleted (or whose
    /// entries [`BlobIndex::queue_object_gc`] made, now due) and whose bytes may still
    /// be stored: an index shared by several nodes queues them in the
    /// same transaction as the deletion, so a crash before the bytes go never orphans
    /// them. Embedded indexes queue nothing (their one process deletes the bytes
    /// right after the record).
    fn object_gc_pending(&self, _max: usize) -> StoreResult<Vec<BlobId>> {
        Ok(Vec::new())
    }
    /// Ends the queue entry of `id` once its bytes are deleted.
    fn object_gc_done(&self, _id: &BlobId) -> StoreResult<()> {
        Ok(())
    }
    /// Queues blob `id`'s bytes for deletion `after` from now (an entry due sooner is
    /// moved to then), unless [`BlobIndex::insert_blob`] records the blob first,
    /// which ends the entry. An upload's finish queues its object before it stores
    /// it, so that a failure before the record leaves no object that nothing names.
    /// Embedded indexes queue nothing.
    fn queue_object_gc(&self, _id: &BlobId, _after: std::time::Duration) -> StoreResult<()> {
        Ok(())
    }
    /// Runs `f` holding blob `id`'s lock across every node sharing this index, so a
    /// sweep deleting the blob's bytes and a finish storing and recording them never
    /// interleave. With `wait`, waits for another holder up to the index's statement
    /// deadline; without, gives up at once. Returns `false` (and `f` did not run) when
    /// another holder kept the lock. Embedded indexes have one process, whose callers
    /// serialise these steps themselves: `f` just runs.
    fn with_blob_lock(&self, _id: &BlobId, _wait: bool, f: &mut dyn FnMut()) -> StoreResult<bool> {
        f();
        Ok(true)
    }
}

/// A registered account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Ed25519 identity public key.
    pub identity_key: [u8; 32],
    /// Its devices' Ed25519 public keys.
    pub devices: Vec<(DeviceId, [u8; 32])>,
}

impl AccountRecord {
    /// A device's public key.
    pub fn device_key(&self, device: DeviceId) -> Option<&[u8; 32]> {
        self.devices
            .iter()
            .find(|(id, _)| *id == device)
            .map(|(_, key)| key)
    }
}

/// Accounts and their device keys. Values are public keys: not secret, but their
/// integrity decides who may read a mailbox.
pub trait AccountStore: Send + Sync + 'static {
    /// Stores a new account; `Err(Exists)` if `id` is taken. Its days are unknown.
    fn create(&self, id: &AccountId, record: &AccountRecord) -> StoreResult<()> {
        self.create_on(id, record, None)
    }

    /// Stores a new account created on UTC day `day`, which is also the created and
    /// last-seen day of each of its devices; `Err(Exists)` if `id` is taken.
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        day: Option<u32>,
    ) -> StoreResult<()>;

    /// The account's created day and its devices' days; `None` without the account.
    fn days(&self, id: &AccountId) -> StoreResult<Option<AccountDays>>;

    /// Moves the device's last-seen day on to `day`, writing only when it is later
    /// than the stored one: at most one write per device per day. Whether it wrote;
    /// `false` for an unknown account or device.
    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool>;

    /// The account, if it exists.
    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>>;

    /// Adds a device key, created (and seen) on UTC day `day`, and returns its id;
    /// the existing id if the key is already registered; `None` if the account does
    /// not exist.
    fn add_device(
        &self,
        id: &AccountId,
        device_key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>>;

    /// Sets the SHA-256 of the account's delivery token, replacing any earlier one.
    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()>;

    /// The SHA-256 of the account's delivery token, if it set one.
    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>>;

    /// Deletes the account and its delivery token hash in one atomic change; returns
    /// the record it deleted, `None` if there was none.
    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>>;

    /// Records the intent to delete the account and its devices, so a start finishes
    /// a deletion that a crash interrupted. Replaces an earlier intent for it.
    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()>;

    /// Every recorded deletion intent.
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>>;

    /// Forgets a deletion intent (the deletion is complete).
    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()>;

    /// The account's current signed device list, if it published one.
    fn device_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>>;

    /// The version of the account's device list; 0 without one. What the recipient
    /// cache keeps: a store that can read it alone should (the list is up to 5 KiB).
    fn device_list_version(&self, id: &AccountId) -> StoreResult<u64> {
        Ok(self.device_list(id)?.map_or(0, |l| l.version))
    }

    /// Stores a newer device list; `false` (nothing changed) when the stored one
    /// is as new or newer, or the account does not exist.
    fn put_device_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool>;

    /// Deletes one device's row (its key and days); never device 1. Whether it was
    /// there. The device's id is never handed out again.
    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool>;

    /// Up to `max` linked devices (never device 1, nor one whose last-seen day is
    /// unknown) last seen before UTC day `seen_before_day`. The embedded store reads
    /// a bounded number of account records per call and goes on from there on the
    /// next, so a call may miss devices a later one finds.
    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>>;

    /// Records the intent to remove a device, so a start finishes a removal a
    /// crash interrupted.
    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()>;

    /// Every recorded device-removal intent.
    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>>;

    /// Forgets a device-removal intent (the removal is complete).
    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()>;
}

/// An account's signed device list as the relay keeps it: the exact signed bytes
/// (`tern_proto::device_list`), their version and the identity's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredList {
    /// The list's version (also inside `list`).
    pub version: u64,
    /// The signed bytes.
    pub list: Vec<u8>,
    /// The identity's Ed25519 signature over them.
    pub signature: [u8; 64],
}

/// A one-time prekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneTimeKey {
    /// Its id, chosen by the device.
    pub id: u32,
    /// X25519 public key.
    pub key: [u8; 32],
}

/// What a fetch hands out for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeys {
    /// The device's identity agreement key.
    pub identity_dh: SignedKey,
    /// Its current signed prekey.
    pub signed_prekey: SignedKey,
    /// One one-time prekey, now deleted from the pool; `None` when the pool was empty.
    pub one_time: Option<OneTimeKey>,
}

/// Devices' published prekeys (public keys; their signatures are checked before they
/// are stored).
///
/// Contract: [`KeyStore::fetch`] hands out each one-time prekey at most once, even to
/// concurrent callers, and deletes it in the same step.
pub trait KeyStore: Send + Sync + 'static {
    /// Stores the given keys (`None` leaves the current one) and adds one-time prekeys
    /// (replacing any with the same id); returns the size of the one-time pool.
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64>;

    /// The device's keys, with one one-time prekey taken out of the pool if
    /// `one_time` (else none is taken or returned); `None` if the device has not
    /// published an identity agreement key and a signed prekey.
    fn fetch(&self, of: &DeviceAddress, one_time: bool) -> StoreResult<Option<FetchedKeys>>;

    /// One-time prekeys left for the device.
    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64>;

    /// What the device has published, without taking anything (for export).
    fn published(&self, of: &DeviceAddress) -> StoreResult<Published>;

    /// Deletes every key the device published, in one atomic change.
    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()>;

    /// Deletes every key published by any device of the account, in one atomic
    /// change: a scan of the account's keys, so a device that no record names
    /// loses its keys too (account deletion).
    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()>;
}

/// What a device has published, as counts and ids (no key bytes): the export's view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Whether an identity agreement key is stored.
    pub identity_dh: bool,
    /// The id of the stored signed prekey.
    pub signed_prekey_id: Option<u32>,
    /// One-time prekeys left.
    pub one_time: u64,
}
