//! Assembles a running relay: stores, services, QUIC endpoint, sweeper, and an
//! orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::RelayAddress;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use tern_platform::clock::Clock;

use crate::accounts::Accounts;
use crate::admin::lock::DirLock;
use crate::certificates::CertificateIssuer;
use crate::config::{Config, MailboxBackend, MediaConfig, RateLimitsConfig, StorageBackend};
use crate::core::budget::Budget;
use crate::core::expiry::Ttl;
use crate::core::limits::Limits;
use crate::core::rate::RateLimits;
use crate::deletion::{AccountDeletion, DeviceRemoval};
use crate::discovery::{self, Discovery, Oprf};
use crate::error::{Error, Result};
use crate::keys::KeyDirectory;
use crate::mailboxes::Mailboxes;
use crate::media::{BlobLimits, BlobStore, S3Bytes};
use crate::net::{self, tls, Admission, ConnSettings};
use crate::provisioning::Provisioning;
use crate::store::backup::Embedded;
use crate::store::pg::{PgBackend, PgOptions};
use crate::store::{Durability, GroupCommit, LogOptions, LogStore, SledStore, Stores};
use crate::verification::Verification;

/// The relay's services over one set of stores, sharing one group commit.
pub struct Services {
    accounts: Accounts,
    keys: KeyDirectory,
    groups: crate::groups::Groups,
    certificates: CertificateIssuer,
    mailboxes: Mailboxes,
    provisioning: Provisioning,
    rates: Arc<RateLimits>,
    budget: Arc<Budget>,
    /// The stores without the tombstone filter, for deletion and export.
    stores: Stores,
    tombstones: Arc<crate::deletion::Tombstones>,
    commit: Arc<GroupCommit>,
    clock: Arc<dyn Clock>,
    exports: crate::export::ExportGate,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("mailboxes", &self.mailboxes)
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl Services {
    /// Services over `stores`, durable as `durability` says (this starts the group
    /// commit's flusher thread); `signer` signs sender certificates. The rate limits
    /// are the defaults of `[rate_limits]`.
    pub fn new(
        stores: Stores,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        durability: Durability,
        signer: ed25519_dalek::SigningKey,
    ) -> std::io::Result<Self> {
        let rates = RateLimitsConfig::default();
        Self::with_rate_limits(stores, clock, limits, ttl, durability, signer, &rates)
    }

    /// [`Services::new`] under the given rate limits (and the default budgets).
    pub fn with_rate_limits(
        stores: Stores,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        durability: Durability,
        signer: ed25519_dalek::SigningKey,
        rates: &RateLimitsConfig,
    ) -> std::io::Result<Self> {
        let budget = Arc::new(Budget::default());
        Self::with_budget(
            stores, clock, limits, ttl, durability, signer, rates, budget,
        )
    }

    /// [`Services::with_rate_limits`] under the given relay-wide budgets.
    #[allow(clippy::too_many_arguments)]
    pub fn with_budget(
        stores: Stores,
        clock: Arc<dyn Clock>,
        limits: Limits,
        ttl: Ttl,
        durability: Durability,
        signer: ed25519_dalek::SigningKey,
        rates: &RateLimitsConfig,
        budget: Arc<Budget>,
    ) -> std::io::Result<Self> {
        let commit = Arc::new(GroupCommit::start(stores.flush.clone(), durability)?);
        let rate_config = rates;
        let rates = Arc::new(RateLimits::new(rates, clock.clone()));
        let tombstones = Arc::new(crate::deletion::Tombstones::default());
        // Every service sees a deleted account as absent (`deletion::Hidden`).
        let accounts: Arc<dyn crate::store::AccountStore> = Arc::new(crate::deletion::Hidden::new(
            stores.accounts.clone(),
            tombstones.clone(),
        ));
        let keys: Arc<dyn crate::store::KeyStore> = Arc::new(crate::deletion::HiddenKeys::new(
            stores.keys.clone(),
            tombstones.clone(),
        ));
        let (c, r, b) = (&commit, &rates, &budget);
        let groups = crate::groups::Groups::new(crate::groups::GroupsParts {
            accounts: accounts.clone(),
            packages: stores.key_packages.clone(),
            groups: stores.groups.clone(),
            commit: c.clone(),
            rates: r.clone(),
            budget: b.clone(),
            tombstones: tombstones.clone(),
            clock: clock.clone(),
            idle_days: rate_config.group_idle_days,
            max_groups: rate_config.max_groups,
            recount: stores.shared.is_some(),
        });
        Ok(Services {
            groups,
            accounts: Accounts::new(
                accounts.clone(),
                c.clone(),
                r.clone(),
                b.clone(),
                clock.clone(),
            ),
            keys: KeyDirectory::new(accounts.clone(), keys, c.clone(), r.clone(), b.clone()),
            provisioning: Provisioning::new(
                stores.provisioning.clone(),
                accounts.clone(),
                rate_config,
                clock.clone(),
            ),
            certificates: CertificateIssuer::new(accounts, signer, clock.clone()),
            mailboxes: Mailboxes::new(
                stores.mailboxes.clone(),
                clock.clone(),
                limits,
                ttl,
                commit.clone(),
                rates.clone(),
                budget.clone(),
            )
            .with_tombstones(tombstones.clone()),
            rates,
            budget,
            stores,
            tombstones,
            commit,
            clock,
            exports: crate::export::ExportGate::default(),
        })
    }

    /// The services' clock.
    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The stores, unfiltered (a deleted account's remains are visible here).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Accounts deleted (or being deleted) since start.
    pub fn tombstones(&self) -> &Arc<crate::deletion::Tombstones> {
        &self.tombstones
    }

    /// The places among the exports written at once.
    pub(crate) fn exports(&self) -> &crate::export::ExportGate {
        &self.exports
    }

    /// The group commit every service shares.
    pub(crate) fn commit(&self) -> &Arc<GroupCommit> {
        &self.commit
    }

    /// Accounts, devices and delivery tokens.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// Queued messages.
    pub fn mailboxes(&self) -> &Mailboxes {
        &self.mailboxes
    }

    /// Provisioning slots (linking a new device).
    pub fn provisioning(&self) -> &Provisioning {
        &self.provisioning
    }

    /// The key directory.
    pub(crate) fn keys(&self) -> &KeyDirectory {
        &self.keys
    }

    /// The MLS delivery service: key packages and group epochs.
    pub(crate) fn groups(&self) -> &crate::groups::Groups {
        &self.groups
    }

    /// Sender certificates.
    pub(crate) fn certificates(&self) -> &CertificateIssuer {
        &self.certificates
    }

    /// The per-account and per-sender limits.
    pub fn rate_limits(&self) -> &RateLimits {
        &self.rates
    }

    /// The relay-wide budgets and the disk reserve.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

/// The media limits a configuration sets.
pub(crate) fn blob_limits(m: &MediaConfig) -> BlobLimits {
    BlobLimits {
        max_blob_bytes: m.max_blob_bytes,
        max_concurrent_uploads: m.max_concurrent_uploads,
        max_unfinished_uploads: m.max_unfinished_uploads,
        max_account_bytes: m.max_account_bytes,
        max_upload_bytes_per_sec: m.max_upload_bytes_per_sec,
        ttl: m.blob_ttl,
        abandon_after: m.abandon_after,
    }
}

/// Opens the stores in `config.data_dir` under the directory's lock (taken first,
/// whatever the backend: it keeps a second process, a relay or an admin command, out
/// of the whole data directory): the sled database in `db/` and, by default, the
/// mailbox log in `mailboxes/`. The lock is the caller's to hold.
pub(crate) fn open_stores(config: &Config, clock: &dyn Clock) -> Result<(DirLock, Stores)> {
    config.validate()?;
    let lock = DirLock::take(&config.data_dir)?;
    // Before anything opens (or creates) a file in it.
    crate::store::version::open(&config.data_dir)?;
    Ok((lock, open_stores_locked(config, clock)?))
}

/// [`open_stores`] for a caller that holds the lock and has checked the format.
pub(crate) fn open_stores_locked(config: &Config, clock: &dyn Clock) -> Result<Stores> {
    if config.storage.backend == StorageBackend::Postgres {
        return open_postgres(config);
    }
    let sled = Arc::new(SledStore::open(
        &config.data_dir.join("db"),
        config.storage.cache_mb << 20,
    )?);
    let stores = match config.storage.mailboxes {
        MailboxBackend::Log => {
            let options = LogOptions {
                segment_bytes: config.storage.segment_mb << 20,
                now: clock.now(),
                // Every send waits for a flush, which writes the appends with it.
                write_behind: config.durability == crate::store::Durability::Fsync,
                ..LogOptions::default()
            };
            let opening = std::time::Instant::now();
            let log = LogStore::open(&config.data_dir.join("mailboxes"), options)?;
            // A start's index rebuild is its longest step (benches/README.md).
            info!(
                messages = log.count_messages(),
                segments = log.segments(),
                ms = u64::try_from(opening.elapsed().as_millis()).unwrap_or(u64::MAX),
                "mailbox log opened"
            );
            let log = Arc::new(log);
            let mut stores = Stores::split(log.clone(), sled.clone());
            stores.embedded = Some(Arc::new(Embedded::new(&config.data_dir, sled, Some(log))));
            stores
        }
        MailboxBackend::Sled => {
            let mut stores = Stores::all(sled.clone());
            stores.embedded = Some(Arc::new(Embedded::new(&config.data_dir, sled, None)));
            stores
        }
    };
    Ok(stores)
}
/// Connects to the shared database of `[postgres]` (migrating it if this binary is
/// newer). A database that cannot be reached stops the start with its hosts named.
fn open_postgres(config: &Config) -> Result<Stores> {
    let url =
        config.postgres.url.clone().ok_or_else(|| {
            Error::Config("storage.backend = \"postgres\" needs postgres.url".into())
        })?;
    // The relay's runtime runs the connections too (13-20 % less relay CPU per
    // message than a runtime apart, benches/README "One runtime"). So nothing may
    // wait on a worker for what is held across a database call: such locks wait off
    // the worker (`crate::locks`), blocking calls and exports are bounded
    // (`BLOCKED_MAX`, `EXPORTS_AT_ONCE`).
    let mut opts = pg_options(config, url)?;
    opts.runtime = tokio::runtime::Handle::try_current().ok();
    let pg = open_pg(&opts)?;
    if config.objects.url.is_none() {
        warn!("[objects] is not set: blob bytes stay in this node's data directory, where other nodes cannot serve them");
    }
    Ok(Stores::postgres(Arc::new(pg)))
}

/// The options `[postgres]` gives for the database at `url` (the password read from
/// its file), durable as the relay is.
pub(crate) fn pg_options(config: &Config, url: String) -> Result<PgOptions> {
    let c = &config.postgres;
    let mut opts = PgOptions::new(url);
    if let Some(path) = &c.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("postgres.password_file {}: {e}", path.display()))
        })?;
        opts.password = Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec());
    }
    opts.pool_size = c.pool_size;
    opts.connect_timeout = c.connect_timeout;
    opts.statement_timeout = c.statement_timeout;
    opts.ca_file = c.ca_file.clone();
    if let Some(id) = &c.node_id {
        opts.node_id = id.clone();
    }
    opts.durability = config.durability;
    Ok(opts)
}

/// Connects (and migrates); a database that cannot be reached is a configuration
/// error naming its hosts, so the start stops with it.
pub(crate) fn open_pg(opts: &PgOptions) -> Result<PgBackend> {
    PgBackend::open(opts).map_err(|e| match e {
        crate::store::StoreError::Unavailable(m) => {
            Error::Config(format!("cannot reach the database: {m}"))
        }
        e => Error::Store(e),
    })
}

mod housekeeping;

use self::housekeeping::{disk_loop, record_disk, sweep_loop};

/// Failed account deletions the sweeper retries per pass.
const RETRIES_PER_SWEEP: usize = 16;
/// How often the publisher checks whether the UTC day changed.
const PUBLISH_CHECK: Duration = Duration::from_secs(60);

/// A running relay. Dropping it without [`Relay::shutdown`] stops it abruptly.
#[derive(Debug)]
pub struct Relay {
    address: RelayAddress,
    local_addr: SocketAddr,
    services: Arc<Services>,
    blobs: Arc<BlobStore>,
    deletion: Arc<AccountDeletion>,
    removal: Arc<DeviceRemoval>,
    discovery: Arc<Discovery>,
    verification: Arc<Verification>,
    push: Arc<crate::push::Push>,
    endpoint: quinn::Endpoint,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The admin listener's bound address and state, unless `[admin] listen = "off"`.
    admin: Option<(SocketAddr, Arc<crate::admin::server::Admin>)>,
    /// This node's part among nodes sharing a database, if it is one.
    cluster: Option<(
        Arc<crate::cluster::Cluster>,
        Option<Arc<crate::cluster::notify::PgNotifier>>,
    )>,
    /// The data directory's lock, held while the relay runs (dropped last).
    _lock: DirLock,
}

/// How long a stop waits for the cluster tasks and the withdrawal of this node's
/// claims and leases.
const LEAVE_WITHIN: Duration = Duration::from_secs(2);

impl Relay {
    /// Starts a relay on its stores in `config.data_dir`: the sled database in `db/`
    /// and, by default, the mailbox log in `mailboxes/`.
    pub async fn start(config: &Config, clock: Arc<dyn Clock>) -> Result<Relay> {
        let (lock, stores) = open_stores(config, clock.as_ref())?;
        Self::start_locked(config, stores, clock, lock).await
    }

    /// Starts a relay on the given stores (the certificate still lives in
    /// `config.data_dir`, whose lock it takes and holds).
    pub async fn start_with(
        config: &Config,
        stores: Stores,
        clock: Arc<dyn Clock>,
    ) -> Result<Relay> {
        let lock = DirLock::take(&config.data_dir)?;
        Self::start_locked(config, stores, clock, lock).await
    }

    async fn start_locked(
        config: &Config,
        stores: Stores,
        clock: Arc<dyn Clock>,
        lock: DirLock,
    ) -> Result<Relay> {
        config.validate()?;
        let ttl = config
            .message_ttl()
            .ok_or_else(|| Error::Config("invalid message_ttl".into()))?;
        std::fs::create_dir_all(&config.data_dir)?;
        // A crashed relay's: `tern-relay admin` must not take it for this one's (it
        // would send the token there). Written again once this one listens.
        remove_stale_addr(&config.data_dir)?;
        // Before any traffic, so the counters count from the start.
        let metrics = match config.admin.listen {
            crate::config::AdminListen::Off => None,
            _ => crate::metrics::install(),
        };
        let certificates = Arc::new(crate::net::rotation::Certificates::open(
            &config.tls,
            &config.data_dir,
            clock.clone(),
        )?);
        let fingerprint = certificates.current();
        let mut server_config = tls::server_config(certificates.clone())?;
        let c = &config.connections;
        server_config.transport_config(Arc::new(net::transport_config(
            c.unauthenticated_receive_window,
        )));
        let signer = tls::load_or_create_signing_key(&config.data_dir)?;
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&signer),
            Some(server_config),
            std::net::UdpSocket::bind(config.listen)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        // Bound before anything is spawned: an address that cannot be bound stops the
        // start with nothing running.
        let admin_listener = match config.admin.listen.resolve(local_addr) {
            None => None,
            Some(at) => {
                let auto = matches!(config.admin.listen, crate::config::AdminListen::Auto);
                let listener = bind_admin(at, auto, config.admin.allow_remote_admin).await?;
                let local = bind_local_twin(&listener).await?;
                Some((listener, local))
            }
        };

        let budget = Arc::new(Budget::new(config.budget.limits()));
        // Sampled once before serving, so a relay started on a full disk refuses
        // from its first request.
        let data_dirs = ["db", "mailboxes", "blobs"].map(|d| config.data_dir.join(d));
        record_disk(&budget, &data_dirs);
        let limits = blob_limits(&config.media);
        let blobs = Arc::new(match config.objects.settings()? {
            None => BlobStore::open(
                &config.data_dir,
                stores.blobs.clone(),
                clock.clone(),
                limits,
                budget.clone(),
            )?,
            Some(s3) => BlobStore::with_bytes(
                Arc::new(S3Bytes::open(&s3)?),
                stores.blobs.clone(),
                clock.clone(),
                limits,
                budget.clone(),
            )?,
        });
        let discovery = Discovery::new(
            Oprf::open(
                &config.data_dir,
                stores.discovery.holds_tags()?,
                &mut rand::rngs::OsRng,
            )?,
            stores.discovery.clone(),
            stores.accounts.clone(),
            clock.clone(),
            &config.discovery,
            config.data_dir.join("discovery"),
        )?;
        let shared = stores.shared.clone();
        // Several nodes serve one publication, stored in the database.
        let discovery = match &shared {
            Some(pg) => discovery.with_shared(pg.clone()),
            None => discovery,
        };
        if let Some(pg) = &shared {
            if certificates.switched_at_open() {
                pg.set_cluster_fact(TLS_FACT, &fingerprint.0)?;
            }
            check_cluster(
                pg,
                &fingerprint,
                &signer,
                discovery.oprf(),
                &config.data_dir,
            )?;
        }
        let services = Arc::new(Services::with_budget(
            stores,
            clock.clone(),
            config.mailbox_limits(),
            ttl,
            config.durability,
            signer,
            &config.rate_limits,
            budget,
        )?);
        // The embedded stores' flush (on PostgreSQL the writer batches its own).
        if shared.is_none() {
            services.commit().set_delay(config.storage.commit_delay);
        }
        let discovery = Arc::new(discovery.with_commit(services.commit().clone()));
        let mut verification = Verification::new(
            &config.verification,
            crate::verification::verifier_from_config(&config.verification, &config.data_dir)?,
            discovery.clone(),
            clock.clone(),
        )
        .with_tombstones(services.tombstones().clone());
        // Several nodes: a session started on one is checked on any, and the start
        // limits count across nodes.
        if let Some(pg) = &shared {
            verification = verification
                .with_sessions(pg.clone())
                .with_start_limiter(Arc::new(crate::store::pg::PgStartLimits::new(
                    pg.clone(),
                    &config.verification,
                )));
        }
        let verification = Arc::new(verification);
        // Deletions a crash interrupted are finished before anything is served.
        let deletion = Arc::new(
            AccountDeletion::new(services.clone(), blobs.clone())
                .with_verification(verification.clone()),
        );
        let resumed = deletion.resume().await?;
        if resumed > 0 {
            info!(resumed, "interrupted account deletions finished");
        }
        let removal = Arc::new(DeviceRemoval::new(
            services.clone(),
            config.rate_limits.linked_device_idle_days,
        ));
        let resumed = removal.resume().await?;
        if resumed > 0 {
            info!(resumed, "interrupted device removals finished");
        }
        let push = Arc::new(crate::push::Push::new(
            services.stores().push.clone(),
            services.commit().clone(),
            services.tombstones().clone(),
            &config.push,
        )?);
        if config.push.enabled {
            services.mailboxes.set_push(push.waker());
        }
        let settings = Arc::new(ConnSettings {
            max_frame: config.limits.max_frame_bytes,
            max_requests: config.limits.max_requests_per_connection,
            delivery_window: config.limits.delivery_window,
            delivery_window_bytes: config.limits.delivery_window_bytes,
            unauthenticated_frame: c
                .unauthenticated_frame_bytes
                .min(config.limits.max_frame_bytes),
            authenticated_receive_window: c.authenticated_receive_window,
            auth_deadline: c.auth_deadline,
            anonymous_idle: c.anonymous_idle,
            blobs: blobs.clone(),
            deletion: deletion.clone(),
            removal: removal.clone(),
            discovery: discovery.clone(),
            verification: verification.clone(),
            next_certificate: certificates.announced(),
            push: push.clone(),
        });
        // The last step that can fail: the token and address are written before any
        // task is spawned, so a failed start leaves nothing running.
        let admin = match admin_listener {
            None => None,
            Some((listener, local)) => {
                let state = Arc::new(crate::admin::server::Admin::new(
                    services.clone(),
                    deletion.clone(),
                    verification.clone(),
                    config,
                    metrics,
                    certificates.clone(),
                ));
                let bound = listener.local_addr()?;
                write_admin_files(local.as_ref().unwrap_or(&listener), &state)?;
                Some(((listener, local), bound, state))
            }
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut cluster = None;
        if let Some(pg) = &shared {
            // `[postgres] notify = false`: no LISTEN/NOTIFY (an engine without them);
            // the re-check finds every change.
            let notifier = config.postgres.notify.then(|| {
                crate::cluster::notify::PgNotifier::start(pg.clone(), shutdown.subscribe())
            });
            let hints: Arc<dyn crate::cluster::notify::Notifier> = match &notifier {
                Some(n) => n.clone(),
                None => Arc::new(crate::cluster::notify::NoHints),
            };
            let joined = crate::cluster::Cluster::start(
                pg.clone(),
                services.mailboxes.active(),
                hints,
                config.postgres.recheck_interval,
                shutdown.subscribe(),
            );
            if let Some(n) = &notifier {
                joined.notify_after_commits(n);
            }
            services.mailboxes.join_cluster(joined.clone());
            cluster = Some((joined, notifier));
            info!(
                node = pg.node_id(),
                "joined the relay's other nodes on PostgreSQL"
            );
        }
        let accept = tokio::spawn(net::accept_loop(
            endpoint.clone(),
            services.clone(),
            settings,
            Admission::new(c, config.limits.max_connections),
            shutdown_rx.clone(),
        ));
        let sweeper = tokio::spawn(sweep_loop(
            services.clone(),
            blobs.clone(),
            deletion.clone(),
            removal.clone(),
            config.expiry.sweep_interval,
            config.expiry.sweep_batch,
            shutdown_rx,
        ));
        let disk = tokio::spawn(disk_loop(
            services.budget.clone(),
            data_dirs,
            config.budget.disk_check_interval,
            shutdown.subscribe(),
        ));
        // Shared: checked more often, so a node serves a new publication soon.
        let publish_check = match &shared {
            Some(_) => {
                (config.postgres.recheck_interval * 10).clamp(Duration::from_secs(1), PUBLISH_CHECK)
            }
            None => PUBLISH_CHECK,
        };
        let publisher = tokio::spawn(discovery::publish_loop(
            discovery.clone(),
            publish_check,
            shutdown.subscribe(),
        ));
        let verifications = tokio::spawn(crate::verification::sweep_loop(
            verification.clone(),
            config.verification.sweep_interval,
            shutdown.subscribe(),
        ));
        // Several nodes switch at one time: each records the new certificate's
        // fingerprint, so a node restarted after the switch is checked against it.
        let on_switch = shared.clone().map(|pg| {
            Box::new(
                move |old: tern_proto::Fingerprint, new: tern_proto::Fingerprint| match pg
                    .replace_cluster_fact(TLS_FACT, &old.0, &new.0)
                {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Error::Config(
                        "the shared database records another certificate than the one \
                             this node served before its switch: the nodes staged different \
                             certificates (stage one with --cert/--key on every node)"
                            .into(),
                    )),
                    Err(e) => Err(Error::Store(e)),
                },
            ) as crate::net::rotation::OnSwitch
        });
        let switcher = tokio::spawn(crate::net::rotation::switch_loop(
            certificates.clone(),
            on_switch,
            shutdown.subscribe(),
        ));
        let mut tasks = vec![accept, sweeper, disk, publisher, verifications, switcher];
        if config.push.enabled {
            tasks.extend(push.start(services.mailboxes.active(), shutdown.subscribe()));
        }
        let admin = admin.map(|(listeners, bound, state)| {
            tasks.push(tokio::spawn(crate::admin::server::serve(
                listeners,
                state.clone(),
                shutdown.subscribe(),
            )));
            (bound, state)
        });
        let host = config
            .advertise_host
            .clone()
            .unwrap_or_else(|| local_addr.ip().to_string());
        Ok(Relay {
            address: RelayAddress::new(fingerprint, host, local_addr.port()),
            local_addr,
            services,
            blobs,
            deletion,
            removal,
            discovery,
            verification,
            push,
            endpoint,
            shutdown,
            tasks,
            admin,
            cluster,
            _lock: lock,
        })
    }

    /// The admin listener's state (tests of what a stop does to it).
    #[cfg(test)]
    pub(crate) fn admin_state(&self) -> Option<Arc<crate::admin::server::Admin>> {
        self.admin.as_ref().map(|(_, a)| a.clone())
    }

    /// The admin listener's bound address (metrics, health, admin commands), unless
    /// `[admin] listen = "off"`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// Where `tern-relay admin reload` reads the configuration again (the file,
    /// with the command line's flags applied again). Without one, a reload is
    /// refused.
    pub fn set_config_source(&self, source: crate::admin::ConfigSource) {
        if let Some((_, admin)) = &self.admin {
            *admin.source.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
        }
    }

    /// The address clients use, with the certificate fingerprint they pin.
    pub fn address(&self) -> &RelayAddress {
        &self.address
    }

    /// The bound UDP address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The services, for operators' tools and tests.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Device removal, for tests.
    pub fn device_removal(&self) -> &Arc<DeviceRemoval> {
        &self.removal
    }

    /// Account deletion, for operators' tools and tests.
    pub fn deletion(&self) -> &Arc<AccountDeletion> {
        &self.deletion
    }

    /// Contact discovery: phone verification attaches tags through it.
    pub fn discovery(&self) -> &Arc<Discovery> {
        &self.discovery
    }

    /// Phone verification, for tests and operators' tools.
    pub fn verification(&self) -> &Arc<Verification> {
        &self.verification
    }

    /// Push registration and wake-ups, for tests (their counts by outcome).
    pub fn push(&self) -> &Arc<crate::push::Push> {
        &self.push
    }

    /// The media store, for operators' tools and tests (its received-bytes counter).
    pub fn blobs(&self) -> &Arc<BlobStore> {
        &self.blobs
    }

    /// Stops accepting, lets open connections finish the requests they are handling,
    /// scrubs acknowledged messages from disk, flushes the stores and closes the endpoint.
    /// A node sharing a database then awaits its cluster tasks and gives up its
    /// claims, heartbeat and leases (within 2 s).
    pub async fn shutdown(self) -> Result<()> {
        if let Some((_, admin)) = &self.admin {
            admin.stop().await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint
            .close(tern_proto::close::SHUTTING_DOWN.into(), b"shutting down");
        let flushed = self.services.mailboxes.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        // Their connections are closed: running exports fail their next write.
        if !self.services.exports().close(Duration::from_secs(2)).await {
            debug!("exports still running at shutdown");
        }
        if let Some((cluster, notifier)) = self.cluster {
            if let Some(notifier) = notifier {
                notifier.stopped(LEAVE_WITHIN).await;
            }
            cluster.leave(LEAVE_WITHIN).await;
        }
        flushed
    }
}

/// Removes `admin.addr` a relay that did not stop cleanly left in `data_dir`.
fn remove_stale_addr(data_dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(data_dir.join(crate::admin::token::ADDR_FILE)) {
        Ok(()) => {
            info!("removed the admin.addr an earlier relay left");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Binds the admin listener at `at`. An address the operator named that cannot be
/// bound stops the start; for `"auto"` (the next port, which something else may
/// hold) an ephemeral port is taken instead, and admin.addr says which.
async fn bind_admin(
    at: SocketAddr,
    auto: bool,
    allow_remote: bool,
) -> Result<tokio::net::TcpListener> {
    let listener = match tokio::net::TcpListener::bind(at).await {
        Ok(l) => l,
        Err(e) if auto => {
            warn!(error = %e, "admin.listen \"auto\": the next port is taken; using an ephemeral port (see admin.addr)");
            let any = SocketAddr::new(at.ip(), 0);
            tokio::net::TcpListener::bind(any)
                .await
                .map_err(|e| Error::Config(format!("admin.listen {any}: {e}")))?
        }
        Err(e) => return Err(Error::Config(format!("admin.listen {at}: {e}"))),
    };
    if !listener.local_addr()?.ip().is_loopback() {
        if allow_remote {
            warn!("the admin listener is not on a loopback address and admin.allow_remote_admin is on: the admin token crosses the network in clear text");
        } else {
            info!("the admin listener is not on a loopback address: its admin commands answer only loopback peers (metrics and health answer all); tern-relay admin uses a second listener on loopback, named in admin.addr");
        }
    }
    Ok(listener)
}

/// For an admin listener off loopback, a second one on loopback (port 0) serving
/// the same requests: the one `admin.addr` names, since `/admin/` answers only
/// loopback peers and the local `tern-relay admin` must reach it (ARCHITECTURE.md
/// §12a). The configured address's family first, the other if that fails (a
/// host without IPv6).
async fn bind_local_twin(
    listener: &tokio::net::TcpListener,
) -> Result<Option<tokio::net::TcpListener>> {
    let Some(first) = crate::admin::server::local_twin(listener.local_addr()?) else {
        return Ok(None);
    };
    let other = match first.ip() {
        std::net::IpAddr::V4(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let second = SocketAddr::new(other, 0);
    match tokio::net::TcpListener::bind(first).await {
        Ok(l) => Ok(Some(l)),
        Err(_) => match tokio::net::TcpListener::bind(second).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => Err(Error::Config(format!(
                "the admin listener's loopback twin ({first} or {second}): {e}"
            ))),
        },
    }
}

/// Writes the token, then the address of `listener` (both 0600), to the data
/// directory: `tern-relay admin` finds the address only once the listener listens
/// and its token is in place.
fn write_admin_files(
    listener: &tokio::net::TcpListener,
    admin: &crate::admin::server::Admin,
) -> Result<()> {
    use crate::admin::token::{write_private, ADDR_FILE};
    let bound = listener.local_addr()?;
    admin.token.write(&admin.data_dir)?;
    write_private(
        &admin.data_dir.join(ADDR_FILE),
        bound.to_string().as_bytes(),
    )?;
    Ok(())
}

/// The shared database's name for the TLS certificate's fingerprint.
const TLS_FACT: &str = "tls-certificate-sha256";

/// Records this node's certificate, sender-certificate key and OPRF key in the shared
/// database on the first start, and refuses to start a node whose files differ from
/// its peers' (ARCHITECTURE.md "Beyond one machine"). Only fingerprints go in: the
/// certificate's SHA-256, the signing key's public half, and the OPRF of a fixed
/// string (the key itself would, with the tags, let a reader test phone numbers).
fn check_cluster(
    pg: &PgBackend,
    fingerprint: &tern_proto::Fingerprint,
    signer: &ed25519_dalek::SigningKey,
    oprf: &crate::discovery::Oprf,
    data_dir: &std::path::Path,
) -> Result<()> {
    use crate::store::pg::cluster::Fact;
    let (check, _) = oprf.tag_of(b"tern cluster check v1")?;
    let file = |name: &str| data_dir.join(name).display().to_string();
    let facts = [
        Fact {
            name: TLS_FACT,
            value: fingerprint.0.to_vec(),
            file: format!(
                "the TLS certificate ({}, or [tls] cert)",
                file(crate::net::tls::CERT_FILE)
            ),
        },
        Fact {
            name: "sender-certificate-public-key",
            value: signer.verifying_key().to_bytes().to_vec(),
            file: file(crate::net::tls::SIGNING_KEY_FILE),
        },
        Fact {
            name: "discovery-oprf-check",
            value: check.0.to_vec(),
            file: file(crate::discovery::oprf::KEY_FILE),
        },
    ];
    pg.check_cluster(&facts).map_err(|e| match e {
        crate::store::StoreError::Backend(m) => Error::Config(m),
        e => Error::Store(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_media_config_is_the_default_blob_limits() {
        assert_eq!(blob_limits(&MediaConfig::default()), BlobLimits::default());
    }
}
