//! `[discovery]`: contact discovery by OPRF, its buckets and its published filter.
//!
//! A bucket is `{ burst = N, refill = "M/period" }`: it holds at most `N` units and
//! gains one every `period / M` (GCRA). Every evaluated point costs one unit of the
//! account's and of the address prefix's bucket; every looked-up tag one unit of the
//! account's lookup bucket.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::rate::Rate;
use crate::error::{Error, Result};

/// The largest batch a client may send ([`tern_proto::discovery::MAX_DISCOVERY_BATCH`]):
/// a bucket smaller than it could never pass one.
const MIN_EVALUATION_BURST: u32 = tern_proto::discovery::MAX_DISCOVERY_BATCH as u32;

/// A token bucket: a capacity and a refill rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketRate {
    /// The most units the bucket holds (and what a new bucket starts with).
    pub burst: u32,
    /// How fast it refills: `"6/1h"` is one unit every ten minutes.
    pub refill: Rate,
}

impl BucketRate {
    /// Milliseconds per unit of refill (at least 1).
    pub fn interval_ms(&self) -> u64 {
        let per = self.refill.period / self.refill.burst.get();
        u64::try_from(per.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// The same bucket as a governor rate: a burst of `burst`, refilled at this
    /// bucket's interval.
    pub fn as_rate(&self) -> Option<Rate> {
        let period =
            Duration::from_millis(self.interval_ms().saturating_mul(u64::from(self.burst)));
        Rate::new(self.burst, period)
    }
}

/// Contact discovery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Whether the relay answers discovery requests at all (`UNAVAILABLE` if not).
    pub enabled: bool,
    /// Evaluated points per account (kept in the database, so a restart does not
    /// refill it).
    pub per_account: BucketRate,
    /// Evaluated points per IPv4 address or IPv6 /64 (in memory).
    pub per_prefix: BucketRate,
    /// Looked-up tags per account (in memory).
    pub lookups_per_account: BucketRate,
    /// Filter parts (each at most 192 KiB) downloaded per IPv4 address or IPv6 /64,
    /// on any connection (in memory): `"600/1h"` is a burst of 600 parts (about
    /// 110 MiB) refilled over an hour. A 1M-user snapshot is 22 parts, a day's delta one.
    pub filter_parts_per_prefix: Rate,
    /// Changes of the discoverable setting per account (in memory): `"10/1h"`. A
    /// request that changes nothing costs nothing.
    pub settings_per_account: Rate,
    /// Daily deltas kept for download; a client further behind gets the snapshot.
    pub keep_deltas: u32,
    /// Batches evaluated at once, each on a blocking thread (a batch of 4096 points
    /// takes a core for about 165 ms). Default: half the machine's cores, at least
    /// one, so discovery never holds every core.
    pub max_concurrent_evaluations: usize,
    /// Batches that may wait for one of those; past them a batch is refused
    /// (`UNAVAILABLE` with a retry time) before anything is charged, so a flood
    /// cannot grow memory (a waiting batch holds at most 128 KiB).
    pub max_queued_evaluations: usize,
    /// Whether a newly verified number is discoverable until its account says not.
    pub default_discoverable: bool,
}

fn bucket(burst: u32, per: u32, period: Duration) -> BucketRate {
    BucketRate {
        burst,
        refill: Rate::new(per, period).unwrap_or(Rate {
            burst: std::num::NonZeroU32::MIN,
            period,
        }),
    }
}

const HOUR: Duration = Duration::from_secs(3600);

fn half_the_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: true,
            per_account: bucket(50_000, 6, HOUR),
            per_prefix: bucket(100_000, 60, HOUR),
            lookups_per_account: bucket(10_000, 100, HOUR),
            filter_parts_per_prefix: Rate::new(600, HOUR).unwrap_or(Rate {
                burst: std::num::NonZeroU32::MIN,
                period: HOUR,
            }),
            settings_per_account: Rate::new(10, HOUR).unwrap_or(Rate {
                burst: std::num::NonZeroU32::MIN,
                period: HOUR,
            }),
            keep_deltas: 30,
            max_concurrent_evaluations: half_the_cores(),
            max_queued_evaluations: 16,
            default_discoverable: true,
        }
    }
}

impl DiscoveryConfig {
    /// Checks the values; the message names the key.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_owned()));
        if self.per_account.burst < MIN_EVALUATION_BURST
            || self.per_prefix.burst < MIN_EVALUATION_BURST
        {
            return bad("discovery.per_account.burst and per_prefix.burst must be at least 4096 (one whole batch)");
        }
        if self.lookups_per_account.burst < tern_proto::discovery::MAX_LOOKUP_TAGS as u32 {
            return bad(
                "discovery.lookups_per_account.burst must be at least 256 (one whole lookup)",
            );
        }
        if self.keep_deltas == 0 || self.keep_deltas > 366 {
            return bad("discovery.keep_deltas must be from 1 to 366");
        }
        if self.max_concurrent_evaluations == 0 {
            return bad("discovery.max_concurrent_evaluations must be more than zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<DiscoveryConfig, String> {
        let c: DiscoveryConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_are_the_documented_ones_and_valid() {
        let c = DiscoveryConfig::default();
        c.validate().expect("valid");
        assert_eq!(c.per_account.burst, 50_000);
        assert_eq!(c.per_account.interval_ms(), 600_000, "6 an hour");
        assert_eq!(c.per_prefix.interval_ms(), 60_000, "60 an hour");
        assert_eq!(c.lookups_per_account.interval_ms(), 36_000, "100 an hour");
        assert_eq!(c.filter_parts_per_prefix, "600/1h".parse().expect("rate"));
        assert_eq!(c.max_queued_evaluations, 16);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(c.max_concurrent_evaluations >= 1);
        assert!(c.max_concurrent_evaluations <= cores.div_ceil(2));
        assert_eq!(c.settings_per_account, "10/1h".parse().expect("rate"));
        assert_eq!(parse("").expect("empty"), c);
    }

    #[test]
    fn parses_buckets_and_refuses_bad_ones() {
        let c = parse("per_account = { burst = 5000, refill = \"1/1m\" }\nkeep_deltas = 7\n")
            .expect("valid");
        assert_eq!(
            (c.per_account.burst, c.per_account.interval_ms()),
            (5000, 60_000)
        );
        assert_eq!(c.keep_deltas, 7);
        for bad in [
            "per_account = { burst = 4095, refill = \"1/1m\" }",
            "per_prefix = { burst = 10, refill = \"1/1m\" }",
            "lookups_per_account = { burst = 255, refill = \"1/1m\" }",
            "keep_deltas = 0",
            "max_concurrent_evaluations = 0",
            "per_account = { burst = 5000 }",
            "unknown = 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
