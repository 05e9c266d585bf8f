//! Shared bodies in the log: stored once on disk, dropped from it with the last
//! entry, rebuilt by the scan at open, and never lost to a torn fan-out.

use super::*;
use crate::store::conformance::{shared_bodies_across_reopen, shared_body_rules};
use crate::store::{SharedAppend, SharedEntry, Totals};

const MARKER: &[u8] = b"shared-body-marker-6f1c";

fn body() -> Bytes {
    let mut b = MARKER.to_vec();
    b.resize(400, 0x5A);
    Bytes::from(b)
}

fn devices(n: u32) -> Vec<DeviceAddress> {
    (1..=n)
        .map(|d| DeviceAddress::from_wire(&[40; 16], d).expect("addr"))
        .collect()
}

fn fan_out(store: &LogStore, to: &[DeviceAddress], body: &Bytes, expires_at: u64) -> Vec<u64> {
    let entries: Vec<SharedEntry> = to
        .iter()
        .map(|a| SharedEntry {
            to: *a,
            part: Bytes::from_static(b"part"),
        })
        .collect();
    store
        .append_shared(&SharedAppend {
            message_id: MessageId([3; 16]),
            body,
            entries: &entries,
            accepted_at: 1,
            expires_at,
        })
        .expect("append shared")
}

/// How many times `needle` appears in the segment files.
fn on_disk(dir: &Path, needle: &[u8]) -> usize {
    segment_files(dir)
        .iter()
        .map(|p| {
            std::fs::read(p)
                .expect("read")
                .windows(needle.len())
                .filter(|w| *w == needle)
                .count()
        })
        .sum()
}

#[test]
fn conformance_shared_bodies() {
    let dir = tempfile::tempdir().expect("tempdir");
    shared_body_rules(&LogStore::open(dir.path(), LogOptions::default()).expect("open"));
    let small = tempfile::tempdir().expect("tempdir");
    shared_body_rules(&manual(small.path(), 64));
    let again = tempfile::tempdir().expect("tempdir");
    shared_bodies_across_reopen(&|| Box::new(manual(again.path(), 1 << 20)));
}

#[test]
fn five_mailboxes_hold_the_body_once_on_disk_until_the_last_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = manual(dir.path(), 1 << 20);
    let five = devices(5);
    let seqs = fan_out(&store, &five, &body(), 1 << 40);
    store.flush().expect("flush");
    assert_eq!(on_disk(dir.path(), MARKER), 1, "the body is written once");
    for (a, s) in five[..4].iter().zip(&seqs) {
        store.remove(a, &[*s]).expect("ack");
    }
    store.scrub().expect("scrub");
    assert_eq!(on_disk(dir.path(), MARKER), 1, "kept for the fifth device");
    assert_eq!(
        store.read(&five[4], 0, 10).expect("read")[0]
            .shared_body
            .as_deref(),
        Some(&body()[..])
    );
    store.remove(&five[4], &[seqs[4]]).expect("ack");
    store.scrub().expect("scrub");
    assert_eq!(on_disk(dir.path(), MARKER), 0, "gone after the last ack");
}

#[test]
fn the_scan_drops_a_body_whose_entries_were_all_acked_before_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let three = devices(3);
    {
        let store = manual(dir.path(), 1 << 20);
        let seqs = fan_out(&store, &three, &body(), 1 << 40);
        for (a, s) in three.iter().zip(&seqs) {
            store.remove(a, &[*s]).expect("ack");
        }
        store.flush().expect("flush");
        // A crash: no final scrub, the body's record is still whole on disk.
        std::mem::forget(store);
    }
    assert_eq!(on_disk(dir.path(), MARKER), 1);
    let store = manual(dir.path(), 1 << 20);
    assert_eq!(store.shared_bodies(), 0, "an orphan is not indexed");
    assert_eq!(store.totals(), Totals::default());
    store.scrub().expect("scrub");
    assert_eq!(on_disk(dir.path(), MARKER), 0, "and it is scrubbed");
}

#[test]
fn an_expired_body_and_its_entries_are_dropped_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = manual(dir.path(), 1 << 20);
        fan_out(&store, &devices(2), &body(), 100);
        store.flush().expect("flush");
        std::mem::forget(store);
    }
    let store = LogStore::open(
        dir.path(),
        LogOptions {
            segment_bytes: 1 << 20,
            background: false,
            now: 200,
            write_behind: false,
        },
    )
    .expect("open");
    assert_eq!(store.shared_bodies(), 0);
    assert_eq!(store.count_messages(), 0);
    store.scrub().expect("scrub");
    assert_eq!(on_disk(dir.path(), MARKER), 0);
}

#[test]
fn a_fan_out_torn_anywhere_loses_no_body_an_entry_points_at() {
    let dir = tempfile::tempdir().expect("tempdir");
    let four = devices(4);
    {
        let store = manual(dir.path(), 1 << 20);
        fan_out(&store, &four, &body(), 1 << 40);
        store.flush().expect("flush");
        std::mem::forget(store);
    }
    let files = segment_files(dir.path());
    let last = files
        .iter()
        .rev()
        .find(|p| std::fs::metadata(p).expect("meta").len() > HEADER_LEN)
        .expect("the fan-out's segment")
        .clone();
    let full = std::fs::read(&last).expect("read");
    let start = HEADER_LEN as usize;
    // Every cut from inside the body to past the last entry, a few bytes apart.
    for cut in (start + 1..=full.len()).step_by(37).chain([full.len()]) {
        let copy = tempfile::tempdir().expect("tempdir");
        for f in &files {
            let bytes = std::fs::read(f).expect("read");
            let bytes = if *f == last { &full[..cut] } else { &bytes[..] };
            std::fs::write(copy.path().join(f.file_name().expect("name")), bytes).expect("write");
        }
        let store = manual(copy.path(), 1 << 20);
        let mut entries = 0;
        for a in &four {
            for m in store.read(a, 0, 10).expect("read") {
                assert_eq!(m.shared_body.as_deref(), Some(&body()[..]), "cut {cut}");
                entries += 1;
            }
        }
        assert_eq!(store.shared_bodies(), u64::from(entries > 0), "cut {cut}");
        // The sender's retry reaches every device, whatever the cut left.
        fan_out(&store, &four, &body(), 1 << 40);
        for a in &four {
            let got = store.read(a, 0, 10).expect("read");
            assert!(!got.is_empty() && got.iter().all(|m| m.shared_body.is_some()));
        }
        if cut == full.len() {
            assert_eq!(entries, 4, "the whole write: every entry");
        }
    }
}

#[test]
fn a_segment_of_a_newer_format_stops_the_open_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(manual(dir.path(), 1 << 20));
    let mut h = record::header(1 << 40);
    h[7] = record::FORMAT + 1;
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(files::segment_path(dir.path(), 99), h).expect("write");
    let err = LogStore::open(dir.path(), LogOptions::default()).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("newer relay") && text.contains("format 3"),
        "{text}"
    );
}
