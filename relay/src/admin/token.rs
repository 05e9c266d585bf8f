//! The admin credential: a random token the relay writes at each start to
//! `admin.token` in its data directory (mode 0600, so whoever may read the data
//! directory may administer the relay), and the listener's address beside it in
//! `admin.addr`, for `tern-relay admin` to find the running relay.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// The token file's name in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// The file naming the admin listener's address, while a relay serves.
pub const ADDR_FILE: &str = "admin.addr";

/// A token: 32 random bytes, kept as 64 hexadecimal digits.
pub(crate) struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A new random token.
    pub(crate) fn generate() -> Token {
        let bytes: [u8; 32] = rand::random();
        Token(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }

    /// Writes it to `data_dir`/admin.token (0600), replacing an earlier relay's.
    pub(crate) fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        write_private(&data_dir.join(TOKEN_FILE), self.0.as_bytes())
    }
}

/// Writes `bytes` to `path` through a file of its own made 0600 at creation, then
/// renamed over `path`: no reader ever sees a partial file or a wider mode.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map_or_else(
        || std::ffi::OsString::from("admin"),
        std::ffi::OsStr::to_os_string,
    );
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The token a running relay wrote in `data_dir`, trimmed.
pub fn read_token(data_dir: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(data_dir.join(TOKEN_FILE))?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_is_written_0600_and_matches_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = Token::generate();
        token.write(dir.path()).expect("write");
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = read_token(dir.path()).expect("read");
        assert_eq!(read.len(), 64);
        assert!(token.matches(read.as_bytes()));
        let mut wrong = read.clone().into_bytes();
        wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
        assert!(!token.matches(&wrong));
        assert!(!token.matches(b""));
        assert!(!token.matches(&read.as_bytes()[..63]));
        // A new start replaces it; the old one no longer matches.
        let next = Token::generate();
        next.write(dir.path()).expect("rewrite");
        assert!(!token.matches(read_token(dir.path()).expect("read").as_bytes()));
        assert!(!format!("{next:?}").contains(&read_token(dir.path()).expect("read")));
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }
}
