//! Sender certificates: the relay vouches that a device belongs to an account with a
//! given identity key, for a day, so that a recipient can trust a sealed sender's
//! claim. The relay's signing key is the one thing here that is secret.

use std::sync::Arc;

use ed25519_dalek::Signer;
use tern_platform::clock::Clock;
use tern_proto::{IssuedCertificate, SenderCertificate};

use crate::core::auth::AuthenticatedDevice;
use crate::error::{Error, Result};
use crate::store::AccountStore;

/// How long a sender certificate is valid.
pub(crate) const SENDER_CERTIFICATE_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;

/// Issues sender certificates signed with the relay's key.
pub(crate) struct CertificateIssuer {
    accounts: Arc<dyn AccountStore>,
    signer: ed25519_dalek::SigningKey,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CertificateIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateIssuer")
            .field("signing_key", &self.signing_key())
            .finish_non_exhaustive()
    }
}

impl CertificateIssuer {
    /// An issuer signing with `signer`, reading identity keys from `accounts`.
    pub(crate) fn new(
        accounts: Arc<dyn AccountStore>,
        signer: ed25519_dalek::SigningKey,
        clock: Arc<dyn Clock>,
    ) -> Self {
        CertificateIssuer {
            accounts,
            signer,
            clock,
        }
    }

    /// The key sender certificates are signed with.
    pub(crate) fn signing_key(&self) -> [u8; 32] {
        self.signer.verifying_key().to_bytes()
    }

    /// A certificate of `device`, signed by the relay, valid for
    /// [`SENDER_CERTIFICATE_LIFETIME_MS`].
    pub(crate) fn issue(&self, device: &AuthenticatedDevice) -> Result<IssuedCertificate> {
        let addr = device.address();
        let record = self
            .accounts
            .get(&addr.account)?
            .ok_or(Error::Unauthorized)?;
        // A device removed (through another node, say) gets no new certificate.
        if record.device_key(addr.device).is_none() {
            return Err(Error::Unauthorized);
        }
        let certificate = SenderCertificate {
            account: addr.account,
            device: addr.device,
            identity_key: record.identity_key,
            expires_at_ms: self
                .clock
                .now()
                .saturating_add(SENDER_CERTIFICATE_LIFETIME_MS),
            relay_key: self.signing_key(),
        }
        .encode();
        let signature = self
            .signer
            .sign(&tern_proto::auth::sender_certificate(&certificate))
            .to_bytes();
        Ok(IssuedCertificate {
            certificate: certificate.into(),
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::Limits;
    use crate::testing::{device, fixture, identity_of};

    #[tokio::test]
    async fn sender_certificates_are_signed_by_the_relay_and_expire() {
        let f = fixture(Limits::default());
        let alice = device(&f, 1).await;
        let cert = f
            .services
            .certificates()
            .issue(&alice)
            .expect("certificate");
        let relay_key =
            ed25519_dalek::VerifyingKey::from_bytes(&f.services.certificates().signing_key())
                .expect("key");
        let sig = ed25519_dalek::Signature::from_bytes(&cert.signature);
        relay_key
            .verify_strict(
                &tern_proto::auth::sender_certificate(&cert.certificate),
                &sig,
            )
            .expect("signed by the relay");
        let decoded = SenderCertificate::decode(&cert.certificate).expect("decodes");
        assert_eq!(
            decoded.account.as_bytes(),
            alice.address().account.as_bytes()
        );
        assert_eq!(decoded.device.get(), 1);
        assert_eq!(
            &decoded.identity_key[..],
            &identity_of(1).verifying_key().to_bytes()
        );
        assert_eq!(
            decoded.expires_at_ms,
            f.clock.now() + SENDER_CERTIFICATE_LIFETIME_MS
        );
        assert_eq!(
            &decoded.relay_key[..],
            &f.services.certificates().signing_key()
        );
    }
}
