//! Relay-wide budgets and the free-disk reserve: rules that hold for the whole relay,
//! not one mailbox or account.
//!
//! - Budgets: messages queued across every mailbox, their bytes, the mailbox index's
//!   estimated memory, and bytes of finished blobs. The mailbox totals come from
//!   [`crate::store::MailboxStore::totals`] (O(1)); blob bytes are counted here.
//! - The reserve: on each file system of the data directory, free space must stay
//!   above `max(min_free_disk_bytes, min_free_disk_percent of its size)`. A task in the
//!   server samples free space ([`Budget::record_disk`]); a check costs one atomic
//!   load.
//! - Over a budget or under the reserve, what adds data is refused with a
//!   [`Full`] (sends, uploads, and under the reserve also registrations and key
//!   uploads); what removes data (drains, acks, deletions, sweeps) and downloads are
//!   never checked. Checks and the writes after them are not one atomic step, so
//!   concurrent sends can pass a budget by at most what they carry.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::store::Totals;

/// When a refused client may try again, ms: free space and budgets move with drains
/// and sweeps, not within seconds.
pub const RETRY_AFTER_MS: u64 = 60_000;
/// Estimated index memory per queued message: `tern-load restart` measured about 157
/// bytes of relay RSS per queued message at 10,000,000 (benches/README.md).
pub const INDEX_BYTES_PER_MESSAGE: u64 = 160;
/// Estimated index memory per mailbox with messages.
pub const INDEX_BYTES_PER_MAILBOX: u64 = 256;

/// The budgets and the reserve, as configured in `[budget]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Messages queued across every mailbox.
    pub max_queued_messages: u64,
    /// Their payload bytes.
    pub max_queued_bytes: u64,
    /// Estimated index memory ([`index_bytes`]).
    pub max_index_bytes: u64,
    /// Bytes of finished blobs.
    pub max_blob_bytes: u64,
    /// The reserve: at least this many free bytes...
    pub min_free_disk_bytes: u64,
    /// ...and at least this percentage of each file system free.
    pub min_free_disk_percent: u8,
}

impl Default for BudgetLimits {
    fn default() -> Self {
        BudgetLimits {
            max_queued_messages: 5_000_000,
            max_queued_bytes: 50 << 30,
            max_index_bytes: 1 << 30,
            max_blob_bytes: 100 << 30,
            min_free_disk_bytes: 1 << 30,
            // Off by default: on a large shared disk (252 GB with 1-15 GB free on the
            // machine the tests run on) 5% would refuse every send.
            min_free_disk_percent: 0,
        }
    }
}

/// A refusal: a budget is spent or the disk is at its reserve. Becomes
/// `Error::StorageFull` (wire: `UNAVAILABLE` with a retry time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Which budget: a fixed name, safe to log and send.
    pub what: &'static str,
    /// When to retry, ms.
    pub retry_after_ms: u64,
}

fn full(what: &'static str) -> Full {
    Full {
        what,
        retry_after_ms: RETRY_AFTER_MS,
    }
}

/// One file system's free space and size, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSample {
    /// Bytes free to an unprivileged writer.
    pub free: u64,
    /// The file system's size.
    pub size: u64,
}

/// The mailbox index's estimated memory for `totals`.
pub fn index_bytes(totals: Totals) -> u64 {
    totals
        .messages
        .saturating_mul(INDEX_BYTES_PER_MESSAGE)
        .saturating_add(totals.mailboxes.saturating_mul(INDEX_BYTES_PER_MAILBOX))
}

/// The relay's budgets. See the module docs.
#[derive(Debug)]
pub struct Budget {
    limits: BudgetLimits,
    /// Set by the disk sampler: some data file system is under its reserve.
    below_reserve: AtomicBool,
    blob_bytes: AtomicU64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(BudgetLimits::default())
    }
}

impl Budget {
    /// Budgets under `limits`; the disk counts as above its reserve until sampled.
    pub fn new(limits: BudgetLimits) -> Self {
        Budget {
            limits,
            below_reserve: AtomicBool::new(false),
            blob_bytes: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &BudgetLimits {
        &self.limits
    }

    /// The reserve for a file system of `size` bytes.
    pub fn reserve_for(&self, size: u64) -> u64 {
        let percent = size / 100 * u64::from(self.limits.min_free_disk_percent);
        self.limits.min_free_disk_bytes.max(percent)
    }

    /// Records a sample of every data file system; returns whether any is under its
    /// reserve (which then holds until a sample says otherwise).
    pub fn record_disk(&self, samples: &[DiskSample]) -> bool {
        let below = samples.iter().any(|s| s.free < self.reserve_for(s.size));
        self.below_reserve.store(below, Ordering::Relaxed);
        below
    }

    /// Whether the last sample found a file system under its reserve.
    pub fn below_reserve(&self) -> bool {
        self.below_reserve.load(Ordering::Relaxed)
    }

    /// For writes that add little but must not run the disk out (registrations, key
    /// uploads): refused only under the reserve.
    pub fn check_reserve(&self) -> Result<(), Full> {
        if self.below_reserve() {
            return Err(full("free disk space is at the reserve"));
        }
        Ok(())
    }

    /// Whether `count` more messages of `bytes` fit, with the mailboxes at `totals`.
    pub fn check_enqueue(&self, totals: Totals, count: u64, bytes: u64) -> Result<(), Full> {
        self.check_reserve()?;
        let l = &self.limits;
        if totals.messages.saturating_add(count) > l.max_queued_messages {
            return Err(full("the relay's queued messages are at their budget"));
        }
        if totals.bytes.saturating_add(bytes) > l.max_queued_bytes {
            return Err(full("the relay's queued bytes are at their budget"));
        }
        let after = Totals {
            messages: totals.messages.saturating_add(count),
            // A send may open a mailbox: count it as one.
            mailboxes: totals.mailboxes.saturating_add(1),
            ..totals
        };
        if index_bytes(after) > l.max_index_bytes {
            return Err(full("the relay's index memory is at its budget"));
        }
        Ok(())
    }

    /// Whether an upload of `size` bytes may start.
    pub fn check_upload(&self, size: u64) -> Result<(), Full> {
        self.check_reserve()?;
        if self.blob_bytes().saturating_add(size) > self.limits.max_blob_bytes {
            return Err(full("the relay's blob bytes are at their budget"));
        }
        Ok(())
    }

    /// Bytes of finished blobs.
    pub fn blob_bytes(&self) -> u64 {
        self.blob_bytes.load(Ordering::Relaxed)
    }

    /// Counts a finished blob (or, at start, the blobs found on disk).
    pub fn add_blob_bytes(&self, n: u64) {
        self.blob_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the count of blob bytes (counted again from a shared index).
    pub fn set_blob_bytes(&self, n: u64) {
        self.blob_bytes.store(n, Ordering::Relaxed);
    }

    /// Uncounts a deleted blob.
    pub fn remove_blob_bytes(&self, n: u64) {
        let _ = self
            .blob_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits {
            max_queued_messages: 10,
            max_queued_bytes: 1000,
            max_index_bytes: 100 * INDEX_BYTES_PER_MESSAGE,
            max_blob_bytes: 5000,
            min_free_disk_bytes: 100,
            min_free_disk_percent: 10,
        }
    }

    fn totals(messages: u64, bytes: u64) -> Totals {
        Totals {
            messages,
            bytes,
            mailboxes: 1,
        }
    }

    #[test]
    fn queued_messages_and_bytes_are_relay_wide_budgets() {
        let b = Budget::new(limits());
        assert_eq!(b.check_enqueue(totals(9, 0), 1, 10), Ok(()));
        let refused = b.check_enqueue(totals(10, 0), 1, 10).expect_err("11th");
        assert_eq!(refused.retry_after_ms, RETRY_AFTER_MS);
        assert!(
            b.check_enqueue(totals(5, 0), 6, 10).is_err(),
            "a batch counts whole"
        );
        assert_eq!(b.check_enqueue(totals(0, 990), 1, 10), Ok(()));
        assert!(b.check_enqueue(totals(0, 991), 1, 10).is_err());
    }

    #[test]
    fn the_index_estimate_is_a_budget() {
        let b = Budget::new(BudgetLimits {
            max_queued_messages: u64::MAX,
            ..limits()
        });
        let t = Totals {
            messages: 50,
            bytes: 0,
            mailboxes: 10,
        };
        assert_eq!(
            index_bytes(t),
            50 * INDEX_BYTES_PER_MESSAGE + 10 * INDEX_BYTES_PER_MAILBOX
        );
        // 16,000 bytes in all; 11 mailboxes (a send may open one) take 2,816, which
        // leaves room for 82 messages of 160 bytes: 50 queued, 32 more.
        assert!(b.check_enqueue(t, 32, 0).is_ok());
        assert!(b.check_enqueue(t, 33, 0).is_err());
    }

    #[test]
    fn the_reserve_is_the_larger_of_bytes_and_percent() {
        let b = Budget::new(limits());
        assert_eq!(b.reserve_for(500), 100, "10% of 500 is less than 100 bytes");
        assert_eq!(b.reserve_for(10_000), 1000);
        assert!(!b.record_disk(&[DiskSample {
            free: 1000,
            size: 10_000
        }]));
        assert!(b.record_disk(&[
            DiskSample {
                free: 1000,
                size: 10_000
            },
            DiskSample {
                free: 99,
                size: 500
            },
        ]));
    }

    #[test]
    fn under_the_reserve_sends_uploads_and_registrations_are_refused() {
        let b = Budget::new(limits());
        b.record_disk(&[DiskSample {
            free: 999,
            size: 10_000,
        }]);
        assert!(b.check_enqueue(totals(0, 0), 1, 1).is_err());
        assert!(b.check_upload(1).is_err());
        assert!(b.check_reserve().is_err());
        // Space comes back: so does everything.
        b.record_disk(&[DiskSample {
            free: 1000,
            size: 10_000,
        }]);
        assert_eq!(b.check_enqueue(totals(0, 0), 1, 1), Ok(()));
        assert_eq!(b.check_upload(1), Ok(()));
        assert_eq!(b.check_reserve(), Ok(()));
    }

    #[test]
    fn blob_bytes_are_a_budget() {
        let b = Budget::new(limits());
        b.add_blob_bytes(4000);
        assert_eq!(b.check_upload(1000), Ok(()));
        assert!(b.check_upload(1001).is_err());
        b.remove_blob_bytes(4000);
        b.remove_blob_bytes(1);
        assert_eq!(b.blob_bytes(), 0, "never below zero");
        assert_eq!(b.check_upload(5000), Ok(()));
    }
}
