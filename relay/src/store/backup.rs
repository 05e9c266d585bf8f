//! Backups of a running embedded relay: [`backup_new`] writes a data directory that a
//! relay starts on, holding everything acknowledged before the backup began.
//!
//! What it copies, in this order, and why the copy is consistent
//! (ARCHITECTURE.md, "Backups"):
//! 0. The certificate, the signing key and the OPRF key: first, so a directory that
//!    has a store has the relay's identity (without them a relay would make new ones).
//! 1. The sled database (accounts, keys, tokens, the blob index, groups, discovery),
//!    tree by tree ([`SledStore::snapshot_into`]): every record written before the
//!    backup began is in it.
//! 2. The mailbox log ([`LogStore::snapshot_into`]): every append acknowledged before
//!    the backup began, cut at the active segment's length then, each record whole.
//! 3. Blob files, hard-linked where the backup is on the same file system (a finished
//!    blob's file never changes: copy-free), else copied; after the index, so every
//!    blob the copied index names has its file (unless it expired meanwhile).
//!    Unfinished uploads are copied as they are (an upload resumes from its length).
//! 4. The published discovery files, then, once everything is synced, the
//!    data-format version file; the directory is renamed into place after it.
//!
//! Blob bytes in an object store (`[objects]`) are not copied: the bucket has its own
//! versioning. A relay on PostgreSQL is backed up with the database's own tools.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{LogStore, SledStore, StoreError, StoreResult, Stores};

/// The stores of a relay on its own data directory, by their own types.
#[derive(Debug)]
pub struct Embedded {
    data_dir: PathBuf,
    sled: Arc<SledStore>,
    log: Option<Arc<LogStore>>,
}

impl Embedded {
    /// The stores opened in `data_dir` (`log` unless mailboxes are in sled).
    pub fn new(data_dir: &Path, sled: Arc<SledStore>, log: Option<Arc<LogStore>>) -> Self {
        Embedded {
            data_dir: data_dir.to_path_buf(),
            sled,
            log,
        }
    }
}

/// What a backup wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackedUp {
    /// sled records.
    pub records: u64,
    /// Mailbox log segments.
    pub segments: usize,
    /// Blob files (linked or copied) and unfinished uploads.
    pub blobs: u64,
    /// Of those, linked rather than copied.
    pub linked: u64,
}

impl std::fmt::Display for BackedUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} database records, {} mailbox log segments, {} blob files ({} hard-linked)",
            self.records, self.segments, self.blobs, self.linked
        )
    }
}

/// Files copied as they are from the data directory's top.
const FILES: &[&str] = &[
    crate::net::tls::CERT_FILE,
    crate::net::tls::KEY_FILE,
    crate::net::tls::SIGNING_KEY_FILE,
    crate::discovery::oprf::KEY_FILE,
];

fn io(what: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::from_io(&format!("backup: {what} {}", path.display()), e)
}

/// Writes a backup of the running relay whose stores are `stores` into `dest`, a
/// directory made for it: the keys and certificate first, then the stores, the
/// blobs and the published discovery files, everything synced, and the version file
/// last (through [`backup_new`], `dest` is a directory of its own that becomes the
/// backup only once complete). Blocking (it copies files): call it from a blocking
/// thread. Sends, deliveries and acks go on meanwhile. Stops between files once
/// `cancel` is set.
fn backup(embedded: &Embedded, dest: &Path, cancel: &AtomicBool) -> StoreResult<BackedUp> {
    let check = || {
        if cancel.load(Ordering::Relaxed) {
            Err(StoreError::Backend(CANCELLED.into()))
        } else {
            Ok(())
        }
    };
    let from = &embedded.data_dir;
    for name in FILES {
        let src = from.join(name);
        if src.exists() {
            super::fault::check(super::fault::Site::BackupWrite)
                .and_then(|()| std::fs::copy(&src, dest.join(name)))
                .map_err(|e| io("copying", &src, &e))?;
        }
    }
    check()?;
    let mut done = BackedUp {
        records: embedded.sled.snapshot_into(&dest.join("db"))?,
        ..BackedUp::default()
    };
    check()?;
    if let Some(log) = &embedded.log {
        done.segments = log.snapshot_into(&dest.join("mailboxes"))?;
    }
    for (dir, link) in [("blobs", true), ("uploads", false)] {
        let (files, linked) = copy_tree(&from.join(dir), &dest.join(dir), link, cancel)?;
        done.blobs += files;
        done.linked += linked;
    }
    copy_tree(
        &from.join("discovery"),
        &dest.join("discovery"),
        false,
        cancel,
    )?;
    check()?;
    sync_tree(dest)?;
    // Last (a directory of relay files without it reads as format 1), and the
    // rename into place after it: only a complete backup is ever at its name.
    super::version::write(dest, super::version::CURRENT)
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    let version = dest.join(super::version::FILE);
    std::fs::set_permissions(&version, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::File::open(&version)?.sync_all())
        .map_err(|e| io("setting the mode of", &version, &e))?;
    Ok(done)
}

/// Why [`backup_new`] wrote nothing, or failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Refused before anything was written: the destination, or the stores.
    #[error("backup refused: {0}")]
    Refused(String),
    /// Refused before anything was written: the destination's file system has less
    /// free space than the backup needs and the reserve it must keep.
    #[error(
        "backup refused: it needs about {needed} bytes, and keeping the reserve of \
         {reserve} bytes free, the destination's file system has {available} bytes free"
    )]
    NoSpace {
        /// What the backup would write (an estimate from the data directory's files).
        needed: u64,
        /// Free bytes on the destination's file system.
        available: u64,
        /// Bytes to be left free there (`[budget] min_free_disk_bytes`).
        reserve: u64,
    },
    /// Failed part way; what was written is removed.
    #[error("backup failed: {0}")]
    Failed(#[from] StoreError),
    /// Stopped through its cancel flag; what was written is removed.
    #[error("backup cancelled")]
    Cancelled,
}

/// The error a cancelled step returns (told apart by [`backup_new`]).
const CANCELLED: &str = "backup: cancelled";

/// The directory a backup is built in, beside its destination; removed when dropped
/// unless the backup completed (a failure, a cancel or a panic leaves nothing).
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes a backup of the running relay whose stores are `stores` into `dest`, a new
/// directory: a data directory a relay starts on, serving everything acknowledged
/// before this call. `dest` must be an absolute path that does not exist, in a
/// directory that does, outside the data directory (a backup inside it would copy
/// itself). The backup is built in `DEST.partial-<pid>` beside it (mode 0700, its
/// files 0600 but for hard-linked blob files, which keep the data directory's),
/// synced, and renamed to `dest` only once complete, so nothing incomplete is ever
/// at `dest` (a killed backup leaves at most the partial directory, which no one
/// takes for a backup); a backup that fails, is cancelled through `cancel` or
/// panics removes it. It is refused ([`BackupError::NoSpace`]) when the destination's
/// file system has less free space than the backup needs plus `reserve` bytes; a
/// disk that fills up all the same (ENOSPC) fails it, partial directory removed.
/// Blocking: call it from a blocking thread.
pub fn backup_new(
    stores: &Stores,
    dest: &Path,
    cancel: &AtomicBool,
    reserve: u64,
) -> Result<BackedUp, BackupError> {
    let refused = |why: String| Err(BackupError::Refused(why));
    let Some(embedded) = &stores.embedded else {
        return refused(
            "this relay keeps its state in PostgreSQL: back up the database with its own tools"
                .into(),
        );
    };
    if !dest.is_absolute() {
        return refused(format!("{} is not an absolute path", dest.display()));
    }
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return refused(format!("{} names no new directory", dest.display()));
    };
    let parent = match parent.canonicalize() {
        Ok(p) => p,
        Err(e) => return refused(format!("{}: {e}", parent.display())),
    };
    let data = embedded
        .data_dir
        .canonicalize()
        .map_err(|e| io("resolving", &embedded.data_dir, &e))?;
    if parent.starts_with(&data) {
        return refused(format!(
            "{} is inside the data directory {}: choose a directory outside it",
            dest.display(),
            data.display()
        ));
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        return refused(format!(
            "{} exists: a backup goes into a new directory",
            dest.display()
        ));
    }
    let needed = needed_at(&embedded.data_dir, &parent)
        .map_err(|e| BackupError::Refused(format!("measuring the data directory: {e}")))?;
    let available = super::disk_sample(&parent)
        .map_err(|e| BackupError::Refused(format!("{}: {e}", parent.display())))?
        .free;
    if needed.saturating_add(reserve) > available {
        return Err(BackupError::NoSpace {
            needed,
            available,
            reserve,
        });
    }
    let mut partial_name = name.to_os_string();
    partial_name.push(format!(".partial-{}", std::process::id()));
    let partial_path = parent.join(partial_name);
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&partial_path) {
        return refused(format!("creating {}: {e}", partial_path.display()));
    }
    let mut partial = Partial {
        path: partial_path,
        done: false,
    };
    // The umask may have narrowed the mode, never widened it; set it exactly.
    std::fs::set_permissions(&partial.path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("setting the mode of", &partial.path, &e))?;
    let done = backup(embedded, &partial.path, cancel).map_err(|e| match e {
        StoreError::Backend(m) if m == CANCELLED => BackupError::Cancelled,
        e => BackupError::Failed(e),
    })?;
    let dest = parent.join(name);
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &partial.path,
        rustix::fs::CWD,
        &dest,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| {
        if e == rustix::io::Errno::EXIST {
            BackupError::Refused(format!(
                "{} appeared while the backup ran: a backup goes into a new directory",
                dest.display()
            ))
        } else {
            BackupError::Failed(io("renaming into", &dest, &e.into()))
        }
    })?;
    partial.done = true;
    std::fs::File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", &parent, &e))?;
    Ok(done)
}

/// The bytes a backup of `data_dir` into a directory in `parent` writes, about: the
/// disk space the files it copies take (a sparse log segment's holes stay holes), the
/// blob files only when they cannot be hard-linked ([`links_into`]).
fn needed_at(data_dir: &Path, parent: &Path) -> std::io::Result<u64> {
    let mut needed = 0u64;
    for name in FILES {
        needed = needed.saturating_add(used(&data_dir.join(name))?);
    }
    for dir in ["db", "mailboxes", "uploads", "discovery", "blobs"] {
        let path = data_dir.join(dir);
        match std::fs::metadata(&path) {
            Ok(_) if dir == "blobs" && links_into(&path, parent) => continue,
            Ok(_) => needed = needed.saturating_add(used(&path)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(needed)
}

/// Whether the files under `dir` can be hard-linked into `parent`, as the copy will
/// try: asked of one real link, since one file system mounted twice (bind mounts, a
/// container's volumes) shows one device number yet refuses links across mounts.
/// With no file there is nothing to copy either way.
fn links_into(dir: &Path, parent: &Path) -> bool {
    let Some(file) = first_file(dir) else {
        return true;
    };
    let probe = parent.join(format!(".tern-link-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    let linked = std::fs::hard_link(&file, &probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    linked
}

/// The first regular file under `dir`, depth first.
fn first_file(dir: &Path) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_file() => return Some(path),
            Ok(t) if t.is_dir() => {
                if let Some(f) = first_file(&path) {
                    return Some(f);
                }
            }
            _ => {}
        }
    }
    None
}

/// The disk space the files under `path` take (a file's length when smaller than
/// its blocks); nothing for what vanished meanwhile.
fn used(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(meta.len().min(meta.blocks().saturating_mul(512)));
    }
    let mut total = 0u64;
    for entry in std::fs::read_dir(path)? {
        total = total.saturating_add(used(&entry?.path())?);
    }
    Ok(total)
}

/// Copies the files under `from` into `to`, stopping once `cancel` is set (hard links when `link` and the file
/// system allows). A file that vanished meanwhile (an expired blob) is skipped.
/// Returns the files written and how many of them are links.
fn copy_tree(from: &Path, to: &Path, link: bool, cancel: &AtomicBool) -> StoreResult<(u64, u64)> {
    let mut done = (0, 0);
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(io("listing", from, &e)),
    };
    std::fs::create_dir_all(to).map_err(|e| io("creating", to, &e))?;
    for entry in entries {
        if cancel.load(Ordering::Relaxed) {
            return Err(StoreError::Backend(CANCELLED.into()));
        }
        let entry = entry.map_err(|e| io("listing", from, &e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("reading", &src, &e)),
        };
        if kind.is_dir() {
            let (files, linked) = copy_tree(&src, &dst, link, cancel)?;
            done = (done.0 + files, done.1 + linked);
            continue;
        }
        let linked = link && std::fs::hard_link(&src, &dst).is_ok();
        if !linked {
            match super::fault::check(super::fault::Site::BackupWrite)
                .and_then(|()| std::fs::copy(&src, &dst))
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("copying", &src, &e)),
            }
        }
        done = (done.0 + 1, done.1 + u64::from(linked));
    }
    Ok(done)
}

/// Fsyncs every file and directory under `dir`, making the backup's own files 0600
/// and directories 0700 whatever the umask (a hard-linked blob file, which has
/// other links, is the data directory's and keeps its mode).
fn sync_tree(dir: &Path) -> StoreResult<()> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).map_err(|e| io("listing", dir, &e))?;
    for entry in entries {
        let path = entry.map_err(|e| io("listing", dir, &e))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io("reading", &path, &e))?;
        if meta.is_dir() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io("setting the mode of", &path, &e))?;
            sync_tree(&path)?;
            continue;
        }
        if meta.nlink() == 1 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("setting the mode of", &path, &e))?;
        }
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("syncing", &path, &e))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, &e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::Config;
    use tern_platform::clock::SystemClock;

    /// A relay's stores on a new data directory, with its certificate and keys, and
    /// a directory for backups.
    fn relay_dir() -> (
        tempfile::TempDir,
        tempfile::TempDir,
        crate::admin::lock::DirLock,
        Stores,
    ) {
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path();
        let config = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        let opened = crate::server::open_stores(&config, &SystemClock).expect("open");
        crate::net::tls::load_or_create(&config.tls, dir).expect("cert");
        crate::net::tls::load_or_create_signing_key(dir).expect("signing key");
        std::fs::create_dir_all(dir.join("blobs")).expect("blobs");
        std::fs::write(dir.join("blobs").join("b1"), b"blob").expect("blob");
        let out = tempfile::tempdir().expect("tempdir");
        (data, out, opened.0, opened.1)
    }

    fn leftovers(parent: &Path) -> Vec<String> {
        std::fs::read_dir(parent)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".partial-"))
            .collect()
    }

    #[test]
    fn a_backup_appears_at_its_name_whole_with_private_modes() {
        let (_data, out, _lock, stores) = relay_dir();
        let dest = out.path().join("b");
        // Under the usual umask (022) sled's files would be 0644.
        let done = backup_new(&stores, &dest, &AtomicBool::new(false), 0).expect("backup");
        assert_eq!(done.blobs, 1);
        assert_eq!(
            crate::store::version::read(&dest).expect("version"),
            Some(crate::store::version::CURRENT)
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dest), 0o700);
        assert_eq!(mode(&dest.join("db")), 0o700);
        for name in [crate::net::tls::CERT_FILE, crate::store::version::FILE] {
            assert_eq!(mode(&dest.join(name)), 0o600, "{name}");
        }
        assert!(leftovers(out.path()).is_empty());
    }

    #[test]
    fn a_cancelled_backup_leaves_nothing_at_its_name_nor_beside_it() {
        let (_data, out, _lock, stores) = relay_dir();
        let dest = out.path().join("b");
        let failed = backup_new(&stores, &dest, &AtomicBool::new(true), 0);
        assert!(matches!(failed, Err(BackupError::Cancelled)), "{failed:?}");
        assert!(!dest.exists(), "a partial backup at its name");
        assert!(
            leftovers(out.path()).is_empty(),
            "{:?}",
            leftovers(out.path())
        );
    }

    #[test]
    fn a_backup_the_destination_has_no_room_for_is_refused_naming_both_figures() {
        let (data, out, _lock, stores) = relay_dir();
        let dest = out.path().join("b");
        let free = crate::store::disk_sample(out.path()).expect("statvfs").free;
        let needed = needed_at(data.path(), out.path()).expect("measure");
        assert!(needed > 0, "the database and the keys take room");
        // A reserve that leaves no room for it, whatever else writes meanwhile.
        let refused = backup_new(&stores, &dest, &AtomicBool::new(false), free);
        let Err(BackupError::NoSpace {
            needed: said,
            available,
            reserve,
        }) = refused
        else {
            panic!("not refused for room: {refused:?}");
        };
        assert!(
            said > 0 && available > 0 && reserve == free,
            "{said} {available}"
        );
        let message = BackupError::NoSpace {
            needed: said,
            available,
            reserve,
        }
        .to_string();
        assert!(
            message.contains(&said.to_string()) && message.contains(&available.to_string()),
            "{message}"
        );
        assert!(!dest.exists());
        assert!(leftovers(out.path()).is_empty());
        // With the reserve met, it goes ahead.
        backup_new(&stores, &dest, &AtomicBool::new(false), 0).expect("backup");
    }

    #[test]
    fn blob_files_a_backup_links_need_no_room() {
        let (data, out, _lock, _stores) = relay_dir();
        // Measured first: the database only grows meanwhile.
        let needed = needed_at(data.path(), out.path()).expect("measure");
        let blobs = used(&data.path().join("blobs")).expect("blobs");
        assert!(blobs > 0);
        let all = used(data.path()).expect("all");
        let links = links_into(&data.path().join("blobs"), out.path());
        assert!(
            std::fs::read_dir(out.path()).expect("out").next().is_none(),
            "the probe link is gone"
        );
        if links {
            assert!(needed <= all - blobs, "{needed} > {all} - {blobs}");
        } else {
            assert!(needed >= blobs, "{needed} < {blobs}");
        }
    }

    #[test]
    fn a_destination_that_exists_is_refused_and_left_alone() {
        let (_data, out, _lock, stores) = relay_dir();
        let dest = out.path().join("b");
        std::fs::create_dir(&dest).expect("mkdir");
        let refused = backup_new(&stores, &dest, &AtomicBool::new(false), 0);
        assert!(
            matches!(refused, Err(BackupError::Refused(_))),
            "{refused:?}"
        );
        assert!(dest.exists());
        assert!(leftovers(out.path()).is_empty());
    }
}
