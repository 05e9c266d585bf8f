//! `tern-load`: load on a real `tern-relay` over QUIC with real end-to-end encryption.
//!
//! ```text
//! cargo build --release -p tern-benches
//! target/release/tern-load online --pairs 4 --messages 20000 --size 1024 --json
//! target/release/tern-load online --presealed --rate 3000 --pin relay=0,load=1 --json
//! target/release/tern-load online --nodes 2 --rate 1000 --messages 30000 --postgres 'host=/tmp/pg port=5433 user=tern dbname=tern'
//! target/release/tern-load offline --recipients 4 --messages 20000 --size 1024 --durability fsync --json
//! target/release/tern-load connections --count 10000
//! target/release/tern-load group --devices 1000 --messages 20 --size 1024
//! target/release/tern-load media --size 1073741824
//! target/release/tern-load restart --messages 1000000 --dir /work/tmp
//! target/release/tern-load discovery --users 100000 --book 1000 --hits 0.5
//! ```
//!
//! Without `--relay`, each run starts `tern-relay-bench` (the relay's command line,
//! built beside this binary) on a temporary data directory and 127.0.0.1:0, and ends
//! it. Progress goes to stderr; the report (a table, or one JSON object with `--json`)
//! to stdout. `online --presealed` seals every envelope before the clock starts and
//! its recipients do not open them: the relay alone (the report's `sealing`). `--pin`
//! puts the relay and this tool on CPUs of their own (the report's `pinning`). A run
//! that loses, doubles or reorders a message fails: the reason goes to
//! stderr, and with `--json` also to stdout as `{"error": "..."}`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tern_benches::load::pin::{self, Pinning};
use tern_benches::load::relay::{
    sibling_relay_binary, RelaySettings, RelayUnderTest, START_TIMEOUT,
};
use tern_benches::load::{self, LoadError};
use tern_relay::testing::TestPostgres;

#[derive(Parser)]
#[command(
    name = "tern-load",
    about = "Load on a Tern relay, end-to-end encrypted, over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone)]
struct Common {
    /// An already running relay (tern://fingerprint@host:port[,host:port…]) instead of
    /// starting one.
    #[arg(long)]
    relay: Option<String>,
    /// The relay binary to start (default: tern-relay-bench beside this binary).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Start the relay on this PostgreSQL database (a libpq connection string;
    /// `storage.backend = "postgres"`) instead of its own data directory.
    #[arg(long)]
    postgres: Option<String>,
    /// Pin the relay and this tool to CPUs: `relay=0,load=1` (lists and ranges:
    /// `relay=0-1,load=2,3`; either part alone). The relay runs under `taskset -c`.
    #[arg(long, value_parser = parse_pin)]
    pin: Option<Pinning>,
    /// The relay's `storage.commit_delay` ("0s", "1ms"); default: the relay's own.
    #[arg(long)]
    commit_delay: Option<String>,
}

fn parse_pin(s: &str) -> Result<Pinning, String> {
    Pinning::parse(s).map_err(|e| e.to_string())
}

impl Common {
    /// The relay's CPUs, `taskset -c` form; pinning an external relay is an error.
    fn relay_cpus(&self) -> Result<Option<String>, LoadError> {
        let cpus = self.pin.as_ref().and_then(Pinning::relay_list);
        if cpus.is_some() && self.relay.is_some() {
            return Err(
                "--pin relay=… pins a relay this run starts: not one given with --relay".into(),
            );
        }
        Ok(cpus)
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Senders and recipients all connected: throughput and end-to-end latency.
    Online {
        #[command(flatten)]
        common: Common,
        /// Sender/recipient pairs (each sender runs on a thread of its own).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
        pairs: u64,
        /// Messages in all.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        messages: u64,
        /// Application bytes per message.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=65_536))]
        size: u64,
        /// Messages per second in all (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Send requests in flight per sender.
        #[arg(long, default_value_t = 32)]
        inflight: usize,
        /// Relay durability: fsync or os.
        #[arg(long, default_value = "fsync", value_parser = ["fsync", "os"])]
        durability: String,
        /// Seal every envelope before the clock starts (as `offline` does), and have
        /// recipients check and acknowledge without opening: the relay alone. Default:
        /// end to end, sealing and opening inside the run.
        #[arg(long)]
        presealed: bool,
        /// Relay nodes: 2 starts a second node on the same PostgreSQL database, with
        /// every sender on the first and every recipient on the second. Without
        /// `--postgres`, a PostgreSQL (fsync on) is started for the run.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=2))]
        nodes: u64,
    },
    /// Recipients offline while senders enqueue, then they drain.
    Offline {
        #[command(flatten)]
        common: Common,
        /// Recipients (each with its own sender).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
        recipients: u64,
        /// Messages in all.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        messages: u64,
        /// Application bytes per message.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=65_536))]
        size: u64,
        /// Relay durability: fsync or os.
        #[arg(long, default_value = "fsync", value_parser = ["fsync", "os"])]
        durability: String,
        /// Envelopes per send request.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
        batch: u64,
        /// Send requests in flight per sender.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
    },
    /// One attachment up and down: MB/s each way, peak memory of relay and client.
    Media {
        #[command(flatten)]
        common: Common,
        /// Attachment bytes.
        #[arg(long, default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(0..=(16u64 << 30)))]
        size: u64,
    },
    /// One message to a group of devices by multi-recipient send: upload per
    /// device, relay data growth, fan-out latency.
    Group {
        #[command(flatten)]
        common: Common,
        /// Recipient devices.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
        devices: u64,
        /// Messages sent to all of them.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        messages: u64,
        /// Body bytes per message.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=65_536))]
        size: u64,
    },
    /// Idle authenticated connections: relay memory per connection.
    Connections {
        #[command(flatten)]
        common: Common,
        /// Connections to hold.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=15_000))]
        count: u64,
    },
    /// N messages queued, the relay stopped (SIGTERM) and started again on the same
    /// data: time until it serves (address printed, Ping answered), and its memory.
    Restart {
        #[command(flatten)]
        common: Common,
        /// Messages queued before the restart, in all.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        messages: u64,
        /// Recipients (each with its own sender).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
        recipients: u64,
        /// Bytes per envelope (opaque bytes: the relay never opens one).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(8..=65_536))]
        size: u64,
        /// Envelopes per send request.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1024))]
        batch: u64,
        /// Send requests in flight per sender.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Relay durability while queueing: fsync or os.
        #[arg(long, default_value = "os", value_parser = ["fsync", "os"])]
        durability: String,
        /// Directory for the run's data (a new directory inside it, deleted after the
        /// run); default: the system's temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds the restarted relay may take to print its address.
        #[arg(long, default_value_t = 1800)]
        start_timeout: u64,
        /// The relay's log filter (`info` shows how long the mailbox log took to open).
        #[arg(long, default_value = "warn")]
        relay_log: String,
        /// Recipients that drain (and acknowledge) all of theirs before the restart.
        #[arg(long, default_value_t = 0)]
        drain: u64,
    },
    /// N discoverable accounts seeded offline, then one address book synced: relay
    /// CPU per evaluated number, filter and delta sizes, build time, sync bytes.
    Discovery {
        #[command(flatten)]
        common: Common,
        /// Discoverable accounts on the relay.
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        users: u64,
        /// Numbers in the address book.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=50_000))]
        book: u64,
        /// Share of the book that are users.
        #[arg(long, default_value_t = 0.5)]
        hits: f64,
        /// Evaluations of the whole book, for the CPU figure.
        #[arg(long, default_value_t = 8)]
        rounds: u64,
        /// Directory for the run's data (a new directory inside it, deleted after).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The relay binary to start: `--relay-bin`, else the one beside this tool.
fn relay_binary(common: &Common) -> Result<PathBuf, LoadError> {
    match &common.relay_bin {
        Some(b) => Ok(b.clone()),
        None => sibling_relay_binary(),
    }
}

/// A run directory of its own, under `parent` if given (removed when dropped).
fn run_dir(parent: Option<&PathBuf>) -> Result<tempfile::TempDir, LoadError> {
    Ok(match parent {
        Some(parent) => tempfile::tempdir_in(parent)?,
        None => tempfile::tempdir()?,
    })
}

fn relay_for(
    common: &Common,
    durability: &str,
    max_connections: usize,
) -> Result<RelayUnderTest, LoadError> {
    if let Some(address) = &common.relay {
        return Ok(RelayUnderTest::external(address.parse()?));
    }
    let binary = relay_binary(common)?;
    let relay_cpus = common.relay_cpus()?;
    RelayUnderTest::spawn(&RelaySettings {
        binary: &binary,
        durability,
        max_connections,
        dir: None,
        start_timeout: START_TIMEOUT,
        log: "warn",
        postgres: common.postgres.as_deref(),
        cpus: relay_cpus.as_deref(),
        commit_delay: common.commit_delay.as_deref(),
    })
}

async fn run(mode: Mode) -> Result<(load::Report, bool), LoadError> {
    let as_usize = |v: u64| usize::try_from(v).map_err(|_| LoadError::from("value too large"));
    match mode {
        Mode::Online {
            mut common,
            pairs,
            messages,
            size,
            rate,
            inflight,
            durability,
            nodes,
            presealed,
        } => {
            let relay_cpus = common.relay_cpus()?;
            if nodes > 1 && common.relay.is_some() {
                return Err("--nodes 2 starts its own nodes: --relay does not apply".into());
            }
            // Kept until the run ends: a database of this run's own.
            let _own_pg = match (&common.postgres, nodes > 1) {
                (None, true) => {
                    let pg = own_postgres()?;
                    common.postgres = Some(pg.conn_str("tern"));
                    Some(pg)
                }
                _ => None,
            };
            let pairs = as_usize(pairs)?;
            let max_connections = 4 * pairs + 16;
            let mut relay = relay_for(&common, &durability, max_connections)?;
            let mut second = match nodes {
                1 => None,
                _ => Some(RelayUnderTest::spawn_node(
                    &RelaySettings {
                        binary: &relay_binary(&common)?,
                        durability: &durability,
                        max_connections,
                        dir: None,
                        start_timeout: START_TIMEOUT,
                        log: "warn",
                        postgres: common.postgres.as_deref(),
                        cpus: relay_cpus.as_deref(),
                        commit_delay: common.commit_delay.as_deref(),
                    },
                    Some(&relay),
                )?),
            };
            let pg = match (&common.postgres, &common.relay) {
                (Some(url), None) => Some(load::pg::PgProbe::connect(url).await?),
                _ => None,
            };
            let args = load::OnlineArgs {
                pairs,
                messages,
                size: as_usize(size)?,
                rate,
                inflight,
                presealed,
            };
            let across = load::OnlineNodes {
                sending: &relay,
                receiving: second.as_ref().unwrap_or(&relay),
                pg: pg.as_ref(),
            };
            let report = load::online_across(&across, &args).await;
            relay.stop();
            if let Some(b) = second.as_mut() {
                b.stop();
            }
            let mut report = report?;
            report
                .extra
                .insert("fsync".into(), f64::from(u8::from(durability == "fsync")));
            Ok((report, common.json))
        }
        Mode::Offline {
            common,
            recipients,
            messages,
            size,
            durability,
            batch,
            inflight,
        } => {
            let recipients = as_usize(recipients)?;
            let mut relay = relay_for(&common, &durability, 4 * recipients + 16)?;
            let args = load::OfflineArgs {
                recipients,
                messages,
                size: as_usize(size)?,
                batch: as_usize(batch)?,
                inflight,
            };
            let report = load::offline(&relay, &args).await;
            relay.stop();
            let mut report = report?;
            report
                .extra
                .insert("fsync".into(), f64::from(u8::from(durability == "fsync")));
            Ok((report, common.json))
        }
        Mode::Media { common, size } => {
            let mut relay = relay_for(&common, "fsync", 16)?;
            let report = load::media(&relay, &load::MediaArgs { size }).await;
            relay.stop();
            Ok((report?, common.json))
        }
        Mode::Group {
            common,
            devices,
            messages,
            size,
        } => {
            let devices = as_usize(devices)?;
            let mut relay = relay_for(&common, "os", devices + 16)?;
            let args = load::GroupArgs {
                devices,
                messages,
                size: as_usize(size)?,
            };
            let report = load::group(&relay, &args).await;
            relay.stop();
            Ok((report?, common.json))
        }
        Mode::Connections { common, count } => {
            let count = as_usize(count)?;
            let mut relay = relay_for(&common, "os", count + 16)?;
            let report = load::connections(&relay, &load::ConnectionsArgs { count }).await;
            relay.stop();
            Ok((report?, common.json))
        }
        Mode::Restart {
            common,
            messages,
            recipients,
            size,
            batch,
            inflight,
            durability,
            dir,
            start_timeout,
            relay_log,
            drain,
        } => {
            if common.relay.is_some() {
                return Err("restart starts its own relay: --relay does not apply".into());
            }
            let relay_cpus = common.relay_cpus()?;
            let binary = relay_binary(&common)?;
            let run_dir = run_dir(dir.as_ref())?;
            let recipients = as_usize(recipients)?;
            let settings = RelaySettings {
                binary: &binary,
                durability: &durability,
                max_connections: 4 * recipients + 16,
                dir: Some(run_dir.path()),
                start_timeout: std::time::Duration::from_secs(start_timeout),
                log: &relay_log,
                postgres: common.postgres.as_deref(),
                cpus: relay_cpus.as_deref(),
                commit_delay: common.commit_delay.as_deref(),
            };
            let args = load::RestartArgs {
                messages,
                recipients,
                size: as_usize(size)?,
                batch: as_usize(batch)?,
                inflight,
                drained: as_usize(drain)?,
            };
            let report = load::restart(&settings, &args).await?;
            Ok((report, common.json))
        }
        Mode::Discovery {
            common,
            users,
            book,
            hits,
            rounds,
            dir,
        } => {
            if common.relay.is_some() {
                return Err("discovery seeds its own relay: --relay does not apply".into());
            }
            let relay_cpus = common.relay_cpus()?;
            let binary = relay_binary(&common)?;
            let run_dir = run_dir(dir.as_ref())?;
            let settings = RelaySettings {
                binary: &binary,
                durability: "os",
                max_connections: 16,
                dir: Some(run_dir.path()),
                start_timeout: START_TIMEOUT,
                log: "warn",
                postgres: common.postgres.as_deref(),
                cpus: relay_cpus.as_deref(),
                commit_delay: common.commit_delay.as_deref(),
            };
            let args = load::discovery::DiscoveryArgs {
                users: as_usize(users)?,
                book: as_usize(book)?,
                hits,
                rounds: as_usize(rounds)?,
            };
            let report = load::discovery::discovery(&settings, &args).await?;
            Ok((report, common.json))
        }
    }
}

/// A PostgreSQL cluster for this run (fsync on, as in production), with database
/// `tern`; Debian's `postgresql` server binaries must be installed.
fn own_postgres() -> Result<TestPostgres, LoadError> {
    eprintln!("  starting PostgreSQL (fsync on) for the run");
    std::panic::catch_unwind(|| {
        let pg = TestPostgres::start_with(&[
            ("fsync", "on"),
            ("max_connections", "200"),
            ("shared_preload_libraries", "pg_stat_statements"),
        ]);
        pg.create_db("tern");
        pg
    })
    .map_err(|_| "could not start PostgreSQL (see above); or pass --postgres".into())
}

/// Whether the report goes out as JSON.
fn wants_json(mode: &Mode) -> bool {
    match mode {
        Mode::Online { common, .. }
        | Mode::Offline { common, .. }
        | Mode::Media { common, .. }
        | Mode::Group { common, .. }
        | Mode::Connections { common, .. }
        | Mode::Restart { common, .. }
        | Mode::Discovery { common, .. } => common.json,
    }
}

/// The run's pinning, from whichever mode's common options.
fn pinning(mode: &Mode) -> Pinning {
    match mode {
        Mode::Online { common, .. }
        | Mode::Offline { common, .. }
        | Mode::Media { common, .. }
        | Mode::Group { common, .. }
        | Mode::Connections { common, .. }
        | Mode::Restart { common, .. }
        | Mode::Discovery { common, .. } => common.pin.clone().unwrap_or_default(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = wants_json(&cli.mode);
    let pinning = pinning(&cli.mode);
    // Before the runtime starts: its threads inherit this thread's CPUs.
    if let Some(cpus) = &pinning.load {
        if let Err(e) = pin::pin_this_thread(cpus) {
            eprintln!("tern-load: FAILED: {e}");
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.mode)) {
        Ok((mut report, json)) => {
            report.pinning = Some(pinning.describe());
            if json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("tern-load: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-load: FAILED: {e}");
            // A script reading stdout sees why, even if it drops stderr.
            if json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            ExitCode::FAILURE
        }
    }
}
