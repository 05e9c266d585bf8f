//! Rate limits: at most `per_window` events per key in each fixed window of time.
//! Time is an argument; keys stay in memory only (an address is never logged or
//! stored, P9).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use crate::clock::UnixMillis;

/// Keys remembered before windows that have ended are forgotten.
const PRUNE_AT: usize = 100_000;

/// A fixed-window counter per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_window: u32,
    window_ms: u64,
    counts: Mutex<HashMap<K, (u64, u32)>>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// At most `per_window` events per key per `window_ms`.
    pub fn new(per_window: u32, window_ms: u64) -> Self {
        RateLimiter {
            per_window,
            window_ms: window_ms.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an event for `key` at `now`; `Err(retry_after_ms)` past the limit (the
    /// refused event is not counted).
    pub fn check(&self, key: K, now: UnixMillis) -> Result<(), u64> {
        let window = now / self.window_ms;
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= PRUNE_AT {
            counts.retain(|_, (w, _)| *w == window);
        }
        let entry = counts.entry(key).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if entry.1 >= self.per_window {
            return Err((window + 1) * self.window_ms - now);
        }
        entry.1 += 1;
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
}
