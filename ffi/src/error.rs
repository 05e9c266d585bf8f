//! The one error type the bindings see: each variant becomes a native exception
//! (`TernException.UntrustedIdentity` in Kotlin, `TernError.UntrustedIdentity` in
//! Swift and Python).

use tern_client::store::StoreError;

/// Why a call failed. Mirrors `tern_client::Error`, flattened to what an app
/// branches on; the message of each says what to do.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum TernError {
    /// An argument is malformed: an id or key of the wrong length, a path that is
    /// not UTF-8, an attachment that does not parse.
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What was wrong.
        reason: String,
    },
    /// The store did not open under this storage key (the wrong key, or damaged data).
    #[error("the device store did not open: wrong storage key or damaged data")]
    WrongStorageKey,
    /// The device store failed (disk full, locked by another process…).
    #[error("device store: {reason}")]
    Storage {
        /// The backend's reason.
        reason: String,
    },
    /// `open` on a store that holds no device.
    #[error("this store holds no registered device")]
    NotRegistered,
    /// `register` or `join` on a store that already holds a device.
    #[error("this store already holds a registered device; open it instead")]
    AlreadyRegistered,
    /// The relay address does not parse.
    #[error("invalid relay address: {reason}")]
    InvalidAddress {
        /// Why.
        reason: String,
    },
    /// The relay presented a certificate other than the pinned one.
    #[error("the relay's certificate does not match the pinned fingerprint")]
    FingerprintMismatch,
    /// No connection to the relay (could not connect, dropped, at capacity, or the
    /// client is shut down); retry later.
    #[error("network: {reason}")]
    Network {
        /// Why.
        reason: String,
    },
    /// The relay refused the request.
    #[error("the relay refused the request ({code}): {message}")]
    Relay {
        /// The relay's code, a short lowercase name ("rate limited", "not found"…).
        code: String,
        /// The relay's explanation.
        message: String,
        /// When to retry, in ms (0: no advice).
        retry_after_ms: u64,
        /// With a wrong verification code: codes the session still accepts.
        attempts_left: u32,
    },
    /// A contact card does not parse.
    #[error("not a Tern contact card")]
    InvalidContactCard,
    /// The contact's identity key changed: compare safety numbers and accept it.
    #[error("the contact's identity key changed; compare safety numbers and accept it first")]
    UntrustedIdentity,
    /// A message or name is larger than allowed.
    #[error("too large: at most {max} bytes")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// Only the primary device can do this.
    #[error("only the primary device can do this")]
    NotPrimary,
    /// A device link does not parse, names another relay, was rejected or expired.
    #[error("device link: {reason}")]
    Link {
        /// Why.
        reason: String,
    },
    /// Not an E.164 number, or a verification code that is not six digits.
    #[error("invalid phone number or code: {reason}")]
    InvalidNumber {
        /// Which.
        reason: String,
    },
    /// A group call failed: unknown group, not a contact, no recipients, leaving.
    #[error("group: {reason}")]
    Group {
        /// Why.
        reason: String,
    },
    /// Reading, writing or checking an attachment failed.
    #[error("attachment: {reason}")]
    Attachment {
        /// Why.
        reason: String,
    },
    /// Anything else (a protocol violation by the relay, a crypto failure).
    #[error("{reason}")]
    Other {
        /// Why.
        reason: String,
    },
}

pub(crate) fn invalid(reason: impl Into<String>) -> TernError {
    TernError::InvalidArgument {
        reason: reason.into(),
    }
}

impl From<StoreError> for TernError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt => TernError::WrongStorageKey,
            other => TernError::Storage {
                reason: other.to_string(),
            },
        }
    }
}

impl From<tern_client::Error> for TernError {
    fn from(e: tern_client::Error) -> Self {
        use tern_client::Error as E;
        let reason = e.to_string();
        match e {
            E::Store(s) => s.into(),
            E::NotRegistered => TernError::NotRegistered,
            E::AlreadyRegistered => TernError::AlreadyRegistered,
            E::InvalidAddress(_) => TernError::InvalidAddress { reason },
            E::FingerprintMismatch => TernError::FingerprintMismatch,
            E::Refused | E::Connect(_) | E::Closed(_) => TernError::Network { reason },
            E::Relay {
                code,
                message,
                retry_after_ms,
                attempts_left,
                ..
            } => TernError::Relay {
                code: code.as_str().to_owned(),
                message,
                retry_after_ms,
                attempts_left,
            },
            E::InvalidContactCard => TernError::InvalidContactCard,
            E::UntrustedIdentity => TernError::UntrustedIdentity,
            E::TooLarge { max } => TernError::TooLarge {
                max: u64::try_from(max).unwrap_or(u64::MAX),
            },
            E::NotPrimary => TernError::NotPrimary,
            E::InvalidLink
            | E::LinkOtherRelay
            | E::LinkRejected
            | E::LinkPayload(_)
            | E::LinkExpired => TernError::Link { reason },
            E::InvalidNumber | E::InvalidCode => TernError::InvalidNumber { reason },
            E::UnknownGroup | E::NoRecipients | E::NotAContact | E::Group(_) | E::LeavingGroup => {
                TernError::Group { reason }
            }
            E::Media(_) => TernError::Attachment { reason },
            E::InvalidPushTarget(_) => TernError::InvalidArgument { reason },
            _ => TernError::Other { reason },
        }
    }
}
