//! Send and intake limits, on a moved clock.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::RateLimitsConfig;
use crate::core::delivery::DeliveryWindow;
use crate::core::limits::Limits;
use crate::error::Error;
use crate::testing::{device, fixture_with, msgs, Fixture};

fn retry(r: crate::Result<usize>) -> u64 {
    match r {
        Err(Error::RateLimited { retry_after_ms }) => retry_after_ms,
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
}

fn rates(f: impl FnOnce(&mut RateLimitsConfig)) -> RateLimitsConfig {
    let mut r = RateLimitsConfig::default();
    f(&mut r);
    r
}

async fn queued(f: &Fixture, d: &crate::core::auth::AuthenticatedDevice) -> usize {
    let pull = f
        .services
        .mailboxes()
        .pull(d, &mut DeliveryWindow::new(10_000))
        .expect("pull");
    pull.messages.len()
}

#[tokio::test]
async fn sends_are_limited_per_sender_account_and_recover() {
    let f = fixture_with(
        Limits::default(),
        &rates(|r| r.sends_per_account = "6/1m".parse().expect("rate")),
    );
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let to = *bob.address();
    assert_eq!(f.send(&alice, to, &msgs(0..4, 8)).await.expect("4 of 6"), 4);
    // Envelopes count, all or nothing: three do not fit, two do.
    assert_eq!(retry(f.send(&alice, to, &msgs(4..7, 8)).await), 10_000);
    assert_eq!(f.send(&alice, to, &msgs(4..6, 8)).await.expect("2 more"), 2);
    let wait = retry(f.send(&alice, to, &msgs(6..7, 8)).await);
    assert_eq!(wait, 10_000, "one envelope refills every 10 s");
    f.send(&bob, *alice.address(), &msgs(0..1, 8))
        .await
        .expect("Bob's sends are his own");
    f.clock.advance(Duration::from_millis(wait));
    f.send(&alice, to, &msgs(6..7, 8))
        .await
        .expect("after the wait");
    assert_eq!(queued(&f, &bob).await, 7, "nothing refused was stored");
}

#[tokio::test]
async fn sealed_sends_are_limited_per_token_and_per_address() {
    let f = fixture_with(
        Limits::default(),
        &rates(|r| {
            r.sealed_sends_per_token = "5/1m".parse().expect("rate");
            r.sealed_sends_per_prefix = "6/1m".parse().expect("rate");
        }),
    );
    let (bob, carol) = (device(&f, 2).await, device(&f, 3).await);
    let token = [7u8; 32];
    for d in [&bob, &carol] {
        let hash: [u8; 32] = Sha256::digest(token).into();
        f.services
            .accounts()
            .set_delivery_token(d, &hash)
            .await
            .expect("token");
    }
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let (bob_to, carol_to) = (*bob.address(), *carol.address());
    // Bob's token: five envelopes a minute, whoever sends them.
    f.sealed_send_from(a, bob_to, &token, &msgs(0..3, 8))
        .await
        .expect("3");
    f.sealed_send_from(b, bob_to, &token, &msgs(3..5, 8))
        .await
        .expect("5");
    let wait = retry(f.sealed_send_from(b, bob_to, &token, &msgs(5..6, 8)).await);
    assert_eq!(wait, 12_000, "Bob's token");
    // Address a: six a minute, whoever they go to; three went to Bob.
    f.sealed_send_from(a, carol_to, &token, &msgs(0..3, 8))
        .await
        .expect("6 from a");
    let wait_a = retry(
        f.sealed_send_from(a, carol_to, &token, &msgs(3..4, 8))
            .await,
    );
    assert_eq!(wait_a, 10_000, "address a");
    f.sealed_send_from(b, carol_to, &token, &msgs(3..4, 8))
        .await
        .expect("address b and Carol's token have room");
    f.clock.advance(Duration::from_millis(wait));
    f.sealed_send_from(b, bob_to, &token, &msgs(5..6, 8))
        .await
        .expect("Bob's token refilled");
    f.sealed_send_from(a, carol_to, &token, &msgs(4..5, 8))
        .await
        .expect("address a refilled");
    assert_eq!(queued(&f, &bob).await, 6);
    assert_eq!(queued(&f, &carol).await, 5);
}

#[tokio::test]
async fn a_flooded_mailbox_still_accepts_its_contacts_messages() {
    let f = fixture_with(
        Limits::default(),
        &rates(|r| {
            r.intake_per_sender_per_mailbox = "10/1day".parse().expect("rate");
            r.intake_above_queued = 20;
        }),
    );
    let bob = device(&f, 2).await;
    let to = *bob.address();
    let stranger = device(&f, 9).await;
    // Below 20 queued nothing is counted; from there the stranger has ten.
    let mut flood = 0;
    let refused = loop {
        match f.send(&stranger, to, &msgs(flood..flood + 1, 8)).await {
            Ok(_) => flood += 1,
            Err(e) => break e,
        }
        assert!(flood < 90, "the flood was never stopped");
    };
    assert_eq!(flood, 30);
    let wait = match refused {
        Error::RateLimited { retry_after_ms } => retry_after_ms,
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    };
    assert_eq!(wait, 8_640_000, "one a day / 10");
    // Bob's contacts, each within its own ten: every message is taken.
    let (c1, c2) = (device(&f, 3).await, device(&f, 4).await);
    assert_eq!(f.send(&c1, to, &msgs(100..110, 8)).await.expect("c1"), 10);
    for i in 110..120 {
        f.send(&c2, to, &msgs(i..i + 1, 8)).await.expect("c2");
    }
    // A sealed sender from its own address, too.
    let token = [7u8; 32];
    f.set_token(&bob, &token).await;
    f.sealed_send_from([10, 0, 0, 3], to, &token, &msgs(120..125, 8))
        .await
        .expect("sealed contact");
    assert!(
        f.send(&c1, to, &msgs(130..131, 8)).await.is_err(),
        "each contact has a limit of its own"
    );
    assert!(f.send(&stranger, to, &msgs(90..91, 8)).await.is_err());
    assert_eq!(
        queued(&f, &bob).await,
        30 + 20 + 5,
        "all of them, nothing more"
    );
    // (The fixture's messages live an hour, less than the wait: they expire.)
    f.clock.advance(Duration::from_millis(wait));
    f.send(&stranger, to, &msgs(90..91, 8))
        .await
        .expect("one more after the wait");
}
