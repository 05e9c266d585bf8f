//! In-memory stores, for unit tests. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::seq::SeqCounters;
use super::{
    codec, AccountDays, AccountRecord, AccountStore, BlobId, BlobIndex, BlobMeta, DeviceDays,
    Envelope, Expired, FetchedKeys, Flush, KeyStore, MailboxStore, OneTimeKey, Published,
    SharedAppend, SignedKey, StoreError, StoreResult, StoredList, StoredMessage, Totals,
    UploadMeta, Usage,
};
use tern_platform::clock::UnixMillis;

/// Mailboxes and accounts in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Discovery tags, apart: no call touches both.
    pub(super) discovery: Mutex<super::discovery::MemDiscovery>,
    /// Key packages and group epochs, apart too (`memory/groups.rs`).
    groups: Mutex<groups::MemGroups>,
    /// Push targets per device.
    push: Mutex<HashMap<DeviceAddress, tern_proto::PushTarget>>,
}

mod groups;

impl super::PushStore for MemoryStore {
    fn put_push_target(
        &self,
        of: &DeviceAddress,
        target: &tern_proto::PushTarget,
    ) -> StoreResult<()> {
        self.push_targets().insert(*of, target.clone());
        Ok(())
    }

    fn push_target(&self, of: &DeviceAddress) -> StoreResult<Option<tern_proto::PushTarget>> {
        Ok(self.push_targets().get(of).cloned())
    }

    fn remove_push_target(
        &self,
        of: &DeviceAddress,
        only: Option<&tern_proto::PushTarget>,
    ) -> StoreResult<bool> {
        let mut targets = self.push_targets();
        if only.is_some_and(|t| targets.get(of) != Some(t)) {
            return Ok(false);
        }
        Ok(targets.remove(of).is_some())
    }

    fn remove_account_push_targets(&self, account: &AccountId) -> StoreResult<()> {
        self.push_targets().retain(|a, _| a.account != *account);
        Ok(())
    }
}

impl MemoryStore {
    fn push_targets(&self) -> MutexGuard<'_, HashMap<DeviceAddress, tern_proto::PushTarget>> {
        // Each call is one map operation: nothing is half done.
        self.push.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Epoch 0: nothing outlives the process, so there is never a later one.
    seqs: SeqCounters,
    /// Each message, with the shared body it points at (a key of `bodies`).
    messages: BTreeMap<(DeviceAddress, u64), (StoredMessage, Option<u64>)>,
    /// Shared bodies, by a number of this store's: the bytes and the entries left.
    bodies: HashMap<u64, (bytes::Bytes, u64)>,
    next_body: u64,
    expiry: super::ExpiryIndex,
    usage: HashMap<DeviceAddress, Usage>,
    /// The sum of `usage`.
    totals: Usage,
    accounts: HashMap<AccountId, AccountRecord>,
    days: HashMap<AccountId, AccountDays>,
    tokens: HashMap<AccountId, [u8; 32]>,
    deletions: BTreeMap<AccountId, Vec<DeviceId>>,
    /// The highest device id each account ever had (ids are never handed out twice).
    last_device: HashMap<AccountId, u32>,
    /// Each account's signed device list.
    lists: HashMap<AccountId, StoredList>,
    /// Device removals in progress.
    removals: std::collections::BTreeSet<DeviceAddress>,
    keys: HashMap<DeviceAddress, Keys>,
    blobs: HashMap<BlobId, BlobMeta>,
    /// (account, UTC day of expiry) -> bytes charged.
    charges: BTreeMap<(AccountId, u64), u64>,
    uploads: BTreeMap<(AccountId, BlobId), UploadMeta>,
}

#[derive(Debug, Default)]
struct Keys {
    identity_dh: Option<SignedKey>,
    signed_prekey: Option<SignedKey>,
    one_time: BTreeMap<u32, [u8; 32]>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data: every method
        // finishes its updates before it can fail.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn take(&mut self, of: &DeviceAddress, seq: u64) -> Option<StoredMessage> {
        let (msg, body) = self.messages.remove(&(*of, seq))?;
        self.expiry.remove(&(msg.expires_at, *of, seq));
        let usage = self.usage.entry(*of).or_default();
        usage.messages -= 1;
        usage.bytes -= msg.len();
        if usage.messages == 0 {
            self.usage.remove(of);
        }
        self.totals.messages -= 1;
        self.totals.bytes -= msg.payload.len() as u64;
        // The last entry takes the body with it.
        if let Some(id) = body {
            if let Some((bytes, refs)) = self.bodies.get_mut(&id) {
                *refs -= 1;
                if *refs == 0 {
                    self.totals.bytes -= bytes.len() as u64;
                    self.bodies.remove(&id);
                }
            }
        }
        Some(msg)
    }

    fn insert(&mut self, to: &DeviceAddress, msg: StoredMessage, body: Option<u64>) {
        self.expiry.insert((msg.expires_at, *to, msg.seq));
        let usage = self.usage.entry(*to).or_default();
        usage.messages += 1;
        usage.bytes += msg.len();
        self.totals.messages += 1;
        self.totals.bytes += msg.payload.len() as u64;
        self.messages.insert((*to, msg.seq), (msg, body));
    }
}

impl MailboxStore for MemoryStore {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        let mut inner = self.lock();
        let seqs = inner.seqs.take(to, msgs.len())?;
        for (m, &seq) in msgs.iter().zip(&seqs) {
            let msg = StoredMessage {
                seq,
                message_id: m.message_id,
                payload: m.payload.clone(),
                accepted_at,
                expires_at,
                shared_body: None,
            };
            inner.insert(to, msg, None);
        }
        Ok(seqs)
    }

    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        if append.entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let mut seqs = Vec::with_capacity(append.entries.len());
        for e in append.entries {
            seqs.push(inner.seqs.take(&e.to, 1)?[0]);
        }
        let id = inner.next_body;
        inner.next_body += 1;
        let refs = append.entries.len() as u64;
        inner.bodies.insert(id, (append.body.clone(), refs));
        inner.totals.bytes += append.body.len() as u64;
        for (e, &seq) in append.entries.iter().zip(&seqs) {
            let msg = StoredMessage {
                seq,
                message_id: append.message_id,
                payload: e.part.clone(),
                accepted_at: append.accepted_at,
                expires_at: append.expires_at,
                shared_body: Some(append.body.clone()),
            };
            inner.insert(&e.to, msg, Some(id));
        }
        Ok(seqs)
    }

    fn shared_bodies(&self) -> u64 {
        self.lock().bodies.len() as u64
    }

    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        let inner = self.lock();
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(inner
            .messages
            .range((*of, start)..=(*of, u64::MAX))
            .take(max)
            .map(|(_, (m, _))| m.clone())
            .collect())
    }

    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(self
            .lock()
            .messages
            .range((*of, start)..=(*of, u64::MAX))
            .take(max)
            .map(|((_, seq), _)| *seq)
            .collect())
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        let mut inner = self.lock();
        let mut removed = Usage::default();
        for seq in seqs {
            if let Some(m) = inner.take(of, *seq) {
                removed.messages += 1;
                removed.bytes += m.len();
            }
        }
        Ok(removed)
    }

    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        Ok(self.lock().usage.get(of).copied().unwrap_or_default())
    }

    fn totals(&self) -> Totals {
        let inner = self.lock();
        Totals {
            messages: inner.totals.messages,
            bytes: inner.totals.bytes,
            mailboxes: inner.usage.len() as u64,
        }
    }

    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        Ok(super::due(&self.lock().expiry, now, max))
    }

    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        self.remove(of, &Expired::seqs_of(entries, of))
    }
}

impl Flush for MemoryStore {
    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

impl AccountStore for MemoryStore {
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        day: Option<u32>,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        if inner.accounts.contains_key(id) {
            return Err(StoreError::Exists);
        }
        inner.accounts.insert(*id, record.clone());
        let devices = record
            .devices
            .iter()
            .map(|(d, _)| (*d, DeviceDays::new_on(day)))
            .collect();
        inner.days.insert(
            *id,
            AccountDays {
                created: day,
                devices,
            },
        );
        Ok(())
    }

    fn days(&self, id: &AccountId) -> StoreResult<Option<AccountDays>> {
        Ok(self.lock().days.get(id).cloned())
    }

    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        let mut inner = self.lock();
        let Some(days) = inner.days.get_mut(&of.account) else {
            return Ok(false);
        };
        Ok(days
            .devices
            .iter_mut()
            .find(|(d, _)| *d == of.device)
            .is_some_and(|(_, d)| d.touch(day)))
    }

    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        Ok(self.lock().accounts.get(id).cloned())
    }

    fn add_device(
        &self,
        id: &AccountId,
        device_key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(rec) = inner.accounts.get_mut(id) else {
            return Ok(None);
        };
        if let Some((existing, _)) = rec.devices.iter().find(|(_, k)| k == device_key) {
            return Ok(Some(*existing));
        }
        let next = super::days::next_device(rec, inner.last_device.get(id).copied())?;
        rec.devices.push((next, *device_key));
        inner.last_device.insert(*id, next.get());
        let days = inner.days.entry(*id).or_default();
        days.devices.push((next, DeviceDays::new_on(Some(day))));
        Ok(Some(next))
    }

    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()> {
        self.lock().tokens.insert(*id, *token_hash);
        Ok(())
    }

    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        Ok(self.lock().tokens.get(id).copied())
    }

    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        let mut inner = self.lock();
        inner.tokens.remove(id);
        inner.days.remove(id);
        inner.last_device.remove(id);
        inner.lists.remove(id);
        Ok(inner.accounts.remove(id))
    }

    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        self.lock().deletions.insert(*id, devices.to_vec());
        Ok(())
    }

    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        Ok(self
            .lock()
            .deletions
            .iter()
            .map(|(a, d)| (*a, d.clone()))
            .collect())
    }

    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.lock().deletions.remove(id);
        Ok(())
    }

    fn device_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>> {
        Ok(self.lock().lists.get(id).cloned())
    }

    fn put_device_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool> {
        let mut inner = self.lock();
        if !inner.accounts.contains_key(id) {
            return Ok(false);
        }
        let stored = inner.lists.get(id).map_or(0, |l| l.version);
        if list.version <= stored {
            return Ok(false);
        }
        inner.lists.insert(*id, list.clone());
        Ok(true)
    }

    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        if of.device == DeviceId::PRIMARY {
            return Ok(false);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(rec) = inner.accounts.get_mut(&of.account) else {
            return Ok(false);
        };
        let highest = super::days::last_device(rec, None);
        let before = rec.devices.len();
        rec.devices.retain(|(d, _)| *d != of.device);
        if rec.devices.len() == before {
            return Ok(false);
        }
        let used = inner.last_device.entry(of.account).or_default();
        *used = (*used).max(highest);
        if let Some(days) = inner.days.get_mut(&of.account) {
            days.devices.retain(|(d, _)| *d != of.device);
        }
        Ok(true)
    }

    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        let inner = self.lock();
        let mut idle: Vec<DeviceAddress> = inner
            .days
            .iter()
            .flat_map(|(account, days)| {
                days.devices
                    .iter()
                    .filter(|(d, days)| {
                        *d != DeviceId::PRIMARY
                            && days.last_seen.is_some_and(|s| s < seen_before_day)
                    })
                    .map(|(d, _)| DeviceAddress {
                        account: *account,
                        device: *d,
                    })
            })
            .collect();
        idle.sort_unstable_by_key(codec::addr_bytes);
        idle.truncate(max);
        Ok(idle)
    }

    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.lock().removals.insert(*of);
        Ok(())
    }

    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        Ok(self.lock().removals.iter().copied().collect())
    }

    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.lock().removals.remove(of);
        Ok(())
    }
}

impl KeyStore for MemoryStore {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        let mut inner = self.lock();
        let keys = inner.keys.entry(*of).or_default();
        if let Some(k) = identity_dh {
            keys.identity_dh = Some(*k);
        }
        if let Some(k) = signed_prekey {
            keys.signed_prekey = Some(*k);
        }
        for k in one_time {
            keys.one_time.insert(k.id, k.key);
        }
        Ok(keys.one_time.len() as u64)
    }

    fn fetch(&self, of: &DeviceAddress, take: bool) -> StoreResult<Option<FetchedKeys>> {
        let mut inner = self.lock();
        let Some(keys) = inner.keys.get_mut(of) else {
            return Ok(None);
        };
        let (Some(identity_dh), Some(signed_prekey)) = (keys.identity_dh, keys.signed_prekey)
        else {
            return Ok(None);
        };
        let one_time = take
            .then(|| keys.one_time.pop_first())
            .flatten()
            .map(|(id, key)| OneTimeKey { id, key });
        Ok(Some(FetchedKeys {
            identity_dh,
            signed_prekey,
            one_time,
        }))
    }

    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        Ok(self
            .lock()
            .keys
            .get(of)
            .map_or(0, |k| k.one_time.len() as u64))
    }

    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        Ok(self
            .lock()
            .keys
            .get(of)
            .map_or_else(Published::default, |k| Published {
                identity_dh: k.identity_dh.is_some(),
                signed_prekey_id: k.signed_prekey.map(|s| s.id),
                one_time: k.one_time.len() as u64,
            }))
    }

    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.lock().keys.remove(of);
        Ok(())
    }

    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()> {
        self.lock().keys.retain(|a, _| a.account != *account);
        Ok(())
    }
}

impl BlobIndex for MemoryStore {
    fn blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        Ok(self.lock().blobs.get(id).copied())
    }

    fn insert_blob(&self, id: &BlobId, meta: &BlobMeta, uploader: &AccountId) -> StoreResult<()> {
        let mut inner = self.lock();
        inner.blobs.insert(*id, *meta);
        let charge = inner
            .charges
            .entry((*uploader, super::utc_day(meta.expires_at)))
            .or_default();
        *charge = charge.saturating_add(meta.size);
        inner.uploads.remove(&(*uploader, *id));
        Ok(())
    }

    fn touch_blob(
        &self,
        id: &BlobId,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Option<BlobMeta>> {
        let mut inner = self.lock();
        Ok(inner.blobs.get_mut(id).map(|m| {
            m.last_used_at = now;
            m.expires_at = m.expires_at.max(expires_at);
            *m
        }))
    }

    fn remove_blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        Ok(self.lock().blobs.remove(id))
    }

    fn expired_blobs(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<BlobId>> {
        let inner = self.lock();
        let mut due: Vec<(UnixMillis, BlobId)> = inner
            .blobs
            .iter()
            .filter(|(_, m)| m.expires_at <= now)
            .map(|(id, m)| (m.expires_at, *id))
            .collect();
        due.sort_unstable();
        Ok(due.into_iter().take(max).map(|(_, id)| id).collect())
    }

    fn account_bytes(&self, account: &AccountId, now: UnixMillis) -> StoreResult<u64> {
        Ok(self
            .lock()
            .charges
            .range((*account, super::utc_day(now))..=(*account, u64::MAX))
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n)))
    }

    fn expire_charges(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let today = super::utc_day(now);
        let mut inner = self.lock();
        let past: Vec<(AccountId, u64)> = inner
            .charges
            .keys()
            .filter(|(_, day)| *day < today)
            .take(max)
            .copied()
            .collect();
        for k in &past {
            inner.charges.remove(k);
        }
        Ok(past.len())
    }

    fn upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<Option<UploadMeta>> {
        Ok(self.lock().uploads.get(&(*account, *id)).copied())
    }

    fn put_upload(&self, account: &AccountId, id: &BlobId, meta: &UploadMeta) -> StoreResult<()> {
        self.lock().uploads.insert((*account, *id), *meta);
        Ok(())
    }

    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<()> {
        self.lock().uploads.remove(&(*account, *id));
        Ok(())
    }

    fn uploads_of(&self, account: &AccountId) -> StoreResult<Vec<(BlobId, u64)>> {
        Ok(self
            .lock()
            .uploads
            .iter()
            .filter(|((a, _), _)| a == account)
            .map(|((_, id), m)| (*id, m.size))
            .collect())
    }

    fn flush_blobs(&self) -> StoreResult<()> {
        Ok(())
    }

    fn stale_uploads(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> StoreResult<Vec<(AccountId, BlobId)>> {
        Ok(self
            .lock()
            .uploads
            .iter()
            .filter(|(_, m)| m.touched_at < before)
            .take(max)
            .map(|(k, _)| *k)
            .collect())
    }

    fn charges_of(&self, account: &AccountId) -> StoreResult<Vec<(u64, u64)>> {
        Ok(self
            .lock()
            .charges
            .range((*account, 0)..=(*account, u64::MAX))
            .map(|((_, day), n)| (*day, *n))
            .collect())
    }

    fn remove_account_media(&self, account: &AccountId) -> StoreResult<Vec<BlobId>> {
        let mut inner = self.lock();
        inner.charges.retain(|(a, _), _| a != account);
        let mine: Vec<BlobId> = inner
            .uploads
            .keys()
            .filter(|(a, _)| a == account)
            .map(|(_, id)| *id)
            .collect();
        for id in &mine {
            inner.uploads.remove(&(*account, *id));
        }
        Ok(mine)
    }

    fn blob_bytes(&self) -> StoreResult<Option<u64>> {
        let inner = self.lock();
        Ok(Some(
            inner
                .blobs
                .values()
                .fold(0u64, |n, m| n.saturating_add(m.size)),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::mailbox_rules(&super::MemoryStore::new());
        super::super::conformance::seqs_are_per_mailbox(&super::MemoryStore::new());
        super::super::conformance::totals_rules(&super::MemoryStore::new());
        super::super::conformance::shared_body_rules(&super::MemoryStore::new());
        super::super::conformance::account_rules(&super::MemoryStore::new());
        super::super::conformance::day_rules(&super::MemoryStore::new());
        super::super::conformance::key_rules(&super::MemoryStore::new());
        super::super::conformance::key_account_rules(&super::MemoryStore::new());
        super::super::conformance::blob_rules(&super::MemoryStore::new());
        super::super::conformance::deletion_rules(&super::MemoryStore::new());
        super::super::conformance::purge_rules(&super::MemoryStore::new());
        super::super::conformance::discovery_rules(&super::MemoryStore::new());
        super::super::conformance::device_rules(&super::MemoryStore::new());
        super::super::conformance::slot_rules(&super::super::MemorySlots::new());
    }

    #[test]
    fn push_targets() {
        super::super::conformance::push_rules(&super::MemoryStore::new());
    }

    #[test]
    fn key_packages_and_groups() {
        super::super::conformance::key_package_rules(&super::MemoryStore::new());
        super::super::conformance::group_rules(&super::MemoryStore::new());
        let store = std::sync::Arc::new(super::MemoryStore::new());
        super::super::conformance::concurrent_key_package_fetches(store.clone());
        super::super::conformance::concurrent_advances(store);
    }

    #[test]
    fn concurrent_fetches_never_share_a_one_time_key() {
        super::super::conformance::concurrent_fetches(std::sync::Arc::new(
            super::MemoryStore::new(),
        ));
    }
}
