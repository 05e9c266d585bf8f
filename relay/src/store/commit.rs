//! Group commit: concurrent writers share fsyncs. It makes every store durable (it
//! runs the [`Flush`] of the composed [`super::Stores`]), so it lives with them.
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

use super::{Flush, StoreError};

/// When a send is acknowledged to its sender.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the message is fsynced to disk: survives a power cut.
    #[default]
    Fsync,
    /// After the message is written to the store (for the mailbox log: handed to the
    /// kernel), without waiting for a flush; the stores flush every 500 ms. With the
    /// log, a crash of the relay process loses nothing; a crash of the machine can lose
    /// the last half second of acknowledged messages.
    Os,
}

/// What a commit waits for: every store, or the mailboxes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    All,
    Mailboxes,
}

type Waiter = (Scope, oneshot::Sender<Result<(), StoreError>>);

/// Shares flushes between concurrent writers. See the module docs.
pub struct GroupCommit {
    mode: Durability,
    flush: Arc<dyn Flush>,
    tx: Option<mpsc::Sender<Waiter>>,
    flushes: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("mode", &self.mode)
            .field("flushes", &self.flushes())
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the flusher thread running `flush` (only needed for `Durability::Fsync`).
    pub fn start(flush: Arc<dyn Flush>, mode: Durability) -> std::io::Result<Self> {
        let flushes = Arc::new(AtomicU64::new(0));
        if mode == Durability::Os {
            return Ok(GroupCommit {
                mode,
                flush,
                tx: None,
                flushes,
                thread: None,
            });
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let (counter, run) = (flushes.clone(), flush.clone());
        let thread = thread::Builder::new()
            .name("tern-group-commit".into())
            .spawn(move || flusher(&run, &rx, &counter))?;
        Ok(GroupCommit {
            mode,
            flush,
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
        self.commit_scoped(Scope::All).await
    }

    /// [`GroupCommit::commit`] for a writer that changed only mailboxes: it does not
    /// fail because another store could not flush.
    pub async fn commit_mailboxes(&self) -> Result<(), StoreError> {
        self.commit_scoped(Scope::Mailboxes).await
    }

    async fn commit_scoped(&self, scope: Scope) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let waited = std::time::Instant::now();
        let (done, wait) = oneshot::channel();
        tx.send((scope, done))
            .map_err(|_| StoreError::Backend("group commit stopped".into()))?;
        let answer = wait.await;
        crate::metrics::commit_wait(waited.elapsed());
        match answer {
            Ok(Ok(())) => Ok(()),
            // NoSpace stays NoSpace: a full disk at flush is refused as one at write.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Backend("group commit stopped".into())),
        }
    }

    /// Flushes now, whatever the durability (for shutdown).
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.flush.flush()
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

fn flusher(flush: &Arc<dyn Flush>, rx: &mpsc::Receiver<Waiter>, flushes: &AtomicU64) {
    // Ends when every sender is dropped.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let began = std::time::Instant::now();
        let (mailboxes, rest) = flush.flush_parts();
        crate::metrics::group_commit(batch.len(), began.elapsed());
        let all = mailboxes.clone().and(rest);
        flushes.fetch_add(1, Ordering::Relaxed);
        for (scope, w) in batch {
            let _ = w.send(match scope {
                Scope::All => all.clone(),
                Scope::Mailboxes => mailboxes.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A flush that takes as long as a slow disk's.
    struct SlowFlush;

    impl Flush for SlowFlush {
        fn flush(&self) -> Result<(), StoreError> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
    }

    fn slow_flush() -> Arc<dyn Flush> {
        Arc::new(SlowFlush)
    }

    #[tokio::test]
    async fn concurrent_commits_share_flushes() {
        let gc = Arc::new(GroupCommit::start(slow_flush(), Durability::Fsync).expect("start"));
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

    /// Mailboxes that flush, and a rest that cannot (sled after an I/O error).
    struct RestFails;

    impl Flush for RestFails {
        fn flush(&self) -> Result<(), StoreError> {
            let (m, r) = self.flush_parts();
            m.and(r)
        }
        fn flush_parts(&self) -> (Result<(), StoreError>, Result<(), StoreError>) {
            (Ok(()), Err(StoreError::NoSpace))
        }
    }

    #[tokio::test]
    async fn a_failing_rest_fails_its_commits_and_not_the_mailboxes() {
        let gc = GroupCommit::start(Arc::new(RestFails), Durability::Fsync).expect("start");
        gc.commit_mailboxes().await.expect("sends and acks go on");
        assert!(matches!(gc.commit().await, Err(StoreError::NoSpace)));
        gc.commit_mailboxes().await.expect("still");
    }

    #[tokio::test]
    async fn os_durability_never_flushes() {
        let gc = GroupCommit::start(slow_flush(), Durability::Os).expect("start");
        gc.commit().await.expect("commit");
        assert_eq!(gc.flushes(), 0);
    }
}
