//! `[push]`: content-free wake-ups for devices that are not connected, sent to a
//! UnifiedPush endpoint or to an app publisher's gateway (ARCHITECTURE.md, "Push
//! wake-ups").

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Push wake-ups.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Whether devices may register push targets and the relay sends wake-ups. Off,
    /// every `SetPushTarget` is refused (`PUSH_TARGET_REFUSED`) and nothing is sent.
    pub enabled: bool,
    /// App publishers' gateways this relay posts to: a gateway target's URL must
    /// start with one of these (scheme, host and port equal, path a prefix), else
    /// it is refused. UnifiedPush endpoints need no entry here: they are checked
    /// as the UnifiedPush specification asks instead.
    pub gateways: Vec<String>,
    /// At most one wake-up per device in this time: a burst of messages to a device
    /// that is not connected wakes it once.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub coalesce: Duration,
    /// How long one POST (or the UnifiedPush discovery GET at registration) may take,
    /// connecting included.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Tries of one wake-up (the first included) when the target fails with an
    /// error worth retrying (5xx, a timeout, no connection), with doubling waits
    /// from `retry_backoff`; then it is given up quietly.
    pub max_attempts: u32,
    /// The wait before the first retry; each further retry waits twice as long.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_backoff: Duration,
    /// Wake-ups waiting for the push task: past this a wake-up is dropped (and
    /// counted), so a slow gateway never holds up a send.
    pub queue: usize,
    /// POSTs in flight at once across every target.
    pub max_in_flight: usize,
    /// POSTs in flight at once to one UnifiedPush endpoint host (scheme, host and
    /// port): a host that answers slowly, or never, holds at most this many of
    /// `max_in_flight`. Gateways on the list share `max_in_flight` only.
    pub max_in_flight_per_host: usize,
    /// Devices whose coalescing state is kept (each entry lives one `coalesce`
    /// window, or while a retry or a 429's wait runs); a wake-up for a new device
    /// while the table is full is dropped and counted.
    pub max_tracked: usize,
    /// Allows `http://` endpoints and gateways on a loopback host (tests, a gateway
    /// on the same machine). Never needed in production.
    pub allow_http_loopback: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            gateways: Vec::new(),
            coalesce: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            max_attempts: 4,
            retry_backoff: Duration::from_secs(1),
            queue: 4096,
            max_in_flight: 64,
            max_in_flight_per_host: 32,
            max_tracked: 100_000,
            allow_http_loopback: false,
        }
    }
}

impl PushConfig {
    /// The first problem with these values, if any.
    pub(crate) fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Config(m.into()));
        if self.coalesce.is_zero() || self.timeout.is_zero() || self.retry_backoff.is_zero() {
            return fail(
                "push.coalesce, push.timeout and push.retry_backoff must be more than zero",
            );
        }
        if self.max_attempts == 0
            || self.queue == 0
            || self.max_in_flight == 0
            || self.max_in_flight_per_host == 0
            || self.max_tracked == 0
        {
            return fail(
                "push.max_attempts, push.queue, push.max_in_flight, push.max_in_flight_per_host and push.max_tracked must be more than zero",
            );
        }
        for g in &self.gateways {
            if let Err(m) = crate::push::check_gateway_entry(g, self.allow_http_loopback) {
                return Err(Error::Config(format!("push.gateways: {m}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_and_a_table_parse_and_bad_values_are_named() {
        let c = Config::from_toml(
            "[push]\ngateways = [\"https://push.example.org/tern\"]\ncoalesce = \"2s\"\n",
        )
        .expect("parses");
        assert_eq!(c.push.gateways, ["https://push.example.org/tern"]);
        assert_eq!(c.push.coalesce, Duration::from_secs(2));
        c.validate().expect("valid");
        for (text, key) in [
            ("[push]\ncoalesce = \"0s\"\n", "push.coalesce"),
            ("[push]\nqueue = 0\n", "push.queue"),
            (
                "[push]\ngateways = [\"http://gw.example/x\"]\n",
                "push.gateways",
            ),
            ("[push]\ngateways = [\"not a url\"]\n", "push.gateways"),
        ] {
            let e = Config::from_toml(text)
                .and_then(|c| c.validate())
                .expect_err(text)
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let c = Config::from_toml(
            "[push]\ngateways = [\"http://127.0.0.1:9/x\"]\nallow_http_loopback = true\n",
        )
        .expect("parses");
        c.validate().expect("loopback http allowed when asked");
    }
}
