//! A connection to one relay.
//!
//! [`RelayConnection::connect`] opens a QUIC connection with the relay's certificate
//! pinned and its control stream. Requests are pipelined: any number may be in flight
//! from any number of tasks, and each resolves when its response arrives. Deliveries
//! pushed by the relay come out of the [`Inbox`]; the relay bounds how many are
//! unacknowledged at once, which bounds the inbox.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tern_proto::v1::{self, client_frame::Body, response::Result as Reply};
use tern_proto::{close, frame, AccountId, DeviceAddress, DeviceId, MessageId, RelayAddress};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::identity::{DeviceKeyPair, IdentityKeyPair};

mod media;
pub mod tls;

pub use media::{BlobStatus, Uploaded};

/// Largest frame the client accepts from a relay.
const MAX_FRAME: usize = tern_proto::limits::DEFAULT_MAX_FRAME;
const WRITE_BATCH: usize = 64 * 1024;

/// An envelope to send: the sender's message id and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per message; the recipient drops duplicates by it.
    pub message_id: MessageId,
    /// Ciphertext.
    pub payload: Bytes,
}

/// A message pushed by the relay. Acknowledge it with its `seq` once it is safely
/// stored on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The relay's sequence number; acknowledge with it.
    pub seq: u64,
    /// The sender's message id.
    pub message_id: MessageId,
    /// Ciphertext.
    pub payload: Bytes,
    /// When the relay accepted it (Unix ms).
    pub accepted_at_ms: u64,
    /// When the relay will delete it if unacknowledged (Unix ms).
    pub expires_at_ms: u64,
}

/// A public key with the account identity's signature over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedKey {
    /// Signed prekey id (0 for an identity agreement key).
    pub id: u32,
    /// X25519 public key.
    pub key: [u8; 32],
    /// The identity's Ed25519 signature.
    pub signature: [u8; 64],
}

/// Keys a device publishes; every part optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpload {
    /// The device's identity agreement key, signed by the identity.
    pub identity_dh: Option<SignedKey>,
    /// A new signed prekey, replacing the current one.
    pub signed_prekey: Option<SignedKey>,
    /// One-time prekeys to add: (id, X25519 public key).
    pub one_time: Vec<(u32, [u8; 32])>,
}

/// One device's prekey bundle as the relay handed it out. Nothing here is verified:
/// check the signatures before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBundle {
    /// The device.
    pub device: DeviceId,
    /// The account's Ed25519 identity key.
    pub identity_key: [u8; 32],
    /// The device's identity agreement key.
    pub identity_dh: SignedKey,
    /// Its signed prekey.
    pub signed_prekey: SignedKey,
    /// A one-time prekey, now consumed on the relay; `None` when none were left.
    pub one_time_prekey: Option<(u32, [u8; 32])>,
}

/// A relay-signed sender certificate, as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The encoded certificate, as the relay signed it.
    pub certificate: Bytes,
    /// The relay's signature over it.
    pub signature: [u8; 64],
}

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
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>>;

/// A pipelined connection to a relay. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RelayConnection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    out: mpsc::UnboundedSender<v1::ClientFrame>,
    pending: Pending,
    next_id: AtomicU64,
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
                _ => "closed".into(),
            }
        }
        other => other.to_string(),
    }
}

impl RelayConnection {
    /// Connects to `relay`, refusing any certificate but the pinned one.
    pub async fn connect(relay: &RelayAddress) -> Result<(RelayConnection, Inbox)> {
        let target: SocketAddr = tokio::net::lookup_host((relay.host.as_str(), relay.port))
            .await
            .map_err(|e| Error::Connect(format!("resolving the relay: {e}")))?
            .next()
            .ok_or_else(|| Error::Connect("the relay's host has no address".into()))?;
        let bind: SocketAddr = if target.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let (config, mismatch) =
            tls::pinned_client_config(relay.fingerprint).map_err(Error::Connect)?;
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| Error::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint
            .connect(target, &relay.host)
            .map_err(|e| Error::Connect(e.to_string()))?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(_) if mismatch.load(Ordering::Acquire) => return Err(Error::FingerprintMismatch),
            Err(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                return Err(Error::Refused)
            }
            Err(e) => return Err(Error::Connect(e.to_string())),
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        let (out, out_rx) = mpsc::unbounded_channel();
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(write_frames(send, out_rx));
        tokio::spawn(read_frames(recv, conn.clone(), pending.clone(), inbox_tx));
        let connection = RelayConnection {
            endpoint,
            conn,
            out,
            pending,
            next_id: AtomicU64::new(1),
        };
        // The relay sees the control stream only once something is written on it, and
        // closes connections that stay silent for 10 s: a ping opens it at once, so a
        // connection may wait as long as it likes for its first request.
        drop(connection.issue(Body::Ping(v1::PingRequest {})));
        Ok((connection, Inbox(inbox_rx)))
    }

    async fn request(&self, body: Body) -> Result<Reply> {
        self.issue(body).await
    }

    /// Sends the request now, in call order, and returns the wait for its reply (which
    /// borrows nothing, so it can be awaited later or elsewhere).
    fn issue(&self, body: Body) -> impl Future<Output = Result<Reply>> + Send + 'static {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Some(waiting) = lock(&self.pending).as_mut() {
            waiting.insert(request_id, tx);
        }
        let sent = self.out.send(v1::ClientFrame {
            request_id,
            body: Some(body),
        });
        if sent.is_err() {
            if let Some(waiting) = lock(&self.pending).as_mut() {
                waiting.remove(&request_id);
            }
        }
        let conn = self.conn.clone();
        async move {
            match rx.await {
                Ok(Reply::Error(e)) => Err(relay_error(e)),
                Ok(reply) => Ok(reply),
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
            .request(Body::Register(v1::RegisterRequest {
                identity_key: Bytes::copy_from_slice(&identity.public()),
                device_key: Bytes::copy_from_slice(&device_key),
                device_signature: Bytes::copy_from_slice(
                    &identity.certify_device(None, &device_key),
                ),
                session_proof: Bytes::copy_from_slice(&proof),
            }))
            .await?;
        match reply {
            Reply::Register(r) => DeviceAddress::from_wire(&r.account_id, r.device_id)
                .map_err(|e| Error::Protocol(e.to_string())),
            _ => Err(Error::Protocol("unexpected reply to register".into())),
        }
    }

    /// Adds a device to `account`, vouched for by its identity key.
    pub async fn add_device(
        &self,
        identity: &IdentityKeyPair,
        account: &AccountId,
        device_key: &[u8; 32],
    ) -> Result<DeviceId> {
        let reply = self
            .request(Body::AddDevice(v1::AddDeviceRequest {
                account_id: Bytes::copy_from_slice(account.as_bytes()),
                device_key: Bytes::copy_from_slice(device_key),
                device_signature: Bytes::copy_from_slice(
                    &identity.certify_device(Some(account), device_key),
                ),
            }))
            .await?;
        match reply {
            Reply::AddDevice(r) => {
                DeviceId::try_from(r.device_id).map_err(|e| Error::Protocol(e.to_string()))
            }
            _ => Err(Error::Protocol("unexpected reply to add_device".into())),
        }
    }

    /// Authenticates this connection as `address`; the relay then pushes its queued
    /// messages. Returns how many were queued.
    pub async fn authenticate(&self, address: &DeviceAddress, key: &DeviceKeyPair) -> Result<u64> {
        let proof =
            key.prove_session(&self.exporter(Some(&address.account), Some(address.device))?);
        let reply = self
            .request(Body::Auth(v1::AuthRequest {
                account_id: Bytes::copy_from_slice(address.account.as_bytes()),
                device_id: address.device.get(),
                signature: Bytes::copy_from_slice(&proof),
            }))
            .await?;
        match reply {
            Reply::Auth(r) => Ok(r.queued),
            _ => Err(Error::Protocol("unexpected reply to auth".into())),
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
        let reply = self.issue(Body::Send(v1::SendRequest {
            recipient_account: Bytes::copy_from_slice(to.account.as_bytes()),
            recipient_device: to.device.get(),
            envelopes: wire_envelopes(envelopes),
        }));
        async move {
            match reply.await? {
                Reply::Send(r) => Ok(r.accepted),
                _ => Err(Error::Protocol("unexpected reply to send".into())),
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
        let reply = self.issue(Body::SealedSend(v1::SealedSendRequest {
            recipient_account: Bytes::copy_from_slice(to.account.as_bytes()),
            recipient_device: to.device.get(),
            delivery_token: Bytes::copy_from_slice(delivery_token),
            envelopes: wire_envelopes(envelopes),
        }));
        async move {
            match reply.await? {
                Reply::Send(r) => Ok(r.accepted),
                _ => Err(Error::Protocol("unexpected reply to sealed send".into())),
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
            .request(Body::ListDevices(v1::ListDevicesRequest {
                account_id: Bytes::copy_from_slice(account.as_bytes()),
                delivery_token: Bytes::copy_from_slice(delivery_token),
            }))
            .await?
        {
            Reply::ListDevices(r) => r
                .device_ids
                .into_iter()
                .map(|d| DeviceId::try_from(d).map_err(|e| Error::Protocol(e.to_string())))
                .collect(),
            _ => Err(Error::Protocol("unexpected reply to list_devices".into())),
        }
    }

    /// Sets this account's delivery token (the relay keeps only its SHA-256),
    /// replacing the previous one.
    pub async fn set_delivery_token(&self, token: &[u8]) -> Result<()> {
        let hash = Sha256::digest(token);
        match self
            .request(Body::SetDeliveryToken(v1::SetDeliveryTokenRequest {
                token_hash: Bytes::copy_from_slice(&hash),
            }))
            .await?
        {
            Reply::SetDeliveryToken(_) => Ok(()),
            _ => Err(Error::Protocol(
                "unexpected reply to set_delivery_token".into(),
            )),
        }
    }

    /// A sender certificate for this device, signed by the relay.
    pub async fn sender_certificate(&self) -> Result<IssuedCertificate> {
        match self
            .request(Body::SenderCertificate(v1::SenderCertificateRequest {}))
            .await?
        {
            Reply::SenderCertificate(r) => Ok(IssuedCertificate {
                certificate: r.certificate,
                signature: fixed(&r.signature, "certificate signature")?,
            }),
            _ => Err(Error::Protocol(
                "unexpected reply to sender_certificate".into(),
            )),
        }
    }

    /// The key the relay signs sender certificates with.
    pub async fn relay_signing_key(&self) -> Result<[u8; 32]> {
        match self
            .request(Body::RelayInfo(v1::RelayInfoRequest {}))
            .await?
        {
            Reply::RelayInfo(r) => fixed(&r.signing_key, "relay signing key"),
            _ => Err(Error::Protocol("unexpected reply to relay_info".into())),
        }
    }

    /// Publishes this device's keys; returns how many one-time prekeys the relay holds.
    pub async fn publish_keys(&self, upload: &KeyUpload) -> Result<u32> {
        let signed = |k: &SignedKey| v1::SignedPreKey {
            id: k.id,
            public_key: Bytes::copy_from_slice(&k.key),
            signature: Bytes::copy_from_slice(&k.signature),
        };
        let request = v1::PublishKeysRequest {
            identity_dh: upload
                .identity_dh
                .map_or_else(Bytes::new, |k| Bytes::copy_from_slice(&k.key)),
            identity_dh_signature: upload
                .identity_dh
                .map_or_else(Bytes::new, |k| Bytes::copy_from_slice(&k.signature)),
            signed_prekey: upload.signed_prekey.as_ref().map(signed),
            one_time_prekeys: upload
                .one_time
                .iter()
                .map(|(id, key)| v1::OneTimePreKey {
                    id: *id,
                    public_key: Bytes::copy_from_slice(key),
                })
                .collect(),
        };
        match self.request(Body::PublishKeys(request)).await? {
            Reply::PublishKeys(r) => Ok(r.one_time_prekeys),
            _ => Err(Error::Protocol("unexpected reply to publish_keys".into())),
        }
    }

    /// Prekey bundles of an account's devices (or one device), each consuming one of
    /// that device's one-time prekeys on the relay.
    pub async fn fetch_keys(
        &self,
        account: &AccountId,
        device: Option<DeviceId>,
    ) -> Result<Vec<DeviceBundle>> {
        let reply = self
            .request(Body::FetchKeys(v1::FetchKeysRequest {
                account_id: Bytes::copy_from_slice(account.as_bytes()),
                device_id: device.map_or(0, DeviceId::get),
            }))
            .await?;
        let Reply::FetchKeys(r) = reply else {
            return Err(Error::Protocol("unexpected reply to fetch_keys".into()));
        };
        r.bundles
            .into_iter()
            .map(|b| {
                let spk = b
                    .signed_prekey
                    .ok_or_else(|| Error::Protocol("bundle without a signed prekey".into()))?;
                Ok(DeviceBundle {
                    device: DeviceId::try_from(b.device_id)
                        .map_err(|e| Error::Protocol(e.to_string()))?,
                    identity_key: fixed(&b.identity_key, "identity key")?,
                    identity_dh: SignedKey {
                        id: 0,
                        key: fixed(&b.identity_dh, "identity agreement key")?,
                        signature: fixed(&b.identity_dh_signature, "signature")?,
                    },
                    signed_prekey: SignedKey {
                        id: spk.id,
                        key: fixed(&spk.public_key, "signed prekey")?,
                        signature: fixed(&spk.signature, "signature")?,
                    },
                    one_time_prekey: b
                        .one_time_prekey
                        .map(|o| Ok::<_, Error>((o.id, fixed(&o.public_key, "one-time prekey")?)))
                        .transpose()?,
                })
            })
            .collect()
    }

    /// Deletes delivered messages from this device's mailbox; returns how many the
    /// relay still held. The request leaves when this is called, so a receiver need
    /// not wait for the reply before handling what arrives next.
    pub fn ack(&self, seqs: &[u64]) -> impl Future<Output = Result<u32>> + Send + 'static {
        let reply = self.issue(Body::Ack(v1::AckRequest {
            seqs: seqs.to_vec(),
        }));
        async move {
            match reply.await? {
                Reply::Ack(r) => Ok(r.deleted),
                _ => Err(Error::Protocol("unexpected reply to ack".into())),
            }
        }
    }

    /// A round trip to the relay.
    pub async fn ping(&self) -> Result<()> {
        match self.request(Body::Ping(v1::PingRequest {})).await? {
            Reply::Ping(_) => Ok(()),
            _ => Err(Error::Protocol("unexpected reply to ping".into())),
        }
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> Error {
        Error::Closed(closed_reason(&self.conn.closed().await))
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

fn wire_envelopes(envelopes: impl IntoIterator<Item = Envelope>) -> Vec<v1::Envelope> {
    envelopes
        .into_iter()
        .map(|e| v1::Envelope {
            message_id: Bytes::copy_from_slice(e.message_id.as_bytes()),
            payload: e.payload,
        })
        .collect()
}

/// A refusal from the relay, on the control stream or a media stream.
fn relay_error(e: v1::Error) -> Error {
    use crate::error::ErrorCode as Code;
    use v1::ErrorCode as Wire;
    let code = match Wire::try_from(e.code).unwrap_or(Wire::Unspecified) {
        Wire::Unspecified => Code::Unspecified,
        Wire::BadRequest => Code::BadRequest,
        Wire::Unauthorized => Code::Unauthorized,
        Wire::UnknownRecipient => Code::UnknownRecipient,
        Wire::MailboxFull => Code::MailboxFull,
        Wire::TooLarge => Code::TooLarge,
        Wire::RateLimited => Code::RateLimited,
        Wire::Expired => Code::Expired,
        Wire::Internal => Code::Internal,
        Wire::Unavailable => Code::Unavailable,
        Wire::NotFound => Code::NotFound,
        Wire::QuotaExceeded => Code::QuotaExceeded,
    };
    Error::Relay {
        code,
        message: e.message,
    }
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| Error::Protocol(format!("{what} must be {N} bytes, got {}", bytes.len())))
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
) {
    let mut decoder = frame::Decoder::new(MAX_FRAME);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let failure = loop {
        match decoder.decode_message::<v1::ServerFrame>(&mut buf) {
            Ok(Some(f)) => {
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
    f: v1::ServerFrame,
    pending: &Pending,
    inbox: &mpsc::UnboundedSender<Result<Incoming>>,
) -> Result<()> {
    match f.body {
        Some(v1::server_frame::Body::Response(r)) => {
            let result = r
                .result
                .ok_or_else(|| Error::Protocol("response without a result".into()))?;
            if let Some(tx) = lock(pending).as_mut().and_then(|w| w.remove(&r.request_id)) {
                let _ = tx.send(result);
            }
            // Request id 0 answers a frame the relay could not read; nothing waits for it.
        }
        Some(v1::server_frame::Body::Delivery(d)) => {
            let message_id = MessageId::try_from(&d.message_id[..])
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let _ = inbox.send(Ok(Incoming::Delivery(Delivery {
                seq: d.seq,
                message_id,
                payload: d.payload,
                accepted_at_ms: d.accepted_at_ms,
                expires_at_ms: d.expires_at_ms,
            })));
        }
        Some(v1::server_frame::Body::QueueEmpty(_)) => {
            let _ = inbox.send(Ok(Incoming::QueueEmpty));
        }
        None => return Err(Error::Protocol("empty frame".into())),
    }
    Ok(())
}
