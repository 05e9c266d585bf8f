//! The key directory and sealed sends over the wire.

use tern_client::net::{KeyUpload, RelayConnection, SignedKey};
use tern_client::ErrorCode;
use tern_proto::v1;

use crate::support::{envelope, number, register, within, Device, RelayProcess};

fn upload(bob: &Device, spk_id: u32, one_time: std::ops::Range<u32>) -> KeyUpload {
    let dh: [u8; 32] = rand::random();
    let spk: [u8; 32] = rand::random();
    KeyUpload {
        identity_dh: Some(SignedKey {
            id: 0,
            key: dh,
            signature: bob.identity.certify_agreement_key(&dh),
        }),
        signed_prekey: Some(SignedKey {
            id: spk_id,
            key: spk,
            signature: bob.identity.certify_signed_prekey(spk_id, &spk),
        }),
        one_time: one_time.map(|id| (id, rand::random())).collect(),
    }
}

#[tokio::test]
async fn bundles_hand_out_each_one_time_prekey_once_even_to_concurrent_fetchers() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let bob = register(&relay.address).await;
    let keys = upload(&bob, 1, 0..40);
    assert_eq!(within(bob.conn.publish_keys(&keys)).await.unwrap(), 40);

    // Keys signed by someone else's identity are refused.
    let mallory = register(&relay.address).await;
    let mut forged = upload(&mallory, 2, 0..0);
    forged.identity_dh = None;
    let err = within(bob.conn.publish_keys(&forged)).await.unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));

    // Four contacts fetch Bob's bundle 12 times each, at the same time.
    let mut contacts = Vec::new();
    for _ in 0..4 {
        contacts.push(register(&relay.address).await);
    }
    let fetches = contacts
        .iter()
        .flat_map(|c| (0..12).map(|_| c.conn.fetch_keys(&bob.address.account, None)));
    let bundles: Vec<_> = within(futures::future::join_all(fetches))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let mut one_time: Vec<u32> = bundles
        .iter()
        .filter_map(|b| b[0].one_time_prekey.map(|(id, _)| id))
        .collect();
    assert_eq!(one_time.len(), 40, "48 fetches drain a pool of 40");
    one_time.sort_unstable();
    one_time.dedup();
    assert_eq!(one_time.len(), 40, "no one-time prekey handed out twice");
    for b in &bundles {
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].identity_key, bob.identity.public());
        assert_eq!(b[0].signed_prekey, keys.signed_prekey.unwrap());
        assert_eq!(b[0].identity_dh, keys.identity_dh.unwrap());
    }

    // Topping up and rotating work; fetching needs an authenticated connection.
    assert_eq!(
        within(bob.conn.publish_keys(&upload(&bob, 3, 100..105)))
            .await
            .unwrap(),
        5
    );
    let fresh = within(
        contacts[0]
            .conn
            .fetch_keys(&bob.address.account, Some(bob.address.device)),
    )
    .await
    .unwrap();
    assert_eq!(fresh[0].signed_prekey.id, 3);
    assert_eq!(fresh[0].one_time_prekey.map(|(id, _)| id), Some(100));
    let (anonymous, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    let err = within(anonymous.fetch_keys(&bob.address.account, None))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
}

#[tokio::test]
async fn sealed_sends_carry_no_sender_and_need_a_valid_delivery_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, tern_client::net::Incoming::QueueEmpty);
    let token: [u8; 32] = rand::random();
    within(bob.conn.set_delivery_token(&token)).await.unwrap();

    // A connection that never authenticates.
    let (anonymous, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    assert_eq!(
        within(anonymous.sealed_send(&bob.address, &token, [envelope(1)]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(number(&bob.next_delivery().await), 1);

    for bad in [&[0u8; 32][..], &token[..31], &[]] {
        let err = within(anonymous.sealed_send(&bob.address, bad, [envelope(2)]))
            .await
            .unwrap_err();
        assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    }
    // Rotating the token retires the old one.
    within(bob.conn.set_delivery_token(b"a new token"))
        .await
        .unwrap();
    let err = within(anonymous.sealed_send(&bob.address, &token, [envelope(3)]))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    within(anonymous.sealed_send(&bob.address, b"a new token", [envelope(4)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 4);
}

#[tokio::test]
async fn sender_certificates_verify_against_the_relays_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let issued = within(alice.conn.sender_certificate()).await.unwrap();
    let (anonymous, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    let relay_key = within(anonymous.relay_signing_key()).await.unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&relay_key).unwrap();
    key.verify_strict(
        &tern_proto::auth::sender_certificate(&issued.certificate),
        &ed25519_dalek::Signature::from_bytes(&issued.signature),
    )
    .unwrap();
    let cert: v1::SenderCertificate = prost::Message::decode(&issued.certificate[..]).unwrap();
    assert_eq!(&cert.account_id[..], alice.address.account.as_bytes());
    assert_eq!(&cert.identity_key[..], &alice.identity.public());
    // Only an authenticated device gets one.
    let err = within(anonymous.sender_certificate()).await.unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));

    // Another relay signs with another key.
    let other = RelayProcess::start(&dir.path().join("other"), &[]).unwrap();
    let (conn, _inbox) = within(RelayConnection::connect(&other.address))
        .await
        .unwrap();
    assert_ne!(within(conn.relay_signing_key()).await.unwrap(), relay_key);
}

#[tokio::test]
async fn a_contact_with_the_token_lists_devices_without_saying_who_asks() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let bob = register(&relay.address).await;
    let token = [5u8; 32];
    within(bob.conn.set_delivery_token(&token)).await.unwrap();
    let second = tern_client::identity::DeviceKeyPair::generate();
    let added = within(
        bob.conn
            .add_device(&bob.identity, &bob.address.account, &second.public()),
    )
    .await
    .unwrap();
    // An unauthenticated connection: only the token speaks for the asker.
    let (anon, _) = RelayConnection::connect(&relay.address).await.unwrap();
    let mut ids = within(anon.list_devices(&bob.address.account, &token))
        .await
        .unwrap();
    ids.sort();
    assert_eq!(ids, vec![bob.address.device, added]);
    let wrong = within(anon.list_devices(&bob.address.account, &[6u8; 32]))
        .await
        .unwrap_err();
    assert_eq!(wrong.relay_code(), Some(ErrorCode::Unauthorized));
    let nobody = tern_proto::AccountId([0xee; 16]);
    let unknown = within(anon.list_devices(&nobody, &token))
        .await
        .unwrap_err();
    assert_eq!(
        unknown.relay_code(),
        Some(ErrorCode::Unauthorized),
        "same answer: no account oracle"
    );
}

/// Starts a relay with `config` as its configuration file.
fn relay_with(dir: &std::path::Path, config: &str) -> RelayProcess {
    let file = dir.join("relay.toml");
    std::fs::write(&file, config).unwrap();
    RelayProcess::start(&dir.join("relay"), &["--config", file.to_str().unwrap()]).unwrap()
}

#[tokio::test]
async fn a_contact_with_the_token_fetches_keys_on_a_connection_that_never_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), "[connections]\nauth_deadline = \"1s\"\n");
    let bob = register(&relay.address).await;
    let keys = upload(&bob, 1, 0..5);
    within(bob.conn.publish_keys(&keys)).await.unwrap();
    let token = [5u8; 32];
    within(bob.conn.set_delivery_token(&token)).await.unwrap();

    let (anon, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    // Without a token, an unauthenticated connection is refused as ever.
    let err = within(anon.fetch_keys(&bob.address.account, None))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    let bundles = within(anon.fetch_keys_with_token(&bob.address.account, None, &token))
        .await
        .unwrap();
    assert_eq!(bundles.len(), 1);
    assert_eq!(bundles[0].device, bob.address.device);
    assert_eq!(bundles[0].identity_key, bob.identity.public());
    assert_eq!(bundles[0].signed_prekey, keys.signed_prekey.unwrap());
    assert_eq!(bundles[0].one_time_prekey.map(|(id, _)| id), Some(0));
    let one =
        within(anon.fetch_keys_with_token(&bob.address.account, Some(bob.address.device), &token))
            .await
            .unwrap();
    assert_eq!(one[0].one_time_prekey.map(|(id, _)| id), Some(1));

    for bad in [&[6u8; 32][..], &token[..31]] {
        let err = within(anon.fetch_keys_with_token(&bob.address.account, None, bad))
            .await
            .unwrap_err();
        assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    }
    let nobody = tern_proto::AccountId([0xee; 16]);
    let err = within(anon.fetch_keys_with_token(&nobody, None, &token))
        .await
        .unwrap_err();
    assert_eq!(
        err.relay_code(),
        Some(ErrorCode::Unauthorized),
        "same answer: no account oracle"
    );
    // An authenticated device may show the token too.
    let carol = register(&relay.address).await;
    let got = within(
        carol
            .conn
            .fetch_keys_with_token(&bob.address.account, None, &token),
    )
    .await
    .unwrap();
    assert_eq!(got[0].one_time_prekey.map(|(id, _)| id), Some(2));

    // The fetch counted as an anonymous request: past the authentication deadline,
    // which closes a connection that only pinged, the fetching one still works.
    let (pinger, _i) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    within(pinger.ping()).await.unwrap();
    within(pinger.closed()).await;
    within(anon.ping()).await.unwrap();
}

#[tokio::test]
async fn token_fetches_are_limited_per_address_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    // Three fetches, refilled at one per second.
    let relay = relay_with(
        dir.path(),
        "[rate_limits]\nfetch_keys_per_requester = \"3/3s\"\n",
    );
    let bob = register(&relay.address).await;
    within(bob.conn.publish_keys(&upload(&bob, 1, 0..20)))
        .await
        .unwrap();
    let token = [5u8; 32];
    within(bob.conn.set_delivery_token(&token)).await.unwrap();
    let from = |ip: &str| Some(format!("{ip}:0").parse().unwrap());
    let connect = |ip| RelayConnection::connect_from(&relay.address, from(ip));
    let (first, _i1) = within(connect("127.0.0.1")).await.unwrap();
    for _ in 0..3 {
        within(first.fetch_keys_with_token(&bob.address.account, None, &token))
            .await
            .unwrap();
    }
    let refused = within(first.fetch_keys_with_token(&bob.address.account, None, &token))
        .await
        .unwrap_err();
    assert_eq!(refused.relay_code(), Some(ErrorCode::RateLimited));
    let wait = refused.retry_after().expect("a retry time");
    assert!(
        wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1),
        "{wait:?}"
    );
    // Counted by address, not by connection: a new one from there is refused too.
    let (second, _i2) = within(connect("127.0.0.1")).await.unwrap();
    let err = within(second.fetch_keys_with_token(&bob.address.account, None, &token))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::RateLimited));
    // Another address has its own rate, and so has an authenticated device.
    let (other, _i3) = within(connect("127.0.0.2")).await.unwrap();
    within(other.fetch_keys_with_token(&bob.address.account, None, &token))
        .await
        .unwrap();
    within(bob.conn.fetch_keys(&bob.address.account, None))
        .await
        .unwrap();
    // At the advised time (the relay's clock is real here) it is taken again.
    tokio::time::sleep(wait).await;
    within(first.fetch_keys_with_token(&bob.address.account, None, &token))
        .await
        .unwrap();
}
