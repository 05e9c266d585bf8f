//! Broadcast lists on states in memory: Alice sends once to Bob and Carol; each
//! opens its own envelope and the shared body, and sees an ordinary message.

use rand::rngs::OsRng;
use tern_proto::Delivery;

use super::{dev, dropped, relay_key, Dev, DAY, NOW};
use crate::client::broadcast::BroadcastSend;
use crate::client::state::Outcome;
use crate::Error;

/// `from` knows `to` by its card and has a session with its device.
fn introduce(from: &mut Dev, to: &mut Dev, with_token: bool) {
    let token = match with_token {
        true => to.state.keys.delivery_token,
        false => [0u8; 32],
    };
    from.state
        .add_contact(to.account(), to.state.keys.identity_key, token)
        .expect("contact");
    if !with_token {
        from.state.drop_token(&to.account()).expect("no token");
    }
    let bundle = to.bundle(false);
    assert!(from
        .state
        .start_sessions(to.account(), &[bundle], &mut OsRng)
        .is_ok());
}

fn sends(from: &Dev) -> Vec<BroadcastSend> {
    let cert = from.certificate(1, NOW + DAY, &relay_key());
    from.state
        .broadcast_sends(&cert, 256, 256 * 1024, &mut OsRng)
        .expect("sends")
}

/// What the relay would deliver to recipient `i` of `send`.
fn delivery(send: &BroadcastSend, i: usize, shared_body: Option<Vec<u8>>) -> Delivery {
    Delivery {
        seq: 1,
        message_id: send.message_id,
        payload: send.recipients[i].parts[0].clone().into(),
        accepted_at_ms: NOW,
        expires_at_ms: NOW + 30 * DAY,
        shared_body: shared_body.map(Into::into),
    }
}

#[test]
fn one_body_reaches_each_recipient_as_an_ordinary_message() {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    introduce(&mut alice, &mut bob, true);
    introduce(&mut alice, &mut carol, true);
    let text = [&b"to my list "[..], &[b'x'; 4000][..]].concat();
    let id = alice
        .state
        .enqueue_broadcast(
            &[
                bob.account(),
                carol.account(),
                bob.account(),
                alice.account(),
            ],
            &text,
            &[],
            NOW,
            &mut OsRng,
        )
        .expect("queued");
    // Stored before anything leaves: a restart finds it.
    alice.reload(NOW);
    let all = sends(&alice);
    assert_eq!(all.len(), 1, "one upload");
    let send = &all[0];
    assert_eq!(send.message_id, id);
    assert_eq!(
        send.recipients.len(),
        2,
        "each account once, never the sender"
    );
    assert!(!send.body.windows(10).any(|w| w == b"to my list"));
    assert!(send.body.len() > text.len(), "the body, padded, once");
    for (i, to) in [&mut bob, &mut carol].into_iter().enumerate() {
        let account = to.account();
        let index = send
            .recipients
            .iter()
            .position(|r| r.account == account)
            .expect("a recipient");
        // The envelope carries a key, not the message: small whatever the body.
        assert!(send.recipients[index].parts[0].len() < 1024, "part {i}");
        let d = delivery(send, index, Some(send.body.clone()));
        let Outcome::Message(m) = to.receive(&d) else {
            panic!("not a message")
        };
        assert_eq!(m.body, text);
        assert_eq!(
            (m.sender, m.message_id, m.sent_to),
            (alice.account(), id, None)
        );
        assert!(matches!(to.receive(&d), Outcome::Duplicate));
    }
    // Sent once the relay took every device: the parts go too.
    for r in &send.recipients {
        let devices: Vec<u32> = r.devices.iter().map(|d| d.get()).collect();
        alice.state.mark_sent(r.seq, &devices).expect("sent");
    }
    assert_eq!(alice.state.outbox_len(), 0);
    assert!(sends(&alice).is_empty());
    alice.reload(NOW);
    assert!(sends(&alice).is_empty());
}

#[test]
fn a_body_missing_or_altered_is_dropped() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    introduce(&mut alice, &mut bob, true);
    alice
        .state
        .enqueue_broadcast(&[bob.account()], b"x", &[], NOW, &mut OsRng)
        .expect("queued");
    let send = &sends(&alice)[0];
    assert!(dropped(bob.receive(&delivery(send, 0, None))));
    let mut altered = send.body.clone();
    altered[5] ^= 1;
    assert!(dropped(bob.receive(&delivery(send, 0, Some(altered)))));
    let mut other = send.body.clone();
    other.push(0);
    assert!(dropped(bob.receive(&delivery(send, 0, Some(other)))));
}

#[test]
fn a_recipient_without_a_token_gets_an_ordinary_message() {
    let (mut alice, mut bob, mut carol) = (dev(1), dev(2), dev(3));
    introduce(&mut alice, &mut bob, true);
    introduce(&mut alice, &mut carol, false);
    alice
        .state
        .enqueue_broadcast(
            &[bob.account(), carol.account()],
            b"hi",
            &[],
            NOW,
            &mut OsRng,
        )
        .expect("queued");
    let send = &sends(&alice)[0];
    assert_eq!(send.recipients.len(), 1);
    assert_eq!(send.recipients[0].account, bob.account());
    let cert = alice.certificate(1, NOW + DAY, &relay_key());
    let (plans, token) = alice
        .state
        .sealed_sends(&carol.account(), &cert, 10, &mut OsRng)
        .expect("sealed");
    assert_eq!((plans.len(), token), (1, None), "a 1:1 copy for Carol");
    let d = Delivery {
        seq: 1,
        message_id: plans[0].copies[0].message_id,
        payload: plans[0].copies[0].payload.clone().into(),
        accepted_at_ms: NOW,
        expires_at_ms: NOW + 30 * DAY,
        shared_body: None,
    };
    assert_eq!(carol.body(&d), b"hi");
    // A refused token later turns Bob's into an ordinary message too.
    alice
        .state
        .unbroadcast(send.recipients[0].seq)
        .expect("fallback");
    assert!(sends(&alice).is_empty());
}

#[test]
fn nobody_to_send_to_is_an_error() {
    let mut alice = dev(1);
    let own = alice.account();
    let refused = alice
        .state
        .enqueue_broadcast(&[own], b"x", &[], NOW, &mut OsRng);
    assert!(matches!(refused, Err(Error::NoRecipients)));
}

#[test]
fn a_broadcast_held_for_an_identity_change_opens_with_its_body_once_accepted() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    let d = alice.send(&mut bob, b"before");
    assert_eq!(bob.body(&d), b"before");
    // Alice's account under a new identity key broadcasts to Bob.
    let mut alice2 = dev(1);
    let new_key = alice2.state.keys.identity_key;
    introduce(&mut alice2, &mut bob, true);
    alice2
        .state
        .enqueue_broadcast(&[bob.account()], b"to my list", &[], NOW, &mut OsRng)
        .expect("queued");
    let send = &sends(&alice2)[0];
    let d = delivery(send, 0, Some(send.body.clone()));
    assert!(matches!(bob.receive(&d), Outcome::Held { first: true, .. }));
    assert!(bob
        .state
        .accept_identity(&alice.account(), &new_key)
        .expect("accept"));
    let released = bob
        .state
        .release_held(&alice.account(), NOW, &mut OsRng)
        .expect("release");
    assert!(
        matches!(released.as_slice(), [Outcome::Message(m)] if m.body == b"to my list"),
        "the body came back with it"
    );
    assert!(bob.state.held(&alice.account()).expect("held").is_empty());
}
