//! [`DiscoveryStore`] on sled, in the tree `discovery`:
//! - `T` ‖ tag(16) → account(16) ‖ filter key(8, LE) ‖ flags(1: bit 0 discoverable) ‖
//!   verified day start(8, LE, Unix ms)
//! - `A` ‖ account(16) → tag(16)
//! - `B` ‖ account(16) → bucket TAT(8, LE, Unix ms)
//! - `N` ‖ SHA-256("tern discovery number bucket v1\0" ‖ tag)[..16] → the number's
//!   bucket TAT (8, LE, Unix ms). Hashed so that the entry, which outlives the
//!   account's deletion for a while, holds neither tag nor account (it is still a
//!   keyed pseudonym of the number, linkable to it with the OPRF key).
//! - `D` ‖ the same 16 bytes → expiry (8, LE, Unix ms; 0 until a sweep saw it): the
//!   number's bucket is detached (its account was deleted or changed number).
//!
//! No number, no hash of one anyone without the OPRF key can compute. `attach` and
//! `detach` flush before they return (once per verification or deletion); the
//! discoverable setting, bucket writes and sweeps do not: the relay makes them
//! durable with its group commit (one fsync shared by concurrent writers) before
//! it answers the request that made them.

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use tern_proto::discovery::{FilterKey, Tag, TAG_LEN};
use tern_proto::AccountId;

use super::{backend, SledStore};
use tern_platform::clock::UnixMillis;

use crate::store::{
    DiscoveryStore, StoreError, StoreResult, TagRecord, DETACHED_NUMBER_RETENTION_MS,
};

const RECORD_LEN: usize = 16 + 8 + 1 + 8;

fn key(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id);
    k
}

fn tag_key(tag: &Tag) -> Vec<u8> {
    key(b'T', &tag.0)
}

fn account_key(account: &AccountId) -> Vec<u8> {
    key(b'A', account.as_bytes())
}

fn bucket_key(account: &AccountId) -> Vec<u8> {
    key(b'B', account.as_bytes())
}

fn number_bucket_key(tag: &Tag) -> Vec<u8> {
    key(b'N', &crate::store::discovery::number_bucket_hash(tag))
}

fn detached_key(tag: &Tag) -> Vec<u8> {
    let mut k = number_bucket_key(tag);
    k[0] = b'D';
    k
}

/// Marks `tag`'s number bucket detached, if it has one and is not marked yet.
fn detach_number(
    t: &sled::transaction::TransactionalTree,
    tag: &Tag,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if t.get(number_bucket_key(tag))?.is_some() && t.get(detached_key(tag))?.is_none() {
        t.insert(detached_key(tag), &0u64.to_le_bytes()[..])?;
    }
    Ok(())
}

fn encode(rec: &TagRecord) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[..16].copy_from_slice(rec.account.as_bytes());
    out[16..24].copy_from_slice(&rec.key.0.to_le_bytes());
    out[24] = u8::from(rec.discoverable);
    out[25..].copy_from_slice(&rec.verified_at.to_le_bytes());
    out
}

pub(super) fn decode(bytes: &[u8]) -> StoreResult<TagRecord> {
    let b: &[u8; RECORD_LEN] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("discovery tag record"))?;
    let account =
        AccountId::try_from(&b[..16]).map_err(|_| StoreError::Corrupt("discovery tag record"))?;
    let mut k = [0u8; 8];
    k.copy_from_slice(&b[16..24]);
    let mut day = [0u8; 8];
    day.copy_from_slice(&b[25..]);
    Ok(TagRecord {
        account,
        key: FilterKey(u64::from_le_bytes(k)),
        discoverable: b[24] & 1 == 1,
        verified_at: u64::from_le_bytes(day),
    })
}

fn tag_of(bytes: &[u8]) -> StoreResult<Tag> {
    let t: [u8; TAG_LEN] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("discovery account record"))?;
    Ok(Tag(t))
}

fn u64_of(bytes: &[u8]) -> StoreResult<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("discovery bucket"))?;
    Ok(u64::from_le_bytes(b))
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

impl SledStore {
    fn flush_discovery(&self) -> StoreResult<()> {
        self.discovery.flush().map(|_| ()).map_err(backend)
    }
}

impl SledStore {
    /// Writes tags for accounts and tags that hold none yet, in one batch, without
    /// the checks and the flush of [`DiscoveryStore::attach`]: for seeding test and
    /// load data ([`crate::discovery::seed`]) only.
    pub(crate) fn attach_fresh(&self, items: &[(AccountId, Tag, TagRecord)]) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for (account, tag, rec) in items {
            batch.insert(tag_key(tag), &encode(rec)[..]);
            batch.insert(account_key(account), &tag.0[..]);
        }
        self.discovery.apply_batch(batch).map_err(backend)
    }
}

impl DiscoveryStore for SledStore {
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>> {
        let previous = (&self.discovery,)
            .transaction(|(t,)| {
                if let Some(old) = t.remove(account_key(account))? {
                    let old = tag_of(&old).map_err(abort)?;
                    t.remove(tag_key(&old))?;
                    if old != *tag {
                        detach_number(t, &old)?;
                    }
                }
                t.remove(detached_key(tag))?;
                let previous = match t.insert(tag_key(tag), &encode(rec)[..])? {
                    Some(old) => Some(decode(&old).map_err(abort)?.account),
                    None => None,
                };
                if let Some(p) = previous {
                    t.remove(account_key(&p))?;
                }
                t.insert(account_key(account), &tag.0[..])?;
                Ok(previous.filter(|p| p != account))
            })
            .map_err(tx_error)?;
        self.flush_discovery()?;
        Ok(previous)
    }

    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>> {
        match self.discovery.get(tag_key(tag)).map_err(backend)? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>> {
        let Some(t) = self.discovery.get(account_key(account)).map_err(backend)? else {
            return Ok(None);
        };
        let tag = tag_of(&t)?;
        // Only a record that names the account: a stale `A` entry is no tag.
        Ok(self
            .by_tag(&tag)?
            .filter(|r| r.account == *account)
            .map(|r| (tag, r)))
    }

    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool> {
        let changed = (&self.discovery,)
            .transaction(|(t,)| {
                let Some(tag) = t.get(account_key(account))? else {
                    return Ok(false);
                };
                let k = key(b'T', &tag);
                let Some(v) = t.get(&k)? else {
                    return Ok(false);
                };
                let mut rec = decode(&v).map_err(abort)?;
                if rec.discoverable != on {
                    rec.discoverable = on;
                    t.insert(k, &encode(&rec)[..])?;
                }
                Ok(true)
            })
            .map_err(tx_error)?;
        Ok(changed)
    }

    fn detach(&self, account: &AccountId) -> StoreResult<()> {
        (&self.discovery,)
            .transaction(|(t,)| {
                if let Some(tag) = t.remove(account_key(account))? {
                    let tag = tag_of(&tag).map_err(abort)?;
                    t.remove(tag_key(&tag))?;
                    detach_number(t, &tag)?;
                }
                t.remove(bucket_key(account))?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.flush_discovery()
    }

    fn sweep_number_buckets(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let (mut removed, mut changes) = (0, 0);
        for item in self.discovery.scan_prefix([b'D']) {
            if changes >= max {
                break;
            }
            let (dkey, _) = item.map_err(backend)?;
            let mut nkey = dkey.to_vec();
            nkey[0] = b'N';
            // Re-read inside a transaction: an attach may hold the number again.
            let done = (&self.discovery,)
                .transaction(|(t,)| {
                    let Some(expiry) = t.get(&dkey)? else {
                        return Ok(None);
                    };
                    let expiry = u64_of(&expiry).map_err(abort)?;
                    let tat = match t.get(&nkey)? {
                        Some(v) => Some(u64_of(&v).map_err(abort)?),
                        None => None,
                    };
                    if tat.is_none_or(|x| x <= now) || (expiry != 0 && expiry <= now) {
                        t.remove(&dkey)?;
                        Ok(Some(t.remove(nkey.as_slice())?.is_some()))
                    } else if expiry == 0 {
                        let at = now.saturating_add(DETACHED_NUMBER_RETENTION_MS);
                        t.insert(&dkey, &at.to_le_bytes()[..])?;
                        Ok(Some(false))
                    } else {
                        Ok(None)
                    }
                })
                .map_err(tx_error)?;
            if let Some(gone) = done {
                changes += 1;
                removed += usize::from(gone);
            }
        }
        Ok(removed)
    }

    fn holds_tags(&self) -> StoreResult<bool> {
        Ok(self
            .discovery
            .scan_prefix([b'T'])
            .next()
            .transpose()
            .map_err(backend)?
            .is_some())
    }

    fn discoverable_keys(&self) -> StoreResult<Vec<u64>> {
        let mut out = Vec::new();
        for item in self.discovery.scan_prefix([b'T']) {
            let (_, v) = item.map_err(backend)?;
            let rec = decode(&v)?;
            if rec.discoverable {
                out.push(rec.key.0);
            }
        }
        Ok(out)
    }

    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>> {
        match self.discovery.get(bucket_key(account)).map_err(backend)? {
            Some(v) => u64_of(&v).map(Some),
            None => Ok(None),
        }
    }

    fn number_bucket(&self, tag: &Tag) -> StoreResult<Option<u64>> {
        match self
            .discovery
            .get(number_bucket_key(tag))
            .map_err(backend)?
        {
            Some(v) => u64_of(&v).map(Some),
            None => Ok(None),
        }
    }

    fn set_buckets(
        &self,
        account: &AccountId,
        account_tat: u64,
        tag: &Tag,
        number_tat: u64,
    ) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        batch.insert(bucket_key(account), &account_tat.to_le_bytes()[..]);
        batch.insert(number_bucket_key(tag), &number_tat.to_le_bytes()[..]);
        self.discovery.apply_batch(batch).map_err(backend)
    }
}
