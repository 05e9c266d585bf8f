//! `[rate_limits]`: per-account and per-sender limits. Rates are `"N/period"`: a burst
//! of `N`, refilled evenly over the period (see [`Rate`]).

use std::time::Duration;

use serde::Deserialize;

use crate::core::rate::Rate;

/// What the relay does with a `FetchKeys` past a target device's one-time prekey rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrekeyLimit {
    /// Answers the bundle without a one-time prekey (X3DH works without one), so
    /// nobody can stop others from starting sessions with the device.
    #[default]
    Withhold,
    /// Refuses the fetch with `RATE_LIMITED`.
    Refuse,
}

/// Per-account and per-sender limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Accounts registered per IPv4 address or IPv6 /64.
    pub registrations_per_prefix: Rate,
    /// Devices one account may have; `AddDevice` past it is refused (`QUOTA_EXCEEDED`).
    pub max_devices_per_account: usize,
    /// `AddDevice` requests per account.
    pub add_device_per_account: Rate,
    /// Envelopes an authenticated account sends.
    pub sends_per_account: Rate,
    /// Sealed envelopes to one account (one delivery token).
    pub sealed_sends_per_token: Rate,
    /// Sealed envelopes from one IPv4 address or IPv6 /64.
    pub sealed_sends_per_prefix: Rate,
    /// Envelopes one sender (account, or prefix when sealed) puts into one mailbox,
    /// counted while that mailbox holds at least `intake_above_queued` messages.
    pub intake_per_sender_per_mailbox: Rate,
    /// From this many queued messages on, a mailbox's intake is limited per sender:
    /// a recipient who keeps up is never slowed, a flooded one still hears from each
    /// contact.
    pub intake_above_queued: u64,
    /// `FetchKeys` requests per requester: its account when the connection is
    /// authenticated, else (a fetch with a delivery token) its IPv4 address or IPv6
    /// /64. Wrong tokens count too.
    pub fetch_keys_per_requester: Rate,
    /// One-time prekeys handed out per device.
    pub one_time_prekeys_per_device: Rate,
    /// What a fetch past `one_time_prekeys_per_device` gets.
    pub over_prekey_limit: PrekeyLimit,
    /// Account exports an account asks for (each reads its whole mailbox); past it
    /// refused with `RATE_LIMITED` and a retry time.
    pub exports_per_account: Rate,
    /// Keys each limit remembers at most (about 100 bytes each); a new key past it is
    /// refused until housekeeping (every `expiry.sweep_interval`) makes room.
    pub max_keys: usize,
}

/// The largest `max_devices_per_account` allowed: device ids run from 1 up to it,
/// which a deletion whose account record is unreadable relies on.
pub const MAX_DEVICES_BOUND: usize = 1000;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// A rate from constants; `Rate::new` refuses only zeros.
fn rate(n: u32, period: Duration) -> Rate {
    Rate::new(n.max(1), period).unwrap_or(Rate {
        burst: std::num::NonZeroU32::MIN,
        period: DAY,
    })
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            registrations_per_prefix: rate(30, HOUR),
            max_devices_per_account: 16,
            add_device_per_account: rate(5, DAY),
            sends_per_account: rate(1000, MINUTE),
            sealed_sends_per_token: rate(600, MINUTE),
            sealed_sends_per_prefix: rate(600, MINUTE),
            intake_per_sender_per_mailbox: rate(500, DAY),
            intake_above_queued: 1000,
            fetch_keys_per_requester: rate(200, HOUR),
            one_time_prekeys_per_device: rate(75, DAY),
            over_prekey_limit: PrekeyLimit::Withhold,
            exports_per_account: rate(4, DAY),
            max_keys: 1_000_000,
        }
    }
}

impl RateLimitsConfig {
    /// Checks the values; the message names the key.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_devices_per_account == 0 || self.max_devices_per_account > MAX_DEVICES_BOUND {
            return Err("rate_limits.max_devices_per_account must be from 1 to 1000".into());
        }
        if self.max_keys == 0 {
            return Err("rate_limits.max_keys must be more than zero".into());
        }
        Ok(())
    }
}
