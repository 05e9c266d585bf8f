//! The three start limits (per address prefix, per account, per number), taken
//! together: a start is charged to all three or to none, so one refused for its
//! number does not spend the account's or the address's starts (and the other
//! way round). GCRA per key ([`gcra`]), in memory, under one lock.

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

/// The start limits.
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
