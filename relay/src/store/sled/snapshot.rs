//! A copy of the sled database taken while the relay serves (the sled part of
//! `store::backup`).

use std::path::Path;

use super::{backend, SledStore};
use crate::store::{StoreError, StoreResult};

/// The copy's page cache.
const SNAPSHOT_CACHE_BYTES: u64 = 32 << 20;

impl SledStore {
    /// Copies every tree, record by record, into a new database at `dest` (which must
    /// not exist), flushed. Each record the store held before this call, and did not
    /// remove during it, is in the copy; one written during the copy may be, or not.
    /// Returns the records copied.
    pub fn snapshot_into(&self, dest: &Path) -> StoreResult<u64> {
        if dest.exists() {
            return Err(StoreError::Backend(format!(
                "backup: {} exists",
                dest.display()
            )));
        }
        let copy = sled::Config::new()
            .path(dest)
            // Written once and closed: sled's default 1 GiB cache beside the relay's
            // own would only cost memory.
            .cache_capacity(SNAPSHOT_CACHE_BYTES)
            .create_new(true)
            .open()
            .map_err(backend)?;
        let mut records = 0;
        for name in self.db.tree_names() {
            let from = self.db.open_tree(&name).map_err(backend)?;
            let to = copy.open_tree(&name).map_err(backend)?;
            for kv in from.iter() {
                let (k, v) = kv.map_err(backend)?;
                to.insert(k, v).map_err(backend)?;
                records += 1;
            }
        }
        copy.flush().map_err(backend)?;
        Ok(records)
    }
}
