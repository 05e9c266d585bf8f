//! Why a media operation was refused or failed.

use std::time::Duration;

use crate::store::StoreError;

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
    /// A relay-wide budget is spent, free disk space is at its reserve, or a write
    /// found the disk full; an upload keeps what it has and can resume later.
    #[error("storage full: retry later")]
    StorageFull {
        /// When to retry, ms.
        retry_after_ms: u64,
    },
    /// The relay's upload buffers are all taken (`[objects] buffer_mb`): nothing was
    /// written; retry after the given time.
    #[error("relay busy: retry later")]
    Busy {
        /// When to retry, ms.
        retry_after_ms: u64,
    },
    /// The uploading account was deleted (its connection is being closed).
    #[error("not authenticated")]
    AccountGone,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store holding blob bytes could not be reached or did not answer
    /// within its deadline; the step did not happen. Retry later.
    #[error("object storage unavailable: {0}")]
    Unavailable(&'static str),
    /// A file operation failed.
    #[error("blob file: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for BlobError {
    fn from(e: std::io::Error) -> Self {
        if crate::store::is_no_space(&e) {
            BlobError::StorageFull {
                retry_after_ms: crate::core::budget::RETRY_AFTER_MS,
            }
        } else {
            BlobError::Io(e)
        }
    }
}

impl From<crate::core::budget::Full> for BlobError {
    fn from(f: crate::core::budget::Full) -> Self {
        BlobError::StorageFull {
            retry_after_ms: f.retry_after_ms,
        }
    }
}

/// Result with [`BlobError`].
pub type BlobResult<T> = Result<T, BlobError>;
