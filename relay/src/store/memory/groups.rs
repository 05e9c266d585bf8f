//! Key packages and group epochs in memory, apart from the rest of the store: no
//! call touches both.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress};

use super::MemoryStore;
use crate::store::{
    FetchedPackage, GroupState, GroupStore, HandleBytes, KeyPackageCounts, KeyPackageStore,
    StoreError, StoreResult,
};

/// Key packages per device, and group handles.
#[derive(Debug, Default)]
pub(in crate::store) struct MemGroups {
    packages: HashMap<DeviceAddress, Pool>,
    groups: BTreeMap<HandleBytes, GroupState>,
}

#[derive(Debug, Default)]
struct Pool {
    /// The id the next one-time package gets: the oldest is taken first.
    next: u64,
    one_time: BTreeMap<u64, Bytes>,
    last_resort: Option<Bytes>,
}

impl MemoryStore {
    fn groups(&self) -> std::sync::MutexGuard<'_, MemGroups> {
        // Every method finishes its updates before it can fail.
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KeyPackageStore for MemoryStore {
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> StoreResult<u64> {
        let mut g = self.groups();
        let pool = g.packages.entry(*of).or_default();
        if replace {
            pool.one_time.clear();
        }
        for p in one_time {
            pool.one_time.insert(pool.next, p.clone());
            pool.next += 1;
        }
        if let Some(p) = last_resort {
            pool.last_resort = Some(p.clone());
        }
        Ok(pool.one_time.len() as u64)
    }

    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<FetchedPackage>> {
        let mut g = self.groups();
        let Some(pool) = g.packages.get_mut(of) else {
            return Ok(None);
        };
        if let Some((_, p)) = one_time.then(|| pool.one_time.pop_first()).flatten() {
            return Ok(Some(FetchedPackage {
                key_package: p,
                last_resort: false,
            }));
        }
        Ok(pool.last_resort.clone().map(|p| FetchedPackage {
            key_package: p,
            last_resort: true,
        }))
    }

    fn key_package_counts(&self, of: &DeviceAddress) -> StoreResult<KeyPackageCounts> {
        Ok(self
            .groups()
            .packages
            .get(of)
            .map_or_else(KeyPackageCounts::default, |p| KeyPackageCounts {
                one_time: p.one_time.len() as u64,
                last_resort: p.last_resort.is_some(),
            }))
    }

    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.groups().packages.remove(of);
        Ok(())
    }

    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()> {
        self.groups().packages.retain(|a, _| a.account != *account);
        Ok(())
    }
}

impl GroupStore for MemoryStore {
    fn insert_group(&self, handle: &HandleBytes, state: &GroupState) -> StoreResult<()> {
        let mut g = self.groups();
        if g.groups.contains_key(handle) {
            return Err(StoreError::Exists);
        }
        g.groups.insert(*handle, *state);
        Ok(())
    }

    fn group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupState>> {
        Ok(self.groups().groups.get(handle).copied())
    }

    fn advance_group(
        &self,
        handle: &HandleBytes,
        from: &GroupState,
        to: &GroupState,
    ) -> StoreResult<bool> {
        let mut g = self.groups();
        match g.groups.get_mut(handle) {
            Some(s) if s == from => {
                *s = *to;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64> {
        let mut g = self.groups();
        let idle: Vec<HandleBytes> = g
            .groups
            .iter()
            .filter(|(_, s)| s.touched_day < before_day)
            .map(|(h, _)| *h)
            .take(max)
            .collect();
        for h in &idle {
            g.groups.remove(h);
        }
        Ok(idle.len() as u64)
    }

    fn count_groups(&self) -> StoreResult<u64> {
        Ok(self.groups().groups.len() as u64)
    }

    fn groups_after(
        &self,
        after: Option<&HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(HandleBytes, GroupState)>> {
        let g = self.groups();
        let range = match after {
            Some(a) => g
                .groups
                .range((std::ops::Bound::Excluded(*a), std::ops::Bound::Unbounded)),
            None => g.groups.range::<HandleBytes, _>(..),
        };
        Ok(range.take(max).map(|(h, s)| (*h, *s)).collect())
    }
}
