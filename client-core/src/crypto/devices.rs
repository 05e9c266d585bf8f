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
pub use placeholder::{DeviceEntry, DeviceList};

/// Stand-in for `tern_proto::device_list` until the wire lands (same shape).
mod placeholder {
    use tern_proto::{AccountId, DeviceId};

    /// One device of a list.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DeviceEntry {
        /// The device's id.
        pub id: DeviceId,
        /// Its Ed25519 device key.
        pub device_key: [u8; 32],
        /// Its X25519 identity agreement key.
        pub identity_dh: [u8; 32],
    }

    /// An account's device list.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DeviceList {
        /// The account.
        pub account: AccountId,
        /// Grows with every change.
        pub version: u64,
        /// The devices, ids ascending.
        pub entries: Vec<DeviceEntry>,
    }

    /// Why bytes are not a device list.
    #[derive(Debug)]
    pub struct DeviceListError;

    const CONTEXT: &[u8] = b"tern device list v1\0";

    impl DeviceList {
        /// The signed bytes.
        pub fn encode(&self) -> Vec<u8> {
            let mut b = CONTEXT.to_vec();
            b.extend_from_slice(self.account.as_bytes());
            b.extend_from_slice(&self.version.to_be_bytes());
            b.push(self.entries.len() as u8);
            for e in &self.entries {
                b.extend_from_slice(&e.id.get().to_be_bytes());
                b.extend_from_slice(&e.device_key);
                b.extend_from_slice(&e.identity_dh);
            }
            b
        }

        /// Parses [`DeviceList::encode`].
        pub fn parse(bytes: &[u8]) -> Result<DeviceList, DeviceListError> {
            let rest = bytes.strip_prefix(CONTEXT).ok_or(DeviceListError)?;
            if rest.len() < 25 {
                return Err(DeviceListError);
            }
            let account = AccountId::try_from(&rest[..16]).map_err(|_| DeviceListError)?;
            let version = u64::from_be_bytes(rest[16..24].try_into().map_err(|_| DeviceListError)?);
            let n = usize::from(rest[24]);
            let body = &rest[25..];
            if body.len() != n * 68 {
                return Err(DeviceListError);
            }
            let mut entries: Vec<DeviceEntry> = Vec::with_capacity(n);
            for e in body.chunks_exact(68) {
                let id = u32::from_be_bytes(e[..4].try_into().map_err(|_| DeviceListError)?);
                let id = DeviceId::new(id).ok_or(DeviceListError)?;
                if entries.last().is_some_and(|l| l.id >= id) {
                    return Err(DeviceListError);
                }
                entries.push(DeviceEntry {
                    id,
                    device_key: e[4..36].try_into().map_err(|_| DeviceListError)?,
                    identity_dh: e[36..68].try_into().map_err(|_| DeviceListError)?,
                });
            }
            if entries.first().map(|e| e.id) != Some(DeviceId::PRIMARY) {
                return Err(DeviceListError);
            }
            Ok(DeviceList {
                account,
                version,
                entries,
            })
        }
    }
}

/// Why a device list was refused. The cached list (if any) stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceListRefusal {
    /// The bytes are not a device list (layout, order, device 1 missing, length).
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
/// wire) and the signature over them.
pub fn sign_device_list(identity: &SigningKey, list: &DeviceList) -> (Vec<u8>, [u8; 64]) {
    let bytes = list.encode();
    let signature = identity.sign(&bytes).to_bytes();
    (bytes, signature)
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
