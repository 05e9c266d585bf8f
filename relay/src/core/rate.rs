//! Rate limits: at most `per_window` units (events, bytes) per key in each fixed
//! window of time. Time is an argument; keys stay in memory only (an address is never
//! logged or stored, P9).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tern_platform::clock::UnixMillis;

/// Keys remembered before windows that have ended are forgotten.
const PRUNE_AT: usize = 100_000;

/// A fixed-window counter per key.
#[derive(Debug)]
pub(crate) struct RateLimiter<K> {
    per_window: u64,
    window_ms: u64,
    counts: Mutex<HashMap<K, (u64, u64)>>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// At most `per_window` units per key per `window_ms`.
    pub(crate) fn new(per_window: u64, window_ms: u64) -> Self {
        RateLimiter {
            per_window,
            window_ms: window_ms.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key` at `now`; see [`RateLimiter::take`].
    pub(crate) fn check(&self, key: K, now: UnixMillis) -> Result<(), u64> {
        self.take(key, 1, now)
    }

    /// Counts `amount` units for `key` at `now`; `Err(retry_after_ms)` past the limit
    /// (the refused amount is not counted). An amount larger than a whole window
    /// passes when the window is still untouched, so it is slowed, never refused for
    /// good.
    pub(crate) fn take(&self, key: K, amount: u64, now: UnixMillis) -> Result<(), u64> {
        let window = now / self.window_ms;
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= PRUNE_AT {
            counts.retain(|_, (w, _)| *w == window);
        }
        let entry = counts.entry(key).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        let fits = entry.1.saturating_add(amount) <= self.per_window;
        if self.per_window == 0 || !(fits || entry.1 == 0) {
            return Err((window + 1) * self.window_ms - now);
        }
        entry.1 = entry.1.saturating_add(amount);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_window() {
        let r = RateLimiter::new(2, 60_000);
        assert_eq!(r.check(1, 0), Ok(()));
        assert_eq!(r.check(1, 10), Ok(()));
        assert_eq!(r.check(1, 20), Err(59_980));
        assert_eq!(r.check(2, 20), Ok(()), "another key has its own count");
        assert_eq!(r.check(1, 60_000), Ok(()), "a new window");
        let zero = RateLimiter::new(0, 1000);
        assert_eq!(zero.check(1, 500), Err(500));
    }

    #[test]
    fn amounts_fill_the_window_and_a_big_one_passes_alone() {
        let r = RateLimiter::new(2000, 1000);
        assert_eq!(r.take(1, 1500, 0), Ok(()));
        assert_eq!(r.take(1, 600, 10), Err(990));
        assert_eq!(r.take(1, 500, 10), Ok(()));
        assert_eq!(r.take(1, 5000, 1000), Ok(()), "alone in a fresh window");
        assert_eq!(r.take(1, 1, 1001), Err(999));
    }
}
