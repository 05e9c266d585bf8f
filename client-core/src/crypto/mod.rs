//! End-to-end cryptography, free of I/O: randomness is always an argument.
//!
//! - [`sealed`]: sealed sender, so the relay never learns who sent a message.
//! - [`padding`]: size buckets, so the relay never learns a message's length.
//!
//! X3DH and the Double Ratchet (Signal's published specifications) join these as the
//! session layer lands (issue #3).

pub mod padding;
pub mod sealed;

/// A cryptographic failure. Decryption failures are deliberately opaque.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key is malformed or gives a non-contributory Diffie-Hellman result.
    #[error("invalid key")]
    InvalidKey,
    /// Decryption or authentication failed.
    #[error("decryption failed")]
    Decrypt,
    /// A header or framing is malformed.
    #[error("malformed message")]
    MalformedHeader,
    /// A sender certificate is malformed, or not signed by the trusted relay.
    #[error("invalid sender certificate")]
    InvalidCertificate,
    /// A sender certificate has expired.
    #[error("expired sender certificate")]
    ExpiredCertificate,
}
