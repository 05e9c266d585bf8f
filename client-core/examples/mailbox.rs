//! A tour of the relay's store-and-forward over the wire: two devices register, one
//! sends while the other is offline, the other connects, drains its mailbox and
//! acknowledges, then gets a live push.
//!
//! ```text
//! cargo run --release -p tern-relay -- serve            # terminal 1: prints tern://…
//! cargo run -p tern-client --example mailbox -- tern://…  # terminal 2
//! ```
//!
//! Payloads here are opaque bytes handed to the relay as they are; the relay treats
//! every payload as ciphertext and never looks inside. End-to-end encryption is the
//! job of the client's session layer above this wire API.

use std::time::Instant;

use bytes::Bytes;
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::{Envelope, Incoming, RelayConnection};
use tern_proto::{MessageId, RelayAddress};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(arg) = std::env::args().nth(1) else {
        eprintln!("usage: mailbox tern://<fingerprint>@host:port[,host:port…]");
        std::process::exit(2);
    };
    let relay: RelayAddress = arg.parse()?;

    // Alice registers and stays connected.
    let (alice, _alice_inbox) = RelayConnection::connect(&relay).await?;
    let alice_addr = alice
        .register(&IdentityKeyPair::generate(), &DeviceKeyPair::generate())
        .await?;
    println!("alice registered as device {}", alice_addr.device.get());

    // Bob registers, then goes offline.
    let bob_key = DeviceKeyPair::generate();
    let bob_addr = {
        let (bob, _inbox) = RelayConnection::connect(&relay).await?;
        let addr = bob.register(&IdentityKeyPair::generate(), &bob_key).await?;
        bob.close().await;
        addr
    };
    println!("bob registered and went offline");

    // Alice sends three messages to offline Bob; each send returns once stored.
    let envelopes = (1..=3u8).map(|i| Envelope {
        message_id: MessageId(rand_id(i)),
        payload: Bytes::from(format!("opaque payload {i}")),
    });
    let accepted = alice.send(&bob_addr, envelopes).await?;
    println!("alice: relay stored {accepted} messages for bob");

    // Bob comes back: the relay pushes what it queued, in order.
    let (bob, mut inbox) = RelayConnection::connect(&relay).await?;
    let queued = bob.authenticate(&bob_addr, &bob_key).await?;
    println!("bob: back online, {queued} queued");
    let mut seqs = Vec::new();
    while let Some(incoming) = inbox.recv().await {
        match incoming? {
            Incoming::Delivery(d) => {
                println!("bob: got {:?}", String::from_utf8_lossy(&d.payload));
                seqs.push(d.seq);
            }
            Incoming::QueueEmpty => break,
        }
    }
    // Acknowledging deletes them from the relay.
    let deleted = bob.ack(&seqs).await?;
    println!("bob: acknowledged, relay deleted {deleted}");

    // Now online: a new message is pushed at once, no polling.
    let start = Instant::now();
    alice
        .send(
            &bob_addr,
            [Envelope {
                message_id: MessageId(rand_id(4)),
                payload: Bytes::from_static(b"live"),
            }],
        )
        .await?;
    if let Some(Ok(Incoming::Delivery(d))) = inbox.recv().await {
        println!(
            "bob: live push {:?} after {:?}",
            String::from_utf8_lossy(&d.payload),
            start.elapsed()
        );
        bob.ack(&[d.seq]).await?;
    }
    bob.close().await;
    alice.close().await;
    Ok(())
}

/// A message id: random, with a visible counter for the tour.
fn rand_id(i: u8) -> [u8; 16] {
    let mut id: [u8; 16] = rand::random();
    id[0] = i;
    id
}
