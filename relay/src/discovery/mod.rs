//! Contact discovery: the relay's side of P5 and P6.
//!
//! A verified number becomes a tag (the first 16 bytes of its OPRF output under the
//! relay's key, see [`oprf`]) and a filter key (the next 8); the relay keeps the tag
//! with its account in a [`DiscoveryStore`], and forgets the number. Clients:
//! 1. download the filter of every discoverable filter key ([`publish`]): a daily
//!    snapshot and small daily deltas, on any connection;
//! 2. send their address book's numbers blinded ([`Discovery::evaluate`]), charged
//!    per point (the padded batch size, before any point is decoded) to the
//!    account's bucket and to its verified number's (both kept in the store, so
//!    neither a restart nor moving the number to a fresh account refills anything)
//!    and to the address prefix's (in memory);
//! 3. unblind, test the filter locally, and look up only the hits' tags
//!    ([`Discovery::lookup`]), which answers account id and identity key of the tags
//!    that exist *and* are discoverable: a missing tag and a hidden one look alike.
//!
//! What the relay learns: that an account evaluated k points (k is the padded batch
//! size, not which numbers), and which tags it looked up (its hits: contacts it would
//! message anyway). Evaluation and lookups need a verified number (`NOT_VERIFIED`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tern_platform::clock::{Clock, UnixMillis};
use tern_proto::discovery::{BlindedBatch, DiscoveredAccount, FilterKey, FilterPart, Tag};
use tern_proto::AccountId;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::config::DiscoveryConfig;
use crate::core::rate::{AddressPrefix, KeyedLimit};
use crate::error::{Error, Result};
use crate::store::{AccountStore, DiscoveryStore, GroupCommit, TagRecord, DAY_MS};

pub mod oprf;
pub mod publish;
pub mod seed;
pub mod shared;

pub use self::oprf::Oprf;
use self::publish::Published;
use self::shared::{SharedPublication, Version};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

/// Why a discovery request was refused (beyond rate limits and the store).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// Point `index` of the batch is not a canonical ristretto255 encoding, or is
    /// the identity. Nothing was charged.
    #[error("point {index} is not a ristretto255 point")]
    InvalidPoint {
        /// Its position in the batch, from 0.
        index: usize,
    },
    /// The account has no verified number.
    #[error("discovery needs a verified phone number")]
    NotVerified,
    /// The filter day asked for is no longer published; start again from part 0.
    #[error("that filter day is no longer published")]
    Gone,
    /// As many batches as `max_queued_evaluations` already wait for evaluation;
    /// nothing was charged. `UNAVAILABLE`, retry after `retry_after_ms`.
    #[error("too many evaluations waiting; retry later")]
    Busy {
        /// When to try again, in ms.
        retry_after_ms: u64,
    },
    /// No filter has been published yet (the relay just started, or its first
    /// publication failed). `UNAVAILABLE`, retry after `retry_after_ms`.
    #[error("no discovery filter published yet")]
    NotPublished {
        /// When to try again, in ms (the publisher retries every minute).
        retry_after_ms: u64,
    },
    /// The part asked for is past the artefact's last. `BAD_REQUEST`.
    #[error("part {part} of an artefact of {parts}")]
    NoSuchPart {
        /// The part asked for.
        part: u32,
        /// How many the artefact has.
        parts: u32,
    },
    /// The OPRF refused the number's bytes (only input over 65,535 bytes).
    /// `BAD_REQUEST`.
    #[error("number not accepted by the OPRF")]
    NumberRejected,
    /// An evaluation's blocking task failed (a panic). `INTERNAL`, logged.
    #[error("evaluation failed")]
    EvaluationFailed,
    /// At start: the database holds tags but the OPRF key file is missing, so every
    /// tag would silently stop matching. The relay refuses to start.
    #[error(
        "{} is missing but db/ holds discovery tags made with it: restore that file \
         from where it was kept apart from db/ (a new key would make every tag useless)",
        key.display()
    )]
    KeyMissing {
        /// The key file expected.
        key: PathBuf,
    },
    /// At start: the OPRF key file can be read by others than its owner.
    #[error(
        "{} has mode {mode:o}; it must be 0600: run `chmod 600 {}`",
        key.display(),
        key.display()
    )]
    KeyMode {
        /// The key file.
        key: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// What a refusal for a full evaluation queue advises: about the time the batches
/// already queued take (4096 points at ~40 µs, per slot of concurrency).
const BUSY_RETRY_MS: u64 = 500;

/// Keys remembered by the in-memory buckets, per bucket.
const MAX_BUCKET_KEYS: usize = 1_000_000;

/// Detached number buckets removed or stamped per housekeeping (every minute).
const NUMBER_SWEEP_MAX: usize = 10_000;

/// How long the publisher's lease is held for one publication: longer than a
/// build and its write take, short enough that a crashed holder delays the day's
/// filter by no more.
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// How often the publish loop housekeeps the buckets.
const HOUSEKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One GCRA step over a stored theoretical arrival time: `n` units at `now`, one
/// unit refilled every `interval` ms, at most `burst` units held. The new TAT to
/// store, or the ms after which the same request fits.
pub fn gcra(tat: Option<u64>, now: u64, interval: u64, burst: u64, n: u64) -> Result<u64, u64> {
    let start = tat.unwrap_or(now).max(now);
    let new = start.saturating_add(n.saturating_mul(interval));
    let limit = now.saturating_add(burst.saturating_mul(interval));
    if new <= limit {
        Ok(new)
    } else {
        Err(new - limit)
    }
}

/// The day (since the Unix epoch, UTC) of `now`.
pub fn utc_day(now: UnixMillis) -> u32 {
    u32::try_from(now / DAY_MS).unwrap_or(u32::MAX)
}

/// The discovery service.
pub struct Discovery {
    oprf: Arc<Oprf>,
    store: Arc<dyn DiscoveryStore>,
    accounts: Arc<dyn AccountStore>,
    clock: Arc<dyn Clock>,
    config: DiscoveryConfig,
    per_prefix: KeyedLimit<AddressPrefix>,
    lookups: KeyedLimit<AccountId>,
    /// Changes of the discoverable setting, per account.
    settings: KeyedLimit<AccountId>,
    filter_parts: KeyedLimit<AddressPrefix>,
    /// Serialises the account bucket's read-charge-write.
    charging: Mutex<()>,
    /// One publication at a time (they write the same files).
    publishing: Mutex<()>,
    evaluations: Arc<Semaphore>,
    /// Batches admitted to evaluation (waiting for a permit or running).
    admitted: Arc<AtomicUsize>,
    /// Where the published files live (`<data>/discovery`).
    dir: PathBuf,
    published: RwLock<Arc<Published>>,
    /// The publication all nodes serve, on a shared backend (none: files in `dir`).
    shared: Option<Arc<dyn SharedPublication>>,
    /// Which stored publication `published` is (shared only).
    version: Mutex<Option<Version>>,
    /// When a client's request last tried a reload (ms since `epoch`): at most one
    /// a second, node-wide.
    reload_tried: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    /// Makes bucket charges durable before the answer (none: the store's own
    /// periodic flush, for tests and tools).
    commit: Option<Arc<GroupCommit>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// The service over its stores; files are published under `dir`.
    pub fn new(
        oprf: Oprf,
        store: Arc<dyn DiscoveryStore>,
        accounts: Arc<dyn AccountStore>,
        clock: Arc<dyn Clock>,
        config: &DiscoveryConfig,
        dir: PathBuf,
    ) -> Result<Self> {
        let rate = |b: &crate::config::BucketRate| {
            b.as_rate()
                .ok_or_else(|| Error::Config("discovery bucket of zero".into()))
        };
        Ok(Discovery {
            oprf: Arc::new(oprf),
            per_prefix: KeyedLimit::new(rate(&config.per_prefix)?, MAX_BUCKET_KEYS, clock.clone()),
            lookups: KeyedLimit::new(
                rate(&config.lookups_per_account)?,
                MAX_BUCKET_KEYS,
                clock.clone(),
            ),
            settings: KeyedLimit::new(config.settings_per_account, MAX_BUCKET_KEYS, clock.clone()),
            filter_parts: KeyedLimit::new(
                config.filter_parts_per_prefix,
                MAX_BUCKET_KEYS,
                clock.clone(),
            ),
            store,
            accounts,
            clock,
            charging: Mutex::new(()),
            publishing: Mutex::new(()),
            evaluations: Arc::new(Semaphore::new(config.max_concurrent_evaluations)),
            admitted: Arc::new(AtomicUsize::new(0)),
            config: config.clone(),
            dir,
            published: RwLock::new(Arc::new(Published::empty())),
            shared: None,
            version: Mutex::new(None),
            reload_tried: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            commit: None,
        })
    }

    /// Answers evaluations only once their charge is durable as `commit` makes
    /// every store's writes (with `durability = "fsync"`, after a shared fsync).
    pub fn with_commit(mut self, commit: Arc<GroupCommit>) -> Self {
        self.commit = Some(commit);
        self
    }

    /// Serves the publication `store` holds for every node of the relay instead of
    /// files: built by the holder of [`shared::PUBLISH_LEASE`], reloaded when a new
    /// one is stored (see [`shared`]). Loads the newest stored one at once, so a
    /// node (re)started serves it from its first connection; a failure is logged
    /// and the publish loop tries again.
    pub fn with_shared(mut self, store: Arc<dyn SharedPublication>) -> Self {
        self.shared = Some(store);
        if let Err(e) = self.refresh() {
            warn!(error = %e, "the shared discovery filter could not be loaded at start");
        }
        self
    }

    /// Whether the publication is shared with other nodes.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The OPRF key.
    pub fn oprf(&self) -> &Oprf {
        &self.oprf
    }

    /// The tag store.
    pub fn store(&self) -> &Arc<dyn DiscoveryStore> {
        &self.store
    }

    fn enabled(&self) -> Result<()> {
        if self.config.enabled {
            Ok(())
        } else {
            Err(Error::Unavailable("discovery is not enabled"))
        }
    }

    fn verified(&self, account: &AccountId) -> Result<(Tag, TagRecord)> {
        match self.store.of_account(account)? {
            Some(found) => Ok(found),
            None => Err(DiscoveryError::NotVerified.into()),
        }
    }

    /// Gives `account` the tag of `number` (its E.164 bytes), once verification has
    /// proved the account holds it; discoverable as `default_discoverable` says. The
    /// number is not kept. Returns the account that held the number before, if
    /// another (it loses its tag).
    pub fn attach_verified(&self, account: &AccountId, number: &[u8]) -> Result<Option<AccountId>> {
        self.attach_verified_as(account, number, None)
    }

    /// [`Self::attach_verified`] with the account's choice: `Some(d)` makes the tag
    /// discoverable as `d` from its first write, `None` as `default_discoverable`.
    /// Called by phone verification.
    pub fn attach_verified_as(
        &self,
        account: &AccountId,
        number: &[u8],
        discoverable: Option<bool>,
    ) -> Result<Option<AccountId>> {
        let (tag, key) = self.oprf.tag_of(number)?;
        self.attach_tag_as(account, &tag, key, discoverable)
    }

    /// [`Self::attach_verified_as`] for a number whose tag was evaluated before
    /// (phone verification evaluates it when the session starts, and keeps only it).
    pub fn attach_tag_as(
        &self,
        account: &AccountId,
        tag: &Tag,
        key: FilterKey,
        discoverable: Option<bool>,
    ) -> Result<Option<AccountId>> {
        let now = self.clock.now();
        let rec = TagRecord {
            account: *account,
            key,
            discoverable: discoverable.unwrap_or(self.config.default_discoverable),
            verified_at: now - now % DAY_MS,
        };
        Ok(self.store.attach(account, tag, &rec)?)
    }

    /// Charges `n` points to the account's bucket and its number's (both stored,
    /// the number's by its tag) and to the prefix's (in memory): all or none.
    fn charge(&self, account: &AccountId, tag: &Tag, prefix: AddressPrefix, n: u32) -> Result<()> {
        // Held across the store's reads and write: waited for off the worker.
        let _one = crate::locks::lock(&self.charging);
        let b = &self.config.per_account;
        let now = self.clock.now();
        let step = |tat| gcra(tat, now, b.interval_ms(), u64::from(b.burst), u64::from(n));
        let (account_tat, number_tat) = match (
            step(self.store.bucket(account)?),
            step(self.store.number_bucket(tag)?),
        ) {
            (Ok(a), Ok(t)) => (a, t),
            (Err(a), Err(t)) => {
                return Err(Error::RateLimited {
                    retry_after_ms: a.max(t),
                })
            }
            (Err(retry_after_ms), _) | (_, Err(retry_after_ms)) => {
                return Err(Error::RateLimited { retry_after_ms })
            }
        };
        self.per_prefix.check_n(&prefix, n)?;
        self.store
            .set_buckets(account, account_tat, tag, number_tat)?;
        Ok(())
    }

    /// Evaluates a verified account's blinded batch. In order: a place among the
    /// `max_concurrent_evaluations + max_queued_evaluations` batches admitted (or
    /// [`DiscoveryError::Busy`], nothing charged); the padded batch size charged,
    /// once (the relay decodes nothing it has not been paid for, so a batch with a
    /// bad point costs its sender as much as a good one); an evaluation permit; then
    /// on a blocking thread every point decoded (the first bad one is
    /// [`DiscoveryError::InvalidPoint`], `BAD_REQUEST`, and none is evaluated) and
    /// evaluated.
    pub async fn evaluate(
        &self,
        account: &AccountId,
        prefix: AddressPrefix,
        blinded: &BlindedBatch,
    ) -> Result<Bytes> {
        // Sizes only: what the relay sees of an address book (tests compare it).
        debug!(
            batch = blinded.len(),
            bytes = blinded.as_bytes().len(),
            "discovery_evaluate"
        );
        self.enabled()?;
        let (tag, _) = self.verified(account)?;
        let _place = self.admit()?;
        let n = u32::try_from(blinded.len()).unwrap_or(u32::MAX);
        self.charge(account, &tag, prefix, n)?;
        // The charge's flush and the evaluation overlap; the answer waits for both.
        let durable = async {
            match &self.commit {
                Some(c) => c.commit().await.map_err(Error::from),
                None => Ok(()),
            }
        };
        let evaluated = async {
            let _permit = self
                .evaluations
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::Unavailable("shutting down"))?;
            let oprf = self.oprf.clone();
            let bytes = blinded.clone().into_bytes();
            let out = tokio::task::spawn_blocking(move || oprf.evaluate_batch(&bytes))
                .await
                .map_err(|_| DiscoveryError::EvaluationFailed)??;
            Ok::<_, Error>(Bytes::from(out))
        };
        let (durable, evaluated) = tokio::join!(durable, evaluated);
        durable?;
        evaluated
    }

    /// A place among the batches admitted to evaluation, given back on drop.
    fn admit(&self) -> Result<Admitted> {
        let max = self.config.max_concurrent_evaluations + self.config.max_queued_evaluations;
        let taken = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Admitted(self.admitted.clone())),
            Err(_) => Err(DiscoveryError::Busy {
                retry_after_ms: BUSY_RETRY_MS,
            }
            .into()),
        }
    }

    /// The accounts of the tags that exist and are discoverable, for a verified
    /// account; each tag costs one unit of its lookup bucket.
    pub fn lookup(&self, account: &AccountId, tags: &[Tag]) -> Result<Vec<DiscoveredAccount>> {
        self.enabled()?;
        self.verified(account)?;
        self.lookups
            .check_n(account, u32::try_from(tags.len()).unwrap_or(u32::MAX))?;
        let mut found = Vec::new();
        for tag in tags {
            let Some(rec) = self.store.by_tag(tag)? else {
                continue;
            };
            if !rec.discoverable {
                continue;
            }
            if let Some(a) = self.accounts.get(&rec.account)? {
                found.push(DiscoveredAccount {
                    tag: *tag,
                    account: rec.account,
                    identity_key: a.identity_key,
                });
            }
        }
        Ok(found)
    }

    /// Sets whether the account can be found: lookups see it at once, the filter
    /// from the next day's files. A request that changes nothing answers at once;
    /// a change costs one unit of `settings_per_account` and is durable (through
    /// the group commit) before the answer.
    pub async fn set_discoverable(&self, account: &AccountId, on: bool) -> Result<()> {
        self.enabled()?;
        let (_, rec) = self.verified(account)?;
        if rec.discoverable == on {
            return Ok(());
        }
        self.settings.check(account)?;
        if !self.store.set_discoverable(account, on)? {
            return Err(DiscoveryError::NotVerified.into());
        }
        match &self.commit {
            Some(c) => c.commit().await.map_err(Error::from),
            None => Ok(()),
        }
    }

    /// A part of the published filter (see [`publish::Published::part`]), charged
    /// one unit of `filter_parts_per_prefix` to the address prefix it was asked from
    /// (before anything is looked at, so failures count too).
    pub fn filter_part(
        &self,
        from: AddressPrefix,
        since_day: u32,
        day: u32,
        part: u32,
    ) -> Result<FilterPart> {
        self.enabled()?;
        self.filter_parts.check(&from)?;
        let mut published = self.served();
        // A part of a later day than this node serves: the client saw it on another
        // node, which loaded it first (no later than tomorrow: a made-up day costs
        // nothing, and a reload is tried at most once a second).
        let tomorrow = utc_day(self.clock.now()).saturating_add(1);
        if self.shared.is_some() && day > published.day() && day <= tomorrow && self.may_reload() {
            // A connection's task never waits for another reload, nor for the
            // publisher's: it serves what is loaded.
            if let Ok(mut version) = self.version.try_lock() {
                if let Err(e) = self.reload(&mut version) {
                    debug!(error = %e, "the shared discovery filter could not be reloaded");
                }
                published = self.served();
            }
        }
        published.part(since_day, day, part)
    }

    fn served(&self) -> Arc<Published> {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a client's request may try a reload now: one a second, node-wide, so
    /// requests naming a later day cost the database at most that.
    fn may_reload(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.reload_tried.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1_000)
            && self
                .reload_tried
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Serves the newest shared publication if it is not the one served now.
    fn refresh(&self) -> Result<()> {
        let mut version = self.version.lock().unwrap_or_else(|e| e.into_inner());
        self.reload(&mut version)
    }

    fn reload(&self, version: &mut Option<Version>) -> Result<()> {
        let Some(store) = &self.shared else {
            return Ok(());
        };
        if let Some((v, p)) = shared::load_if_newer(store.as_ref(), *version)? {
            info!(
                day = v.day,
                "discovery filter loaded from the shared database"
            );
            *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
            *version = Some(v);
        }
        Ok(())
    }

    /// On a shared backend: publishes today's filter if no node has and this node
    /// holds the lease, then serves the newest stored publication.
    fn republish_shared(&self, store: &dyn SharedPublication) -> Result<()> {
        let day = utc_day(self.clock.now());
        let started = std::time::Instant::now();
        let mut count = 0;
        let keys = || {
            let keys = self.store.discoverable_keys()?;
            count = keys.len();
            Ok(keys)
        };
        let done = shared::publish_if_due(store, day, keys, self.config.keep_deltas, LEASE_TTL)
            .and_then(|published| {
                if published {
                    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    info!(
                        day,
                        keys = count,
                        ms,
                        "discovery filter published for every node"
                    );
                }
                self.refresh()
            });
        if let Err(e) = &done {
            error!(error = %e, "shared discovery filter not published or loaded; the one served stays");
        }
        done
    }

    /// Gives the publisher's lease up (a clean stop), on a shared backend.
    pub fn release_lease(&self) {
        if let Some(store) = &self.shared {
            if let Err(e) = store.release_publisher() {
                warn!(error = %e, "the discovery publisher's lease was not released");
            }
        }
    }

    /// Serves today's files: those already written today if they are whole (a
    /// restart during the day), else built from the store. On failure the files
    /// served before stay (and the error is logged and returned). On a shared
    /// backend: today's publication if no node stored it yet and this node holds
    /// the lease, then the newest stored one (see [`shared`]).
    pub fn republish(&self) -> Result<()> {
        let _one = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = &self.shared {
            return self.republish_shared(store.as_ref());
        }
        let day = utc_day(self.clock.now());
        let started = std::time::Instant::now();
        let mut count = 0;
        let built = match publish::load_day(&self.dir, day) {
            Ok(Some(p)) => Ok(p),
            Err(e) => Err(e),
            Ok(None) => self
                .store
                .discoverable_keys()
                .map_err(Error::from)
                .and_then(|keys| {
                    count = keys.len();
                    publish::publish_day(&self.dir, day, keys, self.config.keep_deltas)
                }),
        };
        match built {
            Ok(p) => {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                info!(day, keys = count, ms, "discovery filter published");
                *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "discovery filter not published; yesterday's stays");
                Err(e)
            }
        }
    }

    /// The day of the files served now (0 before the first publication).
    pub fn published_day(&self) -> u32 {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .day()
    }

    /// Forgets the account's in-memory buckets (lookups, settings) at once: its
    /// deletion leaves nothing of it here. Its stored buckets go with
    /// [`DiscoveryStore::detach`].
    pub fn forget_account(&self, account: &AccountId) {
        self.lookups.forget(account);
        self.settings.forget(account);
    }

    /// Forgets in-memory buckets that have refilled, and sweeps the stored buckets
    /// of detached numbers (see [`DiscoveryStore::sweep_number_buckets`]).
    pub fn housekeep(&self) -> Result<usize> {
        self.per_prefix.housekeep();
        self.lookups.housekeep();
        self.filter_parts.housekeep();
        self.settings.housekeep();
        Ok(self
            .store
            .sweep_number_buckets(self.clock.now(), NUMBER_SWEEP_MAX)?)
    }
}

/// A batch's place among those admitted to evaluation.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Publishes at once, then whenever the UTC day has changed, checking every
/// `check` until `shutdown`; housekeeps on every check, whether or not the
/// publication succeeds. Both run on a blocking thread. On a shared backend every
/// check publishes if due and reloads a newer stored publication; a clean stop
/// gives the publisher's lease up.
pub async fn publish_loop(
    discovery: Arc<Discovery>,
    check: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = None;
    let mut tick = tokio::time::interval(check);
    // Housekeeping stays about once a minute however often the check runs.
    let every = (HOUSEKEEP_EVERY.as_millis() / check.as_millis().max(1)).max(1);
    let mut ticks: u128 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                let d = discovery.clone();
                let _ = tokio::task::spawn_blocking(move || d.release_lease()).await;
                return;
            }
            _ = tick.tick() => {}
        }
        let today = utc_day(discovery.clock.now());
        let d = discovery.clone();
        let publish = last != Some(today) || discovery.is_shared();
        let housekeep = ticks % every == 0;
        ticks = ticks.wrapping_add(1);
        let done = tokio::task::spawn_blocking(move || {
            if housekeep {
                if let Err(e) = d.housekeep() {
                    warn!(error = %e, "discovery housekeeping failed");
                }
            }
            !publish || d.republish().is_ok()
        })
        .await;
        if let Ok(true) = done {
            last = Some(today);
        }
    }
}
