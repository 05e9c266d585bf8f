//! Tern's client for Kotlin, Swift and Python apps: a thin [UniFFI] facade over
//! [`tern_client::Client`]. Every rule stays in `tern-client`; this crate turns ids
//! and keys into bytes, events into an enum, errors into [`TernError`] (a native
//! exception in each language), and runs every call's work on a runtime of its own,
//! so a call awaited from an app's UI thread never blocks it. `docs/mobile.md` shows
//! an Android and an iOS app using it.
//!
//! - [`register`], [`open`] and [`join`] start a [`TernClient`] on a device store in
//!   a directory, encrypted under a 32-byte storage key the app keeps in the
//!   platform keystore (Android Keystore, iOS Keychain).
//! - [`TernClient::events`] is the stream of received messages and other events:
//!   call [`EventStream::next_event`] in a loop; store each message, then
//!   [`TernClient::confirm`] it.
//!
//! Generate the bindings with this crate's `uniffi-bindgen` binary (feature `cli`).
//!
//! [UniFFI]: https://mozilla.github.io/uniffi-rs/

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use tern_client::store::SledKv;
use tern_client::{Client, ContactCard, Events, Joining};
use tern_proto::{DeviceId, RelayAddress, VerificationId};
use tokio::sync::Mutex;

mod error;
mod types;

pub use error::TernError;
pub use types::{
    Attachment, ChangedIdentity, ContactCardInfo, Device, Discovered, DiscoveryReport, Group,
    GroupChange, GroupMessage, Message, PushTarget, TernEvent,
};

use error::invalid;
use types::{account, accounts, group_id, key32, pointers};

uniffi::setup_scaffolding!("tern");

type Result<T, E = TernError> = std::result::Result<T, E>;

fn relay_address(relay: &str) -> Result<RelayAddress> {
    relay.parse().map_err(
        |e: tern_proto::address::AddressError| TernError::InvalidAddress {
            reason: e.to_string(),
        },
    )
}

/// The device store in `dir`, encrypted under `storage_key` (32 bytes).
fn store(dir: &str, storage_key: &[u8]) -> Result<Arc<SledKv>> {
    // This copy of the key is wiped once the store has derived its own keys.
    let key = zeroize::Zeroizing::new(key32(storage_key, "the storage key")?);
    Ok(Arc::new(SledKv::open(Path::new(dir), &key)?))
}

fn path(p: &str) -> PathBuf {
    PathBuf::from(p)
}

/// The runtime every call runs on. A call is awaited from the app's thread (a
/// Kotlin coroutine's, Swift's executor, Python's event loop), but its work (opening
/// the store, fsyncs, crypto) runs here, so no call blocks the thread it came from.
/// `None` once [`stop_threads`] has run.
static RUNTIME: LazyLock<std::sync::Mutex<Option<std::io::Result<tokio::runtime::Runtime>>>> =
    LazyLock::new(|| {
        std::sync::Mutex::new(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("tern")
                .enable_all()
                .build(),
        ))
    });

/// Stops the library's threads, waiting up to a second for what they are doing; every
/// later call fails with `Network` "stopped". For a Python program's exit
/// (`atexit.register(tern.stop_threads)`): CPython stops a thread that asks for the
/// GIL while it finalizes, and one of these may be in a callback into Python then
/// (waking asyncio), which would abort the process. Shut clients down first.
#[uniffi::export]
pub fn stop_threads() {
    let runtime = RUNTIME.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(Ok(runtime)) = runtime {
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
}

/// Runs `work` on [`RUNTIME`] and waits for it there. A call the app cancels (its
/// coroutine or task cancelled, so this future dropped) stops its work too; a panic
/// goes on to UniFFI, which raises it as an internal error.
async fn on_runtime<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let handle = match RUNTIME.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(Ok(runtime)) => runtime.handle().clone(),
        Some(Err(e)) => {
            return Err(TernError::Storage {
                reason: format!("starting the client's threads: {e}"),
            })
        }
        None => {
            return Err(TernError::Network {
                reason: "stopped (stop_threads)".into(),
            })
        }
    };
    let mut task = AbortOnDrop(handle.spawn(work));
    match (&mut task.0).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(TernError::Network {
            reason: format!("the call stopped: {e}"),
        }),
    }
}

/// Creates an account on `relay` (`tern://<fingerprint>@host:port`) with this device
/// as its first device, in an empty store in `dir` encrypted under `storage_key`.
#[uniffi::export(async_runtime = "tokio")]
pub async fn register(relay: String, dir: String, storage_key: Vec<u8>) -> Result<Arc<TernClient>> {
    // The app's copy is its own; this one is wiped however the call ends.
    let storage_key = zeroize::Zeroizing::new(storage_key);
    on_runtime(async move {
        let relay = relay_address(&relay)?;
        let store = store(&dir, &storage_key)?;
        let (client, events) = Client::register(&relay, store).await?;
        Ok(TernClient::new(client, events))
    })
    .await
}

/// Opens the device stored in `dir` (registered or joined before) and starts it:
/// messages received but not confirmed before come first in its events.
/// [`TernError::WrongStorageKey`] if `storage_key` is not the one it was created with.
#[uniffi::export(async_runtime = "tokio")]
pub async fn open(dir: String, storage_key: Vec<u8>) -> Result<Arc<TernClient>> {
    // The app's copy is its own; this one is wiped however the call ends.
    let storage_key = zeroize::Zeroizing::new(storage_key);
    on_runtime(async move {
        let store = store(&dir, &storage_key)?;
        let (client, events) = Client::open(store).await?;
        Ok(TernClient::new(client, events))
    })
    .await
}

/// Starts joining an existing account as a new device on `relay` (the account's
/// home relay), in an empty store in `dir`: show [`JoiningDevice::link`] to the
/// primary (as a QR code), then wait in [`JoiningDevice::finish`].
#[uniffi::export(async_runtime = "tokio")]
pub async fn join(relay: String, dir: String, storage_key: Vec<u8>) -> Result<Arc<JoiningDevice>> {
    // The app's copy is its own; this one is wiped however the call ends.
    let storage_key = zeroize::Zeroizing::new(storage_key);
    on_runtime(async move {
        let relay = relay_address(&relay)?;
        let store = store(&dir, &storage_key)?;
        let joining = Client::join(&relay, store).await?;
        Ok(Arc::new(JoiningDevice {
            link: joining.link().to_owned(),
            joining: Mutex::new(Some(joining)),
        }))
    })
    .await
}

/// Parses a contact card (`tern-contact:…`) without adding it.
#[uniffi::export]
pub fn parse_contact_card(card: String) -> Result<ContactCardInfo> {
    let card: ContactCard = card.parse()?;
    Ok(ContactCardInfo {
        account: card.account.as_bytes().to_vec(),
        identity_key: card.identity_key.to_vec(),
    })
}

/// Told how an attachment transfer moves: `done` of `total` sealed bytes. Called
/// on a background thread: post to the UI thread from there.
#[uniffi::export(with_foreign)]
pub trait TransferProgress: Send + Sync {
    /// `done` of `total` bytes moved (a resumed transfer starts where it stopped).
    fn on_progress(&self, done: u64, total: u64);
}

/// A device waiting to join an account.
#[derive(uniffi::Object)]
pub struct JoiningDevice {
    link: String,
    joining: Mutex<Option<Joining>>,
}

#[uniffi::export(async_runtime = "tokio")]
impl JoiningDevice {
    /// The link to show the primary (`tern-link:…`; also as a QR code).
    pub fn link(&self) -> String {
        self.link.clone()
    }

    /// Waits (up to 10 minutes) for the primary to link this device, then starts it.
    pub async fn finish(&self) -> Result<Arc<TernClient>> {
        let joining = self
            .joining
            .lock()
            .await
            .take()
            .ok_or_else(|| invalid("finish was called already"))?;
        on_runtime(async move {
            let (client, events) = joining.finish().await?;
            Ok(TernClient::new(client, events))
        })
        .await
    }
}

/// The stream of [`TernEvent`]s of one client; ends (`None`) once it is shut down.
#[derive(uniffi::Object)]
pub struct EventStream(Mutex<Events>);

#[uniffi::export(async_runtime = "tokio")]
impl EventStream {
    /// The next event; `None` once the client is shut down. Events wait here until
    /// asked for, so nothing is lost while the app is busy.
    pub async fn next_event(&self) -> Option<TernEvent> {
        self.0.lock().await.recv().await.map(TernEvent::from)
    }
}

/// An end-to-end encrypted messaging client for one device.
#[derive(uniffi::Object)]
pub struct TernClient {
    /// `None` once shut down: the client and its store (with the store's lock)
    /// go then, not when the app frees this object, so `open` can follow.
    client: std::sync::Mutex<Option<Client>>,
    account: Vec<u8>,
    device_id: u32,
    identity_key: Vec<u8>,
    events: Arc<EventStream>,
}

impl TernClient {
    fn new(client: Client, events: Events) -> Arc<TernClient> {
        Arc::new(TernClient {
            account: client.account().as_bytes().to_vec(),
            device_id: client.address().device.get(),
            identity_key: client.identity_key().to_vec(),
            client: std::sync::Mutex::new(Some(client)),
            events: Arc::new(EventStream(Mutex::new(events))),
        })
    }

    /// The running client; a `Network` "shut down" error after [`TernClient::shutdown`].
    fn client(&self) -> Result<Client> {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| TernError::Network {
                reason: "shut down".into(),
            })
    }

    /// Runs `call` with the running client on the library's runtime (`Network`
    /// "shut down" after [`TernClient::shutdown`]).
    async fn run<T, F, Fut>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        on_runtime(call(self.client()?)).await
    }

    fn take_client(&self) -> Option<Client> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A progress callback for tern-client, from the app's (if it gave one).
fn progress_fn(progress: Option<Arc<dyn TransferProgress>>) -> impl Fn(u64, u64) + Send + Sync {
    move |done, total| {
        if let Some(p) = &progress {
            p.on_progress(done, total);
        }
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl TernClient {
    /// The client's events: received messages, sends done or failed, identity
    /// changes, devices and groups. The same stream on every call.
    pub fn events(&self) -> Arc<EventStream> {
        self.events.clone()
    }

    /// This account's id (16 bytes).
    pub fn account(&self) -> Vec<u8> {
        self.account.clone()
    }

    /// This device's id within the account (1 is the primary).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// This account's identity key.
    pub fn identity_key(&self) -> Vec<u8> {
        self.identity_key.clone()
    }

    /// The card (`tern-contact:…`) to give contacts, as text or a QR code.
    pub async fn contact_card(&self) -> Result<String> {
        self.run(|client| async move { Ok(client.contact_card().await.to_string()) })
            .await
    }

    /// Adds (or refreshes) a contact from its card; returns its account id.
    pub async fn add_contact(&self, card: String) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let card: ContactCard = card.parse()?;
            client.add_contact(&card).await?;
            Ok(card.account.as_bytes().to_vec())
        })
        .await
    }

    /// Queues `body` for every device of account `to`; returns the message id once
    /// it is stored on this device. `Sent` or `SendFailed` follows in the events.
    pub async fn send(&self, to: Vec<u8>, body: Vec<u8>) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client.send(&account(&to)?, &body).await?;
            Ok(id.as_bytes().to_vec())
        })
        .await
    }

    /// [`TernClient::send`] with attachments (uploaded, or received and forwarded).
    pub async fn send_with_attachments(
        &self,
        to: Vec<u8>,
        body: Vec<u8>,
        attachments: Vec<Attachment>,
    ) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client
                .send_with_attachments(&account(&to)?, &body, &pointers(&attachments)?)
                .await?;
            Ok(id.as_bytes().to_vec())
        })
        .await
    }

    /// Sends `body` to every account in `contacts` as one upload (a broadcast list).
    pub async fn send_broadcast(
        &self,
        contacts: Vec<Vec<u8>>,
        body: Vec<u8>,
        attachments: Vec<Attachment>,
    ) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client
                .send_broadcast(&accounts(&contacts)?, &body, &pointers(&attachments)?)
                .await?;
            Ok(id.as_bytes().to_vec())
        })
        .await
    }

    /// The app has stored message `seq`: the device forgets it.
    pub async fn confirm(&self, seq: u64) -> Result<()> {
        self.run(|client| async move { Ok(client.confirm(seq).await?) })
            .await
    }

    /// Messages waiting in the outbox.
    pub async fn outbox_len(&self) -> Result<u64> {
        self.run(|client| async move {
            Ok(u64::try_from(client.outbox_len().await).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Encrypts the file at `plaintext` into `sealed` (a file in the app's cache,
    /// kept until the upload is done) and uploads it, resuming across dropped
    /// connections. `content_type` travels in the pointer, for the recipient's app.
    pub async fn upload_attachment(
        &self,
        plaintext: String,
        sealed: String,
        content_type: String,
        progress: Option<Arc<dyn TransferProgress>>,
    ) -> Result<Attachment> {
        self.run(|client| async move {
            let progress = progress_fn(progress);
            let mut pointer = client
                .upload_attachment_with_progress(&path(&plaintext), &path(&sealed), &progress)
                .await?;
            pointer.content_type = content_type;
            Ok(Attachment::from(&pointer))
        })
        .await
    }

    /// Downloads, checks and decrypts an attachment into `dest`; returns its size.
    /// Call again after a failure: it resumes.
    pub async fn download_attachment(
        &self,
        attachment: Attachment,
        dest: String,
        progress: Option<Arc<dyn TransferProgress>>,
    ) -> Result<u64> {
        self.run(|client| async move {
            let progress = progress_fn(progress);
            let pointer = attachment.parse()?;
            Ok(client
                .download_attachment_with_progress(&pointer, &path(&dest), &progress)
                .await?)
        })
        .await
    }

    /// Forwards a received attachment to `to` with `body`: nothing is uploaded
    /// again. A relay `not found` error means it expired: upload it again.
    pub async fn forward_attachment(
        &self,
        to: Vec<u8>,
        body: Vec<u8>,
        attachment: Attachment,
    ) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client
                .forward_attachment(&account(&to)?, &body, &attachment.parse()?)
                .await?;
            Ok(id.as_bytes().to_vec())
        })
        .await
    }

    /// The safety number with `contact`; `None` for an unknown contact.
    pub async fn safety_number(&self, contact: Vec<u8>) -> Result<Option<String>> {
        self.run(|client| async move { Ok(client.safety_number(&account(&contact)?).await) })
            .await
    }

    /// `contact`'s changed identity key waiting for acceptance, if any.
    pub async fn changed_identity(&self, contact: Vec<u8>) -> Result<Option<ChangedIdentity>> {
        self.run(|client| async move {
            let changed = client.changed_identity(&account(&contact)?).await;
            Ok(changed.map(|(key, safety_number)| ChangedIdentity {
                identity_key: key.to_vec(),
                safety_number,
            }))
        })
        .await
    }

    /// Accepts `contact`'s changed identity key (after comparing safety numbers):
    /// held messages follow in the events. False if `identity_key` is not the
    /// change waiting.
    pub async fn accept_identity(&self, contact: Vec<u8>, identity_key: Vec<u8>) -> Result<bool> {
        self.run(|client| async move {
            let key = key32(&identity_key, "an identity key")?;
            Ok(client.accept_identity(&account(&contact)?, &key).await?)
        })
        .await
    }

    /// Registers where the relay wakes this device while the app holds no
    /// connection (replacing any earlier target); kept and sent again at each
    /// connection. A gateway off the relay's list, a non-https endpoint or a relay
    /// without wake-ups is `Relay` "push target refused"; an endpoint that fails the
    /// UnifiedPush discovery check is "push endpoint unverified".
    pub async fn set_push_target(&self, target: PushTarget) -> Result<()> {
        self.run(|client| async move { Ok(client.set_push_target(target.into()).await?) })
            .await
    }

    /// Stops wake-ups for this device (say when the user signs out).
    pub async fn clear_push_target(&self) -> Result<()> {
        self.run(|client| async move { Ok(client.clear_push_target().await?) })
            .await
    }

    /// The wake-up target this device registered, if any.
    pub async fn push_target(&self) -> Result<Option<PushTarget>> {
        self.run(|client| async move { Ok(client.push_target().await?.map(PushTarget::from)) })
            .await
    }

    /// Replaces the account's delivery token (primary only), say after blocking someone.
    pub async fn rotate_delivery_token(&self) -> Result<()> {
        self.run(|client| async move { Ok(client.rotate_delivery_token().await?) })
            .await
    }

    /// Links the device that showed `link` (primary only); returns its device id.
    pub async fn link_device(&self, link: String) -> Result<u32> {
        self.run(|client| async move { Ok(client.link_device(&link).await?.id.get()) })
            .await
    }

    /// This account's devices.
    pub async fn devices(&self) -> Result<Vec<Device>> {
        self.run(|client| async move {
            Ok(client
                .devices()
                .await?
                .into_iter()
                .map(Device::from)
                .collect())
        })
        .await
    }

    /// Removes device `id` from this account (primary only; never device 1).
    pub async fn remove_device(&self, id: u32) -> Result<()> {
        self.run(|client| async move {
            let id = DeviceId::new(id).ok_or_else(|| invalid("device 0 does not exist"))?;
            Ok(client.remove_device(id).await?)
        })
        .await
    }

    /// Creates a group with `contacts`; returns its id (32 bytes).
    pub async fn create_group(&self, name: String, contacts: Vec<Vec<u8>>) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client.create_group(&name, &accounts(&contacts)?).await?;
            Ok(id.0.to_vec())
        })
        .await
    }

    /// Adds contacts to a group.
    pub async fn add_members(&self, group: Vec<u8>, contacts: Vec<Vec<u8>>) -> Result<()> {
        self.run(|client| async move {
            Ok(client
                .add_members(&group_id(&group)?, &accounts(&contacts)?)
                .await?)
        })
        .await
    }

    /// Removes a member from a group.
    pub async fn remove_member(&self, group: Vec<u8>, member: Vec<u8>) -> Result<()> {
        self.run(|client| async move {
            Ok(client
                .remove_member(&group_id(&group)?, &account(&member)?)
                .await?)
        })
        .await
    }

    /// Leaves a group.
    pub async fn leave_group(&self, group: Vec<u8>) -> Result<()> {
        self.run(|client| async move { Ok(client.leave_group(&group_id(&group)?).await?) })
            .await
    }

    /// Sends `body` (and attachments) to a group; returns the message id.
    pub async fn send_group(
        &self,
        group: Vec<u8>,
        body: Vec<u8>,
        attachments: Vec<Attachment>,
    ) -> Result<Vec<u8>> {
        self.run(|client| async move {
            let id = client
                .send_group(&group_id(&group)?, &body, &pointers(&attachments)?)
                .await?;
            Ok(id.as_bytes().to_vec())
        })
        .await
    }

    /// Renames a group.
    pub async fn rename_group(&self, group: Vec<u8>, name: String) -> Result<()> {
        self.run(|client| async move { Ok(client.rename_group(&group_id(&group)?, &name).await?) })
            .await
    }

    /// Sets a group's description.
    pub async fn set_group_description(&self, group: Vec<u8>, description: String) -> Result<()> {
        self.run(|client| async move {
            Ok(client
                .set_group_description(&group_id(&group)?, &description)
                .await?)
        })
        .await
    }

    /// Sets (or with `None` clears) a group's picture, an uploaded attachment.
    pub async fn set_group_picture(
        &self,
        group: Vec<u8>,
        picture: Option<Attachment>,
    ) -> Result<()> {
        self.run(|client| async move {
            let picture = picture.as_ref().map(Attachment::parse).transpose()?;
            Ok(client
                .set_group_picture(&group_id(&group)?, picture.as_ref())
                .await?)
        })
        .await
    }

    /// This device's groups.
    pub async fn groups(&self) -> Result<Vec<Group>> {
        self.run(|client| async move {
            Ok(client
                .groups()
                .await?
                .into_iter()
                .map(Group::from)
                .collect())
        })
        .await
    }

    /// Starts verifying a phone number (E.164); returns the session id for
    /// [`TernClient::confirm_verification`].
    pub async fn start_verification(&self, number: String) -> Result<Vec<u8>> {
        self.run(|client| async move { Ok(client.start_verification(&number).await?.0.to_vec()) })
            .await
    }

    /// Confirms a verification with the code the user received; `discoverable`
    /// is the user's choice (`None`: the relay's default). Returns whether the
    /// account is discoverable by the number.
    pub async fn confirm_verification(
        &self,
        session: Vec<u8>,
        code: String,
        discoverable: Option<bool>,
    ) -> Result<bool> {
        self.run(|client| async move {
            let id = VerificationId(
                session
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid("a verification session id is 16 bytes"))?,
            );
            Ok(match discoverable {
                Some(choice) => client.confirm_verification_with(id, &code, choice).await?,
                None => client.confirm_verification(id, &code).await?,
            })
        })
        .await
    }

    /// Finds which of `numbers` (an address book; national formats read in
    /// `default_region`, ISO 3166 alpha-2) are discoverable users, and adds them.
    pub async fn discover(
        &self,
        numbers: Vec<String>,
        default_region: String,
    ) -> Result<DiscoveryReport> {
        self.run(
            |client| async move { Ok(client.discover(&numbers, &default_region).await?.into()) },
        )
        .await
    }

    /// Sets whether this account can be found by its verified number.
    pub async fn set_discoverable(&self, discoverable: bool) -> Result<()> {
        self.run(|client| async move { Ok(client.set_discoverable(discoverable).await?) })
            .await
    }

    /// Deletes what discovery cached on this device.
    pub async fn forget_discovery(&self) -> Result<()> {
        self.run(|client| async move { Ok(client.forget_discovery().await?) })
            .await
    }

    /// Writes what the relay holds about this account to a new file `dest` (JSON).
    pub async fn export_account(&self, dest: String, include_ciphertexts: bool) -> Result<u64> {
        self.run(|client| async move {
            Ok(client
                .export_account(&path(&dest), include_ciphertexts)
                .await?)
        })
        .await
    }

    /// Deletes this account on the relay for every device (primary only), then
    /// this device's store: take what the app keeps first.
    pub async fn delete_account(&self) -> Result<()> {
        self.run(|client| async move { Ok(client.delete_account().await?) })
            .await?;
        // Deleting shut the client down; release its store now, as `shutdown` does.
        self.take_client();
        Ok(())
    }

    /// Stops the client: the connection closes, the events end and the store is
    /// released (once calls still running return); later calls fail with
    /// `Network` "shut down". Everything stays stored; [`open`] carries on from there.
    pub async fn shutdown(&self) {
        // A separate statement: the guard must not live across the await (the future
        // has to be Send for UniFFI).
        let client = self.take_client();
        if let Some(client) = client {
            let _ = on_runtime(async move {
                client.shutdown().await;
                Ok(())
            })
            .await;
        }
    }
}
