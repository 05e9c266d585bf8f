//! Pushing a device's messages: the delivery task that owns its [`DeliveryWindow`],
//! pushes on wake-ups, and applies acks, answering each from a task of its own once
//! the deletion's group commit is done.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use tern_proto::{close, Delivery, Reply, ServerMessage};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

use super::{answer_later, response, Ack, Frame, Out};
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

/// The end of a delivery loop: a connection that goes (closed, or timed out after
/// the phone went silent) with messages unacknowledged or unread leaves the device
/// owing a push wake-up, as if the mail had come while it was away. Displaced by a
/// newer connection of the device, it owes none.
struct Leaving<'a> {
    services: &'a Services,
    sub: &'a Subscription,
    device: tern_proto::DeviceAddress,
    owed: bool,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        // Asked of the subscription, not of this loop: a newer connection may have
        // displaced it as the loop ended on another branch.
        if self.owed && !self.sub.displaced() {
            self.services.mailboxes().left_with_mail(&self.device);
        }
    }
}

/// Pushes the device's messages as room allows and applies its acks.
pub(super) async fn deliver(
    services: Arc<Services>,
    device: AuthenticatedDevice,
    (window_size, window_bytes): (usize, usize),
    max_committing: usize,
    out: mpsc::Sender<Out>,
    mut acks: mpsc::Receiver<Ack>,
    conn: quinn::Connection,
) {
    let mailboxes = services.mailboxes();
    let sub = mailboxes.subscribe(&device);
    // With several nodes: displaces the device's connection on another node; the
    // claim is withdrawn when this loop ends.
    let _claim = match mailboxes.cluster() {
        // Boxed: a database call's future would otherwise size this loop's state,
        // which every idle connection keeps.
        Some(cluster) => Some(Box::pin(cluster.claim(*device.address(), sub.id())).await),
        None => None,
    };
    let mut left = Leaving {
        services: &services,
        sub: &sub,
        device: *device.address(),
        owed: false,
    };
    let mut window = DeliveryWindow::new(window_size).with_max_bytes(window_bytes);
    let committing = Arc::new(Semaphore::new(max_committing));
    // Set while a failed read waits for its retry: nothing else may wake this loop
    // for what that read missed (the commit's wake-up was spent on it).
    let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut backoff = RETRY_FIRST;
    // The last pull read everything stored: an ack then frees room but finds nothing
    // new (new mail wakes `sub`), so it reads nothing; on a database that read is a
    // round trip per ack request.
    let mut drained = false;
    loop {
        tokio::select! {
            _ = async {
                match retry.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = sub.changed() => {
                if sub.displaced() {
                    debug!("displaced by a newer connection of the same device");
                    conn.close(close::DISPLACED.into(), b"displaced");
                    return;
                }
            }
            cmd = acks.recv() => {
                let Some(cmd) = cmd else {
                    // Mail whose wake-up is still pending here was never read.
                    left.owed |= sub.changed().now_or_never().is_some();
                    return;
                };
                let result = mailboxes.ack(&device, &cmd.seqs);
                // A failed ack put (some of) its messages back: the window keeps them
                // in flight, so its cursor never passes a message still stored; the
                // client retries the ack or reconnects.
                if result.is_ok() {
                    for seq in &cmd.seqs {
                        window.on_acked(*seq);
                    }
                }
                left.owed = window.in_flight() > 0 || !drained;
                // Answered only once the deletion is durable, by the writer: pushing
                // goes on while the commit's fsync runs. Past the cap of commits in
                // flight this loop waits, as the reader does for sends.
                let Ok(permit) = committing.clone().acquire_owned().await else {
                    return;
                };
                let answer = async move {
                    let result = match result {
                        Ok(acked) => acked.commit().await,
                        Err(e) => Err(e),
                    };
                    if let Ok(r) = &result {
                        crate::metrics::acked(r.messages);
                    }
                    drop(permit);
                    let reply = result.map(|r| Reply::Ack { deleted: r.messages as u32 });
                    response(cmd.request_id, reply)
                };
                if !answer_later(&out, Box::pin(answer)).await {
                    return;
                }
                if drained && retry.is_none() {
                    continue;
                }
            }
        }
        // Boxed: the read's future would otherwise size this loop's state, which
        // every idle connection keeps.
        let mut pull = match Box::pin(mailboxes.pull_for(&device, &sub, &mut window)).await {
            Ok(p) => p,
            Err(e) => Pull {
                read_failed: Some(e),
                ..Pull::default()
            },
        };
        drained = pull.drained;
        left.owed = window.in_flight() > 0 || !drained;
        match pull.read_failed.take() {
            None => {
                retry = None;
                backoff = RETRY_FIRST;
            }
            Some(e) => {
                // Once per streak of failures: during a database outage every
                // connected device fails here, every retry.
                if backoff == RETRY_FIRST {
                    warn!(error = %e, "reading a mailbox failed; retrying");
                } else {
                    debug!(error = %e, retry_in = ?backoff, "reading a mailbox failed again");
                }
                retry = Some(Box::pin(tokio::time::sleep(backoff)));
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
        // What a partly failed pull found is in the window: pushed now, or never on
        // this connection.
        let pushed = pull.messages.len();
        for m in pull.messages {
            if out.send(Out::Frame(delivery(m))).await.is_err() {
                return;
            }
        }
        crate::metrics::delivered(pushed);
        if pull.queue_empty {
            let empty = ServerMessage::QueueEmpty.into();
            if out.send(Out::Frame(Box::new(empty))).await.is_err() {
                return;
            }
        }
    }
}
