//! The MLS state over the device's encrypted [`KvStore`], with *staged* writes.
//!
//! mls-rs writes its group state and key-package secrets through
//! [`GroupStateStorage`] and [`KeyPackageStorage`]. [`StagedMlsStore`] reads from the
//! `KvStore` but only stages writes; the caller drains them
//! ([`StagedMlsStore::take`]) into the same atomic `KvStore::apply` as the effect
//! (the inbox record, the outbox ciphertext), so a crash never keeps a ratchet
//! advance without its ciphertext, or the reverse. Reads see staged writes first.
//! Prior-epoch records are trimmed to the last [`KEPT_EPOCHS`].

use std::sync::{Arc, Mutex, MutexGuard};

use mls_rs::error::IntoAnyError;
use mls_rs::mls_rs_codec::{MlsDecode, MlsEncode};
use mls_rs::{GroupStateStorage, KeyPackageStorage};
use mls_rs_core::group::{EpochRecord, GroupState};
use mls_rs_core::key_package::KeyPackageData;
use prost::Message;
use zeroize::Zeroizing;

use crate::store::records::{mls_epoch_key, MlsStateRecord};
use crate::store::{KvStore, Namespace, Op, StoreError, StoreResult};

/// How many prior epochs' secrets a group keeps (late messages of those epochs
/// still decrypt).
pub const KEPT_EPOCHS: u64 = 3;

impl IntoAnyError for StoreError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(Box::new(self))
    }
}

/// MLS storage over a [`KvStore`] whose writes are staged for the caller's batch.
/// Clones share the staged writes.
#[derive(Clone)]
pub struct StagedMlsStore {
    kv: Arc<dyn KvStore>,
    staged: Arc<Mutex<Vec<Op>>>,
}

impl std::fmt::Debug for StagedMlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedMlsStore")
            .field("staged", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl StagedMlsStore {
    /// A store over `kv` with nothing staged.
    pub fn new(kv: Arc<dyn KvStore>) -> Self {
        StagedMlsStore {
            kv,
            staged: Arc::default(),
        }
    }

    /// The device store underneath.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Op>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every staged write, for the caller's atomic batch.
    pub fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.lock())
    }

    /// Drops every staged write (the operation that staged them failed).
    pub fn discard(&self) {
        self.lock().clear();
    }

    /// Whether writes are staged.
    pub fn has_staged(&self) -> bool {
        !self.lock().is_empty()
    }

    /// A record as it will be once the staged writes are applied.
    pub(crate) fn get(&self, ns: Namespace, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let staged = self.lock();
        for op in staged.iter().rev() {
            match op {
                Op::Put(n, k, v) if *n == ns && k == key => return Ok(Some(v.clone())),
                Op::Delete(n, k) if *n == ns && k == key => return Ok(None),
                _ => {}
            }
        }
        drop(staged);
        self.kv.get(ns, key)
    }

    /// Stages one write.
    pub(crate) fn stage(&self, op: Op) {
        let mut staged = self.lock();
        // A later write of the same record replaces an earlier one.
        let (ns, key) = match &op {
            Op::Put(n, k, _) | Op::Delete(n, k) => (*n, k.clone()),
        };
        staged
            .retain(|o| !matches!(o, Op::Put(n, k, _) | Op::Delete(n, k) if *n == ns && *k == key));
        staged.push(op);
    }

    /// The writes that delete every record of a group.
    pub(crate) fn forget_ops(&self, group_id: &[u8]) -> StoreResult<Vec<Op>> {
        let mut ops = vec![
            Op::Delete(Namespace::MlsState, group_id.to_vec()),
            Op::Delete(Namespace::MlsTree, group_id.to_vec()),
        ];
        if let Some(record) = self.state_record(group_id)? {
            for k in record.wrap_keys {
                ops.push(Op::Delete(Namespace::MlsTag, k.tag));
            }
            let end = record.epochs_end;
            for e in end.saturating_sub(KEPT_EPOCHS)..end {
                ops.push(Op::Delete(Namespace::MlsEpoch, mls_epoch_key(group_id, e)));
            }
        }
        Ok(ops)
    }

    pub(crate) fn state_record(&self, group_id: &[u8]) -> StoreResult<Option<MlsStateRecord>> {
        self.get(Namespace::MlsState, group_id)?
            .map(|v| MlsStateRecord::decode(v.as_slice()).map_err(|_| StoreError::Corrupt))
            .transpose()
    }

    pub(crate) fn put_state_record(&self, group_id: &[u8], record: &MlsStateRecord) {
        self.stage(Op::Put(
            Namespace::MlsState,
            group_id.to_vec(),
            record.encode_to_vec(),
        ));
    }
}

impl GroupStateStorage for StagedMlsStore {
    type Error = StoreError;

    fn state(&self, group_id: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        Ok(self
            .state_record(group_id)?
            .filter(|r| !r.snapshot.is_empty())
            .map(|r| Zeroizing::new(r.snapshot)))
    }

    fn epoch(
        &self,
        group_id: &[u8],
        epoch_id: u64,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Self::Error> {
        Ok(self
            .get(Namespace::MlsEpoch, &mls_epoch_key(group_id, epoch_id))?
            .map(Zeroizing::new))
    }

    fn write(
        &mut self,
        state: GroupState,
        epoch_inserts: Vec<EpochRecord>,
        epoch_updates: Vec<EpochRecord>,
    ) -> Result<(), Self::Error> {
        let id = state.id.clone();
        let mut record = self.state_record(&id)?.unwrap_or_default();
        record.snapshot = state.data.to_vec();
        for e in epoch_inserts {
            self.stage(Op::Put(
                Namespace::MlsEpoch,
                mls_epoch_key(&id, e.id),
                e.data.to_vec(),
            ));
            // Epochs arrive one after another: each one in pushes one out.
            if let Some(old) = e.id.checked_sub(KEPT_EPOCHS) {
                self.stage(Op::Delete(Namespace::MlsEpoch, mls_epoch_key(&id, old)));
            }
            record.epochs_end = record.epochs_end.max(e.id + 1);
        }
        for e in epoch_updates {
            if e.id + KEPT_EPOCHS >= record.epochs_end {
                self.stage(Op::Put(
                    Namespace::MlsEpoch,
                    mls_epoch_key(&id, e.id),
                    e.data.to_vec(),
                ));
            }
        }
        self.put_state_record(&id, &record);
        Ok(())
    }

    fn max_epoch_id(&self, group_id: &[u8]) -> Result<Option<u64>, Self::Error> {
        Ok(self
            .state_record(group_id)?
            .and_then(|r| r.epochs_end.checked_sub(1)))
    }
}

impl KeyPackageStorage for StagedMlsStore {
    type Error = StoreError;

    fn delete(&mut self, id: &[u8]) -> Result<(), Self::Error> {
        self.stage(Op::Delete(Namespace::MlsKeyPackage, id.to_vec()));
        Ok(())
    }

    fn insert(&mut self, id: Vec<u8>, pkg: KeyPackageData) -> Result<(), Self::Error> {
        let bytes = pkg
            .mls_encode_to_vec()
            .map_err(|_| StoreError::Backend("key package encoding".into()))?;
        self.stage(Op::Put(Namespace::MlsKeyPackage, id, bytes));
        Ok(())
    }

    fn get(&self, id: &[u8]) -> Result<Option<KeyPackageData>, Self::Error> {
        StagedMlsStore::get(self, Namespace::MlsKeyPackage, id)?
            .map(|v| KeyPackageData::mls_decode(&mut v.as_slice()).map_err(|_| StoreError::Corrupt))
            .transpose()
    }
}
