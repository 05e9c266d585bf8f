//! Rate limits: keyed GCRA limiters from the `governor` crate, on the relay's
//! [`Clock`] (tests move a `ManualClock`; nothing sleeps).
//!
//! A rate `N/period` allows a burst of `N` and refills one unit every `period / N`.
//! A refusal says when the request would fit ([`Error::RateLimited`]).
//!
//! Keys live in memory only: never on disk, never in a log line (P9; an
//! [`AddressPrefix`] has no `Display`, and its `Debug` hides the address). Memory is
//! bounded twice: [`KeyedLimit::housekeep`] (run by the relay every sweep interval)
//! forgets keys whose bucket is full again, and a table at `max_keys` refuses keys it
//! does not hold until housekeeping makes room.

use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use crate::core::prefix::AddressPrefix;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{NotKeyed, StateStore};
use governor::Quota;
use std::hash::Hash;
use tern_platform::clock::Clock;

use crate::error::{Error, Result};

mod rules;

pub use self::rules::{RateLimits, RELOADABLE};

/// How soon a key refused for a full table may retry: housekeeping runs about this
/// often (the default sweep interval).
pub const FULL_TABLE_RETRY_MS: u64 = 60_000;

/// A rate: a burst of `burst`, refilled evenly over `period`. Written `"N/period"`
/// (`"1000/1m"`, `"5/1day"`), the period in humantime's syntax.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The most units taken at once after a quiet spell.
    pub burst: NonZeroU32,
    /// The time in which a whole burst refills.
    pub period: Duration,
}

impl Rate {
    /// `burst` per `period`; `None` if either is zero.
    pub fn new(burst: u32, period: Duration) -> Option<Rate> {
        let burst = NonZeroU32::new(burst)?;
        (!period.is_zero()).then_some(Rate { burst, period })
    }

    fn quota(self) -> Quota {
        let per_unit = (self.period / self.burst.get()).max(Duration::from_nanos(1));
        // `with_period` is `None` only for a zero period, ruled out just above.
        Quota::with_period(per_unit).map_or_else(
            || Quota::per_second(self.burst),
            |q| q.allow_burst(self.burst),
        )
    }
}

impl std::fmt::Debug for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.burst,
            humantime::format_duration(self.period)
        )
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Rate, String> {
        let (n, period) = s
            .split_once('/')
            .ok_or_else(|| format!("a rate is \"N/period\", like \"100/1m\"; got {s:?}"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("the count in {s:?} is not a number"))?;
        let period = humantime::parse_duration(period.trim())
            .map_err(|e| format!("the period in {s:?}: {e}"))?;
        Rate::new(n, period).ok_or_else(|| format!("{s:?}: count and period must be above zero"))
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[0-9]+/.+$" })
    }
}

/// The relay's clock as governor's: time since the Unix epoch.
#[derive(Clone)]
struct GovernorClock(Arc<dyn Clock>);

impl governor::clock::Clock for GovernorClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_millis(self.0.now())
    }
}

/// Who a send comes from, as intake limits count it: the sender's account, or for a
/// sealed send (sender unknown to the relay) the address prefix it came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SenderKey {
    /// An authenticated sender's account.
    Account(tern_proto::AccountId),
    /// A sealed sender's address prefix.
    Prefix(AddressPrefix),
}

/// The key table under a [`KeyedLimit`]: governor's `DashMap` store, plus a count of
/// keys so that the cap costs one atomic load on the hot path.
struct KeyTable<K: Hash + Eq + Clone> {
    map: DashMapStateStore<K>,
    count: AtomicUsize,
}

/// The table as governor's state store; shared with the [`KeyedLimit`] that checks
/// the cap.
struct SharedKeys<K: Hash + Eq + Clone>(Arc<KeyTable<K>>);

impl<K: Hash + Eq + Clone> StateStore for SharedKeys<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> std::result::Result<T, E>
    where
        F: Fn(Option<Nanos>) -> std::result::Result<(T, Nanos), E>,
    {
        if let Some(state) = self.0.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = self.0.map.entry(key.clone()).or_insert_with(|| {
            self.0.count.fetch_add(1, Ordering::Relaxed);
            Default::default()
        });
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for SharedKeys<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.map.retain_recent(drop_below);
        self.0.count.store(self.0.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.0.map);
    }

    fn len(&self) -> usize {
        self.0.count.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Limiter<K> = governor::RateLimiter<K, SharedKeys<K>, GovernorClock, NoOpMiddleware<Duration>>;

/// One rate per key, over at most `max_keys` keys. The rate and the cap can change
/// while it runs (`tern-relay admin reload`); a rate change starts every bucket afresh.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: RwLock<(Limiter<K>, Rate)>,
    keys: Arc<KeyTable<K>>,
    clock: GovernorClock,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("rate", &self.rate())
            .field("keys", &self.len())
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `rate` per key, at most `max_keys` keys, time from `clock`.
    pub fn new(rate: Rate, max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        let keys = Arc::new(KeyTable {
            map: DashMapStateStore::default(),
            count: AtomicUsize::new(0),
        });
        let clock = GovernorClock(clock);
        let limiter =
            governor::RateLimiter::new(rate.quota(), SharedKeys(keys.clone()), clock.clone());
        KeyedLimit {
            limiter: RwLock::new((limiter, rate)),
            keys,
            clock,
            max_keys,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Limiter<K>, Rate)> {
        self.limiter.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.read().1
    }

    /// Changes the rate; a change forgets every bucket (each key starts full). The
    /// stored times are relative to the old limiter's start, so a new limiter would
    /// read them as lying up to its uptime in the future and lock active keys out.
    pub fn set_rate(&self, rate: Rate) {
        let mut held = self.limiter.write().unwrap_or_else(|e| e.into_inner());
        if held.1 != rate {
            // Under the write lock: no check runs against the old times meanwhile.
            self.keys.map.clear();
            self.keys.count.store(0, Ordering::Relaxed);
            let limiter = governor::RateLimiter::new(
                rate.quota(),
                SharedKeys(self.keys.clone()),
                self.clock.clone(),
            );
            *held = (limiter, rate);
        }
    }

    /// Takes one unit for `key`; see [`KeyedLimit::check_n`].
    pub fn check(&self, key: &K) -> Result<()> {
        self.check_n(key, 1)
    }

    /// Takes `n` units for `key`, or none: past the rate, [`Error::RateLimited`] with
    /// the time after which the same request fits. More than a whole burst counts as
    /// a whole burst, so a large request is slowed, never refused for good.
    pub fn check_n(&self, key: &K, n: u32) -> Result<()> {
        let held = self.read();
        let (limiter, rate) = (&held.0, held.1);
        let Some(n) = NonZeroU32::new(n.min(rate.burst.get())) else {
            return Ok(());
        };
        if self.keys.count.load(Ordering::Relaxed) >= self.max_keys
            && !self.keys.map.contains_key(key)
        {
            return Err(Error::RateLimited {
                retry_after_ms: FULL_TABLE_RETRY_MS,
            });
        }
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let now = governor::clock::Clock::now(limiter.clock());
                let wait = not_until.wait_time_from(now);
                // Rounded up: retrying at the advised time must succeed.
                let ms = wait.as_nanos().div_ceil(1_000_000).max(1);
                Err(Error::RateLimited {
                    retry_after_ms: u64::try_from(ms).unwrap_or(u64::MAX),
                })
            }
            // `n` is at most the burst, so this cannot happen; refuse for a period.
            Err(_) => Err(Error::RateLimited {
                retry_after_ms: u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Forgets keys whose bucket has refilled (they are as good as new) and returns
    /// memory to the allocator. Costs one pass over the table.
    pub fn housekeep(&self) {
        let held = self.read();
        held.0.retain_recent();
        held.0.shrink_to_fit();
    }

    /// Forgets `key`'s bucket at once (account deletion): a later check starts full.
    pub fn forget(&self, key: &K) {
        if self.keys.map.remove(key).is_some() {
            self.keys.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forgets every key `drop` picks; one pass over the table.
    pub fn forget_where(&self, drop: impl Fn(&K) -> bool) {
        self.keys.map.retain(|k, _| !drop(k));
        self.keys
            .count
            .store(self.keys.map.len(), Ordering::Relaxed);
    }

    /// Whether a key `pick` picks is held; one pass over the table.
    pub fn holds(&self, pick: impl Fn(&K) -> bool) -> bool {
        self.keys.map.iter().any(|e| pick(e.key()))
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.keys.count.load(Ordering::Relaxed)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes per second per key, over a [`KeyedLimit`]. Past a million bytes a second
/// they are counted in units of several bytes: governor counts time in nanoseconds,
/// and a unit must take long enough to refill for its rate to stay exact.
pub struct ByteRate<K: Hash + Eq + Clone> {
    limit: KeyedLimit<K>,
    unit: u64,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for ByteRate<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteRate")
            .field("limit", &self.limit)
            .field("unit", &self.unit)
            .finish()
    }
}

impl<K: Hash + Eq + Clone> ByteRate<K> {
    /// `per_sec` bytes a second per key (at least one), at most `max_keys` keys.
    pub fn new(per_sec: u64, max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        let per_sec = per_sec.max(1);
        let unit = per_sec.div_ceil(1_000_000);
        let burst = u32::try_from(per_sec / unit).unwrap_or(u32::MAX).max(1);
        let rate = Rate {
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            period: Duration::from_secs(1),
        };
        ByteRate {
            limit: KeyedLimit::new(rate, max_keys, clock),
            unit,
        }
    }

    /// Takes `bytes` for `key`, as [`KeyedLimit::check_n`] does: more than a second's
    /// worth passes only after a quiet second.
    pub fn check(&self, key: &K, bytes: u64) -> Result<()> {
        let units = u32::try_from(bytes.div_ceil(self.unit)).unwrap_or(u32::MAX);
        self.limit.check_n(key, units)
    }

    /// See [`KeyedLimit::housekeep`].
    pub fn housekeep(&self) {
        self.limit.housekeep();
    }

    /// See [`KeyedLimit::forget`].
    pub fn forget(&self, key: &K) {
        self.limit.forget(key);
    }

    /// Whether `key` has a bucket.
    pub fn holds(&self, key: &K) -> bool {
        self.limit.holds(|k| k == key)
    }
}

#[cfg(test)]
mod tests;
