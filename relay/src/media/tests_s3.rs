//! The media rules with blob bytes in a real S3-compatible server (`s3s-fs`).

use std::time::{Duration, Instant};

use tern_platform::clock::ManualClock;

use super::tests::{id_of, pattern, read_all, upload, ALICE, BOB};
use super::*;
use crate::store::MemoryStore;
use crate::testing::TestS3;

/// S3's smallest part: tests cross part boundaries with few bytes.
use crate::media::bytes::s3::TEST_PART as PART;

fn settings(s3: &TestS3, timeout: Duration) -> S3Settings {
    S3Settings::for_test(s3, timeout)
}

struct Node {
    store: BlobStore,
    clock: Arc<ManualClock>,
}

/// A blob store over `s3` and `index` (a shared index stands for a shared database).
fn node(s3: &TestS3, index: Arc<dyn BlobIndex>, limits: BlobLimits) -> Node {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let bytes = S3Bytes::open(&settings(s3, Duration::from_secs(10))).expect("client");
    let store = BlobStore::with_bytes(
        Arc::new(bytes),
        index,
        clock.clone(),
        limits,
        Arc::default(),
    )
    .expect("open");
    Node { store, clock }
}

#[test]
fn s3_upload_download_repeat_and_forward_move_bytes_once() {
    let s3 = TestS3::start();
    let n = node(&s3, Arc::new(MemoryStore::new()), BlobLimits::default());
    // Two parts and a last piece, written in the relay's 1 MiB pieces.
    let bytes = pattern(2 * PART + 123_457);
    let id = id_of(&bytes);
    let Begin::Upload { offset: 0, running } = n
        .store
        .begin(&ALICE, &id, bytes.len() as u64)
        .expect("begin")
    else {
        panic!("fresh")
    };
    let mut at = 0;
    for piece in bytes.chunks(1 << 20) {
        at = n.store.append(&ALICE, &id, at, piece).expect("append");
    }
    let meta = n.store.finish(&ALICE, &id).expect("finish");
    drop(running);
    assert_eq!(meta.size, bytes.len() as u64);
    assert_eq!(
        s3.objects("blobs/"),
        vec![format!("blobs/{}", crate::media::bytes::hex(&id))]
    );
    assert!(s3.objects("uploads/").is_empty(), "staging deleted");
    // Bob uploads the same id and Alice forwards it: no bytes move.
    n.clock.advance(Duration::from_secs(60));
    let again = n.store.begin(&BOB, &id, bytes.len() as u64).expect("begin");
    assert!(matches!(again, Begin::Exists(m) if m.expires_at > meta.expires_at));
    n.store.touch(&id).expect("forward");
    assert_eq!(n.store.received_bytes(), bytes.len() as u64);
    assert_eq!(s3.objects("blobs/").len(), 1, "one object per blob");
    // Downloads, from the start and from an offset across a part boundary.
    let mut r = n.store.open_read(&id, 0, 256 * 1024).expect("read");
    assert_eq!(r.size(), bytes.len() as u64);
    assert!(read_all(&mut r) == bytes, "every byte back");
    let from = PART as u64 - 1000;
    let mut r = n.store.open_read(&id, from, 256 * 1024).expect("read");
    assert!(read_all(&mut r) == bytes[from as usize..], "from an offset");
    // A small blob is one put, no multipart upload.
    let small = b"small".to_vec();
    upload(&n.store, &ALICE, &small).expect("small");
    let mut r = n.store.open_read(&id_of(&small), 0, 1024).expect("read");
    assert_eq!(read_all(&mut r), small);
    assert_eq!(s3.objects("blobs/").len(), 2);
}

#[test]
fn s3_wrong_upload_is_refused_and_leaves_nothing() {
    let s3 = TestS3::start();
    let n = node(&s3, Arc::new(MemoryStore::new()), BlobLimits::default());
    for size in [5, PART + 10] {
        let claimed = id_of(b"what I say it is");
        let Begin::Upload { offset, running } =
            n.store.begin(&ALICE, &claimed, size as u64).expect("begin")
        else {
            panic!("new blob")
        };
        n.store
            .append(&ALICE, &claimed, offset, &pattern(size))
            .expect("append");
        assert!(matches!(
            n.store.finish(&ALICE, &claimed),
            Err(BlobError::DigestMismatch)
        ));
        drop(running);
        assert!(n.store.status(&claimed).expect("status").is_none());
        assert!(s3.files().is_empty(), "nothing behind: {:?}", s3.files());
    }
}

#[test]
fn s3_interrupted_upload_resumes_and_expiry_deletes_the_object() {
    let s3 = TestS3::start();
    let limits = BlobLimits {
        ttl: Duration::from_secs(3600),
        ..BlobLimits::default()
    };
    let n = node(&s3, Arc::new(MemoryStore::new()), limits);
    let bytes = pattern(PART + 200_000);
    let id = id_of(&bytes);
    let size = bytes.len() as u64;
    let Begin::Upload { offset: 0, running } = n.store.begin(&ALICE, &id, size).expect("begin")
    else {
        panic!("fresh")
    };
    n.store
        .append(&ALICE, &id, 0, &bytes[..PART + 70_000])
        .expect("some");
    drop(running); // the connection dropped
    let Begin::Upload {
        offset,
        running: _running,
    } = n.store.begin(&ALICE, &id, size).expect("again")
    else {
        panic!("resume")
    };
    assert_eq!(offset, PART as u64 + 70_000, "buffered bytes kept here");
    n.store
        .append(&ALICE, &id, offset, &bytes[offset as usize..])
        .expect("rest");
    n.store.finish(&ALICE, &id).expect("complete");
    assert_eq!(n.store.received_bytes(), size, "each byte once");
    assert_eq!(s3.objects("blobs/").len(), 1);
    n.clock.advance(Duration::from_secs(3601));
    assert_eq!(n.store.sweep(100).expect("sweep").blobs, 1);
    assert!(s3.files().is_empty(), "expiry deleted the object");
}

#[test]
fn resume_in_another_process() {
    let s3 = TestS3::start();
    // One index: the shared database of two relay nodes.
    let index: Arc<dyn BlobIndex> = Arc::new(MemoryStore::new());
    let a = node(&s3, index.clone(), BlobLimits::default());
    let b = node(&s3, index, BlobLimits::default());
    let bytes = pattern(2 * PART + (1 << 20));
    let id = id_of(&bytes);
    let size = bytes.len() as u64;
    let Begin::Upload { offset: 0, running } = a.store.begin(&ALICE, &id, size).expect("begin")
    else {
        panic!("fresh")
    };
    // Two parts committed, half a MiB only in A's memory.
    let sent = 2 * PART + (1 << 19);
    a.store
        .append(&ALICE, &id, 0, &bytes[..sent])
        .expect("through A");
    drop(running);
    let Begin::Upload {
        offset,
        running: _running,
    } = b.store.begin(&ALICE, &id, size).expect("on B")
    else {
        panic!("resume")
    };
    assert_eq!(
        offset,
        2 * PART as u64,
        "B resumes from the committed parts"
    );
    b.store
        .append(&ALICE, &id, offset, &bytes[offset as usize..])
        .expect("through B");
    b.store
        .finish(&ALICE, &id)
        .expect("B verifies by reading the object");
    let mut r = a.store.open_read(&id, 0, 256 * 1024).expect("read on A");
    assert!(read_all(&mut r) == bytes, "every byte back through A");
    assert_eq!(
        s3.objects("blobs/"),
        vec![format!("blobs/{}", crate::media::bytes::hex(&id))]
    );
    assert!(s3.objects("uploads/").is_empty());
}

#[test]
fn an_object_store_that_is_down_is_unavailable_within_the_deadline() {
    let mut s3 = TestS3::start();
    let index: Arc<dyn BlobIndex> = Arc::new(MemoryStore::new());
    let n = node(&s3, index.clone(), BlobLimits::default());
    let bytes = b"stored before".to_vec();
    upload(&n.store, &ALICE, &bytes).expect("upload");
    s3.kill();
    let timeout = Duration::from_secs(2);
    let bytes_client = S3Bytes::open(&settings(&s3, timeout)).expect("client");
    let t = Instant::now();
    let e = bytes_client.has_blob(&id_of(&bytes)).expect_err("down");
    assert!(matches!(e, BlobError::Unavailable(_)), "{e:?}");
    assert!(
        t.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    // Through the rules too, and clients see UNAVAILABLE.
    let t = Instant::now();
    let e = n.store.begin(&ALICE, &id_of(b"new"), 3).expect_err("down");
    assert!(t.elapsed() < Duration::from_secs(11), "{:?}", t.elapsed());
    assert_eq!(
        crate::error::Error::from(e).code(),
        tern_proto::ErrorCode::Unavailable
    );
    let e = n
        .store
        .open_read(&id_of(&bytes), 0, 1024)
        .expect_err("down");
    assert!(matches!(e, BlobError::Unavailable(_)), "{e:?}");
}

#[test]
fn an_idle_buffer_is_dropped_and_its_bytes_sent_again() {
    let s3 = TestS3::start();
    let bytes_client = S3Bytes::open(&settings(&s3, Duration::from_secs(10)))
        .expect("client")
        .with_idle(Duration::ZERO);
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let store = BlobStore::with_bytes(
        Arc::new(bytes_client),
        Arc::new(MemoryStore::new()),
        clock,
        BlobLimits::default(),
        Arc::default(),
    )
    .expect("open");
    let bytes = pattern(PART + 200_000);
    let id = id_of(&bytes);
    let size = bytes.len() as u64;
    let Begin::Upload { running, .. } = store.begin(&ALICE, &id, size).expect("begin") else {
        panic!("fresh")
    };
    store
        .append(&ALICE, &id, 0, &bytes[..PART + 70_000])
        .expect("some");
    drop(running);
    // Another upload's step drops the idle buffer.
    let other = b"other".to_vec();
    upload(&store, &BOB, &other).expect("other");
    let Begin::Upload {
        offset,
        running: _running,
    } = store.begin(&ALICE, &id, size).expect("again")
    else {
        panic!("resume")
    };
    assert_eq!(offset, PART as u64, "only the committed part is kept");
    store
        .append(&ALICE, &id, offset, &bytes[offset as usize..])
        .expect("rest");
    store
        .finish(&ALICE, &id)
        .expect("verified by reading the object");
    let mut r = store.open_read(&id, 0, 256 * 1024).expect("read");
    assert!(read_all(&mut r) == bytes);
}

#[test]
fn upload_buffers_are_capped_per_node_and_a_full_node_asks_to_retry() {
    let s3 = TestS3::start();
    let mut settings = settings(&s3, Duration::from_secs(10));
    // Room for two part buffers on this node.
    settings.buffer_bytes = 2 * PART as u64;
    let bytes_client = S3Bytes::open(&settings).expect("client");
    let store = BlobStore::with_bytes(
        Arc::new(bytes_client),
        Arc::new(MemoryStore::new()),
        Arc::new(ManualClock::new(1_800_000_000_000)),
        BlobLimits::default(),
        Arc::default(),
    )
    .expect("open");
    let blobs: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            let mut b = pattern(PART + 1000);
            b[0] = i;
            b
        })
        .collect();
    let ids: Vec<BlobId> = blobs.iter().map(|b| id_of(b)).collect();
    let devices = [&*ALICE, &*BOB, &*ALICE];
    let mut running = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let Begin::Upload {
            offset: 0,
            running: r,
        } = store
            .begin(devices[i], &ids[i], b.len() as u64)
            .expect("begin")
        else {
            panic!("fresh")
        };
        running.push(r);
    }
    // Two uploads hold a part buffer each; the third is refused, with retry advice.
    store
        .append(devices[0], &ids[0], 0, &blobs[0][..1 << 20])
        .expect("first");
    store
        .append(devices[1], &ids[1], 0, &blobs[1][..1 << 20])
        .expect("second");
    let e = store
        .append(devices[2], &ids[2], 0, &blobs[2][..1 << 20])
        .expect_err("the node's buffers are full");
    assert!(matches!(e, BlobError::Busy { .. }), "{e:?}");
    let e = crate::error::Error::from(e);
    assert_eq!(e.code(), tern_proto::ErrorCode::Unavailable);
    assert!(e.retry_after_ms() > 0);
    // The first fills its part, which goes to the store: its buffer is free again.
    store
        .append(devices[0], &ids[0], 1 << 20, &blobs[0][1 << 20..PART])
        .expect("a full part");
    store
        .append(devices[2], &ids[2], 0, &blobs[2][..1 << 20])
        .expect("the retry fits");
    // Upload 0's last bytes need a buffer again: none is free until one finishes.
    let e = store
        .append(devices[0], &ids[0], PART as u64, &blobs[0][PART..])
        .expect_err("full again");
    assert!(matches!(e, BlobError::Busy { .. }), "{e:?}");
    // Finishing gives a buffer back: every upload completes.
    for i in [1, 2, 0] {
        let b = &blobs[i];
        let at = if i == 0 { PART } else { 1 << 20 };
        store
            .append(devices[i], &ids[i], at as u64, &b[at..])
            .expect("rest");
        store.finish(devices[i], &ids[i]).expect("finish");
    }
    drop(running);
    let mut r = store.open_read(&ids[2], 0, 256 * 1024).expect("read");
    assert!(read_all(&mut r) == blobs[2]);
}
