//! The async `Client` end to end: real relay process, real QUIC, sled device stores.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_client::store::SledKv;
use tern_client::{Client, Event, Events, ReceivedMessage};
use tern_proto::address::RelayAddress;

use crate::support::{within, RelayProcess};

fn store(dir: &Path, name: &str) -> Arc<SledKv> {
    Arc::new(SledKv::open(&dir.join(name), &[7u8; 32]).expect("device store"))
}

/// Waits for the next event matching `pick`, skipping the rest.
async fn next_match<T>(events: &mut Events, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    within(async {
        loop {
            let e = events.recv().await.expect("events ended");
            if let Some(t) = pick(e) {
                return t;
            }
        }
    })
    .await
}

async fn next_message(events: &mut Events) -> ReceivedMessage {
    next_match(events, |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await
}

async fn pair(relay: &RelayAddress, dir: &Path) -> ((Client, Events), (Client, Events)) {
    let alice = Client::register(relay, store(dir, "alice"))
        .await
        .expect("alice");
    let bob = Client::register(relay, store(dir, "bob"))
        .await
        .expect("bob");
    (alice, bob)
}

#[tokio::test]
async fn two_clients_talk_sealed_and_survive_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, mut alice_events), (bob, mut bob_events)) = pair(&relay.address, dir.path()).await;

    // Alice has Bob's card: sealed from the first message.
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice
        .send(&bob.account(), b"hello bob")
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.body, b"hello bob");
    assert_eq!(m.sender, alice.account());
    bob.confirm(m.seq).await.expect("confirm");

    // Bob writes back without a card: Alice's token came inside her message.
    bob.send(&alice.account(), b"hi alice").await.expect("send");
    let m = next_message(&mut alice_events).await;
    assert_eq!(m.body, b"hi alice");
    alice.confirm(m.seq).await.expect("confirm");
    assert_eq!(
        alice.safety_number(&bob.account()).await,
        bob.safety_number(&alice.account()).await
    );

    // Bob restarts; Alice writes while he is away; nothing is lost or doubled.
    let bob_account = bob.account();
    bob.shutdown().await;
    drop(bob);
    for i in 0..5 {
        alice
            .send(&bob_account, format!("while away {i}").as_bytes())
            .await
            .expect("send");
    }
    let (bob, mut bob_events) = Client::open(store_reopen(dir.path(), "bob"))
        .await
        .expect("reopen");
    for i in 0..5 {
        let m = next_message(&mut bob_events).await;
        assert_eq!(m.body, format!("while away {i}").as_bytes());
        bob.confirm(m.seq).await.expect("confirm");
    }
    bob.send(&alice.account(), b"back").await.expect("send");
    assert_eq!(next_message(&mut alice_events).await.body, b"back");
    alice.shutdown().await;
    bob.shutdown().await;
}

fn store_reopen(dir: &Path, name: &str) -> Arc<SledKv> {
    // sled releases its lock asynchronously after the last handle drops.
    for _ in 0..100 {
        if let Ok(kv) = SledKv::open(&dir.join(name), &[7u8; 32]) {
            return Arc::new(kv);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("device store stayed locked");
}
