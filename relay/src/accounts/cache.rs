//! What a send checks about its recipient's account (its delivery token and device
//! ids), kept for [`TTL`]: on a shared database each check was two statements per
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
pub const TTL: Duration = Duration::from_secs(1);

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
}

/// A cached answer: the account (`None`: it does not exist) and when it was loaded.
pub(super) type Hit = (Option<Arc<Known>>, Instant);

/// See the module docs.
#[derive(Default)]
pub(super) struct RecipientCache {
    entries: Mutex<HashMap<AccountId, Hit>>,
}

impl RecipientCache {
    /// The entry for `account`, if one younger than [`TTL`] is kept.
    pub(super) fn get(&self, account: &AccountId) -> Option<Hit> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(account)
            .filter(|(_, at)| at.elapsed() < TTL)
            .cloned()
    }

    /// Keeps `known` for `account`, loaded at `at`.
    pub(super) fn put(&self, account: AccountId, known: Option<Arc<Known>>, at: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(account);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or_default()
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
        }));
        cache.put(id(1), known.clone(), Instant::now());
        assert_eq!(cache.get(&id(1)).map(|h| h.0), Some(known));
        cache.forget(&id(1));
        assert!(cache.get(&id(1)).is_none());

        let old = Instant::now()
            .checked_sub(TTL)
            .expect("an instant a TTL ago");
        cache.put(id(2), None, old);
        assert!(cache.get(&id(2)).is_none(), "an expired entry is a miss");
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
            cache.put(account(i), None, Instant::now());
            assert!(cache.len() <= CAPACITY);
        }
        assert!(
            cache.get(&account(last)).is_some(),
            "the newest entry is kept"
        );
    }
}
