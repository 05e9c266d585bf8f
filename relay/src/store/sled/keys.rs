//! MLS key packages in sled, in their own `key_packages` tree:
//!
//! | key | value |
//! |---|---|
//! | `P` account device id | a one-time key package (ids from sled's id generator, so the oldest sorts first) |
//! | `L` account device | the device's last-resort key package |

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress};

use super::{backend, tagged, SledStore};
use std::collections::BTreeMap;

use crate::store::codec::{addr_bytes, parse_addr, ADDR_LEN};
use crate::store::{FetchedPackage, KeyPackageCounts, KeyPackageStore, StoreResult};

const POOL: u8 = b'P';
const LAST_RESORT: u8 = b'L';

/// Removals a take tries before it gives up on the pool: each failed one means a
/// concurrent fetcher took that package, so a pool of at most 200 ends well before.
const TAKE_ATTEMPTS: usize = 1024;

impl SledStore {
    fn pool_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        let mut n = 0;
        for kv in self.key_packages.scan_prefix(tagged(POOL, of)) {
            kv.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every device with key packages, and what it holds (admin migrate): the pool
    /// oldest first, and the last-resort package.
    pub fn dump_key_packages(&self) -> StoreResult<Vec<DumpedPackages>> {
        let mut by_device: BTreeMap<[u8; ADDR_LEN], DumpedPackages> = BTreeMap::new();
        for tag in [POOL, LAST_RESORT] {
            for kv in self.key_packages.scan_prefix([tag]) {
                let (k, v) = kv.map_err(backend)?;
                let addr = parse_addr(k.get(1..1 + ADDR_LEN).unwrap_or_default())?;
                let entry = by_device
                    .entry(addr_bytes(&addr))
                    .or_insert_with(|| DumpedPackages {
                        device: addr,
                        one_time: Vec::new(),
                        last_resort: None,
                    });
                let v = Bytes::copy_from_slice(&v);
                if tag == POOL {
                    entry.one_time.push(v);
                } else {
                    entry.last_resort = Some(v);
                }
            }
        }
        Ok(by_device.into_values().collect())
    }
}

/// A device's key packages as `admin migrate` copies them.
#[derive(Debug, Clone)]
pub struct DumpedPackages {
    /// The device.
    pub device: DeviceAddress,
    /// Its one-time packages, oldest first.
    pub one_time: Vec<Bytes>,
    /// Its last-resort package.
    pub last_resort: Option<Bytes>,
}

impl KeyPackageStore for SledStore {
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> StoreResult<u64> {
        let mut batch = sled::Batch::default();
        if replace {
            for kv in self.key_packages.scan_prefix(tagged(POOL, of)) {
                let (k, _) = kv.map_err(backend)?;
                batch.remove(k);
            }
        }
        for p in one_time {
            let mut key = tagged(POOL, of).to_vec();
            key.extend_from_slice(&self.db.generate_id().map_err(backend)?.to_be_bytes());
            batch.insert(key, &p[..]);
        }
        if let Some(p) = last_resort {
            batch.insert(&tagged(LAST_RESORT, of)[..], &p[..]);
        }
        self.key_packages.apply_batch(batch).map_err(backend)?;
        self.pool_count(of)
    }

    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<FetchedPackage>> {
        // The oldest package; `remove` is atomic, so of two concurrent fetchers only
        // one gets it and the other moves on to the next.
        for _ in 0..TAKE_ATTEMPTS {
            if !one_time {
                break;
            }
            let Some(kv) = self.key_packages.scan_prefix(tagged(POOL, of)).next() else {
                break;
            };
            let (k, _) = kv.map_err(backend)?;
            if let Some(v) = self.key_packages.remove(&k).map_err(backend)? {
                return Ok(Some(FetchedPackage {
                    key_package: Bytes::copy_from_slice(&v),
                    last_resort: false,
                }));
            }
        }
        let last = self
            .key_packages
            .get(tagged(LAST_RESORT, of))
            .map_err(backend)?;
        Ok(last.map(|v| FetchedPackage {
            key_package: Bytes::copy_from_slice(&v),
            last_resort: true,
        }))
    }

    fn key_package_counts(&self, of: &DeviceAddress) -> StoreResult<KeyPackageCounts> {
        Ok(KeyPackageCounts {
            one_time: self.pool_count(of)?,
            last_resort: self
                .key_packages
                .contains_key(tagged(LAST_RESORT, of))
                .map_err(backend)?,
        })
    }

    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        batch.remove(&tagged(LAST_RESORT, of)[..]);
        for kv in self.key_packages.scan_prefix(tagged(POOL, of)) {
            let (k, _) = kv.map_err(backend)?;
            batch.remove(k);
        }
        self.key_packages.apply_batch(batch).map_err(backend)
    }

    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()> {
        // Every key is a tag, then the device address, which starts with the account.
        let mut batch = sled::Batch::default();
        for tag in [POOL, LAST_RESORT] {
            let mut prefix = [0u8; 17];
            prefix[0] = tag;
            prefix[1..].copy_from_slice(account.as_bytes());
            for kv in self.key_packages.scan_prefix(prefix) {
                let (k, _) = kv.map_err(backend)?;
                batch.remove(k);
            }
        }
        self.key_packages.apply_batch(batch).map_err(backend)
    }
}
