//! One client connection: a control stream carrying pipelined requests up and
//! responses and deliveries down.
//!
//! Three tasks share the work. The reader decodes frames and handles each request;
//! sends run in their own tasks (they wait for a group commit) under a per-connection
//! cap, so a slow disk slows the reader instead of growing memory. The writer
//! coalesces outgoing frames into few stream writes. Once authenticated, a delivery
//! task owns the device's [`DeliveryWindow`]: it pushes on wake-ups and applies acks.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tern_proto::frame::{self, FrameError};
use tern_proto::v1::{self, client_frame::Body, response::Result as Reply};
use tern_proto::{close, AccountId, DeviceAddress, DeviceId, MessageId};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::blobs::BlobStore;
use crate::core::auth::{self, AuthenticatedDevice};
use crate::core::delivery::DeliveryWindow;
use crate::core::rate::RateLimiter;
use crate::error::{Error, Result};
use crate::keys::PublishedKeys;
use crate::mailboxes::Appended;
use crate::server::Services;
use crate::store::{NewMessage, StoredMessage};

/// How long a new connection has to open its control stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing frames queued per connection before producers wait.
const OUT_QUEUE: usize = 1024;

/// A queued outgoing frame, boxed: the queue's storage is allocated in blocks of 32
/// entries, and every connection keeps one; small entries keep idle connections small.
type Frame = Box<v1::ServerFrame>;
/// Bytes the writer coalesces into one stream write.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a connection closed for a protocol error lingers so the client can read
/// the error first: a QUIC receiver drops buffered stream data when the connection
/// closes.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// Most sequence numbers in one ack.
const MAX_ACK: usize = 4096;

/// Per-connection settings.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) max_frame: usize,
    pub(crate) max_requests: usize,
    pub(crate) delivery_window: usize,
    pub(crate) blobs: Arc<BlobStore>,
    /// Registrations per peer IP address (kept in memory only).
    pub(crate) registrations: Arc<RateLimiter<std::net::IpAddr>>,
}

struct AckCmd {
    request_id: u64,
    seqs: Vec<u64>,
}

struct Session {
    conn: quinn::Connection,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    out: mpsc::Sender<Frame>,
    requests: Arc<Semaphore>,
    /// Set once, at registration or authentication; shared with the media streams.
    device: Arc<OnceLock<AuthenticatedDevice>>,
    acks: Option<mpsc::Sender<AckCmd>>,
    delivery: Option<tokio::task::JoinHandle<()>>,
}

/// Why the read loop stopped, and so how the connection is closed.
enum End {
    Finished,
    Lost,
    Protocol,
    Shutdown,
}

/// Serves one connection until the client leaves, breaks the protocol, or the relay
/// shuts down. Requests already being handled finish before the connection closes.
pub(crate) async fn serve(
    conn: quinn::Connection,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    mut shutdown: watch::Receiver<bool>,
) {
    let opened = tokio::select! {
        opened = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()) => opened,
        _ = shutdown.changed() => {
            conn.close(close::SHUTTING_DOWN.into(), b"shutting down");
            return;
        }
    };
    let (send, recv) = match opened {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before its control stream");
            return;
        }
        Err(_) => {
            conn.close(close::PROTOCOL_ERROR.into(), b"no control stream");
            return;
        }
    };
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write_frames(send, out_rx));
    let device = Arc::new(OnceLock::new());
    // Media transfers arrive as streams of their own. A task of its own accepts them:
    // polling for them in the read loop would cost a lock on every packet read.
    let media = tokio::spawn(super::media::accept_streams(
        conn.clone(),
        settings.blobs.clone(),
        device.clone(),
    ));
    let mut session = Session {
        device,
        conn: conn.clone(),
        services,
        requests: Arc::new(Semaphore::new(settings.max_requests)),
        settings,
        out,
        acks: None,
        delivery: None,
    };
    let end = session.read_loop(recv, shutdown).await;
    media.abort();
    session.finish().await;
    // The writer ends once every sender of its queue is gone.
    drop(session);
    let _ = writer.await;
    if matches!(end, End::Protocol) {
        let _ = tokio::time::timeout(FINAL_FLUSH, conn.closed()).await;
    }
    let (code, reason): (u32, &[u8]) = match end {
        End::Finished | End::Lost => (close::NORMAL, b"bye"),
        End::Protocol => (close::PROTOCOL_ERROR, b"protocol error"),
        End::Shutdown => (close::SHUTTING_DOWN, b"shutting down"),
    };
    conn.close(code.into(), reason);
    debug!("connection closed");
}

/// The most a single read takes from the control stream.
const READ_CHUNK: usize = 64 * 1024;

impl Session {
    async fn read_loop(
        &mut self,
        mut recv: quinn::RecvStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        let mut decoder = frame::Decoder::new(self.settings.max_frame);
        // Empty between frames: an idle connection holds no read buffer, only what
        // quinn holds for it.
        let mut buf = BytesMut::new();
        loop {
            loop {
                match decoder.decode_message::<v1::ClientFrame>(&mut buf) {
                    Ok(Some(f)) => self.handle(f).await,
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        let e = Error::TooLarge {
                            what: "frame",
                            size: len,
                            max,
                        };
                        self.reply(0, Err(e)).await;
                        return End::Protocol;
                    }
                    Err(FrameError::Malformed(_)) => {
                        self.reply(0, Err(Error::BadRequest("malformed frame".into())))
                            .await;
                    }
                }
            }
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return End::Shutdown,
                read = recv.read_chunk(READ_CHUNK, true) => match read {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    Ok(None) => return End::Finished,
                    Err(_) => return End::Lost,
                },
            }
        }
    }

    /// Waits for requests in progress, then stops the delivery task.
    async fn finish(&mut self) {
        let all = u32::try_from(self.settings.max_requests).unwrap_or(u32::MAX);
        let _ = self.requests.acquire_many(all).await;
        self.acks = None;
        if let Some(d) = self.delivery.take() {
            let _ = d.await;
        }
    }

    async fn reply(&self, request_id: u64, result: Result<Reply>) {
        let _ = self.out.send(response(request_id, result)).await;
    }

    async fn handle(&mut self, f: v1::ClientFrame) {
        let id = f.request_id;
        let Some(body) = f.body else {
            return self
                .reply(id, Err(Error::BadRequest("empty request".into())))
                .await;
        };
        match body {
            Body::Ping(_) => self.reply(id, Ok(Reply::Ping(v1::PingResponse {}))).await,
            Body::Register(r) => {
                let result = self.register(r).await;
                self.reply(
                    id,
                    result.map(|(account_id, device_id)| {
                        Reply::Register(v1::RegisterResponse {
                            account_id,
                            device_id,
                        })
                    }),
                )
                .await;
                self.start_delivery();
            }
            Body::AddDevice(r) => {
                let result = match r.account_id[..].try_into() {
                    Ok(account) => {
                        self.services
                            .accounts()
                            .add_device(&account, &r.device_key, &r.device_signature)
                            .await
                    }
                    Err(e) => Err(Error::from(e)),
                };
                let reply =
                    result.map(|d| Reply::AddDevice(v1::AddDeviceResponse { device_id: d.get() }));
                self.reply(id, reply).await;
            }
            Body::Auth(r) => {
                let result = self.authenticate(&r);
                self.reply(
                    id,
                    result.map(|queued| Reply::Auth(v1::AuthResponse { queued })),
                )
                .await;
                self.start_delivery();
            }
            Body::BlobStatus(r) => {
                let reply = super::media::status(&self.settings.blobs, &r.blob_id).await;
                self.reply(id, reply.map(Reply::BlobStatus)).await
            }
            Body::TouchBlob(r) => {
                let reply = super::media::touch(&self.settings.blobs, &r.blob_id).await;
                self.reply(id, reply.map(Reply::TouchBlob)).await
            }
            Body::ListDevices(r) => {
                let reply = AccountId::try_from(&r.account_id[..])
                    .map_err(Error::from)
                    .and_then(|account| {
                        self.services
                            .accounts()
                            .list_devices(&account, &r.delivery_token)
                    })
                    .map(|ids| {
                        Reply::ListDevices(v1::ListDevicesResponse {
                            device_ids: ids.into_iter().map(DeviceId::get).collect(),
                        })
                    });
                self.reply(id, reply).await
            }
            Body::Send(r) => self.send(id, r).await,
            Body::SealedSend(r) => self.sealed_send(id, r).await,
            Body::Ack(r) => self.ack(id, r.seqs).await,
            Body::RelayInfo(_) => {
                let key = Bytes::copy_from_slice(&self.services.certificates().signing_key());
                self.reply(
                    id,
                    Ok(Reply::RelayInfo(v1::RelayInfoResponse { signing_key: key })),
                )
                .await
            }
            Body::PublishKeys(r) => {
                let result = self.publish_keys(&r).await;
                let reply = result.map(|n| {
                    Reply::PublishKeys(v1::PublishKeysResponse {
                        one_time_prekeys: n.try_into().unwrap_or(u32::MAX),
                    })
                });
                self.reply(id, reply).await
            }
            Body::FetchKeys(r) => {
                let reply = self.fetch_keys(&r).map(Reply::FetchKeys);
                self.reply(id, reply).await
            }
            Body::SenderCertificate(_) => {
                let cert = self
                    .authenticated()
                    .and_then(|d| self.services.certificates().issue(d));
                let reply = cert.map(|c| {
                    Reply::SenderCertificate(v1::SenderCertificateResponse {
                        certificate: c.certificate.into(),
                        signature: Bytes::copy_from_slice(&c.signature),
                    })
                });
                self.reply(id, reply).await
            }
            Body::SetDeliveryToken(r) => {
                let result = match self.authenticated() {
                    Ok(d) => {
                        self.services
                            .accounts()
                            .set_delivery_token(d, &r.token_hash)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let reply =
                    result.map(|()| Reply::SetDeliveryToken(v1::SetDeliveryTokenResponse {}));
                self.reply(id, reply).await
            }
        }
    }

    fn authenticated(&self) -> Result<&AuthenticatedDevice> {
        self.device.get().ok_or(Error::Unauthorized)
    }

    async fn publish_keys(&self, r: &v1::PublishKeysRequest) -> Result<u64> {
        let device = self.authenticated()?;
        let keys = PublishedKeys {
            identity_dh: (!r.identity_dh.is_empty())
                .then(|| (&r.identity_dh[..], &r.identity_dh_signature[..])),
            signed_prekey: r
                .signed_prekey
                .as_ref()
                .map(|k| (k.id, &k.public_key[..], &k.signature[..])),
            one_time: r
                .one_time_prekeys
                .iter()
                .map(|k| (k.id, &k.public_key[..]))
                .collect(),
        };
        self.services.keys().publish(device, keys).await
    }

    fn fetch_keys(&self, r: &v1::FetchKeysRequest) -> Result<v1::FetchKeysResponse> {
        let device = self.authenticated()?;
        let account = AccountId::try_from(&r.account_id[..])?;
        let found = self
            .services
            .keys()
            .fetch(device, &account, DeviceId::new(r.device_id))?;
        let identity_key = found.identity_key;
        let signed = |k: &crate::store::SignedKey| v1::SignedPreKey {
            id: k.id,
            public_key: Bytes::copy_from_slice(&k.key),
            signature: Bytes::copy_from_slice(&k.signature),
        };
        let bundles = found
            .devices
            .into_iter()
            .map(|(id, k)| v1::PreKeyBundle {
                device_id: id.get(),
                identity_key: Bytes::copy_from_slice(&identity_key),
                identity_dh: Bytes::copy_from_slice(&k.identity_dh.key),
                identity_dh_signature: Bytes::copy_from_slice(&k.identity_dh.signature),
                signed_prekey: Some(signed(&k.signed_prekey)),
                one_time_prekey: k.one_time.map(|o| v1::OneTimePreKey {
                    id: o.id,
                    public_key: Bytes::copy_from_slice(&o.key),
                }),
            })
            .collect();
        Ok(v1::FetchKeysResponse { bundles })
    }

    fn exporter(&self, address: Option<&DeviceAddress>) -> Result<[u8; 32]> {
        let context = tern_proto::auth::exporter_context(
            address.map(|a| &a.account),
            address.map(|a| a.device),
        );
        let mut out = [0u8; 32];
        self.conn
            .export_keying_material(&mut out, tern_proto::auth::EXPORTER_LABEL, &context)
            .map_err(|_| Error::Tls("keying material exporter unavailable".into()))?;
        Ok(out)
    }

    async fn register(&mut self, r: v1::RegisterRequest) -> Result<(Bytes, u32)> {
        if self.device.get().is_some() {
            return Err(Error::BadRequest("already authenticated".into()));
        }
        let ip = self.conn.remote_address().ip();
        self.settings
            .registrations
            .check(ip, self.services.now())
            .map_err(|retry_after_ms| Error::RateLimited { retry_after_ms })?;
        let exporter = self.exporter(None)?;
        let verified = auth::verify_registration(
            &r.identity_key,
            &r.device_key,
            &r.device_signature,
            &r.session_proof,
            &exporter,
        )?;
        let device = self.services.accounts().register(verified).await?;
        let addr = *device.address();
        let _ = self.device.set(device);
        debug!("registered a new account");
        Ok((
            Bytes::copy_from_slice(addr.account.as_bytes()),
            addr.device.get(),
        ))
    }

    fn authenticate(&mut self, r: &v1::AuthRequest) -> Result<u64> {
        if self.device.get().is_some() {
            return Err(Error::BadRequest("already authenticated".into()));
        }
        let address = DeviceAddress::from_wire(&r.account_id, r.device_id)?;
        let exporter = self.exporter(Some(&address))?;
        let device = self
            .services
            .accounts()
            .authenticate(address, &exporter, &r.signature)?;
        let queued = self.services.mailboxes().usage(&device)?.messages;
        let _ = self.device.set(device);
        Ok(queued)
    }

    /// Starts pushing once the connection has just been authenticated.
    fn start_delivery(&mut self) {
        let (Some(device), None) = (self.device.get(), &self.acks) else {
            return;
        };
        let (acks, acks_rx) = mpsc::channel(64);
        self.acks = Some(acks);
        self.delivery = Some(tokio::spawn(deliver(
            self.services.clone(),
            device.clone(),
            self.settings.delivery_window,
            self.out.clone(),
            acks_rx,
            self.conn.clone(),
        )));
    }

    async fn send(&mut self, id: u64, r: v1::SendRequest) {
        let Some(sender) = self.device.get().cloned() else {
            return self.reply(id, Err(Error::Unauthorized)).await;
        };
        let parsed = DeviceAddress::from_wire(&r.recipient_account, r.recipient_device)
            .map_err(Error::from)
            .and_then(|to| Ok((to, envelopes(r.envelopes)?)));
        match parsed {
            Ok((to, msgs)) => {
                self.ordered_send(id, |services| {
                    let to = services.accounts().recipient(&sender, to)?;
                    services.mailboxes().append(&to, &msgs)
                })
                .await
            }
            Err(e) => self.reply(id, Err(e)).await,
        }
    }

    /// A send from an unidentified sender: needs no authentication, only the
    /// recipient's delivery token.
    async fn sealed_send(&mut self, id: u64, r: v1::SealedSendRequest) {
        let parsed = DeviceAddress::from_wire(&r.recipient_account, r.recipient_device)
            .map_err(Error::from)
            .and_then(|to| Ok((to, envelopes(r.envelopes)?)));
        match parsed {
            Ok((to, msgs)) => {
                self.ordered_send(id, |services| {
                    let to = services
                        .accounts()
                        .sealed_recipient(to, &r.delivery_token)?;
                    services.mailboxes().append(&to, &msgs)
                })
                .await
            }
            Err(e) => self.reply(id, Err(e)).await,
        }
    }

    /// Appends a send here, in the order requests arrive (so pipelined sends to one
    /// device are stored in the order sent), then waits for its group commit in its
    /// own task under the per-connection cap: past the cap the reader waits here,
    /// which is backpressure instead of a growing queue.
    async fn ordered_send(&mut self, id: u64, append: impl FnOnce(&Services) -> Result<Appended>) {
        let Ok(permit) = self.requests.clone().acquire_owned().await else {
            return;
        };
        let appended = append(&self.services);
        let out = self.out.clone();
        tokio::spawn(async move {
            let result = match appended {
                Ok(appended) => appended.commit().await,
                Err(e) => Err(e),
            };
            let accepted = result.map(|n| Reply::Send(v1::SendResponse { accepted: n as u32 }));
            let _ = out.send(response(id, accepted)).await;
            drop(permit);
        });
    }

    async fn ack(&mut self, id: u64, seqs: Vec<u64>) {
        if seqs.len() > MAX_ACK {
            let e = Error::TooLarge {
                what: "ack",
                size: seqs.len(),
                max: MAX_ACK,
            };
            return self.reply(id, Err(e)).await;
        }
        match &self.acks {
            Some(acks) => {
                let _ = acks
                    .send(AckCmd {
                        request_id: id,
                        seqs,
                    })
                    .await;
            }
            None => self.reply(id, Err(Error::Unauthorized)).await,
        }
    }
}

fn envelopes(wire: Vec<v1::Envelope>) -> Result<Vec<NewMessage>> {
    wire.into_iter()
        .map(|e| {
            Ok(NewMessage {
                message_id: MessageId::try_from(&e.message_id[..])?,
                payload: e.payload,
            })
        })
        .collect()
}

fn response(request_id: u64, result: Result<Reply>) -> Frame {
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            if e.code() == v1::ErrorCode::Internal {
                warn!(error = %e, "request failed");
            } else {
                debug!(error = %e, "request refused");
            }
            Reply::Error(v1::Error {
                code: e.code() as i32,
                message: e.client_message(),
                retry_after_ms: e.retry_after_ms(),
            })
        }
    };
    Box::new(v1::ServerFrame {
        body: Some(v1::server_frame::Body::Response(v1::Response {
            request_id,
            result: Some(result),
        })),
    })
}

fn delivery(m: StoredMessage) -> Frame {
    Box::new(v1::ServerFrame {
        body: Some(v1::server_frame::Body::Delivery(v1::Delivery {
            seq: m.seq,
            message_id: Bytes::copy_from_slice(m.message_id.as_bytes()),
            payload: m.payload,
            accepted_at_ms: m.accepted_at,
            expires_at_ms: m.expires_at,
        })),
    })
}

/// Pushes the device's messages as room allows and applies its acks.
async fn deliver(
    services: Arc<Services>,
    device: AuthenticatedDevice,
    window_size: usize,
    out: mpsc::Sender<Frame>,
    mut acks: mpsc::Receiver<AckCmd>,
    conn: quinn::Connection,
) {
    let mailboxes = services.mailboxes();
    let sub = mailboxes.subscribe(&device);
    let mut window = DeliveryWindow::new(window_size);
    loop {
        tokio::select! {
            _ = sub.changed() => {
                if sub.displaced() {
                    debug!("displaced by a newer connection of the same device");
                    conn.close(close::DISPLACED.into(), b"displaced");
                    return;
                }
            }
            cmd = acks.recv() => {
                let Some(cmd) = cmd else { return };
                let result = mailboxes.ack(&device, &cmd.seqs);
                for seq in &cmd.seqs {
                    window.on_acked(*seq);
                }
                let reply = result.map(|r| Reply::Ack(v1::AckResponse { deleted: r.messages as u32 }));
                if out.send(response(cmd.request_id, reply)).await.is_err() {
                    return;
                }
            }
        }
        let pull = match mailboxes.pull(&device, &mut window) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "reading a mailbox failed");
                continue;
            }
        };
        for m in pull.messages {
            if out.send(delivery(m)).await.is_err() {
                return;
            }
        }
        if pull.queue_empty {
            let empty = v1::server_frame::Body::QueueEmpty(v1::QueueEmpty {});
            if out
                .send(Box::new(v1::ServerFrame { body: Some(empty) }))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Writes queued frames, coalescing whatever is ready into one write.
async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Frame>) {
    let mut buf = BytesMut::new();
    while let Some(f) = rx.recv().await {
        frame::encode_ready(&f, rx.len(), || rx.try_recv().ok(), WRITE_BATCH, &mut buf);
        if send.write_chunk(buf.split().freeze()).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
