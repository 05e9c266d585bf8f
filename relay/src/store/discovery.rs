//! The discovery tag store: which account holds which tag, whether it can be found,
//! and the evaluation buckets. No phone number, and no hash or prefix of one anyone
//! can compute, is ever given to a store: a tag (and the number bucket's key, a hash
//! of the tag) is a keyed pseudonym of the number, linkable to it only with the
//! relay's OPRF key (kept apart, in the data directory's `discovery-oprf-key`).

use std::collections::HashMap;

use tern_platform::clock::UnixMillis;
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::AccountId;

use super::{MemoryStore, StoreResult};

/// How long a number's bucket outlives the account that held the number, at most
/// (from the first [`DiscoveryStore::sweep_number_buckets`] after the detach): 30
/// days. It stays so that deleting the account and verifying the number again does
/// not refill the bucket at once; it goes earlier once it has refilled.
pub const DETACHED_NUMBER_RETENTION_MS: u64 = 30 * super::DAY_MS;

/// The key of a tag's number bucket, as every backend stores it: a hash of the tag
/// (what `admin migrate` copies from sled into PostgreSQL, so one definition).
pub(crate) fn number_bucket_hash(tag: &Tag) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"tern discovery number bucket v1\0");
    h.update(tag.0);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// What the relay keeps for a verified number's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRecord {
    /// The account that verified the number.
    pub account: AccountId,
    /// The tag's filter key, published while `discoverable`.
    pub key: FilterKey,
    /// Whether lookups find the account and the filter holds its key.
    pub discoverable: bool,
    /// When the number was verified, rounded down to the start of its UTC day.
    pub verified_at: UnixMillis,
}

/// Tags of verified numbers. Values are not secret on their own, but a tag is a
/// person's number to whoever also holds the OPRF key: never log them.
///
/// Contract: every call is atomic; `attach` keeps one tag per account and one account
/// per tag; `detach` really deletes (tag, record and account bucket) and leaves the
/// number's bucket only until [`DiscoveryStore::sweep_number_buckets`] removes it.
pub trait DiscoveryStore: Send + Sync + 'static {
    /// Atomically gives `tag` to `account`: drops the account's previous tag (its
    /// number bucket is then detached, as by `detach`) and the tag's previous owner
    /// (a number moved to a new account). The tag's number bucket, if detached, is
    /// held again. Returns that previous owner when it is another account.
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>>;
    /// The record of a tag.
    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>>;
    /// The account's tag and its record, if the record names the account.
    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>>;
    /// Sets whether the account can be found; false if it has no tag.
    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool>;
    /// Removes the account's tag, its record and its bucket (account deletion, P7),
    /// and marks the number's bucket detached: the sweep removes it once refilled,
    /// or [`DETACHED_NUMBER_RETENTION_MS`] after it first sees it. Idempotent.
    fn detach(&self, account: &AccountId) -> StoreResult<()>;
    /// Looks at the detached number buckets (one per number detached in the last
    /// 30 days at most): removes those refilled by `now` (TAT ≤ `now`) or past their
    /// expiry, and gives those seen for the first time the expiry
    /// `now + DETACHED_NUMBER_RETENTION_MS`; at most `max` changes a call. Returns
    /// how many buckets it removed.
    fn sweep_number_buckets(&self, now: UnixMillis, max: usize) -> StoreResult<usize>;
    /// Whether any account holds a tag (made with the OPRF key in use).
    fn holds_tags(&self) -> StoreResult<bool>;
    /// The filter keys of every discoverable tag, in any order.
    fn discoverable_keys(&self) -> StoreResult<Vec<u64>>;
    /// The account's evaluation bucket: its GCRA theoretical arrival time (Unix ms).
    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>>;
    /// The evaluation bucket of a verified number, by its tag: it follows the number
    /// from account to account, and outlives `detach` for a while (see there). An
    /// entry whose time has passed is a full bucket, the same as none.
    fn number_bucket(&self, tag: &Tag) -> StoreResult<Option<u64>>;
    /// Stores one charge: the account's bucket and its number's, both at once.
    fn set_buckets(
        &self,
        account: &AccountId,
        account_tat: u64,
        tag: &Tag,
        number_tat: u64,
    ) -> StoreResult<()>;
}

/// [`MemoryStore`]'s discovery tables.
#[derive(Debug, Default)]
pub(super) struct MemDiscovery {
    tags: HashMap<Tag, TagRecord>,
    accounts: HashMap<AccountId, Tag>,
    buckets: HashMap<AccountId, u64>,
    number_buckets: HashMap<Tag, u64>,
    /// Detached number buckets → their expiry (0: not seen by a sweep yet).
    detached: HashMap<Tag, u64>,
}

impl MemDiscovery {
    fn detach_number(&mut self, tag: Tag) {
        if self.number_buckets.contains_key(&tag) {
            self.detached.entry(tag).or_insert(0);
        }
    }
}

impl MemoryStore {
    fn discovery(&self) -> std::sync::MutexGuard<'_, MemDiscovery> {
        // Every method finishes its updates before it could panic.
        self.discovery.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DiscoveryStore for MemoryStore {
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>> {
        let mut d = self.discovery();
        if let Some(old) = d.accounts.remove(account) {
            d.tags.remove(&old);
            if old != *tag {
                d.detach_number(old);
            }
        }
        d.detached.remove(tag);
        let previous = d.tags.insert(*tag, *rec).map(|r| r.account);
        if let Some(p) = previous {
            d.accounts.remove(&p);
        }
        d.accounts.insert(*account, *tag);
        Ok(previous.filter(|p| p != account))
    }

    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>> {
        Ok(self.discovery().tags.get(tag).copied())
    }

    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>> {
        let d = self.discovery();
        Ok(d.accounts.get(account).and_then(|t| {
            d.tags
                .get(t)
                .filter(|r| r.account == *account)
                .map(|r| (*t, *r))
        }))
    }

    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool> {
        let mut d = self.discovery();
        let Some(tag) = d.accounts.get(account).copied() else {
            return Ok(false);
        };
        Ok(match d.tags.get_mut(&tag) {
            Some(r) => {
                r.discoverable = on;
                true
            }
            None => false,
        })
    }

    fn detach(&self, account: &AccountId) -> StoreResult<()> {
        let mut d = self.discovery();
        if let Some(tag) = d.accounts.remove(account) {
            d.tags.remove(&tag);
            d.detach_number(tag);
        }
        d.buckets.remove(account);
        Ok(())
    }

    fn sweep_number_buckets(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let mut d = self.discovery();
        let seen: Vec<(Tag, u64)> = d.detached.iter().map(|(t, e)| (*t, *e)).collect();
        let (mut removed, mut changes) = (0, 0);
        for (tag, expiry) in seen {
            if changes >= max {
                break;
            }
            let tat = d.number_buckets.get(&tag).copied();
            if tat.is_none_or(|t| t <= now) || (expiry != 0 && expiry <= now) {
                changes += 1;
                d.detached.remove(&tag);
                if d.number_buckets.remove(&tag).is_some() {
                    removed += 1;
                }
            } else if expiry == 0 {
                changes += 1;
                d.detached
                    .insert(tag, now.saturating_add(DETACHED_NUMBER_RETENTION_MS));
            }
        }
        Ok(removed)
    }

    fn holds_tags(&self) -> StoreResult<bool> {
        Ok(!self.discovery().tags.is_empty())
    }

    fn discoverable_keys(&self) -> StoreResult<Vec<u64>> {
        Ok(self
            .discovery()
            .tags
            .values()
            .filter(|r| r.discoverable)
            .map(|r| r.key.0)
            .collect())
    }

    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>> {
        Ok(self.discovery().buckets.get(account).copied())
    }

    fn number_bucket(&self, tag: &Tag) -> StoreResult<Option<u64>> {
        Ok(self.discovery().number_buckets.get(tag).copied())
    }

    fn set_buckets(
        &self,
        account: &AccountId,
        account_tat: u64,
        tag: &Tag,
        number_tat: u64,
    ) -> StoreResult<()> {
        let mut d = self.discovery();
        d.buckets.insert(*account, account_tat);
        d.number_buckets.insert(*tag, number_tat);
        Ok(())
    }
}
