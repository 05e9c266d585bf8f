//! A connection to one relay.
//!
//! [`RelayConnection::connect`] opens a QUIC connection with the relay's certificate
//! pinned and its control stream. Requests are pipelined: any number may be in flight
//! from any number of tasks, and each resolves when its response arrives. Deliveries
//! pushed by the relay come out of the [`Inbox`]; the relay bounds how many are
//! unacknowledged at once, which bounds the inbox.
//!
//! Requests are built as tern-proto's typed [`Request`]s and converted to the wire
//! there; what the relay sends is decoded and validated by tern-proto
//! ([`ServerMessage`]) before anything here looks at it. The domain types both sides
//! share ([`Envelope`], [`Delivery`], [`SignedKey`], [`KeyUpload`], [`DeviceBundle`],
//! [`IssuedCertificate`]) are tern-proto's, re-exported.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tern_proto::{
    close, frame, v1, AccountId, ClientRequest, Code, DeviceAddress, DeviceId, ErrorReply,
    NextCertificate, RelayAddress, Reply, Request, ServerMessage, VerificationId, E164,
};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::identity::{DeviceKeyPair, IdentityKeyPair};

mod devices;
mod dial;
mod discovery;
mod groups;
mod media;
mod push;
pub mod tls;

pub use devices::DeviceListing;
pub use dial::HANDSHAKE_TIMEOUT;
#[doc(no_inline)]
pub use media::BlobStatus;
pub use media::Uploaded;

/// Largest frame the client accepts from a relay.
const MAX_FRAME: usize = tern_proto::limits::DEFAULT_MAX_FRAME;
const WRITE_BATCH: usize = 64 * 1024;

// Not inlined: tern-proto's pages list the wire conversions, which are not this crate's
// API.
#[doc(no_inline)]
pub use tern_proto::{Delivery, DeviceBundle, Envelope, IssuedCertificate, KeyUpload, SignedKey};

/// What the relay pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A queued or new message.
    Delivery(Delivery),
    /// Everything queued when this connection authenticated has been pushed.
    QueueEmpty,
}

/// Pushed deliveries, in the relay's order. Ends when the connection closes.
#[derive(Debug)]
pub struct Inbox(mpsc::UnboundedReceiver<Result<Incoming>>);

impl Inbox {
    /// The next push; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Result<Incoming>> {
        self.0.recv().await
    }

    /// The next push if one is already here.
    pub fn try_recv(&mut self) -> Option<Result<Incoming>> {
        self.0.try_recv().ok()
    }
}

/// Requests waiting for a response; `None` once the connection is gone, so a late
/// request fails at once instead of waiting forever.
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Reply>>>>>>;

/// A pipelined connection to a relay. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RelayConnection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    out: mpsc::UnboundedSender<v1::ClientFrame>,
    pending: Pending,
    next_id: AtomicU64,
    /// The certificate the relay announced it serves next (auth reply or push).
    next_certificate: watch::Sender<Option<NextCertificate>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn closed_reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            match u32::try_from(c.error_code.into_inner()) {
                Ok(close::DISPLACED) => "displaced by a newer connection of this device".into(),
                Ok(close::SHUTTING_DOWN) => "relay shutting down".into(),
                Ok(close::PROTOCOL_ERROR) => "relay reported a protocol error".into(),
                Ok(close::ACCOUNT_DELETED) => "the account was deleted".into(),
                Ok(close::DEVICE_REMOVED) => "this device was removed from its account".into(),
                _ => "closed".into(),
            }
        }
        other => other.to_string(),
    }
}

impl RelayConnection {
    /// Connects to `relay`, refusing any certificate but the pinned one. A relay
    /// address that lists several hosts is tried host by host in random order, each
    /// given [`HANDSHAKE_TIMEOUT`]; it fails once every host failed.
    pub async fn connect(relay: &RelayAddress) -> Result<(RelayConnection, Inbox)> {
        Self::connect_from(relay, None).await
    }

    /// [`RelayConnection::connect`] from a socket bound to `local` (any address of
    /// the relay's family, port chosen by the system, when `None`).
    pub async fn connect_from(
        relay: &RelayAddress,
        local: Option<SocketAddr>,
    ) -> Result<(RelayConnection, Inbox)> {
        Self::dialled(dial::dial(relay, &[relay.fingerprint], local).await?).await
    }

    /// [`RelayConnection::connect`] accepting any of `pins`' certificates (the
    /// current one, and during a rotation the announced next one), instead of the
    /// address's fingerprint. [`RelayConnection::presented`] says which it was.
    pub async fn connect_pinned(
        relay: &RelayAddress,
        pins: &tls::Pins,
    ) -> Result<(RelayConnection, Inbox)> {
        Self::dialled(dial::dial(relay, &pins.accepted(), None).await?).await
    }

    async fn dialled(
        (endpoint, conn): (quinn::Endpoint, quinn::Connection),
    ) -> Result<(RelayConnection, Inbox)> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        let (out, out_rx) = mpsc::unbounded_channel();
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(write_frames(send, out_rx));
        let next_certificate = watch::channel(None).0;
        tokio::spawn(read_frames(
            recv,
            conn.clone(),
            pending.clone(),
            inbox_tx,
            next_certificate.clone(),
        ));
        let connection = RelayConnection {
            endpoint,
            conn,
            out,
            pending,
            next_id: AtomicU64::new(1),
            next_certificate,
        };
        // The relay sees the control stream only once something is written on it, and
        // closes connections that stay silent for 10 s: a ping opens it at once, so a
        // connection may wait as long as it likes for its first request.
        drop(connection.issue(Request::Ping));
        Ok((connection, Inbox(inbox_rx)))
    }

    /// Sends `request` and waits for its reply; a refusal is [`Error::Relay`].
    pub(crate) async fn request(&self, request: Request) -> Result<Reply> {
        self.issue(request).await
    }

    /// Sends the request now, in call order, and returns the wait for its reply (which
    /// borrows nothing, so it can be awaited later or elsewhere).
    pub(crate) fn issue(
        &self,
        request: Request,
    ) -> impl Future<Output = Result<Reply>> + Send + 'static {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Some(waiting) = lock(&self.pending).as_mut() {
            waiting.insert(request_id, tx);
        }
        let sent = self.out.send(v1::ClientFrame::from(ClientRequest {
            id: request_id,
            request,
        }));
        if sent.is_err() {
            if let Some(waiting) = lock(&self.pending).as_mut() {
                waiting.remove(&request_id);
            }
        }
        let conn = self.conn.clone();
        async move {
            match rx.await {
                Ok(result) => result,
                Err(_) => Err(Error::Closed(match conn.close_reason() {
                    Some(e) => closed_reason(&e),
                    None => "control stream ended".into(),
                })),
            }
        }
    }

    fn exporter(&self, account: Option<&AccountId>, device: Option<DeviceId>) -> Result<[u8; 32]> {
        let context = tern_proto::auth::exporter_context(account, device);
        let mut out = [0u8; 32];
        self.conn
            .export_keying_material(&mut out, tern_proto::auth::EXPORTER_LABEL, &context)
            .map_err(|_| Error::Protocol("TLS exporter unavailable".into()))?;
        Ok(out)
    }

    /// The fingerprint of the certificate the relay presented on this connection.
    pub fn presented(&self) -> Option<tern_proto::Fingerprint> {
        tls::presented(&self.conn)
    }

    /// The certificate the relay announced it serves next, as the authentication
    /// reply or a later push told it; trustworthy as far as the certificate this
    /// connection was verified under is.
    pub fn next_certificate(&self) -> watch::Receiver<Option<NextCertificate>> {
        self.next_certificate.subscribe()
    }

    /// Creates an account for `identity` with `device` as its first device; this
    /// connection is then authenticated as that device.
    pub async fn register(
        &self,
        identity: &IdentityKeyPair,
        device: &DeviceKeyPair,
    ) -> Result<DeviceAddress> {
        let device_key = device.public();
        let proof = device.prove_session(&self.exporter(None, None)?);
        let reply = self
            .request(Request::Register {
                identity_key: identity.public(),
                device_key,
                device_signature: identity.certify_device(None, &device_key),
                session_proof: proof,
            })
            .await?;
        match reply {
            Reply::Register(address) => Ok(address),
            _ => Err(unexpected("register")),
        }
    }

    /// Adds a device to `account`, vouched for by its identity key. The relay takes
    /// it only from a connection authenticated as a device of that account.
    pub async fn add_device(
        &self,
        identity: &IdentityKeyPair,
        account: &AccountId,
        device_key: &[u8; 32],
    ) -> Result<DeviceId> {
        let reply = self
            .request(Request::AddDevice {
                account: *account,
                device_key: *device_key,
                device_signature: identity.certify_device(Some(account), device_key),
            })
            .await?;
        match reply {
            Reply::AddDevice(device) => Ok(device),
            _ => Err(unexpected("add_device")),
        }
    }

    /// Authenticates this connection as `address`; the relay then pushes its queued
    /// messages. Returns how many were queued.
    pub async fn authenticate(&self, address: &DeviceAddress, key: &DeviceKeyPair) -> Result<u64> {
        let proof =
            key.prove_session(&self.exporter(Some(&address.account), Some(address.device))?);
        let reply = self
            .request(Request::Auth {
                address: *address,
                signature: proof,
            })
            .await?;
        match reply {
            Reply::Auth {
                queued,
                next_certificate,
            } => {
                if next_certificate.is_some() {
                    self.next_certificate.send_replace(next_certificate);
                }
                Ok(queued)
            }
            _ => Err(unexpected("auth")),
        }
    }

    /// Queues envelopes for one device; resolves once the relay has stored them all
    /// (or none). The request leaves when this is called, so sends issued one after
    /// another are stored in that order even if their replies are awaited later.
    pub fn send(
        &self,
        to: &DeviceAddress,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> impl Future<Output = Result<u32>> + Send + 'static {
        self.send_for(to, 0, envelopes)
    }

    /// [`RelayConnection::send`] naming the recipient's device-list version the
    /// envelopes were encrypted for (0: not checked): a relay holding a newer list
    /// refuses with `STALE_DEVICE_LIST`.
    pub fn send_for(
        &self,
        to: &DeviceAddress,
        device_list_version: u64,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> impl Future<Output = Result<u32>> + Send + 'static {
        let reply = self.issue(Request::Send {
            to: *to,
            envelopes: envelopes.into_iter().collect(),
            device_list_version,
        });
        async move {
            match reply.await? {
                Reply::Send { accepted } => Ok(accepted),
                _ => Err(unexpected("send")),
            }
        }
    }

    /// Queues envelopes for a device without identifying the sender: the relay checks
    /// only the recipient account's delivery token. Use a connection that is not
    /// authenticated, so the relay cannot tie the send to a device. Like
    /// [`RelayConnection::send`], the request leaves when this is called.
    pub fn sealed_send(
        &self,
        to: &DeviceAddress,
        delivery_token: &[u8],
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> impl Future<Output = Result<u32>> + Send + 'static {
        self.sealed_send_for(to, delivery_token, 0, envelopes)
    }

    /// [`RelayConnection::sealed_send`] naming the recipient's device-list version,
    /// as [`RelayConnection::send_for`].
    pub fn sealed_send_for(
        &self,
        to: &DeviceAddress,
        delivery_token: &[u8],
        device_list_version: u64,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> impl Future<Output = Result<u32>> + Send + 'static {
        let reply = self.issue(Request::SealedSend {
            to: *to,
            delivery_token: Bytes::copy_from_slice(delivery_token),
            envelopes: envelopes.into_iter().collect(),
            device_list_version,
        });
        async move {
            match reply.await? {
                Reply::Send { accepted } => Ok(accepted),
                _ => Err(unexpected("sealed send")),
            }
        }
    }

    /// The device ids of `account`, shown its delivery token (so this works on a
    /// connection that identifies no one).
    pub async fn list_devices(
        &self,
        account: &AccountId,
        delivery_token: &[u8],
    ) -> Result<Vec<DeviceId>> {
        match self
            .request(Request::ListDevices {
                account: *account,
                delivery_token: Bytes::copy_from_slice(delivery_token),
            })
            .await?
        {
            Reply::ListDevices { devices, .. } => Ok(devices),
            _ => Err(unexpected("list_devices")),
        }
    }

    /// Sets this account's delivery token (the relay keeps only its SHA-256),
    /// replacing the previous one.
    pub async fn set_delivery_token(&self, token: &[u8]) -> Result<()> {
        let token_hash = Sha256::digest(token).into();
        match self
            .request(Request::SetDeliveryToken { token_hash })
            .await?
        {
            Reply::SetDeliveryToken => Ok(()),
            _ => Err(unexpected("set_delivery_token")),
        }
    }

    /// Deletes the account this connection is authenticated for (as `address`),
    /// signed by its `identity` key over this connection's exporter value, so the
    /// request cannot be replayed elsewhere. Returns once the relay has deleted
    /// everything durably, and closes the connection, which can do nothing more
    /// (the relay closes it too, with `ACCOUNT_DELETED`).
    pub async fn delete_account(
        &self,
        identity: &IdentityKeyPair,
        address: &DeviceAddress,
    ) -> Result<()> {
        let exporter = self.exporter(Some(&address.account), Some(address.device))?;
        let signature = identity.sign_account_deletion(&address.account, &exporter);
        match self.request(Request::DeleteAccount { signature }).await? {
            Reply::DeleteAccount => {
                self.close_now();
                Ok(())
            }
            _ => Err(unexpected("delete_account")),
        }
    }

    /// Starts verifying `number` for this connection's account: the relay sends a
    /// 6-digit code to it. Returns the session and when its code expires (Unix ms).
    pub async fn start_verification(&self, number: E164) -> Result<(VerificationId, u64)> {
        match self.request(Request::StartVerification { number }).await? {
            Reply::VerificationStarted {
                session,
                expires_at_ms,
            } => Ok((session, expires_at_ms)),
            _ => Err(unexpected("start_verification")),
        }
    }

    /// Answers a verification session with its code; on success the account now has
    /// the number's discovery tag, discoverable as the relay's default says, and the
    /// answer is whether it is discoverable.
    pub async fn check_verification(&self, session: VerificationId, code: Code) -> Result<bool> {
        self.check_verification_as(session, code, None).await
    }

    /// [`Self::check_verification`] with the account's choice: `Some(d)` attaches
    /// the tag discoverable as `d` from its first moment, `None` as the relay's
    /// default.
    pub async fn check_verification_as(
        &self,
        session: VerificationId,
        code: Code,
        discoverable: Option<bool>,
    ) -> Result<bool> {
        let request = Request::CheckVerification {
            session,
            code,
            discoverable,
        };
        match self.request(request).await? {
            Reply::Verified { discoverable } => Ok(discoverable),
            _ => Err(unexpected("check_verification")),
        }
    }

    /// A sender certificate for this device, signed by the relay.
    pub async fn sender_certificate(&self) -> Result<IssuedCertificate> {
        match self.request(Request::SenderCertificate).await? {
            Reply::SenderCertificate(issued) => Ok(issued),
            _ => Err(unexpected("sender_certificate")),
        }
    }

    /// The key the relay signs sender certificates with.
    pub async fn relay_signing_key(&self) -> Result<[u8; 32]> {
        match self.request(Request::RelayInfo).await? {
            Reply::RelayInfo { signing_key } => Ok(signing_key),
            _ => Err(unexpected("relay_info")),
        }
    }

    /// Publishes this device's keys; returns how many one-time prekeys the relay holds.
    pub async fn publish_keys(&self, upload: &KeyUpload) -> Result<u32> {
        match self.request(Request::PublishKeys(upload.clone())).await? {
            Reply::PublishKeys { one_time_prekeys } => Ok(one_time_prekeys),
            _ => Err(unexpected("publish_keys")),
        }
    }

    /// Prekey bundles of an account's devices (or one device), each consuming one of
    /// that device's one-time prekeys on the relay. Needs an authenticated
    /// connection, and tells the relay who asks; see [`RelayConnection::fetch_keys_with_token`].
    pub async fn fetch_keys(
        &self,
        account: &AccountId,
        device: Option<DeviceId>,
    ) -> Result<Vec<DeviceBundle>> {
        self.fetch_keys_as(account, device, None).await
    }

    /// Like [`RelayConnection::fetch_keys`], for a holder of the account's delivery
    /// token, on any connection: on one that never authenticates, the relay does not
    /// learn who fetches. A wrong token (or no such account) is `UNAUTHORIZED`.
    pub async fn fetch_keys_with_token(
        &self,
        account: &AccountId,
        device: Option<DeviceId>,
        delivery_token: &[u8],
    ) -> Result<Vec<DeviceBundle>> {
        let token = Bytes::copy_from_slice(delivery_token);
        self.fetch_keys_as(account, device, Some(token)).await
    }

    async fn fetch_keys_as(
        &self,
        account: &AccountId,
        device: Option<DeviceId>,
        delivery_token: Option<Bytes>,
    ) -> Result<Vec<DeviceBundle>> {
        match self
            .request(Request::FetchKeys {
                account: *account,
                device,
                delivery_token,
            })
            .await?
        {
            Reply::FetchKeys(bundles) => Ok(bundles),
            _ => Err(unexpected("fetch_keys")),
        }
    }

    /// Deletes delivered messages from this device's mailbox; returns how many the
    /// relay still held. The request leaves when this is called, so a receiver need
    /// not wait for the reply before handling what arrives next.
    pub fn ack(&self, seqs: &[u64]) -> impl Future<Output = Result<u32>> + Send + 'static {
        let reply = self.issue(Request::Ack {
            seqs: seqs.to_vec(),
        });
        async move {
            match reply.await? {
                Reply::Ack { deleted } => Ok(deleted),
                _ => Err(unexpected("ack")),
            }
        }
    }

    /// A round trip to the relay.
    pub async fn ping(&self) -> Result<()> {
        match self.request(Request::Ping).await? {
            Reply::Ping => Ok(()),
            _ => Err(unexpected("ping")),
        }
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> Error {
        Error::Closed(closed_reason(&self.conn.closed().await))
    }

    /// Resolves when the connection ends: true if it was lost (reset by a relay that
    /// no longer knows it, say after a restart, or timed out), false if either side
    /// closed it. Holds no handle on the connection itself.
    pub fn lost(&self) -> impl Future<Output = bool> + Send + 'static {
        let conn = self.conn.clone();
        async move {
            matches!(
                conn.closed().await,
                quinn::ConnectionError::Reset | quinn::ConnectionError::TimedOut
            )
        }
    }

    /// Whether the relay closed the connection because this device was removed
    /// from its account (close code `DEVICE_REMOVED`).
    pub fn device_removed(&self) -> bool {
        matches!(
            self.conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code.into_inner() == u64::from(close::DEVICE_REMOVED)
        )
    }

    /// Whether the connection has closed: by either side, or lost.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Closes the connection at once, without waiting (for a connection shared with
    /// other tasks: theirs fail with [`Error::Closed`]).
    pub fn close_now(&self) {
        self.conn.close(close::NORMAL.into(), b"bye");
    }

    /// Closes the connection and waits briefly for the relay to see it.
    pub async fn close(self) {
        self.conn.close(close::NORMAL.into(), b"bye");
        let endpoint = self.endpoint.clone();
        drop(self);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// A refusal from the relay, on the control stream or a media stream (which may
/// pass the wire's `v1::Error` as it is).
fn relay_error(e: impl Into<ErrorReply>) -> Error {
    let e = e.into();
    Error::Relay {
        code: e.code,
        message: e.message,
        retry_after_ms: e.retry_after_ms,
        attempts_left: e.attempts_left,
        current_epoch: e.current_epoch,
    }
}

pub(crate) fn unexpected(request: &str) -> Error {
    Error::Protocol(format!("unexpected reply to {request}"))
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        // Ends the reader and writer tasks too; closing twice is harmless.
        self.conn.close(close::NORMAL.into(), b"bye");
    }
}

async fn write_frames(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<v1::ClientFrame>,
) {
    let mut buf = BytesMut::new();
    while let Some(f) = rx.recv().await {
        frame::encode_ready(&f, rx.len(), || rx.try_recv().ok(), WRITE_BATCH, &mut buf);
        if send.write_chunk(buf.split().freeze()).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    conn: quinn::Connection,
    pending: Pending,
    inbox: mpsc::UnboundedSender<Result<Incoming>>,
    next_certificate: watch::Sender<Option<NextCertificate>>,
) {
    let mut decoder = frame::Decoder::new(MAX_FRAME);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let failure = loop {
        match decoder.decode_server_message(&mut buf) {
            Ok(Some(f)) => {
                if let Ok(ServerMessage::NextCertificate(n)) = f {
                    next_certificate.send_replace(Some(n));
                    continue;
                }
                if let Err(e) = dispatch(f, &pending, &inbox) {
                    break e;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break Error::Protocol(e.to_string()),
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) => break Error::Closed("control stream ended".into()),
            Ok(_) => {}
            Err(_) => {
                break Error::Closed(
                    conn.close_reason()
                        .map_or_else(|| "stream reset".into(), |e| closed_reason(&e)),
                )
            }
        }
    };
    if matches!(failure, Error::Protocol(_)) {
        conn.close(close::PROTOCOL_ERROR.into(), b"protocol error");
    }
    let _ = inbox.send(Err(failure));
    // Waiting requests, and any made from now on, see the connection as closed.
    lock(&pending).take();
}

fn dispatch(
    message: std::result::Result<ServerMessage, tern_proto::ServerFrameError>,
    pending: &Pending,
    inbox: &mpsc::UnboundedSender<Result<Incoming>>,
) -> Result<()> {
    let (id, result) = match message {
        Ok(ServerMessage::Response { id, result }) => (id, result.map_err(relay_error)),
        Ok(ServerMessage::Delivery(d)) => {
            let _ = inbox.send(Ok(Incoming::Delivery(d)));
            return Ok(());
        }
        Ok(ServerMessage::QueueEmpty) => {
            let _ = inbox.send(Ok(Incoming::QueueEmpty));
            return Ok(());
        }
        // Taken by `read_frames` before it gets here.
        Ok(ServerMessage::NextCertificate(_)) => return Ok(()),
        // A reply that does not validate fails its request, not the connection.
        Err(e) => match e.request_id() {
            Some(id) => (id, Err(Error::Protocol(e.to_string()))),
            None => return Err(Error::Protocol(e.to_string())),
        },
    };
    if let Some(tx) = lock(pending).as_mut().and_then(|w| w.remove(&id)) {
        let _ = tx.send(result);
    }
    // Request id 0 answers a frame the relay could not read; nothing waits for it.
    Ok(())
}
