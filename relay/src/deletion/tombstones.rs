//! The tombstones: accounts deleted and linked devices removed since this process
//! started, and the barrier between those removals and the writes that check first.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use tokio::sync::watch;

use tern_proto::{AccountId, DeviceAddress};

use crate::core::auth::AuthenticatedDevice;
// A writer holds its stripe across a store call: see `crate::locks`.
use crate::locks::{read, write};

/// Stripes of the per-account write barrier: few enough to keep, many enough that
/// unrelated accounts rarely share one.
const STRIPES: usize = 64;

/// Accounts being deleted or deleted since this process started, and devices being
/// removed or removed. Kept for the process's life: 16 bytes per deletion, 20 per
/// removed device, and a send resolved before a deletion still finds the id here
/// when it reaches the mailbox lock.
///
/// Also the barrier between a deletion (or a device removal) and the writes that
/// check the account first (key publish, delivery token, added device, media
/// upload): such a write holds `Tombstones::live`'s guard (a shared lock of the
/// account's stripe) across its check and its write, and a deletion adds the id
/// under the stripe's exclusive lock. So a write either finishes before the
/// deletion's removals start (which then remove what it wrote) or sees the tombstone
/// and writes nothing.
#[derive(Debug)]
pub struct Tombstones {
    ids: Mutex<HashSet<AccountId>>,
    devices: Mutex<HashSet<DeviceAddress>>,
    /// Whether any id was ever inserted: every send and account read asks
    /// `contains`, and on a relay that has deleted nothing since its start the
    /// answer must not cost a relay-wide lock.
    any: AtomicBool,
    /// The same for removed devices.
    any_device: AtomicBool,
    stripes: [RwLock<()>; STRIPES],
    /// Counts deletions and removals, so connections can look whether theirs is
    /// among them.
    deleted: watch::Sender<u64>,
}

impl Default for Tombstones {
    fn default() -> Self {
        Tombstones {
            ids: Mutex::default(),
            devices: Mutex::default(),
            any: AtomicBool::new(false),
            any_device: AtomicBool::new(false),
            stripes: std::array::from_fn(|_| RwLock::new(())),
            deleted: watch::channel(0).0,
        }
    }
}

/// Held by a write to an account that is not deleted, from its check to its end.
#[must_use = "the account may be deleted once this is dropped"]
pub(crate) struct Live<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

/// Why a connection's device is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// Its account was deleted.
    Account,
    /// The device was removed from its account.
    Device,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tombstones {
    fn stripe(&self, id: &AccountId) -> &RwLock<()> {
        // Account ids are random, chosen by the relay: any byte spreads them.
        &self.stripes[usize::from(id.0[0]) % STRIPES]
    }

    /// Whether `id` is deleted (or being deleted).
    pub fn contains(&self, id: &AccountId) -> bool {
        // Set after the id is in `ids`; a check ordered after the insert by a lock
        // (the stripe, a device lock) sees it.
        self.any.load(Ordering::SeqCst) && lock(&self.ids).contains(id)
    }

    /// Whether the device at `addr` is removed (or being removed), or its account
    /// deleted.
    pub fn contains_device(&self, addr: &DeviceAddress) -> bool {
        self.contains(&addr.account)
            || (self.any_device.load(Ordering::SeqCst) && lock(&self.devices).contains(addr))
    }

    /// The guard for a write to `id`, `None` if the account is deleted. Hold it
    /// across the check and the write, and take no other `live` guard meanwhile.
    pub(crate) fn live(&self, id: &AccountId) -> Option<Live<'_>> {
        let guard = read(self.stripe(id));
        (!self.contains(id)).then_some(Live(guard))
    }

    /// [`Tombstones::live`] for a write to one device: `None` if the device is
    /// removed or its account deleted.
    pub(crate) fn live_device(&self, addr: &DeviceAddress) -> Option<Live<'_>> {
        let guard = read(self.stripe(&addr.account));
        (!self.contains_device(addr)).then_some(Live(guard))
    }

    /// Marks `id` deleted once the writes that checked it are done; connections
    /// watching `Tombstones::watch` are told.
    pub(crate) fn insert(&self, id: AccountId) {
        {
            let _exclusive = write(self.stripe(&id));
            lock(&self.ids).insert(id);
            self.any.store(true, Ordering::SeqCst);
        }
        self.deleted.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Marks the device at `addr` removed once the writes that checked its account
    /// are done; its connections are told as for a deletion.
    pub(crate) fn insert_device(&self, addr: DeviceAddress) {
        {
            let _exclusive = write(self.stripe(&addr.account));
            lock(&self.devices).insert(addr);
            self.any_device.store(true, Ordering::SeqCst);
        }
        self.deleted.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes on each deletion and removal: a connection then checks whether its
    /// device is among them.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.deleted.subscribe()
    }

    /// For a connection whose device (once authenticated) is `device`: another
    /// connection may delete its account or remove the device, and then it closes
    /// too.
    pub(crate) fn watch_for(
        self: &Arc<Self>,
        device: Arc<OnceLock<AuthenticatedDevice>>,
    ) -> DeletionWatch {
        DeletionWatch {
            tombstones: self.clone(),
            changes: self.watch(),
            device,
        }
    }

    /// Why `device` is gone, if it is.
    pub(crate) fn gone(&self, device: &DeviceAddress) -> Option<Gone> {
        if self.contains(&device.account) {
            Some(Gone::Account)
        } else if self.contains_device(device) {
            Some(Gone::Device)
        } else {
            None
        }
    }
}

/// Resolves [`DeletionWatch::gone`] once a connection's account is deleted or its
/// device removed.
pub(crate) struct DeletionWatch {
    tombstones: Arc<Tombstones>,
    changes: watch::Receiver<u64>,
    device: Arc<OnceLock<AuthenticatedDevice>>,
}

impl DeletionWatch {
    /// Resolves once the connection is authenticated and its account deleted or
    /// device removed (it checks on each change; pending forever if the tombstones
    /// are gone).
    pub(crate) async fn gone(&mut self) -> Gone {
        loop {
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let address = self.device.get().map(|d| *d.address());
            if let Some(gone) = address.and_then(|a| self.tombstones.gone(&a)) {
                return gone;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::DeviceId;

    fn addr(account: u8, device: u32) -> DeviceAddress {
        DeviceAddress {
            account: AccountId([account; 16]),
            device: DeviceId::new(device).expect("id"),
        }
    }

    #[test]
    fn a_removed_device_is_gone_alone_and_a_deleted_account_takes_all_its_devices() {
        let t = Tombstones::default();
        assert!(t.live_device(&addr(1, 2)).is_some());
        t.insert_device(addr(1, 2));
        assert!(t.contains_device(&addr(1, 2)));
        assert!(t.live_device(&addr(1, 2)).is_none());
        assert_eq!(t.gone(&addr(1, 2)), Some(Gone::Device));
        assert!(!t.contains(&AccountId([1; 16])), "the account stays");
        assert!(t.live(&AccountId([1; 16])).is_some());
        assert!(!t.contains_device(&addr(1, 1)), "its other devices stay");
        assert!(
            !t.contains_device(&addr(2, 2)),
            "another account's device 2 stays"
        );
        t.insert(AccountId([3; 16]));
        assert!(t.contains_device(&addr(3, 7)));
        assert_eq!(t.gone(&addr(3, 1)), Some(Gone::Account));
        assert_eq!(t.gone(&addr(1, 1)), None);
    }

    /// A writer may hold its `live` guard across a blocking call that the runtime's
    /// own workers must drive (a database call on the relay's runtime). Readers that
    /// come while a deletion waits for the stripe wait off their workers, so the call
    /// finishes, the deletion gets the stripe, and so do they (waiting on the workers
    /// they would leave none to drive the call: this hung).
    #[test]
    fn readers_queued_behind_a_deletion_leave_the_workers_free() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let t = Arc::new(Tombstones::default());
        let id = AccountId([9; 16]);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let t = t.clone();
            let handle = rt.handle().clone();
            rt.spawn(async move {
                let _live = t.live(&id).expect("live");
                let _ = held_tx.send(());
                // A call only the runtime's timer (driven by its workers) can end.
                tokio::task::block_in_place(|| {
                    handle.block_on(tokio::time::sleep(std::time::Duration::from_millis(300)))
                });
            })
        };
        held_rx.recv().expect("held");
        let deletion = {
            let t = t.clone();
            std::thread::spawn(move || t.insert(AccountId([9; 16])))
        };
        // Let the deletion queue for the stripe, then readers on every worker.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                rt.spawn(async move { t.live(&id).is_none() })
            })
            .collect();
        // Waited for off the runtime: a hung runtime drives no timer of its own.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let held = holder.await;
            let _ = done_tx.send((held, futures::future::join_all(readers).await));
        });
        let Ok((held, readers)) = done_rx.recv_timeout(std::time::Duration::from_secs(10)) else {
            rt.shutdown_background();
            panic!("hung: readers waited on the workers the held call needed");
        };
        held.expect("holder");
        deletion.join().expect("deletion");
        assert!(readers.into_iter().all(|r| r.expect("reader")), "deleted");
    }

    /// `at` as a connection authenticates it (a real session proof).
    fn authenticated(at: DeviceAddress) -> AuthenticatedDevice {
        use ed25519_dalek::{Signer, SigningKey};
        let key = SigningKey::from_bytes(&[7; 32]);
        let proof = key.sign(&tern_proto::auth::session_proof(&[1; 32]));
        let public = key.verifying_key().to_bytes();
        crate::core::auth::authenticate(at, &public, &[1; 32], &proof.to_bytes()).expect("auth")
    }

    #[test]
    fn a_watch_resolves_for_its_own_device_only() {
        let t = Arc::new(Tombstones::default());
        let cell = Arc::new(OnceLock::new());
        let _ = cell.set(authenticated(addr(1, 2)));
        let mut watch = t.watch_for(cell);
        // Polled once: the change is seen, and it is not this device's.
        let once = |watch: &mut DeletionWatch| {
            use futures::FutureExt;
            watch.gone().now_or_never()
        };
        t.insert_device(addr(1, 3));
        assert_eq!(
            once(&mut watch),
            None,
            "another device's removal leaves it open"
        );
        t.insert_device(addr(1, 2));
        assert_eq!(once(&mut watch), Some(Gone::Device));
    }
}
