//! The signed device list: which devices an account has, each bound to its device key
//! and identity agreement key, signed by the account's identity key (ARCHITECTURE
//! §13). [`VerifiedDeviceList::verify`] is the only way to get a
//! [`VerifiedDeviceList`], so holding one proves the sender rules ran:
//!
//! 1. the signature verifies (Ed25519, strict) under the identity key the caller
//!    trusts for the account (never a key from a bundle), and the list names that
//!    account;
//! 2. a list older than the cached one is refused, and so is a list with the cached
//!    version but other bytes (equivocation).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use tern_proto::{AccountId, DeviceId};

use crate::error::{Error, Result};

#[doc(no_inline)]
pub use tern_proto::device_list::{DeviceEntry, DeviceList};

/// Why a device list was refused. The cached list (if any) stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceListRefusal {
    /// The bytes are not a device list (layout, order, device 1 missing, length, or
    /// more than `MAX_LISTED_DEVICES` entries).
    #[error("device list refused: malformed")]
    Malformed,
    /// The signature does not verify under the account's trusted identity key.
    #[error("device list refused: bad signature")]
    BadSignature,
    /// The list names another account.
    #[error("device list refused: it names another account")]
    WrongAccount,
    /// The list is older than the one already accepted.
    #[error("device list refused: version {got} is older than {cached}")]
    Older {
        /// The version already accepted.
        cached: u64,
        /// The version offered.
        got: u64,
    },
    /// Another list with the same version was already accepted (equivocation).
    #[error("device list refused: a different list with version {version} was seen")]
    Equivocation {
        /// The version both lists carry.
        version: u64,
    },
    /// The account published a list before and now none is offered (no downgrade to
    /// the unlisted, identity-signed-only rule).
    #[error("device list refused: the account had a list and now has none")]
    Missing,
}

/// Signs `list` with the account's identity key: the exact bytes (as they go on the
/// wire) and the signature over them. A list that breaks the layout's rules (no
/// device 1, ids not ascending, no or too many entries) is
/// [`DeviceListRefusal::Malformed`].
pub fn sign_device_list(identity: &SigningKey, list: &DeviceList) -> Result<(Vec<u8>, [u8; 64])> {
    let bytes = list
        .encode()
        .map_err(|_| Error::DeviceList(DeviceListRefusal::Malformed))?;
    let signature = identity.sign(&bytes).to_bytes();
    Ok((bytes, signature))
}

/// A device list that passed the sender rules against a trusted identity key. Only
/// [`VerifiedDeviceList::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDeviceList {
    identity_key: [u8; 32],
    list: DeviceList,
    bytes: Vec<u8>,
    signature: [u8; 64],
}

impl VerifiedDeviceList {
    /// Checks `list` (the signed bytes) and `signature` against the account's trusted
    /// `identity_key` and `account`, and against the `cached` (version, bytes) already
    /// accepted for it, if any. Refusals are [`Error::DeviceList`].
    pub fn verify(
        identity_key: &[u8; 32],
        account: &AccountId,
        list: &[u8],
        signature: &[u8],
        cached: Option<(u64, &[u8])>,
    ) -> Result<VerifiedDeviceList> {
        let refuse = |r: DeviceListRefusal| Err(Error::DeviceList(r));
        let Ok(parsed) = DeviceList::parse(list) else {
            return refuse(DeviceListRefusal::Malformed);
        };
        let Ok(signature) = <[u8; 64]>::try_from(signature) else {
            return refuse(DeviceListRefusal::BadSignature);
        };
        let Ok(key) = VerifyingKey::from_bytes(identity_key) else {
            return refuse(DeviceListRefusal::BadSignature);
        };
        if key
            .verify_strict(list, &Signature::from_bytes(&signature))
            .is_err()
        {
            return refuse(DeviceListRefusal::BadSignature);
        }
        if parsed.account != *account {
            return refuse(DeviceListRefusal::WrongAccount);
        }
        if let Some((version, bytes)) = cached {
            if parsed.version < version {
                return refuse(DeviceListRefusal::Older {
                    cached: version,
                    got: parsed.version,
                });
            }
            if parsed.version == version && bytes != list {
                return refuse(DeviceListRefusal::Equivocation { version });
            }
        }
        Ok(VerifiedDeviceList {
            identity_key: *identity_key,
            list: parsed,
            bytes: list.to_vec(),
            signature,
        })
    }

    /// The list's version.
    pub fn version(&self) -> u64 {
        self.list.version
    }

    /// The account the list is for.
    pub fn account(&self) -> &AccountId {
        &self.list.account
    }

    /// The identity key it verified under.
    pub fn identity_key(&self) -> &[u8; 32] {
        &self.identity_key
    }

    /// The listed devices, ids ascending.
    pub fn entries(&self) -> &[DeviceEntry] {
        &self.list.entries
    }

    /// The entry for `id`, if listed.
    pub fn entry(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.list.entries.iter().find(|e| e.id == id)
    }

    /// The signed bytes, as verified (to cache and to pass on).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The identity's signature over [`VerifiedDeviceList::bytes`].
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The parsed list.
    pub fn list(&self) -> &DeviceList {
        &self.list
    }
}

#[cfg(test)]
mod tests;
