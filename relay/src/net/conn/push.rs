//! Pushing a device's messages: [`Delivering`] owns its [`DeliveryWindow`] and lives
//! in the connection's writer task, which pulls on wake-ups and applies acks. A pull
//! puts its frames straight into the writer's batch, and an ack's answer goes straight
//! among the answers the writer holds: neither is handed to another task.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use tern_proto::{close, Delivery, Reply, ServerMessage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::{response, AckCmd, Frame, Later};
use crate::cluster::Claim;
use crate::core::auth::AuthenticatedDevice;
use crate::core::delivery::DeliveryWindow;
use crate::mailboxes::{Pull, Subscription};
use crate::server::Services;
use crate::store::StoredMessage;

/// The first retry of a mailbox read that failed (a database failing over, say); each
/// further failure doubles it, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

fn delivery(m: StoredMessage) -> Frame {
    let d = Delivery {
        seq: m.seq,
        message_id: m.message_id,
        payload: m.payload,
        shared_body: m.shared_body,
        accepted_at_ms: m.accepted_at,
        expires_at_ms: m.expires_at,
    };
    Box::new(ServerMessage::Delivery(d).into())
}

/// What the writer needs to start delivering (the reader sends it once the
/// connection is authenticated).
pub(super) struct Start {
    pub(super) services: Arc<Services>,
    pub(super) device: AuthenticatedDevice,
    pub(super) window: (usize, usize),
    pub(super) max_committing: usize,
    pub(super) conn: quinn::Connection,
}

/// A device's deliveries on this connection.
///
/// Dropped with messages unacknowledged or unread, it leaves the device owing a push
/// wake-up, as if the mail had come while it was away; displaced by a newer connection
/// of the device, it owes none.
pub(super) struct Delivering {
    services: Arc<Services>,
    device: AuthenticatedDevice,
    sub: Subscription,
    /// With several nodes: displaces the device's connection on another node; withdrawn
    /// when this is dropped.
    _claim: Option<Claim>,
    window: DeliveryWindow,
    /// Ack answers waiting for their commit, capped.
    committing: Arc<Semaphore>,
    /// Set while a failed read waits for its retry: nothing else may wake this
    /// delivery for what that read missed (the commit's wake-up was spent on it).
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff: Duration,
    /// The last pull read everything stored: an ack then frees room but finds nothing
    /// new (new mail wakes `sub`), so it reads nothing; on a database that read is a
    /// round trip per ack request.
    drained: bool,
    /// Messages unacknowledged or unread: a push wake-up is owed if this ends now.
    owed: bool,
    conn: quinn::Connection,
}

/// What woke a delivery.
pub(super) enum Woken {
    /// New mail, or the retry of a failed read: pull.
    Pull,
    /// A newer connection of the device took over; this connection is closed.
    Displaced,
}

impl Delivering {
    /// Subscribes to the device's mailbox (displacing an older connection, on this node
    /// and, through its claim, on the others).
    pub(super) async fn start(start: Start) -> Box<Delivering> {
        let Start {
            services,
            device,
            window: (size, bytes),
            max_committing,
            conn,
        } = start;
        let sub = services.mailboxes().subscribe(&device);
        let claim = match services.mailboxes().cluster() {
            Some(cluster) => Some(cluster.claim(*device.address(), sub.id()).await),
            None => None,
        };
        Box::new(Delivering {
            device,
            sub,
            _claim: claim,
            window: DeliveryWindow::new(size).with_max_bytes(bytes),
            committing: Arc::new(Semaphore::new(max_committing.max(1))),
            retry: None,
            backoff: RETRY_FIRST,
            drained: false,
            owed: false,
            services,
            conn,
        })
    }

    /// Resolves when the mailbox may have new mail, a failed read's retry is due, or
    /// the delivery was displaced (its connection is closed then).
    pub(super) async fn woken(&mut self) -> Woken {
        let retry = async {
            match self.retry.as_mut() {
                Some(r) => r.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = retry => Woken::Pull,
            () = self.sub.changed() => {
                if self.sub.displaced() {
                    debug!("displaced by a newer connection of the same device");
                    self.conn.close(close::DISPLACED.into(), b"displaced");
                    Woken::Displaced
                } else {
                    Woken::Pull
                }
            }
        }
    }

    /// A place for one more ack answer waiting for its commit; `None` at the cap (the
    /// writer takes no more requests until an answer is written).
    pub(super) fn place(&self) -> Option<OwnedSemaphorePermit> {
        self.committing.clone().try_acquire_owned().ok()
    }

    /// Applies an ack: its messages leave the window, and its answer waits for the
    /// deletion's commit (pushing goes on while the commit's fsync runs). True if a
    /// pull should follow (it freed room and the mailbox may hold more).
    pub(super) fn ack(&mut self, cmd: AckCmd, place: OwnedSemaphorePermit) -> (Later, bool) {
        let result = self.services.mailboxes().ack(&self.device, &cmd.seqs);
        // A failed ack put (some of) its messages back: the window keeps them in
        // flight, so its cursor never passes a message still stored; the client
        // retries the ack or reconnects.
        if result.is_ok() {
            for seq in &cmd.seqs {
                self.window.on_acked(*seq);
            }
        }
        self.owed = self.window.in_flight() > 0 || !self.drained;
        let answer = async move {
            let result = match result {
                Ok(acked) => acked.commit().await,
                Err(e) => Err(e),
            };
            if let Ok(r) = &result {
                crate::metrics::acked(r.messages);
            }
            drop(place);
            let reply = result.map(|r| Reply::Ack {
                deleted: r.messages as u32,
            });
            response(cmd.request_id, reply)
        };
        (Box::pin(answer), !self.drained || self.retry.is_some())
    }

    /// Reads what the window has room for; the frames to push go to `frames`.
    pub(super) async fn pull(&mut self, frames: &mut Vec<Frame>) {
        let mailboxes = self.services.mailboxes();
        // Boxed: the read's future would otherwise size the writer's state, which
        // every idle connection keeps.
        let pulled = Box::pin(mailboxes.pull_for(&self.device, &self.sub, &mut self.window)).await;
        let mut pull = pulled.unwrap_or_else(|e| Pull {
            read_failed: Some(e),
            ..Pull::default()
        });
        self.drained = pull.drained;
        self.owed = self.window.in_flight() > 0 || !self.drained;
        match pull.read_failed.take() {
            None => {
                self.retry = None;
                self.backoff = RETRY_FIRST;
            }
            Some(e) => {
                // Once per streak of failures: during a database outage every
                // connected device fails here, every retry.
                if self.backoff == RETRY_FIRST {
                    warn!(error = %e, "reading a mailbox failed; retrying");
                } else {
                    debug!(error = %e, retry_in = ?self.backoff, "reading a mailbox failed again");
                }
                self.retry = Some(Box::pin(tokio::time::sleep(self.backoff)));
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            }
        }
        // What a partly failed pull found is in the window: pushed now, or never on
        // this connection.
        crate::metrics::delivered(pull.messages.len());
        frames.extend(pull.messages.into_iter().map(delivery));
        if pull.queue_empty {
            frames.push(Box::new(ServerMessage::QueueEmpty.into()));
        }
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        // Asked of the subscription, not of the writer: a newer connection may have
        // displaced it as the connection ended. Mail whose wake-up is still pending
        // here was never read.
        if self.sub.displaced() {
            return;
        }
        if self.owed || self.sub.changed().now_or_never().is_some() {
            self.services
                .mailboxes()
                .left_with_mail(self.device.address());
        }
    }
}
