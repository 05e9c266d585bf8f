//! The stores of the MLS delivery service: [`KeyPackageStore`] for the key packages
//! devices publish, [`GroupStore`] for each group handle's current epoch.
//!
//! # Contract
//! - A one-time key package is handed out at most once, even to concurrent callers
//!   (on every node sharing the store), and deleted in the same step; the last-resort
//!   package is handed out as often as asked and never deleted by a fetch.
//! - A group handle names no account and no device. The store keeps, per handle,
//!   exactly a [`GroupState`]: the epoch, the SHA-256 of the epoch token, the last
//!   commit id and the UTC day of the last change. Nothing else about a group.
//! - [`GroupStore::advance_group`] is a compare-and-set: of two callers that read the
//!   same state, at most one moves it.

use std::any::Any;

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress};

use super::StoreResult;

/// A group handle: 16 random bytes chosen by the group's creator.
pub type HandleBytes = [u8; 16];

/// What a fetch hands out for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPackage {
    /// The key package (an MLS `KeyPackage`, opaque to the relay).
    pub key_package: Bytes,
    /// Whether it is the device's last-resort package (kept) rather than a one-time
    /// one (now deleted).
    pub last_resort: bool,
}

/// What a device holds on the relay, as counts (the export's view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyPackageCounts {
    /// One-time packages left.
    pub one_time: u64,
    /// Whether a last-resort package is stored.
    pub last_resort: bool,
}

/// Devices' published MLS key packages: per device a pool of one-time packages and
/// at most one last-resort package. See the module docs for the contract.
pub trait KeyPackageStore: Send + Sync + 'static {
    /// Adds `one_time` to the device's pool (after deleting the pool when `replace`)
    /// and, when given, makes `last_resort` its last-resort package, in one atomic
    /// change; returns the pool's size.
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> StoreResult<u64>;

    /// With `one_time`, takes one package out of the pool (oldest first); without,
    /// or when the pool is empty, the last-resort package (kept). `None` when the
    /// device has neither.
    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<FetchedPackage>>;

    /// What the device holds.
    fn key_package_counts(&self, of: &DeviceAddress) -> StoreResult<KeyPackageCounts>;

    /// Deletes the device's packages, the last-resort one too (device removal).
    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()>;

    /// Deletes every package of every device of the account, in one atomic change
    /// (account deletion): a scan by account, so a device no record names loses its
    /// packages too.
    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()>;
}

/// A group handle's state: all the relay keeps about a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupState {
    /// The current epoch (0 when created).
    pub epoch: u64,
    /// SHA-256 of the current epoch's token, which only members of the epoch hold.
    pub token_hash: [u8; 32],
    /// The commit id that moved the group to this epoch (zero at epoch 0), so a retry
    /// of that commit is answered without appending it again.
    pub last_commit_id: [u8; 16],
    /// The UTC day of the last create or commit; idle handles are swept by it.
    pub touched_day: u32,
}

/// Group handles and their epochs. See the module docs for the contract.
pub trait GroupStore: Send + Sync + 'static {
    /// Stores a new handle with `state`; `Err(Exists)` if the handle is taken.
    fn insert_group(&self, handle: &HandleBytes, state: &GroupState) -> StoreResult<()>;

    /// The handle's state, if it exists.
    fn group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupState>>;

    /// Replaces `from` (the state as read) with `to` if the handle still holds
    /// exactly `from`; whether it did.
    fn advance_group(
        &self,
        handle: &HandleBytes,
        from: &GroupState,
        to: &GroupState,
    ) -> StoreResult<bool>;

    /// Deletes up to `max` handles last touched before UTC day `before_day`; returns
    /// how many it deleted.
    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64>;

    /// Up to `max` handles above `after` (all from the start with `None`), in
    /// handle order, with their states (admin migrate, tests).
    fn groups_after(
        &self,
        after: Option<&HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(HandleBytes, GroupState)>>;

    /// Locks the handle across every node sharing this store and reads its state
    /// under the lock; `None`, holding nothing, if it does not exist. The lock holds
    /// until [`GroupStore::advance_locked`] or the guard's drop: a commit's append and
    /// epoch change then never interleave with another node's, nor with a sweep.
    /// Embedded stores have one process, whose service holds a lock of its own: by
    /// default a guard that holds nothing over [`GroupStore::group`].
    fn lock_group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupLock>> {
        Ok(self.group(handle)?.map(GroupLock::unheld))
    }

    /// Moves the handle `lock` holds from the state it read to `to` (a
    /// compare-and-set, as [`GroupStore::advance_group`]) and releases the lock;
    /// whether it moved. By default [`GroupStore::advance_group`]; a store whose
    /// [`GroupStore::lock_group`] holds something moves it through what it holds.
    fn advance_locked(
        &self,
        handle: &HandleBytes,
        lock: GroupLock,
        to: &GroupState,
    ) -> StoreResult<bool> {
        self.advance_group(handle, lock.state(), to)
    }

    /// How many of this node's commits may hold a [`GroupStore::lock_group`] lock at
    /// once; `None`: no bound (the lock holds nothing). A store whose lock holds a
    /// pooled connection that the commit's append also draws on bounds it well
    /// below the pool's size, so locks never take every connection.
    fn lock_slots(&self) -> Option<usize> {
        None
    }

    /// How many handles the store holds (the relay-wide `max_groups` counts them).
    /// May cost a scan: the service counts seldom and keeps its own tally between.
    fn count_groups(&self) -> StoreResult<u64>;
}

/// A handle locked with its state as read under the lock (see
/// [`GroupStore::lock_group`]); released on drop.
pub struct GroupLock {
    state: GroupState,
    held: Option<Box<dyn Any + Send>>,
}

impl GroupLock {
    /// A lock that holds nothing (a store with one process).
    pub fn unheld(state: GroupState) -> Self {
        GroupLock { state, held: None }
    }

    /// A lock kept by `held` (what the store releases it with).
    pub fn held(state: GroupState, held: Box<dyn Any + Send>) -> Self {
        GroupLock {
            state,
            held: Some(held),
        }
    }

    /// The state read under the lock.
    pub fn state(&self) -> &GroupState {
        &self.state
    }

    /// What the store keeps the lock with, if anything.
    pub fn into_held(self) -> Option<Box<dyn Any + Send>> {
        self.held
    }
}

impl std::fmt::Debug for GroupLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLock")
            .field("state", &self.state)
            .field("held", &self.held.is_some())
            .finish()
    }
}
