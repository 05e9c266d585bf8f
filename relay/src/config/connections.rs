//! `[connections]`: who may open a connection, and what a connection may do before it
//! authenticates. The semantics are in `net/admission.rs` and ARCHITECTURE.md
//! ("Transport").

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::LimitsConfig;
use crate::error::{Error, Result};

/// When the relay asks a new peer to prove its address with a QUIC Retry (one round
/// trip, no state kept on the relay until the peer answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Retry {
    /// Every connection from an address not yet validated.
    Always,
    /// Only while at least `retry_above_handshakes` handshakes are in progress.
    #[default]
    UnderLoad,
    /// Never.
    Never,
}

/// Admission of connections and their limits before authentication.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// Connections neither authenticated nor anonymous yet, relay-wide; a pool of
    /// their own, apart from `limits.max_connections`.
    pub max_unauthenticated: usize,
    /// Open connections (handshakes included) from one address.
    pub max_per_address: usize,
    /// Handshakes in progress from one address.
    pub max_handshakes_per_address: usize,
    /// Leading bits of an IPv4 address that name one address (32: each address).
    pub ipv4_prefix_bits: u8,
    /// Leading bits of an IPv6 address that name one address (64: each /64).
    pub ipv6_prefix_bits: u8,
    /// When to validate a new peer's address with a QUIC Retry.
    pub retry: Retry,
    /// Handshakes in progress, relay-wide, from which `retry = "under_load"` asks.
    pub retry_above_handshakes: usize,
    /// Time from a connection's first packet to its authentication or first
    /// anonymous request; past it the connection is closed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub auth_deadline: Duration,
    /// An anonymous connection is closed after this long without an anonymous request.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub anonymous_idle: Duration,
    /// Largest control-stream frame before authentication (at most
    /// `limits.max_frame_bytes` applies).
    pub unauthenticated_frame_bytes: usize,
    /// Connection flow-control window (bytes the peer may have in flight) before
    /// authentication.
    pub unauthenticated_receive_window: u32,
    /// The connection flow-control window once authenticated.
    pub authenticated_receive_window: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_unauthenticated: 2000,
            max_per_address: 32,
            max_handshakes_per_address: 8,
            ipv4_prefix_bits: 32,
            ipv6_prefix_bits: 64,
            retry: Retry::UnderLoad,
            retry_above_handshakes: 64,
            auth_deadline: Duration::from_secs(10),
            anonymous_idle: Duration::from_secs(300),
            unauthenticated_frame_bytes: 264 * 1024,
            unauthenticated_receive_window: 512 * 1024,
            authenticated_receive_window: 16 << 20,
        }
    }
}

impl ConnectionsConfig {
    /// Checks the section against itself and the limits.
    pub(super) fn validate(&self, limits: &LimitsConfig) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("connections.{m}")));
        if self.max_unauthenticated == 0
            || self.max_per_address == 0
            || self.max_handshakes_per_address == 0
        {
            return bad("max_unauthenticated, max_per_address and max_handshakes_per_address must be more than zero");
        }
        if self.ipv4_prefix_bits == 0
            || self.ipv4_prefix_bits > 32
            || self.ipv6_prefix_bits == 0
            || self.ipv6_prefix_bits > 128
        {
            return bad("ipv4_prefix_bits must be from 1 to 32, ipv6_prefix_bits from 1 to 128");
        }
        if self.auth_deadline.is_zero() || self.anonymous_idle.is_zero() {
            return bad("auth_deadline and anonymous_idle must be more than zero");
        }
        // A sealed send of one envelope of the largest size must fit before
        // authentication (the limit in force is never above limits.max_frame_bytes).
        if self.unauthenticated_frame_bytes < limits.max_envelope_bytes + 8 * 1024 {
            return bad(
                "unauthenticated_frame_bytes must be at least limits.max_envelope_bytes + 8 KiB",
            );
        }
        if self.unauthenticated_receive_window < 64 * 1024
            || self.authenticated_receive_window < self.unauthenticated_receive_window
        {
            return bad("unauthenticated_receive_window must be at least 64 KiB and authenticated_receive_window at least as large");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Retry};

    #[test]
    fn parses_and_checks_the_section() {
        let c = Config::from_toml(
            "[connections]\nretry = \"always\"\nauth_deadline = \"1s\"\nmax_per_address = 3\n",
        )
        .expect("parses");
        assert_eq!(c.connections.retry, Retry::Always);
        assert_eq!(c.connections.auth_deadline.as_secs(), 1);
        assert_eq!(c.connections.max_per_address, 3);
        assert_eq!(c.connections.max_handshakes_per_address, 8, "default kept");
        let small =
            Config::from_toml("[limits]\nmax_envelope_bytes = 1024\nmax_frame_bytes = 65536\n");
        assert!(small.is_ok(), "a smaller frame limit needs no change here");
        for bad in [
            "max_per_address = 0",
            "ipv6_prefix_bits = 129",
            "ipv4_prefix_bits = 0",
            "auth_deadline = \"0s\"",
            "unauthenticated_frame_bytes = 1000",
            "unauthenticated_receive_window = 1000",
            "retry = \"sometimes\"",
        ] {
            assert!(
                Config::from_toml(&format!("[connections]\n{bad}\n")).is_err(),
                "{bad} must be refused"
            );
        }
    }
}
