//! Encoding shared by the backends that store records as bytes.

use super::{AccountRecord, DeviceAddress, DeviceId, SignedKey, StoreError, StoreResult};

/// Bytes of an encoded [`DeviceAddress`].
pub(crate) const ADDR_LEN: usize = 20;

/// Account id, then device id (big-endian): sorts by account, then device.
pub(crate) fn addr_bytes(a: &DeviceAddress) -> [u8; ADDR_LEN] {
    let mut out = [0u8; ADDR_LEN];
    out[..16].copy_from_slice(a.account.as_bytes());
    out[16..].copy_from_slice(&a.device.get().to_be_bytes());
    out
}

pub(crate) fn parse_addr(bytes: &[u8]) -> StoreResult<DeviceAddress> {
    if bytes.len() != ADDR_LEN {
        return Err(StoreError::Corrupt("address"));
    }
    DeviceAddress::from_wire(&bytes[..16], u32::from_be_bytes(fixed(&bytes[16..])?))
        .map_err(|_| StoreError::Corrupt("address"))
}

/// `bytes` as a fixed-size field; a record with another length is corrupt.
pub(crate) fn fixed<const N: usize>(bytes: &[u8]) -> StoreResult<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("field length"))
}

#[cfg(test)]
pub(crate) use super::days::ACCOUNT_V3;

pub(crate) fn encode_account(rec: &AccountRecord, days: &super::AccountDays) -> Vec<u8> {
    super::days::encode(rec, days)
}

pub(crate) fn decode_account(bytes: &[u8]) -> StoreResult<AccountRecord> {
    super::days::decode(bytes).map(|(rec, _)| rec)
}

pub(crate) fn encode_signed(k: &SignedKey) -> [u8; 100] {
    let mut out = [0u8; 100];
    out[..4].copy_from_slice(&k.id.to_be_bytes());
    out[4..36].copy_from_slice(&k.key);
    out[36..].copy_from_slice(&k.signature);
    out
}

pub(crate) fn decode_signed(v: &[u8]) -> StoreResult<SignedKey> {
    let bad = || StoreError::Corrupt("signed key");
    if v.len() != 100 {
        return Err(bad());
    }
    Ok(SignedKey {
        id: u32::from_be_bytes(v[..4].try_into().map_err(|_| bad())?),
        key: v[4..36].try_into().map_err(|_| bad())?,
        signature: v[36..].try_into().map_err(|_| bad())?,
    })
}

pub(crate) fn encode_devices(devices: &[DeviceId]) -> Vec<u8> {
    devices.iter().flat_map(|d| d.get().to_be_bytes()).collect()
}

pub(crate) fn decode_devices(v: &[u8]) -> StoreResult<Vec<DeviceId>> {
    if v.len() % 4 != 0 {
        return Err(StoreError::Corrupt("deletion intent"));
    }
    v.chunks_exact(4)
        .map(|c| {
            DeviceId::new(u32::from_be_bytes(fixed(c)?))
                .ok_or(StoreError::Corrupt("deletion intent"))
        })
        .collect()
}
