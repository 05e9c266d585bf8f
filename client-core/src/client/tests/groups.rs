//! The group rules on states in memory, with the test standing in for the relay:
//! Alice creates a group with Bob and Carol, the welcome and messages go as the
//! relay would deliver them, two commits race for one epoch, a device restarts.

use rand::rngs::OsRng;
use tern_proto::{e2e, Delivery, GroupCommit, MessageId};

use super::{dev, dropped, Dev, DAY, NOW};
use crate::client::group_commit::GroupStep;
use crate::client::groups::{GroupChange, GroupId};
use crate::client::state::Outcome;
use crate::client::Event;

/// `from` holds `to`'s card.
pub(super) fn knows(from: &mut Dev, to: &Dev) {
    from.state
        .add_contact(
            to.account(),
            to.state.keys.identity_key,
            to.state.keys.delivery_token,
        )
        .expect("contact");
}

pub(super) fn deliver(body: &[u8], id: MessageId) -> Delivery {
    Delivery {
        seq: 1,
        message_id: id,
        payload: Default::default(),
        shared_body: Some(body.to_vec().into()),
        accepted_at_ms: NOW,
        expires_at_ms: NOW + 30 * DAY,
    }
}

pub(super) fn events(o: Outcome) -> Vec<Event> {
    match o {
        Outcome::Synced(e) => e,
        Outcome::Dropped(reason) => panic!("dropped: {reason}"),
        _ => panic!("not a group outcome"),
    }
}

/// One key package of `of`, as the relay hands it out.
pub(super) fn key_package(of: &mut Dev) -> Vec<u8> {
    let (mut packages, _) = of
        .state
        .key_package_upload(0, NOW)
        .expect("generate")
        .expect("a primary has a credential");
    packages.remove(0)
}

/// Runs `dev`'s pipeline for `group` up to a commit, handing out key packages of
/// `adds`.
pub(super) fn plan(dev: &mut Dev, group: &GroupId, adds: &mut [&mut Dev]) -> GroupCommit {
    loop {
        match dev.state.group_step(&group.0).expect("step") {
            GroupStep::Register { .. } => dev.state.group_registered(&group.0).expect("registered"),
            GroupStep::Fetch(..) | GroupStep::Plan => {
                let packages = adds.iter_mut().map(|d| key_package(d)).collect();
                return dev
                    .state
                    .plan_commit(&group.0, packages, NOW, &mut OsRng)
                    .expect("plan")
                    .expect("a commit");
            }
            GroupStep::Send(commit) => return commit,
            GroupStep::Idle | GroupStep::Wait => panic!("nothing to commit"),
        }
    }
}

/// The envelope of `dev`'s last queued group message, as its `MultiSend` carries it.
pub(super) fn last_envelope(dev: &Dev) -> (Vec<u8>, MessageId) {
    let (_, r) = dev.state.group_outbox.iter().last().expect("queued");
    assert!(!r.envelope.is_empty(), "encrypted when queued");
    let id = MessageId(r.message_id[..].try_into().expect("id"));
    (r.envelope.clone(), id)
}

pub(super) fn text(body: &[u8]) -> e2e::GroupContent {
    e2e::GroupContent {
        body: body.to_vec().into(),
        sent_at_ms: NOW,
        ..Default::default()
    }
}

pub(super) fn message_body(dev: &mut Dev, body: &[u8], id: MessageId) -> Vec<u8> {
    match events(dev.receive(&deliver(body, id))).as_slice() {
        [Event::GroupMessage(m)] => m.body.clone(),
        other => panic!("not one message: {other:?}"),
    }
}

#[test]
fn a_group_is_created_joined_and_talked_in_across_a_restart() {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    knows(&mut alice, &bob);
    knows(&mut alice, &carol);
    // Welcomes are taken from contacts only.
    knows(&mut bob, &alice);
    knows(&mut carol, &alice);
    let group = alice
        .state
        .create_group(
            "marker name",
            &[bob.account(), carol.account()],
            NOW,
            &mut OsRng,
        )
        .expect("create");
    // Stored before anything leaves: a restart carries on from the same step.
    alice.reload(NOW);
    let commit = plan(&mut alice, &group, &mut [&mut bob, &mut carol]);
    assert_eq!(commit.epoch, 0);
    assert_eq!(commit.sends.len(), 1, "nobody to tell but the new members");
    alice.reload(NOW);
    let again = plan(&mut alice, &group, &mut []);
    assert_eq!(
        again.commit_id, commit.commit_id,
        "the same commit is resent"
    );
    let changes = alice.state.commit_accepted(&group.0).expect("accepted");
    assert!(matches!(
        changes.as_slice(),
        [Event::GroupChanged { change: GroupChange::Added(a), .. }] if a.len() == 2
    ));
    let welcome = &commit.sends[0];
    assert!(!welcome.body.windows(11).any(|w| w == b"marker name"));
    for to in [&mut bob, &mut carol] {
        let e = events(to.receive(&deliver(&welcome.body, welcome.message_id)));
        assert!(matches!(
            e.as_slice(),
            [Event::GroupJoined { group: g, name, .. }] if *g == group && name == "marker name"
        ));
        assert!(matches!(
            to.receive(&deliver(&welcome.body, welcome.message_id)),
            Outcome::Duplicate
        ));
    }

    alice
        .state
        .enqueue_group(&group, text(b"hello group"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&alice);
    assert_eq!(
        alice.state.group_outbox.values().last().map(|r| r.to.len()),
        Some(2)
    );
    assert_eq!(message_body(&mut bob, &envelope, id), b"hello group");
    assert!(matches!(
        bob.receive(&deliver(&envelope, id)),
        Outcome::Duplicate
    ));
    bob.state.flush().expect("flush");
    bob.reload(NOW);
    assert!(matches!(
        bob.receive(&deliver(&envelope, id)),
        Outcome::Duplicate
    ));
    assert_eq!(message_body(&mut carol, &envelope, id), b"hello group");
    // Kept until the app confirms it, and handed over again after a restart.
    let kept = bob.state.unconfirmed_group().expect("inbox");
    assert_eq!(kept.len(), 1);
    bob.state.confirm(kept[0].seq).expect("confirm");
    assert!(bob.state.unconfirmed_group().expect("inbox").is_empty());

    // Bob answers after a restart; Alice reads it.
    bob.state
        .enqueue_group(&group, text(b"back"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut alice, &envelope, id), b"back");

    // Garbage after the envelope byte, or an unknown kind: dropped, nothing stored.
    assert!(dropped(
        alice.receive(&deliver(&[0x02; 60], MessageId([9; 16])))
    ));
    assert!(dropped(
        alice.receive(&deliver(&[0x03, 1, 2], MessageId([8; 16])))
    ));
    assert!(dropped(
        alice.receive(&deliver(&[0x07], MessageId([7; 16])))
    ));
    let infos = alice.state.group_list().expect("groups");
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].members.len(), 3);
}

#[test]
fn a_commit_that_lost_its_epoch_is_planned_again_after_the_winner() {
    let (mut alice, mut bob, mut carol, mut dave) = (dev(1), dev(2), dev(3), dev(4));
    // Bob holds Carol's card: his rebased commit must reach her too. Welcomes
    // are taken from contacts only.
    for (a, b) in [
        (0, 1),
        (0, 2),
        (1, 2),
        (1, 3),
        (0, 3),
        (1, 0),
        (2, 0),
        (3, 1),
    ] {
        let all = [&mut alice, &mut bob, &mut carol, &mut dave];
        let other = all[b].state.keys.identity_key;
        let (account, token) = (all[b].account(), all[b].state.keys.delivery_token);
        all[a]
            .state
            .add_contact(account, other, token)
            .expect("contact");
    }
    let group = alice
        .state
        .create_group("g", &[bob.account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[0];
    events(bob.receive(&deliver(&w.body, w.message_id)));

    // Both commit at epoch 1: Alice adds Carol, Bob adds Dave. The relay takes Alice's.
    alice
        .state
        .add_group_members(&group, &[carol.account()])
        .expect("queue");
    bob.state
        .add_group_members(&group, &[dave.account()])
        .expect("queue");
    let ours = plan(&mut alice, &group, &mut [&mut carol]);
    let theirs = plan(&mut bob, &group, &mut [&mut dave]);
    assert_eq!((ours.epoch, theirs.epoch), (1, 1));
    alice.state.commit_accepted(&group.0).expect("accepted");
    bob.state.commit_stale(&group.0, 2).expect("stale");
    assert!(matches!(
        bob.state.group_step(&group.0).expect("step"),
        GroupStep::Wait
    ));
    // Bob's inbox applies the winner; his op is planned again, at epoch 2.
    let to_members = &ours.sends[0];
    let e = events(bob.receive(&deliver(&to_members.body, to_members.message_id)));
    assert!(matches!(
        e.as_slice(),
        [Event::GroupChanged {
            change: GroupChange::Added(_),
            ..
        }]
    ));
    let rebased = plan(&mut bob, &group, &mut [&mut dave]);
    assert_eq!(rebased.epoch, 2);
    assert_ne!(rebased.commit_id, theirs.commit_id);
    bob.state.commit_accepted(&group.0).expect("accepted");
    let members = bob.state.group_list().expect("groups")[0].members.len();
    assert_eq!(members, 4);
}
