//! The relay's rate rules, one [`KeyedLimit`] each, built from `[rate_limits]`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tern_platform::clock::Clock;
use tern_proto::{AccountId, DeviceAddress};

use super::{AddressPrefix, KeyedLimit, SenderKey};
use crate::config::{PrekeyLimit, RateLimitsConfig};
use crate::error::Result;

/// The `[rate_limits]` keys [`RateLimits::reload`] puts in force without a restart.
pub const RELOADABLE: &[&str] = &[
    "registrations_per_prefix",
    "max_devices_per_account",
    "add_device_per_account",
    "sends_per_account",
    "sealed_sends_per_token",
    "sealed_sends_per_prefix",
    "intake_per_sender_per_mailbox",
    "intake_above_queued",
    "fetch_keys_per_requester",
    "one_time_prekeys_per_device",
    "over_prekey_limit",
    "exports_per_account",
    "key_packages_per_device",
    "create_groups_per_prefix",
    "group_commits_per_device",
];

/// `checked`, with a refusal counted under the limit's `[rate_limits]` key.
fn counted(checked: Result<()>, kind: &'static str) -> Result<()> {
    if checked.is_err() {
        crate::metrics::rate_limited(kind);
    }
    checked
}

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
    max_devices: AtomicUsize,
    intake_above_queued: AtomicU64,
    /// `over_prekey_limit = "refuse"`.
    refuse_over_prekeys: AtomicBool,
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
            max_devices: AtomicUsize::new(config.max_devices_per_account),
            intake_above_queued: AtomicU64::new(config.intake_above_queued),
            refuse_over_prekeys: AtomicBool::new(config.over_prekey_limit == PrekeyLimit::Refuse),
        }
    }

    /// Puts `config`'s values in force: the keys [`RELOADABLE`] names (`tern-relay
    /// admin reload`). A limit whose rate changed starts every bucket afresh.
    pub fn reload(&self, config: &RateLimitsConfig) {
        self.registrations.set_rate(config.registrations_per_prefix);
        self.add_device.set_rate(config.add_device_per_account);
        self.sends.set_rate(config.sends_per_account);
        self.sealed_per_token
            .set_rate(config.sealed_sends_per_token);
        self.sealed_per_prefix
            .set_rate(config.sealed_sends_per_prefix);
        self.intake.set_rate(config.intake_per_sender_per_mailbox);
        self.fetch_per_requester
            .set_rate(config.fetch_keys_per_requester);
        self.one_time_per_device
            .set_rate(config.one_time_prekeys_per_device);
        self.exports.set_rate(config.exports_per_account);
        self.key_packages_per_device
            .set_rate(config.key_packages_per_device);
        self.create_groups.set_rate(config.create_groups_per_prefix);
        self.group_commits.set_rate(config.group_commits_per_device);
        let relaxed = Ordering::Relaxed;
        self.max_devices
            .store(config.max_devices_per_account, relaxed);
        self.intake_above_queued
            .store(config.intake_above_queued, relaxed);
        let refuse = config.over_prekey_limit == PrekeyLimit::Refuse;
        self.refuse_over_prekeys.store(refuse, relaxed);
    }

    /// A registration from `prefix`.
    pub fn registration(&self, prefix: AddressPrefix) -> Result<()> {
        counted(
            self.registrations.check(&prefix),
            "registrations_per_prefix",
        )
    }

    /// An `AddDevice` for `account`.
    pub fn add_device(&self, account: &AccountId) -> Result<()> {
        counted(self.add_device.check(account), "add_device_per_account")
    }

    /// Devices an account may have.
    pub fn max_devices(&self) -> usize {
        self.max_devices.load(Ordering::Relaxed)
    }

    /// `n` envelopes from `from` (before the mailbox is looked at): the sender
    /// account's rate, or for a sealed send the token's and the prefix's.
    pub fn send(&self, from: &SenderKey, to: &DeviceAddress, n: u32) -> Result<()> {
        match from {
            SenderKey::Account(account) => {
                counted(self.sends.check_n(account, n), "sends_per_account")
            }
            SenderKey::Prefix(prefix) => {
                let token = self.sealed_per_token.check_n(&to.account, n);
                counted(token, "sealed_sends_per_token")?;
                let prefix = self.sealed_per_prefix.check_n(prefix, n);
                counted(prefix, "sealed_sends_per_prefix")
            }
        }
    }

    /// A multi-recipient send from `prefix`: one unit of the prefix's sealed-send
    /// rate for the whole send, whatever its number of recipients.
    pub fn multi_send(&self, prefix: &AddressPrefix) -> Result<()> {
        counted(
            self.sealed_per_prefix.check(prefix),
            "sealed_sends_per_prefix",
        )
    }

    /// One unit of `account`'s sealed-send rate (per token) for its devices in a
    /// multi-recipient send.
    pub fn multi_send_to(&self, account: &AccountId) -> Result<()> {
        counted(
            self.sealed_per_token.check(account),
            "sealed_sends_per_token",
        )
    }

    /// `n` envelopes from `from` into the mailbox `to`, which holds `queued` messages.
    pub fn intake(&self, from: &SenderKey, to: &DeviceAddress, queued: u64, n: u32) -> Result<()> {
        if queued < self.intake_above_queued.load(Ordering::Relaxed) {
            return Ok(());
        }
        let checked = self.intake.check_n(&(*to, *from), n);
        counted(checked, "intake_per_sender_per_mailbox")
    }

    /// A `FetchKeys` from `requester`: an authenticated device's account, or for a
    /// fetch with a delivery token on a connection that is not authenticated, the
    /// address prefix it came from.
    pub fn fetch_keys(&self, requester: &SenderKey) -> Result<()> {
        let checked = self.fetch_per_requester.check(requester);
        counted(checked, "fetch_keys_per_requester")
    }

    /// Whether a fetch may take one of `device`'s one-time prekeys: `Ok(true)` yes,
    /// `Ok(false)` answer without one, `Err` refuse (as configured).
    pub fn take_one_time_prekey(&self, device: &DeviceAddress) -> Result<bool> {
        let refuse = self.refuse_over_prekeys.load(Ordering::Relaxed);
        let checked = self.one_time_per_device.check(device);
        match (counted(checked, "one_time_prekeys_per_device"), refuse) {
            (Ok(()), _) => Ok(true),
            (Err(_), false) => Ok(false),
            (Err(e), true) => Err(e),
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
        if queued < self.intake_above_queued.load(Ordering::Relaxed) {
            return Ok(());
        }
        counted(self.group_commits.check(to), "group_commits_per_device")
    }

    /// A `CreateGroup` from `prefix`.
    pub fn create_group(&self, prefix: AddressPrefix) -> Result<()> {
        counted(
            self.create_groups.check(&prefix),
            "create_groups_per_prefix",
        )
    }

    /// An account export asked for by `account`.
    pub fn export(&self, account: &AccountId) -> Result<()> {
        counted(self.exports.check(account), "exports_per_account")
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
