//! Admission: which new connections the accept loop takes, before any handshake
//! state exists, and the pools that bound them afterwards.
//!
//! Every connection counts against its address (an IPv4 address or an IPv6 /64, as
//! configured) from its first packet until it ends, and as a handshake until its
//! handshake ends. Until it authenticates or makes its first anonymous request it
//! holds a place in the unauthenticated pool (`connections.max_unauthenticated`);
//! then it trades that place for one in the pool of `limits.max_connections`, so
//! strangers that never ask for anything cannot fill the latter. An
//! [`AdmissionGuard`] gives back whatever its connection holds when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{ConnectionsConfig, Retry};
use crate::core::prefix::AddressPrefix;

/// What the accept loop does with a new connection.
pub(crate) enum Decision {
    /// Accept it; the guard holds its places.
    Admit(AdmissionGuard),
    /// Answer with a QUIC Retry: the peer must prove its address first.
    Retry,
    /// Answer CONNECTION_REFUSED (the peer's address is validated).
    Refuse,
    /// Answer nothing: the address may be spoofed, so no packet goes to it.
    Ignore,
}

#[derive(Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
}

#[derive(Default)]
struct State {
    per_prefix: HashMap<AddressPrefix, Counts>,
    handshakes: usize,
    unauthenticated: usize,
}

/// The relay's admission state, shared by the accept loop and every connection.
pub(crate) struct Admission {
    config: ConnectionsConfig,
    state: Mutex<State>,
    authenticated: Arc<Semaphore>,
}

/// Totals, for tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Totals {
    pub(crate) connections: usize,
    pub(crate) handshakes: usize,
    pub(crate) unauthenticated: usize,
    pub(crate) addresses: usize,
}

impl Admission {
    /// Admission under `config`, with `max_connections` places for connections that
    /// authenticated or made an anonymous request.
    pub(crate) fn new(config: &ConnectionsConfig, max_connections: usize) -> Arc<Self> {
        Arc::new(Admission {
            config: config.clone(),
            state: Mutex::new(State::default()),
            authenticated: Arc::new(Semaphore::new(max_connections)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on a connection from `ip`; `validated` and `may_retry` are quinn's
    /// `Incoming::remote_address_validated` and `may_retry`.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> Decision {
        let c = &self.config;
        let prefix = AddressPrefix::of(ip, c.ipv4_prefix_bits, c.ipv6_prefix_bits);
        let mut state = self.lock();
        let retry = match c.retry {
            Retry::Always => true,
            Retry::UnderLoad => state.handshakes >= c.retry_above_handshakes,
            Retry::Never => false,
        };
        if retry && !validated && may_retry {
            return Decision::Retry;
        }
        let (connections, handshakes) = state
            .per_prefix
            .get(&prefix)
            .map_or((0, 0), |n| (n.connections, n.handshakes));
        // Refusals are counted after the lock is let go: it serialises every
        // connection attempt, and a flood is when they come fastest.
        if connections >= c.max_per_address || handshakes >= c.max_handshakes_per_address {
            drop(state);
            crate::metrics::refused(crate::metrics::Refused::PerAddress);
            return if validated {
                Decision::Refuse
            } else {
                Decision::Ignore
            };
        }
        // A full authenticated pool refuses at once: the handshake would be wasted.
        if state.unauthenticated >= c.max_unauthenticated
            || self.authenticated.available_permits() == 0
        {
            drop(state);
            crate::metrics::refused(crate::metrics::Refused::Full);
            return Decision::Refuse;
        }
        state.handshakes += 1;
        state.unauthenticated += 1;
        let n = state.per_prefix.entry(prefix).or_default();
        n.connections += 1;
        n.handshakes += 1;
        Decision::Admit(AdmissionGuard {
            admission: self.clone(),
            prefix,
            handshaking: true,
            unauthenticated: true,
            _authenticated: None,
        })
    }

    /// The totals now.
    #[cfg(test)]
    pub(crate) fn totals(&self) -> Totals {
        let state = self.lock();
        Totals {
            connections: state.per_prefix.values().map(|n| n.connections).sum(),
            handshakes: state.handshakes,
            unauthenticated: state.unauthenticated,
            addresses: state.per_prefix.len(),
        }
    }
}

/// One admitted connection's places; gives them back when dropped.
pub(crate) struct AdmissionGuard {
    admission: Arc<Admission>,
    prefix: AddressPrefix,
    handshaking: bool,
    unauthenticated: bool,
    _authenticated: Option<OwnedSemaphorePermit>,
}

impl AdmissionGuard {
    /// The peer's address prefix, as `[connections]` counts peers; rate limits count
    /// by it too.
    pub(crate) fn prefix(&self) -> AddressPrefix {
        self.prefix
    }

    /// The handshake ended (either way).
    pub(crate) fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut state = self.admission.lock();
            state.handshakes = state.handshakes.saturating_sub(1);
            if let Some(n) = state.per_prefix.get_mut(&self.prefix) {
                n.handshakes = n.handshakes.saturating_sub(1);
            }
        }
    }

    /// Trades the unauthenticated place for one among `limits.max_connections`; false
    /// if none is free. True at once if already traded.
    pub(crate) fn promote(&mut self) -> bool {
        if !self.unauthenticated {
            return true;
        }
        let Ok(permit) = self.admission.authenticated.clone().try_acquire_owned() else {
            return false;
        };
        self._authenticated = Some(permit);
        self.unauthenticated = false;
        let mut state = self.admission.lock();
        state.unauthenticated = state.unauthenticated.saturating_sub(1);
        true
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        if self.handshaking {
            state.handshakes = state.handshakes.saturating_sub(1);
        }
        if self.unauthenticated {
            state.unauthenticated = state.unauthenticated.saturating_sub(1);
        }
        if let Some(n) = state.per_prefix.get_mut(&self.prefix) {
            n.connections = n.connections.saturating_sub(1);
            if self.handshaking {
                n.handshakes = n.handshakes.saturating_sub(1);
            }
            if n.connections == 0 {
                state.per_prefix.remove(&self.prefix);
            }
        }
    }
}

#[cfg(test)]
mod tests;
