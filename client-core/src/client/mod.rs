//! The async [`Client`]: what a chat app links. It registers a device, keeps its keys
//! published, sends messages end-to-end encrypted and sealed, and hands the app
//! decrypted messages, reconnecting on its own.
//!
//! # Guarantees
//! - **Nothing is lost.** [`Client::send`] returns once the message is in the device's
//!   outbox on disk; it is retried with backoff until the relay stores it. A received
//!   message is acknowledged to the relay only after it is decrypted and stored in the
//!   device's inbox, and it stays there until the app calls [`Client::confirm`]:
//!   unconfirmed messages are handed over again after a restart.
//! - **Nothing is doubled.** Messages carry an id; a copy the relay delivers twice
//!   (an acknowledgement lost on a dropped connection, a send retried after its reply
//!   was lost) is recognised and dropped.
//! - **Per-sender order.** Messages from one sender reach the app in the order sent.
//! - **The relay learns no sender.** Messages are sealed; once a contact's delivery
//!   token is known (from its [`ContactCard`] or from its first message) they go over
//!   a connection that is not authenticated as anyone, and so do the prekey fetches
//!   that start sessions with it. Only a first message to a contact added by account
//!   id alone (and the fetch of its keys) goes over the authenticated connection.
//! - **Identity changes are not silent.** If a contact's identity key changes, the app
//!   gets [`Event::IdentityChanged`]; until the user calls [`Client::accept_identity`],
//!   [`Client::send`] to that contact fails with [`Error::UntrustedIdentity`], messages
//!   already queued wait, and the contact's messages are held unread.

mod anonymous;
mod broadcast;
mod card;
mod contacts;
mod devices;
mod discovery;
mod events;
mod group_api;
mod group_commit;
mod group_inbox;
mod group_meta;
mod group_records;
mod group_rejoin;
mod group_retry;
mod group_send;
mod group_tree;
mod groups;
mod inbox;
mod keys;
mod linking;
mod outbox;
mod pins;
mod push;
mod send;
mod state;
mod sync;
#[cfg(test)]
mod tests;
mod verification;
mod worker;

use std::sync::Arc;

use rand::rngs::OsRng;
use tern_platform::clock::{Clock, SystemClock};
use tern_proto::address::RelayAddress;
use tern_proto::{AccountId, DeviceAddress, MessageId};
use tokio::sync::{mpsc, watch, Mutex, Notify};

use self::anonymous::AnonymousLink;
use self::state::{NewDevice, State};
use crate::crypto::x3dh::AgreementKeyPair;
use crate::identity::{DeviceKeyPair, IdentityKeyPair};
use crate::media::AttachmentPointer;
use crate::net::RelayConnection;
use crate::store::KvStore;
use crate::{Error, Result};

pub use self::card::ContactCard;
pub use self::discovery::DiscoveryReport;
pub use self::events::{Event, Events, ReceivedMessage};
pub use self::group_tree::WELCOME_INLINE_MAX;
pub use self::groups::{
    GroupChange, GroupId, GroupInfo, GroupMessage, GROUP_REJOIN_AFTER, GROUP_TOKEN_WAIT,
    GROUP_UPDATE_INTERVAL,
};
pub use self::linking::{DeviceInfo, Joining, LinkedDevice};
pub use self::outbox::MAX_BODY;

/// How long a media call waits for the client to be connected.
const MEDIA_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Retries of an interrupted transfer: with the backoff, over a minute, longer than
/// the relay takes to notice a connection that vanished (its idle timeout).
const MEDIA_ATTEMPTS: u32 = 16;

/// How long a received message id is remembered to drop duplicates: longer than a
/// relay keeps any message.
pub(crate) const SEEN_RETENTION_MS: u64 = 31 * 24 * 3600 * 1000;

/// How a [`Client`] is set up beyond its relay and store; the defaults are what
/// [`Client::register`] and [`Client::open`] use.
#[derive(Clone)]
pub struct ClientOptions {
    clock: Arc<dyn Clock>,
    groups: groups::GroupSettings,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            clock: Arc::new(SystemClock),
            groups: groups::GroupSettings::default(),
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions").finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// The defaults: the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The clock every rule reads the time from (message times, key rotation,
    /// certificate checks); a test passes a `ManualClock` it moves by hand.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How old this device's leaf in a group may get before it sends an update
    /// commit renewing its keys (post-compromise security); default
    /// [`GROUP_UPDATE_INTERVAL`], 7 days. Each renewal draws the next one between
    /// this and 1.5 times this, so members do not all update at once; any commit
    /// of this device other than an add-only one renews the leaf too.
    pub fn group_update_interval(mut self, interval: std::time::Duration) -> Self {
        self.groups.update_interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The largest welcome body (to devices added to a group) sent with the
    /// group's ratchet tree inline; a larger one sends the tree as an encrypted
    /// attachment, uploaded first, and the welcome points at it. Default
    /// [`WELCOME_INLINE_MAX`], under the relay's default envelope limit; lower it
    /// for a relay configured with a lower one (tests lower it to send small
    /// groups' trees as attachments).
    pub fn group_welcome_inline_max(mut self, bytes: usize) -> Self {
        self.groups.welcome_inline_max = bytes;
        self
    }

    /// How long a group commit waits for the delivery token of a member this
    /// device cannot reach yet (the member's own announcement brings it) before
    /// that member is removed; default [`GROUP_TOKEN_WAIT`], 7 days.
    pub fn group_token_wait(mut self, wait: std::time::Duration) -> Self {
        self.groups.token_wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// How long this device waits, with its mailbox read to the end, for a group
    /// epoch the relay named (`STALE_EPOCH`) before it takes itself to be left
    /// behind and asks to be re-added; default [`GROUP_REJOIN_AFTER`], 1 day.
    pub fn group_rejoin_after(mut self, wait: std::time::Duration) -> Self {
        self.groups.rejoin_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// How long one download of a welcome's ratchet tree (an attachment, for
    /// large groups) may take before it is given up for now and tried again
    /// later; default a minute and a second per 64 KiB of tree.
    pub fn group_tree_download_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.groups.tree_download_timeout_ms =
            Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    relay: RelayAddress,
    /// The relay's certificate pins: `relay`'s fingerprint at start, and during a
    /// rotation the announced next one (`pins.rs`).
    pins: Arc<crate::net::tls::Pins>,
    /// Taken at shutdown, which ends the app's [`Events`].
    events: std::sync::Mutex<Option<mpsc::UnboundedSender<Event>>>,
    outbox: Notify,
    stop: watch::Sender<bool>,
    /// The worker's connections while connected: (authenticated, anonymous).
    conns: watch::Sender<Option<Connections>>,
    /// The anonymous connection, which lives apart from the authenticated one.
    anon: Arc<AnonymousLink>,
    /// This device was removed from its account: the worker stops.
    removed: std::sync::atomic::AtomicBool,
    /// How groups are kept.
    group_settings: groups::GroupSettings,
    /// The mailbox was read to its end on this connection (`QueueEmpty`).
    drained: std::sync::atomic::AtomicBool,
}

type Connections = (Arc<RelayConnection>, Arc<AnonymousLink>);

impl Shared {
    fn now_ms(&self) -> u64 {
        self.clock.now()
    }

    /// The relay's address under its current pin (a rotation may have moved it on
    /// from the one the client started with).
    fn relay_now(&self) -> RelayAddress {
        let mut relay = self.relay.clone();
        relay.fingerprint = self.pins.current();
        relay
    }

    fn emit(&self, event: Event) {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // The app may have dropped its Events; the client carries on regardless.
        if let Some(tx) = events.as_ref() {
            let _ = tx.send(event);
        }
    }
}

/// An end-to-end encrypted messaging client for one device. See the module docs.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    address: DeviceAddress,
    identity_key: [u8; 32],
    worker: Arc<Worker>,
}

/// The background task; stopped when the last clone of the client goes.
struct Worker(
    std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    Arc<Shared>,
);

impl Drop for Worker {
    fn drop(&mut self) {
        self.1.stop.send_replace(true);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Creates an account on `relay` with this device as its first device, stores it
    /// in `store` (which must be empty) and starts the client.
    pub async fn register(
        relay: &RelayAddress,
        store: Arc<dyn KvStore>,
    ) -> Result<(Client, Events)> {
        Client::register_with(relay, store, ClientOptions::default()).await
    }

    /// [`Client::register`] with [`ClientOptions`].
    pub async fn register_with(
        relay: &RelayAddress,
        store: Arc<dyn KvStore>,
        options: ClientOptions,
    ) -> Result<(Client, Events)> {
        let clock = options.clock;
        // A device still joining an account counts too: its keys are not thrown away.
        // Under another storage key the device's records are not found by name:
        // the scan finds them (and fails, `Corrupt`, on the wrong key) so no second
        // device is written beside them.
        if crate::store::IdentityStore::local(&*store)?.is_some()
            || !store.scan(crate::store::Namespace::Local)?.is_empty()
        {
            return Err(Error::AlreadyRegistered);
        }
        let identity_secret = zeroize::Zeroizing::new(state::random32(&mut OsRng));
        let device_secret = zeroize::Zeroizing::new(state::random32(&mut OsRng));
        let identity = IdentityKeyPair::from_secret(&identity_secret);
        let device = DeviceKeyPair::from_secret(&device_secret);
        let identity_dh = AgreementKeyPair::generate(&mut OsRng);
        let (conn, _inbox) = RelayConnection::connect(relay).await?;
        let address = conn.register(&identity, &device).await?;
        let relay_signing_key = conn.relay_signing_key().await?;
        let mut state = State::create(
            store,
            NewDevice {
                relay: relay.to_string(),
                identity_secret: &identity_secret[..],
                linked: None,
                device_secret: &device_secret,
                identity_dh: &identity_dh,
                address,
                relay_signing_key,
            },
            clock.now(),
            &mut OsRng,
        )?;
        // Publish now, so contacts can start sessions before this device reconnects.
        if let Some(upload) = state.key_upload(None, clock.now(), &mut OsRng)? {
            conn.publish_keys(&upload).await?;
        }
        state.keys_published()?;
        // Key packages too, so contacts can add this device to groups at once.
        if let Some((packages, last_resort)) = state.key_package_upload(0, clock.now())? {
            let packages = packages.into_iter().map(Into::into).collect();
            match conn
                .publish_key_packages(packages, Some(last_resort.into()), false)
                .await
            {
                Err(e) if e.relay_code().is_some() => {
                    tracing::debug!(error = %e, "key packages not published yet");
                }
                other => drop(other?),
            }
        }
        let token = state.keys.delivery_token;
        conn.set_delivery_token(&token).await?;
        state.token_published(&token)?;
        conn.close().await;
        Ok(Client::start(state, relay.clone(), clock, options.groups))
    }

    /// Opens the device in `store` and starts the client. [`Error::NotRegistered`]
    /// for an empty store; a store opened under another storage key than it was
    /// written with is `Error::Store(StoreError::Corrupt)`.
    pub async fn open(store: Arc<dyn KvStore>) -> Result<(Client, Events)> {
        Client::open_with(store, ClientOptions::default()).await
    }

    /// [`Client::open`] with [`ClientOptions`].
    pub async fn open_with(
        store: Arc<dyn KvStore>,
        options: ClientOptions,
    ) -> Result<(Client, Events)> {
        let Some(state) = State::load(store.clone(), options.clock.now())? else {
            // Under another storage key no record is found by name, yet the records
            // are there: reading them fails (`Corrupt`), which tells the wrong key
            // from an empty store.
            store.scan(crate::store::Namespace::Local)?;
            return Err(Error::NotRegistered);
        };
        let relay: RelayAddress = state.relay().parse()?;
        Ok(Client::start(state, relay, options.clock, options.groups))
    }

    fn start(
        mut state: State,
        relay: RelayAddress,
        clock: Arc<dyn Clock>,
        group_settings: groups::GroupSettings,
    ) -> (Client, Events) {
        let (tx, rx) = mpsc::unbounded_channel();
        state.welcome_inline_max = group_settings.welcome_inline_max;
        let address = state.keys.address;
        let identity_key = state.keys.identity_key;
        let pins = match state.relay_pins(&relay) {
            Ok(p) => p,
            Err(e) => {
                // Only the announced next pin is lost: the current one is the address's.
                tracing::warn!(error = %e, "the stored next certificate pin cannot be read");
                crate::net::tls::Pins::new(relay.fingerprint, None)
            }
        };
        let pins = Arc::new(pins);
        // Messages stored but not confirmed before a restart come first.
        if let Ok(pending) = state.unconfirmed() {
            for m in pending {
                let _ = tx.send(Event::Message(m));
            }
        }
        if let Ok(pending) = state.unconfirmed_group() {
            for m in pending {
                let _ = tx.send(Event::GroupMessage(m));
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            clock,
            relay: relay.clone(),
            pins: pins.clone(),
            events: std::sync::Mutex::new(Some(tx)),
            outbox: Notify::new(),
            stop: watch::channel(false).0,
            conns: watch::channel(None).0,
            anon: Arc::new(AnonymousLink::new(relay.clone(), pins)),
            removed: std::sync::atomic::AtomicBool::new(false),
            group_settings,
            drained: std::sync::atomic::AtomicBool::new(false),
        });
        let worker = Arc::new(Worker(
            std::sync::Mutex::new(Some(tokio::spawn(worker::run(shared.clone())))),
            shared.clone(),
        ));
        (
            Client {
                shared,
                address,
                identity_key,
                worker,
            },
            Events(rx),
        )
    }

    /// This device's address (account and device id).
    pub fn address(&self) -> DeviceAddress {
        self.address
    }

    /// This account's id.
    pub fn account(&self) -> AccountId {
        self.address.account
    }

    /// This account's identity key.
    pub fn identity_key(&self) -> [u8; 32] {
        self.identity_key
    }

    /// The card to give contacts so they can write to this account.
    pub async fn contact_card(&self) -> ContactCard {
        let state = self.shared.state.lock().await;
        ContactCard {
            account: self.address.account,
            identity_key: self.identity_key,
            delivery_token: state.keys.delivery_token,
        }
    }

    /// Adds (or refreshes) a contact from its card. A card whose identity key differs
    /// from the one already trusted raises [`Event::IdentityChanged`].
    pub async fn add_contact(&self, card: &ContactCard) -> Result<()> {
        let changed = {
            let mut state = self.shared.state.lock().await;
            let changed =
                state.add_contact(card.account, card.identity_key, card.delivery_token)?;
            // The account's other devices learn the contact too (unless the card
            // raised a change the user has yet to accept).
            if !changed {
                if let Some(sync) = state.contact_sync(&card.account) {
                    state.sync_now(sync, self.shared.now_ms(), &mut OsRng)?;
                }
            }
            changed
        };
        if changed {
            self.shared.emit(Event::IdentityChanged {
                contact: card.account,
            });
        }
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// Queues `body` for every device of `to`. Returns once it is stored on this
    /// device; [`Event::Sent`] follows once the relay has it.
    pub async fn send(&self, to: &AccountId, body: &[u8]) -> Result<MessageId> {
        self.send_with_attachments(to, body, &[]).await
    }

    /// Like [`Client::send`], with attachments (pointers from
    /// [`Client::upload_attachment`], or received ones being forwarded).
    pub async fn send_with_attachments(
        &self,
        to: &AccountId,
        body: &[u8],
        attachments: &[AttachmentPointer],
    ) -> Result<MessageId> {
        let now = self.shared.now_ms();
        let id = self
            .shared
            .state
            .lock()
            .await
            .enqueue(to, body, attachments, now, &mut OsRng)?;
        self.shared.outbox.notify_one();
        Ok(id)
    }

    /// Replaces this account's delivery token, say after blocking someone who had it:
    /// holders of the old token can no longer send sealed. Contacts fall back to
    /// identified sends (the relay then sees who writes) until a message from this
    /// device brings them the new token.
    ///
    /// Only the primary rotates the token (the account's devices share it):
    /// [`Error::NotPrimary`] on a linked device.
    pub async fn rotate_delivery_token(&self) -> Result<()> {
        let mut state = self.shared.state.lock().await;
        if state.keys.identity.is_none() {
            return Err(Error::NotPrimary);
        }
        state.rotate_delivery_token(&mut OsRng)?;
        drop(state);
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// The app has stored message `seq`: the device forgets it.
    pub async fn confirm(&self, seq: u64) -> Result<()> {
        self.shared.state.lock().await.confirm(seq)
    }

    /// Messages waiting in the outbox.
    pub async fn outbox_len(&self) -> usize {
        self.shared.state.lock().await.outbox_len()
    }

    /// The safety number with `contact`, from the identity key we trust for it;
    /// `None` for an unknown contact.
    pub async fn safety_number(&self, contact: &AccountId) -> Option<String> {
        let state = self.shared.state.lock().await;
        let theirs: [u8; 32] = state.contact(contact)?.identity_key[..].try_into().ok()?;
        Some(self.safety_number_with(contact, &theirs))
    }

    /// The changed identity key waiting for acceptance, if any, with the safety
    /// number it would give: compare that number before accepting.
    pub async fn changed_identity(&self, contact: &AccountId) -> Option<([u8; 32], String)> {
        let state = self.shared.state.lock().await;
        let key: [u8; 32] = state.contact(contact)?.changed_identity_key[..]
            .try_into()
            .ok()?;
        Some((key, self.safety_number_with(contact, &key)))
    }

    fn safety_number_with(&self, contact: &AccountId, key: &[u8; 32]) -> String {
        crate::safety::safety_number((&self.identity_key, &self.address.account), (key, contact))
    }

    /// Accepts `contact`'s changed identity key `key` (from
    /// [`Client::changed_identity`], after comparing safety numbers): held messages
    /// are decrypted and handed over, and messages waiting for the contact are sent in
    /// new sessions. Returns false, changing nothing, if `key` is not the change
    /// waiting. Also hands over messages a failed earlier call left held.
    pub async fn accept_identity(&self, contact: &AccountId, key: &[u8; 32]) -> Result<bool> {
        let mut state = self.shared.state.lock().await;
        let accepted = state.accept_identity(contact, key)?;
        if accepted {
            if let Some(sync) = state.contact_sync(contact) {
                state.sync_now(sync, self.shared.now_ms(), &mut OsRng)?;
            }
        }
        // Emitted under the lock, so nothing newer from the contact overtakes them.
        for outcome in state.release_held(contact, self.shared.now_ms(), &mut OsRng)? {
            match outcome {
                state::Outcome::Message(m) => self.shared.emit(Event::Message(m)),
                state::Outcome::Dropped(reason) => self.shared.emit(Event::Dropped { reason }),
                state::Outcome::Synced(events) => {
                    events.into_iter().for_each(|e| self.shared.emit(e))
                }
                state::Outcome::Duplicate | state::Outcome::Held { .. } => {}
            }
        }
        drop(state);
        self.shared.outbox.notify_one();
        Ok(accepted)
    }

    /// The worker's connections, once it has them; `Closed` if the client stops
    /// or none comes within `MEDIA_WAIT`.
    async fn connections(&self) -> Result<Connections> {
        let mut rx = self.shared.conns.subscribe();
        let mut stop = self.shared.stop.subscribe();
        // A stopped client gets no connection again: answer at once rather than
        // holding the store for `MEDIA_WAIT` after a shutdown or a removal.
        let waited = tokio::select! {
            w = tokio::time::timeout(MEDIA_WAIT, rx.wait_for(Option::is_some)) => w.ok(),
            _ = stop.wait_for(|s| *s) => None,
        };
        match waited {
            Some(Ok(c)) => c
                .clone()
                .ok_or_else(|| Error::Closed("not connected".into())),
            _ => Err(Error::Closed("not connected to the relay".into())),
        }
    }

    /// Runs a media step, retrying on a dropped connection (after the worker has
    /// reconnected), so an interrupted transfer resumes where it stopped.
    async fn with_retries<T, F, Fut>(&self, mut step: F) -> Result<T>
    where
        F: FnMut(Connections) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let conns = self.connections().await?;
            match step(conns).await {
                Err(Error::Closed(reason)) if attempt < MEDIA_ATTEMPTS => {
                    tracing::debug!(%reason, "media transfer interrupted; resuming");
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(6)))
                        .await;
                }
                Err(e)
                    if e.relay_code() == Some(crate::ErrorCode::RateLimited)
                        && attempt < MEDIA_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100 << attempt.min(6)))
                        .await;
                }
                other => return other,
            }
        }
    }

    /// Encrypts the file at `plaintext` with a fresh key into `sealed` (a file in the
    /// app's cache, kept until the upload is done) and uploads it, resuming across
    /// dropped connections. Send the pointer with [`Client::send_with_attachments`].
    pub async fn upload_attachment(
        &self,
        plaintext: &std::path::Path,
        sealed: &std::path::Path,
    ) -> Result<AttachmentPointer> {
        self.upload_attachment_with_progress(plaintext, sealed, &crate::media::no_progress)
            .await
    }

    /// [`Client::upload_attachment`], telling `progress` the sealed bytes sent so far
    /// and in all; its last call is (total, total) once the relay has the blob.
    pub async fn upload_attachment_with_progress(
        &self,
        plaintext: &std::path::Path,
        sealed: &std::path::Path,
        progress: crate::media::Progress<'_>,
    ) -> Result<AttachmentPointer> {
        let pointer = crate::media::encrypt_file(plaintext, sealed).await?;
        self.with_retries(|(conn, _)| {
            let pointer = pointer.clone();
            async move {
                crate::media::resume_upload_with_progress(&conn, &pointer, sealed, progress).await
            }
        })
        .await?;
        // A blob the relay already had moved no bytes.
        progress(pointer.sealed_size, pointer.sealed_size);
        Ok(pointer)
    }

    /// Downloads, checks and decrypts an attachment into `dest`, resuming across
    /// dropped connections. Downloads go over the connection that identifies no one.
    pub async fn download_attachment(
        &self,
        pointer: &AttachmentPointer,
        dest: &std::path::Path,
    ) -> Result<u64> {
        self.download_attachment_with_progress(pointer, dest, &crate::media::no_progress)
            .await
    }

    /// [`Client::download_attachment`], telling `progress` the sealed bytes received
    /// so far and in all.
    pub async fn download_attachment_with_progress(
        &self,
        pointer: &AttachmentPointer,
        dest: &std::path::Path,
        progress: crate::media::Progress<'_>,
    ) -> Result<u64> {
        self.with_retries(|(_, anon)| async move {
            crate::media::download_with_progress(&*anon.get().await?, pointer, dest, progress).await
        })
        .await
    }

    /// Forwards an attachment to `to`: the relay keeps the blob another full term and
    /// the same pointer goes out in a message; nothing is uploaded. Fails with the
    /// relay's `NOT_FOUND` if the blob has expired (upload it again).
    pub async fn forward_attachment(
        &self,
        to: &AccountId,
        body: &[u8],
        pointer: &AttachmentPointer,
    ) -> Result<MessageId> {
        self.with_retries(|(_, anon)| async move {
            crate::media::forward(&*anon.get().await?, pointer).await
        })
        .await?;
        self.send_with_attachments(to, body, std::slice::from_ref(pointer))
            .await
    }

    /// Deletes this account on the relay, for every device: the relay removes its
    /// devices, queued messages, keys, delivery token, media charges and unfinished
    /// uploads, and then answers for it as for an id that never existed. Signed by
    /// the identity key over the current connection (waits up to 30 s for one).
    /// Once the relay has answered, the client stops ([`Events`] ends) and every
    /// record in this device's store is deleted, including messages not yet
    /// confirmed: take what the app keeps first. [`Client::open`] on that store is
    /// then [`Error::NotRegistered`]. Other devices of the account find their
    /// connections refused and should clear their stores too.
    pub async fn delete_account(&self) -> Result<()> {
        let identity = self.shared.state.lock().await.keys.identity.clone();
        // Only the primary holds the identity key that signs the deletion.
        let identity = identity.ok_or(Error::NotPrimary)?;
        let (conn, _) = self.connections().await?;
        conn.delete_account(&identity, &self.address).await?;
        self.shutdown().await;
        let state = self.shared.state.lock().await;
        crate::store::clear(state.kv.as_ref())?;
        Ok(())
    }

    /// Writes everything the relay holds about this account to a new file `dest`
    /// (mode 0600): JSON in the shape of the relay's `account-export-v1.schema.json`,
    /// with queued messages' ciphertexts if `include_ciphertexts`. Nothing is left at
    /// `dest` if the export fails. Returns its size.
    pub async fn export_account(&self, dest: &std::path::Path, ciphertexts: bool) -> Result<u64> {
        let (conn, _) = self.connections().await?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .await
            .map_err(|e| Error::Media(e.to_string()))?;
        let written = conn.export_account(ciphertexts, &mut file).await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        written
    }

    /// Stops the client: the connection closes and [`Events`] ends. Everything
    /// stored stays stored; [`Client::open`] carries on from there.
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        let handle = self
            .worker
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
        self.shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}
