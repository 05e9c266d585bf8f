//! `[budget]`: relay-wide budgets and the free-disk reserve. The rules are in
//! `core/budget.rs` and ARCHITECTURE.md ("Budgets and a full disk").

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::budget::BudgetLimits;
use crate::error::{Error, Result};

/// Relay-wide budgets; past one, or under the disk reserve, new sends, uploads,
/// registrations and key uploads are refused, while drains, acks and deletions work.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Messages queued across every mailbox.
    pub max_queued_messages: u64,
    /// Payload bytes queued across every mailbox.
    pub max_queued_bytes: u64,
    /// The mailbox index's estimated memory (per message and per mailbox).
    pub max_index_bytes: u64,
    /// Bytes of finished blobs.
    pub max_blob_bytes: u64,
    /// Free bytes below which the reserve holds, on each file system of the data
    /// directory...
    pub min_free_disk_bytes: u64,
    /// The reserve as a percentage of the file system's size, when that is more than
    /// `min_free_disk_bytes` (0: bytes only).
    pub min_free_disk_percent: u8,
    /// How often free space is sampled.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub disk_check_interval: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        let b = BudgetLimits::default();
        BudgetConfig {
            max_queued_messages: b.max_queued_messages,
            max_queued_bytes: b.max_queued_bytes,
            max_index_bytes: b.max_index_bytes,
            max_blob_bytes: b.max_blob_bytes,
            min_free_disk_bytes: b.min_free_disk_bytes,
            min_free_disk_percent: b.min_free_disk_percent,
            disk_check_interval: Duration::from_secs(1),
        }
    }
}

impl BudgetConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.max_queued_messages == 0
            || self.max_queued_bytes == 0
            || self.max_index_bytes == 0
            || self.max_blob_bytes == 0
        {
            return Err(Error::Config("budget maxima must be more than zero".into()));
        }
        if self.min_free_disk_percent > 50 {
            return Err(Error::Config(
                "budget.min_free_disk_percent must be at most 50".into(),
            ));
        }
        if self.disk_check_interval < Duration::from_millis(10) {
            return Err(Error::Config(
                "budget.disk_check_interval must be at least 10ms".into(),
            ));
        }
        Ok(())
    }

    /// The limits [`crate::core::budget::Budget`] enforces.
    pub fn limits(&self) -> BudgetLimits {
        BudgetLimits {
            max_queued_messages: self.max_queued_messages,
            max_queued_bytes: self.max_queued_bytes,
            max_index_bytes: self.max_index_bytes,
            max_blob_bytes: self.max_blob_bytes,
            min_free_disk_bytes: self.min_free_disk_bytes,
            min_free_disk_percent: self.min_free_disk_percent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn parses_and_refuses_bad_values() {
        let c = Config::from_toml(
            "[budget]\nmax_queued_messages = 10\nmin_free_disk_bytes = 0\ndisk_check_interval = \"250ms\"\n",
        )
        .expect("parses");
        assert_eq!(c.budget.max_queued_messages, 10);
        assert_eq!(c.budget.min_free_disk_bytes, 0);
        assert_eq!(c.budget.disk_check_interval, Duration::from_millis(250));
        assert_eq!(
            c.budget.min_free_disk_percent, 0,
            "unset keys keep defaults"
        );
        for bad in [
            "max_queued_messages = 0",
            "max_blob_bytes = 0",
            "min_free_disk_percent = 51",
            "disk_check_interval = \"1ms\"",
            "max_messages = 5",
        ] {
            assert!(
                Config::from_toml(&format!("[budget]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn defaults_are_the_plans() {
        let b = BudgetConfig::default();
        assert_eq!(b.max_queued_messages, 5_000_000);
        assert_eq!(b.max_queued_bytes, 50 << 30);
        assert_eq!(b.max_index_bytes, 1 << 30);
        assert_eq!(b.max_blob_bytes, 100 << 30);
        assert_eq!(b.min_free_disk_bytes, 1 << 30);
        assert_eq!(b.min_free_disk_percent, 0);
    }
}
