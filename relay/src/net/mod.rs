//! QUIC transport: the endpoint's accept loop and the per-connection sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::server::Services;

pub(crate) mod conn;
pub(crate) mod media;
pub(crate) mod tls;

pub(crate) use conn::ConnSettings;

/// How long open connections get to finish their requests at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Transport settings shared by every connection.
pub(crate) fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The control stream, plus media transfers.
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    t
}

/// Accepts connections until `shutdown`, then gives open ones [`DRAIN_GRACE`] to
/// finish the requests they are handling.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let connection_permits = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = connection_permits.clone().try_acquire_owned() else {
                    debug!("connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                };
                next_id += 1;
                // The span names a counter, never the peer's address (P9).
                let span = tracing::debug_span!("conn", id = next_id);
                let (services, settings, shutdown) =
                    (services.clone(), settings.clone(), shutdown.clone());
                conns.spawn(
                    async move {
                        match incoming.await {
                            Ok(conn) => conn::serve(conn, services, settings, shutdown).await,
                            Err(e) => debug!(error = %e, "handshake failed"),
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let open = conns.len();
    if open > 0 {
        info!(connections = open, "draining connections");
    }
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "connections still open after the grace period; closing them"
        );
        conns.abort_all();
    }
}
