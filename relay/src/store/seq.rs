//! Per-mailbox sequence numbers, shared by every backend.
//!
//! A seq is `(epoch << 40) | n`: `n` counts the messages a mailbox was given since the
//! store opened (from 1), and `epoch` is fixed at open and higher than the epoch of
//! every seq the store ever handed out (the log derives it from its segments, sled
//! from a key it bumps and flushes at open). So seqs only grow within a mailbox, and
//! one is never handed out twice in a mailbox, even when it emptied and the store
//! restarted since (a retried stale ack can never delete a newer message).
//!
//! What a recipient learns from its seqs: how often the store was restarted (the
//! epoch), and how many messages its own mailbox was given since the last restart.
//! Nothing about other mailboxes.

use std::collections::HashMap;

use tern_proto::DeviceAddress;

use super::{StoreError, StoreResult};

/// Bits of a seq that count within an epoch.
pub(crate) const EPOCH_SHIFT: u32 = 40;

/// The highest epoch: a seq must stay below `u64::MAX`, which reads use as "past
/// everything".
pub(crate) const MAX_EPOCH: u64 = (u64::MAX >> EPOCH_SHIFT) - 1;

/// The epoch after the one `seq` belongs to.
pub(crate) fn epoch_after(seq: u64) -> u64 {
    (seq >> EPOCH_SHIFT) + 1
}

/// The lowest seq of `epoch`: every seq handed out in it is above this.
pub(crate) fn floor(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

/// One counter per mailbox written to since open. A counter is kept when its mailbox
/// empties (about 56 bytes per device), since a restarted count could repeat a seq.
/// The default is epoch 0, for a store that never reopens.
#[derive(Debug, Default)]
pub(crate) struct SeqCounters {
    epoch: u64,
    counters: HashMap<DeviceAddress, u64>,
}

impl SeqCounters {
    /// Counters for a store opened in `epoch`.
    pub(crate) fn new(epoch: u64) -> StoreResult<Self> {
        if epoch > MAX_EPOCH {
            return Err(StoreError::Corrupt("sequence number epochs exhausted"));
        }
        Ok(SeqCounters {
            epoch,
            counters: HashMap::new(),
        })
    }

    /// This open's epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next `count` seqs of `to`'s mailbox, taken only if all fit in the epoch.
    pub(crate) fn take(&mut self, to: &DeviceAddress, count: usize) -> StoreResult<Vec<u64>> {
        let last = self.counters.get(to).copied().unwrap_or(0);
        let end = u64::try_from(count)
            .ok()
            .and_then(|c| last.checked_add(c))
            .filter(|end| *end < 1 << EPOCH_SHIFT)
            .ok_or(StoreError::Corrupt("sequence numbers exhausted"))?;
        if count > 0 {
            self.counters.insert(*to, end);
        }
        let base = floor(self.epoch);
        Ok((last + 1..=end).map(|n| base | n).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: u8) -> DeviceAddress {
        DeviceAddress::from_wire(&[a; 16], 1).expect("addr")
    }

    #[test]
    fn each_mailbox_counts_on_its_own_within_the_epoch() {
        let mut c = SeqCounters::new(3).expect("epoch");
        let a = c.take(&addr(1), 2).expect("take");
        let b = c.take(&addr(2), 1).expect("take");
        assert_eq!(a, vec![(3 << 40) | 1, (3 << 40) | 2]);
        assert_eq!(b, vec![(3 << 40) | 1]);
        assert_eq!(c.take(&addr(1), 1).expect("take"), vec![(3 << 40) | 3]);
        assert!(c.take(&addr(1), 0).expect("take").is_empty());
        assert_eq!(epoch_after(a[1]), 4);
        assert_eq!(epoch_after(floor(4)), 5);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        assert!(SeqCounters::new(MAX_EPOCH + 1).is_err());
        let mut c = SeqCounters::new(MAX_EPOCH).expect("epoch");
        c.counters.insert(addr(1), (1 << EPOCH_SHIFT) - 2);
        assert!(c.take(&addr(1), 2).is_err());
        let last = c.take(&addr(1), 1).expect("take")[0];
        assert!(last < u64::MAX);
        assert!(c.take(&addr(1), 1).is_err());
    }
}
