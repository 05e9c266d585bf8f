//! Linked devices end to end: a real relay process, real QUIC, sled device stores,
//! the client library on both ends (issue 16).

use std::path::Path;
use std::sync::Arc;

use tern_client::link::Link;
use tern_client::{Client, Error, Event, Events};
use tern_proto::address::RelayAddress;
use tern_proto::{DeviceId, ErrorCode};

use crate::client::{drained, next_match, next_message, pair, store};
use crate::support::{envelope, within, RelayProcess};

/// Links a new device (store `name`) to `primary`'s account; both sides' views.
async fn link(
    relay: &RelayAddress,
    dir: &Path,
    name: &str,
    primary: &Client,
    primary_events: &mut Events,
) -> (Client, Events) {
    let joining = within(Client::join(relay, store(dir, name)))
        .await
        .expect("join");
    assert!(joining.link().starts_with("tern-link:"));
    let linked = within(primary.link_device(joining.link()))
        .await
        .expect("link");
    let (device, events) = within(joining.finish()).await.expect("finish");
    assert_eq!(device.account(), primary.account());
    assert_eq!(device.address().device, linked.id);
    let joined = next_match(primary_events, |e| match e {
        Event::DeviceJoined { device } => Some(device),
        _ => None,
    })
    .await;
    assert_eq!(joined, linked.id);
    (device, events)
}

/// Alice and Bob registered, each holding the other's card.
async fn contacts(relay: &RelayAddress, dir: &Path) -> ((Client, Events), (Client, Events)) {
    let ((alice, alice_events), (bob, bob_events)) = pair(relay, dir).await;
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add bob");
    bob.add_contact(&alice.contact_card().await)
        .await
        .expect("add alice");
    ((alice, alice_events), (bob, bob_events))
}

#[tokio::test]
async fn a_linked_device_receives_sends_syncs_and_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, mut alice_events), (bob, mut bob_events)) =
        contacts(&relay.address, dir.path()).await;
    // Bob has written to Alice before she links: he holds her first list.
    bob.send(&alice.account(), b"before").await.expect("send");
    let m = next_message(&mut alice_events).await;
    alice.confirm(m.seq).await.expect("confirm");
    let safety = bob.safety_number(&alice.account()).await;
    assert!(safety.is_some());

    let (laptop, mut laptop_events) = link(
        &relay.address,
        dir.path(),
        "laptop",
        &alice,
        &mut alice_events,
    )
    .await;

    // Bob's next message reaches both of Alice's devices, from Bob.
    bob.send(&alice.account(), b"to both").await.expect("send");
    for (device, events) in [(&alice, &mut alice_events), (&laptop, &mut laptop_events)] {
        let m = next_message(events).await;
        assert_eq!(m.body, b"to both");
        assert_eq!(m.sender, bob.account());
        assert_eq!(m.sent_to, None);
        device.confirm(m.seq).await.expect("confirm");
    }
    // Linking changed no safety number.
    assert_eq!(bob.safety_number(&alice.account()).await, safety);
    assert_eq!(laptop.safety_number(&bob.account()).await, safety);

    // The laptop writes to Bob (a contact from the link payload); the phone shows it
    // as sent to Bob.
    laptop
        .send(&bob.account(), b"from the laptop")
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(
        (m.body.as_slice(), m.sender),
        (&b"from the laptop"[..], alice.account())
    );
    bob.confirm(m.seq).await.expect("confirm");
    let t = next_message(&mut alice_events).await;
    assert_eq!(t.body, b"from the laptop");
    assert_eq!(t.sent_to, Some(bob.account()));
    alice.confirm(t.seq).await.expect("confirm");

    let devices = within(laptop.devices()).await.expect("devices");
    let ids: Vec<_> = devices
        .iter()
        .map(|d| (d.id, d.primary, d.this_device))
        .collect();
    assert_eq!(
        ids,
        [
            (DeviceId::PRIMARY, true, false),
            (laptop.address().device, false, true)
        ]
    );

    // The laptop goes offline; Bob writes 3 and the phone 2; a contact added on the
    // phone meanwhile reaches the laptop too.
    laptop.shutdown().await;
    drop((laptop, laptop_events));
    for i in 0..3 {
        bob.send(&alice.account(), format!("bob {i}").as_bytes())
            .await
            .expect("send");
    }
    for i in 0..2 {
        alice
            .send(&bob.account(), format!("phone {i}").as_bytes())
            .await
            .expect("send");
    }
    let (carol, mut carol_events) = Client::register(&relay.address, store(dir.path(), "carol"))
        .await
        .expect("carol");
    alice
        .add_contact(&carol.contact_card().await)
        .await
        .expect("add carol");
    let (laptop, mut laptop_events) = within(Client::open(store(dir.path(), "laptop")))
        .await
        .expect("reopen the laptop");
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let m = next_message(&mut laptop_events).await;
        seen.push((String::from_utf8(m.body.clone()).expect("text"), m.sent_to));
        laptop.confirm(m.seq).await.expect("confirm");
    }
    let bob_said: Vec<_> = seen.iter().filter(|(_, to)| to.is_none()).collect();
    let phone_said: Vec<_> = seen.iter().filter(|(_, to)| to.is_some()).collect();
    assert_eq!(
        bob_said.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
        ["bob 0", "bob 1", "bob 2"]
    );
    assert_eq!(
        phone_said
            .iter()
            .map(|(b, _)| b.as_str())
            .collect::<Vec<_>>(),
        ["phone 0", "phone 1"]
    );
    assert!(phone_said.iter().all(|(_, to)| *to == Some(bob.account())));
    // Carol arrived as a contact sync: the laptop knows her identity and writes to her.
    let carol_id = carol.account();
    within(async {
        while laptop.safety_number(&carol_id).await.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    laptop.send(&carol_id, b"hi carol").await.expect("send");
    let m = next_message(&mut carol_events).await;
    assert_eq!(
        (m.body.as_slice(), m.sender),
        (&b"hi carol"[..], alice.account())
    );
    assert_eq!(
        laptop.safety_number(&carol_id).await,
        carol.safety_number(&alice.account()).await
    );

    for c in [alice, bob, carol, laptop] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn a_removed_device_is_refused_and_contacts_stop_encrypting_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let ((alice, mut alice_events), (bob, _bob_events)) =
        contacts(&relay.address, dir.path()).await;
    let (laptop, mut laptop_events) = link(
        &relay.address,
        dir.path(),
        "laptop",
        &alice,
        &mut alice_events,
    )
    .await;
    bob.send(&alice.account(), b"to both").await.expect("send");
    let m = next_message(&mut laptop_events).await;
    laptop.confirm(m.seq).await.expect("confirm");
    next_message(&mut alice_events).await;
    let laptop_id = laptop.address().device;

    // A linked device cannot remove others, nor anyone device 1.
    assert!(matches!(
        laptop.remove_device(DeviceId::PRIMARY).await,
        Err(Error::NotPrimary)
    ));
    within(alice.remove_device(laptop_id))
        .await
        .expect("remove the laptop");
    next_match(&mut laptop_events, |e| match e {
        Event::Removed => Some(()),
        _ => None,
    })
    .await;

    // The relay hands out no keys for it, and a send to it names a device that is gone.
    let (conn, _inbox) = within(tern_client::net::RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let token = alice.contact_card().await.delivery_token;
    let bundles = within(conn.fetch_keys_with_token(&alice.account(), None, &token))
        .await
        .expect("fetch");
    assert_eq!(
        bundles.iter().map(|b| b.device).collect::<Vec<_>>(),
        [DeviceId::PRIMARY]
    );
    let to = tern_proto::DeviceAddress {
        account: alice.account(),
        device: laptop_id,
    };
    let e = within(conn.sealed_send(&to, &token, [envelope(1)]))
        .await
        .expect_err("gone");
    assert_eq!(e.relay_code(), Some(ErrorCode::UnknownRecipient));
    conn.close().await;

    // Bob's next message reaches the phone only.
    bob.send(&alice.account(), b"after").await.expect("send");
    let m = next_message(&mut alice_events).await;
    assert_eq!(m.body, b"after");
    // Bob's copy for the laptop is not left waiting: he encrypts to the phone only.
    drained(&bob).await;
    let devices = within(alice.devices()).await.expect("devices");
    assert_eq!(
        devices.iter().map(|d| d.id).collect::<Vec<_>>(),
        [DeviceId::PRIMARY]
    );
    bob.shutdown().await;
    laptop.shutdown().await;
    drop((laptop, laptop_events));

    // Its credentials no longer authenticate: reopened, the laptop is refused and
    // knows it was removed.
    let (laptop, mut laptop_events) = within(Client::open(store(dir.path(), "laptop")))
        .await
        .expect("the store opens");
    let refused = next_match(&mut laptop_events, |e| match e {
        Event::Removed => Some(true),
        Event::Connected => Some(false),
        _ => None,
    })
    .await;
    assert!(refused, "a removed device authenticated");
    laptop.shutdown().await;
    let account = alice.account();
    alice.shutdown().await;

    // The relay's export lists one device.
    relay.stop().expect("stop");
    let out = dir.path().join("export.json");
    let status = std::process::Command::new(crate::support::relay_binary())
        .args([
            "admin",
            "export-account",
            &crate::support::hex(account.as_bytes()),
        ])
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(dir.path().join("relay"))
        .output()
        .expect("export");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let export: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("the export")).expect("json");
    let devices = export["account"]["devices"].as_array().map(Vec::len);
    assert_eq!(devices, Some(1), "{export}");
}

#[tokio::test]
async fn a_link_payload_is_single_use_bound_to_its_secret_and_refuses_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let (alice, _alice_events) = Client::register(&relay.address, store(dir.path(), "alice"))
        .await
        .expect("alice");

    // A link whose linking secret was changed: the payload the primary seals does
    // not open on the new device.
    let joining = within(Client::join(&relay.address, store(dir.path(), "new")))
        .await
        .expect("join");
    let mut forged = Link::parse(joining.link()).expect("a link");
    forged.linking_secret[0] ^= 1;
    within(alice.link_device(&forged.to_string()))
        .await
        .expect("the primary cannot tell");
    assert!(matches!(
        within(joining.finish()).await,
        Err(Error::LinkRejected)
    ));

    // Malformed links are typed errors.
    for bad in [
        "",
        "tern-link:",
        "tern-link:!!!",
        "tern-contact:AAAA",
        "tern-link:AAAA",
    ] {
        assert!(
            matches!(alice.link_device(bad).await, Err(Error::InvalidLink)),
            "{bad}"
        );
    }

    // The slot at the wire: single deposit, single take, only by its reader.
    let (conn, _inbox) = within(tern_client::net::RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let (slot, reader_secret) = ([3u8; 16], [4u8; 32]);
    let reader_hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(reader_secret).into();
    within(conn.open_provisioning(slot, reader_hash))
        .await
        .expect("open");
    assert_eq!(
        within(conn.take_provisioning(slot, reader_secret))
            .await
            .expect("pending"),
        None
    );
    let e = within(conn.take_provisioning([9; 16], reader_secret))
        .await
        .expect_err("unknown slot");
    assert_eq!(e.relay_code(), Some(ErrorCode::NotFound));
    let e = within(conn.take_provisioning(slot, [5; 32]))
        .await
        .expect_err("not the reader");
    assert_eq!(e.relay_code(), Some(ErrorCode::NotFound));
    // Deposits need an authenticated device of the account named.
    let e = within(conn.deposit_provisioning(slot, DeviceId::PRIMARY, vec![1; 64]))
        .await
        .expect_err("anonymous");
    assert_eq!(e.relay_code(), Some(ErrorCode::Unauthorized));
    conn.close().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn the_device_cap_refuses_a_sixth_linked_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let (alice, mut alice_events) = Client::register(&relay.address, store(dir.path(), "alice"))
        .await
        .expect("alice");
    let mut linked = Vec::new();
    for i in 0..5 {
        let name = format!("device{i}");
        linked.push(link(&relay.address, dir.path(), &name, &alice, &mut alice_events).await);
    }
    let joining = within(Client::join(&relay.address, store(dir.path(), "sixth")))
        .await
        .expect("join");
    let e = within(alice.link_device(joining.link()))
        .await
        .expect_err("over the cap");
    assert_eq!(e.relay_code(), Some(ErrorCode::QuotaExceeded), "{e}");
    for (c, _) in linked {
        c.shutdown().await;
    }
    alice.shutdown().await;
}

#[tokio::test]
async fn a_primary_back_after_the_join_deadline_keeps_a_device_that_joined_meanwhile() {
    use tern_client::ClientOptions;
    use tern_platform::clock::ManualClock;

    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let clock = Arc::new(ManualClock::starting_now());
    let options = || ClientOptions::new().clock(clock.clone());
    let (alice, _alice_events) =
        Client::register_with(&relay.address, store(dir.path(), "alice"), options())
            .await
            .expect("alice");
    let joining = within(Client::join(&relay.address, store(dir.path(), "laptop")))
        .await
        .expect("join");
    let linked = within(alice.link_device(joining.link()))
        .await
        .expect("link");
    // The phone goes away before the laptop joins; its `DeviceJoined` waits in the
    // phone's mailbox while the phone's 12-minute deadline passes.
    alice.shutdown().await;
    drop(alice);
    let (laptop, _laptop_events) = within(joining.finish()).await.expect("finish");
    drained(&laptop).await;
    clock.advance(std::time::Duration::from_secs(13 * 60));
    let (alice, mut alice_events) =
        within(Client::open_with(store(dir.path(), "alice"), options()))
            .await
            .expect("reopen the phone");
    let joined = next_match(&mut alice_events, |e| match e {
        Event::DeviceJoined { device } => Some(device),
        Event::DeviceRemoved { device } => panic!("device {device:?} removed"),
        _ => None,
    })
    .await;
    assert_eq!(joined, linked.id);
    // The check of expired links ran once the queue was read: the laptop stays.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let ids: Vec<_> = within(alice.devices())
        .await
        .expect("devices")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [DeviceId::PRIMARY, linked.id]);
    alice.shutdown().await;
    laptop.shutdown().await;
}
