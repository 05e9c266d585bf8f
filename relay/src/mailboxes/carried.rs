//! Rows that hints from other nodes carry to a subscriber here: the rows a batch on
//! another node committed, so that the delivery pushes them without reading the
//! mailbox (a round trip to the database on every cross-node message).
//!
//! A subscriber keeps one chain of such rows, each hint's rows following the last
//! kept, until its delivery takes it. The delivery uses a chain only when it starts
//! right after the last seq it read, and reads the mailbox as well when anything else
//! woke it since ([`Chain::take`]); a hint that does not follow the chain (hints from
//! separate transactions may arrive out of their commits' order), or that would pass
//! the bounds, drops the chain and has the next pull read instead. So a row is never
//! pushed out of order, twice, or in place of one the mailbox holds before it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::StoredMessage;

/// Rows a subscriber keeps at most.
pub(crate) const ROWS_MAX: usize = 64;
/// Bytes (payloads and rows) all subscribers of a node keep at most.
pub(crate) const BYTES_MAX: usize = 32 << 20;

/// Rows a hint carries: those one batch committed right after seq `after` (as far as
/// the batch knew: a seq floor that moved it makes `after` match no reader's cursor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// The mailbox's last seq before the rows.
    pub after: u64,
    /// The rows, in seq order.
    pub rows: Vec<StoredMessage>,
}

impl Carried {
    /// What the rows hold in memory: payloads, and each row's own fields.
    fn bytes(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.payload.len() + std::mem::size_of::<StoredMessage>())
            .sum()
    }
}

/// What a delivery takes before it pulls: the chain, and whether to read the mailbox.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Rows carried since the last take, if they form one chain.
    pub(crate) chain: Option<Carried>,
    /// Something other than a carried hint woke the subscriber (or a chain broke):
    /// the mailbox must be read.
    pub(crate) read: bool,
}

/// One subscriber's chain.
#[derive(Debug)]
pub(crate) struct Chain {
    rows: Mutex<Option<Carried>>,
    /// Starts true: a new subscriber's first pull reads.
    read: AtomicBool,
    /// The node's payload bytes in chains, shared by its subscribers.
    budget: Arc<AtomicUsize>,
}

impl Chain {
    pub(crate) fn new(budget: Arc<AtomicUsize>) -> Self {
        Chain {
            rows: Mutex::new(None),
            read: AtomicBool::new(true),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Carried>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A wake-up that carries no rows: the next pull reads.
    pub(crate) fn must_read(&self) {
        self.read.store(true, Ordering::Release);
    }

    /// Keeps `c` after the chain, or drops the chain (the next pull reads) when `c`
    /// does not follow it or would pass the bounds.
    pub(crate) fn carry(&self, c: Carried) {
        let mut chain = self.lock();
        let follows = match chain.as_ref() {
            None => true,
            Some(kept) => kept.rows.last().map(|r| r.seq) == Some(c.after),
        };
        let kept_rows = chain.as_ref().map_or(0, |k| k.rows.len());
        let bytes = c.bytes();
        let fits = follows && kept_rows + c.rows.len() <= ROWS_MAX && self.reserve(bytes);
        if !fits {
            if let Some(dropped) = chain.take() {
                self.budget.fetch_sub(dropped.bytes(), Ordering::AcqRel);
            }
            self.read.store(true, Ordering::Release);
            return;
        }
        match chain.as_mut() {
            Some(kept) => kept.rows.extend(c.rows),
            None => *chain = Some(c),
        }
    }

    /// Counts `bytes` against the node's budget, unless that would pass it.
    fn reserve(&self, bytes: usize) -> bool {
        let before = self.budget.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > BYTES_MAX {
            self.budget.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The chain and whether to read, for a pull; both start again empty.
    pub(crate) fn take(&self) -> Taken {
        let chain = self.lock().take();
        if let Some(c) = &chain {
            self.budget.fetch_sub(c.bytes(), Ordering::AcqRel);
        }
        Taken {
            chain,
            read: self.read.swap(false, Ordering::AcqRel),
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        if let Some(c) = self.lock().take() {
            self.budget.fetch_sub(c.bytes(), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use bytes::Bytes;
    use tern_proto::MessageId;

    fn row(seq: u64, len: usize) -> StoredMessage {
        StoredMessage {
            seq,
            message_id: MessageId([seq as u8; 16]),
            payload: Bytes::from(vec![7; len]),
            accepted_at: 1,
            expires_at: u64::MAX,
            shared_body: None,
        }
    }

    fn carried(after: u64, seqs: &[u64]) -> Carried {
        Carried {
            after,
            rows: seqs.iter().map(|&s| row(s, 10)).collect(),
        }
    }

    #[test]
    fn hints_that_follow_one_another_form_one_chain_and_a_new_subscriber_reads_first() {
        let budget = Arc::new(AtomicUsize::new(0));
        let chain = Chain::new(budget.clone());
        chain.carry(carried(4, &[5, 6]));
        chain.carry(carried(6, &[9]));
        let row = 10 + std::mem::size_of::<StoredMessage>();
        assert_eq!(budget.load(Ordering::Acquire), 3 * row, "payloads and rows");
        let taken = chain.take();
        assert!(taken.read, "a new subscriber's first pull reads");
        let c = taken.chain.expect("one chain");
        assert_eq!(c.after, 4);
        assert_eq!(c.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 9]);
        assert_eq!(budget.load(Ordering::Acquire), 0, "taken: released");
        let again = chain.take();
        assert!(
            again.chain.is_none() && !again.read,
            "both start again empty"
        );
    }

    #[test]
    fn a_hint_out_of_order_or_a_plain_wake_up_makes_the_next_pull_read() {
        let budget = Arc::new(AtomicUsize::new(0));
        let chain = Chain::new(budget.clone());
        let _ = chain.take();
        // The later batch's hint first: the earlier one does not follow it.
        chain.carry(carried(6, &[7]));
        chain.carry(carried(4, &[5, 6]));
        let taken = chain.take();
        assert!(taken.chain.is_none() && taken.read);
        assert_eq!(budget.load(Ordering::Acquire), 0);
        chain.carry(carried(7, &[8]));
        chain.must_read();
        let taken = chain.take();
        assert!(
            taken.chain.is_some() && taken.read,
            "rows kept, and a read too"
        );
    }

    #[test]
    fn a_chain_past_its_rows_or_the_nodes_bytes_is_dropped_and_read_instead() {
        let budget = Arc::new(AtomicUsize::new(0));
        let chain = Chain::new(budget.clone());
        let _ = chain.take();
        let seqs: Vec<u64> = (1..=ROWS_MAX as u64).collect();
        chain.carry(carried(0, &seqs));
        chain.carry(carried(ROWS_MAX as u64, &[ROWS_MAX as u64 + 1]));
        let taken = chain.take();
        assert!(taken.chain.is_none() && taken.read, "past ROWS_MAX");
        assert_eq!(budget.load(Ordering::Acquire), 0);

        let other = Chain::new(budget.clone());
        budget.store(BYTES_MAX - 5, Ordering::Release);
        chain.carry(carried(0, &[1]));
        let taken = chain.take();
        assert!(taken.chain.is_none() && taken.read, "past the node's bytes");
        assert_eq!(
            budget.load(Ordering::Acquire),
            BYTES_MAX - 5,
            "nothing kept"
        );
        budget.store(0, Ordering::Release);
        other.carry(carried(0, &[1]));
        drop(other);
        assert_eq!(
            budget.load(Ordering::Acquire),
            0,
            "a dropped chain gives back"
        );
    }
}
