//! The media rules and files against memory and sled indexes, on real files.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tern_platform::clock::ManualClock;
use tern_platform::direct_io::{self, AlignedBuf, DIRECT_ALIGN};
use tern_proto::{auth, DeviceAddress, DeviceId};

use super::*;
use crate::store::{MemoryStore, SledStore};

pub(super) fn id_of(bytes: &[u8]) -> BlobId {
    Sha256::digest(bytes).into()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `n` bytes that differ from block to block, so a misplaced block shows.
pub(super) fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

pub(super) fn read_all(reader: &mut BlobReader) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk().expect("read") {
        out.extend_from_slice(&chunk);
    }
    out
}

struct Fixture {
    store: BlobStore,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
    budget: Arc<Budget>,
}

fn fixture(index: Arc<dyn BlobIndex>, limits: BlobLimits) -> Fixture {
    fixture_with_budget(index, limits, Arc::default())
}

fn fixture_with_budget(
    index: Arc<dyn BlobIndex>,
    limits: BlobLimits,
    budget: Arc<Budget>,
) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let store =
        BlobStore::open(dir.path(), index, clock.clone(), limits, budget.clone()).expect("open");
    Fixture {
        store,
        clock,
        dir,
        budget,
    }
}

pub(super) fn upload(
    s: &BlobStore,
    device: &AuthenticatedDevice,
    bytes: &[u8],
) -> BlobResult<BlobMeta> {
    let id = id_of(bytes);
    match s.begin(device, &id, bytes.len() as u64)? {
        Begin::Exists(meta) => Ok(meta),
        Begin::Upload { offset, running } => {
            s.append(device, &id, offset, &bytes[offset as usize..])?;
            let meta = s.finish(device, &id);
            drop(running);
            meta
        }
    }
}

/// The primary device of account `[n; 16]`, authenticated the way a connection is.
fn device(n: u8) -> AuthenticatedDevice {
    let key = SigningKey::from_bytes(&[n; 32]);
    let exporter = [n; 32];
    let proof = key.sign(&auth::session_proof(&exporter)).to_bytes();
    let address = DeviceAddress {
        account: AccountId([n; 16]),
        device: DeviceId::PRIMARY,
    };
    crate::core::auth::authenticate(address, &key.verifying_key().to_bytes(), &exporter, &proof)
        .expect("a valid proof")
}

pub(super) static ALICE: LazyLock<AuthenticatedDevice> = LazyLock::new(|| device(1));
pub(super) static BOB: LazyLock<AuthenticatedDevice> = LazyLock::new(|| device(2));

#[test]
fn an_upload_becomes_a_blob_once_and_a_repeat_sends_nothing() {
    let sled_dir = tempfile::tempdir().expect("dir");
    for index in [
        Arc::new(MemoryStore::new()) as Arc<dyn BlobIndex>,
        Arc::new(SledStore::open(sled_dir.path(), 1 << 20).expect("sled")),
    ] {
        let f = fixture(index, BlobLimits::default());
        let bytes = vec![7u8; 100_000];
        let meta = upload(&f.store, &ALICE, &bytes).expect("upload");
        assert_eq!(meta.size, 100_000);
        assert_eq!(f.store.received_bytes(), 100_000);
        // Bob "uploads" the same id: nothing moves, the blob lives longer.
        f.clock.advance(Duration::from_secs(3600));
        let again = f.store.begin(&BOB, &id_of(&bytes), 100_000).expect("begin");
        assert!(matches!(again, Begin::Exists(m) if m.expires_at > meta.expires_at));
        assert_eq!(
            f.store.received_bytes(),
            100_000,
            "no bytes the second time"
        );
        let mut reader = f
            .store
            .open_read(&id_of(&bytes), 99_990, 4096)
            .expect("read");
        assert_eq!(reader.size(), 100_000);
        assert_eq!(read_all(&mut reader), vec![7u8; 10]);
        let blob_files = files(&f.dir.path().join("blobs"));
        assert_eq!(blob_files.len(), 1);
        assert!(files(&f.dir.path().join("uploads")).is_empty());
    }
}

#[test]
fn a_wrong_upload_is_refused_and_leaves_nothing() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let claimed = id_of(b"what I say it is");
    let Begin::Upload { offset, running } = f.store.begin(&ALICE, &claimed, 5).expect("begin")
    else {
        panic!("new blob")
    };
    f.store
        .append(&ALICE, &claimed, offset, b"other")
        .expect("append");
    assert!(matches!(
        f.store.finish(&ALICE, &claimed),
        Err(BlobError::DigestMismatch)
    ));
    drop(running);
    assert!(f.store.status(&claimed).expect("status").is_none());
    assert!(
        files(f.dir.path()).is_empty(),
        "nothing behind: {:?}",
        files(f.dir.path())
    );
    // Bytes past the announced size, or at the wrong offset, are refused too.
    let id = id_of(b"abc");
    let Begin::Upload { .. } = f.store.begin(&ALICE, &id, 3).expect("begin") else {
        panic!("new blob")
    };
    assert!(matches!(
        f.store.append(&ALICE, &id, 0, b"abcd"),
        Err(BlobError::Overflow)
    ));
    assert!(matches!(
        f.store.append(&ALICE, &id, 1, b"b"),
        Err(BlobError::WrongOffset {
            expected: 0,
            got: 1
        })
    ));
    assert!(matches!(
        f.store.finish(&ALICE, &id),
        Err(BlobError::Incomplete { .. })
    ));
}

#[test]
fn an_interrupted_upload_resumes_where_it_stopped() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let id = id_of(&bytes);
    let Begin::Upload { offset: 0, running } = f.store.begin(&ALICE, &id, 200_000).expect("begin")
    else {
        panic!("fresh")
    };
    f.store
        .append(&ALICE, &id, 0, &bytes[..70_000])
        .expect("half");
    drop(running); // the connection dropped
    let Begin::Upload {
        offset,
        running: _running,
    } = f.store.begin(&ALICE, &id, 200_000).expect("again")
    else {
        panic!("resume")
    };
    assert_eq!(offset, 70_000);
    f.store
        .append(&ALICE, &id, offset, &bytes[70_000..])
        .expect("rest");
    f.store.finish(&ALICE, &id).expect("complete");
    assert_eq!(f.store.received_bytes(), 200_000, "each byte once");
}

#[test]
fn expiry_deletes_the_blob_and_a_forward_moves_it() {
    let limits = BlobLimits {
        ttl: Duration::from_secs(3600),
        ..BlobLimits::default()
    };
    let f = fixture(Arc::new(MemoryStore::new()), limits);
    let (a, b) = (b"forwarded".to_vec(), b"left alone".to_vec());
    upload(&f.store, &ALICE, &a).expect("a");
    upload(&f.store, &ALICE, &b).expect("b");
    f.clock.advance(Duration::from_secs(1800));
    f.store.touch(&id_of(&a)).expect("forward");
    f.clock.advance(Duration::from_secs(1801));
    assert!(
        f.store.status(&id_of(&b)).expect("status").is_none(),
        "expired is gone at once"
    );
    let swept = f.store.sweep(100).expect("sweep");
    assert_eq!(swept.blobs, 1);
    assert!(
        f.store.status(&id_of(&a)).expect("status").is_some(),
        "the forward kept it"
    );
    assert_eq!(files(&f.dir.path().join("blobs")).len(), 1);
    assert!(matches!(
        f.store.touch(&id_of(&b)),
        Err(BlobError::NotFound)
    ));
    f.clock.advance(Duration::from_secs(3600));
    assert_eq!(f.store.sweep(100).expect("sweep").blobs, 1);
    assert!(files(&f.dir.path().join("blobs")).is_empty());
    // Deleting the blobs uncharged no one: the charges run to the end of the UTC day
    // they were to expire on (without the forward), then the sweep deletes them.
    let alice = ALICE.address().account;
    let charged = |f: &Fixture| f.store.index.account_bytes(&alice, f.clock.now());
    let size = (a.len() + b.len()) as u64;
    assert_eq!(charged(&f).expect("bytes"), size);
    let start = 1_800_000_000_000;
    let next_day = (start + 3_600_000) / DAY_MS * DAY_MS + DAY_MS;
    f.clock
        .advance(Duration::from_millis(next_day - 1 - f.clock.now()));
    assert_eq!(charged(&f).expect("bytes"), size);
    assert_eq!(f.store.sweep(100).expect("sweep").charges, 0);
    f.clock.advance(Duration::from_millis(1));
    assert_eq!(charged(&f).expect("bytes"), 0);
    assert_eq!(f.store.sweep(100).expect("sweep").charges, 1);
}

#[test]
fn abandoned_uploads_are_swept() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let id = id_of(b"never finished");
    let Begin::Upload { running, .. } = f.store.begin(&ALICE, &id, 14).expect("begin") else {
        panic!("fresh")
    };
    f.store.append(&ALICE, &id, 0, b"never").expect("append");
    drop(running);
    assert_eq!(
        f.store.sweep(100).expect("sweep").uploads,
        0,
        "not yet abandoned"
    );
    f.clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(f.store.sweep(100).expect("sweep").uploads, 1);
    assert!(files(f.dir.path()).is_empty());
}

#[test]
fn limits_refuse_with_clear_errors() {
    let limits = BlobLimits {
        max_blob_bytes: 1000,
        max_concurrent_uploads: 1,
        max_account_bytes: 1500,
        max_upload_bytes_per_sec: 2000,
        ..BlobLimits::default()
    };
    let f = fixture(Arc::new(MemoryStore::new()), limits);
    assert!(matches!(
        f.store.begin(&ALICE, &[1; 32], 1001),
        Err(BlobError::TooLarge {
            size: 1001,
            max: 1000
        })
    ));
    let first = f.store.begin(&ALICE, &[1; 32], 10).expect("one upload");
    assert!(matches!(
        f.store.begin(&ALICE, &[1; 32], 10),
        Err(BlobError::InProgress)
    ));
    assert!(matches!(
        f.store.begin(&ALICE, &[2; 32], 10),
        Err(BlobError::TooManyUploads(1))
    ));
    assert!(f.store.begin(&BOB, &[2; 32], 10).is_ok(), "per account");
    drop(first);
    upload(&f.store, &ALICE, &[5u8; 1000]).expect("within quota");
    assert!(matches!(
        f.store.begin(&ALICE, &[3; 32], 600),
        Err(BlobError::QuotaExceeded)
    ));
    // Rate: an account's bytes per second.
    let f = fixture(
        Arc::new(MemoryStore::new()),
        BlobLimits {
            max_upload_bytes_per_sec: 2000,
            ..BlobLimits::default()
        },
    );
    let bytes = [6u8; 3000];
    let id = id_of(&bytes);
    let Begin::Upload {
        running: _running, ..
    } = f.store.begin(&BOB, &id, 3000).expect("begin")
    else {
        panic!("fresh")
    };
    f.store
        .append(&BOB, &id, 0, &bytes[..1500])
        .expect("within rate");
    assert!(matches!(
        f.store.append(&BOB, &id, 1500, &bytes[1500..]),
        Err(BlobError::RateLimited { .. })
    ));
    f.clock.advance(Duration::from_secs(1));
    f.store
        .append(&BOB, &id, 1500, &bytes[1500..])
        .expect("next second");
    f.store.finish(&BOB, &id).expect("complete");
}

#[test]
fn unfinished_uploads_count_against_the_quota_and_are_capped() {
    let limits = BlobLimits {
        max_account_bytes: 1000,
        max_unfinished_uploads: 2,
        ..BlobLimits::default()
    };
    let f = fixture(Arc::new(MemoryStore::new()), limits);
    // Two uploads left half done (dropped, as by lost connections).
    for i in 0..2u8 {
        let Begin::Upload { running, .. } = f.store.begin(&ALICE, &[i; 32], 400).expect("begin")
        else {
            panic!("fresh")
        };
        f.store
            .append(&ALICE, &[i; 32], 0, &[0; 10])
            .expect("append");
        drop(running);
    }
    assert!(matches!(
        f.store.begin(&ALICE, &[9; 32], 100),
        Err(BlobError::TooManyUploads(2))
    ));
    // Resuming one of them is fine; the quota counts both announced sizes.
    assert!(f.store.begin(&ALICE, &[0; 32], 400).is_ok());
    let f = fixture(
        Arc::new(MemoryStore::new()),
        BlobLimits {
            max_account_bytes: 1000,
            ..BlobLimits::default()
        },
    );
    drop(f.store.begin(&ALICE, &[1; 32], 700).expect("begin"));
    assert!(matches!(
        f.store.begin(&ALICE, &[2; 32], 400),
        Err(BlobError::QuotaExceeded)
    ));
}

#[test]
fn the_sweeper_skips_only_the_upload_running_now() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let Begin::Upload { running, .. } = f.store.begin(&ALICE, &[1; 32], 10).expect("begin") else {
        panic!("fresh")
    };
    let Begin::Upload {
        running: abandoned, ..
    } = f.store.begin(&ALICE, &[2; 32], 10).expect("begin")
    else {
        panic!("fresh")
    };
    f.store.append(&ALICE, &[2; 32], 0, b"abc").expect("append");
    drop(abandoned);
    f.clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(
        f.store.sweep(1).expect("sweep").uploads,
        1,
        "the abandoned one goes"
    );
    assert!(f
        .store
        .index
        .upload(&ALICE.address().account, &[1; 32])
        .expect("upload")
        .is_some());
    drop(running);
    assert_eq!(f.store.sweep(1).expect("sweep").uploads, 1);
}

#[test]
fn a_record_without_its_file_counts_as_absent() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let bytes = b"lost in a crash".to_vec();
    upload(&f.store, &ALICE, &bytes).expect("upload");
    for file in files(&f.dir.path().join("blobs")) {
        fs::remove_file(file).expect("remove");
    }
    assert!(f.store.status(&id_of(&bytes)).expect("status").is_none());
    assert!(matches!(
        f.store.touch(&id_of(&bytes)),
        Err(BlobError::NotFound)
    ));
    let again = upload(&f.store, &ALICE, &bytes).expect("uploaded again");
    assert_eq!(again.size, bytes.len() as u64);
    assert_eq!(files(&f.dir.path().join("blobs")).len(), 1);
}

#[test]
fn aligned_pieces_go_direct_and_odd_ones_through_the_page_cache() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let bytes = pattern(3 * DIRECT_ALIGN + 300);
    let id = id_of(&bytes);
    let Begin::Upload { running, .. } = f
        .store
        .begin(&ALICE, &id, bytes.len() as u64)
        .expect("begin")
    else {
        panic!("a new blob");
    };
    let mut buf = AlignedBuf::new(2 * DIRECT_ALIGN);
    let mut offset = 0u64;
    // Aligned, then an odd piece (page cache), then an odd offset (page cache),
    // then the rest.
    for (from, to) in [
        (0, 2 * DIRECT_ALIGN),
        (2 * DIRECT_ALIGN, 2 * DIRECT_ALIGN + 100),
        (2 * DIRECT_ALIGN + 100, 3 * DIRECT_ALIGN + 100),
        (3 * DIRECT_ALIGN + 100, bytes.len()),
    ] {
        buf.reset(to - from);
        assert_eq!(buf.fill(&bytes[from..to]), to - from);
        offset = f
            .store
            .append(&ALICE, &id, offset, buf.as_slice())
            .expect("append");
    }
    assert_eq!(f.store.received_bytes(), bytes.len() as u64);
    let expected = if direct_io::supported_in(f.dir.path()) {
        2 * DIRECT_ALIGN as u64
    } else {
        0
    };
    assert_eq!(
        f.store.direct_bytes(),
        expected,
        "only the aligned piece bypasses the page cache"
    );
    f.store
        .finish(&ALICE, &id)
        .expect("the bytes hash to the id");
    drop(running);
    let mut reader = f.store.open_read(&id, 0, 8192).expect("blob");
    assert_eq!(reader.size(), bytes.len() as u64);
    assert_eq!(read_all(&mut reader), bytes);
}

#[test]
fn a_reader_returns_every_byte_from_any_offset_and_reuses_its_buffers() {
    let f = fixture(Arc::new(MemoryStore::new()), BlobLimits::default());
    let bytes = pattern(5 * DIRECT_ALIGN + 123);
    upload(&f.store, &ALICE, &bytes).expect("upload");
    let id = id_of(&bytes);
    for offset in [0, 1, 4095, 4096, 10_000, bytes.len() - 1, bytes.len()] {
        for chunk in [1, 4096, 5000, 1 << 20] {
            let mut reader = f.store.open_read(&id, offset as u64, chunk).expect("open");
            assert_eq!(
                read_all(&mut reader),
                bytes[offset..],
                "offset {offset}, chunk {chunk}"
            );
        }
    }
    // Chunks dropped before the next read come back: the pool stays at one buffer.
    let mut reader = f.store.open_read(&id, 0, 4096).expect("open");
    while reader.next_chunk().expect("read").is_some() {}
    assert_eq!(
        reader.is_direct(),
        direct_io::supported_in(f.dir.path()),
        "direct reads (and their offset arithmetic) are tested where the file system has them"
    );
    assert_eq!(reader.pooled(), 1);
    // A file shorter than its record ends the read early, without an error.
    let path = BlobFiles::open(f.dir.path()).expect("files").blob_path(&id);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(4096 + 10))
        .expect("truncate");
    let mut reader = f.store.open_read(&id, 100, 4096).expect("open");
    assert_eq!(read_all(&mut reader), bytes[100..4096 + 10]);
}

#[test]
fn only_the_uploader_is_charged_and_the_charge_expires_with_its_day() {
    let sled_dir = tempfile::tempdir().expect("dir");
    for index in [
        Arc::new(MemoryStore::new()) as Arc<dyn BlobIndex>,
        Arc::new(SledStore::open(sled_dir.path(), 1 << 20).expect("sled")),
    ] {
        let limits = BlobLimits {
            max_account_bytes: 1500,
            ttl: Duration::from_secs(2 * 86_400),
            ..BlobLimits::default()
        };
        let f = fixture(index, limits);
        let (alice, bob) = (ALICE.address().account, BOB.address().account);
        let bytes = vec![3u8; 1000];
        let id = id_of(&bytes);
        let meta = upload(&f.store, &ALICE, &bytes).expect("upload");
        assert_eq!(f.store.index.upload(&alice, &id).expect("upload"), None);
        // Bob's upload of the same blob and his forward, a day later, move it and
        // charge no one.
        f.clock.advance(Duration::from_secs(28 * 3600));
        upload(&f.store, &BOB, &bytes).expect("exists");
        f.store.touch(&id).expect("forward");
        let now = f.clock.now();
        assert_eq!(f.store.index.account_bytes(&bob, now).expect("bob"), 0);
        assert_eq!(
            f.store.index.account_bytes(&alice, now).expect("alice"),
            1000
        );
        assert!(matches!(
            f.store.begin(&ALICE, &[8; 32], 600),
            Err(BlobError::QuotaExceeded)
        ));
        assert!(f.store.begin(&BOB, &[8; 32], 600).is_ok());
        // The day after the one Alice's upload was to expire on, her quota is free
        // again though the blob lives on, forwarded.
        let free_from = (meta.expires_at / DAY_MS + 1) * DAY_MS;
        f.clock
            .advance(Duration::from_millis(free_from - f.clock.now()));
        assert!(f.store.status(&id).expect("status").is_some());
        assert!(f.store.begin(&ALICE, &[8; 32], 1500).is_ok());
        assert_eq!(f.store.sweep(100).expect("sweep").charges, 1);
    }
}

#[test]
fn reported_expiry_is_the_start_of_its_utc_day() {
    assert_eq!(reported_expiry(0), 0);
    assert_eq!(reported_expiry(DAY_MS - 1), 0);
    assert_eq!(reported_expiry(DAY_MS), DAY_MS);
    // 2027-01-15T08:00:00.123Z -> 2027-01-15T00:00:00Z
    let t = 1_800_000_000_123;
    assert_eq!(reported_expiry(t), t - 8 * 3_600_000 - 123);
}

#[test]
fn blob_bytes_are_a_relay_wide_budget_and_the_reserve_stops_uploads_not_downloads() {
    use crate::core::budget::{BudgetLimits, DiskSample};
    let budget = Arc::new(Budget::new(BudgetLimits {
        max_blob_bytes: 1500,
        ..BudgetLimits::default()
    }));
    let f = fixture_with_budget(Arc::new(MemoryStore::new()), BlobLimits::default(), budget);
    let first = upload(&f.store, &ALICE, &[1u8; 1000]).expect("within the budget");
    assert_eq!(f.budget.blob_bytes(), 1000);
    assert!(matches!(
        upload(&f.store, &BOB, &[2u8; 600]),
        Err(BlobError::StorageFull { .. })
    ));
    upload(&f.store, &BOB, &[2u8; 500]).expect("exactly the budget");

    // Under the reserve: uploads wait, a download and a forward of a blob go on.
    f.budget.record_disk(&[DiskSample {
        free: 0,
        size: 1 << 40,
    }]);
    let e = upload(&f.store, &BOB, &[3u8; 10]).expect_err("under the reserve");
    assert!(matches!(e, BlobError::StorageFull { .. }));
    let e = crate::error::Error::from(e);
    assert_eq!(e.code(), tern_proto::ErrorCode::Unavailable);
    assert!(e.retry_after_ms() > 0);
    let id = id_of(&[1u8; 1000]);
    let mut reader = f.store.open_read(&id, 0, 4096).expect("download");
    assert_eq!(read_all(&mut reader), vec![1u8; 1000]);
    assert_eq!(f.store.touch(&id).expect("forward").size, first.size);

    // A store opened on the same files counts them; the sweep gives bytes back.
    let again = Arc::new(Budget::default());
    BlobStore::open(
        f.dir.path(),
        Arc::new(MemoryStore::new()),
        f.clock.clone(),
        BlobLimits::default(),
        again.clone(),
    )
    .expect("open");
    assert_eq!(again.blob_bytes(), 1500);
    f.clock.advance(Duration::from_secs(31 * 24 * 3600));
    f.store.sweep(100).expect("sweep");
    assert_eq!(f.budget.blob_bytes(), 0);
}

#[test]
fn a_finish_without_the_bytes_never_takes_an_expired_blobs_bytes() {
    // An expired blob's bytes wait for the sweep under its name. A device that
    // announces the same content and finishes without sending it has not shown it
    // holds the content: no record, no charge.
    let limits = BlobLimits {
        ttl: Duration::from_secs(3600),
        ..BlobLimits::default()
    };
    let f = fixture(Arc::new(MemoryStore::new()), limits);
    let bytes = pattern(50_000);
    let id = id_of(&bytes);
    upload(&f.store, &ALICE, &bytes).expect("upload");
    f.clock.advance(Duration::from_secs(3601));
    assert!(f.store.status(&id).expect("status").is_none(), "expired");
    let Begin::Upload { offset, running } = f.store.begin(&BOB, &id, 50_000).expect("begin") else {
        panic!("an expired blob is uploaded again");
    };
    assert_eq!(offset, 0);
    assert!(f.store.finish(&BOB, &id).is_err(), "nothing was sent");
    assert!(f.store.status(&id).expect("status").is_none());
    // With the bytes sent, the same finish succeeds.
    f.store.append(&BOB, &id, 0, &bytes).expect("append");
    assert_eq!(f.store.finish(&BOB, &id).expect("finish").size, 50_000);
    drop(running);
}
