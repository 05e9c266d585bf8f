//! Rules every key-package and group store keeps.

use std::sync::{Arc, Barrier};

use bytes::Bytes;
use tern_proto::AccountId;

use super::addr;
use crate::store::{FetchedPackage, GroupState, GroupStore, KeyPackageCounts, KeyPackageStore};

fn package(i: u16) -> Bytes {
    let mut p = vec![0xA5; 64];
    p[..2].copy_from_slice(&i.to_be_bytes());
    Bytes::from(p)
}

fn one_time(p: Bytes) -> Option<FetchedPackage> {
    Some(FetchedPackage {
        key_package: p,
        last_resort: false,
    })
}

fn last_resort(p: Bytes) -> Option<FetchedPackage> {
    Some(FetchedPackage {
        key_package: p,
        last_resort: true,
    })
}

/// Publish, take once each (oldest first), last resort when empty or not asked,
/// replace, and removal by device and by account.
pub(in crate::store) fn key_package_rules(store: &dyn KeyPackageStore) {
    let dev = addr(21, 1);
    let other = addr(21, 2);
    let stranger = addr(22, 1);
    assert_eq!(store.take_key_package(&dev, true).expect("take"), None);
    assert_eq!(
        store.key_package_counts(&dev).expect("counts"),
        KeyPackageCounts::default()
    );
    let n = store
        .publish_key_packages(&dev, &[package(1), package(2)], None, false)
        .expect("publish");
    assert_eq!(n, 2);
    let n = store
        .publish_key_packages(&dev, &[package(3)], Some(&package(100)), false)
        .expect("publish more");
    assert_eq!(n, 3, "added to the pool");
    store
        .publish_key_packages(&other, &[package(50)], None, false)
        .expect("publish other");
    assert_eq!(
        store.key_package_counts(&dev).expect("counts"),
        KeyPackageCounts {
            one_time: 3,
            last_resort: true
        }
    );
    // Not asked for a one-time package: the last resort, nothing taken.
    assert_eq!(
        store.take_key_package(&dev, false).expect("take"),
        last_resort(package(100))
    );
    for i in 1..=3 {
        assert_eq!(
            store.take_key_package(&dev, true).expect("take"),
            one_time(package(i)),
            "each once, oldest first"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            store.take_key_package(&dev, true).expect("take"),
            last_resort(package(100)),
            "the pool is empty: the last resort, kept"
        );
    }
    assert_eq!(
        store.key_package_counts(&dev).expect("counts"),
        KeyPackageCounts {
            one_time: 0,
            last_resort: true
        }
    );
    // A new last resort replaces the old one; `replace` empties the pool first.
    store
        .publish_key_packages(&dev, &[package(4), package(5)], Some(&package(101)), false)
        .expect("publish");
    let n = store
        .publish_key_packages(&dev, &[package(6)], None, true)
        .expect("replace");
    assert_eq!(n, 1, "the pool replaced");
    assert_eq!(
        store.take_key_package(&dev, true).expect("take"),
        one_time(package(6))
    );
    assert_eq!(
        store.take_key_package(&dev, true).expect("take"),
        last_resort(package(101)),
        "the last resort outlives a replace that names none"
    );
    let n = store
        .publish_key_packages(&dev, &[], None, true)
        .expect("replace with nothing");
    assert_eq!(n, 0);
    // Device removal takes the device's packages only.
    store
        .publish_key_packages(&dev, &[package(7)], None, false)
        .expect("publish");
    store.remove_key_packages(&dev).expect("remove");
    assert_eq!(store.take_key_package(&dev, true).expect("take"), None);
    assert_eq!(
        store.key_package_counts(&other).expect("counts").one_time,
        1
    );
    // Account deletion: every device of the account, no one else's.
    store
        .publish_key_packages(&dev, &[package(8)], Some(&package(102)), false)
        .expect("publish");
    store
        .publish_key_packages(&stranger, &[package(9)], Some(&package(103)), false)
        .expect("publish");
    store
        .remove_account_key_packages(&AccountId([21; 16]))
        .expect("remove account");
    for gone in [dev, other] {
        assert_eq!(store.take_key_package(&gone, true).expect("take"), None);
        assert_eq!(
            store.key_package_counts(&gone).expect("counts"),
            KeyPackageCounts::default()
        );
    }
    assert_eq!(
        store.take_key_package(&stranger, true).expect("take"),
        one_time(package(9))
    );
}

/// Eight fetchers at once, 240 fetches against a pool of 200: every one-time package
/// is handed out exactly once, and the other 40 fetches get the last resort.
pub(in crate::store) fn concurrent_key_package_fetches<S: KeyPackageStore>(store: Arc<S>) {
    let dev = addr(23, 1);
    let pool: Vec<Bytes> = (0..200).map(package).collect();
    store
        .publish_key_packages(&dev, &pool, Some(&package(9999)), false)
        .expect("publish");
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..30)
                    .map(|_| {
                        store
                            .take_key_package(&dev, true)
                            .expect("take")
                            .expect("a package")
                    })
                    .collect::<Vec<FetchedPackage>>()
            })
        })
        .collect();
    let all: Vec<FetchedPackage> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    let mut handed: Vec<Bytes> = all
        .iter()
        .filter(|f| !f.last_resort)
        .map(|f| f.key_package.clone())
        .collect();
    let n = handed.len();
    handed.sort();
    handed.dedup();
    assert_eq!(handed.len(), n, "no one-time package handed out twice");
    assert_eq!(n, 200, "240 fetches drain a pool of 200");
    assert!(all
        .iter()
        .filter(|f| f.last_resort)
        .all(|f| f.key_package == package(9999)));
    assert_eq!(store.key_package_counts(&dev).expect("counts").one_time, 0);
}

fn state(epoch: u64, token: u8, commit: u8, day: u32) -> GroupState {
    GroupState {
        epoch,
        token_hash: [token; 32],
        last_commit_id: [commit; 16],
        touched_day: day,
    }
}

/// Create once, compare-and-set, the idle sweep, listing.
pub(in crate::store) fn group_rules(store: &dyn GroupStore) {
    let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
    assert_eq!(store.group(&a).expect("read"), None);
    let s0 = state(0, 1, 0, 100);
    store.insert_group(&a, &s0).expect("create");
    assert!(matches!(
        store.insert_group(&a, &state(0, 9, 0, 100)),
        Err(crate::store::StoreError::Exists)
    ));
    assert_eq!(store.group(&a).expect("read"), Some(s0), "the first kept");
    let s1 = state(1, 2, 7, 101);
    assert!(store.advance_group(&a, &s0, &s1).expect("advance"));
    assert_eq!(store.group(&a).expect("read"), Some(s1));
    assert!(
        !store
            .advance_group(&a, &s0, &state(1, 3, 8, 101))
            .expect("cas"),
        "a stale read moves nothing"
    );
    assert!(!store.advance_group(&b, &s0, &s1).expect("unknown handle"));
    assert_eq!(store.group(&a).expect("read"), Some(s1));
    store.insert_group(&b, &state(0, 4, 0, 90)).expect("create");
    store.insert_group(&c, &state(0, 5, 0, 50)).expect("create");
    let all = store.groups_after(None, 10).expect("list");
    assert_eq!(
        all.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        vec![a, b, c]
    );
    assert_eq!(
        store.groups_after(Some(&a), 1).expect("page"),
        vec![(b, state(0, 4, 0, 90))]
    );
    assert!(store.groups_after(Some(&c), 10).expect("end").is_empty());
    // Touched before day 91: b and c; one at a time.
    assert_eq!(store.sweep_groups(91, 1).expect("sweep"), 1);
    assert_eq!(store.sweep_groups(91, 10).expect("sweep"), 1);
    assert_eq!(store.sweep_groups(91, 10).expect("sweep"), 0);
    assert_eq!(store.group(&b).expect("read"), None);
    assert_eq!(store.group(&c).expect("read"), None);
    assert_eq!(
        store.group(&a).expect("read"),
        Some(s1),
        "touched on day 101"
    );
    // An advance moves the day on, and the sweep follows it.
    let s2 = state(2, 6, 9, 200);
    assert!(store.advance_group(&a, &s1, &s2).expect("advance"));
    assert_eq!(store.sweep_groups(150, 10).expect("sweep"), 0);
    assert_eq!(store.sweep_groups(201, 10).expect("sweep"), 1);
    // A swept handle may be created again.
    store.insert_group(&a, &s0).expect("create again");
    assert_eq!(store.group(&a).expect("read"), Some(s0));
}

/// Eight writers that read the same state: exactly one moves it.
pub(in crate::store) fn concurrent_advances<S: GroupStore>(store: Arc<S>) {
    let h = [9u8; 16];
    let s0 = state(0, 1, 0, 10);
    store.insert_group(&h, &s0).expect("create");
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let to = state(1, 10 + i, 20 + i, 11);
                (i, store.advance_group(&h, &s0, &to).expect("advance"))
            })
        })
        .collect();
    let won: Vec<u8> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .filter(|(_, won)| *won)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(won.len(), 1, "exactly one wins");
    let i = won[0];
    assert_eq!(
        store.group(&h).expect("read"),
        Some(state(1, 10 + i, 20 + i, 11)),
        "the winner's state"
    );
}
