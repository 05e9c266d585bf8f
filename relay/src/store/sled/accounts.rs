//! sled's account records (see `store/days.rs` for their formats), delivery token
//! hashes, deletion intents, device lists and device removals.

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::{backend, fixed, SledStore};
use crate::store::{
    codec, days, AccountDays, AccountRecord, AccountStore, DeviceDays, StoreError, StoreResult,
    StoredList,
};

mod lists;

impl SledStore {
    /// Read-modify-write of an account record by compare-and-swap, so concurrent
    /// changes to one account never lose each other. `change` returns `None` to
    /// write nothing; `None` too without the account.
    fn update<T>(
        &self,
        id: &AccountId,
        mut change: impl FnMut(&mut AccountRecord, &mut AccountDays, u32) -> StoreResult<Option<T>>,
    ) -> StoreResult<Option<T>> {
        // Each failed swap means another writer changed the record; that is bounded
        // by the writers, and every pass re-reads.
        loop {
            let Some(old) = self.accounts.get(id.as_bytes()).map_err(backend)? else {
                return Ok(None);
            };
            let (mut rec, mut days, last) = days::decode_with(&old)?;
            let Some(out) = change(&mut rec, &mut days, last)? else {
                return Ok(None);
            };
            // The highest id ever stays: a removed device's id is never handed out again.
            let new = days::encode_with(&rec, &days, Some(last));
            let swapped = self
                .accounts
                .compare_and_swap(id.as_bytes(), Some(old), Some(new))
                .map_err(backend)?;
            if swapped.is_ok() {
                return Ok(Some(out));
            }
        }
    }
}

impl AccountStore for SledStore {
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        day: Option<u32>,
    ) -> StoreResult<()> {
        let days = AccountDays {
            created: day,
            devices: record
                .devices
                .iter()
                .map(|(d, _)| (*d, DeviceDays::new_on(day)))
                .collect(),
        };
        self.accounts
            .compare_and_swap(
                id.as_bytes(),
                None::<&[u8]>,
                Some(codec::encode_account(record, &days)),
            )
            .map_err(backend)?
            .map_err(|_| StoreError::Exists)
    }

    fn days(&self, id: &AccountId) -> StoreResult<Option<AccountDays>> {
        self.accounts
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| days::decode(&v).map(|(_, d)| d))
            .transpose()
    }

    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        // Read first: on every day but the first, an authentication writes nothing.
        self.update(&of.account, |rec, days, _| {
            if rec.device_key(of.device).is_none() {
                return Ok(None);
            }
            let Some((_, d)) = days.devices.iter_mut().find(|(id, _)| *id == of.device) else {
                return Ok(None);
            };
            Ok(d.touch(day).then_some(true))
        })
        .map(|r| r.unwrap_or(false))
    }

    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        self.accounts
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| codec::decode_account(&v))
            .transpose()
    }

    fn add_device(
        &self,
        id: &AccountId,
        device_key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        let mut existing = None;
        let added = self.update(id, |rec, days, last| {
            if let Some((found, _)) = rec.devices.iter().find(|(_, k)| k == device_key) {
                existing = Some(*found);
                return Ok(None);
            }
            let next = days::next_device(rec, Some(last))?;
            rec.devices.push((next, *device_key));
            days.devices.push((next, DeviceDays::new_on(Some(day))));
            Ok(Some(next))
        })?;
        Ok(added.or(existing))
    }

    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()> {
        self.tokens
            .insert(id.as_bytes(), &token_hash[..])
            .map_err(backend)?;
        Ok(())
    }

    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        self.tokens
            .get(id.as_bytes())
            .map_err(backend)?
            .map(|v| fixed(&v))
            .transpose()
    }

    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional;
        let removed = (&self.accounts, &self.tokens, &self.device_lists)
            .transaction(|(accounts, tokens, lists)| {
                tokens.remove(id.as_bytes())?;
                lists.remove(id.as_bytes())?;
                Ok(accounts.remove(id.as_bytes())?)
            })
            .map_err(
                |e: TransactionError<ConflictableTransactionError>| match e {
                    TransactionError::Storage(e) => backend(e),
                    TransactionError::Abort(_) => StoreError::Backend("transaction aborted".into()),
                },
            )?;
        removed.map(|v| codec::decode_account(&v)).transpose()
    }

    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        self.deletions
            .insert(id.as_bytes(), codec::encode_devices(devices))
            .map_err(backend)?;
        Ok(())
    }

    /// An unreadable record does not stop a start: one whose device list is bad is
    /// returned with none (the deletion then takes the account record's), one whose
    /// key is no account id is skipped. Both are counted in one warn, without ids.
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        let mut out = Vec::new();
        let (mut skipped, mut no_devices) = (0u64, 0u64);
        for kv in self.deletions.iter() {
            let (k, v) = kv.map_err(backend)?;
            let Ok(id) = fixed(&k) else {
                skipped += 1;
                continue;
            };
            let devices = codec::decode_devices(&v).unwrap_or_else(|_| {
                no_devices += 1;
                Vec::new()
            });
            out.push((AccountId(id), devices));
        }
        if skipped + no_devices > 0 {
            tracing::warn!(
                skipped,
                no_devices,
                "unreadable account deletion intents (store corruption)"
            );
        }
        Ok(out)
    }

    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.deletions.remove(id.as_bytes()).map_err(backend)?;
        Ok(())
    }

    fn device_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>> {
        self.stored_list(id)
    }

    fn put_device_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool> {
        self.put_list(id, list)
    }

    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        if of.device == DeviceId::PRIMARY {
            return Ok(false);
        }
        // The record keeps its highest id ever (`update`), so this id stays used.
        self.update(&of.account, |rec, days, _| {
            let before = rec.devices.len();
            rec.devices.retain(|(d, _)| *d != of.device);
            days.devices.retain(|(d, _)| *d != of.device);
            Ok((rec.devices.len() < before).then_some(true))
        })
        .map(|r| r.unwrap_or(false))
    }

    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        self.idle_scan(seen_before_day, max, lists::IDLE_SCAN)
    }

    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.device_removals
            .insert(codec::addr_bytes(of), &[][..])
            .map_err(backend)?;
        Ok(())
    }

    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        self.removals()
    }

    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.device_removals
            .remove(codec::addr_bytes(of))
            .map_err(backend)?;
        Ok(())
    }
}
