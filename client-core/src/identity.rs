//! Keys: the account's identity key, which vouches for devices, and each device's own
//! key, which authenticates its connections.

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use tern_proto::{auth, AccountId};

/// The account's long-term Ed25519 identity key.
#[derive(Clone)]
pub struct IdentityKeyPair(SigningKey);

/// One device's Ed25519 key.
#[derive(Clone)]
pub struct DeviceKeyPair(SigningKey);

impl IdentityKeyPair {
    /// A fresh key from the OS's random source.
    pub fn generate() -> Self {
        IdentityKeyPair(SigningKey::generate(&mut OsRng))
    }

    /// A key from its 32 secret bytes (as stored by the app).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        IdentityKeyPair(SigningKey::from_bytes(secret))
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Vouches for a device's X25519 identity agreement key.
    pub fn certify_agreement_key(&self, key: &[u8; 32]) -> [u8; 64] {
        self.0.sign(&auth::identity_agreement_key(key)).to_bytes()
    }

    /// Vouches for a signed prekey.
    pub fn certify_signed_prekey(&self, id: u32, key: &[u8; 32]) -> [u8; 64] {
        self.0.sign(&auth::signed_prekey(id, key)).to_bytes()
    }

    /// Vouches for `device` joining `account` (`None` while registering).
    pub fn certify_device(&self, account: Option<&AccountId>, device: &[u8; 32]) -> [u8; 64] {
        self.0
            .sign(&auth::device_certificate(account, device))
            .to_bytes()
    }

    /// The signing key, for the device list (`crypto::devices::sign_device_list`).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// Asks the relay to delete `account`, on the connection whose exporter value
    /// (for the authenticated device's address) is `exporter`.
    pub(crate) fn sign_account_deletion(
        &self,
        account: &AccountId,
        exporter: &[u8; 32],
    ) -> [u8; 64] {
        self.0
            .sign(&auth::account_deletion(account, exporter))
            .to_bytes()
    }
}

impl DeviceKeyPair {
    /// A fresh key from the OS's random source.
    pub fn generate() -> Self {
        DeviceKeyPair(SigningKey::generate(&mut OsRng))
    }

    /// A key from its 32 secret bytes.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        DeviceKeyPair(SigningKey::from_bytes(secret))
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Vouches for a signed prekey of this device (a linked device, which holds no
    /// identity key; the signed device list binds this key to the identity).
    pub(crate) fn certify_signed_prekey(&self, id: u32, key: &[u8; 32]) -> [u8; 64] {
        self.0.sign(&auth::signed_prekey(id, key)).to_bytes()
    }

    /// Signs a connection's exporter value.
    pub(crate) fn prove_session(&self, exporter: &[u8; 32]) -> [u8; 64] {
        self.0.sign(&auth::session_proof(exporter)).to_bytes()
    }
}

// Secret keys never reach logs.
impl std::fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKeyPair").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DeviceKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeyPair").finish_non_exhaustive()
    }
}
