//! `tern-relay admin reload`: which configuration changes a running relay takes
//! without a restart. Only the rates and counts of `[rate_limits]` that
//! [`RateLimits`](crate::core::rate::RateLimits) holds ([`RELOADABLE`]); a file that
//! changes anything else is refused whole, naming what changed, so a reload never
//! half-applies a file.

use crate::config::{Config, RateLimitsConfig};
use crate::core::rate::RELOADABLE;

/// What a reload of `new` over `running` does.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Puts these `[rate_limits]` keys' new values in force (none: nothing changed).
    Apply(Vec<&'static str>),
    /// Refused: these keys (or sections) changed, and need a restart.
    Restart(Vec<String>),
}

/// `running`'s rate limits with `new`'s reloadable keys.
fn merged(running: &RateLimitsConfig, new: &RateLimitsConfig) -> RateLimitsConfig {
    RateLimitsConfig {
        registrations_per_prefix: new.registrations_per_prefix,
        max_devices_per_account: new.max_devices_per_account,
        add_device_per_account: new.add_device_per_account,
        sends_per_account: new.sends_per_account,
        sealed_sends_per_token: new.sealed_sends_per_token,
        sealed_sends_per_prefix: new.sealed_sends_per_prefix,
        intake_per_sender_per_mailbox: new.intake_per_sender_per_mailbox,
        intake_above_queued: new.intake_above_queued,
        fetch_keys_per_requester: new.fetch_keys_per_requester,
        one_time_prekeys_per_device: new.one_time_prekeys_per_device,
        over_prekey_limit: new.over_prekey_limit,
        exports_per_account: new.exports_per_account,
        key_packages_per_device: new.key_packages_per_device,
        create_groups_per_prefix: new.create_groups_per_prefix,
        group_commits_per_device: new.group_commits_per_device,
        ..running.clone()
    }
}

/// Pushes `prefix.field` for each listed field that differs.
macro_rules! changed {
    ($out:ident, $a:expr, $b:expr, $prefix:literal, [$($f:ident),* $(,)?]) => {
        $( if $a.$f != $b.$f { $out.push(concat!($prefix, stringify!($f)).to_owned()); } )*
    };
}

/// Decides what reloading `new` over `running` does.
pub(crate) fn plan(running: &Config, new: &Config) -> Plan {
    let mut kept = running.clone();
    kept.rate_limits = merged(&running.rate_limits, &new.rate_limits);
    if kept != *new {
        let mut keys = Vec::new();
        let (a, b) = (&running.rate_limits, &new.rate_limits);
        changed!(
            keys,
            a,
            b,
            "rate_limits.",
            [
                linked_device_idle_days,
                max_provisioning_slots,
                provisioning_per_prefix,
                provisioning_takes_per_prefix,
                group_idle_days,
                max_groups,
                max_keys,
            ]
        );
        let (a, b) = (&running.limits, &new.limits);
        changed!(
            keys,
            a,
            b,
            "limits.",
            [
                max_envelope_bytes,
                max_batch,
                max_queued_messages,
                max_queued_bytes,
                max_frame_bytes,
                max_connections,
                max_requests_per_connection,
                delivery_window,
                delivery_window_bytes,
                registrations_per_address_per_minute,
            ]
        );
        changed!(
            keys,
            running,
            new,
            "",
            [
                data_dir,
                listen,
                advertise_host,
                durability,
                tls,
                expiry,
                storage,
                media,
                objects,
                connections,
                budget,
                discovery,
                verification,
                postgres,
                admin,
            ]
        );
        if keys.is_empty() {
            keys.push("a key this relay cannot reload".to_owned());
        }
        return Plan::Restart(keys);
    }
    let mut keys = Vec::new();
    let (a, b) = (&running.rate_limits, &new.rate_limits);
    let mut all = Vec::new();
    changed!(
        all,
        a,
        b,
        "",
        [
            registrations_per_prefix,
            max_devices_per_account,
            add_device_per_account,
            sends_per_account,
            sealed_sends_per_token,
            sealed_sends_per_prefix,
            intake_per_sender_per_mailbox,
            intake_above_queued,
            fetch_keys_per_requester,
            one_time_prekeys_per_device,
            over_prekey_limit,
            exports_per_account,
            key_packages_per_device,
            create_groups_per_prefix,
            group_commits_per_device,
        ]
    );
    for key in all {
        if let Some(k) = RELOADABLE.iter().find(|k| **k == key) {
            keys.push(*k);
        }
    }
    Plan::Apply(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).expect("parses")
    }

    #[test]
    fn rates_reload_and_nothing_changed_is_an_empty_reload() {
        let running = Config::default();
        assert_eq!(plan(&running, &running), Plan::Apply(vec![]));
        let new =
            config("[rate_limits]\nsends_per_account = \"5/1m\"\nover_prekey_limit = \"refuse\"\n");
        assert_eq!(
            plan(&running, &new),
            Plan::Apply(vec!["sends_per_account", "over_prekey_limit"])
        );
    }

    #[test]
    fn anything_else_is_refused_whole_and_named() {
        let running = Config::default();
        let new = config(
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_batch = 3\n[rate_limits]\nsends_per_account = \"5/1m\"\nmax_keys = 10\n[media]\nmax_concurrent_uploads = 1\n",
        );
        let Plan::Restart(keys) = plan(&running, &new) else {
            panic!("applied");
        };
        assert_eq!(
            keys,
            [
                "rate_limits.max_keys",
                "limits.max_batch",
                "listen",
                "media"
            ]
        );
    }

    #[test]
    fn every_reloadable_key_is_one_the_merge_takes() {
        // A key named reloadable whose new value the merge dropped would be
        // reported applied and never be.
        let text = "[rate_limits]\nregistrations_per_prefix = \"1/1s\"\nmax_devices_per_account = 2\nadd_device_per_account = \"1/1s\"\nsends_per_account = \"1/1s\"\nsealed_sends_per_token = \"1/1s\"\nsealed_sends_per_prefix = \"1/1s\"\nintake_per_sender_per_mailbox = \"1/1s\"\nintake_above_queued = 7\nfetch_keys_per_requester = \"1/1s\"\none_time_prekeys_per_device = \"1/1s\"\nover_prekey_limit = \"refuse\"\nexports_per_account = \"1/1s\"\nkey_packages_per_device = \"1/1s\"\ncreate_groups_per_prefix = \"1/1s\"\ngroup_commits_per_device = \"1/1s\"\n";
        let Plan::Apply(keys) = plan(&Config::default(), &config(text)) else {
            panic!("refused");
        };
        assert_eq!(keys, RELOADABLE);
    }
}
