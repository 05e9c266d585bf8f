use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::marked::Marked;
use super::FlushBoth;
use crate::store::{Flush, StoreError, StoreResult};

/// Counts its flushes; fails them when told to.
struct Probe {
    flushes: AtomicU64,
    fails: bool,
}

impl Flush for Probe {
    fn flush(&self) -> StoreResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if self.fails {
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }
}

fn probe(fails: bool) -> Arc<Marked<Probe>> {
    Arc::new(Marked::new(Arc::new(Probe {
        flushes: AtomicU64::new(0),
        fails,
    })))
}

fn flushes(p: &Marked<Probe>) -> u64 {
    p.store.flushes.load(Ordering::Relaxed)
}

#[test]
fn a_failing_store_fails_only_the_flushes_after_writes_to_it() {
    let (mailboxes, rest) = (probe(false), probe(true));
    let both = FlushBoth(mailboxes.clone(), rest.clone());
    assert!(both.flush().is_err(), "both count as written at first");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (1, 1));

    // Nothing written: nothing flushed.
    both.flush().expect("nothing to flush");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (1, 1));

    // Acks and sends (mailbox writes) commit although the rest is failing.
    mailboxes.write(|_| ());
    both.flush().expect("the mailboxes alone");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (2, 1));

    // A write to the failing store fails its commit, and only that one.
    rest.write(|_| ());
    mailboxes.write(|_| ());
    assert!(matches!(both.flush(), Err(StoreError::NoSpace)));
    assert_eq!(
        (flushes(&mailboxes), flushes(&rest)),
        (3, 2),
        "both were tried"
    );
    mailboxes.write(|_| ());
    both.flush().expect("the next commit of the mailboxes");
}
