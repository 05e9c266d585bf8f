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
        s3.keep_upload(&MIGRATION, id, meta.size)?;
        s3.remove_upload(&MIGRATION, id)?;
        copied += 1;
    }
    Ok((copied, present))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::testing::TestS3;

    fn settings(s3: &TestS3) -> S3Settings {
        S3Settings::for_test(s3, Duration::from_secs(10))
    }

    fn meta(size: usize) -> BlobMeta {
        BlobMeta {
            size: size as u64,
            created_at: 1,
            last_used_at: 1,
            expires_at: 2,
        }
    }

    /// Writes `bytes` as a blob file; returns its id.
    fn blob(files: &BlobFiles, bytes: &[u8]) -> BlobId {
        let id: BlobId = Sha256::digest(bytes).into();
        let path = files.blob_path(&id);
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
        id
    }

    #[test]
    fn each_blob_becomes_one_object_checked_against_its_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = BlobFiles::open(dir.path()).expect("files");
        let big: Vec<u8> = (0..(6usize << 20)).map(|i| (i % 253) as u8).collect();
        let small = b"a small blob".to_vec();
        let blobs = vec![
            (blob(&files, &big), meta(big.len())),
            (blob(&files, &small), meta(small.len())),
        ];
        let s3 = TestS3::start();
        let copied = copy(dir.path(), &settings(&s3), &blobs).expect("copy");
        assert_eq!(copied, (2, 0));
        let stored = S3Bytes::open(&settings(&s3)).expect("client");
        for (id, m) in &blobs {
            assert!(stored.has_blob(id).expect("has"));
            let mut r = stored.open_read(id, 0, m.size, 1 << 20).expect("read");
            let mut h = Sha256::new();
            while let Some(c) = r.next_chunk().expect("chunk") {
                h.update(&c);
            }
            assert_eq!(<[u8; 32]>::from(h.finalize()), *id);
        }
        // A second run leaves them; the bucket holds one object per blob and no upload.
        assert_eq!(
            copy(dir.path(), &settings(&s3), &blobs).expect("again"),
            (0, 2)
        );
        assert_eq!(s3.files().len(), 2, "{:?}", s3.files());

        // A file whose bytes are not its id's is refused and leaves nothing.
        let liar: BlobId = [9; 32];
        let path = files.blob_path(&liar);
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(path, b"not these bytes").expect("write");
        let bad = copy(dir.path(), &settings(&s3), &[(liar, meta(15))]);
        assert!(bad.is_err(), "{bad:?}");
        assert!(!stored.has_blob(&liar).expect("has"));
    }
}
