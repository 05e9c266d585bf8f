//! The client's error type.

/// Why a relay refused a request (tern-proto's domain code, not a wire type).
#[doc(no_inline)]
pub use tern_proto::ErrorCode;

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to a relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The relay address does not parse.
    #[error(transparent)]
    InvalidAddress(#[from] tern_proto::address::AddressError),
    /// The relay presented a certificate other than the pinned one.
    #[error("the relay's certificate does not match the pinned fingerprint")]
    FingerprintMismatch,
    /// The relay refused the connection: it is at its connection limit.
    #[error("the relay refused the connection (at capacity); retry later")]
    Refused,
    /// The connection could not be set up.
    #[error("connecting: {0}")]
    Connect(String),
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The relay refused the request.
    #[error("relay refused the request ({code:?}): {message}")]
    Relay {
        /// The relay's error code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
        /// When to retry, in ms (0: no advice); set with `RATE_LIMITED`.
        retry_after_ms: u64,
        /// With `WRONG_CODE`: codes the verification session still accepts (0: it
        /// is closed; start again).
        attempts_left: u32,
        /// With `STALE_EPOCH`: the group's current epoch on the relay.
        current_epoch: u64,
    },
    /// The relay sent something that breaks the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Reading or writing an attachment's bytes failed.
    #[error("attachment: {0}")]
    Media(String),
    /// The device store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A cryptographic operation failed.
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    /// A message is larger than a client sends.
    #[error("message too large: at most {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// A contact card does not parse.
    #[error("not a Tern contact card")]
    InvalidContactCard,
    /// The contact's identity key changed and the user has not accepted the new one
    /// (`Client::accept_identity`): nothing is sent to it until then.
    #[error("the contact's identity key changed; compare safety numbers and accept it first")]
    UntrustedIdentity,
    /// `Client::register` was given a store that already holds a device.
    #[error("this store already holds a registered device; open it instead")]
    AlreadyRegistered,
    /// Not an E.164 number (`+`, a non-zero digit, 6 to 14 more digits).
    #[error("not an E.164 phone number")]
    InvalidNumber,
    /// A verification code is not six digits.
    #[error("a verification code is six digits")]
    InvalidCode,
    /// The relay's discovery answer breaks the protocol (points, filter parts).
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// `Client::open` was given a store that holds no device.
    #[error("this store holds no registered device")]
    NotRegistered,
    /// A device link (`tern-link:…`) does not parse: bad prefix, base64, length or
    /// version, a relay address that does not parse, or a key that is not a valid point.
    #[error("not a Tern device link")]
    InvalidLink,
    /// The link names another relay than this account's home relay.
    #[error("the device link names another relay; an account lives on its home relay")]
    LinkOtherRelay,
    /// The link payload did not open: a wrong linking secret or an altered payload
    /// (deliberately not told apart).
    #[error("the link payload was rejected")]
    LinkRejected,
    /// The link payload is malformed: too short, too large, or its contents do not
    /// decode or do not check out.
    #[error("malformed link payload: {0}")]
    LinkPayload(String),
    /// The link expired before the primary deposited a payload (the slot is gone).
    #[error("the device link expired; make a new one")]
    LinkExpired,
    /// Only the primary device (device 1) holds the identity key this needs.
    #[error("only the primary device can do this")]
    NotPrimary,
    /// The relay holds a newer device list than the one this request was made with.
    #[error("the device list is stale; refresh it and retry")]
    StaleDeviceList,
    /// A contact's (or our own account's) device list was refused.
    #[error(transparent)]
    DeviceList(#[from] crate::crypto::devices::DeviceListRefusal),
    /// No group with this id on this device (never joined, or left or removed).
    #[error("no such group on this device")]
    UnknownGroup,
    /// A group or broadcast operation named nobody to send to or add.
    #[error("no recipients")]
    NoRecipients,
    /// An account named for a group or broadcast is not a contact with a known
    /// delivery token (add its contact card first).
    #[error("not a contact with a known delivery token")]
    NotAContact,
    /// The MLS layer refused an operation or a message.
    #[error("group: {0}")]
    Group(String),
    /// The group is being left (`Client::leave_group`): it takes no more changes.
    #[error("this device is leaving the group")]
    LeavingGroup,
    /// A push target of the wrong form (an empty or overlong URL or token, a
    /// character that is not visible ASCII), refused before it is sent.
    #[error("invalid push target: {0}")]
    InvalidPushTarget(String),
}

impl Error {
    /// [`Error::Group`] of an MLS-layer failure (the receive path reads every such
    /// error as a message to drop).
    pub(crate) fn group(e: impl std::fmt::Display) -> Self {
        Error::Group(e.to_string())
    }

    /// The relay's error code, when the relay refused the request.
    pub fn relay_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Relay { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// With `WRONG_CODE`: how many more codes the verification session accepts.
    pub fn attempts_left(&self) -> Option<u32> {
        match self {
            Error::Relay {
                code: ErrorCode::WrongCode,
                attempts_left,
                ..
            } => Some(*attempts_left),
            _ => None,
        }
    }

    /// With `STALE_EPOCH`: the group's current epoch on the relay.
    pub fn current_epoch(&self) -> Option<u64> {
        match self {
            Error::Relay {
                code: ErrorCode::StaleEpoch,
                current_epoch,
                ..
            } => Some(*current_epoch),
            _ => None,
        }
    }

    /// When the relay advises retrying a refused request (a rate limit's wait).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Relay { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(std::time::Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }
}
