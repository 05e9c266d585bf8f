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

use ed25519_dalek::Signer;
use sha2::{Digest, Sha256};
use tern_proto::{AccountId, DeviceAddress, DeviceId};
use tokio::sync::Notify;

use tern_platform::clock::{Clock, UnixMillis};
use crate::commit::{Flush, GroupCommit};
use crate::core::auth::{self, AuthenticatedDevice, VerifiedRegistration};
use crate::core::delivery::DeliveryWindow;
use crate::core::expiry::{is_expired, Ttl};
use crate::core::limits::Limits;
use crate::error::{Error, Result};
use crate::store::{
    AccountRecord, AccountStore, BlobIndex, FetchedKeys, KeyStore, MailboxStore, NewMessage,
    OneTimeKey, SignedKey, StoreError, StoredMessage, Usage,
};

/// Most one-time prekeys a device may hold on the relay.
pub const MAX_ONE_TIME_PREKEYS: u64 = 1000;
/// How long a sender certificate is valid.
pub const SENDER_CERTIFICATE_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;

/// The stores a hub works on.
#[derive(Clone)]
pub struct Stores {
    /// Queued envelopes.
    pub mailboxes: Arc<dyn MailboxStore>,
    /// Accounts, device keys, delivery tokens.
    pub accounts: Arc<dyn AccountStore>,
    /// Published prekeys.
    pub keys: Arc<dyn KeyStore>,
    /// Media metadata.
    pub blobs: Arc<dyn BlobIndex>,
    /// Makes every change to any of them durable.
    pub flush: Flush,
}

impl Stores {
    /// Every store on one backend.
    pub fn all<S: MailboxStore + AccountStore + KeyStore + BlobIndex>(store: Arc<S>) -> Self {
        let s = store.clone();
        Stores {
            mailboxes: store.clone(),
            accounts: store.clone(),
            keys: store.clone(),
            blobs: store,
            flush: Arc::new(move || s.flush()),
        }
    }

    /// Mailboxes on one backend, everything else on another.
    pub fn split<M, S>(mailboxes: Arc<M>, rest: Arc<S>) -> Self
    where
        M: MailboxStore,
        S: MailboxStore + AccountStore + KeyStore + BlobIndex,
    {
        let (m, r) = (mailboxes.clone(), rest.clone());
        Stores {
            mailboxes,
            accounts: rest.clone(),
            keys: rest.clone(),
            blobs: rest,
            flush: Arc::new(move || {
                m.flush()?;
                r.flush()
            }),
        }
    }
}

/// Keys a device publishes, as received (checked by [`Hub::publish_keys`]).
#[derive(Debug, Default)]
pub struct PublishedKeys<'a> {
    /// Identity agreement key and the identity's signature over it.
    pub identity_dh: Option<(&'a [u8], &'a [u8])>,
    /// Signed prekey: id, key, the identity's signature.
    pub signed_prekey: Option<(u32, &'a [u8], &'a [u8])>,
    /// One-time prekeys: id, key.
    pub one_time: Vec<(u32, &'a [u8])>,
}

/// Prekey bundles of an account's devices.
#[derive(Debug, Clone)]
pub struct AccountKeys {
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// One bundle per device that has published keys.
    pub devices: Vec<(DeviceId, FetchedKeys)>,
}

/// A sender certificate: the encoded `v1::SenderCertificate` and the relay's
/// signature over it.
#[derive(Debug, Clone)]
pub struct SenderCertificate {
    /// Encoded `v1::SenderCertificate`.
    pub certificate: Vec<u8>,
    /// The relay's signature over `tern_proto::auth::sender_certificate(certificate)`.
    pub signature: [u8; 64],
}

/// Shared relay state. See the module docs.
pub struct Hub {
    mailboxes: Arc<dyn MailboxStore>,
    accounts: Arc<dyn AccountStore>,
    keys: Arc<dyn KeyStore>,
    signer: ed25519_dalek::SigningKey,
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

fn signature(sig: &[u8]) -> Result<[u8; 64]> {
    sig.try_into().map_err(|_| Error::Unauthorized)
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
    /// A hub over the given stores; `signer` signs sender certificates.
    pub fn new(
        stores: Stores,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        commit: GroupCommit,
        signer: ed25519_dalek::SigningKey,
    ) -> Self {
        Hub {
            mailboxes: stores.mailboxes,
            accounts: stores.accounts,
            keys: stores.keys,
            signer,
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

    /// Queues `msgs` from an authenticated device for `to`, all or nothing; returns
    /// once they are durable as configured. A connected recipient is woken at once.
    pub async fn send(
        &self,
        sender: &AuthenticatedDevice,
        to: DeviceAddress,
        msgs: &[NewMessage],
    ) -> Result<usize> {
        let n = self.append_send(sender, to, msgs)?;
        self.durable().await?;
        Ok(n)
    }

    /// Queues `msgs` for `to` from a sender the relay does not know, who shows the
    /// recipient account's delivery token. A missing account and a wrong token get the
    /// same answer, so the relay does not confirm who has an account.
    pub async fn sealed_send(
        &self,
        to: DeviceAddress,
        token: &[u8],
        msgs: &[NewMessage],
    ) -> Result<usize> {
        let n = self.append_sealed_send(to, token, msgs)?;
        self.durable().await?;
        Ok(n)
    }

    /// The first half of [`Hub::send`]: checks and appends, in the order of calls, but
    /// does not wait for durability ([`Hub::durable`] does). A connection appends its
    /// sends in the order they arrive and waits for their commits concurrently, so
    /// pipelined sends keep their order without paying one commit each.
    pub fn append_send(
        &self,
        _sender: &AuthenticatedDevice,
        to: DeviceAddress,
        msgs: &[NewMessage],
    ) -> Result<usize> {
        let exists = self
            .accounts
            .get(&to.account)?
            .is_some_and(|rec| rec.device_key(to.device).is_some());
        if !exists {
            return Err(Error::UnknownRecipient);
        }
        self.append(to, msgs)
    }

    /// An account's device ids, for a holder of its delivery token. A missing account
    /// and a wrong token get the same answer, as for sealed sends.
    pub fn list_devices(&self, account: &AccountId, token: &[u8]) -> Result<Vec<DeviceId>> {
        self.check_token(account, token)?;
        let record = self.accounts.get(account)?.ok_or(Error::Unauthorized)?;
        Ok(record.devices.iter().map(|(id, _)| *id).collect())
    }

    fn check_token(&self, account: &AccountId, token: &[u8]) -> Result<()> {
        let expected = self
            .accounts
            .delivery_token(account)?
            .ok_or(Error::Unauthorized)?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        if presented != expected {
            return Err(Error::Unauthorized);
        }
        Ok(())
    }

    /// The first half of [`Hub::sealed_send`]; see [`Hub::append_send`].
    pub fn append_sealed_send(
        &self,
        to: DeviceAddress,
        token: &[u8],
        msgs: &[NewMessage],
    ) -> Result<usize> {
        self.check_token(&to.account, token)?;
        let record = self.accounts.get(&to.account)?.ok_or(Error::Unauthorized)?;
        if record.device_key(to.device).is_none() {
            return Err(Error::UnknownRecipient);
        }
        self.append(to, msgs)
    }

    /// Waits until everything appended so far is durable as configured (one group
    /// commit shared by every caller waiting at the time).
    pub async fn durable(&self) -> Result<()> {
        self.commit.commit().await?;
        Ok(())
    }

    fn append(&self, to: DeviceAddress, msgs: &[NewMessage]) -> Result<usize> {
        self.limits
            .check_batch(msgs.iter().map(|m| m.payload.len()))?;
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
        Ok(msgs.len())
    }

    /// Sets the device's account's delivery token hash (SHA-256 of the token).
    pub async fn set_delivery_token(
        &self,
        device: &AuthenticatedDevice,
        token_hash: &[u8],
    ) -> Result<()> {
        let hash: [u8; 32] = token_hash
            .try_into()
            .map_err(|_| Error::BadRequest("a delivery token hash is 32 bytes".into()))?;
        self.accounts
            .set_delivery_token(&device.address().account, &hash)?;
        self.commit.commit().await?;
        Ok(())
    }

    /// The key sender certificates are signed with.
    pub fn signing_key(&self) -> [u8; 32] {
        self.signer.verifying_key().to_bytes()
    }

    /// A certificate of `device`, signed by the relay, valid for
    /// [`SENDER_CERTIFICATE_LIFETIME_MS`].
    pub fn sender_certificate(&self, device: &AuthenticatedDevice) -> Result<SenderCertificate> {
        let addr = device.address();
        let record = self
            .accounts
            .get(&addr.account)?
            .ok_or(Error::Unauthorized)?;
        let cert = tern_proto::v1::SenderCertificate {
            account_id: bytes::Bytes::copy_from_slice(addr.account.as_bytes()),
            device_id: addr.device.get(),
            identity_key: bytes::Bytes::copy_from_slice(&record.identity_key),
            expires_at_ms: self
                .clock
                .now()
                .saturating_add(SENDER_CERTIFICATE_LIFETIME_MS),
            relay_key: bytes::Bytes::copy_from_slice(&self.signing_key()),
        };
        let certificate = prost::Message::encode_to_vec(&cert);
        let signature = self
            .signer
            .sign(&tern_proto::auth::sender_certificate(&certificate))
            .to_bytes();
        Ok(SenderCertificate {
            certificate,
            signature,
        })
    }

    /// Checks and stores keys a device publishes; returns its one-time pool size.
    pub async fn publish_keys(
        &self,
        device: &AuthenticatedDevice,
        keys: PublishedKeys<'_>,
    ) -> Result<u64> {
        let addr = device.address();
        let record = self
            .accounts
            .get(&addr.account)?
            .ok_or(Error::Unauthorized)?;
        let identity_dh = keys
            .identity_dh
            .map(|(key, sig)| -> Result<SignedKey> {
                let key = auth::verify_vouched_key(
                    &record.identity_key,
                    key,
                    tern_proto::auth::identity_agreement_key,
                    sig,
                )?;
                Ok(SignedKey {
                    id: 0,
                    key,
                    signature: signature(sig)?,
                })
            })
            .transpose()?;
        let signed_prekey = keys
            .signed_prekey
            .map(|(id, key, sig)| -> Result<SignedKey> {
                let key = auth::verify_vouched_key(
                    &record.identity_key,
                    key,
                    |k| tern_proto::auth::signed_prekey(id, k),
                    sig,
                )?;
                Ok(SignedKey {
                    id,
                    key,
                    signature: signature(sig)?,
                })
            })
            .transpose()?;
        let one_time = keys
            .one_time
            .iter()
            .map(|(id, key)| {
                let key = (*key)
                    .try_into()
                    .map_err(|_| Error::BadRequest("keys are 32 bytes".into()))?;
                Ok(OneTimeKey { id: *id, key })
            })
            .collect::<Result<Vec<_>>>()?;
        let held = self.keys.one_time_count(addr)?;
        if held.saturating_add(one_time.len() as u64) > MAX_ONE_TIME_PREKEYS {
            return Err(Error::TooLarge {
                what: "one-time prekey pool",
                size: (held as usize).saturating_add(one_time.len()),
                max: MAX_ONE_TIME_PREKEYS as usize,
            });
        }
        let count = self.keys.publish(
            addr,
            identity_dh.as_ref(),
            signed_prekey.as_ref(),
            &one_time,
        )?;
        self.commit.commit().await?;
        Ok(count)
    }

    /// Prekey bundles of `account`'s devices (or of one device), each consuming one
    /// one-time prekey. Returns the account's identity key with them. Devices that have
    /// not published keys are left out.
    pub fn fetch_keys(
        &self,
        _requester: &AuthenticatedDevice,
        account: &AccountId,
        device: Option<DeviceId>,
    ) -> Result<AccountKeys> {
        let record = self.accounts.get(account)?.ok_or(Error::UnknownRecipient)?;
        let mut bundles = Vec::new();
        for (id, _) in record
            .devices
            .iter()
            .filter(|(id, _)| device.is_none_or(|d| d == *id))
        {
            if let Some(keys) = self.keys.fetch(&DeviceAddress {
                account: *account,
                device: *id,
            })? {
                bundles.push((*id, keys));
            }
        }
        if bundles.is_empty() {
            return Err(Error::UnknownRecipient);
        }
        Ok(AccountKeys {
            identity_key: record.identity_key,
            devices: bundles,
        })
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
        Ok(self.commit.flush_now()?)
    }

    /// For a clean shutdown: finishes the stores' deferred work (acknowledged messages
    /// still on disk are scrubbed), then flushes everything.
    pub fn close(&self) -> Result<()> {
        self.mailboxes.settle()?;
        self.flush()
    }

    /// Entries in the per-device table; for tests of its cleanup.
    pub fn tracked_devices(&self) -> usize {
        lock(&self.devices).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_platform::clock::ManualClock;
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
        let stores = Stores::all(store.clone());
        let commit = GroupCommit::start(stores.flush.clone(), Durability::Fsync).expect("commit");
        let ttl = Ttl::new(Duration::from_secs(3600)).expect("ttl");
        let hub = Arc::new(Hub::new(
            stores,
            clock.clone(),
            limits,
            ttl,
            commit,
            ed25519_dalek::SigningKey::from_bytes(&[42; 32]),
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

    fn identity_of(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[tokio::test]
    async fn prekeys_are_checked_and_each_one_time_key_handed_out_once() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(&f.hub, 1).await, device(&f.hub, 2).await);
        let id = identity_of(2);
        let dh = [5u8; 32];
        let dh_sig = id
            .sign(&tern_proto::auth::identity_agreement_key(&dh))
            .to_bytes();
        let spk = [6u8; 32];
        let spk_sig = id
            .sign(&tern_proto::auth::signed_prekey(1, &spk))
            .to_bytes();
        let otk = [[7u8; 32], [8u8; 32]];

        // A signed prekey signed for another id is refused, and nothing is stored.
        let bad = PublishedKeys {
            signed_prekey: Some((2, &spk, &spk_sig)),
            ..Default::default()
        };
        assert!(matches!(
            f.hub.publish_keys(&bob, bad).await,
            Err(Error::Unauthorized)
        ));
        // Signed by someone else's identity.
        let foreign = identity_of(9)
            .sign(&tern_proto::auth::identity_agreement_key(&dh))
            .to_bytes();
        let bad = PublishedKeys {
            identity_dh: Some((&dh, &foreign)),
            ..Default::default()
        };
        assert!(f.hub.publish_keys(&bob, bad).await.is_err());
        assert!(matches!(
            f.hub.fetch_keys(&alice, &bob.address().account, None),
            Err(Error::UnknownRecipient)
        ));

        let good = PublishedKeys {
            identity_dh: Some((&dh, &dh_sig)),
            signed_prekey: Some((1, &spk, &spk_sig)),
            one_time: vec![(10, &otk[0]), (11, &otk[1])],
        };
        assert_eq!(f.hub.publish_keys(&bob, good).await.expect("publish"), 2);
        let fetch = || {
            f.hub
                .fetch_keys(&alice, &bob.address().account, None)
                .expect("fetch")
        };
        let AccountKeys {
            identity_key,
            devices: first,
        } = fetch();
        assert_eq!(identity_key, id.verifying_key().to_bytes());
        assert_eq!(first[0].1.identity_dh.key, dh);
        assert_eq!(first[0].1.signed_prekey.key, spk);
        let second = fetch().devices;
        let third = fetch().devices;
        let one_time: Vec<_> = [&first, &second, &third]
            .iter()
            .map(|b| b[0].1.one_time.map(|k| k.id))
            .collect();
        assert_eq!(
            one_time,
            vec![Some(10), Some(11), None],
            "once each, then the signed prekey alone"
        );
        let unknown = AccountId([0xee; 16]);
        assert!(matches!(
            f.hub.fetch_keys(&alice, &unknown, None),
            Err(Error::UnknownRecipient)
        ));
    }

    #[tokio::test]
    async fn the_one_time_pool_is_capped() {
        let f = fixture(Limits::default());
        let bob = device(&f.hub, 2).await;
        let keys: Vec<[u8; 32]> = (0..=MAX_ONE_TIME_PREKEYS)
            .map(|i| [(i % 250) as u8; 32])
            .collect();
        let too_many = PublishedKeys {
            one_time: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (i as u32, &k[..]))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(
            f.hub.publish_keys(&bob, too_many).await,
            Err(Error::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn sealed_sends_need_the_recipients_delivery_token() {
        let f = fixture(Limits::default());
        let bob = device(&f.hub, 2).await;
        let to = *bob.address();
        let token = [3u8; 32];
        // No token set yet: refused, exactly like an unknown account.
        assert!(matches!(
            f.hub.sealed_send(to, &token, &msgs(0..1, 4)).await,
            Err(Error::Unauthorized)
        ));
        let nobody = DeviceAddress::from_wire(&[0xee; 16], 1).expect("addr");
        assert!(matches!(
            f.hub.sealed_send(nobody, &token, &msgs(0..1, 4)).await,
            Err(Error::Unauthorized)
        ));

        let hash: [u8; 32] = Sha256::digest(token).into();
        assert!(f.hub.set_delivery_token(&bob, &hash[..31]).await.is_err());
        f.hub.set_delivery_token(&bob, &hash).await.expect("set");
        assert_eq!(
            f.hub
                .sealed_send(to, &token, &msgs(0..2, 4))
                .await
                .expect("sealed send"),
            2
        );
        assert!(matches!(
            f.hub.sealed_send(to, &[4u8; 32], &msgs(2..3, 4)).await,
            Err(Error::Unauthorized)
        ));
        let no_device = DeviceAddress {
            account: to.account,
            device: DeviceId::new(7).expect("id"),
        };
        assert!(matches!(
            f.hub.sealed_send(no_device, &token, &msgs(2..3, 4)).await,
            Err(Error::UnknownRecipient)
        ));

        // Rotation: the old token stops working.
        let new_hash: [u8; 32] = Sha256::digest([5u8; 32]).into();
        f.hub
            .set_delivery_token(&bob, &new_hash)
            .await
            .expect("rotate");
        assert!(matches!(
            f.hub.sealed_send(to, &token, &msgs(2..3, 4)).await,
            Err(Error::Unauthorized)
        ));
        assert_eq!(
            f.hub
                .sealed_send(to, &[5u8; 32], &msgs(2..3, 4))
                .await
                .expect("new token"),
            1
        );
        let got = f
            .hub
            .pull(&bob, &mut DeliveryWindow::new(10))
            .expect("pull");
        assert_eq!(ids(&got), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn sender_certificates_are_signed_by_the_relay_and_expire() {
        let f = fixture(Limits::default());
        let alice = device(&f.hub, 1).await;
        let cert = f.hub.sender_certificate(&alice).expect("certificate");
        let relay_key = ed25519_dalek::VerifyingKey::from_bytes(&f.hub.signing_key()).expect("key");
        let sig = ed25519_dalek::Signature::from_bytes(&cert.signature);
        relay_key
            .verify_strict(
                &tern_proto::auth::sender_certificate(&cert.certificate),
                &sig,
            )
            .expect("signed by the relay");
        let decoded: tern_proto::v1::SenderCertificate =
            prost::Message::decode(&cert.certificate[..]).expect("decodes");
        assert_eq!(&decoded.account_id[..], alice.address().account.as_bytes());
        assert_eq!(decoded.device_id, 1);
        assert_eq!(
            &decoded.identity_key[..],
            &identity_of(1).verifying_key().to_bytes()
        );
        assert_eq!(
            decoded.expires_at_ms,
            f.clock.now() + SENDER_CERTIFICATE_LIFETIME_MS
        );
        assert_eq!(&decoded.relay_key[..], &f.hub.signing_key());
    }
}
