//! Admission of connections: per-address caps, the deadline to authenticate, QUIC
//! address validation, the limits before authentication, and what the relay logs
//! about peers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tern_client::net::{Incoming, RelayConnection};
use tern_client::Error;
use tern_proto::{close, frame, v1, RelayAddress};

use crate::support::{envelope, number, register_from, within, RelayProcess};

/// Starts a relay with `config` as its configuration file, and `extra` flags.
fn relay_with(dir: &Path, config: &str, extra: &[&str]) -> RelayProcess {
    let file = dir.join("relay.toml");
    std::fs::write(&file, config).unwrap();
    let mut flags = vec!["--config", file.to_str().unwrap()];
    flags.extend_from_slice(extra);
    RelayProcess::start(&dir.join("relay"), &flags).unwrap()
}

fn local(ip: &str) -> SocketAddr {
    format!("{ip}:0").parse().unwrap()
}

/// A raw QUIC connection from `from`, with the relay pinned; nothing sent yet.
async fn raw_from(
    relay: &RelayAddress,
    from: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let (config, _) = tern_client::net::tls::pinned_client_config(relay.fingerprint).unwrap();
    let mut endpoint = quinn::Endpoint::client(local(from)).unwrap();
    endpoint.set_default_client_config(config);
    let target = format!("{}:{}", relay.host, relay.port).parse().unwrap();
    let conn = within(endpoint.connect(target, &relay.host).unwrap()).await?;
    Ok((endpoint, conn))
}

fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

fn closed_with(e: &quinn::ConnectionError, code: u32, reason: &[u8]) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == code.into() && &c.reason[..] == reason)
}

#[tokio::test]
async fn one_address_cannot_lock_out_another() {
    let dir = tempfile::tempdir().unwrap();
    // Retry always, so every refusal goes to a validated address and is a
    // CONNECTION_REFUSED the test can see (an unvalidated one is ignored).
    let relay = relay_with(
        dir.path(),
        "[connections]\nmax_per_address = 4\nretry = \"always\"\nauth_deadline = \"2s\"\n",
        &[],
    );
    // 127.0.0.1 fills its cap with idle connections (each opens its control stream
    // with a ping, then stays silent).
    let mut idle = Vec::new();
    for _ in 0..4 {
        let (c, _inbox) = within(RelayConnection::connect_from(
            &relay.address,
            Some(local("127.0.0.1")),
        ))
        .await
        .unwrap();
        within(c.ping()).await.unwrap();
        idle.push(c);
    }
    let opened = Instant::now();
    let refused = raw_from(&relay.address, "127.0.0.1").await.unwrap_err();
    assert!(is_refused(&refused), "{refused:?}");

    // 127.0.0.2 registers, sends and receives as if nothing were going on.
    let alice = register_from(&relay.address, Some(local("127.0.0.2"))).await;
    let mut bob = register_from(&relay.address, Some(local("127.0.0.2"))).await;
    assert_eq!(bob.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 1);

    // The idle ones are closed at the deadline, as a protocol error...
    for c in &idle {
        let Error::Closed(why) = within(c.closed()).await else {
            panic!("closed")
        };
        assert_eq!(why, "relay reported a protocol error");
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "not before it"
    );
    // ... their places come back, and the authenticated ones stay.
    for _ in 0..4 {
        let (_e, c) = raw_from(&relay.address, "127.0.0.1").await.unwrap();
        drop(c);
    }
    within(alice.conn.send(&bob.address, [envelope(2)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 2);
}

#[tokio::test]
async fn idle_unauthenticated_connections_are_closed_after_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(
        dir.path(),
        "[connections]\nauth_deadline = \"1s\"\nanonymous_idle = \"3s\"\n",
        &[],
    );
    let started = Instant::now();
    // Silent after a ping: a ping is not a request that counts.
    let (pinger, _i1) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    within(pinger.ping()).await.unwrap();
    // No control stream at all.
    let (_e, silent) = raw_from(&relay.address, "127.0.0.1").await.unwrap();
    // An anonymous request: the connection may stay, until it idles.
    let (anonymous, _i2) = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap();
    assert_eq!(within(anonymous.blob_status(&[7; 32])).await.unwrap(), None);
    // Authenticated: no deadline.
    let alice = register_from(&relay.address, Some(local("127.0.0.1"))).await;

    let e = within(silent.closed()).await;
    assert!(
        closed_with(&e, close::PROTOCOL_ERROR, b"no control stream"),
        "{e:?}"
    );
    let Error::Closed(why) = within(pinger.closed()).await else {
        panic!("closed")
    };
    assert_eq!(why, "relay reported a protocol error");
    let deadline_hit = started.elapsed();
    assert!(deadline_hit < Duration::from_secs(3), "{deadline_hit:?}");
    within(anonymous.ping()).await.unwrap();
    within(alice.conn.ping()).await.unwrap();

    // The anonymous one is closed once idle, normally.
    let Error::Closed(why) = within(anonymous.closed()).await else {
        panic!("closed")
    };
    assert_eq!(why, "closed");
    assert!(started.elapsed() >= Duration::from_secs(3));
    within(alice.conn.ping()).await.unwrap();
}

#[tokio::test]
async fn frames_before_authentication_are_held_to_the_smaller_limit() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), "", &[]);
    // 300 KiB is under the 4 MiB frame limit but over the 264 KiB one before
    // authentication.
    let (_e, conn) = raw_from(&relay.address, "127.0.0.1").await.unwrap();
    let (mut send, mut recv) = within(conn.open_bi()).await.unwrap();
    let mut header = BytesMut::new();
    header.put_u32(300 * 1024);
    // The first bytes of the body, which tell the relay it is no group request.
    header.put_slice(&[0; 16]);
    send.write_all(&header).await.unwrap();
    let mut buf = BytesMut::new();
    let mut decoder = frame::Decoder::new(1 << 20);
    let response = loop {
        if let Some(f) = decoder.decode_message::<v1::ServerFrame>(&mut buf).unwrap() {
            break f;
        }
        let chunk = within(recv.read_chunk(64 * 1024, true))
            .await
            .unwrap()
            .expect("open");
        buf.extend_from_slice(&chunk.bytes);
    };
    let Some(v1::server_frame::Body::Response(r)) = response.body else {
        panic!("a response")
    };
    let Some(v1::response::Result::Error(e)) = r.result else {
        panic!("an error")
    };
    assert_eq!(e.code, v1::ErrorCode::TooLarge as i32);
    let e = within(conn.closed()).await;
    assert!(
        closed_with(&e, close::PROTOCOL_ERROR, b"protocol error"),
        "{e:?}"
    );

    // Once authenticated, the same frame is fine: a send of one 250 KiB envelope
    // plus one of 60 KiB goes in one request.
    let alice = register_from(&relay.address, Some(local("127.0.0.1"))).await;
    let big = |i| tern_client::net::Envelope {
        payload: vec![i as u8; if i == 0 { 250 * 1024 } else { 60 * 1024 }].into(),
        ..envelope(i)
    };
    within(alice.conn.send(&alice.address, (0..2).map(big)))
        .await
        .unwrap();
}

#[tokio::test]
async fn address_validation_with_retry_still_connects() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(
        dir.path(),
        "[connections]\nretry = \"always\"\nmax_per_address = 2\n",
        &["--log", "tern_relay=debug"],
    );
    let alice = register_from(&relay.address, Some(local("127.0.0.1"))).await;
    let mut bob = register_from(&relay.address, Some(local("127.0.0.1"))).await;
    within(alice.conn.send(&bob.address, [envelope(5)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 5);
    // Past the cap, the validated re-attempt is refused (retry, then refuse).
    let refused = raw_from(&relay.address, "127.0.0.1").await.unwrap_err();
    assert!(is_refused(&refused), "{refused:?}");
    within(alice.conn.ping()).await.unwrap();
    let log = relay.log_text();
    assert!(
        log.matches("asked for address validation").count() >= 3,
        "every new connection was asked to validate its address:\n{log}"
    );
}

#[tokio::test]
async fn the_relay_log_never_holds_a_peer_address_even_from_dependencies() {
    // Every crate at trace, quinn's included: whatever a dependency prints about a
    // peer goes through the relay's formatter, which redacts addresses.
    let dir = tempfile::tempdir().unwrap();
    let mut relay = relay_with(dir.path(), "", &["--log", "trace"]);
    let alice = register_from(&relay.address, Some(local("127.0.0.2"))).await;
    within(alice.conn.ping()).await.unwrap();
    // A handshake that fails: an unpinned certificate is refused by the client.
    let (config, _) =
        tern_client::net::tls::pinned_client_config(tern_proto::Fingerprint([1; 32])).unwrap();
    let mut endpoint = quinn::Endpoint::client(local("127.0.0.2")).unwrap();
    endpoint.set_default_client_config(config);
    let target = format!("{}:{}", relay.address.host, relay.address.port)
        .parse()
        .unwrap();
    assert!(within(endpoint.connect(target, "x").unwrap())
        .await
        .is_err());
    alice.conn.close().await;
    relay.stop().unwrap();
    let log = relay.log_text();
    assert!(log.contains("quinn"), "dependencies' lines were captured");
    assert!(!log.contains("127.0.0.2"), "a peer address in the log");
}
