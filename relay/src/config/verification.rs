//! `[verification]`: phone-number verification, its verifier and its rates.
//!
//! The relay sends a 6-digit code through a verifier: an HTTP webhook to the
//! operator's SMS gateway, or (development only) a file in the data directory. With
//! `verifier = "none"`, the default, `StartVerification` is `UNAVAILABLE`.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::rate::Rate;
use crate::error::{Error, Result};

/// How codes are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VerifierKind {
    /// No verification: starts are `UNAVAILABLE`.
    #[default]
    None,
    /// `POST` to `[verification.webhook] url`.
    Webhook,
    /// Codes written to `<data_dir>/dev-verification/<session id>` (development).
    DevFile,
}

/// `[verification.webhook]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where codes are posted; `https` unless `allow_http`.
    pub url: String,
    /// A file holding the bearer token sent as `Authorization: Bearer ...`.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// How long a post may take before the start fails (`UNAVAILABLE`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Allows `http://` to a loopback host (tests, a gateway on the same machine).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Phone verification.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationConfig {
    /// `"none"`, `"webhook"` or `"dev-file"`.
    pub verifier: VerifierKind,
    /// Must be true (or `--allow-dev-verifier` given) for `"dev-file"`.
    pub allow_dev_verifier: bool,
    /// How long a code is valid.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub code_ttl: Duration,
    /// Codes a session accepts before it is closed.
    pub max_attempts: u32,
    /// Sessions started per number (keyed by an HMAC of it, in memory).
    pub starts_per_number: Rate,
    /// Sessions started per IPv4 address or IPv6 /64 (in memory).
    pub starts_per_prefix: Rate,
    /// Sessions started per account (in memory).
    pub starts_per_account: Rate,
    /// How often expired sessions are dropped.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub sweep_interval: Duration,
    /// The webhook, for `verifier = "webhook"`.
    pub webhook: Option<WebhookConfig>,
}

fn rate(burst: u32, period: Duration) -> Rate {
    Rate::new(burst, period).unwrap_or(Rate {
        burst: std::num::NonZeroU32::MIN,
        period,
    })
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            verifier: VerifierKind::None,
            allow_dev_verifier: false,
            code_ttl: Duration::from_secs(600),
            max_attempts: 5,
            starts_per_number: rate(3, Duration::from_secs(3600)),
            starts_per_prefix: rate(10, Duration::from_secs(3600)),
            starts_per_account: rate(5, Duration::from_secs(86_400)),
            sweep_interval: Duration::from_secs(60),
            webhook: None,
        }
    }
}

impl VerificationConfig {
    /// Checks the values; the message names the key.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.code_ttl.is_zero() || self.code_ttl > Duration::from_secs(3600) {
            return bad("verification.code_ttl must be more than 0 and at most 1h");
        }
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return bad("verification.max_attempts must be from 1 to 10");
        }
        if self.sweep_interval.is_zero() {
            return bad("verification.sweep_interval must be more than zero");
        }
        match self.verifier {
            VerifierKind::Webhook if self.webhook.is_none() => {
                bad("verification.verifier = \"webhook\" needs [verification.webhook]")
            }
            // `dev-file` without its allowance is refused when the relay starts
            // (`verification::verifier_from_config`): the flag comes after the file.
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<VerificationConfig, String> {
        let c: VerificationConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let c = VerificationConfig::default();
        assert_eq!(parse("").expect("empty"), c);
        assert_eq!(c.verifier, VerifierKind::None);
        assert_eq!(c.code_ttl, Duration::from_secs(600));
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.starts_per_number.burst.get(), 3);
    }

    #[test]
    fn dev_file_parses_with_and_without_the_allowance() {
        let c = parse("verifier = \"dev-file\"").expect("parsed; refused at start");
        assert!(!c.allow_dev_verifier);
        let c = parse("verifier = \"dev-file\"\nallow_dev_verifier = true").expect("allowed");
        assert_eq!(c.verifier, VerifierKind::DevFile);
    }

    #[test]
    fn webhook_parses_and_needs_its_table() {
        assert!(parse("verifier = \"webhook\"").is_err());
        let c = parse(
            "verifier = \"webhook\"\n[webhook]\nurl = \"https://sms.example/send\"\ntimeout = \"3s\"\n",
        )
        .expect("valid");
        let w = c.webhook.expect("webhook");
        assert_eq!((w.timeout, w.allow_http), (Duration::from_secs(3), false));
        for bad in [
            "max_attempts = 0",
            "code_ttl = \"0s\"",
            "code_ttl = \"2h\"",
            "verifier = \"sms\"",
            "unknown = 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
