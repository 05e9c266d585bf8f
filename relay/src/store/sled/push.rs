//! Push targets in sled, in their own `push_targets` tree: the key is the device
//! address (account, then device), the value the target as `store/push.rs` encodes it.

use tern_proto::{AccountId, DeviceAddress, PushTarget};

use super::{backend, SledStore};
use crate::store::codec::addr_bytes;
use crate::store::push::{decode, encode};
use crate::store::{PushStore, StoreResult};

impl PushStore for SledStore {
    fn put_push_target(&self, of: &DeviceAddress, target: &PushTarget) -> StoreResult<()> {
        self.push_targets
            .insert(addr_bytes(of), encode(target))
            .map_err(backend)?;
        Ok(())
    }

    fn push_target(&self, of: &DeviceAddress) -> StoreResult<Option<PushTarget>> {
        let v = self.push_targets.get(addr_bytes(of)).map_err(backend)?;
        v.map(|v| decode(&v)).transpose()
    }

    fn remove_push_target(
        &self,
        of: &DeviceAddress,
        only: Option<&PushTarget>,
    ) -> StoreResult<bool> {
        let key = addr_bytes(of);
        match only {
            None => Ok(self.push_targets.remove(key).map_err(backend)?.is_some()),
            // Atomic: a target the device registered since stays.
            Some(t) => Ok(self
                .push_targets
                .compare_and_swap(key, Some(encode(t)), None::<&[u8]>)
                .map_err(backend)?
                .is_ok()),
        }
    }

    fn remove_account_push_targets(&self, account: &AccountId) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for kv in self.push_targets.scan_prefix(account.as_bytes()) {
            let (k, _) = kv.map_err(backend)?;
            batch.remove(k);
        }
        self.push_targets.apply_batch(batch).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::conformance::{self, addr};
    use crate::store::{Flush, PushStore, SledStore};

    #[test]
    fn conformance_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path(), 8 << 20).expect("open");
            conformance::push_rules(&store);
            store
                .put_push_target(&addr(40, 1), &conformance::gateway("kept"))
                .expect("put");
            store.flush().expect("flush");
        }
        let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
        assert_eq!(
            store.push_target(&addr(40, 1)).expect("read"),
            Some(conformance::gateway("kept"))
        );
    }
}
