//! The device-list rules and own-device sync, on states in memory: Alice's primary
//! (device 1) signs lists, a linked device 2 holds no identity key, Bob sends to her.

use std::sync::Arc;

use prost::Message as _;
use rand::rngs::OsRng;
use tern_proto::e2e::{self, sync_message::Kind};
use tern_proto::{AccountId, DeviceAddress, DeviceBundle, DeviceId};

use super::{dev, dropped, relay_key, Dev, DAY, NOW};
use crate::client::devices::ListChange;
use crate::client::state::{LinkedKeys, NewDevice, Outcome, State};
use crate::crypto::devices::{sign_device_list, DeviceEntry, DeviceList};
use crate::crypto::sealed;
use crate::crypto::x3dh::AgreementKeyPair;
use crate::store::MemoryKv;
use tern_proto::Delivery;

fn id(n: u32) -> DeviceId {
    DeviceId::try_from(n).expect("device id")
}

fn entry_of(d: &Dev) -> DeviceEntry {
    DeviceEntry {
        id: d.state.keys.address.device,
        device_key: d.state.keys.device.public(),
        identity_dh: d.state.keys.identity_dh.public(),
    }
}

/// A list of `primary`'s account with `entries`, signed by its identity.
fn signed(primary: &Dev, version: u64, entries: Vec<DeviceEntry>) -> (Vec<u8>, [u8; 64]) {
    let list = DeviceList {
        account: primary.account(),
        version,
        entries,
    };
    let identity = primary.state.keys.identity.as_ref().expect("the primary");
    sign_device_list(identity.signing_key(), &list).expect("a valid list")
}

/// Device `device` linked to `primary`'s account: no identity secret, its
/// agreement key vouched for by the primary, its prekeys signed by its device key.
fn linked(primary: &Dev, device: u32) -> Dev {
    let kv = Arc::new(MemoryKv::new());
    let identity_dh = AgreementKeyPair::generate(&mut OsRng);
    let identity = primary.state.keys.identity.as_ref().expect("the primary");
    let state = State::create(
        kv.clone(),
        NewDevice {
            relay: "tern://x@127.0.0.1:1".into(),
            identity_secret: &[],
            linked: Some(LinkedKeys {
                identity_key: identity.public(),
                identity_dh_signature: identity.certify_agreement_key(&identity_dh.public()),
                delivery_token: primary.state.keys.delivery_token,
                // Not checked by these rules.
                device_signature: [0; 64],
            }),
            device_secret: &rand::random(),
            identity_dh: &identity_dh,
            address: DeviceAddress {
                account: primary.account(),
                device: id(device),
            },
            relay_signing_key: relay_key().verifying_key().to_bytes(),
        },
        NOW,
        &mut OsRng,
    )
    .expect("create");
    Dev { state, kv }
}

/// Bob, who trusts Alice's identity (from her card).
fn bob_knowing(alice: &Dev) -> Dev {
    let mut bob = dev(2);
    bob.state
        .add_contact(alice.account(), alice.state.keys.identity_key, [5; 32])
        .expect("add");
    bob
}

fn version(d: &Dev, of: &AccountId) -> u64 {
    d.state.list_version(of)
}

#[test]
fn a_list_is_cached_and_an_older_one_refused() {
    let alice = dev(1);
    let mut a2 = linked(&alice, 2);
    let mut bob = bob_knowing(&alice);
    let (v2, s2) = signed(&alice, 2, vec![entry_of(&alice), entry_of(&a2)]);
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2], &v2, &s2, NOW)
        .expect("apply");
    assert_eq!(checked.refused, None);
    assert_eq!(checked.new, vec![1, 2]);
    assert_eq!(version(&bob, &alice.account()), 2);
    let (v1, s1) = signed(&alice, 1, vec![entry_of(&alice)]);
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2], &v1, &s1, NOW)
        .expect("apply");
    assert!(checked.refused.expect("refused").contains("older"));
    assert_eq!(version(&bob, &alice.account()), 2, "the cached list stays");
    // The linked device's bundle (its prekey signed by its device key) starts a
    // session under the cached list.
    let bundle = a2.bundle(false);
    assert!(bob
        .state
        .start_sessions(alice.account(), &[bundle], &mut OsRng)
        .is_ok());
    let c = bob.state.contact(&alice.account()).expect("contact");
    assert!(c.devices.iter().any(|d| d.device_id == 2));
    bob.reload(NOW);
    assert_eq!(version(&bob, &alice.account()), 2, "kept across restarts");
}

#[test]
fn a_list_under_another_key_is_refused() {
    let alice = dev(1);
    let mallory = dev(1);
    let mut bob = bob_knowing(&alice);
    let (list, sig) = signed(&mallory, 5, vec![entry_of(&alice)]);
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1], &list, &sig, NOW)
        .expect("apply");
    assert!(checked.refused.is_some(), "a bad signature");
    assert_eq!(version(&bob, &alice.account()), 0);
    // Tampered bytes under Alice's real signature: refused too.
    let (mut list, sig) = signed(&alice, 5, vec![entry_of(&alice)]);
    let last = list.len() - 1;
    list[last] ^= 1;
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1], &list, &sig, NOW)
        .expect("apply");
    assert!(checked.refused.is_some());
    assert_eq!(version(&bob, &alice.account()), 0);
}

#[test]
fn another_list_under_the_same_version_is_equivocation() {
    let alice = dev(1);
    let (a2, a3) = (linked(&alice, 2), linked(&alice, 3));
    let mut bob = bob_knowing(&alice);
    let (l, s) = signed(&alice, 3, vec![entry_of(&alice), entry_of(&a2)]);
    let first = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2, 3], &l, &s, NOW)
        .expect("apply");
    assert_eq!(first.refused, None);
    let (l, s) = signed(&alice, 3, vec![entry_of(&alice), entry_of(&a3)]);
    let second = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2, 3], &l, &s, NOW)
        .expect("apply");
    assert!(second.refused.expect("refused").contains("different list"));
    let c = bob.state.contact(&alice.account()).expect("contact");
    assert_eq!(
        DeviceList::parse(&c.device_list).expect("cached").entries[1].id,
        id(2),
        "the first list stays"
    );
}

#[test]
fn a_device_the_list_does_not_name_gets_nothing() {
    let alice = dev(1);
    let mut intruder = linked(&alice, 2);
    let mut bob = bob_knowing(&alice);
    let (l, s) = signed(&alice, 1, vec![entry_of(&alice)]);
    // The relay claims a device 2 the identity never listed.
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2], &l, &s, NOW)
        .expect("apply");
    assert_eq!(checked.new, vec![1], "list ∩ relay ids");
    let bundle = intruder.bundle(false);
    assert!(
        bob.state
            .start_sessions(alice.account(), &[bundle], &mut OsRng)
            .is_err(),
        "no session with an unlisted device"
    );
    assert!(bob
        .state
        .contact(&alice.account())
        .expect("contact")
        .devices
        .is_empty());
}

#[test]
fn a_bundle_must_match_its_list_entry() {
    let alice = dev(1);
    let a2 = linked(&alice, 2);
    let mut impostor = linked(&alice, 2);
    let mut bob = bob_knowing(&alice);
    let (l, s) = signed(&alice, 1, vec![entry_of(&alice), entry_of(&a2)]);
    bob.state
        .apply_device_list(&alice.account(), &[1, 2], &l, &s, NOW)
        .expect("apply");
    // Device 2's id, other keys (vouched for by the identity, but not in the list).
    let bundle = impostor.bundle(false);
    assert!(bob
        .state
        .start_sessions(alice.account(), &[bundle], &mut OsRng)
        .is_err());
}

#[test]
fn a_legacy_contact_keeps_identity_signed_bundles_and_no_downgrade_after_a_list() {
    let mut alice = dev(1);
    let mut a2 = linked(&alice, 2);
    let mut bob = bob_knowing(&alice);
    // Never a list: a device-signed bundle is refused, an identity-signed one works.
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2], &[], &[], NOW)
        .expect("apply");
    assert_eq!(checked.refused, None);
    let device_signed = a2.bundle(false);
    assert!(bob
        .state
        .start_sessions(alice.account(), &[device_signed], &mut OsRng)
        .is_err());
    let identity_signed = alice.bundle(false);
    assert!(bob
        .state
        .start_sessions(alice.account(), &[identity_signed], &mut OsRng)
        .is_ok());
    // Once a list was seen, the relay cannot fall back to "no list".
    let (l, s) = signed(&alice, 1, vec![entry_of(&alice)]);
    bob.state
        .apply_device_list(&alice.account(), &[1], &l, &s, NOW)
        .expect("apply");
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1, 2], &[], &[], NOW)
        .expect("apply");
    assert!(checked.refused.is_some(), "a downgrade is refused");
    assert_eq!(version(&bob, &alice.account()), 1);
    assert!(checked.new.is_empty(), "device 2 is still not listed");
}

#[test]
fn only_the_primary_signs_lists_and_versions_only_grow() {
    let mut alice = dev(1);
    let a2 = linked(&alice, 2);
    let (l1, s1) = alice.state.next_own_list(ListChange::Same).expect("v1");
    assert!(alice.state.store_own_list(&l1, &s1).expect("store"));
    let (l2, s2) = alice
        .state
        .next_own_list(ListChange::Add(entry_of(&a2)))
        .expect("v2");
    assert!(alice.state.store_own_list(&l2, &s2).expect("store"));
    assert!(!alice.state.store_own_list(&l1, &s1).expect("older"));
    assert_eq!(alice.state.own_list().expect("list").version, 2);
    assert!(alice.state.has_other_devices());
    let mut a2 = a2;
    assert!(matches!(
        a2.state.next_own_list(ListChange::Same),
        Err(crate::Error::NotPrimary)
    ));
    // The linked device takes the primary's list, under the account's identity.
    assert!(a2.state.store_own_list(&l2, &s2).expect("store"));
    let (forged, sig) = signed(&dev(1), 3, vec![entry_of(&alice)]);
    assert!(a2.state.store_own_list(&forged, &sig).is_err());
}

/// Alice's primary and linked device 2, each knowing the list that names both,
/// with a session from the primary to device 2.
fn alice_with_device_2() -> (Dev, Dev) {
    let mut alice = dev(1);
    let mut a2 = linked(&alice, 2);
    let (l, s) = alice
        .state
        .next_own_list(ListChange::Add(entry_of(&a2)))
        .expect("list");
    alice.state.store_own_list(&l, &s).expect("store");
    a2.state.store_own_list(&l, &s).expect("store");
    let bundle = a2.bundle(false);
    assert!(alice
        .state
        .start_sessions(alice.account(), &[bundle], &mut OsRng)
        .is_ok());
    (alice, a2)
}

/// Prepares outbox record `seq` of `from` and seals its copy for `to`.
fn deliver(from: &mut Dev, to: &Dev, seq: u64) -> Delivery {
    from.state.prepare(seq, NOW).expect("prepare");
    let record = from
        .state
        .outbox()
        .find(|(s, _)| **s == seq)
        .map(|(_, r)| r.clone())
        .expect("queued");
    let device = to.state.keys.address.device.get();
    let copy = record
        .copies
        .iter()
        .find(|c| c.device_id == device)
        .expect("a copy for the device");
    let cert = from.certificate(
        from.state.keys.address.device.get(),
        NOW + DAY,
        &relay_key(),
    );
    let payload = sealed::seal(
        &mut OsRng,
        &to.state.keys.identity_dh.public(),
        &cert,
        &copy.content,
    )
    .expect("seal");
    Delivery {
        seq,
        message_id: tern_proto::MessageId(record.message_id[..].try_into().expect("id")),
        payload: payload.into(),
        shared_body: None,
        accepted_at_ms: NOW,
        expires_at_ms: NOW + 30 * DAY,
    }
}

fn own_seqs(d: &Dev) -> Vec<u64> {
    let own = d.account();
    d.state
        .outbox()
        .filter(|(_, r)| r.recipient == own.as_bytes())
        .map(|(s, _)| *s)
        .collect()
}

#[test]
fn a_sent_message_shows_on_the_other_device_as_sent() {
    let (mut alice, mut a2) = alice_with_device_2();
    let bob = dev(2);
    let message_id = alice
        .state
        .enqueue(&bob.account(), b"hi bob", &[], NOW, &mut OsRng)
        .expect("enqueue");
    let seqs = own_seqs(&alice);
    assert_eq!(seqs.len(), 1, "one transcript for the other devices");
    let d = deliver(&mut alice, &a2, seqs[0]);
    assert_eq!(
        alice.state.mark_sent(seqs[0], &[2]).expect("sent"),
        None,
        "no Sent event for a sync message"
    );
    let Outcome::Message(m) = a2.receive(&d) else {
        panic!("not a message")
    };
    assert_eq!(m.sent_to, Some(bob.account()));
    assert_eq!(m.sender, alice.account());
    assert_eq!(m.body, b"hi bob");
    assert_eq!(m.message_id, message_id);
    assert!(matches!(a2.receive(&d), Outcome::Duplicate));
    // A message received is not "sent to" anyone.
    let mut bob = bob;
    let from_bob = bob.send(&mut alice, b"hello");
    let Outcome::Message(m) = alice.receive(&from_bob) else {
        panic!("not a message")
    };
    assert_eq!(m.sent_to, None);
}

#[test]
fn a_single_device_account_queues_no_sync() {
    let mut alice = dev(1);
    let bob = dev(2);
    alice
        .state
        .enqueue(&bob.account(), b"x", &[], NOW, &mut OsRng)
        .expect("enqueue");
    assert!(own_seqs(&alice).is_empty());
    assert_eq!(alice.state.outbox_len(), 1);
}

#[test]
fn a_sync_from_another_account_is_dropped() {
    let alice = dev(1);
    let mut bob = dev(2);
    let mut alice = alice;
    // Bob puts a contacts sync in a message to Alice.
    let d = bob.send(&mut alice, b"warm-up");
    assert!(matches!(alice.receive(&d), Outcome::Message(_)));
    bob.state
        .enqueue(&alice.account(), b"", &[], NOW, &mut OsRng)
        .expect("enqueue");
    let seq = *bob.state.outbox().last().expect("queued").0;
    let sync = e2e::SyncMessage {
        kind: Some(Kind::Contacts(e2e::ContactsSync {
            contacts: vec![e2e::LinkedContact {
                account_id: vec![9; 16].into(),
                identity_key: vec![9; 32].into(),
                delivery_token: vec![9; 32].into(),
            }],
        })),
    };
    let record = bob.state.outbox.get_mut(&seq).expect("record");
    record.sync = sync.encode_to_vec();
    // Encrypted again, now with the sync inside.
    record.prepared = false;
    record.copies.clear();
    let d = deliver(&mut bob, &alice, seq);
    let Outcome::Dropped(reason) = alice.receive(&d) else {
        panic!("not dropped")
    };
    assert_eq!(reason, "sync from another account");
    assert!(alice.state.contact(&AccountId([9; 16])).is_none());
}

#[test]
fn a_contact_added_on_one_device_reaches_the_other() {
    let (mut alice, mut a2) = alice_with_device_2();
    let carol = dev(3);
    alice
        .state
        .add_contact(carol.account(), carol.state.keys.identity_key, [7; 32])
        .expect("add");
    let sync = alice.state.contact_sync(&carol.account()).expect("sync");
    alice.state.sync_now(sync, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&alice).last().expect("queued");
    let d = deliver(&mut alice, &a2, seq);
    assert!(matches!(a2.receive(&d), Outcome::Synced(_)));
    let c = a2.state.contact(&carol.account()).expect("synced");
    assert_eq!(c.identity_key, carol.state.keys.identity_key.to_vec());
    assert_eq!(c.delivery_token, vec![7; 32]);
}

#[test]
fn only_the_primary_syncs_the_list_and_a_join_settles_its_link() {
    let (mut alice, mut a2) = alice_with_device_2();
    alice
        .state
        .add_pending_link(id(2), NOW + 1000)
        .expect("pending");
    assert_eq!(alice.state.expired_links(NOW + 1000), vec![id(2)]);
    // Device 2 says it joined; the primary settles the link.
    let own = a2.account();
    let a1_bundle: DeviceBundle = alice.bundle(false);
    assert!(a2
        .state
        .start_sessions(own, &[a1_bundle], &mut OsRng)
        .is_ok());
    let joined = Kind::Joined(e2e::DeviceJoined { device_id: 2 });
    a2.state.sync_now(joined, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&a2).last().expect("queued");
    let d = deliver(&mut a2, &alice, seq);
    let Outcome::Synced(events) = alice.receive(&d) else {
        panic!("not applied")
    };
    assert_eq!(
        events,
        vec![crate::client::Event::DeviceJoined { device: id(2) }]
    );
    assert!(alice.state.expired_links(NOW + 1000).is_empty());
    // A list from device 2 (not the primary) is refused.
    let (l, s) = (
        a2.state.local.device_list.clone(),
        a2.state.local.device_list_signature.clone(),
    );
    let list = Kind::DeviceList(e2e::DeviceListSync {
        device_list: l.into(),
        signature: s.into(),
    });
    a2.state.sync_now(list, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&a2).last().expect("queued");
    let d = deliver(&mut a2, &alice, seq);
    assert!(dropped(alice.receive(&d)));
}

#[test]
fn a_store_still_joining_holds_no_device_and_keeps_its_keys() {
    use crate::store::records::LocalRecord;
    use crate::store::{Batch, IdentityStore, KvStore};
    let kv = Arc::new(MemoryKv::new());
    let keys = crate::link::JoinKeys::generate();
    let mut batch = Batch::new();
    batch.put_local(&LocalRecord {
        relay: "tern://x@127.0.0.1:1".into(),
        joining: keys.to_bytes().to_vec(),
        ..LocalRecord::default()
    });
    batch.commit(&*kv, true).expect("store");
    let store: Arc<dyn KvStore> = kv.clone();
    assert!(State::load(store.clone(), NOW).expect("load").is_none());
    let local = store.local().expect("read").expect("a record");
    assert!(local.is_joining());
    let again = crate::link::JoinKeys::from_bytes(&local.joining).expect("keys");
    assert_eq!(again.slot_id(), keys.slot_id());
    assert_eq!(again.reader_hash(), keys.reader_hash());
}

#[test]
fn a_stale_list_makes_the_contact_due_at_once() {
    let alice = dev(1);
    let mut bob = bob_knowing(&alice);
    let bundle = {
        let mut alice = alice;
        alice.bundle(false)
    };
    let account = bundle_account(&bob);
    assert!(bob
        .state
        .start_sessions(account, &[bundle], &mut OsRng)
        .is_ok());
    bob.state
        .update_devices(&account, &[1], NOW)
        .expect("checked");
    assert_eq!(bob.state.devices_due(&account, NOW + 1), None);
    bob.state.check_list_now(&account).expect("due");
    assert_eq!(bob.state.devices_due(&account, NOW + 1), Some([5; 32]));
}

/// The one contact `bob_knowing` added.
fn bundle_account(bob: &Dev) -> AccountId {
    *bob.state.contacts.keys().next().expect("a contact")
}

#[test]
fn a_token_the_primary_rotated_reaches_the_other_devices_only_from_it() {
    let (mut alice, mut a2) = alice_with_device_2();
    alice
        .state
        .rotate_delivery_token(&mut OsRng)
        .expect("rotate");
    let token = alice.state.unpublished_token().expect("pending");
    alice.state.token_published(&token).expect("published");
    let sync = alice.state.own_token_sync();
    alice.state.sync_now(sync, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&alice).last().expect("queued");
    let d = deliver(&mut alice, &a2, seq);
    assert!(matches!(a2.receive(&d), Outcome::Synced(_)));
    assert_eq!(a2.state.keys.delivery_token, token);
    a2.reload(NOW);
    assert_eq!(a2.state.keys.delivery_token, token, "stored");
    // The same sync from device 2 changes nothing on the primary.
    let own = a2.account();
    let a1_bundle = alice.bundle(false);
    assert!(a2
        .state
        .start_sessions(own, &[a1_bundle], &mut OsRng)
        .is_ok());
    let forged = Kind::Contacts(e2e::ContactsSync {
        contacts: vec![e2e::LinkedContact {
            account_id: own.as_bytes().to_vec().into(),
            identity_key: alice.state.keys.identity_key.to_vec().into(),
            delivery_token: vec![1; 32].into(),
        }],
    });
    a2.state.sync_now(forged, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&a2).last().expect("queued");
    let d = deliver(&mut a2, &alice, seq);
    assert!(matches!(alice.receive(&d), Outcome::Synced(_)));
    assert_eq!(alice.state.keys.delivery_token, token);
}

#[test]
fn a_list_from_the_primary_tells_the_other_devices_who_left() {
    let (mut alice, mut a2) = alice_with_device_2();
    let a3 = linked(&alice, 3);
    let (l, s) = alice
        .state
        .next_own_list(ListChange::Add(entry_of(&a3)))
        .expect("v2");
    alice.state.store_own_list(&l, &s).expect("store");
    a2.state.store_own_list(&l, &s).expect("store");
    let (l, s) = alice
        .state
        .next_own_list(ListChange::Remove(id(3)))
        .expect("v3");
    alice.state.store_own_list(&l, &s).expect("store");
    let sync = Kind::DeviceList(e2e::DeviceListSync {
        device_list: l.into(),
        signature: s.to_vec().into(),
    });
    alice.state.sync_now(sync, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&alice).last().expect("queued");
    let d = deliver(&mut alice, &a2, seq);
    let Outcome::Synced(events) = a2.receive(&d) else {
        panic!("not applied")
    };
    assert_eq!(
        events,
        vec![crate::client::Event::DeviceRemoved { device: id(3) }]
    );
    assert_eq!(a2.state.own_list().expect("list").version, 3);
    assert_eq!(version(&a2, &a2.account()), 3, "sends use it too");
}

#[test]
fn an_accepted_identity_change_starts_the_list_afresh() {
    let alice = dev(1);
    let mut bob = bob_knowing(&alice);
    let (l, s) = signed(&alice, 7, vec![entry_of(&alice)]);
    bob.state
        .apply_device_list(&alice.account(), &[1], &l, &s, NOW)
        .expect("apply");
    // Alice reinstalls: a new identity, whose lists start at version 1.
    let reinstalled = dev(1);
    let new_key = reinstalled.state.keys.identity_key;
    bob.state
        .add_contact(alice.account(), new_key, [5; 32])
        .expect("a changed card");
    assert!(bob
        .state
        .accept_identity(&alice.account(), &new_key)
        .expect("accept"));
    assert_eq!(version(&bob, &alice.account()), 0);
    let (l, s) = signed(&reinstalled, 1, vec![entry_of(&reinstalled)]);
    let checked = bob
        .state
        .apply_device_list(&alice.account(), &[1], &l, &s, NOW)
        .expect("apply");
    assert_eq!(checked.refused, None);
    assert_eq!(version(&bob, &alice.account()), 1);
}

#[test]
fn a_joined_device_is_stored_whole_in_one_write_before_any_network_step() {
    use crate::store::KvStore;
    let mut alice = dev(1);
    let identity_dh = AgreementKeyPair::generate(&mut OsRng);
    let device_secret: [u8; 32] = rand::random();
    let device_key = crate::identity::DeviceKeyPair::from_secret(&device_secret).public();
    let (l, s) = alice
        .state
        .next_own_list(ListChange::Add(DeviceEntry {
            id: id(2),
            device_key,
            identity_dh: identity_dh.public(),
        }))
        .expect("list");
    let carol = dev(3);
    let contacts = vec![crate::link::LinkedContact {
        account: carol.account(),
        identity_key: carol.state.keys.identity_key,
        delivery_token: Some([7; 32]),
    }];
    let identity = alice.state.keys.identity.as_ref().expect("the primary");
    let kv: Arc<dyn KvStore> = Arc::new(MemoryKv::new());
    State::create_joined(
        kv.clone(),
        NewDevice {
            relay: "tern://x@127.0.0.1:1".into(),
            identity_secret: &[],
            linked: Some(LinkedKeys {
                identity_key: identity.public(),
                identity_dh_signature: identity.certify_agreement_key(&identity_dh.public()),
                delivery_token: alice.state.keys.delivery_token,
                device_signature: identity.certify_device(Some(&alice.account()), &device_key),
            }),
            device_secret: &device_secret,
            identity_dh: &identity_dh,
            address: DeviceAddress {
                account: alice.account(),
                device: id(2),
            },
            relay_signing_key: relay_key().verifying_key().to_bytes(),
        },
        &l,
        &s,
        &contacts,
        NOW,
        &mut OsRng,
    )
    .expect("stored");
    // What `Client::open` finds after a crash right after that write: the device,
    // its list, the payload's contacts, the `Joined` sync queued, keys still to publish.
    let mut a2 = State::load(kv, NOW).expect("load").expect("a device");
    let ids: Vec<DeviceId> = a2
        .own_list()
        .expect("the list")
        .entries
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![id(1), id(2)]);
    assert!(a2.contacts.contains_key(&carol.account()));
    let own = alice.account();
    assert_eq!(
        a2.outbox()
            .filter(|(_, r)| r.recipient == own.as_bytes())
            .count(),
        1
    );
    let upload = a2.key_upload(None, NOW, &mut OsRng).expect("upload");
    assert!(upload.is_some_and(|u| u.identity_dh.is_some()));
}

/// The worker removes expired links only once the mailbox is read (at `QueueEmpty`):
/// a `DeviceJoined` waiting there from before the deadline must then settle the link.
#[test]
fn a_join_read_after_the_deadline_still_settles_its_link() {
    let (mut alice, mut a2) = alice_with_device_2();
    let deadline = NOW + 1000;
    let later = deadline + 60 * 60 * 1000;
    alice
        .state
        .add_pending_link(id(2), deadline)
        .expect("pending");
    let own = a2.account();
    let a1_bundle: DeviceBundle = alice.bundle(false);
    assert!(a2
        .state
        .start_sessions(own, &[a1_bundle], &mut OsRng)
        .is_ok());
    let joined = Kind::Joined(e2e::DeviceJoined { device_id: 2 });
    a2.state.sync_now(joined, NOW, &mut OsRng).expect("queue");
    let seq = *own_seqs(&a2).last().expect("queued");
    let d = deliver(&mut a2, &alice, seq);
    // The primary was closed past the deadline: before reading, the link is expired.
    assert_eq!(alice.state.expired_links(later), vec![id(2)]);
    assert!(matches!(alice.receive(&d), Outcome::Synced(_)));
    assert!(alice.state.expired_links(later).is_empty());
}
