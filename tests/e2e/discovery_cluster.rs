//! Two relay nodes over one PostgreSQL database serve one discovery publication: the
//! holder of the `publish:discovery` lease builds it into the database, both nodes
//! serve its snapshot and deltas byte for byte, a user on the other node discovers
//! through it, and restarted nodes serve the same files (no second snapshot).
//!
//! The day cannot turn inside a test run of real processes, so the test turns it in
//! the table: the day's snapshot and deltas are removed and the day's key list is
//! moved to the day before, which is what the table holds when a new UTC day starts.
//! The holder then publishes today's snapshot and the delta from that key list.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_client::store::SledKv;
use tern_client::{Client, ErrorCode};
use tern_proto::discovery::{FilterDelta, FilterKind, FilterSnapshot};

use crate::support::{register, within, Device, PgNodes, RelayProcess};

/// Said by the node that stored a publication.
const PUBLISHED: &str = "discovery filter published for every node";

// What these tests do with the nodes' database.
impl PgNodes {
    /// Starts node `name` (again, on the same data directory and configuration);
    /// `peer` is the node whose shared files it gets.
    fn node(&self, name: &str, peer: Option<&Path>) -> RelayProcess {
        // A re-check every 100 ms: nodes look for a new publication every second.
        let extra = "recheck_interval = \"100ms\"\n[verification]\nverifier = \"dev-file\"";
        self.try_start_node(name, extra, peer, &["--allow-dev-verifier"])
            .expect("node starts")
    }

    async fn sql(&self, statements: &str) -> tokio_postgres::Client {
        let client = self.client().await;
        client.batch_execute(statements).await.expect(statements);
        client
    }

    /// (day, created) of every stored snapshot.
    async fn snapshots(&self) -> Vec<(i32, i64)> {
        let c = self.sql("SELECT 1").await;
        let rows = c
            .query(
                "SELECT day, created_ms FROM discovery_published WHERE kind = 1 AND seq = 0 \
                 ORDER BY day",
                &[],
            )
            .await
            .expect("snapshots");
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

/// A whole artefact from a node, as a client downloads it: kind, day, bytes.
async fn fetch(d: &Device, since: u32) -> (FilterKind, u32, Vec<u8>) {
    let first = within(d.conn.discovery_filter(since, 0, 0))
        .await
        .expect("part 0");
    let mut data = first.data.to_vec();
    for part in 1..first.parts {
        let p = within(d.conn.discovery_filter(since, first.day, part))
            .await
            .expect("part");
        assert_eq!((p.day, p.kind), (first.day, first.kind));
        data.extend_from_slice(&p.data);
    }
    (first.kind, first.day, data)
}

/// The snapshot a node serves once it holds `keys` keys (bounded wait).
async fn snapshot_with(d: &Device, keys: u32) -> (u32, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Before the node's first load: UNAVAILABLE, asked again.
        let first = within(d.conn.discovery_filter(0, 0, 0)).await;
        if let Err(e) = &first {
            assert_eq!(e.relay_code(), Some(ErrorCode::Unavailable), "{e}");
            assert!(Instant::now() < deadline, "nothing published");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let (kind, day, data) = fetch(d, 0).await;
        assert_eq!(kind, FilterKind::Snapshot);
        if FilterSnapshot::decode(&data).expect("a snapshot").keys == keys {
            return (day, data);
        }
        assert!(Instant::now() < deadline, "no snapshot of {keys} keys");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn store(dir: &Path, name: &str) -> Arc<SledKv> {
    Arc::new(SledKv::open(&dir.join(name), &[7u8; 32]).expect("device store"))
}

/// Registers on `node` and verifies `number` through its dev-file verifier.
async fn verified_user(nodes: &PgNodes, node: &RelayProcess, name: &str, number: &str) -> Client {
    let (client, _events) = Client::register(&node.address, store(nodes.dir.path(), name))
        .await
        .expect("register");
    let id = within(client.start_verification(number))
        .await
        .expect("started");
    let file = node.data_dir.join("dev-verification").join(id.to_hex());
    let code = std::fs::read_to_string(file).expect("code file");
    assert!(within(client.confirm_verification(id, &code))
        .await
        .expect("verified"));
    client
}

#[tokio::test]
async fn every_node_serves_one_publication() {
    let nodes = PgNodes::start(&[]);
    let mut a = nodes.node("a", None);
    let ra = register(&a.address).await;
    // a publishes at its start (no tags yet), then b starts and serves the same.
    let (day, empty) = snapshot_with(&ra, 0).await;
    let mut b = nodes.node("b", Some(&a.data_dir));
    let rb = register(&b.address).await;
    assert_eq!(snapshot_with(&rb, 0).await, (day, empty));

    let alice = verified_user(&nodes, &a, "alice", "+12015550123").await;
    let bob = verified_user(&nodes, &b, "bob", "+12015550124").await;

    // The day turns in the table: the holder publishes today's from yesterday's keys.
    nodes
        .sql(
            "DELETE FROM discovery_published WHERE kind <> 3; \
             UPDATE discovery_published SET day = day - 1",
        )
        .await;
    let (day_a, snap_a) = snapshot_with(&ra, 2).await;
    let (day_b, snap_b) = snapshot_with(&rb, 2).await;
    assert_eq!((day_a, day_b), (day, day));
    assert_eq!(snap_a, snap_b, "the same snapshot, byte for byte");
    let delta_a = fetch(&ra, day - 1).await;
    let delta_b = fetch(&rb, day - 1).await;
    assert_eq!(delta_a, delta_b, "the same delta, byte for byte");
    assert_eq!((delta_a.0, delta_a.1), (FilterKind::Deltas, day));
    let delta = FilterDelta::decode(&delta_a.2).expect("a delta");
    assert_eq!(
        (delta.base_day, delta.day, delta.added.len()),
        (day - 1, day, 2)
    );
    // a holds the lease from its start: b never built one.
    assert!(a.log_text().contains(PUBLISHED));
    assert!(!b.log_text().contains(PUBLISHED), "{}", b.log_text());
    let stored = nodes.snapshots().await;
    assert_eq!(stored.len(), 1);

    // Bob, talking only to b, finds Alice through the publication a built; and back.
    let found = within(bob.discover(&["+12015550123", "+12015550199"], "US"))
        .await
        .expect("discover on b");
    assert_eq!(
        found.found,
        vec![("+12015550123".to_owned(), alice.account())]
    );
    let found = within(alice.discover(&["+12015550124"], "US"))
        .await
        .expect("discover on a");
    assert_eq!(
        found.found,
        vec![("+12015550124".to_owned(), bob.account())]
    );
    alice.shutdown().await;
    bob.shutdown().await;

    // Restarted, each node serves the same files; the day is not published again.
    drop((ra, rb));
    b.stop().expect("b stops");
    a.stop().expect("a stops");
    let b = nodes.node("b", None);
    let a = nodes.node("a", None);
    for node in [&b, &a] {
        let r = register(&node.address).await;
        assert_eq!(snapshot_with(&r, 2).await, (day, snap_a.clone()));
        assert_eq!(fetch(&r, day - 1).await, delta_a);
    }
    assert_eq!(nodes.snapshots().await, stored, "no second snapshot");
}
