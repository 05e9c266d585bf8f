//! The relay's rate rules, one [`KeyedLimit`] each, built from `[rate_limits]`.

use std::sync::Arc;

use tern_platform::clock::Clock;
use tern_proto::{AccountId, DeviceAddress};

use super::{AddressPrefix, KeyedLimit, SenderKey};
use crate::config::{PrekeyLimit, RateLimitsConfig};
use crate::error::Result;

/// Every per-account and per-sender limit of the relay. The services call the checks;
/// the relay calls [`RateLimits::housekeep`] every sweep interval.
#[derive(Debug)]
pub struct RateLimits {
    registrations: KeyedLimit<AddressPrefix>,
    add_device: KeyedLimit<AccountId>,
    sends: KeyedLimit<AccountId>,
    sealed_per_token: KeyedLimit<AccountId>,
    sealed_per_prefix: KeyedLimit<AddressPrefix>,
    intake: KeyedLimit<(DeviceAddress, SenderKey)>,
    fetch_per_requester: KeyedLimit<SenderKey>,
    one_time_per_device: KeyedLimit<DeviceAddress>,
    exports: KeyedLimit<AccountId>,
    key_packages_per_device: KeyedLimit<DeviceAddress>,
    create_groups: KeyedLimit<AddressPrefix>,
    group_commits: KeyedLimit<DeviceAddress>,
    max_devices: usize,
    intake_above_queued: u64,
    over_prekey_limit: PrekeyLimit,
}

impl RateLimits {
    /// The limits `config` sets, on `clock`.
    pub fn new(config: &RateLimitsConfig, clock: Arc<dyn Clock>) -> Self {
        let max = config.max_keys;
        let c = &clock;
        RateLimits {
            registrations: KeyedLimit::new(config.registrations_per_prefix, max, c.clone()),
            add_device: KeyedLimit::new(config.add_device_per_account, max, c.clone()),
            sends: KeyedLimit::new(config.sends_per_account, max, c.clone()),
            sealed_per_token: KeyedLimit::new(config.sealed_sends_per_token, max, c.clone()),
            sealed_per_prefix: KeyedLimit::new(config.sealed_sends_per_prefix, max, c.clone()),
            intake: KeyedLimit::new(config.intake_per_sender_per_mailbox, max, c.clone()),
            fetch_per_requester: KeyedLimit::new(config.fetch_keys_per_requester, max, c.clone()),
            one_time_per_device: KeyedLimit::new(
                config.one_time_prekeys_per_device,
                max,
                c.clone(),
            ),
            exports: KeyedLimit::new(config.exports_per_account, max, c.clone()),
            key_packages_per_device: KeyedLimit::new(
                config.key_packages_per_device,
                max,
                c.clone(),
            ),
            create_groups: KeyedLimit::new(config.create_groups_per_prefix, max, c.clone()),
            group_commits: KeyedLimit::new(config.group_commits_per_device, max, clock),
            max_devices: config.max_devices_per_account,
            intake_above_queued: config.intake_above_queued,
            over_prekey_limit: config.over_prekey_limit,
        }
    }

    /// A registration from `prefix`.
    pub fn registration(&self, prefix: AddressPrefix) -> Result<()> {
        self.registrations.check(&prefix)
    }

    /// An `AddDevice` for `account`.
    pub fn add_device(&self, account: &AccountId) -> Result<()> {
        self.add_device.check(account)
    }

    /// Devices an account may have.
    pub fn max_devices(&self) -> usize {
        self.max_devices
    }

    /// `n` envelopes from `from` (before the mailbox is looked at): the sender
    /// account's rate, or for a sealed send the token's and the prefix's.
    pub fn send(&self, from: &SenderKey, to: &DeviceAddress, n: u32) -> Result<()> {
        match from {
            SenderKey::Account(account) => self.sends.check_n(account, n),
            SenderKey::Prefix(prefix) => {
                self.sealed_per_token.check_n(&to.account, n)?;
                self.sealed_per_prefix.check_n(prefix, n)
            }
        }
    }

    /// A multi-recipient send from `prefix`: one unit of the prefix's sealed-send
    /// rate for the whole send, whatever its number of recipients.
    pub fn multi_send(&self, prefix: &AddressPrefix) -> Result<()> {
        self.sealed_per_prefix.check(prefix)
    }

    /// One unit of `account`'s sealed-send rate (per token) for its devices in a
    /// multi-recipient send.
    pub fn multi_send_to(&self, account: &AccountId) -> Result<()> {
        self.sealed_per_token.check(account)
    }

    /// `n` envelopes from `from` into the mailbox `to`, which holds `queued` messages.
    pub fn intake(&self, from: &SenderKey, to: &DeviceAddress, queued: u64, n: u32) -> Result<()> {
        if queued < self.intake_above_queued {
            return Ok(());
        }
        self.intake.check_n(&(*to, *from), n)
    }

    /// A `FetchKeys` from `requester`: an authenticated device's account, or for a
    /// fetch with a delivery token on a connection that is not authenticated, the
    /// address prefix it came from.
    pub fn fetch_keys(&self, requester: &SenderKey) -> Result<()> {
        self.fetch_per_requester.check(requester)
    }

    /// Whether a fetch may take one of `device`'s one-time prekeys: `Ok(true)` yes,
    /// `Ok(false)` answer without one, `Err` refuse (as configured).
    pub fn take_one_time_prekey(&self, device: &DeviceAddress) -> Result<bool> {
        match (
            self.one_time_per_device.check(device),
            self.over_prekey_limit,
        ) {
            (Ok(()), _) => Ok(true),
            (Err(_), PrekeyLimit::Withhold) => Ok(false),
            (Err(e), PrekeyLimit::Refuse) => Err(e),
        }
    }

    /// Whether a fetch may take one of `device`'s one-time key packages (else it
    /// gets the device's last-resort package).
    pub fn take_key_package(&self, device: &DeviceAddress) -> bool {
        self.key_packages_per_device.check(device).is_ok()
    }

    /// A group commit's or welcome's entry into `to`, which holds `queued` messages:
    /// counted, as the intake, only while the mailbox is that full.
    pub fn group_commit_to(&self, to: &DeviceAddress, queued: u64) -> Result<()> {
        if queued < self.intake_above_queued {
            return Ok(());
        }
        self.group_commits.check(to)
    }

    /// A `CreateGroup` from `prefix`.
    pub fn create_group(&self, prefix: AddressPrefix) -> Result<()> {
        self.create_groups.check(&prefix)
    }

    /// An account export asked for by `account`.
    pub fn export(&self, account: &AccountId) -> Result<()> {
        self.exports.check(account)
    }

    /// Forgets keys whose buckets have refilled, in every limit.
    pub fn housekeep(&self) {
        self.registrations.housekeep();
        self.add_device.housekeep();
        self.sends.housekeep();
        self.sealed_per_token.housekeep();
        self.sealed_per_prefix.housekeep();
        self.intake.housekeep();
        self.fetch_per_requester.housekeep();
        self.one_time_per_device.housekeep();
        self.exports.housekeep();
        self.key_packages_per_device.housekeep();
        self.create_groups.housekeep();
    }

    /// Forgets every bucket keyed by the account or one of its devices, or naming it
    /// as a sender (account deletion). A pass over the intake and prekey tables.
    pub fn forget_account(&self, account: &AccountId) {
        let sender = SenderKey::Account(*account);
        self.add_device.forget(account);
        self.exports.forget(account);
        self.sends.forget(account);
        self.sealed_per_token.forget(account);
        self.fetch_per_requester.forget(&sender);
        self.intake
            .forget_where(|(to, from)| to.account == *account || *from == sender);
        self.one_time_per_device
            .forget_where(|d| d.account == *account);
        self.key_packages_per_device
            .forget_where(|d| d.account == *account);
    }

    /// Whether any bucket is keyed by the account or names it (for tests).
    pub fn holds_account(&self, account: &AccountId) -> bool {
        let sender = SenderKey::Account(*account);
        self.add_device.holds(|k| k == account)
            || self.exports.holds(|k| k == account)
            || self.sends.holds(|k| k == account)
            || self.sealed_per_token.holds(|k| k == account)
            || self.fetch_per_requester.holds(|k| *k == sender)
            || self
                .intake
                .holds(|(to, from)| to.account == *account || *from == sender)
            || self.one_time_per_device.holds(|d| d.account == *account)
            || self
                .key_packages_per_device
                .holds(|d| d.account == *account)
    }

    /// Keys held over every limit; for tests and metrics.
    pub fn keys(&self) -> usize {
        [
            self.registrations.len(),
            self.add_device.len(),
            self.sends.len(),
            self.sealed_per_token.len(),
            self.sealed_per_prefix.len(),
            self.intake.len(),
            self.fetch_per_requester.len(),
            self.one_time_per_device.len(),
            self.exports.len(),
            self.key_packages_per_device.len(),
            self.create_groups.len(),
        ]
        .iter()
        .sum()
    }
}
