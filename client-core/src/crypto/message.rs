//! One end-to-end message as it travels inside the sealed envelope
//! (`tern.e2e.v1.Content`): built from, and opened into, the [`SessionSet`] with the
//! contact device. No storage and no network, so the client and the load generator
//! share it.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::e2e;
use zeroize::Zeroizing;

use super::ratchet::Header;
use super::sessions::{OurKeys, SessionSet};
use super::x3dh::{AgreementKeyPair, InitialHeader};
use super::{padding, CryptoError};

/// Encodes and pads a plaintext (PADMÉ, at least 256 bytes); `None` if it pads past
/// [`padding::MAX_PADDED`].
pub fn pad_plaintext(plaintext: &e2e::Plaintext) -> Option<Zeroizing<Vec<u8>>> {
    let encoded = Zeroizing::new(plaintext.encode_to_vec());
    padding::pad(&encoded).map(Zeroizing::new)
}

/// Encrypts a padded plaintext in the current session: an encoded `Content`, a
/// prekey message until the contact has answered. `identity_dh_signature` is our
/// identity key's signature over our identity agreement key, carried by prekey
/// messages.
pub fn encrypt(
    sessions: &mut SessionSet,
    identity_dh_signature: &[u8; 64],
    padded: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let out = sessions.encrypt(padded)?;
    let ratchet = e2e::RatchetMessage {
        header: out.header.to_bytes().to_vec().into(),
        ciphertext: out.ciphertext.into(),
    };
    let message = match out.prekey {
        Some(initial) => e2e::content::Message::Prekey(e2e::PreKeyMessage {
            initial_header: initial.to_bytes().to_vec().into(),
            message: Some(ratchet),
            identity_dh_signature: identity_dh_signature.to_vec().into(),
        }),
        None => e2e::content::Message::Ratchet(ratchet),
    };
    Ok(e2e::Content {
        message: Some(message),
    }
    .encode_to_vec())
}

/// A prekey a prekey message names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreKeyId {
    /// A signed prekey.
    Signed(u32),
    /// A one-time prekey.
    OneTime(u32),
}

/// What [`decrypt`] found besides the plaintext.
#[derive(Debug)]
pub struct Decrypted {
    /// The sender's plaintext.
    pub plaintext: e2e::Plaintext,
    /// The one-time prekey this message consumed: delete its secret.
    pub one_time_prekey: Option<u32>,
    /// From a prekey message: the sender device's identity agreement key (verified
    /// against its identity key), to seal replies to.
    pub sender_identity_dh: Option<[u8; 32]>,
}

/// Decrypts an encoded `Content` from a sender whose identity key the sealed
/// certificate established. `prekeys` looks up our prekey secrets by id. The session
/// set changes only if the whole message (including its plaintext's encoding) is good.
pub fn decrypt(
    rng: &mut (impl RngCore + CryptoRng),
    sessions: &mut SessionSet,
    ours: (&[u8; 32], &AgreementKeyPair),
    sender_identity_key: &[u8; 32],
    prekeys: &mut dyn FnMut(PreKeyId) -> Option<AgreementKeyPair>,
    content: &[u8],
) -> Result<Decrypted, CryptoError> {
    let content = e2e::Content::decode(content).map_err(|_| CryptoError::MalformedHeader)?;
    let ratchet = |m: Option<&e2e::RatchetMessage>| -> Result<(Header, Vec<u8>), CryptoError> {
        let m = m.ok_or(CryptoError::MalformedHeader)?;
        Ok((Header::from_bytes(&m.header)?, m.ciphertext.to_vec()))
    };
    // Work on a copy: a failure must leave the session as it was.
    let mut trial = sessions.clone();
    let (padded, one_time_prekey, sender_identity_dh) = match content.message {
        Some(e2e::content::Message::Ratchet(m)) => {
            let (header, ciphertext) = ratchet(Some(&m))?;
            (trial.decrypt(rng, &header, &ciphertext)?, None, None)
        }
        Some(e2e::content::Message::Prekey(p)) => {
            let initial = InitialHeader::from_bytes(&p.initial_header)?;
            if &initial.identity_key != sender_identity_key {
                return Err(CryptoError::InvalidKey);
            }
            trial.verify_identity_dh(
                sender_identity_key,
                &initial.identity_dh,
                &p.identity_dh_signature,
            )?;
            let (header, ciphertext) = ratchet(p.message.as_ref())?;
            // A header that already opened a session needs no prekeys again.
            let fresh = !trial.opened_by(&initial.ephemeral);
            let signed = prekeys(PreKeyId::Signed(initial.signed_prekey_id));
            let one_time_id = initial.one_time_prekey_id.filter(|_| fresh);
            let one_time = match one_time_id {
                Some(id) => Some(prekeys(PreKeyId::OneTime(id)).ok_or(CryptoError::InvalidKey)?),
                None => None,
            };
            let ours = OurKeys {
                identity_key: ours.0,
                identity_dh: ours.1,
                signed_prekey: signed.as_ref(),
                one_time_prekey: one_time.as_ref(),
            };
            let padded = trial.decrypt_prekey(rng, &ours, &initial, &header, &ciphertext)?;
            (padded, one_time_id, Some(initial.identity_dh))
        }
        None => return Err(CryptoError::MalformedHeader),
    };
    let padded = Zeroizing::new(padded);
    let plaintext = padding::unpad(&padded)
        .and_then(|p| e2e::Plaintext::decode(p).ok())
        .ok_or(CryptoError::MalformedHeader)?;
    *sessions = trial;
    Ok(Decrypted {
        plaintext,
        one_time_prekey,
        sender_identity_dh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_generators_bodies_pad_to_padme_lengths() {
        // `tern-load`'s plaintext: no delivery token, so 30 bytes of fields besides a
        // body of 128 to 16,383 bytes. The power-of-two buckets gave 2,048 and 1,024.
        let padded = |n: usize| {
            pad_plaintext(&e2e::Plaintext {
                body: vec![0x5a; n].into(),
                delivery_token: Default::default(),
                sent_at_ms: 1_800_000_000_000,
                sender_account: vec![1; 16].into(),
                sender_device: 1,
                attachments: Vec::new(),
                sync: None,
                broadcast: None,
                group_rejoin: None,
            })
            .map(|p| p.len())
        };
        assert_eq!(padded(1024), Some(1088));
        assert_eq!(padded(700), Some(736));
        assert_eq!(padded(0), Some(256));
    }
}
