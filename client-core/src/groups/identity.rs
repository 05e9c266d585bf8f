//! How a group leaf is bound to a Tern account: the custom MLS credential
//! `0xF001 tern-device-v1` and the [`TernIdentity`] provider that checks it.
//!
//! A leaf's MLS signature key **is** the device's Ed25519 key (the one in the
//! account's signed device list). The credential carries the account, the device
//! id, the account's identity key and the identity's device certificate
//! (`tern_proto::auth::device_certificate`) over that key, so checking a leaf needs
//! no I/O: parse, then verify the certificate under the identity key it names.
//! Whether that identity key is the one pinned for the account is the caller's
//! check ([`super::Member::identity_key`]), as for 1:1 sessions.

use ed25519_dalek::{Signature, VerifyingKey};
use mls_rs::error::IntoAnyError;
use mls_rs::identity::{Credential, CredentialType, CustomCredential, SigningIdentity};
use mls_rs::time::MlsTime;
use mls_rs::{ExtensionList, IdentityProvider};
use mls_rs_core::identity::MemberValidationContext;
use tern_proto::{auth, AccountId, DeviceId};

/// The credential type of a Tern device leaf.
pub const CREDENTIAL_TYPE: u16 = 0xF001;
/// Its encoded length: account (16) ‖ device (u32 BE) ‖ identity key (32) ‖
/// certificate (64).
pub const CREDENTIAL_LEN: usize = 16 + 4 + 32 + 64;

/// Why a leaf's credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Not a `tern-device-v1` credential.
    #[error("credential refused: not a Tern device credential")]
    WrongType,
    /// The bytes are not a credential (length, device id 0).
    #[error("credential refused: malformed")]
    Malformed,
    /// The identity's certificate does not verify over this leaf's signature key:
    /// a forged certificate, or a certificate for another key.
    #[error("credential refused: the identity's certificate does not cover the leaf key")]
    BadCertificate,
}

impl IntoAnyError for CredentialError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(Box::new(self))
    }
}

/// The contents of a `tern-device-v1` credential.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The account the device belongs to.
    pub account: AccountId,
    /// The device.
    pub device: DeviceId,
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// The identity's signature over `device_certificate(account, device key)`
    /// (device 1 may carry the registration one, over the all-zero account).
    pub certificate: [u8; 64],
}

impl std::fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCredential")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceCredential {
    /// The credential's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CREDENTIAL_LEN);
        out.extend_from_slice(self.account.as_bytes());
        out.extend_from_slice(&self.device.get().to_be_bytes());
        out.extend_from_slice(&self.identity_key);
        out.extend_from_slice(&self.certificate);
        out
    }

    /// Parses the credential's bytes (no signature check).
    pub fn parse(bytes: &[u8]) -> Result<Self, CredentialError> {
        let bytes: &[u8; CREDENTIAL_LEN] =
            bytes.try_into().map_err(|_| CredentialError::Malformed)?;
        let (account, rest) = bytes.split_at(16);
        let (device, rest) = rest.split_at(4);
        let (identity_key, certificate) = rest.split_at(32);
        let account = AccountId::try_from(account).map_err(|_| CredentialError::Malformed)?;
        let device = u32::from_be_bytes(device.try_into().map_err(|_| CredentialError::Malformed)?);
        Ok(DeviceCredential {
            account,
            device: DeviceId::new(device).ok_or(CredentialError::Malformed)?,
            identity_key: identity_key
                .try_into()
                .map_err(|_| CredentialError::Malformed)?,
            certificate: certificate
                .try_into()
                .map_err(|_| CredentialError::Malformed)?,
        })
    }

    /// Reads the credential of a leaf (no signature check).
    pub fn of(identity: &SigningIdentity) -> Result<Self, CredentialError> {
        match &identity.credential {
            Credential::Custom(c) if c.credential_type == CredentialType::new(CREDENTIAL_TYPE) => {
                Self::parse(&c.data)
            }
            _ => Err(CredentialError::WrongType),
        }
    }

    /// Checks that the certificate covers `leaf_key` under the identity key.
    pub fn verify(&self, leaf_key: &[u8]) -> Result<(), CredentialError> {
        let leaf_key: &[u8; 32] = leaf_key
            .try_into()
            .map_err(|_| CredentialError::BadCertificate)?;
        let identity = VerifyingKey::from_bytes(&self.identity_key)
            .map_err(|_| CredentialError::BadCertificate)?;
        let signature = Signature::from_bytes(&self.certificate);
        let ok = |account: Option<&AccountId>| {
            identity
                .verify_strict(&auth::device_certificate(account, leaf_key), &signature)
                .is_ok()
        };
        // The primary's certificate is made at registration, before it has an account.
        if ok(Some(&self.account)) || (self.device == DeviceId::PRIMARY && ok(None)) {
            Ok(())
        } else {
            Err(CredentialError::BadCertificate)
        }
    }

    /// The MLS signing identity of a device: its Ed25519 key and this credential.
    pub fn signing_identity(&self, device_key: &[u8; 32]) -> SigningIdentity {
        SigningIdentity::new(
            Credential::Custom(CustomCredential::new(
                CredentialType::new(CREDENTIAL_TYPE),
                self.encode(),
            )),
            device_key.to_vec().into(),
        )
    }

    /// Parses and verifies a leaf's credential.
    pub fn verified(identity: &SigningIdentity) -> Result<Self, CredentialError> {
        let credential = Self::of(identity)?;
        credential.verify(&identity.signature_key)?;
        Ok(credential)
    }
}

/// The MLS identity provider for Tern leaves: pure, no I/O.
#[derive(Debug, Clone, Copy, Default)]
pub struct TernIdentity {
    /// Tests make a misbehaving member whose own leaf may change identity key.
    lax: bool,
}

impl TernIdentity {
    #[cfg(test)]
    pub(crate) fn lax() -> Self {
        TernIdentity { lax: true }
    }
}

impl IdentityProvider for TernIdentity {
    type Error = CredentialError;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        DeviceCredential::verified(signing_identity).map(|_| ())
    }

    fn validate_external_sender(
        &self,
        _signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        // Tern groups have no external senders.
        Err(CredentialError::WrongType)
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        let c = DeviceCredential::of(signing_identity)?;
        let mut out = c.account.as_bytes().to_vec();
        out.extend_from_slice(&c.device.get().to_be_bytes());
        Ok(out)
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        let (a, b) = (
            DeviceCredential::of(predecessor)?,
            DeviceCredential::of(successor)?,
        );
        // A leaf may rotate its device key, never move to another account, device
        // or identity key (the identity is what the account's pin covers).
        Ok(a.account == b.account
            && a.device == b.device
            && (self.lax || a.identity_key == b.identity_key))
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![CredentialType::new(CREDENTIAL_TYPE)]
    }
}
