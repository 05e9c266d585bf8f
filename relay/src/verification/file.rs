//! The development verifier: each code goes to `<data_dir>/dev-verification/<session
//! id in hex>` (mode 0600), deleted when its session ends. The file is named by the
//! session, never by the number, and holds only the six digits, so the number never
//! reaches the disk. A relay refuses it unless explicitly allowed (see
//! `config/verification.rs`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tern_proto::{Code, VerificationId, E164};
use tracing::warn;

use super::{SendFuture, Verifier, VerifierError};

/// The directory under the data directory.
pub const DIR: &str = "dev-verification";

/// Writes codes to files (development only).
#[derive(Debug)]
pub struct FileVerifier {
    dir: PathBuf,
}

impl FileVerifier {
    /// Creates `<data_dir>/dev-verification` (0700; a symlink there is refused) and empties it: codes of a
    /// previous run belong to sessions that no longer exist.
    pub fn new(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join(DIR);
        // A symlink here would have its target chmodded and emptied below.
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if !m.file_type().is_dir() => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory (a symlink is refused)",
                    dir.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir)?;
                std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
            }
            Err(e) => return Err(e),
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_file() {
                std::fs::remove_file(path)?;
            }
        }
        warn!("phone verification writes codes to files (dev-file verifier): development only");
        Ok(FileVerifier { dir })
    }

    /// Where the code of `session` is written.
    pub fn path_of(&self, session: &VerificationId) -> PathBuf {
        self.dir.join(session.to_hex())
    }

    fn write(&self, code: &Code, session: &VerificationId) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path_of(session))?;
        f.write_all(code.as_bytes())?;
        f.sync_all()
    }
}

impl Verifier for FileVerifier {
    fn send_code<'a>(
        &'a self,
        _number: &'a E164,
        code: &'a Code,
        session: &'a VerificationId,
    ) -> SendFuture<'a> {
        Box::pin(async move {
            self.write(code, session).map_err(|e| {
                warn!(error = %e, "dev verifier could not write a code");
                VerifierError::Unreachable
            })
        })
    }

    fn session_ended(&self, session: &VerificationId) {
        match std::fs::remove_file(self.path_of(session)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "dev verifier could not delete a code file"),
        }
    }
}
