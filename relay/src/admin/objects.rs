//! `admin migrate --objects`: blob bytes from the data directory's files into the
//! object store of `[objects]`, one object per blob, through the same [`BlobBytes`]
//! calls an upload makes (so each object's SHA-256 is checked against its id before
//! it becomes visible).

use crate::error::{Error, Result};
use crate::media::bytes::{BlobBytes, BlobFiles, S3Bytes, S3Settings};
use crate::store::{BlobId, BlobMeta};
use tern_proto::AccountId;

/// Bytes read from a file per append.
const CHUNK: usize = 1 << 20;
/// The uploader the migration's uploads are keyed by (no account: nothing is charged).
const MIGRATION: AccountId = AccountId([0; 16]);

/// Copies each blob's bytes into the object store; a blob already there is left
/// (a second run resumes). Returns (copied, already there). A blob whose file is
/// missing or whose bytes do not hash to its id fails the copy.
pub(super) fn copy(
    data_dir: &std::path::Path,
    settings: &S3Settings,
    blobs: &[(BlobId, BlobMeta)],
) -> Result<(u64, u64)> {
    let files = BlobFiles::open(data_dir)
        .map_err(|e| Error::Config(format!("{}: {e}", data_dir.display())))?;
    let s3 = S3Bytes::open(settings)?;
    let (mut copied, mut present) = (0, 0);
    for (id, meta) in blobs {
        if s3.has_blob(id)? {
            present += 1;
            continue;
        }
        s3.discard_upload(&MIGRATION, id)?;
        let mut reader = BlobBytes::open_read(&files, id, 0, meta.size, CHUNK)?;
        // Each chunk moves the reader on: bounded by the blob's size.
        while let Some(chunk) = reader.next_chunk().map_err(|e| {
            Error::Store(crate::store::StoreError::from_io("reading a blob file", &e))
        })? {
            s3.open_upload(&MIGRATION, id)?.append(&chunk)?;
        }
        let hash = s3.complete_upload(&MIGRATION, id, meta.size)?;
        if hash != *id {
            s3.remove_upload(&MIGRATION, id)?;
            return Err(Error::Store(crate::store::StoreError::Corrupt(
                "a blob file's bytes do not match its id",
            )));
        }
        s3.keep_upload(&MIGRATION, id)?;
        copied += 1;
    }
    Ok((copied, present))
}
