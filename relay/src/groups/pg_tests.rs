//! The delivery service's commits with group epochs on a real PostgreSQL (the
//! mailboxes in memory): what a flood of commits on random handles costs, and what
//! two nodes committing to one handle at once get.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use tern_proto::{CommitId, GroupCommit, GroupHandle};

use super::tests::token_hash;
use crate::core::rate::AddressPrefix;
use crate::error::Error;
use crate::store::pg::testdb::{db, node};
use crate::store::pg::PgBackend;
use crate::store::{MemoryStore, Stores};
use crate::testing::{fixture_on, Fixture};

fn from(i: u8) -> AddressPrefix {
    AddressPrefix::from(std::net::IpAddr::from([10, i, 0, 1]))
}

/// Services whose group epochs are on `pg`, everything else in memory.
fn on(pg: Arc<PgBackend>) -> Fixture {
    let memory = Arc::new(MemoryStore::new());
    let mut stores = Stores::all(memory.clone());
    stores.groups = pg;
    fixture_on(stores, memory)
}

/// A commit to `handle` at `epoch` (token `[epoch; 32]`, next `[epoch + 1; 32]`)
/// with no sends: only the epoch is at stake.
fn bare(handle: GroupHandle, epoch: u8, id: u8) -> GroupCommit {
    GroupCommit {
        handle,
        epoch: u64::from(epoch),
        epoch_token: [epoch; 32],
        next_token_hash: token_hash(&[epoch + 1; 32]),
        commit_id: CommitId([id; 16]),
        sends: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn commits_on_random_handles_take_no_connection_from_a_member() {
    let (_pg, mut opts) = db();
    opts.pool_size = 2;
    let f = Arc::new(on(Arc::new(node(&opts, "a"))));
    let real = GroupHandle([1; 16]);
    let groups = f.services.groups();
    groups
        .create(&real, &token_hash(&[0; 32]), from(0))
        .await
        .expect("create");
    // Forty strangers at once, each from its own prefix (so no rate stops them
    // before the store), on handles that do not exist or with a wrong token.
    let tasks: Vec<_> = (1..=40u8)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut c = bare(GroupHandle([0x80 | i; 16]), 0, i);
                if i % 2 == 0 {
                    c.handle = real;
                    c.epoch_token = [0xEE; 32];
                }
                f.services.groups().commit(&f.services, &c, from(i)).await
            })
        })
        .collect();
    let member = {
        let f = f.clone();
        tokio::spawn(async move {
            let c = bare(real, 0, 200);
            f.services.groups().commit(&f.services, &c, from(200)).await
        })
    };
    for t in tasks {
        // A wrong token at epoch 0 is stale once the member's commit moved it.
        let refused = t.await.expect("task");
        assert!(
            matches!(
                refused,
                Err(Error::UnknownGroup | Error::StaleEpoch { current: 1 })
            ),
            "{refused:?}"
        );
    }
    let (epoch, _) = member.await.expect("task").expect("the member's commit");
    assert_eq!(epoch, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_committing_to_one_handle_at_once_have_one_winner() {
    let (_pg, opts) = db();
    let a = Arc::new(on(Arc::new(node(&opts, "a"))));
    let b = Arc::new(on(Arc::new(node(&opts, "b"))));
    let handle = GroupHandle([3; 16]);
    a.services
        .groups()
        .create(&handle, &token_hash(&[0; 32]), from(0))
        .await
        .expect("create");
    for epoch in 0..10u8 {
        let run = |f: &Arc<Fixture>, id: u8| {
            let f = f.clone();
            tokio::spawn(async move {
                let c = bare(handle, epoch, id);
                f.services.groups().commit(&f.services, &c, from(id)).await
            })
        };
        let (ra, rb) = (run(&a, 2 * epoch + 1), run(&b, 2 * epoch + 2));
        let (ra, rb) = (ra.await.expect("task"), rb.await.expect("task"));
        let won: Vec<_> = [&ra, &rb].into_iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "epoch {epoch}: {ra:?} {rb:?}");
        assert_eq!(won[0].as_ref().expect("won").0, u64::from(epoch) + 1);
        let lost = if ra.is_ok() { rb } else { ra };
        let current = u64::from(epoch) + 1;
        assert!(
            matches!(lost, Err(Error::StaleEpoch { current: c }) if c == current),
            "{lost:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_member_commits_with_sends_than_the_pool_all_finish() {
    let (_pg, mut opts) = db();
    opts.pool_size = 4;
    let pg = Arc::new(node(&opts, "a"));
    let f = Arc::new(fixture_on(
        crate::store::Stores::postgres(pg),
        Arc::new(MemoryStore::new()),
    ));
    let bob = super::tests::bob(&f).await;
    const N: u8 = 12;
    for i in 0..N {
        f.services
            .groups()
            .create(&GroupHandle([0x40 + i; 16]), &token_hash(&[0; 32]), from(i))
            .await
            .expect("create");
    }
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (f, mut c) = (f.clone(), super::tests::commit(&bob, 0, i + 1));
            c.handle = GroupHandle([0x40 + i; 16]);
            tokio::spawn(async move { f.services.groups().commit(&f.services, &c, from(i)).await })
        })
        .collect();
    for t in tasks {
        // Each commit holds one connection for its lock and its append needs more:
        // unbounded, the locks take the whole pool and the appends time out.
        let (epoch, results) = t.await.expect("task").expect("the commit");
        assert_eq!((epoch, results[0].accepted), (1, 1), "{results:?}");
    }
    assert!(started.elapsed() < super::LOCK_SLOT_WAIT * 2);
}
