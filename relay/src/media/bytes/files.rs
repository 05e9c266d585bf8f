//! Blob files: where blob bytes live, how an upload's file becomes a blob, and the
//! reader that streams a blob out. The rules about who may do what, and the
//! metadata, are in the parent module; this one only moves bytes.
//!
//! Layout under the data directory: `blobs/<first two hex digits>/<hex id>` for
//! blobs, `uploads/<hash of account and id>.part` for uploads in progress. An
//! upload's file is verified against its id, fsynced, renamed into `blobs/`, and both
//! directories are fsynced, so a blob either is whole in place or is not there.

use super::hex;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};
use tern_platform::direct_io::{self, AlignedBuf, DIRECT_ALIGN};
use tern_proto::AccountId;

use super::{BlobBytes, BlobReader, OpenUpload};
use crate::media::{lock, BlobError, BlobResult};
use crate::store::BlobId;

/// An upload's key: the account uploading, and the id its bytes claim.
type UploadKey = (AccountId, BlobId);

/// The blob and upload files under a data directory.
pub(crate) struct BlobFiles {
    blobs_dir: PathBuf,
    uploads_dir: PathBuf,
    /// The hash of each upload so far, kept as bytes arrive so that verifying need
    /// not read the file again (after a restart or a resume it does).
    hashing: Mutex<HashMap<UploadKey, (u64, Sha256)>>,
}

/// An upload's file, open for one append.
pub(crate) struct UploadFile {
    file: File,
    /// Bytes in it now.
    pub(crate) len: u64,
}

/// An [`UploadFile`] with the files it belongs to, for [`BlobBytes`].
struct OpenFile<'a> {
    files: &'a BlobFiles,
    account: AccountId,
    id: BlobId,
    upload: UploadFile,
}

impl OpenUpload for OpenFile<'_> {
    fn len(&self) -> u64 {
        self.upload.len
    }

    fn append(self: Box<Self>, bytes: &[u8]) -> BlobResult<bool> {
        let OpenFile {
            files,
            account,
            id,
            upload,
        } = *self;
        Ok(files.append(&account, &id, upload, bytes)?)
    }
}

/// An upload's file whose bytes all arrived, open for verifying.
pub(crate) struct CompleteUpload {
    file: File,
    /// Bytes in it.
    pub(crate) len: u64,
}

/// Fsyncs a directory, so a rename or removal in it survives a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file; one already gone is fine.
fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl BlobFiles {
    /// Bytes of every blob file (once, at start: it reads each directory).
    pub(crate) fn stored_bytes(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for shard in fs::read_dir(&self.blobs_dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                total += f?.metadata()?.len();
            }
        }
        Ok(total)
    }

    /// The files under `data_dir`; makes their directories if need be.
    pub(crate) fn open(data_dir: &Path) -> std::io::Result<Self> {
        let blobs_dir = data_dir.join("blobs");
        let uploads_dir = data_dir.join("uploads");
        fs::create_dir_all(&blobs_dir)?;
        fs::create_dir_all(&uploads_dir)?;
        Ok(BlobFiles {
            blobs_dir,
            uploads_dir,
            hashing: Mutex::default(),
        })
    }

    /// Where blob `id` lives.
    pub(crate) fn blob_path(&self, id: &BlobId) -> PathBuf {
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

    /// Bytes an earlier upload left to resume from (0 if none).
    pub(crate) fn upload_len(&self, account: &AccountId, id: &BlobId) -> u64 {
        fs::metadata(self.upload_path(account, id)).map_or(0, |m| m.len())
    }

    /// Throws an upload's bytes away, so that it starts over.
    pub(crate) fn discard_upload(&self, account: &AccountId, id: &BlobId) {
        let _ = fs::remove_file(self.upload_path(account, id));
        lock(&self.hashing).remove(&(*account, *id));
    }

    /// Deletes an upload's file (one already gone is fine) and its running hash.
    pub(crate) fn remove_upload(&self, account: &AccountId, id: &BlobId) -> std::io::Result<()> {
        lock(&self.hashing).remove(&(*account, *id));
        remove_if_there(&self.upload_path(account, id))
    }

    /// Deletes a blob's file (one already gone is fine).
    pub(crate) fn remove_blob(&self, id: &BlobId) -> std::io::Result<()> {
        remove_if_there(&self.blob_path(id))
    }

    /// Opens (or creates) an upload's file for an append.
    pub(crate) fn open_upload(
        &self,
        account: &AccountId,
        id: &BlobId,
    ) -> std::io::Result<UploadFile> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.upload_path(account, id))?;
        let len = file.metadata()?.len();
        Ok(UploadFile { file, len })
    }

    /// Writes `bytes` at the end of the upload's file and feeds them to its running
    /// hash: with direct I/O when address, offset and length are aligned and the file
    /// system takes it, else through the page cache. Returns whether the write was
    /// direct.
    pub(crate) fn append(
        &self,
        account: &AccountId,
        id: &BlobId,
        upload: UploadFile,
        bytes: &[u8],
    ) -> std::io::Result<bool> {
        let UploadFile { file, len } = upload;
        // The file was opened for this write alone: direct I/O is tried afresh.
        let mut direct = !bytes.is_empty()
            && direct_io::is_aligned(len, bytes)
            && direct_io::set_direct(&file, true);
        crate::store::fault::check(crate::store::fault::Site::BlobWrite)?;
        let was_direct = direct_io::write_all_at(&file, len, bytes, &mut direct)?;
        let key = (*account, *id);
        let taken = lock(&self.hashing).remove(&key);
        let running = match taken {
            Some((at, hash)) if at == len => Some(hash),
            _ if len == 0 => Some(Sha256::new()),
            _ => None,
        };
        if let Some(mut hash) = running {
            hash.update(bytes);
            lock(&self.hashing).insert(key, (len + bytes.len() as u64, hash));
        }
        Ok(was_direct)
    }

    /// Opens an upload's file to verify it.
    pub(crate) fn complete_upload(
        &self,
        account: &AccountId,
        id: &BlobId,
    ) -> std::io::Result<CompleteUpload> {
        let file = File::open(self.upload_path(account, id))?;
        let len = file.metadata()?.len();
        Ok(CompleteUpload { file, len })
    }

    /// The SHA-256 of the upload's bytes: the running hash if it covers them all,
    /// else read from the file.
    pub(crate) fn digest(
        &self,
        account: &AccountId,
        id: &BlobId,
        upload: &mut CompleteUpload,
    ) -> std::io::Result<[u8; 32]> {
        let running = lock(&self.hashing).remove(&(*account, *id));
        Ok(match running {
            Some((at, hash)) if at == upload.len => hash.finalize().into(),
            _ => {
                let mut hash = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = upload.file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hash.update(&buf[..n]);
                }
                hash.finalize().into()
            }
        })
    }

    /// Makes a verified upload's bytes durable, before it is renamed into place.
    pub(crate) fn sync(upload: CompleteUpload) -> std::io::Result<()> {
        upload.file.sync_all()
    }

    /// Renames a verified, synced upload into place as blob `id`, and fsyncs the
    /// directories involved, so that the blob survives a crash.
    pub(crate) fn keep_upload(&self, account: &AccountId, id: &BlobId) -> std::io::Result<()> {
        let target = self.blob_path(id);
        let dir = target
            .parent()
            .ok_or_else(|| std::io::Error::other("a blob path has a directory"))?;
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            // The new directory's own entry must survive a crash too.
            sync_dir(&self.blobs_dir)?;
        }
        fs::rename(self.upload_path(account, id), &target)?;
        sync_dir(dir)?;
        sync_dir(&self.uploads_dir)
    }

    /// Opens blob `id` (of `size` bytes) for reading from `offset`, in chunks of up to
    /// `chunk` bytes.
    pub(crate) fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> std::io::Result<FileReader> {
        let file = File::open(self.blob_path(id))?;
        Ok(FileReader::new(file, offset, size, chunk))
    }
}

impl BlobBytes for BlobFiles {
    fn stored_bytes(&self) -> BlobResult<Option<u64>> {
        Ok(Some(BlobFiles::stored_bytes(self)?))
    }

    fn blob_len(&self, id: &BlobId) -> BlobResult<Option<u64>> {
        match fs::metadata(self.blob_path(id)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn upload_len(&self, account: &AccountId, id: &BlobId) -> BlobResult<u64> {
        Ok(BlobFiles::upload_len(self, account, id))
    }

    fn discard_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        BlobFiles::discard_upload(self, account, id);
        Ok(())
    }

    fn open_upload<'a>(
        &'a self,
        account: &AccountId,
        id: &BlobId,
    ) -> BlobResult<Box<dyn OpenUpload + 'a>> {
        let upload = BlobFiles::open_upload(self, account, id)?;
        Ok(Box::new(OpenFile {
            files: self,
            account: *account,
            id: *id,
            upload,
        }))
    }

    fn complete_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<[u8; 32]> {
        let mut upload = BlobFiles::complete_upload(self, account, id)?;
        if upload.len != size {
            return Err(BlobError::Incomplete {
                received: upload.len,
                size,
            });
        }
        let digest = self.digest(account, id, &mut upload)?;
        if digest == *id {
            BlobFiles::sync(upload)?;
        }
        Ok(digest)
    }

    fn keep_upload(&self, account: &AccountId, id: &BlobId, _size: u64) -> BlobResult<()> {
        Ok(BlobFiles::keep_upload(self, account, id)?)
    }

    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        Ok(BlobFiles::remove_upload(self, account, id)?)
    }

    fn remove_blob(&self, id: &BlobId) -> BlobResult<()> {
        Ok(BlobFiles::remove_blob(self, id)?)
    }

    fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> BlobResult<BlobReader> {
        BlobFiles::open_read(self, id, offset, size, chunk)
            .map(BlobReader::File)
            .map_err(|_| BlobError::NotFound)
    }
}

/// Buffers a [`FileReader`] keeps for reuse, at most (4 MiB at 256 KiB chunks).
const POOLED: usize = 16;

/// Reads a blob out for sending, in chunks handed over without a copy: with direct
/// I/O where the file system allows (see the parent module's docs), into buffers that
/// come back to the reader once the transport has sent and dropped them.
pub(crate) struct FileReader {
    file: File,
    direct: bool,
    pos: u64,
    size: u64,
    chunk: usize,
    pool: Arc<Mutex<Vec<AlignedBuf>>>,
}

/// A chunk's buffer; back to its reader's pool when dropped.
struct Pooled {
    /// Always there until dropped.
    buf: Option<AlignedBuf>,
    /// Bytes read only to start on an aligned offset.
    skip: usize,
    pool: Weak<Mutex<Vec<AlignedBuf>>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf
            .as_ref()
            .map_or(&[], |b| &b.as_slice()[self.skip..])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(pool), Some(buf)) = (self.pool.upgrade(), self.buf.take()) {
            let mut pool = lock(&pool);
            if pool.len() < POOLED {
                pool.push(buf);
            }
        }
    }
}

impl FileReader {
    fn new(file: File, offset: u64, size: u64, chunk: usize) -> Self {
        let direct = direct_io::set_direct(&file, true);
        FileReader {
            file,
            direct,
            pos: offset,
            size,
            chunk: direct_io::align_up(chunk),
            pool: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The blob's size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether it reads with direct I/O (it stops if the file system refuses).
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Buffers waiting for reuse.
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> usize {
        lock(&self.pool).len()
    }

    /// The next chunk; `None` at the end, or early if the file is shorter than its
    /// record. Blocks.
    pub(crate) fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        match self.read() {
            Err(e) if self.direct && direct_io::is_einval(&e) => {
                // Direct I/O refused after all: the page cache will do.
                self.direct = false;
                if !direct_io::set_direct(&self.file, false) {
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
        let pooled = lock(&self.pool).pop();
        let mut buf = pooled.unwrap_or_else(|| AlignedBuf::new(self.chunk));
        let got = buf.read_at(&self.file, base, want, self.direct)?;
        let len = got.saturating_sub(skip);
        if len == 0 {
            return Ok(None);
        }
        self.pos += len as u64;
        Ok(Some(bytes::Bytes::from_owner(Pooled {
            buf: Some(buf),
            skip,
            pool: Arc::downgrade(&self.pool),
        })))
    }
}
