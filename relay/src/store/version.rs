//! The data directory's format version: `<data_dir>/tern-data-format`, one decimal
//! line, written when the directory is made (atomically: a temporary file, fsynced,
//! renamed, the directory fsynced).
//!
//! - Format 1 is the layout of every relay before the file existed: a data directory
//!   that holds relay files but no version file is format 1.
//! - Format 2 ([`CURRENT`]) is format 1 with the version file. Its migration from 1
//!   only writes the file: the step that shows the mechanism.
//!
//! A newer binary migrates an older directory in place, step by step, after logging a
//! backup hint; an older binary refuses a newer directory and says what to do. A
//! later format adds its step to `migrate_step` and raises [`CURRENT`]. ARCHITECTURE.md
//! ("Data directory versions") has the rules a step must follow.

use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::{Error, Result};

/// The version file's name.
pub const FILE: &str = "tern-data-format";

/// The format this binary writes and reads.
pub const CURRENT: u32 = 2;

/// Entries that only a relay's data directory holds (any one marks format 1 when
/// the version file is missing).
const RELAY_ENTRIES: &[&str] = &[
    "db",
    "mailboxes",
    "blobs",
    "uploads",
    "discovery",
    "relay-cert.pem",
    "relay-signing-key",
    "discovery-oprf-key",
];

/// What [`open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A new (empty) directory, now marked [`CURRENT`].
    Created,
    /// Already [`CURRENT`].
    Current,
    /// Migrated in place from this format.
    Migrated {
        /// The format found.
        from: u32,
    },
}

/// The format of `dir`: its version file's, 1 for a relay directory without one,
/// `None` for a directory with no relay files.
pub fn read(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u32>().map(Some).map_err(|_| {
            Error::Config(format!(
                "{} does not hold a format version (a number): restore it from a backup, \
                 or write {CURRENT} into it if this directory was made by this version",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let relay = RELAY_ENTRIES.iter().any(|n| dir.join(n).exists());
            Ok(relay.then_some(1))
        }
        Err(e) => Err(Error::Config(format!("reading {}: {e}", path.display()))),
    }
}

/// Checks `dir`'s format before anything opens it: marks a new directory, migrates
/// an older one in place (logging a backup hint first), refuses a newer one.
pub fn open(dir: &Path) -> Result<Opened> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Config(format!("creating {}: {e}", dir.display())))?;
    match read(dir)? {
        None => {
            write(dir, CURRENT)?;
            Ok(Opened::Created)
        }
        Some(v) if v == CURRENT => Ok(Opened::Current),
        Some(v) if v > CURRENT => Err(Error::Config(newer_message(dir, v))),
        Some(from) => {
            warn!(
                dir = %dir.display(),
                from,
                to = CURRENT,
                "migrating the data directory in place; to keep a copy first, stop the \
                 relay and snapshot the directory (a file system or LVM/ZFS snapshot, or \
                 `cp -a --reflink=always DIR DIR.format{from}` on btrfs or XFS: no data is \
                 copied), since a relay of the older version cannot read it afterwards"
            );
            for v in from..CURRENT {
                migrate_step(dir, v)?;
                write(dir, v + 1)?;
            }
            Ok(Opened::Migrated { from })
        }
    }
}

/// What an older binary says of a newer directory.
fn newer_message(dir: &Path, v: u32) -> String {
    format!(
        "{} is in data format {v}, written by a newer tern-relay; this one ({}) reads \
         format {CURRENT} at most and has not touched it. Run the newer tern-relay again, \
         or, to go back to this version, restore the backup (or snapshot) taken before \
         the upgrade",
        dir.display(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Migrates `dir` from format `from` to `from + 1`. Each step must be safe to run
/// again after a crash part-way (the version file moves on only after it).
fn migrate_step(dir: &Path, from: u32) -> Result<()> {
    match from {
        // Format 2 only adds the version file, which the caller writes.
        1 => Ok(()),
        v => Err(Error::Config(format!(
            "{}: no migration from data format {v}",
            dir.display()
        ))),
    }
}

/// Writes the version file atomically and durably.
pub fn write(dir: &Path, version: u32) -> Result<()> {
    let io = |what: &str, p: &PathBuf, e: std::io::Error| {
        Error::Config(format!("{what} {}: {e}", p.display()))
    };
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let path = dir.join(FILE);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(format!("{version}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming to", &path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", &dir.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    #[test]
    fn a_new_directory_is_marked_and_an_old_one_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let new = dir.path().join("new");
        assert_eq!(open(&new).expect("open"), Opened::Created);
        assert_eq!(read(&new).expect("read"), Some(CURRENT));
        assert_eq!(open(&new).expect("open"), Opened::Current);

        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("db")).expect("mkdir");
        assert_eq!(read(&old).expect("read"), Some(1), "no file: format 1");
        assert_eq!(open(&old).expect("open"), Opened::Migrated { from: 1 });
        assert_eq!(
            std::fs::read_to_string(old.join(FILE)).expect("file"),
            format!("{CURRENT}\n")
        );
        assert!(!old.join(format!(".{FILE}.tmp")).exists());
    }

    #[test]
    fn a_newer_or_unreadable_directory_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), CURRENT + 1).expect("write");
        let Err(Error::Config(m)) = open(dir.path()) else {
            panic!("a newer format must be refused");
        };
        assert!(
            m.contains("newer tern-relay") && m.contains("restore"),
            "{m}"
        );
        assert_eq!(read(dir.path()).expect("read"), Some(CURRENT + 1));
        std::fs::write(dir.path().join(FILE), "two\n").expect("write");
        assert!(open(dir.path()).is_err());
    }
}
