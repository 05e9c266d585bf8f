//! The in-memory expiry index the embedded stores keep.

use tern_platform::clock::UnixMillis;
use tern_proto::DeviceAddress;

use super::Expired;

/// An expiry index kept in memory, as (expires at, mailbox, seq), soonest first.
pub(crate) type ExpiryIndex = std::collections::BTreeSet<(UnixMillis, DeviceAddress, u64)>;

/// Up to `max` entries of `index` due at `now`.
pub(crate) fn due(index: &ExpiryIndex, now: UnixMillis, max: usize) -> Vec<Expired> {
    index
        .iter()
        .take_while(|(at, _, _)| *at <= now)
        .take(max)
        .map(|&(expires_at, to, seq)| Expired {
            to,
            seq,
            expires_at,
        })
        .collect()
}

impl Expired {
    /// The seqs of the entries that belong to `of`.
    pub(crate) fn seqs_of(entries: &[Expired], of: &DeviceAddress) -> Vec<u64> {
        entries
            .iter()
            .filter(|e| e.to == *of)
            .map(|e| e.seq)
            .collect()
    }
}
