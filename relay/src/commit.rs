//! Group commit: concurrent writers share fsyncs.
//!
//! A writer first applies its change to the store (visible, not yet durable), then
//! awaits [`GroupCommit::commit`]. One flusher thread takes every waiter that has
//! arrived, runs one `flush`, and answers them all; waiters that arrive during that
//! flush share the next one. A flush costs about the same for one message as for a
//! thousand, so throughput scales with concurrency instead of being capped at one
//! message per fsync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::store::{MailboxStore, StoreError};

/// When a send is acknowledged to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the message is fsynced to disk: survives a power cut.
    #[default]
    Fsync,
    /// After the message is written to the database, without waiting for a flush; the
    /// database flushes every 500 ms. A crash of the relay process or the machine can
    /// lose the last half second of acknowledged messages (the kill -9 test shows it).
    Os,
}

type Waiter = oneshot::Sender<Result<(), String>>;

/// Shares flushes between concurrent writers. See the module docs.
#[derive(Debug)]
pub struct GroupCommit {
    mode: Durability,
    tx: Option<mpsc::Sender<Waiter>>,
    flushes: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flusher thread for `store` (only needed for `Durability::Fsync`).
    pub fn start(store: Arc<dyn MailboxStore>, mode: Durability) -> std::io::Result<Self> {
        let flushes = Arc::new(AtomicU64::new(0));
        if mode == Durability::Os {
            return Ok(GroupCommit {
                mode,
                tx: None,
                flushes,
                thread: None,
            });
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let counter = flushes.clone();
        let thread = thread::Builder::new()
            .name("tern-group-commit".into())
            .spawn(move || flusher(&*store, &rx, &counter))?;
        Ok(GroupCommit {
            mode,
            tx: Some(tx),
            flushes,
            thread: Some(thread),
        })
    }

    /// The configured durability.
    pub fn mode(&self) -> Durability {
        self.mode
    }

    /// Resolves once every change applied before this call is durable as configured.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        tx.send(done)
            .map_err(|_| StoreError::Backend("group commit stopped".into()))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Backend(e)),
            Err(_) => Err(StoreError::Backend("group commit stopped".into())),
        }
    }

    /// Flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn flusher(store: &dyn MailboxStore, rx: &mpsc::Receiver<Waiter>, flushes: &AtomicU64) {
    // Ends when every sender is dropped.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = store.flush().map_err(|e| e.to_string());
        flushes.fetch_add(1, Ordering::Relaxed);
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::UnixMillis;
    use crate::store::{Expired, MemoryStore, NewMessage, StoreResult, StoredMessage, Usage};
    use std::time::Duration;
    use tern_proto::DeviceAddress;

    /// A store whose flush takes as long as a slow disk's.
    struct SlowFlush(MemoryStore);

    impl MailboxStore for SlowFlush {
        fn append(
            &self,
            to: &DeviceAddress,
            m: &[NewMessage],
            a: UnixMillis,
            e: UnixMillis,
        ) -> StoreResult<Vec<u64>> {
            self.0.append(to, m, a, e)
        }
        fn read(
            &self,
            of: &DeviceAddress,
            after: u64,
            max: usize,
        ) -> StoreResult<Vec<StoredMessage>> {
            self.0.read(of, after, max)
        }
        fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
            self.0.remove(of, seqs)
        }
        fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
            self.0.usage(of)
        }
        fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
            self.0.expired(now, max)
        }
        fn expire(&self, of: &DeviceAddress, e: &[Expired]) -> StoreResult<Usage> {
            self.0.expire(of, e)
        }
        fn flush(&self) -> StoreResult<()> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
    }

    #[tokio::test]
    async fn concurrent_commits_share_flushes() {
        let gc = Arc::new(
            GroupCommit::start(Arc::new(SlowFlush(MemoryStore::new())), Durability::Fsync)
                .expect("start"),
        );
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let gc = gc.clone();
                tokio::spawn(async move { gc.commit().await })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("commit");
        }
        let flushes = gc.flushes();
        assert!(flushes >= 1);
        // 100 waiters, 20 ms per flush: one flush each would be 100.
        assert!(
            flushes <= 10,
            "{flushes} flushes for 100 concurrent commits"
        );
    }

    #[tokio::test]
    async fn os_durability_never_flushes() {
        let gc = GroupCommit::start(Arc::new(SlowFlush(MemoryStore::new())), Durability::Os)
            .expect("start");
        gc.commit().await.expect("commit");
        assert_eq!(gc.flushes(), 0);
    }
}
