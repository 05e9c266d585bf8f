//! The relay's error type.

use tern_proto::{ErrorCode, ErrorReply};

use crate::store::StoreError;

/// Result with the relay's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the relay. Request errors map to the protocol's
/// [`ErrorCode`] with [`Error::code`] (a whole answer: [`Error::to_reply`]); their
/// messages never hold identifiers or message bytes, so they are safe to send and to
/// log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Not authenticated, a bad signature, or not allowed.
    #[error("unauthorized")]
    Unauthorized,
    /// No such account or device.
    #[error("unknown recipient")]
    UnknownRecipient,
    /// The sender holds an older version of the recipient's device list than the
    /// relay: it fetches the list and sends again (nothing was queued).
    #[error("stale device list")]
    StaleDeviceList,
    /// A group commit for an epoch that is not the group's current one.
    #[error("stale epoch")]
    StaleEpoch {
        /// The group's current epoch.
        current: u64,
    },
    /// No such group handle, or a wrong epoch token: the two look the same.
    #[error("unknown group")]
    UnknownGroup,
    /// The group handle is taken.
    #[error("group exists")]
    GroupExists,
    /// No such provisioning slot (unknown, expired, already used, or not the
    /// caller's to take).
    #[error("not found")]
    NotFound,
    /// The recipient's mailbox is at its limit; nothing of the request was queued.
    #[error("mailbox full: {0}")]
    MailboxFull(&'static str),
    /// Something is larger than the relay accepts.
    #[error("{what} of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The relay is shutting down or at capacity.
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    /// As many requests of this kind as the relay runs at once are running; retry
    /// after the given time.
    #[error("unavailable: {what}; retry after {retry_after_ms} ms")]
    Busy {
        /// What is at its limit.
        what: &'static str,
        /// When to retry.
        retry_after_ms: u64,
    },
    /// Too many requests of this kind from this address; retry after the given time.
    #[error("rate limited: retry after {retry_after_ms} ms")]
    RateLimited {
        /// When to retry.
        retry_after_ms: u64,
    },
    /// The account has as many devices as the relay allows; one must go first.
    #[error("the account has the most devices allowed ({max})")]
    TooManyDevices {
        /// The cap.
        max: usize,
    },
    /// A relay-wide budget is spent, or free disk space is at its reserve; nothing of
    /// the request was stored. Retry after the given time (or at another relay).
    #[error("storage full: {what}")]
    StorageFull {
        /// Which budget: a fixed phrase.
        what: &'static str,
        /// When to retry.
        retry_after_ms: u64,
    },
    /// The storage backend failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// TLS or certificate setup failed.
    #[error("tls: {0}")]
    Tls(String),
    /// An I/O error outside storage.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A media (blob) request was refused or failed.
    #[error(transparent)]
    Blob(#[from] crate::media::BlobError),
    /// A discovery request was refused.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// A phone verification check was refused.
    #[error(transparent)]
    Verification(#[from] crate::verification::VerificationError),
    /// A push target was refused.
    #[error(transparent)]
    Push(#[from] crate::push::PushError),
}

impl Error {
    /// The code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthorized => ErrorCode::Unauthorized,
            Error::UnknownRecipient => ErrorCode::UnknownRecipient,
            Error::StaleDeviceList => ErrorCode::StaleDeviceList,
            Error::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            Error::UnknownGroup => ErrorCode::UnknownGroup,
            Error::GroupExists => ErrorCode::GroupExists,
            Error::NotFound => ErrorCode::NotFound,
            Error::MailboxFull(_) => ErrorCode::MailboxFull,
            Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::Unavailable(_) | Error::Busy { .. } | Error::StorageFull { .. } => {
                ErrorCode::Unavailable
            }
            Error::Store(StoreError::NoSpace | StoreError::Unavailable(_)) => {
                ErrorCode::Unavailable
            }
            Error::RateLimited { .. } => ErrorCode::RateLimited,
            Error::TooManyDevices { .. } => ErrorCode::QuotaExceeded,
            Error::Store(_) | Error::Config(_) | Error::Tls(_) | Error::Io(_) => {
                ErrorCode::Internal
            }
            Error::Discovery(d) => {
                use crate::discovery::DiscoveryError as D;
                match d {
                    D::InvalidPoint { .. } => ErrorCode::BadRequest,
                    D::NotVerified => ErrorCode::NotVerified,
                    D::Gone => ErrorCode::NotFound,
                    D::Busy { .. } | D::NotPublished { .. } => ErrorCode::Unavailable,
                    D::NoSuchPart { .. } | D::NumberRejected => ErrorCode::BadRequest,
                    D::EvaluationFailed | D::KeyMissing { .. } | D::KeyMode { .. } => {
                        ErrorCode::Internal
                    }
                }
            }
            Error::Verification(v) => {
                use crate::verification::VerificationError as V;
                match v {
                    V::NotFound => ErrorCode::NotFound,
                    V::Expired => ErrorCode::Expired,
                    V::WrongCode { .. } => ErrorCode::WrongCode,
                    V::NotSent { .. } => ErrorCode::Unavailable,
                }
            }
            Error::Push(crate::push::PushError::Refused(_)) => ErrorCode::PushTargetRefused,
            Error::Push(crate::push::PushError::Unverified(_)) => ErrorCode::PushEndpointUnverified,
            Error::Blob(b) => {
                use crate::media::BlobError as B;
                match b {
                    B::TooLarge { .. } => ErrorCode::TooLarge,
                    B::TooManyUploads(_) | B::InProgress | B::RateLimited { .. } => {
                        ErrorCode::RateLimited
                    }
                    B::QuotaExceeded => ErrorCode::QuotaExceeded,
                    B::StorageFull { .. }
                    | B::Busy { .. }
                    | B::Unavailable(_)
                    | B::Store(StoreError::NoSpace | StoreError::Unavailable(_)) => {
                        ErrorCode::Unavailable
                    }
                    B::NotFound => ErrorCode::NotFound,
                    B::AccountGone => ErrorCode::Unauthorized,
                    B::NoUpload
                    | B::WrongOffset { .. }
                    | B::Overflow
                    | B::Incomplete { .. }
                    | B::DigestMismatch => ErrorCode::BadRequest,
                    _ => ErrorCode::Internal,
                }
            }
        }
    }

    /// When a refused request may be retried, in ms (0: no advice).
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Error::RateLimited { retry_after_ms }
            | Error::Busy { retry_after_ms, .. }
            | Error::StorageFull { retry_after_ms, .. } => *retry_after_ms,
            Error::Store(StoreError::NoSpace)
            | Error::Blob(crate::media::BlobError::Store(StoreError::NoSpace))
            | Error::Blob(crate::media::BlobError::Unavailable(_)) => {
                crate::core::budget::RETRY_AFTER_MS
            }
            Error::Blob(
                crate::media::BlobError::StorageFull { retry_after_ms }
                | crate::media::BlobError::Busy { retry_after_ms },
            ) => *retry_after_ms,
            Error::Store(StoreError::Unavailable(_))
            | Error::Blob(crate::media::BlobError::Store(StoreError::Unavailable(_))) => {
                UNAVAILABLE_RETRY_MS
            }
            Error::Discovery(
                crate::discovery::DiscoveryError::Busy { retry_after_ms }
                | crate::discovery::DiscoveryError::NotPublished { retry_after_ms },
            ) => *retry_after_ms,
            Error::Verification(crate::verification::VerificationError::NotSent {
                retry_after_ms,
            }) => *retry_after_ms,
            Error::Blob(crate::media::BlobError::RateLimited { retry_after }) => {
                u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// The text a client sees: internal details stay in the relay's logs.
    pub fn client_message(&self) -> String {
        match (self.code(), self) {
            (ErrorCode::Internal, _) => "internal error".to_owned(),
            // The detail names the database's hosts: the relay's logs only.
            (
                _,
                Error::Store(StoreError::Unavailable(_))
                | Error::Blob(crate::media::BlobError::Store(StoreError::Unavailable(_))),
            ) => "storage unavailable; retry".to_owned(),
            _ => self.to_string(),
        }
    }

    /// The answer a client gets: code, message and retry advice.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply {
            code: self.code(),
            message: self.client_message(),
            retry_after_ms: self.retry_after_ms(),
            attempts_left: match self {
                Error::Verification(crate::verification::VerificationError::WrongCode {
                    attempts_left,
                }) => *attempts_left,
                _ => 0,
            },
            current_epoch: match self {
                Error::StaleEpoch { current } => *current,
                _ => 0,
            },
        }
    }
}

/// Retry advice when a shared backend is unreachable: about what a failover or a
/// database restart takes to be noticed, so clients neither hammer nor stall.
pub const UNAVAILABLE_RETRY_MS: u64 = 1_000;

impl From<crate::core::budget::Full> for Error {
    fn from(f: crate::core::budget::Full) -> Self {
        Error::StorageFull {
            what: f.what,
            retry_after_ms: f.retry_after_ms,
        }
    }
}

impl From<tern_proto::IdError> for Error {
    fn from(e: tern_proto::IdError) -> Self {
        Error::BadRequest(e.to_string())
    }
}
