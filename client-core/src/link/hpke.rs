//! HPKE (RFC 9180) for the link payload: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! ChaCha20Poly1305, mode PSK with the link's linking secret, so only a holder of the
//! link can seal a payload that opens (a relay that saw the slot id and the public
//! key cannot).
//!
//! `psk_id = "tern link psk v1" || slot_id`, `info = "tern link payload v1\0" ||
//! slot_id || relay fingerprint`, `aad = slot_id`; the sealed form is
//! `enc(32) || ciphertext`.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, PskBundle, Serializable};
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

type KemPrivate = <X25519HkdfSha256 as hpke::Kem>::PrivateKey;
type KemPublic = <X25519HkdfSha256 as hpke::Kem>::PublicKey;
type Encapped = <X25519HkdfSha256 as hpke::Kem>::EncappedKey;

const PSK_ID_CONTEXT: &[u8] = b"tern link psk v1";
const INFO_CONTEXT: &[u8] = b"tern link payload v1\0";
/// The encapsulated key's length.
const ENC_LEN: usize = 32;
/// The smallest sealed payload: the encapsulated key and the AEAD tag.
const MIN_SEALED: usize = tern_proto::limits::MIN_LINK_PAYLOAD;
/// The largest sealed payload (what `DepositProvisioning` carries).
const MAX_SEALED: usize = tern_proto::limits::MAX_LINK_PAYLOAD;

/// The HPKE public key for an X25519 secret (HPKE's own derivation).
pub(crate) fn public_key(secret: &[u8; 32]) -> Result<[u8; 32]> {
    let sk = KemPrivate::from_bytes(secret).map_err(|_| Error::InvalidLink)?;
    let pk = X25519HkdfSha256::sk_to_pk(&sk).to_bytes();
    pk.as_slice().try_into().map_err(|_| Error::InvalidLink)
}

/// Seals `plaintext` to `recipient` (the link's HPKE key) with the linking secret.
pub(crate) fn seal(
    recipient: &[u8; 32],
    psk: &[u8; 32],
    slot_id: &[u8; 16],
    fingerprint: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let psk_id = [PSK_ID_CONTEXT, slot_id].concat();
    let info = [INFO_CONTEXT, slot_id, fingerprint].concat();
    let sealed = seal_raw(
        &mut rand::rngs::OsRng,
        recipient,
        psk,
        &psk_id,
        &info,
        slot_id,
        plaintext,
    )?;
    if sealed.len() > MAX_SEALED {
        return Err(Error::LinkPayload(format!(
            "sealed payload over {MAX_SEALED} bytes"
        )));
    }
    Ok(sealed)
}

/// Opens [`seal`]'s output with the recipient's HPKE secret.
pub(crate) fn open(
    secret: &[u8; 32],
    psk: &[u8; 32],
    slot_id: &[u8; 16],
    fingerprint: &[u8; 32],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let psk_id = [PSK_ID_CONTEXT, slot_id].concat();
    let info = [INFO_CONTEXT, slot_id, fingerprint].concat();
    open_raw(secret, psk, &psk_id, &info, slot_id, sealed)
}

/// Single-shot HPKE seal in PSK mode: `enc || ciphertext`.
fn seal_raw(
    rng: &mut (impl RngCore + CryptoRng),
    recipient: &[u8; 32],
    psk: &[u8; 32],
    psk_id: &[u8],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    // The hpke crate checks neither length nor entropy of the PSK; the type fixes
    // 32 bytes, and the caller draws it from the OS RNG.
    let pk = KemPublic::from_bytes(recipient).map_err(|_| Error::InvalidLink)?;
    let mode = OpModeS::Psk(PskBundle { psk, psk_id });
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
        &mode, &pk, info, plaintext, aad, rng,
    )
    // A small-order recipient key gives an all-zero DH, which the crate refuses.
    .map_err(|_| Error::InvalidLink)?;
    let mut out = enc.to_bytes().to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Single-shot HPKE open in PSK mode of [`seal_raw`]'s output. Too short or too
/// large is [`Error::LinkPayload`]; anything that does not open is
/// [`Error::LinkRejected`], whatever the reason.
fn open_raw(
    secret: &[u8; 32],
    psk: &[u8; 32],
    psk_id: &[u8],
    info: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.len() < MIN_SEALED {
        return Err(Error::LinkPayload(format!(
            "sealed payload under {MIN_SEALED} bytes"
        )));
    }
    if sealed.len() > MAX_SEALED {
        return Err(Error::LinkPayload(format!(
            "sealed payload over {MAX_SEALED} bytes"
        )));
    }
    let (enc, ct) = sealed.split_at(ENC_LEN);
    let enc = Encapped::from_bytes(enc).map_err(|_| Error::LinkRejected)?;
    let sk = KemPrivate::from_bytes(secret).map_err(|_| Error::LinkRejected)?;
    let mode = OpModeR::Psk(PskBundle { psk, psk_id });
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &mode, &sk, &enc, info, ct, aad,
    )
    .map(Zeroizing::new)
    .map_err(|_| Error::LinkRejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex(s).try_into().expect("32 bytes")
    }

    /// Yields fixed bytes: HPKE draws the ephemeral key's ikm from the RNG, so this
    /// makes the sender's ephemeral key the vector's.
    struct Fixed(Vec<u8>);

    impl RngCore for Fixed {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0u8; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0u8; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            assert!(dest.len() <= self.0.len(), "the vector's ikm is exhausted");
            let rest = self.0.split_off(dest.len());
            dest.copy_from_slice(&self.0);
            self.0 = rest;
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl CryptoRng for Fixed {}

    // RFC 9180 A.2.2: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
    // PSK setup, sequence number 0.
    const IKM_E: &str = "35706a0b09fb26fb45c39c2f5079c709c7cf98e43afa973f14d88ece7e29c2e3";
    const IKM_R: &str = "26b923eade72941c8a85b09986cdfa3f1296852261adedc52d58d2930269812b";
    const SK_RM: &str = "77d114e0212be51cb1d76fa99dd41cfd4d0166b08caa09074430a6c59ef17879";
    const PK_RM: &str = "13640af826b722fc04feaa4de2f28fbd5ecc03623b317834e7ff4120dbe73062";
    const ENC: &str = "2261299c3f40a9afc133b969a97f05e95be2c514e54f3de26cbe5644ac735b04";
    const PSK: &str = "0247fd33b913760fa1fa51e1892d9f307fbe65eb171e8132c2af18555a738b82";
    const PSK_ID: &str = "456e6e796e20447572696e206172616e204d6f726961";
    const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
    const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
    const AAD: &str = "436f756e742d30";
    const CT: &str = "4a177f9c0d6f15cfdf533fb65bf84aecdc6ab16b8b85b4cf65a370e07fc1d78d28fb073214525276f4a89608ff";

    #[test]
    fn rfc9180_a_2_2_psk_vector() {
        let (sk, pk) = X25519HkdfSha256::derive_keypair(&hex(IKM_R));
        assert_eq!(sk.to_bytes().to_vec(), hex(SK_RM));
        assert_eq!(pk.to_bytes().to_vec(), hex(PK_RM));
        assert_eq!(public_key(&hex32(SK_RM)).expect("pk"), hex32(PK_RM));
        let sealed = [hex(ENC), hex(CT)].concat();
        let (psk, psk_id, info, aad) = (hex32(PSK), hex(PSK_ID), hex(INFO), hex(AAD));
        let out = seal_raw(
            &mut Fixed(hex(IKM_E)),
            &hex32(PK_RM),
            &psk,
            &psk_id,
            &info,
            &aad,
            &hex(PT),
        )
        .expect("seal");
        assert_eq!(out, sealed, "enc || ct as in the RFC");
        let pt = open_raw(&hex32(SK_RM), &psk, &psk_id, &info, &aad, &sealed).expect("open");
        assert_eq!(*pt, hex(PT));
    }

    #[test]
    fn the_wrong_psk_or_an_altered_payload_is_rejected() {
        let secret = [7u8; 32];
        let public = public_key(&secret).expect("pk");
        let (psk, slot, fp) = ([1u8; 32], [2u8; 16], [3u8; 32]);
        let sealed = seal(&public, &psk, &slot, &fp, b"payload").expect("seal");
        assert_eq!(
            *open(&secret, &psk, &slot, &fp, &sealed).expect("opens"),
            b"payload"
        );
        let rejected = |r: Result<Zeroizing<Vec<u8>>>| matches!(r, Err(Error::LinkRejected));
        assert!(
            rejected(open(&secret, &[9; 32], &slot, &fp, &sealed)),
            "psk"
        );
        assert!(
            rejected(open(&secret, &psk, &[9; 16], &fp, &sealed)),
            "slot"
        );
        assert!(
            rejected(open(&secret, &psk, &slot, &[9; 32], &sealed)),
            "relay"
        );
        assert!(rejected(open(&[8; 32], &psk, &slot, &fp, &sealed)), "key");
        for at in [0, 31, 32, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[at] ^= 1;
            assert!(rejected(open(&secret, &psk, &slot, &fp, &altered)), "{at}");
        }
    }

    #[test]
    fn short_or_oversized_payloads_are_malformed() {
        let secret = [7u8; 32];
        let (psk, slot, fp) = ([1u8; 32], [2u8; 16], [3u8; 32]);
        let malformed = |r: Result<Zeroizing<Vec<u8>>>| matches!(r, Err(Error::LinkPayload(_)));
        assert!(malformed(open(&secret, &psk, &slot, &fp, &[])));
        assert!(malformed(open(
            &secret,
            &psk,
            &slot,
            &fp,
            &[0; MIN_SEALED - 1]
        )));
        assert!(malformed(open(
            &secret,
            &psk,
            &slot,
            &fp,
            &vec![0; MAX_SEALED + 1]
        )));
        let public = public_key(&secret).expect("pk");
        assert!(matches!(
            seal(&public, &psk, &slot, &fp, &vec![0; MAX_SEALED]),
            Err(Error::LinkPayload(_))
        ));
        assert!(
            matches!(
                seal(&[0; 32], &psk, &slot, &fp, b"x"),
                Err(Error::InvalidLink)
            ),
            "a small-order recipient key"
        );
    }
}
