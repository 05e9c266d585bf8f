//! The client's error type.

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
    /// `Client::open` was given a store that holds no device.
    #[error("this store holds no registered device")]
    NotRegistered,
}

/// Why a relay refused a request: the protocol's error codes as the client sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The relay gave no code, or one this client does not know.
    Unspecified,
    /// The request is malformed.
    BadRequest,
    /// Not authenticated, a bad signature, or not allowed for this device.
    Unauthorized,
    /// No such account or device.
    UnknownRecipient,
    /// The recipient's mailbox is full; retry later.
    MailboxFull,
    /// An envelope or frame is larger than the relay accepts.
    TooLarge,
    /// Too many requests; retry later.
    RateLimited,
    /// The message has expired.
    Expired,
    /// The relay failed; nothing was stored for this request.
    Internal,
    /// The relay is shutting down or overloaded.
    Unavailable,
    /// No such blob (never uploaded, or expired).
    NotFound,
    /// The account's storage quota is used up.
    QuotaExceeded,
}

impl Error {
    /// The relay's error code, when the relay refused the request.
    pub fn relay_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Relay { code, .. } => Some(*code),
            _ => None,
        }
    }
}
