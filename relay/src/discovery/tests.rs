use std::net::IpAddr;
use std::sync::Arc;

use rand::SeedableRng;
use tern_platform::clock::ManualClock;
use tern_proto::discovery::{FilterDelta, FilterKey, FilterKind, FilterSnapshot};
use tern_proto::ErrorCode;
use voprf::{EvaluationElement, OprfClient, Ristretto255};

use super::*;
use crate::config::BucketRate;
use crate::store::Flush;
use crate::store::{AccountRecord, MemoryStore, SledStore};

const START: u64 = 20_000 * DAY_MS + 3_600_000;

struct Fx {
    discovery: Arc<Discovery>,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    _dir: tempfile::TempDir,
}

fn config() -> DiscoveryConfig {
    DiscoveryConfig::default()
}

fn fx_with(config: &DiscoveryConfig) -> Fx {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::new(START));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let oprf = Oprf::load_or_create(dir.path(), &mut rng).expect("key");
    let discovery = Discovery::new(
        oprf,
        store.clone(),
        store.clone(),
        clock.clone(),
        config,
        dir.path().join("discovery"),
    )
    .expect("service");
    Fx {
        discovery: Arc::new(discovery),
        clock,
        store,
        _dir: dir,
    }
}

fn fx() -> Fx {
    fx_with(&config())
}

fn account(n: u8) -> AccountId {
    AccountId([n; 16])
}

impl Fx {
    /// An account with a verified number.
    fn user(&self, n: u8, number: &str) -> AccountId {
        let a = account(n);
        self.store
            .create(
                &a,
                &AccountRecord {
                    identity_key: [n; 32],
                    devices: vec![],
                },
            )
            .expect("create");
        self.discovery
            .attach_verified(&a, number.as_bytes())
            .expect("attach");
        a
    }
}

fn prefix(last: u8) -> AddressPrefix {
    AddressPrefix::from(IpAddr::from([192, 0, 2, last]))
}

/// A client's blinded batch of `numbers`, padded with blinded dummies to a power of
/// two, and its states.
fn blind(numbers: &[&str], pad_to: usize) -> (BlindedBatch, Vec<OprfClient<Ristretto255>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut bytes = Vec::new();
    let mut states = Vec::new();
    for i in 0..pad_to {
        let input = numbers
            .get(i)
            .map_or(b"padding".to_vec(), |n| n.as_bytes().to_vec());
        let r = OprfClient::<Ristretto255>::blind(&input, &mut rng).expect("blind");
        bytes.extend_from_slice(&r.message.serialize());
        states.push(r.state);
    }
    (BlindedBatch::new(bytes.into()).expect("batch"), states)
}

/// Runs a future that needs no reactor (no group commit in these fixtures).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn code(e: &Error) -> ErrorCode {
    e.code()
}

#[test]
fn gcra_allows_a_burst_then_one_per_interval() {
    // Burst 3, one unit every 10 ms.
    let mut tat = None;
    for _ in 0..3 {
        tat = Some(gcra(tat, 0, 10, 3, 1).expect("within the burst"));
    }
    assert_eq!(gcra(tat, 0, 10, 3, 1), Err(10));
    assert_eq!(gcra(tat, 9, 10, 3, 1), Err(1));
    assert!(gcra(tat, 10, 10, 3, 1).is_ok());
    assert_eq!(
        gcra(None, 0, 10, 3, 4),
        Err(10),
        "more than the burst waits"
    );
    assert_eq!(
        gcra(Some(5), 1_000, 10, 3, 3),
        Ok(1_030),
        "an old TAT is full"
    );
}

#[tokio::test]
async fn a_verified_account_gets_the_oprf_of_its_numbers() {
    let f = fx();
    let alice = f.user(1, "+15550000001");
    let (batch, states) = blind(&["+15550000002", "+15550000003"], 2);
    let out = f
        .discovery
        .evaluate(&alice, prefix(1), &batch)
        .await
        .expect("evaluated");
    assert_eq!(out.len(), 64);
    for (i, number) in ["+15550000002", "+15550000003"].iter().enumerate() {
        let e = EvaluationElement::<Ristretto255>::deserialize(&out[32 * i..32 * (i + 1)])
            .expect("point");
        let output = states[i].finalize(number.as_bytes(), &e).expect("finalize");
        let mut o = [0u8; 64];
        o.copy_from_slice(&output);
        assert_eq!(
            split_output_of(&o),
            f.discovery.oprf().tag_of(number.as_bytes()).expect("tag"),
            "the client's output is the relay's own evaluation"
        );
    }
}

fn split_output_of(o: &[u8; 64]) -> (Tag, FilterKey) {
    tern_proto::discovery::split_output(o)
}

#[tokio::test]
async fn an_unverified_account_may_not_evaluate_nor_look_up() {
    let f = fx();
    let (batch, _) = blind(&["+15550000002"], 1);
    let e = f
        .discovery
        .evaluate(&account(9), prefix(1), &batch)
        .await
        .expect_err("not verified");
    assert_eq!(code(&e), ErrorCode::NotVerified);
    let e = f
        .discovery
        .lookup(&account(9), &[Tag([1; 16])])
        .expect_err("not verified");
    assert_eq!(code(&e), ErrorCode::NotVerified);
    let e = f
        .discovery
        .set_discoverable(&account(9), false)
        .await
        .expect_err("no tag");
    assert_eq!(code(&e), ErrorCode::NotVerified);
}

#[tokio::test]
async fn a_bad_point_is_a_typed_error_and_its_batch_is_charged_once() {
    let f = fx();
    let alice = f.user(1, "+15550000001");
    let (good, _) = blind(&["+15550000002", "+15550000003", "a", "b"], 4);
    let identity = [0u8; 32];
    let not_a_point = [0xffu8; 32];
    // 2^255 - 18 = p - 1 is not canonical... use p itself: non-canonical encoding of 0.
    let mut non_canonical = [0xffu8; 32];
    non_canonical[0] = 0xed;
    non_canonical[31] = 0x7f;
    for (index, bad) in [(0usize, identity), (2, not_a_point), (3, non_canonical)] {
        let mut bytes = good.as_bytes().to_vec();
        bytes[32 * index..32 * (index + 1)].copy_from_slice(&bad);
        let batch = BlindedBatch::new(bytes.into()).expect("length is fine");
        let e = f
            .discovery
            .evaluate(&alice, prefix(1), &batch)
            .await
            .expect_err("bad point");
        assert!(
            matches!(e, Error::Discovery(DiscoveryError::InvalidPoint { index: i }) if i == index),
            "{e:?}"
        );
        assert_eq!(code(&e), ErrorCode::BadRequest);
    }
    // Three batches of 4: the relay decoded nothing it was not paid for, and charged
    // each batch once.
    let interval = config().per_account.interval_ms();
    assert_eq!(
        f.store.bucket(&alice).expect("bucket"),
        Some(START + 12 * interval)
    );
    let tag = f.store.of_account(&alice).expect("tag").expect("some").0;
    assert_eq!(
        f.store.number_bucket(&tag).expect("bucket"),
        Some(START + 12 * interval)
    );
}

#[tokio::test]
async fn a_full_evaluation_queue_refuses_before_charging() {
    let mut c = config();
    c.max_concurrent_evaluations = 1;
    c.max_queued_evaluations = 1;
    let f = fx_with(&c);
    let alice = f.user(1, "+15550000001");
    // Hold the only permit: admitted batches wait.
    let permit = f
        .discovery
        .evaluations
        .clone()
        .acquire_owned()
        .await
        .expect("permit");
    let (batch, _) = blind(&[], 2);
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (d, b) = (f.discovery.clone(), batch.clone());
            tokio::spawn(async move { d.evaluate(&alice, prefix(1), &b).await })
        })
        .collect();
    for _ in 0..10_000 {
        if f.discovery.admitted.load(Ordering::Acquire) == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(f.discovery.admitted.load(Ordering::Acquire), 2);
    let charged = f.store.bucket(&alice).expect("bucket");
    let e = f
        .discovery
        .evaluate(&alice, prefix(1), &batch)
        .await
        .expect_err("queue full");
    assert!(
        matches!(e, Error::Discovery(DiscoveryError::Busy { .. })),
        "{e:?}"
    );
    assert_eq!(code(&e), ErrorCode::Unavailable);
    assert!(e.retry_after_ms() > 0);
    assert_eq!(
        f.store.bucket(&alice).expect("bucket"),
        charged,
        "the refused batch charged nothing"
    );
    drop(permit);
    for w in waiting {
        assert_eq!(w.await.expect("join").expect("evaluated").len(), 64);
    }
    assert_eq!(
        f.discovery.admitted.load(Ordering::Acquire),
        0,
        "places given back"
    );
    f.discovery
        .evaluate(&alice, prefix(1), &batch)
        .await
        .expect("room again");
}

/// A discovery service over a sled store in `dir` (opened again on each call), as
/// a relay started on that data directory has.
fn on_sled(
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    c: &DiscoveryConfig,
) -> (Arc<Discovery>, Arc<SledStore>) {
    let sled = Arc::new(SledStore::open(&dir.join("db"), 8 << 20).expect("open"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let d = Discovery::new(
        Oprf::load_or_create(dir, &mut rng).expect("key"),
        sled.clone(),
        sled.clone(),
        clock,
        c,
        dir.join("discovery"),
    )
    .expect("service");
    (Arc::new(d), sled)
}

fn create(store: &dyn AccountStore, a: &AccountId) {
    let rec = AccountRecord {
        identity_key: [7; 32],
        devices: vec![],
    };
    store.create(a, &rec).expect("create");
}

#[tokio::test]
async fn the_account_bucket_empties_refills_and_survives_in_the_store() {
    let mut c = config();
    c.per_account = BucketRate {
        burst: 4096,
        refill: "1/1m".parse().expect("rate"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &c);
    let alice = account(1);
    create(sled.as_ref(), &alice);
    d.attach_verified(&alice, b"+15550000001").expect("attach");
    struct F {
        discovery: Arc<Discovery>,
        clock: Arc<ManualClock>,
    }
    let (big, _) = blind(&[], 4096);
    d.evaluate(&alice, prefix(1), &big)
        .await
        .expect("one whole burst");
    // The relay stops and starts again on the same data directory.
    sled.flush().expect("flush");
    drop((d, sled));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &c);
    let f = F {
        discovery: d,
        clock,
    };
    let (one, _) = blind(&[], 1);
    let e = f
        .discovery
        .evaluate(&alice, prefix(1), &one)
        .await
        .expect_err("empty");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert_eq!(e.retry_after_ms(), 60_000);
    // Another address does not help: the bucket is the account's.
    let e = f
        .discovery
        .evaluate(&alice, prefix(2), &one)
        .await
        .expect_err("empty");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert!(
        sled.bucket(&alice).expect("bucket").is_some(),
        "kept in the store"
    );
    f.clock.advance(std::time::Duration::from_secs(60));
    f.discovery
        .evaluate(&alice, prefix(1), &one)
        .await
        .expect("refilled one");
}

#[tokio::test]
async fn the_prefix_bucket_limits_a_second_account_and_a_refusal_charges_no_account() {
    let mut c = config();
    c.per_prefix = BucketRate {
        burst: 4096,
        refill: "1/1m".parse().expect("rate"),
    };
    let f = fx_with(&c);
    let alice = f.user(1, "+15550000001");
    let bob = f.user(2, "+15550000002");
    let (big, _) = blind(&[], 4096);
    f.discovery
        .evaluate(&alice, prefix(1), &big)
        .await
        .expect("alice's burst");
    let (two, _) = blind(&[], 2);
    let e = f
        .discovery
        .evaluate(&bob, prefix(1), &two)
        .await
        .expect_err("same address");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert!(e.retry_after_ms() > 0);
    assert_eq!(
        f.store.bucket(&bob).expect("bucket"),
        None,
        "bob not charged"
    );
    f.discovery
        .evaluate(&bob, prefix(2), &two)
        .await
        .expect("another address is limited separately");
}

#[test]
fn lookups_find_only_discoverable_tags_and_are_limited() {
    let mut c = config();
    c.lookups_per_account = BucketRate {
        burst: 256,
        refill: "1/1m".parse().expect("rate"),
    };
    let f = fx_with(&c);
    let alice = f.user(1, "+15550000001");
    let bob = f.user(2, "+15550000002");
    let carol = f.user(3, "+15550000003");
    block_on(f.discovery.set_discoverable(&carol, false)).expect("hide");
    let tag = |n: &str| f.discovery.oprf().tag_of(n.as_bytes()).expect("tag").0;
    let asked = [
        tag("+15550000002"),
        tag("+15550000003"),
        tag("+15559999999"),
    ];
    let found = f.discovery.lookup(&alice, &asked).expect("lookup");
    assert_eq!(found.len(), 1, "carol is hidden, the third is no user");
    assert_eq!(
        (found[0].tag, found[0].account, found[0].identity_key),
        (asked[0], bob, [2; 32])
    );
    let many = vec![asked[0]; 253];
    f.discovery
        .lookup(&alice, &many)
        .expect("253 more: 256 in all");
    let e = f
        .discovery
        .lookup(&alice, &[asked[0]])
        .expect_err("limited");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    f.clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(
        f.discovery
            .lookup(&alice, &[asked[0]])
            .expect("refilled")
            .len(),
        1
    );
}

#[test]
fn a_moved_or_detached_number_is_gone_from_lookups_at_once() {
    let f = fx();
    let alice = f.user(1, "+15550000001");
    let bob = f.user(2, "+15550000002");
    let tag = f.discovery.oprf().tag_of(b"+15550000002").expect("tag").0;
    assert_eq!(f.discovery.lookup(&alice, &[tag]).expect("lookup").len(), 1);
    f.store.detach(&bob).expect("detach");
    assert!(f
        .discovery
        .lookup(&alice, &[tag])
        .expect("lookup")
        .is_empty());
    // Bob's old number verified by a new account moves the tag.
    let dave = account(4);
    let previous = f
        .discovery
        .attach_verified(&dave, b"+15550000001")
        .expect("attach");
    assert_eq!(previous, Some(alice));
}

#[test]
fn the_key_file_is_private_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let a = Oprf::load_or_create(dir.path(), &mut rng).expect("create");
    let b = Oprf::load_or_create(dir.path(), &mut rng).expect("load");
    assert_eq!(
        a.tag_of(b"+15550000001").expect("a"),
        b.tag_of(b"+15550000001").expect("b")
    );
    let path = dir.path().join(oprf::KEY_FILE);
    assert_eq!(std::fs::read(&path).expect("read").len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::write(&path, b"short").expect("write");
    assert!(Oprf::load_or_create(dir.path(), &mut rng).is_err());
    std::fs::write(&path, [0u8; 32]).expect("write");
    assert!(
        Oprf::load_or_create(dir.path(), &mut rng).is_err(),
        "zero key"
    );
    assert_eq!(format!("{a:?}"), "Oprf(..)");
}

/// `n` more discoverable tags, straight in the store: a snapshot large enough that
/// a few days' deltas are smaller than it (else it is served instead).
fn bulk(f: &Fx, n: u32) {
    for i in 0..n {
        let mut id = [0xb0; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        let (account, tag) = (AccountId(id), Tag(id));
        let rec = TagRecord {
            account,
            key: FilterKey(u64::from(i) << 20),
            discoverable: true,
            verified_at: 0,
        };
        f.store.attach(&account, &tag, &rec).expect("bulk");
    }
}

fn keys_of(f: &Fx) -> Vec<u64> {
    let mut k = f.store.discoverable_keys().expect("keys");
    k.sort_unstable();
    k
}

fn fetch_all(f: &Fx, since_day: u32) -> (FilterKind, u32, Vec<u8>) {
    let first = f
        .discovery
        .filter_part(prefix(1), since_day, 0, 0)
        .expect("part 0");
    let mut data = first.data.to_vec();
    for part in 1..first.parts {
        let p = f
            .discovery
            .filter_part(prefix(1), since_day, first.day, part)
            .expect("part");
        assert_eq!(
            (p.kind, p.day, p.parts),
            (first.kind, first.day, first.parts)
        );
        data.extend_from_slice(&p.data);
    }
    (first.kind, first.day, data)
}

#[test]
fn publication_across_days_gives_exact_deltas_and_a_snapshot() {
    let f = fx();
    let e = f
        .discovery
        .filter_part(prefix(1), 0, 0, 0)
        .expect_err("nothing yet");
    assert_eq!(code(&e), ErrorCode::Unavailable);
    assert_eq!(
        e.retry_after_ms(),
        60_000,
        "the publisher retries every minute"
    );
    let alice = f.user(1, "+15550000001");
    let bob = f.user(2, "+15550000002");
    bulk(&f, 100);
    f.discovery.republish().expect("day 0");
    let day0 = utc_day(START);
    let (kind, day, snap) = fetch_all(&f, 0);
    assert_eq!((kind, day), (FilterKind::Snapshot, day0));
    let snap = FilterSnapshot::decode(&snap).expect("decodes");
    for k in keys_of(&f) {
        assert!(snap.contains(FilterKey(k)));
    }
    let before = keys_of(&f);

    // Next day: bob hides, carol arrives, alice's account is deleted.
    f.clock.advance(std::time::Duration::from_millis(DAY_MS));
    block_on(f.discovery.set_discoverable(&bob, false)).expect("hide");
    f.user(3, "+15550000003");
    f.store.detach(&alice).expect("delete");
    f.discovery.republish().expect("day 1");
    let after = keys_of(&f);
    let (kind, day, data) = fetch_all(&f, day0);
    assert_eq!((kind, day), (FilterKind::Deltas, day0 + 1));
    let deltas = FilterDelta::decode_all(&data).expect("decodes");
    assert_eq!(
        deltas,
        vec![FilterDelta::between(day0, &before, day0 + 1, &after)]
    );
    assert_eq!(deltas[0].added.len(), 1);
    assert_eq!(deltas[0].removed.len(), 2, "hidden bob and deleted alice");

    // Up to date: no deltas; too old or unknown: the snapshot; a stale day: Gone.
    assert_eq!(fetch_all(&f, day0 + 1).2, Vec::<u8>::new());
    assert_eq!(fetch_all(&f, day0 - 5).0, FilterKind::Snapshot);
    let e = f
        .discovery
        .filter_part(prefix(1), 0, day0, 0)
        .expect_err("yesterday's");
    assert_eq!(code(&e), ErrorCode::NotFound);
    let e = f
        .discovery
        .filter_part(prefix(1), 0, 0, 7)
        .expect_err("no such part");
    assert_eq!(code(&e), ErrorCode::BadRequest);
    assert!(matches!(
        e,
        Error::Discovery(DiscoveryError::NoSuchPart { part: 7, parts: 1 })
    ));

    // A day the relay was down is spanned by one delta.
    f.clock
        .advance(std::time::Duration::from_millis(3 * DAY_MS));
    f.discovery.republish().expect("day 4");
    let (kind, day, data) = fetch_all(&f, day0);
    assert_eq!((kind, day), (FilterKind::Deltas, day0 + 4));
    assert_eq!(FilterDelta::decode_all(&data).expect("decodes").len(), 2);
}

#[test]
fn published_files_hold_no_tags_and_old_ones_are_pruned() {
    let mut c = config();
    c.keep_deltas = 2;
    let f = fx_with(&c);
    f.user(1, "+15550000001");
    for _ in 0..5 {
        f.discovery.republish().expect("publish");
        f.clock.advance(std::time::Duration::from_millis(DAY_MS));
    }
    let dir = f._dir.path().join("discovery");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    let d = utc_day(START);
    let want = [
        format!("delta-{}.td", d + 3),
        format!("delta-{}.td", d + 4),
        format!("keys-{}.bin", d + 3),
        format!("keys-{}.bin", d + 4),
        format!("snapshot-{}.tf", d + 3),
        format!("snapshot-{}.tf", d + 4),
    ];
    assert_eq!(names, want);
    let tag = f.discovery.oprf().tag_of(b"+15550000001").expect("tag").0;
    for n in names {
        let bytes = std::fs::read(dir.join(n)).expect("read");
        assert!(!bytes.windows(16).any(|w| w == tag.0), "no tag on disk");
        assert!(!bytes.windows(12).any(|w| w == &b"+15550000001"[..]));
    }
}

#[test]
fn a_large_snapshot_is_served_in_parts_that_fit_an_anonymous_frame() {
    let f = fx();
    for i in 0..120_000u32 {
        let rec = TagRecord {
            account: AccountId([0; 16]),
            key: FilterKey(u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            discoverable: true,
            verified_at: 0,
        };
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_le_bytes());
        let a = AccountId::try_from(&t[..]).expect("id");
        f.store
            .attach(&a, &Tag(t), &TagRecord { account: a, ..rec })
            .expect("attach");
    }
    f.discovery.republish().expect("publish");
    let first = f.discovery.filter_part(prefix(1), 0, 0, 0).expect("part");
    assert!(first.parts >= 3, "{} parts", first.parts);
    assert_eq!(first.data.len(), tern_proto::discovery::MAX_FILTER_PART);
    let (_, _, data) = fetch_all(&f, 0);
    let snap = FilterSnapshot::decode(&data).expect("whole");
    assert_eq!(snap.keys, 120_000);
}

#[test]
fn the_sled_store_serves_discovery_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = Arc::new(SledStore::open(&dir.path().join("db"), 8 << 20).expect("open"));
    let clock = Arc::new(ManualClock::new(START));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let d = Discovery::new(
        Oprf::load_or_create(dir.path(), &mut rng).expect("key"),
        sled.clone(),
        sled.clone(),
        clock,
        &config(),
        dir.path().join("discovery"),
    )
    .expect("service");
    d.attach_verified(&account(1), b"+15550000001")
        .expect("attach");
    d.republish().expect("publish");
    assert_eq!(d.published_day(), utc_day(START));
}

#[tokio::test]
async fn moving_the_number_to_a_fresh_account_does_not_refill_its_budget() {
    let mut c = config();
    c.per_account = BucketRate {
        burst: 4096,
        refill: "1/1m".parse().expect("rate"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &c);
    let (alice, fresh) = (account(1), account(2));
    create(sled.as_ref(), &alice);
    create(sled.as_ref(), &fresh);
    d.attach_verified(&alice, b"+15550000001").expect("attach");
    let (big, _) = blind(&[], 4096);
    d.evaluate(&alice, prefix(1), &big)
        .await
        .expect("the burst");
    // The number is verified again on a fresh account (and the relay restarts).
    assert_eq!(
        d.attach_verified(&fresh, b"+15550000001").expect("move"),
        Some(alice)
    );
    sled.flush().expect("flush");
    drop((d, sled));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &c);
    assert_eq!(
        sled.bucket(&fresh).expect("bucket"),
        None,
        "a fresh account"
    );
    let (one, _) = blind(&[], 1);
    let e = d
        .evaluate(&fresh, prefix(2), &one)
        .await
        .expect_err("the number's budget is spent");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert_eq!(e.retry_after_ms(), 60_000);
    // Deleting the account keeps the number's bucket (it names no account).
    sled.detach(&fresh).expect("detach");
    let tag = d.oprf().tag_of(b"+15550000001").expect("tag").0;
    assert!(sled.number_bucket(&tag).expect("bucket").is_some());
    clock.advance(std::time::Duration::from_secs(60));
    d.attach_verified(&fresh, b"+15550000001").expect("again");
    d.evaluate(&fresh, prefix(2), &one)
        .await
        .expect("refilled one");
}

#[test]
fn a_restart_during_the_day_serves_that_days_files_and_rebuilds_damaged_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &config());
    d.attach_verified(&account(1), b"+15550000001")
        .expect("attach");
    d.republish().expect("day 0");
    let first = d.filter_part(prefix(1), 0, 0, 0).expect("part");
    // Later the same day a number arrives, and the relay restarts.
    d.attach_verified(&account(2), b"+15550000002")
        .expect("attach");
    sled.flush().expect("flush");
    drop((d, sled));
    let (d, sled) = on_sled(dir.path(), clock.clone(), &config());
    let snapshot = dir
        .path()
        .join("discovery")
        .join(format!("snapshot-{}.tf", utc_day(START)));
    let written = std::fs::metadata(&snapshot)
        .expect("meta")
        .modified()
        .expect("mtime");
    d.republish().expect("reopened");
    assert_eq!(
        d.filter_part(prefix(1), 0, first.day, 0)
            .expect("same artefact"),
        first,
        "the day's files are served as they were"
    );
    assert_eq!(
        std::fs::metadata(&snapshot)
            .expect("meta")
            .modified()
            .expect("mtime"),
        written,
        "and not rewritten"
    );
    // A damaged snapshot is rebuilt from the store, with the new number.
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let last = bytes.len() - 1;
    bytes.truncate(last);
    std::fs::write(&snapshot, &bytes).expect("damage");
    drop((d, sled));
    let (d, _sled) = on_sled(dir.path(), clock, &config());
    d.republish().expect("rebuilt");
    let part = d.filter_part(prefix(1), 0, 0, 0).expect("part");
    let snap = FilterSnapshot::decode(&part.data).expect("whole");
    assert_eq!(snap.keys, 2);
    let (_, key) = d.oprf().tag_of(b"+15550000002").expect("tag");
    assert!(snap.contains(key));
}

#[test]
fn deltas_for_every_day_kept_share_one_chain() {
    let mut c = config();
    c.keep_deltas = 40;
    let f = fx_with(&c);
    f.user(1, "+15550000001");
    bulk(&f, 1000);
    let day0 = utc_day(START);
    for i in 0..30u8 {
        f.user(10 + i, &format!("+1555100{:04}", i));
        f.discovery.republish().expect("publish");
        f.clock.advance(std::time::Duration::from_millis(DAY_MS));
    }
    let published = f.discovery.published.read().expect("lock").clone();
    let chain = published.chain.len();
    let mut total = 0;
    for since in day0..day0 + 29 {
        let (kind, _, data) = fetch_all(&f, since);
        assert_eq!(kind, FilterKind::Deltas);
        assert_eq!(
            FilterDelta::decode_all(&data).expect("decodes").len() as u32,
            day0 + 29 - since
        );
        total += data.len();
    }
    assert!(total > chain, "many days were served");
    assert_eq!(
        f.discovery.published.read().expect("lock").chain.len(),
        chain,
        "from one chain, not one copy per day"
    );
}

#[test]
fn filter_parts_are_charged_to_the_address_prefix() {
    let mut c = config();
    c.filter_parts_per_prefix = "3/1m".parse().expect("rate");
    let f = fx_with(&c);
    f.user(1, "+15550000001");
    f.discovery.republish().expect("publish");
    for _ in 0..3 {
        f.discovery
            .filter_part(prefix(1), 0, 0, 0)
            .expect("within the burst");
    }
    let e = f
        .discovery
        .filter_part(prefix(1), 0, 0, 0)
        .expect_err("spent");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert_eq!(e.retry_after_ms(), 20_000);
    // A bad request counts too; another address is limited separately.
    let e = f
        .discovery
        .filter_part(prefix(1), 0, 0, 9)
        .expect_err("spent");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    f.discovery
        .filter_part(prefix(2), 0, 0, 0)
        .expect("another address");
    f.clock.advance(std::time::Duration::from_secs(20));
    f.discovery
        .filter_part(prefix(1), 0, 0, 0)
        .expect("refilled");
}

#[tokio::test]
async fn an_evaluation_is_answered_after_its_charge_is_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = Arc::new(SledStore::open(&dir.path().join("db"), 8 << 20).expect("open"));
    let stores = crate::store::Stores::split(Arc::new(MemoryStore::new()), sled.clone());
    let commit = Arc::new(
        GroupCommit::start(stores.flush.clone(), crate::store::Durability::Fsync).expect("start"),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let d = Discovery::new(
        Oprf::load_or_create(dir.path(), &mut rng).expect("key"),
        stores.discovery.clone(),
        stores.accounts.clone(),
        Arc::new(ManualClock::new(START)),
        &config(),
        dir.path().join("discovery"),
    )
    .expect("service")
    .with_commit(commit.clone());
    let alice = account(1);
    create(stores.accounts.as_ref(), &alice);
    d.attach_verified(&alice, b"+15550000001").expect("attach");
    let before = commit.flushes();
    let (batch, _) = blind(&[], 8);
    d.evaluate(&alice, prefix(1), &batch)
        .await
        .expect("evaluated");
    assert!(commit.flushes() > before, "the answer waited for a flush");
    assert!(sled.bucket(&alice).expect("bucket").is_some());
}

#[test]
fn seeding_a_stopped_relays_data_directory_attaches_and_republishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(START));
    let alice = account(1);
    let (d, sled) = on_sled(dir.path(), clock.clone(), &config());
    create(sled.as_ref(), &alice);
    d.republish().expect("today's files, without alice");
    sled.flush().expect("flush");
    drop((d, sled));

    let e = seed::attach_numbers(dir.path(), &[(alice, "15550000001")]).expect_err("not E.164");
    assert_eq!(code(&e), ErrorCode::BadRequest);
    let e = seed::attach_numbers(dir.path(), &[(account(9), "+15550000009")])
        .expect_err("no such account");
    assert_eq!(code(&e), ErrorCode::BadRequest);
    assert_eq!(
        seed::attach_numbers(dir.path(), &[(alice, "+15550000001")]).expect("seeded"),
        1
    );
    let numbers: Vec<String> = (0..500).map(|i| format!("+1555200{i:04}")).collect();
    let refs: Vec<&str> = numbers.iter().map(String::as_str).collect();
    let made = seed::synthetic_accounts(dir.path(), &refs, 7).expect("synthetic");
    assert_eq!(made.len(), 500);
    let e = seed::synthetic_accounts(dir.path(), &["+15559999999", "+15550000001"], 8)
        .expect_err("alice's number is held");
    assert_eq!(code(&e), ErrorCode::BadRequest);

    // The relay starts again: today's files are rebuilt with the seeded tags.
    let (d, sled) = on_sled(dir.path(), clock, &config());
    assert_eq!(sled.discoverable_keys().expect("keys").len(), 501);
    d.republish().expect("publish");
    let snap = FilterSnapshot::decode(&d.filter_part(prefix(1), 0, 0, 0).expect("part").data)
        .expect("whole");
    assert_eq!(snap.keys, 501);
    let tag = |n: &str| d.oprf().tag_of(n.as_bytes()).expect("tag");
    assert!(snap.contains(tag("+15550000001").1));
    let asked = [tag(&made[0].number).0, tag(&made[499].number).0];
    let found = d.lookup(&alice, &asked).expect("lookup");
    assert_eq!(
        found
            .iter()
            .map(|f| (f.account, f.identity_key))
            .collect::<Vec<_>>(),
        vec![
            (made[0].account, made[0].identity_key),
            (made[499].account, made[499].identity_key)
        ]
    );
    assert!(!dir.path().join("discovery").join("stale").exists());
}

#[tokio::test]
async fn the_discoverable_setting_is_limited_and_a_request_that_changes_nothing_is_free() {
    let mut c = config();
    c.settings_per_account = "2/1h".parse().expect("rate");
    let f = fx_with(&c);
    let alice = f.user(1, "+15550000001");
    let found = |f: &Fx| {
        f.store
            .of_account(&alice)
            .expect("of")
            .map(|(_, r)| r.discoverable)
    };
    for _ in 0..5 {
        f.discovery
            .set_discoverable(&alice, true)
            .await
            .expect("no change");
    }
    f.discovery
        .set_discoverable(&alice, false)
        .await
        .expect("hide");
    f.discovery
        .set_discoverable(&alice, true)
        .await
        .expect("show");
    assert_eq!(found(&f), Some(true));
    let e = f
        .discovery
        .set_discoverable(&alice, false)
        .await
        .expect_err("third change");
    assert_eq!(code(&e), ErrorCode::RateLimited);
    assert_eq!(found(&f), Some(true), "a refused change changes nothing");
    f.discovery
        .set_discoverable(&alice, true)
        .await
        .expect("no change, still free");
}

#[test]
fn housekeeping_sweeps_a_deleted_accounts_number_bucket() {
    let f = fx();
    let alice = f.user(1, "+15550000001");
    let (tag, _) = f.discovery.oprf().tag_of(b"+15550000001").expect("tag");
    let (batch, _) = blind(&["+15550000002"], 1);
    block_on(f.discovery.evaluate(&alice, prefix(1), &batch)).expect("charged");
    assert!(f.store.number_bucket(&tag).expect("nb").is_some());
    f.store.detach(&alice).expect("deleted");
    assert_eq!(f.discovery.housekeep().expect("sweep"), 0, "not refilled");
    assert!(f.store.number_bucket(&tag).expect("nb").is_some());
    f.clock.advance(std::time::Duration::from_millis(
        crate::store::DETACHED_NUMBER_RETENTION_MS,
    ));
    assert_eq!(f.discovery.housekeep().expect("sweep"), 1);
    assert_eq!(f.store.number_bucket(&tag).expect("nb"), None);
}

#[test]
fn a_missing_key_with_tags_in_the_store_or_a_readable_key_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let path = dir.path().join(oprf::KEY_FILE);
    let e = Oprf::open(dir.path(), true, &mut rng).expect_err("tags but no key");
    assert!(
        matches!(&e, Error::Discovery(DiscoveryError::KeyMissing { key }) if *key == path),
        "{e}"
    );
    assert!(e.to_string().contains("discovery-oprf-key"), "{e}");
    assert!(!path.exists(), "no new key was made");
    let a = Oprf::open(dir.path(), false, &mut rng).expect("no tags: a new key");
    let b = Oprf::open(dir.path(), true, &mut rng).expect("kept");
    assert_eq!(
        a.tag_of(b"+15550000001").expect("a"),
        b.tag_of(b"+15550000001").expect("b")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Oprf::open(dir.path(), true, &mut rng).expect_err("world-readable");
        assert!(
            matches!(
                e,
                Error::Discovery(DiscoveryError::KeyMode { mode: 0o644, .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Oprf::open(dir.path(), true, &mut rng).expect("0600 again");
    }
}

#[test]
fn deltas_larger_than_the_snapshot_are_answered_with_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    publish::publish_day(dir.path(), 10, (1..=1000).collect(), 30).expect("day 10");
    // Every key changes: the delta (2000 keys) is larger than the snapshot.
    let p = publish::publish_day(dir.path(), 11, (5000..6000).collect(), 30).expect("day 11");
    assert_eq!(p.part(10, 0, 0).expect("part").kind, FilterKind::Snapshot);
    // One key more: that delta is small, but the chain from day 10 is not.
    let p = publish::publish_day(dir.path(), 12, (5000..6001).collect(), 30).expect("day 12");
    let small = p.part(11, 0, 0).expect("part");
    assert_eq!(small.kind, FilterKind::Deltas);
    assert_eq!(
        FilterDelta::decode_all(&small.data).expect("delta").len(),
        1
    );
    assert_eq!(p.part(10, 0, 0).expect("part").kind, FilterKind::Snapshot);
}

#[test]
fn file_names_not_written_by_the_relay_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    for junk in [
        "keys-05.bin",
        "keys-+5.bin",
        "delta-007.td",
        "snapshot-08.tf",
    ] {
        std::fs::write(dir.path().join(junk), b"junk").expect("write");
    }
    for day in 10..14 {
        publish::publish_day(dir.path(), day, vec![1, 2, u64::from(day)], 1).expect("publish");
    }
    assert!(dir.path().join("keys-05.bin").exists());
    assert!(!dir.path().join("keys-10.bin").exists(), "pruned");
    assert!(dir.path().join("keys-13.bin").exists());
}

#[test]
fn a_days_files_that_cannot_be_read_are_not_rebuilt_under_the_same_day() {
    let f = fx();
    f.user(1, "+15550000001");
    f.discovery.republish().expect("day 0");
    let first = f.discovery.filter_part(prefix(1), 0, 0, 0).expect("part");
    f.user(2, "+15550000002");
    // Not missing, not damaged: unreadable (a directory where the file was).
    let snapshot = f
        .discovery
        .dir
        .join(format!("snapshot-{}.tf", utc_day(START)));
    std::fs::remove_file(&snapshot).expect("rm");
    std::fs::create_dir(&snapshot).expect("dir");
    assert!(publish::load_day(&f.discovery.dir, utc_day(START)).is_err());
    assert!(f.discovery.republish().is_err(), "the error is returned");
    assert_eq!(
        f.discovery.filter_part(prefix(1), 0, 0, 0).expect("part"),
        first,
        "and what was served stays"
    );
    assert!(snapshot.is_dir(), "nothing rewritten");
}
