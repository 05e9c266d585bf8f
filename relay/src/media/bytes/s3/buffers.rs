//! The node-wide cap on upload bytes buffered for the object store (`[objects]
//! buffer_mb`).
//!
//! Each upload buffers up to one part before it goes to the store. The cap is taken
//! in part-sized reservations: an upload takes one when its first byte after a part
//! boundary arrives and gives it back when the part is sent, its upload finishes or
//! its buffer is dropped. An upload holding one can always fill and send its part,
//! so uploads that started make progress however many others wait; one that cannot
//! get one is refused with [`BlobError::Busy`] and retries.

use std::sync::{Arc, Mutex};

use crate::media::{lock, BlobError};

/// Retry advice when the node's upload buffers are all taken: about what one part
/// takes to arrive and go.
pub(crate) const BUSY_RETRY_MS: u64 = 1_000;

/// Upload bytes buffered on this node, against a cap.
#[derive(Debug)]
pub(crate) struct Buffers {
    max: u64,
    part: u64,
    used: Mutex<u64>,
}

/// One part's worth of [`Buffers`], given back when dropped.
#[derive(Debug)]
pub(crate) struct PartBuffer {
    buffers: Arc<Buffers>,
}

impl Drop for PartBuffer {
    fn drop(&mut self) {
        let mut used = lock(&self.buffers.used);
        *used = used.saturating_sub(self.buffers.part);
    }
}

impl Buffers {
    /// At most `max` bytes in reservations of `part` bytes.
    pub(crate) fn new(max: u64, part: u64) -> Arc<Self> {
        Arc::new(Buffers {
            max,
            part,
            used: Mutex::new(0),
        })
    }

    /// One part's reservation, if the cap has room for it.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<PartBuffer, BlobError> {
        let mut used = lock(&self.used);
        if used.saturating_add(self.part) > self.max {
            return Err(BlobError::Busy {
                retry_after_ms: BUSY_RETRY_MS,
            });
        }
        *used += self.part;
        Ok(PartBuffer {
            buffers: self.clone(),
        })
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        *lock(&self.used)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    #[test]
    fn reservations_are_parts_up_to_the_cap_and_come_back_when_dropped() {
        let b = Buffers::new(25, 10);
        let one = b.reserve().expect("one");
        let two = b.reserve().expect("two");
        assert!(matches!(b.reserve(), Err(BlobError::Busy { .. })));
        assert_eq!(b.used(), 20);
        drop(one);
        let three = b.reserve().expect("room again");
        drop((two, three));
        assert_eq!(b.used(), 0);
    }
}
