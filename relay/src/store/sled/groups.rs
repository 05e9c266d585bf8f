//! Group epochs in sled, in their own `groups` tree; nothing in it names an account:
//!
//! | key | value |
//! |---|---|
//! | `G` handle | epoch, token hash, last commit id, touched day |
//! | `T` touched day handle | (empty): the idle sweep's index |
//!
//! A state and its index entry change in one transaction.

use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{backend, SledStore};
use crate::store::codec::fixed;
use crate::store::{GroupState, GroupStore, HandleBytes, StoreError, StoreResult};

const STATE: u8 = b'G';
const IDLE: u8 = b'T';
const STATE_LEN: usize = 8 + 32 + 16 + 4;

fn state_key(h: &HandleBytes) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = STATE;
    k[1..].copy_from_slice(h);
    k
}

fn idle_key(day: u32, h: &HandleBytes) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = IDLE;
    k[1..5].copy_from_slice(&day.to_be_bytes());
    k[5..].copy_from_slice(h);
    k
}

fn encode(s: &GroupState) -> [u8; STATE_LEN] {
    let mut v = [0u8; STATE_LEN];
    v[..8].copy_from_slice(&s.epoch.to_be_bytes());
    v[8..40].copy_from_slice(&s.token_hash);
    v[40..56].copy_from_slice(&s.last_commit_id);
    v[56..].copy_from_slice(&s.touched_day.to_be_bytes());
    v
}

fn decode(v: &[u8]) -> StoreResult<GroupState> {
    if v.len() != STATE_LEN {
        return Err(StoreError::Corrupt("group state"));
    }
    Ok(GroupState {
        epoch: u64::from_be_bytes(fixed(&v[..8])?),
        token_hash: fixed(&v[8..40])?,
        last_commit_id: fixed(&v[40..56])?,
        touched_day: u32::from_be_bytes(fixed(&v[56..])?),
    })
}

type TxResult<T> = Result<T, TransactionError<StoreError>>;

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Storage(e) => backend(e),
        TransactionError::Abort(e) => e,
    }
}

impl SledStore {
    /// Replaces the handle's state `from` (`None`: absent) with `to` (`None`: delete)
    /// and its index entry, if the stored state is still `from`; whether it did.
    fn swap_group(
        &self,
        h: &HandleBytes,
        from: Option<&GroupState>,
        to: Option<&GroupState>,
    ) -> StoreResult<bool> {
        let done: TxResult<bool> = self.groups.transaction(|t| {
            let now = t.get(state_key(h))?;
            let now = now
                .map(|v| decode(&v))
                .transpose()
                .map_err(ConflictableTransactionError::Abort)?;
            if now.as_ref() != from {
                return Ok(false);
            }
            if let Some(f) = from {
                t.remove(&idle_key(f.touched_day, h)[..])?;
            }
            match to {
                Some(s) => {
                    t.insert(&state_key(h)[..], &encode(s)[..])?;
                    t.insert(&idle_key(s.touched_day, h)[..], &[][..])?;
                }
                None => {
                    t.remove(&state_key(h)[..])?;
                }
            }
            Ok(true)
        });
        done.map_err(tx_error)
    }
}

impl GroupStore for SledStore {
    fn insert_group(&self, handle: &HandleBytes, state: &GroupState) -> StoreResult<()> {
        if self.swap_group(handle, None, Some(state))? {
            Ok(())
        } else {
            Err(StoreError::Exists)
        }
    }

    fn group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupState>> {
        self.groups
            .get(state_key(handle))
            .map_err(backend)?
            .map(|v| decode(&v))
            .transpose()
    }

    fn advance_group(
        &self,
        handle: &HandleBytes,
        from: &GroupState,
        to: &GroupState,
    ) -> StoreResult<bool> {
        self.swap_group(handle, Some(from), Some(to))
    }

    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64> {
        let end = idle_key(before_day, &[0; 16]);
        let mut idle = Vec::new();
        for kv in self.groups.range(&[IDLE][..]..&end[..]).take(max) {
            let (k, _) = kv.map_err(backend)?;
            let handle: HandleBytes = fixed(k.get(5..).unwrap_or_default())?;
            idle.push(handle);
        }
        let mut swept = 0;
        for h in &idle {
            // A commit may have touched it since the scan: only a state still idle goes.
            if let Some(s) = self.group(h)? {
                if s.touched_day < before_day && self.swap_group(h, Some(&s), None)? {
                    swept += 1;
                }
            }
        }
        Ok(swept)
    }

    fn count_groups(&self) -> StoreResult<u64> {
        // A scan of the state keys (the service counts once per process).
        let mut n = 0u64;
        for kv in self.groups.scan_prefix([STATE]).keys() {
            kv.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    fn groups_after(
        &self,
        after: Option<&HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(HandleBytes, GroupState)>> {
        let start = match after {
            // The key right after `after`'s: its own key with a zero byte appended.
            Some(a) => {
                let mut k = state_key(a).to_vec();
                k.push(0);
                k
            }
            None => vec![STATE],
        };
        let mut out = Vec::new();
        for kv in self.groups.range(start..).take(max) {
            let (k, v) = kv.map_err(backend)?;
            if k.first() != Some(&STATE) {
                break;
            }
            out.push((fixed(k.get(1..).unwrap_or_default())?, decode(&v)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::store::conformance::{self, addr};
    use crate::store::{Flush, GroupState, GroupStore, KeyPackageStore, SledStore};

    fn open(dir: &std::path::Path) -> SledStore {
        SledStore::open(dir, 8 << 20).expect("open")
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        conformance::key_package_rules(&store);
        conformance::group_rules(&store);
        let store = Arc::new(store);
        conformance::concurrent_key_package_fetches(store.clone());
        conformance::concurrent_advances(store);
    }

    #[test]
    fn key_packages_and_groups_survive_reopen_and_dump_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = addr(30, 2);
        let state = GroupState {
            epoch: 4,
            token_hash: [5; 32],
            last_commit_id: [6; 16],
            touched_day: 7,
        };
        {
            let store = open(dir.path());
            let pool = [Bytes::from_static(b"one"), Bytes::from_static(b"two")];
            store
                .publish_key_packages(&dev, &pool, Some(&Bytes::from_static(b"last")), false)
                .expect("publish");
            store.insert_group(&[8; 16], &state).expect("create");
            store.flush().expect("flush");
        }
        let store = open(dir.path());
        assert_eq!(store.group(&[8; 16]).expect("read"), Some(state));
        let dumped = store.dump_key_packages().expect("dump");
        assert_eq!(dumped.len(), 1);
        assert_eq!(dumped[0].device, dev);
        assert_eq!(dumped[0].one_time, vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(dumped[0].last_resort.as_deref(), Some(&b"last"[..]));
        let taken = store.take_key_package(&dev, true).expect("take");
        assert_eq!(
            taken.map(|t| t.key_package),
            Some(Bytes::from_static(b"one"))
        );
        // After a reopen the generator's ids still sort after the stored ones.
        store
            .publish_key_packages(&dev, &[Bytes::from_static(b"three")], None, false)
            .expect("publish");
        let next = store.take_key_package(&dev, true).expect("take");
        assert_eq!(
            next.map(|t| t.key_package),
            Some(Bytes::from_static(b"two"))
        );
    }

    #[test]
    fn a_corrupt_group_state_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store
            .groups
            .insert(super::state_key(&[1; 16]), &[1u8; 3][..])
            .expect("insert");
        assert!(matches!(
            store.group(&[1; 16]),
            Err(crate::store::StoreError::Corrupt(_))
        ));
    }
}
