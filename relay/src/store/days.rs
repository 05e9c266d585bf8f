//! Created and last-seen days of accounts and devices, and the versioned account
//! record that carries them on disk.
//!
//! Days (since the Unix epoch, UTC), not instants, on purpose: the export reports
//! them (P8) and a day is all a user needs to recognise a device, while finer times
//! would record when each device goes online.
//!
//! Record formats (a sled value under the account id):
//! - first: identity key (32), then per device id (4, big-endian) and key (32):
//!   32 + 36n bytes, always even;
//! - [`ACCOUNT_V2`]: the version byte, identity key (32), the account's created day
//!   (4), then per device id (4), key (32), created day (4), last-seen day (4):
//!   37 + 44n bytes, always odd. An unknown day is `u32::MAX`.
//!
//! The lengths never coincide, so a record is read by its length and the version
//! byte checked. A record in the first format is rewritten in the second at its next
//! change, with its days unknown.

use tern_proto::DeviceId;

use super::{AccountRecord, StoreError, StoreResult};

/// The version byte of the second account record format.
pub(crate) const ACCOUNT_V2: u8 = 2;

/// An unknown day on disk.
const UNKNOWN: u32 = u32::MAX;

/// A device's days; `None` where unknown (records from before days were kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceDays {
    /// The UTC day the device was registered or added.
    pub created: Option<u32>,
    /// The last UTC day the device authenticated (or was created).
    pub last_seen: Option<u32>,
}

impl DeviceDays {
    /// A device created on `day` (and seen then).
    pub fn new_on(day: Option<u32>) -> Self {
        DeviceDays {
            created: day,
            last_seen: day,
        }
    }

    /// Moves `last_seen` on to `day`; whether that changed anything.
    pub fn touch(&mut self, day: u32) -> bool {
        if self.last_seen.is_some_and(|seen| seen >= day) {
            return false;
        }
        self.last_seen = Some(day);
        true
    }
}

/// An account's days.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountDays {
    /// The UTC day the account was registered.
    pub created: Option<u32>,
    /// Each device's days, in the record's device order.
    pub devices: Vec<(DeviceId, DeviceDays)>,
}

impl AccountDays {
    /// The days of `device`, unknown if it has none.
    pub fn of(&self, device: DeviceId) -> DeviceDays {
        self.devices
            .iter()
            .find(|(id, _)| *id == device)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    }

    /// Unknown days for every device of `rec`.
    pub fn unknown(rec: &AccountRecord) -> Self {
        AccountDays {
            created: None,
            devices: rec
                .devices
                .iter()
                .map(|(id, _)| (*id, DeviceDays::default()))
                .collect(),
        }
    }
}

fn day_bytes(day: Option<u32>) -> [u8; 4] {
    day.unwrap_or(UNKNOWN).to_be_bytes()
}

fn day_of(bytes: &[u8]) -> StoreResult<Option<u32>> {
    let d = u32::from_be_bytes(super::codec::fixed(bytes)?);
    Ok((d != UNKNOWN).then_some(d))
}

/// Encodes `rec` with `days` in the second format (a device without days: unknown).
pub(crate) fn encode(rec: &AccountRecord, days: &AccountDays) -> Vec<u8> {
    let mut out = Vec::with_capacity(37 + rec.devices.len() * 44);
    out.push(ACCOUNT_V2);
    out.extend_from_slice(&rec.identity_key);
    out.extend_from_slice(&day_bytes(days.created));
    for (id, key) in &rec.devices {
        let d = days.of(*id);
        out.extend_from_slice(&id.get().to_be_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&day_bytes(d.created));
        out.extend_from_slice(&day_bytes(d.last_seen));
    }
    out
}

fn device_id(bytes: &[u8]) -> StoreResult<DeviceId> {
    DeviceId::new(u32::from_be_bytes(super::codec::fixed(bytes)?))
        .ok_or(StoreError::Corrupt("account"))
}

/// Decodes a record of either format.
pub(crate) fn decode(bytes: &[u8]) -> StoreResult<(AccountRecord, AccountDays)> {
    let corrupt = || StoreError::Corrupt("account");
    if bytes.len() % 2 == 0 {
        let (identity, rest) = bytes.split_first_chunk::<32>().ok_or_else(corrupt)?;
        if rest.len() % 36 != 0 {
            return Err(corrupt());
        }
        let devices = rest
            .chunks_exact(36)
            .map(|c| Ok((device_id(&c[..4])?, super::codec::fixed(&c[4..])?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let rec = AccountRecord {
            identity_key: *identity,
            devices,
        };
        let days = AccountDays::unknown(&rec);
        return Ok((rec, days));
    }
    let (version, rest) = bytes.split_first().ok_or_else(corrupt)?;
    if *version != ACCOUNT_V2 || rest.len() < 36 || (rest.len() - 36) % 44 != 0 {
        return Err(corrupt());
    }
    let (head, rest) = rest.split_at(36);
    let mut rec = AccountRecord {
        identity_key: super::codec::fixed(&head[..32])?,
        devices: Vec::with_capacity(rest.len() / 44),
    };
    let mut days = AccountDays {
        created: day_of(&head[32..])?,
        devices: Vec::with_capacity(rest.len() / 44),
    };
    for c in rest.chunks_exact(44) {
        let id = device_id(&c[..4])?;
        rec.devices.push((id, super::codec::fixed(&c[4..36])?));
        let d = DeviceDays {
            created: day_of(&c[36..40])?,
            last_seen: day_of(&c[40..])?,
        };
        days.devices.push((id, d));
    }
    Ok((rec, days))
}
