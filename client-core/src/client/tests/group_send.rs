//! The send side's rules on states in memory: a commit waits until it can reach
//! every member, refusals in a commit's answer are resent or lead to removals,
//! periodic updates renew the leaf, metadata edits merge, repeated leave requests
//! queue one removal, messages queued during a cleared commit get encrypted.

use prost::Message;
use rand::rngs::OsRng;
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::{AccountId, DeviceId, ErrorCode, GroupCommit, MultiSendResult, Refused};

use super::groups::{deliver, events, knows, last_envelope, message_body, plan, text};
use super::{dev, Dev, DAY, NOW};
use crate::client::group_commit::{GroupStep, OP_UPDATE};
use crate::client::group_meta::MetaEdit;
use crate::client::group_records::{GroupOutboxRecord, OP_META, OP_REMOVE};
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

/// One empty answer per send of `commit`: every recipient took it.
fn ok(commit: &GroupCommit) -> Vec<MultiSendResult> {
    vec![MultiSendResult::default(); commit.sends.len()]
}

fn resend_to(r: &GroupOutboxRecord) -> Vec<(AccountId, Vec<u32>)> {
    let mut out: Vec<(AccountId, Vec<u32>)> =
        r.to.iter()
            .map(|t| {
                (
                    AccountId::try_from(&t.account[..]).expect("id"),
                    t.devices.clone(),
                )
            })
            .collect();
    out.sort();
    out
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
    // Bob and Carol get the same bytes again, under the same message id.
    let resend = alice
        .state
        .group_outbox
        .values()
        .last()
        .cloned()
        .expect("queued");
    assert_eq!(resend.envelope, commit.sends[0].body.to_vec());
    assert_eq!(resend.message_id, commit.sends[0].message_id.0.to_vec());
    assert_eq!(
        resend_to(&resend),
        [(bob.account(), vec![1]), (carol.account(), vec![1])]
    );
    // Carol's token was refused (deleted, or rotated: the relay cannot tell):
    // not removed, but that token is not used again; she waits for a new one.
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    assert_eq!(
        alice.state.group_list().expect("groups")[0].unreachable,
        vec![carol.account()]
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
    alice
        .state
        .queue_due_updates(NOW, interval, &mut OsRng)
        .expect("due");
    assert!(alice.state.groups[&group.0[..]].ops.is_empty(), "new leaf");
    alice
        .state
        .queue_due_updates(NOW + interval - 1, interval, &mut OsRng)
        .expect("due");
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    // Due somewhere in [interval, 1.5 × interval].
    alice
        .state
        .queue_due_updates(NOW + interval * 3 / 2, interval, &mut OsRng)
        .expect("due");
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(ops.iter().map(|o| o.kind).collect::<Vec<_>>(), [OP_UPDATE]);
    // Queued once, however often the worker looks.
    alice
        .state
        .queue_due_updates(NOW + 2 * interval - 1, interval, &mut OsRng)
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
        .commit_answered(&group.0, &ok(&update), NOW + interval)
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
    alice
        .state
        .queue_due_updates(NOW, 7 * DAY, &mut OsRng)
        .expect("due");
    let record = &alice.state.groups[&group.0[..]];
    assert_eq!(
        record.announced_token,
        alice.state.keys.delivery_token.to_vec()
    );
    assert!(!record.announce);
    alice.state.keys.delivery_token = [7; 32];
    alice
        .state
        .queue_due_updates(NOW + 1, 7 * DAY, &mut OsRng)
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

#[test]
fn a_lost_answer_resends_every_send_to_every_recipient_first() {
    let (mut alice, mut bob, mut carol, group) = trio();
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    let commit = plan(&mut alice, &group, &mut []);
    // Queued while the commit is in flight: encrypted in the new epoch.
    alice
        .state
        .enqueue_group(&group, text(b"new epoch"), NOW, &mut OsRng)
        .expect("queued");
    // The relay's answer to a retried commit: OK, and no results.
    alice
        .state
        .commit_answered(&group.0, &[], NOW)
        .expect("answered");
    let resends: Vec<(u64, GroupOutboxRecord)> = alice
        .state
        .group_outbox
        .iter()
        .filter(|(s, _)| alice.state.is_commit_resend(**s))
        .map(|(s, r)| (*s, r.clone()))
        .collect();
    assert_eq!(resends.len(), 1);
    let (_, resend) = &resends[0];
    assert_eq!(resend.message_id, commit.sends[0].message_id.0.to_vec());
    assert_eq!(
        resend_to(resend),
        [(bob.account(), vec![1]), (carol.account(), vec![1])]
    );
    // Receivers that had it drop the copy by its id; the others follow.
    assert!(deliver_commit(&mut bob, &commit).len() == 1);
    let _ = bob.receive(&deliver(&resend.envelope, commit.sends[0].message_id));
    deliver_commit(&mut carol, &commit);
    let epoch = alice.state.session_mut(&group.0).expect("s").epoch();
    for d in [&mut bob, &mut carol] {
        assert_eq!(d.state.session_mut(&group.0).expect("s").epoch(), epoch);
    }
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
}

#[test]
fn a_rotated_token_announced_in_the_group_is_used_and_a_refused_one_waits() {
    let (mut alice, _bob, mut carol, group) = trio();
    let old = carol.state.keys.delivery_token;
    carol.state.keys.delivery_token = [9; 32];
    announce(&mut carol, &mut alice, &group);
    // The contact card still holds the old token; the group's announcement wins.
    assert_eq!(
        alice.state.member_token(&group.0, &carol.account()),
        Some([9; 32])
    );
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    let commit = plan(&mut alice, &group, &mut []);
    let index = commit.sends[0]
        .recipients
        .iter()
        .position(|r| r.account == carol.account())
        .expect("carol") as u32;
    let refused = |token: [u8; 32]| {
        assert_eq!(
            commit.sends[0].recipients[index as usize]
                .delivery_token
                .to_vec(),
            token.to_vec()
        );
        vec![MultiSendResult {
            accepted: 1,
            refused: vec![Refused {
                recipient: index,
                device: None,
                code: ErrorCode::Unauthorized,
            }],
        }]
    };
    alice
        .state
        .commit_answered(&group.0, &refused([9; 32]), NOW)
        .expect("answered");
    // Refused: the other token known is tried; the member is not removed.
    assert_eq!(
        alice.state.member_token(&group.0, &carol.account()),
        Some(old)
    );
    assert!(alice.state.groups[&group.0[..]].ops.is_empty());
    // Both refused: Carol waits for a token, and is removed only past the bound.
    let mut record = alice.state.groups[&group.0[..]].clone();
    crate::client::group_retry::refuse_token(&mut record, &carol.account(), &old);
    alice.state.groups.insert(group.0.to_vec(), record);
    assert_eq!(alice.state.member_token(&group.0, &carol.account()), None);
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("m".into()))
        .expect("queued");
    assert!(matches!(step(&mut alice, &group, NOW), GroupStep::Idle));
    assert!(matches!(
        step(&mut alice, &group, NOW + DAY - 1),
        GroupStep::Idle
    ));
    assert!(matches!(
        step(&mut alice, &group, NOW + DAY),
        GroupStep::Plan
    ));
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(
        (ops[0].kind, ops[0].accounts.clone()),
        (OP_REMOVE, vec![carol.account().as_bytes().to_vec()])
    );
}

#[test]
fn the_token_wait_is_timed_per_account() {
    let (mut alice, mut bob, carol, group) = trio();
    bob.state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    // Bob lacks Carol's token from NOW.
    assert!(matches!(step(&mut bob, &group, NOW), GroupStep::Idle));
    // Half a day later Alice's token is refused too.
    let token = alice.state.keys.delivery_token;
    let mut record = bob.state.groups[&group.0[..]].clone();
    crate::client::group_retry::refuse_token(&mut record, &alice.account(), &token);
    bob.state.groups.insert(group.0.to_vec(), record);
    assert!(matches!(
        step(&mut bob, &group, NOW + DAY / 2),
        GroupStep::Idle
    ));
    // A day after NOW only Carol is past the bound: she alone is removed, and
    // the removal waits for Alice's token (it must reach her).
    assert!(matches!(step(&mut bob, &group, NOW + DAY), GroupStep::Idle));
    let ops = &bob.state.groups[&group.0[..]].ops;
    assert_eq!(
        (ops.len(), ops[0].kind, ops[0].accounts.clone()),
        (2, OP_REMOVE, vec![carol.account().as_bytes().to_vec()])
    );
    // Alice announces a new token: the removal goes.
    alice.state.keys.delivery_token = [8; 32];
    announce(&mut alice, &mut bob, &group);
    assert!(matches!(step(&mut bob, &group, NOW + DAY), GroupStep::Plan));
}

#[test]
fn own_devices_and_others_are_judged_alike() {
    use crate::client::group_retry::{verdict, Verdict};
    let (own, other) = (AccountId([1; 16]), AccountId([2; 16]));
    let f = |device: Option<DeviceId>, code| Refused {
        recipient: 0,
        device,
        code,
    };
    let d = Some(DeviceId::PRIMARY);
    for to in [own, other] {
        assert_eq!(
            verdict(&f(d, ErrorCode::MailboxFull), &to, &own),
            Verdict::Retry
        );
        assert_eq!(
            verdict(&f(None, ErrorCode::RateLimited), &to, &own),
            Verdict::Retry
        );
        assert_eq!(
            verdict(&f(d, ErrorCode::Unauthorized), &to, &own),
            Verdict::DeviceGone
        );
    }
    // Our own token is the current one at the resend: tried again.
    assert_eq!(
        verdict(&f(None, ErrorCode::Unauthorized), &own, &own),
        Verdict::Retry
    );
    assert_eq!(
        verdict(&f(None, ErrorCode::Unauthorized), &other, &own),
        Verdict::TokenRefused
    );
}

#[test]
fn updates_are_jittered_and_any_path_commit_renews_the_leaf() {
    use rand::SeedableRng;
    let interval = 7 * DAY;
    let mut dues = Vec::new();
    for seed in 0..8u64 {
        let (mut alice, _bob, _carol, group) = trio();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        alice
            .state
            .queue_due_updates(NOW, interval, &mut rng)
            .expect("due");
        let due = alice.state.groups[&group.0[..]].leaf_due_ms;
        assert!((NOW + interval..=NOW + interval * 3 / 2).contains(&due));
        dues.push(due);
    }
    dues.dedup();
    assert!(dues.len() > 1, "not all at once");
    // A metadata commit of Alice carries a path: her leaf is new.
    let (mut alice, _bob, _carol, group) = trio();
    alice
        .state
        .queue_due_updates(NOW, interval, &mut OsRng)
        .expect("due");
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    let c = plan(&mut alice, &group, &mut []);
    alice
        .state
        .commit_answered(&group.0, &ok(&c), NOW + interval)
        .expect("answered");
    alice
        .state
        .queue_due_updates(NOW + interval * 3 / 2, interval, &mut OsRng)
        .expect("due");
    let record = &alice.state.groups[&group.0[..]];
    assert_eq!(record.leaf_updated_ms, NOW + interval);
    assert!(record.ops.is_empty(), "renewed by the metadata commit");
}

#[test]
fn a_new_token_is_committed_by_the_primary_device_only() {
    let mut linked = super::dev_of(1, 2, &[1; 32]);
    let group = linked
        .state
        .create_group("g", &[], NOW, &mut OsRng)
        .expect("create");
    linked
        .state
        .queue_due_updates(NOW, 7 * DAY, &mut OsRng)
        .expect("due");
    linked.state.keys.delivery_token = [7; 32];
    linked
        .state
        .queue_due_updates(NOW + 1, 7 * DAY, &mut OsRng)
        .expect("due");
    let record = &linked.state.groups[&group.0[..]];
    assert!(record.announce, "announced by every device");
    assert!(record.ops.iter().all(|o| o.kind != OP_UPDATE));
}

#[test]
fn metadata_edits_are_never_deduplicated() {
    use crate::client::group_commit::dedup_ops;
    use crate::client::group_records::GroupOpRecord;
    let meta = |name: &str| GroupOpRecord {
        kind: OP_META,
        meta: name.as_bytes().to_vec(),
        meta_fields: 1,
        ..GroupOpRecord::default()
    };
    let mut ops = vec![meta("X"), meta("Y"), meta("X")];
    assert!(!dedup_ops(&mut ops));
    assert_eq!(ops.len(), 3);
}

#[test]
fn a_resend_refused_for_thirty_days_is_given_up() {
    use crate::client::group_commit::add_devices;
    use crate::client::group_retry::{SendOutcome, GIVE_UP_MS};
    let (mut alice, bob, _carol, group) = trio();
    let id = alice
        .state
        .enqueue_group(&group, text(b"hi"), NOW, &mut OsRng)
        .expect("queued");
    let (seq, _) = alice
        .state
        .group_outbox
        .iter()
        .last()
        .map(|(s, r)| (*s, r.clone()))
        .expect("queued");
    let full = || {
        let mut o = SendOutcome::default();
        add_devices(&mut o.keep, &bob.account(), &[DeviceId::PRIMARY]);
        o
    };
    let settle = |alice: &mut Dev, now| {
        alice
            .state
            .settle_group_send(seq, full(), now)
            .expect("settled")
    };
    assert!(settle(&mut alice, NOW).is_none());
    assert!(settle(&mut alice, NOW + GIVE_UP_MS - 1).is_none());
    assert_eq!(
        resend_to(&alice.state.group_outbox[&seq]),
        [(bob.account(), vec![1])]
    );
    assert_eq!(
        settle(&mut alice, NOW + GIVE_UP_MS),
        Some((id, vec![bob.account()]))
    );
    assert!(!alice.state.group_outbox.contains_key(&seq));
    assert!(alice.state.groups[&group.0[..]].resends.is_empty());
}

#[test]
fn a_resent_commit_refused_for_thirty_days_removes_its_devices() {
    use crate::client::group_commit::add_devices;
    use crate::client::group_retry::{SendOutcome, GIVE_UP_MS};
    let (mut alice, bob, _carol, group) = trio();
    alice
        .state
        .edit_group_meta(&group, MetaEdit::Name("n".into()))
        .expect("queued");
    let _ = plan(&mut alice, &group, &mut []);
    alice
        .state
        .commit_answered(&group.0, &[], NOW)
        .expect("answered");
    let seq = *alice
        .state
        .group_outbox
        .keys()
        .find(|s| alice.state.is_commit_resend(**s))
        .expect("a resend");
    let mut o = SendOutcome::default();
    add_devices(&mut o.keep, &bob.account(), &[DeviceId::PRIMARY]);
    assert!(alice
        .state
        .settle_group_send(seq, o, NOW + GIVE_UP_MS)
        .expect("settled")
        .is_none());
    let ops = &alice.state.groups[&group.0[..]].ops;
    assert_eq!(
        (ops.len(), ops[0].kind, ops[0].device),
        (1, crate::client::group_records::OP_REMOVE_DEVICE, 1)
    );
}

#[test]
fn a_group_being_left_takes_no_more_changes() {
    let (_alice, mut bob, _carol, group) = trio();
    bob.state
        .leave_group(&group, NOW, &mut OsRng)
        .expect("left");
    assert!(matches!(
        bob.state
            .edit_group_meta(&group, MetaEdit::Name("n".into())),
        Err(crate::Error::LeavingGroup)
    ));
    let other = tern_proto::AccountId([9; 16]);
    assert!(matches!(
        bob.state.remove_group_member(&group, &other),
        Err(crate::Error::LeavingGroup)
    ));
    let long = "x".repeat(crate::groups::meta::MAX_DESCRIPTION + 1);
    let (mut alice, ..) = trio();
    let g = alice.state.group_list().expect("groups")[0].id;
    assert!(matches!(
        alice.state.edit_group_meta(&g, MetaEdit::Description(long)),
        Err(crate::Error::TooLarge { max }) if max == crate::groups::meta::MAX_DESCRIPTION
    ));
}
