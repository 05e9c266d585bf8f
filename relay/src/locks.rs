//! Std locks that may be held across a store call, waited for off the runtime's
//! worker. A store call on PostgreSQL may wait on connections that the relay's own
//! runtime drives (`PgOptions::runtime`); a worker that blocked on such a lock while
//! keeping its core could leave no worker to drive them, and the holder would never
//! let go. So a lock that must wait is waited for inside `block_in_place`, which
//! hands the core to another thread first. Uncontended, it costs one `try_lock`; a
//! lock held for a moment (most are: a send's staging) is spun for briefly first, as
//! handing the core on costs a thread wake-up or two.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

/// `wait` where waiting holds no runtime worker: inside `block_in_place` on a
/// multi-thread runtime, as it is anywhere else.
fn off_the_worker<R>(wait: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Tries before the wait is handed off the worker: a few rounds of busy-waiting that
/// double each time (as `parking_lot`'s spin-wait does), a few microseconds at most.
const SPINS: u32 = 6;

/// The guard `try_take` gets, tried again for a moment while held, else the one
/// `wait` waits for off the worker; a poisoned lock is taken as it is (what it
/// guards stays consistent between statements).
fn taken<G>(
    mut try_take: impl FnMut() -> Result<G, TryLockError<G>>,
    wait: impl FnOnce() -> G,
) -> G {
    for round in 0..=SPINS {
        match try_take() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(e)) => return e.into_inner(),
            Err(TryLockError::WouldBlock) if round < SPINS => {
                for _ in 0..1u32 << round {
                    std::hint::spin_loop();
                }
            }
            Err(TryLockError::WouldBlock) => {}
        }
    }
    off_the_worker(wait)
}

/// `m` locked; see the module docs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    taken(
        || m.try_lock(),
        || m.lock().unwrap_or_else(|e| e.into_inner()),
    )
}

/// `l` read-locked; see the module docs.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    taken(
        || l.try_read(),
        || l.read().unwrap_or_else(|e| e.into_inner()),
    )
}

/// `l` write-locked; see the module docs.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    taken(
        || l.try_write(),
        || l.write().unwrap_or_else(|e| e.into_inner()),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A holder keeps the lock across a blocking call that only the runtime's timer
    /// (driven by its workers) can end; more takers than workers queue for it. They
    /// wait off their workers, so the call ends and each gets the lock in turn (had
    /// they waited on the workers, none would be left to end the call: a hang).
    #[test]
    fn takers_queued_behind_a_holder_leave_the_workers_free() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let m = Arc::new(Mutex::new(0u32));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let (m, handle) = (m.clone(), rt.handle().clone());
            rt.spawn(async move {
                let mut n = super::lock(&m);
                let _ = held_tx.send(());
                tokio::task::block_in_place(|| {
                    handle.block_on(tokio::time::sleep(Duration::from_millis(300)))
                });
                *n += 1;
            })
        };
        held_rx.recv().expect("held");
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                rt.spawn(async move { *super::lock(&m) += 1 })
            })
            .collect();
        // Waited for off the runtime: a hung runtime drives no timer of its own.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let held = holder.await;
            let _ = done_tx.send((held, futures::future::join_all(takers).await));
        });
        let Ok((held, takers)) = done_rx.recv_timeout(Duration::from_secs(10)) else {
            rt.shutdown_background();
            panic!("hung: takers waited on the workers the held call needed");
        };
        held.expect("holder");
        assert!(takers.into_iter().all(|t| t.is_ok()));
        assert_eq!(*super::lock(&m), 5, "each got the lock once");
    }
}
