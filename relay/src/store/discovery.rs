//! The discovery tag store: which account holds which tag, whether it can be found,
//! and the account's evaluation bucket. No phone number, no hash of one, no prefix of
//! one is ever given to a store: a tag is an OPRF output, useless without the relay's
//! key (kept apart, in the data directory's `discovery-oprf-key`).

use std::collections::HashMap;

use tern_platform::clock::UnixMillis;
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::AccountId;

use super::{MemoryStore, StoreResult};

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
/// per tag; `detach` really deletes (tag, record and bucket).
pub trait DiscoveryStore: Send + Sync + 'static {
    /// Atomically gives `tag` to `account`: drops the account's previous tag and the
    /// tag's previous owner (a number moved to a new account). Returns that previous
    /// owner when it is another account.
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>>;
    /// The record of a tag.
    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>>;
    /// The account's tag and its record.
    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>>;
    /// Sets whether the account can be found; false if it has no tag.
    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool>;
    /// Removes the account's tag, its record and its bucket (account deletion, P7).
    fn detach(&self, account: &AccountId) -> StoreResult<()>;
    /// The filter keys of every discoverable tag, in any order.
    fn discoverable_keys(&self) -> StoreResult<Vec<u64>>;
    /// The account's evaluation bucket: its GCRA theoretical arrival time (Unix ms).
    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>>;
    /// Stores the account's evaluation bucket.
    fn set_bucket(&self, account: &AccountId, tat: u64) -> StoreResult<()>;
    /// The evaluation bucket of a verified number, by its tag: it follows the number
    /// from account to account, and outlives `detach` (it names no account). An entry
    /// whose time has passed is a full bucket, the same as none, and may be dropped.
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
        }
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
        Ok(d.accounts
            .get(account)
            .and_then(|t| d.tags.get(t).map(|r| (*t, *r))))
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
        }
        d.buckets.remove(account);
        Ok(())
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

    fn set_bucket(&self, account: &AccountId, tat: u64) -> StoreResult<()> {
        self.discovery().buckets.insert(*account, tat);
        Ok(())
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
