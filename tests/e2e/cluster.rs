//! Several relay nodes over one real PostgreSQL database: a message sent on one node
//! is pushed from another, a newer connection on any node displaces the older, acks
//! on one node delete what another stored, and the database's failures are
//! UNAVAILABLE, never a lost or invented acknowledgement.

use std::time::{Duration, Instant};

use tern_client::net::Incoming;
use tern_proto::ErrorCode;

use crate::admin;
use crate::support::{
    envelope, number, pg_node, register, send_until_stored, within, Device, PgNodes,
};

/// One database (fsync on, as in production) for the nodes of a test.
fn nodes() -> PgNodes {
    PgNodes::start(&[("fsync", "on")])
}

#[tokio::test]
async fn a_send_on_one_node_is_pushed_from_another_at_once() {
    let nodes = nodes();
    // A re-check a minute apart: a push within the test's step came by notification.
    let a = nodes.start_node("a", "recheck_interval = \"60s\"", None);
    let b = nodes.start_node("b", "recheck_interval = \"60s\"", Some(&a));
    assert_eq!(
        a.address.fingerprint, b.address.fingerprint,
        "one certificate"
    );
    let alice = register(&a.address).await;
    let (bob_addr, bob_key, bob_id) = register(&a.address).await.go_offline().await;
    let (mut bob, queued) = Device::connect(&b.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 0);
    assert_eq!(bob.next().await, Incoming::QueueEmpty);

    let mut latencies = Vec::new();
    for i in 0..20 {
        let sent = Instant::now();
        within(alice.conn.send(&bob.address, [envelope(i)]))
            .await
            .expect("send on a");
        let d = bob.next_delivery().await;
        latencies.push(sent.elapsed());
        assert_eq!(number(&d), i);
        within(bob.conn.ack(&[d.seq])).await.expect("ack on b");
    }
    latencies.sort();
    println!(
        "cross-node send→push over 20 messages: p50 {:?}, max {:?}",
        latencies[10], latencies[19]
    );
    assert!(latencies[19] < Duration::from_secs(10), "{latencies:?}");
    // b pushed them from the rows a's hints carried, without reading the mailbox
    // (all but the first: bob's first read could not know the seq before it).
    let metrics = admin::samples(&admin::scrape(&admin::admin_addr(&b)));
    let carried = admin::value(&metrics, "tern_carried_deliveries_total");
    assert!(carried >= 15.0, "{carried} of 20 pushed from carried rows");
}

#[tokio::test]
async fn without_notifications_the_recheck_still_delivers() {
    let nodes = nodes();
    let extra = "notify = false\nrecheck_interval = \"200ms\"";
    let a = nodes.start_node("a", extra, None);
    let b = nodes.start_node("b", extra, Some(&a));
    let alice = register(&a.address).await;
    let (bob_addr, bob_key, bob_id) = register(&a.address).await.go_offline().await;
    let (mut bob, _) = Device::connect(&b.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&bob.address, [envelope(7)]))
        .await
        .expect("send on a");
    assert_eq!(number(&bob.next_delivery().await), 7);
    // Neither node listens (nor notifies): `notify = false` is for engines without
    // LISTEN/NOTIFY, where a LISTEN would fail.
    let listening = nodes
        .count(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND (query LIKE 'LISTEN%' OR query LIKE '%pg_notify%')",
        )
        .await;
    assert_eq!(listening, 0, "no node uses LISTEN/NOTIFY");
}

#[tokio::test]
async fn a_newer_connection_on_another_node_displaces_the_older() {
    let nodes = nodes();
    let a = nodes.start_node("a", "", None);
    let b = nodes.start_node("b", "", Some(&a));
    let bob = register(&a.address).await;
    let (bob_addr, bob_key, bob_id) = (bob.address, bob.key.clone(), bob.identity.clone());
    let (on_b, _) = Device::connect(&b.address, bob_addr, bob_key, bob_id).await;
    let reason = within(bob.conn.closed()).await;
    assert!(reason.to_string().contains("displaced"), "{reason}");
    assert!(!on_b.conn.is_closed(), "the newer connection stays");
}

#[tokio::test]
async fn acks_on_one_node_delete_what_another_stored_and_a_restart_serves_the_rest() {
    let nodes = nodes();
    let mut a = nodes.start_node("a", "", None);
    let b = nodes.start_node("b", "", Some(&a));
    let alice = register(&a.address).await;
    let (bob_addr, bob_key, bob_id) = register(&a.address).await.go_offline().await;
    within(alice.conn.send(&bob_addr, (0..10).map(envelope)))
        .await
        .expect("send on a");
    alice.conn.close().await;

    let (mut bob, queued) =
        Device::connect(&b.address, bob_addr, bob_key.clone(), bob_id.clone()).await;
    assert_eq!(queued, 10);
    let got = bob.drain().await;
    assert_eq!(
        got.iter().map(number).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let first: Vec<u64> = got[..4].iter().map(|d| d.seq).collect();
    within(bob.conn.ack(&first)).await.expect("ack on b");
    bob.conn.close().await;

    // Node a, restarted, serves what is left from the database.
    a.stop().expect("stop a");
    let a = nodes.start_node("a", "", None);
    let (mut bob, queued) = Device::connect(&a.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 6, "the acks on b deleted four");
    let rest: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(rest, (4..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_node_with_other_keys_is_refused_naming_the_file() {
    let nodes = nodes();
    let _a = nodes.start_node("a", "", None);
    // No files copied: b makes its own certificate and keys.
    let err = nodes
        .try_start_node("b", "", None, &[])
        .err()
        .expect("b must not start");
    let text = format!("{err:#}");
    assert!(text.contains("relay-cert.pem"), "{text}");
}

#[tokio::test]
async fn a_database_down_at_start_is_named() {
    let nodes = nodes();
    let missing = nodes.dir.path().join("no-database-here");
    std::fs::create_dir_all(&missing).expect("dir");
    let url = format!("host={} dbname=tern user=tern", missing.display());
    let extra = "connect_timeout = \"500ms\"";
    let err = pg_node(&nodes.data_dir("a"), &url, extra, None, &[], None, &[])
        .err()
        .expect("no database, no start");
    let text = format!("{err:#}");
    assert!(text.contains("PostgreSQL"), "{text}");
    assert!(text.contains("no-database-here"), "{text}");
}

#[tokio::test]
async fn a_database_lost_while_serving_fails_sends_unavailable_and_recovers_by_itself() {
    let nodes = nodes();
    let a = nodes.start_node(
        "a",
        "statement_timeout = \"1s\"\nconnect_timeout = \"500ms\"",
        None,
    );
    let alice = register(&a.address).await;
    let (bob_addr, bob_key, bob_id) = register(&a.address).await.go_offline().await;
    within(alice.conn.send(&bob_addr, [envelope(1)]))
        .await
        .expect("send");

    nodes.pg.kill();
    let err = within(alice.conn.send(&bob_addr, [envelope(2)]))
        .await
        .expect_err("no database, no acknowledgement");
    assert_eq!(err.relay_code(), Some(ErrorCode::Unavailable), "{err}");

    nodes.pg.restart();
    let next = send_until_stored(&alice.conn, &bob_addr, 3, Duration::from_millis(200)).await;
    // Only what was acknowledged is delivered: #1 and the send that succeeded.
    let (mut bob, queued) = Device::connect(&a.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 2);
    let got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(got, vec![1, next]);
    // The outage was logged once (or once more if a broken pooled connection failed
    // a call after the restart), not per connection or per call.
    let log = std::fs::read_to_string(&a.log).expect("log");
    assert!(!log.contains("deadpool"), "{log}");
    assert!(
        (1..=2).contains(&log.matches("PostgreSQL unreachable").count()),
        "{log}"
    );
}

#[tokio::test]
async fn a_stopped_node_leaves_no_claim_lease_or_heartbeat_behind() {
    let nodes = nodes();
    let extra = "node_id = \"node-a\"\n[expiry]\nsweep_interval = \"200ms\"";
    let mut a = nodes.start_node("a", extra, None);
    // Connected while the node stops.
    let _bob = register(&a.address).await;
    nodes
        .until_some("SELECT count(*) FROM device_sessions WHERE node LIKE 'node-a#%'")
        .await;
    nodes
        .until_some("SELECT count(*) FROM leases WHERE holder LIKE 'node-a#%'")
        .await;
    nodes
        .until_some("SELECT count(*) FROM nodes WHERE node LIKE 'node-a#%'")
        .await;
    // SIGTERM: the node ends its cluster tasks and gives up all it held, so a node
    // started at once (under the same name or another) takes over without waiting
    // for anything to lapse.
    a.stop().expect("stop a");
    for sql in [
        "SELECT count(*) FROM device_sessions WHERE node LIKE 'node-a#%'",
        "SELECT count(*) FROM leases WHERE holder LIKE 'node-a#%'",
        "SELECT count(*) FROM nodes WHERE node LIKE 'node-a#%'",
    ] {
        assert_eq!(nodes.count(sql).await, 0, "{sql}");
    }
}
