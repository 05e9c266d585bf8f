//! What a device checks on receiving group traffic: leaves against pinned identity
//! keys, commits against the MLS rules, welcomes from contacts once per group and
//! epoch, our own commit's next epoch arriving before its answer; and that no
//! group delivery can stall the inbox.

use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use tern_proto::{auth, DeviceId, MessageId, MultiSend};

use super::groups::{deliver, events, key_package, knows, last_envelope, message_body, plan, text};
use super::{dev, dev_of, dropped, Dev, NOW};
use crate::client::group_commit::GroupStep;
use crate::client::groups::{GroupChange, GroupId};
use crate::client::keys::KEY_PACKAGE_LOW;
use crate::client::state::Outcome;
use crate::client::Event;
use crate::client::SEEN_RETENTION_MS;
use crate::groups::{DeviceCredential, GroupDevice, GroupMeta};
use crate::store::{KvStore, MemoryKv, Namespace};

mod held;

/// Everyone in `devs` holds everyone else's card.
fn all_know(devs: &mut [&mut Dev]) {
    for i in 0..devs.len() {
        for j in 0..devs.len() {
            if i != j {
                let (account, key, token) = (
                    devs[j].account(),
                    devs[j].state.keys.identity_key,
                    devs[j].state.keys.delivery_token,
                );
                devs[i]
                    .state
                    .add_contact(account, key, token)
                    .expect("contact");
            }
        }
    }
}

/// `devs[0]` creates a group with the others, who join.
fn group_of(devs: &mut [&mut Dev]) -> GroupId {
    let (first, rest) = devs.split_first_mut().expect("a creator");
    let others: Vec<_> = rest.iter().map(|d| d.account()).collect();
    let group = first
        .state
        .create_group("g", &others, NOW, &mut OsRng)
        .expect("create");
    let commit = plan(first, &group, rest);
    first.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[0];
    for d in rest.iter_mut() {
        events(d.receive(&deliver(&w.body, w.message_id)));
    }
    group
}

fn epoch(dev: &mut Dev, group: &GroupId) -> u64 {
    dev.state.session_mut(&group.0).expect("session").epoch()
}

fn leaves(dev: &mut Dev, group: &GroupId) -> usize {
    dev.state
        .session_mut(&group.0)
        .expect("session")
        .members()
        .len()
}

/// `dev`'s MLS client replaced by one that skips Tern's rules on its own commits.
fn misbehave(dev: &mut Dev) {
    let secret: [u8; 32] = dev.state.local.device_secret[..]
        .try_into()
        .expect("secret");
    let cred = dev
        .state
        .group_device
        .as_ref()
        .expect("device")
        .credential()
        .clone();
    dev.state.group_device = Some(GroupDevice::misbehaving(
        dev.state.kv.clone(),
        &secret,
        cred,
    ));
    dev.state.group_sessions.clear();
}

#[test]
fn a_leaf_claiming_a_member_under_another_identity_key_is_refused() {
    let mallory_identity = [77u8; 32];
    let (mut alice, mut bob) = (dev(1), dev(2));
    let mut mallory = dev_of(3, 1, &mallory_identity);
    all_know(&mut [&mut alice, &mut bob, &mut mallory]);
    let group = group_of(&mut [&mut alice, &mut bob, &mut mallory]);
    // Mallory certifies a device of her own as Bob's device 2.
    let signer = SigningKey::from_bytes(&mallory_identity);
    let device_key = SigningKey::generate(&mut OsRng);
    let forged = DeviceCredential {
        account: bob.account(),
        device: DeviceId::try_from(2).expect("device"),
        identity_key: signer.verifying_key().to_bytes(),
        certificate: signer
            .sign(&auth::device_certificate(
                Some(&bob.account()),
                &device_key.verifying_key().to_bytes(),
            ))
            .to_bytes(),
    };
    let fake = GroupDevice::new(
        Arc::new(MemoryKv::new()) as Arc<dyn KvStore>,
        &device_key.to_bytes(),
        forged,
    )
    .expect("a certificate valid under Mallory's key");
    let kp = fake.key_packages(1, NOW).expect("kp").value.remove(0);
    mallory
        .state
        .add_group_members(&group, &[bob.account()])
        .expect("queue");
    let commit = mallory
        .state
        .plan_commit(&group.0, vec![kp], NOW, &mut OsRng)
        .expect("plan")
        .expect("a commit");
    let to_members = &commit.sends[0];
    let claimed = bob.account();
    for d in [&mut alice, &mut bob] {
        let before = (epoch(d, &group), leaves(d, &group));
        let e = events(d.receive(&deliver(&to_members.body, to_members.message_id)));
        assert!(
            matches!(
                e.as_slice(),
                [Event::GroupIdentityMismatch { group: g, account }]
                    if *g == group && *account == claimed
            ),
            "{e:?}"
        );
        assert_eq!((epoch(d, &group), leaves(d, &group)), before, "not applied");
        // Left behind from here: a welcome re-adding it may replace the group.
        assert_eq!(d.state.groups[&group.0[..]].behind_since_ms, NOW);
        // Refused, not retried: a redelivery is a duplicate.
        assert!(matches!(
            d.receive(&deliver(&to_members.body, to_members.message_id)),
            Outcome::Duplicate
        ));
    }
    // Alice and Bob carry on in the epoch they are in.
    bob.state
        .enqueue_group(&group, text(b"still us"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut alice, &envelope, id), b"still us");
}

#[test]
fn a_bad_metadata_commit_is_refused_and_the_inbox_keeps_flowing() {
    let (mut alice, mut bob, mut mallory) = (dev(1), dev(2), dev(3));
    all_know(&mut [&mut alice, &mut bob, &mut mallory]);
    let group = group_of(&mut [&mut alice, &mut bob, &mut mallory]);
    misbehave(&mut mallory);
    let mut moved = GroupMeta {
        handle: [0; 16],
        name: "moved".into(),
        ..GroupMeta::default()
    };
    moved.handle[0] = 1;
    let mut other_handle = mls_rs::ExtensionList::new();
    other_handle.set(moved.extension());
    for list in [mls_rs::ExtensionList::new(), other_handle] {
        let session = mallory.state.session_mut(&group.0).expect("session");
        let staged = session
            .raw_commit(|c| Ok(c.set_group_context_ext(list)?))
            .expect("commit");
        let cleared = session.clear_pending().expect("clear");
        mallory.kv.apply(staged.ops, true).expect("apply");
        mallory.kv.apply(cleared.ops, true).expect("apply");
        let id = MessageId(rand::random());
        assert!(dropped(alice.receive(&deliver(&staged.value, id))));
    }
    // A 1:1 message after it arrives; the group loads and works after a restart.
    let d = bob.send(&mut alice, b"one to one");
    assert_eq!(alice.body(&d), b"one to one");
    alice.state.flush().expect("flush");
    alice.reload(NOW);
    bob.state
        .enqueue_group(&group, text(b"group"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut alice, &envelope, id), b"group");
    assert_eq!(alice.state.group_list().expect("groups")[0].name, "g");
}

#[test]
fn a_group_whose_stored_state_is_gone_drops_its_envelopes_and_blocks_nothing() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    all_know(&mut [&mut alice, &mut bob]);
    let group = group_of(&mut [&mut alice, &mut bob]);
    bob.state
        .enqueue_group(&group, text(b"lost"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    alice
        .kv
        .apply(
            vec![crate::store::Op::Delete(
                Namespace::MlsTree,
                group.0.to_vec(),
            )],
            true,
        )
        .expect("delete");
    alice.state.group_sessions.clear();
    assert!(dropped(alice.receive(&deliver(&envelope, id))));
    let d = bob.send(&mut alice, b"one to one");
    assert_eq!(alice.body(&d), b"one to one");
}

#[test]
fn a_welcome_with_a_group_id_of_another_length_is_dropped_before_it_is_stored() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    all_know(&mut [&mut alice, &mut bob]);
    let kp = key_package(&mut bob);
    let device = alice.state.group_device.as_ref().expect("device");
    let meta = GroupMeta {
        handle: [5; 16],
        name: "short".into(),
        ..GroupMeta::default()
    };
    let created = device
        .create_with_id(vec![9; 31], &meta, NOW)
        .expect("create");
    let mut session = created.value;
    let planned = session
        .commit(
            &crate::groups::Changes {
                add: vec![kp],
                ..Default::default()
            },
            NOW,
        )
        .expect("commit")
        .value;
    let body = planned.welcome.expect("welcome").body();
    assert!(dropped(bob.receive(&deliver(&body, MessageId([3; 16])))));
    assert!(bob.kv.scan(Namespace::Groups).expect("scan").is_empty());
    assert!(bob.state.group_list().expect("groups").is_empty());
    let d = alice.send(&mut bob, b"fine");
    assert_eq!(bob.body(&d), b"fine");
}

#[test]
fn a_message_of_the_epoch_after_our_pending_commit_applies_the_commit_first() {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    all_know(&mut [&mut alice, &mut bob, &mut carol]);
    let group = group_of(&mut [&mut alice, &mut bob]);
    alice
        .state
        .add_group_members(&group, &[carol.account()])
        .expect("queue");
    let commit = plan(&mut alice, &group, &mut [&mut carol]);
    // The relay fans the commit out before it answers Alice: Bob already writes
    // in the new epoch.
    let to_members = &commit.sends[0];
    events(bob.receive(&deliver(&to_members.body, to_members.message_id)));
    bob.state
        .enqueue_group(&group, text(b"welcome carol"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    // A restart in between changes nothing.
    alice.state.flush().expect("flush");
    alice.reload(NOW);
    let e = events(alice.receive(&deliver(&envelope, id)));
    assert!(
        matches!(
            e.as_slice(),
            [
                Event::GroupChanged { change: GroupChange::Added(_), .. },
                Event::GroupMessage(m),
            ] if m.body == b"welcome carol"
        ),
        "{e:?}"
    );
    assert_eq!(epoch(&mut alice, &group), 2);
    // The record waits for the relay's answer (its refusals still count).
    assert!(alice.state.groups[&group.0[..]].pending.is_some());
    // The relay's answer comes later: the op goes, no second event.
    assert!(alice
        .state
        .commit_accepted(&group.0)
        .expect("accepted")
        .is_empty());
    assert!(matches!(
        alice.state.group_step(&group.0).expect("step"),
        GroupStep::Idle
    ));
}

/// Alice creates a group and adds `bob` with the key package `kp`: the welcome.
fn welcome_with(alice: &mut Dev, bob: &Dev, kp: Vec<u8>) -> (GroupId, MultiSend) {
    let group = alice
        .state
        .create_group("g", &[], NOW, &mut OsRng)
        .expect("create");
    alice
        .state
        .add_group_members(&group, &[bob.account()])
        .expect("queue");
    loop {
        match alice.state.group_step(&group.0).expect("step") {
            GroupStep::Register { .. } => {
                alice.state.group_registered(&group.0).expect("registered")
            }
            GroupStep::Fetch(..) => break,
            _ => panic!("unexpected step"),
        }
    }
    let commit = alice
        .state
        .plan_commit(&group.0, vec![kp], NOW, &mut OsRng)
        .expect("plan")
        .expect("a commit");
    alice.state.commit_accepted(&group.0).expect("accepted");
    (group, commit.sends[0].clone())
}

#[test]
fn welcomes_come_from_contacts_and_once_per_group_and_epoch() {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    // Bob does not know Carol: her welcome is dropped.
    knows(&mut carol, &bob);
    let from_stranger = carol
        .state
        .create_group("stranger", &[bob.account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(&mut carol, &from_stranger, &mut [&mut bob]);
    let w = &commit.sends[0];
    assert!(dropped(bob.receive(&deliver(&w.body, w.message_id))));
    assert!(bob.state.group_list().expect("groups").is_empty());

    // Alice adds Bob with his last-resort key package, then removes him.
    all_know(&mut [&mut alice, &mut bob]);
    let (_, last_resort) = bob
        .state
        .key_package_upload(0, NOW)
        .expect("upload")
        .expect("credential");
    let (group, welcome) = welcome_with(&mut alice, &bob, last_resort);
    events(bob.receive(&deliver(&welcome.body, welcome.message_id)));
    alice
        .state
        .remove_group_member(&group, &bob.account())
        .expect("queue");
    let removal = plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let e = events(bob.receive(&deliver(
        &removal.sends[0].body,
        removal.sends[0].message_id,
    )));
    assert!(matches!(
        e.as_slice(),
        [Event::GroupChanged {
            change: GroupChange::RemovedSelf,
            ..
        }]
    ));
    // The relay replays the welcome under a new id: it does not bring the group back.
    bob.state.flush().expect("flush");
    bob.reload(NOW);
    assert!(matches!(
        bob.receive(&deliver(&welcome.body, MessageId([0x5a; 16]))),
        Outcome::Duplicate
    ));
    assert!(bob.state.group_list().expect("groups").is_empty());
}

#[test]
fn a_replaced_last_resort_secret_is_forgotten_once_no_welcome_can_wait_for_it() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    all_know(&mut [&mut alice, &mut bob]);
    let upload =
        |bob: &mut Dev, count, at| bob.state.key_package_upload(count, at).expect("upload");
    let (_, first) = upload(&mut bob, 0, NOW).expect("uploaded");
    let (_, second) = upload(&mut bob, 0, NOW).expect("uploaded");
    let secret = |bob: &Dev, kp: &[u8]| {
        let id = GroupDevice::key_package_id(kp).expect("id");
        bob.state
            .kv
            .get(Namespace::MlsKeyPackage, &id)
            .expect("get")
            .is_some()
    };
    let replaced_at = NOW;
    assert!(upload(
        &mut bob,
        KEY_PACKAGE_LOW,
        replaced_at + SEEN_RETENTION_MS - 1
    )
    .is_none());
    assert!(secret(&bob, &first), "kept while a welcome may wait");
    assert!(upload(&mut bob, KEY_PACKAGE_LOW, replaced_at + SEEN_RETENTION_MS).is_none());
    assert!(!secret(&bob, &first), "forgotten");
    assert!(secret(&bob, &second), "the current one stays");
    // A welcome made with the replaced one no longer joins.
    let (_, welcome) = welcome_with(&mut alice, &bob, first);
    assert!(dropped(
        bob.receive(&deliver(&welcome.body, welcome.message_id))
    ));
    let (_, welcome) = welcome_with(&mut alice, &bob, second);
    events(bob.receive(&deliver(&welcome.body, welcome.message_id)));
}

#[test]
fn a_message_from_a_leaf_under_a_key_no_longer_pinned_is_not_shown() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    all_know(&mut [&mut alice, &mut bob]);
    let group = group_of(&mut [&mut alice, &mut bob]);
    // Alice accepts another identity key for Bob: his leaf no longer matches.
    let token = bob.state.keys.delivery_token;
    alice
        .state
        .add_contact(bob.account(), [4; 32], token)
        .expect("changed");
    assert!(alice
        .state
        .accept_identity(&bob.account(), &[4; 32])
        .expect("accept"));
    bob.state
        .enqueue_group(&group, text(b"from the old leaf"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    let e = events(alice.receive(&deliver(&envelope, id)));
    assert!(
        matches!(
            e.as_slice(),
            [Event::GroupIdentityMismatch { account, .. }] if *account == bob.account()
        ),
        "{e:?}"
    );
    assert!(alice.state.unconfirmed_group().expect("inbox").is_empty());
}

#[test]
fn undecodable_group_content_still_stores_the_mls_step() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    all_know(&mut [&mut alice, &mut bob]);
    let group = group_of(&mut [&mut alice, &mut bob]);
    let session = bob.state.session_mut(&group.0).expect("session");
    let staged = session.encrypt(&[0xff; 9]).expect("encrypt");
    bob.kv.apply(staged.ops, true).expect("apply");
    let id = MessageId([0x44; 16]);
    assert!(dropped(alice.receive(&deliver(&staged.value, id))));
    // Stored with its MLS step: after a restart it is a duplicate, and the next
    // message reads.
    alice.state.flush().expect("flush");
    alice.reload(NOW);
    assert!(matches!(
        alice.receive(&deliver(&staged.value, id)),
        Outcome::Duplicate
    ));
    bob.state.group_sessions.clear();
    bob.state
        .enqueue_group(&group, text(b"next"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut alice, &envelope, id), b"next");
}
