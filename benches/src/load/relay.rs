//! The relay under load: a `tern-relay` process this tool starts (and always ends), or
//! one already running at an address given on the command line.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_proto::RelayAddress;

use super::LoadError;

/// Rate limits far above any load this tool makes: the checks still run, so a run
/// measures their cost, but nothing is refused.
const UNTHROTTLED: &str = "[rate_limits]
registrations_per_prefix = \"4000000000/1s\"
add_device_per_account = \"4000000000/1s\"
sends_per_account = \"4000000000/1s\"
sealed_sends_per_token = \"4000000000/1s\"
sealed_sends_per_prefix = \"4000000000/1s\"
intake_per_sender_per_mailbox = \"4000000000/1s\"
fetch_keys_per_requester = \"4000000000/1s\"
one_time_prekeys_per_device = \"4000000000/1s\"
";

/// A relay this run talks to.
pub struct RelayUnderTest {
    /// Its address, certificate fingerprint included.
    pub address: RelayAddress,
    child: Option<Child>,
    /// Its data directory, when this run started it.
    data_dir: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

/// What a run asks of a relay it starts.
pub struct RelaySettings<'a> {
    /// The `tern-relay` binary.
    pub binary: &'a Path,
    /// `fsync` or `os`.
    pub durability: &'a str,
    /// Connections the relay must accept.
    pub max_connections: usize,
    /// Where the configuration and the data directory go; kept after the relay stops
    /// (a restart starts on it again). `None`: a temporary directory, deleted after.
    pub dir: Option<&'a Path>,
    /// How long the relay may take to print its address (a start rebuilds its index).
    pub start_timeout: Duration,
    /// The relay's log filter (its `--log`); its log goes to this tool's stderr.
    pub log: &'a str,
    /// A PostgreSQL connection string: the relay keeps everything there
    /// (`storage.backend = "postgres"`) instead of its data directory.
    pub postgres: Option<&'a str>,
    /// CPUs the relay may run on (`taskset -c` form, `0-1,3`); `None`: any.
    pub cpus: Option<&'a str>,
    /// `storage.commit_delay` ("1ms"); `None`: the relay's default.
    pub commit_delay: Option<&'a str>,
}

/// The `[storage]` (and `[postgres]`) sections a run's settings ask for.
fn storage_section(settings: &RelaySettings<'_>) -> String {
    let quoted = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut storage = Vec::new();
    if settings.postgres.is_some() {
        storage.push("backend = \"postgres\"".to_owned());
    }
    if let Some(delay) = settings.commit_delay {
        storage.push(format!("commit_delay = {}", quoted(delay)));
    }
    let mut out = String::new();
    if !storage.is_empty() {
        out = format!("\n[storage]\n{}\n", storage.join("\n"));
    }
    if let Some(url) = settings.postgres {
        out += &format!("\n[postgres]\nurl = {}\npool_size = 32\n", quoted(url));
    }
    out
}

/// How long a relay on a fresh data directory may take to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay binary built beside this one (`cargo build --release -p tern-benches`
/// builds both).
pub fn sibling_relay_binary() -> Result<PathBuf, LoadError> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("no directory for the executable")?;
    let candidate = dir.join("tern-relay-bench");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(format!(
            "no relay binary at {}; build it with `cargo build --release -p tern-benches` or pass --relay-bin",
            candidate.display()
        )
        .into())
    }
}

impl RelayUnderTest {
    /// Starts a relay on a fresh temporary data directory, listening on 127.0.0.1:0.
    pub fn spawn(settings: &RelaySettings<'_>) -> Result<Self, LoadError> {
        RelayUnderTest::spawn_node(settings, None)
    }

    /// Starts a relay as [`RelayUnderTest::spawn`] does; with `peer`, a second node of
    /// the same cluster: its data directory gets `peer`'s shared files (certificate,
    /// sender-certificate and discovery keys: `relay-*`, `discovery-oprf-key`), as an
    /// operator copies them, so both present one certificate. Both nodes must be on
    /// the same PostgreSQL database (`settings.postgres`).
    pub fn spawn_node(
        settings: &RelaySettings<'_>,
        peer: Option<&RelayUnderTest>,
    ) -> Result<Self, LoadError> {
        let temporary = match settings.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir()?),
        };
        let dir = match (&temporary, settings.dir) {
            (Some(t), _) => t.path(),
            (None, Some(d)) => d,
            (None, None) => return Err("no directory for the relay".into()),
        };
        let config = dir.join("relay.toml");
        let data_dir = dir.join("data");
        if let Some(peer) = peer {
            let from = peer
                .data_dir
                .as_deref()
                .ok_or("the peer node was not started here")?;
            copy_shared_files(from, &data_dir)?;
        }
        // Queues sized for the run, not for a phone's mailbox. Every connection comes
        // from 127.0.0.1, many at once, and the anonymous ones wait through the setup:
        // the per-address caps and the deadlines are raised (the checks still run).
        // The relay-wide budgets are raised for restarts with 10,000,000 messages; the
        // free-disk reserve keeps its default.
        let max_connections = settings.max_connections.max(16);
        std::fs::write(
            &config,
            format!(
                "[limits]\nmax_queued_messages = 100000000\nmax_queued_bytes = 1099511627776\nmax_connections = {max_connections}\n\n[media]\nmax_blob_bytes = 17179869184\nmax_upload_bytes_per_sec = 1099511627776\nmax_account_bytes = 1099511627776\n\n[budget]\nmax_queued_messages = 1000000000000\nmax_queued_bytes = 1099511627776\nmax_index_bytes = 1099511627776\nmax_blob_bytes = 1099511627776\n\n[connections]\nmax_per_address = {per_address}\nmax_handshakes_per_address = 1024\nmax_unauthenticated = {unauthenticated}\nauth_deadline = \"1h\"\nanonymous_idle = \"1h\"\n\n{UNTHROTTLED}",
                per_address = 2 * max_connections,
                unauthenticated = max_connections.max(2000),
            ) + &storage_section(settings),
        )?;
        // Under taskset, which execs the relay in its own process: the pid is the
        // relay's, and every thread the relay starts inherits the set.
        let mut command = match settings.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(settings.binary);
                c
            }
            None => Command::new(settings.binary),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--durability",
                settings.durability,
            ])
            .args(["--log", settings.log])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                let binary = settings.binary.display();
                match settings.cpus {
                    Some(_) => format!("starting {binary} under taskset: {e}"),
                    None => format!("starting {binary}: {e}"),
                }
            })?;
        let stdout = child.stdout.take().ok_or("relay stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tern-relay listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut relay = RelayUnderTest {
            address: "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:1".parse()?,
            child: Some(child),
            data_dir: Some(data_dir),
            _dir: temporary,
        };
        let line = rx
            .recv_timeout(settings.start_timeout)
            .map_err(|_| "the relay did not print its address")?;
        relay.address = line.parse()?;
        if let Some(cpus) = settings.cpus {
            let allowed = relay.pid().and_then(super::pin::cpus_allowed);
            if allowed.as_deref() != Some(cpus) {
                return Err(
                    format!("the relay was to run on CPUs {cpus}, it may on {allowed:?}").into(),
                );
            }
        }
        Ok(relay)
    }

    /// The data directory of a relay this run started.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// A relay someone else runs: no process statistics.
    pub fn external(address: RelayAddress) -> Self {
        RelayUnderTest {
            address,
            child: None,
            data_dir: None,
            _dir: None,
        }
    }

    fn proc_file(&self, name: &str) -> Option<String> {
        let pid = self.child.as_ref()?.id();
        std::fs::read_to_string(format!("/proc/{pid}/{name}")).ok()
    }

    /// CPU time the relay has used (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_cpu_seconds(self.pid()?)
    }

    /// Context switches (voluntary and not) of each of the relay's threads now alive,
    /// by thread id: each is a thread going to sleep or being put aside, the cost
    /// that grows per message at low rates. See [`switches_since`].
    pub fn context_switches(&self) -> Option<HashMap<u32, u64>> {
        process_switches(self.child.as_ref()?.id())
    }

    /// The relay's resident memory now and at its peak, in KiB.
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = self.proc_file("status")?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The relay process's id, if this run started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops a relay this run started with SIGTERM and waits up to `timeout` for it to
    /// exit; returns the seconds that took. Past the timeout it is killed, and that is
    /// an error: the relay did not shut down cleanly.
    pub fn terminate(&mut self, timeout: Duration) -> Result<f64, LoadError> {
        let mut child = self.child.take().ok_or("no relay process to stop")?;
        let start = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        while start.elapsed() < timeout {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    return Err(format!("the relay exited with {status}").into());
                }
                return Ok(start.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("the relay did not exit within {timeout:?} of SIGTERM").into())
    }

    /// Stops a relay this run started: SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for RelayUnderTest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies the files every node of a cluster shares from one node's data directory
/// into another's, creating it (a file already there is kept); a peer that ends
/// with none of them is an error.
fn copy_shared_files(from: &Path, to: &Path) -> Result<(), LoadError> {
    tern_relay::cluster::copy_shared_files(from, to)?;
    if !tern_relay::cluster::SHARED_FILES
        .iter()
        .any(|name| to.join(name).exists())
    {
        return Err(format!("no shared relay files in {} to copy", from.display()).into());
    }
    Ok(())
}

/// Context switches between two [`RelayUnderTest::context_switches`] readings: a
/// thread started in between counts in full; one that ended in between is missed
/// (the relay's long-lived threads, its workers and writers, do not end).
pub fn switches_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Context switches (voluntary and not) of each thread of process `pid` now alive, by
/// thread id ([`RelayUnderTest::context_switches`]).
pub fn process_switches(pid: u32) -> Option<HashMap<u32, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut by_thread = HashMap::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        by_thread.insert(tid, switches);
    }
    Some(by_thread)
}

/// CPU time (user + system) process `pid` has used, in seconds; `None` once it is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Clock ticks per second for /proc CPU times (USER_HZ, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Peak resident memory of this process, in KiB.
pub fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
