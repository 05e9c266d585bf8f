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

mod epochs;
mod key_packages;

#[cfg(test)]
mod pg_tests;
#[cfg(test)]
mod tests;

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
    idle_days: u32,
}

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
}

impl Groups {
    /// The service over `parts`.
    pub(crate) fn new(parts: GroupsParts) -> Self {
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
            idle_days: parts.idle_days,
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
        Ok(self.groups.sweep_groups(before, max)?)
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
