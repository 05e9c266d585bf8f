//! Std locks that may be held across a store call, waited for off the runtime's
//! worker. A store call on PostgreSQL may wait on connections that the relay's own
//! runtime drives (`PgOptions::runtime`); a worker that blocked on such a lock while
//! keeping its core could leave no worker to drive them, and the holder would never
//! let go. So a lock that must wait is waited for inside `block_in_place`, which
//! hands the core to another thread first. Uncontended, it costs one `try_lock`; a
//! lock held for a moment (most are: a send's staging) is spun for briefly first, as
//! handing the core on costs a thread wake-up or two.

use std::sync::{
    LockResult, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    TryLockError,
};

use tokio::sync::Semaphore;

/// Waits off the worker for one kind of lock, at most, where many may wait at once (a
/// busy mailbox's senders): each holds a thread of the blocking pool, and a full pool
/// would leave none for a worker's core to be handed to.
pub(crate) const WAITING_MAX: usize = 256;

/// Every place among a lock's waiters ([`lock_within`]) is taken: the caller fails at
/// once, as a relay at capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{WAITING_MAX} calls wait for one kind of lock already")
    }
}

/// Whether waiting here may hold a worker's core: on a multi-thread runtime's thread
/// (a worker, or a thread of its blocking pool: tokio does not tell them apart, and
/// `block_in_place` there just runs the wait).
fn on_a_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

/// `wait` where waiting holds no runtime worker: inside `block_in_place` on a
/// multi-thread runtime, as it is anywhere else.
fn off_the_worker<R>(wait: impl FnOnce() -> R) -> R {
    if on_a_worker() {
        tokio::task::block_in_place(wait)
    } else {
        wait()
    }
}

/// Tries before the wait is handed off the worker: a few rounds of busy-waiting that
/// double each time (as `parking_lot`'s spin-wait does), a few microseconds at most.
const SPINS: u32 = 6;

/// The guard `try_take` gets, tried again for a moment while held; `None` if it is
/// still held then. A poisoned lock is taken as it is (what it guards stays
/// consistent between statements).
fn spun<G>(mut try_take: impl FnMut() -> Result<G, TryLockError<G>>) -> Option<G> {
    for round in 0..=SPINS {
        match try_take() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(TryLockError::WouldBlock) if round < SPINS => {
                for _ in 0..1u32 << round {
                    std::hint::spin_loop();
                }
            }
            Err(TryLockError::WouldBlock) => {}
        }
    }
    None
}

/// A guard waited for, poisoned or not (as [`spun`] takes it).
fn unpoisoned<G>(waited: LockResult<G>) -> G {
    waited.unwrap_or_else(PoisonError::into_inner)
}

/// `m` locked; see the module docs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    spun(|| m.try_lock()).unwrap_or_else(|| off_the_worker(|| unpoisoned(m.lock())))
}

/// `m` locked, for a lock many may wait for at once: a wait off the worker takes one
/// of `places` (at most [`WAITING_MAX`]) for its length; with none left, `Busy`.
pub(crate) fn lock_within<'a, T>(
    m: &'a Mutex<T>,
    places: &Semaphore,
) -> Result<MutexGuard<'a, T>, Busy> {
    if let Some(g) = spun(|| m.try_lock()) {
        return Ok(g);
    }
    if !on_a_worker() {
        return Ok(unpoisoned(m.lock()));
    }
    let _place = places.try_acquire().map_err(|_| Busy)?;
    Ok(tokio::task::block_in_place(|| unpoisoned(m.lock())))
}

/// `l` read-locked; see the module docs.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    spun(|| l.try_read()).unwrap_or_else(|| off_the_worker(|| unpoisoned(l.read())))
}

/// `l` write-locked; see the module docs.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    spun(|| l.try_write()).unwrap_or_else(|| off_the_worker(|| unpoisoned(l.write())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A runtime of two workers, as a relay's on two cores.
    fn two_workers() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A holder keeps the lock across a blocking call that only the runtime's timer
    /// (driven by its workers) can end; more takers than workers queue for it. They
    /// wait off their workers, so the call ends and each gets the lock in turn (had
    /// they waited on the workers, none would be left to end the call: a hang).
    #[test]
    fn takers_queued_behind_a_holder_leave_the_workers_free() {
        let (rt, m) = (two_workers(), Arc::new(Mutex::new(0u32)));
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

    /// A lock many may wait for: past its places, a taker fails at once (`Busy`)
    /// rather than holding another blocking thread; a place is free again once its
    /// wait ends.
    #[test]
    fn takers_past_the_places_are_refused_at_once() {
        let (rt, m) = (two_workers(), Arc::new(Mutex::new(0u32)));
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let held = super::lock(&m);
        let waiter = {
            let (m, places) = (m.clone(), places.clone());
            rt.spawn(async move { super::lock_within(&m, &places).map(|mut n| *n += 1) })
        };
        let mut waited = 0;
        while places.available_permits() > 0 && waited < 2_000 {
            std::thread::sleep(Duration::from_millis(1));
            waited += 1;
        }
        assert_eq!(places.available_permits(), 0, "the waiter has the place");
        let (m2, p2) = (m.clone(), places.clone());
        let refused = rt.block_on(async move {
            tokio::spawn(async move { super::lock_within(&m2, &p2).map(|_| ()) }).await
        });
        assert_eq!(refused.expect("task"), Err(super::Busy));
        drop(held);
        let waited = rt.block_on(waiter).expect("task");
        assert_eq!(waited, Ok(()));
        assert_eq!(places.available_permits(), 1, "the place is free again");
        assert_eq!(*super::lock_within(&m, &places).expect("free"), 1);
    }
}
