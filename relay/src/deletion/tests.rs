use std::sync::Arc;

use ed25519_dalek::Signer;
use sha2::{Digest, Sha256};
use tern_proto::{AccountId, DeviceAddress, DeviceId, KeyUpload, SignedKey};

use super::*;
use crate::core::auth::{self, AuthenticatedDevice};
use crate::core::limits::Limits;
use crate::core::rate::AddressPrefix;
use crate::keys::Requester;
use crate::media::{Begin, BlobLimits};
use crate::store::{Published, Usage};
use crate::testing::{device, identity_of, msgs, Fixture};

pub(crate) const TOKEN: [u8; 32] = [3; 32];

pub(crate) struct World {
    pub(crate) f: Fixture,
    /// The stores under the services (memory, sled, or the log beside sled).
    pub(crate) stores: crate::store::Stores,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) deletion: AccountDeletion,
    pub(crate) _dir: tempfile::TempDir,
}

/// The backends the deletion rules run on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Memory,
    Sled,
    /// The mailbox log for mailboxes, sled for the rest (the relay's default).
    Log,
}

pub(crate) const BACKENDS: [Backend; 3] = [Backend::Memory, Backend::Sled, Backend::Log];

pub(crate) fn world() -> World {
    world_on(Backend::Memory)
}

pub(crate) fn world_on(backend: Backend) -> World {
    world_with(backend, |_| {})
}

/// [`world_on`], with the stores changed by `wrap` (to inject failures).
pub(crate) fn world_with(backend: Backend, wrap: impl FnOnce(&mut crate::store::Stores)) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = Arc::new(crate::store::MemoryStore::new());
    let sled =
        || Arc::new(crate::store::SledStore::open(&dir.path().join("db"), 8 << 20).expect("sled"));
    let stores = match backend {
        Backend::Memory => crate::store::Stores::all(memory.clone()),
        Backend::Sled => crate::store::Stores::all(sled()),
        Backend::Log => {
            let options = crate::store::LogOptions {
                background: false,
                now: 1_000_000,
                ..crate::store::LogOptions::default()
            };
            let log =
                crate::store::LogStore::open(&dir.path().join("mailboxes"), options).expect("log");
            crate::store::Stores::split(Arc::new(log), sled())
        }
    };
    let mut stores = stores;
    wrap(&mut stores);
    let f = crate::testing::fixture_on(stores.clone(), memory);
    let blobs = Arc::new(
        BlobStore::open(
            dir.path(),
            stores.blobs.clone(),
            f.clock.clone(),
            BlobLimits::default(),
            f.services.budget().clone(),
        )
        .expect("blobs"),
    );
    let deletion = AccountDeletion::new(f.services.clone(), blobs.clone());
    World {
        f,
        stores,
        blobs,
        deletion,
        _dir: dir,
    }
}

/// The stores' reads and writes the tests use, whatever the backend.
pub(crate) struct S<'a>(pub(crate) &'a crate::store::Stores);

#[allow(dead_code)]
impl S<'_> {
    pub(crate) fn get(&self, a: &AccountId) -> crate::store::StoreResult<Option<AccountRecord>> {
        self.0.accounts.get(a)
    }
    pub(crate) fn delivery_token(
        &self,
        a: &AccountId,
    ) -> crate::store::StoreResult<Option<[u8; 32]>> {
        self.0.accounts.delivery_token(a)
    }
    pub(crate) fn deletions(&self) -> crate::store::StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        self.0.accounts.deletions()
    }
    pub(crate) fn put_deletion(
        &self,
        a: &AccountId,
        d: &[DeviceId],
    ) -> crate::store::StoreResult<()> {
        self.0.accounts.put_deletion(a, d)
    }
    pub(crate) fn usage(&self, d: &DeviceAddress) -> crate::store::StoreResult<Usage> {
        self.0.mailboxes.usage(d)
    }
    pub(crate) fn read(
        &self,
        d: &DeviceAddress,
        after: u64,
        max: usize,
    ) -> crate::store::StoreResult<Vec<crate::store::StoredMessage>> {
        self.0.mailboxes.read(d, after, max)
    }
    pub(crate) fn published(&self, d: &DeviceAddress) -> crate::store::StoreResult<Published> {
        self.0.keys.published(d)
    }
    pub(crate) fn remove_device(&self, d: &DeviceAddress) -> crate::store::StoreResult<()> {
        self.0.keys.remove_device(d)
    }
    pub(crate) fn uploads_of(
        &self,
        a: &AccountId,
    ) -> crate::store::StoreResult<Vec<([u8; 32], u64)>> {
        self.0.blobs.uploads_of(a)
    }
    pub(crate) fn charges_of(&self, a: &AccountId) -> crate::store::StoreResult<Vec<(u64, u64)>> {
        self.0.blobs.charges_of(a)
    }
    pub(crate) fn blob(
        &self,
        id: &[u8; 32],
    ) -> crate::store::StoreResult<Option<crate::store::BlobMeta>> {
        self.0.blobs.blob(id)
    }
}

impl World {
    pub(crate) fn s(&self) -> S<'_> {
        S(&self.stores)
    }
}

async fn publish(f: &Fixture, dev: &AuthenticatedDevice, seed: u8) {
    let id = identity_of(seed);
    let (dh, spk) = ([5u8; 32], [6u8; 32]);
    let signed = |i: u32, key: [u8; 32], sig: ed25519_dalek::Signature| {
        Some(SignedKey {
            id: i,
            key,
            signature: sig.to_bytes(),
        })
    };
    let upload = KeyUpload {
        identity_dh: signed(
            0,
            dh,
            id.sign(&tern_proto::auth::identity_agreement_key(&dh)),
        ),
        signed_prekey: signed(1, spk, id.sign(&tern_proto::auth::signed_prekey(1, &spk))),
        one_time: (0..4).map(|i| (i, [i as u8; 32])).collect(),
    };
    f.services
        .keys()
        .publish(dev, &upload)
        .await
        .expect("publish");
}

/// Bob (seed 2) with a token, keys, two devices holding messages, a charge and an
/// unfinished upload; Alice (seed 1) sends to him.
pub(crate) async fn fill(w: &World) -> (AuthenticatedDevice, AuthenticatedDevice) {
    let f = &w.f;
    let (alice, bob) = (device(f, 1).await, device(f, 2).await);
    f.set_token(&bob, &TOKEN).await;
    let second = f
        .add_device(&bob, 2, [77; 32])
        .await
        .expect("second device");
    publish(f, &bob, 2).await;
    let bob2 = DeviceAddress {
        account: bob.address().account,
        device: second,
    };
    f.send(&alice, *bob.address(), &msgs(0..3, 8))
        .await
        .expect("send");
    f.send(&alice, bob2, &msgs(3..5, 8)).await.expect("send");
    // MLS key packages on both devices, a last resort on the second.
    let kp = |b: u8| bytes::Bytes::from(vec![b; 64]);
    for (at, last) in [(*bob.address(), None), (bob2, Some(kp(9)))] {
        (w.stores.key_packages)
            .publish_key_packages(&at, &[kp(1), kp(2)], last.as_ref(), false)
            .expect("key packages");
    }
    // A push target on the second device.
    let endpoint = "https://up.example/bob2".to_owned();
    (w.stores.push)
        .put_push_target(&bob2, &tern_proto::PushTarget::UnifiedPush { endpoint })
        .expect("push target");
    // A finished blob (a charge) and an unfinished upload.
    let done = b"a finished blob";
    let id: [u8; 32] = Sha256::digest(done).into();
    let Begin::Upload { offset, running } =
        w.blobs.begin(&bob, &id, done.len() as u64).expect("begin")
    else {
        panic!("new upload")
    };
    w.blobs.append(&bob, &id, offset, done).expect("append");
    w.blobs.finish(&bob, &id).expect("finish");
    drop(running);
    let part: [u8; 32] = Sha256::digest(b"half").into();
    let Begin::Upload { offset, running } = w.blobs.begin(&bob, &part, 100).expect("begin") else {
        panic!("new upload")
    };
    w.blobs
        .append(&bob, &part, offset, b"half")
        .expect("append");
    drop(running);
    (alice, bob)
}

fn verified(seed: u8, account: &AccountId) -> VerifiedDeletion {
    let exporter = [seed; 32];
    let sig = identity_of(seed)
        .sign(&tern_proto::auth::account_deletion(account, &exporter))
        .to_bytes();
    auth::verify_deletion(
        &identity_of(seed).verifying_key().to_bytes(),
        account,
        &exporter,
        &sig,
    )
    .expect("verified")
}

/// Every store's view of `account` is empty.
fn nothing_left(w: &World, account: &AccountId, devices: &[DeviceId]) {
    let s = w.s();
    assert_eq!(s.get(account).expect("get"), None);
    assert_eq!(s.delivery_token(account).expect("token"), None);
    assert!(s.deletions().expect("intents").is_empty());
    for &device in devices {
        let addr = DeviceAddress {
            account: *account,
            device,
        };
        assert_eq!(s.usage(&addr).expect("usage"), Usage::default());
        assert!(s.read(&addr, 0, 10).expect("read").is_empty());
        assert_eq!(s.published(&addr).expect("keys"), Published::default());
        let packages = w.stores.key_packages.key_package_counts(&addr);
        assert_eq!(packages.expect("key packages"), Default::default());
        assert_eq!(w.stores.push.push_target(&addr).expect("push target"), None);
    }
    assert!(s.uploads_of(account).expect("uploads").is_empty());
    assert!(s.charges_of(account).expect("charges").is_empty());
}

/// The (code, message) of an error, which a client sees.
fn seen<T: std::fmt::Debug>(r: crate::Result<T>) -> (tern_proto::ErrorCode, String) {
    let e = r.expect_err("refused");
    (e.code(), e.client_message())
}

#[tokio::test]
async fn a_deleted_account_leaves_nothing_and_answers_like_an_unknown_one() {
    for backend in BACKENDS {
        a_deleted_account_leaves_nothing_and_answers_like_an_unknown_one_on(backend).await;
    }
}

async fn a_deleted_account_leaves_nothing_and_answers_like_an_unknown_one_on(backend: Backend) {
    let w = world_on(backend);
    let (alice, bob) = fill(&w).await;
    let account = bob.address().account;
    let devices: Vec<DeviceId> = w
        .s()
        .get(&account)
        .expect("get")
        .expect("bob")
        .devices
        .iter()
        .map(|(id, _)| *id)
        .collect();
    let deleted = w
        .deletion
        .delete(DeletionAuthority::Account(verified(2, &account)))
        .await
        .expect("delete");
    assert_eq!(
        deleted,
        Deleted {
            devices: 2,
            messages: 5,
            uploads: 1
        }
    );
    nothing_left(&w, &account, &devices);
    let parts = std::fs::read_dir(w._dir.path().join("uploads"))
        .expect("uploads dir")
        .count();
    assert_eq!(parts, 0, "the unfinished upload's file is gone");

    // The finished blob names no one and stays until it expires.
    let done: [u8; 32] = Sha256::digest(b"a finished blob").into();
    assert!(w.s().blob(&done).expect("blob").is_some());

    let unknown = DeviceAddress {
        account: AccountId([0xee; 16]),
        device: DeviceId::PRIMARY,
    };
    let f = &w.f;
    let prefix = AddressPrefix::from(std::net::IpAddr::from([127, 0, 0, 1]));
    let send = |to| f.services.accounts().recipient(&alice, to).map(|_| ());
    assert_eq!(seen(send(*bob.address())), seen(send(unknown)));
    let sealed = |to| {
        f.services
            .accounts()
            .sealed_recipient(to, &TOKEN, prefix)
            .map(|_| ())
    };
    assert_eq!(seen(sealed(*bob.address())), seen(sealed(unknown)));
    let fetch = |a: &AccountId| f.services.keys().fetch(&alice, a, None).map(|_| ());
    assert_eq!(seen(fetch(&account)), seen(fetch(&unknown.account)));
    let fetch_token = |a: &AccountId| {
        f.services
            .keys()
            .fetch(
                Requester::Token {
                    token: &TOKEN,
                    device: None,
                    from: prefix,
                },
                a,
                None,
            )
            .map(|_| ())
    };
    assert_eq!(
        seen(fetch_token(&account)),
        seen(fetch_token(&unknown.account))
    );
    let list = |a: &AccountId| f.services.accounts().list_devices(a, &TOKEN);
    assert_eq!(seen(list(&account)), seen(list(&unknown.account)));
    let exporter = [2u8; 32];
    let proof = ed25519_dalek::SigningKey::from_bytes(&[102; 32])
        .sign(&tern_proto::auth::session_proof(&exporter))
        .to_bytes();
    let auth = |addr| f.services.accounts().authenticate(addr, &exporter, &proof);
    assert_eq!(seen(auth(*bob.address())), seen(auth(unknown)));

    // Deleting again: unknown, as for any id.
    let again = w
        .deletion
        .delete(DeletionAuthority::Operator(Operator::offline(), account))
        .await;
    assert!(matches!(again, Err(Error::UnknownRecipient)), "{again:?}");
    // Alice is untouched.
    assert!(w.s().get(&alice.address().account).expect("get").is_some());
}

#[tokio::test]
async fn a_send_resolved_before_the_deletion_cannot_queue_after_it() {
    for backend in BACKENDS {
        a_send_resolved_before_the_deletion_cannot_queue_after_it_on(backend).await;
    }
}

async fn a_send_resolved_before_the_deletion_cannot_queue_after_it_on(backend: Backend) {
    let w = world_on(backend);
    let (alice, bob) = fill(&w).await;
    let resolved =
        w.f.services
            .accounts()
            .recipient(&alice, *bob.address())
            .expect("resolved");
    w.deletion
        .delete(DeletionAuthority::Account(verified(
            2,
            &bob.address().account,
        )))
        .await
        .expect("delete");
    let late = w.f.services.mailboxes().append(&resolved, &msgs(9..10, 8));
    assert!(matches!(late, Err(Error::UnknownRecipient)), "{late:?}");
    assert_eq!(w.s().usage(bob.address()).expect("usage"), Usage::default());
}

#[tokio::test]
async fn a_deletion_interrupted_after_its_first_removal_is_finished_at_start() {
    for backend in BACKENDS {
        a_deletion_interrupted_after_its_first_removal_is_finished_at_start_on(backend).await;
    }
}

async fn a_deletion_interrupted_after_its_first_removal_is_finished_at_start_on(backend: Backend) {
    let w = world_on(backend);
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let s = w.s();
    let devices: Vec<DeviceId> = s
        .get(&account)
        .expect("get")
        .expect("bob")
        .devices
        .iter()
        .map(|(id, _)| *id)
        .collect();
    // What a crash after step 3's first removal leaves: the intent and one device's
    // keys gone, everything else still there.
    s.put_deletion(&account, &devices).expect("intent");
    s.remove_device(bob.address()).expect("keys");

    // A restart: fresh services over the same store, which resume first.
    let w2 = World {
        f: Fixture {
            services: w.f.services.clone(),
            clock: w.f.clock.clone(),
            store: w.f.store.clone(),
        },
        stores: w.stores.clone(),
        blobs: w.blobs.clone(),
        deletion: AccountDeletion::new(w.f.services.clone(), w.blobs.clone()),
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    assert_eq!(w2.deletion.resume().await.expect("resume"), 1);
    nothing_left(&w2, &account, &devices);
    assert!(w2.f.services.tombstones().contains(&account));
    assert_eq!(w2.deletion.resume().await.expect("nothing left"), 0);
}

#[tokio::test]
async fn a_signed_deletion_needs_the_identity_over_this_connection() {
    let w = world();
    let (alice, bob) = fill(&w).await;
    let account = bob.address().account;
    let exporter = [9u8; 32];
    let sign = |seed: u8, exporter: &[u8; 32]| {
        identity_of(seed)
            .sign(&tern_proto::auth::account_deletion(&account, exporter))
            .to_bytes()
    };
    let refused = |r: crate::Result<Deleted>| matches!(r, Err(Error::Unauthorized));
    // Another identity, another connection, Alice's device asking with Bob's signature.
    assert!(refused(
        w.deletion
            .delete_signed(&bob, &exporter, &sign(1, &exporter))
            .await
    ));
    assert!(refused(
        w.deletion
            .delete_signed(&bob, &[8; 32], &sign(2, &exporter))
            .await
    ));
    assert!(refused(
        w.deletion
            .delete_signed(&alice, &exporter, &sign(2, &exporter))
            .await
    ));
    assert!(
        w.s().get(&account).expect("get").is_some(),
        "nothing deleted yet"
    );

    let deleted = w
        .deletion
        .delete_signed(&bob, &exporter, &sign(2, &exporter))
        .await
        .expect("deleted");
    assert_eq!(deleted.devices, 2);
    assert!(w.s().get(&account).expect("get").is_none());
    // Once more, as a replay on the same connection would: the account is gone.
    assert!(refused(
        w.deletion
            .delete_signed(&bob, &exporter, &sign(2, &exporter))
            .await
    ));
}

#[tokio::test]
async fn a_verified_deletion_under_a_key_that_is_not_the_accounts_identity_deletes_nothing() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    // Alice's identity (seed 1) validly signed a deletion of Bob's account: the
    // signature checks out against the key it names, which is not Bob's.
    let forged = verified(1, &account);
    let refused = w.deletion.delete(DeletionAuthority::Account(forged)).await;
    assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
    assert!(w.s().get(&account).expect("get").is_some());
    assert!(
        !w.f.services.tombstones().contains(&account),
        "a refused deletion hides nothing"
    );
    assert!(w.s().deletions().expect("intents").is_empty());
    assert_eq!(w.s().usage(bob.address()).expect("usage").messages, 3);
}

#[tokio::test]
async fn a_deleted_accounts_devices_can_neither_send_nor_upload() {
    for backend in BACKENDS {
        a_deleted_accounts_devices_can_neither_send_nor_upload_on(backend).await;
    }
}

async fn a_deleted_accounts_devices_can_neither_send_nor_upload_on(backend: Backend) {
    let w = world_on(backend);
    let (alice, bob) = fill(&w).await;
    let before = w.s().usage(alice.address()).expect("usage");
    w.deletion
        .delete(DeletionAuthority::Operator(
            Operator::offline(),
            bob.address().account,
        ))
        .await
        .expect("delete");
    // Bob's connection, not yet closed, sends to Alice: refused, nothing queued.
    let sent = w.f.send(&bob, *alice.address(), &msgs(7..8, 8)).await;
    assert!(matches!(sent, Err(Error::Unauthorized)), "{sent:?}");
    assert_eq!(w.s().usage(alice.address()).expect("usage"), before);
    // Nor can it start, continue or finish an upload.
    let new: [u8; 32] = Sha256::digest(b"new").into();
    assert!(w.blobs.begin(&bob, &new, 3).is_err());
    let part: [u8; 32] = Sha256::digest(b"half").into();
    assert!(w.blobs.append(&bob, &part, 4, b"more").is_err());
    assert!(w.blobs.finish(&bob, &part).is_err());
    let account = bob.address().account;
    assert!(w.s().uploads_of(&account).expect("uploads").is_empty());
    let parts = std::fs::read_dir(w._dir.path().join("uploads"))
        .expect("uploads dir")
        .count();
    assert_eq!(parts, 0, "no .part file made again");
}

#[test]
fn a_deletion_waits_for_a_write_that_checked_the_account_and_later_ones_see_it() {
    let tombstones = Arc::new(Tombstones::default());
    let account = AccountId([5; 16]);
    let live = tombstones.live(&account).expect("not deleted");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let t = tombstones.clone();
    let deleting = std::thread::spawn(move || {
        t.insert(account);
        let _ = done_tx.send(());
    });
    // The write that checked the account is still running: the deletion cannot
    // have started its removals.
    assert!(done_rx
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_err());
    drop(live);
    done_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the deletion goes on once the write is done");
    deleting.join().expect("join");
    assert!(tombstones.live(&account).is_none());
    assert!(tombstones.live(&AccountId([6; 16])).is_some());
}

/// Records, at each flush, how many deletion intents the store holds.
struct Watching {
    store: Arc<crate::store::MemoryStore>,
    seen: std::sync::Mutex<Vec<usize>>,
}

impl crate::store::Flush for Watching {
    fn flush(&self) -> crate::store::StoreResult<()> {
        let n = self.store.deletions()?.len();
        self.seen.lock().expect("seen").push(n);
        Ok(())
    }
}

#[tokio::test]
async fn under_os_durability_the_intent_is_flushed_when_written_and_when_removed() {
    let store = Arc::new(crate::store::MemoryStore::new());
    let watching = Arc::new(Watching {
        store: store.clone(),
        seen: std::sync::Mutex::default(),
    });
    let mut stores = crate::store::Stores::all(store.clone());
    stores.flush = watching.clone();
    let clock = Arc::new(tern_platform::clock::ManualClock::new(1_000_000));
    let services = Arc::new(
        crate::server::Services::new(
            stores,
            clock.clone(),
            Limits::default(),
            crate::core::expiry::Ttl::new(std::time::Duration::from_secs(3600)).expect("ttl"),
            crate::store::Durability::Os,
            ed25519_dalek::SigningKey::from_bytes(&[42; 32]),
        )
        .expect("services"),
    );
    let f = Fixture {
        services: services.clone(),
        clock,
        store,
    };
    let bob = device(&f, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = Arc::new(
        BlobStore::open(
            dir.path(),
            f.store.clone(),
            f.clock.clone(),
            BlobLimits::default(),
            services.budget().clone(),
        )
        .expect("blobs"),
    );
    AccountDeletion::new(services, blobs)
        .delete(DeletionAuthority::Account(verified(
            2,
            &bob.address().account,
        )))
        .await
        .expect("delete");
    let seen = watching.seen.lock().expect("seen").clone();
    assert!(seen.contains(&1), "the intent made durable: {seen:?}");
    assert_eq!(seen.last(), Some(&0), "its removal made durable: {seen:?}");
}

#[tokio::test]
async fn a_deletion_that_failed_part_way_is_finished_by_a_later_sweep() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let s = w.s();
    let devices: Vec<DeviceId> = s
        .get(&account)
        .expect("get")
        .expect("bob")
        .devices
        .iter()
        .map(|(id, _)| *id)
        .collect();
    // What a deletion whose removals failed leaves in a running relay.
    w.f.services.tombstones().insert(account);
    s.put_deletion(&account, &devices).expect("intent");
    s.remove_device(bob.address()).expect("keys");
    // Nothing failed in this process yet: the sweep reads nothing.
    assert_eq!(
        w.deletion.sweep(8).await.expect("sweep"),
        Retried::default()
    );
    w.deletion
        .failed
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let retried = w.deletion.sweep(8).await.expect("sweep");
    assert_eq!(
        retried,
        Retried {
            finished: 1,
            failed: 0
        }
    );
    nothing_left(&w, &account, &devices);
    let again = w.deletion.retry_pending(8).await.expect("retry");
    assert_eq!(again, Retried::default());
}

#[tokio::test]
async fn a_deletion_detaches_the_accounts_discovery_tag_and_bucket() {
    use crate::store::TagRecord;
    use tern_proto::discovery::{FilterKey, Tag};
    for backend in BACKENDS {
        let w = world_on(backend);
        let (alice, bob) = fill(&w).await;
        let d = &w.stores.discovery;
        let tag = |a: &AuthenticatedDevice, n: u8| {
            let rec = TagRecord {
                account: a.address().account,
                key: FilterKey(u64::from(n)),
                discoverable: true,
                verified_at: 0,
            };
            d.attach(&a.address().account, &Tag([n; 16]), &rec)
                .expect("attach");
            d.set_buckets(
                &a.address().account,
                1_000 + u64::from(n),
                &Tag([100 + n; 16]),
                1_000 + u64::from(n),
            )
            .expect("bucket");
        };
        tag(&alice, 1);
        tag(&bob, 2);
        let account = bob.address().account;
        w.deletion
            .delete(DeletionAuthority::Operator(Operator::offline(), account))
            .await
            .expect("delete");
        assert_eq!(d.by_tag(&Tag([2; 16])).expect("by_tag"), None);
        assert_eq!(d.of_account(&account).expect("of_account"), None);
        assert_eq!(d.bucket(&account).expect("bucket"), None);
        assert_eq!(d.discoverable_keys().expect("keys"), vec![1], "{backend:?}");
        assert!(d.by_tag(&Tag([1; 16])).expect("by_tag").is_some());
    }
}

#[tokio::test]
async fn a_deletion_ends_the_accounts_open_phone_verification() {
    use crate::config::{VerificationConfig, VerifierKind};
    use crate::verification::{verifier_from_config, Verification};
    let w = world_on(Backend::Memory);
    let (alice, bob) = fill(&w).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let discovery = Arc::new(
        crate::discovery::Discovery::new(
            crate::discovery::Oprf::load_or_create(dir.path(), &mut rng).expect("key"),
            w.stores.discovery.clone(),
            w.stores.accounts.clone(),
            w.f.clock.clone(),
            &crate::config::DiscoveryConfig::default(),
            dir.path().join("discovery"),
        )
        .expect("discovery"),
    );
    let config = VerificationConfig {
        verifier: VerifierKind::DevFile,
        allow_dev_verifier: true,
        ..VerificationConfig::default()
    };
    let verifier = verifier_from_config(&config, dir.path()).expect("dev-file");
    let verification = Arc::new(Verification::new(
        &config,
        verifier,
        discovery,
        w.f.clock.clone(),
    ));
    let prefix = crate::core::prefix::AddressPrefix::from(std::net::IpAddr::from([127, 0, 0, 1]));
    for (dev, number) in [(&alice, "+15550100123"), (&bob, "+15550100124")] {
        let number = tern_proto::verification::E164::parse(number).expect("E.164");
        verification
            .start(&dev.address().account, prefix, number)
            .await
            .expect("start");
    }
    let deletion = AccountDeletion::new(w.f.services.clone(), w.blobs.clone())
        .with_verification(verification.clone());
    let account = bob.address().account;
    deletion
        .delete(DeletionAuthority::Operator(Operator::offline(), account))
        .await
        .expect("delete");
    assert!(
        verification.pending(&account).expect("pending").is_none(),
        "the session ended"
    );
    assert!(
        verification
            .pending(&alice.address().account)
            .expect("pending")
            .is_some(),
        "another account's session stays"
    );
    assert!(
        !verification.holds_start_limit(&account),
        "its start bucket is forgotten"
    );
    assert!(verification.holds_start_limit(&alice.address().account));
}

#[tokio::test]
async fn keys_of_a_device_no_record_or_intent_names_are_deleted_too() {
    for backend in BACKENDS {
        let w = world_on(backend);
        let (alice, bob) = fill(&w).await;
        let stray = |a: &AuthenticatedDevice| DeviceAddress {
            account: a.address().account,
            device: DeviceId::new(99).expect("id"),
        };
        let signed = tern_proto::SignedKey {
            id: 3,
            key: [3; 32],
            signature: [0; 64],
        };
        for a in [&alice, &bob] {
            w.stores
                .keys
                .publish(&stray(a), Some(&signed), Some(&signed), &[])
                .expect("publish");
        }
        w.deletion
            .delete(DeletionAuthority::Operator(
                Operator::offline(),
                bob.address().account,
            ))
            .await
            .expect("delete");
        let published = |a| w.stores.keys.published(&a).expect("published");
        assert_eq!(published(stray(&bob)), Published::default(), "{backend:?}");
        assert!(
            published(stray(&alice)).identity_dh,
            "another account's stay"
        );
    }
}

#[tokio::test]
async fn a_deletion_forgets_the_accounts_in_memory_rate_buckets() {
    let w = world();
    let (alice, bob) = fill(&w).await;
    let (a, b) = (alice.address().account, bob.address().account);
    let rates = w.f.services.rate_limits();
    // Bob added a device and uploaded; Alice sent.
    assert!(rates.holds_account(&b) && rates.holds_account(&a));
    assert!(w.blobs.upload_rate_holds(&b));
    w.deletion
        .delete(DeletionAuthority::Operator(Operator::offline(), b))
        .await
        .expect("delete");
    assert!(!rates.holds_account(&b), "rate limits");
    assert!(!w.blobs.upload_rate_holds(&b), "upload rate");
    assert!(rates.holds_account(&a), "another account's stay");
}

/// An account store whose intent writes fail while `fail_puts` is above 0, and
/// whose record reads fail as corrupt once `corrupt` is set; flushes fail while
/// `fail_flushes` is above 0.
struct Faulty {
    accounts: Arc<dyn AccountStore>,
    flush: Arc<dyn crate::store::Flush>,
    fail_puts: std::sync::atomic::AtomicU32,
    fail_flushes: std::sync::atomic::AtomicU32,
    corrupt: std::sync::atomic::AtomicBool,
}

impl Faulty {
    fn wrap(stores: &mut crate::store::Stores) -> Arc<Faulty> {
        let faulty = Arc::new(Faulty {
            accounts: stores.accounts.clone(),
            flush: stores.flush.clone(),
            fail_puts: 0.into(),
            fail_flushes: 0.into(),
            corrupt: false.into(),
        });
        stores.accounts = faulty.clone();
        stores.flush = faulty.clone();
        faulty
    }

    fn take(n: &std::sync::atomic::AtomicU32) -> bool {
        n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
    }

    fn corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }
}

fn disk_full() -> crate::store::StoreError {
    crate::store::StoreError::Backend("injected".into())
}

impl crate::store::Flush for Faulty {
    fn flush(&self) -> crate::store::StoreResult<()> {
        if Faulty::take(&self.fail_flushes) {
            return Err(disk_full());
        }
        self.flush.flush()
    }
}

impl AccountStore for Faulty {
    fn create_on(&self, id: &AccountId, r: &AccountRecord, day: Option<u32>) -> StoreResult<()> {
        self.accounts.create_on(id, r, day)
    }
    fn days(&self, id: &AccountId) -> StoreResult<Option<crate::store::AccountDays>> {
        self.accounts.days(id)
    }
    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        self.accounts.touch_device(of, day)
    }
    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        if self.corrupt() {
            return Err(crate::store::StoreError::Corrupt("account"));
        }
        self.accounts.get(id)
    }
    fn add_device(
        &self,
        id: &AccountId,
        key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        self.accounts.add_device(id, key, day)
    }
    fn set_delivery_token(&self, id: &AccountId, hash: &[u8; 32]) -> StoreResult<()> {
        self.accounts.set_delivery_token(id, hash)
    }
    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        self.accounts.delivery_token(id)
    }
    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        // Like sled: the record goes, then fails to decode.
        let removed = self.accounts.remove_account(id)?;
        if self.corrupt() && removed.is_some() {
            return Err(crate::store::StoreError::Corrupt("account"));
        }
        Ok(removed)
    }
    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        if Faulty::take(&self.fail_puts) {
            return Err(disk_full());
        }
        self.accounts.put_deletion(id, devices)
    }
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        self.accounts.deletions()
    }
    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.accounts.remove_deletion(id)
    }
    fn device_list(&self, id: &AccountId) -> StoreResult<Option<crate::store::StoredList>> {
        self.accounts.device_list(id)
    }
    fn put_device_list(&self, id: &AccountId, l: &crate::store::StoredList) -> StoreResult<bool> {
        self.accounts.put_device_list(id, l)
    }
    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        self.accounts.remove_device_record(of)
    }
    fn idle_devices(&self, before: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        self.accounts.idle_devices(before, max)
    }
    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.accounts.put_device_removal(of)
    }
    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        self.accounts.device_removals()
    }
    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.accounts.remove_device_removal(of)
    }
}

fn devices_of(w: &World, account: &AccountId) -> Vec<DeviceId> {
    let rec = w.s().get(account).expect("get").expect("record");
    rec.devices.iter().map(|(id, _)| *id).collect()
}

#[tokio::test]
async fn a_deletion_whose_intent_cannot_be_written_hides_nothing_and_can_be_asked_again() {
    let mut faulty = None;
    let w = world_with(Backend::Sled, |s| faulty = Some(Faulty::wrap(s)));
    let faulty = faulty.expect("wrapped");
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let devices = devices_of(&w, &account);
    faulty.fail_puts.store(1, Ordering::Relaxed);
    let authority = || DeletionAuthority::Operator(Operator::offline(), account);
    assert!(w.deletion.delete(authority()).await.is_err());
    // Not hidden: the account works and its owner may ask again.
    assert!(!w.f.services.tombstones().contains(&account));
    assert!(w.s().get(&account).expect("get").is_some());
    w.deletion.delete(authority()).await.expect("asked again");
    nothing_left(&w, &account, &devices);
}

#[tokio::test]
async fn a_deletion_whose_flush_fails_is_finished_by_the_sweeper() {
    for fails in [1, 2, 4] {
        let mut faulty = None;
        let w = world_with(Backend::Sled, |s| faulty = Some(Faulty::wrap(s)));
        let faulty = faulty.expect("wrapped");
        let (_, bob) = fill(&w).await;
        let account = bob.address().account;
        let devices = devices_of(&w, &account);
        faulty.fail_flushes.store(fails, Ordering::Relaxed);
        let authority = DeletionAuthority::Operator(Operator::offline(), account);
        assert!(w.deletion.delete(authority).await.is_err(), "{fails}");
        let mut finished = 0;
        for _ in 0..8 {
            finished += w.deletion.sweep(8).await.map_or(0, |r| r.finished);
            if finished > 0 {
                break;
            }
        }
        assert_eq!(finished, 1, "{fails}");
        nothing_left(&w, &account, &devices);
        assert!(w.f.services.tombstones().contains(&account));
    }
}

#[tokio::test]
async fn an_account_whose_record_is_corrupt_is_deleted_by_its_devices_found_otherwise() {
    for backend in BACKENDS {
        let mut faulty = None;
        let w = world_with(backend, |s| faulty = Some(Faulty::wrap(s)));
        let faulty = faulty.expect("wrapped");
        let (_, bob) = fill(&w).await;
        let account = bob.address().account;
        let devices = devices_of(&w, &account);
        faulty.corrupt.store(true, Ordering::Relaxed);
        let deleted = w
            .deletion
            .delete(DeletionAuthority::Operator(Operator::offline(), account))
            .await
            .expect("deleted though its record is unreadable");
        assert_eq!(deleted.messages, 5, "{backend:?}");
        faulty.corrupt.store(false, Ordering::Relaxed);
        nothing_left(&w, &account, &devices);
    }
}
