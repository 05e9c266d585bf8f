//! QUIC transport: the endpoint's accept loop and the per-connection sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::server::Services;

pub(crate) mod admission;
pub(crate) mod conn;
mod export;
pub(crate) mod media;
pub(crate) mod rotation;
pub(crate) mod tls;

pub(crate) use admission::Admission;
pub(crate) use conn::ConnSettings;

/// How long open connections get to finish their requests at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Transport settings shared by every connection. `receive_window` bounds what a
/// peer may have in flight before it authenticates; authentication raises it.
pub(crate) fn transport_config(receive_window: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.receive_window(receive_window.into());
    // The control stream, plus media transfers.
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(60_000).into()));
    t
}

/// Accepts connections until `shutdown`, then gives open ones [`DRAIN_GRACE`] to
/// finish the requests they are handling. Each new connection is decided on by
/// [`Admission`] before quinn keeps any handshake state for it.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    services: Arc<Services>,
    settings: Arc<ConnSettings>,
    admission: Arc<Admission>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ip = incoming.remote_address().ip();
                let validated = incoming.remote_address_validated();
                let mut guard = match admission.admit(ip, validated, incoming.may_retry()) {
                    admission::Decision::Admit(guard) => guard,
                    admission::Decision::Retry => {
                        debug!("asked for address validation");
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                        continue;
                    }
                    admission::Decision::Refuse => {
                        debug!("connection refused");
                        incoming.refuse();
                        continue;
                    }
                    admission::Decision::Ignore => {
                        debug!("connection ignored");
                        incoming.ignore();
                        continue;
                    }
                };
                // The deadline to authenticate counts from the first packet.
                let deadline = tokio::time::Instant::now() + settings.auth_deadline;
                next_id += 1;
                // The span names a counter, never the peer's address (P9).
                let span = tracing::debug_span!("conn", id = next_id);
                let (services, settings, shutdown) =
                    (services.clone(), settings.clone(), shutdown.clone());
                conns.spawn(
                    async move {
                        let handshake = match incoming.accept() {
                            Ok(connecting) => tokio::time::timeout_at(deadline, connecting).await,
                            Err(e) => Ok(Err(e)),
                        };
                        guard.handshake_done();
                        match handshake {
                            Ok(Ok(conn)) => {
                                let session = conn::Admitted { guard, deadline };
                                conn::serve(conn, services, settings, session, shutdown).await
                            }
                            Ok(Err(e)) => debug!(error = %e, "handshake failed"),
                            Err(_) => debug!("handshake past the authentication deadline"),
                        }
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
