//! Stores that note when they were written: a flag per store, set after each call
//! that may change it and cleared by the group commit's flush, which then flushes
//! only the stores written since the last one (see [`super::Stores::split`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tern_platform::clock::UnixMillis;
use tern_proto::discovery::Tag;
use tern_proto::{AccountId, DeviceAddress, DeviceId};

use crate::store::{
    AccountDays, AccountRecord, AccountStore, BlobId, BlobIndex, BlobMeta, DiscoveryStore,
    Envelope, Expired, FetchedKeys, Flush, KeyStore, MailboxStore, OneTimeKey, Published,
    SharedAppend, SignedKey, StoreResult, StoredList, StoredMessage, TagRecord, Totals, UploadMeta,
    Usage,
};

/// A store and its written-since-the-last-flush flag.
pub(super) struct Marked<S: ?Sized> {
    pub(super) store: Arc<S>,
    dirty: AtomicBool,
}

impl<S: ?Sized> Marked<S> {
    pub(super) fn new(store: Arc<S>) -> Self {
        // Dirty at first: whatever was written before counts.
        Marked {
            store,
            dirty: AtomicBool::new(true),
        }
    }

    /// Runs a call that may write, then sets the flag. After, not before: a flush
    /// that clears the flag between the mark and the write would miss the write.
    pub(super) fn write<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        let out = f(&self.store);
        self.dirty.store(true, Ordering::Release);
        out
    }

    /// [`Marked::write`] that sets the flag only when `wrote` says the call may
    /// have written (an error may have written part).
    pub(super) fn write_if<T>(&self, f: impl FnOnce(&S) -> T, wrote: impl Fn(&T) -> bool) -> T {
        let out = f(&self.store);
        if wrote(&out) {
            self.dirty.store(true, Ordering::Release);
        }
        out
    }

    /// Whether the store was written since its last flush.
    #[cfg(test)]
    pub(super) fn written(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }
}

impl<S: Flush + ?Sized> Marked<S> {
    /// Flushes the store if it was written since the last flush. The flag is cleared
    /// first, so a write during the flush marks it again. A failed flush sets it
    /// again: a write it did not make durable may belong to a commit of a later
    /// batch, which must not be answered before a flush of this store succeeds. So
    /// a store that cannot flush fails every commit until it can again; a store that
    /// was not written is never flushed, and never fails a commit.
    pub(super) fn flush_if_written(&self) -> StoreResult<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = self.store.flush();
        if flushed.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        flushed
    }
}

impl<S: Flush + ?Sized> Flush for Marked<S> {
    fn flush(&self) -> StoreResult<()> {
        self.flush_if_written()
    }
}

impl<S: MailboxStore + ?Sized> MailboxStore for Marked<S> {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        self.write(|s| s.append(to, msgs, accepted_at, expires_at))
    }
    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        self.write(|s| s.append_shared(append))
    }
    fn shared_bodies(&self) -> u64 {
        self.store.shared_bodies()
    }
    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        self.store.read(of, after, max)
    }
    fn read_later(
        &self,
        of: &DeviceAddress,
        after: u64,
        max: usize,
    ) -> Option<crate::store::ReadLater<'_>> {
        self.store.read_later(of, after, max)
    }
    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        self.write(|s| s.remove(of, seqs))
    }
    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.store.usage(of)
    }
    fn totals(&self) -> Totals {
        self.store.totals()
    }
    fn usage_and_totals(&self, of: &DeviceAddress) -> StoreResult<(Usage, Totals)> {
        self.store.usage_and_totals(of)
    }
    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        self.store.expired(now, max)
    }
    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        self.write(|s| s.expire(of, entries))
    }
    fn settle(&self) -> StoreResult<()> {
        self.write(|s| s.settle())
    }
    fn sweep_files(&self, now: UnixMillis) -> StoreResult<()> {
        self.write(|s| s.sweep_files(now))
    }
    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        self.store.seqs(of, after, max)
    }
    fn purge(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.write(|s| s.purge(of))
    }
    fn on_visible(&self, hook: crate::store::VisibleHook) -> bool {
        self.store.on_visible(hook)
    }
}

impl<S: AccountStore + ?Sized> AccountStore for Marked<S> {
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        day: Option<u32>,
    ) -> StoreResult<()> {
        self.write(|s| s.create_on(id, record, day))
    }
    fn days(&self, id: &AccountId) -> StoreResult<Option<AccountDays>> {
        self.store.days(id)
    }
    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        // Most sign-ins touch a device already seen today and write nothing: they
        // must not make the next commit flush this store.
        self.write_if(|s| s.touch_device(of, day), |r| !matches!(r, Ok(false)))
    }
    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        self.store.get(id)
    }
    fn add_device(
        &self,
        id: &AccountId,
        key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        self.write(|s| s.add_device(id, key, day))
    }
    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()> {
        self.write(|s| s.set_delivery_token(id, token_hash))
    }
    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        self.store.delivery_token(id)
    }
    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        self.write(|s| s.remove_account(id))
    }
    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        self.write(|s| s.put_deletion(id, devices))
    }
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        self.store.deletions()
    }
    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.write(|s| s.remove_deletion(id))
    }
    fn device_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>> {
        self.store.device_list(id)
    }
    fn device_list_version(&self, id: &AccountId) -> StoreResult<u64> {
        self.store.device_list_version(id)
    }
    fn put_device_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool> {
        // A refused (older) list wrote nothing.
        self.write_if(|s| s.put_device_list(id, list), |r| !matches!(r, Ok(false)))
    }
    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        self.write(|s| s.remove_device_record(of))
    }
    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        self.store.idle_devices(seen_before_day, max)
    }
    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.write(|s| s.put_device_removal(of))
    }
    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        self.store.device_removals()
    }
    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.write(|s| s.remove_device_removal(of))
    }
}

impl<S: KeyStore + ?Sized> KeyStore for Marked<S> {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        self.write(|s| s.publish(of, identity_dh, signed_prekey, one_time))
    }
    fn fetch(&self, of: &DeviceAddress, one_time: bool) -> StoreResult<Option<FetchedKeys>> {
        // Taking a one-time prekey deletes it.
        self.write(|s| s.fetch(of, one_time))
    }
    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        self.store.one_time_count(of)
    }
    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        self.store.published(of)
    }
    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.write(|s| s.remove_device(of))
    }
    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()> {
        self.write(|s| s.remove_account_keys(account))
    }
}

impl<S: BlobIndex + ?Sized> BlobIndex for Marked<S> {
    fn blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        self.store.blob(id)
    }
    fn insert_blob(&self, id: &BlobId, meta: &BlobMeta, uploader: &AccountId) -> StoreResult<()> {
        self.write(|s| s.insert_blob(id, meta, uploader))
    }
    fn touch_blob(
        &self,
        id: &BlobId,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Option<BlobMeta>> {
        self.write(|s| s.touch_blob(id, now, expires_at))
    }
    fn remove_blob(&self, id: &BlobId) -> StoreResult<Option<BlobMeta>> {
        self.write(|s| s.remove_blob(id))
    }
    fn remove_expired_blob(&self, id: &BlobId, now: UnixMillis) -> StoreResult<Option<BlobMeta>> {
        self.write(|s| s.remove_expired_blob(id, now))
    }
    fn expired_blobs(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<BlobId>> {
        self.store.expired_blobs(now, max)
    }
    fn account_bytes(&self, account: &AccountId, now: UnixMillis) -> StoreResult<u64> {
        self.store.account_bytes(account, now)
    }
    fn expire_charges(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        self.write(|s| s.expire_charges(now, max))
    }
    fn upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<Option<UploadMeta>> {
        self.store.upload(account, id)
    }
    fn put_upload(&self, account: &AccountId, id: &BlobId, meta: &UploadMeta) -> StoreResult<()> {
        self.write(|s| s.put_upload(account, id, meta))
    }
    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> StoreResult<()> {
        self.write(|s| s.remove_upload(account, id))
    }
    fn uploads_of(&self, account: &AccountId) -> StoreResult<Vec<(BlobId, u64)>> {
        self.store.uploads_of(account)
    }
    fn flush_blobs(&self) -> StoreResult<()> {
        self.store.flush_blobs()
    }
    fn stale_uploads(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> StoreResult<Vec<(AccountId, BlobId)>> {
        self.store.stale_uploads(before, max)
    }
    fn charges_of(&self, account: &AccountId) -> StoreResult<Vec<(u64, u64)>> {
        self.store.charges_of(account)
    }
    fn remove_account_media(&self, account: &AccountId) -> StoreResult<Vec<BlobId>> {
        self.write(|s| s.remove_account_media(account))
    }
    fn blob_bytes(&self) -> StoreResult<Option<u64>> {
        self.store.blob_bytes()
    }
    fn object_gc_pending(&self, max: usize) -> StoreResult<Vec<BlobId>> {
        self.store.object_gc_pending(max)
    }
    fn object_gc_done(&self, id: &BlobId) -> StoreResult<()> {
        self.write(|s| s.object_gc_done(id))
    }
    fn queue_object_gc(&self, id: &BlobId, after: std::time::Duration) -> StoreResult<()> {
        self.write(|s| s.queue_object_gc(id, after))
    }
}

impl<S: DiscoveryStore + ?Sized> DiscoveryStore for Marked<S> {
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>> {
        self.write(|s| s.attach(account, tag, rec))
    }
    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>> {
        self.store.by_tag(tag)
    }
    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>> {
        self.store.of_account(account)
    }
    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool> {
        self.write(|s| s.set_discoverable(account, on))
    }
    fn detach(&self, account: &AccountId) -> StoreResult<()> {
        self.write(|s| s.detach(account))
    }
    fn sweep_number_buckets(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        self.write(|s| s.sweep_number_buckets(now, max))
    }
    fn holds_tags(&self) -> StoreResult<bool> {
        self.store.holds_tags()
    }
    fn discoverable_keys(&self) -> StoreResult<Vec<u64>> {
        self.store.discoverable_keys()
    }
    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>> {
        self.store.bucket(account)
    }
    fn number_bucket(&self, tag: &Tag) -> StoreResult<Option<u64>> {
        self.store.number_bucket(tag)
    }
    fn set_buckets(
        &self,
        account: &AccountId,
        account_tat: u64,
        tag: &Tag,
        number_tat: u64,
    ) -> StoreResult<()> {
        self.write(|s| s.set_buckets(account, account_tat, tag, number_tat))
    }
}

impl<S: crate::store::KeyPackageStore + ?Sized> crate::store::KeyPackageStore for Marked<S> {
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[bytes::Bytes],
        last_resort: Option<&bytes::Bytes>,
        replace: bool,
    ) -> StoreResult<u64> {
        self.write(|s| s.publish_key_packages(of, one_time, last_resort, replace))
    }
    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<crate::store::FetchedPackage>> {
        // Taking a one-time package deletes it.
        self.write(|s| s.take_key_package(of, one_time))
    }
    fn key_package_counts(
        &self,
        of: &DeviceAddress,
    ) -> StoreResult<crate::store::KeyPackageCounts> {
        self.store.key_package_counts(of)
    }
    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.write(|s| s.remove_key_packages(of))
    }
    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()> {
        self.write(|s| s.remove_account_key_packages(account))
    }
}

impl<S: crate::store::GroupStore + ?Sized> crate::store::GroupStore for Marked<S> {
    fn insert_group(
        &self,
        handle: &crate::store::HandleBytes,
        state: &crate::store::GroupState,
    ) -> StoreResult<()> {
        self.write(|s| s.insert_group(handle, state))
    }
    fn group(
        &self,
        handle: &crate::store::HandleBytes,
    ) -> StoreResult<Option<crate::store::GroupState>> {
        self.store.group(handle)
    }
    fn advance_group(
        &self,
        handle: &crate::store::HandleBytes,
        from: &crate::store::GroupState,
        to: &crate::store::GroupState,
    ) -> StoreResult<bool> {
        self.write(|s| s.advance_group(handle, from, to))
    }
    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64> {
        self.write(|s| s.sweep_groups(before_day, max))
    }
    fn groups_after(
        &self,
        after: Option<&crate::store::HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(crate::store::HandleBytes, crate::store::GroupState)>> {
        self.store.groups_after(after, max)
    }
    fn lock_group(
        &self,
        handle: &crate::store::HandleBytes,
    ) -> StoreResult<Option<crate::store::GroupLock>> {
        self.store.lock_group(handle)
    }
    fn advance_locked(
        &self,
        handle: &crate::store::HandleBytes,
        lock: crate::store::GroupLock,
        to: &crate::store::GroupState,
    ) -> StoreResult<bool> {
        self.write(|s| s.advance_locked(handle, lock, to))
    }
    fn count_groups(&self) -> StoreResult<u64> {
        self.store.count_groups()
    }
}

impl<S: crate::store::PushStore + ?Sized> crate::store::PushStore for Marked<S> {
    fn put_push_target(
        &self,
        of: &DeviceAddress,
        target: &tern_proto::PushTarget,
    ) -> StoreResult<()> {
        self.write(|s| s.put_push_target(of, target))
    }
    fn push_target(&self, of: &DeviceAddress) -> StoreResult<Option<tern_proto::PushTarget>> {
        self.store.push_target(of)
    }
    fn remove_push_target(
        &self,
        of: &DeviceAddress,
        only: Option<&tern_proto::PushTarget>,
    ) -> StoreResult<bool> {
        self.write(|s| s.remove_push_target(of, only))
    }
    fn remove_account_push_targets(&self, account: &AccountId) -> StoreResult<()> {
        self.write(|s| s.remove_account_push_targets(account))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn the_device_verbs_reach_the_wrapped_store_and_mark_what_they_write() {
        let store = Marked::new(Arc::new(MemoryStore::new()));
        crate::store::conformance::device_rules(&store);
        let account = AccountId([60; 16]);
        let list = |version| StoredList {
            version,
            list: vec![1; 10],
            signature: [1; 64],
        };
        store.flush_if_written().expect("flush");
        assert!(
            !store.put_device_list(&account, &list(1)).expect("older"),
            "the rules left version 1"
        );
        assert!(!store.written(), "a refused list wrote nothing");
        assert!(store.idle_devices(u32::MAX, 10).is_ok());
        assert!(store.device_list(&account).expect("list").is_some());
        assert!(!store.written(), "reads write nothing");
        assert!(store.put_device_list(&account, &list(2)).expect("newer"));
        assert!(store.written());
        let primary = DeviceAddress {
            account,
            device: DeviceId::PRIMARY,
        };
        store.flush_if_written().expect("flush");
        store.put_device_removal(&primary).expect("intent");
        assert!(store.written());
        store.flush_if_written().expect("flush");
        store.remove_device_removal(&primary).expect("done");
        assert!(store.written());
        store.flush_if_written().expect("flush");
        let second = DeviceAddress {
            account,
            device: DeviceId::new(2).expect("id"),
        };
        store.remove_device_record(&second).expect("remove");
        assert!(store.written());
    }
}
