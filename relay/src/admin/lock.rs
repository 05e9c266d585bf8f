//! The data directory's own lock: an exclusive `flock` on `relay.lock`, taken by a
//! relay at start before anything else (whatever its backend: a relay on
//! PostgreSQL opens no sled database whose lock would show it) and by every offline
//! admin command, held for the holder's lifetime. The kernel lets go when the
//! process ends, however it ends, so a crashed relay's lock is never stale. The
//! command line probes it ([`held`]) to tell a running relay's `admin.addr` from a
//! crashed one's.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

use crate::error::{Error, Result};

/// The lock file's name in the data directory (never removed: removing it would
/// let two holders lock two different files).
pub const LOCK_FILE: &str = "relay.lock";

/// The held lock of a data directory; dropping it lets go.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock of `data_dir` (made if missing), or refuses when a relay or
    /// an admin command holds it.
    pub fn take(data_dir: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::Config(format!("creating {}: {e}", data_dir.display())))?;
        let path = data_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Config(format!("opening {}: {e}", path.display())))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::Config(format!(
                "data directory {} in use by a running relay or another admin command; stop it",
                data_dir.display()
            ))),
            Err(e) => Err(Error::Config(format!(
                "locking {}: {}",
                path.display(),
                std::io::Error::from(e)
            ))),
        }
    }
}

/// Whether a relay or an admin command holds the lock of `data_dir` now.
pub fn held(data_dir: &Path) -> std::io::Result<bool> {
    let file = match std::fs::File::open(data_dir.join(LOCK_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        // Let go at once (by the drop): a relay starting now gets it.
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_the_probe_sees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!held(dir.path()).expect("probe"));
        let lock = DirLock::take(dir.path()).expect("take");
        assert!(held(dir.path()).expect("probe"));
        let second = DirLock::take(dir.path()).expect_err("taken twice");
        assert!(second.to_string().contains("in use"), "{second}");
        drop(lock);
        assert!(!held(dir.path()).expect("probe"));
        let _again = DirLock::take(dir.path()).expect("taken again");
    }

    #[test]
    fn the_lock_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let _lock = DirLock::take(dir.path()).expect("take");
        let mode = std::fs::metadata(dir.path().join(LOCK_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
