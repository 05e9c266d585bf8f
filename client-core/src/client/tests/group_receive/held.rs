//! Group envelopes of an epoch this device does not know yet are held, not
//! dropped, and applied once their commit or welcome arrives: in arrival order,
//! exactly once, across restarts, within a bound. A device left behind takes the
//! welcome that re-adds it over its stale state.

use rand::rngs::OsRng;
use tern_proto::{GroupCommit, MessageId};

use super::super::groups::{deliver, events, last_envelope, plan, text};
use super::super::{dev, Dev, DAY, NOW};
use super::{all_know, epoch, group_of};
use crate::client::group_inbox::{HELD_MAX, HELD_MAX_BYTES};
use crate::client::group_records::{HeldIndexRecord, HELD_INDEX_KEY};
use crate::client::groups::{GroupChange, GroupId};
use crate::client::state::Outcome;
use crate::client::Event;
use crate::store::{KvStore, Namespace, Op};

/// What `dev` holds, oldest first (message ids).
fn held(dev: &Dev) -> Vec<Vec<u8>> {
    let Some(v) = dev
        .kv
        .get(Namespace::GroupHeld, HELD_INDEX_KEY)
        .expect("get")
    else {
        return Vec::new();
    };
    let index: HeldIndexRecord = prost::Message::decode(&v[..]).expect("index");
    index.entries.into_iter().map(|e| e.message_id).collect()
}

/// `from` sends `body` to its group; the envelope and its id.
fn say(from: &mut Dev, group: &GroupId, body: &[u8]) -> (Vec<u8>, MessageId) {
    from.state
        .enqueue_group(group, text(body), NOW, &mut OsRng)
        .expect("queued");
    last_envelope(from)
}

/// Alice, Bob and Carol in a group; Alice's commit adding Dave, which Bob has
/// applied and Carol has not.
fn commit_carol_misses() -> (Dev, Dev, Dev, Dev, GroupId, GroupCommit) {
    let (mut alice, mut bob, mut carol, mut dave) = (dev(1), dev(2), dev(3), dev(4));
    all_know(&mut [&mut alice, &mut bob, &mut carol, &mut dave]);
    let group = group_of(&mut [&mut alice, &mut bob, &mut carol]);
    alice
        .state
        .add_group_members(&group, &[dave.account()])
        .expect("queue");
    let commit = plan(&mut alice, &group, &mut [&mut dave]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let c = &commit.sends[0];
    events(bob.receive(&deliver(&c.body, c.message_id)));
    (alice, bob, carol, dave, group, commit)
}

/// An envelope under a tag no epoch has.
fn stray(len: usize) -> Vec<u8> {
    let mut e = vec![0x02];
    e.extend(rand::random::<[u8; 16]>());
    e.resize(len, 0xa5);
    e
}

fn bodies(e: &[Event]) -> Vec<&[u8]> {
    e.iter()
        .filter_map(|e| match e {
            Event::GroupMessage(m) => Some(&m.body[..]),
            _ => None,
        })
        .collect()
}

fn drops(e: &[Event]) -> usize {
    e.iter()
        .filter(|e| matches!(e, Event::Dropped { .. }))
        .count()
}

#[test]
fn a_commit_after_two_messages_of_its_epoch_shows_both_after_it_in_order_once() {
    let (_alice, mut bob, mut carol, _dave, group, commit) = commit_carol_misses();
    let sent = [
        say(&mut bob, &group, b"first"),
        say(&mut bob, &group, b"second"),
    ];
    // Both reach Carol first, with a restart after each; a redelivery of the
    // first is held once.
    for (envelope, id) in &sent {
        assert!(events(carol.receive(&deliver(envelope, *id))).is_empty());
        carol.state.flush().expect("flush");
        carol.reload(NOW);
    }
    let (envelope, id) = &sent[0];
    assert!(matches!(
        carol.receive(&deliver(envelope, *id)),
        Outcome::Duplicate
    ));
    assert_eq!(held(&carol).len(), 2);
    assert!(carol.state.unconfirmed_group().expect("inbox").is_empty());
    assert_eq!(epoch(&mut carol, &group), 1);

    let c = &commit.sends[0];
    let e = events(carol.receive(&deliver(&c.body, c.message_id)));
    assert!(
        matches!(
            e.first(),
            Some(Event::GroupChanged {
                change: GroupChange::Added(_),
                ..
            })
        ),
        "{e:?}"
    );
    assert_eq!(bodies(&e), [b"first" as &[u8], b"second"]);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(held(&carol).is_empty());
    // Exactly once: redeliveries are duplicates, also after a restart.
    carol.state.flush().expect("flush");
    carol.reload(NOW);
    for (envelope, id) in &sent {
        assert!(matches!(
            carol.receive(&deliver(envelope, *id)),
            Outcome::Duplicate
        ));
    }
    assert!(held(&carol).is_empty());
    let inbox = carol.state.unconfirmed_group().expect("inbox");
    assert_eq!(inbox.len(), 2);
}

#[test]
fn held_envelopes_are_retried_until_none_applies() {
    let (_alice, mut bob, mut carol, mut dave, group, first) = commit_carol_misses();
    let c = &first.sends[0];
    events(dave.receive(&deliver(&first.sends[1].body, first.sends[1].message_id)));
    // Bob commits again (removing Dave), then writes in that epoch.
    bob.state
        .remove_group_member(&group, &dave.account())
        .expect("queue");
    let second = plan(&mut bob, &group, &mut []);
    bob.state.commit_accepted(&group.0).expect("accepted");
    let message = say(&mut bob, &group, b"after both");
    // Carol gets them in reverse: the message, the second commit, the first.
    let c2 = &second.sends[0];
    assert!(events(carol.receive(&deliver(&message.0, message.1))).is_empty());
    assert!(events(carol.receive(&deliver(&c2.body, c2.message_id))).is_empty());
    let e = events(carol.receive(&deliver(&c.body, c.message_id)));
    let changes: Vec<_> = e
        .iter()
        .filter_map(|e| match e {
            Event::GroupChanged { change, .. } => Some(change.clone()),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            changes.as_slice(),
            [GroupChange::Added(a), GroupChange::Removed(r)] if a == r
        ),
        "{e:?}"
    );
    assert_eq!(bodies(&e), [b"after both" as &[u8]]);
    assert_eq!(epoch(&mut carol, &group), 3);
    assert!(held(&carol).is_empty());
}

#[test]
fn the_bound_on_held_envelopes_drops_the_oldest() {
    let (_alice, mut bob, mut carol, _dave, group, commit) = commit_carol_misses();
    let oldest = say(&mut bob, &group, b"oldest");
    let kept = say(&mut bob, &group, b"kept");
    assert!(events(carol.receive(&deliver(&oldest.0, oldest.1))).is_empty());
    for i in 0..HELD_MAX - 1 {
        let id = MessageId([
            i as u8,
            (i >> 8) as u8,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
            7,
        ]);
        assert!(events(carol.receive(&deliver(&stray(200), id))).is_empty());
    }
    assert_eq!(held(&carol).len(), HELD_MAX);
    // One more: the oldest goes, with an event.
    let e = events(carol.receive(&deliver(&kept.0, kept.1)));
    assert_eq!(drops(&e), 1, "{e:?}");
    let now_held = held(&carol);
    assert_eq!(now_held.len(), HELD_MAX);
    assert_eq!(now_held.last(), Some(&kept.1 .0.to_vec()));
    assert!(!now_held.contains(&oldest.1 .0.to_vec()));
    let c = &commit.sends[0];
    let e = events(carol.receive(&deliver(&c.body, c.message_id)));
    assert_eq!(bodies(&e), [b"kept" as &[u8]]);
    assert_eq!(held(&carol).len(), HELD_MAX - 1, "the strays stay");

    // Thirty days on, every one of them goes at the next arrival.
    let later = NOW + 30 * DAY + 1;
    let out = carol
        .state
        .receive(
            &deliver(&stray(200), MessageId([0xee; 16])),
            later,
            &mut OsRng,
        )
        .expect("receive");
    assert_eq!(drops(&events(out)), HELD_MAX - 1);
    assert_eq!(held(&carol), [vec![0xee; 16]]);
}

#[test]
fn the_bound_on_held_bytes_drops_the_oldest() {
    let mut carol = dev(3);
    let big = 256 * 1024;
    let fits = HELD_MAX_BYTES / big;
    for i in 0..fits {
        let id = MessageId([i as u8; 16]);
        assert!(events(carol.receive(&deliver(&stray(big), id))).is_empty());
    }
    let e = events(carol.receive(&deliver(&stray(big), MessageId([0xff; 16]))));
    assert_eq!(drops(&e), 1, "{e:?}");
    let now_held = held(&carol);
    assert_eq!(now_held.len(), fits);
    assert_eq!(now_held[0], vec![1u8; 16]);
    // A body too short to be an envelope is not kept.
    assert!(matches!(
        carol.receive(&deliver(&stray(140), MessageId([0xfe; 16]))),
        Outcome::Dropped(_)
    ));
}

#[test]
fn envelopes_held_when_a_crash_came_before_their_retry_apply_on_the_next_start() {
    let (_alice, mut bob, mut carol, _dave, group, commit) = commit_carol_misses();
    let (envelope, id) = say(&mut bob, &group, b"waiting");
    assert!(events(carol.receive(&deliver(&envelope, id))).is_empty());
    // The commit is applied and its retry is not, as a crash between the two
    // writes would leave it: the held records are out of sight meanwhile.
    let records = carol.kv.scan(Namespace::GroupHeld).expect("scan");
    let ops = |put: bool| {
        records
            .iter()
            .map(|(k, v)| match put {
                true => Op::Put(Namespace::GroupHeld, k.clone(), v.clone()),
                false => Op::Delete(Namespace::GroupHeld, k.clone()),
            })
            .collect::<Vec<_>>()
    };
    carol.kv.apply(ops(false), true).expect("hide");
    let c = &commit.sends[0];
    let e = events(carol.receive(&deliver(&c.body, c.message_id)));
    assert!(bodies(&e).is_empty());
    carol.state.flush().expect("flush");
    carol.kv.apply(ops(true), true).expect("back");
    carol.reload(NOW);
    // The worker's retry at start shows it, once.
    let e = carol.state.retry_held(NOW).expect("retry");
    assert_eq!(bodies(&e), [b"waiting" as &[u8]]);
    assert!(held(&carol).is_empty());
    assert!(carol.state.retry_held(NOW).expect("retry").is_empty());
    assert_eq!(carol.state.unconfirmed_group().expect("inbox").len(), 1);
}

#[test]
fn a_welcome_after_a_message_of_its_epoch_shows_it_after_joining() {
    let (_alice, mut bob, _carol, mut dave, group, commit) = commit_carol_misses();
    let (envelope, id) = say(&mut bob, &group, b"hi dave");
    assert!(events(dave.receive(&deliver(&envelope, id))).is_empty());
    let w = &commit.sends[1];
    let e = events(dave.receive(&deliver(&w.body, w.message_id)));
    assert!(
        matches!(e.first(), Some(Event::GroupJoined { .. })),
        "{e:?}"
    );
    assert_eq!(bodies(&e), [b"hi dave" as &[u8]]);
    assert!(held(&dave).is_empty());
}

/// Marks `dev` left behind in `group`, as a refused commit does.
fn mark_behind(dev: &mut Dev, group: &GroupId) {
    let mut record = dev.state.groups[&group.0[..]].clone();
    record.behind_since_ms = NOW;
    let mut batch = crate::store::Batch::new();
    dev.state.put_group(&group.0, record, &mut batch);
    dev.state.commit(batch, true).expect("commit");
}

#[test]
fn a_device_left_behind_takes_the_welcome_that_re_adds_it() {
    let (mut alice, _bob, mut carol, _dave, group, _lost) = commit_carol_misses();
    // Alice removes Carol and adds her again: the removal never reaches Carol.
    alice
        .state
        .remove_group_member(&group, &carol.account())
        .expect("queue");
    plan(&mut alice, &group, &mut []);
    alice.state.commit_accepted(&group.0).expect("accepted");
    alice
        .state
        .add_group_members(&group, &[carol.account()])
        .expect("queue");
    let readd = plan(&mut alice, &group, &mut [&mut carol]);
    alice.state.commit_accepted(&group.0).expect("accepted");
    let w = readd.sends[1].clone();
    let (envelope, id) = say(&mut alice, &group, b"welcome back");
    assert!(events(carol.receive(&deliver(&envelope, id))).is_empty());
    // Not known to be behind: a welcome to a group she is in changes nothing.
    assert!(matches!(
        carol.receive(&deliver(&w.body, w.message_id)),
        Outcome::Duplicate
    ));
    assert_eq!(epoch(&mut carol, &group), 1);

    mark_behind(&mut carol, &group);
    carol.reload(NOW);
    let e = events(carol.receive(&deliver(&w.body, w.message_id)));
    assert!(
        matches!(e.first(), Some(Event::GroupJoined { .. })),
        "{e:?}"
    );
    assert_eq!(bodies(&e), [b"welcome back" as &[u8]]);
    assert_eq!(epoch(&mut carol, &group), epoch(&mut alice, &group));
    assert_eq!(carol.state.groups[&group.0[..]].behind_since_ms, 0);
    // Nothing of the stale state is left in the new one.
    let state = carol
        .kv
        .get(Namespace::MlsState, &group.0)
        .expect("get")
        .expect("state");
    let state: crate::store::records::MlsStateRecord =
        prost::Message::decode(&state[..]).expect("record");
    let joined_at = epoch(&mut carol, &group);
    assert!(state.wrap_keys.iter().all(|k| k.epoch >= joined_at));
    // After a restart she talks in the group again, and the old welcome cannot
    // bring the stale state back.
    carol.state.flush().expect("flush");
    carol.reload(NOW);
    assert_eq!(carol.state.group_list().expect("groups").len(), 1);
    let (envelope, id) = say(&mut carol, &group, b"back");
    let out = alice.receive(&deliver(&envelope, id));
    assert_eq!(bodies(&events(out)), [b"back" as &[u8]]);
    let replay = carol.receive(&deliver(&w.body, MessageId([0x31; 16])));
    assert!(matches!(replay, Outcome::Duplicate | Outcome::Dropped(_)));
    assert_eq!(epoch(&mut carol, &group), epoch(&mut alice, &group));
}
