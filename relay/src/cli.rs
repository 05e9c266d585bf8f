//! The `tern-relay` command line.

use std::path::PathBuf;
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
    /// Operator commands on a stopped relay's data directory.
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
    /// messages, delivery token, media charges and unfinished uploads). Refused while
    /// a relay runs on the data directory.
    DeleteAccount(AdminArgs),
    /// Write everything the relay holds about an account as JSON (the format is
    /// relay/schema/account-export-v1.schema.json). Refused while a relay runs on the
    /// data directory.
    ExportAccount(ExportArgs),
    /// Copy the whole relay (accounts, keys, discovery tags, the blob index, queued
    /// messages with their seqs and expiry) into an empty PostgreSQL database, then
    /// verify the copy. Refused while a relay runs on the data directory.
    Migrate(MigrateArgs),
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
    /// TOML configuration file (for the data directory and storage settings).
    #[arg(long, short, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory; overrides the configuration's.
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Parser)]
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
        Command::Admin(AdminCommand::Migrate(args)) => migrate(args),
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
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = args.advertise_host {
        config.advertise_host = Some(h);
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
    config.validate()?;
    crate::store::fault::refuse_unless_compiled_in()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let relay = Relay::start(&config, Arc::new(SystemClock)).await?;
        // The address goes to stdout, on its own line, for people and scripts.
        println!("tern-relay listening on {}", relay.address());
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
        wait_for_signal().await?;
        info!("shutting down");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        relay.shutdown().await?;
        info!("stopped");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// The account and configuration an admin command names.
fn admin_target(args: AdminArgs) -> Result<(AccountId, Config), Box<dyn std::error::Error>> {
    let account = crate::admin::parse_account(&args.account)?;
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    crate::store::fault::refuse_unless_compiled_in()?;
    Ok((account, config))
}

fn export_account(args: ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (account, config) = admin_target(args.admin)?;
    let options = crate::export::ExportOptions {
        include_ciphertexts: args.ciphertexts,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
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
        let exported = runtime.block_on(crate::admin::export_account(
            config, account, options, &mut out,
        ))?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::hard_link(&partial, path)?;
        Ok(exported)
    })();
    let removed = std::fs::remove_file(&partial);
    let exported = written?;
    removed?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(exported)
}

fn migrate(args: MigrateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    crate::store::fault::refuse_unless_compiled_in()?;
    let migrated = crate::admin::migrate::migrate(&config, &args.to, args.objects)?;
    println!("migrated and verified:\n{migrated}");
    Ok(())
}

fn delete_account(args: AdminArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (account, config) = admin_target(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
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

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
