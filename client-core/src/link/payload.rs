//! What the primary seals for a new device ([`LinkPayload`]) and its encoding, the
//! e2e.proto `LinkPayload` message.

use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;
use tern_proto::e2e as wire;
use tern_proto::{AccountId, DeviceId};
use zeroize::Zeroizing;

use crate::crypto::devices::VerifiedDeviceList;
use crate::crypto::x3dh::verify_identity_dh;
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
        let wire = wire::LinkPayload {
            account_id: self.account.as_bytes().to_vec().into(),
            device_id: self.device_id.get(),
            identity_key: self.identity_key.to_vec().into(),
            device_signature: self.device_signature.to_vec().into(),
            identity_dh_signature: self.identity_dh_signature.to_vec().into(),
            device_list: self.device_list.clone().into(),
            device_list_signature: self.device_list_signature.to_vec().into(),
            delivery_token: self.delivery_token.to_vec().into(),
            relay_signing_key: self.relay_signing_key.to_vec().into(),
            contacts: self
                .contacts
                .iter()
                .map(|c| wire::LinkedContact {
                    account_id: c.account.as_bytes().to_vec().into(),
                    identity_key: c.identity_key.to_vec().into(),
                    delivery_token: c
                        .delivery_token
                        .map(|t| t.to_vec().into())
                        .unwrap_or_default(),
                })
                .collect(),
            contacts_complete: self.contacts_complete,
            created_at_ms: self.created_at_ms,
        };
        // The generated message holds `Bytes`, which cannot be wiped; the encoding can.
        Zeroizing::new(wire.encode_to_vec())
    }

    /// Decodes [`LinkPayload::encode`]; what does not decode, or a field of the
    /// wrong length (or device 1, which is never linked), is [`Error::LinkPayload`].
    pub fn decode(bytes: &[u8]) -> Result<LinkPayload> {
        let w = wire::LinkPayload::decode(bytes).map_err(|_| bad("does not decode"))?;
        let payload = (|| {
            let contacts = w
                .contacts
                .iter()
                .map(|c| {
                    Ok(LinkedContact {
                        account: account(&c.account_id, "contact account")?,
                        identity_key: fixed(&c.identity_key, "contact identity key")?,
                        delivery_token: match c.delivery_token.len() {
                            0 => None,
                            _ => Some(fixed(&c.delivery_token, "contact delivery token")?),
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let device_id = DeviceId::new(w.device_id)
                .filter(|id| *id != DeviceId::PRIMARY)
                .ok_or_else(|| bad("device id"))?;
            if w.device_list.is_empty() {
                return Err(bad("no device list"));
            }
            Ok(LinkPayload {
                account: account(&w.account_id, "account")?,
                device_id,
                identity_key: fixed(&w.identity_key, "identity key")?,
                device_signature: fixed(&w.device_signature, "device signature")?,
                identity_dh_signature: fixed(&w.identity_dh_signature, "identity_dh signature")?,
                device_list: w.device_list.to_vec(),
                device_list_signature: fixed(&w.device_list_signature, "device list signature")?,
                delivery_token: fixed(&w.delivery_token, "delivery token")?,
                relay_signing_key: fixed(&w.relay_signing_key, "relay signing key")?,
                contacts,
                contacts_complete: w.contacts_complete,
                created_at_ms: w.created_at_ms,
            })
        })();
        payload
    }

    /// Checks what the primary vouched for: the device certificate over
    /// (account, `device_key`), the signature over `identity_dh`, and a device list
    /// that verifies under `identity_key`, names the account and lists
    /// (`device_id`, `device_key`, `identity_dh`). Returns the verified list.
    /// Any failure is [`Error::LinkPayload`].
    pub fn verify(
        &self,
        device_key: &[u8; 32],
        identity_dh: &[u8; 32],
    ) -> Result<VerifiedDeviceList> {
        let identity =
            VerifyingKey::from_bytes(&self.identity_key).map_err(|_| bad("identity key"))?;
        identity
            .verify_strict(
                &tern_proto::auth::device_certificate(Some(&self.account), device_key),
                &Signature::from_bytes(&self.device_signature),
            )
            .map_err(|_| bad("device certificate"))?;
        verify_identity_dh(&self.identity_key, identity_dh, &self.identity_dh_signature)
            .map_err(|_| bad("identity_dh signature"))?;
        let list = VerifiedDeviceList::verify(
            &self.identity_key,
            &self.account,
            &self.device_list,
            &self.device_list_signature,
            None,
        )
        .map_err(|e| bad(&e.to_string()))?;
        let listed = list
            .entry(self.device_id)
            .is_some_and(|e| e.device_key == *device_key && e.identity_dh == *identity_dh);
        if !listed {
            return Err(bad("the device list does not hold this device"));
        }
        Ok(list)
    }
}

fn bad(what: &str) -> Error {
    Error::LinkPayload(what.to_owned())
}

fn fixed<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N]> {
    b.try_into().map_err(|_| bad(what))
}

fn account(b: &[u8], what: &str) -> Result<AccountId> {
    AccountId::try_from(b).map_err(|_| bad(what))
}
