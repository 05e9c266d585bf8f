//! Records in memory, for tests: nothing survives the process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{KvStore, Namespace, Op, StoreResult};

type Records = BTreeMap<(Namespace, Vec<u8>), Vec<u8>>;

/// A [`KvStore`] in memory.
#[derive(Debug, Default)]
pub struct MemoryKv(Mutex<Records>);

impl MemoryKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Records> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvStore for MemoryKv {
    fn get(&self, ns: Namespace, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.map().get(&(ns, key.to_vec())).cloned())
    }

    fn scan(&self, ns: Namespace) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .map()
            .range((ns, Vec::new())..)
            .take_while(|((n, _), _)| *n == ns)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, ops: Vec<Op>, _durable: bool) -> StoreResult<()> {
        let mut map = self.map();
        for op in ops {
            match op {
                Op::Put(ns, k, v) => map.insert((ns, k), v),
                Op::Delete(ns, k) => map.remove(&(ns, k)),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::rules(&super::MemoryKv::new());
    }
}
