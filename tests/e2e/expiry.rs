//! Expiry with a moved clock. The relay runs in-process here, because only a test
//! can move its clock; everything else is as in production: QUIC on loopback, sled on
//! disk, the background sweeper.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{envelope, number, register, within, Device};
use tern_platform::clock::ManualClock;
use tern_relay::config::Config;
use tern_relay::Relay;

const DAY: Duration = Duration::from_secs(86_400);

async fn relay(dir: &std::path::Path, ttl: Duration, clock: Arc<ManualClock>) -> Relay {
    let mut config = Config {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.expiry.message_ttl = ttl;
    config.expiry.sweep_interval = Duration::from_millis(50);
    Relay::start(&config, clock).await.unwrap()
}

/// Polls until `check` holds, failing after a bounded number of tries.
async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached in time");
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let relay = relay(dir.path(), Duration::from_secs(30 * 86_400), clock.clone()).await;
    let alice = register(relay.address()).await;
    let (bob_addr, bob_key, bob_id) = register(relay.address()).await.go_offline().await;

    within(alice.conn.send(&bob_addr, (0..3).map(envelope)))
        .await
        .unwrap();
    clock.advance(29 * DAY);
    within(alice.conn.send(&bob_addr, [envelope(3)]))
        .await
        .unwrap();
    clock.advance(DAY);

    // The first three are exactly 30 days old: expired, whether or not swept yet.
    let (mut bob, _) = Device::connect(relay.address(), bob_addr, bob_key, bob_id).await;
    let got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(got, vec![3]);

    // The background sweeper deletes them; the fourth stays until it expires too.
    eventually(async || bob.reconnect(relay.address()).await == 1).await;
    assert_eq!(number(&bob.next_delivery().await), 3);
    // Accepted on day 29, it expires on day 59.
    clock.advance(28 * DAY);
    assert_eq!(bob.reconnect(relay.address()).await, 1);
    clock.advance(DAY);
    eventually(async || bob.reconnect(relay.address()).await == 0).await;
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_operator_may_keep_messages_for_less() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let relay = relay(dir.path(), DAY, clock.clone()).await;
    let alice = register(relay.address()).await;
    let (bob_addr, bob_key, bob_id) = register(relay.address()).await.go_offline().await;
    within(alice.conn.send(&bob_addr, [envelope(1)]))
        .await
        .unwrap();
    clock.advance(DAY - Duration::from_secs(1));
    let (mut bob, queued) = Device::connect(relay.address(), bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 1);
    let d = bob.next_delivery().await;
    assert_eq!(d.expires_at_ms - d.accepted_at_ms, DAY.as_millis() as u64);
    clock.advance(Duration::from_secs(1));
    eventually(async || bob.reconnect(relay.address()).await == 0).await;
    relay.shutdown().await.unwrap();
}
