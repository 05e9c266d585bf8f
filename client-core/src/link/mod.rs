//! Linking a new device to an account (ARCHITECTURE §4, §13).
//!
//! The new device makes [`JoinKeys`] and shows their [`Link`]; the primary reads it,
//! registers the device, and deposits a [`LinkPayload`] sealed with
//! [`seal_payload`] in the relay's provisioning slot; the new device takes it and
//! [`open_payload`]s it. The identity private key never leaves the primary: the
//! payload carries only the identity's signatures over the new device's keys.

mod hpke;
mod link_string;
mod payload;

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tern_proto::address::RelayAddress;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

pub use link_string::{Link, LINK_PREFIX};
pub use payload::{LinkPayload, LinkedContact};

const KEYS_VERSION: u8 = 1;
const KEYS_LEN: usize = 1 + 32 + 32 + 32 + 16 + 32 + 32;

/// A joining device's secrets, kept (in its store) until the payload arrives: its
/// device signing key, identity agreement secret, HPKE secret, the slot id, the
/// linking secret (in the link) and the reader secret (never in the link; it lets
/// this device, and only it, take the slot's contents). Wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct JoinKeys {
    device_secret: [u8; 32],
    identity_dh_secret: [u8; 32],
    hpke_secret: [u8; 32],
    slot_id: [u8; 16],
    linking_secret: [u8; 32],
    reader_secret: [u8; 32],
}

impl std::fmt::Debug for JoinKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinKeys").finish_non_exhaustive()
    }
}

impl JoinKeys {
    /// Fresh keys from the OS's random source.
    pub fn generate() -> Self {
        let mut keys = JoinKeys {
            device_secret: [0; 32],
            identity_dh_secret: [0; 32],
            hpke_secret: [0; 32],
            slot_id: [0; 16],
            linking_secret: [0; 32],
            reader_secret: [0; 32],
        };
        for part in [
            &mut keys.device_secret[..],
            &mut keys.identity_dh_secret,
            &mut keys.hpke_secret,
            &mut keys.slot_id,
            &mut keys.linking_secret,
            &mut keys.reader_secret,
        ] {
            OsRng.fill_bytes(part);
        }
        keys
    }

    /// The link to show the primary, naming the relay this device waits on.
    pub fn link(&self, relay: &RelayAddress) -> Link {
        Link {
            slot_id: self.slot_id,
            hpke_public: self.hpke_public(),
            linking_secret: self.linking_secret,
            device_key: self.device_signing_key().verifying_key().to_bytes(),
            identity_dh: PublicKey::from(&self.identity_dh_secret()).to_bytes(),
            relay: relay.clone(),
        }
    }

    /// The provisioning slot's id.
    pub fn slot_id(&self) -> [u8; 16] {
        self.slot_id
    }

    /// SHA-256 of the reader secret: what the slot is opened with.
    pub fn reader_hash(&self) -> [u8; 32] {
        Sha256::digest(self.reader_secret).into()
    }

    /// The reader secret: what takes the slot's contents.
    pub fn reader_secret(&self) -> [u8; 32] {
        self.reader_secret
    }

    /// The new device's Ed25519 device key.
    pub fn device_signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.device_secret)
    }

    /// The new device's X25519 identity agreement secret.
    pub fn identity_dh_secret(&self) -> StaticSecret {
        StaticSecret::from(self.identity_dh_secret)
    }

    fn hpke_public(&self) -> [u8; 32] {
        // X25519 clamps the same way in HPKE and x25519-dalek; HPKE's own derivation
        // is used when it accepts the secret (it accepts every 32 bytes).
        hpke::public_key(&self.hpke_secret)
            .unwrap_or_else(|_| PublicKey::from(&StaticSecret::from(self.hpke_secret)).to_bytes())
    }

    /// The stored form (to be kept encrypted, like every device secret).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(KEYS_LEN));
        b.push(KEYS_VERSION);
        b.extend_from_slice(&self.device_secret);
        b.extend_from_slice(&self.identity_dh_secret);
        b.extend_from_slice(&self.hpke_secret);
        b.extend_from_slice(&self.slot_id);
        b.extend_from_slice(&self.linking_secret);
        b.extend_from_slice(&self.reader_secret);
        b
    }

    /// Parses [`JoinKeys::to_bytes`]; anything else is [`Error::InvalidLink`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEYS_LEN || bytes[0] != KEYS_VERSION {
            return Err(Error::InvalidLink);
        }
        let mut at = 1;
        let mut take = |n: usize| {
            let part = &bytes[at..at + n];
            at += n;
            part
        };
        let mut keys = JoinKeys {
            device_secret: [0; 32],
            identity_dh_secret: [0; 32],
            hpke_secret: [0; 32],
            slot_id: [0; 16],
            linking_secret: [0; 32],
            reader_secret: [0; 32],
        };
        keys.device_secret.copy_from_slice(take(32));
        keys.identity_dh_secret.copy_from_slice(take(32));
        keys.hpke_secret.copy_from_slice(take(32));
        keys.slot_id.copy_from_slice(take(16));
        keys.linking_secret.copy_from_slice(take(32));
        keys.reader_secret.copy_from_slice(take(32));
        Ok(keys)
    }
}

/// Seals `payload` for the device that made `link` (HPKE, PSK mode with the link's
/// linking secret): `enc(32) || ciphertext`, what `DepositProvisioning` carries.
pub fn seal_payload(link: &Link, payload: &LinkPayload) -> Result<Vec<u8>> {
    hpke::seal(
        &link.hpke_public,
        &link.linking_secret,
        &link.slot_id,
        &link.relay.fingerprint.0,
        &payload.encode(),
    )
}

/// Opens what `TakeProvisioning` returned, for the keys whose link named `relay`,
/// and checks what the primary vouched for ([`LinkPayload::verify`]). A payload that
/// does not open is [`Error::LinkRejected`]; one too short, too large or malformed
/// is [`Error::LinkPayload`].
pub fn open_payload(keys: &JoinKeys, relay: &RelayAddress, sealed: &[u8]) -> Result<LinkPayload> {
    let plain = hpke::open(
        &keys.hpke_secret,
        &keys.linking_secret,
        &keys.slot_id,
        &relay.fingerprint.0,
        sealed,
    )?;
    let payload = LinkPayload::decode(&plain)?;
    let link = keys.link(relay);
    payload.verify(&link.device_key, &link.identity_dh)?;
    Ok(payload)
}

#[cfg(test)]
mod tests;
