use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};

use super::record::MessageHeader;
use super::*;
use crate::store::{Envelope, Expired, Flush, MailboxStore};

fn addr(a: u8) -> DeviceAddress {
    DeviceAddress::from_wire(&[a; 16], 1).expect("addr")
}

fn msg(i: u8, payload: &[u8]) -> Envelope {
    Envelope {
        message_id: MessageId([i; 16]),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// A log without its background pass.
fn manual(dir: &Path, segment_bytes: u64) -> LogStore {
    manual_with(dir, segment_bytes, false)
}

fn manual_with(dir: &Path, segment_bytes: u64, write_behind: bool) -> LogStore {
    LogStore::open(
        dir,
        LogOptions {
            segment_bytes,
            background: false,
            now: 0,
            write_behind,
        },
    )
    .expect("open")
}

/// Appends one message to `to` (accepted at 1, expiring at 100); returns its seq.
fn one(store: &LogStore, to: &DeviceAddress, i: u8, payload: &[u8]) -> u64 {
    store
        .append(to, &[msg(i, payload)], 1, 100)
        .expect("append")[0]
}

fn seqs(store: &LogStore, of: &DeviceAddress) -> Vec<u64> {
    store
        .read(of, 0, 1000)
        .expect("read")
        .iter()
        .map(|m| m.seq)
        .collect()
}

/// Where `seq` of `of` lies: (segment, offset, length).
fn place(store: &LogStore, of: &DeviceAddress, seq: u64) -> (u64, u64, u64) {
    let index = lock(&store.shared.index);
    let loc = index.mailboxes[of].entries[&seq];
    (loc.segment, loc.offset, u64::from(loc.len))
}

/// The first bytes at `offset` of segment `id`, as the scan reads them.
fn peek(dir: &Path, id: u64, offset: u64) -> record::Next {
    let file = File::open(segment_path(dir, id)).expect("open");
    let mut head = [0u8; record::PEEK_LEN];
    file.read_exact_at(&mut head, offset).expect("read");
    record::next(&head, u64::MAX)
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn disk_holds(dir: &Path, needle: &[u8]) -> bool {
    segment_files(dir).iter().any(|p| {
        std::fs::read(p)
            .expect("read")
            .windows(needle.len())
            .any(|w| w == needle)
    })
}

#[test]
fn conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), LogOptions::default()).expect("open");
    crate::store::conformance::mailbox_rules(&store);
}

#[test]
fn conformance_across_many_small_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::mailbox_rules(&manual(dir.path(), 64));
    crate::store::conformance::seqs_are_per_mailbox(&manual(dir.path(), 64));
}

#[test]
fn conformance_seqs_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::seqs_grow_across_reopen(&|| {
        Box::new(LogStore::open(dir.path(), LogOptions::default()).expect("open"))
    });
    let small = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::seqs_grow_across_reopen(&|| Box::new(manual(small.path(), 64)));
}

#[test]
fn per_mailbox_seqs_never_repeat_after_an_emptied_mailbox_lost_its_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let mut given: Vec<u64> = Vec::new();
    for round in 0..4u8 {
        // 64-byte segments: every append starts a new one.
        let store = manual(dir.path(), 64);
        for i in 0..5 {
            let s = one(&store, &b, i, b"bob");
            store.remove(&b, &[s]).expect("remove");
        }
        let s = store
            .append(&a, &[msg(1, b"x"), msg(2, b"y")], 1, 100)
            .expect("append");
        assert_eq!(
            s[1],
            s[0] + 1,
            "bob's traffic does not show in alice's seqs"
        );
        assert!(given.iter().all(|g| s[0] > *g), "{s:?} after {given:?}");
        store.remove(&a, &s).expect("remove");
        // Bob's next message starts a segment; alice's, now empty, is deleted.
        let t = one(&store, &b, 9, b"bob");
        store.remove(&b, &[t]).expect("remove");
        assert_eq!(store.count_messages(), 0);
        assert_eq!(segment_files(dir.path()).len(), 1, "only the active one");
        given.extend(&s);
        assert_eq!(
            store.remove(&a, &given).expect("remove"),
            Usage::default(),
            "a stale ack finds nothing"
        );
        if round % 2 == 0 {
            crash(store);
        } else {
            drop(store);
        }
    }
}

#[test]
fn survives_reopen_and_keeps_sequence_numbers_rising() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let (kept, last) = {
        let store = manual(dir.path(), 1 << 20);
        let s = store
            .append(
                &a,
                &[msg(1, b"one"), msg(2, b"two"), msg(3, b"three")],
                5,
                50,
            )
            .expect("append");
        let t = store.append(&b, &[msg(4, b"four")], 6, 60).expect("append");
        store.remove(&a, &s[..1]).expect("remove");
        store.remove(&b, &t).expect("remove");
        store.flush().expect("flush");
        (s[1..].to_vec(), t[0])
    };
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), kept);
    let read = store.read(&a, 0, 10).expect("read");
    assert_eq!(&read[1].payload[..], b"three");
    assert_eq!(read[1].message_id, MessageId([3; 16]));
    assert_eq!((read[1].accepted_at, read[1].expires_at), (5, 50));
    assert_eq!(
        store.usage(&a).expect("usage"),
        Usage {
            messages: 2,
            bytes: 8
        }
    );
    // A clean shutdown scrubs what was removed: it does not come back.
    assert_eq!(store.usage(&b).expect("usage"), Usage::default());
    let next = store.append(&a, &[msg(5, b"five")], 7, 70).expect("append");
    assert!(next[0] > last, "{} after {last}", next[0]);
    assert_eq!(store.expired(60, 10).expect("expired").len(), 2);
}

#[test]
fn sequence_numbers_rise_even_after_every_segment_emptied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let last = {
        let store = manual(dir.path(), 64);
        let mut last = 0;
        for i in 0..10 {
            let s = store.append(&a, &[msg(i, b"x")], 1, 100).expect("append");
            store.remove(&a, &s).expect("remove");
            last = s[0];
        }
        last
    };
    for _ in 0..3 {
        let store = manual(dir.path(), 64);
        assert_eq!(store.count_messages(), 0);
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "only the active segment"
        );
        let s = store.append(&a, &[msg(1, b"y")], 1, 100).expect("append");
        assert!(s[0] > last);
        store.remove(&a, &s).expect("remove");
    }
}

#[test]
fn segments_roll_and_emptied_ones_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = manual(dir.path(), 1024);
    let (a, b) = (addr(1), addr(2));
    let mut sa = Vec::new();
    let mut sb = Vec::new();
    for i in 0..20u8 {
        sa.extend(
            store
                .append(&a, &[msg(i, &[i; 300])], 1, 100)
                .expect("append"),
        );
        sb.extend(
            store
                .append(&b, &[msg(i, &[i; 300])], 1, 100)
                .expect("append"),
        );
    }
    let many = segment_files(dir.path()).len();
    assert!(many > 5, "{many} segments");
    assert_eq!(store.segments(), many);
    // Ack all of a's and the first half of b's: segments holding only those go.
    store.remove(&a, &sa).expect("remove");
    store.remove(&b, &sb[..10]).expect("remove");
    let fewer = segment_files(dir.path()).len();
    assert!(fewer < many, "{fewer} of {many}");
    assert_eq!(seqs(&store, &b), sb[10..]);
    store.remove(&b, &sb[10..]).expect("remove");
    assert_eq!(segment_files(dir.path()).len(), 1);
    drop(store);
    let store = manual(dir.path(), 1024);
    assert_eq!(store.count_messages(), 0);
}

#[test]
fn acknowledged_ciphertext_leaves_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = manual(dir.path(), 1 << 20);
    let (a, b) = (addr(1), addr(2));
    let gone = store
        .append(&a, &[msg(1, &[0xA1; 5000]), msg(2, &[0xA2; 5000])], 1, 100)
        .expect("append");
    store
        .append(&b, &[msg(3, &[0xB3; 5000])], 1, 100)
        .expect("append");
    let also_gone = store
        .append(&a, &[msg(4, &[0xA4; 64])], 1, 100)
        .expect("append");
    store.flush().expect("flush");
    assert!(disk_holds(dir.path(), &[0xA1; 64]));
    store.remove(&a, &gone).expect("remove");
    store.remove(&a, &also_gone).expect("remove");
    store.scrub().expect("scrub");
    for marker in [0xA1, 0xA2, 0xA4] {
        assert!(
            !disk_holds(dir.path(), &[marker; 64]),
            "{marker:#x} still on disk"
        );
    }
    assert!(disk_holds(dir.path(), &[0xB3; 64]), "b's message was kept");
    assert_eq!(store.read(&b, 0, 10).expect("read").len(), 1);
    drop(store);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(store.count_messages(), 1);
    assert_eq!(
        &store.read(&b, 0, 10).expect("read")[0].payload[..],
        &[0xB3; 5000]
    );
}

/// Appends `extra` to the newest segment file that holds records.
fn damage_tail(dir: &Path, extra: &[u8]) {
    use std::io::Write;
    let files = segment_files(dir);
    let path = files
        .iter()
        .rev()
        .find(|p| std::fs::metadata(p).expect("meta").len() > HEADER_LEN)
        .expect("a segment with records");
    let mut f = OpenOptions::new().append(true).open(path).expect("open");
    f.write_all(extra).expect("write");
}

#[test]
fn a_torn_tail_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let kept = {
        let store = manual(dir.path(), 1 << 20);
        let s = store
            .append(&a, &[msg(1, b"one"), msg(2, b"two")], 1, 100)
            .expect("append");
        store.flush().expect("flush");
        s
    };
    // Half a record, as a crash in the middle of a write leaves it.
    let mut torn = Vec::new();
    let header = MessageHeader {
        to: a,
        seq: 999,
        accepted_at: 1,
        expires_at: 100,
        message_id: MessageId([9; 16]),
    };
    record::encode_message(&mut torn, &header, &[7; 500]);
    damage_tail(dir.path(), &torn[..torn.len() / 2]);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), kept);
    // Zeros past the end (a file extended but not written) end the log too.
    drop(store);
    damage_tail(dir.path(), &[0; 4096]);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), kept);
    let next = store
        .append(&a, &[msg(3, b"three")], 1, 100)
        .expect("append");
    assert!(next[0] > kept[1]);
}

/// Three 100-byte messages (bytes 0x11, 0x22, 0x33) in one segment, flushed; their
/// seqs, the segment's path, and the offset of the second one's payload.
fn three_records(dir: &Path, a: &DeviceAddress) -> (Vec<u64>, std::path::PathBuf, usize) {
    let store = manual(dir, 1 << 20);
    let s = store
        .append(
            a,
            &[
                msg(1, &[0x11; 100]),
                msg(2, &[0x22; 100]),
                msg(3, &[0x33; 100]),
            ],
            1,
            100,
        )
        .expect("append");
    store.flush().expect("flush");
    let has_second = |p: &std::path::PathBuf| {
        let bytes = std::fs::read(p).expect("read");
        bytes.windows(8).position(|w| w == [0x22; 8])
    };
    let (path, at) = segment_files(dir)
        .into_iter()
        .find_map(|p| has_second(&p).map(|at| (p, at)))
        .expect("segment");
    (s, path, at)
}

#[test]
fn a_damaged_record_is_dropped_and_its_neighbours_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (s, path, at) = three_records(dir.path(), &a);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");

    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), vec![s[0], s[2]]);

    // Damage found while running: the read skips the record and drops it.
    let t = store
        .append(&a, &[msg(4, &[0x44; 100]), msg(5, &[0x55; 100])], 1, 100)
        .expect("append");
    store.flush().expect("flush");
    let path = segment_files(dir.path()).pop().expect("active");
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    let bytes = std::fs::read(&path).expect("read");
    let at = bytes
        .windows(8)
        .position(|w| w == [0x44; 8])
        .expect("marker");
    file.write_all_at(&[0], at as u64).expect("write");
    assert_eq!(seqs(&store, &a), vec![s[0], s[2], t[1]]);
    assert_eq!(store.usage(&a).expect("usage").messages, 3);
}

#[test]
fn concurrent_appends_and_acks_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(manual(dir.path(), 16 << 10));
    let handles: Vec<_> = (1..=4u8)
        .map(|d| {
            let store = store.clone();
            thread::spawn(move || {
                let to = addr(d);
                let mut kept = Vec::new();
                for i in 0..200u8 {
                    let s = store
                        .append(&to, &[msg(i, &[d; 200]), msg(i, &[d; 10])], 1, 100)
                        .expect("append");
                    store.remove(&to, &s[..1]).expect("remove");
                    kept.push(s[1]);
                    if i % 50 == 0 {
                        store.scrub().expect("scrub");
                    }
                }
                kept
            })
        })
        .collect();
    let kept: Vec<Vec<u64>> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    for (d, k) in (1..=4u8).zip(&kept) {
        assert_eq!(seqs(&store, &addr(d)), *k);
    }
    drop(store);
    let store = manual(dir.path(), 16 << 10);
    for (d, k) in (1..=4u8).zip(&kept) {
        assert_eq!(seqs(&store, &addr(d)), *k);
        assert!(store
            .read(&addr(d), 0, 1000)
            .expect("read")
            .iter()
            .all(|m| m.payload.len() == 10));
    }
}

#[test]
fn zero_filled_spare_segments_are_used_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment = 64 << 10;
    let options = LogOptions {
        segment_bytes: segment,
        background: true,
        now: 0,
        // The spares' appends wait for the flush, as under `durability = "fsync"`.
        write_behind: true,
    };
    let a = addr(1);
    let mut all = Vec::new();
    {
        let store = LogStore::open(dir.path(), options).expect("open");
        // Past half of the first segment: the background pass prepares a spare.
        for i in 0..20u8 {
            all.extend(
                store
                    .append(&a, &[msg(i, &[i; 2000])], 1, 100)
                    .expect("append"),
            );
        }
        let spare = dir.path().join(SPARE);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&store.shared.spare).is_none() {
            assert!(std::time::Instant::now() < deadline, "no spare prepared");
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            std::fs::metadata(&spare).expect("spare").len(),
            segment + SPARE_SLACK
        );
        // Into the second segment, which is the spare.
        for i in 20..40u8 {
            all.extend(
                store
                    .append(&a, &[msg(i, &[i; 2000])], 1, 100)
                    .expect("append"),
            );
        }
        assert!(!spare.exists(), "the spare became a segment");
        let sizes: Vec<u64> = segment_files(dir.path())
            .iter()
            .map(|p| std::fs::metadata(p).expect("meta").len())
            .collect();
        assert!(sizes.contains(&(segment + SPARE_SLACK)), "{sizes:?}");
        assert_eq!(seqs(&store, &a), all);
    }
    let store = manual(dir.path(), segment);
    assert_eq!(seqs(&store, &a), all);
    let read = store.read(&a, 0, 100).expect("read");
    assert!(read
        .iter()
        .zip(0u8..)
        .all(|(m, i)| m.payload[..] == [i; 2000]));
}

#[test]
fn a_failed_write_loses_nothing_stored_and_the_log_carries_on_in_a_new_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = manual(dir.path(), 1 << 20);
    let mut kept = store
        .append(&a, &[msg(1, b"first"), msg(2, b"second")], 1, 100)
        .expect("append");
    // The disk refuses the next write: the writer's handle to the active segment is
    // swapped for a read-only one, so `pwrite` fails (EBADF) as on an I/O error.
    // Nothing of the record reaches the file here; a record torn part way is what
    // `a_torn_tail_is_ignored` covers.
    {
        let mut w = lock(&store.shared.writer);
        let path = segment_path(dir.path(), w.active.id);
        let read_only = File::open(path).expect("open read-only");
        let id = w.active.id;
        w.active = Arc::new(Segment {
            id,
            file: read_only,
        });
    }
    let err = store
        .append(&a, &[msg(3, b"refused")], 1, 100)
        .expect_err("the write fails");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    // What was stored is still there, and the failed append left nothing behind.
    assert_eq!(seqs(&store, &a), kept);
    assert_eq!(store.usage(&a).expect("usage").messages, 2);
    // The next append goes to a new segment instead of writing over the old one.
    kept.extend(
        store
            .append(&a, &[msg(4, b"after")], 1, 100)
            .expect("append after the failure"),
    );
    assert_eq!(store.segments(), 2);
    store.flush().expect("flush");
    drop(store);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), kept);
    let payloads: Vec<Bytes> = store
        .read(&a, 0, 10)
        .expect("read")
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(payloads, [&b"first"[..], b"second", b"after"]);
}

#[test]
fn a_segment_that_grows_is_left_for_a_spare_once_traffic_comes() {
    // The first segment starts empty, so every fsync of it also writes its inode.
    let dir = tempfile::tempdir().expect("tempdir");
    let segment = 16 << 20;
    let store = manual(dir.path(), segment);
    let a = addr(1);
    let payload = [7u8; 2000];
    let per = (payload.len() + record::MESSAGE_OVERHEAD) as u64;
    let below = (EARLY_SPARE - HEADER_LEN) / per;
    let mut all = Vec::new();
    for i in 0..below {
        all.push(one(&store, &a, i as u8, &payload));
    }
    // Too little for a relay in use (a test, an idle node): no spare.
    store.shared.prepare_spare().expect("prepare");
    assert!(!dir.path().join(SPARE).exists());
    all.push(one(&store, &a, 1, &payload));
    store.shared.prepare_spare().expect("prepare");
    assert!(
        dir.path().join(SPARE).exists(),
        "a spare for a segment in use"
    );
    assert_eq!(store.segments(), 1);
    // The next append moves to the spare, long before the segment is full.
    all.push(one(&store, &a, 2, &payload));
    assert_eq!(store.segments(), 2);
    let files = segment_files(dir.path());
    let size = |p: &std::path::PathBuf| std::fs::metadata(p).expect("meta").len();
    assert!(size(&files[0]) < 2 * EARLY_SPARE, "{}", size(&files[0]));
    assert_eq!(size(&files[1]), segment + SPARE_SLACK);
    // Past EARLY_SPARE in the pre-zeroed segment: it does not grow, and it is not
    // left early (no spare until it is half full).
    for i in 0..=below {
        all.push(one(&store, &a, i as u8, &payload));
    }
    assert_eq!(
        size(&files[1]),
        segment + SPARE_SLACK,
        "appends do not grow it"
    );
    store.shared.prepare_spare().expect("prepare");
    assert!(!dir.path().join(SPARE).exists());
    all.push(one(&store, &a, 3, &payload));
    assert_eq!(store.segments(), 2);
    let stored: Vec<u64> = store
        .read(&a, 0, all.len() + 1)
        .expect("read")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(stored, all);
}

#[test]
fn the_background_pass_prepares_the_early_spare_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions {
        segment_bytes: 16 << 20,
        background: true,
        now: 0,
        write_behind: true,
    };
    let store = LogStore::open(dir.path(), options).expect("open");
    let a = addr(1);
    let payload = [7u8; 4000];
    let mut all = Vec::new();
    while lock(&store.shared.writer).len < EARLY_SPARE {
        all.push(one(&store, &a, 1, &payload));
    }
    // Woken by the append that crossed EARLY_SPARE (its timer alone would also do,
    // within SCRUB_INTERVAL).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lock(&store.shared.spare).is_none() {
        assert!(std::time::Instant::now() < deadline, "no spare prepared");
        thread::sleep(Duration::from_millis(10));
    }
    all.push(one(&store, &a, 2, &payload));
    assert_eq!(store.segments(), 2);
    assert_eq!(seqs(&store, &a), all);
}

mod model {
    //! The log against the in-memory store, over random appends, acks, expiry sweeps,
    //! scrubs and restarts, with segments small enough to roll and be deleted often.
    use super::*;
    use crate::store::MemoryStore;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            to: u8,
            sizes: Vec<usize>,
            expires_at: u64,
        },
        /// Acks every `nth` queued message of `of`, starting at `skip`.
        Ack {
            of: u8,
            skip: usize,
            nth: usize,
        },
        Sweep {
            now: u64,
        },
        Scrub,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, prop::collection::vec(0..400usize, 1..5), 10..60u64)
                .prop_map(|(to, sizes, expires_at)| Op::Append { to, sizes, expires_at }),
            3 => (0..3u8, 0..4usize, 1..4usize).prop_map(|(of, skip, nth)| Op::Ack { of, skip, nth }),
            1 => (0..70u64).prop_map(|now| Op::Sweep { now }),
            1 => Just(Op::Scrub),
            1 => Just(Op::Restart),
        ]
    }

    fn contents(s: &dyn MailboxStore, of: &DeviceAddress) -> Vec<(u64, MessageId, Bytes, u64)> {
        s.read(of, 0, 10_000)
            .expect("read")
            .into_iter()
            .map(|m| (m.seq, m.message_id, m.payload, m.expires_at))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn the_log_keeps_exactly_what_the_model_keeps(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut log = manual(dir.path(), 512);
            let model = MemoryStore::new();
            // The model's seqs are its own (it never restarts): each maps to the log's.
            let mut to_log: std::collections::HashMap<(DeviceAddress, u64), u64> =
                std::collections::HashMap::new();
            let mut highest: std::collections::HashMap<DeviceAddress, u64> =
                std::collections::HashMap::new();
            let mut next_id = 0u8;
            // Payloads of 64 bytes or more, by message id: their bytes are a marker.
            let mut markers = std::collections::HashMap::new();
            for op in ops {
                match op {
                    Op::Append { to, sizes, expires_at } => {
                        let msgs: Vec<Envelope> = sizes
                            .iter()
                            .map(|&n| {
                                next_id = next_id.wrapping_add(1);
                                if n >= 64 {
                                    markers.insert(MessageId([next_id; 16]), next_id);
                                }
                                msg(next_id, &vec![next_id; n])
                            })
                            .collect();
                        let a = log.append(&addr(to), &msgs, 1, expires_at).expect("append");
                        let b = model.append(&addr(to), &msgs, 1, expires_at).expect("append");
                        prop_assert_eq!(a.len(), b.len());
                        // Above every seq this mailbox was ever given, across restarts.
                        let top = highest.entry(addr(to)).or_insert(0);
                        for &seq in &a {
                            prop_assert!(seq > *top, "{} after {}", seq, top);
                            *top = seq;
                        }
                        for (m, l) in b.iter().zip(&a) {
                            to_log.insert((addr(to), *m), *l);
                        }
                    }
                    Op::Ack { of, skip, nth } => {
                        let seqs: Vec<u64> = contents(&model, &addr(of))
                            .iter()
                            .skip(skip)
                            .step_by(nth)
                            .map(|m| m.0)
                            .collect();
                        let mapped: Vec<u64> = seqs.iter().map(|m| to_log[&(addr(of), *m)]).collect();
                        let a = log.remove(&addr(of), &mapped).expect("remove");
                        let b = model.remove(&addr(of), &seqs).expect("remove");
                        prop_assert_eq!(a, b);
                    }
                    Op::Sweep { now } => {
                        let due = log.expired(now, 1000).expect("expired");
                        let model_due = model.expired(now, 1000).expect("expired");
                        let mapped: Vec<Expired> = model_due
                            .iter()
                            .map(|e| Expired { seq: to_log[&(e.to, e.seq)], ..*e })
                            .collect();
                        prop_assert_eq!(&due, &mapped);
                        for (d, m) in due.iter().zip(&model_due) {
                            let a = log.expire(&d.to, &[*d]).expect("expire");
                            let b = model.expire(&m.to, &[*m]).expect("expire");
                            prop_assert_eq!(a, b);
                        }
                    }
                    Op::Scrub => log.scrub().expect("scrub"),
                    Op::Restart => {
                        drop(log);
                        log = manual(dir.path(), 512);
                    }
                }
                for d in 0..3 {
                    let mut expected = contents(&model, &addr(d));
                    for m in &mut expected {
                        m.0 = to_log[&(addr(d), m.0)];
                    }
                    prop_assert_eq!(contents(&log, &addr(d)), expected);
                    prop_assert_eq!(log.usage(&addr(d)).expect("usage"), model.usage(&addr(d)).expect("usage"));
                }
            }
            // Whatever was acked or expired is gone from the disk once scrubbed.
            log.scrub().expect("scrub");
            let live: Vec<MessageId> = (0..3)
                .flat_map(|d| contents(&model, &addr(d)))
                .map(|m| m.1)
                .collect();
            prop_assert_eq!(log.count_messages() as usize, live.len());
            for (id, marker) in &markers {
                prop_assert_eq!(disk_holds(dir.path(), &[*marker; 64]), live.contains(id));
            }
            prop_assert!(segment_files(dir.path()).len() <= log.segments());
        }
    }
}

#[test]
fn a_damaged_length_keeps_what_follows_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (s, path, body) = three_records(dir.path(), &a);
    // The second record's length now points into the middle of the third.
    let mut bytes = std::fs::read(&path).expect("read");
    let second = body - record::MESSAGE_OVERHEAD;
    bytes[second + 3] = bytes[second + 3].wrapping_add(40);
    std::fs::write(&path, &bytes).expect("write");

    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), vec![s[0]], "the scan stops at the damage");
    // Acking what was read does not delete the file: the third record is still there.
    store.remove(&a, &[s[0]]).expect("remove");
    store.scrub().expect("scrub");
    assert!(path.exists(), "a damaged segment is kept");
    assert!(
        disk_holds(dir.path(), &[0x33; 64]),
        "what follows the damage is kept"
    );
    assert!(
        !disk_holds(dir.path(), &[0x11; 64]),
        "the acked record is scrubbed"
    );
}

#[test]
fn a_scrub_cut_short_by_a_crash_is_finished_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (s, path, body) = three_records(dir.path(), &a);
    // The crash came after the dead header was written, before the hole was punched.
    let second = body - record::MESSAGE_OVERHEAD;
    let len = record::MESSAGE_OVERHEAD as u64 + 100;
    let header = record::dead_header(len, s[1]).expect("header");
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(&header, second as u64).expect("write");
    drop(file);
    assert!(disk_holds(dir.path(), &[0x22; 64]));

    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), vec![s[0], s[2]]);
    store.scrub().expect("scrub");
    assert!(!disk_holds(dir.path(), &[0x22; 64]), "the hole is punched");
    assert!(disk_holds(dir.path(), &[0x33; 64]));
    drop(store);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), vec![s[0], s[2]]);
    let next = store.append(&a, &[msg(9, b"x")], 1, 100).expect("append");
    assert!(next[0] > s[2]);
}

/// Drops a store the way a crash does: no final scrub, no flush.
fn crash(store: LogStore) {
    std::mem::forget(store);
}

/// Swaps the handle every later write to segment `id` goes through for a read-only
/// one, so `pwrite` fails (EBADF) as on an I/O error.
fn refuse_writes(store: &LogStore, dir: &Path, id: u64) {
    let read_only = File::open(segment_path(dir, id)).expect("open read-only");
    let mut index = lock(&store.shared.index);
    let state = index.segments.get_mut(&id).expect("segment");
    state.segment = Arc::new(Segment {
        id,
        file: read_only,
    });
}

#[test]
fn a_removal_is_on_disk_before_any_scrub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    // Two records to a segment, so the removals touch two that are kept.
    let store = manual(dir.path(), 300);
    let s: Vec<u64> = (1..=4).map(|i| one(&store, &a, i, &[i; 80])).collect();
    store.flush().expect("flush");
    assert_eq!(store.segments(), 2);
    store.remove(&a, &[s[0], s[2]]).expect("remove");
    crash(store);
    let store = manual(dir.path(), 300);
    assert_eq!(seqs(&store, &a), vec![s[1], s[3]], "acked ones stay gone");
    // The scan queued them for the scrub, which takes their ciphertext.
    assert!(disk_holds(dir.path(), &[3; 80]));
    store.scrub().expect("scrub");
    assert!(!disk_holds(dir.path(), &[3; 80]));
    assert!(disk_holds(dir.path(), &[4; 80]));
}

#[test]
fn a_flush_syncs_the_segments_removals_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = manual(dir.path(), 1 << 20);
    let s = one(&store, &a, 1, b"one");
    one(&store, &a, 2, b"two");
    store.flush().expect("flush");
    let active = lock(&store.shared.writer).active.id;
    store.remove(&a, &[s]).expect("remove");
    let dirty: Vec<u64> = lock(&store.shared.ack_dirty).iter().map(|s| s.id).collect();
    assert_eq!(dirty, vec![active]);
    assert!(
        !lock(&store.shared.writer).dirty,
        "no append since the flush"
    );
    store.flush().expect("flush");
    assert!(lock(&store.shared.ack_dirty).is_empty());
    // The flush really syncs what a removal wrote: a segment whose sync fails (on
    // /dev/null, fdatasync gives EINVAL) fails it, though no append is pending.
    store.remove(&a, &[s + 1]).expect("remove");
    let failing = Arc::new(Segment {
        id: active,
        file: File::open("/dev/null").expect("/dev/null"),
    });
    *lock(&store.shared.ack_dirty) = vec![failing];
    assert!(store.flush().is_err(), "the ack's segment was synced");
    crash(store);
}

#[test]
fn a_failed_removal_write_refuses_the_ack_and_keeps_the_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = manual(dir.path(), 64);
    let s: Vec<u64> = (1..=3).map(|i| one(&store, &a, i, &[i; 80])).collect();
    store.flush().expect("flush");
    let segment_of = |seq: u64| {
        let index = lock(&store.shared.index);
        index.mailboxes[&a].entries[&seq].segment
    };
    refuse_writes(&store, dir.path(), segment_of(s[1]));
    let before = store.usage(&a).expect("usage");
    let err = store.remove(&a, &[s[1]]).expect_err("the write fails");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert_eq!(seqs(&store, &a), s, "nothing was removed");
    assert_eq!(store.usage(&a).expect("usage"), before);
    assert_eq!(store.expired(100, 10).expect("expired").len(), 3);
    // In one ack over several segments, what was marked before the failure is
    // removed and the rest kept.
    let err = store.remove(&a, &[s[0], s[1], s[2]]);
    assert!(err.is_err());
    assert_eq!(seqs(&store, &a), vec![s[1], s[2]]);
    assert_eq!(store.usage(&a).expect("usage").messages, 2);
    store.flush().expect("flush");
    crash(store);
    let store = manual(dir.path(), 64);
    assert_eq!(seqs(&store, &a), vec![s[1], s[2]], "kept across a restart");
    store.remove(&a, &[s[1], s[2]]).expect("remove");
    assert!(seqs(&store, &a).is_empty());
}

fn open_at(dir: &Path, now: UnixMillis) -> LogStore {
    LogStore::open(
        dir,
        LogOptions {
            segment_bytes: 1 << 20,
            background: false,
            now,
            write_behind: false,
        },
    )
    .expect("open")
}

#[test]
fn a_message_expired_at_start_is_not_indexed_and_is_scrubbed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let store = open_at(dir.path(), 0);
    let old = store
        .append(&a, &[msg(1, &[0x55; 80])], 1, 100)
        .expect("append");
    let young = store
        .append(&b, &[msg(2, &[0x66; 80])], 1, 1000)
        .expect("append");
    store.flush().expect("flush");
    crash(store);
    let store = open_at(dir.path(), 100);
    assert!(seqs(&store, &a).is_empty(), "expired: never indexed");
    assert_eq!(store.usage(&a).expect("usage"), Usage::default());
    assert_eq!(store.expired(u64::MAX, 10).expect("expired").len(), 1);
    assert_eq!(seqs(&store, &b), young);
    assert!(disk_holds(dir.path(), &[0x55; 64]));
    store.scrub().expect("scrub");
    assert!(!disk_holds(dir.path(), &[0x55; 64]), "punched");
    assert!(disk_holds(dir.path(), &[0x66; 64]));
    let next = store
        .append(&a, &[msg(3, b"x")], 100, 1000)
        .expect("append");
    assert!(next[0] > old[0] && next[0] > young[0]);
}

fn sidecar(dir: &Path, id: u64) -> Option<UnixMillis> {
    std::fs::read_to_string(pinned::sidecar_path(dir, id))
        .ok()
        .map(|s| s.trim().parse().expect("a deadline"))
}

#[test]
fn a_segment_kept_for_damage_is_deleted_at_its_deadline() {
    use tern_proto::limits::MAX_MESSAGE_TTL_MS;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (s, path, body) = three_records(dir.path(), &a);
    let id = segment_id(path.file_name().and_then(|n| n.to_str()).expect("name")).expect("id");
    // The second record's length now points into the middle of the third: the scan
    // stops there and the segment is kept.
    let mut bytes = std::fs::read(&path).expect("read");
    let second = body - record::MESSAGE_OVERHEAD;
    bytes[second + 3] = bytes[second + 3].wrapping_add(40);
    std::fs::write(&path, &bytes).expect("write");

    let store = open_at(dir.path(), 10);
    let deadline = 10 + MAX_MESSAGE_TTL_MS;
    assert_eq!(sidecar(dir.path(), id), Some(deadline));
    drop(store);
    // A later start keeps the first deadline.
    let store = open_at(dir.path(), 50);
    assert_eq!(sidecar(dir.path(), id), Some(deadline));
    assert_eq!(seqs(&store, &a), vec![s[0]]);
    store.sweep_files(deadline - 1).expect("sweep");
    assert!(path.exists());
    // At the deadline it goes as soon as its readable messages are gone (they have
    // expired by then), with what the scan could not read.
    store.sweep_files(deadline).expect("sweep");
    assert!(path.exists(), "one message still indexed");
    let due = store.expired(deadline, 10).expect("expired");
    store.expire(&a, &due).expect("expire");
    assert!(!path.exists(), "deleted");
    assert_eq!(sidecar(dir.path(), id), None, "with its sidecar");
    assert!(!disk_holds(dir.path(), &[0x33; 64]));
}

#[test]
fn a_segment_with_a_damaged_header_is_deleted_at_its_deadline() {
    use tern_proto::limits::MAX_MESSAGE_TTL_MS;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (_, path, _) = three_records(dir.path(), &a);
    let id = segment_id(path.file_name().and_then(|n| n.to_str()).expect("name")).expect("id");
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(b"XX", 0).expect("damage the header");
    drop(file);

    let store = open_at(dir.path(), 10);
    let deadline = 10 + MAX_MESSAGE_TTL_MS;
    assert!(seqs(&store, &a).is_empty());
    assert_eq!(sidecar(dir.path(), id), Some(deadline));
    drop(store);
    let store = open_at(dir.path(), 20);
    assert_eq!(
        sidecar(dir.path(), id),
        Some(deadline),
        "the deadline never moves"
    );
    store.sweep_files(deadline - 1).expect("sweep");
    assert!(path.exists());
    store.sweep_files(deadline).expect("sweep");
    assert!(!path.exists());
    assert_eq!(sidecar(dir.path(), id), None);
    drop(store);
    // A start after the deadline deletes such a segment at once.
    let (_, path, _) = three_records(dir.path(), &a);
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(b"XX", 0).expect("damage the header");
    drop(file);
    drop(open_at(dir.path(), 30));
    assert!(path.exists());
    drop(open_at(dir.path(), 30 + MAX_MESSAGE_TTL_MS));
    assert!(!path.exists());
}

#[test]
fn a_segment_with_damaged_records_goes_when_its_last_message_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let (s, path, at) = three_records(dir.path(), &a);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    let store = open_at(dir.path(), 0);
    assert_eq!(seqs(&store, &a), vec![s[0], s[2]]);
    let due = store.expired(100, 10).expect("expired");
    store.expire(&a, &due).expect("expire");
    assert!(!path.exists(), "deleted with the damaged record in it");
    assert!(!disk_holds(dir.path(), &[0x22; 64]));
}

#[test]
fn totals_follow_changes_and_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = manual(dir.path(), 1 << 20);
        crate::store::conformance::totals_rules(&store);
        let s = store
            .append(&addr(1), &[msg(1, b"one"), msg(2, b"two!")], 5, u64::MAX)
            .expect("append");
        store
            .append(&addr(2), &[msg(3, b"x")], 5, u64::MAX)
            .expect("append");
        store.remove(&addr(1), &[s[0]]).expect("remove");
        store.flush().expect("flush");
    }
    let store = manual(dir.path(), 1 << 20);
    let t = store.totals();
    assert_eq!((t.messages, t.bytes, t.mailboxes), (2, 5, 2));
}

#[test]
fn a_damaged_header_on_the_newest_segment_still_moves_the_epoch_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let mut given = Vec::new();
    for _ in 0..3 {
        let store = manual(dir.path(), 1 << 20);
        given.push(one(&store, &a, 1, b"x"));
        crash(store);
        // The newest segment holds the only trace of this epoch: its header goes.
        let newest = segment_files(dir.path()).pop().expect("a segment");
        let file = OpenOptions::new().write(true).open(&newest).expect("open");
        file.write_all_at(b"XX", 0).expect("damage the header");
    }
    let store = manual(dir.path(), 1 << 20);
    let next = one(&store, &a, 2, b"y");
    assert!(
        given.iter().all(|g| next > *g),
        "{next} repeats an epoch of {given:?}"
    );
}

#[test]
fn purge_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::purge_rules(&manual(dir.path(), 64));
    let big = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::purge_rules(
        &LogStore::open(big.path(), LogOptions::default()).expect("open"),
    );
}

#[test]
fn a_purged_mailbox_leaves_no_address_or_payload_in_the_segments_after_settle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = manual(dir.path(), 4096);
    let (gone, kept) = (addr(0x5a), addr(0x6b));
    for i in 0..20u8 {
        one(&store, &gone, i, b"secret-payload-of-the-deleted");
        one(&store, &kept, i, b"payload-that-stays");
    }
    store.flush().expect("flush");
    let gone_addr = crate::store::codec::addr_bytes(&gone);
    assert!(disk_holds(dir.path(), &gone_addr), "the test can see it");
    assert_eq!(store.purge(&gone).expect("purge").messages, 20);
    store.settle().expect("settle");
    store.flush().expect("flush");
    assert!(!disk_holds(dir.path(), &gone_addr));
    assert!(!disk_holds(dir.path(), b"secret-payload-of-the-deleted"));
    assert!(disk_holds(dir.path(), b"payload-that-stays"));
    drop(store);
    let store = manual(dir.path(), 4096);
    assert!(
        seqs(&store, &gone).is_empty(),
        "nothing comes back at a restart"
    );
    assert_eq!(seqs(&store, &kept).len(), 20);
}

#[path = "tests_shared.rs"]
mod shared;

#[path = "tests_remove.rs"]
mod removal;

#[path = "tests_behind.rs"]
mod behind;
