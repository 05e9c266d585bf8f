//! Store-and-forward: offline queues, online pushes, acks, restarts.

use crate::support::{envelope, files_under, number, register, within, Device, RelayProcess};
use tern_client::net::Incoming;
use tern_relay::store::{LogOptions, LogStore, MailboxStore, SledStore};

#[tokio::test]
async fn offline_recipient_receives_everything_in_order_on_connect() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;

    // Pipelined single sends and one batch, all while Bob is offline.
    let singles = (0..50).map(|i| alice.conn.send(&bob_addr, [envelope(i)]));
    for accepted in within(futures::future::join_all(singles)).await {
        assert_eq!(accepted.unwrap(), 1);
    }
    assert_eq!(
        within(alice.conn.send(&bob_addr, (50..100).map(envelope)))
            .await
            .unwrap(),
        50
    );

    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 100);
    let got = bob.drain().await;
    let numbers: Vec<u32> = got.iter().map(number).collect();
    // Sends pipelined on one connection are stored in the order they were sent.
    assert_eq!(numbers, (0..100).collect::<Vec<_>>());
    assert!(
        got.windows(2).all(|w| w[0].seq < w[1].seq),
        "delivered in relay order"
    );
    assert_eq!(got[7].payload, envelope(number(&got[7])).payload);
}

#[tokio::test]
async fn online_recipient_gets_a_push_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty, "nothing queued yet");

    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();
    let d = bob.next_delivery().await;
    assert_eq!(number(&d), 1);
    within(alice.conn.send(&bob.address, [envelope(2), envelope(3)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 2);
    assert_eq!(number(&bob.next_delivery().await), 3);
}

#[tokio::test]
async fn ack_deletes_and_the_store_is_empty_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&bob.address, (0..20).map(envelope)))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    for _ in 0..20 {
        seqs.push(bob.next_delivery().await.seq);
    }
    assert_eq!(within(bob.conn.ack(&seqs)).await.unwrap(), 20);
    assert_eq!(
        within(bob.conn.ack(&seqs)).await.unwrap(),
        0,
        "a second ack deletes nothing"
    );
    assert_eq!(
        bob.reconnect(&relay.address).await,
        0,
        "nothing queued after acks"
    );
    drop((alice, bob));

    relay.stop().unwrap();
    // Not a byte of any envelope is left in any file.
    for file in files_under(&data) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(12).any(|w| w == b"ciphertext #"),
            "envelope bytes in {}",
            file.display()
        );
    }
    let options = LogOptions {
        background: false,
        ..LogOptions::default()
    };
    let log = LogStore::open(&data.join("mailboxes"), options).unwrap();
    assert_eq!(log.count_messages(), 0, "no message left in the log");
    assert!(
        log.expired(u64::MAX, 10).unwrap().is_empty(),
        "no expiry entries left"
    );
    let db = SledStore::open(&data.join("db"), 8 << 20).unwrap();
    assert_eq!(db.count_messages().unwrap(), 0, "none in the database");
}

#[tokio::test]
async fn a_restarted_relay_delivers_what_was_queued_and_not_what_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&bob.address, (0..10).map(envelope)))
        .await
        .unwrap();
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(bob.next_delivery().await);
    }
    // Bob acknowledges the first four only.
    let acked: Vec<u64> = first[..4].iter().map(|d| d.seq).collect();
    assert_eq!(within(bob.conn.ack(&acked)).await.unwrap(), 4);
    let fingerprint = relay.address.fingerprint;
    let (bob_addr, bob_key, bob_id) = bob.go_offline().await;
    drop(alice);
    relay.stop().unwrap();

    let relay = RelayProcess::start(&data, &[]).unwrap();
    assert_eq!(
        relay.address.fingerprint, fingerprint,
        "same certificate after a restart"
    );
    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 6);
    let again: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(again, (4..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn acknowledged_sends_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &["--durability", "fsync"]).unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;

    // 200 sends in flight at once, each answered only once durable.
    let sends = (0..200).map(|i| alice.conn.send(&bob_addr, [envelope(i)]));
    for accepted in within(futures::future::join_all(sends)).await {
        assert_eq!(accepted.unwrap(), 1);
    }
    relay.crash().unwrap();

    let relay = RelayProcess::start(&data, &[]).unwrap();
    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(
        queued, 200,
        "every acknowledged send is still there after kill -9"
    );
    let mut got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    got.sort_unstable();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}
