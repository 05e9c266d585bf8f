//! The client's rules on its state, without a network: two or three devices in
//! memory, with a relay key of the test's own to sign sender certificates.

use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::OsRng;
use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::keys::{SIGNED_PREKEY_GRACE_MS, SIGNED_PREKEY_ROTATION_MS};
use super::outbox::MAX_BODY;
use super::state::{NewDevice, Outcome, State};
use super::ContactCard;
use crate::crypto::sealed::{self, SenderCertificate};
use crate::crypto::x3dh::AgreementKeyPair;
use crate::store::{KvStore, MemoryKv, Namespace};
use crate::Error;
use tern_proto::{Delivery, DeviceBundle, MessageId};

mod broadcast;
mod devices;
mod group_receive;
mod group_rejoin;
mod group_send;
mod group_tree;
mod groups;

const NOW: u64 = 1_800_000_000_000;
const DAY: u64 = 24 * 3600 * 1000;

struct Dev {
    state: State,
    kv: Arc<MemoryKv>,
}

fn relay_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn dev(account: u8) -> Dev {
    dev_of(account, 1, &rand::random())
}

/// Device `device` of `account`, under the given identity secret.
fn dev_of(account: u8, device: u32, identity_secret: &[u8; 32]) -> Dev {
    let kv = Arc::new(MemoryKv::new());
    let state = State::create(
        kv.clone(),
        NewDevice {
            relay: "tern://x@127.0.0.1:1".into(),
            identity_secret,
            linked: None,
            device_secret: &rand::random(),
            identity_dh: &AgreementKeyPair::generate(&mut OsRng),
            address: DeviceAddress {
                account: AccountId([account; 16]),
                device: DeviceId::try_from(device).expect("device id"),
            },
            relay_signing_key: relay_key().verifying_key().to_bytes(),
        },
        NOW,
        &mut OsRng,
    )
    .expect("create");
    Dev { state, kv }
}

impl Dev {
    fn account(&self) -> AccountId {
        self.state.keys.address.account
    }

    fn reload(&mut self, now: u64) {
        let kv: Arc<dyn KvStore> = self.kv.clone();
        self.state = State::load(kv, now).expect("load").expect("a device");
    }

    /// What the relay would hand out for this device.
    fn bundle(&mut self, with_one_time: bool) -> DeviceBundle {
        let upload = self
            .state
            .key_upload(None, NOW, &mut OsRng)
            .expect("upload")
            .expect("keys");
        DeviceBundle {
            device: self.state.keys.address.device,
            identity_key: self.state.keys.identity_key,
            identity_dh: upload.identity_dh.expect("identity dh"),
            signed_prekey: upload.signed_prekey.expect("signed prekey"),
            one_time_prekey: with_one_time.then(|| upload.one_time[0]),
        }
    }

    fn certificate(
        &self,
        device: u32,
        expires_at_ms: u64,
        relay: &SigningKey,
    ) -> SenderCertificate {
        let encoded = tern_proto::SenderCertificate {
            account: self.account(),
            device: DeviceId::try_from(device).expect("device id"),
            identity_key: self.state.keys.identity_key,
            expires_at_ms,
            relay_key: relay.verifying_key().to_bytes(),
        }
        .encode();
        let signature = relay
            .sign(&tern_proto::auth::sender_certificate(&encoded))
            .to_bytes();
        SenderCertificate::parse(&encoded, &signature).expect("certificate")
    }

    /// Queues and encrypts `body` for `to`, then seals it as the relay would deliver it.
    fn send_with(&mut self, to: &mut Dev, body: &[u8], cert: &SenderCertificate) -> Delivery {
        let to_account = to.account();
        self.sessions_with(to);
        self.state
            .enqueue(&to_account, body, &[], NOW, &mut OsRng)
            .expect("enqueue");
        self.seal_last(to, cert)
    }

    /// Starts sessions with `to` if there are none.
    fn sessions_with(&mut self, to: &mut Dev) {
        let account = to.account();
        if self.state.needs_bundles(&account).expect("needs") {
            let bundle = to.bundle(false);
            assert!(self
                .state
                .start_sessions(account, &[bundle], &mut OsRng)
                .is_ok());
        }
    }

    /// The last queued outbox record, encrypted for `to`'s first device and sealed
    /// as the relay would deliver it.
    fn seal_last(&mut self, to: &Dev, cert: &SenderCertificate) -> Delivery {
        self.seal_last_at(to, cert, NOW)
    }

    /// [`Dev::seal_last`] prepared (its `sent_at_ms` set) at `now`.
    fn seal_last_at(&mut self, to: &Dev, cert: &SenderCertificate, now: u64) -> Delivery {
        let seq = *self.state.outbox().last().expect("queued").0;
        self.state.prepare(seq, now).expect("prepare");
        let (_, record) = self.state.outbox().last().expect("queued");
        let content = record.copies[0].content.clone();
        let id = MessageId(record.message_id[..].try_into().expect("id"));
        let device = record.copies[0].device_id;
        self.state.mark_sent(seq, &[device]).expect("sent");
        let payload = sealed::seal(
            &mut OsRng,
            &to.state.keys.identity_dh.public(),
            cert,
            &content,
        )
        .expect("seal");
        Delivery {
            seq,
            message_id: id,
            payload: payload.into(),
            shared_body: None,
            accepted_at_ms: NOW,
            expires_at_ms: NOW + 30 * DAY,
        }
    }

    fn send(&mut self, to: &mut Dev, body: &[u8]) -> Delivery {
        let cert = self.certificate(1, NOW + DAY, &relay_key());
        self.send_with(to, body, &cert)
    }

    fn receive(&mut self, d: &Delivery) -> Outcome {
        self.state.receive(d, NOW, &mut OsRng).expect("receive")
    }

    fn body(&mut self, d: &Delivery) -> Vec<u8> {
        match self.receive(d) {
            Outcome::Message(m) => m.body,
            Outcome::Dropped(reason) => panic!("dropped: {reason}"),
            _ => panic!("not a message"),
        }
    }
}

fn dropped(o: Outcome) -> bool {
    matches!(o, Outcome::Dropped(_))
}

#[test]
fn a_message_is_stored_once_and_kept_until_confirmed() {
    let (mut a, mut b) = (dev(1), dev(2));
    let d = a.send(&mut b, b"hello");
    let Outcome::Message(m) = b.receive(&d) else {
        panic!("not a message")
    };
    assert_eq!((m.body.as_slice(), m.sender), (&b"hello"[..], a.account()));
    assert!(
        matches!(b.receive(&d), Outcome::Duplicate),
        "a redelivery in the same batch"
    );
    b.state.flush().expect("flush");
    assert!(
        matches!(b.receive(&d), Outcome::Duplicate),
        "a redelivery later"
    );
    b.reload(NOW);
    assert!(
        matches!(b.receive(&d), Outcome::Duplicate),
        "after a restart"
    );
    assert_eq!(b.state.unconfirmed().expect("inbox"), vec![m.clone()]);
    b.state.confirm(m.seq).expect("confirm");
    assert!(b.state.unconfirmed().expect("inbox").is_empty());
    // Our token travelled inside: b can now write to a sealed.
    assert_eq!(
        b.state
            .contact(&a.account())
            .expect("contact")
            .delivery_token,
        a.state.keys.delivery_token.to_vec()
    );
}

#[test]
fn sessions_contacts_and_the_outbox_survive_restarts() {
    let (mut a, mut b) = (dev(1), dev(2));
    let d1 = a.send(&mut b, b"1");
    assert_eq!(b.body(&d1), b"1");
    b.state.flush().expect("flush");
    a.state
        .enqueue(&b.account(), b"queued", &[], NOW, &mut OsRng)
        .expect("enqueue");
    a.reload(NOW);
    b.reload(NOW);
    assert_eq!(a.state.outbox_len(), 1, "the queued message is still there");
    let reply = b.send(&mut a, b"reply");
    assert_eq!(a.body(&reply), b"reply");
    let d2 = a.send(&mut b, b"2");
    assert_eq!(b.body(&d2), b"2");
}

#[test]
fn a_one_time_prekey_opens_one_session_only() {
    let (mut a, mut b, mut c) = (dev(1), dev(2), dev(3));
    let bundle = b.bundle(true);
    let (opk_id, _) = bundle.one_time_prekey.expect("one-time prekey");
    let opk_key =
        crate::store::records::prekey_key(crate::store::records::PreKeyKind::OneTime, opk_id);
    assert!(a
        .state
        .start_sessions(b.account(), std::slice::from_ref(&bundle), &mut OsRng)
        .is_ok());
    assert!(c
        .state
        .start_sessions(b.account(), &[bundle], &mut OsRng)
        .is_ok());
    let from_a = a.send(&mut b, b"first");
    let from_a_again = a.send(&mut b, b"second, same header");
    let from_c = c.send(&mut b, b"same prekey");
    assert_eq!(b.body(&from_a), b"first");
    assert_eq!(b.state.consumed_prekeys, 1);
    assert!(
        b.kv.get(Namespace::PreKeys, &opk_key)
            .expect("get")
            .is_none(),
        "deleted once used"
    );
    assert_eq!(
        b.body(&from_a_again),
        b"second, same header",
        "a repeated header needs no prekey"
    );
    assert!(
        dropped(b.receive(&from_c)),
        "a used one-time prekey opens nothing"
    );
}

#[test]
fn an_identity_change_is_held_until_accepted() {
    let (mut a, mut b) = (dev(1), dev(2));
    let d = a.send(&mut b, b"before");
    assert_eq!(b.body(&d), b"before");
    // The same account with a new identity key (a reinstall, or an impostor).
    let mut a2 = dev(1);
    let new_key = a2.state.keys.identity_key;
    let m1 = a2.send(&mut b, b"new key 1");
    let m2 = a2.send(&mut b, b"new key 2");
    assert!(matches!(b.receive(&m1), Outcome::Held { first: true, .. }));
    assert!(matches!(b.receive(&m2), Outcome::Held { first: false, .. }));
    assert!(b.state.contact(&a.account()).expect("contact").blocked());
    assert!(matches!(
        b.state
            .enqueue(&a.account(), b"reply", &[], NOW, &mut OsRng),
        Err(Error::UntrustedIdentity)
    ));
    // The trusted key's sessions still work while the change waits.
    let old = a.send(&mut b, b"old key");
    assert_eq!(b.body(&old), b"old key");
    // Accepting needs the very key the user compared.
    assert!(!b
        .state
        .accept_identity(&a.account(), &[9; 32])
        .expect("accept"));
    assert!(b
        .state
        .accept_identity(&a.account(), &new_key)
        .expect("accept"));
    assert_eq!(b.state.held(&a.account()).expect("held").len(), 2);
    let bodies: Vec<Vec<u8>> = b
        .state
        .release_held(&a.account(), NOW, &mut OsRng)
        .expect("release")
        .into_iter()
        .filter_map(|o| match o {
            Outcome::Message(m) => Some(m.body),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, vec![b"new key 1".to_vec(), b"new key 2".to_vec()]);
    assert!(!b.state.contact(&a.account()).expect("contact").blocked());
    assert!(
        b.state.held(&a.account()).expect("held").is_empty(),
        "nothing left"
    );
    // The new sessions carry on.
    let m3 = a2.send(&mut b, b"new key 3");
    assert_eq!(b.body(&m3), b"new key 3");
}

#[test]
fn only_a_message_that_proves_a_new_key_raises_a_change() {
    let (mut a, mut b) = (dev(1), dev(2));
    let d = a.send(&mut b, b"hi");
    b.body(&d);
    // Someone holding a certificate for a's account under another key (a replayed
    // old one, say) seals junk with it: dropped, and a stays trusted.
    let other = dev(1);
    let cert = other.certificate(1, NOW + DAY, &relay_key());
    let payload = sealed::seal(
        &mut OsRng,
        &b.state.keys.identity_dh.public(),
        &cert,
        b"junk",
    )
    .expect("seal");
    let junk = Delivery {
        seq: 99,
        message_id: tern_proto::MessageId([3; 16]),
        payload: payload.into(),
        shared_body: None,
        accepted_at_ms: NOW,
        expires_at_ms: NOW + DAY,
    };
    assert!(dropped(b.receive(&junk)));
    assert!(!b.state.contact(&a.account()).expect("contact").blocked());
}

#[test]
fn a_certificate_is_judged_at_the_time_the_relay_accepted_the_message() {
    let (mut a, mut b) = (dev(1), dev(2));
    // Valid for an hour after sending; the recipient reads it a day later.
    let cert = a.certificate(1, NOW + 3600 * 1000, &relay_key());
    let d = a.send_with(&mut b, b"sent while you slept", &cert);
    let outcome = b.state.receive(&d, NOW + DAY, &mut OsRng).expect("receive");
    assert!(matches!(outcome, Outcome::Message(_)));
    // Expired already when the relay accepted it: refused.
    let late = a.certificate(1, NOW - 1, &relay_key());
    let d = a.send_with(&mut b, b"x", &late);
    assert!(dropped(b.receive(&d)));
}

#[test]
fn a_bundle_with_a_changed_identity_blocks_sending() {
    let (mut a, b) = (dev(1), dev(2));
    // a trusts b's identity from b's card; the relay then hands out other keys.
    a.state
        .add_contact(b.account(), b.state.keys.identity_key, [0; 32])
        .expect("add");
    let mut impostor = dev(2);
    let bundle = impostor.bundle(false);
    assert!(matches!(
        a.state
            .start_sessions(b.account(), std::slice::from_ref(&bundle), &mut OsRng),
        Err(super::contacts::StartError::IdentityChanged { first: true })
    ));
    assert!(a.state.contact(&b.account()).expect("contact").blocked());
    assert!(matches!(
        a.state.start_sessions(b.account(), &[bundle], &mut OsRng),
        Err(super::contacts::StartError::IdentityChanged { first: false })
    ));
}

#[test]
fn certificates_from_another_relay_or_expired_are_rejected() {
    let (mut a, mut b) = (dev(1), dev(2));
    let other_relay = SigningKey::from_bytes(&[43; 32]);
    let foreign = a.certificate(1, NOW + DAY, &other_relay);
    let d = a.send_with(&mut b, b"x", &foreign);
    assert!(dropped(b.receive(&d)));
    let expired = a.certificate(1, NOW - 1, &relay_key());
    let d = a.send_with(&mut b, b"x", &expired);
    assert!(dropped(b.receive(&d)));
    assert!(b.state.unconfirmed().expect("inbox").is_empty());
}

#[test]
fn the_sender_inside_must_match_its_certificate() {
    let (mut a, mut b) = (dev(1), dev(2));
    // A certificate for another device of the same account.
    let cert = a.certificate(2, NOW + DAY, &relay_key());
    let d = a.send_with(&mut b, b"x", &cert);
    assert!(dropped(b.receive(&d)));
}

#[test]
fn a_damaged_envelope_is_dropped_and_changes_nothing() {
    let (mut a, mut b) = (dev(1), dev(2));
    let d = a.send(&mut b, b"intact");
    let mut bad = d.clone();
    let mut payload = bad.payload.to_vec();
    let last = payload.len() - 1;
    payload[last] ^= 1;
    bad.payload = payload.into();
    assert!(dropped(b.receive(&bad)));
    let mut truncated = d.clone();
    truncated.payload = d.payload.slice(..40);
    assert!(dropped(b.receive(&truncated)));
    assert_eq!(b.body(&d), b"intact");
}

#[test]
fn signed_prekeys_rotate_and_the_old_one_works_for_a_grace_period() {
    let (mut a, mut b) = (dev(1), dev(2));
    let old_bundle = b.bundle(false);
    b.state.keys_published().expect("published");
    assert!(
        b.state
            .key_upload(Some(100), NOW + DAY, &mut OsRng)
            .expect("upload")
            .is_none(),
        "nothing due"
    );
    let later = NOW + SIGNED_PREKEY_ROTATION_MS + 1;
    let upload = b
        .state
        .key_upload(Some(100), later, &mut OsRng)
        .expect("upload")
        .expect("rotation");
    let new = upload.signed_prekey.expect("a new signed prekey");
    assert_ne!(new.id, old_bundle.signed_prekey.id);
    assert!(upload.one_time.is_empty());
    // A session started from the old bundle still opens.
    assert!(a
        .state
        .start_sessions(b.account(), std::slice::from_ref(&old_bundle), &mut OsRng)
        .is_ok());
    let d = a.send(&mut b, b"old spk");
    assert_eq!(b.body(&d), b"old spk");
    // After the grace period the old secret is gone.
    let gone = later + SIGNED_PREKEY_GRACE_MS + 1;
    b.state
        .key_upload(Some(100), gone, &mut OsRng)
        .expect("upload");
    let mut c = dev(3);
    assert!(c
        .state
        .start_sessions(b.account(), &[old_bundle], &mut OsRng)
        .is_ok());
    let d = c.send(&mut b, b"too late");
    assert!(dropped(b.receive(&d)));
}

#[test]
fn one_time_prekeys_are_replenished_when_few_are_left() {
    let mut b = dev(2);
    b.state.keys_published().expect("published");
    let upload = b
        .state
        .key_upload(Some(3), NOW, &mut OsRng)
        .expect("upload")
        .expect("more keys");
    assert_eq!(upload.one_time.len(), super::keys::PREKEY_BATCH as usize);
    let ids: std::collections::HashSet<u32> = upload.one_time.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), upload.one_time.len(), "fresh ids");
    assert!(b
        .state
        .key_upload(Some(100), NOW, &mut OsRng)
        .expect("upload")
        .is_none());
}

#[test]
fn oversized_messages_are_refused_and_the_largest_fits() {
    let (mut a, mut b) = (dev(1), dev(2));
    assert!(matches!(
        a.state
            .enqueue(&b.account(), &vec![0; MAX_BODY + 1], &[], NOW, &mut OsRng),
        Err(Error::TooLarge { .. })
    ));
    let d = a.send(&mut b, &vec![7; MAX_BODY]);
    assert_eq!(b.body(&d).len(), MAX_BODY);
}

#[test]
fn padding_hides_the_length() {
    let (mut a, mut b) = (dev(1), dev(2));
    let first = a.send(&mut b, b"x"); // carries the X3DH header
    b.body(&first);
    let reply = b.send(&mut a, b"ok");
    a.body(&reply);
    let short = a.send(&mut b, b"a");
    let long = a.send(&mut b, &[b'a'; 150]);
    assert_eq!(short.payload.len(), long.payload.len());
}

#[test]
fn envelopes_grow_in_padme_steps() {
    let (mut a, mut b) = (dev(1), dev(2));
    let first = a.send(&mut b, b"x");
    b.body(&first);
    let reply = b.send(&mut a, b"ok");
    a.body(&reply);
    let mut envelope = |n: usize| {
        let d = a.send(&mut b, &vec![b'a'; n]);
        assert_eq!(b.body(&d).len(), n);
        d.payload.len()
    };
    // An empty body pads to the 256-byte floor; the rest of the envelope is a constant.
    let overhead = envelope(0) - 256;
    // The plaintext's other fields (delivery token, sender, time) and the marker add 65
    // bytes to a body of 128 to 16,383 bytes. So 1 KiB pads to 1,152 (the power-of-two
    // buckets gave 2,048) and 700 bytes to 768 (they gave 1,024); 1,087 is the last
    // body in 1,152's step.
    for (body, padded) in [
        (191, 256),
        (192, 272),
        (700, 768),
        (1024, 1152),
        (1087, 1152),
        (1088, 1216),
    ] {
        assert_eq!(envelope(body), overhead + padded, "{body}");
    }
    eprintln!("envelope overhead over the padded plaintext: {overhead} bytes");
}

#[test]
fn contact_cards_round_trip_and_reject_garbage() {
    let card = ContactCard {
        account: AccountId([5; 16]),
        identity_key: [6; 32],
        delivery_token: [7; 32],
    };
    let text = card.to_string();
    assert!(text.starts_with("tern-contact:"));
    assert_eq!(text.parse::<ContactCard>().expect("parses"), card);
    for bad in [
        "",
        "tern-contact:",
        "tern-contact:AAAA",
        &text[..text.len() - 2],
        "x",
    ] {
        assert!(bad.parse::<ContactCard>().is_err(), "{bad}");
    }
}

/// The devices a queued message has copies for.
fn copies_of(d: &Dev, seq: u64) -> Vec<u32> {
    d.state
        .outbox()
        .find(|(s, _)| **s == seq)
        .map(|(_, r)| r.copies.iter().map(|c| c.device_id).collect())
        .expect("record")
}

#[test]
fn a_contacts_new_and_gone_devices_are_picked_up() {
    let secret: [u8; 32] = rand::random();
    let (mut a, mut b1) = (dev(1), dev_of(2, 1, &secret));
    let mut b2 = dev_of(2, 2, &secret);
    let token = [4u8; 32];
    a.state
        .add_contact(b1.account(), b1.state.keys.identity_key, token)
        .expect("add");
    let d = a.send(&mut b1, b"first");
    assert_eq!(b1.body(&d), b"first");
    // Due at once (never checked), then not again for a day.
    assert_eq!(a.state.devices_due(&b1.account(), NOW), Some(token));
    a.state
        .enqueue(&b1.account(), b"queued", &[], NOW, &mut OsRng)
        .expect("enqueue");
    let seq = *a.state.outbox().last().expect("queued").0;
    a.state.prepare(seq, NOW).expect("prepare");
    // The relay says the account now has devices 1 and 2.
    let new = a
        .state
        .update_devices(&b1.account(), &[1, 2], NOW)
        .expect("update");
    assert_eq!(new, vec![2]);
    assert_eq!(a.state.devices_due(&b1.account(), NOW + 1), None);
    assert!(a
        .state
        .devices_due(&b1.account(), NOW + super::contacts::DEVICE_CHECK_MS)
        .is_some());
    let bundle = b2.bundle(false);
    assert!(a
        .state
        .start_sessions(b1.account(), std::slice::from_ref(&bundle), &mut OsRng)
        .is_ok());
    a.state.reprepare(&b1.account()).expect("reprepare");
    a.state.prepare(seq, NOW).expect("prepare");
    let copies = copies_of(&a, seq);
    assert_eq!(
        copies,
        vec![1, 2],
        "the queued message goes to the new device too"
    );
    // Device 1 is gone: its unsent copy goes with it.
    let new = a
        .state
        .update_devices(&b1.account(), &[2], NOW + 5)
        .expect("update");
    assert!(new.is_empty());
    let copies = copies_of(&a, seq);
    assert_eq!(copies, vec![2]);
}

#[test]
fn a_backlog_is_sealed_in_bounded_batches_oldest_first() {
    let (mut alice, mut bob) = (dev(1), dev(2));
    let to = bob.account();
    let bundle = bob.bundle(false);
    assert!(alice
        .state
        .start_sessions(to, &[bundle], &mut OsRng)
        .is_ok());
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        alice
            .state
            .enqueue(&to, &[i; 8], &[], NOW, &mut OsRng)
            .expect("enqueue");
        let seq = *alice.state.outbox().last().expect("queued").0;
        alice.state.prepare(seq, NOW).expect("prepare");
        seqs.push(seq);
    }
    let cert = alice.certificate(1, NOW + DAY, &relay_key());
    let mut sent = Vec::new();
    for round in 0..4 {
        let (plans, _) = alice
            .state
            .sealed_sends(&to, &cert, 2, &mut OsRng)
            .expect("seal");
        let copies: Vec<_> = plans.iter().flat_map(|p| p.copies.iter()).collect();
        assert!(copies.len() <= 2, "round {round}: at most the limit");
        for c in copies {
            sent.push(c.seq);
            alice.state.mark_sent(c.seq, &[1]).expect("sent");
        }
    }
    assert_eq!(sent, seqs, "every copy once, oldest first");
}

#[test]
fn a_cleared_store_holds_no_device() {
    let a = dev(1);
    assert!(!a.kv.scan(Namespace::Local).expect("scan").is_empty());
    assert!(!a.kv.scan(Namespace::PreKeys).expect("scan").is_empty());
    crate::store::clear(a.kv.as_ref()).expect("clear");
    for ns in Namespace::ALL {
        assert!(a.kv.scan(ns).expect("scan").is_empty(), "{ns:?}");
    }
    let kv: Arc<dyn KvStore> = a.kv.clone();
    assert!(State::load(kv, NOW).expect("load").is_none());
}

#[test]
fn an_attachment_pointer_this_version_cannot_read_is_counted_not_dropped_silently() {
    use crate::crypto::attachment::sealed_len;
    use crate::media::AttachmentPointer;
    use crate::store::records::InboxRecord;
    let good = AttachmentPointer {
        blob_id: [1; 32],
        key: [2; 32],
        size: 10,
        sealed_size: sealed_len(10).expect("small"),
        digest: [3; 32],
        content_type: "text/plain".into(),
        file_name: "a.txt".into(),
    };
    // A sealed size no rule of this version gives, as a newer sender's might be.
    let mut newer = good.clone();
    newer.sealed_size += 1;
    let record = InboxRecord {
        sender: vec![7; 16],
        sender_device: 1,
        message_id: vec![9; 16],
        body: b"hi".to_vec(),
        sent_at_ms: 1,
        received_at_ms: 2,
        attachments: vec![good.to_bytes(), newer.to_bytes(), b"junk".to_vec()],
        sent_to: Vec::new(),
    };
    let m = super::ReceivedMessage::from_record(5, &record).expect("a message");
    assert_eq!(m.attachments, vec![good]);
    assert_eq!(m.unreadable_attachments, 2);
}

/// Register or join on a store that holds a device under another storage key is
/// refused before anything is written: records under a second key would leave the
/// store unreadable under either.
#[tokio::test]
async fn register_and_join_under_another_storage_key_write_nothing() {
    use crate::store::{SledKv, StoreError};
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = tern_proto::RelayAddress::new(tern_proto::Fingerprint([1; 32]), "127.0.0.1", 1);
    {
        let kv = SledKv::open(dir.path(), &[7; 32]).expect("open");
        let mut batch = crate::store::Batch::new();
        batch.put_local(&crate::store::records::LocalRecord {
            relay: relay.to_string(),
            ..Default::default()
        });
        batch.commit(&kv, true).expect("commit");
    }
    {
        let wrong: Arc<dyn KvStore> = Arc::new(SledKv::open(dir.path(), &[8; 32]).expect("open"));
        let registered = super::Client::register(&relay, wrong.clone()).await;
        assert!(
            matches!(registered, Err(Error::Store(StoreError::Corrupt))),
            "register: {:?}",
            registered.err()
        );
        let joined = super::Client::join(&relay, wrong).await;
        assert!(
            matches!(joined, Err(Error::Store(StoreError::Corrupt))),
            "join: {:?}",
            joined.err()
        );
    }
    // Under its own key the store still holds the one record, readable.
    let kv = SledKv::open(dir.path(), &[7; 32]).expect("reopen");
    assert_eq!(kv.scan(Namespace::Local).expect("scan").len(), 1);
}
