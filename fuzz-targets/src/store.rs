//! The relay's mailbox log, read back from a segment file of fuzzed bytes.

use std::collections::BTreeSet;
use std::path::Path;

use tern_relay::store::{LogOptions, LogStore, MailboxStore};

/// The name of the first segment a log opens.
pub const SEGMENT_NAME: &str = "0000000000000001.seg";

/// Writes the bytes as the log's only segment, opens the relay's [`LogStore`] on it
/// and reads every mailbox, then does it again after a reopen. Rules: opening never
/// panics (a damaged segment is a typed error or skipped records); every indexed
/// message can be read; a reopen reads the same count.
pub fn log_scan(data: &[u8]) {
    // TMPDIR=/dev/shm keeps this off the disk (see fuzz/README.md).
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join(SEGMENT_NAME), data).expect("writing the segment");
    let Some(first) = open_and_read(dir.path()) else {
        return;
    };
    let second = open_and_read(dir.path()).expect("a log that opened once opens again");
    assert_eq!(first, second, "a reopen reads a different log");
}

/// Messages read per mailbox, or `None` if the log refused to open.
fn open_and_read(dir: &Path) -> Option<Vec<usize>> {
    let options = LogOptions {
        background: false,
        ..LogOptions::default()
    };
    let store = LogStore::open(dir, options).ok()?;
    let indexed = store.count_messages();
    // Every message has an expiry entry; the end of time lists them all.
    let entries = store
        .expired(u64::MAX, usize::MAX)
        .expect("the expiry index");
    assert_eq!(
        entries.len() as u64,
        indexed,
        "expiry index and mailboxes disagree"
    );
    let mailboxes: BTreeSet<_> = entries.iter().map(|e| e.to).collect();
    let mut counts = Vec::new();
    for of in &mailboxes {
        let read = store
            .read(of, 0, usize::MAX)
            .expect("an indexed mailbox reads");
        let usage = store.usage(of).expect("usage");
        assert_eq!(
            read.len() as u64,
            usage.messages,
            "usage counts differ from reads"
        );
        counts.push(read.len());
    }
    assert_eq!(counts.iter().sum::<usize>() as u64, indexed);
    Some(counts)
}
