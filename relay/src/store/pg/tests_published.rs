//! The discovery publication shared by the nodes: one node publishes, every node
//! serves the same bytes, a node taking over continues the chain, a restarted node
//! serves what was stored.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rand::SeedableRng;
use tern_platform::clock::ManualClock;
use tern_proto::discovery::{FilterDelta, FilterKey, FilterKind, FilterSnapshot};
use tern_proto::AccountId;

use super::testdb::{db, node};
use super::{PgBackend, PgOptions};
use crate::config::DiscoveryConfig;
use crate::core::rate::AddressPrefix;
use crate::discovery::shared::{NewPublication, SharedPublication};
use crate::discovery::{Discovery, Oprf};
use crate::store::{DiscoveryStore, DAY_MS};

const START: u64 = 20_000 * DAY_MS + 3_600_000;
const DAY: u32 = 20_000;

struct Node {
    d: Discovery,
    pg: Arc<PgBackend>,
}

/// A relay node `id`: its discovery service on the shared database, with the OPRF
/// key in `keys` (the file every node shares).
fn start(
    opts: &PgOptions,
    id: &str,
    keys: &Path,
    clock: &Arc<ManualClock>,
    c: &DiscoveryConfig,
) -> Node {
    let pg = Arc::new(node(opts, id));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let d = Discovery::new(
        Oprf::load_or_create(keys, &mut rng).expect("key"),
        pg.clone(),
        pg.clone(),
        clock.clone(),
        c,
        keys.join(format!("files-{id}")),
    )
    .expect("service")
    .with_shared(pg.clone());
    Node { d, pg }
}

fn from(last: u8) -> AddressPrefix {
    AddressPrefix::from(std::net::IpAddr::from([192, 0, 2, last]))
}

/// The whole artefact a client at `since` downloads from `d`: kind, day, bytes.
fn fetch(d: &Discovery, since: u32) -> (FilterKind, u32, Vec<u8>) {
    let first = d.filter_part(from(1), since, 0, 0).expect("part 0");
    let mut data = first.data.to_vec();
    for part in 1..first.parts {
        let p = d
            .filter_part(from(1), since, first.day, part)
            .expect("part");
        assert_eq!((p.day, p.kind), (first.day, first.kind));
        data.extend_from_slice(&p.data);
    }
    (first.kind, first.day, data)
}

fn account(i: u32) -> AccountId {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&i.to_le_bytes());
    AccountId(a)
}

fn number(i: u32) -> Vec<u8> {
    format!("+1555{i:07}").into_bytes()
}

/// Verifies numbers `ids` for their accounts (discoverable) and returns their keys.
fn verify(n: &Node, ids: std::ops::Range<u32>) -> Vec<FilterKey> {
    ids.map(|i| {
        n.d.attach_verified(&account(i), &number(i))
            .expect("attach");
        n.d.oprf().tag_of(&number(i)).expect("tag").1
    })
    .collect()
}

/// SQL on the shared database.
fn sql(pg: &PgBackend, statement: &str) -> u64 {
    super::testdb::execute(pg, statement, &[])
}

fn count(pg: &PgBackend, kind: i16) -> Vec<(i32, i64)> {
    super::testdb::query(
        pg,
        "SELECT DISTINCT day, created_ms FROM discovery_published WHERE kind = $1 ORDER BY day",
        &[&kind],
    )
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn keys_of(snapshot: &[u8]) -> FilterSnapshot {
    FilterSnapshot::decode(snapshot).expect("a snapshot")
}

#[test]
fn one_node_publishes_and_every_node_serves_the_same_bytes() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig::default();
    let (a, b) = (
        start(&opts, "a", dir.path(), &clock, &c),
        start(&opts, "b", dir.path(), &clock, &c),
    );
    let first = verify(&a, 0..20);
    a.d.republish().expect("a publishes");
    // Tags verified after a's build: b serves a's publication, not one of its own.
    let late = verify(&b, 100..103);
    b.d.republish().expect("b loads");
    let (kind, day, snap_a) = fetch(&a.d, 0);
    assert_eq!((kind, day), (FilterKind::Snapshot, DAY));
    assert_eq!(
        fetch(&b.d, 0),
        (kind, day, snap_a.clone()),
        "byte-identical"
    );
    let s = keys_of(&snap_a);
    assert!(first.iter().all(|k| s.contains(*k)));
    assert_eq!(s.keys as usize, first.len(), "none of {late:?}");
    assert_eq!(count(&a.pg, 1).len(), 1, "one snapshot stored");
    assert!(!dir.path().join("files-a").exists() && !dir.path().join("files-b").exists());

    // The next day: b checks first, but a holds the lease; then a publishes.
    clock.advance(Duration::from_millis(DAY_MS));
    let second = verify(&b, 20..25);
    assert!(b.pg.set_discoverable(&account(0), false).expect("hidden"));
    b.d.republish().expect("b: not the holder, nothing newer");
    assert_eq!(b.d.published_day(), DAY);
    a.d.republish().expect("a publishes the next day");
    b.d.republish().expect("b loads it");
    let (kind, day, snap_a2) = fetch(&a.d, 0);
    assert_eq!((kind, day), (FilterKind::Snapshot, DAY + 1));
    assert_eq!(fetch(&b.d, 0).2, snap_a2);
    let (kind, day, delta_a) = fetch(&a.d, DAY);
    assert_eq!((kind, day), (FilterKind::Deltas, DAY + 1));
    assert_eq!(fetch(&b.d, DAY), (kind, day, delta_a.clone()), "same delta");
    let delta = FilterDelta::decode(&delta_a).expect("a delta");
    assert_eq!((delta.base_day, delta.day), (DAY, DAY + 1));
    let added: Vec<FilterKey> = delta.added.iter().map(|k| FilterKey(*k)).collect();
    assert_eq!(added.len(), second.len() + late.len());
    assert!(second.iter().all(|k| added.contains(k)));
    assert_eq!(
        delta.removed,
        vec![first[0].0],
        "hidden: out of the next day's"
    );
    let s2 = keys_of(&snap_a2);
    assert!(second.iter().all(|k| s2.contains(*k)));
}

#[test]
fn a_node_taking_the_lease_over_continues_from_the_table() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig::default();
    let a = start(&opts, "a", dir.path(), &clock, &c);
    let old = verify(&a, 0..10);
    a.d.republish().expect("a publishes");
    let (_, _, snap) = fetch(&a.d, 0);
    a.d.release_lease();
    drop(a);

    // b takes over the same day: no second snapshot for it.
    let b = start(&opts, "b", dir.path(), &clock, &c);
    b.d.republish().expect("b");
    assert_eq!(fetch(&b.d, 0).2, snap);
    let stored = count(&b.pg, 1);
    assert_eq!(stored.len(), 1);

    // The next day b publishes, its delta from a's key list.
    clock.advance(Duration::from_millis(DAY_MS));
    let new = verify(&b, 10..13);
    b.d.republish().expect("b publishes");
    assert_eq!(&count(&b.pg, 1)[..1], &stored[..], "a's day kept as it was");
    let (kind, day, delta) = fetch(&b.d, DAY);
    assert_eq!((kind, day), (FilterKind::Deltas, DAY + 1));
    let delta = FilterDelta::decode(&delta).expect("delta");
    assert_eq!(delta.base_day, DAY);
    assert!(delta.removed.is_empty());
    let mut want: Vec<u64> = new.iter().map(|k| k.0).collect();
    want.sort_unstable();
    assert_eq!(delta.added, want, "exactly what changed since a's day");
    let s = keys_of(&fetch(&b.d, 0).2);
    assert!(old.iter().chain(&new).all(|k| s.contains(*k)));
}

#[test]
fn a_restarted_node_serves_what_was_stored() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig::default();
    let a = start(&opts, "a", dir.path(), &clock, &c);
    verify(&a, 0..5);
    a.d.republish().expect("a publishes");
    let before = fetch(&a.d, 0);
    let stored = count(&a.pg, 1);
    drop(a);
    // Tags changed, the node restarted: the day's publication stays as it was.
    let a = start(&opts, "a-again", dir.path(), &clock, &c);
    assert_eq!(fetch(&a.d, 0), before, "served from the start");
    verify(&a, 5..9);
    a.d.republish().expect("restarted");
    assert_eq!(fetch(&a.d, 0), before);
    assert_eq!(count(&a.pg, 1), stored);
}

#[test]
fn a_part_of_a_later_day_is_loaded_at_once() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig::default();
    let (a, b) = (
        start(&opts, "a", dir.path(), &clock, &c),
        start(&opts, "b", dir.path(), &clock, &c),
    );
    verify(&a, 0..3);
    a.d.republish().expect("a");
    b.d.republish().expect("b");
    clock.advance(Duration::from_millis(DAY_MS));
    verify(&a, 3..6);
    a.d.republish().expect("a: the next day");
    // b has not checked yet; a client that saw the new day on a asks b for it.
    assert_eq!(b.d.published_day(), DAY);
    let p = b.d.filter_part(from(2), 0, DAY + 1, 0).expect("served");
    assert_eq!(p.day, DAY + 1);
    assert_eq!(fetch(&b.d, 0), fetch(&a.d, 0));
    // A day no node can have published yet is gone without a look at the table.
    assert!(b.d.filter_part(from(2), 0, DAY + 30, 0).is_err());
    // An earlier day than the one served is gone, as on one node.
    assert!(b.d.filter_part(from(2), 0, DAY, 0).is_err());
}

#[test]
fn a_damaged_publication_leaves_the_served_one() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig::default();
    let (a, b) = (
        start(&opts, "a", dir.path(), &clock, &c),
        start(&opts, "b", dir.path(), &clock, &c),
    );
    verify(&a, 0..3);
    a.d.republish().expect("a");
    b.d.republish().expect("b");
    let served = fetch(&b.d, 0);
    sql(
        &a.pg,
        &format!(
            "INSERT INTO discovery_published VALUES ({}, 1, 0, '\\x54444631ffff'::bytea, 1)",
            DAY + 1
        ),
    );
    let e = b.d.republish().expect_err("a damaged snapshot");
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert_eq!(fetch(&b.d, 0), served);
}

#[test]
fn old_artefacts_are_pruned_and_clients_behind_get_the_snapshot() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let c = DiscoveryConfig {
        keep_deltas: 2,
        ..DiscoveryConfig::default()
    };
    let a = start(&opts, "a", dir.path(), &clock, &c);
    for day in 0..5u32 {
        verify(&a, day * 3..day * 3 + 3);
        a.d.republish().expect("publish");
        clock.advance(Duration::from_millis(DAY_MS));
    }
    let days = |kind| {
        count(&a.pg, kind)
            .iter()
            .map(|(d, _)| *d as u32)
            .collect::<Vec<_>>()
    };
    assert_eq!(days(1), vec![DAY + 3, DAY + 4]);
    assert_eq!(days(2), vec![DAY + 3, DAY + 4]);
    assert_eq!(days(3), vec![DAY + 3, DAY + 4]);
    let b = start(&opts, "b", dir.path(), &clock, &c);
    b.d.republish().expect("b");
    let (kind, _, chain) = fetch(&b.d, DAY + 2);
    assert_eq!(kind, FilterKind::Deltas);
    assert_eq!(FilterDelta::decode_all(&chain).expect("chain").len(), 2);
    assert_eq!(fetch(&b.d, DAY + 1).0, FilterKind::Snapshot);
}

#[test]
fn two_publishers_of_one_day_store_it_once() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    // Larger than a chunk, so a publication spans rows.
    let big = |fill: u8| vec![fill; (1 << 20) * 2 + 17];
    for round in 0..5u32 {
        let (sa, sb) = (big(round as u8), big(100 + round as u8));
        let keys = vec![round as u8; 24];
        let barrier = Barrier::new(2);
        let publish = |pg: &PgBackend, snapshot: &[u8]| {
            barrier.wait();
            pg.store(&NewPublication {
                day: DAY + round,
                snapshot,
                delta: None,
                keys: &keys,
                keep_deltas: 30,
            })
            .expect("store")
        };
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| publish(&a, &sa));
            let hb = s.spawn(|| publish(&b, &sb));
            (ha.join().expect("a"), hb.join().expect("b"))
        });
        assert!(ra != rb, "exactly one stored day {round}: {ra} {rb}");
        let stored = b.load().expect("load").expect("a publication");
        assert_eq!(stored.version.day, DAY + round);
        assert_eq!(stored.snapshot, if ra { sa } else { sb });
        assert_eq!(a.latest().expect("latest"), Some(stored.version));
        let (day, list) = a.keys_before(DAY + round + 1).expect("keys").expect("some");
        assert_eq!((day, list), (DAY + round, keys));
    }
    // A day earlier than one stored is refused (a node whose clock is behind).
    let late = NewPublication {
        day: DAY,
        snapshot: b"x",
        delta: None,
        keys: b"",
        keep_deltas: 30,
    };
    assert!(!a.store(&late).expect("store"));
}

#[test]
fn an_embedded_relays_files_move_with_it() {
    let (_pg, opts) = db();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path().join("discovery");
    let embedded = [
        crate::discovery::publish::publish_day(&files, DAY, vec![1, 2, 3], 30).expect("day 1"),
        crate::discovery::publish::publish_day(&files, DAY + 1, vec![2, 3, 4], 30).expect("day 2"),
    ];
    let whole = crate::discovery::publish::whole_files(&files).expect("files");
    let admin = node(&opts, "admin");
    assert_eq!(admin.import_published(&whole).expect("import"), 5);
    assert_eq!(admin.import_published(&whole).expect("again"), 0, "kept");

    // A node serves what the embedded relay served, and publishes nothing that day.
    let clock = Arc::new(ManualClock::new(START + DAY_MS));
    let c = DiscoveryConfig::default();
    let a = start(&opts, "a", dir.path(), &clock, &c);
    a.d.republish().expect("loads");
    for since in [0, DAY] {
        let served = embedded[1].part(since, 0, 0).expect("embedded part");
        assert_eq!(
            fetch(&a.d, since),
            (served.kind, served.day, served.data.to_vec())
        );
    }
    assert_eq!(count(&a.pg, 1).len(), 2);
    // The next day's delta starts from the embedded relay's key list.
    clock.advance(Duration::from_millis(DAY_MS));
    a.d.republish().expect("publishes");
    // (Served as the snapshot, which is smaller here: read it from the table.)
    let stored = a.pg.load().expect("load").expect("stored");
    assert_eq!(stored.version.day, DAY + 2);
    let delta = FilterDelta::decode(stored.deltas.last().expect("a delta")).expect("delta");
    assert_eq!(
        (delta.base_day, delta.day, delta.removed),
        (DAY + 1, DAY + 2, vec![2, 3, 4])
    );
    // A stale mark (tags changed behind the files) moves nothing.
    crate::discovery::publish::mark_stale(&files).expect("stale");
    assert!(crate::discovery::publish::whole_files(&files)
        .expect("files")
        .is_empty());
}
