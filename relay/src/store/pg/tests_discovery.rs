//! The discovery store on PostgreSQL: the conformance rules, and attach races
//! between nodes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Barrier;

use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::AccountId;

use super::testdb::{db, node};
use crate::store::{DiscoveryStore, TagRecord};

#[test]
fn discovery_rules() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    crate::store::conformance::discovery_rules(&a);
}

#[test]
fn attach_from_two_nodes_at_once_keeps_one_owner() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let rec = |account| TagRecord {
        account,
        key: FilterKey(7),
        discoverable: true,
        verified_at: 0,
    };
    for i in 0..20u8 {
        let tag = Tag([i; 16]);
        let (x, y) = (AccountId([100 + i; 16]), AccountId([200 - i; 16]));
        let barrier = Barrier::new(2);
        let (rx, ry) = std::thread::scope(|s| {
            let hx = s.spawn(|| {
                barrier.wait();
                a.attach(&x, &tag, &rec(x))
            });
            let hy = s.spawn(|| {
                barrier.wait();
                b.attach(&y, &tag, &rec(y))
            });
            (hx.join().expect("x"), hy.join().expect("y"))
        });
        let (rx, ry) = (rx.expect("x attaches"), ry.expect("y attaches"));
        let owner = a.by_tag(&tag).expect("by_tag").expect("an owner").account;
        // The later attach took the number from the earlier, and said so.
        let (winner, loser) = if owner == x { (x, y) } else { (y, x) };
        assert!(owner == x || owner == y);
        let (won, lost) = if owner == x { (rx, ry) } else { (ry, rx) };
        assert_eq!(won, Some(loser), "round {i}");
        assert_eq!(lost, None, "round {i}");
        for node in [&a, &b] {
            assert_eq!(
                node.of_account(&winner).expect("of").map(|(t, _)| t),
                Some(tag)
            );
            assert_eq!(node.of_account(&loser).expect("of"), None, "round {i}");
        }
    }
    let count: i64 = super::testdb::sql(
        &a,
        "SELECT count(*) FROM discovery_accounts WHERE tag IS NOT NULL",
    )[0]
    .get(0);
    assert_eq!(count, 20, "one account row names each tag");
}

#[test]
fn discoverable_keys_are_read_in_pages_and_each_once() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let mut want = Vec::new();
    for i in 0..25u8 {
        let on = i % 5 != 3;
        let rec = TagRecord {
            account: AccountId([i; 16]),
            key: FilterKey(1000 + u64::from(i)),
            discoverable: on,
            verified_at: 0,
        };
        // Tags out of key order, so pages follow tags, not keys.
        a.attach(&rec.account, &Tag([i.wrapping_mul(37); 16]), &rec)
            .expect("attach");
        if on {
            want.push(1000 + u64::from(i));
        }
    }
    want.sort_unstable();
    for page in [1, 7, 10, 20, 1000] {
        let mut got = a.discoverable_keys_paged(page).expect("keys");
        got.sort_unstable();
        assert_eq!(got, want, "pages of {page}");
    }
    let mut all = a.discoverable_keys().expect("keys");
    all.sort_unstable();
    assert_eq!(all, want);
}
