//! Group commit: concurrent writers share fsyncs. It makes every store durable (it
//! runs the [`Flush`] of the composed [`super::Stores`]), so it lives with them.
//!
//! A writer first applies its change to the store (visible, not yet durable), then
//! awaits [`GroupCommit::commit`]. One flusher thread takes every waiter that has
//! arrived, runs one `flush`, and answers them all; waiters that arrive during that
//! flush share the next one. A flush costs about the same for one message as for a
//! thousand, so throughput scales with concurrency instead of being capped at one
//! message per fsync.
//!
//! At everyday rates few writers meet in one flush, and each flush costs an fsync and
//! a round of thread wake-ups. So when writers arrived during the last flush (traffic
//! from independent connections, not one client waiting on each answer), the flusher
//! waits up to the *commit delay* for more before it flushes, and flushes early once
//! about as many are waiting as the last batch held (a busy relay's batches fill
//! without waiting). The delay postpones the answers to writers (sends, acks) and what
//! waits for them (push wake-ups), never a delivery: a recipient that is connected is
//! handed the message when it is appended.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

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

/// A delayed flush goes early once this many writers wait, whatever the last batch.
const EARLY_MIN: usize = 16;

/// What the committers and the flusher share.
#[derive(Debug)]
struct Gate {
    /// Flushes run so far.
    flushes: AtomicU64,
    /// Commit delay in microseconds (0: none).
    delay_us: AtomicU64,
    /// Waiters sent and not yet taken by the flusher (counted before the send, so
    /// never fewer than the queue holds).
    pending: AtomicUsize,
    /// While the flusher waits out a delay: the count at which a committer wakes it.
    early: AtomicUsize,
    flusher: OnceLock<Thread>,
}

/// Shares flushes between concurrent writers. See the module docs.
pub struct GroupCommit {
    mode: Durability,
    flush: Arc<dyn Flush>,
    tx: Option<mpsc::Sender<Waiter>>,
    gate: Arc<Gate>,
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
        let gate = Arc::new(Gate {
            flushes: AtomicU64::new(0),
            delay_us: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            early: AtomicUsize::new(usize::MAX),
            flusher: OnceLock::new(),
        });
        if mode == Durability::Os {
            return Ok(GroupCommit {
                mode,
                flush,
                tx: None,
                gate,
                thread: None,
            });
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let (run, shared) = (flush.clone(), gate.clone());
        let thread = thread::Builder::new()
            .name("tern-group-commit".into())
            .spawn(move || flusher(&run, &rx, &shared))?;
        let _ = gate.flusher.set(thread.thread().clone());
        Ok(GroupCommit {
            mode,
            flush,
            tx: Some(tx),
            gate,
            thread: Some(thread),
        })
    }

    /// Sets the commit delay (see the module docs); zero flushes at once.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.gate.delay_us.store(us, Ordering::Relaxed);
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
        let gate = &self.gate;
        // SeqCst here and in `wait_for_company` (a store, then a load, on each side):
        // either this committer sees the flusher's threshold or the flusher sees
        // this count. A missed wake-up would only cost the delay.
        let waiting = gate.pending.fetch_add(1, Ordering::SeqCst) + 1;
        if tx.send((scope, done)).is_err() {
            gate.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Backend("group commit stopped".into()));
        }
        // Those that reach the count end a delay early (an unpark of a thread that
        // is not parked is a flag, not a system call).
        if waiting >= gate.early.load(Ordering::SeqCst) {
            if let Some(t) = gate.flusher.get() {
                t.unpark();
            }
        }
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
        self.gate.flushes.load(Ordering::Relaxed)
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

fn flusher(flush: &Arc<dyn Flush>, rx: &mpsc::Receiver<Waiter>, gate: &Gate) {
    // Whether writers arrived during the last flush, and how many that flush took.
    let (mut busy, mut last) = (false, 1);
    // Ends when every sender is dropped.
    while let Ok(first) = rx.recv() {
        let delay = Duration::from_micros(gate.delay_us.load(Ordering::Relaxed));
        if busy && !delay.is_zero() {
            wait_for_company(gate, delay, (last * 3 / 4).max(EARLY_MIN));
        }
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        gate.pending.fetch_sub(batch.len(), Ordering::SeqCst);
        last = batch.len();
        let began = Instant::now();
        let (mailboxes, rest) = flush.flush_parts();
        // Read before anyone is answered: an answered writer that commits again at
        // once did not arrive during this flush.
        busy = gate.pending.load(Ordering::SeqCst) > 0;
        crate::metrics::group_commit(batch.len(), began.elapsed());
        let all = mailboxes.clone().and(rest);
        gate.flushes.fetch_add(1, Ordering::Relaxed);
        for (scope, w) in batch {
            let _ = w.send(match scope {
                Scope::All => all.clone(),
                Scope::Mailboxes => mailboxes.clone(),
            });
        }
    }
}

/// Waits until `delay` has passed or `early` writers are waiting.
fn wait_for_company(gate: &Gate, delay: Duration, early: usize) {
    let Some(until) = Instant::now().checked_add(delay) else {
        return;
    };
    gate.early.store(early, Ordering::SeqCst);
    while gate.pending.load(Ordering::SeqCst) < early {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        if left.is_zero() {
            break;
        }
        thread::park_timeout(left);
    }
    gate.early.store(usize::MAX, Ordering::SeqCst);
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

    /// A flush that takes `.0`.
    struct TimedFlush(Duration);

    impl Flush for TimedFlush {
        fn flush(&self) -> Result<(), StoreError> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_writer_waiting_on_each_answer_is_not_delayed() {
        // Nobody arrives during its flushes, so no flush waits: ten commits in a row
        // would take 100 s if each waited out the delay.
        let gc = GroupCommit::start(
            Arc::new(TimedFlush(Duration::from_millis(1))),
            Durability::Fsync,
        );
        let gc = gc.expect("start");
        gc.set_delay(Duration::from_secs(10));
        let in_a_row = async {
            for _ in 0..10 {
                gc.commit().await.expect("commit");
            }
        };
        tokio::time::timeout(Duration::from_secs(5), in_a_row)
            .await
            .expect("sequential commits waited out the delay");
    }

    /// A flush that says it began, then waits for the test's go.
    struct GatedFlush {
        began: tokio::sync::mpsc::UnboundedSender<()>,
        go: std::sync::Mutex<mpsc::Receiver<()>>,
    }

    impl Flush for GatedFlush {
        fn flush(&self) -> Result<(), StoreError> {
            let _ = self.began.send(());
            let go = self.go.lock().unwrap_or_else(|e| e.into_inner());
            let _ = go.recv_timeout(Duration::from_secs(10));
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delay_gathers_writers_while_traffic_flows_and_a_crowd_ends_it_early() {
        let (began_tx, mut began) = tokio::sync::mpsc::unbounded_channel();
        let (go, go_rx) = mpsc::channel();
        let flush = GatedFlush {
            began: began_tx,
            go: std::sync::Mutex::new(go_rx),
        };
        let gc = Arc::new(GroupCommit::start(Arc::new(flush), Durability::Fsync).expect("start"));
        gc.set_delay(Duration::from_secs(10));
        let commit = |gc: &Arc<GroupCommit>| {
            let gc = gc.clone();
            tokio::spawn(async move { gc.commit().await })
        };
        let soon = Duration::from_secs(5);
        let first = commit(&gc);
        tokio::time::timeout(soon, began.recv())
            .await
            .expect("first flush");
        // A second writer arrives during that flush: traffic flows.
        let second = commit(&gc);
        let arrived = async {
            while gc.gate.pending.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(soon, arrived).await.expect("second");
        go.send(()).expect("go");
        first.await.expect("join").expect("first");
        // So the flush that takes the second waits for company: none begins.
        let alone = tokio::time::timeout(Duration::from_millis(300), began.recv()).await;
        assert!(alone.is_err(), "the second writer was flushed at once");
        assert!(!second.is_finished());
        // Enough company ends the wait long before the delay would.
        let crowd: Vec<_> = (0..EARLY_MIN).map(|_| commit(&gc)).collect();
        tokio::time::timeout(soon, began.recv())
            .await
            .expect("the crowd did not end the delay");
        // A straggler the crowd's flush missed would wait out the delay: none now.
        gc.set_delay(Duration::ZERO);
        for _ in 0..=EARLY_MIN {
            let _ = go.send(());
        }
        let all = async {
            second.await.expect("join").expect("second");
            for c in crowd {
                c.await.expect("join").expect("crowd");
            }
        };
        tokio::time::timeout(soon, all).await.expect("answers");
        // The first flush, then the second writer with (nearly) all of the crowd.
        assert!(gc.flushes() <= 3, "{} flushes", gc.flushes());
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
