//! A real S3-compatible server per test: `s3s-fs`, an S3 HTTP server over a directory
//! (never a mock).
//!
//! The binary is found in `$TERN_S3S_FS`, on `PATH`, or in `~/.cargo/bin`. It listens on
//! 127.0.0.1 on a port the kernel picks, with fixed test keys, over a temporary directory
//! in which each bucket is a directory: tests list `root()/<bucket>` to see the objects.
//! Its log goes to a file there; the address is read from it. Dropping a [`TestS3`]
//! kills and reaps the server and removes the directory.
//!
//! These are test helpers: they panic, with a message saying what is missing, when the
//! server cannot be found or started.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const MISSING: &str = "s3s-fs (the S3 test server) not found: install it with \
     `cargo install --locked s3s-fs --version 0.14.1 --features binary` or set TERN_S3S_FS";

/// The bucket every test server has.
pub const BUCKET: &str = "tern";
/// The test access key.
pub const ACCESS_KEY: &str = "tern-test-access";
/// The test secret key.
pub const SECRET_KEY: &str = "tern-test-secret-key";
/// The variable [`TestS3::objects_toml`] names for the access key.
pub const KEY_ENV: &str = "TERN_TEST_S3_KEY";
/// The variable [`TestS3::objects_toml`] names for the secret key.
pub const SECRET_ENV: &str = "TERN_TEST_S3_SECRET";
/// How long the server may take to say where it listens.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running `s3s-fs` over a temporary directory, killed and removed on drop.
pub struct TestS3 {
    child: Child,
    endpoint: String,
    dir: TempDir,
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_S3S_FS") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("s3s-fs"));
    let cargo_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/s3s-fs"));
    on_path
        .chain(cargo_bin)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{MISSING}"))
}

impl TestS3 {
    /// Starts a server with the bucket [`BUCKET`].
    pub fn start() -> TestS3 {
        let bin = binary();
        let dir = tempfile::Builder::new()
            .prefix("tern-s3-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join(BUCKET)).expect("make the bucket directory");
        let log_path = dir.path().join("log");
        let log = fs::File::create(&log_path).expect("create the log");
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}; {MISSING}", bin.display()));
        let mut server = TestS3 {
            child,
            endpoint: String::new(),
            dir,
        };
        server.endpoint = server.wait_for_address(&log_path);
        server
    }

    /// Reads `server is running at http://<addr>` from the log, within the deadline.
    fn wait_for_address(&mut self, log: &Path) -> String {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if let Some(at) = text.find("http://") {
                let addr: String = text[at..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                if addr.len() > "http://".len() && addr.contains(':') {
                    return addr;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("s3s-fs exited ({status}) before listening:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("s3s-fs did not say where it listens within {START_DEADLINE:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The access key the server takes.
    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    /// The secret key the server takes.
    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    /// An `[objects]` section of a relay's configuration for this server, with 5 MiB
    /// parts; the relay reads the keys from the variables of [`TestS3::key_env`].
    pub fn objects_toml(&self) -> String {
        format!(
            "[objects]\nurl = \"s3://{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\n\
             access_key_env = \"{KEY_ENV}\"\nsecret_key_env = \"{SECRET_ENV}\"\npart_mb = 5\n",
            self.endpoint
        )
    }

    /// The environment a relay configured by [`TestS3::objects_toml`] needs: the
    /// variables it names, set to this server's keys.
    pub fn key_env(&self) -> [(&'static str, &'static str); 2] {
        [(KEY_ENV, ACCESS_KEY), (SECRET_ENV, SECRET_KEY)]
    }

    /// The server's root directory: each bucket is a directory in it.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Every file under the bucket's directory, as paths relative to it (the object
    /// keys, plus whatever the server keeps beside them).
    pub fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let base = self.root().join(BUCKET);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// The object keys under `prefix` (`blobs/`, `uploads/`), sorted.
    pub fn objects(&self, prefix: &str) -> Vec<String> {
        self.files()
            .into_iter()
            .filter(|f| f.starts_with(prefix))
            .collect()
    }

    /// Stops the server's process (SIGSTOP) without closing anything: connections are
    /// still accepted by the kernel, and every request hangs unanswered until
    /// [`TestS3::thaw`] (or the drop, which kills it).
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`TestS3::freeze`]d server run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let status = Command::new("kill")
            .args([which, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} s3s-fs: {status}");
    }

    /// Kills the server now (for tests of an object store that went away).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        self.kill();
    }
}
