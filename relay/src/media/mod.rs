//! Encrypted media: content-addressed blobs, stored once however often forwarded.
//!
//! A blob's id is the SHA-256 of its bytes, which clients encrypted with a key the
//! relay never sees. Bytes live in files under `<data dir>/blobs/` (named by id),
//! metadata in the [`BlobIndex`]. An upload goes to a file under `uploads/`, named by a
//! hash of uploader and id, and becomes a blob only once its bytes hash to the id it
//! claimed: then it is fsynced, renamed into place and its directory fsynced, and only
//! then recorded. A wrong upload leaves nothing behind. Uploading an id the relay
//! already has transfers nothing and extends the blob's life, as a forward does.
//!
//! # Layout
//! - this module: the rules ([`BlobStore`]): limits, expiry, status, forwards (touch),
//!   uploads (begin, append, finish), the sweep.
//! - `bytes`: where the bytes live, behind the `BlobBytes` trait: `bytes::files`
//!   (the default: content-addressed paths, upload files verified, fsynced and
//!   renamed into place, and the reader that streams a blob out) and `bytes::s3`
//!   (an S3-compatible object store, `[objects]` in the configuration).
//! - `error`: [`BlobError`], why an operation was refused.
//! - The wire side is `net::media`.
//!
//! # Rules
//! - A blob expires `ttl` (at most 30 days) after its last upload or forward; the
//!   sweeper deletes expired blobs, and uploads with no bytes for `abandon_after`.
//! - Limits: blob size, concurrent uploads per account, bytes charged to an account,
//!   and upload rate per account; each refusal is a typed error.
//! - Uploads need an authenticated device (an [`AuthenticatedDevice`]). Downloads
//!   need only the id (256 bits, unguessable).
//!
//! # Who uploaded what
//! A finished blob's record names no account, so a later download or forward cannot
//! be tied to its uploader through the relay's records. The account is kept only
//! while its upload is unfinished (to resume it and to count it). Completing the
//! upload charges the account the blob's size until the end of the UTC day the blob
//! is to expire on (see [`BlobIndex`]); charges due today or later make up the
//! quota. A forward, or an upload of a blob the relay already has, charges no one,
//! and deleting a blob uncharges no one: its charge expires on its own, at most a
//! day after the blob would have without forwards. Expiry times the relay reports
//! (`reported_expiry`) are rounded down to the UTC day, so they do not give away
//! the exact time of the last upload or forward.
//!
//! # Direct I/O
//! Upload bytes gathered in an [`AlignedBuf`] go to disk with `O_DIRECT` where the
//! file system takes it, bypassing the page cache, and the blob reader reads blobs the
//! same way into buffers it reuses. Moving new data through the page cache costs a
//! copy into freshly allocated pages; on the 2-core VM the benchmarks run on, that ran
//! at 377-707 MiB/s (against 3.3-4.6 GiB/s into reused pages), about a third of an
//! upload's CPU. Unaligned writes (a resumed upload's odd offset, the last piece) and
//! file systems without direct I/O use the page cache. The helpers (aligned buffers,
//! turning `O_DIRECT` on and off, the fallback) are [`tern_platform::direct_io`],
//! shared with the client's downloads.
//!
//! # What is exported
//! The relay uses this module itself (`net::media`, the server's sweeper). Exported
//! are only [`BlobStore`], for its counters ([`BlobStore::received_bytes`],
//! [`BlobStore::direct_bytes`], which tests and benches read through
//! `Relay::blobs`), [`BlobLimits`] (the configuration) and [`BlobError`] (inside the
//! relay's `Error`).
//!
//! [`AlignedBuf`]: tern_platform::direct_io::AlignedBuf

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_platform::clock::{Clock, UnixMillis};
use tern_proto::AccountId;

use crate::core::auth::AuthenticatedDevice;
use crate::core::budget::Budget;
use crate::core::rate::ByteRate;
use crate::store::{BlobId, BlobIndex, BlobMeta, UploadMeta, DAY_MS};

pub(crate) mod bytes;
mod error;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cluster;
#[cfg(test)]
mod tests_deadline;
#[cfg(test)]
mod tests_s3;

pub(crate) use bytes::BlobReader;
use bytes::{BlobBytes, BlobFiles};
pub(crate) use bytes::{S3Bytes, S3Settings};
pub use error::{BlobError, BlobResult};

/// Limits on media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    /// Largest blob.
    pub max_blob_bytes: u64,
    /// Uploads one account may run at once.
    pub max_concurrent_uploads: usize,
    /// Unfinished uploads one account may keep (running or waiting for a resume).
    pub max_unfinished_uploads: usize,
    /// Bytes one account may have charged at once: its finished uploads until their
    /// charges expire (see the module docs), plus its unfinished ones.
    pub max_account_bytes: u64,
    /// Upload bytes per second per account, averaged over a second.
    pub max_upload_bytes_per_sec: u64,
    /// A blob lives this long after its last upload or forward (at most 30 days).
    pub ttl: Duration,
    /// An upload with no bytes for this long is deleted.
    pub abandon_after: Duration,
}

impl Default for BlobLimits {
    fn default() -> Self {
        BlobLimits {
            max_blob_bytes: 2 << 30,
            max_concurrent_uploads: 4,
            max_unfinished_uploads: 16,
            max_account_bytes: 20 << 30,
            max_upload_bytes_per_sec: 200 << 20,
            ttl: Duration::from_secs(30 * 24 * 3600),
            abandon_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// How an upload begins.
#[derive(Debug)]
pub(crate) enum Begin {
    /// The relay has this blob: nothing to send; its life was extended.
    Exists(BlobMeta),
    /// Send bytes from `offset` (nonzero when resuming).
    Upload {
        /// Where to resume.
        offset: u64,
        /// Marks the upload as running until dropped.
        running: RunningUpload,
    },
}

/// An upload running on a stream now: while it is held, the upload counts against
/// the account's concurrent uploads, another stream cannot run the same upload, and
/// the sweeper leaves it alone. Dropped when the stream ends.
#[derive(Debug)]
pub(crate) struct RunningUpload {
    account: AccountId,
    id: BlobId,
    running: Arc<Mutex<HashSet<(AccountId, BlobId)>>>,
}

impl Drop for RunningUpload {
    fn drop(&mut self) {
        crate::locks::lock(&self.running).remove(&(self.account, self.id));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the sweeper removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Expired blobs.
    pub(crate) blobs: u64,
    /// Abandoned uploads.
    pub(crate) uploads: u64,
    /// Objects of blobs deleted earlier (a crash or failure interrupted their
    /// deletion), deleted now.
    pub(crate) objects: u64,
    /// Charges of past days.
    pub(crate) charges: u64,
}

/// An expiry as the relay reports it: rounded down to the start of its UTC day.
/// Down, so a client errs toward forwarding or uploading again early, never toward
/// relying on a blob that is gone.
pub(crate) fn reported_expiry(expires_at: UnixMillis) -> UnixMillis {
    expires_at - expires_at % DAY_MS
}

/// The relay's blobs. See the module docs.
pub struct BlobStore {
    files: Arc<dyn BlobBytes>,
    index: Arc<dyn BlobIndex>,
    clock: Arc<dyn Clock>,
    limits: BlobLimits,
    /// The relay-wide blob bytes and the disk reserve.
    budget: Arc<Budget>,
    /// The uploads running on a stream now (see [`RunningUpload`]).
    running: Arc<Mutex<HashSet<(AccountId, BlobId)>>>,
    /// Upload bytes per account per second.
    rate: ByteRate<AccountId>,
    /// Serialises index changes (see [`BlobIndex`]) and renames.
    commit: Mutex<()>,
    received: AtomicU64,
    direct: AtomicU64,
    /// The bytes live in a shared store and the index counts them (see
    /// [`BlobStore::recount`]).
    counted_by_index: bool,
    /// Deleted accounts: set by the deletion service, whose removals no upload
    /// writes after (see [`crate::deletion::Tombstones::live`]).
    tombstones: std::sync::OnceLock<Arc<crate::deletion::Tombstones>>,
    /// How long a finish's object may await its record before a sweep may delete
    /// it (see [`ORPHAN_GRACE`]).
    orphan_grace: Duration,
}

/// A finish queues its object for deletion this far ahead before storing it (see
/// `BlobIndex::queue_object_gc`): far beyond the few deadlines a finish takes, so
/// only an object whose record failed is ever collected; a client's retry within
/// it reuses the object.
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl BlobStore {
    /// Blobs in files under `data_dir`, metadata in `index`; their bytes count
    /// against `budget` (the files found are counted now).
    pub(crate) fn open(
        data_dir: &Path,
        index: Arc<dyn BlobIndex>,
        clock: Arc<dyn Clock>,
        limits: BlobLimits,
        budget: Arc<Budget>,
    ) -> BlobResult<Self> {
        let files = Arc::new(BlobFiles::open(data_dir)?);
        Self::with_bytes(files, index, clock, limits, budget)
    }

    /// Blobs whose bytes live in `files`, metadata in `index`; their bytes count
    /// against `budget` (the bytes found are counted now).
    pub(crate) fn with_bytes(
        files: Arc<dyn BlobBytes>,
        index: Arc<dyn BlobIndex>,
        clock: Arc<dyn Clock>,
        limits: BlobLimits,
        budget: Arc<Budget>,
    ) -> BlobResult<Self> {
        let rate = ByteRate::new(limits.max_upload_bytes_per_sec, 1_000_000, clock.clone());
        let local = files.stored_bytes()?;
        let stored = match local {
            Some(n) => n,
            // Bytes in a shared object store: what the index records, never a
            // listing of the whole bucket.
            None => index.blob_bytes()?.unwrap_or(0),
        };
        budget.add_blob_bytes(stored);
        Ok(BlobStore {
            files,
            budget,
            index,
            clock,
            limits,
            running: Arc::default(),
            rate,
            commit: Mutex::new(()),
            received: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            counted_by_index: local.is_none(),
            tombstones: std::sync::OnceLock::new(),
            orphan_grace: ORPHAN_GRACE,
        })
    }

    /// Queues a finish's object for deletion `grace` ahead instead of
    /// [`ORPHAN_GRACE`] (for tests).
    #[cfg(test)]
    pub(crate) fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// Refuses every upload step of the accounts in `tombstones` from now on.
    pub(crate) fn refuse_deleted(&self, tombstones: Arc<crate::deletion::Tombstones>) {
        let _ = self.tombstones.set(tombstones);
    }

    /// The guard an upload step holds from its checks to its last write.
    fn live(&self, account: &AccountId) -> BlobResult<Option<crate::deletion::Live<'_>>> {
        match self.tombstones.get() {
            Some(t) => t.live(account).map(Some).ok_or(BlobError::AccountGone),
            None => Ok(None),
        }
    }

    /// Blob bytes received over every upload since start. Exported for tests and
    /// benches.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Of those, the bytes written with direct I/O (see the module docs). Exported
    /// for tests and benches.
    pub fn direct_bytes(&self) -> u64 {
        self.direct.load(Ordering::Relaxed)
    }

    fn expires_from(&self, now: UnixMillis) -> UnixMillis {
        now.saturating_add(millis(self.limits.ttl))
    }

    /// A blob's record, if the relay has it, its file is there, and it has not
    /// expired. (A record without its file, left by a crash, counts as absent: the
    /// blob can be uploaded again.)
    pub(crate) fn status(&self, id: &BlobId) -> BlobResult<Option<BlobMeta>> {
        let now = self.clock.now();
        match self.index.blob(id)?.filter(|m| m.expires_at > now) {
            Some(m) if self.files.has_blob(id)? => Ok(Some(m)),
            _ => Ok(None),
        }
    }

    /// A forward: the blob lives another `ttl` from now. [`BlobError::NotFound`] if the
    /// relay no longer has it (the forwarder must upload again).
    pub(crate) fn touch(&self, id: &BlobId) -> BlobResult<BlobMeta> {
        let _commit = lock(&self.commit);
        let now = self.clock.now();
        if self.status(id)?.is_none() {
            return Err(BlobError::NotFound);
        }
        self.index
            .touch_blob(id, now, self.expires_from(now))?
            .ok_or(BlobError::NotFound)
    }

    /// Starts (or resumes) `device`'s upload of `size` bytes claimed to hash to `id`;
    /// its account is charged for it when it completes.
    pub(crate) fn begin(
        &self,
        device: &AuthenticatedDevice,
        id: &BlobId,
        size: u64,
    ) -> BlobResult<Begin> {
        let account = &device.address().account;
        let _live = self.live(account)?;
        if size > self.limits.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size,
                max: self.limits.max_blob_bytes,
            });
        }
        if self.status(id)?.is_some() {
            return Ok(Begin::Exists(self.touch(id)?));
        }
        // A resumed upload is checked again: under the reserve it waits.
        self.budget.check_upload(size)?;
        // Unfinished uploads count against the quota too, and only so many may wait.
        let _commit = lock(&self.commit);
        let others: Vec<(BlobId, u64)> = self
            .index
            .uploads_of(account)?
            .into_iter()
            .filter(|(other, _)| other != id)
            .collect();
        if others.len() >= self.limits.max_unfinished_uploads {
            return Err(BlobError::TooManyUploads(
                self.limits.max_unfinished_uploads,
            ));
        }
        let pending: u64 = others.iter().map(|(_, n)| *n).sum();
        let charged = self.index.account_bytes(account, self.clock.now())?;
        if charged.saturating_add(pending).saturating_add(size) > self.limits.max_account_bytes {
            return Err(BlobError::QuotaExceeded);
        }
        let running = {
            // The uploads running now, one entry each: the account's count is theirs.
            let mut running = crate::locks::lock(&self.running);
            if running.contains(&(*account, *id)) {
                return Err(BlobError::InProgress);
            }
            let of_account = running.iter().filter(|(a, _)| a == account).count();
            if of_account >= self.limits.max_concurrent_uploads {
                return Err(BlobError::TooManyUploads(
                    self.limits.max_concurrent_uploads,
                ));
            }
            running.insert((*account, *id));
            RunningUpload {
                account: *account,
                id: *id,
                running: self.running.clone(),
            }
        };
        let now = self.clock.now();
        let earlier = self.index.upload(account, id)?;
        let offset = match earlier {
            // A different announced size starts over.
            Some(meta) if meta.size == size => self.files.upload_len(account, id)?,
            _ => {
                self.files.discard_upload(account, id)?;
                0
            }
        };
        let started_at = earlier.map_or(now, |m| m.started_at);
        self.index.put_upload(
            account,
            id,
            &UploadMeta {
                size,
                started_at,
                touched_at: now,
            },
        )?;
        Ok(Begin::Upload { offset, running })
    }

    /// Appends bytes to `device`'s upload of `id` at `offset`, which must be where
    /// the upload stands. Returns the new length.
    pub(crate) fn append(
        &self,
        device: &AuthenticatedDevice,
        id: &BlobId,
        offset: u64,
        bytes: &[u8],
    ) -> BlobResult<u64> {
        let account = &device.address().account;
        // Held to the end: an append never makes a `.part` file again after a
        // deletion removed it.
        let _live = self.live(account)?;
        let meta = self.index.upload(account, id)?.ok_or(BlobError::NoUpload)?;
        let file = self.files.open_upload(account, id)?;
        let len = file.len();
        if offset != len {
            return Err(BlobError::WrongOffset {
                expected: len,
                got: offset,
            });
        }
        let n = bytes.len() as u64;
        if len + n > meta.size {
            return Err(BlobError::Overflow);
        }
        self.rate
            .check(account, n)
            .map_err(|e| BlobError::RateLimited {
                retry_after: Duration::from_millis(e.retry_after_ms()),
            })?;
        if file.append(bytes)? {
            self.direct.fetch_add(n, Ordering::Relaxed);
        }
        self.received.fetch_add(n, Ordering::Relaxed);
        let now = self.clock.now();
        if now.saturating_sub(meta.touched_at) >= 1000 {
            self.index.put_upload(
                account,
                id,
                &UploadMeta {
                    touched_at: now,
                    ..meta
                },
            )?;
        }
        Ok(len + n)
    }

    /// Completes an upload's bytes and checks they hash to `id`; a mismatch deletes
    /// the upload.
    fn verify_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<()> {
        let digest = self.files.complete_upload(account, id, size)?;
        if digest != *id {
            self.index.remove_upload(account, id)?;
            self.files.remove_upload(account, id)?;
            return Err(BlobError::DigestMismatch);
        }
        Ok(())
    }

    /// Ends `device`'s upload: its bytes must all be there and hash to `id`. Then they
    /// are fsynced, renamed (or copied) into place, and recorded, and the account
    /// charged (see the module docs). A mismatch deletes the upload. Idempotent: a
    /// finish retried after a failure between storing the bytes and recording them
    /// records the bytes in place; an object whose record never comes is deleted by
    /// a sweep once [`ORPHAN_GRACE`] has passed (shared indexes). [`BlobError::Busy`]
    /// when another node held the blob's lock past the index's deadline.
    pub(crate) fn finish(&self, device: &AuthenticatedDevice, id: &BlobId) -> BlobResult<BlobMeta> {
        let account = &device.address().account;
        // The barrier is not held across the hash and the fsync (long for a big
        // upload): a deletion waiting for it would stall the sign-ins of every
        // account in its stripe. It is taken again for the rename and the records.
        drop(self.live(account)?);
        let meta = self.index.upload(account, id)?.ok_or(BlobError::NoUpload)?;
        // Bytes under the blob's name were verified before they got there: an
        // earlier finish stored them and failed before its record (this is the
        // client's retry), or an expired blob's bytes await deletion.
        // Only for an upload whose bytes all arrived: finishing proves possession
        // (asked second: usually there are no such bytes, and on S3 the upload's
        // length is one more request).
        let placed = self.files.blob_len(id)? == Some(meta.size)
            && self.files.upload_len(account, id)? == meta.size;
        if !placed {
            self.verify_upload(account, id, meta.size)?;
        }
        let _live = match self.live(account) {
            Ok(live) => live,
            Err(e) => {
                // Deleted meanwhile: its removals may have listed this upload
                // already; its file goes here too (a second unlink is harmless).
                let _ = self.files.remove_upload(account, id);
                return Err(e);
            }
        };
        let _commit = lock(&self.commit);
        // Under the blob's lock across nodes: a sweep elsewhere deletes its bytes
        // either before this checks and stores them, or not at all.
        self.under_blob_lock(id, true, || self.store_upload(account, id, &meta, placed))?
            .ok_or(BlobError::Busy {
                retry_after_ms: bytes::s3::BUSY_RETRY_MS,
            })
    }

    /// [`BlobStore::finish`] once its locks are held: stores the upload's bytes
    /// (unless `placed`) and records them, or keeps the blob another finish recorded.
    fn store_upload(
        &self,
        account: &AccountId,
        id: &BlobId,
        meta: &UploadMeta,
        mut placed: bool,
    ) -> BlobResult<BlobMeta> {
        if placed && self.files.blob_len(id)? != Some(meta.size) {
            // An expired blob's bytes, swept since they were seen: the upload's own
            // bytes (kept until the record) are verified and placed after all.
            self.verify_upload(account, id, meta.size)?;
            placed = false;
        }
        let now = self.clock.now();
        if let Some(existing) = self.status(id)? {
            // Someone else completed the same blob meanwhile: keep theirs.
            self.index.remove_upload(account, id)?;
            self.files.remove_upload(account, id)?;
            return Ok(self
                .index
                .touch_blob(id, now, self.expires_from(now))?
                .unwrap_or(existing));
        }
        // Collected after the grace unless the record below ends the entry first.
        self.index.queue_object_gc(id, self.orphan_grace)?;
        if !placed {
            self.files.keep_upload(account, id, meta.size)?;
        }
        let blob = BlobMeta {
            size: meta.size,
            created_at: now,
            last_used_at: now,
            expires_at: self.expires_from(now),
        };
        self.index.insert_blob(id, &blob, account)?;
        self.budget.add_blob_bytes(blob.size);
        // Durable before the uploader is told, so a pointer it sends never names a
        // blob the relay forgets in a crash.
        self.index.flush_blobs()?;
        // Recorded: the upload's bytes can go (the sweeper takes them with the
        // abandoned upload if this fails).
        if let Err(e) = self.files.remove_upload(account, id) {
            tracing::debug!(error = %e, "an upload's staged bytes stay for the sweeper");
        }
        Ok(blob)
    }

    /// `f`'s answer under blob `id`'s lock across nodes (`BlobIndex::with_blob_lock`);
    /// `None` when another node held it (past the index's deadline with `wait`).
    fn under_blob_lock<T>(
        &self,
        id: &BlobId,
        wait: bool,
        f: impl FnOnce() -> BlobResult<T>,
    ) -> BlobResult<Option<T>> {
        let (mut f, mut out) = (Some(f), None);
        let held = self.index.with_blob_lock(id, wait, &mut || {
            if let Some(f) = f.take() {
                out = Some(f());
            }
        })?;
        match out {
            Some(answer) if held => answer.map(Some),
            _ => Ok(None),
        }
    }

    /// Counts the relay-wide blob bytes again from the index, when the bytes live in
    /// a shared object store: other nodes' uploads and sweeps change them. Each node
    /// calls it once per sweep interval; a failure keeps the last count.
    pub(crate) fn recount(&self) {
        if !self.counted_by_index {
            return;
        }
        match self.index.blob_bytes() {
            Ok(Some(n)) => self.budget.set_blob_bytes(n),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "blob bytes not counted"),
        }
    }

    /// Opens a blob for reading from `offset`, in chunks of up to `chunk` bytes.
    pub(crate) fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        chunk: usize,
    ) -> BlobResult<BlobReader> {
        let meta = self.status(id)?.ok_or(BlobError::NotFound)?;
        if offset > meta.size {
            return Err(BlobError::WrongOffset {
                expected: meta.size,
                got: offset,
            });
        }
        self.files.open_read(id, offset, meta.size, chunk)
    }

    /// Deletes what ties `account` to media (account deletion): its upload-rate
    /// bucket, its unfinished uploads' partial files, then, in one change, their
    /// records and its charges.
    /// Files first: a crash between the two leaves records that a rerun finds again,
    /// never a file that no record names. Finished blobs name no one and stay until
    /// they expire. Returns how many uploads it deleted.
    pub(crate) fn remove_account(&self, account: &AccountId) -> BlobResult<usize> {
        self.rate.forget(account);
        for (id, _) in self.index.uploads_of(account)? {
            self.files.remove_upload(account, &id)?;
        }
        let removed = self.index.remove_account_media(account)?;
        // An upload begun since the listing: its file goes too.
        for id in &removed {
            self.files.remove_upload(account, id)?;
        }
        Ok(removed.len())
    }

    /// Whether the account has an upload-rate bucket (for tests).
    #[cfg(test)]
    pub(crate) fn upload_rate_holds(&self, account: &AccountId) -> bool {
        self.rate.holds(account)
    }

    /// Deletes up to `max` expired blobs (record first, then file), uploads abandoned
    /// for `abandon_after`, and charges of past days.
    pub(crate) fn sweep(&self, max: usize) -> BlobResult<Swept> {
        self.rate.housekeep();
        let now = self.clock.now();
        let mut swept = Swept::default();
        // Each under the blob's lock across nodes, so no finish stores and records its
        // bytes between these checks and the deletion; one held elsewhere waits a pass.
        for id in self.index.expired_blobs(now, max)? {
            let _commit = lock(&self.commit);
            // A forward (here or on another node) may have moved it since the scan.
            // A shared index queues the bytes with the deletion (see
            // `BlobIndex::object_gc_pending`); the entry ends once they are gone.
            let removed = self.under_blob_lock(&id, false, || {
                let Some(m) = self.index.remove_expired_blob(&id, now)? else {
                    return Ok(false);
                };
                self.files.remove_blob(&id)?;
                self.index.object_gc_done(&id)?;
                self.budget.remove_blob_bytes(m.size);
                Ok(true)
            })?;
            swept.blobs += u64::from(removed == Some(true));
        }
        // Deletions a crash or a failed call left queued.
        for id in self.index.object_gc_pending(max)? {
            let _commit = lock(&self.commit);
            let removed = self.under_blob_lock(&id, false, || {
                // Uploaded again since: the object is the new blob's.
                let orphan = self.index.blob(&id)?.is_none();
                if orphan {
                    self.files.remove_blob(&id)?;
                }
                self.index.object_gc_done(&id)?;
                Ok(orphan)
            })?;
            swept.objects += u64::from(removed == Some(true));
        }
        let before = now.saturating_sub(millis(self.limits.abandon_after));
        // Uploads running now are skipped, so ask for that many more.
        let running = crate::locks::lock(&self.running).len();
        for (account, id) in self
            .index
            .stale_uploads(before, max.saturating_add(running))?
        {
            // Held while removing: a `begin` of this very upload waits for it (off
            // its worker: this is held across store calls).
            let running = crate::locks::lock(&self.running);
            if running.contains(&(account, id)) {
                continue;
            }
            self.index.remove_upload(&account, &id)?;
            self.files.remove_upload(&account, &id)?;
            swept.uploads += 1;
        }
        swept.charges = self.index.expire_charges(now, max)? as u64;
        Ok(swept)
    }
}
