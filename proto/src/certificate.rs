//! Sender certificates: a relay's signed statement of who a sealed message's sender
//! is, until when. The relay signs [`crate::auth::sender_certificate`] of the
//! encoded bytes, so those bytes travel as they were signed and are decoded (and
//! checked) only by the recipient.

use bytes::Bytes;
use prost::Message;

use crate::code::ErrorCode;
use crate::error::{array, bad_id, Malformed, Problem};
use crate::ids::{AccountId, DeviceId};
use crate::limits::{PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::v1;

/// The content of a sender certificate (`tern.v1.SenderCertificate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderCertificate {
    /// The sender's account.
    pub account: AccountId,
    /// The sender's device.
    pub device: DeviceId,
    /// The sender account's Ed25519 identity key.
    pub identity_key: [u8; PUBLIC_KEY_LEN],
    /// Not valid at or after this time (Unix ms).
    pub expires_at_ms: u64,
    /// The Ed25519 key of the relay that signs it.
    pub relay_key: [u8; PUBLIC_KEY_LEN],
}

/// A certificate as a relay issues it: the encoded [`SenderCertificate`] and the
/// relay's signature over [`crate::auth::sender_certificate`] of those bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The encoded certificate, exactly as signed.
    pub certificate: Bytes,
    /// The relay's Ed25519 signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl SenderCertificate {
    /// The wire encoding, the bytes a relay signs.
    pub fn encode(&self) -> Vec<u8> {
        v1::SenderCertificate {
            account_id: Bytes::copy_from_slice(self.account.as_bytes()),
            device_id: self.device.get(),
            identity_key: Bytes::copy_from_slice(&self.identity_key),
            expires_at_ms: self.expires_at_ms,
            relay_key: Bytes::copy_from_slice(&self.relay_key),
        }
        .encode_to_vec()
    }

    /// What the relay signs: [`crate::auth::sender_certificate`] of [`Self::encode`].
    pub fn signed_bytes(&self) -> Vec<u8> {
        crate::auth::sender_certificate(&self.encode())
    }

    /// Decodes and checks encoded certificate bytes: an account id, a device id that
    /// is not 0, and two 32-byte keys. Checks the form only, not the signature or
    /// the expiry; verify the signature over the bytes received, not a re-encoding.
    pub fn decode(encoded: &[u8]) -> Result<Self, Malformed> {
        const BAD: ErrorCode = ErrorCode::BadRequest;
        let cert = v1::SenderCertificate::decode(encoded).map_err(|_| {
            Malformed::new(
                "sender_certificate",
                Problem::Undecodable("a sender certificate"),
                BAD,
            )
        })?;
        Ok(SenderCertificate {
            account: AccountId::try_from(&cert.account_id[..])
                .map_err(bad_id("sender_certificate.account_id"))?,
            device: DeviceId::try_from(cert.device_id)
                .map_err(bad_id("sender_certificate.device_id"))?,
            identity_key: array(
                &cert.identity_key,
                "sender_certificate.identity_key",
                "an identity key",
                BAD,
            )?,
            expires_at_ms: cert.expires_at_ms,
            relay_key: array(
                &cert.relay_key,
                "sender_certificate.relay_key",
                "a relay key",
                BAD,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cert() -> SenderCertificate {
        SenderCertificate {
            account: AccountId([3; 16]),
            device: DeviceId::PRIMARY,
            identity_key: [4; 32],
            expires_at_ms: 1_700_000_000_000,
            relay_key: [5; 32],
        }
    }

    #[test]
    fn encodes_exactly_as_the_prost_message() {
        let c = cert();
        let prost = v1::SenderCertificate {
            account_id: Bytes::copy_from_slice(&[3; 16]),
            device_id: 1,
            identity_key: Bytes::copy_from_slice(&[4; 32]),
            expires_at_ms: 1_700_000_000_000,
            relay_key: Bytes::copy_from_slice(&[5; 32]),
        };
        assert_eq!(c.encode(), prost.encode_to_vec());
        assert_eq!(SenderCertificate::decode(&c.encode()), Ok(c.clone()));
        assert_eq!(
            c.signed_bytes(),
            crate::auth::sender_certificate(&c.encode())
        );
    }

    #[test]
    fn malformed_certificates_are_refused() {
        let good = v1::SenderCertificate::decode(&cert().encode()[..]).expect("decodes");
        let cases: [(&str, v1::SenderCertificate); 4] = [
            (
                "sender_certificate.account_id",
                v1::SenderCertificate {
                    account_id: Bytes::from_static(&[1; 15]),
                    ..good.clone()
                },
            ),
            (
                "sender_certificate.device_id",
                v1::SenderCertificate {
                    device_id: 0,
                    ..good.clone()
                },
            ),
            (
                "sender_certificate.identity_key",
                v1::SenderCertificate {
                    identity_key: Bytes::from_static(&[1; 33]),
                    ..good.clone()
                },
            ),
            (
                "sender_certificate.relay_key",
                v1::SenderCertificate {
                    relay_key: Bytes::new(),
                    ..good.clone()
                },
            ),
        ];
        for (field, bad) in cases {
            let e = SenderCertificate::decode(&bad.encode_to_vec()).expect_err(field);
            assert_eq!(e.field(), field);
        }
        let e = SenderCertificate::decode(&[0xff, 0xff]).expect_err("garbage");
        assert_eq!(e.problem(), &Problem::Undecodable("a sender certificate"));
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(c) = SenderCertificate::decode(&bytes) {
                prop_assert_eq!(SenderCertificate::decode(&c.encode()), Ok(c));
            }
        }

        #[test]
        fn round_trips(account in any::<[u8; 16]>(), device in 1u32.., identity_key in any::<[u8; 32]>(),
                       expires_at_ms in any::<u64>(), relay_key in any::<[u8; 32]>()) {
            let c = SenderCertificate {
                account: AccountId(account),
                device: DeviceId::new(device).expect("not 0"),
                identity_key,
                expires_at_ms,
                relay_key,
            };
            prop_assert_eq!(SenderCertificate::decode(&c.encode()), Ok(c));
        }
    }
}
