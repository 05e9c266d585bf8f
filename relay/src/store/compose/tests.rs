use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::marked::Marked;
use super::FlushBoth;
use crate::store::{Flush, StoreError, StoreResult};

/// Counts its flushes; fails them when told to.
struct Probe {
    flushes: AtomicU64,
    fails: AtomicBool,
}

impl Flush for Probe {
    fn flush(&self) -> StoreResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if self.fails.load(Ordering::Relaxed) {
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }
}

fn probe(fails: bool) -> Arc<Marked<Probe>> {
    Arc::new(Marked::new(Arc::new(Probe {
        flushes: AtomicU64::new(0),
        fails: AtomicBool::new(fails),
    })))
}

fn flushes(p: &Marked<Probe>) -> u64 {
    p.store.flushes.load(Ordering::Relaxed)
}

#[test]
fn only_written_stores_are_flushed_and_a_failed_one_until_it_succeeds() {
    let (mailboxes, rest) = (probe(false), probe(false));
    let both = FlushBoth(mailboxes.clone(), rest.clone());
    both.flush().expect("both count as written at first");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (1, 1));

    // Nothing written: nothing flushed.
    both.flush().expect("nothing to flush");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (1, 1));

    // Acks and sends (mailbox writes) flush the mailboxes alone.
    mailboxes.write(|_| ());
    both.flush().expect("the mailboxes alone");
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (2, 1));

    // A failed flush of a written store fails its commit and every later one until
    // a flush of that store succeeds: a write it left undurable may be any of them.
    rest.store.fails.store(true, Ordering::Relaxed);
    rest.write(|_| ());
    assert!(matches!(both.flush(), Err(StoreError::NoSpace)));
    mailboxes.write(|_| ());
    assert!(
        matches!(both.flush(), Err(StoreError::NoSpace)),
        "a later batch may hold the write the failed flush missed"
    );
    assert_eq!((flushes(&mailboxes), flushes(&rest)), (3, 3));
    rest.store.fails.store(false, Ordering::Relaxed);
    both.flush().expect("the store flushes again");
    assert_eq!(flushes(&rest), 4);
    both.flush().expect("nothing to flush");
    assert_eq!(flushes(&rest), 4);
}

#[test]
fn the_deletion_verbs_reach_the_wrapped_store() {
    let store = Marked::new(Arc::new(crate::store::MemoryStore::new()));
    crate::store::conformance::deletion_rules(&store);
    crate::store::conformance::purge_rules(&store);
}

#[test]
fn a_sign_in_on_a_day_already_touched_leaves_the_store_clean() {
    use crate::store::{AccountRecord, AccountStore};
    use tern_proto::{AccountId, DeviceAddress, DeviceId};
    let store = Marked::new(Arc::new(crate::store::MemoryStore::new()));
    let account = AccountId([9; 16]);
    let device = DeviceId::new(1).expect("device");
    let record = AccountRecord {
        identity_key: [1; 32],
        devices: vec![(device, [2; 32])],
    };
    store
        .create_on(&account, &record, Some(10))
        .expect("create");
    store.flush_if_written().expect("flush");
    assert!(!store.written());
    let of = DeviceAddress { account, device };
    assert!(
        !store.touch_device(&of, 10).expect("touch"),
        "already today"
    );
    assert!(!store.written(), "nothing written, nothing to flush");
    assert!(store.touch_device(&of, 11).expect("touch"), "a new day");
    assert!(store.written());
}
