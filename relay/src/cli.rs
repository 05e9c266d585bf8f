//! The `tern-relay` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::store::Durability;
use crate::Relay;
use clap::{Parser, Subcommand};
use tern_platform::clock::SystemClock;
use tern_proto::AccountId;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "tern-relay",
    version,
    about = "Tern end-to-end encrypted store-and-forward relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay. With no flags: data in ./tern-data, listening on 127.0.0.1:7443,
    /// with a self-signed certificate made on first start.
    Serve(ServeArgs),
    /// Operator commands: through the running relay's admin listener (with the
    /// token in the data directory's admin.token) when one runs, else on the
    /// stopped relay's data directory.
    #[command(subcommand)]
    Admin(AdminCommand),
    // Engineer B (issue 18 items 4-7): configuration files.
    /// Write a configuration file with every key, its default and its meaning
    /// (commented), to FILE (which must not exist) or standard output.
    Init(InitArgs),
    /// Check a configuration file: every problem is named at once (unknown keys,
    /// wrong types, bad values, rules between keys and those checked at start); the
    /// exit code is non-zero if there is one.
    CheckConfig(CheckConfigArgs),
}

#[derive(Parser)]
struct InitArgs {
    /// Where to write; standard output if omitted.
    file: Option<PathBuf>,
    /// Print the Markdown table of every key instead (README.md's).
    #[arg(long)]
    markdown: bool,
}

#[derive(Parser)]
struct CheckConfigArgs {
    /// The TOML configuration file.
    file: PathBuf,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Delete an account and everything the relay holds for it (keys, queued
    /// messages, delivery token, media charges and unfinished uploads): by the
    /// running relay, or on the stopped relay's data directory.
    DeleteAccount(AdminArgs),
    /// Write everything the relay holds about an account as JSON (the format is
    /// relay/schema/account-export-v1.schema.json): from the running relay, or from
    /// the stopped relay's data directory.
    ExportAccount(ExportArgs),
    /// Write a backup of the relay (a data directory a relay starts on, holding
    /// everything acknowledged before the backup began) into DIR, a new directory:
    /// by the running relay while it serves, or from the stopped relay's data
    /// directory. Answers once the backup is complete and synced.
    Backup(BackupArgs),
    /// Copy the whole relay (accounts, keys, discovery tags, the blob index, queued
    /// messages with their seqs and expiry) into an empty PostgreSQL database, then
    /// verify the copy. Refused while a relay runs on the data directory.
    Migrate(MigrateArgs),
    /// What the running relay's metrics show (aggregates only), as a table.
    Stats(StatsArgs),
    /// An account's devices: ids, created and last-seen days (no keys).
    ListDevices(ListDevicesArgs),
    /// Re-read the configuration file's `[rate_limits]` rates and counts in the
    /// running relay; a file that changes any other key is refused, naming it.
    Reload(RemoteArgs),
    // rotate-cert (engineer cert): one block, kept last.
    /// Stage the relay's next TLS certificate: a new self-signed one (or the given
    /// files) served from the end of the overlap on; until then authenticated
    /// clients are told its fingerprint, so they pin both.
    RotateCert(RotateCertArgs),
}

#[derive(Parser)]
struct RotateCertArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// How long clients have to learn the next certificate before it is served
    /// (e.g. "14days", "30s").
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "at")]
    overlap: Option<Duration>,
    /// Or when it is served, as an RFC 3339 time (e.g. "2027-01-01T00:00:00Z"):
    /// give every node of one relay the same.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    at: Option<std::time::SystemTime>,
    /// The operator's new PEM certificate chain (with --key) instead of a new
    /// self-signed certificate.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The operator's new PEM private key (with --cert).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Stage in place of a certificate already staged (clients that learned that
    /// one and do not connect before the switch must be re-pinned).
    #[arg(long)]
    replace: bool,
}

#[derive(Parser)]
struct RemoteArgs {
    /// The running relay's admin listener, e.g. http://127.0.0.1:7444 (default: the
    /// address in the data directory's admin.addr while a relay holds the data
    /// directory; without one, the commands that can work on the stopped relay's data
    /// directory do). Needs --token-file: the token goes where you name it only with
    /// the token you name.
    #[arg(long, env = "TERN_ADMIN_URL")]
    admin_url: Option<String>,
    /// The admin token's file (default: the data directory's admin.token).
    #[arg(long, env = "TERN_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// TOML configuration file (for the data directory and storage settings).
    #[arg(long, short, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory; overrides the configuration's.
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Parser)]
struct BackupArgs {
    /// The new directory (it must not exist; its parent must, outside the data
    /// directory). Written by the relay's process, so it must be able to write there.
    dir: PathBuf,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Parser)]
struct StatsArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct ListDevicesArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct MigrateArgs {
    /// The target database: a libpq URL or keywords (`[postgres]`'s password_file
    /// and ca_file apply). It must hold no account or message.
    #[arg(long)]
    to: String,
    /// Also copy every blob's bytes from the data directory into the object store
    /// of the configuration's `[objects]` (one object per blob, each checked
    /// against its id; blobs already there are left, so a second run resumes).
    #[arg(long)]
    objects: bool,
    /// TOML configuration file (for the data directory and storage settings).
    #[arg(long, short, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory; overrides the configuration's.
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Parser)]
struct ExportArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Include each queued message's ciphertext (base64).
    #[arg(long)]
    ciphertexts: bool,
    /// Write to this file (created with mode 0600; it must not exist; nothing is
    /// left there if the export fails) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Parser)]
struct AdminArgs {
    /// The account id: 32 hexadecimal digits.
    account: String,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Parser, Clone)]
struct ServeArgs {
    /// TOML configuration file; flags override it.
    #[arg(long, short, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, self-signed certificate).
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on; port 0 picks a free port.
    #[arg(long, env = "TERN_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Host put in the printed relay address (defaults to the listen IP).
    #[arg(long)]
    advertise_host: Option<String>,
    /// When sends are acknowledged: after fsync, or after handing to the OS.
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// How long undelivered messages are kept (e.g. "7days"); at most 30 days.
    #[arg(long, value_parser = humantime::parse_duration)]
    message_ttl: Option<Duration>,
    /// Allows `verification.verifier = "dev-file"` (codes written to files; development only).
    #[arg(long)]
    allow_dev_verifier: bool,
    /// Log filter (tracing-subscriber syntax), e.g. "info" or "tern_relay=debug".
    #[arg(long, env = "TERN_LOG", default_value = "info")]
    log: String,
    /// The admin listener (metrics, health, admin commands): "auto" (127.0.0.1 on
    /// the relay's port + 1), "off", or an address; overrides `[admin] listen`.
    #[arg(long, env = "TERN_ADMIN_LISTEN")]
    admin_listen: Option<crate::config::AdminListen>,
    /// Log lines as text, or as one JSON object per line.
    #[arg(long, env = "TERN_LOG_FORMAT", value_enum, default_value_t)]
    log_format: crate::logging::LogFormat,
}

/// Parses the command line and runs the command; what `tern-relay` does.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Admin(AdminCommand::DeleteAccount(args)) => delete_account(args),
        Command::Admin(AdminCommand::ExportAccount(args)) => export_account(args),
        Command::Admin(AdminCommand::Backup(args)) => backup(args),
        Command::Admin(AdminCommand::Migrate(args)) => migrate(args),
        Command::Admin(AdminCommand::Stats(args)) => stats(args),
        Command::Admin(AdminCommand::ListDevices(args)) => list_devices(args),
        Command::Admin(AdminCommand::Reload(args)) => reload(args),
        Command::Admin(AdminCommand::RotateCert(args)) => rotate_cert(args),
        Command::Init(args) => init(args),
        Command::CheckConfig(args) => check_config(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Dependencies' lines may name peers: every line is redacted (P9).
    crate::logging::install(&args.log, args.log_format)?;
    let config = serve_config(&args)?;
    crate::store::fault::refuse_unless_compiled_in()?;

    // The blocking pool holds the threads that workers hand their cores to while they
    // wait: room for the bounded waits (256 store calls, 256 ordering-lock waits, 16
    // exports) with nearly as much again to spare. Threads are made only when needed.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(1024)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        // Before anything is announced: a SIGTERM right after readiness stops cleanly.
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let relay = Relay::start(&config, Arc::new(SystemClock)).await?;
        // The address goes to stdout, on its own line, for people and scripts.
        println!("tern-relay listening on {}", relay.address());
        if let Some(admin) = relay.admin_addr() {
            println!("tern-relay admin listening on http://{admin}");
        }
        if args.config.is_some() {
            let args = args.clone();
            relay.set_config_source(Box::new(move || serve_config(&args)));
        }
        info!(durability = ?config.durability, "relay started");
        // systemd's Type=notify: ready once serving (nothing without NOTIFY_SOCKET).
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            warn!(error = %e, "could not tell the service manager the relay is ready");
        }
        if crate::store::fault::COMPILED_IN && std::env::var_os(crate::store::fault::VAR).is_some()
        {
            warn!(
                "fault injection is active ({}): a test build",
                crate::store::fault::VAR
            );
        }
        #[cfg(unix)]
        wait_for_signal(&mut term).await?;
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await?;
        info!("shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        relay.shutdown().await?;
        info!("stopped");
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    // Work left on the blocking pool (a media transfer waiting on a hung object store,
    // up to its deadline) is not waited for past a moment: the stop has flushed the
    // mailboxes, and an abandoned upload is resumed by its client.
    runtime.shutdown_timeout(BLOCKING_GRACE);
    served
}

/// How long a stopped relay waits for blocking work still running.
const BLOCKING_GRACE: Duration = Duration::from_secs(2);

/// The configuration `serve` runs with: the file, then the flags over it. Read
/// again by `admin reload`.
fn serve_config(args: &ServeArgs) -> crate::Result<Config> {
    let mut config = config_at(args.config.as_deref(), args.data_dir.clone())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = &args.advertise_host {
        config.advertise_host = Some(h.clone());
    }
    if let Some(d) = args.durability {
        config.durability = d;
    }
    if let Some(t) = args.message_ttl {
        config.expiry.message_ttl = t;
    }
    if args.allow_dev_verifier {
        config.verification.allow_dev_verifier = true;
    }
    if let Some(a) = args.admin_listen {
        config.admin.listen = a;
    }
    config.validate()?;
    Ok(config)
}

/// What an admin command works on: its account, the configuration, and the running
/// relay when one answers on the data directory (or at `--admin-url`).
struct Target {
    account: AccountId,
    config: Config,
    online: Option<crate::admin::client::Online>,
}

/// The account and configuration an admin command names, and the running relay.
fn admin_target(args: AdminArgs) -> Result<Target, Box<dyn std::error::Error>> {
    let account = crate::admin::parse_account(&args.account)?;
    let (config, online) = remote_target(args.remote)?;
    Ok(Target {
        account,
        config,
        online,
    })
}

/// The configuration file's (or the defaults), with `data_dir` over its data directory.
fn config_at(file: Option<&Path>, data_dir: Option<PathBuf>) -> crate::Result<Config> {
    let mut config = match file {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    Ok(config)
}

fn remote_target(
    args: RemoteArgs,
) -> Result<(Config, Option<crate::admin::client::Online>), Box<dyn std::error::Error>> {
    if args.admin_url.is_some() && args.token_file.is_none() {
        return Err("--admin-url (TERN_ADMIN_URL) needs --token-file (TERN_ADMIN_TOKEN_FILE): the data directory's token is sent only to the relay that holds the data directory".into());
    }
    let config = config_at(args.config.as_deref(), args.data_dir.clone())?;
    crate::store::fault::refuse_unless_compiled_in()?;
    let online = crate::admin::client::Online::locate(
        &config.data_dir,
        args.admin_url.as_deref(),
        args.token_file.as_deref(),
    )?;
    Ok((config, online))
}

/// Runs `call` on the running relay: `None` when none answers (an `admin.addr` a
/// crashed relay left), so the caller works offline; an explicit `--admin-url`
/// that does not answer is an error.
fn online<T>(
    runtime: &tokio::runtime::Runtime,
    online: Option<&crate::admin::client::Online>,
    explicit: bool,
    call: impl AsyncFnOnce(
        &crate::admin::client::Online,
    ) -> Result<T, crate::admin::client::ClientError>,
) -> Result<Option<T>, Box<dyn std::error::Error>> {
    let Some(o) = online else { return Ok(None) };
    match runtime.block_on(call(o)) {
        Ok(t) => Ok(Some(t)),
        Err(crate::admin::client::ClientError::NotRunning(_)) if !explicit => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn stats(args: StatsArgs) -> Result<(), Box<dyn std::error::Error>> {
    let json = args.json;
    let (_, online) = remote_target(args.remote)?;
    let online = online
        .ok_or("no running relay: none holds the data directory or it has no admin.addr (give --admin-url and --token-file?)")?;
    let samples = current_thread()?.block_on(online.stats())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&samples)?);
    } else {
        print!("{}", crate::admin::client::table(&samples));
    }
    Ok(())
}

fn reload(args: RemoteArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (_, online) = remote_target(args)?;
    let online = online
        .ok_or("no running relay: none holds the data directory or it has no admin.addr (give --admin-url and --token-file?)")?;
    let keys = current_thread()?.block_on(online.reload())?;
    if keys.is_empty() {
        println!("reloaded: nothing changed");
    } else {
        println!("reloaded: {}", keys.join(", "));
    }
    Ok(())
}

fn rotate_cert(args: RotateCertArgs) -> Result<(), Box<dyn std::error::Error>> {
    let absolute = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
    let switch_at_ms = match args.at {
        Some(t) => Some(u64::try_from(
            t.duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| "--at is before 1970")?
                .as_millis(),
        )?),
        None => None,
    };
    let request = crate::admin::rotate::RotateRequest {
        overlap_secs: args.overlap.map(|d| d.as_secs().max(1)),
        switch_at_ms,
        // The relay reads them: absolute, as it may run elsewhere in the tree.
        cert: absolute(args.cert),
        key: absolute(args.key),
        replace: args.replace,
    };
    let explicit = args.remote.admin_url.is_some();
    let (config, o) = remote_target(args.remote)?;
    let runtime = current_thread()?;
    let rotated = match online(&runtime, o.as_ref(), explicit, async |o| {
        o.rotate_cert(&request).await
    })? {
        Some(r) => r,
        None => runtime.block_on(crate::admin::rotate::rotate_offline(&config, &request))?,
    };
    let when = std::time::UNIX_EPOCH + Duration::from_millis(rotated.switch_at_ms);
    println!("current certificate sha256 {}", rotated.current);
    println!("next certificate    sha256 {}", rotated.next);
    println!(
        "served from         {} (clients that connect before then learn it)",
        humantime::format_rfc3339_seconds(when)
    );
    Ok(())
}

fn list_devices(args: ListDevicesArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (json, explicit) = (args.json, args.admin.remote.admin_url.is_some());
    let t = admin_target(args.admin)?;
    let runtime = current_thread()?;
    let account = t.account;
    let devices = match online(&runtime, t.online.as_ref(), explicit, async |o| {
        o.list_devices(&account).await
    })? {
        Some(d) => d,
        None => runtime.block_on(crate::admin::list_devices(&t.config, account))?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    let day = |d: Option<u32>| d.map_or_else(|| "unknown".to_owned(), crate::admin::client::date);
    println!(
        "{:<8} {:<8} {:<11} {:<11}",
        "device", "primary", "created", "last seen"
    );
    for d in devices {
        let primary = if d.primary { "yes" } else { "no" };
        println!(
            "{:<8} {:<8} {:<11} {:<11}",
            d.id,
            primary,
            day(d.created_day),
            day(d.last_seen_day)
        );
    }
    Ok(())
}

fn export_account(args: ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let explicit = args.admin.remote.admin_url.is_some();
    let t = admin_target(args.admin)?;
    let (account, config) = (t.account, t.config);
    let options = crate::export::ExportOptions {
        include_ciphertexts: args.ciphertexts,
    };
    let runtime = current_thread()?;
    if let Some(o) = &t.online {
        let ciphertexts = args.ciphertexts;
        let exported = match &args.out {
            Some(path) => {
                if path.exists() {
                    return Err(format!("{} exists", path.display()).into());
                }
                write_file(path, |out| {
                    let wrote = online(&runtime, Some(o), explicit, async |o| {
                        o.export_account(&account, ciphertexts, out).await
                    })?;
                    Ok(wrote.map(|_| ()))
                })?
            }
            None => {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                online(&runtime, Some(o), explicit, async |o| {
                    o.export_account(&account, ciphertexts, &mut out).await
                })?
                .map(|_| ())
            }
        };
        if exported.is_some() {
            eprintln!("account exported by the running relay");
            return Ok(());
        }
    }
    let exported = match &args.out {
        Some(path) => {
            if path.exists() {
                return Err(format!("{} exists", path.display()).into());
            }
            export_to_file(&runtime, &config, account, options, path)?
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            runtime.block_on(crate::admin::export_account(
                &config, account, options, &mut out,
            ))?
        }
    };
    eprintln!(
        "account exported: {} devices, {} queued messages",
        exported.devices, exported.messages
    );
    Ok(())
}

/// Writes an export to a file of a name of its own beside `path` (made here, so only
/// a file this command created is ever removed), then links it to `path`, which
/// fails rather than replace a file that appeared meanwhile, and syncs the
/// directory. A failed export leaves no file.
fn export_to_file(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    account: AccountId,
    options: crate::export::ExportOptions,
    path: &std::path::Path,
) -> Result<crate::export::Exported, Box<dyn std::error::Error>> {
    let exported = write_file(path, |out| {
        let exported =
            runtime.block_on(crate::admin::export_account(config, account, options, out))?;
        Ok(Some(exported))
    })?;
    exported.ok_or_else(|| "nothing exported".into())
}

/// Writes what `write` writes to `path` as [`export_to_file`] says; `write`
/// answering `None` (it found nothing to write there) leaves no file either.
fn write_file<T>(
    path: &std::path::Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> Result<Option<T>, Box<dyn std::error::Error>>,
) -> Result<Option<T>, Box<dyn std::error::Error>> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let (mut file, partial) = (|| {
        // Bounded: a name taken is another process's file, left alone.
        for n in 0..64u32 {
            let partial = dir.join(format!(".{name}.{}.{n}.partial", std::process::id()));
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial);
            match opened {
                Ok(file) => return Ok((file, partial)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists))
    })()?;
    let written = (|| -> Result<_, Box<dyn std::error::Error>> {
        let mut out = std::io::BufWriter::new(&mut file);
        let wrote = write(&mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        if wrote.is_some() {
            std::fs::hard_link(&partial, path)?;
        }
        Ok(wrote)
    })();
    let removed = std::fs::remove_file(&partial);
    let wrote = written?;
    removed?;
    if wrote.is_some() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(wrote)
}

fn migrate(args: MigrateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = config_at(args.config.as_deref(), args.data_dir.clone())?;
    crate::store::fault::refuse_unless_compiled_in()?;
    let migrated = crate::admin::migrate::migrate(&config, &args.to, args.objects)?;
    println!("migrated and verified:\n{migrated}");
    Ok(())
}

fn backup(args: BackupArgs) -> Result<(), Box<dyn std::error::Error>> {
    let explicit = args.remote.admin_url.is_some();
    // The relay resolves a relative path against its own directory: this one's.
    let dir = std::path::absolute(&args.dir)?;
    let (config, relay) = remote_target(args.remote)?;
    let runtime = current_thread()?;
    if let Some(done) = online(&runtime, relay.as_ref(), explicit, async |o| {
        o.backup(&dir).await
    })? {
        println!(
            "backup written by the running relay to {}: {done}",
            dir.display()
        );
        return Ok(());
    }
    // Ctrl-C or SIGTERM stops the copy between files; the partial directory is
    // removed before the command exits.
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let copying = {
        let (cancel, dir) = (cancel.clone(), dir.clone());
        std::thread::spawn(move || {
            crate::admin::backup(&config, &dir, &cancel).map_err(|e| e.to_string())
        })
    };
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            if copying.is_finished() {
                return Ok::<_, std::io::Error>(());
            }
            tokio::select! {
                r = wait_for_signal(&mut term) => {
                    r?;
                    eprintln!("stopping the backup");
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    })?;
    let done = copying.join().map_err(|_| "the backup's thread failed")??;
    println!("backup written to {}: {done}", dir.display());
    Ok(())
}

fn delete_account(args: AdminArgs) -> Result<(), Box<dyn std::error::Error>> {
    let explicit = args.remote.admin_url.is_some();
    let t = admin_target(args)?;
    let (account, config) = (t.account, t.config);
    let runtime = current_thread()?;
    let remote = online(&runtime, t.online.as_ref(), explicit, async |o| {
        o.delete_account(&account).await
    })?;
    if let Some((devices, messages, uploads)) = remote {
        println!(
            "account deleted by the running relay: {devices} devices, {messages} queued messages, {uploads} unfinished uploads"
        );
        return Ok(());
    }
    let deleted = runtime.block_on(crate::admin::delete_account(&config, account))?;
    println!(
        "account deleted: {} devices, {} queued messages, {} unfinished uploads",
        deleted.devices, deleted.messages, deleted.uploads
    );
    Ok(())
}

fn init(args: InitArgs) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write;
    let text = if args.markdown {
        crate::config::reference::markdown_table()
    } else {
        crate::config::reference::init_toml()
    };
    match &args.file {
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn check_config(args: CheckConfigArgs) -> Result<(), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("reading {}: {e}", args.file.display()))?;
    let problems = crate::config::reference::check(&text);
    if problems.is_empty() {
        println!("{}: ok", args.file.display());
        return Ok(());
    }
    for p in &problems {
        println!("{}: {p}", args.file.display());
    }
    Err(format!("{} problem(s) in {}", problems.len(), args.file.display()).into())
}

#[cfg(unix)]
async fn wait_for_signal(term: &mut tokio::signal::unix::Signal) -> std::io::Result<()> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
