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
//! # Rules
//! - A blob expires `ttl` (at most 30 days) after its last upload or forward; the
//!   sweeper deletes expired blobs, and uploads with no bytes for `abandon_after`.
//! - Limits: blob size, concurrent uploads per account, bytes an account owns, and
//!   upload rate per account; each refusal is a typed error.
//! - Downloads need only the id (256 bits, unguessable).
//!
//! # Direct I/O
//! Upload bytes gathered in a [`WriteBuf`] go to disk with `O_DIRECT` where the file
//! system takes it, bypassing the page cache, and a [`BlobReader`] reads blobs the
//! same way into buffers it reuses. Moving new data through the page cache costs a
//! copy into freshly allocated pages; on the 2-core VM the benchmarks run on, that ran
//! at 377-707 MiB/s (against 3.3-4.6 GiB/s into reused pages), about a third of an
//! upload's CPU. Unaligned writes (a resumed upload's odd offset, the last piece) and
//! file systems without direct I/O use the page cache.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_proto::AccountId;

use crate::core::rate::RateLimiter;
use crate::store::{BlobId, BlobIndex, BlobMeta, StoreError, UploadMeta};
use tern_platform::clock::{Clock, UnixMillis};

/// Limits on media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    /// Largest blob.
    pub max_blob_bytes: u64,
    /// Uploads one account may run at once.
    pub max_concurrent_uploads: usize,
    /// Unfinished uploads one account may keep (running or waiting for a resume).
    pub max_unfinished_uploads: usize,
    /// Bytes of blobs one account may own (blobs it uploaded first).
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

/// Why a blob operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Larger than the relay takes.
    #[error("blob too large: {size} bytes, at most {max}")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The account runs as many uploads as it may.
    #[error("too many uploads at once (at most {0})")]
    TooManyUploads(usize),
    /// This account is uploading this blob on another stream right now.
    #[error("an upload of this blob is already in progress")]
    InProgress,
    /// The account owns as many bytes as it may.
    #[error("storage quota reached")]
    QuotaExceeded,
    /// Faster than the account may upload; retry after the given time.
    #[error("upload rate exceeded")]
    RateLimited {
        /// When to retry.
        retry_after: Duration,
    },
    /// No such blob (or it expired).
    #[error("no such blob")]
    NotFound,
    /// No upload of this blob by this account is in progress.
    #[error("no such upload")]
    NoUpload,
    /// Bytes at an offset other than where the upload stands.
    #[error("upload is at byte {expected}, not {got}")]
    WrongOffset {
        /// Where the upload stands.
        expected: u64,
        /// Where the bytes claimed to start.
        got: u64,
    },
    /// More bytes than announced.
    #[error("more bytes than the announced size")]
    Overflow,
    /// Finished before all announced bytes arrived.
    #[error("upload incomplete: {received} of {size} bytes")]
    Incomplete {
        /// Bytes so far.
        received: u64,
        /// Announced size.
        size: u64,
    },
    /// The bytes do not hash to the claimed id; the upload was discarded.
    #[error("the uploaded bytes do not match the blob id")]
    DigestMismatch,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file operation failed.
    #[error("blob file: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with [`BlobError`].
pub type BlobResult<T> = Result<T, BlobError>;

/// How an upload begins.
#[derive(Debug)]
pub enum Begin {
    /// The relay has this blob: nothing to send; its life was extended.
    Exists(BlobMeta),
    /// Send bytes from `offset` (nonzero when resuming); the upload counts against the
    /// account's concurrent uploads until the slot is dropped.
    Upload {
        /// Where to resume.
        offset: u64,
        /// Holds the account's upload slot.
        slot: UploadSlot,
    },
}

/// One of an account's concurrent upload slots; freed when dropped.
#[derive(Debug)]
pub struct UploadSlot {
    account: AccountId,
    id: BlobId,
    uploading: Arc<Mutex<HashSet<(AccountId, BlobId)>>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        lock(&self.uploading).remove(&(self.account, self.id));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the sweeper removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Expired blobs.
    pub blobs: u64,
    /// Abandoned uploads.
    pub uploads: u64,
}

/// The relay's blobs. See the module docs.
pub struct BlobStore {
    blobs_dir: PathBuf,
    uploads_dir: PathBuf,
    index: Arc<dyn BlobIndex>,
    clock: Arc<dyn Clock>,
    limits: BlobLimits,
    uploading: Arc<Mutex<HashSet<(AccountId, BlobId)>>>,
    /// The hash of each upload so far, kept as bytes arrive so finishing need not
    /// read the file again (after a restart or a resume it does).
    hashing: Mutex<HashMap<(AccountId, BlobId), (u64, Sha256)>>,
    /// Upload bytes per account per second.
    rate: RateLimiter<AccountId>,
    /// Serialises index changes (see [`BlobIndex`]) and renames.
    commit: Mutex<()>,
    received: AtomicU64,
    direct: AtomicU64,
}

/// What direct I/O needs lined up: memory address, file offset and length. 4 KiB
/// covers 512-byte and 4 KiB logical blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// `n` (at least 1) rounded up to a multiple of [`DIRECT_ALIGN`].
fn align_up(n: usize) -> usize {
    n.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN
}

/// A zeroed buffer with room for `len` bytes from an aligned start: the vector and
/// that start (it stays aligned: the vector is never grown).
fn aligned_vec(len: usize) -> (Vec<u8>, usize) {
    let raw = vec![0u8; len + DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
    (raw, start)
}

/// Upload bytes gathered for one write, in memory aligned for direct I/O, reused
/// from write to write.
pub struct WriteBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    room: usize,
}

impl WriteBuf {
    /// A buffer for writes of up to `capacity` bytes (rounded up to [`DIRECT_ALIGN`]).
    pub fn new(capacity: usize) -> Self {
        let capacity = align_up(capacity);
        let (raw, start) = aligned_vec(capacity);
        WriteBuf {
            raw,
            start,
            len: 0,
            room: capacity,
        }
    }

    /// Empties the buffer; the next write will be at most `room` bytes (at most the
    /// capacity), so that a write can end on an aligned file offset.
    pub fn reset(&mut self, room: usize) {
        self.len = 0;
        self.room = room.min(self.raw.len() - DIRECT_ALIGN);
    }

    /// Copies in as much of `bytes` as there is room for; returns how much.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// Whether the next write is as large as it may be.
    pub fn is_full(&self) -> bool {
        self.len == self.room
    }

    /// The bytes gathered.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for WriteBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBuf")
            .field("len", &self.len)
            .field("room", &self.room)
            .finish()
    }
}

/// Buffers a [`BlobReader`] keeps for reuse, at most (4 MiB at 256 KiB chunks).
const POOLED: usize = 16;

/// Reads a blob out for sending, in chunks handed over without a copy: with direct
/// I/O where the file system allows (see the module docs), into buffers that come
/// back to the reader once the transport has sent and dropped them.
pub struct BlobReader {
    file: File,
    direct: bool,
    pos: u64,
    size: u64,
    chunk: usize,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A chunk's buffer; back to its reader's pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    pool: std::sync::Weak<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut pool = lock(&pool);
            if pool.len() < POOLED {
                pool.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// Turns direct I/O on or off for `file`; whether the system took it.
fn set_direct(file: &File, on: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
        fcntl_getfl(file)
            .and_then(|f| {
                let f = if on {
                    f | OFlags::DIRECT
                } else {
                    f - OFlags::DIRECT
                };
                fcntl_setfl(file, f)
            })
            .is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, on);
        false
    }
}

/// EINVAL, which is how direct I/O is refused.
fn is_einval(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidInput
}

impl BlobReader {
    fn new(file: File, offset: u64, size: u64, chunk: usize) -> Self {
        let direct = set_direct(&file, true);
        BlobReader {
            file,
            direct,
            pos: offset,
            size,
            chunk: align_up(chunk),
            pool: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `None` at the end, or early if the file is shorter than its
    /// record. Blocks.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        match self.read() {
            Err(e) if self.direct && is_einval(&e) => {
                // Direct I/O refused after all: the page cache will do.
                self.direct = false;
                if !set_direct(&self.file, false) {
                    return Err(e);
                }
                self.read()
            }
            r => r,
        }
    }

    fn read(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        if self.pos >= self.size {
            return Ok(None);
        }
        // Direct reads start on an aligned offset and read whole blocks.
        let align = if self.direct { DIRECT_ALIGN as u64 } else { 1 };
        let base = self.pos - self.pos % align;
        let skip = (self.pos - base) as usize;
        let want = usize::try_from(self.size - base)
            .unwrap_or(usize::MAX)
            .min(self.chunk);
        let io_len = want.div_ceil(align as usize) * align as usize;
        let (mut buf, start) = match lock(&self.pool).pop() {
            Some(buf) => {
                let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
                (buf, start)
            }
            None => aligned_vec(self.chunk),
        };
        let mut got = 0;
        while got < want {
            let n = self
                .file
                .read_at(&mut buf[start + got..start + io_len], base + got as u64)?;
            // A short direct read ends the file (another read would be misaligned).
            if n == 0 || (self.direct && n % DIRECT_ALIGN != 0) {
                got += n;
                break;
            }
            got += n;
        }
        let len = got.min(want).saturating_sub(skip);
        if len == 0 {
            return Ok(None);
        }
        self.pos += len as u64;
        Ok(Some(bytes::Bytes::from_owner(Pooled {
            buf,
            start: start + skip,
            len,
            pool: Arc::downgrade(&self.pool),
        })))
    }
}

/// Writes `bytes` at `at` in the upload `file` (opened for this write alone): with
/// direct I/O when address, offset and length are aligned and the file system takes
/// it, else through the page cache. Returns whether the write was direct.
fn write_upload(file: &File, at: u64, bytes: &[u8]) -> std::io::Result<bool> {
    let aligned = at % DIRECT_ALIGN as u64 == 0
        && bytes.len() % DIRECT_ALIGN == 0
        && (bytes.as_ptr() as usize) % DIRECT_ALIGN == 0;
    if aligned && !bytes.is_empty() && set_direct(file, true) {
        match file.write_all_at(bytes, at) {
            Ok(()) => return Ok(true),
            // No direct I/O here (or not for this file): the page cache will do. A
            // part written before the refusal is written over below.
            Err(e) if is_einval(&e) && set_direct(file, false) => {}
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(bytes, at)?;
    Ok(false)
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Fsyncs a directory, so a rename or removal in it survives a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlobStore {
    /// Blobs under `data_dir`, metadata in `index`.
    pub fn open(
        data_dir: &Path,
        index: Arc<dyn BlobIndex>,
        clock: Arc<dyn Clock>,
        limits: BlobLimits,
    ) -> BlobResult<Self> {
        let blobs_dir = data_dir.join("blobs");
        let uploads_dir = data_dir.join("uploads");
        fs::create_dir_all(&blobs_dir)?;
        fs::create_dir_all(&uploads_dir)?;
        Ok(BlobStore {
            blobs_dir,
            uploads_dir,
            index,
            clock,
            limits,
            uploading: Arc::default(),
            hashing: Mutex::default(),
            rate: RateLimiter::new(limits.max_upload_bytes_per_sec, 1000),
            commit: Mutex::new(()),
            received: AtomicU64::new(0),
            direct: AtomicU64::new(0),
        })
    }

    /// Blob bytes received over every upload since start.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Of those, the bytes written with direct I/O (see the module docs).
    pub fn direct_bytes(&self) -> u64 {
        self.direct.load(Ordering::Relaxed)
    }

    fn blob_path(&self, id: &BlobId) -> PathBuf {
        let name = hex(id);
        self.blobs_dir.join(&name[..2]).join(name)
    }

    /// The upload's file name names neither the account nor the blob.
    fn upload_path(&self, account: &AccountId, id: &BlobId) -> PathBuf {
        let name = Sha256::new()
            .chain_update(b"tern upload")
            .chain_update(account.as_bytes())
            .chain_update(id)
            .finalize();
        self.uploads_dir.join(format!("{}.part", hex(&name[..16])))
    }

    fn expires_from(&self, now: UnixMillis) -> UnixMillis {
        now.saturating_add(millis(self.limits.ttl))
    }

    /// A blob's record, if the relay has it, its file is there, and it has not
    /// expired. (A record without its file, left by a crash, counts as absent: the
    /// blob can be uploaded again.)
    pub fn status(&self, id: &BlobId) -> BlobResult<Option<BlobMeta>> {
        let now = self.clock.now();
        Ok(self
            .index
            .blob(id)?
            .filter(|m| m.expires_at > now && self.blob_path(id).exists()))
    }

    /// A forward: the blob lives another `ttl` from now. [`BlobError::NotFound`] if the
    /// relay no longer has it (the forwarder must upload again).
    pub fn touch(&self, id: &BlobId) -> BlobResult<BlobMeta> {
        let _commit = lock(&self.commit);
        let now = self.clock.now();
        if self.status(id)?.is_none() {
            return Err(BlobError::NotFound);
        }
        self.index
            .touch_blob(id, now, self.expires_from(now))?
            .ok_or(BlobError::NotFound)
    }

    /// Starts (or resumes) `account`'s upload of `size` bytes claimed to hash to `id`.
    pub fn begin(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<Begin> {
        if size > self.limits.max_blob_bytes {
            return Err(BlobError::TooLarge {
                size,
                max: self.limits.max_blob_bytes,
            });
        }
        if self.status(id)?.is_some() {
            return Ok(Begin::Exists(self.touch(id)?));
        }
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
        let owned = self.index.account_bytes(account)?;
        if owned.saturating_add(pending).saturating_add(size) > self.limits.max_account_bytes {
            return Err(BlobError::QuotaExceeded);
        }
        let slot = {
            // The uploads running now, one entry each: the account's count is theirs.
            let mut uploading = lock(&self.uploading);
            if uploading.contains(&(*account, *id)) {
                return Err(BlobError::InProgress);
            }
            let running = uploading.iter().filter(|(a, _)| a == account).count();
            if running >= self.limits.max_concurrent_uploads {
                return Err(BlobError::TooManyUploads(
                    self.limits.max_concurrent_uploads,
                ));
            }
            uploading.insert((*account, *id));
            UploadSlot {
                account: *account,
                id: *id,
                uploading: self.uploading.clone(),
            }
        };
        let now = self.clock.now();
        let path = self.upload_path(account, id);
        let earlier = self.index.upload(account, id)?;
        let offset = match earlier {
            // A different announced size starts over.
            Some(meta) if meta.size == size => fs::metadata(&path).map_or(0, |m| m.len()),
            _ => {
                let _ = fs::remove_file(&path);
                lock(&self.hashing).remove(&(*account, *id));
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
        Ok(Begin::Upload { offset, slot })
    }

    /// Appends bytes to `account`'s upload of `id` at `offset`, which must be where
    /// the upload stands. Returns the new length.
    pub fn append(
        &self,
        account: &AccountId,
        id: &BlobId,
        offset: u64,
        bytes: &[u8],
    ) -> BlobResult<u64> {
        let meta = self.index.upload(account, id)?.ok_or(BlobError::NoUpload)?;
        let path = self.upload_path(account, id);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
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
            .take(*account, n, self.clock.now())
            .map_err(|ms| BlobError::RateLimited {
                retry_after: Duration::from_millis(ms),
            })?;
        if write_upload(&file, len, bytes)? {
            self.direct.fetch_add(n, Ordering::Relaxed);
        }
        self.received.fetch_add(n, Ordering::Relaxed);
        let key = (*account, *id);
        let taken = lock(&self.hashing).remove(&key);
        let running = match taken {
            Some((at, hash)) if at == len => Some(hash),
            _ if len == 0 => Some(Sha256::new()),
            _ => None,
        };
        if let Some(mut hash) = running {
            hash.update(bytes);
            lock(&self.hashing).insert(key, (len + n, hash));
        }
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

    /// Ends an upload: its bytes must all be there and hash to `id`. Then they are
    /// fsynced, renamed into place, and recorded. A mismatch deletes the upload.
    pub fn finish(&self, account: &AccountId, id: &BlobId) -> BlobResult<BlobMeta> {
        let meta = self.index.upload(account, id)?.ok_or(BlobError::NoUpload)?;
        let path = self.upload_path(account, id);
        let mut file = File::open(&path)?;
        let received = file.metadata()?.len();
        if received != meta.size {
            return Err(BlobError::Incomplete {
                received,
                size: meta.size,
            });
        }
        let digest: [u8; 32] = match lock(&self.hashing).remove(&(*account, *id)) {
            Some((at, hash)) if at == received => hash.finalize().into(),
            _ => {
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                }
                hash.finalize().into()
            }
        };
        if digest != *id {
            drop(file);
            self.index.remove_upload(account, id)?;
            fs::remove_file(&path)?;
            return Err(BlobError::DigestMismatch);
        }
        file.sync_all()?;
        drop(file);
        let _commit = lock(&self.commit);
        let now = self.clock.now();
        if let Some(existing) = self.status(id)? {
            // Someone else completed the same blob meanwhile: keep theirs.
            self.index.remove_upload(account, id)?;
            fs::remove_file(&path)?;
            return Ok(self
                .index
                .touch_blob(id, now, self.expires_from(now))?
                .unwrap_or(existing));
        }
        let target = self.blob_path(id);
        let dir = target.parent().ok_or(BlobError::NotFound)?;
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            // The new directory's own entry must survive a crash too.
            sync_dir(&self.blobs_dir)?;
        }
        fs::rename(&path, &target)?;
        sync_dir(dir)?;
        sync_dir(&self.uploads_dir)?;
        let blob = BlobMeta {
            size: meta.size,
            created_at: now,
            last_used_at: now,
            expires_at: self.expires_from(now),
            owner: *account,
        };
        self.index.insert_blob(id, &blob)?;
        // Durable before the uploader is told, so a pointer it sends never names a
        // blob the relay forgets in a crash.
        self.index.flush_blobs()?;
        Ok(blob)
    }

    /// Opens a blob for reading from `offset`, in chunks of up to `chunk` bytes.
    pub fn open_read(&self, id: &BlobId, offset: u64, chunk: usize) -> BlobResult<BlobReader> {
        let meta = self.status(id)?.ok_or(BlobError::NotFound)?;
        if offset > meta.size {
            return Err(BlobError::WrongOffset {
                expected: meta.size,
                got: offset,
            });
        }
        let file = File::open(self.blob_path(id)).map_err(|_| BlobError::NotFound)?;
        Ok(BlobReader::new(file, offset, meta.size, chunk))
    }

    /// Deletes up to `max` expired blobs (record first, then file) and uploads
    /// abandoned for `abandon_after`.
    pub fn sweep(&self, max: usize) -> BlobResult<Swept> {
        let now = self.clock.now();
        let mut swept = Swept::default();
        for id in self.index.expired_blobs(now, max)? {
            let _commit = lock(&self.commit);
            // A forward may have moved it since the scan.
            if self.index.blob(&id)?.is_some_and(|m| m.expires_at <= now) {
                self.index.remove_blob(&id)?;
                match fs::remove_file(self.blob_path(&id)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                swept.blobs += 1;
            }
        }
        let before = now.saturating_sub(millis(self.limits.abandon_after));
        // Uploads running now are skipped, so ask for that many more.
        let running = lock(&self.uploading).len();
        for (account, id) in self
            .index
            .stale_uploads(before, max.saturating_add(running))?
        {
            // Held while removing: a `begin` of this very upload waits for it.
            let uploading = lock(&self.uploading);
            if uploading.contains(&(account, id)) {
                continue;
            }
            self.index.remove_upload(&account, &id)?;
            lock(&self.hashing).remove(&(account, id));
            match fs::remove_file(self.upload_path(&account, &id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            swept.uploads += 1;
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SledStore};
    use tern_platform::clock::ManualClock;

    fn id_of(bytes: &[u8]) -> BlobId {
        Sha256::digest(bytes).into()
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    /// Whether the file system under `dir` takes direct I/O (Linux's ext4 and xfs do;
    /// tmpfs before Linux 6.6 does not).
    /// (Asked with `open`, not with the code under test.)
    fn direct_io_here(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        let probe = dir.join("direct-probe");
        let opened = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&probe);
        let mut buf = WriteBuf::new(DIRECT_ALIGN);
        buf.fill(&[0; DIRECT_ALIGN]);
        let direct = opened.is_ok_and(|f| f.write_all_at(buf.as_slice(), 0).is_ok());
        let _ = fs::remove_file(&probe);
        cfg!(target_os = "linux") && direct
    }

    /// `n` bytes that differ from block to block, so a misplaced block shows.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    fn read_all(reader: &mut BlobReader) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().expect("read") {
            out.extend_from_slice(&chunk);
        }
        out
    }

    struct Fixture {
        store: BlobStore,
        clock: Arc<ManualClock>,
        dir: tempfile::TempDir,
    }

    fn fixture(index: Arc<dyn BlobIndex>, limits: BlobLimits) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = BlobStore::open(dir.path(), index, clock.clone(), limits).expect("open");
        Fixture { store, clock, dir }
    }

    fn upload(s: &BlobStore, account: &AccountId, bytes: &[u8]) -> BlobResult<BlobMeta> {
        let id = id_of(bytes);
        match s.begin(account, &id, bytes.len() as u64)? {
            Begin::Exists(meta) => Ok(meta),
            Begin::Upload { offset, slot } => {
                s.append(account, &id, offset, &bytes[offset as usize..])?;
                let meta = s.finish(account, &id);
                drop(slot);
                meta
            }
        }
    }

    const ALICE: AccountId = AccountId([1; 16]);
    const BOB: AccountId = AccountId([2; 16]);

    #[test]
    fn an_upload_becomes_a_blob_once_and_a_repeat_sends_nothing() {
        let sled_dir = tempfile::tempdir().expect("dir");
        for index in [
            Arc::new(MemoryStore::new()) as Arc<dyn BlobIndex>,
            Arc::new(SledStore::open(sled_dir.path(), 1 << 20).expect("sled")),
        ] {
            let f = fixture(index, BlobLimits::default());
            let bytes = vec![7u8; 100_000];
            let meta = upload(&f.store, &ALICE, &bytes).expect("upload");
            assert_eq!(meta.size, 100_000);
            assert_eq!(f.store.received_bytes(), 100_000);
            // Bob "uploads" the same id: nothing moves, the blob lives longer.
            f.clock.advance(Duration::from_secs(3600));
            let again = f.store.begin(&BOB, &id_of(&bytes), 100_000).expect("begin");
            assert!(matches!(again, Begin::Exists(m) if m.expires_at > meta.expires_at));
            assert_eq!(
                f.store.received_bytes(),
                100_000,
                "no bytes the second time"
            );
            let mut reader = f
                .store
                .open_read(&id_of(&bytes), 99_990, 4096)
                .expect("read");
            assert_eq!(reader.size(), 100_000);
            assert_eq!(read_all(&mut reader), vec![7u8; 10]);
            let blob_files = files(&f.dir.path().join("blobs"));
            assert_eq!(blob_files.len(), 1);
            assert!(files(&f.dir.path().join("uploads")).is_empty());
        }
    }

    #[test]
    fn a_wrong_upload_is_refused_and_leaves_nothing() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let claimed = id_of(b"what I say it is");
        let Begin::Upload { offset, slot } = f.store.begin(&ALICE, &claimed, 5).expect("begin")
        else {
            panic!("new blob")
        };
        f.store
            .append(&ALICE, &claimed, offset, b"other")
            .expect("append");
        assert!(matches!(
            f.store.finish(&ALICE, &claimed),
            Err(BlobError::DigestMismatch)
        ));
        drop(slot);
        assert!(f.store.status(&claimed).expect("status").is_none());
        assert!(
            files(f.dir.path()).is_empty(),
            "nothing behind: {:?}",
            files(f.dir.path())
        );
        // Bytes past the announced size, or at the wrong offset, are refused too.
        let id = id_of(b"abc");
        let Begin::Upload { .. } = f.store.begin(&ALICE, &id, 3).expect("begin") else {
            panic!("new blob")
        };
        assert!(matches!(
            f.store.append(&ALICE, &id, 0, b"abcd"),
            Err(BlobError::Overflow)
        ));
        assert!(matches!(
            f.store.append(&ALICE, &id, 1, b"b"),
            Err(BlobError::WrongOffset {
                expected: 0,
                got: 1
            })
        ));
        assert!(matches!(
            f.store.finish(&ALICE, &id),
            Err(BlobError::Incomplete { .. })
        ));
    }

    #[test]
    fn an_interrupted_upload_resumes_where_it_stopped() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let id = id_of(&bytes);
        let Begin::Upload { offset: 0, slot } = f.store.begin(&ALICE, &id, 200_000).expect("begin")
        else {
            panic!("fresh")
        };
        f.store
            .append(&ALICE, &id, 0, &bytes[..70_000])
            .expect("half");
        drop(slot); // the connection dropped
        let Begin::Upload {
            offset,
            slot: _slot,
        } = f.store.begin(&ALICE, &id, 200_000).expect("again")
        else {
            panic!("resume")
        };
        assert_eq!(offset, 70_000);
        f.store
            .append(&ALICE, &id, offset, &bytes[70_000..])
            .expect("rest");
        f.store.finish(&ALICE, &id).expect("complete");
        assert_eq!(f.store.received_bytes(), 200_000, "each byte once");
    }

    #[test]
    fn expiry_deletes_the_blob_and_a_forward_moves_it() {
        let limits = BlobLimits {
            ttl: Duration::from_secs(3600),
            ..BlobLimits::default()
        };
        let f = fixture(Arc::new(MemoryStore::new()), limits);
        let (a, b) = (b"forwarded".to_vec(), b"left alone".to_vec());
        upload(&f.store, &ALICE, &a).expect("a");
        upload(&f.store, &ALICE, &b).expect("b");
        f.clock.advance(Duration::from_secs(1800));
        f.store.touch(&id_of(&a)).expect("forward");
        f.clock.advance(Duration::from_secs(1801));
        assert!(
            f.store.status(&id_of(&b)).expect("status").is_none(),
            "expired is gone at once"
        );
        let swept = f.store.sweep(100).expect("sweep");
        assert_eq!(swept.blobs, 1);
        assert!(
            f.store.status(&id_of(&a)).expect("status").is_some(),
            "the forward kept it"
        );
        assert_eq!(files(&f.dir.path().join("blobs")).len(), 1);
        assert!(matches!(
            f.store.touch(&id_of(&b)),
            Err(BlobError::NotFound)
        ));
        f.clock.advance(Duration::from_secs(3600));
        assert_eq!(f.store.sweep(100).expect("sweep").blobs, 1);
        assert!(files(&f.dir.path().join("blobs")).is_empty());
        assert_eq!(f.store.index.account_bytes(&ALICE).expect("bytes"), 0);
    }

    #[test]
    fn abandoned_uploads_are_swept() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let id = id_of(b"never finished");
        let Begin::Upload { slot, .. } = f.store.begin(&ALICE, &id, 14).expect("begin") else {
            panic!("fresh")
        };
        f.store.append(&ALICE, &id, 0, b"never").expect("append");
        drop(slot);
        assert_eq!(
            f.store.sweep(100).expect("sweep").uploads,
            0,
            "not yet abandoned"
        );
        f.clock.advance(Duration::from_secs(25 * 3600));
        assert_eq!(f.store.sweep(100).expect("sweep").uploads, 1);
        assert!(files(f.dir.path()).is_empty());
    }

    #[test]
    fn limits_refuse_with_clear_errors() {
        let limits = BlobLimits {
            max_blob_bytes: 1000,
            max_concurrent_uploads: 1,
            max_account_bytes: 1500,
            max_upload_bytes_per_sec: 2000,
            ..BlobLimits::default()
        };
        let f = fixture(Arc::new(MemoryStore::new()), limits);
        assert!(matches!(
            f.store.begin(&ALICE, &[1; 32], 1001),
            Err(BlobError::TooLarge {
                size: 1001,
                max: 1000
            })
        ));
        let first = f.store.begin(&ALICE, &[1; 32], 10).expect("one upload");
        assert!(matches!(
            f.store.begin(&ALICE, &[1; 32], 10),
            Err(BlobError::InProgress)
        ));
        assert!(matches!(
            f.store.begin(&ALICE, &[2; 32], 10),
            Err(BlobError::TooManyUploads(1))
        ));
        assert!(f.store.begin(&BOB, &[2; 32], 10).is_ok(), "per account");
        drop(first);
        upload(&f.store, &ALICE, &[5u8; 1000]).expect("within quota");
        assert!(matches!(
            f.store.begin(&ALICE, &[3; 32], 600),
            Err(BlobError::QuotaExceeded)
        ));
        // Rate: an account's bytes per second.
        let f = fixture(
            Arc::new(MemoryStore::new()),
            BlobLimits {
                max_upload_bytes_per_sec: 2000,
                ..BlobLimits::default()
            },
        );
        let bytes = [6u8; 3000];
        let id = id_of(&bytes);
        let Begin::Upload { slot: _slot, .. } = f.store.begin(&BOB, &id, 3000).expect("begin")
        else {
            panic!("fresh")
        };
        f.store
            .append(&BOB, &id, 0, &bytes[..1500])
            .expect("within rate");
        assert!(matches!(
            f.store.append(&BOB, &id, 1500, &bytes[1500..]),
            Err(BlobError::RateLimited { .. })
        ));
        f.clock.advance(Duration::from_secs(1));
        f.store
            .append(&BOB, &id, 1500, &bytes[1500..])
            .expect("next second");
        f.store.finish(&BOB, &id).expect("complete");
    }

    #[test]
    fn unfinished_uploads_count_against_the_quota_and_are_capped() {
        let limits = BlobLimits {
            max_account_bytes: 1000,
            max_unfinished_uploads: 2,
            ..BlobLimits::default()
        };
        let f = fixture(Arc::new(MemoryStore::new()), limits);
        // Two uploads left half done (their slots dropped, as by lost connections).
        for i in 0..2u8 {
            let Begin::Upload { slot, .. } = f.store.begin(&ALICE, &[i; 32], 400).expect("begin")
            else {
                panic!("fresh")
            };
            f.store
                .append(&ALICE, &[i; 32], 0, &[0; 10])
                .expect("append");
            drop(slot);
        }
        assert!(matches!(
            f.store.begin(&ALICE, &[9; 32], 100),
            Err(BlobError::TooManyUploads(2))
        ));
        // Resuming one of them is fine; the quota counts both announced sizes.
        assert!(f.store.begin(&ALICE, &[0; 32], 400).is_ok());
        let f = fixture(
            Arc::new(MemoryStore::new()),
            BlobLimits {
                max_account_bytes: 1000,
                ..BlobLimits::default()
            },
        );
        drop(f.store.begin(&ALICE, &[1; 32], 700).expect("begin"));
        assert!(matches!(
            f.store.begin(&ALICE, &[2; 32], 400),
            Err(BlobError::QuotaExceeded)
        ));
    }

    #[test]
    fn the_sweeper_skips_only_the_upload_running_now() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let Begin::Upload { slot: running, .. } =
            f.store.begin(&ALICE, &[1; 32], 10).expect("begin")
        else {
            panic!("fresh")
        };
        let Begin::Upload { slot, .. } = f.store.begin(&ALICE, &[2; 32], 10).expect("begin") else {
            panic!("fresh")
        };
        f.store.append(&ALICE, &[2; 32], 0, b"abc").expect("append");
        drop(slot);
        f.clock.advance(Duration::from_secs(25 * 3600));
        assert_eq!(
            f.store.sweep(1).expect("sweep").uploads,
            1,
            "the abandoned one goes"
        );
        assert!(f
            .store
            .index
            .upload(&ALICE, &[1; 32])
            .expect("upload")
            .is_some());
        drop(running);
        assert_eq!(f.store.sweep(1).expect("sweep").uploads, 1);
    }

    #[test]
    fn a_record_without_its_file_counts_as_absent() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let bytes = b"lost in a crash".to_vec();
        upload(&f.store, &ALICE, &bytes).expect("upload");
        for file in files(&f.dir.path().join("blobs")) {
            fs::remove_file(file).expect("remove");
        }
        assert!(f.store.status(&id_of(&bytes)).expect("status").is_none());
        assert!(matches!(
            f.store.touch(&id_of(&bytes)),
            Err(BlobError::NotFound)
        ));
        let again = upload(&f.store, &ALICE, &bytes).expect("uploaded again");
        assert_eq!(again.size, bytes.len() as u64);
        assert_eq!(files(&f.dir.path().join("blobs")).len(), 1);
    }

    #[test]
    fn a_write_buffer_is_aligned_and_stops_where_told() {
        let mut buf = WriteBuf::new(10_000);
        assert_eq!(buf.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(
            buf.fill(&[1; 20_000]),
            3 * DIRECT_ALIGN,
            "rounded up to 12 KiB"
        );
        assert!(buf.is_full());
        buf.reset(100);
        assert!(buf.as_slice().is_empty());
        assert_eq!(buf.fill(&[2; 60]), 60);
        assert_eq!(buf.fill(&[3; 60]), 40);
        assert!(buf.is_full());
        assert_eq!(buf.as_slice(), [[2; 60].as_slice(), &[3; 40]].concat());
        buf.reset(usize::MAX);
        assert_eq!(
            buf.fill(&[4; 20_000]),
            3 * DIRECT_ALIGN,
            "never past capacity"
        );
    }

    #[test]
    fn aligned_pieces_go_direct_and_odd_ones_through_the_page_cache() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let bytes = pattern(3 * DIRECT_ALIGN + 300);
        let id = id_of(&bytes);
        let Begin::Upload { slot, .. } = f
            .store
            .begin(&ALICE, &id, bytes.len() as u64)
            .expect("begin")
        else {
            panic!("a new blob");
        };
        let mut buf = WriteBuf::new(2 * DIRECT_ALIGN);
        let mut offset = 0u64;
        // Aligned, then an odd piece (page cache), then an odd offset (page cache),
        // then the rest.
        for (from, to) in [
            (0, 2 * DIRECT_ALIGN),
            (2 * DIRECT_ALIGN, 2 * DIRECT_ALIGN + 100),
            (2 * DIRECT_ALIGN + 100, 3 * DIRECT_ALIGN + 100),
            (3 * DIRECT_ALIGN + 100, bytes.len()),
        ] {
            buf.reset(to - from);
            assert_eq!(buf.fill(&bytes[from..to]), to - from);
            offset = f
                .store
                .append(&ALICE, &id, offset, buf.as_slice())
                .expect("append");
        }
        assert_eq!(f.store.received_bytes(), bytes.len() as u64);
        let expected = if direct_io_here(f.dir.path()) {
            2 * DIRECT_ALIGN as u64
        } else {
            0
        };
        assert_eq!(
            f.store.direct_bytes(),
            expected,
            "only the aligned piece bypasses the page cache"
        );
        f.store
            .finish(&ALICE, &id)
            .expect("the bytes hash to the id");
        drop(slot);
        let mut reader = f.store.open_read(&id, 0, 8192).expect("blob");
        assert_eq!(reader.size(), bytes.len() as u64);
        assert_eq!(read_all(&mut reader), bytes);
    }

    #[test]
    fn a_reader_returns_every_byte_from_any_offset_and_reuses_its_buffers() {
        let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
        let bytes = pattern(5 * DIRECT_ALIGN + 123);
        upload(&f.store, &ALICE, &bytes).expect("upload");
        let id = id_of(&bytes);
        for offset in [0, 1, 4095, 4096, 10_000, bytes.len() - 1, bytes.len()] {
            for chunk in [1, 4096, 5000, 1 << 20] {
                let mut reader = f.store.open_read(&id, offset as u64, chunk).expect("open");
                assert_eq!(
                    read_all(&mut reader),
                    bytes[offset..],
                    "offset {offset}, chunk {chunk}"
                );
            }
        }
        // Chunks dropped before the next read come back: the pool stays at one buffer.
        let mut reader = f.store.open_read(&id, 0, 4096).expect("open");
        while reader.next_chunk().expect("read").is_some() {}
        assert_eq!(
            reader.direct,
            direct_io_here(f.dir.path()),
            "direct reads (and their offset arithmetic) are tested where the file system has them"
        );
        assert_eq!(lock(&reader.pool).len(), 1);
        // A file shorter than its record ends the read early, without an error.
        let path = f.store.blob_path(&id);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_len(4096 + 10))
            .expect("truncate");
        let mut reader = f.store.open_read(&id, 100, 4096).expect("open");
        assert_eq!(read_all(&mut reader), bytes[100..4096 + 10]);
    }
}
