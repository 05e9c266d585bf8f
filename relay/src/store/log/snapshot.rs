//! A copy of the log as it stood when the copy began, taken while it serves (the
//! mailbox part of `store::backup`).
//!
//! Under the writer's lock the copy notes every segment and the active segment's
//! length: every append acknowledged before then lies below that length, and
//! appends after it land past it (or in later segments), which the copy leaves out.
//! Each segment is then copied with [`Shared::copying`] held alone, so no dead header
//! or scrub is half in the copy: each record in it is whole, live or dead, as a scan
//! at open expects. A removal that runs during the backup may or may not be in the
//! copy (its message may be delivered again from a restored copy; clients drop
//! duplicates by message id). Blocks of zeros (scrubbed holes) are left as holes.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::files::{segment_path, sync_dir};
use super::pinned::sidecar_path;
use super::{io, lock, LogStore, Segment};
use crate::store::StoreResult;

/// Bytes read at a time.
const CHUNK: usize = 1 << 20;
/// Zero blocks of this size are left as holes in the copy.
const HOLE: usize = 64 << 10;

impl LogStore {
    /// Copies the log into `dest` (created; it must hold no segment): what was
    /// appended before this call, with what was removed before it marked dead.
    /// Returns the segments copied.
    pub fn snapshot_into(&self, dest: &Path) -> StoreResult<usize> {
        let shared = &*self.shared;
        std::fs::create_dir_all(dest).map_err(|e| io("creating the backup directory", e))?;
        let segments: Vec<(Arc<Segment>, Option<u64>)> = {
            let w = lock(&shared.writer);
            let index = lock(&shared.index);
            let mut all: Vec<_> = index
                .segments
                .values()
                .map(|s| {
                    let limit = (s.segment.id == w.active.id).then_some(w.len);
                    (s.segment.clone(), limit)
                })
                .collect();
            all.sort_by_key(|(s, _)| s.id);
            all
        };
        for (segment, limit) in &segments {
            let copying = shared.copying.write().unwrap_or_else(|e| e.into_inner());
            copy_segment(segment, *limit, &segment_path(dest, segment.id))?;
            drop(copying);
            let pinned = sidecar_path(&shared.dir, segment.id);
            if pinned.exists() {
                std::fs::copy(&pinned, sidecar_path(dest, segment.id))
                    .map_err(|e| io("copying a pinned segment's deadline", e))?;
            }
        }
        sync_dir(dest)?;
        Ok(segments.len())
    }
}

/// Copies `segment` up to `limit` (its whole length if `None`) into a new file at
/// `to`, fsynced.
fn copy_segment(segment: &Segment, limit: Option<u64>, to: &Path) -> StoreResult<()> {
    let len = match limit {
        Some(l) => l,
        None => segment
            .file
            .metadata()
            .map_err(|e| io("reading a segment's length", e))?
            .len(),
    };
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| io("creating a backup segment", e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
        let chunk = &mut buf[..n];
        segment
            .file
            .read_exact_at(chunk, at)
            .map_err(|e| io("reading a segment for a backup", e))?;
        for (i, block) in chunk.chunks(HOLE).enumerate() {
            if block.iter().any(|&b| b != 0) {
                out.write_all_at(block, at + (i * HOLE) as u64)
                    .map_err(|e| io("writing a backup segment", e))?;
            }
        }
        at += n as u64;
    }
    out.set_len(len)
        .and_then(|()| out.sync_all())
        .map_err(|e| io("writing a backup segment", e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::conformance::{addr, msg};
    use crate::store::{LogOptions, MailboxStore};

    #[test]
    fn a_snapshot_holds_what_was_appended_before_it_and_not_what_was_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = || LogOptions {
            segment_bytes: 4096,
            ..LogOptions::default()
        };
        let log = LogStore::open(&dir.path().join("log"), options()).expect("open");
        let mut kept = Vec::new();
        for i in 0..40u8 {
            kept.extend(
                log.append(&addr(1, 1), &[msg(i, 200)], 1, u64::MAX / 2)
                    .expect("append"),
            );
        }
        assert!(log.segments() > 1, "several segments");
        log.remove(&addr(1, 1), &kept[..10]).expect("ack");
        log.scrub().expect("scrub");
        let copy = dir.path().join("copy");
        let copied = log.snapshot_into(&copy).expect("snapshot");
        assert_eq!(copied, log.segments());
        log.append(&addr(1, 1), &[msg(99, 200)], 1, u64::MAX / 2)
            .expect("after the snapshot");
        drop(log);
        let restored = LogStore::open(&copy, options()).expect("open the copy");
        let got = restored.read(&addr(1, 1), 0, 1000).expect("read");
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, kept[10..].to_vec(), "acked gone, later append absent");
        let fresh = restored
            .append(&addr(1, 1), &[msg(100, 10)], 1, u64::MAX / 2)
            .expect("append");
        assert!(fresh[0] > kept[39], "seqs go on above the copy's");
    }
}
