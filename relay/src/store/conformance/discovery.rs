//! Conformance rules of the discovery store.

use super::*;

pub(in crate::store) fn discovery_rules(store: &dyn DiscoveryStore) {
    use tern_proto::discovery::{FilterKey, Tag};
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    let rec = |account, key, discoverable| TagRecord {
        account,
        key: FilterKey(key),
        discoverable,
        verified_at: 86_400_000,
    };
    let (t1, t2) = (Tag([1; 16]), Tag([2; 16]));
    assert_eq!(store.by_tag(&t1).expect("by_tag"), None);
    assert!(!store.holds_tags().expect("holds"));
    assert!(
        !store.set_discoverable(&alice, false).expect("set"),
        "no tag yet"
    );

    assert_eq!(
        store
            .attach(&alice, &t1, &rec(alice, 11, true))
            .expect("attach"),
        None
    );
    assert_eq!(
        store.by_tag(&t1).expect("by_tag"),
        Some(rec(alice, 11, true))
    );
    assert!(store.holds_tags().expect("holds"));
    assert_eq!(
        store.of_account(&alice).expect("of_account"),
        Some((t1, rec(alice, 11, true)))
    );
    // Verifying the same number again changes nothing but the record.
    assert_eq!(
        store
            .attach(&alice, &t1, &rec(alice, 11, true))
            .expect("again"),
        None
    );

    // A new number for alice drops her old tag.
    assert_eq!(
        store
            .attach(&alice, &t2, &rec(alice, 22, true))
            .expect("attach"),
        None
    );
    assert_eq!(store.by_tag(&t1).expect("by_tag"), None);
    assert_eq!(store.discoverable_keys().expect("keys"), vec![22]);

    // The number moves to bob: alice loses it, and is told about.
    assert_eq!(
        store.attach(&bob, &t2, &rec(bob, 22, true)).expect("move"),
        Some(alice)
    );
    assert_eq!(store.of_account(&alice).expect("of_account"), None);
    assert_eq!(
        store.by_tag(&t2).expect("by_tag").map(|r| r.account),
        Some(bob)
    );

    // Discoverability leaves the published keys, not the record.
    assert!(store.set_discoverable(&bob, false).expect("set"));
    assert!(store.discoverable_keys().expect("keys").is_empty());
    assert_eq!(
        store.by_tag(&t2).expect("by_tag").map(|r| r.discoverable),
        Some(false)
    );
    assert!(store.set_discoverable(&bob, true).expect("set"));

    // Buckets, and detach removes everything of the account.
    assert_eq!(store.bucket(&bob).expect("bucket"), None);
    store
        .set_buckets(&bob, 12_345, &Tag([9; 16]), 12_345)
        .expect("set_buckets");
    assert_eq!(store.bucket(&bob).expect("bucket"), Some(12_345));
    assert_eq!(store.number_bucket(&t2).expect("number_bucket"), None);
    store
        .set_buckets(&bob, 23_456, &t2, 34_567)
        .expect("set_buckets");
    assert_eq!(store.bucket(&bob).expect("bucket"), Some(23_456));
    assert_eq!(
        store.number_bucket(&t2).expect("number_bucket"),
        Some(34_567)
    );
    assert_eq!(store.number_bucket(&t1).expect("number_bucket"), None);
    store
        .attach(&alice, &t1, &rec(alice, 11, true))
        .expect("attach");
    store.detach(&bob).expect("detach");
    assert_eq!(store.by_tag(&t2).expect("by_tag"), None);
    assert_eq!(store.of_account(&bob).expect("of_account"), None);
    assert_eq!(store.bucket(&bob).expect("bucket"), None);
    assert_eq!(
        store.number_bucket(&t2).expect("number_bucket"),
        Some(34_567),
        "the number's bucket names no account and outlives it"
    );
    assert_eq!(
        store.discoverable_keys().expect("keys"),
        vec![11],
        "alice stays"
    );
    store.detach(&bob).expect("detach twice");
    number_buckets_after_detach(store);
}

/// A detached number's bucket stays while it is not refilled, at most
/// [`DETACHED_NUMBER_RETENTION_MS`] after the first sweep that sees it, and for as
/// long as the number is held again.
fn number_buckets_after_detach(store: &dyn DiscoveryStore) {
    use super::DETACHED_NUMBER_RETENTION_MS as KEEP;
    use tern_proto::discovery::{FilterKey, Tag};
    let (carol, dave, erin) = (AccountId([3; 16]), AccountId([4; 16]), AccountId([5; 16]));
    let rec = |account| TagRecord {
        account,
        key: FilterKey(33),
        discoverable: true,
        verified_at: 0,
    };
    let (t3, t4, t5, t6) = (Tag([3; 16]), Tag([4; 16]), Tag([5; 16]), Tag([6; 16]));
    let now = 1_000_000;
    for (a, t, tat) in [
        (carol, t3, now + 500),
        (dave, t4, u64::MAX / 2),
        (erin, t5, u64::MAX / 2),
    ] {
        store.attach(&a, &t, &rec(a)).expect("attach");
        store.set_buckets(&a, tat, &t, tat).expect("charge");
    }
    // An attached number's bucket is never swept, refilled or not; bob's old
    // number (detached above) had refilled.
    assert_eq!(
        store.sweep_number_buckets(now + 1000, 100).expect("sweep"),
        1
    );
    assert_eq!(store.number_bucket(&Tag([2; 16])).expect("nb"), None);
    assert_eq!(store.number_bucket(&t3).expect("nb"), Some(now + 500));
    store.detach(&carol).expect("detach");
    store.detach(&dave).expect("detach");
    // erin moves to another number: her old one is detached too.
    store.attach(&erin, &t6, &rec(erin)).expect("new number");
    // Not refilled yet, and first seen now: everything stays.
    assert_eq!(store.sweep_number_buckets(now, 100).expect("sweep"), 0);
    assert_eq!(store.number_bucket(&t3).expect("nb"), Some(now + 500));
    // carol's has refilled: it goes.
    assert_eq!(
        store.sweep_number_buckets(now + 500, 100).expect("sweep"),
        1
    );
    assert_eq!(store.number_bucket(&t3).expect("nb"), None);
    // dave's number is verified again: its bucket stays past the retention.
    store.attach(&carol, &t4, &rec(carol)).expect("re-verified");
    assert_eq!(
        store
            .sweep_number_buckets(now + KEEP - 1, 100)
            .expect("sweep"),
        0
    );
    assert_eq!(store.number_bucket(&t5).expect("nb"), Some(u64::MAX / 2));
    assert_eq!(
        store.sweep_number_buckets(now + KEEP, 100).expect("sweep"),
        1
    );
    assert_eq!(
        store.number_bucket(&t5).expect("nb"),
        None,
        "erin's old number expired"
    );
    assert_eq!(
        store.number_bucket(&t4).expect("nb"),
        Some(u64::MAX / 2),
        "held again"
    );
    assert_eq!(store.sweep_number_buckets(u64::MAX, 100).expect("sweep"), 0);
    // At most `max` a call.
    for i in 0..3u8 {
        let (a, t) = (AccountId([10 + i; 16]), Tag([10 + i; 16]));
        store.attach(&a, &t, &rec(a)).expect("attach");
        store.set_buckets(&a, now + 1, &t, now + 1).expect("charge");
        store.detach(&a).expect("detach");
    }
    assert_eq!(store.sweep_number_buckets(now + 2, 2).expect("sweep"), 2);
    assert_eq!(store.sweep_number_buckets(now + 2, 2).expect("sweep"), 1);
    for a in [carol, erin] {
        store.detach(&a).expect("clean");
    }
}
