//! `[rate_limits]`: per-account and per-sender limits. Rates are `"N/period"`: a burst
//! of `N`, refilled evenly over the period (see [`Rate`]).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::rate::Rate;

/// What the relay does with a `FetchKeys` past a target device's one-time prekey rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Accounts registered per IPv4 address or IPv6 /64.
    pub registrations_per_prefix: Rate,
    /// Devices one account may have, the primary included; `AddDevice` past it is
    /// refused (`QUOTA_EXCEEDED`).
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
    /// A linked device (never device 1) that has not connected for this many days is
    /// removed by the sweeper; 0 never removes one.
    pub linked_device_idle_days: u32,
    /// Provisioning slots open at once, relay-wide (each holds at most one 64 KiB
    /// payload); an `OpenProvisioning` past it is `UNAVAILABLE`.
    pub max_provisioning_slots: usize,
    /// `OpenProvisioning` requests per IPv4 address or IPv6 /64.
    pub provisioning_per_prefix: Rate,
    /// `TakeProvisioning` and `DepositProvisioning` requests per IPv4 address or IPv6
    /// /64 (a new device polls about once a second while it waits).
    pub provisioning_takes_per_prefix: Rate,
    /// Key packages handed out per device (`FetchKeyPackages`); past it a fetch gets
    /// the device's last-resort package, so nobody drains a device's pool.
    pub key_packages_per_device: Rate,
    /// `CreateGroup` requests per IPv4 address or IPv6 /64 (group handles are
    /// created on connections that identify no one).
    pub create_groups_per_prefix: Rate,
    /// Commit and welcome entries into one device's mailbox while it holds at least
    /// `intake_above_queued` messages (a commit's sends skip the intake and sealed
    /// rates, so that a member at those rates still follows its groups; this bounds
    /// what anyone holding a delivery token can queue through groups of their own).
    pub group_commits_per_device: Rate,
    /// A group handle neither created nor committed to for this many days is
    /// deleted by the sweeper (a group's weekly update commit keeps it); 0 never
    /// deletes one.
    pub group_idle_days: u32,
    /// Group handles the relay keeps at most (each about 100 bytes); a
    /// `CreateGroup` past it is `UNAVAILABLE` with a retry time until the sweeper
    /// deletes idle ones. 0: no cap.
    pub max_groups: u64,
    /// Keys each limit remembers at most (about 100 bytes each); a new key past it is
    /// refused until housekeeping (every `expiry.sweep_interval`) makes room.
    pub max_keys: usize,
}

/// The largest `max_devices_per_account` allowed: device ids run from 1 up to it,
/// which a deletion whose account record is unreadable relies on.
pub const MAX_DEVICES_BOUND: usize = 1000;

/// The largest `linked_device_idle_days` (ten years): a day count past it is a typo.
pub(crate) const MAX_IDLE_DAYS: u32 = 3650;

/// The largest `max_provisioning_slots`: each slot may hold a 64 KiB payload, so
/// this bounds the table (or memory) at about 6.5 GB.
pub(crate) const MAX_SLOTS_BOUND: usize = 100_000;

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
            max_devices_per_account: 6,
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
            linked_device_idle_days: 45,
            max_provisioning_slots: 1000,
            provisioning_per_prefix: rate(10, HOUR),
            provisioning_takes_per_prefix: rate(1200, HOUR),
            key_packages_per_device: rate(75, DAY),
            create_groups_per_prefix: rate(30, HOUR),
            group_commits_per_device: rate(200, DAY),
            group_idle_days: 180,
            max_groups: 10_000_000,
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
        if self.linked_device_idle_days > MAX_IDLE_DAYS {
            return Err(format!(
                "rate_limits.linked_device_idle_days must be at most {MAX_IDLE_DAYS} (0 never removes a device)"
            ));
        }
        if self.max_provisioning_slots == 0 || self.max_provisioning_slots > MAX_SLOTS_BOUND {
            return Err(format!(
                "rate_limits.max_provisioning_slots must be from 1 to {MAX_SLOTS_BOUND}"
            ));
        }
        if self.group_idle_days > MAX_IDLE_DAYS {
            return Err(format!(
                "rate_limits.group_idle_days must be at most {MAX_IDLE_DAYS} (0 never deletes a group)"
            ));
        }
        if self.max_keys == 0 {
            return Err("rate_limits.max_keys must be more than zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_device_defaults_and_bounds() {
        let d = RateLimitsConfig::default();
        assert_eq!(d.max_devices_per_account, 6, "the primary and five linked");
        assert_eq!(d.linked_device_idle_days, 45);
        assert_eq!(d.max_provisioning_slots, 1000);
        assert_eq!(d.provisioning_per_prefix, rate(10, HOUR));
        assert_eq!(d.provisioning_takes_per_prefix, rate(1200, HOUR));
        assert_eq!(d.validate(), Ok(()));
        let with = |f: &dyn Fn(&mut RateLimitsConfig)| {
            let mut c = RateLimitsConfig::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(
            with(&|c| c.linked_device_idle_days = 0),
            Ok(()),
            "0 = never"
        );
        assert_eq!(with(&|c| c.linked_device_idle_days = MAX_IDLE_DAYS), Ok(()));
        let e = with(&|c| c.linked_device_idle_days = MAX_IDLE_DAYS + 1);
        assert!(e.is_err_and(|m| m.contains("linked_device_idle_days")));
        for bad in [0, MAX_SLOTS_BOUND + 1] {
            let e = with(&|c| c.max_provisioning_slots = bad);
            assert!(
                e.is_err_and(|m| m.contains("max_provisioning_slots")),
                "{bad}"
            );
        }
    }

    #[test]
    fn group_keys_default_parse_and_are_bounded() {
        let d = RateLimitsConfig::default();
        assert_eq!(d.key_packages_per_device, rate(75, DAY));
        assert_eq!(d.create_groups_per_prefix, rate(30, HOUR));
        assert_eq!(d.group_idle_days, 180);
        assert_eq!(d.max_groups, 10_000_000);
        let c: RateLimitsConfig = toml::from_str(
            "key_packages_per_device = \"10/1h\"\ncreate_groups_per_prefix = \"5/1m\"\n\
             group_idle_days = 0\nmax_groups = 0\n",
        )
        .expect("parse");
        assert_eq!(c.max_groups, 0, "no cap");
        assert_eq!(c.key_packages_per_device, rate(10, HOUR));
        assert_eq!(c.create_groups_per_prefix, rate(5, MINUTE));
        assert_eq!(c.validate(), Ok(()), "0 = never");
        let too_long = RateLimitsConfig {
            group_idle_days: MAX_IDLE_DAYS + 1,
            ..RateLimitsConfig::default()
        };
        assert!(too_long
            .validate()
            .is_err_and(|m| m.contains("group_idle_days")));
    }

    #[test]
    fn linked_device_keys_parse_from_toml() {
        let c: RateLimitsConfig = toml::from_str(
            "linked_device_idle_days = 30\nmax_provisioning_slots = 50\n\
             provisioning_per_prefix = \"3/1h\"\nprovisioning_takes_per_prefix = \"60/1m\"\n",
        )
        .expect("parse");
        assert_eq!(c.linked_device_idle_days, 30);
        assert_eq!(c.max_provisioning_slots, 50);
        assert_eq!(c.provisioning_per_prefix, rate(3, HOUR));
        assert_eq!(c.provisioning_takes_per_prefix, rate(60, MINUTE));
        assert!(toml::from_str::<RateLimitsConfig>("provisioning_per_prefix = \"0/1h\"").is_err());
    }
}
