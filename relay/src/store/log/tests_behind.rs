//! Write-behind (`LogOptions::write_behind`): appends wait in memory for the next
//! flush, which writes them with one `pwrite`; everything that reads or writes the
//! segments sees them meanwhile.

use super::*;
use crate::store::{SharedAppend, SharedEntry};

/// A log with write-behind whose first segment counts as a zero-filled spare (the
/// background pass that prepares spares is off in these tests).
fn behind(dir: &Path, segment_bytes: u64) -> LogStore {
    let store = manual_with(dir, segment_bytes, true);
    lock(&store.shared.writer).grows = false;
    store
}

fn pending_len(store: &LogStore) -> usize {
    lock(&store.shared.pending).bytes.len()
}

#[test]
fn conformance_with_write_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::mailbox_rules(&behind(dir.path(), DEFAULT_SEGMENT_BYTES));
    let other = tempfile::tempdir().expect("tempdir");
    crate::store::conformance::shared_body_rules(&behind(other.path(), DEFAULT_SEGMENT_BYTES));
}

#[test]
fn appends_are_read_from_memory_until_the_flush_writes_them_with_one_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let store = behind(dir.path(), 1 << 20);
    let first = one(&store, &a, 1, &[0xA1; 300]);
    let batch = store
        .append(&b, &[msg(2, &[0xB2; 300]), msg(3, &[0xB3; 300])], 1, 100)
        .expect("append");
    let entries = [SharedEntry {
        to: a,
        part: Bytes::from_static(b"part"),
    }];
    let shared = store
        .append_shared(&SharedAppend {
            message_id: MessageId([4; 16]),
            body: &Bytes::from(vec![0xC4; 500]),
            entries: &entries,
            accepted_at: 1,
            expires_at: 100,
        })
        .expect("append shared");
    // Nothing written yet.
    for byte in [0xA1, 0xB2, 0xB3, 0xC4] {
        assert!(
            !disk_holds(dir.path(), &[byte; 300]),
            "{byte:#x} not on disk"
        );
    }
    assert!(pending_len(&store) > 1400);
    // Read whole from memory, the shared body too.
    let got = store.read(&a, 0, 10).expect("read");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload, Bytes::from(vec![0xA1; 300]));
    assert_eq!(got[1].seq, shared[0]);
    assert_eq!(
        got[1].shared_body.as_deref(),
        Some(&[0xC4; 500][..]),
        "the body from memory"
    );
    assert_eq!(seqs(&store, &b), batch);

    store.flush().expect("flush");
    assert_eq!(pending_len(&store), 0);
    for byte in [0xA1, 0xB2, 0xB3, 0xC4] {
        assert!(disk_holds(dir.path(), &[byte; 300]), "{byte:#x} on disk");
    }
    // A read that starts in the file and goes on into memory.
    let later = one(&store, &a, 5, &[0xA5; 300]);
    let got = store.read(&a, 0, 10).expect("read");
    let seqs_read: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs_read, vec![first, shared[0], later]);
    assert_eq!(got[2].payload, Bytes::from(vec![0xA5; 300]));
    // A crash loses what no flush wrote, as it loses what no fsync made durable:
    // under `durability = "fsync"` none of it was answered.
    crash(store);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(seqs(&store, &a), vec![first, shared[0]]);
    assert_eq!(seqs(&store, &b), batch);
}

#[test]
fn an_ack_of_pending_records_is_written_with_them_and_holds_after_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let store = behind(dir.path(), 1 << 20);
    // One record in the file, then a batch in memory right after it: one run that
    // starts in the file and ends in memory.
    let written = one(&store, &a, 1, &[1; 90]);
    store.flush().expect("flush");
    let pending: Vec<u64> = store
        .append(&a, &[msg(2, &[2; 90]), msg(3, &[3; 90])], 1, 100)
        .expect("append");
    let other = one(&store, &b, 4, &[4; 90]);
    // And a run wholly in memory.
    let last = one(&store, &a, 5, &[5; 90]);
    // Each as (segment, offset, length).
    let (first, next) = (place(&store, &a, written), place(&store, &a, pending[0]));
    let only = place(&store, &a, last);
    store
        .remove(&a, &[written, pending[0], pending[1], last])
        .expect("ack");
    assert!(seqs(&store, &a).is_empty());
    // The run's header went to the file; the records in memory keep theirs until
    // the flush writes them as they are now.
    let run: u64 = first.2 + 2 * next.2;
    assert_eq!(
        peek(dir.path(), first.0, first.1),
        record::Next::Dead(run, pending[1])
    );
    store.flush().expect("flush");
    assert_eq!(
        peek(dir.path(), next.0, next.1),
        record::Next::Record(next.2),
        "inside a run, a record keeps its header"
    );
    assert_eq!(
        peek(dir.path(), only.0, only.1),
        record::Next::Dead(only.2, last),
        "the header written in memory reached the file"
    );
    crash(store);
    let store = manual(dir.path(), 1 << 20);
    assert!(seqs(&store, &a).is_empty(), "acked ones stay gone");
    assert_eq!(seqs(&store, &b), vec![other]);
}

#[test]
fn the_scrub_writes_what_is_pending_first_so_no_ciphertext_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let store = behind(dir.path(), 1 << 20);
    let acked = store
        .append(&a, &[msg(1, &[0x71; 300]), msg(2, &[0x72; 300])], 1, 100)
        .expect("append");
    let kept = one(&store, &b, 3, &[0x73; 300]);
    store.remove(&a, &acked).expect("ack");
    // Acked while still in memory, scrubbed before any flush.
    store.scrub().expect("scrub");
    assert_eq!(pending_len(&store), 0, "the scrub wrote them first");
    store.flush().expect("flush");
    assert!(!disk_holds(dir.path(), &[0x71; 300]), "scrubbed");
    assert!(!disk_holds(dir.path(), &[0x72; 300]), "scrubbed");
    assert!(disk_holds(dir.path(), &[0x73; 300]));
    // Nothing written later brings them back.
    one(&store, &b, 4, &[0x74; 300]);
    store.flush().expect("flush");
    assert!(!disk_holds(dir.path(), &[0x71; 300]));
    drop(store);
    let store = manual(dir.path(), 1 << 20);
    assert!(seqs(&store, &a).is_empty());
    assert_eq!(seqs(&store, &b).first(), Some(&kept));
}

#[test]
fn a_roll_writes_the_segment_it_leaves_and_a_backup_copies_what_is_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    // A few records to a segment, each next segment a zero-filled spare.
    let store = behind(dir.path(), 400);
    let mut all = Vec::new();
    let mut i = 0u8;
    while store.segments() < 2 {
        i += 1;
        store.shared.prepare_spare().expect("spare");
        all.push(one(&store, &a, i, &[i; 90]));
    }
    // The segment left is whole on disk; the spare's append waits.
    for j in 1..i {
        assert!(disk_holds(dir.path(), &[j; 90]), "{j} written by the roll");
    }
    assert!(!disk_holds(dir.path(), &[i; 90]), "{i} waits");
    assert!(pending_len(&store) > 0);
    let copy = tempfile::tempdir().expect("tempdir");
    let copy = copy.path().join("copy");
    store.snapshot_into(&copy).expect("backup");
    let restored = manual(&copy, 400);
    assert_eq!(
        seqs(&restored, &a),
        all,
        "the backup holds the pending append"
    );
}

#[test]
fn a_segment_that_grows_is_written_at_once() {
    // As on a nearly full disk, where no spare is prepared: a full disk then refuses
    // the append itself, never a flush that acks wait for too.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = manual_with(dir.path(), 1 << 20, true);
    one(&store, &addr(1), 1, &[0x66; 200]);
    assert!(disk_holds(dir.path(), &[0x66; 200]));
    assert_eq!(pending_len(&store), 0);
}

#[test]
fn a_flush_whose_write_fails_latches_and_keeps_what_was_pending_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = behind(dir.path(), 1 << 20);
    let before = one(&store, &a, 1, &[0x51; 200]);
    store.flush().expect("flush");
    let good = Arc::clone(&lock(&store.shared.writer).active);
    {
        // The disk refuses writes: the writer's handle becomes a read-only one.
        let mut w = lock(&store.shared.writer);
        let read_only = File::open(segment_path(dir.path(), good.id)).expect("open");
        w.active = Arc::new(Segment {
            id: good.id,
            file: read_only,
        });
    }
    let waiting = one(&store, &a, 2, &[0x52; 200]);
    let err = store.flush().expect_err("the write fails");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    // Its sender may wait for a later flush: none says it is stored, even once the
    // disk takes writes again.
    lock(&store.shared.writer).active = good;
    assert!(store.flush().is_err(), "latched");
    let third = store.append(&a, &[msg(3, b"x")], 1, 100).expect("append");
    assert!(store.flush().is_err(), "still latched");
    // What was appended stays readable meanwhile.
    assert_eq!(seqs(&store, &a), vec![before, waiting, third[0]]);
    crash(store);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(
        seqs(&store, &a),
        vec![before],
        "only what a flush made durable"
    );
    assert!(!disk_holds(dir.path(), &[0x52; 200]));
}

#[test]
fn appends_that_no_flush_takes_are_written_once_they_reach_the_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = behind(dir.path(), 64 << 20);
    let payload = vec![0x33; 60_000];
    let mut all = Vec::new();
    for i in 0..100u8 {
        all.push(one(&store, &a, i, &payload));
        assert!(pending_len(&store) <= MAX_PENDING);
    }
    assert!(disk_holds(dir.path(), &payload), "the first ones written");
    // An append larger than the bound is written at once, after those before it.
    let big = one(&store, &a, 200, &vec![0x44; MAX_PENDING + 1]);
    assert_eq!(pending_len(&store), 0);
    let last = one(&store, &a, 201, &[0x55; 10]);
    all.extend([big, last]);
    store.flush().expect("flush");
    crash(store);
    let store = manual(dir.path(), 64 << 20);
    assert_eq!(seqs(&store, &a), all);
    let read = store.read(&a, big - 1, 1).expect("read");
    assert_eq!(read[0].payload.len(), MAX_PENDING + 1);
}

#[test]
fn whatever_writes_the_pending_appends_leaves_them_to_the_next_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = addr(1);
    let store = behind(dir.path(), 1 << 20);
    let copies = tempfile::tempdir().expect("tempdir");
    type Write<'a> = &'a dyn Fn(&LogStore);
    let writers: [(&str, Write<'_>); 2] = [
        ("a scrub", &|s| s.scrub().expect("scrub")),
        ("a backup", &|s| {
            let to = copies.path().join(format!("{}", pending_len(s)));
            s.snapshot_into(&to).map(|_| ()).expect("backup");
        }),
    ];
    for (i, (name, write)) in writers.into_iter().enumerate() {
        one(&store, &a, i as u8, &[9; 100]);
        // A flush that wrote what was pending before this append, and cleared the
        // segment's mark after it: its fsync did not cover these bytes.
        lock(&store.shared.writer).dirty = false;
        write(&store);
        assert_eq!(pending_len(&store), 0, "{name} wrote them");
        assert!(
            lock(&store.shared.writer).dirty,
            "after {name}, the next flush fsyncs them"
        );
    }
}
