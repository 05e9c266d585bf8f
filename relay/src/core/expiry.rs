//! The expiry rule: a message expires a fixed time after the relay accepted it, never
//! more than 30 days, and is never delivered at or after that instant, whether or not
//! the sweeper has deleted it yet.

use std::time::Duration;

use tern_proto::limits::MAX_MESSAGE_TTL_MS;

use tern_platform::clock::UnixMillis;

/// How long messages live; at most 30 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(u64);

impl Ttl {
    /// The longest a relay may keep a message: 30 days.
    pub const MAX: Ttl = Ttl(MAX_MESSAGE_TTL_MS);

    /// A TTL of `d`, capped at [`Ttl::MAX`]; `None` for zero.
    pub fn new(d: Duration) -> Option<Ttl> {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (ms > 0).then(|| Ttl(ms.min(MAX_MESSAGE_TTL_MS)))
    }

    /// The TTL in milliseconds.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// When a message accepted at `accepted_at` expires.
    pub fn expires_at(self, accepted_at: UnixMillis) -> UnixMillis {
        accepted_at.saturating_add(self.0)
    }
}

/// Whether a message expiring at `expires_at` is expired at `now`.
pub fn is_expired(now: UnixMillis, expires_at: UnixMillis) -> bool {
    now >= expires_at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_capped_at_thirty_days() {
        let forty_days = Duration::from_secs(40 * 86_400);
        assert_eq!(Ttl::new(forty_days), Some(Ttl::MAX));
        assert_eq!(Ttl::MAX.as_millis(), 30 * 86_400 * 1000);
        assert_eq!(Ttl::new(Duration::ZERO), None);
        assert_eq!(
            Ttl::new(Duration::from_secs(1)).map(Ttl::as_millis),
            Some(1000)
        );
    }

    #[test]
    fn expired_at_the_instant() {
        let ttl = Ttl::new(Duration::from_secs(10)).expect("non-zero");
        let exp = ttl.expires_at(1_000);
        assert_eq!(exp, 11_000);
        assert!(!is_expired(10_999, exp));
        assert!(is_expired(11_000, exp));
        assert_eq!(Ttl::MAX.expires_at(u64::MAX), u64::MAX, "no overflow");
    }
}
