//! sled's signed device lists, device removals and the idle-device scan.
//!
//! A list is stored as version (8, big-endian), signature (64), then the list's bytes.
//! sled keeps no index by last-seen day, so the idle scan walks the account records
//! from a cursor kept in memory, at most [`IDLE_SCAN`] records per call, and goes on
//! where the last call stopped (from the start again past the end): a full pass costs
//! one read of every account record, spread over the sweeps.

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::super::{backend, fixed, SledStore};
use crate::store::{codec, days, StoreError, StoreResult, StoredList};

/// Account records the idle scan reads per call at most.
pub(crate) const IDLE_SCAN: usize = 10_000;

const HEAD: usize = 8 + 64;

fn encode(list: &StoredList) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + list.list.len());
    out.extend_from_slice(&list.version.to_be_bytes());
    out.extend_from_slice(&list.signature);
    out.extend_from_slice(&list.list);
    out
}

fn decode(v: &[u8]) -> StoreResult<StoredList> {
    if v.len() < HEAD {
        return Err(StoreError::Corrupt("device list"));
    }
    Ok(StoredList {
        version: u64::from_be_bytes(fixed(&v[..8])?),
        signature: fixed(&v[8..HEAD])?,
        list: v[HEAD..].to_vec(),
    })
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Storage(e) => backend(e),
        TransactionError::Abort(e) => e,
    }
}

impl SledStore {
    pub(super) fn stored_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>> {
        self.device_lists
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Stores `list` if the account exists and its stored list is older, in one
    /// transaction with the account's record (which `remove_account` deletes with
    /// the list, in one transaction too): no list outlives its account.
    pub(super) fn put_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool> {
        let bytes = encode(list);
        (&self.accounts, &self.device_lists)
            .transaction(|(accounts, lists)| {
                if accounts.get(id.as_bytes())?.is_none() {
                    return Ok(false);
                }
                let stored = match lists.get(id.as_bytes())? {
                    Some(v) => {
                        decode(&v)
                            .map_err(ConflictableTransactionError::Abort)?
                            .version
                    }
                    None => 0,
                };
                if list.version <= stored {
                    return Ok(false);
                }
                lists.insert(id.as_bytes(), bytes.as_slice())?;
                Ok(true)
            })
            .map_err(tx_error)
    }

    pub(super) fn removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        let mut out = Vec::new();
        let mut skipped = 0u64;
        for kv in self.device_removals.iter() {
            let (k, _) = kv.map_err(backend)?;
            match codec::parse_addr(&k) {
                Ok(a) => out.push(a),
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(skipped, "unreadable device removals (store corruption)");
        }
        Ok(out)
    }

    /// The highest device id the account ever had (`None` without the account): what
    /// a copy to another store must carry so that no id is handed out twice.
    pub fn last_device(&self, id: &AccountId) -> StoreResult<Option<u32>> {
        self.accounts
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| days::decode_with(&v).map(|(_, _, last)| last))
            .transpose()
    }

    /// Up to `max` devices other than the primary last seen before `before`, from
    /// at most `budget` account records after the cursor (one lap at most). An
    /// account is taken whole or not at all, so a call that stops short goes on from
    /// it next time; unless it alone has more than `max`: its first `max` then, and
    /// the cursor stays (those are removed before the next call).
    pub(super) fn idle_scan(
        &self,
        before: u32,
        max: usize,
        budget: usize,
    ) -> StoreResult<Vec<DeviceAddress>> {
        let mut cursor = self.idle_cursor.lock().unwrap_or_else(|e| e.into_inner());
        let start = cursor.clone();
        let tail = match &start {
            Some(k) => self.accounts.range::<&[u8], _>((
                std::ops::Bound::Excluded(&k[..]),
                std::ops::Bound::Unbounded,
            )),
            None => self.accounts.iter(),
        };
        let head = start.as_ref().map(|k| self.accounts.range(..=&k[..]));
        let mut out = Vec::new();
        let mut corrupt = 0u64;
        for kv in tail.chain(head.into_iter().flatten()).take(budget) {
            if out.len() >= max {
                break;
            }
            let (k, v) = kv.map_err(backend)?;
            let (Ok(account), Ok((_, days))) = (fixed::<16>(&k), days::decode(&v)) else {
                corrupt += 1;
                *cursor = Some(k);
                continue;
            };
            let idle: Vec<DeviceAddress> = days
                .devices
                .iter()
                .filter(|(d, day)| {
                    *d != DeviceId::PRIMARY && day.last_seen.is_some_and(|s| s < before)
                })
                .map(|(d, _)| DeviceAddress {
                    account: AccountId(account),
                    device: *d,
                })
                .collect();
            if out.len() + idle.len() > max {
                if out.is_empty() {
                    out.extend(idle.into_iter().take(max));
                }
                break;
            }
            out.extend(idle);
            *cursor = Some(k);
        }
        if corrupt > 0 {
            tracing::warn!(
                corrupt,
                "unreadable account records skipped by the idle scan"
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;
    use crate::store::{AccountRecord, AccountStore};

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open(&dir.join("db"), 1 << 20).expect("sled")
    }

    fn at(a: u8, d: u32) -> DeviceAddress {
        DeviceAddress::from_wire(&[a; 16], d).expect("address")
    }

    fn account(store: &SledStore, a: u8, devices: u8, day: u32) {
        let rec = AccountRecord {
            identity_key: [a; 32],
            devices: vec![(DeviceId::PRIMARY, [a; 32])],
        };
        store
            .create_on(&AccountId([a; 16]), &rec, Some(day))
            .expect("create");
        for k in 0..devices {
            store
                .add_device(&AccountId([a; 16]), &[k + 100; 32], day)
                .expect("add")
                .expect("account");
        }
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().expect("dir");
        crate::store::conformance::device_rules(&open(dir.path()));
    }

    #[test]
    fn the_highest_id_survives_a_reopen_and_an_old_record() {
        let dir = tempfile::tempdir().expect("dir");
        let id = AccountId([1; 16]);
        {
            let store = open(dir.path());
            account(&store, 1, 2, 10);
            assert!(store.remove_device_record(&at(1, 3)).expect("remove"));
            assert_eq!(store.last_device(&id).expect("mark"), Some(3));
            // The third format: version 3, 41 + 44n bytes.
            let raw = store
                .accounts
                .get(id.as_bytes())
                .expect("get")
                .expect("raw");
            assert_eq!((raw[0], raw.len()), (days::ACCOUNT_V3, 41 + 44 * 2));
        }
        let store = open(dir.path());
        assert_eq!(
            store.add_device(&id, &[9; 32], 11).expect("add"),
            DeviceId::new(4)
        );
        // A second-format record (no mark) takes its highest listed id as the mark,
        // and keeps it once rewritten.
        let mut old = vec![days::ACCOUNT_V2];
        old.extend_from_slice(&[2; 32]);
        old.extend_from_slice(&5u32.to_be_bytes());
        for d in [1u32, 2, 3] {
            old.extend_from_slice(&d.to_be_bytes());
            old.extend_from_slice(&[d as u8; 32]);
            old.extend_from_slice(&5u32.to_be_bytes());
            old.extend_from_slice(&5u32.to_be_bytes());
        }
        let two = AccountId([2; 16]);
        store.accounts.insert(two.as_bytes(), old).expect("insert");
        assert_eq!(store.last_device(&two).expect("mark"), Some(3));
        assert!(store.remove_device_record(&at(2, 3)).expect("remove"));
        assert_eq!(
            store.add_device(&two, &[8; 32], 6).expect("add"),
            DeviceId::new(4)
        );
        // A version byte with the other version's length is corrupt, not misread.
        let mut wrong = store
            .accounts
            .get(two.as_bytes())
            .expect("get")
            .expect("raw")
            .to_vec();
        wrong[0] = days::ACCOUNT_V2;
        store
            .accounts
            .insert(two.as_bytes(), wrong)
            .expect("insert");
        assert!(matches!(store.get(&two), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn the_idle_scan_reads_a_bounded_number_of_records_and_goes_on_from_there() {
        let dir = tempfile::tempdir().expect("dir");
        let store = open(dir.path());
        for a in 1..=5 {
            account(&store, a, 1, 10);
        }
        let scan = |max| {
            let mut v = store.idle_scan(20, max, 2).expect("scan");
            v.sort_by_key(codec::addr_bytes);
            v
        };
        // Two records per call; one lap finds every idle device.
        assert_eq!(scan(100), vec![at(1, 2), at(2, 2)]);
        assert_eq!(scan(100), vec![at(3, 2), at(4, 2)]);
        assert_eq!(
            scan(100),
            vec![at(1, 2), at(5, 2)],
            "past the end, on from the start"
        );
        // An account with more idle devices than `max`: its first ones, the cursor
        // stays on it until they are gone.
        account(&store, 6, 3, 10);
        for a in 1..=5 {
            assert!(store.remove_device_record(&at(a, 2)).expect("remove"));
        }
        let mut found = Vec::new();
        for _ in 0..6 {
            for a in scan(2) {
                assert!(store.remove_device_record(&a).expect("remove"));
                found.push(a);
            }
        }
        found.sort_by_key(codec::addr_bytes);
        assert_eq!(found, vec![at(6, 2), at(6, 3), at(6, 4)]);
        // A record that does not decode is skipped, not a panic.
        store
            .accounts
            .insert([7u8; 16], vec![9u8; 33])
            .expect("insert");
        account(&store, 8, 1, 10);
        let mut all = Vec::new();
        for _ in 0..5 {
            all.extend(scan(100));
        }
        assert!(all.contains(&at(8, 2)));
    }
}
