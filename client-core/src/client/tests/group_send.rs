//! The send side's rules on states in memory: a commit waits until it can reach
//! every member, refusals in a commit's answer are resent or lead to removals,
//! periodic updates renew the leaf, metadata edits merge, repeated leave requests
//! queue one removal, messages queued during a cleared commit get encrypted.

use prost::Message;
use rand::rngs::OsRng;
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::{DeviceId, ErrorCode, GroupCommit, MultiSendResult, Refused};

use super::groups::{deliver, events, knows, last_envelope, message_body, plan, text};
use super::{dev, Dev, DAY, NOW};
use crate::client::group_commit::{GroupStep, OP_UPDATE};
use crate::client::group_meta::MetaEdit;
use crate::client::group_records::{OP_META, OP_REMOVE};
use crate::client::groups::{GroupChange, GroupId};
use crate::client::Event;
use crate::store::{KvStore, Namespace};

/// Alice (a contact of both) makes a group with Bob and Carol, who are not each
/// other's contacts: each learns the other's delivery token only from its
/// `MemberInfo`.
fn trio() -> (Dev, Dev, Dev, GroupId) {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    knows(&mut alice, &bob);
    knows(&mut alice, &carol);
    knows(&mut bob, &alice);
    knows(&mut carol, &alice);
    let group = alice
        .state
        .create_group("g", &[bob.account(), carol.account()], NOW, &mut OsRng)
        .expect("create");
    let commit = plan(&mut alice, &group, &mut [&mut bob, &mut carol]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let welcome = &commit.sends[0];
    for to in [&mut bob, &mut carol] {
        events(to.receive(&deliver(&welcome.body, welcome.message_id)));
    }
    (alice, bob, carol, group)
}

/// `from`'s `MemberInfo` (its delivery token), delivered to `to`.
fn announce(from: &mut Dev, to: &mut Dev, group: &GroupId) {
    let info = e2e::GroupContent {
        sent_at_ms: NOW,
        control: Some(Control::MemberInfo(e2e::MemberInfo {
            delivery_token: from.state.keys.delivery_token.to_vec().into(),
            device_list_version: 0,
        })),
        ..Default::default()
    };
    from.state
        .enqueue_group(group, info, NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(from);
    assert!(events(to.receive(&deliver(&envelope, id))).is_empty());
}

fn step(dev: &mut Dev, group: &GroupId, now: u64) -> GroupStep {
    dev.state.next_group_step(&group.0, now, DAY).expect("step")
}

fn recipients(commit: &GroupCommit) -> Vec<tern_proto::AccountId> {
    commit.sends[0]
        .recipients
        .iter()
        .map(|r| r.account)
        .collect()
}

fn deliver_commit(to: &mut Dev, commit: &GroupCommit) -> Vec<Event> {
    let send = &commit.sends[0];
    events(to.receive(&deliver(&send.body, send.message_id)))
}

fn tree(dev: &Dev, group: &GroupId) -> Vec<u8> {
    dev.kv
        .get(Namespace::MlsTree, &group.0)
        .expect("read")
        .expect("a tree")
}

#[test]
fn a_commit_waits_for_every_members_token_then_reaches_them_all() {
    let (_alice, mut bob, mut carol, group) = trio();
    bob.state
        .edit_group_meta(&group, MetaEdit::Name("renamed".into()))
        .expect("queued");
    // Bob cannot reach Carol: no commit, which would leave her behind.
    assert!(matches!(step(&mut bob, &group, NOW), GroupStep::Idle));
    let info = &bob.state.group_list().expect("groups")[0];
    assert_eq!(
        (info.unreachable.as_slice(), info.pending_ops),
        (&[carol.account()][..], 1)
    );
    // Still within the bound a moment later.
    assert!(matches!(
        step(&mut bob, &group, NOW + DAY - 1),
        GroupStep::Idle
    ));
    announce(&mut carol, &mut bob, &group);
    assert!(matches!(
        step(&mut bob, &group, NOW + DAY - 1),
        GroupStep::Plan
    ));
    let commit = plan(&mut bob, &group, &mut []);
    assert!(recipients(&commit).contains(&carol.account()));
    bob.state.commit_accepted(&group.0).expect("accepted");
    let e = deliver_commit(&mut carol, &commit);
    assert!(matches!(
        e.as_slice(),
        [Event::GroupChanged { change: GroupChange::Renamed { name }, .. }] if name == "renamed"
    ));
}

#[test]
fn past_the_bound_an_unreachable_member_is_removed_first() {
    let (mut alice, mut bob, carol, group) = trio();
    bob.state
        .edit_group_meta(&group, MetaEdit::Description("about".into()))
        .expect("queued");
    assert!(matches!(step(&mut bob, &group, NOW), GroupStep::Idle));
    assert!(matches!(step(&mut bob, &group, NOW + DAY), GroupStep::Plan));
    let ops = &bob.state.groups[&group.0[..]].ops;
    assert_eq!(
        (ops.len(), ops[0].kind, ops[1].kind),
        (2, OP_REMOVE, OP_META)
    );
    let removal = plan(&mut bob, &group, &mut []);
    assert_eq!(recipients(&removal), vec![alice.account()]);
    let e = bob.state.commit_accepted(&group.0).expect("accepted");
    assert!(matches!(
        e.as_slice(),
        [Event::GroupChanged { change: GroupChange::Removed(r), .. }] if *r == [carol.account()]
    ));
    deliver_commit(&mut alice, &removal);
    // Then the edit, to everyone left.
    assert!(matches!(step(&mut bob, &group, NOW + DAY), GroupStep::Plan));
    let edit = plan(&mut bob, &group, &mut []);
    bob.state.commit_accepted(&group.0).expect("accepted");
    deliver_commit(&mut alice, &edit);
    let info = &alice.state.group_list().expect("groups")[0];
    assert_eq!(
        (info.description.as_str(), info.members.len()),
        ("about", 2)
    );
}

#[test]
fn refused_commit_entries_are_resent_or_their_members_removed() {
    let (mut alice, mut bob, carol, group) = trio();
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    let commit = plan(&mut alice, &group, &mut []);
    let index = |a| {
        commit.sends[0]
            .recipients
            .iter()
            .position(|r| r.account == a)
            .expect("a recipient") as u32
    };
    let answer = MultiSendResult {
        accepted: 0,
        refused: vec![
            Refused {
                recipient: index(bob.account()),
                device: Some(DeviceId::PRIMARY),
                code: ErrorCode::MailboxFull,
            },
            Refused {
                recipient: index(carol.account()),
                device: None,
                code: ErrorCode::Unauthorized,
            },
        ],
    };
    alice
        .state
        .commit_answered(&group.0, &[answer], NOW)
        .expect("answered");
    // Bob gets the same bytes again, under the same message id.
    let (_, resend) = alice.state.group_outbox.iter().last().expect("queued");
    assert_eq!(resend.envelope, commit.sends[0].body.to_vec());
    assert_eq!(resend.message_id, commit.sends[0].message_id.0.to_vec());
    assert_eq!(resend.to.len(), 1);
    assert_eq!(
        (
            resend.to[0].account.as_slice(),
            resend.to[0].devices.as_slice()
        ),
        (&bob.account().as_bytes()[..], &[1u32][..])
    );
    // Carol's account is gone (or no longer hers): her removal is queued.
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(ops.len(), 1);
    assert_eq!(
        (ops[0].kind, ops[0].accounts.clone()),
        (OP_REMOVE, vec![carol.account().as_bytes().to_vec()])
    );
    // The resent commit brings Bob along: he reads what Alice sends next.
    let resent = resend.envelope.clone();
    events(bob.receive(&deliver(&resent, commit.sends[0].message_id)));
    alice
        .state
        .enqueue_group(&group, text(b"after"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&alice);
    assert_eq!(message_body(&mut bob, &envelope, id), b"after");
}

#[test]
fn an_old_leaf_is_renewed_by_an_update_commit_every_member_follows() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let interval = 7 * DAY;
    alice.state.queue_due_updates(NOW, interval).expect("due");
    assert!(alice.state.groups[&group.0[..]].ops.is_empty(), "new leaf");
    alice
        .state
        .queue_due_updates(NOW + interval - 1, interval)
        .expect("due");
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    alice
        .state
        .queue_due_updates(NOW + interval, interval)
        .expect("due");
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(ops.iter().map(|o| o.kind).collect::<Vec<_>>(), [OP_UPDATE]);
    // Queued once, however often the worker looks.
    alice
        .state
        .queue_due_updates(NOW + 2 * interval - 1, interval)
        .expect("due");
    assert_eq!(alice.state.groups[&group.0[..]].ops.len(), 1);

    let (epoch, before) = (
        alice.state.session_mut(&group.0).expect("s").epoch(),
        tree(&alice, &group),
    );
    let update = plan(&mut alice, &group, &mut []);
    assert_eq!(recipients(&update).len(), 2);
    let e = alice
        .state
        .commit_answered(&group.0, &[], NOW + interval)
        .expect("accepted");
    assert!(e.is_empty(), "no membership change to tell");
    let record = &alice.state.groups[&group.0[..]];
    assert_eq!(
        (record.ops.len(), record.leaf_updated_ms),
        (0, NOW + interval)
    );
    assert_eq!(
        alice.state.session_mut(&group.0).expect("s").epoch(),
        epoch + 1
    );
    // No membership change, yet the tree changed: a new path from Alice's leaf.
    assert_ne!(tree(&alice, &group), before);
    for to in [&mut bob, &mut carol] {
        assert!(deliver_commit(to, &update).is_empty());
        assert_eq!(tree(to, &group), tree(&alice, &group));
    }
    alice
        .state
        .enqueue_group(&group, text(b"renewed"), NOW, &mut OsRng)
        .expect("queued");
    let (envelope, id) = last_envelope(&alice);
    assert_eq!(message_body(&mut bob, &envelope, id), b"renewed");
    assert_eq!(message_body(&mut carol, &envelope, id), b"renewed");
}

#[test]
fn a_new_delivery_token_is_announced_again_with_an_update() {
    let (mut alice, _bob, _carol, group) = trio();
    alice.state.queue_due_updates(NOW, 7 * DAY).expect("due");
    let record = &alice.state.groups[&group.0[..]];
    assert_eq!(
        record.announced_token,
        alice.state.keys.delivery_token.to_vec()
    );
    assert!(!record.announce);
    alice.state.keys.delivery_token = [7; 32];
    alice
        .state
        .queue_due_updates(NOW + 1, 7 * DAY)
        .expect("due");
    let record = &alice.state.groups[&group.0[..]];
    assert!(record.announce, "the members learn the new token");
    assert_eq!(
        record.ops.iter().map(|o| o.kind).collect::<Vec<_>>(),
        [OP_UPDATE]
    );
}

#[test]
fn metadata_edits_merge_and_a_picture_travels_in_the_group() {
    let (mut alice, mut bob, mut carol, group) = trio();
    knows(&mut bob, &carol);
    // Queued one after the other: the second does not undo the first.
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("first".into()))
        .expect("queued");
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Description("words".into()))
        .expect("queued");
    let long = "x".repeat(crate::groups::meta::MAX_NAME + 1);
    assert!(matches!(
        alice.state.edit_group_meta(&group, MetaEdit::Name(long)),
        Err(crate::Error::TooLarge { .. })
    ));
    for _ in 0..2 {
        let c = plan(&mut alice, &group, &mut []);
        alice.state.commit_accepted(&group.0).expect("accepted");
        deliver_commit(&mut bob, &c);
        deliver_commit(&mut carol, &c);
    }
    let picture = crate::media::AttachmentPointer::from_bytes(
        &e2e::AttachmentPointer {
            blob_id: vec![5; 32].into(),
            key: vec![6; 32].into(),
            size: 10,
            sealed_size: crate::crypto::attachment::sealed_len(10).expect("len"),
            digest: vec![7; 32].into(),
            content_type: "image/png".into(),
            file_name: String::new(),
        }
        .encode_to_vec(),
    )
    .expect("a pointer");
    bob.state
        .edit_group_meta(&group, MetaEdit::Picture(Some(picture.clone())))
        .expect("queued");
    let c = plan(&mut bob, &group, &mut []);
    bob.state.commit_accepted(&group.0).expect("accepted");
    deliver_commit(&mut alice, &c);
    for d in [&mut alice, &mut bob] {
        let info = &d.state.group_list().expect("groups")[0];
        assert_eq!(
            (info.name.as_str(), info.description.as_str()),
            ("first", "words")
        );
        assert_eq!(info.picture.as_ref(), Some(&picture));
    }
}

#[test]
fn repeated_leave_requests_queue_one_removal() {
    let (mut alice, _bob, mut carol, group) = trio();
    for _ in 0..3 {
        let leave = e2e::GroupContent {
            sent_at_ms: NOW,
            control: Some(Control::Leave(e2e::LeaveRequest {})),
            ..Default::default()
        };
        carol
            .state
            .enqueue_group(&group, leave, NOW, &mut OsRng)
            .expect("queued");
        let (envelope, id) = last_envelope(&carol);
        events(alice.receive(&deliver(&envelope, id)));
    }
    assert!(matches!(step(&mut alice, &group, NOW), GroupStep::Plan));
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].kind, OP_REMOVE);
}

#[test]
fn only_ops_nothing_undoes_are_deduplicated() {
    use crate::client::group_commit::{dedup_ops, removal};
    use crate::client::group_records::{GroupOpRecord, OP_ADD};
    let a = tern_proto::AccountId([1; 16]);
    let add = GroupOpRecord {
        kind: OP_ADD,
        accounts: vec![a.as_bytes().to_vec()],
        ..GroupOpRecord::default()
    };
    let mut ops = vec![removal(&[a]), removal(&[a]), add, removal(&[a])];
    assert!(dedup_ops(&mut ops));
    assert_eq!(
        ops.iter().map(|o| o.kind).collect::<Vec<_>>(),
        [OP_REMOVE, OP_ADD, OP_REMOVE]
    );
    assert!(!dedup_ops(&mut ops));
}

#[test]
fn messages_queued_during_a_commit_that_lost_are_encrypted_when_it_settles() {
    let (mut alice, mut bob, mut carol, group) = trio();
    knows(&mut bob, &carol);
    bob.state
        .edit_group_meta(&group, MetaEdit::Name("bob's".into()))
        .expect("queued");
    let _ours = plan(&mut bob, &group, &mut []);
    bob.state
        .enqueue_group(&group, text(b"queued meanwhile"), NOW, &mut OsRng)
        .expect("queued");
    assert!(bob
        .state
        .group_outbox
        .values()
        .all(|r| r.envelope.is_empty()));
    // Alice's commit wins the epoch; Bob's inbox applies it and drops his.
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Description("alice's".into()))
        .expect("queued");
    let theirs = plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    deliver_commit(&mut bob, &theirs);
    deliver_commit(&mut carol, &theirs);
    bob.state.prepare_groups().expect("prepared");
    let (envelope, id) = last_envelope(&bob);
    assert_eq!(message_body(&mut carol, &envelope, id), b"queued meanwhile");
    // Bob's edit is planned again on top of Alice's, and both stand.
    let rebased = plan(&mut bob, &group, &mut []);
    bob.state.commit_accepted(&group.0).expect("accepted");
    deliver_commit(&mut alice, &rebased);
    let info = &alice.state.group_list().expect("groups")[0];
    assert_eq!(
        (info.name.as_str(), info.description.as_str()),
        ("bob's", "alice's")
    );
}
