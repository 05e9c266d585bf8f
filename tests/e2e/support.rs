//! Helpers for the end-to-end tests: start the relay's command line as a real process
//! on loopback with a temporary data directory, and drive real clients against it.
#![allow(dead_code)] // not every test module uses every helper

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::{Delivery, Envelope, Inbox, Incoming, RelayConnection};
use tern_proto::{DeviceAddress, MessageId, RelayAddress};
use tern_relay::testing::{TestPostgres, TestS3};

/// How long any single step of a test may take before it fails.
pub(crate) const STEP: Duration = Duration::from_secs(15);

/// The relay binary under test: the `tern-relay` command line
/// ([`tern_relay::cli::main`]), built by cargo as this package's `tern-relay-e2e`.
pub(crate) fn relay_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern-relay-e2e"))
}

/// A `tern-relay serve` process. Stopped with SIGTERM (then killed) when dropped.
pub(crate) struct RelayProcess {
    child: Option<Child>,
    pub(crate) address: RelayAddress,
    pub(crate) data_dir: PathBuf,
    pub(crate) log: PathBuf,
}

impl RelayProcess {
    /// Starts a relay on `data_dir`, listening on 127.0.0.1 port 0, with extra flags.
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<RelayProcess> {
        Self::start_at(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts a relay listening on `listen`: the port an earlier start on port 0 got,
    /// to come back where clients expect it.
    pub(crate) fn start_at(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<RelayProcess> {
        Self::start_with_env(data_dir, listen, extra, &[])
    }

    /// [`RelayProcess::start_at`] with extra environment variables (`TERN_FAULTS`).
    pub(crate) fn start_with_env(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<RelayProcess> {
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(relay_binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "TERN_LOG",
                std::env::var("TERN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .context("spawning tern-relay")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(addr) = line.strip_prefix("tern-relay listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut process = RelayProcess {
            child: Some(child),
            address: "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:1".parse()?,
            data_dir: data_dir.to_owned(),
            log,
        };
        match rx.recv_timeout(STEP) {
            Ok(addr) => process.address = addr.parse()?,
            Err(_) => bail!(
                "tern-relay did not print its address; log:\n{}",
                std::fs::read_to_string(&process.log).unwrap_or_default()
            ),
        }
        Ok(process)
    }

    /// Stops the relay with SIGTERM, as an operator would, and waits for it.
    pub(crate) fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                child.kill()?;
                bail!("tern-relay ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the relay with SIGKILL: no shutdown, no final flush, as in a crash.
    pub(crate) fn crash(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The relay's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The relay's log so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// A registered device with its open connection.
pub(crate) struct Device {
    pub(crate) conn: RelayConnection,
    pub(crate) inbox: Inbox,
    pub(crate) address: DeviceAddress,
    pub(crate) key: DeviceKeyPair,
    pub(crate) identity: IdentityKeyPair,
}

/// Registers a new account on `relay` and returns its first device, connected.
pub(crate) async fn register(relay: &RelayAddress) -> Device {
    register_from(relay, None).await
}

/// [`register`] from a socket bound to `local` (the system's choice when `None`).
pub(crate) async fn register_from(relay: &RelayAddress, local: Option<SocketAddr>) -> Device {
    let (conn, inbox) = within(RelayConnection::connect_from(relay, local))
        .await
        .expect("connect");
    let (identity, key) = (IdentityKeyPair::generate(), DeviceKeyPair::generate());
    let address = within(conn.register(&identity, &key))
        .await
        .expect("register");
    Device {
        conn,
        inbox,
        address,
        key,
        identity,
    }
}

impl Device {
    /// Closes this connection and opens a new, authenticated one. Returns the count
    /// of queued messages the relay reported.
    pub(crate) async fn reconnect(&mut self, relay: &RelayAddress) -> u64 {
        let (conn, inbox) = within(RelayConnection::connect(relay))
            .await
            .expect("connect");
        let queued = within(conn.authenticate(&self.address, &self.key))
            .await
            .expect("authenticate");
        let old = std::mem::replace(&mut self.conn, conn);
        self.inbox = inbox;
        old.close().await;
        queued
    }

    /// Goes offline: closes the connection, keeping the keys.
    pub(crate) async fn go_offline(self) -> (DeviceAddress, DeviceKeyPair, IdentityKeyPair) {
        self.conn.close().await;
        (self.address, self.key, self.identity)
    }

    /// Connects a device that is offline.
    pub(crate) async fn connect(
        relay: &RelayAddress,
        address: DeviceAddress,
        key: DeviceKeyPair,
        identity: IdentityKeyPair,
    ) -> (Device, u64) {
        let (conn, inbox) = within(RelayConnection::connect(relay))
            .await
            .expect("connect");
        let queued = within(conn.authenticate(&address, &key))
            .await
            .expect("authenticate");
        (
            Device {
                conn,
                inbox,
                address,
                key,
                identity,
            },
            queued,
        )
    }

    /// The next push, failing the test after [`STEP`].
    pub(crate) async fn next(&mut self) -> Incoming {
        within(self.inbox.recv())
            .await
            .expect("connection open")
            .expect("valid push")
    }

    /// The next delivery (skipping queue-empty markers).
    pub(crate) async fn next_delivery(&mut self) -> Delivery {
        loop {
            if let Incoming::Delivery(d) = self.next().await {
                return d;
            }
        }
    }

    /// Deliveries until the relay says the queue is empty.
    pub(crate) async fn drain(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        loop {
            match self.next().await {
                Incoming::Delivery(d) => out.push(d),
                Incoming::QueueEmpty => return out,
            }
        }
    }
}

/// Envelope number `i`: message id and payload both derived from it.
pub(crate) fn envelope(i: u32) -> Envelope {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    Envelope {
        message_id: MessageId(id),
        payload: Bytes::from(format!("ciphertext #{i}")),
    }
}

/// The number an envelope from [`envelope`] carries.
pub(crate) fn number(d: &Delivery) -> u32 {
    u32::from_be_bytes(d.message_id.0[..4].try_into().expect("4 bytes"))
}

/// Sends envelope `next`, `next + 1`, … to `to` (one each try, `pause` apart) until the
/// relay stores one, for at most [`STEP`]; every refusal must be `UNAVAILABLE` (a
/// database away or back). Returns the number of the one stored.
pub(crate) async fn send_until_stored(
    conn: &RelayConnection,
    to: &DeviceAddress,
    mut next: u32,
    pause: Duration,
) -> u32 {
    let deadline = Instant::now() + STEP;
    loop {
        match within(conn.send(to, [envelope(next)])).await {
            Ok(_) => return next,
            Err(e) => {
                assert_eq!(
                    e.relay_code(),
                    Some(tern_proto::ErrorCode::Unavailable),
                    "{e}"
                );
                assert!(Instant::now() < deadline, "sends did not recover: {e}");
                next += 1;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Awaits `f`, failing the test after [`STEP`].
pub(crate) async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// Copies the files every node of one relay shares from a node's data directory
/// into another's, as an operator does ([`tern_relay::cluster::copy_shared_files`]).
pub(crate) fn copy_shared_files(from: &Path, to: &Path) {
    tern_relay::cluster::copy_shared_files(from, to).expect("copy the shared files");
}

/// Every file under `dir`, recursively (none if it does not exist).
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Lower-case hex of `bytes` (blob ids, account ids as the admin commands print them).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file's contents.
pub(crate) fn digest(path: &Path) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(std::fs::read(path).expect("read")).to_vec()
}

/// One PostgreSQL server with the database `tern`, optionally an S3 server, and a
/// directory for the data directories of the relay nodes on them.
pub(crate) struct PgNodes {
    pub(crate) pg: TestPostgres,
    objects: Option<TestS3>,
    pub(crate) dir: tempfile::TempDir,
}

impl PgNodes {
    /// A fresh PostgreSQL server with `settings` (`postgresql.conf` keys).
    pub(crate) fn start(settings: &[(&str, &str)]) -> PgNodes {
        let pg = TestPostgres::start_with(settings);
        pg.create_db("tern");
        PgNodes {
            pg,
            objects: None,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The same, with an S3 server too: every node keeps its blob bytes there.
    pub(crate) fn with_objects(settings: &[(&str, &str)]) -> PgNodes {
        PgNodes {
            objects: Some(TestS3::start()),
            ..PgNodes::start(settings)
        }
    }

    /// The S3 server of [`PgNodes::with_objects`].
    pub(crate) fn s3(&self) -> &TestS3 {
        self.objects.as_ref().expect("started with_objects")
    }

    /// The database's connection string.
    pub(crate) fn url(&self) -> String {
        self.pg.conn_str("tern")
    }

    /// Node `name`'s data directory.
    pub(crate) fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts node `name` (see [`pg_node`]) with the keys and sections `extra` after
    /// its `[postgres]` url; `peer` is a node whose certificate and keys it shares.
    pub(crate) fn start_node(
        &self,
        name: &str,
        extra: &str,
        peer: Option<&RelayProcess>,
    ) -> RelayProcess {
        let peer = peer.map(|p| p.data_dir.as_path());
        self.try_start_node(name, extra, peer, &[])
            .expect("node starts")
    }

    /// [`PgNodes::start_node`] with the shared files of the data directory `peer`,
    /// and command-line `flags`.
    pub(crate) fn try_start_node(
        &self,
        name: &str,
        extra: &str,
        peer: Option<&Path>,
        flags: &[&str],
    ) -> anyhow::Result<RelayProcess> {
        pg_node(
            &self.data_dir(name),
            &self.url(),
            extra,
            peer,
            flags,
            self.objects.as_ref(),
            &[],
        )
    }

    /// A connection to the database.
    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    /// One number from the database.
    pub(crate) async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .expect("query")
            .get(0)
    }

    /// Waits (a step at most) until `sql` counts at least one row.
    pub(crate) async fn until_some(&self, sql: &str) {
        let deadline = Instant::now() + STEP;
        while self.count(sql).await == 0 {
            assert!(Instant::now() < deadline, "never: {sql}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts a relay node on PostgreSQL at `url` with data directory `dir` (created),
/// after copying in the shared files of the data directory `peer` (as an operator
/// does). Its configuration is `[storage]` on PostgreSQL, `[postgres]` with `url`
/// and then `extra` (more `[postgres]` keys, then whole sections), and with `s3`,
/// `[objects]` on it (its keys in the node's environment); `flags` go on its command
/// line, `env` into its environment (`TOKIO_WORKER_THREADS`).
pub(crate) fn pg_node(
    dir: &Path,
    url: &str,
    extra: &str,
    peer: Option<&Path>,
    flags: &[&str],
    s3: Option<&TestS3>,
    env: &[(&str, &str)],
) -> anyhow::Result<RelayProcess> {
    std::fs::create_dir_all(dir)?;
    if let Some(peer) = peer {
        copy_shared_files(peer, dir);
    }
    let objects = s3.map(TestS3::objects_toml).unwrap_or_default();
    let toml = format!(
        "[storage]\nbackend = \"postgres\"\n[postgres]\nurl = \"{url}\"\n{extra}\n{objects}"
    );
    let config = dir.with_extension("toml");
    std::fs::write(&config, toml)?;
    let mut args = vec!["--config", config.to_str().context("utf-8 path")?];
    args.extend_from_slice(flags);
    let mut all = env.to_vec();
    all.extend(s3.map(TestS3::key_env).into_iter().flatten());
    RelayProcess::start_with_env(dir, "127.0.0.1:0", &args, &all)
}
