//! Relay configuration: defaults that run with no file at all, a TOML file for the
//! rest, and command-line flags over both.
//!
//! Every key, its default and its meaning are read from the types below (their doc
//! comments, through `schemars`) by [`mod@reference`]: `tern-relay init` writes them as a
//! commented file, `tern-relay check-config` checks a file against them, and README.md's
//! table is generated from them (a test holds it current). A key's doc comment is
//! therefore what an operator reads: write it for them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::core::expiry::Ttl;
use crate::core::limits::Limits;
use crate::error::{Error, Result};
use crate::store::{Durability, DEFAULT_SEGMENT_BYTES};

mod admin;
mod budget;
mod connections;
mod discovery;
mod objects;
mod postgres;
mod push;
mod rate;
pub mod reference;
mod verification;

pub use self::admin::{AdminConfig, AdminListen};
pub use self::budget::BudgetConfig;
pub use self::connections::{ConnectionsConfig, Retry};
pub use self::discovery::{BucketRate, DiscoveryConfig};
pub use self::objects::ObjectsConfig;
pub(crate) use self::objects::MAX_PART_MB;
pub use self::postgres::PostgresConfig;
pub use self::push::PushConfig;
pub use self::rate::{PrekeyLimit, RateLimitsConfig, MAX_DEVICES_BOUND};
pub use self::verification::{VerificationConfig, VerifierKind, WebhookConfig};

/// The relay's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database and the self-signed certificate live.
    pub data_dir: PathBuf,
    /// UDP address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Host name or IP put in the printed relay address; the listen IP if unset.
    pub advertise_host: Option<String>,
    /// When a send is acknowledged to its sender.
    pub durability: Durability,
    /// Certificate; self-signed when absent.
    pub tls: TlsConfig,
    /// Per-device queues, frames, batches, connections and the delivery window.
    pub limits: LimitsConfig,
    /// Per-account and per-sender limits.
    pub rate_limits: RateLimitsConfig,
    /// How long undelivered messages are kept, and the sweeper that deletes them.
    pub expiry: ExpiryConfig,
    /// Where the state lives (this directory or PostgreSQL) and storage tuning.
    pub storage: StorageConfig,
    /// Encrypted media (attachments).
    pub media: MediaConfig,
    /// Where blob bytes live: files (the default) or an S3-compatible object store.
    pub objects: ObjectsConfig,
    /// Admission of connections and what they may do before authentication.
    pub connections: ConnectionsConfig,
    /// Relay-wide budgets and the free-disk reserve.
    pub budget: BudgetConfig,
    /// Contact discovery.
    pub discovery: DiscoveryConfig,
    /// Phone verification.
    pub verification: VerificationConfig,
    /// The shared database, for `storage.backend = "postgres"`.
    pub postgres: PostgresConfig,
    /// The admin listener: metrics, health, admin commands.
    pub admin: AdminConfig,
    /// Content-free wake-ups for devices that are not connected.
    pub push: PushConfig,
}

/// Media limits and lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Largest blob, bytes.
    pub max_blob_bytes: u64,
    /// Uploads one account may run at once.
    pub max_concurrent_uploads: usize,
    /// Unfinished uploads one account may keep (running or waiting for a resume).
    pub max_unfinished_uploads: usize,
    /// Bytes charged to one account: each finished upload until the end of the UTC
    /// day its blob was to expire on, plus unfinished uploads.
    pub max_account_bytes: u64,
    /// Upload bytes per second per account.
    pub max_upload_bytes_per_sec: u64,
    /// How long a blob lives after its last upload or forward; at most 30 days.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub blob_ttl: Duration,
    /// When an upload with no progress is deleted.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub abandon_after: Duration,
}

impl Default for MediaConfig {
    // The same values as the media service's own defaults (a test in `server.rs` holds
    // them together); written out so that the configuration imports no service.
    fn default() -> Self {
        MediaConfig {
            max_blob_bytes: 2 << 30,
            max_concurrent_uploads: 4,
            max_unfinished_uploads: 16,
            max_account_bytes: 20 << 30,
            max_upload_bytes_per_sec: 200 << 20,
            blob_ttl: Duration::from_secs(30 * 24 * 3600),
            abandon_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// A certificate chain and key in PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

/// Limits; see [`Limits`] for the mailbox ones.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest envelope payload.
    pub max_envelope_bytes: usize,
    /// Most envelopes in one send (less than 65,536: a frame holds at most 65,536
    /// elements in its repeated fields).
    pub max_batch: usize,
    /// Most messages queued per device.
    pub max_queued_messages: u64,
    /// Most payload bytes queued per device.
    pub max_queued_bytes: u64,
    /// Largest frame on the control stream.
    pub max_frame_bytes: usize,
    /// Most concurrent connections; more are refused.
    pub max_connections: usize,
    /// Most requests in progress per connection; the relay stops reading past it.
    pub max_requests_per_connection: usize,
    /// Most unacknowledged pushes per connection.
    pub delivery_window: usize,
    /// Most payload bytes of unacknowledged pushes per connection (one push always
    /// fits, whatever its size).
    pub delivery_window_bytes: usize,
    /// Replaced by `rate_limits.registrations_per_prefix`; still read so that a
    /// configuration written for an earlier relay starts: when set, it becomes that
    /// rate as "N/1m".
    pub registrations_per_address_per_minute: Option<u32>,
}

/// Expiry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ExpiryConfig {
    /// How long an undelivered message is kept; at most 30 days.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub message_ttl: Duration,
    /// How often the sweeper deletes expired messages.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub sweep_interval: Duration,
    /// Messages deleted per sweeper step.
    pub sweep_batch: usize,
}

/// Storage tuning.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where the relay keeps its state: its own data directory, or a PostgreSQL
    /// database shared by any number of relay nodes.
    pub backend: StorageBackend,
    /// Database page cache, MiB.
    pub cache_mb: u64,
    /// Where queued envelopes live.
    pub mailboxes: MailboxBackend,
    /// Mailbox log segment size, MiB.
    pub segment_mb: u64,
    /// With `durability = "fsync"` on the embedded backend: how long a flush may wait
    /// for more writers while traffic flows (sends and acks from independent
    /// connections then share one fsync); "0s" flushes at once. It delays the answers
    /// to sends and acks and the push wake-ups after them, never a delivery to a
    /// connected device.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub commit_delay: Duration,
}

/// The longest `storage.commit_delay`: past it a sender's acknowledgement waits
/// longer than a round trip to a phone, for no more sharing.
const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Where the relay keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The data directory: the mailbox log and sled (one node, nothing to set up).
    #[default]
    Embedded,
    /// A PostgreSQL database (`[postgres]`) shared by relay nodes.
    Postgres,
}

/// Where queued envelopes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MailboxBackend {
    /// An append-only log of segment files, index in memory (the default: the fast
    /// path, one write and one shared fsync per send).
    #[default]
    Log,
    /// The sled database, with everything else.
    Sled,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./tern-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            advertise_host: None,
            durability: Durability::Fsync,
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            expiry: ExpiryConfig::default(),
            storage: StorageConfig::default(),
            media: MediaConfig::default(),
            objects: ObjectsConfig::default(),
            connections: ConnectionsConfig::default(),
            budget: BudgetConfig::default(),
            discovery: DiscoveryConfig::default(),
            verification: VerificationConfig::default(),
            postgres: PostgresConfig::default(),
            admin: AdminConfig::default(),
            push: PushConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            max_envelope_bytes: l.max_envelope_bytes,
            max_batch: l.max_batch,
            max_queued_messages: l.max_queued_messages,
            max_queued_bytes: l.max_queued_bytes,
            max_frame_bytes: tern_proto::limits::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            max_requests_per_connection: 1024,
            delivery_window: 256,
            delivery_window_bytes: 4 << 20,
            registrations_per_address_per_minute: None,
        }
    }
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        ExpiryConfig {
            message_ttl: Duration::from_millis(Ttl::MAX.as_millis()),
            sweep_interval: Duration::from_secs(60),
            sweep_batch: 10_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Embedded,
            cache_mb: 256,
            mailboxes: MailboxBackend::Log,
            segment_mb: DEFAULT_SEGMENT_BYTES >> 20,
            commit_delay: Duration::from_millis(1),
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parses TOML text and checks the values.
    pub fn from_toml(text: &str) -> Result<Config> {
        let config = Self::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without checking the values against each other.
    pub(crate) fn parse(text: &str) -> Result<Config> {
        let mut config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(n) = config.limits.registrations_per_address_per_minute {
            config.rate_limits.registrations_per_prefix =
                crate::core::rate::Rate::new(n, Duration::from_secs(60)).ok_or_else(|| {
                    Error::Config("limits.registrations_per_address_per_minute is 0".into())
                })?;
        }
        Ok(config)
    }

    /// Checks the values make sense together: the first problem, if any.
    pub fn validate(&self) -> Result<()> {
        match self.problems().into_iter().next() {
            Some(m) => Err(Error::Config(m)),
            None => Ok(()),
        }
    }

    /// Every problem [`Config::validate`] finds, each named by its key (one per
    /// check: a section's own checks stop at its first).
    pub fn problems(&self) -> Vec<String> {
        let check = |ok: bool, m: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::Config(m.into()))
            }
        };
        let m = &self.media;
        let l = &self.limits;
        let checks = [
            check(
                self.message_ttl().is_some(),
                "expiry.message_ttl must be more than zero and at most 30 days",
            ),
            check(
                !m.blob_ttl.is_zero() && m.blob_ttl <= Duration::from_secs(30 * 24 * 3600),
                "media.blob_ttl must be more than zero and at most 30 days",
            ),
            check(
                m.max_blob_bytes != 0
                    && m.max_concurrent_uploads != 0
                    && m.max_upload_bytes_per_sec != 0,
                "media limits must be more than zero",
            ),
            check(
                !self.expiry.sweep_interval.is_zero() && self.expiry.sweep_batch != 0,
                "expiry.sweep_interval and expiry.sweep_batch must be more than zero",
            ),
            check(
                l.max_envelope_bytes != 0
                    && l.max_batch != 0
                    && l.delivery_window != 0
                    && l.delivery_window_bytes != 0,
                "limits must be more than zero",
            ),
            check(
                l.max_connections != 0 && l.max_requests_per_connection != 0,
                "connection limits must be more than zero",
            ),
            // A frame must hold at least one envelope of the largest size and its framing.
            check(
                l.max_frame_bytes >= l.max_envelope_bytes.saturating_add(1024),
                "limits.max_frame_bytes must exceed max_envelope_bytes by at least 1 KiB",
            ),
            self.connections.validate(l),
            // A frame's elements are counted before it decodes (the request is one).
            check(
                l.max_batch < tern_proto::shape::MAX_FRAME_ELEMENTS,
                "limits.max_batch must be less than 65536",
            ),
            check(
                (1..=1024).contains(&self.storage.segment_mb),
                "storage.segment_mb must be from 1 to 1024",
            ),
            check(
                self.storage.commit_delay <= MAX_COMMIT_DELAY,
                "storage.commit_delay must be at most 100ms",
            ),
            self.rate_limits.validate().map_err(Error::Config),
            self.budget.validate(),
            self.discovery.validate(),
            self.verification.validate(),
            self.postgres
                .validate(self.storage.backend == StorageBackend::Postgres),
            self.objects.validate(),
            self.admin.validate(),
            self.push.validate(),
            check(
                self.tls.cert.is_some() == self.tls.key.is_some(),
                "tls.cert and tls.key go together",
            ),
        ];
        checks
            .into_iter()
            .filter_map(|c| match c {
                Err(Error::Config(m)) => Some(m),
                Err(e) => Some(e.to_string()),
                Ok(()) => None,
            })
            .collect()
    }

    /// The message TTL, if valid (more than zero, at most 30 days).
    pub fn message_ttl(&self) -> Option<Ttl> {
        let ttl = Ttl::new(self.expiry.message_ttl)?;
        (u128::from(ttl.as_millis()) == self.expiry.message_ttl.as_millis()).then_some(ttl)
    }

    /// The mailbox limits.
    pub fn mailbox_limits(&self) -> Limits {
        Limits {
            max_envelope_bytes: self.limits.max_envelope_bytes,
            max_batch: self.limits.max_batch,
            max_queued_messages: self.limits.max_queued_messages,
            max_queued_bytes: self.limits.max_queued_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").expect("parses"), Config::default());
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn parses_every_section() {
        let c = Config::from_toml(
            r#"
            data_dir = "/var/lib/tern"
            listen = "[::1]:0"
            durability = "os"
            [limits]
            max_envelope_bytes = 1000
            max_queued_messages = 5
            [expiry]
            message_ttl = "7days"
            sweep_interval = "10s"
            [storage]
            cache_mb = 64
            "#,
        )
        .expect("parses");
        assert_eq!(c.durability, Durability::Os);
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.limits.max_envelope_bytes, 1000);
        assert_eq!(c.limits.delivery_window, 256, "unset keys keep defaults");
        assert_eq!(c.message_ttl().map(Ttl::as_millis), Some(7 * 86_400_000));
        assert_eq!(c.storage.cache_mb, 64);
    }

    #[test]
    fn an_earlier_relays_registration_limit_still_reads() {
        let c = Config::from_toml("[limits]\nregistrations_per_address_per_minute = 12\n")
            .expect("parses");
        let r = c.rate_limits.registrations_per_prefix;
        assert_eq!((r.burst.get(), r.period), (12, Duration::from_secs(60)));
        assert!(Config::from_toml("[limits]\nregistrations_per_address_per_minute = 0\n").is_err());
    }

    #[test]
    fn parses_rate_limits_and_refuses_bad_ones() {
        let c = Config::from_toml(
            "[rate_limits]\nsends_per_account = \"50/10s\"\nmax_devices_per_account = 4\nover_prekey_limit = \"refuse\"\n",
        )
        .expect("parses");
        let r = &c.rate_limits;
        assert_eq!(r.sends_per_account.burst.get(), 50);
        assert_eq!(r.sends_per_account.period, Duration::from_secs(10));
        assert_eq!(r.max_devices_per_account, 4);
        assert_eq!(r.over_prekey_limit, PrekeyLimit::Refuse);
        assert_eq!(r.intake_above_queued, 1000, "unset keys keep defaults");
        for bad in [
            "sends_per_account = \"0/1m\"",
            "sends_per_account = \"10\"",
            "sends_per_account = \"10/never\"",
            "max_devices_per_account = 0",
            "max_keys = 0",
            "over_prekey_limit = \"ignore\"",
            "sends_per_second = 5",
        ] {
            let text = format!("[rate_limits]\n{bad}\n");
            assert!(Config::from_toml(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn postgres_needs_a_url_and_sane_values() {
        let text = "[storage]\nbackend = \"postgres\"\n";
        assert!(
            matches!(Config::from_toml(text), Err(Error::Config(m)) if m.contains("postgres.url"))
        );
        let c = Config::from_toml(&format!(
            "{text}[postgres]\nurl = \"host=/tmp dbname=tern\"\nstatement_timeout = \"500ms\"\n"
        ))
        .expect("parses");
        assert_eq!(c.storage.backend, StorageBackend::Postgres);
        assert_eq!(c.postgres.statement_timeout, Duration::from_millis(500));
        assert_eq!(c.postgres.pool_size, 16, "unset keys keep defaults");
        assert!(
            !format!("{c:?}").contains("/tmp"),
            "the url stays out of Debug"
        );
        for bad in [
            "pool_size = 1",
            "connect_timeout = \"1ms\"",
            "node_id = \"a b\"",
            "recheck_interval = \"2m\"",
        ] {
            assert!(
                Config::from_toml(&format!("[postgres]\n{bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn refuses_more_than_thirty_days_and_unknown_keys() {
        let long = Config::from_toml("[expiry]\nmessage_ttl = \"31days\"");
        assert!(matches!(long, Err(Error::Config(m)) if m.contains("30 days")));
        assert!(Config::from_toml("[expiry]\nmessage_ttl = \"0s\"").is_err());
        assert!(Config::from_toml("listne = \"127.0.0.1:1\"").is_err());
        assert!(Config::from_toml("[tls]\ncert = \"a.pem\"").is_err());
        assert!(Config::from_toml("[limits]\nmax_frame_bytes = 10").is_err());
        assert!(Config::from_toml("[storage]\ncommit_delay = \"101ms\"").is_err());
        let c = Config::from_toml("[storage]\ncommit_delay = \"100ms\"").expect("the longest");
        assert_eq!(c.storage.commit_delay, Duration::from_millis(100));
    }

    /// A batch must fit the elements a frame may hold (counted before it decodes).
    #[test]
    fn a_batch_fits_a_frames_elements() {
        let most = Config::from_toml("[limits]\nmax_batch = 65535").expect("the largest");
        assert_eq!(most.limits.max_batch, 65_535);
        let over = Config::from_toml("[limits]\nmax_batch = 65536");
        assert!(matches!(over, Err(Error::Config(m)) if m.contains("max_batch")));
    }
}
