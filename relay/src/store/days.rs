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
//!   37 + 44n bytes, always odd. An unknown day is `u32::MAX`;
//! - [`ACCOUNT_V3`]: as the second, with the highest device id the account ever had
//!   (4) after the created day: 41 + 44n bytes, also odd. Device ids are never
//!   handed out twice, so a removed device's id stays used.
//!
//! An even length is the first format; an odd one is read by its version byte, and
//! its length must then be the version's (37 and 41 differ by 4, never a multiple of
//! 44, so no length fits both). Every change writes the third format; a record read
//! in an older one takes its highest listed id as the highest ever (all it can know).

use tern_proto::DeviceId;

use super::{AccountRecord, StoreError, StoreResult};

/// The version byte of the second account record format.
pub(crate) const ACCOUNT_V2: u8 = 2;

/// The version byte of the third account record format (with the highest device id).
pub(crate) const ACCOUNT_V3: u8 = 3;

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

/// The highest device id of `rec`, or `last` (the stored highest ever) if higher.
pub(crate) fn last_device(rec: &AccountRecord, last: Option<u32>) -> u32 {
    rec.devices
        .iter()
        .map(|(id, _)| id.get())
        .chain(last)
        .max()
        .unwrap_or(0)
}

/// The id for a device added to `rec`: one past every id it ever had (`last`, the
/// stored highest, if known), so a removed device's id is never handed out again.
pub(crate) fn next_device(rec: &AccountRecord, last: Option<u32>) -> StoreResult<DeviceId> {
    last_device(rec, last)
        .checked_add(1)
        .and_then(DeviceId::new)
        .ok_or(StoreError::Corrupt("device ids exhausted"))
}

/// Encodes `rec` with `days` in the third format, with no device ever above those
/// listed (a new account).
pub(crate) fn encode(rec: &AccountRecord, days: &AccountDays) -> Vec<u8> {
    encode_with(rec, days, None)
}

/// Encodes `rec` with `days` and the highest device id it ever had (`last`, raised to
/// its highest listed) in the third format; a device without days: unknown.
pub(crate) fn encode_with(rec: &AccountRecord, days: &AccountDays, last: Option<u32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(41 + rec.devices.len() * 44);
    out.push(ACCOUNT_V3);
    out.extend_from_slice(&rec.identity_key);
    out.extend_from_slice(&day_bytes(days.created));
    out.extend_from_slice(&last_device(rec, last).to_be_bytes());
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

/// Decodes a record of any format.
pub(crate) fn decode(bytes: &[u8]) -> StoreResult<(AccountRecord, AccountDays)> {
    decode_with(bytes).map(|(rec, days, _)| (rec, days))
}

/// Decodes a record of any format, with the highest device id it ever had.
pub(crate) fn decode_with(bytes: &[u8]) -> StoreResult<(AccountRecord, AccountDays, u32)> {
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
        let last = last_device(&rec, None);
        return Ok((rec, days, last));
    }
    let (version, rest) = bytes.split_first().ok_or_else(corrupt)?;
    let head_len = match *version {
        ACCOUNT_V2 => 36,
        ACCOUNT_V3 => 40,
        _ => return Err(corrupt()),
    };
    if rest.len() < head_len || (rest.len() - head_len) % 44 != 0 {
        return Err(corrupt());
    }
    let (head, rest) = rest.split_at(head_len);
    let mut rec = AccountRecord {
        identity_key: super::codec::fixed(&head[..32])?,
        devices: Vec::with_capacity(rest.len() / 44),
    };
    let mut days = AccountDays {
        created: day_of(&head[32..36])?,
        devices: Vec::with_capacity(rest.len() / 44),
    };
    let stored = match head.get(36..40) {
        Some(b) => Some(u32::from_be_bytes(super::codec::fixed(b)?)),
        None => None,
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
    let last = last_device(&rec, stored);
    Ok((rec, days, last))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    #[test]
    fn no_length_fits_two_formats() {
        // First: 32 + 36n (even); second: 37 + 44n; third: 41 + 44n (both odd).
        for n in 0..2_000usize {
            assert_eq!((32 + 36 * n) % 2, 0);
            assert_eq!((37 + 44 * n) % 2, 1);
            for m in 0..2_000usize {
                assert_ne!(37 + 44 * n, 41 + 44 * m);
            }
        }
    }

    #[test]
    fn the_third_format_keeps_an_id_above_the_listed_ones() {
        let rec = AccountRecord {
            identity_key: [1; 32],
            devices: vec![
                (DeviceId::PRIMARY, [2; 32]),
                (DeviceId::new(4).expect("id"), [3; 32]),
            ],
        };
        let days = AccountDays {
            created: Some(5),
            devices: vec![(DeviceId::PRIMARY, DeviceDays::new_on(Some(5)))],
        };
        let bytes = encode_with(&rec, &days, Some(9));
        assert_eq!((bytes[0], bytes.len()), (ACCOUNT_V3, 41 + 44 * 2));
        let (back, back_days, last) = decode_with(&bytes).expect("decode");
        assert_eq!((back, last), (rec.clone(), 9));
        assert_eq!(back_days.of(DeviceId::PRIMARY), DeviceDays::new_on(Some(5)));
        assert_eq!(
            back_days.of(DeviceId::new(4).expect("id")),
            DeviceDays::default()
        );
        // A mark below the listed ids is raised to them; the next id is above both.
        let (_, _, last) = decode_with(&encode_with(&rec, &days, Some(2))).expect("decode");
        assert_eq!(last, 4);
        assert_eq!(next_device(&rec, Some(9)).expect("next").get(), 10);
        assert_eq!(next_device(&rec, None).expect("next").get(), 5);
        assert!(next_device(&rec, Some(u32::MAX)).is_err(), "exhausted");
        // Truncated or unknown versions are corrupt.
        assert!(decode_with(&bytes[..bytes.len() - 2]).is_err());
        let mut v9 = bytes.clone();
        v9[0] = 9;
        assert!(decode_with(&v9).is_err());
    }
}
