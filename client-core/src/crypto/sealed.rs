//! Sealed sender: the sender's identity travels only inside the encryption.
//!
//! A sender seals each message to the recipient device's identity agreement key: a
//! fresh X25519 key pair, a Diffie-Hellman with the recipient's key, HKDF-SHA256 to a
//! ChaCha20-Poly1305 key and nonce, and the relay-issued [`SenderCertificate`] inside
//! with the message. The relay sees the recipient and the delivery token, never the
//! sender. The recipient opens the seal, checks the certificate against its relay's
//! signing key and the clock, and then must check that the certificate's identity is
//! the one the inner (ratchet) message authenticates: the seal alone proves nothing
//! about the sender, since a certificate is no secret.

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use prost::Message;
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use tern_proto::{e2e, AccountId, DeviceId};
use x25519_dalek::{EphemeralSecret, PublicKey};
use zeroize::Zeroizing;

use super::x3dh::AgreementKeyPair;
use super::CryptoError;

/// The format version byte that starts every sealed envelope.
pub const VERSION: u8 = 1;
const INFO: &[u8] = b"tern sealed sender v1";

/// A sender certificate: who sent a message, as the relay vouches, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderCertificate {
    /// The sender's account.
    pub account: AccountId,
    /// The sender's device.
    pub device: DeviceId,
    /// The sender account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// Not valid at or after this time (Unix ms).
    pub expires_at_ms: u64,
    /// The key of the relay that signed it.
    pub relay_key: [u8; 32],
    encoded: Vec<u8>,
    signature: [u8; 64],
}

impl SenderCertificate {
    /// Parses a certificate as the relay issued it. Checks its form, not its
    /// signature: see [`SenderCertificate::validate`].
    pub fn parse(encoded: &[u8], signature: &[u8]) -> Result<Self, CryptoError> {
        // tern-proto owns the certificate's encoding; the signature covers the bytes
        // exactly as issued, so those are kept too.
        let cert = tern_proto::SenderCertificate::decode(encoded)
            .map_err(|_| CryptoError::InvalidCertificate)?;
        Ok(SenderCertificate {
            account: cert.account,
            device: cert.device,
            identity_key: cert.identity_key,
            expires_at_ms: cert.expires_at_ms,
            relay_key: cert.relay_key,
            encoded: encoded.to_vec(),
            signature: signature
                .try_into()
                .map_err(|_| CryptoError::InvalidCertificate)?,
        })
    }

    /// Checks that `trusted_relay_key` signed this certificate and that it has not
    /// expired at `now_ms`. A certificate from another relay, or an expired one, fails.
    pub fn validate(&self, trusted_relay_key: &[u8; 32], now_ms: u64) -> Result<(), CryptoError> {
        if self.relay_key != *trusted_relay_key {
            return Err(CryptoError::InvalidCertificate);
        }
        let key = VerifyingKey::from_bytes(trusted_relay_key)
            .map_err(|_| CryptoError::InvalidCertificate)?;
        key.verify_strict(
            &tern_proto::auth::sender_certificate(&self.encoded),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| CryptoError::InvalidCertificate)?;
        if now_ms >= self.expires_at_ms {
            return Err(CryptoError::ExpiredCertificate);
        }
        Ok(())
    }

    /// The certificate as issued: encoded bytes and the relay's signature.
    pub fn as_issued(&self) -> (&[u8], &[u8; 64]) {
        (&self.encoded, &self.signature)
    }
}

/// Certificates whose signature already verified, so a stream of messages from one
/// sender costs one signature check per certificate rather than one per message.
/// Expiry is still checked every time.
#[derive(Debug, Default)]
pub struct CertificateCache {
    verified: std::collections::HashSet<Vec<u8>>,
}

impl CertificateCache {
    /// Certificates remembered before the cache starts over.
    pub const CAPACITY: usize = 4096;

    /// [`SenderCertificate::validate`], skipping the signature for a certificate (the
    /// same bytes, signature and trusted key) that verified before.
    pub fn validate(
        &mut self,
        cert: &SenderCertificate,
        trusted_relay_key: &[u8; 32],
        now_ms: u64,
    ) -> Result<(), CryptoError> {
        let key = [
            &trusted_relay_key[..],
            &cert.signature[..],
            &cert.encoded[..],
        ]
        .concat();
        if self.verified.contains(&key) {
            if now_ms >= cert.expires_at_ms {
                return Err(CryptoError::ExpiredCertificate);
            }
            return Ok(());
        }
        cert.validate(trusted_relay_key, now_ms)?;
        if self.verified.len() >= Self::CAPACITY {
            self.verified.clear();
        }
        self.verified.insert(key);
        Ok(())
    }
}

fn keys(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
) -> Result<(ChaCha20Poly1305, [u8; 12]), CryptoError> {
    if shared.iter().all(|b| *b == 0) {
        return Err(CryptoError::InvalidKey);
    }
    let salt = [&ephemeral[..], &recipient[..]].concat();
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(Some(&salt), shared)
        .expand(INFO, &mut okm[..])
        .map_err(|_| CryptoError::InvalidKey)?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Ok((ChaCha20Poly1305::new((&okm[..32]).into()), nonce))
}

/// Seals `content` from the holder of `certificate` to the device whose identity
/// agreement key is `recipient`.
pub fn seal(
    rng: &mut (impl RngCore + CryptoRng),
    recipient: &[u8; 32],
    certificate: &SenderCertificate,
    content: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let secret = EphemeralSecret::random_from_rng(rng);
    let ephemeral = PublicKey::from(&secret).to_bytes();
    let shared = Zeroizing::new(
        secret
            .diffie_hellman(&PublicKey::from(*recipient))
            .to_bytes(),
    );
    let (cipher, nonce) = keys(&shared, &ephemeral, recipient)?;
    let inner = Zeroizing::new(
        e2e::SealedContent {
            sender_certificate: certificate.encoded.clone().into(),
            certificate_signature: certificate.signature.to_vec().into(),
            content: content.to_vec().into(),
        }
        .encode_to_vec(),
    );
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &inner,
                aad: &[VERSION],
            },
        )
        .map_err(|_| CryptoError::Decrypt)?;
    let mut out = Vec::with_capacity(1 + 32 + sealed.len());
    out.push(VERSION);
    out.extend_from_slice(&ephemeral);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a sealed envelope with the recipient device's identity agreement key pair.
/// Returns the (not yet validated) certificate and the content.
pub fn open(
    recipient: &AgreementKeyPair,
    sealed: &[u8],
) -> Result<(SenderCertificate, Vec<u8>), CryptoError> {
    let (&version, rest) = sealed.split_first().ok_or(CryptoError::MalformedHeader)?;
    if version != VERSION {
        return Err(CryptoError::MalformedHeader);
    }
    let (ephemeral, body) = rest
        .split_first_chunk::<32>()
        .ok_or(CryptoError::MalformedHeader)?;
    let shared = Zeroizing::new(
        recipient
            .secret()
            .diffie_hellman(&PublicKey::from(*ephemeral))
            .to_bytes(),
    );
    // The pair's public half, not one derived again: a base-point multiplication
    // per message is a quarter of what opening costs.
    let (cipher, nonce) =
        keys(&shared, ephemeral, &recipient.public()).map_err(|_| CryptoError::Decrypt)?;
    let inner = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: body,
                    aad: &[VERSION],
                },
            )
            .map_err(|_| CryptoError::Decrypt)?,
    );
    let content = e2e::SealedContent::decode(&inner[..]).map_err(|_| CryptoError::Decrypt)?;
    let cert =
        SenderCertificate::parse(&content.sender_certificate, &content.certificate_signature)?;
    Ok((cert, content.content.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use rand::rngs::OsRng;

    fn certificate(relay: &SigningKey, expires_at_ms: u64) -> SenderCertificate {
        let encoded = tern_proto::SenderCertificate {
            account: AccountId([1; 16]),
            device: DeviceId::try_from(2).expect("device id"),
            identity_key: [3; 32],
            expires_at_ms,
            relay_key: relay.verifying_key().to_bytes(),
        }
        .encode();
        let sig = relay
            .sign(&tern_proto::auth::sender_certificate(&encoded))
            .to_bytes();
        SenderCertificate::parse(&encoded, &sig).expect("well formed")
    }

    #[test]
    fn the_cache_skips_only_what_verified_and_still_checks_expiry() {
        let relay = SigningKey::from_bytes(&[9; 32]);
        let trusted = relay.verifying_key().to_bytes();
        let cert = certificate(&relay, 2_000);
        let mut cache = CertificateCache::default();
        cache.validate(&cert, &trusted, 1_000).expect("valid");
        cache.validate(&cert, &trusted, 1_500).expect("cached");
        assert_eq!(
            cache.validate(&cert, &trusted, 2_000),
            Err(CryptoError::ExpiredCertificate)
        );
        // Same signature, other bytes: not a cache hit, and fails verification.
        let mut forged = cert.clone();
        forged.encoded.push(0);
        assert_eq!(
            cache.validate(&forged, &trusted, 1_000),
            Err(CryptoError::InvalidCertificate)
        );
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(
            cache.validate(&cert, &other, 1_000).is_err(),
            "another relay"
        );
    }

    #[test]
    fn seal_and_open() {
        let relay = SigningKey::from_bytes(&[9; 32]);
        let bob = AgreementKeyPair::generate(&mut OsRng);
        let cert = certificate(&relay, 2_000);
        let sealed = seal(&mut OsRng, &bob.public(), &cert, b"inner").expect("seal");
        let (got, content) = open(&bob, &sealed).expect("open");
        assert_eq!(content, b"inner");
        assert_eq!(got, cert);
        assert_eq!(got.account, AccountId([1; 16]));
        got.validate(&relay.verifying_key().to_bytes(), 1_999)
            .expect("valid");
    }

    #[test]
    fn another_relays_or_an_expired_certificate_is_rejected() {
        let relay = SigningKey::from_bytes(&[9; 32]);
        let cert = certificate(&relay, 2_000);
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(matches!(
            cert.validate(&other, 0),
            Err(CryptoError::InvalidCertificate)
        ));
        assert!(matches!(
            cert.validate(&relay.verifying_key().to_bytes(), 2_000),
            Err(CryptoError::ExpiredCertificate)
        ));
        // A certificate that names the trusted relay but was signed by another key.
        let mut forged = certificate(&SigningKey::from_bytes(&[7; 32]), 2_000);
        forged.relay_key = relay.verifying_key().to_bytes();
        assert!(forged
            .validate(&relay.verifying_key().to_bytes(), 0)
            .is_err());
    }

    #[test]
    fn only_the_recipient_opens_and_tampering_is_detected() {
        let relay = SigningKey::from_bytes(&[9; 32]);
        let bob = AgreementKeyPair::generate(&mut OsRng);
        let eve = AgreementKeyPair::generate(&mut OsRng);
        let cert = certificate(&relay, 2_000);
        let sealed = seal(&mut OsRng, &bob.public(), &cert, b"inner").expect("seal");
        assert!(matches!(open(&eve, &sealed), Err(CryptoError::Decrypt)));
        for i in [0, 1, 40, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&bob, &bad).is_err(), "byte {i}");
        }
        assert!(open(&bob, &sealed[..sealed.len() - 1]).is_err());
        assert!(open(&bob, &[]).is_err());
        assert!(open(&bob, &[VERSION; 20]).is_err());
        // The sealed bytes do not contain the sender's certificate in clear.
        let (encoded, _) = cert.as_issued();
        assert!(!sealed.windows(16).any(|w| w == &encoded[2..18]));
    }
}
