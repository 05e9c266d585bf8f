//! Key packages and group epochs on a real PostgreSQL: the conformance rules, what
//! two nodes on one database could break, and what the tables hold.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress};

use crate::store::conformance;
use crate::store::pg::testdb::{db, node, sql};
use crate::store::pg::PgBackend;
use crate::store::{
    FetchedPackage, GroupLock, GroupState, GroupStore, HandleBytes, KeyPackageCounts,
    KeyPackageStore, StoreResult,
};

#[test]
fn conformance_on_postgres() {
    let (_pg, opts) = db();
    let store = node(&opts, "a");
    conformance::key_package_rules(&store);
    conformance::group_rules(&store);
    tables_hold_only_what_the_traits_gave(&store);
}

/// Two nodes on one database, calls alternating between them.
struct TwoNodes {
    nodes: [PgBackend; 2],
    next: AtomicUsize,
}

impl TwoNodes {
    fn new(opts: &crate::store::pg::PgOptions) -> Self {
        TwoNodes {
            nodes: [node(opts, "a"), node(opts, "b")],
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> &PgBackend {
        &self.nodes[self.next.fetch_add(1, Ordering::Relaxed) % 2]
    }
}

impl KeyPackageStore for TwoNodes {
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> StoreResult<u64> {
        self.pick()
            .publish_key_packages(of, one_time, last_resort, replace)
    }
    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<FetchedPackage>> {
        self.pick().take_key_package(of, one_time)
    }
    fn key_package_counts(&self, of: &DeviceAddress) -> StoreResult<KeyPackageCounts> {
        self.pick().key_package_counts(of)
    }
    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.pick().remove_key_packages(of)
    }
    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()> {
        self.pick().remove_account_key_packages(account)
    }
}

impl GroupStore for TwoNodes {
    fn insert_group(&self, handle: &HandleBytes, state: &GroupState) -> StoreResult<()> {
        self.pick().insert_group(handle, state)
    }
    fn group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupState>> {
        self.pick().group(handle)
    }
    fn advance_group(
        &self,
        handle: &HandleBytes,
        from: &GroupState,
        to: &GroupState,
    ) -> StoreResult<bool> {
        self.pick().advance_group(handle, from, to)
    }
    fn sweep_groups(&self, before_day: u32, max: usize) -> StoreResult<u64> {
        self.pick().sweep_groups(before_day, max)
    }
    fn groups_after(
        &self,
        after: Option<&HandleBytes>,
        max: usize,
    ) -> StoreResult<Vec<(HandleBytes, GroupState)>> {
        self.pick().groups_after(after, max)
    }
    fn lock_group(&self, handle: &HandleBytes) -> StoreResult<Option<GroupLock>> {
        self.pick().lock_group(handle)
    }
    fn advance_locked(
        &self,
        handle: &HandleBytes,
        lock: GroupLock,
        to: &GroupState,
    ) -> StoreResult<bool> {
        // The lock carries its connection: either node moves it through that.
        self.pick().advance_locked(handle, lock, to)
    }
    fn count_groups(&self) -> StoreResult<u64> {
        self.pick().count_groups()
    }
}

#[test]
fn key_packages_are_handed_out_once_across_two_nodes() {
    let (_pg, opts) = db();
    conformance::concurrent_key_package_fetches(Arc::new(TwoNodes::new(&opts)));
}

#[test]
fn concurrent_advances_across_two_nodes_have_one_winner() {
    let (_pg, opts) = db();
    conformance::concurrent_advances(Arc::new(TwoNodes::new(&opts)));
}

#[test]
fn a_handle_lock_is_held_by_one_node_at_a_time() {
    let (_pg, opts) = db();
    let nodes = Arc::new(TwoNodes::new(&opts));
    for h in [7, 8] {
        nodes.insert_group(&[h; 16], &STATE).expect("insert");
    }
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (nodes, inside, most, start) =
                (nodes.clone(), inside.clone(), most.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..5 {
                    let lock = nodes.lock_group(&[7; 16]).expect("lock").expect("a handle");
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(lock);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two holders at once");
    // Another handle's lock is not held up by this one's.
    let _a = nodes.lock_group(&[7; 16]).expect("lock");
    let _b = nodes.lock_group(&[8; 16]).expect("another handle");
    assert!(
        nodes.lock_group(&[9; 16]).expect("lock").is_none(),
        "no handle"
    );
}

const STATE: GroupState = GroupState {
    epoch: 0,
    token_hash: [1; 32],
    last_commit_id: [0; 16],
    touched_day: 100,
};

#[test]
fn a_locked_handle_moves_on_its_own_connection_and_the_sweep_skips_it() {
    let (_pg, mut opts) = db();
    // One connection: the move must not need a second.
    opts.pool_size = 1;
    let store = node(&opts, "a");
    store.insert_group(&[7; 16], &STATE).expect("insert");
    assert_eq!(store.count_groups().expect("count"), 1);
    let lock = store.lock_group(&[7; 16]).expect("lock").expect("a handle");
    assert_eq!(*lock.state(), STATE);
    let next = GroupState {
        epoch: 1,
        touched_day: 101,
        ..STATE
    };
    assert!(store
        .advance_locked(&[7; 16], lock, &next)
        .expect("advance"));
    assert_eq!(store.group(&[7; 16]).expect("read"), Some(next));

    // Held by a commit on another node: the sweep passes it over.
    let other = node(&opts, "b");
    let lock = store.lock_group(&[7; 16]).expect("lock").expect("a handle");
    assert_eq!(other.sweep_groups(200, 10).expect("sweep"), 0, "locked");
    drop(lock);
    let mut swept = 0;
    for _ in 0..50 {
        // The rollback of a dropped lock runs in the background.
        swept += other.sweep_groups(200, 10).expect("sweep");
        if swept > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(swept, 1);
}

/// The columns of the new tables, and that every stored value is bytea or bigint:
/// no text, no account in `group_epochs`.
fn tables_hold_only_what_the_traits_gave(store: &PgBackend) {
    let expected: [(&str, &[(&str, &str)]); 3] = [
        (
            "key_packages",
            &[
                ("account", "bytea"),
                ("device", "bigint"),
                ("id", "bigint"),
                ("package", "bytea"),
            ],
        ),
        (
            "last_resort_key_packages",
            &[
                ("account", "bytea"),
                ("device", "bigint"),
                ("package", "bytea"),
            ],
        ),
        (
            "group_epochs",
            &[
                ("handle", "bytea"),
                ("epoch", "bigint"),
                ("token_hash", "bytea"),
                ("last_commit_id", "bytea"),
                ("touched_day", "bigint"),
            ],
        ),
    ];
    for (table, columns) in expected {
        let got: Vec<(String, String)> = crate::store::pg::testdb::query(
            store,
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let want: Vec<(String, String)> = columns
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect();
        assert_eq!(got, want, "columns of {table}");
    }
    let rows = sql(store, "SELECT count(*) FROM group_epochs");
    assert!(
        rows[0].get::<_, i64>(0) > 0,
        "the run left groups to look at"
    );
}

#[test]
fn a_lock_given_up_at_its_deadline_is_never_pooled_inside_its_transaction() {
    let (_pg, mut opts) = db();
    opts.pool_size = 1;
    let (a, b, c) = (node(&opts, "a"), node(&opts, "b"), node(&opts, "c"));
    b.insert_group(&[7; 16], &STATE).expect("insert");
    let held = b.lock_group(&[7; 16]).expect("lock").expect("a handle");
    // Node a's lock waits behind b's and is given up (its future dropped) after BEGIN.
    let gave_up = a.run_within(std::time::Duration::from_millis(100), a.lock_row(&[7; 16]));
    assert!(
        matches!(gave_up, Err(crate::store::StoreError::Unavailable(_))),
        "{gave_up:?}"
    );
    // b lets go: a's abandoned SELECT … FOR UPDATE gets the row; it must be rolled
    // back (or closed), not left holding the row in a pooled connection.
    drop(held);
    let lock = c
        .lock_group(&[7; 16])
        .expect("a's abandoned lock was released");
    assert!(lock.is_some());
}
