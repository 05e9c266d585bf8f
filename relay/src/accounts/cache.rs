//! What a send checks about its recipient's account (its delivery token, device ids
//! and device list version), kept for [`TTL`]: on a shared database each check was two statements per
//! message, the most of any step of a send.
//!
//! Changes made through this node's [`super::Accounts`] drop the entry at once. A
//! change made on another node is seen within [`TTL`]: a rotated delivery token
//! still opens sealed sends for at most that long. A device added elsewhere is seen
//! within [`RELOAD_AFTER`] (a device missing from an entry reloads it). A deleted account is
//! refused by the mailboxes themselves (tombstones, or the shared writer's account
//! check), whatever is cached. Absent accounts are cached too, so a probe of a hot
//! account takes as long as one of an account that does not exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_proto::{AccountId, DeviceId};

/// How long an entry is used.
pub(super) const TTL: Duration = Duration::from_secs(1);

/// A device missing from an entry younger than this is not reloaded (a flood of sends
/// to made-up device ids costs one load per interval, not one per send).
pub(super) const RELOAD_AFTER: Duration = Duration::from_millis(100);

/// Entries at most; when full, expired ones go, and if none has, all do.
const CAPACITY: usize = 16_384;

/// An account as a send checks it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Known {
    /// SHA-256 of its delivery token, if it set one.
    pub(super) token: Option<[u8; 32]>,
    /// Its device ids.
    pub(super) devices: Vec<DeviceId>,
    /// Its device list's version (0: none published). A send from a sender holding
    /// an older one is refused; on another node's change, for at most [`TTL`] the
    /// older version still passes.
    pub(super) list_version: u64,
}

/// A cached answer: the account (`None`: it does not exist) and when it was loaded.
pub(super) type Hit = (Option<Arc<Known>>, Instant);

/// See the module docs.
#[derive(Default)]
pub(super) struct RecipientCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<AccountId, Hit>,
    /// Changes made here so far: a load that began before one keeps nothing (it may
    /// have read what the change replaced).
    changes: u64,
}

impl RecipientCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `account`, if one younger than [`TTL`] is kept.
    pub(super) fn get(&self, account: &AccountId) -> Option<Hit> {
        self.lock()
            .entries
            .get(account)
            .filter(|(_, at)| at.elapsed() < TTL)
            .cloned()
    }

    /// What to pass to [`RecipientCache::put`] for a load that begins now.
    pub(super) fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// Keeps `known` for `account`, loaded at `at`, unless a change was made here
    /// since the load began (`changes` then).
    pub(super) fn put(
        &self,
        account: AccountId,
        known: Option<Arc<Known>>,
        at: Instant,
        changes: u64,
    ) {
        let mut inner = self.lock();
        if inner.changes != changes {
            return;
        }
        let entries = &mut inner.entries;
        if entries.len() >= CAPACITY && !entries.contains_key(&account) {
            entries.retain(|_, (_, loaded)| loaded.elapsed() < TTL);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(account, (known, at));
    }

    /// Drops `account`'s entry (changed here).
    pub(super) fn forget(&self, account: &AccountId) {
        let mut inner = self.lock();
        inner.changes += 1;
        inner.entries.remove(account);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> AccountId {
        AccountId([i; 16])
    }

    #[test]
    fn entries_expire_after_the_ttl_and_can_be_forgotten() {
        let cache = RecipientCache::default();
        let known = Some(Arc::new(Known {
            token: Some([1; 32]),
            devices: vec![DeviceId::PRIMARY],
            list_version: 3,
        }));
        cache.put(id(1), known.clone(), Instant::now(), cache.changes());
        assert_eq!(cache.get(&id(1)).map(|h| h.0), Some(known));
        cache.forget(&id(1));
        assert!(cache.get(&id(1)).is_none());

        let old = Instant::now()
            .checked_sub(TTL)
            .expect("an instant a TTL ago");
        cache.put(id(2), None, old, cache.changes());
        assert!(cache.get(&id(2)).is_none(), "an expired entry is a miss");
    }

    #[test]
    fn a_load_that_began_before_a_change_here_keeps_nothing() {
        let cache = RecipientCache::default();
        let began = cache.changes();
        cache.forget(&id(3));
        cache.put(id(3), None, Instant::now(), began);
        assert!(cache.get(&id(3)).is_none());
        cache.put(id(3), None, Instant::now(), cache.changes());
        assert!(cache.get(&id(3)).is_some());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = RecipientCache::default();
        let account = |i: u32| {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&i.to_le_bytes());
            AccountId(a)
        };
        let last = CAPACITY as u32 + 10;
        for i in 0..=last {
            cache.put(account(i), None, Instant::now(), cache.changes());
            assert!(cache.len() <= CAPACITY);
        }
        assert!(
            cache.get(&account(last)).is_some(),
            "the newest entry is kept"
        );
    }
}
