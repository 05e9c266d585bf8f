//! The table of mailboxes in use: each one's ordering lock and its subscriber, kept
//! only while something uses the mailbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tern_proto::DeviceAddress;
use tokio::sync::Notify;

use super::carried::{Carried, Chain, Taken};
use crate::store::StoreError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded sections leave consistent state even if a store call panics.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a call found every place among an ordering lock's waiters taken.
fn too_busy(busy: crate::locks::Busy) -> StoreError {
    StoreError::Unavailable(format!("mailboxes: {busy}; retry later"))
}

/// Mailboxes in use, by device. See the module docs.
pub(crate) struct ActiveMailboxes {
    devices: Mutex<HashMap<DeviceAddress, Arc<MailboxState>>>,
    next_subscriber: AtomicU64,
    /// Payload bytes of the rows hints carried to subscribers here, not yet pushed.
    carried_bytes: Arc<AtomicUsize>,
    /// Places among the callers waiting off their workers for an ordering lock.
    waiting: tokio::sync::Semaphore,
}

impl Default for ActiveMailboxes {
    fn default() -> Self {
        ActiveMailboxes {
            devices: Mutex::default(),
            next_subscriber: AtomicU64::default(),
            carried_bytes: Arc::default(),
            waiting: tokio::sync::Semaphore::new(crate::locks::WAITING_MAX),
        }
    }
}

impl std::fmt::Debug for ActiveMailboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveMailboxes").finish_non_exhaustive()
    }
}

/// One mailbox's in-memory state, present while something uses it.
#[derive(Default)]
struct MailboxState {
    /// Serialises this mailbox's mutations.
    ordering: Mutex<()>,
    subscriber: Mutex<Option<Arc<Wakeup>>>,
}

/// How a subscription is told the mailbox changed or it was displaced.
struct Wakeup {
    id: u64,
    notify: Notify,
    displaced: AtomicBool,
    /// Rows carried by hints since the last pull, and whether it must read.
    carried: Chain,
}

impl Wakeup {
    /// Tells the subscription a newer one took over.
    fn displace(&self) {
        self.displaced.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

impl ActiveMailboxes {
    fn state(&self, addr: &DeviceAddress) -> Arc<MailboxState> {
        lock(&self.devices).entry(*addr).or_default().clone()
    }

    /// Drops the map's entry when nothing else holds it. States are cloned only under
    /// the map lock, so a count of one there means nobody can still be using it.
    fn release(&self, addr: &DeviceAddress, state: Arc<MailboxState>) {
        drop(state);
        let mut devices = lock(&self.devices);
        if let Some(s) = devices.get(addr) {
            if Arc::strong_count(s) == 1 && lock(&s.subscriber).is_none() {
                devices.remove(addr);
            }
        }
    }

    /// Runs `mutate` under the mailbox's ordering lock (held for the store call only,
    /// never across an `.await`). The caller wakes the subscriber once the change is
    /// visible ([`ActiveMailboxes::wake`]). With [`crate::locks::WAITING_MAX`] callers
    /// already waiting for ordering locks here, fails at once as `Unavailable`.
    pub(crate) fn ordered<T, E: From<StoreError>>(
        &self,
        addr: &DeviceAddress,
        mutate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        // Held across the store call, which on a runtime that drives the store's
        // connections (`PgOptions::runtime`) may need this worker: waited for off it.
        self.with_state(addr, |state| {
            match crate::locks::lock_within(&state.ordering, &self.waiting) {
                Ok(_ordering) => mutate(),
                Err(busy) => Err(E::from(too_busy(busy))),
            }
        })
    }

    /// [`ActiveMailboxes::ordered`] for a caller on a blocking thread (a deletion's
    /// purge, the expiry sweep): it waits as long as the lock is held, taking no
    /// place among the waiters, as it keeps no worker's core (tokio cannot tell such
    /// a thread from a worker, so [`crate::locks::lock_within`] would count it).
    pub(crate) fn ordered_blocking<T, E>(
        &self,
        addr: &DeviceAddress,
        mutate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.with_state(addr, |state| {
            let _ordering = crate::locks::lock(&state.ordering);
            mutate()
        })
    }

    /// `f` on `addr`'s state, taken for it and released after.
    fn with_state<R>(&self, addr: &DeviceAddress, f: impl FnOnce(&MailboxState) -> R) -> R {
        let state = self.state(addr);
        let result = f(&state);
        self.release(addr, state);
        result
    }

    /// [`ActiveMailboxes::ordered`] for several mailboxes at once (a multi-recipient
    /// send): their locks are taken in address order, so two such calls never wait
    /// for each other in a cycle, and held together for the one store call.
    pub(crate) fn ordered_many<T, E: From<StoreError>>(
        &self,
        addrs: &[DeviceAddress],
        mutate: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut sorted: Vec<DeviceAddress> = addrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let states: Vec<Arc<MailboxState>> = sorted.iter().map(|a| self.state(a)).collect();
        let result = {
            let held: Result<Vec<MutexGuard<'_, ()>>, _> = states
                .iter()
                .map(|s| crate::locks::lock_within(&s.ordering, &self.waiting))
                .collect();
            match held {
                Ok(_held) => mutate(),
                Err(busy) => Err(E::from(too_busy(busy))),
            }
        };
        for (addr, state) in sorted.iter().zip(states) {
            self.release(addr, state);
        }
        result
    }

    /// Wakes `addr`'s subscriber, if it has one (after a shared commit made new
    /// messages visible, or a hint from another node); whether it had one.
    pub(crate) fn wake(&self, addr: &DeviceAddress) -> bool {
        self.wake_subscriber(addr, |w| w.carried.must_read())
    }

    /// Wakes `addr`'s subscriber, if it has one, with the rows a hint from another
    /// node carried (see [`super::carried`]); whether it had one.
    pub(crate) fn wake_with(&self, addr: &DeviceAddress, rows: Carried) -> bool {
        self.wake_subscriber(addr, |w| w.carried.carry(rows))
    }

    /// Tells `addr`'s subscriber, if it has one, what woke it (`tell`), then wakes it.
    fn wake_subscriber(&self, addr: &DeviceAddress, tell: impl FnOnce(&Wakeup)) -> bool {
        let state = lock(&self.devices).get(addr).cloned();
        let Some(state) = state else {
            return false;
        };
        let woken = match lock(&state.subscriber).as_ref() {
            Some(w) => {
                tell(w);
                w.notify.notify_one();
                true
            }
            None => false,
        };
        self.release(addr, state);
        woken
    }

    /// Whether `addr` has a subscriber here (a connection taking its deliveries).
    pub(crate) fn has_subscriber(&self, addr: &DeviceAddress) -> bool {
        let state = lock(&self.devices).get(addr).cloned();
        state.is_some_and(|s| lock(&s.subscriber).is_some())
    }

    /// Claims deliveries for `address`, displacing any earlier subscription of it.
    pub(crate) fn subscribe(self: &Arc<Self>, address: DeviceAddress) -> Subscription {
        let wakeup = Arc::new(Wakeup {
            id: self.next_subscriber.fetch_add(1, Ordering::Relaxed),
            notify: Notify::new(),
            displaced: AtomicBool::new(false),
            carried: Chain::new(self.carried_bytes.clone()),
        });
        let state = self.state(&address);
        if let Some(old) = lock(&state.subscriber).replace(wakeup.clone()) {
            old.displace();
        }
        // Start with a wake-up so the first read happens without waiting.
        wakeup.notify.notify_one();
        Subscription {
            active: self.clone(),
            address,
            wakeup,
        }
    }

    /// Displaces the device's subscriber `id`, if it is still the one here (a newer
    /// connection of the device on another node).
    pub(crate) fn displace(&self, addr: &DeviceAddress, id: u64) {
        let subscriber = lock(&self.devices)
            .get(addr)
            .and_then(|s| lock(&s.subscriber).clone());
        if let Some(w) = subscriber.filter(|w| w.id == id) {
            w.displace();
        }
    }

    /// Every subscribed device here, with its subscriber's id.
    pub(crate) fn subscribed(&self) -> Vec<(DeviceAddress, u64)> {
        lock(&self.devices)
            .iter()
            .filter_map(|(a, s)| Some((*a, lock(&s.subscriber).as_ref()?.id)))
            .collect()
    }

    /// Entries in the table; for tests of its cleanup.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.devices).len()
    }
}

/// A device's claim on its deliveries. A newer subscription for the same device
/// displaces this one; dropping it releases the claim.
pub struct Subscription {
    active: Arc<ActiveMailboxes>,
    address: DeviceAddress,
    wakeup: Arc<Wakeup>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("displaced", &self.displaced())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Resolves when the mailbox may have new messages, or this subscription was
    /// displaced. A wake-up that came before this call is not lost.
    pub async fn changed(&self) {
        self.wakeup.notify.notified().await
    }

    /// This subscription's id, unique on this node while it runs.
    pub fn id(&self) -> u64 {
        self.wakeup.id
    }

    /// Whether a newer connection of the same device took over.
    pub fn displaced(&self) -> bool {
        self.wakeup.displaced.load(Ordering::Acquire)
    }

    /// For a pull: the rows hints carried since the last one, and whether the
    /// mailbox must be read too.
    pub(crate) fn take_carried(&self) -> Taken {
        self.wakeup.carried.take()
    }

    /// The next pull reads the mailbox (this one's read failed: its wake-up is spent).
    pub(crate) fn read_next(&self) {
        self.wakeup.carried.must_read();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let state = self.active.state(&self.address);
        {
            let mut sub = lock(&state.subscriber);
            if sub.as_ref().is_some_and(|w| w.id == self.wakeup.id) {
                *sub = None;
            }
        }
        self.active.release(&self.address, state);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    /// With every place among the ordering locks' waiters taken, a change to a
    /// mailbox whose lock is held fails at once as `Unavailable` (on a worker, where
    /// waiting would hold a blocking thread); one whose lock is free still runs, and
    /// a blocking caller's (`ordered_blocking`) waits.
    #[test]
    fn a_held_mailbox_with_no_place_to_wait_is_unavailable_at_once() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let active = Arc::new(ActiveMailboxes {
            waiting: tokio::sync::Semaphore::new(0),
            ..ActiveMailboxes::default()
        });
        let (busy, free) = (
            // The free one sorts first, so `ordered_many` takes its lock on the way.
            DeviceAddress::from_wire(&[2; 16], 1).expect("address"),
            DeviceAddress::from_wire(&[1; 16], 1).expect("address"),
        );
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let active = active.clone();
            std::thread::spawn(move || {
                active.ordered(&busy, || -> Result<(), StoreError> {
                    let _ = held_tx.send(());
                    let _ = go_rx.recv();
                    Ok(())
                })
            })
        };
        held_rx.recv().expect("held");
        let a = active.clone();
        let (refused, ran) = rt.block_on(async move {
            tokio::spawn(async move {
                (
                    a.ordered(&busy, || Ok::<_, StoreError>(())),
                    a.ordered(&free, || Ok::<_, StoreError>(())),
                )
            })
            .await
            .expect("task")
        });
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(ran.is_ok());
        // Several at once, one of them held: refused, and the free one's lock, taken
        // on the way, is given back.
        let a = active.clone();
        let (many, after) = rt.block_on(async move {
            tokio::spawn(async move {
                (
                    a.ordered_many(&[free, busy], || Ok::<_, StoreError>(())),
                    a.ordered(&free, || Ok::<_, StoreError>(())),
                )
            })
            .await
            .expect("task")
        });
        assert!(matches!(many, Err(StoreError::Unavailable(_))), "{many:?}");
        assert!(after.is_ok());
        // A caller on a blocking thread waits for the holder, whatever the places.
        let a = active.clone();
        let waiter =
            rt.spawn_blocking(move || a.ordered_blocking(&busy, || Ok::<_, StoreError>(7)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "waits while the lock is held");
        drop(go_tx);
        holder.join().expect("holder").expect("held change");
        assert_eq!(rt.block_on(waiter).expect("task").expect("waited"), 7);
    }
}
