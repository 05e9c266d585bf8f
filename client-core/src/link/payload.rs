//! What the primary seals for a new device ([`LinkPayload`]) and its encoding, the
//! e2e.proto `LinkPayload` message.

use tern_proto::{AccountId, DeviceId};
use zeroize::Zeroizing;

use crate::crypto::devices::VerifiedDeviceList;
use crate::error::{Error, Result};

/// A contact the primary hands a new device, so it can write to it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedContact {
    /// The contact's account.
    pub account: AccountId,
    /// Its identity key, as the primary trusts it.
    pub identity_key: [u8; 32],
    /// Its delivery token, when the primary knows it.
    pub delivery_token: Option<[u8; 32]>,
}

/// Everything a new device needs to become a device of the account, vouched for by
/// the primary. It travels only HPKE-sealed to the new device's key.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkPayload {
    /// The account the device joins.
    pub account: AccountId,
    /// The id the relay gave the new device.
    pub device_id: DeviceId,
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// The identity's device certificate over (account, device key).
    pub device_signature: [u8; 64],
    /// The identity's signature over the new device's identity agreement key.
    pub identity_dh_signature: [u8; 64],
    /// The signed device list that includes the new device (exact bytes).
    pub device_list: Vec<u8>,
    /// The identity's signature over `device_list`.
    pub device_list_signature: [u8; 64],
    /// The account's delivery token.
    pub delivery_token: [u8; 32],
    /// The relay's sender-certificate signing key.
    pub relay_signing_key: [u8; 32],
    /// Contacts, as many as fit.
    pub contacts: Vec<LinkedContact>,
    /// Whether `contacts` holds every contact (else the rest follow as a sync).
    pub contacts_complete: bool,
    /// The primary's clock when it sealed, Unix ms.
    pub created_at_ms: u64,
}

impl std::fmt::Debug for LinkPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPayload")
            .field("device_id", &self.device_id)
            .field("contacts", &self.contacts.len())
            .finish_non_exhaustive()
    }
}

impl LinkPayload {
    /// The e2e.proto encoding.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(Vec::new())
    }

    /// Decodes [`LinkPayload::encode`]; a field of the wrong length is
    /// [`Error::LinkPayload`].
    pub fn decode(bytes: &[u8]) -> Result<LinkPayload> {
        let _ = bytes;
        Err(Error::LinkPayload("not yet".into()))
    }

    /// Checks what the primary vouched for: the device certificate over
    /// (account, `device_key`), the signature over `identity_dh`, and a device list
    /// that verifies under `identity_key`, names the account and lists
    /// (`device_id`, `device_key`, `identity_dh`). Returns the verified list.
    pub fn verify(
        &self,
        device_key: &[u8; 32],
        identity_dh: &[u8; 32],
    ) -> Result<VerifiedDeviceList> {
        let _ = (device_key, identity_dh);
        Err(Error::LinkPayload("not yet".into()))
    }
}
