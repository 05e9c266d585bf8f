//! The hub ties the rules in [`crate::core`] to the stores: it serialises each
//! mailbox's mutations, wakes the connection of a device that gets a message, shares
//! fsyncs through [`GroupCommit`], and sweeps expired messages.
//!
//! Every call that touches a mailbox takes that device's lock for the few
//! microseconds of the store call, never across an `.await`: an append allocates its
//! sequence numbers and inserts under it, so a reader that has seen sequence number
//! `n` has seen every message below `n`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tern_proto::{AccountId, DeviceAddress, DeviceId};
use tokio::sync::Notify;

use crate::clock::{Clock, UnixMillis};
use crate::commit::GroupCommit;
use crate::core::auth::{self, AuthenticatedDevice, VerifiedRegistration};
use crate::core::delivery::DeliveryWindow;
use crate::core::expiry::{is_expired, Ttl};
use crate::core::limits::Limits;
use crate::error::{Error, Result};
use crate::store::{
    AccountRecord, AccountStore, MailboxStore, NewMessage, StoreError, StoredMessage, Usage,
};

/// Shared relay state. See the module docs.
pub struct Hub {
    mailboxes: Arc<dyn MailboxStore>,
    accounts: Arc<dyn AccountStore>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    ttl: Ttl,
    commit: GroupCommit,
    devices: Mutex<HashMap<DeviceAddress, Arc<Slot>>>,
    next_subscriber: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("limits", &self.limits)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Per-device state, present while something uses the device.
#[derive(Default)]
struct Slot {
    /// Serialises this mailbox's mutations.
    write: Mutex<()>,
    subscriber: Mutex<Option<Arc<Waker>>>,
}

struct Waker {
    id: u64,
    notify: Notify,
    displaced: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded sections leave consistent state even if a store call panics.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`Hub::pull`] found.
#[derive(Debug, Default)]
pub struct Pull {
    /// Messages to push, in order; already recorded in the window.
    pub messages: Vec<StoredMessage>,
    /// The backlog is drained for the first time on this window: tell the client.
    pub queue_empty: bool,
}

/// A device's claim on its deliveries. A newer subscription for the same device
/// displaces this one; dropping it releases the claim.
pub struct Subscription {
    hub: Arc<Hub>,
    address: DeviceAddress,
    waker: Arc<Waker>,
}

impl Subscription {
    /// Resolves when the mailbox may have new messages, or this subscription was
    /// displaced. A wake-up that came before this call is not lost.
    pub async fn changed(&self) {
        self.waker.notify.notified().await
    }

    /// Whether a newer connection of the same device took over.
    pub fn displaced(&self) -> bool {
        self.waker.displaced.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let slot = self.hub.slot(&self.address);
        {
            let mut sub = lock(&slot.subscriber);
            if sub.as_ref().is_some_and(|w| w.id == self.waker.id) {
                *sub = None;
            }
        }
        self.hub.release(&self.address, slot);
    }
}

impl Hub {
    /// A hub over the given stores.
    pub fn new(
        mailboxes: Arc<dyn MailboxStore>,
        accounts: Arc<dyn AccountStore>,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        commit: GroupCommit,
    ) -> Self {
        Hub {
            mailboxes,
            accounts,
            clock,
            limits,
            ttl,
            commit,
            devices: Mutex::new(HashMap::new()),
            next_subscriber: AtomicU64::new(1),
        }
    }

    /// The current time from the hub's clock.
    pub fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The group committer.
    pub fn group_commit(&self) -> &GroupCommit {
        &self.commit
    }

    fn slot(&self, addr: &DeviceAddress) -> Arc<Slot> {
        lock(&self.devices).entry(*addr).or_default().clone()
    }

    /// Drops the map's entry when nothing else holds it. Slots are cloned only under
    /// the map lock, so a count of one there means nobody can still be using it.
    fn release(&self, addr: &DeviceAddress, slot: Arc<Slot>) {
        drop(slot);
        let mut devices = lock(&self.devices);
        if let Some(s) = devices.get(addr) {
            if Arc::strong_count(s) == 1 && lock(&s.subscriber).is_none() {
                devices.remove(addr);
            }
        }
    }

    /// Creates an account for a verified registration; the connection becomes its
    /// first device. Durable before it returns.
    pub async fn register(&self, reg: VerifiedRegistration) -> Result<AuthenticatedDevice> {
        let record = AccountRecord {
            identity_key: reg.identity_key,
            devices: vec![(DeviceId::PRIMARY, reg.device_key)],
        };
        let account = loop {
            let id = AccountId(rand::random());
            match self.accounts.create(&id, &record) {
                Ok(()) => break id,
                Err(StoreError::Exists) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.commit.commit().await?;
        Ok(reg.into_device(DeviceAddress {
            account,
            device: DeviceId::PRIMARY,
        }))
    }

    /// Adds a device vouched for by the account's identity key.
    pub async fn add_device(
        &self,
        account: &AccountId,
        device_key: &[u8],
        signature: &[u8],
    ) -> Result<DeviceId> {
        let record = self.accounts.get(account)?.ok_or(Error::Unauthorized)?;
        let key = auth::verify_new_device(&record.identity_key, account, device_key, signature)?;
        let id = self
            .accounts
            .add_device(account, &key)?
            .ok_or(Error::Unauthorized)?;
        self.commit.commit().await?;
        Ok(id)
    }

    /// Checks a device's session proof.
    pub fn authenticate(
        &self,
        address: DeviceAddress,
        exporter: &[u8; 32],
        signature: &[u8],
    ) -> Result<AuthenticatedDevice> {
        let record = self
            .accounts
            .get(&address.account)?
            .ok_or(Error::Unauthorized)?;
        let key = record
            .device_key(address.device)
            .ok_or(Error::Unauthorized)?;
        auth::authenticate(address, key, exporter, signature)
    }

    /// Queues `msgs` for `to`, all or nothing; returns once they are durable as
    /// configured. A connected recipient is woken at once.
    pub async fn send(
        &self,
        _sender: &AuthenticatedDevice,
        to: DeviceAddress,
        msgs: &[NewMessage],
    ) -> Result<usize> {
        self.limits
            .check_batch(msgs.iter().map(|m| m.payload.len()))?;
        let exists = self
            .accounts
            .get(&to.account)?
            .is_some_and(|rec| rec.device_key(to.device).is_some());
        if !exists {
            return Err(Error::UnknownRecipient);
        }
        let bytes: u64 = msgs.iter().map(|m| m.payload.len() as u64).sum();
        let now = self.clock.now();
        let slot = self.slot(&to);
        let appended = {
            let _write = lock(&slot.write);
            self.mailboxes
                .usage(&to)
                .map_err(Error::from)
                .and_then(|usage| self.limits.check_enqueue(usage, msgs.len() as u64, bytes))
                .and_then(|()| {
                    Ok(self
                        .mailboxes
                        .append(&to, msgs, now, self.ttl.expires_at(now))?)
                })
        };
        if appended.is_ok() {
            if let Some(w) = lock(&slot.subscriber).as_ref() {
                w.notify.notify_one();
            }
        }
        self.release(&to, slot);
        appended?;
        self.commit.commit().await?;
        Ok(msgs.len())
    }

    /// Claims deliveries for a device, displacing any earlier connection of it.
    pub fn subscribe(self: &Arc<Self>, device: &AuthenticatedDevice) -> Subscription {
        let address = *device.address();
        let waker = Arc::new(Waker {
            id: self.next_subscriber.fetch_add(1, Ordering::Relaxed),
            notify: Notify::new(),
            displaced: AtomicBool::new(false),
        });
        let slot = self.slot(&address);
        if let Some(old) = lock(&slot.subscriber).replace(waker.clone()) {
            old.displaced.store(true, Ordering::Release);
            old.notify.notify_one();
        }
        // Start with a wake-up so the first read happens without waiting.
        waker.notify.notify_one();
        Subscription {
            hub: self.clone(),
            address,
            waker,
        }
    }

    /// Fills `window` with the next messages to push to `device`, in order. Expired
    /// messages are skipped, never returned, even before the sweeper deletes them.
    pub fn pull(&self, device: &AuthenticatedDevice, window: &mut DeliveryWindow) -> Result<Pull> {
        let mut pull = Pull::default();
        while window.room() > 0 {
            let want = window.room();
            let batch = self
                .mailboxes
                .read(device.address(), window.cursor(), want)?;
            let now = self.clock.now();
            let short = batch.len() < want;
            for m in batch {
                if is_expired(now, m.expires_at) {
                    window.on_skipped(m.seq);
                } else if window.on_pushed(m.seq) {
                    pull.messages.push(m);
                }
            }
            if short {
                pull.queue_empty = window.on_drained();
                break;
            }
        }
        Ok(pull)
    }

    /// Deletes acknowledged messages from the device's own mailbox.
    pub fn ack(&self, device: &AuthenticatedDevice, seqs: &[u64]) -> Result<Usage> {
        let addr = device.address();
        let slot = self.slot(addr);
        let removed = {
            let _write = lock(&slot.write);
            self.mailboxes.remove(addr, seqs)
        };
        self.release(addr, slot);
        Ok(removed?)
    }

    /// What a device's mailbox holds.
    pub fn usage(&self, device: &AuthenticatedDevice) -> Result<Usage> {
        Ok(self.mailboxes.usage(device.address())?)
    }

    /// Deletes up to `batch` expired messages; returns how many it deleted. Costs what
    /// is expired, not what is stored.
    pub fn sweep(&self, batch: usize) -> Result<u64> {
        let due = self.mailboxes.expired(self.clock.now(), batch)?;
        let mut by_device: BTreeMap<DeviceAddress, Vec<_>> = BTreeMap::new();
        for e in due {
            by_device.entry(e.to).or_default().push(e);
        }
        let mut deleted = 0;
        for (addr, entries) in by_device {
            let slot = self.slot(&addr);
            let removed = {
                let _write = lock(&slot.write);
                self.mailboxes.expire(&addr, &entries)
            };
            self.release(&addr, slot);
            deleted += removed?.messages;
        }
        Ok(deleted)
    }

    /// Makes everything so far durable, whatever the configured durability.
    pub fn flush(&self) -> Result<()> {
        Ok(self.mailboxes.flush()?)
    }

    /// Entries in the per-device table; for tests of its cleanup.
    pub fn tracked_devices(&self) -> usize {
        lock(&self.devices).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::commit::Durability;
    use crate::store::MemoryStore;
    use bytes::Bytes;
    use ed25519_dalek::{Signer, SigningKey};
    use std::time::Duration;
    use tern_proto::MessageId;

    struct Fixture {
        hub: Arc<Hub>,
        clock: Arc<ManualClock>,
        store: Arc<MemoryStore>,
    }

    fn fixture(limits: Limits) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let clock = Arc::new(ManualClock::new(1_000_000));
        let commit = GroupCommit::start(store.clone(), Durability::Fsync).expect("commit");
        let ttl = Ttl::new(Duration::from_secs(3600)).expect("ttl");
        let hub = Arc::new(Hub::new(
            store.clone(),
            store.clone(),
            clock.clone(),
            limits,
            ttl,
            commit,
        ));
        Fixture { hub, clock, store }
    }

    async fn device(hub: &Hub, seed: u8) -> AuthenticatedDevice {
        let identity = SigningKey::from_bytes(&[seed; 32]);
        let dev = SigningKey::from_bytes(&[seed.wrapping_add(100); 32]);
        let dev_pub = dev.verifying_key().to_bytes();
        let exporter = [seed; 32];
        let reg = auth::verify_registration(
            &identity.verifying_key().to_bytes(),
            &dev_pub,
            &identity
                .sign(&tern_proto::auth::device_certificate(None, &dev_pub))
                .to_bytes(),
            &dev.sign(&tern_proto::auth::session_proof(&exporter))
                .to_bytes(),
            &exporter,
        )
        .expect("valid registration");
        hub.register(reg).await.expect("register")
    }

    fn msgs(range: std::ops::Range<u8>, len: usize) -> Vec<NewMessage> {
        range
            .map(|i| NewMessage {
                message_id: MessageId([i; 16]),
                payload: Bytes::from(vec![i; len]),
            })
            .collect()
    }

    fn ids(pull: &Pull) -> Vec<u8> {
        pull.messages.iter().map(|m| m.message_id.0[0]).collect()
    }

    #[tokio::test]
    async fn delivers_in_order_and_ack_deletes() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        f.hub
            .send(&alice, *bob.address(), &msgs(0..3, 8))
            .await
            .expect("send");
        f.hub
            .send(&alice, *bob.address(), &msgs(3..5, 8))
            .await
            .expect("send");

        let mut window = DeliveryWindow::new(3);
        let first = f.hub.pull(&bob, &mut window).expect("pull");
        assert_eq!(ids(&first), vec![0, 1, 2], "window of three");
        assert!(!first.queue_empty);
        assert!(
            f.hub
                .pull(&bob, &mut window)
                .expect("pull")
                .messages
                .is_empty(),
            "window full"
        );

        let seqs: Vec<u64> = first.messages.iter().map(|m| m.seq).collect();
        let removed = f.hub.ack(&bob, &seqs).expect("ack");
        assert_eq!(removed.messages, 3);
        seqs.iter().for_each(|s| assert!(window.on_acked(*s)));
        let rest = f.hub.pull(&bob, &mut window).expect("pull");
        assert_eq!(ids(&rest), vec![3, 4]);
        assert!(rest.queue_empty);
        f.hub
            .ack(
                &bob,
                &rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            )
            .expect("ack");
        assert_eq!(
            f.hub.usage(&bob).expect("usage"),
            Usage::default(),
            "store is empty after acks"
        );
        assert_eq!(
            f.hub.tracked_devices(),
            0,
            "no per-device state left behind"
        );
    }

    #[tokio::test]
    async fn a_device_cannot_ack_another_devices_mailbox() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        f.hub
            .send(&alice, *bob.address(), &msgs(0..2, 8))
            .await
            .expect("send");
        let seqs: Vec<u64> = f
            .hub
            .pull(&bob, &mut DeliveryWindow::new(10))
            .expect("pull")
            .messages
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(f.hub.ack(&alice, &seqs).expect("ack").messages, 0);
        assert_eq!(f.hub.usage(&bob).expect("usage").messages, 2);
        let mut alice_window = DeliveryWindow::new(10);
        assert!(f
            .hub
            .pull(&alice, &mut alice_window)
            .expect("pull")
            .messages
            .is_empty());
    }

    #[tokio::test]
    async fn limits_refuse_whole_sends_and_keep_what_is_stored() {
        let f = fixture(Limits {
            max_envelope_bytes: 16,
            max_batch: 4,
            max_queued_messages: 5,
            max_queued_bytes: 60,
        });
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        let to = *bob.address();
        f.hub.send(&alice, to, &msgs(0..4, 10)).await.expect("send");
        assert!(matches!(
            f.hub.send(&alice, to, &msgs(4..6, 1)).await,
            Err(Error::MailboxFull(_))
        ));
        assert!(matches!(
            f.hub.send(&alice, to, &msgs(4..5, 21)).await,
            Err(Error::TooLarge { .. })
        ));
        f.hub
            .send(&alice, to, &msgs(4..5, 16))
            .await
            .expect("exactly at the envelope limit");
        // 4x10 + 16 = 56 bytes, 5 messages: now full on count.
        assert!(matches!(
            f.hub.send(&alice, to, &msgs(5..6, 1)).await,
            Err(Error::MailboxFull(_))
        ));
        assert!(matches!(
            f.hub.send(&alice, to, &msgs(0..5, 1)).await,
            Err(Error::TooLarge { .. })
        ));
        assert_eq!(
            f.hub.usage(&bob).expect("usage"),
            Usage {
                messages: 5,
                bytes: 56
            }
        );
        let all = f
            .hub
            .pull(&bob, &mut DeliveryWindow::new(100))
            .expect("pull");
        assert_eq!(ids(&all), vec![0, 1, 2, 3, 4], "nothing stored was lost");
    }

    #[tokio::test]
    async fn unknown_recipients_are_refused() {
        let f = fixture(Limits::default());
        let alice = device(&f.hub, 1).await;
        let nobody = DeviceAddress::from_wire(&[0xee; 16], 1).expect("addr");
        assert!(matches!(
            f.hub.send(&alice, nobody, &msgs(0..1, 1)).await,
            Err(Error::UnknownRecipient)
        ));
        let no_device = DeviceAddress {
            account: alice.address().account,
            device: DeviceId::new(9).expect("id"),
        };
        assert!(matches!(
            f.hub.send(&alice, no_device, &msgs(0..1, 1)).await,
            Err(Error::UnknownRecipient)
        ));
    }

    #[tokio::test]
    async fn expired_messages_are_never_delivered_and_are_swept() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        f.hub
            .send(&alice, *bob.address(), &msgs(0..2, 8))
            .await
            .expect("send");
        f.clock.advance(Duration::from_secs(1800));
        f.hub
            .send(&alice, *bob.address(), &msgs(2..3, 8))
            .await
            .expect("send");
        f.clock.advance(Duration::from_secs(1800));

        // The first two are exactly at their expiry: never delivered, swept or not.
        let pull = f
            .hub
            .pull(&bob, &mut DeliveryWindow::new(10))
            .expect("pull");
        assert_eq!(ids(&pull), vec![2]);
        assert!(pull.queue_empty);

        assert_eq!(f.hub.sweep(1).expect("sweep"), 1, "bounded batch");
        assert_eq!(f.hub.sweep(100).expect("sweep"), 1);
        assert_eq!(f.hub.sweep(100).expect("sweep"), 0);
        assert_eq!(f.store.usage(bob.address()).expect("usage").messages, 1);
        f.clock.advance(Duration::from_secs(1800));
        assert_eq!(f.hub.sweep(100).expect("sweep"), 1);
        assert_eq!(
            f.store.usage(bob.address()).expect("usage"),
            Usage::default()
        );
    }

    #[tokio::test]
    async fn subscriptions_wake_and_displace() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        let first = f.hub.subscribe(&bob);
        first.changed().await; // the initial wake-up
        f.hub
            .send(&alice, *bob.address(), &msgs(0..1, 1))
            .await
            .expect("send");
        tokio::time::timeout(Duration::from_secs(5), first.changed())
            .await
            .expect("woken by a send");
        assert!(!first.displaced());
        let second = f.hub.subscribe(&bob);
        tokio::time::timeout(Duration::from_secs(5), first.changed())
            .await
            .expect("woken by displacement");
        assert!(first.displaced());
        second.changed().await; // its initial wake-up
        drop(first);
        // The displaced subscription's drop leaves the new one in place.
        f.hub
            .send(&alice, *bob.address(), &msgs(1..2, 1))
            .await
            .expect("send");
        tokio::time::timeout(Duration::from_secs(5), second.changed())
            .await
            .expect("still subscribed");
        drop(second);
        assert_eq!(f.hub.tracked_devices(), 0);
    }
}
