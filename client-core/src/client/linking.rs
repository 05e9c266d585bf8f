//! Linked devices, as the app drives them: the primary links a new device from the
//! link it shows ([`Client::link_device`]), the new device joins ([`Client::join`],
//! then [`Joining::finish`]), any device lists the account's devices
//! ([`Client::devices`]), and the primary removes one ([`Client::remove_device`]).

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::OsRng;
use rand::Rng;
use tern_proto::address::RelayAddress;
use tern_proto::e2e::sync_message::Kind;
use tern_proto::{e2e, DeviceAddress, DeviceId};

use super::devices::ListChange;
use super::state::{LinkedKeys, NewDevice, State};
use super::{Client, ClientOptions, Event, Events, Shared};
use crate::crypto::devices::DeviceEntry;
use crate::crypto::x3dh::AgreementKeyPair;
use crate::link::{self, JoinKeys, Link, LinkPayload, LinkedContact};
use crate::net::RelayConnection;
use crate::store::records::LocalRecord;
use crate::store::{Batch, IdentityStore, KvStore};
use crate::{Error, ErrorCode, Result};

/// How often a joining device asks for its payload (±25 %).
const POLL: Duration = Duration::from_secs(1);
/// The most polls one join makes: past the relay's 10-minute slot lifetime.
const MAX_POLLS: u32 = 11 * 60;
/// A linked device that has not joined by then is removed again.
const JOIN_DEADLINE_MS: u64 = 12 * 60 * 1000;
/// Contacts carried in the payload itself; the rest follow as a sync (a payload
/// stays far below the relay's 64 KiB).
const PAYLOAD_CONTACTS: usize = 500;
/// Contacts per contact sync message (well inside a message's padded size).
const SYNC_CONTACTS: usize = 200;

/// A device linked by [`Client::link_device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkedDevice {
    /// The id the relay gave it.
    pub id: DeviceId,
}

/// One device of this account, from [`Client::devices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// Whether it is the primary (device 1, which holds the identity key).
    pub primary: bool,
    /// Whether it is the device this client runs on.
    pub this_device: bool,
}

/// A device waiting to join an account: show [`Joining::link`] to the primary
/// (as text or a QR code), then wait in [`Joining::finish`].
pub struct Joining {
    link: String,
    keys: JoinKeys,
    relay: RelayAddress,
    store: Arc<dyn KvStore>,
    options: ClientOptions,
}

impl std::fmt::Debug for Joining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joining").finish_non_exhaustive()
    }
}

impl Client {
    /// Starts joining an existing account as a new device on `relay` (the account's
    /// home relay), with `store` empty: opens a provisioning slot and makes the link
    /// to show the account's primary. A store still joining from before goes on
    /// with the same link.
    pub async fn join(relay: &RelayAddress, store: Arc<dyn KvStore>) -> Result<Joining> {
        Client::join_with(relay, store, ClientOptions::default()).await
    }

    /// [`Client::join`] with [`ClientOptions`].
    pub async fn join_with(
        relay: &RelayAddress,
        store: Arc<dyn KvStore>,
        options: ClientOptions,
    ) -> Result<Joining> {
        let keys = match store.local()? {
            Some(local) if local.is_joining() => JoinKeys::from_bytes(&local.joining)?,
            Some(_) => return Err(Error::AlreadyRegistered),
            None => {
                // As in `register_with`: records under another storage key fail here.
                if !store.scan(crate::store::Namespace::Local)?.is_empty() {
                    return Err(Error::AlreadyRegistered);
                }
                let keys = JoinKeys::generate();
                let local = LocalRecord {
                    relay: relay.to_string(),
                    joining: keys.to_bytes().to_vec(),
                    ..LocalRecord::default()
                };
                let mut batch = Batch::new();
                batch.put_local(&local);
                batch.commit(&*store, true)?;
                keys
            }
        };
        let (conn, _inbox) = RelayConnection::connect(relay).await?;
        match conn
            .open_provisioning(keys.slot_id(), keys.reader_hash())
            .await
        {
            Ok(_) => {}
            // Opened before a restart: it is still there, or taking it says it is gone.
            Err(e) if e.relay_code() == Some(ErrorCode::BadRequest) => {}
            Err(e) => return Err(e),
        }
        conn.close().await;
        Ok(Joining {
            link: keys.link(relay).to_string(),
            keys,
            relay: relay.clone(),
            store,
            options,
        })
    }

    /// Links the device that showed `link` to this account (primary only): the relay
    /// adds it, this device signs and publishes the account's device list with it,
    /// and seals the new device its keys' certificates, the list, the delivery token
    /// and the contacts in the link's provisioning slot. A device that has not joined
    /// within 12 minutes is removed again.
    pub async fn link_device(&self, link: &str) -> Result<LinkedDevice> {
        let link = Link::parse(link)?;
        link.check_relay(&self.shared.relay_now())?;
        let (identity, account) = {
            let state = self.shared.state.lock().await;
            let identity = state.keys.identity.clone().ok_or(Error::NotPrimary)?;
            if !state.is_primary() {
                return Err(Error::NotPrimary);
            }
            (identity, state.keys.address.account)
        };
        let (conn, _) = self.connections().await?;
        let device = conn
            .add_device(&identity, &account, &link.device_key)
            .await?;
        // Pending from now: whatever fails below, the worker removes it at the deadline.
        let now = self.shared.now_ms();
        self.shared
            .state
            .lock()
            .await
            .add_pending_link(device, now + JOIN_DEADLINE_MS)?;
        let entry = DeviceEntry {
            id: device,
            device_key: link.device_key,
            identity_dh: link.identity_dh,
        };
        let (list, signature) = publish_list(&self.shared, &conn, ListChange::Add(entry)).await?;
        let payload = {
            let state = self.shared.state.lock().await;
            let (contacts, complete) = state.linked_contacts(PAYLOAD_CONTACTS);
            LinkPayload {
                account,
                device_id: device,
                identity_key: identity.public(),
                device_signature: identity.certify_device(Some(&account), &link.device_key),
                identity_dh_signature: identity.certify_agreement_key(&link.identity_dh),
                device_list: list,
                device_list_signature: signature,
                delivery_token: state.keys.delivery_token,
                relay_signing_key: state.keys.relay_signing_key,
                contacts,
                contacts_complete: complete,
                created_at_ms: now,
            }
        };
        let sealed = link::seal_payload(&link, &payload)?;
        conn.deposit_provisioning(link.slot_id, device, sealed)
            .await?;
        self.shared.outbox.notify_one();
        Ok(LinkedDevice { id: device })
    }

    /// This account's devices: those in its signed list that the relay also holds
    /// (just this device for an account that never linked one).
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let (account, token, own) = {
            let state = self.shared.state.lock().await;
            (
                state.keys.address.account,
                state.keys.delivery_token,
                state.own_list(),
            )
        };
        let listing = self
            .shared
            .anon
            .run(|c| async move { c.device_listing(&account, &token).await })
            .await?;
        let this = self.address.device;
        let ids: Vec<DeviceId> = match own {
            Some(list) => list
                .entries
                .iter()
                .map(|e| e.id)
                .filter(|id| listing.devices.contains(id) || *id == this)
                .collect(),
            None => vec![this],
        };
        Ok(ids
            .into_iter()
            .map(|id| DeviceInfo {
                id,
                primary: id == DeviceId::PRIMARY,
                this_device: id == this,
            })
            .collect())
    }

    /// Removes device `id` from this account (primary only; never device 1, which
    /// is refused with [`Error::NotPrimary`]: delete the account instead): the
    /// primary signs and publishes a list without it, and the relay deletes the
    /// device's keys, mailbox and credentials and closes its connections. Contacts
    /// stop encrypting to it at their next send (their list version is then stale).
    pub async fn remove_device(&self, id: DeviceId) -> Result<()> {
        let (conn, _) = self.connections().await?;
        remove_device(&self.shared, &conn, id).await
    }
}

impl Joining {
    /// The link to show the primary (`tern-link:…`; also as a QR code).
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Waits for the primary's payload (polling about once a second, up to the
    /// slot's 10 minutes), opens and checks it, stores this device (with the list,
    /// the contacts and the `Joined` sync for the primary, in one write) and starts
    /// the client, whose worker publishes the keys before it sends. [`Error::LinkExpired`] if the slot
    /// expired first (the joining state is cleared; start again); a payload that
    /// does not open is [`Error::LinkRejected`].
    pub async fn finish(self) -> Result<(Client, Events)> {
        let sealed = self.wait_for_payload().await?;
        // Verified there (the signatures and the list naming this device).
        let payload = link::open_payload(&self.keys, &self.relay, &sealed)?;
        let clock = self.options.clock.clone();
        let now = clock.now();
        let device_secret = zeroize::Zeroizing::new(self.keys.device_signing_key().to_bytes());
        let identity_dh = AgreementKeyPair::from_secret(self.keys.identity_dh_secret().to_bytes());
        let address = DeviceAddress {
            account: payload.account,
            device: payload.device_id,
        };
        let state = State::create_joined(
            self.store.clone(),
            NewDevice {
                relay: self.relay.to_string(),
                identity_secret: &[],
                linked: Some(LinkedKeys {
                    identity_key: payload.identity_key,
                    identity_dh_signature: payload.identity_dh_signature,
                    delivery_token: payload.delivery_token,
                    device_signature: payload.device_signature,
                }),
                device_secret: &device_secret,
                identity_dh: &identity_dh,
                address,
                relay_signing_key: payload.relay_signing_key,
            },
            &payload.device_list,
            &payload.device_list_signature,
            &payload.contacts,
            now,
            &mut OsRng,
        )?;
        // The worker authenticates, publishes the keys (before it sends anything)
        // and sends the `Joined` sync; after a crash, `Client::open` does the same.
        Ok(Client::start(
            state,
            self.relay.clone(),
            clock,
            self.options.groups,
        ))
    }

    /// Polls the slot until the payload is there; the slot gone is
    /// [`Error::LinkExpired`], and the joining state is cleared.
    async fn wait_for_payload(&self) -> Result<Vec<u8>> {
        let mut conn = None;
        for _ in 0..MAX_POLLS {
            let c = match conn.take() {
                Some(c) => c,
                None => RelayConnection::connect(&self.relay).await?.0,
            };
            let taken = c
                .take_provisioning(self.keys.slot_id(), self.keys.reader_secret())
                .await;
            match taken {
                Ok(Some(payload)) => {
                    c.close().await;
                    return Ok(payload.to_vec());
                }
                Ok(None) => conn = Some(c),
                Err(e) if e.relay_code() == Some(ErrorCode::NotFound) => {
                    c.close().await;
                    crate::store::clear(&*self.store)?;
                    return Err(Error::LinkExpired);
                }
                // A dropped connection: a new one at the next poll.
                Err(Error::Closed(_)) => {}
                Err(e) => return Err(e),
            }
            tokio::time::sleep(POLL.mul_f64(OsRng.gen_range(0.75..1.25))).await;
        }
        crate::store::clear(&*self.store)?;
        Err(Error::LinkExpired)
    }
}

impl State {
    /// Up to `max` contacts for a link payload (never this account itself), and
    /// whether that is all of them.
    fn linked_contacts(&self, max: usize) -> (Vec<LinkedContact>, bool) {
        let own = self.keys.address.account;
        let mut sorted: Vec<_> = self.contacts.iter().collect();
        // One order, so what follows later as a sync is exactly the rest.
        sorted.sort_by_key(|(a, _)| **a);
        let all: Vec<LinkedContact> = sorted
            .into_iter()
            .filter(|(a, c)| **a != own && !c.blocked())
            .filter_map(|(a, c)| {
                Some(LinkedContact {
                    account: *a,
                    identity_key: c.identity_key[..].try_into().ok()?,
                    delivery_token: c.delivery_token[..].try_into().ok(),
                })
            })
            .collect();
        let complete = all.len() <= max;
        (all.into_iter().take(max).collect(), complete)
    }

    /// After device `joined` said it joined: the contacts its payload had no room
    /// for follow as contact syncs (to every other device; applying one twice
    /// changes nothing).
    pub(super) fn sync_remaining_contacts(
        &mut self,
        now_ms: u64,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
        batch: &mut Batch,
    ) {
        let (all, _) = self.linked_contacts(usize::MAX);
        for chunk in all[all.len().min(PAYLOAD_CONTACTS)..].chunks(SYNC_CONTACTS) {
            let contacts = chunk
                .iter()
                .map(|c| e2e::LinkedContact {
                    account_id: c.account.as_bytes().to_vec().into(),
                    identity_key: c.identity_key.to_vec().into(),
                    delivery_token: c
                        .delivery_token
                        .map(|t| t.to_vec())
                        .unwrap_or_default()
                        .into(),
                })
                .collect();
            let sync = Kind::Contacts(e2e::ContactsSync { contacts });
            self.queue_sync(sync, now_ms, rng, batch);
        }
    }

    /// Stores a device joining from the primary's payload as one write: the device,
    /// the account's list, the payload's contacts (trusted as the primary trusts
    /// them) and the `Joined` sync for the primary. Written before any network step,
    /// so a failure after it leaves a device `Client::open` resumes (keys are
    /// published by the worker, `keys_published` being false).
    pub(crate) fn create_joined(
        kv: Arc<dyn KvStore>,
        new: NewDevice<'_>,
        list: &[u8],
        signature: &[u8],
        contacts: &[LinkedContact],
        now_ms: u64,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<State> {
        let device_signature = new.linked.as_ref().map(|l| l.device_signature);
        let (mut state, mut batch) = State::create_unwritten(kv, new, now_ms, rng)?;
        if let Some(local) = state.stage_own_list(list, signature, &mut batch)? {
            state.local = local;
        }
        let own = state.keys.address.account;
        for c in contacts.iter().filter(|c| c.account != own) {
            let mut record = state.contacts.get(&c.account).cloned().unwrap_or_default();
            record.identity_key = c.identity_key.to_vec();
            record.delivery_token = c.delivery_token.map(|t| t.to_vec()).unwrap_or_default();
            state.put_contact(c.account, record, &mut batch);
        }
        let joined = Kind::Joined(e2e::DeviceJoined {
            device_id: state.keys.address.device.get(),
        });
        state.queue_sync(joined, now_ms, rng, &mut batch);
        // The certificate makes this device's group credential.
        if let Some(certificate) = device_signature {
            batch.put(
                crate::store::Namespace::GroupCredential,
                super::group_records::CREDENTIAL_KEY.to_vec(),
                &super::group_records::CredentialRecord {
                    certificate: certificate.to_vec(),
                },
            );
        }
        // Last, so it is the record stored whatever was put before.
        batch.put_local(&state.local);
        state.commit(batch, true)?;
        state.group_device = super::state::group_device(&state.kv, &state.keys, &state.local);
        Ok(state)
    }
}

/// Signs the next list with `change`, publishes it and tells the other devices.
/// A relay holding a newer list (this primary restored from a backup, say) is
/// caught up with once: its list must verify under our own identity.
pub(super) async fn publish_list(
    shared: &Shared,
    conn: &RelayConnection,
    change: ListChange,
) -> Result<(Vec<u8>, [u8; 64])> {
    let mut caught_up = false;
    loop {
        let (list, signature) = shared.state.lock().await.next_own_list(change.clone())?;
        match conn.publish_device_list(&list, &signature).await {
            Ok(()) => {}
            Err(e) if e.relay_code() == Some(ErrorCode::StaleDeviceList) && !caught_up => {
                caught_up = true;
                catch_up_own_list(shared).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut state = shared.state.lock().await;
        state.store_own_list(&list, &signature)?;
        let sync = Kind::DeviceList(e2e::DeviceListSync {
            device_list: list.clone().into(),
            signature: signature.to_vec().into(),
        });
        state.sync_now(sync, shared.now_ms(), &mut OsRng)?;
        // Our own devices are checked again at the next send.
        let own = state.keys.address.account;
        state.check_list_now(&own)?;
        return Ok((list, signature));
    }
}

/// Takes this account's list from the relay (verified under our identity).
async fn catch_up_own_list(shared: &Shared) -> Result<()> {
    let (account, token) = {
        let state = shared.state.lock().await;
        (state.keys.address.account, state.keys.delivery_token)
    };
    let listing = shared
        .anon
        .run(|c| async move { c.device_listing(&account, &token).await })
        .await?;
    if let Some((list, signature)) = listing.list {
        shared
            .state
            .lock()
            .await
            .store_own_list(&list, &signature)?;
    }
    Ok(())
}

/// Removes device `id` (see [`Client::remove_device`]).
pub(super) async fn remove_device(
    shared: &Shared,
    conn: &RelayConnection,
    id: DeviceId,
) -> Result<()> {
    if id == DeviceId::PRIMARY || !shared.state.lock().await.is_primary() {
        return Err(Error::NotPrimary);
    }
    let mut caught_up = false;
    loop {
        let (list, signature) = shared
            .state
            .lock()
            .await
            .next_own_list(ListChange::Remove(id))?;
        match conn.remove_device(id, Some((&list, &signature))).await {
            Ok(()) => {}
            Err(e) if e.relay_code() == Some(ErrorCode::StaleDeviceList) && !caught_up => {
                caught_up = true;
                catch_up_own_list(shared).await?;
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut state = shared.state.lock().await;
        state.store_own_list(&list, &signature)?;
        state.settle_link(id)?;
        let sync = Kind::DeviceList(e2e::DeviceListSync {
            device_list: list.into(),
            signature: signature.to_vec().into(),
        });
        state.sync_now(sync, shared.now_ms(), &mut OsRng)?;
        let own = state.keys.address.account;
        state.drop_device(&own, id.get())?;
        // It leaves this account's groups too.
        state.own_devices_removed(&[id])?;
        drop(state);
        shared.emit(Event::DeviceRemoved { device: id });
        shared.outbox.notify_one();
        return Ok(());
    }
}
