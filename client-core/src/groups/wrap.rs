//! The group envelope: `0x02 ‖ tag (16) ‖ nonce (12) ‖ ChaCha20-Poly1305(MLSMessage)`.
//!
//! An MLS `PrivateMessage` carries the group id, the epoch and the content type in
//! clear. The envelope hides them from the relay: the tag and the key come from the
//! epoch's exporter (labels `"tern group tag"` and `"tern group wrap"`, context the
//! group handle), so only members of that epoch can compute them, and the tag
//! changes with every epoch. The tag routes an incoming envelope to its group and
//! epoch; the AEAD (its associated data is the kind byte and the tag) makes a
//! substituted or damaged envelope fail before MLS sees it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::GroupError;

/// The first byte of a shared body that is a group envelope.
pub const ENVELOPE_KIND: u8 = 0x02;
/// The tag's length.
pub const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const AEAD_TAG_LEN: usize = 16;
/// The envelope's bytes around the MLS message.
pub const ENVELOPE_OVERHEAD: usize = 1 + TAG_LEN + NONCE_LEN + AEAD_TAG_LEN;

/// Exporter label of the envelope tag.
pub(crate) const TAG_LABEL: &[u8] = b"tern group tag";
/// Exporter label of the envelope key.
pub(crate) const KEY_LABEL: &[u8] = b"tern group wrap";

/// The envelope tag and key of one epoch.
#[derive(Clone)]
pub struct WrapKey {
    /// The epoch they belong to.
    pub epoch: u64,
    /// The envelope tag.
    pub tag: [u8; TAG_LEN],
    pub(crate) key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for WrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapKey")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl WrapKey {
    /// Wraps an encoded MLS message.
    pub fn wrap(&self, mls_message: &[u8]) -> Result<Vec<u8>, GroupError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.key[..]));
        let aad = self.aad();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: mls_message,
                    aad: &aad,
                },
            )
            .map_err(|_| GroupError::Malformed)?;
        let mut out = Vec::with_capacity(1 + TAG_LEN + NONCE_LEN + sealed.len());
        out.push(ENVELOPE_KIND);
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens an envelope made under this key: the encoded MLS message.
    pub fn unwrap(&self, envelope: &[u8]) -> Result<Vec<u8>, GroupError> {
        if envelope_tag(envelope)? != self.tag {
            return Err(GroupError::UnknownTag);
        }
        let body = &envelope[1 + TAG_LEN..];
        if body.len() < NONCE_LEN + AEAD_TAG_LEN {
            return Err(GroupError::Malformed);
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.key[..]));
        let aad = self.aad();
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| GroupError::BadEnvelope)
    }

    fn aad(&self) -> [u8; 1 + TAG_LEN] {
        let mut aad = [0u8; 1 + TAG_LEN];
        aad[0] = ENVELOPE_KIND;
        aad[1..].copy_from_slice(&self.tag);
        aad
    }
}

/// The tag of a group envelope, to find its group and epoch.
pub fn envelope_tag(envelope: &[u8]) -> Result<[u8; TAG_LEN], GroupError> {
    match envelope {
        [ENVELOPE_KIND, rest @ ..] if rest.len() >= TAG_LEN => rest[..TAG_LEN]
            .try_into()
            .map_err(|_| GroupError::Malformed),
        _ => Err(GroupError::Malformed),
    }
}
