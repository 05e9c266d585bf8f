use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use tern_proto::device_list::{DeviceEntry, DeviceList};
use tern_proto::{AccountId, DeviceAddress, DeviceId, ErrorCode, SignedDeviceList};

use super::*;
use crate::config::RateLimitsConfig;
use crate::core::auth::AuthenticatedDevice;
use crate::deletion::tests::{fill, world, World};
use crate::store::{Published, Usage, DAY_MS};
use crate::testing::{device, identity_of, msgs};

/// The key of the device added with seed `n` (`Fixture::add_device(.., [n; 32])`
/// stores `[n; 32]` as the key; tests that authenticate use [`linked_key`]).
fn linked_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Adds a device whose signing key is [`linked_key`]`(n)` to `by`'s account (seed
/// `seed`) and authenticates it as a connection would.
async fn link(w: &World, by: &AuthenticatedDevice, seed: u8, n: u8) -> AuthenticatedDevice {
    let key = linked_key(n);
    let id =
        w.f.add_device(by, seed, key.verifying_key().to_bytes())
            .await
            .expect("add");
    auth_as(
        w,
        DeviceAddress {
            account: by.address().account,
            device: id,
        },
        &key,
    )
    .expect("auth")
}

fn auth_as(w: &World, at: DeviceAddress, key: &SigningKey) -> crate::Result<AuthenticatedDevice> {
    let exporter = [9u8; 32];
    let proof = key
        .sign(&tern_proto::auth::session_proof(&exporter))
        .to_bytes();
    w.f.services.accounts().authenticate(at, &exporter, &proof)
}

/// The account's record as a list of `version`, signed by identity `seed`, without
/// `without`.
fn signed_list(
    w: &World,
    account: &AccountId,
    seed: u8,
    version: u64,
    without: Option<DeviceId>,
) -> SignedDeviceList {
    let record = w.s().get(account).expect("get").expect("record");
    let entries = record
        .devices
        .iter()
        .filter(|(id, _)| Some(*id) != without)
        .map(|(id, key)| DeviceEntry {
            id: *id,
            device_key: *key,
            identity_dh: [id.get() as u8; 32],
        })
        .collect();
    sign(
        seed,
        DeviceList {
            account: *account,
            version,
            entries,
        },
    )
}

/// `list` signed by identity `seed`, as the request layer hands it over.
fn sign(seed: u8, list: DeviceList) -> SignedDeviceList {
    let bytes = list.encode().expect("a valid list");
    let signature = identity_of(seed).sign(&bytes).to_bytes();
    SignedDeviceList::parse(bytes.into(), &signature).expect("parses")
}

fn removal(w: &World, idle_days: u32) -> DeviceRemoval {
    DeviceRemoval::new(w.f.services.clone(), idle_days)
}

fn code(r: crate::Result<impl std::fmt::Debug>) -> ErrorCode {
    r.map_err(|e| e.code()).expect_err("refused")
}

/// Nothing of the device at `at` is left in the stores, and its account still is.
fn device_gone(w: &World, at: &DeviceAddress) {
    let s = w.s();
    let record = s.get(&at.account).expect("get").expect("the account stays");
    assert!(
        record.device_key(at.device).is_none(),
        "the device row is gone"
    );
    assert_eq!(s.usage(at).expect("usage"), Usage::default());
    assert!(s.read(at, 0, 10).expect("read").is_empty());
    assert_eq!(s.published(at).expect("keys"), Published::default());
    let packages = w.stores.key_packages.key_package_counts(at);
    assert_eq!(packages.expect("key packages"), Default::default());
    assert_eq!(w.stores.push.push_target(at).expect("push target"), None);
    assert!(w
        .stores
        .accounts
        .device_removals()
        .expect("intents")
        .is_empty());
}

#[tokio::test]
async fn the_primary_removes_a_linked_device_and_nothing_of_it_is_left() {
    let w = world();
    let (alice, bob) = fill(&w).await;
    let account = bob.address().account;
    let record = w.s().get(&account).expect("get").expect("bob");
    let second = DeviceAddress {
        account,
        device: record.devices[1].0,
    };
    assert_eq!(w.s().usage(&second).expect("usage").messages, 2);
    let held = w.stores.key_packages.key_package_counts(&second);
    assert_eq!(
        held.expect("key packages").one_time,
        2,
        "fill published some"
    );
    assert!(w.stores.push.push_target(&second).expect("read").is_some());
    let r = removal(&w, 45);

    let list = signed_list(&w, &account, 2, 1, Some(second.device));
    r.remove_signed(&bob, second.device, Some(&list))
        .await
        .expect("removed");
    device_gone(&w, &second);
    assert!(w.f.services.tombstones().contains_device(&second));
    let stored = w
        .stores
        .accounts
        .device_list(&account)
        .expect("list")
        .expect("stored");
    assert_eq!((stored.version, stored.list), (1, list.bytes.to_vec()));
    // Sends to it are refused; the primary keeps its messages.
    assert_eq!(
        code(w.f.send(&alice, second, &msgs(9..10, 8)).await),
        ErrorCode::UnknownRecipient
    );
    assert_eq!(w.s().usage(bob.address()).expect("usage").messages, 3);
    // Device 1 is never removed, and a removed device is unknown.
    let list = signed_list(&w, &account, 2, 2, None);
    assert_eq!(
        code(r.remove_signed(&bob, DeviceId::PRIMARY, Some(&list)).await),
        ErrorCode::BadRequest
    );
    let list = signed_list(&w, &account, 2, 2, None);
    assert_eq!(
        code(r.remove_signed(&bob, second.device, Some(&list)).await),
        ErrorCode::UnknownRecipient
    );
}

#[tokio::test]
async fn a_removed_device_can_no_longer_authenticate_nor_publish_keys() {
    let w = world();
    let alice = device(&w.f, 1).await;
    let laptop = link(&w, &alice, 1, 61).await;
    let at = *laptop.address();
    let r = removal(&w, 45);
    let list = signed_list(&w, &at.account, 1, 1, Some(at.device));
    r.remove_signed(&alice, at.device, Some(&list))
        .await
        .expect("removed");
    assert_eq!(
        code(auth_as(&w, at, &linked_key(61))),
        ErrorCode::Unauthorized
    );
    assert!(auth_as(&w, *alice.address(), &SigningKey::from_bytes(&[101; 32])).is_ok());
    // Its connection, were it still open, publishes nothing.
    let spk = [6u8; 32];
    let signature = linked_key(61).sign(&tern_proto::auth::signed_prekey(1, &spk));
    let upload = tern_proto::KeyUpload {
        signed_prekey: Some(tern_proto::SignedKey {
            id: 1,
            key: spk,
            signature: signature.to_bytes(),
        }),
        ..Default::default()
    };
    let published = w.f.services.keys().publish(&laptop, &upload).await;
    assert_eq!(code(published), ErrorCode::Unauthorized);
    assert_eq!(w.s().published(&at).expect("keys"), Published::default());
}

#[tokio::test]
async fn a_removal_needs_the_primary_a_newer_list_and_exactly_the_other_devices() {
    let w = world();
    let alice = device(&w.f, 1).await;
    let (laptop, tablet) = (link(&w, &alice, 1, 61).await, link(&w, &alice, 1, 62).await);
    let account = alice.address().account;
    let (l, t) = (laptop.address().device, tablet.address().device);
    let r = removal(&w, 45);
    let list = signed_list(&w, &account, 1, 5, Some(t));
    assert_eq!(
        code(r.remove_signed(&laptop, t, Some(&list)).await),
        ErrorCode::Unauthorized,
        "a linked device removes only itself"
    );
    let forged = SignedDeviceList {
        signature: identity_of(9).sign(&list.bytes).to_bytes(),
        ..list.clone()
    };
    assert_eq!(
        code(r.remove_signed(&alice, t, Some(&forged)).await),
        ErrorCode::Unauthorized,
        "signed by another identity"
    );
    let keeps = signed_list(&w, &account, 1, 5, None);
    assert_eq!(
        code(r.remove_signed(&alice, t, Some(&keeps)).await),
        ErrorCode::BadRequest,
        "the list still names the device"
    );
    // Without the laptop too: not the record without the tablet.
    let record = w.s().get(&account).expect("get").expect("alice");
    let primary = DeviceEntry {
        id: DeviceId::PRIMARY,
        device_key: record.devices[0].1,
        identity_dh: [1; 32],
    };
    let both = sign(
        1,
        DeviceList {
            account,
            version: 5,
            entries: vec![primary],
        },
    );
    assert_eq!(
        code(r.remove_signed(&alice, t, Some(&both)).await),
        ErrorCode::BadRequest
    );
    let list = signed_list(&w, &account, 1, 5, Some(t));
    r.remove_signed(&alice, t, Some(&list))
        .await
        .expect("removed");
    let older = signed_list(&w, &account, 1, 5, Some(l));
    assert_eq!(
        code(r.remove_signed(&alice, l, Some(&older)).await),
        ErrorCode::StaleDeviceList,
        "the version only grows"
    );
    // The laptop unlinks itself without a list; the stored list stays.
    r.remove_signed(&laptop, l, None)
        .await
        .expect("self-unlink");
    device_gone(&w, laptop.address());
    let stored = w
        .stores
        .accounts
        .device_list(&account)
        .expect("list")
        .expect("stored");
    assert_eq!(stored.version, 5);
}

#[tokio::test]
async fn idle_linked_devices_go_after_the_configured_days_and_the_primary_never() {
    let w = world();
    let day = Duration::from_millis(DAY_MS);
    // Far enough from day 0 that "45 days ago" is a day.
    w.f.clock.advance(day * 100);
    let alice = device(&w.f, 1).await;
    let laptop = link(&w, &alice, 1, 61).await;
    let tablet = link(&w, &alice, 1, 62).await;
    let r = removal(&w, 45);
    w.f.clock.advance(day * 44);
    // The tablet connects on day 44; the laptop and the primary never again.
    auth_as(&w, *tablet.address(), &linked_key(62)).expect("tablet");
    assert_eq!(r.remove_idle(100).await.expect("sweep"), 0, "44 days: kept");
    w.f.clock.advance(day * 2);
    assert_eq!(
        r.remove_idle(100).await.expect("sweep"),
        1,
        "46 days: the laptop"
    );
    device_gone(&w, laptop.address());
    let record = w
        .s()
        .get(&alice.address().account)
        .expect("get")
        .expect("alice");
    let ids: Vec<DeviceId> = record.devices.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![DeviceId::PRIMARY, tablet.address().device]);
    w.f.clock.advance(day * 400);
    assert_eq!(r.remove_idle(100).await.expect("sweep"), 1, "the tablet");
    let record = w
        .s()
        .get(&alice.address().account)
        .expect("get")
        .expect("alice");
    assert_eq!(record.devices.len(), 1, "device 1 never expires");
    assert_eq!(removal(&w, 0).remove_idle(100).await.expect("off"), 0);
}

#[tokio::test]
async fn a_removal_interrupted_after_its_intent_is_finished_at_start() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let record = w.s().get(&account).expect("get").expect("bob");
    let second = DeviceAddress {
        account,
        device: record.devices[1].0,
    };
    // What a crash after the intent and the first removal leaves.
    w.stores
        .accounts
        .put_device_removal(&second)
        .expect("intent");
    w.stores.keys.remove_device(&second).expect("keys");
    let fresh = removal(&w, 45);
    assert_eq!(fresh.resume().await.expect("resume"), 1);
    device_gone(&w, &second);
    assert!(w.f.services.tombstones().contains_device(&second));
    assert!(w
        .s()
        .get(&account)
        .expect("get")
        .expect("bob")
        .device_key(DeviceId::PRIMARY)
        .is_some());
    assert_eq!(fresh.resume().await.expect("again"), 0);
}

#[tokio::test]
async fn a_failed_removal_is_retried_by_the_sweep() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let record = w.s().get(&account).expect("get").expect("bob");
    let second = DeviceAddress {
        account,
        device: record.devices[1].0,
    };
    let r = removal(&w, 45);
    w.stores
        .accounts
        .put_device_removal(&second)
        .expect("intent");
    assert_eq!(
        r.sweep(8).await.expect("sweep"),
        Retried::default(),
        "nothing failed here"
    );
    r.failed.store(true, Ordering::Relaxed);
    assert_eq!(
        r.sweep(8).await.expect("sweep"),
        Retried {
            finished: 1,
            failed: 0
        }
    );
    device_gone(&w, &second);
}

#[tokio::test]
async fn the_default_cap_is_the_primary_and_five_linked_devices() {
    let w = world();
    assert_eq!(RateLimitsConfig::default().max_devices_per_account, 6);
    let alice = device(&w.f, 1).await;
    for n in 0..5 {
        w.f.add_device(&alice, 1, linked_key(60 + n).verifying_key().to_bytes())
            .await
            .expect("room");
        // The add rate (5 a day) is not what this test is about.
        w.f.clock.advance(Duration::from_millis(DAY_MS));
    }
    let sixth =
        w.f.add_device(&alice, 1, linked_key(70).verifying_key().to_bytes())
            .await;
    assert_eq!(code(sixth), ErrorCode::QuotaExceeded);
}
