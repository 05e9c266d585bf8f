//! Tern benchmarks. `cargo bench -p tern-benches` runs the criterion benches in
//! `benches/`; this library holds what they share.

pub mod load;

/// This thread's CPU time so far (user + system). Benches print it beside
/// criterion's wall-clock figures: on a shared machine wall time counts other
/// processes' turns too.
pub fn thread_cpu_time() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The mean CPU time of `routine` over `rounds` runs on this thread, each on a
/// fresh input from `setup` (whose cost is not counted).
pub fn cpu_per_call<I, O>(
    rounds: u32,
    mut setup: impl FnMut() -> I,
    mut routine: impl FnMut(I) -> O,
) -> std::time::Duration {
    let mut total = std::time::Duration::ZERO;
    for _ in 0..rounds {
        let input = setup();
        let before = thread_cpu_time();
        std::hint::black_box(routine(input));
        total += thread_cpu_time().saturating_sub(before);
    }
    total / rounds.max(1)
}

use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use tern_platform::clock::SystemClock;
use tern_proto::DeviceAddress;
use tern_relay::config::RateLimitsConfig;
use tern_relay::core::auth::{self, AuthenticatedDevice};
use tern_relay::core::expiry::Ttl;
use tern_relay::core::limits::Limits;
use tern_relay::server::Services;
use tern_relay::store::{
    Durability, Envelope, LogOptions, LogStore, MailboxStore, SledStore, Stores,
};

/// Where a [`BenchRelay`] keeps mailboxes, as `storage.mailboxes` chooses in the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The mailbox log (the default).
    Log,
    /// sled.
    Sled,
}

impl Backend {
    /// Both, default first.
    pub const ALL: [Backend; 2] = [Backend::Log, Backend::Sled];

    /// Its name in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Log => "log",
            Backend::Sled => "sled",
        }
    }
}

/// The relay's services over on-disk stores in a temporary directory, as the relay
/// runs them.
pub struct BenchRelay {
    /// The services.
    pub services: Arc<Services>,
    /// The mailbox store under it, for setting up state without going through sends.
    pub store: Arc<dyn MailboxStore>,
    _dir: tempfile::TempDir,
}

impl BenchRelay {
    /// A fresh store with the given backend and durability, and generous limits.
    pub fn new(backend: Backend, durability: Durability) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let sled = Arc::new(
            SledStore::open(&dir.path().join("db"), 256 << 20).map_err(std::io::Error::other)?,
        );
        let (stores, store): (Stores, Arc<dyn MailboxStore>) = match backend {
            Backend::Log => {
                let log = Arc::new(
                    LogStore::open(&dir.path().join("mailboxes"), LogOptions::default())
                        .map_err(std::io::Error::other)?,
                );
                (Stores::split(log.clone(), sled), log)
            }
            Backend::Sled => (Stores::all(sled.clone()), sled),
        };
        let limits = Limits {
            max_queued_messages: u64::MAX,
            max_queued_bytes: u64::MAX,
            ..Limits::default()
        };
        let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        // Rates far above what a bench sends: the checks run, nothing is refused.
        let fast: tern_relay::core::rate::Rate =
            "4000000000/1s".parse().map_err(std::io::Error::other)?;
        let rates = RateLimitsConfig {
            sends_per_account: fast,
            sealed_sends_per_token: fast,
            sealed_sends_per_prefix: fast,
            intake_per_sender_per_mailbox: fast,
            ..RateLimitsConfig::default()
        };
        // Relay-wide budgets out of the way too (the checks still run).
        let budget = tern_relay::core::budget::BudgetLimits {
            max_queued_messages: u64::MAX,
            max_queued_bytes: u64::MAX,
            max_index_bytes: u64::MAX,
            max_blob_bytes: u64::MAX,
            min_free_disk_bytes: 0,
            min_free_disk_percent: 0,
        };
        let services = Services::with_budget(
            stores,
            Arc::new(SystemClock),
            limits,
            Ttl::MAX,
            durability,
            signer,
            &rates,
            Arc::new(tern_relay::core::budget::Budget::new(budget)),
        )?;
        Ok(BenchRelay {
            services: Arc::new(services),
            store,
            _dir: dir,
        })
    }

    /// Registers a device, as a connection's registration would.
    pub async fn device(&self, seed: u8) -> AuthenticatedDevice {
        let identity = SigningKey::from_bytes(&[seed; 32]);
        let device = SigningKey::from_bytes(&[seed ^ 0xff; 32]);
        let device_pub = device.verifying_key().to_bytes();
        let exporter = [seed; 32];
        let verified = auth::verify_registration(
            &identity.verifying_key().to_bytes(),
            &device_pub,
            &identity
                .sign(&tern_proto::auth::device_certificate(None, &device_pub))
                .to_bytes(),
            &device
                .sign(&tern_proto::auth::session_proof(&exporter))
                .to_bytes(),
            &exporter,
        )
        .unwrap_or_else(|e| panic!("bench keys are valid: {e}"));
        self.services
            .accounts()
            .register(verified)
            .await
            .unwrap_or_else(|e| panic!("register: {e}"))
    }

    /// Sends `msgs` from `sender` to `to` as a connection does: checks the
    /// recipient, appends, and waits for the group commit.
    pub async fn send(
        &self,
        sender: &AuthenticatedDevice,
        to: DeviceAddress,
        msgs: &[Envelope],
    ) -> tern_relay::Result<usize> {
        let to = self.services.accounts().recipient(sender, to)?;
        self.services.mailboxes().append(&to, msgs)?.commit().await
    }
}
