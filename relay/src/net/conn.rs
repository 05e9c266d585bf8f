//! One client connection: a control stream carrying pipelined requests up and
//! responses and deliveries down.
//!
//! Three tasks share the work. The reader decodes frames and handles each request.
//! The writer coalesces outgoing frames into few stream writes; it also holds the
//! answers that wait for a group commit (sends, acks: [`Out::Later`]), under a
//! per-connection cap, so a slow disk slows the reader instead of growing memory, and
//! a commit wakes the writer itself rather than a task per request. Once
//! authenticated, a delivery task owns the device's [`DeliveryWindow`]: it pushes on
//! wake-ups and applies acks, whose answers wait in the writer for the deletion's
//! group commit, so pushing never waits for an fsync.
//!
//! A connection starts [`Standing::Pending`]: a small frame limit and flow-control
//! window, and a deadline (`connections.auth_deadline`, counted from its first
//! packet). Authenticating makes it [`Standing::Authenticated`] and lifts both; a
//! first successful anonymous request (a sealed send, device list, key fetch with a
//! delivery token, key-package fetch, group create or commit, blob status or touch,
//! a download) makes it [`Standing::Anonymous`], which keeps the small limits
//! and is closed after `connections.anonymous_idle` without one. Either trades the
//! connection's place in the unauthenticated pool for one of `max_connections`.
//! Before authentication a `MultiSend` or `GroupCommit` (anonymous by design) may
//! be larger than the small frame limit, up to `standing::GROUP_FRAME` (about 1 MiB):
//! a commit and its welcome to 1,000 devices.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tern_proto::frame::{self, FrameError};
use tern_proto::v1;
use tern_proto::{
    close, ClientRequest, DeviceAddress, ErrorCode, Reply, Request, RequestError, RequestKind,
    ServerMessage,
};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::core::auth::{self, AuthenticatedDevice};
use crate::core::rate::AddressPrefix;
use crate::deletion::{AccountDeletion, DeviceRemoval, Gone};
use crate::error::{Error, Result};
use crate::media::BlobStore;
use crate::net::admission::AdmissionGuard;
use crate::net::media::Activity;

mod devices;
mod discovery;
mod groups;
mod keys;
mod push;
mod send;
mod standing;
mod verification;
mod wakeups;
#[cfg(test)]
mod writer_tests;
use crate::server::Services;
pub(crate) use standing::Admitted;
use standing::Standing;

/// How long a new connection has to open its control stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing frames queued per connection before producers wait.
const OUT_QUEUE: usize = 1024;

/// A queued outgoing frame, boxed: the queue's storage is allocated in blocks of 32
/// entries, and every connection keeps one; small entries keep idle connections small.
type Frame = Box<v1::ServerFrame>;

/// What the writer is handed (16 bytes, against 8 for a frame alone: 256 bytes more
/// in a connection's first queue block).
enum Out {
    /// A frame to write now.
    Frame(Frame),
    /// An answer that waits (for a group commit): written once it resolves, in
    /// whatever order answers resolve (each names its request).
    Later(Later),
}

/// An answer that waits, boxed.
type Later = Pin<Box<dyn Future<Output = Frame> + Send>>;
/// Bytes the writer coalesces into one stream write.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a connection closed for a protocol error lingers so the client can read
/// the error first: a QUIC receiver drops buffered stream data when the connection
/// closes.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Per-connection settings.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) max_frame: usize,
    pub(crate) max_requests: usize,
    pub(crate) delivery_window: usize,
    pub(crate) delivery_window_bytes: usize,
    /// Largest frame before authentication.
    pub(crate) unauthenticated_frame: usize,
    /// Connection receive window once authenticated.
    pub(crate) authenticated_receive_window: u32,
    pub(crate) auth_deadline: Duration,
    pub(crate) anonymous_idle: Duration,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) deletion: Arc<AccountDeletion>,
    pub(crate) removal: Arc<DeviceRemoval>,
    pub(crate) discovery: Arc<crate::discovery::Discovery>,
    pub(crate) verification: Arc<crate::verification::Verification>,
    /// The staged certificate authenticated clients are told about.
    pub(crate) next_certificate: watch::Receiver<Option<tern_proto::NextCertificate>>,
    /// Wakes devices that have no connection.
    pub(crate) push: Arc<crate::push::Push>,
}

struct AckCmd {
    request_id: u64,
    seqs: Vec<u64>,
}

/// An ack handed to the delivery task, boxed: the channel's storage is allocated in
/// blocks of 32 entries, and every authenticated connection keeps one (256 bytes of
/// pointers instead of 1 KiB).
type Ack = Box<AckCmd>;

struct Session {
    conn: quinn::Connection,
    /// The peer's address as rate limits count it (in memory only, P9).
    prefix: AddressPrefix,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    out: mpsc::Sender<Out>,
    requests: Arc<Semaphore>,
    /// Set once, at registration or authentication; shared with the media streams.
    device: Arc<OnceLock<AuthenticatedDevice>>,
    acks: Option<mpsc::Sender<Ack>>,
    delivery: Option<tokio::task::JoinHandle<()>>,
    standing: Standing,
    admission: AdmissionGuard,
    /// When a connection that is not authenticated is closed.
    deadline: tokio::time::Instant,
    /// Media transfers, which count as anonymous requests.
    activity: Arc<Activity>,
    /// Set when a request must end the connection.
    ending: Option<End>,
    /// The UTC day this connection last moved its device's last-seen day on.
    touched_day: u32,
}

/// Why the read loop stopped, and so how the connection is closed.
enum End {
    Finished,
    Lost,
    Protocol,
    Shutdown,
    /// Not authenticated, nor an anonymous request, by the deadline.
    Deadline,
    /// Anonymous and idle past `anonymous_idle`.
    Idle,
    /// No place among `max_connections` for this connection.
    Full,
    /// The connection's account was deleted.
    Deleted,
    /// The connection's device was removed from its account.
    Removed,
}

/// Serves one connection until the client leaves, breaks the protocol, or the relay
/// shuts down. Requests already being handled finish before the connection closes.
pub(crate) async fn serve(
    conn: quinn::Connection,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    admitted: Admitted,
    mut shutdown: watch::Receiver<bool>,
) {
    let open_by = admitted
        .deadline
        .min(tokio::time::Instant::now() + OPEN_TIMEOUT);
    let opened = tokio::select! {
        opened = tokio::time::timeout_at(open_by, conn.accept_bi()) => opened,
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
    let _open = crate::metrics::OpenConnection::new();
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let writer = tokio::spawn(write_frames(send, out_rx));
    let device = Arc::new(OnceLock::new());
    let activity = Arc::new(Activity::default());
    // Media transfers arrive as streams of their own. A task of its own accepts them:
    // polling for them in the read loop would cost a lock on every packet read.
    let media = tokio::spawn(super::media::accept_streams(
        conn.clone(),
        settings.blobs.clone(),
        services.clone(),
        settings.verification.clone(),
        device.clone(),
        activity.clone(),
    ));
    let mut session = Session {
        device,
        prefix: admitted.guard.prefix(),
        conn: conn.clone(),
        services,
        requests: Arc::new(Semaphore::new(settings.max_requests)),
        settings,
        out,
        acks: None,
        delivery: None,
        standing: Standing::Pending,
        admission: admitted.guard,
        deadline: admitted.deadline,
        activity,
        ending: None,
        touched_day: 0,
    };
    let end = session.read_loop(recv, shutdown).await;
    media.abort();
    session.finish().await;
    // The writer ends once every sender of its queue is gone.
    drop(session);
    let _ = writer.await;
    if matches!(end, End::Protocol | End::Full | End::Deleted | End::Removed) {
        let _ = tokio::time::timeout(FINAL_FLUSH, conn.closed()).await;
    }
    match end {
        End::Deadline => crate::metrics::refused(crate::metrics::Refused::AuthDeadline),
        End::Full => crate::metrics::refused(crate::metrics::Refused::Full),
        _ => {}
    }
    let (code, reason): (u32, &[u8]) = match end {
        End::Finished | End::Lost => (close::NORMAL, b"bye"),
        End::Protocol => (close::PROTOCOL_ERROR, b"protocol error"),
        End::Shutdown => (close::SHUTTING_DOWN, b"shutting down"),
        End::Deadline => (close::PROTOCOL_ERROR, b"authentication deadline"),
        End::Idle => (close::NORMAL, b"idle"),
        End::Full => (close::NORMAL, b"at capacity"),
        End::Deleted => (close::ACCOUNT_DELETED, b"account deleted"),
        End::Removed => (close::DEVICE_REMOVED, b"device removed"),
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
        let mut decoder = frame::Decoder::new(self.frame_limit());
        // Empty between frames: an idle connection holds no read buffer, only what
        // quinn holds for it.
        let mut buf = BytesMut::new();
        let deadline = tokio::time::sleep_until(self.deadline);
        tokio::pin!(deadline);
        let activity = self.activity.clone();
        let mut deleted = self.services.tombstones().watch_for(self.device.clone());
        // A certificate staged while this connection is open is pushed once it is
        // authenticated (the auth reply carries the one staged before).
        let mut next_certificate = self.settings.next_certificate.clone();
        next_certificate.mark_unchanged();
        let mut watching = true;
        loop {
            // Before authentication a group request may be larger: told by the
            // frame's first bytes, so wait for them.
            while let Some(limit) = self.frame_limit_for(&buf) {
                if decoder.max() != limit {
                    decoder = frame::Decoder::new(limit);
                }
                // Let past the smaller limit by its first bytes: it must decode as
                // what they promised (a later field can replace a oneof's body).
                let raised = limit > self.frame_limit();
                let len = standing::announced(&buf);
                match decoder.decode_request(&mut buf) {
                    Ok(Some(decoded)) if raised && !standing::fits_group_frame(&decoded) => {
                        return self.frame_too_large(len).await;
                    }
                    Ok(Some(Ok(request))) => {
                        self.handle(request).await;
                        if let Some(end) = self.ending.take() {
                            return end;
                        }
                    }
                    Ok(Some(Err(refused))) => self.refuse(refused).await,
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
                    // Counted before decoding, and consumed: the stream goes on.
                    Err(e @ FrameError::TooManyElements { request_id, .. }) => {
                        self.reply(request_id, Err(Error::BadRequest(e.to_string())))
                            .await;
                    }
                }
            }
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            if deadline.deadline() != self.deadline {
                deadline.as_mut().reset(self.deadline);
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return End::Shutdown,
                () = &mut deadline, if self.standing != Standing::Authenticated => {
                    match self.standing {
                        Standing::Pending => return End::Deadline,
                        // A long download is not idle.
                        _ if activity.busy() => {
                            self.anonymous_request();
                        }
                        _ => return End::Idle,
                    }
                }
                () = activity.notified(), if self.standing != Standing::Authenticated => {
                    if !self.anonymous_request() {
                        return End::Full;
                    }
                }
                changed = next_certificate.changed(), if watching => match changed {
                    Ok(()) => {
                        let staged = *next_certificate.borrow_and_update();
                        if let (Some(next), Standing::Authenticated) = (staged, self.standing) {
                            let push = ServerMessage::NextCertificate(next);
                            let _ = self.out.send(Out::Frame(Box::new(push.into()))).await;
                        }
                    }
                    // The relay is stopping; its shutdown ends this loop.
                    Err(_) => watching = false,
                },
                gone = deleted.gone() => return match gone {
                    Gone::Account => End::Deleted,
                    Gone::Device => End::Removed,
                },
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
        let _ = self
            .out
            .send(Out::Frame(response(request_id, result)))
            .await;
    }

    /// Answers a request the request layer refused, after the checks the relay has
    /// always made before looking at the fields (see `tern_proto::request`), so the
    /// answers stay what they were.
    async fn refuse(&mut self, refused: RequestError) {
        let id = refused.id();
        let earlier = match refused.kind() {
            Some(RequestKind::Register) => self.may_register().err(),
            Some(RequestKind::Auth) => self.unauthenticated().err(),
            Some(kind) if kind.needs_authentication() && kind != RequestKind::Ack => {
                self.authenticated().err()
            }
            _ => None,
        };
        let answer = match earlier {
            Some(e) => e.to_reply(),
            None => {
                debug!(error = %refused, "request refused");
                refused.to_reply()
            }
        };
        let message = ServerMessage::Response {
            id,
            result: Err(answer),
        };
        let _ = self.out.send(Out::Frame(Box::new(message.into()))).await;
    }

    /// Handles a request: the delivery hot path's kinds here, inline; the others in a
    /// boxed future ([`Session::handle_rest`]), so that the read loop's state, which
    /// every idle connection keeps, holds only the hot path's small futures and not
    /// the largest handler's.
    async fn handle(&mut self, request: ClientRequest) {
        let id = request.id;
        // Kinds and standings only (P9); tests read it to see which path a request took.
        debug!(kind = %request.request.kind(), standing = ?self.standing, "request");
        self.touch_daily();
        self.handle_hot(id, request.request).await;
    }

    async fn handle_hot(&mut self, id: u64, request: Request) {
        match request {
            Request::Ping => self.reply(id, Ok(Reply::Ping)).await,
            Request::Send {
                to,
                envelopes,
                device_list_version,
            } => self.send(id, to, envelopes, device_list_version).await,
            Request::SealedSend {
                to,
                delivery_token,
                envelopes,
                device_list_version,
            } => {
                if !self.take_place(id).await {
                    return;
                }
                let sent = self.sealed_send(id, to, delivery_token, envelopes, device_list_version);
                if sent.await {
                    self.anonymous_request();
                }
            }
            Request::Ack { seqs } => self.ack(id, seqs).await,
            Request::MultiSend(send) => self.multi_send(id, send).await,
            rest => Box::pin(self.handle_rest(id, rest)).await,
        }
    }

    async fn handle_rest(&mut self, id: u64, request: Request) {
        match request {
            // Never here: `handle_hot` takes them.
            hot @ (Request::Ping
            | Request::Send { .. }
            | Request::SealedSend { .. }
            | Request::Ack { .. }
            | Request::MultiSend(_)) => Box::pin(self.handle_hot(id, hot)).await,
            Request::Register {
                identity_key,
                device_key,
                device_signature,
                session_proof,
            } => {
                if self.standing != Standing::Authenticated && !self.take_place(id).await {
                    return;
                }
                let result = self
                    .register(
                        &identity_key,
                        &device_key,
                        &device_signature,
                        &session_proof,
                    )
                    .await;
                self.reply(id, result.map(Reply::Register)).await;
                self.start_delivery();
            }
            Request::AddDevice {
                account,
                device_key,
                device_signature,
            } => {
                let result = match self.authenticated() {
                    Ok(by) => {
                        let accounts = self.services.accounts();
                        (accounts.add_device(by, &account, &device_key, &device_signature)).await
                    }
                    Err(e) => Err(e),
                };
                self.reply(id, result.map(Reply::AddDevice)).await;
            }
            Request::Auth { address, signature } => {
                let result = self.authenticate(address, &signature);
                let next_certificate = *self.settings.next_certificate.borrow();
                let reply = result.map(|queued| Reply::Auth {
                    queued,
                    next_certificate,
                });
                self.reply(id, reply).await;
                self.start_delivery();
            }
            Request::BlobStatus { blob_id } => {
                if !self.take_place(id).await {
                    return;
                }
                let reply = super::media::status(&self.settings.blobs, &blob_id).await;
                self.anonymous_reply(id, reply).await
            }
            Request::TouchBlob { blob_id } => {
                if !self.take_place(id).await {
                    return;
                }
                let reply = super::media::touch(&self.settings.blobs, &blob_id).await;
                self.anonymous_reply(id, reply).await
            }
            Request::ListDevices {
                account,
                delivery_token,
            } => {
                if !self.take_place(id).await {
                    return;
                }
                let reply = self
                    .services
                    .accounts()
                    .list_devices(&account, &delivery_token)
                    .map(listing_reply);
                self.anonymous_reply(id, reply).await
            }
            request @ (Request::PublishKeyPackages { .. }
            | Request::FetchKeyPackages { .. }
            | Request::CreateGroup { .. }
            | Request::GroupCommit(_)) => self.groups_request(id, request).await,
            Request::RelayInfo => {
                let signing_key = self.services.certificates().signing_key();
                self.reply(id, Ok(Reply::RelayInfo { signing_key })).await
            }
            Request::PublishKeys(upload) => {
                let result = match self.authenticated() {
                    Ok(device) => self.services.keys().publish(device, &upload).await,
                    Err(e) => Err(e),
                };
                let reply = result.map(|n| Reply::PublishKeys {
                    one_time_prekeys: n.try_into().unwrap_or(u32::MAX),
                });
                self.reply(id, reply).await
            }
            Request::FetchKeys {
                account,
                device,
                delivery_token,
            } => self.fetch_keys(id, account, device, delivery_token).await,
            Request::SenderCertificate => {
                let cert = self
                    .authenticated()
                    .and_then(|d| self.services.certificates().issue(d));
                self.reply(id, cert.map(Reply::SenderCertificate)).await
            }
            Request::SetDeliveryToken { token_hash } => {
                let result = match self.authenticated() {
                    Ok(d) => {
                        self.services
                            .accounts()
                            .set_delivery_token(d, &token_hash)
                            .await
                    }
                    Err(e) => Err(e),
                };
                self.reply(id, result.map(|()| Reply::SetDeliveryToken))
                    .await
            }
            Request::DeleteAccount { signature } => {
                let result = self.delete_account(&signature).await;
                if result.is_ok() {
                    self.ending = Some(End::Deleted);
                }
                self.reply(id, result.map(|()| Reply::DeleteAccount)).await
            }
            Request::DiscoveryEvaluate { blinded } => self.discovery_evaluate(id, blinded).await,
            Request::DiscoveryLookup { tags } => self.discovery_lookup(id, tags).await,
            Request::SetDiscoverable(on) => self.set_discoverable(id, on).await,
            Request::DiscoveryFilter {
                since_day,
                day,
                part,
            } => self.discovery_filter(id, since_day, day, part).await,
            request @ (Request::StartVerification { .. } | Request::CheckVerification { .. }) => {
                self.verification(id, request).await
            }
            Request::OpenProvisioning { slot, reader_hash } => {
                self.open_provisioning(id, slot, reader_hash).await
            }
            Request::DepositProvisioning {
                slot,
                device,
                payload,
            } => self.deposit_provisioning(id, slot, device, payload).await,
            Request::TakeProvisioning {
                slot,
                reader_secret,
            } => self.take_provisioning(id, slot, reader_secret).await,
            Request::PublishDeviceList(list) => self.publish_device_list(id, list).await,
            Request::RemoveDevice { device, list } => self.remove_device(id, device, list).await,
            Request::SetPushTarget(target) => self.set_push_target(id, target).await,
            Request::ClearPushTarget => self.clear_push_target(id).await,
        }
    }

    /// Deletes this connection's account; returns once the deletion is durable and
    /// scrubbed. The signature covers the exporter value `Auth` used, so it is bound
    /// to this connection.
    async fn delete_account(&self, signature: &[u8; 64]) -> Result<()> {
        let device = self.authenticated()?;
        let exporter = self.exporter(Some(device.address()))?;
        let deleted = (self.settings.deletion)
            .delete_signed(device, &exporter, signature)
            .await?;
        debug!(?deleted, "account deleted");
        Ok(())
    }

    fn authenticated(&self) -> Result<&AuthenticatedDevice> {
        self.device.get().ok_or(Error::Unauthorized)
    }

    /// Registering and authenticating are for connections that are neither yet.
    fn unauthenticated(&self) -> Result<()> {
        match self.device.get() {
            Some(_) => Err(Error::BadRequest("already authenticated".into())),
            None => Ok(()),
        }
    }

    /// Whether this connection may register now; counts the attempt against the
    /// peer address prefix's rate.
    fn may_register(&self) -> Result<()> {
        self.unauthenticated()?;
        self.services.rate_limits().registration(self.prefix)
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

    async fn register(
        &mut self,
        identity_key: &[u8; 32],
        device_key: &[u8; 32],
        device_signature: &[u8; 64],
        session_proof: &[u8; 64],
    ) -> Result<DeviceAddress> {
        self.may_register()?;
        let exporter = self.exporter(None)?;
        let verified = auth::verify_registration(
            identity_key,
            device_key,
            device_signature,
            session_proof,
            &exporter,
        )?;
        let device = self.services.accounts().register(verified).await?;
        let addr = *device.address();
        let _ = self.device.set(device);
        self.authenticated_now();
        debug!("registered a new account");
        Ok(addr)
    }

    fn authenticate(&mut self, address: DeviceAddress, signature: &[u8; 64]) -> Result<u64> {
        self.unauthenticated()?;
        let exporter = self.exporter(Some(&address))?;
        // A device being removed: its row may be there until the removal ends.
        if self.services.tombstones().contains_device(&address) {
            return Err(Error::Unauthorized);
        }
        let device = self
            .services
            .accounts()
            .authenticate(address, &exporter, signature)?;
        let queued = self.services.mailboxes().usage(&device)?.messages;
        if !self.admission.promote() {
            self.ending = Some(End::Full);
            return Err(Error::Unavailable("at capacity"));
        }
        let _ = self.device.set(device);
        self.authenticated_now();
        // `Auth` moved the last-seen day on.
        self.touched_day = self.services.accounts().day();
        // Removed between the check and now: the watch saw no device then.
        if self.services.tombstones().contains_device(&address) {
            self.ending = Some(End::Removed);
        }
        Ok(queued)
    }

    /// Starts pushing once the connection has just been authenticated.
    fn start_delivery(&mut self) {
        let (Some(device), None) = (self.device.get(), &self.acks) else {
            return;
        };
        let (acks, acks_rx) = mpsc::channel(64);
        self.acks = Some(acks);
        self.delivery = Some(tokio::spawn(push::deliver(
            self.services.clone(),
            device.clone(),
            (
                self.settings.delivery_window,
                self.settings.delivery_window_bytes,
            ),
            self.settings.max_requests,
            self.out.clone(),
            acks_rx,
            self.conn.clone(),
        )));
    }

    async fn ack(&mut self, id: u64, seqs: Vec<u64>) {
        match &self.acks {
            Some(acks) => {
                let _ = acks
                    .send(Box::new(AckCmd {
                        request_id: id,
                        seqs,
                    }))
                    .await;
            }
            None => self.reply(id, Err(Error::Unauthorized)).await,
        }
    }
}

/// A device listing as `ListDevices` answers it.
fn listing_reply(listing: crate::accounts::Listing) -> Reply {
    let list = listing.list.and_then(|l| {
        // Verified when it was stored; a list that no longer parses is left out.
        tern_proto::SignedDeviceList::parse(l.list.into(), &l.signature).ok()
    });
    Reply::ListDevices {
        devices: listing.devices,
        list,
    }
}

fn response(id: u64, result: Result<Reply>) -> Frame {
    let result = result.map_err(|e| {
        crate::metrics::error(e.code());
        if e.code() == ErrorCode::Internal {
            warn!(error = %e, "request failed");
        } else {
            debug!(error = %e, "request refused");
        }
        e.to_reply()
    });
    Box::new(ServerMessage::Response { id, result }.into())
}

/// Writes queued frames, coalescing whatever is ready into one write, and the
/// answers it holds as they resolve. The answers go on resolving while a write waits
/// for the client's flow control (their commits are requested, the wake-ups after
/// them happen, their permits are freed), and are written next. Ends when every
/// producer is gone and every answer written; if the stream breaks, the answers it
/// held or still queued are finished in a task of their own ([`finish_answers`]).
async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Out>) {
    let mut buf = BytesMut::new();
    let mut later: FuturesUnordered<Answer> = FuturesUnordered::new();
    // Answers resolved while a write was under way.
    let mut ready: VecDeque<Frame> = VecDeque::new();
    let mut open = true;
    loop {
        let first = match ready.pop_front() {
            Some(f) => f,
            None => tokio::select! {
                Some(answer) = later.next(), if !later.is_empty() => match answered(answer) {
                    Some(f) => f,
                    None => continue,
                },
                m = rx.recv(), if open => match m {
                    Some(Out::Frame(f)) => f,
                    Some(Out::Later(answer)) => {
                        later.push(hold(answer));
                        continue;
                    }
                    None => {
                        open = false;
                        continue;
                    }
                },
                else => break,
            },
        };
        let queued = rx.len() + ready.len();
        // A poll here registers no waker of ours; `later` is polled again with this
        // task's own before it sleeps (the write below, or the select above).
        let next = || loop {
            if let Some(f) = ready.pop_front() {
                return Some(f);
            }
            match rx.try_recv() {
                Ok(Out::Frame(f)) => return Some(f),
                Ok(Out::Later(answer)) => later.push(hold(answer)),
                Err(_) => match later.next().now_or_never() {
                    Some(Some(answer)) => {
                        if let Some(f) = answered(answer) {
                            return Some(f);
                        }
                    }
                    _ => return None,
                },
            }
        };
        frame::encode_ready(&first, queued, next, WRITE_BATCH, &mut buf);
        let write = send.write_chunk(buf.split().freeze());
        tokio::pin!(write);
        let written = loop {
            tokio::select! {
                written = &mut write => break written,
                Some(answer) = later.next(), if !later.is_empty() => {
                    ready.extend(answered(answer));
                }
            }
        };
        if written.is_err() {
            // Answers still queued go on too: dropped with `rx`, their commits'
            // wake-ups would never happen. Closed first, so that whatever comes after
            // runs in a task of its own ([`answer_later`]).
            rx.close();
            // Until `None`, not while `try_recv` has one: a producer holding a permit
            // may still be about to send.
            while let Some(out) = rx.recv().await {
                if let Out::Later(answer) = out {
                    later.push(hold(answer));
                }
            }
            finish_answers(later);
            return;
        }
    }
    let _ = send.finish();
}

/// An answer the writer holds. A panic in one is caught, as a task of its own would
/// have it, so the connection's other answers go on.
type Answer = futures::future::CatchUnwind<AssertUnwindSafe<Later>>;

fn hold(answer: Later) -> Answer {
    AssertUnwindSafe(answer).catch_unwind()
}

/// The frame of a resolved answer; `None` (logged) if it panicked.
fn answered(answer: std::thread::Result<Frame>) -> Option<Frame> {
    match answer {
        Ok(frame) => Some(frame),
        Err(_) => {
            warn!("answering a request panicked");
            None
        }
    }
}

/// Drives answers no one will hear to their end: each one's commit, and the wake-ups
/// that follow it (other nodes, devices without a connection), still happen.
fn finish_answers(mut later: FuturesUnordered<Answer>) {
    if !later.is_empty() {
        tokio::spawn(async move { while later.next().await.is_some() {} });
    }
}

/// Hands `answer` to the writer; if the writer is gone (the stream broke), it runs to
/// its end in a task of its own ([`finish_answers`] says why). False then.
/// Boxed by the caller before the call: held unboxed across this call's await, the
/// answer's future would size the caller's state (every idle connection's).
async fn answer_later(out: &mpsc::Sender<Out>, answer: Later) -> bool {
    match out.send(Out::Later(answer)).await {
        Ok(()) => true,
        Err(mpsc::error::SendError(unsent)) => {
            if let Out::Later(answer) = unsent {
                tokio::spawn(answer);
            }
            false
        }
    }
}
