//! An account's device list: the exact bytes its identity key signs.
//!
//! ```text
//! "tern device list v1\0" || account (16) || version (u64 BE) || n (u8)
//!   || n × (device id (u32 BE) || device key (32, Ed25519) || identity_dh (32, X25519))
//! ```
//! Entries are in strictly ascending id order and always include device 1 (the
//! primary), so one list has one encoding and a signature covers no ambiguity. This
//! module checks only the form; whoever holds the identity key checks the signature
//! (the relay on publish, senders before they encrypt to a device).

use crate::auth::DEVICE_LIST_CONTEXT;
use crate::ids::{AccountId, DeviceId};
use crate::limits::{ACCOUNT_ID_LEN, AGREEMENT_KEY_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// Most devices one list names: far above any relay's device cap, and what keeps a
/// list under 5 KiB.
pub const MAX_LISTED_DEVICES: usize = 64;

const HEADER_LEN: usize = DEVICE_LIST_CONTEXT.len() + ACCOUNT_ID_LEN + 8 + 1;
const ENTRY_LEN: usize = 4 + PUBLIC_KEY_LEN + AGREEMENT_KEY_LEN;

/// Largest encoded list.
pub const MAX_DEVICE_LIST_LEN: usize = HEADER_LEN + MAX_LISTED_DEVICES * ENTRY_LEN;

/// One device of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device's id on the relay.
    pub id: DeviceId,
    /// Its Ed25519 key: authenticates its connections and, on a linked device, signs
    /// its signed prekeys.
    pub device_key: [u8; PUBLIC_KEY_LEN],
    /// Its X25519 identity agreement key: what senders seal to and run X3DH with.
    pub identity_dh: [u8; AGREEMENT_KEY_LEN],
}

/// A device list as its identity signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    /// The account.
    pub account: AccountId,
    /// Grows with every change; senders refuse a list older than one they have seen.
    pub version: u64,
    /// The devices, ascending by id, device 1 first.
    pub entries: Vec<DeviceEntry>,
}

/// Why bytes are not a device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceListError {
    /// Not a version-1 device list (another context string, or too short for one).
    #[error("not a device list")]
    NotAList,
    /// The length does not match the entry count.
    #[error("device list length does not match its {0} entries")]
    Length(usize),
    /// No entries, or more than [`MAX_LISTED_DEVICES`].
    #[error("a device list names 1 to {MAX_LISTED_DEVICES} devices, not {0}")]
    Count(usize),
    /// An id of 0, ids out of order or repeated.
    #[error("device ids must be ascending and non-zero")]
    Order,
    /// Device 1, the primary, is missing.
    #[error("a device list must name device 1")]
    NoPrimary,
    /// A version above 2^63 − 1 (what every store, PostgreSQL's `bigint` too, keeps).
    #[error("a device list version must be below 2^63")]
    Version,
    /// A signature that is not 64 bytes.
    #[error("a device list signature is {SIGNATURE_LEN} bytes")]
    Signature,
}

impl DeviceList {
    /// The entry of device `id`.
    pub fn entry(&self, id: DeviceId) -> Option<&DeviceEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Checks the entries' form: 1 to [`MAX_LISTED_DEVICES`], ascending ids,
    /// device 1 among them.
    pub fn check(&self) -> Result<(), DeviceListError> {
        if i64::try_from(self.version).is_err() {
            return Err(DeviceListError::Version);
        }
        let n = self.entries.len();
        if n == 0 || n > MAX_LISTED_DEVICES {
            return Err(DeviceListError::Count(n));
        }
        if !self.entries.windows(2).all(|w| w[0].id < w[1].id) {
            return Err(DeviceListError::Order);
        }
        if self.entries[0].id != DeviceId::PRIMARY {
            return Err(DeviceListError::NoPrimary);
        }
        Ok(())
    }

    /// The bytes the identity signs. The entries must pass [`DeviceList::check`].
    pub fn encode(&self) -> Result<Vec<u8>, DeviceListError> {
        self.check()?;
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(DEVICE_LIST_CONTEXT);
        out.extend_from_slice(self.account.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        // check() bounds the count by MAX_LISTED_DEVICES (64).
        out.push(self.entries.len() as u8);
        for e in &self.entries {
            out.extend_from_slice(&e.id.get().to_be_bytes());
            out.extend_from_slice(&e.device_key);
            out.extend_from_slice(&e.identity_dh);
        }
        Ok(out)
    }

    /// Reads signed bytes back; exactly what [`DeviceList::encode`] writes.
    pub fn parse(bytes: &[u8]) -> Result<DeviceList, DeviceListError> {
        let rest = bytes
            .strip_prefix(DEVICE_LIST_CONTEXT)
            .filter(|r| r.len() >= HEADER_LEN - DEVICE_LIST_CONTEXT.len())
            .ok_or(DeviceListError::NotAList)?;
        let (account, rest) = rest.split_at(ACCOUNT_ID_LEN);
        let (version, rest) = rest.split_at(8);
        let (count, rest) = rest.split_at(1);
        let n = usize::from(count[0]);
        if rest.len() != n * ENTRY_LEN {
            return Err(DeviceListError::Length(n));
        }
        let mut entries = Vec::with_capacity(n);
        for chunk in rest.chunks_exact(ENTRY_LEN) {
            let (id, keys) = chunk.split_at(4);
            let (device_key, identity_dh) = keys.split_at(PUBLIC_KEY_LEN);
            let id = u32::from_be_bytes(id.try_into().map_err(|_| DeviceListError::NotAList)?);
            entries.push(DeviceEntry {
                id: DeviceId::new(id).ok_or(DeviceListError::Order)?,
                device_key: device_key
                    .try_into()
                    .map_err(|_| DeviceListError::NotAList)?,
                identity_dh: identity_dh
                    .try_into()
                    .map_err(|_| DeviceListError::NotAList)?,
            });
        }
        let list = DeviceList {
            account: AccountId(account.try_into().map_err(|_| DeviceListError::NotAList)?),
            version: u64::from_be_bytes(version.try_into().map_err(|_| DeviceListError::NotAList)?),
            entries,
        };
        list.check()?;
        Ok(list)
    }
}

/// A device list as it travels: the signed bytes, their parsed form and the
/// identity's signature (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDeviceList {
    /// The parsed list.
    pub list: DeviceList,
    /// The exact bytes signed.
    pub bytes: bytes::Bytes,
    /// The identity's Ed25519 signature over `bytes`.
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignedDeviceList {
    /// The wire's two fields: the signed bytes and the signature.
    pub fn into_wire(self) -> (bytes::Bytes, bytes::Bytes) {
        (self.bytes, bytes::Bytes::copy_from_slice(&self.signature))
    }

    /// Parses signed bytes and a signature of the right length.
    pub fn parse(bytes: bytes::Bytes, signature: &[u8]) -> Result<Self, DeviceListError> {
        let signature = signature
            .try_into()
            .map_err(|_| DeviceListError::Signature)?;
        Ok(SignedDeviceList {
            list: DeviceList::parse(&bytes)?,
            bytes,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32, fill: u8) -> DeviceEntry {
        DeviceEntry {
            id: DeviceId::new(id).expect("not 0"),
            device_key: [fill; 32],
            identity_dh: [fill + 1; 32],
        }
    }

    fn list(ids: &[u32]) -> DeviceList {
        DeviceList {
            account: AccountId([7; 16]),
            version: 3,
            entries: ids.iter().map(|&i| entry(i, i as u8 * 2)).collect(),
        }
    }

    #[test]
    fn a_list_round_trips_through_its_signed_bytes() {
        let l = list(&[1, 2, 9]);
        let bytes = l.encode().expect("valid");
        assert!(bytes.starts_with(DEVICE_LIST_CONTEXT));
        assert_eq!(bytes.len(), HEADER_LEN + 3 * ENTRY_LEN);
        assert_eq!(DeviceList::parse(&bytes), Ok(l.clone()));
        assert_eq!(l.entry(DeviceId::new(9).expect("9")), Some(&l.entries[2]));
        assert_eq!(l.entry(DeviceId::new(3).expect("3")), None);
        let full: Vec<u32> = (1..=MAX_LISTED_DEVICES as u32).collect();
        let bytes = list(&full).encode().expect("64 devices");
        assert_eq!(bytes.len(), MAX_DEVICE_LIST_LEN);
    }

    #[test]
    fn malformed_lists_are_refused_with_their_reason() {
        assert_eq!(list(&[2, 1]).encode(), Err(DeviceListError::Order));
        assert_eq!(list(&[1, 1]).encode(), Err(DeviceListError::Order));
        assert_eq!(list(&[2, 3]).encode(), Err(DeviceListError::NoPrimary));
        assert_eq!(list(&[]).encode(), Err(DeviceListError::Count(0)));
        let mut huge = list(&[1]);
        huge.version = 1 << 63;
        assert_eq!(huge.encode(), Err(DeviceListError::Version));
        huge.version = (1 << 63) - 1;
        let bytes = huge.encode().expect("the largest version");
        assert_eq!(
            DeviceList::parse(&bytes).map(|l| l.version),
            Ok((1 << 63) - 1)
        );
        let mut over = bytes.clone();
        over[DEVICE_LIST_CONTEXT.len() + ACCOUNT_ID_LEN] = 0x80;
        assert_eq!(DeviceList::parse(&over), Err(DeviceListError::Version));
        let many: Vec<u32> = (1..=65).collect();
        assert_eq!(list(&many).encode(), Err(DeviceListError::Count(65)));

        let good = list(&[1, 2]).encode().expect("valid");
        assert_eq!(
            DeviceList::parse(&good[..good.len() - 1]),
            Err(DeviceListError::Length(2))
        );
        assert_eq!(
            DeviceList::parse(&[&good[..], &[0]].concat()),
            Err(DeviceListError::Length(2))
        );
        assert_eq!(
            DeviceList::parse(&good[..10]),
            Err(DeviceListError::NotAList)
        );
        let mut other = good.clone();
        other[0] ^= 1;
        assert_eq!(DeviceList::parse(&other), Err(DeviceListError::NotAList));
        // Device id 0 and a swapped order, written by hand.
        let mut zero = good.clone();
        zero[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(DeviceList::parse(&zero), Err(DeviceListError::Order));
        let mut swapped = good.clone();
        swapped[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(DeviceList::parse(&swapped), Err(DeviceListError::Order));
        let mut empty = good[..HEADER_LEN].to_vec();
        empty[HEADER_LEN - 1] = 0;
        assert_eq!(DeviceList::parse(&empty), Err(DeviceListError::Count(0)));
        assert_eq!(
            SignedDeviceList::parse(good.clone().into(), &[0; 63]),
            Err(DeviceListError::Signature)
        );
        assert!(SignedDeviceList::parse(good.into(), &[0; 64]).is_ok());
    }

    #[test]
    fn a_list_is_signed_apart_from_every_other_signed_value() {
        let bytes = list(&[1]).encode().expect("valid");
        let key = [1u8; 32];
        for other in [
            crate::auth::device_certificate(None, &key),
            crate::auth::identity_agreement_key(&key),
            crate::auth::signed_prekey(1, &key),
            crate::auth::sender_certificate(&key),
            crate::auth::account_deletion(&AccountId([7; 16]), &key),
        ] {
            assert_ne!(bytes[..20], other[..20]);
        }
    }
}
