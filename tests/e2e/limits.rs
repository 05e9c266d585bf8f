//! Per-account limits on a real relay process, configured through its TOML file: the
//! send rate and the device cap, as a client sees them over QUIC.

use std::time::Duration;

use crate::support::{envelope, number, register, within, RelayProcess};
use tern_client::identity::DeviceKeyPair;
use tern_client::net::RelayConnection;
use tern_client::ErrorCode;

fn relay_with(dir: &std::path::Path, rate_limits: &str) -> RelayProcess {
    let config = dir.join("relay.toml");
    std::fs::write(&config, format!("[rate_limits]\n{rate_limits}")).unwrap();
    RelayProcess::start(&dir.join("relay"), &["--config", config.to_str().unwrap()]).unwrap()
}

#[tokio::test]
async fn sends_past_the_account_rate_are_refused_with_a_retry_time() {
    let dir = tempfile::tempdir().unwrap();
    // Four envelopes, refilled at one per 500 ms.
    let relay = relay_with(dir.path(), "sends_per_account = \"4/2s\"\n");
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    within(alice.conn.send(&bob.address, (0..4).map(envelope)))
        .await
        .unwrap();
    let refused = within(alice.conn.send(&bob.address, [envelope(4)]))
        .await
        .unwrap_err();
    assert_eq!(refused.relay_code(), Some(ErrorCode::RateLimited));
    let wait = refused.retry_after().expect("a retry time");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(500),
        "{wait:?}"
    );
    // Bob is not slowed by Alice's rate.
    within(bob.conn.send(&alice.address, [envelope(9)]))
        .await
        .unwrap();
    // At the advised time the same send is taken (the relay's clock is real here;
    // the unit tests move a manual one).
    tokio::time::sleep(wait).await;
    within(alice.conn.send(&bob.address, [envelope(4)]))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(number(&bob.next_delivery().await));
    }
    assert_eq!(
        got,
        vec![0, 1, 2, 3, 4],
        "every accepted send, none refused"
    );
}

#[tokio::test]
async fn devices_are_capped_and_added_only_by_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), "max_devices_per_account = 2\n");
    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;
    let account = bob.address.account;

    // Not from a connection that is not authenticated, even with Bob's identity.
    let (anon, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    let key = DeviceKeyPair::generate().public();
    let err = within(anon.add_device(&bob.identity, &account, &key))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    // Nor from another account's device.
    let err = within(alice.conn.add_device(&bob.identity, &account, &key))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));

    // Bob's own device adds one; the third is past the cap.
    let second = within(bob.conn.add_device(&bob.identity, &account, &key))
        .await
        .unwrap();
    assert_ne!(second, bob.address.device);
    let third = DeviceKeyPair::generate().public();
    let err = within(bob.conn.add_device(&bob.identity, &account, &third))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::QuotaExceeded));
    // Bob's account still works, with its two devices.
    let token = [3u8; 32];
    within(bob.conn.set_delivery_token(&token)).await.unwrap();
    let mut ids = within(anon.list_devices(&account, &token)).await.unwrap();
    ids.sort();
    assert_eq!(ids, vec![bob.address.device, second]);
}
