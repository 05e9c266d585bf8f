//! A device left behind asks to be re-added, and the planner re-adds it: the rules
//! of `group_rejoin.rs` and `OP_READD_DEVICE` on states in memory, requests sealed
//! and delivered as the relay would.

use prost::Message;
use rand::rngs::OsRng;
use tern_proto::{e2e, Delivery, DeviceId, GroupCommit};

use super::groups::{deliver, events, key_package, knows, last_envelope, message_body, plan, text};
use super::{dev, dev_of, relay_key, Dev, DAY, NOW};
use crate::client::group_commit::{GroupStep, OP_UPDATE};
use crate::client::group_meta::{MetaEdit, META_DESCRIPTION};
use crate::client::group_records::{
    GroupOpRecord, OP_META, OP_READD_DEVICE, OP_REMOVE, OP_REMOVE_DEVICE,
};
use crate::client::group_tree::HELD_WELCOME_MAX_AGE_MS;
use crate::client::groups::GroupId;
use crate::client::state::Outcome;
use crate::client::Event;
use crate::store::Batch;

/// Alice (a contact of Bob's) makes a group with Bob's devices `bobs`.
fn group_with(alice: &mut Dev, bobs: &mut [&mut Dev]) -> GroupId {
    for b in bobs.iter_mut() {
        knows(alice, b);
        knows(b, alice);
    }
    let group = alice
        .state
        .create_group("g", &[bobs[0].account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(alice, &group, bobs);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let welcome = &commit.sends[0];
    for b in bobs.iter_mut() {
        events(b.receive(&deliver(&welcome.body, welcome.message_id)));
    }
    group
}

fn pair() -> (Dev, Dev, GroupId) {
    let (mut alice, mut bob) = (dev(1), dev(2));
    let group = group_with(&mut alice, &mut [&mut bob]);
    (alice, bob, group)
}

/// Alice makes a group with Bob, then adds Carol, a contact of hers but not
/// Bob's: Bob pins Carol's key from the group only.
fn with_carol() -> (Dev, Dev, Dev, GroupId) {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    knows(&mut carol, &alice);
    let group = group_with(&mut alice, &mut [&mut bob]);
    knows(&mut alice, &carol);
    alice
        .state
        .add_group_members(&group, &[carol.account()])
        .expect("queued");
    let commit = plan(&mut alice, &group, &mut [&mut carol]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    events(bob.receive(&deliver(&commit.sends[0].body, commit.sends[0].message_id)));
    events(carol.receive(&deliver(&commit.sends[1].body, commit.sends[1].message_id)));
    (alice, bob, carol, group)
}

fn epoch(dev: &mut Dev, group: &GroupId) -> u64 {
    dev.state.session_mut(&group.0).expect("session").epoch()
}

fn ops(dev: &Dev, group: &GroupId) -> Vec<GroupOpRecord> {
    dev.state.groups[&group.0[..]].ops.clone()
}

/// Alice commits a rename Bob never gets; Bob's own commit of the old epoch is
/// refused as `STALE_EPOCH` naming the new one.
fn leave_behind(alice: &mut Dev, bob: &mut Dev, group: &GroupId) {
    alice
        .state
        .edit_group_meta(group, MetaEdit::Name("missed".into()))
        .expect("queued");
    let _ = plan(alice, group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    bob.state
        .edit_group_meta(group, MetaEdit::Description("late".into()))
        .expect("queued");
    let _ = plan(bob, group, &mut []);
    let current = epoch(alice, group);
    bob.state.commit_stale(&group.0, current).expect("stale");
}

/// Marks `dev` behind in `group`, as a refused commit does.
fn mark_behind(dev: &mut Dev, group: &GroupId) {
    let mut record = dev.state.groups[&group.0[..]].clone();
    record.behind_since_ms = NOW;
    let mut batch = Batch::new();
    dev.state.put_group(&group.0, record, &mut batch);
    dev.state.commit(batch, true).expect("marked");
}

/// `from`'s last queued request, sealed for `to`.
fn sealed_request(from: &mut Dev, to: &mut Dev) -> Delivery {
    sealed_request_at(from, to, NOW)
}

/// [`sealed_request`] sent at `sent_at`.
fn sealed_request_at(from: &mut Dev, to: &mut Dev, sent_at: u64) -> Delivery {
    from.sessions_with(to);
    let device = from.state.keys.address.device.get();
    let cert = from.certificate(device, NOW + 30 * DAY, &relay_key());
    let d = from.seal_last_at(to, &cert, sent_at);
    assert!(
        from.state.outbox().next().is_none(),
        "sent: out of the outbox"
    );
    d
}

/// A request from `from` to `to`, for `group` at `at_epoch`.
fn request(from: &mut Dev, to: &mut Dev, group: &[u8], at_epoch: u64) -> Delivery {
    request_at(from, to, group, at_epoch, NOW)
}

/// [`request`] sent at `sent_at`.
fn request_at(from: &mut Dev, to: &mut Dev, group: &[u8], at_epoch: u64, sent_at: u64) -> Delivery {
    let body = e2e::GroupRejoin {
        group_id: group.to_vec().into(),
        epoch: at_epoch,
    }
    .encode_to_vec();
    let mut batch = Batch::new();
    let account = to.account();
    from.state
        .queue_rejoin(&account, &body, sent_at, &mut OsRng, &mut batch);
    from.state.commit(batch, true).expect("queued");
    sealed_request_at(from, to, sent_at)
}

/// Delivers `d` to `to` at `now`: a request is never a message.
fn take(to: &mut Dev, d: &Delivery, now: u64) {
    match to.state.receive(d, now, &mut OsRng).expect("receive") {
        Outcome::Synced(e) => assert!(e.is_empty(), "no event: {e:?}"),
        Outcome::Dropped(reason) => panic!("dropped: {reason}"),
        _ => panic!("not taken quietly"),
    }
}

fn readds(dev: &Dev, group: &GroupId) -> Vec<(Vec<u8>, u32, u64)> {
    ops(dev, group)
        .iter()
        .filter(|o| o.kind == OP_READD_DEVICE)
        .map(|o| (o.accounts[0].clone(), o.device, o.epoch))
        .collect()
}

/// Planning `dev`'s head op with `packages` commits nothing and drops the op.
fn head_op_dropped(dev: &mut Dev, group: &GroupId, packages: Vec<Vec<u8>>) {
    assert!(dev
        .state
        .plan_commit(&group.0, packages, NOW, &mut OsRng)
        .expect("plan")
        .is_none());
    assert!(ops(dev, group).is_empty());
    let session = dev.state.session_mut(&group.0).expect("session");
    assert!(!session.has_pending());
}

#[test]
fn a_joined_device_keeps_who_added_it() {
    let (alice, bob, group) = pair();
    assert_eq!(
        bob.state.groups[&group.0[..]].added_by,
        alice.account().as_bytes()
    );
    assert!(alice.state.groups[&group.0[..]].added_by.is_empty());
}

#[test]
fn a_device_that_refused_a_commit_asks_its_adder_at_once_and_once_a_day() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    mark_behind(&mut bob, &group);
    assert!(bob
        .state
        .queue_rejoins(NOW, false, DAY, &mut OsRng)
        .expect("look"));
    let queued: Vec<_> = bob.state.outbox().map(|(_, r)| r.clone()).collect();
    assert_eq!(queued.len(), 1, "no other devices: the adder alone");
    assert_eq!(queued[0].recipient, alice.account().as_bytes());
    assert!(queued[0].body.is_empty());
    let asked = e2e::GroupRejoin::decode(&queued[0].rejoin[..]).expect("request");
    assert_eq!(
        (asked.group_id.to_vec(), asked.epoch),
        (group.0.to_vec(), 1)
    );
    // Once a day per group.
    assert!(!bob
        .state
        .queue_rejoins(NOW + DAY - 1, false, DAY, &mut OsRng)
        .expect("look"));
    assert_eq!(bob.state.outbox().count(), 1);
    // Sent: no event for the app (it is no message of its).
    let d = sealed_request(&mut bob, &mut alice);
    take(&mut alice, &d, NOW);
    assert_eq!(
        readds(&alice, &group),
        [(bob.account().as_bytes().to_vec(), 1, 2)]
    );
    assert!(alice.state.unconfirmed().expect("inbox").is_empty());
    assert!(bob
        .state
        .queue_rejoins(NOW + DAY, false, DAY, &mut OsRng)
        .expect("look"));
}

#[test]
fn an_unmet_stale_epoch_wait_asks_only_a_while_after_the_mailbox_emptied() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let look = |bob: &mut Dev, now: u64, drained: bool| {
        bob.state
            .queue_rejoins(now, drained, DAY, &mut OsRng)
            .expect("look")
    };
    // The mailbox not read to its end yet: the epoch may still come.
    assert!(!look(&mut bob, NOW + 5 * DAY, false));
    assert_eq!(bob.state.groups[&group.0[..]].wait_unmet_since_ms, 0);
    let emptied = NOW + 5 * DAY;
    assert!(!look(&mut bob, emptied, true));
    assert!(!look(&mut bob, emptied + DAY - 1, true));
    assert!(look(&mut bob, emptied + DAY, true));
    assert_eq!(bob.state.outbox().count(), 1);
    // A restart keeps when it asked.
    bob.reload(NOW);
    assert!(!look(&mut bob, emptied + DAY + 1, true));
}

#[test]
fn a_met_wait_and_a_group_created_here_ask_nobody() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    assert!(!bob
        .state
        .queue_rejoins(NOW, true, DAY, &mut OsRng)
        .expect("look"));
    // The awaited commit comes after all: nothing to ask.
    let mut record = bob.state.groups[&group.0[..]].clone();
    record.wait_epoch = 1;
    let mut batch = Batch::new();
    bob.state.put_group(&group.0, record, &mut batch);
    bob.state.commit(batch, true).expect("met");
    assert!(!bob
        .state
        .queue_rejoins(NOW + 2 * DAY, true, DAY, &mut OsRng)
        .expect("look"));
    assert_eq!(bob.state.groups[&group.0[..]].wait_unmet_since_ms, 0);
    // Alice created the group and has no other device: nobody to ask.
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.behind_since_ms = NOW;
    let mut batch = Batch::new();
    alice.state.put_group(&group.0, record, &mut batch);
    alice.state.commit(batch, true).expect("marked");
    assert!(!alice
        .state
        .queue_rejoins(NOW, true, DAY, &mut OsRng)
        .expect("look"));
    assert_eq!(alice.state.outbox().count(), 0);
}

#[test]
fn a_request_is_taken_once_a_day_per_device() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    let bob_id = bob.account().as_bytes().to_vec();
    assert_eq!(readds(&alice, &group), [(bob_id.clone(), 1, 2)]);
    // Another within the day is dropped, one a day later taken.
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW + DAY - 1);
    assert_eq!(readds(&alice, &group).len(), 1);
    alice.reload(NOW);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW + DAY);
    assert_eq!(readds(&alice, &group).len(), 2);
}

#[test]
fn a_request_not_behind_or_for_another_group_is_dropped() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    // The current epoch (2) is no epoch behind; nor is a later one.
    for at in [2, 9] {
        let d = request(&mut bob, &mut alice, &group.0, at);
        take(&mut alice, &d, NOW);
    }
    let d = request(&mut bob, &mut alice, &[7; 32], 0);
    take(&mut alice, &d, NOW);
    assert!(readds(&alice, &group).is_empty());
    // A request with a body is no request.
    bob.sessions_with(&mut alice);
    let mut batch = Batch::new();
    let body = e2e::GroupRejoin {
        group_id: group.0.to_vec().into(),
        epoch: 1,
    }
    .encode_to_vec();
    let account = alice.account();
    bob.state
        .queue_rejoin(&account, &body, NOW, &mut OsRng, &mut batch);
    bob.state.commit(batch, true).expect("queued");
    let seq = *bob.state.outbox().last().expect("queued").0;
    let mut record = bob.state.outbox[&seq].clone();
    record.body = b"hello".to_vec();
    bob.state.outbox.insert(seq, record);
    let d = sealed_request(&mut bob, &mut alice);
    assert!(matches!(
        alice.receive(&d),
        Outcome::Dropped(r) if r.contains("rejoin")
    ));
    assert!(readds(&alice, &group).is_empty());
}

#[test]
fn a_request_from_a_device_not_in_the_group_or_a_blocked_contact_is_dropped() {
    let secret = rand::random();
    let (mut alice, mut bob) = (dev(1), dev_of(2, 1, &secret));
    let group = group_with(&mut alice, &mut [&mut bob]);
    leave_behind(&mut alice, &mut bob, &group);
    // Carol is Alice's contact but no member.
    let mut carol = dev(3);
    knows(&mut alice, &carol);
    knows(&mut carol, &alice);
    let d = request(&mut carol, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    // Bob's second device, linked after the group was made: no leaf.
    let mut bob2 = dev_of(2, 2, &secret);
    let d = request(&mut bob2, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    // A device of Bob's account under another identity key: held as a change.
    let mut other = dev_of(2, 3, &rand::random());
    let d = request(&mut other, &mut alice, &group.0, 1);
    assert!(matches!(alice.receive(&d), Outcome::Held { .. }));
    // Bob while Alice has yet to decide on a changed key of his: blocked.
    let mut contact = alice.state.contacts[&bob.account()].clone();
    contact.changed_identity_key = vec![9; 32];
    alice.state.contacts.insert(bob.account(), contact);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    assert!(readds(&alice, &group).is_empty());
}

#[test]
fn a_request_under_a_key_other_than_the_groups_pin_is_dropped() {
    // Carol is no contact of Bob's: her key is pinned by the group only.
    let (_alice, mut bob, mut carol, group) = with_carol();
    let mut record = bob.state.groups[&group.0[..]].clone();
    let pin = record
        .pins
        .iter_mut()
        .find(|p| p.account == carol.account().as_bytes())
        .expect("carol pinned");
    pin.identity_key = vec![9; 32];
    bob.state.groups.insert(group.0.to_vec(), record);
    let d = request(&mut carol, &mut bob, &group.0, 0);
    take(&mut bob, &d, NOW);
    assert!(readds(&bob, &group).is_empty());
}

#[test]
fn an_own_device_behind_is_re_added_by_another_device_of_the_account() {
    let secret = rand::random();
    let (mut alice, mut bob, mut bob2) = (dev(1), dev_of(2, 1, &secret), dev_of(2, 2, &secret));
    let group = group_with(&mut alice, &mut [&mut bob, &mut bob2]);
    let d = request(&mut bob2, &mut bob, &group.0, 0);
    take(&mut bob, &d, NOW);
    assert_eq!(
        readds(&bob, &group),
        [(bob.account().as_bytes().to_vec(), 2, 1)]
    );
    // Bob's phone re-adds it: the package kept is that of device 2.
    let kp1 = key_package(&mut bob);
    let kp2 = key_package(&mut bob2);
    let commit = bob
        .state
        .plan_commit(&group.0, vec![kp1, kp2], NOW, &mut OsRng)
        .expect("plan")
        .expect("a commit");
    let welcome = commit.sends.last().expect("welcome");
    assert_eq!(welcome.recipients.len(), 1);
    assert_eq!(
        welcome.recipients[0].devices,
        [DeviceId::new(2).expect("id")]
    );
}

#[test]
fn a_readd_removes_the_leaf_and_adds_a_fresh_one_the_device_joins_at_the_new_epoch() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    assert_eq!((epoch(&mut alice, &group), epoch(&mut bob, &group)), (2, 1));
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    assert_eq!(commit.epoch, 2);
    assert_eq!(commit.sends.len(), 2, "the commit and the welcome");
    alice.state.commit_accepted(&group.0).expect("accepted");
    assert!(ops(&alice, &group).is_empty());
    assert_eq!(epoch(&mut alice, &group), 3);
    // Bob cannot read the commit (its epoch is past his); the welcome brings him.
    let c = &commit.sends[0];
    let _ = bob.receive(&deliver(&c.body, c.message_id));
    let w = &commit.sends[1];
    assert!(matches!(
        events(bob.receive(&deliver(&w.body, w.message_id))).as_slice(),
        [Event::GroupJoined { group: g, .. }] if *g == group
    ));
    assert_eq!(epoch(&mut bob, &group), 3);
    assert_eq!(bob.state.groups[&group.0[..]].wait_epoch, 0);
    // Bob's rename, queued while he was behind, still goes out.
    let kinds: Vec<u32> = ops(&bob, &group).iter().map(|o| o.kind).collect();
    assert_eq!(kinds, [OP_META]);
    bob.state
        .enqueue_group(&group, text(b"back"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut alice, &envelope, id), b"back");
    alice
        .state
        .enqueue_group(&group, text(b"hi again"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&alice);
    assert_eq!(message_body(&mut bob, &envelope, id), b"hi again");
}

#[test]
fn a_readd_without_a_package_of_that_device_or_after_the_group_moved_on_is_dropped() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    // Only another account's package: dropped, nothing committed.
    let mut carol = dev(3);
    knows(&mut alice, &carol);
    let kp = key_package(&mut carol);
    head_op_dropped(&mut alice, &group, vec![kp]);
    // Taken at epoch 2; the group moves on before it is planned: dropped.
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW + DAY);
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("moved".into()))
        .expect("queued");
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.ops.swap(0, 1);
    alice.state.groups.insert(group.0.to_vec(), record);
    let _ = plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let kp = key_package(&mut bob);
    head_op_dropped(&mut alice, &group, vec![kp]);
}

#[test]
fn an_op_of_an_unknown_kind_is_dropped_and_removes_nobody() {
    let (mut alice, bob, group) = pair();
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.ops.push(GroupOpRecord {
        kind: 99,
        accounts: vec![bob.account().as_bytes().to_vec()],
        device: 1,
        ..GroupOpRecord::default()
    });
    alice.state.groups.insert(group.0.to_vec(), record);
    head_op_dropped(&mut alice, &group, Vec::new());
    let members = alice
        .state
        .session_mut(&group.0)
        .expect("session")
        .members();
    assert!(members.iter().any(|m| m.account == bob.account()));
}

#[test]
fn a_persisted_unmet_wait_asks_only_after_the_mailbox_is_read_again() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let mut record = bob.state.groups[&group.0[..]].clone();
    record.wait_unmet_since_ms = NOW;
    let mut batch = Batch::new();
    bob.state.put_group(&group.0, record, &mut batch);
    bob.state.commit(batch, true).expect("persisted");
    bob.reload(NOW);
    // After a restart the mailbox is unread: the commit may still be there.
    assert!(!bob
        .state
        .queue_rejoins(NOW + 2 * DAY, false, DAY, &mut OsRng)
        .expect("look"));
    assert_eq!(bob.state.outbox().count(), 0);
    assert!(bob
        .state
        .queue_rejoins(NOW + 2 * DAY, true, DAY, &mut OsRng)
        .expect("look"));
}

#[test]
fn a_request_from_a_member_who_is_no_contact_is_dropped_and_makes_no_contact() {
    // Carol is a member Bob never made a contact: her key is pinned by the group.
    let (_alice, mut bob, mut carol, group) = with_carol();
    assert!(!bob.state.contacts.contains_key(&carol.account()));
    let d = request(&mut carol, &mut bob, &group.0, 0);
    take(&mut bob, &d, NOW);
    assert!(readds(&bob, &group).is_empty());
    assert!(!bob.state.contacts.contains_key(&carol.account()));
    bob.reload(NOW);
    assert!(!bob.state.contacts.contains_key(&carol.account()));
}

#[test]
fn a_welcome_to_a_group_being_left_is_dropped() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let mut record = bob.state.groups[&group.0[..]].clone();
    record.leaving = true;
    bob.state.groups.insert(group.0.to_vec(), record);
    let w = &commit.sends[1];
    assert!(matches!(
        bob.receive(&deliver(&w.body, w.message_id)),
        Outcome::Dropped(r) if r.contains("left")
    ));
    assert_eq!(epoch(&mut bob, &group), 1);
    assert!(bob.state.groups[&group.0[..]].leaving);
}

#[test]
fn unanswered_requests_come_ever_more_rarely_up_to_a_month_apart() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    mark_behind(&mut bob, &group);
    let mut look = |now: u64| {
        bob.state
            .queue_rejoins(now, false, DAY, &mut OsRng)
            .expect("look")
    };
    // Asked at 0, then a day, two, four ... days after the last ask.
    let mut asked = Vec::new();
    for day in 0..80 {
        if look(NOW + day * DAY) {
            asked.push(day);
        }
    }
    assert_eq!(asked, [0, 1, 3, 7, 15, 31, 61]);
}

#[test]
fn a_readd_of_another_epoch_is_dropped_before_any_fetch() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    assert!(matches!(
        alice.state.next_group_step(&group.0, NOW, DAY),
        Ok(GroupStep::Fetch(..))
    ));
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.ops[0].epoch = 1;
    alice.state.groups.insert(group.0.to_vec(), record);
    assert!(matches!(
        alice.state.next_group_step(&group.0, NOW, DAY),
        Ok(GroupStep::Idle)
    ));
    assert!(ops(&alice, &group).is_empty());
    alice.reload(NOW);
    assert!(ops(&alice, &group).is_empty());
}

const HOUR: u64 = 3600 * 1000;

/// Alice renames; Carol follows, Bob misses it (he stays at epoch 2) and asks
/// both at `NOW`. Carol takes hers and re-adds him (epoch 4), answered at
/// `NOW + 2 h`, as Alice applies it. Returns the re-add commit and Bob's copy
/// of the request to Alice, not yet delivered.
fn readd_by_carol(
    alice: &mut Dev,
    bob: &mut Dev,
    carol: &mut Dev,
    group: &GroupId,
) -> (GroupCommit, Delivery) {
    knows(carol, bob);
    knows(bob, carol);
    alice
        .state
        .edit_group_meta(group, MetaEdit::Name("missed".into()))
        .expect("queued");
    let rename = plan(alice, group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let c = &rename.sends[0];
    events(carol.receive(&deliver(&c.body, c.message_id)));
    assert_eq!(epoch(bob, group), 2);
    mark_behind(bob, group);
    let late_to_alice = request(bob, alice, &group.0, 2);
    let to_carol = request(bob, carol, &group.0, 2);
    take(carol, &to_carol, NOW + HOUR);
    let readd = plan(carol, group, &mut [&mut *bob]);
    carol
        .state
        .commit_accepted_at(&group.0, NOW + 2 * HOUR)
        .expect("accepted");
    assert_eq!(epoch(carol, group), 4);
    let c = &readd.sends[0];
    let applied = alice
        .state
        .receive(&deliver(&c.body, c.message_id), NOW + 2 * HOUR, &mut OsRng);
    events(applied.expect("receive"));
    assert_eq!(epoch(alice, group), 4);
    (readd, late_to_alice)
}

#[test]
fn a_request_older_than_the_devices_last_re_add_is_dropped_by_every_member() {
    let (mut alice, mut bob, mut carol, group) = with_carol();
    let (readd, late_to_alice) = readd_by_carol(&mut alice, &mut bob, &mut carol, &group);
    let w = &readd.sends[1];
    events(bob.receive(&deliver(&w.body, w.message_id)));
    assert_eq!(epoch(&mut bob, &group), 4);
    // Alice's copy arrives two days late: Bob's leaf is newer than it (kept
    // across a restart); Carol drops a late second copy the same way.
    alice.reload(NOW);
    take(&mut alice, &late_to_alice, NOW + 2 * DAY);
    assert!(readds(&alice, &group).is_empty(), "no second re-add");
    let late_to_carol = request(&mut bob, &mut carol, &group.0, 2);
    take(&mut carol, &late_to_carol, NOW + 2 * DAY);
    assert!(readds(&carol, &group).is_empty());
    // Bob's fresh leaf falls behind again (Alice renames, he misses it); his
    // request from the epoch he is really at is taken.
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("again".into()))
        .expect("queued");
    let _ = plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let at = epoch(&mut bob, &group);
    let d = request_at(&mut bob, &mut alice, &group.0, at, NOW + 2 * DAY);
    take(&mut alice, &d, NOW + 2 * DAY);
    assert_eq!(readds(&alice, &group).len(), 1);
}

#[test]
fn a_device_whose_re_add_welcome_was_lost_is_re_added_on_its_next_request() {
    let (mut alice, mut bob, mut carol, group) = with_carol();
    // Carol's re-add never reaches Bob (its tree could not be downloaded, say):
    // he stays at epoch 2, still a leaf of epoch 4 to the others.
    let (_readd, late_to_alice) = readd_by_carol(&mut alice, &mut bob, &mut carol, &group);
    assert_eq!(epoch(&mut bob, &group), 2);
    // A copy sent before the re-add is still told apart; one sent less than
    // the clock skew allowed before it is not.
    take(&mut alice, &late_to_alice, NOW + DAY);
    assert!(readds(&alice, &group).is_empty());
    let skewed = request_at(&mut bob, &mut alice, &group.0, 2, NOW + 3 * HOUR / 2);
    take(&mut alice, &skewed, NOW + DAY);
    assert_eq!(readds(&alice, &group).len(), 1, "within the skew: taken");
    // Bob asks again later, naming the epoch he is at: Carol takes it.
    let again = request_at(&mut bob, &mut carol, &group.0, 2, NOW + 2 * DAY);
    take(&mut carol, &again, NOW + 2 * DAY);
    assert_eq!(
        readds(&carol, &group).len(),
        1,
        "a lost welcome is re-added"
    );
    // Past a week and a day after the add, no copy is told apart any more.
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.ops.clear();
    record.readds.clear();
    alice.state.groups.insert(group.0.to_vec(), record);
    let old = request_at(&mut bob, &mut alice, &group.0, 2, NOW);
    take(
        &mut alice,
        &old,
        NOW + 2 * HOUR + HELD_WELCOME_MAX_AGE_MS + DAY + 1,
    );
    assert_eq!(readds(&alice, &group).len(), 1);
}

#[test]
fn a_readd_fetches_the_key_packages_of_that_device_only() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    match alice.state.next_group_step(&group.0, NOW, DAY) {
        Ok(GroupStep::Fetch(accounts, device)) => {
            assert_eq!(accounts, [bob.account()]);
            assert_eq!(device, Some(DeviceId::new(1).expect("id")));
        }
        _ => panic!("not a fetch"),
    }
    // An add fetches every device of the account.
    let carol = dev(3);
    knows(&mut alice, &carol);
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.ops.clear();
    alice.state.groups.insert(group.0.to_vec(), record);
    alice
        .state
        .add_group_members(&group, &[carol.account()])
        .expect("queued");
    assert!(matches!(
        alice.state.next_group_step(&group.0, NOW, DAY),
        Ok(GroupStep::Fetch(_, None))
    ));
}

#[test]
fn a_device_that_caught_up_asks_at_the_first_pace_again() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    mark_behind(&mut bob, &group);
    for day in [0, 1, 3] {
        assert!(bob
            .state
            .queue_rejoins(NOW + day * DAY, false, DAY, &mut OsRng)
            .expect("look"));
    }
    assert_eq!(bob.state.groups[&group.0[..]].rejoin_asks, 3);
    // The awaited epoch came (as the inbox records it): no longer behind.
    let mut record = bob.state.groups[&group.0[..]].clone();
    record.behind_since_ms = 0;
    record.wait_epoch = 0;
    let mut batch = Batch::new();
    bob.state.put_group(&group.0, record, &mut batch);
    bob.state.commit(batch, true).expect("caught up");
    assert!(!bob
        .state
        .queue_rejoins(NOW + 4 * DAY, false, DAY, &mut OsRng)
        .expect("look"));
    bob.reload(NOW);
    assert_eq!(bob.state.groups[&group.0[..]].rejoin_asks, 0);
    // Behind again: asked a day after the last ask, not a week.
    mark_behind(&mut bob, &group);
    assert!(bob
        .state
        .queue_rejoins(NOW + 4 * DAY, false, DAY, &mut OsRng)
        .expect("look"));
}

#[test]
fn a_re_added_device_keeps_only_its_users_ops_and_edits_nobody_changed_since() {
    let (mut alice, mut bob, group) = pair();
    // While behind, Bob renames (Alice renamed since: "missed"), edits the
    // description (nobody did since), and queued a removal on his own judgement.
    leave_behind(&mut alice, &mut bob, &group);
    bob.state
        .edit_group_meta(&group, MetaEdit::Name("stale name".into()))
        .expect("queued");
    let mut record = bob.state.groups[&group.0[..]].clone();
    let alice_id = alice.account().as_bytes().to_vec();
    record.ops.push(GroupOpRecord {
        kind: OP_REMOVE_DEVICE,
        accounts: vec![alice_id.clone()],
        device: 1,
        ..GroupOpRecord::default()
    });
    record.ops.push(GroupOpRecord {
        kind: OP_REMOVE,
        accounts: vec![alice_id.clone()],
        ..GroupOpRecord::default()
    });
    // A tree-lost wait judged while behind: Alice may have joined since.
    record
        .tree_lost_waits
        .push(crate::client::group_records::TreeLostRecord {
            account: alice_id,
            device: 1,
            since_ms: 1,
            queued: false,
        });
    bob.state.groups.insert(group.0.to_vec(), record);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[1];
    let e = events(bob.receive(&deliver(&w.body, w.message_id)));
    // The rename Alice overtook goes, and the app hears it.
    assert!(
        matches!(
            e.as_slice(),
            [Event::GroupJoined { .. }, Event::Dropped { .. }]
        ),
        "{e:?}"
    );
    bob.reload(NOW);
    assert!(bob.state.groups[&group.0[..]].tree_lost_waits.is_empty());
    let kept = ops(&bob, &group);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].kind, OP_META);
    assert_eq!(kept[0].meta_fields, META_DESCRIPTION);
    // Committed, it keeps Alice's newer name and sets Bob's description.
    let _ = plan(&mut bob, &group, &mut []);
    bob.state.commit_accepted(&group.0).expect("accepted");
    let meta = bob.state.session_mut(&group.0).expect("session").meta();
    let meta = meta.expect("meta");
    assert_eq!(
        (meta.name.as_str(), meta.description.as_str()),
        ("missed", "late")
    );
}

#[test]
fn a_re_add_keeps_the_ops_an_older_client_queued_but_re_adds_and_updates() {
    let (mut alice, mut bob, group) = pair();
    leave_behind(&mut alice, &mut bob, &group);
    // Written by an older client: no op carries `user`, nor the record its marker.
    let mut record = bob.state.groups[&group.0[..]].clone();
    let alice_id = alice.account().as_bytes().to_vec();
    let op = |kind| GroupOpRecord {
        kind,
        accounts: vec![alice_id.clone()],
        device: 1,
        ..GroupOpRecord::default()
    };
    record.ops = vec![op(OP_REMOVE), op(OP_READD_DEVICE), op(OP_UPDATE)];
    record.ops_user = false;
    bob.state.groups.insert(group.0.to_vec(), record);
    let d = request(&mut bob, &mut alice, &group.0, 1);
    take(&mut alice, &d, NOW);
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[1];
    events(bob.receive(&deliver(&w.body, w.message_id)));
    bob.reload(NOW);
    let kept = ops(&bob, &group);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].kind == OP_REMOVE && kept[0].user);
    assert!(bob.state.groups[&group.0[..]].ops_user);
}

#[test]
fn each_member_knows_when_a_leaf_came_and_forgets_it_once_it_goes() {
    let (mut alice, mut bob, carol, group) = with_carol();
    let came = |dev: &Dev| dev.state.groups[&group.0[..]].leaf_epoch(&carol.account(), 1);
    // Carol came at epoch 2: for Alice by her own commit, for Bob by receiving it.
    assert_eq!((came(&alice), came(&bob)), (Some(2), Some(2)));
    assert_eq!(
        alice.state.groups[&group.0[..]].leaf_epoch(&bob.account(), 1),
        Some(1)
    );
    alice
        .state
        .remove_group_member(&group, &carol.account())
        .expect("queued");
    let removal = plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let c = &removal.sends[0];
    events(bob.receive(&deliver(&c.body, c.message_id)));
    alice.reload(NOW);
    assert_eq!((came(&alice), came(&bob)), (None, None));
}
