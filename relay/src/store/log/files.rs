//! Segment files: their names, creating and deleting them, syncing the directory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::{io, record, Segment};
use crate::store::StoreResult;

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

pub(super) fn segment_id(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

pub(super) fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory", e))
}

pub(super) fn create_segment(dir: &Path, id: u64, seq_floor: u64) -> StoreResult<Segment> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, id))
        .map_err(|e| io("creating a segment", e))?;
    if let Err(e) = file
        .write_all_at(&record::header(seq_floor), 0)
        .and_then(|()| file.sync_data())
    {
        // It holds nothing: removed, so the next roll (after a full disk) can retry.
        drop(file);
        remove_segment(dir, id);
        return Err(io("writing a segment header", e));
    }
    Ok(Segment { id, file })
}

pub(super) fn remove_segment(dir: &Path, id: u64) {
    if let Err(e) = std::fs::remove_file(segment_path(dir, id)) {
        warn!(segment = id, error = %e, "could not delete an empty mailbox log segment");
    }
}
