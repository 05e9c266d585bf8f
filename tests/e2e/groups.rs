//! Groups and broadcast lists end to end (issue 17): a real relay process, real
//! QUIC, sled device stores, the client library on every end.

use std::path::Path;

use std::collections::HashMap;
use std::time::Duration;

use tern_client::{Client, Event, Events, GroupChange, GroupId, GroupMessage};
use tern_proto::address::RelayAddress;
use tern_proto::{AccountId, DeviceId};

use crate::client::{drained, next_match, next_message, store};
use crate::support::{files_under, within, RelayProcess};

/// Links a new device (store `name`) to `primary`'s account.
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
    within(primary.link_device(joining.link()))
        .await
        .expect("link");
    let (device, events) = within(joining.finish()).await.expect("finish");
    next_match(primary_events, |e| match e {
        Event::DeviceJoined { .. } => Some(()),
        _ => None,
    })
    .await;
    (device, events)
}

async fn joined(events: &mut Events) -> GroupId {
    next_match(events, |e| match e {
        Event::GroupJoined { group, .. } => Some(group),
        _ => None,
    })
    .await
}

/// `creator` makes a group `name` with `members`: returns once each of
/// `joiners` (the members' devices' events) joined it.
async fn group_with(
    creator: &Client,
    name: &str,
    members: &[AccountId],
    joiners: &mut [&mut Events],
) -> GroupId {
    let group = within(creator.create_group(name, members))
        .await
        .expect("create");
    for events in joiners.iter_mut() {
        assert_eq!(joined(events).await, group);
    }
    group
}

async fn group_message(client: &Client, events: &mut Events) -> GroupMessage {
    let m = next_match(events, |e| match e {
        Event::GroupMessage(m) => Some(m),
        _ => None,
    })
    .await;
    client.confirm(m.seq).await.expect("confirm");
    m
}

async fn change(events: &mut Events, want: impl Fn(&GroupChange) -> bool) -> GroupChange {
    next_match(events, |e| match e {
        Event::GroupChanged { change, .. } if want(&change) => Some(change),
        _ => None,
    })
    .await
}

/// Waits until `client`'s view of `group` has exactly `members`.
async fn members_are(client: &Client, group: &GroupId, members: &[AccountId]) {
    let mut want = members.to_vec();
    want.sort();
    within(async {
        loop {
            let groups = client.groups().await.expect("groups");
            if let Some(g) = groups.iter().find(|g| g.id == *group) {
                let mut have = g.members.clone();
                have.sort();
                if have == want && g.pending_ops == 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Registers `names` on `relay`, each holding every other's card.
async fn accounts(relay: &RelayAddress, dir: &Path, names: &[&str]) -> Vec<(Client, Events)> {
    let mut out = Vec::new();
    for name in names {
        let client = within(Client::register(relay, store(dir, name)))
            .await
            .expect("register");
        out.push(client);
    }
    let cards = {
        let mut cards = Vec::new();
        for (c, _) in &out {
            cards.push(c.contact_card().await);
        }
        cards
    };
    for (c, _) in &out {
        for card in &cards {
            if card.account != c.account() {
                c.add_contact(card).await.expect("add contact");
            }
        }
    }
    out
}

/// Registers "alice" with `options`; she and each of `others` hold the other's card.
async fn alice_with(
    relay: &RelayAddress,
    dir: &Path,
    options: tern_client::ClientOptions,
    others: &[&Client],
) -> (Client, Events) {
    let (alice, events) = within(Client::register_with(relay, store(dir, "alice"), options))
        .await
        .expect("register");
    for other in others {
        for (c, card) in [(&alice, *other), (*other, &alice)] {
            c.add_contact(&card.contact_card().await)
                .await
                .expect("contact");
        }
    }
    (alice, events)
}

/// Whether `needle` appears in any file under `dir`.
fn on_disk(dir: &Path, needle: &[u8]) -> bool {
    files_under(dir).iter().any(|f| {
        std::fs::read(f)
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    })
}

#[tokio::test]
async fn a_broadcast_reaches_each_contact_as_a_one_to_one_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(
        &relay.address,
        dir.path(),
        &["alice", "bob", "carol", "dave"],
    )
    .await;
    let (alice, mut alice_events) = all.remove(0);
    let to: Vec<AccountId> = all.iter().map(|(c, _)| c.account()).collect();

    let marker = b"broadcast-marker-7f3a";
    let id = alice
        .send_broadcast(&to, marker, &[])
        .await
        .expect("broadcast");
    for (client, events) in &mut all {
        let m = next_message(events).await;
        assert_eq!(m.body, marker);
        assert_eq!(
            (m.sender, m.message_id, m.sent_to),
            (alice.account(), id, None)
        );
        client.confirm(m.seq).await.expect("confirm");
        // An ordinary message: its sender can be answered as usual.
        client
            .send(&alice.account(), b"got it")
            .await
            .expect("reply");
    }
    let mut sent_to = Vec::new();
    while sent_to.len() < to.len() {
        let to = next_match(&mut alice_events, |e| match e {
            Event::Sent { message_id, to } if message_id == id => Some(to),
            _ => None,
        })
        .await;
        sent_to.push(to);
    }
    sent_to.sort();
    let mut expected = to.clone();
    expected.sort();
    assert_eq!(sent_to, expected, "one Sent per recipient");
    for _ in 0..to.len() {
        assert_eq!(next_message(&mut alice_events).await.body, b"got it");
    }
    drained(&alice).await;
    // Everyone acknowledged: the relay keeps nothing readable of it either way.
    assert!(!on_disk(&relay.data_dir, marker));
}

#[tokio::test]
async fn three_accounts_with_two_devices_each_talk_in_a_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut primaries = accounts(&relay.address, dir.path(), &["alice", "bob", "carol"]).await;
    let mut devices: Vec<(String, Client, Events)> = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].iter().enumerate() {
        let (client, events) = &mut primaries[i];
        let laptop = link(
            &relay.address,
            dir.path(),
            &format!("{name}-laptop"),
            client,
            events,
        )
        .await;
        devices.push((format!("{name}-laptop"), laptop.0, laptop.1));
    }
    for (i, (client, events)) in primaries.into_iter().enumerate() {
        let name = ["alice", "bob", "carol"][i];
        devices.insert(i, (name.to_string(), client, events));
    }
    let accounts: Vec<AccountId> = devices[..3].iter().map(|(_, c, _)| c.account()).collect();

    let name = "marker-group-name-5d1e";
    let group = within(devices[0].1.create_group(name, &accounts[1..]))
        .await
        .expect("create");
    for (_, _, events) in devices.iter_mut().skip(1) {
        assert_eq!(joined(events).await, group);
    }
    for (_, client, _) in &devices {
        members_are(client, &group, &accounts).await;
    }

    // Interleaved: every device sends 4; every other device gets each exactly once,
    // in each sender's order.
    const EACH: usize = 4;
    for i in 0..EACH {
        for (who, client, _) in &devices {
            let body = format!("marker-body-{who}-{i}");
            client
                .send_group(&group, body.as_bytes(), &[])
                .await
                .expect("send");
        }
    }
    let n = devices.len();
    for (me, client, events) in devices.iter_mut() {
        let mut by_sender: HashMap<(AccountId, DeviceId), Vec<String>> = HashMap::new();
        for _ in 0..(n - 1) * EACH {
            let m = group_message(client, events).await;
            assert_eq!(m.group, group);
            let body = String::from_utf8(m.body).expect("text");
            let who = body
                .trim_start_matches("marker-body-")
                .rsplit_once('-')
                .map(|w| w.0.to_string());
            assert_ne!(who.as_deref(), Some(me.as_str()), "not to itself");
            by_sender
                .entry((m.sender, m.sender_device))
                .or_default()
                .push(body);
        }
        assert_eq!(by_sender.len(), n - 1, "{me}: from every other device");
        for list in by_sender.values() {
            let who = list[0]
                .trim_start_matches("marker-body-")
                .rsplit_once('-')
                .expect("numbered")
                .0
                .to_string();
            let want: Vec<String> = (0..EACH)
                .map(|i| format!("marker-body-{who}-{i}"))
                .collect();
            assert_eq!(list, &want, "{me}: once each, in order");
        }
    }
    for (_, client, _) in &devices {
        drained(client).await;
    }
    // The relay never saw a group name or a body.
    for marker in [name.as_bytes(), b"marker-body-"] {
        assert!(
            !on_disk(&relay.data_dir, marker),
            "found a marker on the relay"
        );
    }
    for (_, client, _) in devices {
        client.shutdown().await;
    }
}

#[tokio::test]
async fn later_members_read_only_what_follows_and_removed_ones_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["alice", "bob", "carol"]).await;
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, mut alice_events) = all.pop().expect("alice");

    let group = group_with(&alice, "g", &[bob.account()], &mut [&mut bob_events]).await;
    alice
        .send_group(&group, b"before carol", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&bob, &mut bob_events).await.body,
        b"before carol"
    );

    alice
        .add_members(&group, &[carol.account()])
        .await
        .expect("add");
    assert_eq!(joined(&mut carol_events).await, group);
    change(&mut bob_events, |c| matches!(c, GroupChange::Added(_))).await;
    bob.send_group(&group, b"after carol", &[])
        .await
        .expect("send");
    // Carol's first group message is the one sent after she joined.
    let m = group_message(&carol, &mut carol_events).await;
    assert_eq!(
        (m.body.as_slice(), m.sender),
        (&b"after carol"[..], bob.account())
    );
    assert_eq!(
        group_message(&alice, &mut alice_events).await.body,
        b"after carol"
    );

    alice
        .remove_member(&group, &bob.account())
        .await
        .expect("remove");
    let c = change(&mut bob_events, |c| matches!(c, GroupChange::RemovedSelf)).await;
    assert_eq!(c, GroupChange::RemovedSelf);
    assert!(bob.groups().await.expect("groups").is_empty());
    change(&mut carol_events, |c| matches!(c, GroupChange::Removed(_))).await;
    alice
        .send_group(&group, b"without bob", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&carol, &mut carol_events).await.body,
        b"without bob"
    );
    drained(&alice).await;
    // Bob can no longer send to the group either.
    assert!(bob.send_group(&group, b"x", &[]).await.is_err());
    // Nothing of the group reached Bob after his removal: a 1:1 message from Alice
    // is the next thing he gets.
    alice
        .send(&bob.account(), b"1:1 after")
        .await
        .expect("send");
    let next = next_match(&mut bob_events, |e| match e {
        Event::GroupMessage(m) => Some(m.body),
        Event::Message(m) => Some(m.body),
        _ => None,
    })
    .await;
    assert_eq!(next, b"1:1 after");
    for c in [alice, bob, carol] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn concurrent_adds_rebase_and_both_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(
        &relay.address,
        dir.path(),
        &["alice", "bob", "carol", "dave"],
    )
    .await;
    let (dave, mut dave_events) = all.pop().expect("dave");
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, _alice_events) = all.pop().expect("alice");
    let group = group_with(&alice, "g", &[bob.account()], &mut [&mut bob_events]).await;
    members_are(&bob, &group, &[alice.account(), bob.account()]).await;

    // Both commit in the same epoch: one wins, the other rebases and commits next.
    let (to_carol, to_dave) = ([carol.account()], [dave.account()]);
    let (a, b) = tokio::join!(
        alice.add_members(&group, &to_carol),
        bob.add_members(&group, &to_dave),
    );
    a.expect("alice adds");
    b.expect("bob adds");
    joined(&mut carol_events).await;
    joined(&mut dave_events).await;
    let everyone = [
        alice.account(),
        bob.account(),
        carol.account(),
        dave.account(),
    ];
    for c in [&alice, &bob, &carol, &dave] {
        members_are(c, &group, &everyone).await;
    }
    dave.send_group(&group, b"all four", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&carol, &mut carol_events).await.body,
        b"all four"
    );
    assert_eq!(group_message(&bob, &mut bob_events).await.body, b"all four");

    // The adds may have missed each other; renames queued at once race within a
    // round trip. Until the relay has refused one as STALE_EPOCH (bounded): each
    // pair lands, the rebased one last, and every device agrees.
    let rebased = |infos: &[tern_client::GroupInfo]| {
        infos
            .iter()
            .find(|g| g.id == group)
            .map_or(0, |g| g.rebased_commits)
    };
    let mut stale = 0;
    for round in 0..8 {
        if stale > 0 {
            break;
        }
        let (to_a, to_b) = (format!("alice-{round}"), format!("bob-{round}"));
        let (a, b) = tokio::join!(
            alice.rename_group(&group, &to_a),
            bob.rename_group(&group, &to_b),
        );
        a.expect("alice renames");
        b.expect("bob renames");
        let name = within(async {
            loop {
                let (x, y) = (
                    alice.groups().await.expect("groups"),
                    bob.groups().await.expect("groups"),
                );
                let (gx, gy) = (&x[0], &y[0]);
                let settled = gx.pending_ops == 0 && gy.pending_ops == 0;
                let agreed = gx.name == gy.name && gx.epoch == gy.epoch;
                if settled && agreed && gx.name.ends_with(&format!("-{round}")) {
                    stale = rebased(&x) + rebased(&y);
                    return gx.name.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        for c in [&carol, &dave] {
            within(async {
                while c.groups().await.expect("groups")[0].name != name {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
    }
    assert!(stale > 0, "no commit was refused as stale in 8 races");
    for c in [alice, bob, carol, dave] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn an_offline_member_catches_up_and_a_restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(
        &relay.address,
        dir.path(),
        &["alice", "bob", "carol", "dave"],
    )
    .await;
    let (dave, mut dave_events) = all.pop().expect("dave");
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, _alice_events) = all.pop().expect("alice");
    let joiners = &mut [&mut bob_events, &mut carol_events];
    let group = group_with(&alice, "g", &[bob.account(), carol.account()], joiners).await;

    // Carol goes offline through several epochs and messages.
    carol.shutdown().await;
    drop((carol, carol_events));
    alice
        .send_group(&group, b"epoch 1", &[])
        .await
        .expect("send");
    alice
        .add_members(&group, &[dave.account()])
        .await
        .expect("add");
    joined(&mut dave_events).await;
    bob.send_group(&group, b"epoch 2", &[]).await.expect("send");
    alice
        .remove_member(&group, &dave.account())
        .await
        .expect("remove");
    change(&mut dave_events, |c| matches!(c, GroupChange::RemovedSelf)).await;
    alice
        .send_group(&group, b"epoch 3", &[])
        .await
        .expect("send");
    // Alice restarts right after queueing: the message is on her disk only.
    alice
        .send_group(&group, b"across a restart", &[])
        .await
        .expect("send");
    alice.shutdown().await;
    drop(alice);
    let (alice, _alice_events) = within(Client::open(store(dir.path(), "alice")))
        .await
        .expect("reopen alice");
    drained(&alice).await;
    drained(&bob).await;

    let (carol, mut carol_events) = within(Client::open(store(dir.path(), "carol")))
        .await
        .expect("reopen carol");
    // Per sender, in order (the two senders' messages may interleave).
    let (mut from_alice, mut from_bob) = (Vec::new(), Vec::new());
    while from_alice.len() + from_bob.len() < 4 {
        let m = group_message(&carol, &mut carol_events).await;
        match m.sender == bob.account() {
            true => from_bob.push(m.body),
            false => from_alice.push(m.body),
        }
    }
    assert_eq!(
        from_alice,
        [&b"epoch 1"[..], b"epoch 3", b"across a restart"]
    );
    assert_eq!(from_bob, [&b"epoch 2"[..]]);
    members_are(
        &carol,
        &group,
        &[alice.account(), bob.account(), carol.account()],
    )
    .await;
    // Bob got the restarted message once too.
    let mut bob_got = Vec::new();
    while bob_got.len() < 3 {
        bob_got.push(group_message(&bob, &mut bob_events).await.body);
    }
    assert_eq!(bob_got, [&b"epoch 1"[..], b"epoch 3", b"across a restart"]);
    for c in [alice, bob, carol, dave] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn garbage_in_a_group_envelope_is_dropped_and_blocks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["alice", "bob"]).await;
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, _alice_events) = all.pop().expect("alice");
    let group = group_with(&alice, "g", &[bob.account()], &mut [&mut bob_events]).await;

    // Anyone holding Bob's token can put bytes in his mailbox: a group envelope's
    // kind byte with nonsense after it, and a welcome that is not one.
    let (conn, _inbox) = within(tern_client::net::RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let token = bob.contact_card().await.delivery_token;
    for (i, body) in [vec![0x02u8; 80], vec![0x03u8, 1, 2, 3], vec![0x09u8; 10]]
        .into_iter()
        .enumerate()
    {
        let send = tern_proto::MultiSend {
            message_id: tern_proto::MessageId([i as u8 + 1; 16]),
            body: body.into(),
            recipients: vec![tern_proto::RecipientAccount {
                account: bob.account(),
                delivery_token: token.to_vec().into(),
                device_list_version: 0,
                devices: vec![DeviceId::PRIMARY],
                parts: Vec::new(),
            }],
        };
        let result = within(conn.multi_send(send)).await.expect("stored");
        assert_eq!(result.accepted, 1);
        next_match(&mut bob_events, |e| match e {
            Event::Dropped { .. } => Some(()),
            _ => None,
        })
        .await;
    }
    conn.close().await;
    alice
        .send_group(&group, b"still flowing", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&bob, &mut bob_events).await.body,
        b"still flowing"
    );
    for c in [alice, bob] {
        c.shutdown().await;
    }
}

/// Waits until every client's view of `group` satisfies `want`.
async fn all_see(
    clients: &[&Client],
    group: &GroupId,
    want: impl Fn(&tern_client::GroupInfo) -> bool,
) {
    for c in clients {
        within(async {
            loop {
                let groups = c.groups().await.expect("groups");
                if groups.iter().any(|g| g.id == *group && want(g)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

#[tokio::test]
async fn a_rename_reaches_every_device_and_periodic_updates_keep_the_group_talking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["bob", "carol"]).await;
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    // Alice renews her leaf whenever a round finds it older than 200 ms.
    let options =
        tern_client::ClientOptions::new().group_update_interval(Duration::from_millis(200));
    let (alice, _alice_events) =
        alice_with(&relay.address, dir.path(), options, &[&bob, &carol]).await;
    let (bob_laptop, mut laptop_events) = link(
        &relay.address,
        dir.path(),
        "bob-laptop",
        &bob,
        &mut bob_events,
    )
    .await;
    let joiners = &mut [&mut bob_events, &mut laptop_events, &mut carol_events];
    let group = group_with(&alice, "before", &[bob.account(), carol.account()], joiners).await;
    let devices = [&alice, &bob, &bob_laptop, &carol];

    alice
        .rename_group(&group, "marker-renamed-9c2b")
        .await
        .expect("rename");
    all_see(&devices, &group, |g| g.name == "marker-renamed-9c2b").await;
    for events in [&mut bob_events, &mut laptop_events, &mut carol_events] {
        change(
            events,
            |c| matches!(c, GroupChange::Renamed { name } if name == "marker-renamed-9c2b"),
        )
        .await;
    }
    // Bob describes it; his commit must reach Carol, whose token he learns from
    // her announcement (they are not contacts).
    bob.set_group_description(&group, "marker-description-41aa")
        .await
        .expect("describe");
    all_see(&devices, &group, |g| {
        g.description == "marker-description-41aa" && g.name == "marker-renamed-9c2b"
    })
    .await;

    // Alice keeps talking; her rounds renew her leaf along the way. Every member
    // reads every message, in order, across the epochs the updates make.
    let start = alice.groups().await.expect("groups")[0].epoch;
    let mut sent = 0;
    within(async {
        loop {
            alice
                .send_group(&group, format!("tick {sent}").as_bytes(), &[])
                .await
                .expect("send");
            sent += 1;
            if alice.groups().await.expect("groups")[0].epoch >= start + 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let epoch = alice.groups().await.expect("groups")[0].epoch;
    alice
        .send_group(&group, b"after the updates", &[])
        .await
        .expect("send");
    for (client, events) in [
        (&bob, &mut bob_events),
        (&bob_laptop, &mut laptop_events),
        (&carol, &mut carol_events),
    ] {
        for i in 0..sent {
            let m = group_message(client, events).await;
            assert_eq!(m.body, format!("tick {i}").as_bytes());
        }
        assert_eq!(
            group_message(client, events).await.body,
            b"after the updates"
        );
    }
    all_see(&devices, &group, |g| g.epoch >= epoch).await;
    drained(&alice).await;
    for marker in [&b"marker-renamed-9c2b"[..], b"marker-description-41aa"] {
        assert!(!on_disk(&relay.data_dir, marker), "a marker on the relay");
    }
    for c in [alice, bob, bob_laptop, carol] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn a_member_who_rotates_their_delivery_token_keeps_their_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["alice", "bob", "carol"]).await;
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, mut alice_events) = all.pop().expect("alice");
    let joiners = &mut [&mut bob_events, &mut carol_events];
    let group = group_with(&alice, "g", &[bob.account(), carol.account()], joiners).await;
    // Carol's new token reaches the group in her announcement; Alice's contact
    // card of her still holds the old one, which the relay now refuses.
    carol.rotate_delivery_token().await.expect("rotate");
    carol
        .send_group(&group, b"after rotating", &[])
        .await
        .expect("send");
    for (c, events) in [(&alice, &mut alice_events), (&bob, &mut bob_events)] {
        assert_eq!(group_message(c, events).await.body, b"after rotating");
    }
    alice
        .rename_group(&group, "still three")
        .await
        .expect("rename");
    let devices = [&alice, &bob, &carol];
    all_see(&devices, &group, |g| g.name == "still three").await;
    let everyone = [alice.account(), bob.account(), carol.account()];
    for c in devices {
        members_are(c, &group, &everyone).await;
    }
    alice
        .send_group(&group, b"to all three", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&carol, &mut carol_events).await.body,
        b"to all three"
    );
    for c in [alice, bob, carol] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn a_welcome_whose_tree_is_an_attachment_joins_and_talks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["bob", "carol"]).await;
    let (carol, mut carol_events) = all.pop().expect("carol");
    let (bob, mut bob_events) = all.pop().expect("bob");
    // Every welcome of Alice's carries its ratchet tree as an attachment, as one
    // into a group of a thousand devices would.
    let options = tern_client::ClientOptions::new().group_welcome_inline_max(0);
    let (alice, mut alice_events) =
        alice_with(&relay.address, dir.path(), options, &[&bob, &carol]).await;
    let group = group_with(
        &alice,
        "tree apart",
        &[bob.account()],
        &mut [&mut bob_events],
    )
    .await;
    bob.send_group(&group, b"joined from a fetched tree", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&alice, &mut alice_events).await.body,
        b"joined from a fetched tree"
    );
    // A later member's welcome too, into a group that already talks.
    alice
        .add_members(&group, &[carol.account()])
        .await
        .expect("add");
    assert_eq!(joined(&mut carol_events).await, group);
    let everyone = [alice.account(), bob.account(), carol.account()];
    for c in [&alice, &bob, &carol] {
        members_are(c, &group, &everyone).await;
    }
    alice
        .send_group(&group, b"to both", &[])
        .await
        .expect("send");
    for (c, events) in [(&bob, &mut bob_events), (&carol, &mut carol_events)] {
        assert_eq!(group_message(c, events).await.body, b"to both");
    }
    for c in [alice, bob, carol] {
        c.shutdown().await;
    }
}

#[tokio::test]
async fn a_device_whose_commit_expired_asks_to_be_re_added_and_talks_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Messages live 3 s here: a commit waiting for an offline device expires.
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[expiry]\nmessage_ttl = \"3s\"\nsweep_interval = \"200ms\"\n",
    )
    .expect("config");
    let relay = RelayProcess::start(
        &dir.path().join("relay"),
        &["--config", config.to_str().expect("utf-8")],
    )
    .expect("relay");
    let mut all = accounts(&relay.address, dir.path(), &["alice", "bob"]).await;
    let (bob, mut bob_events) = all.pop().expect("bob");
    let (alice, mut alice_events) = all.pop().expect("alice");
    let group = group_with(&alice, "g", &[bob.account()], &mut [&mut bob_events]).await;
    let both = [alice.account(), bob.account()];
    members_are(&alice, &group, &both).await;

    // Bob is away while Alice renames the group; the commit expires unread.
    bob.shutdown().await;
    drop((bob, bob_events));
    alice
        .rename_group(&group, "renamed-while-away")
        .await
        .expect("rename");
    members_are(&alice, &group, &both).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // Back, Bob commits in his old epoch: the relay names a later one his
    // mailbox never brings, so he asks Alice (who added him) to re-add him.
    let options = tern_client::ClientOptions::new().group_rejoin_after(Duration::ZERO);
    let (bob, mut bob_events) = within(Client::open_with(store(dir.path(), "bob"), options))
        .await
        .expect("reopen bob");
    // While behind he renames (Alice renamed since: hers is newer and stays)
    // and sets a description (nobody changed it since: it goes out).
    bob.rename_group(&group, "bob-was-here")
        .await
        .expect("rename");
    bob.set_group_description(&group, "described while away")
        .await
        .expect("describe");
    let name = next_match(&mut bob_events, |e| match e {
        Event::GroupJoined { group: g, name, .. } if g == group => Some(name),
        _ => None,
    })
    .await;
    assert_eq!(name, "renamed-while-away");
    members_are(&alice, &group, &both).await;

    // The re-added device talks with the group again, both ways.
    bob.send_group(&group, b"back again", &[])
        .await
        .expect("send");
    let m = group_message(&alice, &mut alice_events).await;
    assert_eq!(
        (m.body.as_slice(), m.sender),
        (&b"back again"[..], bob.account())
    );
    alice
        .send_group(&group, b"welcome back", &[])
        .await
        .expect("send");
    let m = group_message(&bob, &mut bob_events).await;
    assert_eq!(m.body, b"welcome back");
    // Of Bob's edits while behind, the one nobody overtook lands.
    all_see(&[&alice, &bob], &group, |g| {
        g.name == "renamed-while-away" && g.description == "described while away"
    })
    .await;
    for c in [alice, bob] {
        c.shutdown().await;
    }
}

/// A relay whose configuration is `toml`, in `dir`.
fn relay_with(dir: &Path, toml: &str) -> RelayProcess {
    let config = dir.join("relay.toml");
    std::fs::write(&config, toml).expect("config");
    RelayProcess::start(
        &dir.join("relay"),
        &["--config", config.to_str().expect("utf-8")],
    )
    .expect("relay")
}

#[tokio::test]
async fn a_tree_upload_the_relay_refuses_for_good_gives_up_its_commit_never_sent() {
    // A blob limit below any tree (TOO_LARGE), then an account quota below
    // any tree (QUOTA_EXCEEDED).
    for (case, toml) in [
        ("too large", "[media]\nmax_blob_bytes = 64\n"),
        ("over quota", "[media]\nmax_account_bytes = 64\n"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let relay = relay_with(dir.path(), toml);
        let mut all = accounts(&relay.address, dir.path(), &["bob"]).await;
        let (bob, mut bob_events) = all.pop().expect("bob");
        let options = tern_client::ClientOptions::new().group_welcome_inline_max(0);
        let (alice, mut alice_events) =
            alice_with(&relay.address, dir.path(), options, &[&bob]).await;
        let group = within(alice.create_group("refused", &[bob.account()]))
            .await
            .expect("create");
        let reason = next_match(&mut alice_events, |e| match e {
            Event::Dropped { reason } => Some(reason),
            _ => None,
        })
        .await;
        assert!(reason.contains("given up"), "{case}: {reason}");
        // Never sent: the group stays at its first epoch with Alice alone, and
        // its pipeline is free (nothing pending).
        let info = alice.groups().await.expect("groups");
        let info = info.iter().find(|g| g.id == group).expect("the group");
        assert_eq!(
            (info.epoch, info.pending_ops, info.members.clone()),
            (0, 0, vec![alice.account()]),
            "{case}"
        );
        // A 1:1 message after it still reaches Bob, and no group came first.
        // (Whether a welcome reached him is not seen here: a welcome with a
        // pointer is held silently until its tree comes.)
        alice
            .send(&bob.account(), b"after the refusal")
            .await
            .expect("send");
        let first = next_match(&mut bob_events, |e| match e {
            Event::GroupJoined { .. } => Some(None),
            Event::Message(m) => Some(Some(m.body)),
            _ => None,
        })
        .await;
        assert_eq!(first.as_deref(), Some(&b"after the refusal"[..]), "{case}");
        for c in [alice, bob] {
            c.shutdown().await;
        }
    }
}

#[tokio::test]
async fn a_tree_download_that_times_out_is_tried_again_and_joins_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    // Bob's downloads of a tree time out at once (no answer comes within no time).
    let bob_options = tern_client::ClientOptions::new().group_tree_download_timeout(Duration::ZERO);
    let (bob, mut bob_events) = within(Client::register_with(
        &relay.address,
        store(dir.path(), "bob"),
        bob_options,
    ))
    .await
    .expect("register bob");
    let options = tern_client::ClientOptions::new().group_welcome_inline_max(0);
    let (alice, _alice_events) = alice_with(&relay.address, dir.path(), options, &[&bob]).await;
    let group = within(alice.create_group("slow tree", &[bob.account()]))
        .await
        .expect("create");
    members_are(&alice, &group, &[alice.account(), bob.account()]).await;
    // The welcome is held, its tree not fetched: Bob is in no group, and the
    // rest of his traffic goes on.
    alice
        .send(&bob.account(), b"meanwhile")
        .await
        .expect("send");
    let first = next_match(&mut bob_events, |e| match e {
        Event::GroupJoined { .. } => Some(None),
        Event::Message(m) => Some(Some(m.body)),
        _ => None,
    })
    .await;
    assert_eq!(first.as_deref(), Some(&b"meanwhile"[..]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bob.groups().await.expect("groups").is_empty());
    // With time to download, the held welcome (kept across the restart) joins.
    bob.shutdown().await;
    drop((bob, bob_events));
    let (bob, mut bob_events) = within(Client::open(store(dir.path(), "bob")))
        .await
        .expect("reopen bob");
    assert_eq!(joined(&mut bob_events).await, group);
    alice
        .send_group(&group, b"now you read me", &[])
        .await
        .expect("send");
    assert_eq!(
        group_message(&bob, &mut bob_events).await.body,
        b"now you read me"
    );
    for c in [alice, bob] {
        c.shutdown().await;
    }
}
