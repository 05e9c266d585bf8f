//! Backups of a running embedded relay: [`backup`] writes a data directory that a
//! relay starts on, holding everything acknowledged before the backup began.
//!
//! What it copies, in this order, and why the copy is consistent
//! (ARCHITECTURE.md, "Backups"):
//! 1. The sled database (accounts, keys, tokens, the blob index, groups, discovery),
//!    tree by tree ([`SledStore::snapshot_into`]): every record written before the
//!    backup began is in it.
//! 2. The mailbox log ([`LogStore::snapshot_into`]): every append acknowledged before
//!    the backup began, cut at the active segment's length then, each record whole.
//! 3. Blob files, hard-linked where the backup is on the same file system (a finished
//!    blob's file never changes: copy-free), else copied; after the index, so every
//!    blob the copied index names has its file (unless it expired meanwhile).
//!    Unfinished uploads are copied as they are (an upload resumes from its length).
//! 4. The certificate, the signing key, the OPRF key (mode kept), the published
//!    discovery files, and the data-format version file.
//!
//! Blob bytes in an object store (`[objects]`) are not copied: the bucket has its own
//! versioning. A relay on PostgreSQL is backed up with the database's own tools.

use std::path::{Path, PathBuf};
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

/// Writes a backup of the running relay whose stores are `stores` into `dest`, a new
/// directory (it must not exist, or be empty): a data directory a relay starts on,
/// serving everything acknowledged before this call. Blocking (it copies files): call
/// it from a blocking thread. Sends, deliveries and acks go on meanwhile; acks wait
/// while a mailbox log segment is being copied.
pub fn backup(stores: &Stores, dest: &Path) -> StoreResult<BackedUp> {
    let Some(embedded) = &stores.embedded else {
        return Err(StoreError::Backend(
            "backup: this relay keeps its state in PostgreSQL: back up the database with its own tools".into(),
        ));
    };
    if std::fs::read_dir(dest).is_ok_and(|mut d| d.next().is_some()) {
        return Err(StoreError::Backend(format!(
            "backup: {} is not empty",
            dest.display()
        )));
    }
    std::fs::create_dir_all(dest).map_err(|e| io("creating", dest, &e))?;
    let mut done = BackedUp {
        records: embedded.sled.snapshot_into(&dest.join("db"))?,
        ..BackedUp::default()
    };
    if let Some(log) = &embedded.log {
        done.segments = log.snapshot_into(&dest.join("mailboxes"))?;
    }
    let from = &embedded.data_dir;
    for (dir, link) in [("blobs", true), ("uploads", false)] {
        let (files, linked) = copy_tree(&from.join(dir), &dest.join(dir), link)?;
        done.blobs += files;
        done.linked += linked;
    }
    copy_tree(&from.join("discovery"), &dest.join("discovery"), false)?;
    for name in FILES {
        let src = from.join(name);
        if src.exists() {
            // `fs::copy` keeps the mode (0600 for the keys).
            std::fs::copy(&src, dest.join(name)).map_err(|e| io("copying", &src, &e))?;
        }
    }
    super::version::write(dest, super::version::CURRENT)
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    sync_tree(dest)?;
    Ok(done)
}

/// Why [`backup_new`] wrote nothing, or failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Refused before anything was written: the destination, or the stores.
    #[error("backup refused: {0}")]
    Refused(String),
    /// Failed part way; what was written is removed.
    #[error("backup failed: {0}")]
    Failed(#[from] StoreError),
}

/// [`backup`] into a directory this call creates, so two backups never write into
/// one directory and nothing an operator kept there is mixed in: `dest` must be an
/// absolute path that does not exist, in a directory that does, outside the data
/// directory (a backup inside it would copy itself). A backup that fails part way
/// removes the directory it created.
pub fn backup_new(stores: &Stores, dest: &Path) -> Result<BackedUp, BackupError> {
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
    let Some(parent) = dest.parent().filter(|_| dest.file_name().is_some()) else {
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
    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return refused(format!(
                "{} exists: a backup goes into a new directory",
                dest.display()
            ))
        }
        Err(e) => return refused(format!("creating {}: {e}", dest.display())),
    }
    backup(stores, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(dest);
        BackupError::Failed(e)
    })
}

/// Copies the files under `from` into `to` (hard links when `link` and the file
/// system allows). A file that vanished meanwhile (an expired blob) is skipped.
/// Returns the files written and how many of them are links.
fn copy_tree(from: &Path, to: &Path, link: bool) -> StoreResult<(u64, u64)> {
    let mut done = (0, 0);
    let entries = match std::fs::read_dir(from) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(io("listing", from, &e)),
    };
    std::fs::create_dir_all(to).map_err(|e| io("creating", to, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("listing", from, &e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = match entry.file_type() {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("reading", &src, &e)),
        };
        if kind.is_dir() {
            let (files, linked) = copy_tree(&src, &dst, link)?;
            done = (done.0 + files, done.1 + linked);
            continue;
        }
        let linked = link && std::fs::hard_link(&src, &dst).is_ok();
        if !linked {
            match std::fs::copy(&src, &dst) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("copying", &src, &e)),
            }
        }
        done = (done.0 + 1, done.1 + u64::from(linked));
    }
    Ok(done)
}

/// Fsyncs every file and directory under `dir`, so the backup is durable when
/// [`backup`] returns.
fn sync_tree(dir: &Path) -> StoreResult<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io("listing", dir, &e))?;
    for entry in entries {
        let path = entry.map_err(|e| io("listing", dir, &e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("syncing", &path, &e))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, &e))
}
