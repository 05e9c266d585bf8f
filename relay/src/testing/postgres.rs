//! A real PostgreSQL cluster per test, from the server binaries of Debian's `postgresql`
//! package (never a mock).
//!
//! Each cluster lives in its own `/tmp/tern-pg-*` directory and listens only on a Unix
//! socket there (`listen_addresses=''`, port 5432), so clusters never race for a TCP port.
//! `initdb` runs once per test process into a template that every cluster copies. As root
//! (CI), `initdb` and `pg_ctl` run as the `postgres` user, since `initdb` refuses root.
//! Dropping a [`TestPostgres`] stops the server (`pg_ctl stop -m immediate`) and removes
//! its directory; directories left by killed test runs are cleaned at the next start.
//!
//! These are test helpers: they panic, with a message saying what is missing, when
//! PostgreSQL cannot be found or started.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tempfile::TempDir;

const MISSING: &str = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install \
     Debian's `postgresql` package (`apt-get install postgresql`) or set TERN_PG_BIN";

/// The port in every cluster's own socket directory.
const PORT: u16 = 5432;
/// The superuser `initdb` creates (trust authentication on the socket).
const USER: &str = "tern";
/// Written into each directory, so a later run can tell a dead run's leftovers.
const OWNER_FILE: &str = "owner.pid";

/// A running PostgreSQL cluster in a temporary directory, stopped and removed on drop.
pub struct TestPostgres {
    dir: Option<TempDir>,
    bin: PathBuf,
    /// The settings given to `start_with`, which a standby takes over.
    settings: Vec<(String, String)>,
    options: String,
}

impl TestPostgres {
    /// Starts a cluster with `fsync=off` (for tests that never crash the machine).
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(&[])
    }

    /// Starts a cluster with extra server settings (`-c name=value`), which override the
    /// defaults (for durability tests: `("fsync", "on")`).
    pub fn start_with(settings: &[(&str, &str)]) -> TestPostgres {
        let bin = bin_dir().clone();
        remove_stale(&bin);
        let template = template(&bin);
        let dir = temp_dir();
        let data = dir.path().join("data");
        let cp = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .output()
            .expect("run cp");
        check("cp -a <template> <data>", &cp);
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        TestPostgres::launch(dir, bin, settings)
    }

    /// Starts the server on the data directory in `dir`, listening in `dir`.
    fn launch(dir: TempDir, bin: PathBuf, settings: Vec<(String, String)>) -> TestPostgres {
        let mut options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c port={PORT} \
             -c fsync=off -c max_connections=60",
            dir.path().display()
        );
        for (name, value) in &settings {
            options.push_str(&format!(" -c {name}='{value}'"));
        }
        let pg = TestPostgres {
            dir: Some(dir),
            bin,
            settings,
            options,
        };
        pg.pg_ctl_start().unwrap_or_else(|e| panic!("{e}"));
        pg
    }

    /// A synchronous standby of this cluster, named `name`: a base backup
    /// (`pg_basebackup -R -X stream`) streaming from this cluster's socket, started in a
    /// directory of its own with this cluster's settings. This cluster then names it in
    /// `synchronous_standby_names` (`FIRST 1`), so a commit here returns only once the
    /// standby has flushed it; returns once the standby reports `sync` (20 s at most).
    pub fn standby(&self, name: &str) -> TestPostgres {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "standby name {name:?}: letters, digits and _ only"
        );
        let dir = temp_dir();
        let data = dir.path().join("data");
        // --no-sync: the copy is not fsync'd (no machine crash here); the standby's
        // server runs with fsync=on, and its WAL is what synchronous commit waits for.
        let out = pg_command(&self.bin, "pg_basebackup")
            .arg("-h")
            .arg(self.dir())
            .args(["-p", &PORT.to_string(), "-U", USER, "-D"])
            .arg(&data)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"])
            .output()
            .expect("run pg_basebackup");
        check("pg_basebackup", &out);
        // Later lines of postgresql.auto.conf win: the same primary, under our name.
        let conninfo = format!(
            "\nprimary_conninfo = 'host={} port={PORT} user={USER} application_name={name}'\n",
            self.dir().display()
        );
        let auto = data.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).expect("read postgresql.auto.conf");
        text.push_str(&conninfo);
        fs::write(&auto, text).expect("write postgresql.auto.conf");
        let standby = TestPostgres::launch(dir, self.bin.clone(), self.settings.clone());
        self.psql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ({name})'"
        ));
        self.psql("SELECT pg_reload_conf()");
        let query =
            format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let state = self.psql(&query);
            if state.trim() == "sync" {
                return standby;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "standby {name} not synchronous within 20 s (state {state:?}); its log:\n{}",
                standby.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Promotes this standby to a primary (`pg_ctl promote -w`): it stops replaying,
    /// takes writes, and waits for no standby of its own.
    pub fn promote(&self) {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir().join("data"))
            .args(["-w", "-t", "30", "promote"])
            .output()
            .expect("run pg_ctl promote");
        check("pg_ctl promote", &out);
    }

    /// Runs `sql` with `psql` on database `postgres`; its unaligned output.
    fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir())
            .args(["-p", &PORT.to_string(), "-U", USER, "-d", "postgres"])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        check("psql", &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.dir().join("log");
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir().join("data"))
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "-o", &self.options, "start"])
            .output()
            .expect("run pg_ctl start");
        if out.status.success() {
            return Ok(());
        }
        let log = fs::read_to_string(&log).unwrap_or_default();
        Err(format!(
            "pg_ctl start failed ({}): {}{}\nserver log:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Starts the cluster again after [`TestPostgres::kill`] (crash recovery runs), with
    /// the same settings. Waits up to 10 s for the killed server's backends to exit.
    pub fn restart(&self) {
        let mut last = String::new();
        for _ in 0..50 {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("restart: {last}");
    }

    /// The cluster's directory (its socket directory; `data/` and `log` are inside).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("cluster directory").path()
    }

    /// A libpq keyword connection string for database `db` (superuser `tern`, no password).
    pub fn conn_str(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user={USER} dbname={db}",
            self.dir().display()
        )
    }

    /// Creates database `name` (with `createdb` from the same installation).
    pub fn create_db(&self, name: &str) {
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.dir())
            .args(["-p", &PORT.to_string(), "-U", USER, name])
            .output()
            .expect("run createdb");
        check("createdb", &out);
    }

    /// The postmaster's process id (line 1 of `postmaster.pid`), while it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.dir().join("data"))
    }

    /// Kills the server with SIGKILL, as a machine or process crash would: the
    /// postmaster and every backend (left alone, a backend answers its connection until
    /// it notices the postmaster is gone).
    pub fn kill(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let mut pids = children_of(pid);
        pids.insert(0, pid);
        for p in pids.into_iter().filter_map(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }

    /// Freezes the server with SIGSTOP, as a network partition or a hung host looks to
    /// a client: the postmaster (first, so it starts no new backend) and every backend
    /// stop; connections stay open and connects are accepted by the kernel, but nothing
    /// answers. [`TestPostgres::resume`] lets it go on; dropping a paused cluster resumes
    /// it before stopping it.
    pub fn pause(&self) {
        self.signal_all(rustix::process::Signal::STOP);
    }

    /// Lets a [`TestPostgres::pause`]d server go on (SIGCONT): what its clients sent
    /// meanwhile is read and answered.
    pub fn resume(&self) {
        self.signal_all(rustix::process::Signal::CONT);
    }

    /// Sends `signal` to the postmaster, then to each of its backends, and waits (5 s at
    /// most) until each is stopped (SIGSTOP) or no longer stopped (SIGCONT): a signal is
    /// delivered asynchronously.
    fn signal_all(&self, signal: rustix::process::Signal) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        for &p in &pids {
            if let Some(p) = rustix::process::Pid::from_raw(p) {
                let _ = rustix::process::kill_process(p, signal);
            }
        }
        let stopping = signal == rustix::process::Signal::STOP;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for p in pids {
            // Gone processes (None) count as settled.
            while process_state(p).is_some_and(|s| (s == 'T') != stopping)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir().join("log")).unwrap_or_default()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.dir.is_some() {
            // A paused server would not see pg_ctl's SIGQUIT (a test that panicked
            // between pause and resume): let it go on first.
            self.resume();
        }
        if let Some(dir) = self.dir.take() {
            stop(&self.bin, &dir.path().join("data"));
            // A killed postmaster's backends exit on their own; removal does not wait.
            drop(dir);
        }
    }
}

/// Where initdb, pg_ctl and postgres are: `$TERN_PG_BIN`, else `initdb` on `PATH` (its
/// symlinks resolved, so its siblings are found), else the newest
/// `/usr/lib/postgresql/<major>/bin`.
fn bin_dir() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
        if let Some(dir) = std::env::var_os("TERN_PG_BIN") {
            let dir = PathBuf::from(dir);
            assert!(has(&dir), "TERN_PG_BIN={}: {MISSING}", dir.display());
            return dir;
        }
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.join("initdb"))
            .find(|f| f.is_file())
            .and_then(|f| fs::canonicalize(f).ok())
            .and_then(|f| f.parent().map(Path::to_path_buf));
        if let Some(dir) = on_path.filter(|d| has(d)) {
            return dir;
        }
        let mut installed: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((major, e.path().join("bin")))
            })
            .filter(|(_, d)| has(d))
            .collect();
        installed.sort();
        installed.pop().map(|(_, d)| d).expect(MISSING)
    })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A server command, run as `postgres` when we are root.
/// The processes whose parent is `pid` (from `/proc/<pid>/stat`, field 4).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command name is in parentheses and may hold spaces.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn pg_command(bin: &Path, name: &str) -> Command {
    let program = bin.join(name);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A new `/tmp/tern-pg-*` directory owned by whoever runs the server.
fn temp_dir() -> TempDir {
    // /tmp keeps the socket path under the 107-byte limit.
    let dir = tempfile::Builder::new()
        .prefix("tern-pg-")
        .tempdir_in("/tmp")
        .expect("create a temporary directory under /tmp");
    fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
        .expect("write owner.pid");
    if is_root() {
        chown_postgres(dir.path());
    }
    dir
}

fn chown_postgres(path: &Path) {
    let out = Command::new("chown")
        .args([OsStr::new("-R"), OsStr::new("postgres:"), path.as_os_str()])
        .output()
        .expect("run chown");
    check("chown -R postgres: <dir>", &out);
}

/// The initialised data directory every cluster of this process copies.
fn template(bin: &Path) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        // Kept for the process's life; the next run's `remove_stale` deletes it.
        let dir = temp_dir().keep();
        let data = dir.join("data");
        let out = pg_command(bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        check("initdb", &out);
        data
    })
}

/// Stops and removes the clusters of test processes that are gone (killed runs leave
/// them), each by its own `postmaster.pid`, never by a process name.
fn remove_stale(bin: &Path) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("tern-pg-") {
                continue;
            }
            let dir = entry.path();
            let owner = fs::read_to_string(dir.join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let Some(owner) = owner else { continue };
            if alive(owner) {
                continue;
            }
            stop(bin, &dir.join("data"));
            let _ = fs::remove_dir_all(&dir);
        }
    });
}

fn stop(bin: &Path, data: &Path) {
    if postmaster_pid(data).is_some_and(alive) {
        let _ = pg_command(bin, "pg_ctl")
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
    }
}

fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The state letter of process `pid` (`T` when stopped), while it exists.
fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Whether process `pid` exists and is not a zombie waiting to be reaped.
pub(crate) fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    async fn select_one(pg: &TestPostgres, db: &str) -> i32 {
        let (client, conn) = tokio_postgres::connect(&pg.conn_str(db), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let row = client.query_one("SELECT 1", &[]).await.expect("select");
        row.get(0)
    }

    fn gone_within(pid: i32, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !alive(pid)
    }

    #[tokio::test]
    async fn starts_and_answers_on_its_socket() {
        let pg = TestPostgres::start();
        assert_eq!(select_one(&pg, "postgres").await, 1);
        assert!(pg.dir().join(format!(".s.PGSQL.{PORT}")).exists());
        assert!(pg.postmaster_pid().is_some_and(alive));
    }

    #[tokio::test]
    async fn two_clusters_run_at_once_apart() {
        let a = TestPostgres::start();
        let b = TestPostgres::start();
        assert_ne!(a.dir(), b.dir());
        a.create_db("only_a");
        assert_eq!(select_one(&a, "only_a").await, 1);
        assert_eq!(select_one(&b, "postgres").await, 1);
        let on_b = tokio_postgres::connect(&b.conn_str("only_a"), tokio_postgres::NoTls).await;
        assert!(on_b.is_err(), "b has no database only_a");
    }

    #[test]
    fn drop_stops_the_server_and_removes_its_dir() {
        let pg = TestPostgres::start_with(&[("fsync", "on")]);
        let pid = pg.postmaster_pid().expect("postmaster pid");
        let dir = pg.dir().to_path_buf();
        assert!(alive(pid));
        drop(pg);
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "postmaster {pid} still runs"
        );
        assert!(!dir.exists());
    }

    #[test]
    fn kill_ends_the_postmaster() {
        let pg = TestPostgres::start();
        let pid = pg.postmaster_pid().expect("postmaster pid");
        pg.kill();
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "postmaster {pid} still runs"
        );
        assert!(
            pg.log_text().contains("database system is ready"),
            "{}",
            pg.log_text()
        );
    }

    #[tokio::test]
    async fn pause_stops_answers_and_resume_brings_them_back() {
        let pg = TestPostgres::start();
        let c = connect(&pg.conn_str("postgres")).await;
        let pid = pg.postmaster_pid().expect("postmaster pid");
        pg.pause();
        let backends = children_of(pid);
        assert!(!backends.is_empty());
        for p in std::iter::once(pid).chain(backends.iter().copied()) {
            assert_eq!(process_state(p), Some('T'), "process {p} not stopped");
        }
        // An open connection gets no answer, and a new one no start-up reply.
        let hung = tokio::time::timeout(Duration::from_millis(300), c.query_one("SELECT 1", &[]));
        assert!(hung.await.is_err(), "a paused server answered");
        let url = pg.conn_str("postgres");
        let fresh = tokio::time::timeout(
            Duration::from_millis(300),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        );
        assert!(fresh.await.is_err(), "a paused server took a connection");
        pg.resume();
        for p in std::iter::once(pid).chain(backends.iter().copied()) {
            assert_ne!(process_state(p), Some('T'), "process {p} still stopped");
        }
        let row = tokio::time::timeout(Duration::from_secs(10), c.query_one("SELECT 2", &[]))
            .await
            .expect("an answer after resume")
            .expect("select");
        assert_eq!(row.get::<_, i32>(0), 2);
    }

    #[test]
    fn drop_ends_a_paused_server() {
        let pg = TestPostgres::start();
        let pid = pg.postmaster_pid().expect("postmaster pid");
        let dir = pg.dir().to_path_buf();
        pg.pause();
        let started = Instant::now();
        drop(pg);
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "paused postmaster {pid} still runs"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!dir.exists());
    }

    async fn connect(conn: &str) -> tokio_postgres::Client {
        let (client, c) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(c);
        client
    }

    #[tokio::test]
    async fn a_commit_on_the_primary_survives_its_kill_on_the_promoted_standby() {
        let primary = TestPostgres::start_with(&[("fsync", "on")]);
        primary.create_db("t");
        let standby = primary.standby("s1");
        assert_ne!(primary.dir(), standby.dir());
        let p = connect(&primary.conn_str("t")).await;
        p.batch_execute(
            "SET synchronous_commit = on; CREATE TABLE kept (n int); \
             INSERT INTO kept SELECT generate_series(1, 100)",
        )
        .await
        .expect("commit on the primary");
        // Before promotion the standby is read-only.
        let s = connect(&standby.conn_str("t")).await;
        let write = s.batch_execute("INSERT INTO kept VALUES (0)").await;
        assert!(write.is_err(), "a standby refuses writes");

        primary.kill();
        standby.promote();
        let s = connect(&standby.conn_str("t")).await;
        let row = s
            .query_one("SELECT count(*), sum(n) FROM kept", &[])
            .await
            .expect("read on the promoted standby");
        assert_eq!(row.get::<_, i64>(0), 100);
        assert_eq!(row.get::<_, i64>(1), 5050);
        s.batch_execute("INSERT INTO kept VALUES (101)")
            .await
            .expect("the promoted standby takes writes");
    }
}
