//! The MLS delivery service (issue 17): the relay stores key packages and orders
//! each group's commits, and learns nothing else about a group.
//!
//! - Key packages (`key_packages.rs`): a device publishes at most
//!   [`MAX_KEY_PACKAGES`] one-time packages and one last-resort package; a fetch
//!   (with the target account's delivery token, on any connection) takes one
//!   one-time package per device, each handed out once, or the last-resort one when
//!   the device's pool is empty or its rate (`key_packages_per_device`) is spent.
//! - Group epochs (`epochs.rs`): a group handle (16 random bytes, linked to no
//!   account or device) holds its epoch, the SHA-256 of the epoch's token, the last
//!   commit id and the day it was last touched. A commit is accepted only for the
//!   current epoch with that epoch's token, under the handle's lock; it is appended
//!   to every recipient's mailbox first, and only then is the epoch moved on.
//!   Handles idle for `group_idle_days` are deleted by the sweeper.
//! - At most `max_groups` handles relay-wide: a create past it is `UNAVAILABLE`
//!   (retry later) until the sweeper deletes idle ones. The count is the store's,
//!   counted at the first create, then tallied here (creates add, sweeps take
//!   away); on a store several nodes share it is counted again after
//!   [`RECOUNT_MS`], as other nodes create too (so the cap may be passed by what
//!   the nodes create within that time).

mod epochs;
mod key_packages;

#[cfg(test)]
mod pg_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_refusals;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tern_platform::clock::Clock;

use crate::core::budget::Budget;
use crate::core::rate::RateLimits;
use crate::deletion::Tombstones;
use crate::store::{AccountStore, GroupCommit, GroupStore, HandleBytes, KeyPackageStore, DAY_MS};

pub(crate) use key_packages::PackageRequester;

/// Most one-time key packages a device may hold on the relay.
pub(crate) const MAX_KEY_PACKAGES: u64 = 200;

/// The delivery service's state and rules. See the module docs.
pub(crate) struct Groups {
    accounts: Arc<dyn AccountStore>,
    packages: Arc<dyn KeyPackageStore>,
    groups: Arc<dyn GroupStore>,
    commit: Arc<GroupCommit>,
    rates: Arc<RateLimits>,
    budget: Arc<Budget>,
    tombstones: Arc<Tombstones>,
    clock: Arc<dyn Clock>,
    locks: HandleLocks,
    /// Bounds the commits holding a store lock at once (see
    /// [`GroupStore::lock_slots`]); `None`: unbounded.
    lock_slots: Option<tokio::sync::Semaphore>,
    idle_days: u32,
    max_groups: u64,
    recount: bool,
    /// The handles counted, and when they were last counted by the store.
    count: Mutex<Option<(u64, u64)>>,
}

/// How long a commit waits for one of the store's lock slots before it is refused
/// `UNAVAILABLE` (retry later).
pub(crate) const LOCK_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a shared store's handle count stands before the next create counts
/// again.
pub(crate) const RECOUNT_MS: u64 = 60_000;

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups").finish_non_exhaustive()
    }
}

/// What [`Groups`] is built on.
pub(crate) struct GroupsParts {
    pub(crate) accounts: Arc<dyn AccountStore>,
    pub(crate) packages: Arc<dyn KeyPackageStore>,
    pub(crate) groups: Arc<dyn GroupStore>,
    pub(crate) commit: Arc<GroupCommit>,
    pub(crate) rates: Arc<RateLimits>,
    pub(crate) budget: Arc<Budget>,
    pub(crate) tombstones: Arc<Tombstones>,
    pub(crate) clock: Arc<dyn Clock>,
    /// `group_idle_days`; 0 never sweeps.
    pub(crate) idle_days: u32,
    /// `max_groups`; 0: no cap.
    pub(crate) max_groups: u64,
    /// Whether other nodes create handles in the same store (count it again now
    /// and then).
    pub(crate) recount: bool,
}

impl Groups {
    /// The service over `parts`.
    pub(crate) fn new(parts: GroupsParts) -> Self {
        let lock_slots = parts
            .groups
            .lock_slots()
            .map(|n| tokio::sync::Semaphore::new(n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)));
        Groups {
            accounts: parts.accounts,
            packages: parts.packages,
            groups: parts.groups,
            commit: parts.commit,
            rates: parts.rates,
            budget: parts.budget,
            tombstones: parts.tombstones,
            clock: parts.clock,
            locks: HandleLocks::default(),
            lock_slots,
            idle_days: parts.idle_days,
            max_groups: parts.max_groups,
            recount: parts.recount,
            count: Mutex::new(None),
        }
    }

    /// The UTC day now.
    fn today(&self) -> u32 {
        u32::try_from(self.clock.now() / DAY_MS).unwrap_or(u32::MAX)
    }

    /// Deletes up to `max` group handles not touched for `group_idle_days`; returns
    /// how many. The deletions become durable with the next flush: one lost to a
    /// crash is swept again.
    pub(crate) fn sweep(&self, max: usize) -> crate::Result<u64> {
        if self.idle_days == 0 {
            return Ok(0);
        }
        let before = self.today().saturating_sub(self.idle_days);
        let swept = self.groups.sweep_groups(before, max)?;
        if let Some((n, _)) = crate::locks::lock(&self.count).as_mut() {
            *n = n.saturating_sub(swept);
        }
        Ok(swept)
    }

    /// Takes room for one more handle under `max_groups`; `Err(StorageFull)` when
    /// there is none. [`Groups::release_room`] gives it back if the create fails.
    fn take_room(&self) -> crate::Result<()> {
        if self.max_groups == 0 {
            return Ok(());
        }
        // Held across a recount in the store: waited for off the worker.
        let mut count = crate::locks::lock(&self.count);
        let now = self.clock.now();
        let (counted, at) = match *count {
            Some((n, at)) if !self.recount || now.saturating_sub(at) < RECOUNT_MS => (n, at),
            // A recount that fails keeps the tally for another period rather than
            // failing this create and every one after it.
            Some((n, _)) => (self.groups.count_groups().unwrap_or(n), now),
            None => (self.groups.count_groups()?, now),
        };
        if counted >= self.max_groups {
            *count = Some((counted, at));
            return Err(crate::Error::StorageFull {
                what: "the relay's group handles are at their cap",
                retry_after_ms: crate::core::budget::RETRY_AFTER_MS,
            });
        }
        *count = Some((counted + 1, at));
        Ok(())
    }

    /// Counts a handle a commit stored again after the sweep deleted it.
    fn tally_restored(&self) {
        if let Some((n, _)) = crate::locks::lock(&self.count).as_mut() {
            *n = n.saturating_add(1);
        }
    }

    /// Gives back what [`Groups::take_room`] took, for a create that stored nothing.
    fn release_room(&self) {
        if let Some((n, _)) = crate::locks::lock(&self.count).as_mut() {
            *n = n.saturating_sub(1);
        }
    }
}

/// One async lock per group handle with a commit in progress on this node; an entry
/// lives only while someone holds or waits for it.
#[derive(Default)]
struct HandleLocks(Mutex<HashMap<HandleBytes, Arc<tokio::sync::Mutex<()>>>>);

/// A held handle lock; drops its entry when no one else wants it.
struct HandleGuard<'a> {
    locks: &'a HandleLocks,
    handle: HandleBytes,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl HandleLocks {
    async fn lock(&self, handle: HandleBytes) -> HandleGuard<'_> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(handle).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        HandleGuard {
            locks: self,
            handle,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for HandleGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Only the map holds it now: no one waits.
        if map
            .get(&self.handle)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.handle);
        }
    }
}
