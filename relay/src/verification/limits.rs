//! The three start limits (per address prefix, per account, per number), taken
//! together: a start is charged to all three or to none, so one refused for its
//! number does not spend the account's or the address's starts (and the other
//! way round). Behind [`StartLimiter`]: [`StartLimits`] keeps GCRA per key
//! ([`gcra`]) in memory, under one lock (an embedded relay, or one node counting
//! alone); `store/pg/rates.rs` keeps them in PostgreSQL, shared by every node.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tern_proto::AccountId;

use crate::core::rate::{AddressPrefix, Rate, FULL_TABLE_RETRY_MS};
use crate::discovery::gcra;
use crate::error::{Error, Result};

/// One rate's buckets: a theoretical arrival time (Unix ms) per key.
struct Buckets<K> {
    interval: u64,
    burst: u64,
    tats: HashMap<K, u64>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: Rate) -> Self {
        let interval = rate.period / rate.burst.get();
        Buckets {
            interval: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: u64::from(rate.burst.get()),
            tats: HashMap::new(),
        }
    }

    /// The new TAT if one start fits, else the ms to wait.
    fn step(&self, key: &K, now: u64, max_keys: usize) -> Result<u64, u64> {
        let tat = self.tats.get(key).copied();
        if tat.is_none() && self.tats.len() >= max_keys {
            return Err(FULL_TABLE_RETRY_MS);
        }
        gcra(tat, now, self.interval, self.burst, 1)
    }

    /// Forgets keys whose bucket is full again (as good as new).
    fn sweep(&mut self, now: u64) {
        self.tats.retain(|_, tat| *tat > now);
        self.tats.shrink_to_fit();
    }
}

/// Per prefix, per account, per number key.
type Three = (
    Buckets<AddressPrefix>,
    Buckets<AccountId>,
    Buckets<[u8; 16]>,
);

/// What one start is charged to. The keys of the prefix and the number are HMACs
/// under a key derived from the OPRF key file: the same on every node, and neither
/// an address nor a number.
#[derive(Clone, Copy)]
pub struct StartKeys {
    /// The caller's address prefix (the memory limiter's key).
    pub prefix: AddressPrefix,
    /// HMAC of the prefix (the shared limiter's key).
    pub prefix_key: [u8; 16],
    /// The account starting.
    pub account: AccountId,
    /// HMAC of the number.
    pub number_key: [u8; 16],
}

impl std::fmt::Debug for StartKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartKeys(..)")
    }
}

/// The verification start limits: all three charged, or none.
pub trait StartLimiter: Send + Sync + 'static {
    /// Charges one start at `now`, or refuses it: `RATE_LIMITED` with the longest
    /// wait among the limits refusing (and nothing charged).
    fn charge(&self, keys: &StartKeys, now: u64) -> Result<()>;
    /// Forgets the account's bucket (account deletion).
    fn forget_account(&self, account: &AccountId) -> Result<()>;
    /// Forgets buckets full again at `now` (as good as new).
    fn sweep(&self, now: u64) -> Result<()>;
    /// Whether the account has a bucket (for tests).
    #[cfg(test)]
    fn holds_account(&self, _account: &AccountId) -> bool {
        false
    }
}

impl StartLimiter for StartLimits {
    fn charge(&self, keys: &StartKeys, now: u64) -> Result<()> {
        StartLimits::charge(self, &keys.prefix, &keys.account, &keys.number_key, now)
    }

    fn forget_account(&self, account: &AccountId) -> Result<()> {
        StartLimits::forget_account(self, account);
        Ok(())
    }

    fn sweep(&self, now: u64) -> Result<()> {
        StartLimits::sweep(self, now);
        Ok(())
    }

    #[cfg(test)]
    fn holds_account(&self, account: &AccountId) -> bool {
        StartLimits::holds_account(self, account)
    }
}

/// The start limits, in memory.
pub(super) struct StartLimits {
    max_keys: usize,
    inner: Mutex<Three>,
}

impl StartLimits {
    pub(super) fn new(prefix: Rate, account: Rate, number: Rate, max_keys: usize) -> Self {
        StartLimits {
            max_keys,
            inner: Mutex::new((
                Buckets::new(prefix),
                Buckets::new(account),
                Buckets::new(number),
            )),
        }
    }

    /// Charges one start to the prefix, the account and the number's key, or to none
    /// of them: `RATE_LIMITED` with the longest wait among those refusing.
    pub(super) fn charge(
        &self,
        prefix: &AddressPrefix,
        account: &AccountId,
        number: &[u8; 16],
        now: u64,
    ) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (p, a, n) = &mut *g;
        let steps = (
            p.step(prefix, now, self.max_keys),
            a.step(account, now, self.max_keys),
            n.step(number, now, self.max_keys),
        );
        match steps {
            (Ok(tp), Ok(ta), Ok(tn)) => {
                p.tats.insert(*prefix, tp);
                a.tats.insert(*account, ta);
                n.tats.insert(*number, tn);
                Ok(())
            }
            (sp, sa, sn) => {
                let wait = [sp, sa, sn]
                    .into_iter()
                    .filter_map(|s| s.err())
                    .max()
                    .unwrap_or(1);
                Err(Error::RateLimited {
                    retry_after_ms: wait,
                })
            }
        }
    }

    /// Forgets the account's bucket (account deletion); the prefix's and the
    /// number's name no account.
    pub(super) fn forget_account(&self, account: &AccountId) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.tats.remove(account);
    }

    /// Whether the account has a bucket (for tests).
    #[cfg(test)]
    pub(super) fn holds_account(&self, account: &AccountId) -> bool {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.tats.contains_key(account)
    }

    /// Forgets refilled keys.
    pub(super) fn sweep(&self, now: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.sweep(now);
        g.1.sweep(now);
        g.2.sweep(now);
    }
}
