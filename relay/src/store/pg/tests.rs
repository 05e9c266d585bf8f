#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use super::cluster::Fact;
use super::*;

use super::testdb::{db, node};

#[test]
fn two_nodes_open_at_once_and_share_the_schema() {
    let (_pg, opts) = db();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| node(&opts, "a"));
        let b = s.spawn(|| node(&opts, "b"));
        (a.join().expect("a"), b.join().expect("b"))
    });
    for backend in [&a, &b] {
        let versions: i64 =
            super::testdb::sql(backend, "SELECT count(*) FROM refinery_schema_history")[0].get(0);
        assert!(versions >= 1);
    }
}

#[test]
fn a_database_that_is_not_there_at_start_is_unavailable_naming_its_hosts() {
    let dir = tempfile::Builder::new()
        .prefix("tern-pg-none-")
        .tempdir_in("/tmp")
        .expect("dir");
    let mut opts = PgOptions::new(format!(
        "host={} port=5432 user=tern dbname=tern",
        dir.path().display()
    ));
    opts.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = PgBackend::open(&opts).expect_err("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(5));
    match err {
        StoreError::Unavailable(m) => {
            assert!(m.contains("PostgreSQL"), "{m}");
            assert!(m.contains(&dir.path().display().to_string()), "{m}");
        }
        e => panic!("want Unavailable, got {e:?}"),
    }
}

#[test]
fn a_password_in_the_url_never_shows_in_errors() {
    let dir = tempfile::Builder::new()
        .prefix("tern-pg-none-")
        .tempdir_in("/tmp")
        .expect("dir");
    let mut opts = PgOptions::new(format!(
        "host={} user=tern password=hunter2secret dbname=tern",
        dir.path().display()
    ));
    opts.connect_timeout = Duration::from_millis(300);
    let err = PgBackend::open(&opts).expect_err("nothing listens");
    assert!(!format!("{err} {err:?}").contains("hunter2secret"));
    assert!(!format!("{opts:?}").contains("hunter2secret"));
}

#[test]
fn a_database_lost_while_serving_is_unavailable_then_recovers_by_itself() {
    let (pg, opts) = db();
    let a = node(&opts, "a");
    assert!(a.try_hold("x", Duration::from_secs(60)).expect("hold"));
    pg.kill();
    let started = Instant::now();
    let err = a
        .try_hold("x", Duration::from_secs(60))
        .expect_err("database is down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the deadline"
    );
    pg.restart();
    // The pool drops the broken connections and connects afresh: no reopen.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match a.try_hold("x", Duration::from_secs(60)) {
            Ok(held) => {
                assert!(held);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_lease_has_one_holder_and_passes_on_when_it_lapses() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let ttl = Duration::from_millis(400);
    assert!(a.try_hold("sweep", ttl).expect("a"));
    assert!(!b.try_hold("sweep", ttl).expect("b"));
    assert!(a.try_hold("sweep", ttl).expect("a renews"));
    assert!(b.try_hold("other", ttl).expect("another lease"));
    std::thread::sleep(ttl + Duration::from_millis(200));
    assert!(b.try_hold("sweep", ttl).expect("b after the lapse"));
    assert!(!a.try_hold("sweep", ttl).expect("a lost it"));
    b.release("sweep").expect("release");
    assert!(a.try_hold("sweep", ttl).expect("a after the release"));
}

#[test]
fn cluster_facts_are_recorded_once_and_a_differing_node_is_refused() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let fact = |v: &[u8]| Fact {
        name: "cert",
        value: v.to_vec(),
        file: "/data/cert.pem".into(),
    };
    a.check_cluster(&[fact(b"one")]).expect("first");
    b.check_cluster(&[fact(b"one")]).expect("same");
    match b.check_cluster(&[fact(b"two")]) {
        Err(StoreError::Backend(m)) => assert!(m.contains("/data/cert.pem"), "{m}"),
        r => panic!("want a refusal, got {r:?}"),
    }
}

#[test]
fn a_cluster_fact_is_replaced_only_from_the_value_it_holds() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    assert!(a
        .replace_cluster_fact("tls", b"old", b"new")
        .expect("absent: set"));
    assert!(b
        .replace_cluster_fact("tls", b"old", b"new")
        .expect("already new"));
    // Another node switched from the same old value to its own certificate.
    assert!(!b
        .replace_cluster_fact("tls", b"old", b"other")
        .expect("refused"));
    assert!(a
        .replace_cluster_fact("tls", b"new", b"newer")
        .expect("moved on"));
    let fact = Fact {
        name: "tls",
        value: b"newer".to_vec(),
        file: "cert".into(),
    };
    b.check_cluster(&[fact])
        .expect("the cluster holds the last one");
}

#[test]
fn calls_work_from_plain_threads_and_both_kinds_of_runtime() {
    let (_pg, opts) = db();
    let a = std::sync::Arc::new(node(&opts, "a"));
    let hold = |b: &PgBackend| b.try_hold("t", Duration::from_secs(5)).expect("hold");
    assert!(hold(&a));
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let b = a.clone();
    assert!(current.block_on(async move { hold(&b) }));
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let b = a.clone();
    assert!(multi
        .block_on(async move { tokio::spawn(async move { hold(&b) }).await })
        .expect("task"));
    // Dropped on a runtime thread: no panic.
    multi.block_on(async move { drop(a) });
}

#[test]
fn provisioning_slots_keep_the_rules_and_their_bound_across_two_nodes() {
    use crate::store::{ProvisioningStore, SlotOpen, SlotTake};
    use tern_proto::{AccountId, DeviceId};
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    crate::store::conformance::slot_rules(&a);
    // A relay on the database keeps its slots there, where every node sees them.
    let b = std::sync::Arc::new(b);
    let stores = crate::store::Stores::postgres(b.clone());
    assert_eq!(
        stores
            .provisioning
            .open(&[99; 16], &[9; 32], 10, 0, 100)
            .expect("open"),
        SlotOpen::Opened
    );
    assert_eq!(
        a.open(&[99; 16], &[9; 32], 10, 0, 100).expect("open"),
        SlotOpen::Exists
    );
    drop(stores);
    let b = &*b;
    a.sweep(u64::MAX / 2, 100).expect("empty it");
    // Sixteen opens at once from two nodes under a bound of five: five open.
    const MAX: usize = 5;
    let start = std::sync::Barrier::new(16);
    let opened: Vec<SlotOpen> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..16u8)
            .map(|i| {
                let (start, on) = (&start, if i % 2 == 0 { &a } else { b });
                s.spawn(move || {
                    start.wait();
                    on.open(&[100 + i; 16], &[i; 32], 10_000, 0, MAX)
                        .expect("open")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let n = |want: SlotOpen| opened.iter().filter(|o| **o == want).count();
    assert_eq!((n(SlotOpen::Opened), n(SlotOpen::Full)), (MAX, 16 - MAX));
    let count: i64 = super::testdb::sql(&a, "SELECT count(*) FROM provisioning_slots")[0].get(0);
    assert_eq!(count, MAX as i64);
    // Opened on a, deposited through b, taken through both at once: one payload.
    let slot = (0..16u8)
        .find(|i| opened[usize::from(*i)] == SlotOpen::Opened)
        .expect("one opened");
    let (id, reader) = ([100 + slot; 16], [slot; 32]);
    assert!(b
        .deposit(
            &id,
            &AccountId([9; 16]),
            DeviceId::new(2).expect("id"),
            b"sealed",
            5
        )
        .expect("deposit"));
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| a.take(&id, &reader, 6).expect("a"));
        let y = s.spawn(|| b.take(&id, &reader, 6).expect("b"));
        (x.join().expect("a"), y.join().expect("b"))
    });
    let mut got = [x, y];
    got.sort_by_key(|t| matches!(t, SlotTake::Missing));
    assert_eq!(
        got,
        [SlotTake::Payload(b"sealed".to_vec()), SlotTake::Missing]
    );
}
