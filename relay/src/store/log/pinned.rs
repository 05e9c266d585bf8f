//! Segments kept for damage, and the deadline that still deletes them (P3).
//!
//! A segment whose header is damaged, or whose scan stopped at damage it could not
//! step over, may hold records no scan can read, so it is not deleted when its
//! readable messages are gone. It is not kept forever either: the first start that
//! finds it writes a sidecar `<id>.pinned` holding `now + MAX_MESSAGE_TTL_MS`. Every
//! record in it was accepted before that start, so all have expired by then; once the
//! deadline passes, the segment is deleted like any other. Later starts read the
//! sidecar, so the deadline never moves (file times would: scrubs write the file).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tern_platform::clock::UnixMillis;
use tern_proto::limits::MAX_MESSAGE_TTL_MS;
use tracing::warn;

use super::{io, lock, remove_segment, sync_dir, Shared};
use crate::store::StoreResult;

pub(super) fn sidecar_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.pinned"))
}

/// The deadline of a kept segment: read from its sidecar, or written there now (the
/// first time the segment is found damaged, or if a crash tore the sidecar).
pub(super) fn deadline(dir: &Path, id: u64, now: UnixMillis) -> StoreResult<UnixMillis> {
    let path = sidecar_path(dir, id);
    if let Some(d) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<UnixMillis>().ok())
    {
        return Ok(d);
    }
    let deadline = now.saturating_add(MAX_MESSAGE_TTL_MS);
    let tmp = path.with_extension("pinned.tmp");
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{deadline}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    written.map_err(|e| io("writing a kept segment's deadline", e))?;
    sync_dir(dir)?;
    Ok(deadline)
}

/// Deletes a kept segment's sidecar, if it has one.
pub(super) fn remove_sidecar(dir: &Path, id: u64) {
    match std::fs::remove_file(sidecar_path(dir, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!(segment = id, error = %e, "could not delete a kept segment's deadline file");
        }
        _ => {}
    }
}

impl Shared {
    /// Ends the keeping of segments whose deadline is `now` or earlier: one that is
    /// not indexed (a damaged header) is deleted at once; one that is goes as soon as
    /// its readable messages are gone too (they expire by the same deadline).
    pub(super) fn sweep_files(&self, now: UnixMillis) -> StoreResult<()> {
        let (unindexed, emptied) = {
            let mut index = lock(&self.index);
            if index.deadlines.iter().all(|&(_, d)| d > now) {
                return Ok(());
            }
            let (due, kept) = index.deadlines.iter().partition(|&&(_, d)| d <= now);
            index.deadlines = kept;
            let mut unindexed = Vec::new();
            let mut emptied = Vec::new();
            for (id, _) in due {
                match index.segments.get_mut(&id) {
                    Some(s) => {
                        s.pinned = false;
                        emptied.extend(index.take_if_empty(id).map(|s| s.id));
                    }
                    None => unindexed.push(id),
                }
            }
            (unindexed, emptied)
        };
        for id in unindexed {
            remove_segment(&self.dir, id);
            remove_sidecar(&self.dir, id);
            self.unlinked.store(true, Ordering::Release);
        }
        for id in emptied {
            self.delete_segment(id);
        }
        Ok(())
    }
}
