//! Media on the shared stores of several relay nodes: the blob index in a real
//! PostgreSQL, bytes in a real S3-compatible server. Blob bytes are counted from the
//! index, and an expired blob's object is deleted through the `object_gc` queue, so a
//! crash between the record's deletion and the object's orphans nothing.

use std::time::Duration;

use tern_platform::clock::ManualClock;

use super::tests::{id_of, pattern, read_all, upload, ALICE, BOB};
use super::*;
use crate::store::pg::testdb;
use crate::store::pg::PgBackend;
use crate::store::StoreError;
use crate::testing::{TestPostgres, TestS3};

use crate::media::bytes::s3::TEST_PART as PART;
const TTL: Duration = Duration::from_secs(3600);

fn settings(s3: &TestS3) -> S3Settings {
    S3Settings::for_test(s3, Duration::from_secs(10))
}

/// One database, one bucket, and the clock every node reads.
struct Cluster {
    pg: Arc<TestPostgres>,
    opts: crate::store::pg::PgOptions,
    s3: TestS3,
    clock: Arc<ManualClock>,
}

struct Node {
    store: BlobStore,
    index: Arc<PgBackend>,
    budget: Arc<Budget>,
}

impl Cluster {
    fn new() -> Cluster {
        let (pg, opts) = testdb::db();
        Cluster {
            pg: Arc::new(pg),
            opts,
            s3: TestS3::start(),
            clock: Arc::new(ManualClock::new(1_800_000_000_000)),
        }
    }

    fn node(&self, name: &str) -> Node {
        let bytes = S3Bytes::open(&settings(&self.s3)).expect("client");
        self.node_on(name, Arc::new(bytes))
    }

    /// A node whose bytes go through `bytes`.
    fn node_on(&self, name: &str, bytes: Arc<dyn BlobBytes>) -> Node {
        let index = Arc::new(testdb::node(&self.opts, name));
        let budget = Arc::new(Budget::default());
        let limits = BlobLimits {
            ttl: TTL,
            ..BlobLimits::default()
        };
        let store = BlobStore::with_bytes(
            bytes,
            index.clone(),
            self.clock.clone(),
            limits,
            budget.clone(),
        )
        .expect("open");
        Node {
            store,
            index,
            budget,
        }
    }
}

#[test]
fn blob_bytes_are_counted_from_the_shared_index() {
    let c = Cluster::new();
    let a = c.node("a");
    let bytes = pattern(300_000);
    upload(&a.store, &ALICE, &bytes).expect("upload on a");
    upload(&a.store, &BOB, &pattern(1000)).expect("upload on a");
    // A node started later counts what the index records (no listing of the bucket).
    let b = c.node("b");
    assert_eq!(b.budget.blob_bytes(), 301_000);
    c.clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(a.store.sweep(100).expect("sweep").blobs, 2);
    // B did not sweep: its count follows the index at its next recount.
    assert_eq!(b.budget.blob_bytes(), 301_000);
    b.store.recount();
    assert_eq!(b.budget.blob_bytes(), 0);
    assert_eq!(a.budget.blob_bytes(), 0);
}

#[test]
fn an_expired_blob_loses_its_object_once_and_leaves_no_queue() {
    let c = Cluster::new();
    let a = c.node("a");
    let bytes = pattern(PART + 1000);
    let id = id_of(&bytes);
    upload(&a.store, &ALICE, &bytes).expect("upload");
    assert_eq!(c.s3.objects("blobs/").len(), 1);
    c.clock.advance(TTL + Duration::from_secs(1));
    let swept = a.store.sweep(100).expect("sweep");
    assert_eq!((swept.blobs, swept.objects), (1, 0));
    assert!(c.s3.files().is_empty(), "{:?}", c.s3.files());
    assert!(a.index.object_gc_pending(10).expect("queue").is_empty());
    assert!(a.store.status(&id).expect("status").is_none());
    assert_eq!(a.store.sweep(100).expect("again"), Swept::default());
}

#[test]
fn a_crash_between_the_record_and_the_object_orphans_nothing() {
    let c = Cluster::new();
    let a = c.node("a");
    let bytes = pattern(200_000);
    let id = id_of(&bytes);
    upload(&a.store, &ALICE, &bytes).expect("upload");
    // The sweeping node deleted the record and died before deleting the object.
    assert!(a.index.remove_blob(&id).expect("remove").is_some());
    assert_eq!(
        c.s3.objects("blobs/").len(),
        1,
        "the object outlived its record"
    );
    assert_eq!(a.index.object_gc_pending(10).expect("queue"), vec![id]);
    // The next sweep, on whichever node holds the lease, deletes it.
    let b = c.node("b");
    let swept = b.store.sweep(100).expect("sweep");
    assert_eq!((swept.blobs, swept.objects), (0, 1));
    assert!(c.s3.files().is_empty(), "{:?}", c.s3.files());
    assert!(b.index.object_gc_pending(10).expect("queue").is_empty());
}

#[test]
fn a_blob_uploaded_again_after_its_deletion_keeps_its_object() {
    let c = Cluster::new();
    let a = c.node("a");
    let b = c.node("b");
    let bytes = pattern(PART + 4321);
    let id = id_of(&bytes);
    upload(&a.store, &ALICE, &bytes).expect("upload");
    assert!(a.index.remove_blob(&id).expect("remove").is_some());
    // Uploaded again through B before any sweep deleted the object.
    upload(&b.store, &BOB, &bytes).expect("upload again");
    assert!(a.index.object_gc_pending(10).expect("queue").is_empty());
    assert_eq!(a.store.sweep(100).expect("sweep"), Swept::default());
    let mut r = a.store.open_read(&id, 0, 256 * 1024).expect("read on a");
    assert!(read_all(&mut r) == bytes, "the object is the new blob's");
    assert_eq!(c.s3.objects("blobs/").len(), 1);
    assert!(c.s3.objects("uploads/").is_empty());
}

#[test]
fn a_forward_on_another_node_after_the_sweep_listed_a_blob_keeps_it() {
    let c = Cluster::new();
    let a = c.node("a");
    let b = c.node("b");
    let bytes = pattern(50_000);
    let id = id_of(&bytes);
    upload(&a.store, &ALICE, &bytes).expect("upload");
    c.clock.advance(TTL + Duration::from_secs(1));
    let now = c.clock.now();
    // A's sweep listed it as expired; then B forwarded it.
    assert_eq!(a.index.expired_blobs(now, 10).expect("scan"), vec![id]);
    b.index
        .touch_blob(&id, now, now + 3_600_000)
        .expect("touch")
        .expect("there");
    assert_eq!(a.index.remove_expired_blob(&id, now).expect("remove"), None);
    assert!(a.index.object_gc_pending(10).expect("queue").is_empty());
    assert_eq!(a.store.sweep(100).expect("sweep"), Swept::default());
    assert!(b.store.status(&id).expect("status").is_some());
    assert_eq!(c.s3.objects("blobs/").len(), 1);
}

/// A step run once, from inside an object-store call.
type Hook = Mutex<Option<Box<dyn FnOnce() + Send>>>;

/// Object-store bytes that run a hook once after their first `keep_upload` (the
/// object is in place, the record not yet written) and once before their first
/// `remove_blob` (a sweep deleted the record, the object is still there).
struct Hooked {
    inner: S3Bytes,
    after_copy: Hook,
    before_delete: Hook,
}

fn run_hook(hook: &Hook) {
    if let Some(f) = lock(hook).take() {
        f();
    }
}

impl BlobBytes for Hooked {
    fn stored_bytes(&self) -> BlobResult<Option<u64>> {
        self.inner.stored_bytes()
    }
    fn blob_len(&self, id: &BlobId) -> BlobResult<Option<u64>> {
        self.inner.blob_len(id)
    }
    fn upload_len(&self, account: &AccountId, id: &BlobId) -> BlobResult<u64> {
        self.inner.upload_len(account, id)
    }
    fn discard_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        self.inner.discard_upload(account, id)
    }
    fn open_upload<'a>(
        &'a self,
        account: &AccountId,
        id: &BlobId,
    ) -> BlobResult<Box<dyn bytes::OpenUpload + 'a>> {
        self.inner.open_upload(account, id)
    }
    fn complete_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<[u8; 32]> {
        self.inner.complete_upload(account, id, size)
    }
    fn keep_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<()> {
        self.inner.keep_upload(account, id, size)?;
        run_hook(&self.after_copy);
        Ok(())
    }
    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        self.inner.remove_upload(account, id)
    }
    fn remove_blob(&self, id: &BlobId) -> BlobResult<()> {
        run_hook(&self.before_delete);
        self.inner.remove_blob(id)
    }
    fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> BlobResult<BlobReader> {
        self.inner.open_read(id, offset, size, chunk)
    }
}

impl Cluster {
    /// A node whose first finish runs `after_copy` once its object is in place, and
    /// whose first object deletion runs `before_delete` first.
    fn node_hooked(
        &self,
        name: &str,
        after_copy: Option<Box<dyn FnOnce() + Send>>,
        before_delete: Option<Box<dyn FnOnce() + Send>>,
    ) -> Node {
        let bytes = Hooked {
            inner: S3Bytes::open(&settings(&self.s3)).expect("client"),
            after_copy: Mutex::new(after_copy),
            before_delete: Mutex::new(before_delete),
        };
        self.node_on(name, Arc::new(bytes))
    }

    /// A node whose first finish loses the database after copying the object: the
    /// blob's record then fails to commit, as when the database dies between the
    /// copy and the record.
    fn node_killing_after_copy(&self, name: &str) -> Node {
        let pg = self.pg.clone();
        self.node_hooked(name, Some(Box::new(move || pg.kill())), None)
    }
}

/// Uploads `bytes` and finishes, returning the finish's answer.
fn upload_and_finish(store: &BlobStore, bytes: &[u8]) -> BlobResult<BlobMeta> {
    let id = id_of(bytes);
    let Begin::Upload { offset: 0, running } =
        store.begin(&ALICE, &id, bytes.len() as u64).expect("begin")
    else {
        panic!("a fresh upload")
    };
    store.append(&ALICE, &id, 0, bytes).expect("append");
    let answer = store.finish(&ALICE, &id);
    drop(running);
    answer
}

#[test]
fn a_finish_retried_after_the_database_failed_between_copy_and_record_succeeds() {
    let c = Cluster::new();
    let a = c.node_killing_after_copy("a");
    let bytes = pattern(PART + 777);
    let id = id_of(&bytes);
    let failed = upload_and_finish(&a.store, &bytes);
    assert!(
        matches!(failed, Err(BlobError::Store(StoreError::Unavailable(_)))),
        "{failed:?}"
    );
    c.pg.restart();
    assert_eq!(c.s3.objects("blobs/").len(), 1, "the object was copied");
    // A sweep before the retry leaves the object to it.
    assert_eq!(a.store.sweep(100).expect("sweep"), Swept::default());
    // The client's retry: the same finish, on this node or another.
    let b = c.node("b");
    let meta = b.store.finish(&ALICE, &id).expect("the retry succeeds");
    assert_eq!(meta.size, bytes.len() as u64);
    let mut r = a.store.open_read(&id, 0, 256 * 1024).expect("read");
    assert!(read_all(&mut r) == bytes);
    assert!(c.s3.objects("uploads/").is_empty(), "{:?}", c.s3.files());
    assert!(a.index.object_gc_pending(10).expect("queue").is_empty());
    assert_eq!(b.store.sweep(100).expect("sweep"), Swept::default());
    assert_eq!(c.s3.objects("blobs/").len(), 1);
    assert_eq!(
        b.index
            .upload(&ALICE.address().account, &id)
            .expect("upload"),
        None
    );
}

#[test]
fn an_object_whose_record_failed_and_was_never_retried_is_collected() {
    let c = Cluster::new();
    let mut a = c.node_killing_after_copy("a");
    a.store = a.store.with_orphan_grace(Duration::ZERO);
    let bytes = pattern(60_000);
    let id = id_of(&bytes);
    assert!(upload_and_finish(&a.store, &bytes).is_err());
    c.pg.restart();
    assert_eq!(c.s3.objects("blobs/").len(), 1);
    // Past the grace a retry would have had, the sweep deletes the object.
    let swept = a.store.sweep(100).expect("sweep");
    assert_eq!((swept.blobs, swept.objects), (0, 1));
    assert!(c.s3.objects("blobs/").is_empty(), "{:?}", c.s3.files());
    assert!(a.store.status(&id).expect("status").is_none());
    // The abandoned upload goes with its staging object in time, as any other.
    c.clock
        .advance(BlobLimits::default().abandon_after + Duration::from_secs(1));
    assert_eq!(a.store.sweep(100).expect("sweep").uploads, 1);
    assert!(c.s3.files().is_empty(), "{:?}", c.s3.files());
}

/// Begins and sends all of `device`'s upload of `bytes` on `store`, leaving the
/// finish to the caller.
fn send_upload(store: &BlobStore, device: &AuthenticatedDevice, bytes: &[u8]) -> RunningUpload {
    let id = id_of(bytes);
    let Begin::Upload { offset: 0, running } =
        store.begin(device, &id, bytes.len() as u64).expect("begin")
    else {
        panic!("a fresh upload")
    };
    store.append(device, &id, 0, bytes).expect("append");
    running
}

/// Whether `node` holds blob `id`'s record and its bytes, whole.
fn stored(node: &Node, id: &BlobId, bytes: &[u8]) -> bool {
    let recorded = node.index.blob(id).expect("record").is_some();
    match node.store.open_read(id, 0, 256 * 1024) {
        Ok(mut r) => recorded && read_all(&mut r) == bytes,
        Err(_) => false,
    }
}

#[test]
fn a_finish_during_a_sweeps_object_deletion_waits_and_then_stores_its_bytes() {
    let c = Cluster::new();
    let b = Arc::new(c.node("b"));
    let bytes = pattern(PART + 999);
    let id = id_of(&bytes);
    // Bob sends the same content as Alice through B (before either finishes).
    let running = send_upload(&b.store, &BOB, &bytes);
    // B's finish starts while A's sweep has deleted the record and not yet the
    // object; A goes on once B waits for the blob's lock (or, without one, is done).
    let finished = Arc::new(Mutex::new(None));
    let (b2, finished2, b_index) = (b.clone(), finished.clone(), b.index.clone());
    let during_delete = move || {
        let finish = std::thread::spawn(move || b2.store.finish(&BOB, &id));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
        while !finish.is_finished() && testdb::sql(&b_index, waiting)[0].get::<_, i64>(0) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "B neither waited nor finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        *lock(&finished2) = Some(finish);
    };
    let a = c.node_hooked("a", None, Some(Box::new(during_delete)));
    upload(&a.store, &ALICE, &bytes).expect("upload on a");
    c.clock.advance(TTL + Duration::from_secs(1));
    assert_eq!(a.store.sweep(100).expect("sweep").blobs, 1);
    let finish = lock(&finished).take().expect("the hook ran");
    let meta = finish.join().expect("finish").expect("B's finish succeeds");
    drop(running);
    assert_eq!(meta.size, bytes.len() as u64);
    assert!(
        stored(&a, &id, &bytes),
        "the record names bytes that are gone"
    );
    assert_eq!(c.s3.objects("blobs/").len(), 1);
    assert!(a.index.object_gc_pending(10).expect("queue").is_empty());
}

#[test]
fn a_sweep_during_a_finishs_copy_leaves_the_blob_to_it() {
    let c = Cluster::new();
    let a = Arc::new(c.node("a"));
    let bytes = pattern(70_000);
    let id = id_of(&bytes);
    // An expired record whose object is gone (a failed deletion): B's finish stores
    // the bytes again, and A's sweep runs between B's copy and B's record.
    upload(&a.store, &ALICE, &bytes).expect("upload on a");
    S3Bytes::open(&settings(&c.s3))
        .expect("client")
        .remove_blob(&id)
        .expect("delete");
    c.clock.advance(TTL + Duration::from_secs(1));
    let (a2, swept) = (a.clone(), Arc::new(Mutex::new(None)));
    let swept2 = swept.clone();
    let during_copy = move || *lock(&swept2) = Some(a2.store.sweep(100).expect("sweep"));
    let b = c.node_hooked("b", Some(Box::new(during_copy)), None);
    let running = send_upload(&b.store, &BOB, &bytes);
    let meta = b.store.finish(&BOB, &id).expect("finish");
    drop(running);
    assert_eq!(meta.size, bytes.len() as u64);
    // The blob was B's to decide on: A left its record and object alone.
    assert_eq!(lock(&swept).take().expect("the hook ran").blobs, 0);
    assert!(
        stored(&a, &id, &bytes),
        "the record names bytes that are gone"
    );
    assert_eq!(a.store.sweep(100).expect("sweep"), Swept::default());
    assert!(stored(&b, &id, &bytes));
}

#[test]
fn a_blobs_lock_is_one_holder_at_a_time_across_nodes() {
    let c = Cluster::new();
    let (a, b) = (c.node("a"), c.node("b"));
    let (id, other) = ([7u8; 32], [8u8; 32]);
    let mut inner = Vec::new();
    let held = a.index.with_blob_lock(&id, false, &mut || {
        // Another node neither takes it at once nor by waiting (past its deadline).
        let mut ran = false;
        inner.push(b.index.with_blob_lock(&id, false, &mut || ran = true));
        inner.push(b.index.with_blob_lock(&id, true, &mut || ran = true));
        assert!(!ran);
        // Another blob's lock is free.
        inner.push(b.index.with_blob_lock(&other, false, &mut || ran = true));
        assert!(ran);
    });
    assert!(held.expect("lock"));
    let inner: Vec<bool> = inner.into_iter().map(|r| r.expect("lock")).collect();
    assert_eq!(inner, [false, false, true]);
    // Released with its holder's transaction.
    assert!(b.index.with_blob_lock(&id, true, &mut || {}).expect("lock"));
}
