//! Who may read what, pinning, and hostile input.

use std::time::Duration;

use crate::support::{envelope, register, within, Device, RelayProcess};
use bytes::{BufMut, BytesMut};
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::{Envelope, Incoming, RelayConnection};
use tern_client::Error;
use tern_client::ErrorCode;
use tern_proto::v1;
use tern_proto::{close, frame, Fingerprint, RelayAddress};

#[tokio::test]
async fn a_device_cannot_read_or_ack_another_devices_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&bob.address, (0..3).map(envelope)))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(bob.next_delivery().await.seq);
    }

    // Alice acknowledges Bob's messages: her ack only ever touches her own mailbox.
    assert_eq!(within(alice.conn.ack(&seqs)).await.unwrap(), 0);

    // Bob's second device has its own mailbox and cannot ack the first one's.
    let bob2_key = DeviceKeyPair::generate();
    let bob2_id = within(bob.conn.add_device(
        &bob.identity,
        &bob.address.account,
        &bob2_key.public(),
    ))
    .await
    .unwrap();
    let bob2_addr = tern_proto::DeviceAddress {
        account: bob.address.account,
        device: bob2_id,
    };
    let (bob2, queued) =
        Device::connect(&relay.address, bob2_addr, bob2_key, bob.identity.clone()).await;
    assert_eq!(queued, 0);
    assert_eq!(within(bob2.conn.ack(&seqs)).await.unwrap(), 0);

    // Nobody can log in as Bob's device without Bob's device key.
    let (conn, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    let err = within(conn.authenticate(&bob.address, &DeviceKeyPair::generate()))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    // And an unauthenticated connection can neither send nor ack.
    let err = within(conn.send(&bob.address, [envelope(9)]))
        .await
        .unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));
    let err = within(conn.ack(&seqs)).await.unwrap_err();
    assert_eq!(err.relay_code(), Some(ErrorCode::Unauthorized));

    assert_eq!(
        bob.reconnect(&relay.address).await,
        3,
        "all of Bob's messages are still queued"
    );
}

#[tokio::test]
async fn a_wrong_certificate_fingerprint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let mut forged = relay.address.fingerprint;
    forged.0[0] ^= 1;
    let address = RelayAddress {
        fingerprint: forged,
        ..relay.address.clone()
    };
    let err = within(RelayConnection::connect(&address))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FingerprintMismatch), "{err:?}");

    // Another relay's certificate is refused too.
    let other = RelayProcess::start(&dir.path().join("other"), &[]).unwrap();
    let address = RelayAddress {
        fingerprint: other.address.fingerprint,
        ..relay.address.clone()
    };
    assert!(matches!(
        within(RelayConnection::connect(&address)).await,
        Err(Error::FingerprintMismatch)
    ));
    let _ = Fingerprint([0; 32]);
    // The right one works.
    within(RelayConnection::connect(&relay.address))
        .await
        .unwrap()
        .0
        .ping()
        .await
        .unwrap();
}

/// A raw QUIC connection with the relay pinned, to write arbitrary bytes.
async fn raw(
    relay: &RelayAddress,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let (config, _) = tern_client::net::tls::pinned_client_config(relay.fingerprint).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let target = format!("{}:{}", relay.host, relay.port).parse().unwrap();
    let conn = within(endpoint.connect(target, &relay.host).unwrap())
        .await
        .unwrap();
    let (send, recv) = within(conn.open_bi()).await.unwrap();
    (endpoint, conn, send, recv)
}

async fn read_response(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> v1::Response {
    let mut decoder = frame::Decoder::new(1 << 20);
    loop {
        if let Some(f) = decoder.decode_message::<v1::ServerFrame>(buf).unwrap() {
            match f.body {
                Some(v1::server_frame::Body::Response(r)) => return r,
                other => panic!("expected a response, got {other:?}"),
            }
        }
        let chunk = within(recv.read_chunk(64 * 1024, true))
            .await
            .unwrap()
            .expect("stream open");
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Appends a client frame of `request_id` and `body` to `out`.
fn request(request_id: u64, body: Option<v1::client_frame::Body>, out: &mut BytesMut) {
    frame::encode(&v1::ClientFrame { request_id, body }, out);
}

fn ping() -> Option<v1::client_frame::Body> {
    Some(v1::client_frame::Body::Ping(v1::PingRequest {}))
}

fn error_code(r: &v1::Response) -> Option<v1::ErrorCode> {
    match &r.result {
        Some(v1::response::Result::Error(e)) => v1::ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_errors_and_the_relay_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);

    let (_endpoint, conn, mut send, mut recv) = raw(&relay.address).await;
    let mut buf = BytesMut::new();

    // A frame whose body is not a message: an error, and the stream carries on.
    let mut garbage = BytesMut::new();
    garbage.put_u32(3);
    garbage.put_slice(&[0xff, 0xff, 0xff]);
    send.write_all(&garbage).await.unwrap();
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(
        (r.request_id, error_code(&r)),
        (0, Some(v1::ErrorCode::BadRequest))
    );

    // A request with no body.
    let mut out = BytesMut::new();
    request(5, None, &mut out);
    // A ping still works on the same stream.
    request(6, ping(), &mut out);
    send.write_all(&out).await.unwrap();
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(
        (r.request_id, error_code(&r)),
        (5, Some(v1::ErrorCode::BadRequest))
    );
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(r.request_id, 6);
    assert!(matches!(r.result, Some(v1::response::Result::Ping(_))));

    // Before authentication, a multi-send of 400,000 empty recipients (2 bytes each
    // on the wire, about 120 in memory once decoded): refused by its count before it
    // decodes, and the stream carries on.
    let mut crowd = BytesMut::new();
    let multi = v1::MultiSendRequest {
        recipients: vec![v1::RecipientAccount::default(); 400_000],
        ..Default::default()
    };
    request(
        7,
        Some(v1::client_frame::Body::MultiSend(multi)),
        &mut crowd,
    );
    request(8, ping(), &mut crowd);
    send.write_all(&crowd).await.unwrap();
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(
        (r.request_id, error_code(&r)),
        (7, Some(v1::ErrorCode::BadRequest))
    );
    assert!(
        matches!(&r.result, Some(v1::response::Result::Error(e)) if e.message.contains("elements")),
        "{r:?}"
    );
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(r.request_id, 8);

    // A frame announcing 1 GiB: refused before the relay reads or allocates it, and
    // the connection is closed as a protocol error.
    let mut huge = BytesMut::new();
    huge.put_u32(1 << 30);
    send.write_all(&huge).await.unwrap();
    let r = read_response(&mut recv, &mut buf).await;
    assert_eq!(error_code(&r), Some(v1::ErrorCode::TooLarge));
    let closed = within(conn.closed()).await;
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::PROTOCOL_ERROR.into()),
        "{closed:?}"
    );

    // A connection that never opens its control stream does not hold the relay up.
    let (_e2, idle, _s, _r) = raw(&relay.address).await;

    // Other connections were served throughout.
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();
    assert_eq!(crate::support::number(&bob.next_delivery().await), 1);
    drop(idle);
}

#[tokio::test]
async fn a_client_connection_may_wait_past_the_open_timeout_before_its_first_request() {
    // The relay closes connections that never open their control stream within 10 s;
    // a client connection opens it as it connects, however long it then waits (up to
    // the deadline to authenticate, here set longer).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[connections]\nauth_deadline = \"60s\"\n").unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let (conn, _inbox) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    within(conn.ping()).await.unwrap();
}

#[tokio::test]
async fn limits_are_enforced_over_the_wire_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "durability = \"os\"\n[limits]\nmax_envelope_bytes = 1024\nmax_frame_bytes = 65536\nmax_queued_messages = 3\n",
    )
    .unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;

    within(alice.conn.send(&bob_addr, (0..3).map(envelope)))
        .await
        .unwrap();
    let full = within(alice.conn.send(&bob_addr, [envelope(3)]))
        .await
        .unwrap_err();
    assert_eq!(full.relay_code(), Some(ErrorCode::MailboxFull));
    let big = Envelope {
        payload: vec![0u8; 1025].into(),
        ..envelope(4)
    };
    let too_large = within(alice.conn.send(&bob_addr, [big])).await.unwrap_err();
    assert_eq!(too_large.relay_code(), Some(ErrorCode::TooLarge));
    let nobody = tern_proto::DeviceAddress::from_wire(&[0xab; 16], 1).unwrap();
    let unknown = within(alice.conn.send(&nobody, [envelope(5)]))
        .await
        .unwrap_err();
    assert_eq!(unknown.relay_code(), Some(ErrorCode::UnknownRecipient));

    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 3, "refused sends lost nothing already stored");
    assert_eq!(bob.drain().await.len(), 3);
    // The connection that got errors still works.
    within(alice.conn.ping()).await.unwrap();
}

#[tokio::test]
async fn info_logs_hold_no_identifiers_or_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    within(alice.conn.send(&bob.address, [envelope(77)]))
        .await
        .unwrap();
    let _ = bob.next_delivery().await;
    let _ = within(
        alice
            .conn
            .authenticate(&bob.address, &DeviceKeyPair::generate()),
    )
    .await;
    drop((alice, bob.conn));
    tokio::time::sleep(Duration::from_millis(100)).await;
    relay.stop().unwrap();
    let log = relay.log_text();
    assert!(log.contains("relay started"), "the log was captured: {log}");
    let account_hex: String = bob
        .address
        .account
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for secret in [account_hex.as_str(), "127.0.0.1", "ciphertext #77"] {
        assert!(!log.contains(secret), "log holds {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn connections_past_the_limit_are_refused_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[limits]\nmax_connections = 2\n").unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;
    let refused = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Refused), "{refused:?}");
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();

    // A slot frees up when a connection ends.
    bob.conn.close().await;
    let mut admitted = false;
    for _ in 0..100 {
        if let Ok((conn, _inbox)) = within(RelayConnection::connect(&relay.address)).await {
            conn.ping().await.unwrap();
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a freed slot admits a new connection");
}

#[tokio::test]
async fn registrations_from_one_address_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[rate_limits]\nregistrations_per_prefix = \"2/1h\"\n",
    )
    .unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let first = register(&relay.address).await;
    let _second = register(&relay.address).await;
    let (conn, _inbox) = RelayConnection::connect(&relay.address).await.unwrap();
    let refused = within(conn.register(&IdentityKeyPair::generate(), &DeviceKeyPair::generate()))
        .await
        .unwrap_err();
    assert_eq!(refused.relay_code(), Some(ErrorCode::RateLimited));
    // Nothing else is limited: the accounts made keep working.
    within(first.conn.ping()).await.unwrap();
}
