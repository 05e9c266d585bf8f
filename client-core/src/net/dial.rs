//! Dialling a relay: its listed hosts in random order, each pinned to the one
//! fingerprint, until one completes the QUIC handshake.
//!
//! A relay that runs as several nodes lists them all in its address; any node
//! serves any device. The order is shuffled per attempt so that clients spread over
//! the nodes and a dead node costs each client at most [`HANDSHAKE_TIMEOUT`] per
//! attempt, not every time. The caller's backoff runs only once every host failed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::seq::SliceRandom;
use tern_proto::address::RelayHost;
use tern_proto::{Fingerprint, RelayAddress};

use crate::error::{Error, Result};
use crate::net::tls;

/// How long one host may take to resolve and complete the QUIC handshake before the
/// next host is tried: a handshake is a round trip or two, and this leaves room for
/// four retransmissions of a lost first packet.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to one of `relay`'s hosts, trying them in random order. Fails only once
/// every host failed: with [`Error::FingerprintMismatch`] if any host presented
/// another certificate, else [`Error::Refused`] if any was at capacity, else
/// [`Error::Connect`].
pub(super) async fn dial(
    relay: &RelayAddress,
    pins: &[Fingerprint],
    local: Option<SocketAddr>,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let hosts = order(relay);
    let mut failure: Option<Error> = None;
    for host in &hosts {
        let error = match tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_one(pins, host, local)).await
        {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => e,
            Err(_) => Error::Connect("the handshake timed out".into()),
        };
        failure = Some(match (failure, error) {
            (Some(Error::FingerprintMismatch), _) | (_, Error::FingerprintMismatch) => {
                Error::FingerprintMismatch
            }
            (Some(Error::Refused), _) | (_, Error::Refused) => Error::Refused,
            (_, Error::Connect(why)) if hosts.len() > 1 => Error::Connect(format!(
                "none of the relay's {} hosts answered; last: {why}",
                hosts.len()
            )),
            (_, other) => other,
        });
    }
    Err(failure.unwrap_or_else(|| Error::Connect("the relay address lists no host".into())))
}

/// The hosts of `relay` in the order of one attempt: shuffled afresh each time.
fn order(relay: &RelayAddress) -> Vec<RelayHost> {
    let mut hosts = relay.hosts();
    hosts.shuffle(&mut rand::thread_rng());
    hosts
}

/// One host: resolve it, then the handshake with the certificate pinned.
async fn dial_one(
    pins: &[Fingerprint],
    host: &RelayHost,
    local: Option<SocketAddr>,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let target: SocketAddr = tokio::net::lookup_host((host.host.as_str(), host.port))
        .await
        .map_err(|e| Error::Connect(format!("resolving the relay: {e}")))?
        .next()
        .ok_or_else(|| Error::Connect("the relay's host has no address".into()))?;
    let bind: SocketAddr = match local {
        Some(local) => local,
        None if target.is_ipv6() => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        None => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    };
    let (config, mismatch) = tls::client_config_pinned_to(pins).map_err(Error::Connect)?;
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Connect(e.to_string()))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(target, &host.host)
        .map_err(|e| Error::Connect(e.to_string()))?;
    match connecting.await {
        Ok(conn) => Ok((endpoint, conn)),
        Err(_) if mismatch.load(Ordering::Acquire) => Err(Error::FingerprintMismatch),
        Err(quinn::ConnectionError::ConnectionClosed(c))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Err(Error::Refused)
        }
        Err(e) => Err(Error::Connect(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_comes_first_in_some_attempt_and_none_is_dropped() {
        let relay: RelayAddress = format!("tern://{}@a:1,b:1,c:1", Fingerprint([1; 32]))
            .parse()
            .unwrap();
        let mut first = std::collections::HashSet::new();
        // Each host leads a third of the time: missing one in 300 tries is
        // (2/3)^300 < 1e-52.
        for _ in 0..300 {
            let hosts = order(&relay);
            let mut names: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
            first.insert(names[0].to_owned());
            names.sort_unstable();
            assert_eq!(names, ["a", "b", "c"]);
        }
        assert_eq!(first.len(), 3, "{first:?}");
    }
}
