//! A copy of the log as it stood when the copy began, taken while it serves (the
//! mailbox part of `store::backup`).
//!
//! Under the writer's lock the copy notes every segment and the active segment's
//! length: every append acknowledged before then lies below that length, and
//! appends after it land past it (or in later segments), which the copy leaves out.
//! Below that length a segment changes only where dead headers and scrubs write over
//! records, and those hold [`Shared::copying`] shared and note what they wrote while
//! a segment is being copied ([`Shared::overwritten`]). So each segment is copied
//! without the lock, and then, with it held alone, only the spans written over
//! meanwhile are copied again: the copy is then the segment as it stands at that
//! moment, each record whole, live or dead, as a scan at open expects. Acks wait for
//! that short patch, never for a whole segment's copy. A removal that runs during
//! the backup may or may not be in the copy (its message may be delivered again from
//! a restored copy; clients drop duplicates by message id). Blocks of zeros
//! (scrubbed holes) are left as holes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::files::{segment_path, sync_dir};
use super::holes::erase;
use super::pinned::sidecar_path;
use super::{io, lock, LogStore, Segment, Shared, Span};
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
        self.snapshot_with(dest, CHUNK, &mut |_, _| {})
    }

    /// [`LogStore::snapshot_into`], reading `chunk` bytes at a time and calling
    /// `between(segment, copied)` after each chunk (tests pause the copy there).
    pub(super) fn snapshot_with(
        &self,
        dest: &Path,
        chunk: usize,
        between: &mut dyn FnMut(u64, u64),
    ) -> StoreResult<usize> {
        let shared = &*self.shared;
        // One snapshot at a time (each takes the other's noting over otherwise).
        let _one = lock(&shared.snapshotting);
        std::fs::create_dir_all(dest).map_err(|e| io("creating the backup directory", e))?;
        let segments: Vec<(Arc<Segment>, Option<u64>)> = {
            let mut w = lock(&shared.writer);
            // The copy reads the files: what waits to be written goes first.
            shared.write_pending(&mut w)?;
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
            copy_segment(
                shared,
                segment,
                *limit,
                &segment_path(dest, segment.id),
                chunk,
                between,
            )?;
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
/// `to`, fsynced: the bytes without [`Shared::copying`], then what was written over
/// meanwhile again with it held alone (see the module docs).
fn copy_segment(
    shared: &Shared,
    segment: &Segment,
    limit: Option<u64>,
    to: &Path,
    chunk: usize,
    between: &mut dyn FnMut(u64, u64),
) -> StoreResult<()> {
    let exclusive = || shared.copying.write().unwrap_or_else(|e| e.into_inner());
    {
        // No write over the segment is under way once this is held: every later
        // one is noted.
        let _alone = exclusive();
        *lock(&shared.overwritten) = Some((segment.id, Vec::new()));
    }
    // However the copy ends (a panic included), writes stop being noted.
    struct Noting<'a>(&'a Shared);
    impl Drop for Noting<'_> {
        fn drop(&mut self) {
            lock(&self.0.overwritten).take();
        }
    }
    let _noting = Noting(shared);
    let copied = copy_bytes(segment, limit, to, chunk.max(1), between);
    let alone = exclusive();
    let noted = lock(&shared.overwritten).take();
    let (out, len) = copied?;
    let mut spans = noted.map(|(_, spans)| spans).unwrap_or_default();
    super::merge_spans(&mut spans);
    patch(segment, &out, len, &spans)?;
    drop(alone);
    out.set_len(len)
        .and_then(|()| out.sync_all())
        .map_err(|e| io("writing a backup segment", e))
}

/// The segment's bytes up to `limit` (or its length) into a new file at `to`, zero
/// blocks left as holes; the file and the length copied.
fn copy_bytes(
    segment: &Segment,
    limit: Option<u64>,
    to: &Path,
    chunk: usize,
    between: &mut dyn FnMut(u64, u64),
) -> StoreResult<(File, u64)> {
    let on_disk = segment
        .file
        .metadata()
        .map_err(|e| io("reading a segment's length", e))?
        .len();
    // A failed append marks its segment full without the file being that long.
    let len = limit.map_or(on_disk, |l| l.min(on_disk));
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| io("creating a backup segment", e))?;
    let mut buf = vec![0u8; chunk];
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(chunk as u64)).unwrap_or(chunk);
        let chunk = &mut buf[..n];
        segment
            .file
            .read_exact_at(chunk, at)
            .map_err(|e| io("reading a segment for a backup", e))?;
        for (i, block) in chunk.chunks(HOLE).enumerate() {
            if block.iter().any(|&b| b != 0) {
                crate::store::fault::check(crate::store::fault::Site::BackupWrite)
                    .and_then(|()| out.write_all_at(block, at + (i * HOLE) as u64))
                    .map_err(|e| io("writing a backup segment", e))?;
            }
        }
        at += n as u64;
        between(segment.id, at);
    }
    Ok((out, len))
}

/// Copies the spans of `segment` below `len` written over during the copy into
/// `out` again, zeros included (as holes: the copy may hold what was there before).
fn patch(segment: &Segment, out: &File, len: u64, spans: &[Span]) -> StoreResult<()> {
    let mut buf = Vec::new();
    for &(offset, span) in spans {
        let end = offset.saturating_add(span).min(len);
        let mut at = offset;
        while at < end {
            let n = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            buf.resize(n, 0);
            let failed = |e| io("copying a span written over during the backup", e);
            segment.file.read_exact_at(&mut buf, at).map_err(failed)?;
            // A scrubbed span reads as zeros: a hole in the copy too.
            for (i, block) in buf.chunks(HOLE).enumerate() {
                let offset = at + (i * HOLE) as u64;
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, offset)
                } else {
                    erase(out, offset, block.len() as u64)
                }
                .map_err(failed)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::conformance::{addr, msg};
    use crate::store::{LogOptions, MailboxStore};

    #[test]
    fn spans_written_over_are_merged_where_they_overlap_or_touch() {
        let mut spans = vec![(100, 10), (0, 5), (105, 20), (5, 5), (200, 1), (130, 0)];
        super::super::merge_spans(&mut spans);
        assert_eq!(spans, [(0, 10), (100, 25), (130, 0), (200, 1)]);
    }

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

    /// How long a step may take before the test calls it stuck.
    const STUCK: std::time::Duration = std::time::Duration::from_secs(30);

    /// Pauses a copy after its first chunk and, meanwhile, acks messages whose
    /// records straddle the copied and the uncopied part, scrubs them (one dead span
    /// over them all, the inner headers erased) and sends: all of that returns while
    /// the copy waits, and the copy opens with exactly what was queued when it
    /// finished, each record whole.
    #[test]
    fn acks_scrubs_and_sends_go_on_while_a_segment_is_copied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = || LogOptions {
            background: false,
            ..LogOptions::default()
        };
        let log = LogStore::open(&dir.path().join("log"), options()).expect("open");
        let mut kept = Vec::new();
        for i in 0..64u8 {
            kept.extend(
                log.append(&addr(1, 1), &[msg(i, 1000)], 1, u64::MAX / 2)
                    .expect("append"),
            );
        }
        assert_eq!(log.segments(), 1, "one segment, copied in many chunks");
        let copy = dir.path().join("copy");
        let (paused_tx, paused) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let (log_ref, copy_ref) = (&log, &copy);
        std::thread::scope(|s| {
            let copier = s.spawn(move || {
                let (log, copy) = (log_ref, copy_ref);
                let mut first = true;
                log.snapshot_with(copy, 16 << 10, &mut |_, _| {
                    if std::mem::take(&mut first) {
                        paused_tx.send(()).expect("paused");
                        go_rx.recv_timeout(STUCK).expect("go on");
                    }
                })
            });
            paused.recv_timeout(STUCK).expect("the copy pauses");
            let (log, kept) = (&log, &kept);
            s.spawn(move || {
                // Records 5..30 run from the first 16 KiB chunk into the rest.
                log.remove(&addr(1, 1), &kept[5..30]).expect("ack");
                log.scrub().expect("scrub");
                let sent = log
                    .append(&addr(1, 1), &[msg(200, 100)], 1, u64::MAX / 2)
                    .expect("send");
                done_tx.send(sent).expect("done");
            });
            let sent = done
                .recv_timeout(STUCK)
                .expect("an ack, a scrub and a send while the copy waits");
            assert!(sent[0] > kept[63]);
            go.send(()).expect("go");
            assert_eq!(copier.join().expect("copier").expect("snapshot"), 1);
        });
        drop(log);
        let restored = LogStore::open(&copy, options()).expect("open the copy");
        let got = restored.read(&addr(1, 1), 0, 1000).expect("read");
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        let want: Vec<u64> = kept[..5].iter().chain(&kept[30..]).copied().collect();
        assert_eq!(seqs, want, "the acks in, the later send out");
        assert!(got.iter().all(|m| m.payload.len() >= 1000), "whole records");
    }
}
