//! The connection that identifies no one, for sealed sends, device lists and media
//! downloads and forwards.
//!
//! It is opened when first needed and again whenever the relay has closed it (a relay
//! closes anonymous connections that stay idle), and it lives apart from the
//! authenticated connection: never opened or closed because that one was, so the relay
//! cannot pair the two by their timing, and an idle anonymous connection closed by the
//! relay costs no reconnect of the authenticated one.
//!
//! A connection that is lost rather than closed (reset by a restarted relay, or timed
//! out) is reported through [`AnonymousLink::lost`]: the worker then pings its
//! authenticated connection, which a restarted relay has forgotten too, so that one is
//! found dead in a round trip rather than at its next keep-alive.

use std::future::Future;
use std::sync::Arc;

use tern_proto::RelayAddress;
use tokio::sync::{Mutex, Notify};

use crate::error::{Error, Result};
use crate::net::tls::Pins;
use crate::net::{Inbox, RelayConnection};

/// A lazily (re)opened anonymous connection to one relay; see the module docs.
pub(crate) struct AnonymousLink {
    relay: RelayAddress,
    /// The relay's certificate pins, shared with the worker (which keeps them).
    pins: Arc<Pins>,
    current: Mutex<Current>,
    /// Signalled when an open connection is lost (not closed).
    lost: Arc<Notify>,
}

#[derive(Default)]
struct Current {
    /// The open connection, with its inbox (which stays empty: nothing is delivered
    /// to a connection that never authenticates).
    open: Option<(Arc<RelayConnection>, Inbox)>,
    /// The client stopped: no connection is opened again.
    stopped: bool,
}

impl AnonymousLink {
    pub(crate) fn new(relay: RelayAddress, pins: Arc<Pins>) -> Self {
        AnonymousLink {
            relay,
            pins,
            current: Mutex::new(Current::default()),
            lost: Arc::new(Notify::new()),
        }
    }

    /// The open connection, or a new one if there is none or the relay closed it.
    pub(crate) async fn get(&self) -> Result<Arc<RelayConnection>> {
        let mut current = self.current.lock().await;
        if current.stopped {
            return Err(Error::Closed("the client is stopping".into()));
        }
        if let Some((conn, _)) = current.open.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let (conn, inbox) = RelayConnection::connect_pinned(&self.relay, &self.pins).await?;
        let (ended, lost) = (conn.lost(), self.lost.clone());
        // Ends with the connection; the relay's idle close is no loss.
        tokio::spawn(async move {
            if ended.await {
                lost.notify_one();
            }
        });
        let conn = Arc::new(conn);
        current.open = Some((conn.clone(), inbox));
        Ok(conn)
    }

    /// Runs `op` on the connection, and once more on a new one if the relay closed
    /// it meanwhile: the relay closes an idle anonymous connection whenever its time
    /// is up, which must not fail the request (nor, through it, the authenticated
    /// connection). A request retried this way may have reached the relay once
    /// already; recipients drop duplicates by message id.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<RelayConnection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        match op(self.get().await?).await {
            Err(Error::Closed(_)) => op(self.get().await?).await,
            other => other,
        }
    }

    /// Resolves once a connection of the link has been lost (reset or timed out)
    /// since the last call; one loss wakes one waiter.
    pub(crate) async fn lost(&self) {
        self.lost.notified().await
    }

    /// Closes the open connection, if any, for good (the client is stopping).
    pub(crate) async fn close_now(&self) {
        let mut current = self.current.lock().await;
        current.stopped = true;
        if let Some((conn, _)) = current.open.take() {
            conn.close_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_link_opens_nothing() {
        let relay: RelayAddress = format!("tern://{}@127.0.0.1:9", "A".repeat(43))
            .parse()
            .expect("address");
        let pins = Arc::new(Pins::new(relay.fingerprint, None));
        let link = AnonymousLink::new(relay, pins);
        link.close_now().await;
        // Refused at once: no connection is attempted to the (absent) relay.
        assert!(matches!(link.get().await, Err(Error::Closed(_))));
        let ran = link.run(|_| async { Ok(()) }).await;
        assert!(matches!(ran, Err(Error::Closed(_))));
    }
}
