//! Where blob bytes live: [`BlobBytes`], the byte side of media, with two stores:
//! files under the data directory ([`BlobFiles`], the default) and an S3-compatible
//! object store ([`S3Bytes`]). The rules, limits and metadata stay in the parent module;
//! a store only moves bytes and checks them against the id they claim.
//!
//! Every method blocks: media calls them from `spawn_blocking`.

pub(crate) mod files;
pub(crate) mod s3;

pub(crate) use files::BlobFiles;
pub(crate) use s3::{S3Bytes, S3Settings};

use tern_proto::AccountId;

use super::BlobResult;
use crate::store::BlobId;

/// Bytes as lower-case hex: how blob ids name their files and objects (and how
/// certificate fingerprints and exports show bytes).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of blobs and of uploads in progress. An upload is keyed by the account
/// uploading and the id its bytes claim; a blob by its id.
pub(crate) trait BlobBytes: Send + Sync {
    /// Bytes of every blob, counted where they live (once, at start); `None` when
    /// they live in a shared store, whose bytes the blob index counts.
    fn stored_bytes(&self) -> BlobResult<Option<u64>>;

    /// The size of blob `id`'s bytes, if they are there. Bytes under a blob's name
    /// were verified against it before they got there.
    fn blob_len(&self, id: &BlobId) -> BlobResult<Option<u64>>;

    /// Whether blob `id`'s bytes are there.
    fn has_blob(&self, id: &BlobId) -> BlobResult<bool> {
        Ok(self.blob_len(id)?.is_some())
    }

    /// Bytes an earlier upload left to resume from (0 if none).
    fn upload_len(&self, account: &AccountId, id: &BlobId) -> BlobResult<u64>;

    /// Throws an upload's bytes away, so that it starts over.
    fn discard_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()>;

    /// Opens (or starts) an upload for one append.
    fn open_upload<'a>(
        &'a self,
        account: &AccountId,
        id: &BlobId,
    ) -> BlobResult<Box<dyn OpenUpload + 'a>>;

    /// Ends an upload whose announced size is `size`: [`super::BlobError::Incomplete`]
    /// unless that many bytes arrived; else the SHA-256 of its bytes. When that equals
    /// `id`, the bytes are durable and ready for [`BlobBytes::keep_upload`].
    fn complete_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<[u8; 32]>;

    /// Makes a completed, verified upload blob `id`, durably. The upload's bytes may
    /// stay where they were (an object store copies them): the caller removes them
    /// with [`BlobBytes::remove_upload`] once the blob is recorded, so that a finish
    /// retried after a failure in between still finds them.
    fn keep_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<()>;

    /// Deletes an upload's bytes (one already gone is fine).
    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()>;

    /// Deletes a blob's bytes (one already gone is fine).
    fn remove_blob(&self, id: &BlobId) -> BlobResult<()>;

    /// Opens blob `id` (of `size` bytes) for reading from `offset`, in chunks of up to
    /// about `chunk` bytes; [`super::BlobError::NotFound`] if its bytes are not there.
    fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> BlobResult<BlobReader>;
}

/// An upload open for one append.
pub(crate) trait OpenUpload {
    /// Bytes in it now: the next append goes there.
    fn len(&self) -> u64;

    /// Appends `bytes`. Returns whether they were written with direct I/O.
    fn append(self: Box<Self>, bytes: &[u8]) -> BlobResult<bool>;
}

/// Reads a blob out for sending, in chunks, with bounded memory.
pub(crate) enum BlobReader {
    /// From a file.
    File(files::FileReader),
    /// From an object store.
    S3(s3::S3Reader),
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobReader").finish_non_exhaustive()
    }
}

impl BlobReader {
    /// The blob's size.
    pub(crate) fn size(&self) -> u64 {
        match self {
            BlobReader::File(r) => r.size(),
            BlobReader::S3(r) => r.size(),
        }
    }

    /// The next chunk; `None` at the end, or early if the stored bytes are shorter than
    /// their record. Blocks.
    pub(crate) fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        match self {
            BlobReader::File(r) => r.next_chunk(),
            BlobReader::S3(r) => r.next_chunk(),
        }
    }

    /// Whether it reads with direct I/O.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        matches!(self, BlobReader::File(r) if r.is_direct())
    }

    /// Buffers waiting for reuse.
    #[cfg(test)]
    pub(crate) fn pooled(&self) -> usize {
        match self {
            BlobReader::File(r) => r.pooled(),
            BlobReader::S3(_) => 0,
        }
    }
}
