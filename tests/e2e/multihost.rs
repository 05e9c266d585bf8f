//! Relay addresses that list several hosts (a relay run as several nodes): the client
//! moves past hosts that do not answer, and fails with its usual error once none does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_client::net::{RelayConnection, HANDSHAKE_TIMEOUT};
use tern_client::store::SledKv;
use tern_client::{Client, Error, Event, Events};
use tern_proto::{Fingerprint, RelayAddress};

use crate::support::{envelope, number, register, within, RelayProcess};

/// A loopback UDP port nothing listens on: bound, noted and closed again.
fn dead_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("local address").port()
}

fn with_dead_host(relay: &RelayAddress) -> RelayAddress {
    let text = format!(
        "tern://{}@127.0.0.1:{},{}:{}",
        relay.fingerprint,
        dead_port(),
        relay.host,
        relay.port
    );
    text.parse().expect("a two-host address")
}

#[tokio::test]
async fn a_dead_host_in_the_list_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let address = with_dead_host(&relay.address);
    assert_eq!(address.hosts().len(), 2);

    // Each connect shuffles the two hosts; whichever comes first, it connects
    // (`within` allows more than one handshake timeout).
    let alice = register(&address).await;
    let mut bob = register(&address).await;
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 1);

    // The client keeps the address with both hosts and reconnects through it.
    // The client stores the address with both hosts and reconnects through it.
    let store =
        |dir: &std::path::Path| Arc::new(SledKv::open(&dir.join("carol"), &[7; 32]).unwrap());
    let (carol, mut events) = within(Client::register(&address, store(dir.path())))
        .await
        .expect("register through the two-host address");
    connected(&mut events).await;
    carol.shutdown().await;
    drop((carol, events));
    let (carol, mut events) = within(Client::open(store(dir.path())))
        .await
        .expect("reopen");
    connected(&mut events).await;
    carol.shutdown().await;
}

async fn connected(events: &mut Events) {
    within(async {
        loop {
            if let Event::Connected = events.recv().await.expect("events") {
                return;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn only_dead_hosts_fail_with_the_connect_error_in_bounded_time() {
    let address: RelayAddress = format!(
        "tern://{}@127.0.0.1:{},127.0.0.1:{}",
        Fingerprint([9; 32]),
        dead_port(),
        dead_port()
    )
    .parse()
    .unwrap();
    let hosts = u32::try_from(address.hosts().len()).unwrap();
    let started = Instant::now();
    let bound = HANDSHAKE_TIMEOUT * hosts + Duration::from_secs(3);
    let result = tokio::time::timeout(bound, RelayConnection::connect(&address))
        .await
        .expect("gave up within the bound");
    let err = result.expect_err("nothing listens");
    assert!(matches!(err, Error::Connect(_)), "{err:?}");
    assert!(started.elapsed() <= bound);
}
