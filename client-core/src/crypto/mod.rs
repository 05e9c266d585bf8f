//! End-to-end cryptography, free of I/O: randomness is always an argument.
//!
//! - [`sealed`]: sealed sender, so the relay never learns who sent a message.
//! - [`padding`]: PADMÉ lengths, so the relay learns a message's length only to
//!   O(log log L) bits.
//! - [`x3dh`]: session key agreement (Signal's X3DH specification).
//! - [`ratchet`]: message encryption (Signal's Double Ratchet specification).
//! - [`sessions`]: the sessions with one contact device; simultaneous initiation
//!   converges.
//! - [`attachment`]: attachments of any size, streamed through constant memory.
//! - [`message`]: one message as it travels, built from and opened into a session set.
//! - [`devices`]: the identity-signed device list and the rules a sender checks it by.

pub mod attachment;
pub mod devices;
pub mod message;
pub mod padding;
pub mod ratchet;
pub mod sealed;
pub mod sessions;
pub mod x3dh;

/// A cryptographic failure. Decryption failures are deliberately opaque.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key is malformed or gives a non-contributory Diffie-Hellman result.
    #[error("invalid key")]
    InvalidKey,
    /// A signature over a key does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// Decryption or authentication failed.
    #[error("decryption failed")]
    Decrypt,
    /// A header or framing is malformed.
    #[error("malformed message")]
    MalformedHeader,
    /// A message was already decrypted.
    #[error("duplicate message")]
    DuplicateMessage,
    /// A message is too far ahead in its chain.
    #[error("too many skipped messages")]
    TooManySkipped,
    /// A stored state does not parse, or the session cannot do this yet.
    #[error("invalid session state")]
    InvalidState,
    /// A sender certificate is malformed, or not signed by the trusted relay.
    #[error("invalid sender certificate")]
    InvalidCertificate,
    /// A sender certificate has expired.
    #[error("expired sender certificate")]
    ExpiredCertificate,
}
