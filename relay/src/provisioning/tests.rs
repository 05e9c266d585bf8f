use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tern_platform::clock::Clock;
use tern_platform::clock::ManualClock;
use tern_proto::{AccountId, DeviceId, ErrorCode, SlotId};

use super::*;
use crate::config::RateLimitsConfig;
use crate::core::limits::Limits;
use crate::testing::{device, fixture, Fixture};

const READER: [u8; 32] = [7; 32];

fn reader_hash(secret: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn from(last: u8) -> AddressPrefix {
    AddressPrefix::from(std::net::IpAddr::from([10, 0, 0, last]))
}

/// The service over fresh memory slots and the fixture's accounts.
fn service(f: &Fixture, rates: &RateLimitsConfig) -> (Provisioning, Arc<ManualClock>) {
    let slots = Arc::new(crate::store::MemorySlots::new());
    let service = Provisioning::new(
        slots,
        f.services.stores().accounts.clone(),
        rates,
        f.clock.clone(),
    );
    (service, f.clock.clone())
}

/// A valid Ed25519 public key for a device added with seed `n`.
fn key(n: u8) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&[n; 32])
        .verifying_key()
        .to_bytes()
}

fn code(r: Result<impl std::fmt::Debug>) -> ErrorCode {
    r.map_err(|e| e.code()).expect_err("an error")
}

#[tokio::test]
async fn a_slot_is_deposited_once_and_taken_once_by_its_reader() {
    let f = fixture(Limits::default());
    let (p, clock) = service(&f, &RateLimitsConfig::default());
    let alice = device(&f, 1).await;
    let linked = f.add_device(&alice, 1, key(60)).await.expect("linked");
    let slot = SlotId([1; 16]);
    let expires = p.open(from(1), &slot, &reader_hash(&READER)).expect("open");
    assert_eq!(expires, clock.now() + 600_000, "ten minutes");
    assert_eq!(
        code(p.open(from(1), &slot, &reader_hash(&[8; 32]))),
        ErrorCode::BadRequest,
        "an open slot id is not opened again"
    );
    assert_eq!(
        p.take(from(1), &slot, &READER).expect("pending"),
        Vec::<u8>::new()
    );

    let payload = vec![5u8; 100];
    // A device id the caller's account does not have.
    let other = DeviceId::new(9).expect("id");
    assert_eq!(
        code(p.deposit(&alice, from(2), &slot, other, &payload)),
        ErrorCode::Unauthorized
    );
    p.deposit(&alice, from(2), &slot, linked, &payload)
        .expect("deposit");
    assert_eq!(
        code(p.deposit(&alice, from(2), &slot, linked, &payload)),
        ErrorCode::NotFound,
        "single use"
    );
    assert_eq!(
        code(p.take(from(1), &slot, &[8; 32])),
        ErrorCode::NotFound,
        "a wrong reader secret looks like no slot"
    );
    assert_eq!(p.take(from(1), &slot, &READER).expect("take"), payload);
    assert_eq!(
        code(p.take(from(1), &slot, &READER)),
        ErrorCode::NotFound,
        "taken once"
    );
    assert_eq!(
        code(p.take(from(1), &SlotId([2; 16]), &READER)),
        ErrorCode::NotFound,
        "unknown"
    );
}

#[tokio::test]
async fn a_deposit_needs_a_device_of_the_callers_own_account() {
    let f = fixture(Limits::default());
    let (p, _) = service(&f, &RateLimitsConfig::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let bobs = f.add_device(&bob, 2, key(61)).await.expect("bob's second");
    let slot = SlotId([3; 16]);
    p.open(from(1), &slot, &reader_hash(&READER)).expect("open");
    // Bob's second device is device 2; Alice's account has only device 1.
    assert_eq!(
        code(p.deposit(&alice, from(2), &slot, bobs, &[1; 64])),
        ErrorCode::Unauthorized
    );
    p.deposit(&bob, from(2), &slot, bobs, &[1; 64])
        .expect("Bob's own device");
    assert_eq!(p.take(from(1), &slot, &READER).expect("taken"), vec![1; 64]);
}

#[tokio::test]
async fn slots_expire_after_ten_minutes_and_the_sweep_deletes_them() {
    let f = fixture(Limits::default());
    let (p, clock) = service(&f, &RateLimitsConfig::default());
    let alice = device(&f, 1).await;
    let linked = f.add_device(&alice, 1, key(60)).await.expect("linked");
    p.open(from(1), &SlotId([1; 16]), &reader_hash(&READER))
        .expect("open");
    p.open(from(1), &SlotId([2; 16]), &reader_hash(&READER))
        .expect("open");
    p.deposit(&alice, from(2), &SlotId([2; 16]), linked, &[1; 64])
        .expect("deposit");
    clock.advance(PROVISIONING_TTL - Duration::from_secs(1));
    assert_eq!(
        p.take(from(1), &SlotId([1; 16]), &READER).expect("alive"),
        Vec::<u8>::new()
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        code(p.take(from(1), &SlotId([1; 16]), &READER)),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(p.deposit(&alice, from(2), &SlotId([1; 16]), linked, &[1; 64])),
        ErrorCode::NotFound,
        "an expired slot takes no deposit"
    );
    assert_eq!(p.sweep(10).expect("sweep"), 2, "both expired slots go");
    assert_eq!(p.sweep(10).expect("sweep"), 0);
}

#[tokio::test]
async fn opens_are_bounded_relay_wide_and_limited_per_prefix() {
    let f = fixture(Limits::default());
    let rates = RateLimitsConfig {
        max_provisioning_slots: 3,
        provisioning_per_prefix: "2/1h".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let (p, clock) = service(&f, &rates);
    let hash = reader_hash(&READER);
    p.open(from(1), &SlotId([1; 16]), &hash).expect("first");
    p.open(from(1), &SlotId([2; 16]), &hash).expect("second");
    assert_eq!(
        code(p.open(from(1), &SlotId([3; 16]), &hash)),
        ErrorCode::RateLimited
    );
    p.open(from(2), &SlotId([3; 16]), &hash)
        .expect("another prefix");
    assert_eq!(
        code(p.open(from(3), &SlotId([4; 16]), &hash)),
        ErrorCode::Unavailable,
        "the table is full"
    );
    clock.advance(PROVISIONING_TTL + Duration::from_secs(1));
    p.open(from(3), &SlotId([4; 16]), &hash)
        .expect("expired slots make room");
}

#[tokio::test]
async fn takes_are_limited_per_prefix() {
    let f = fixture(Limits::default());
    let rates = RateLimitsConfig {
        provisioning_takes_per_prefix: "3/1h".parse().expect("rate"),
        ..RateLimitsConfig::default()
    };
    let (p, _) = service(&f, &rates);
    p.open(from(1), &SlotId([1; 16]), &reader_hash(&READER))
        .expect("open");
    for _ in 0..3 {
        p.take(from(1), &SlotId([1; 16]), &READER).expect("pending");
    }
    assert_eq!(
        code(p.take(from(1), &SlotId([1; 16]), &READER)),
        ErrorCode::RateLimited
    );
    p.take(from(2), &SlotId([1; 16]), &READER)
        .expect("another prefix has its own");
}

#[tokio::test]
async fn payloads_are_bounded_and_a_deleted_accounts_slots_go() {
    let f = fixture(Limits::default());
    let (p, _) = service(&f, &RateLimitsConfig::default());
    let alice = device(&f, 1).await;
    let linked = f.add_device(&alice, 1, key(60)).await.expect("linked");
    p.open(from(1), &SlotId([1; 16]), &reader_hash(&READER))
        .expect("open");
    let big = vec![0u8; MAX_LINK_PAYLOAD + 1];
    assert_eq!(
        code(p.deposit(&alice, from(2), &SlotId([1; 16]), linked, &big)),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(p.deposit(&alice, from(2), &SlotId([1; 16]), linked, &[0; 47])),
        ErrorCode::BadRequest
    );
    let most = vec![0u8; MAX_LINK_PAYLOAD];
    p.deposit(&alice, from(2), &SlotId([1; 16]), linked, &most)
        .expect("the largest payload");
    p.forget_account(&AccountId(alice.address().account.0))
        .expect("forget");
    assert_eq!(
        code(p.take(from(1), &SlotId([1; 16]), &READER)),
        ErrorCode::NotFound
    );
}
