//! A welcome whose ratchet tree travels as an attachment: the send side keeps the
//! tree's ciphertext with the pending commit until it settles; the receive side
//! holds the welcome until the worker fetched the tree, then joins.

use prost::Message;
use rand::rngs::OsRng;
use tern_proto::{e2e, GroupCommit, MessageId};

use super::groups::{deliver, events, knows, last_envelope, plan, text};
use super::{dev, dropped, Dev, DAY, NOW};
use crate::client::group_commit::GroupStep;
use crate::client::group_meta::MetaEdit;
use crate::client::group_records::{MemberTokenRecord, OP_REMOVE_DEVICE};
use crate::client::group_tree::{
    prune, FetchFailure, HeldWelcomeEntry, HeldWelcomeIndex, UploadFailed, HELD_WELCOMES_MAX,
    HELD_WELCOMES_MAX_BYTES, HELD_WELCOME_MAX_AGE_MS, TREE_ATTEMPTS, TREE_MAX, TREE_RETRY_MAX_MS,
    TREE_UPLOAD_WAIT_MS,
};
use crate::client::groups::GroupId;
use crate::client::state::Outcome;
use crate::client::Event;
use crate::groups::{parse_welcome, TreePointer, WelcomeTree};
use crate::store::{Batch, KvStore, Namespace, Op};

/// Alice (whose welcomes always carry their tree as an attachment) plans a group
/// with Bob: the commit, its one send the welcome.
fn planned() -> (Dev, Dev, GroupId, GroupCommit) {
    let (mut alice, mut bob) = (dev(1), dev(2));
    knows(&mut alice, &bob);
    knows(&mut bob, &alice);
    alice.state.welcome_inline_max = 0;
    let group = alice
        .state
        .create_group("big", &[bob.account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    assert_eq!(commit.sends.len(), 1, "the welcome only");
    (alice, bob, group, commit)
}

/// The welcome's pointer.
fn pointer_of(commit: &GroupCommit) -> TreePointer {
    match parse_welcome(&commit.sends[0].body[1..]).expect("a welcome") {
        (_, WelcomeTree::Pointer(p)) => p,
        (_, WelcomeTree::Inline(_)) => panic!("the tree is inline"),
    }
}

fn tree_records(dev: &Dev) -> usize {
    dev.kv.scan(Namespace::GroupTree).expect("scan").len()
}

/// The held welcomes due now: (seq, pointer).
fn due(dev: &mut Dev, now: u64) -> Vec<(u64, TreePointer)> {
    let (events, due, _) = dev.state.held_welcomes_due(now).expect("due");
    assert!(events.is_empty(), "{events:?}");
    due
}

#[test]
fn the_tree_ciphertext_is_kept_with_the_pending_commit_until_it_settles() {
    let (mut alice, _bob, group, commit) = planned();
    let pointer = pointer_of(&commit);
    let (p, sealed) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("an upload");
    assert_eq!(p, pointer.blob_id);
    assert_eq!(sealed.len() as u64, pointer.sealed_size);

    // A restart resends the same commit, pointing at the same blob.
    alice.reload(NOW);
    alice.state.welcome_inline_max = 0;
    let GroupStep::Send(again) = alice.state.group_step(&group.0).expect("step") else {
        panic!("the pending commit is resent")
    };
    assert_eq!(again.commit_id, commit.commit_id);
    assert_eq!(again.sends[0].body, commit.sends[0].body);
    let (p2, sealed2) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("still to upload");
    assert_eq!((p2, sealed2), (p, sealed));

    // Uploaded before every send (the relay extends the blob's life), kept
    // until the answer, which deletes it in its own batch.
    assert!(alice.state.tree_upload(&group.0).expect("read").is_some());
    alice.state.settle_tree_upload(&group.0).expect("settle");
    assert_eq!(tree_records(&alice), 1, "the commit is still pending");
    alice.state.commit_accepted(&group.0).expect("accepted");
    assert_eq!(tree_records(&alice), 0);
    alice.reload(NOW);
    assert_eq!(tree_records(&alice), 0);
}

#[test]
fn a_small_welcome_keeps_its_tree_inline_and_stores_nothing() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    knows(&mut alice, &bob);
    let group = alice
        .state
        .create_group("small", &[bob.account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(&mut alice, &group, &mut [&mut bob]);
    assert!(matches!(
        parse_welcome(&commit.sends[0].body[1..]),
        Ok((_, WelcomeTree::Inline(_)))
    ));
    assert_eq!(tree_records(&alice), 0);
    assert!(alice.state.tree_upload(&group.0).expect("read").is_none());
}

#[test]
fn a_welcome_waits_for_its_tree_across_a_restart_then_joins() {
    let (mut alice, mut bob, group, commit) = planned();
    let (_, sealed) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("an upload");
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[0];
    // Held: acknowledged, nothing joined yet; a redelivery is a duplicate.
    assert!(events(bob.receive(&deliver(&w.body, w.message_id))).is_empty());
    assert!(bob.state.has_held_welcomes().expect("held"));
    assert!(bob.state.group_list().expect("groups").is_empty());
    assert!(matches!(
        bob.receive(&deliver(&w.body, w.message_id)),
        Outcome::Duplicate
    ));
    // A message of the new epoch, before the tree: held too.
    alice
        .state
        .enqueue_group(&group, text(b"early"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&alice);
    assert!(events(bob.receive(&deliver(&envelope, id))).is_empty());

    bob.state.flush().expect("flush");
    bob.reload(NOW);
    let due = due(&mut bob, NOW);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1, pointer_of(&commit));
    let e = bob
        .state
        .tree_fetched(due[0].0, &sealed, NOW)
        .expect("joined");
    assert!(
        matches!(
            e.as_slice(),
            [Event::GroupJoined { group: g, .. }, Event::GroupMessage(m)]
                if *g == group && m.body == b"early"
        ),
        "{e:?}"
    );
    assert!(!bob.state.has_held_welcomes().expect("held"));
    assert_eq!(bob.state.group_list().expect("groups").len(), 1);
    bob.reload(NOW);
    assert!(matches!(
        bob.receive(&deliver(&w.body, w.message_id)),
        Outcome::Duplicate
    ));
}

#[test]
fn a_tree_that_fails_its_checks_or_cannot_be_fetched_drops_its_welcome() {
    let (alice, mut bob, group, commit) = planned();
    let (_, mut sealed) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("an upload");
    let w = &commit.sends[0];
    events(bob.receive(&deliver(&w.body, w.message_id)));
    let seq = due(&mut bob, NOW)[0].0;
    // One flipped bit: the blob id no longer matches.
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let e = bob.state.tree_fetched(seq, &sealed, NOW).expect("checked");
    assert!(matches!(e.as_slice(), [Event::Dropped { .. }]), "{e:?}");
    assert!(!bob.state.has_held_welcomes().expect("held"));
    assert!(bob.state.group_list().expect("groups").is_empty());
    // Given up for good: the relay cannot bring it back.
    assert!(matches!(
        bob.receive(&deliver(&w.body, w.message_id)),
        Outcome::Duplicate
    ));

    // The same welcome under another id, its tree never found: retried later,
    // then given up.
    let other = MessageId([0x77; 16]);
    events(bob.receive(&deliver(&w.body, other)));
    let mut now = NOW;
    for attempt in 1..=TREE_ATTEMPTS {
        let due = due(&mut bob, now);
        assert_eq!(due.len(), 1, "attempt {attempt}");
        let e = bob
            .state
            .tree_fetch_failed(due[0].0, "NOT_FOUND", FetchFailure::Missing, now)
            .expect("failed");
        if attempt < TREE_ATTEMPTS {
            assert!(e.is_empty());
            let (_, later, waiting) = bob.state.held_welcomes_due(now).expect("due");
            assert!(later.is_empty() && waiting, "not again at once");
            now += 10 * 60 * 1000;
        } else {
            assert!(matches!(e.as_slice(), [Event::Dropped { .. }]), "{e:?}");
        }
    }
    assert!(!bob.state.has_held_welcomes().expect("held"));
}

#[test]
fn held_welcomes_are_bounded_in_number_and_age_and_pointer_size() {
    let (_alice, mut bob, _group, commit) = planned();
    let w = &commit.sends[0];
    for i in 0..=HELD_WELCOMES_MAX {
        let o = bob.receive(&deliver(&w.body, MessageId([i as u8; 16])));
        let e = events(o);
        if i < HELD_WELCOMES_MAX {
            assert!(e.is_empty());
        } else {
            assert!(matches!(e.as_slice(), [Event::Dropped { .. }]), "{e:?}");
        }
    }
    assert_eq!(due(&mut bob, NOW).len(), HELD_WELCOMES_MAX);
    // The oldest went, and is not held again.
    assert!(matches!(
        bob.receive(&deliver(&w.body, MessageId([0; 16]))),
        Outcome::Duplicate
    ));
    let (e, due, _) = bob
        .state
        .held_welcomes_due(NOW + HELD_WELCOME_MAX_AGE_MS + 1)
        .expect("due");
    assert_eq!(e.len(), HELD_WELCOMES_MAX);
    assert!(due.is_empty());
    assert!(!bob.state.has_held_welcomes().expect("held"));

    // A pointer claiming more than any group's tree: dropped at once.
    let mut welcome = e2e::GroupWelcome::decode(&w.body[1..]).expect("decodes");
    let p = welcome.ratchet_tree_pointer.as_mut().expect("pointer");
    p.sealed_size = TREE_MAX + 1;
    let mut body = vec![0x03];
    body.extend(welcome.encode_to_vec());
    assert!(dropped(bob.receive(&deliver(&body, MessageId([0xee; 16])))));
    assert!(!bob.state.has_held_welcomes().expect("held"));
}

#[test]
fn only_a_welcome_to_our_own_key_package_is_held() {
    // Anyone with Carol's delivery token could send her Bob's welcome: it is not
    // encrypted to her key packages, so it is dropped, never held (nor fetched).
    let (_alice, _bob, _group, commit) = planned();
    let mut carol = dev(3);
    let w = &commit.sends[0];
    assert!(dropped(carol.receive(&deliver(&w.body, w.message_id))));
    assert!(!carol.state.has_held_welcomes().expect("held"));
}

#[test]
fn a_refused_or_unreachable_fetch_waits_longer_without_giving_up() {
    let (_alice, mut bob, _group, commit) = planned();
    let w = &commit.sends[0];
    events(bob.receive(&deliver(&w.body, w.message_id)));
    let mut now = NOW;
    let mut last_wait = 0;
    // Far more failures than TREE_ATTEMPTS: other refusals spend no attempt.
    for _ in 0..(TREE_ATTEMPTS * 6) {
        let due = due(&mut bob, now);
        assert_eq!(due.len(), 1);
        let e = bob
            .state
            .tree_fetch_failed(due[0].0, "UNAVAILABLE", FetchFailure::Later, now)
            .expect("failed");
        assert!(e.is_empty(), "{e:?}");
        let (_, again, waiting) = bob.state.held_welcomes_due(now).expect("due");
        assert!(again.is_empty() && waiting);
        // The wait doubles, up to an hour.
        let mut wait = 1;
        while bob
            .state
            .held_welcomes_due(now + wait)
            .expect("due")
            .1
            .is_empty()
        {
            wait *= 2;
        }
        assert!(wait >= last_wait && wait <= 2 * TREE_RETRY_MAX_MS, "{wait}");
        last_wait = wait;
        now += wait;
    }
    assert!(last_wait > TREE_RETRY_MAX_MS / 2);
    // The week's bound still ends it.
    let (e, due, _) = bob
        .state
        .held_welcomes_due(NOW + HELD_WELCOME_MAX_AGE_MS + 1)
        .expect("due");
    assert!(matches!(e.as_slice(), [Event::Dropped { .. }]), "{e:?}");
    assert!(due.is_empty());
}

#[test]
fn a_lost_held_record_drops_its_welcome_not_the_round() {
    let (_alice, mut bob, _group, commit) = planned();
    let w = &commit.sends[0];
    events(bob.receive(&deliver(&w.body, w.message_id)));
    bob.state.flush().expect("flush");
    let seq = due(&mut bob, NOW)[0].0;
    let held: Vec<Op> = bob
        .kv
        .scan(Namespace::GroupTree)
        .expect("scan")
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"in") && k != b"index")
        .map(|(k, _)| Op::Put(Namespace::GroupTree, k, vec![0xff; 3]))
        .collect();
    assert_eq!(held.len(), 1);
    bob.kv.apply(held, true).expect("corrupt");
    let (e, due, _) = bob.state.held_welcomes_due(NOW).expect("due");
    assert!(matches!(e.as_slice(), [Event::Dropped { .. }]), "{e:?}");
    assert!(due.is_empty());
    assert!(!bob.state.has_held_welcomes().expect("held"));
    // And a fetch that lands for it after all: nothing, no error.
    assert!(bob
        .state
        .tree_fetched(seq, b"late", NOW)
        .expect("no error")
        .is_empty());
}

#[test]
fn held_welcomes_are_bounded_in_bytes() {
    let mb = 1024 * 1024;
    let mut index = HeldWelcomeIndex {
        entries: (0..6)
            .map(|seq| HeldWelcomeEntry {
                seq,
                message_id: vec![seq as u8; 16],
                len: mb,
                held_at_ms: NOW,
                ..HeldWelcomeEntry::default()
            })
            .collect(),
        next_seq: 6,
    };
    let (mut batch, mut events) = (Batch::new(), Vec::new());
    prune(&mut index, NOW, &mut batch, &mut events);
    assert_eq!(HELD_WELCOMES_MAX_BYTES, 4 * mb);
    let kept: Vec<u64> = index.entries.iter().map(|e| e.seq).collect();
    assert_eq!(kept, [2, 3, 4, 5], "the oldest go first");
    assert_eq!(events.len(), 2);
}

#[test]
fn a_forgotten_group_takes_its_tree_ciphertext_with_it() {
    let (alice, _bob, group, _commit) = planned();
    assert_eq!(tree_records(&alice), 1);
    let mut batch = Batch::new();
    alice
        .state
        .stage_forget_group(&group.0, &mut batch)
        .expect("staged");
    alice.state.commit(batch, true).expect("forgotten");
    assert_eq!(tree_records(&alice), 0);
}

#[test]
fn a_refused_tree_upload_gives_up_a_commit_never_sent_and_resends_one_sent() {
    // Never handed to the relay: the commit and its op go, the tree with them.
    let (mut alice, _bob, group, _) = planned();
    let failed = alice.state.tree_upload_failed(&group.0, true, NOW);
    assert_eq!(failed.expect("judged"), UploadFailed::GiveUp);
    alice.reload(NOW);
    let record = &alice.state.groups[&group.0[..]];
    assert!(record.pending.is_none() && record.ops.is_empty());
    assert_eq!(tree_records(&alice), 0);
    let session = alice.state.session_mut(&group.0).expect("session");
    assert!(!session.has_pending());

    // Sent once (its answer lost): the relay may hold it, so it goes again,
    // the same commit, across a restart.
    let (mut alice, bob, group, commit) = planned();
    alice.state.commit_sending(&group.0).expect("marked");
    alice.reload(NOW);
    alice.state.welcome_inline_max = 0;
    let failed = alice.state.tree_upload_failed(&group.0, true, NOW);
    assert_eq!(failed.expect("judged"), UploadFailed::SendAnyway);
    let GroupStep::Send(again) = alice.state.group_step(&group.0).expect("step") else {
        panic!("the pending commit is kept")
    };
    assert_eq!(again.commit_id, commit.commit_id);
    // Answered, the device it added is removed only if nothing came from it
    // within a week (the relay may have had the tree), across a restart.
    alice
        .state
        .commit_accepted_at(&group.0, NOW)
        .expect("accepted");
    alice.reload(NOW);
    // The worker looks at the group every round while a removal waits.
    assert_eq!(alice.state.busy_groups(), [group.0.to_vec()]);
    let step = |a: &mut Dev, now| {
        a.state
            .next_group_step(&group.0, now, 30 * DAY)
            .expect("step")
    };
    let _ = step(&mut alice, NOW + HELD_WELCOME_MAX_AGE_MS - 1);
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    let _ = step(&mut alice, NOW + HELD_WELCOME_MAX_AGE_MS);
    let removal = |a: &Dev| {
        let ops = &a.state.groups[&group.0[..]].ops;
        assert_eq!(ops.len(), 1, "{ops:?}");
        (ops[0].kind, ops[0].accounts[0].clone(), ops[0].device)
    };
    let bob_1 = (OP_REMOVE_DEVICE, bob.account().as_bytes().to_vec(), 1);
    assert_eq!(removal(&alice), bob_1);
}

/// `planned()`'s commit sent without its tree and answered at `NOW`.
fn lost_and_answered() -> (Dev, Dev, GroupId) {
    let (mut alice, bob, group, _) = planned();
    let _ = sent_without_tree(&mut alice, &group);
    alice
        .state
        .commit_accepted_at(&group.0, NOW)
        .expect("accepted");
    (alice, bob, group)
}

fn step_at(dev: &mut Dev, group: &GroupId, now: u64) -> GroupStep {
    dev.state
        .next_group_step(&group.0, now, 30 * DAY)
        .expect("step")
}

#[test]
fn a_tree_lost_removal_refused_is_not_queued_again() {
    let (mut alice, _bob, group) = lost_and_answered();
    let due = NOW + HELD_WELCOME_MAX_AGE_MS;
    assert!(matches!(step_at(&mut alice, &group, due), GroupStep::Plan));
    assert_eq!(alice.state.groups[&group.0[..]].ops.len(), 1);
    // The relay refuses it (UNKNOWN_GROUP): the op goes, and is not queued
    // again round after round, across a restart.
    alice.state.commit_refused(&group.0).expect("refused");
    alice.reload(NOW);
    for i in 1..4 {
        assert!(matches!(
            step_at(&mut alice, &group, due + i),
            GroupStep::Idle
        ));
        assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    }
}

#[test]
fn a_queued_tree_lost_removal_goes_when_its_device_shows_up() {
    let (mut alice, bob, group) = lost_and_answered();
    let _ = step_at(&mut alice, &group, NOW + HELD_WELCOME_MAX_AGE_MS);
    // The relay also named Bob's device gone: that removal stays.
    let bob_1 =
        crate::client::group_retry::device_removal(&bob.account(), tern_proto::DeviceId::PRIMARY);
    let mut record = alice.state.groups[&group.0[..]].clone();
    assert!(record.ops[0].tree_lost, "{:?}", record.ops);
    record.ops.push(bob_1.clone());
    let members = alice.state.session_mut(&group.0).expect("s").members();
    let shown: Vec<_> = members
        .into_iter()
        .filter(|m| m.account == bob.account())
        .collect();
    record.joined(&shown);
    assert!(record.tree_lost_waits.is_empty());
    // The inbox leaves the ops alone (a step may be planning the head one); the
    // removal its wait queued is withdrawn when the next step is planned.
    assert_eq!(record.ops.len(), 2);
    alice.state.groups.insert(group.0.to_vec(), record);
    assert!(matches!(
        step_at(&mut alice, &group, NOW + HELD_WELCOME_MAX_AGE_MS + 1),
        GroupStep::Plan
    ));
    assert_eq!(alice.state.groups[&group.0[..]].ops, [bob_1]);
}

#[test]
fn a_device_that_shows_up_before_the_answer_is_not_removed() {
    let (mut alice, bob, group, _) = planned();
    let _ = sent_without_tree(&mut alice, &group);
    // The wait starts with the loss, across a restart.
    alice.reload(NOW);
    let waits = alice.state.groups[&group.0[..]].tree_lost_waits.clone();
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(waits[0].account, bob.account().as_bytes());
    // Bob shows he joined before the retried commit is answered (Alice not
    // yet at its epoch, Bob is no leaf of hers: his message's sender).
    let bob_1 = crate::groups::Member {
        account: bob.account(),
        device: tern_proto::DeviceId::PRIMARY,
        identity_key: [0; 32],
        device_key: [0; 32],
        index: 1,
    };
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.joined(&[bob_1]);
    alice.state.groups.insert(group.0.to_vec(), record);
    alice
        .state
        .commit_accepted_at(&group.0, NOW + 1)
        .expect("accepted");
    assert!(alice.state.groups[&group.0[..]].tree_lost_waits.is_empty());
    let _ = step_at(&mut alice, &group, NOW + 2 * HELD_WELCOME_MAX_AGE_MS);
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());

    // Answered days after the loss, the wait is a full one from the answer.
    let (mut alice, _bob, group, _) = planned();
    let _ = sent_without_tree(&mut alice, &group);
    let answered = NOW + 5 * DAY;
    alice
        .state
        .commit_accepted_at(&group.0, answered)
        .expect("accepted");
    let _ = step_at(&mut alice, &group, NOW + HELD_WELCOME_MAX_AGE_MS);
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    let _ = step_at(&mut alice, &group, answered + HELD_WELCOME_MAX_AGE_MS);
    assert_eq!(alice.state.groups[&group.0[..]].ops.len(), 1);
}

#[test]
fn tree_lost_waits_alone_start_no_token_wait() {
    let (mut alice, bob, group) = lost_and_answered();
    // Bob has no usable token: the group's is gone and his contact token refused.
    let mut record = alice.state.groups[&group.0[..]].clone();
    record.tokens.clear();
    let token = alice.state.token_of(&bob.account()).expect("contact token");
    record.refused_tokens.push(MemberTokenRecord {
        account: bob.account().as_bytes().to_vec(),
        token: token.to_vec(),
    });
    alice.state.groups.insert(group.0.to_vec(), record.clone());
    assert_eq!(
        alice.state.tokenless(&group.0).expect("tokenless"),
        [bob.account()]
    );
    assert!(matches!(
        step_at(&mut alice, &group, NOW + 1),
        GroupStep::Idle
    ));
    alice.reload(NOW);
    assert!(alice.state.groups[&group.0[..]].token_waits.is_empty());
    // The control: with an op queued the same state does start Bob's clock.
    record.ops.push(crate::client::group_retry::device_removal(
        &bob.account(),
        tern_proto::DeviceId::PRIMARY,
    ));
    alice.state.groups.insert(group.0.to_vec(), record);
    let _ = step_at(&mut alice, &group, NOW + 1);
    assert_eq!(alice.state.groups[&group.0[..]].token_waits.len(), 1);
}

/// `planned()`, sent once and its tree upload then refused for good: the
/// commit goes again without its tree. Returns the tree's ciphertext.
fn sent_without_tree(alice: &mut Dev, group: &GroupId) -> Vec<u8> {
    let (_, sealed) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("an upload");
    alice.state.commit_sending(&group.0).expect("marked");
    let failed = alice.state.tree_upload_failed(&group.0, true, NOW);
    assert_eq!(failed.expect("judged"), UploadFailed::SendAnyway);
    sealed
}

#[test]
fn a_device_added_without_its_tree_that_joins_anyway_is_not_removed() {
    for shows in ["a message", "a commit"] {
        joins_anyway(shows);
    }
}

/// The relay still had the tree (only the upload's answer was refused): Bob
/// joins, and `shows` it to Alice.
fn joins_anyway(shows: &str) {
    let (mut alice, mut bob, group, commit) = planned();
    let sealed = sent_without_tree(&mut alice, &group);
    alice
        .state
        .commit_accepted_at(&group.0, NOW)
        .expect("accepted");
    assert_eq!(alice.state.groups[&group.0[..]].tree_lost_waits.len(), 1);
    let w = &commit.sends[0];
    assert!(events(bob.receive(&deliver(&w.body, w.message_id))).is_empty());
    let due = due(&mut bob, NOW);
    let e = bob
        .state
        .tree_fetched(due[0].0, &sealed, NOW)
        .expect("joined");
    assert!(matches!(e.as_slice(), [Event::GroupJoined { .. }]), "{e:?}");
    // Anything from Bob's device shows it joined.
    let (envelope, id) = if shows == "a message" {
        bob.state
            .enqueue_group(&group, text(b"here"), NOW, &mut OsRng)
            .expect("queued");
        last_envelope(&bob)
    } else {
        bob.state
            .edit_group_meta(&group, MetaEdit::Name("mine".into()))
            .expect("queued");
        let c = plan(&mut bob, &group, &mut []);
        bob.state.commit_accepted(&group.0).expect("accepted");
        (c.sends[0].body.to_vec(), c.sends[0].message_id)
    };
    let _ = events(alice.receive(&deliver(&envelope, id)));
    alice.reload(NOW);
    assert!(alice.state.groups[&group.0[..]].tree_lost_waits.is_empty());
    let _ = alice
        .state
        .next_group_step(&group.0, NOW + 2 * HELD_WELCOME_MAX_AGE_MS, 30 * DAY)
        .expect("step");
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
}

#[test]
fn a_later_tree_upload_that_succeeds_clears_the_loss_and_the_wait() {
    let (mut alice, _bob, group, _) = planned();
    let _ = sent_without_tree(&mut alice, &group);
    // Lost, the commit does not wait for its tree again.
    let failed = alice.state.tree_upload_failed(&group.0, false, NOW + 1);
    assert_eq!(failed.expect("judged"), UploadFailed::SendAnyway);
    assert_eq!(alice.state.groups[&group.0[..]].tree_lost_waits.len(), 1);
    alice.state.tree_uploaded(&group.0).expect("uploaded");
    alice.reload(NOW);
    assert!(alice.state.groups[&group.0[..]].tree_lost_waits.is_empty());
    let pending = alice.state.groups[&group.0[..]]
        .pending
        .clone()
        .expect("pending");
    assert!(!pending.tree_lost && pending.upload_waiting_since_ms == 0);
    alice
        .state
        .commit_accepted_at(&group.0, NOW)
        .expect("accepted");
    let record = &alice.state.groups[&group.0[..]];
    assert!(record.tree_lost_waits.is_empty() && record.ops.is_empty());

    // A wait for now ends when the upload succeeds or the commit goes: a later
    // failure waits a full day again.
    for end in ["uploaded", "sent"] {
        let (mut alice, _bob, group, _) = planned();
        let failed = |a: &mut Dev, now| {
            a.state
                .tree_upload_failed(&group.0, false, now)
                .expect("judged")
        };
        assert_eq!(failed(&mut alice, NOW), UploadFailed::Wait);
        match end {
            "uploaded" => alice.state.tree_uploaded(&group.0),
            _ => alice.state.commit_sending(&group.0),
        }
        .expect("ended");
        let pending = alice.state.groups[&group.0[..]]
            .pending
            .clone()
            .expect("pending");
        assert_eq!(pending.upload_waiting_since_ms, 0, "{end}");
        assert_eq!(
            failed(&mut alice, NOW + TREE_UPLOAD_WAIT_MS),
            UploadFailed::Wait
        );
    }
}

#[test]
fn a_welcome_sent_without_its_tree_is_not_sent_again() {
    for lost in [false, true] {
        let (mut alice, _bob, group, _) = planned();
        alice.state.commit_sending(&group.0).expect("marked");
        if lost {
            let _ = sent_without_tree(&mut alice, &group);
        }
        // The relay's answer lost: every send goes again, but such a welcome.
        alice
            .state
            .commit_answered(&group.0, &[], NOW)
            .expect("answered");
        let resends = alice.state.groups[&group.0[..]].resends.len();
        assert_eq!(resends, usize::from(!lost), "lost: {lost}");
    }
}

#[test]
fn a_tree_upload_refused_for_now_holds_its_commit_a_day_at_most() {
    for sent in [false, true] {
        let (mut alice, _bob, group, _) = planned();
        if sent {
            alice.state.commit_sending(&group.0).expect("marked");
        }
        let failed = |a: &mut Dev, now| {
            a.state
                .tree_upload_failed(&group.0, false, now)
                .expect("judged")
        };
        assert_eq!(failed(&mut alice, NOW), UploadFailed::Wait);
        // The first wait is kept across a restart.
        alice.reload(NOW);
        alice.state.welcome_inline_max = 0;
        let last = NOW + TREE_UPLOAD_WAIT_MS - 1;
        assert_eq!(failed(&mut alice, last), UploadFailed::Wait);
        let bound = NOW + TREE_UPLOAD_WAIT_MS;
        let expected = if sent {
            UploadFailed::SendAnyway
        } else {
            UploadFailed::GiveUp
        };
        assert_eq!(failed(&mut alice, bound), expected);
        assert_eq!(
            alice.state.groups[&group.0[..]].pending.is_some(),
            sent,
            "sent: {sent}"
        );
    }
}

#[test]
fn a_replayed_pointer_welcome_of_a_group_joined_is_seen_and_not_fetched_again() {
    // Made with Bob's last-resort package, which stays: a copy still opens.
    let (mut alice, mut bob) = (dev(1), dev(2));
    knows(&mut alice, &bob);
    knows(&mut bob, &alice);
    alice.state.welcome_inline_max = 0;
    let group = alice
        .state
        .create_group("big", &[bob.account()], NOW, &mut OsRng)
        .expect("create");
    let (_, last_resort) = bob
        .state
        .key_package_upload(0, NOW)
        .expect("generate")
        .expect("a credential");
    let commit = alice
        .state
        .plan_commit(&group.0, vec![last_resort], NOW, &mut OsRng)
        .expect("plan")
        .expect("a commit");
    let (_, sealed) = alice
        .state
        .tree_upload(&group.0)
        .expect("read")
        .expect("an upload");
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = &commit.sends[0];
    // The relay delivers the welcome again under another message id.
    let replay = MessageId([0x5a; 16]);
    assert!(events(bob.receive(&deliver(&w.body, w.message_id))).is_empty());
    assert!(events(bob.receive(&deliver(&w.body, replay))).is_empty());
    let due = due(&mut bob, NOW);
    assert_eq!(due.len(), 2);
    let e = bob
        .state
        .tree_fetched(due[0].0, &sealed, NOW)
        .expect("joined");
    assert!(matches!(e.as_slice(), [Event::GroupJoined { .. }]), "{e:?}");
    // The copy joins nothing; its id is seen, so it is never fetched again.
    let e = bob.state.tree_fetched(due[1].0, &sealed, NOW).expect("dup");
    assert!(e.is_empty(), "{e:?}");
    assert!(!bob.state.has_held_welcomes().expect("held"));
    bob.reload(NOW);
    assert!(matches!(
        bob.receive(&deliver(&w.body, replay)),
        Outcome::Duplicate
    ));
}
