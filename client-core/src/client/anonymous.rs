//! The connection that identifies no one, for sealed sends, device lists and media
//! downloads and forwards.
//!
//! It is opened when first needed and again whenever the relay has closed it (a relay
//! closes anonymous connections that stay idle), and it lives apart from the
//! authenticated connection: never opened or closed because that one was, so the relay
//! cannot pair the two by their timing, and an idle anonymous connection closed by the
//! relay costs no reconnect of the authenticated one.

use std::sync::Arc;

use tern_proto::RelayAddress;
use tokio::sync::Mutex;

use crate::error::Result;
use crate::net::{Inbox, RelayConnection};

/// A lazily (re)opened anonymous connection to one relay; see the module docs.
pub(crate) struct AnonymousLink {
    relay: RelayAddress,
    /// The open connection, with its inbox (which stays empty: nothing is delivered
    /// to a connection that never authenticates).
    current: Mutex<Option<(Arc<RelayConnection>, Inbox)>>,
}

impl AnonymousLink {
    pub(crate) fn new(relay: RelayAddress) -> Self {
        AnonymousLink {
            relay,
            current: Mutex::new(None),
        }
    }

    /// The open connection, or a new one if there is none or the relay closed it.
    pub(crate) async fn get(&self) -> Result<Arc<RelayConnection>> {
        let mut current = self.current.lock().await;
        if let Some((conn, _)) = current.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let (conn, inbox) = RelayConnection::connect(&self.relay).await?;
        let conn = Arc::new(conn);
        *current = Some((conn.clone(), inbox));
        Ok(conn)
    }

    /// Closes the open connection, if any (the client is stopping).
    pub(crate) async fn close_now(&self) {
        if let Some((conn, _)) = self.current.lock().await.take() {
            conn.close_now();
        }
    }
}
