//! Account deletion (P7): everything the relay holds for an account goes, and the
//! account then behaves exactly like one that never existed.
//!
//! [`AccountDeletion::delete`] runs these steps, each idempotent:
//! 1. An account's own request is checked against its stored identity key. A
//!    deletion intent (account → device ids) is written and flushed; a failure here
//!    hides nothing (the sweeper finishes an intent that landed).
//! 2. The id joins the [`Tombstones`] (in memory), behind a per-account barrier that
//!    writes checking the account hold (`Tombstones::live`): from then on every
//!    lookup finds nothing, no write to the account lands, and its other connections
//!    are closed with `ACCOUNT_DELETED`. Any later failure is left to the sweeper.
//! 3. The removals: the discovery tag and bucket, each device's published keys and
//!    MLS key packages, the
//!    account's media charges and unfinished uploads (record and `.part` file;
//!    finished blobs name no one and expire on their own, ARCHITECTURE §14), each
//!    device's mailbox, then the account record and its delivery token hash.
//! 4. A flush, the mailbox store's settle (the log punches the purged records' bytes
//!    now), a flush, then the intent is removed and flushed. Only then is the caller
//!    answered.
//! 5. At start, [`AccountDeletion::resume`] re-runs every intent left by a crash; the
//!    sweeper retries one that failed ([`AccountDeletion::sweep`]). A record that
//!    does not decode is removed all the same, its mailboxes found by device number.
//!
//! The barrier's exclusive lock, the removals and the flushes run on blocking
//! threads, never on an async worker.

mod device;
mod tombstones;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::warn;

use tern_proto::limits::EXPORTER_LEN;
use tern_proto::{AccountId, DeviceAddress, DeviceId, SignedKey};

use crate::core::auth::{verify_deletion, AuthenticatedDevice, VerifiedDeletion};
use crate::error::{Error, Result};
use crate::media::BlobStore;
use crate::server::Services;
use crate::store::{
    AccountRecord, AccountStore, FetchedKeys, KeyStore, OneTimeKey, Published, StoreResult,
};
pub use device::DeviceRemoval;
pub use tombstones::Tombstones;
pub(crate) use tombstones::{Gone, Live};

/// The account store as the services see it: a tombstoned account is absent, so
/// every check that looks an account up (Auth, Send, SealedSend, FetchKeys,
/// ListDevices, key uploads, certificates) answers as for an unknown id, with no
/// code of its own. Writes to a tombstoned account are dropped.
pub(crate) struct Hidden {
    store: Arc<dyn AccountStore>,
    tombstones: Arc<Tombstones>,
}

impl Hidden {
    pub(crate) fn new(store: Arc<dyn AccountStore>, tombstones: Arc<Tombstones>) -> Self {
        Hidden { store, tombstones }
    }

    fn gone(&self, id: &AccountId) -> bool {
        self.tombstones.contains(id)
    }
}

impl AccountStore for Hidden {
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        day: Option<u32>,
    ) -> StoreResult<()> {
        if self.gone(id) {
            // A fresh random id that collides with a deleted one: try another.
            return Err(crate::store::StoreError::Exists);
        }
        self.store.create_on(id, record, day)
    }
    fn days(&self, id: &AccountId) -> StoreResult<Option<crate::store::AccountDays>> {
        if self.gone(id) {
            return Ok(None);
        }
        self.store.days(id)
    }
    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        let Some(_live) = self.tombstones.live(&of.account) else {
            return Ok(false);
        };
        self.store.touch_device(of, day)
    }
    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        if self.gone(id) {
            return Ok(None);
        }
        self.store.get(id)
    }
    fn add_device(
        &self,
        id: &AccountId,
        key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        let Some(_live) = self.tombstones.live(id) else {
            return Ok(None);
        };
        self.store.add_device(id, key, day)
    }
    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()> {
        let Some(_live) = self.tombstones.live(id) else {
            // A connection of the deleted account, not yet closed: nothing to keep.
            return Ok(());
        };
        self.store.set_delivery_token(id, token_hash)
    }
    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        if self.gone(id) {
            return Ok(None);
        }
        self.store.delivery_token(id)
    }
    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        self.store.remove_account(id)
    }
    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        self.store.put_deletion(id, devices)
    }
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        self.store.deletions()
    }
    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.store.remove_deletion(id)
    }
    fn device_list_version(&self, id: &AccountId) -> StoreResult<u64> {
        if self.gone(id) {
            return Ok(0);
        }
        self.store.device_list_version(id)
    }
    fn device_list(&self, id: &AccountId) -> StoreResult<Option<crate::store::StoredList>> {
        if self.gone(id) {
            return Ok(None);
        }
        self.store.device_list(id)
    }
    fn put_device_list(
        &self,
        id: &AccountId,
        list: &crate::store::StoredList,
    ) -> StoreResult<bool> {
        let Some(_live) = self.tombstones.live(id) else {
            return Ok(false);
        };
        self.store.put_device_list(id, list)
    }
    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        self.store.remove_device_record(of)
    }
    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        self.store.idle_devices(seen_before_day, max)
    }
    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.store.put_device_removal(of)
    }
    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        self.store.device_removals()
    }
    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.store.remove_device_removal(of)
    }
}

/// The key store as the services see it: a publish checks the account and writes
/// under `Tombstones::live`, so no key outlives a deletion running meanwhile.
pub(crate) struct HiddenKeys {
    store: Arc<dyn KeyStore>,
    tombstones: Arc<Tombstones>,
}

impl HiddenKeys {
    pub(crate) fn new(store: Arc<dyn KeyStore>, tombstones: Arc<Tombstones>) -> Self {
        HiddenKeys { store, tombstones }
    }
}

impl KeyStore for HiddenKeys {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        let Some(_live) = self.tombstones.live_device(of) else {
            // Deleted (or the device removed) since the caller looked it up: keep
            // nothing.
            return Ok(0);
        };
        self.store.publish(of, identity_dh, signed_prekey, one_time)
    }
    fn fetch(&self, of: &DeviceAddress, one_time: bool) -> StoreResult<Option<FetchedKeys>> {
        self.store.fetch(of, one_time)
    }
    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        self.store.one_time_count(of)
    }
    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        self.store.published(of)
    }
    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.store.remove_device(of)
    }
    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()> {
        self.store.remove_account_keys(account)
    }
}

/// The operator's authority to delete any account: access to the data directory
/// (the offline admin command) or the relay's own start-time resume. Only this
/// crate makes one.
#[derive(Debug)]
pub struct Operator(());

impl Operator {
    /// For the admin command and the resume at start.
    pub(crate) fn offline() -> Self {
        Operator(())
    }
}

/// Who may delete an account.
#[derive(Debug)]
pub enum DeletionAuthority {
    /// The account's identity key signed the request on this connection.
    Account(VerifiedDeletion),
    /// The operator, offline (see [`Operator`]).
    Operator(Operator, AccountId),
}

impl DeletionAuthority {
    fn account(&self) -> AccountId {
        match self {
            DeletionAuthority::Account(v) => *v.account(),
            DeletionAuthority::Operator(_, id) => *id,
        }
    }
}

/// What a deletion removed, for the operator's output and tests (no identifiers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Devices whose keys and mailboxes were removed.
    pub devices: u64,
    /// Queued messages deleted.
    pub messages: u64,
    /// Unfinished uploads deleted.
    pub uploads: u64,
}

/// What [`AccountDeletion::retry_pending`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retried {
    /// Deletions finished.
    pub finished: usize,
    /// Deletions that failed again (left for the next try).
    pub failed: usize,
}

/// A deletion (of an account, or of one device) running in this process: its key
/// stays in `set` while this lives, so a retry leaves it alone.
struct Running<'a, K: Eq + std::hash::Hash> {
    set: &'a Mutex<HashSet<K>>,
    key: K,
}

impl<'a, K: Eq + std::hash::Hash + Copy> Running<'a, K> {
    /// Marks `key` as running in `set`; `None` if it already is.
    fn start(set: &'a Mutex<HashSet<K>>, key: &K) -> Option<Self> {
        let mut running = set.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(*key).then_some(Running { set, key: *key })
    }
}

impl<K: Eq + std::hash::Hash> Drop for Running<'_, K> {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
    }
}

/// The deletion service. See the module docs.
pub struct AccountDeletion {
    services: Arc<Services>,
    blobs: Arc<BlobStore>,
    /// Accounts whose deletion runs now: a retry leaves them alone.
    running: Mutex<HashSet<AccountId>>,
    /// A deletion failed (or was left) since the last retry: the sweeper retries.
    failed: std::sync::atomic::AtomicBool,
    /// Open phone verifications (memory only): the account's session ends with it.
    verification: Option<Arc<crate::verification::Verification>>,
}

impl std::fmt::Debug for AccountDeletion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountDeletion").finish_non_exhaustive()
    }
}

impl AccountDeletion {
    /// Deletion over the relay's services and media store.
    pub fn new(services: Arc<Services>, blobs: Arc<BlobStore>) -> Self {
        blobs.refuse_deleted(services.tombstones().clone());
        AccountDeletion {
            services,
            blobs,
            running: Mutex::default(),
            failed: std::sync::atomic::AtomicBool::new(false),
            verification: None,
        }
    }

    /// Also ends the account's open phone verification (its number, held in memory
    /// only until the session ends, goes at once) and drops its in-memory discovery
    /// buckets (lookups, settings).
    pub fn with_verification(
        mut self,
        verification: Arc<crate::verification::Verification>,
    ) -> Self {
        self.verification = Some(verification);
        self
    }

    /// Deletes the account; returns once everything is removed, committed and
    /// scrubbed from the mailbox log. An account that does not exist (and has no
    /// intent left) is [`Error::UnknownRecipient`].
    pub async fn delete(&self, authority: DeletionAuthority) -> Result<Deleted> {
        let account = authority.account();
        let stores = self.services.stores().clone();
        let record = match stores.accounts.get(&account) {
            Ok(record) => Found::Record(record),
            Err(crate::store::StoreError::Corrupt(_)) => Found::Corrupt,
            Err(e) => return Err(e.into()),
        };
        if let DeletionAuthority::Account(v) = &authority {
            // The proof names the key it was checked with: it must be the account's
            // identity key, checked before the account is hidden.
            match &record {
                Found::Record(Some(rec)) if rec.identity_key == *v.identity_key() => {}
                _ => return Err(Error::Unauthorized),
            }
        }
        let pending = stores
            .accounts
            .deletions()?
            .into_iter()
            .find(|(a, _)| *a == account)
            .map(|(_, d)| d);
        let devices = match (record, pending) {
            (Found::Record(Some(rec)), pending) => {
                let mut ids: Vec<DeviceId> = rec.devices.iter().map(|(id, _)| *id).collect();
                ids.extend(pending.into_iter().flatten());
                ids.sort_unstable();
                ids.dedup();
                ids
            }
            (Found::Corrupt, pending) => pending.unwrap_or_default(),
            (Found::Record(None), Some(pending)) => pending,
            (Found::Record(None), None) => return Err(Error::UnknownRecipient),
        };
        // A retry running it meanwhile is harmless (every step is idempotent).
        let _running = self.running(&account);
        // The intent is durable before the account is hidden: a failure up to here
        // leaves the account as it was, one after it is the sweeper's to finish. A
        // device added before the tombstone is found by `run` in the record.
        let intent = stores.accounts.put_deletion(&account, &devices);
        if let Err(e) = intent {
            // Maybe half written: the sweeper finishes it if it landed.
            self.failed.store(true, Ordering::Relaxed);
            return Err(e.into());
        }
        let done = match self.durable().await {
            Ok(()) => {
                let tombstones = self.services.tombstones().clone();
                blocking(move || {
                    tombstones.insert(account);
                    Ok(())
                })
                .await?;
                self.run(&account, &devices).await
            }
            Err(e) => Err(e),
        };
        if done.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        done
    }

    /// For the sweeper: retries up to `max` recorded deletions if one failed since
    /// the last call (else reads nothing).
    pub async fn sweep(&self, max: usize) -> Result<Retried> {
        if !self.failed.swap(false, Ordering::Relaxed) {
            return Ok(Retried::default());
        }
        let retried = self.retry_pending(max).await;
        if retried
            .as_ref()
            .map_or(true, |r| r.failed > 0 || r.finished >= max)
        {
            self.failed.store(true, Ordering::Relaxed);
        }
        retried
    }

    /// A deletion asked for on a connection authenticated as `device`: checks the
    /// account's identity key's `signature` over the account and `exporter` (this
    /// connection's exporter output for the device's address, as `Auth` uses), then
    /// deletes. A bad signature, or an account already being deleted, is
    /// [`Error::Unauthorized`].
    pub async fn delete_signed(
        &self,
        device: &AuthenticatedDevice,
        exporter: &[u8; EXPORTER_LEN],
        signature: &[u8],
    ) -> Result<Deleted> {
        let account = device.address().account;
        if self.services.tombstones().contains(&account) {
            return Err(Error::Unauthorized);
        }
        let record = self.services.stores().accounts.get(&account)?;
        let identity = record.ok_or(Error::Unauthorized)?.identity_key;
        let verified = verify_deletion(&identity, &account, exporter, signature)?;
        self.delete(DeletionAuthority::Account(verified)).await
    }

    /// Finishes every deletion a crash interrupted; called at start, before the
    /// relay serves. Returns how many it finished; one that fails again is logged
    /// and left to the sweeper ([`AccountDeletion::retry_pending`]), its account
    /// hidden meanwhile.
    pub async fn resume(&self) -> Result<usize> {
        Ok(self.retry_pending(usize::MAX).await?.finished)
    }

    /// Re-runs up to `max` recorded deletions that are not running now (a failed
    /// or interrupted one); the sweeper calls it. Every recorded account is hidden
    /// first, retried now or not. A failure is logged at warn, without the id, and
    /// retried next time.
    pub async fn retry_pending(&self, max: usize) -> Result<Retried> {
        let intents = self.services.stores().accounts.deletions()?;
        let tombstones = self.services.tombstones().clone();
        let accounts: Vec<AccountId> = intents.iter().map(|(a, _)| *a).collect();
        blocking(move || {
            for account in &accounts {
                if !tombstones.contains(account) {
                    tombstones.insert(*account);
                }
            }
            Ok(())
        })
        .await?;
        let mut retried = Retried::default();
        for (account, devices) in intents.iter().take(max) {
            let Some(_running) = self.running(account) else {
                continue;
            };
            match self.run(account, devices).await {
                Ok(_) => retried.finished += 1,
                Err(e) => {
                    retried.failed += 1;
                    self.failed.store(true, Ordering::Relaxed);
                    warn!(error = %e, "an account deletion failed part way; it is retried at the next sweep");
                }
            }
        }
        Ok(retried)
    }

    /// Marks `account`'s deletion as running here, `None` if it already is.
    fn running(&self, account: &AccountId) -> Option<Running<'_, AccountId>> {
        Running::start(&self.running, account)
    }

    async fn run(&self, account: &AccountId, devices: &[DeviceId]) -> Result<Deleted> {
        let removal = Removal {
            services: self.services.clone(),
            blobs: self.blobs.clone(),
            verification: self.verification.clone(),
            account: *account,
            devices: devices.to_vec(),
        };
        let deleted = blocking(move || removal.remove()).await?;
        // Removals durable before the scrub, the scrub before the intent goes.
        self.durable().await?;
        let services = self.services.clone();
        blocking(move || services.mailboxes().settle()).await?;
        self.durable().await?;
        self.services.stores().accounts.remove_deletion(account)?;
        self.durable().await?;
        Ok(deleted)
    }

    /// Makes every change so far durable (see [`durable`]).
    async fn durable(&self) -> Result<()> {
        durable(&self.services).await
    }
}

/// Makes every change so far durable, whatever `durability` says: an intent must
/// survive a crash for its deletion or removal to be finished, and its removal is
/// the promise that the data is gone (under `"os"` a commit does not flush; the
/// flush then runs on a blocking thread).
async fn durable(services: &Arc<Services>) -> Result<()> {
    let commit = services.commit();
    if commit.mode() == crate::store::Durability::Os {
        let services = services.clone();
        blocking(move || Ok(services.commit().flush_now()?)).await?;
    } else {
        commit.commit().await?;
    }
    Ok(())
}

/// What the account store answered for the account's record.
enum Found {
    Record(Option<AccountRecord>),
    /// A record that does not decode: the account exists, its devices are unknown.
    Corrupt,
}

/// Runs `f` (store I/O, the barrier's exclusive lock) on a blocking thread, so a
/// deletion never stalls an async worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| crate::store::StoreError::Backend("account deletion task failed".into()))?
}

/// The store removals of one deletion, run on a blocking thread.
struct Removal {
    services: Arc<Services>,
    blobs: Arc<BlobStore>,
    verification: Option<Arc<crate::verification::Verification>>,
    account: AccountId,
    devices: Vec<DeviceId>,
}

impl Removal {
    fn remove(self) -> Result<Deleted> {
        let account = &self.account;
        let stores = self.services.stores();
        // The intent's devices and the record's, while it is there: an intent whose
        // device list was unreadable still removes every device's data.
        let mut devices = self.devices.clone();
        let mut probed = Vec::new();
        match stores.accounts.get(account) {
            Ok(record) => devices.extend(
                record
                    .iter()
                    .flat_map(|r| r.devices.iter().map(|(id, _)| *id)),
            ),
            Err(crate::store::StoreError::Corrupt(_)) => {
                // Device ids are given in order from 1, and an account never holds
                // more than the configured maximum (at most this bound).
                warn!("an account record being deleted does not decode; its mailboxes are found by device number");
                probed = (1..=crate::config::MAX_DEVICES_BOUND)
                    .filter_map(|n| u32::try_from(n).ok().and_then(DeviceId::new))
                    .collect();
            }
            Err(e) => return Err(e.into()),
        }
        devices.sort_unstable();
        devices.dedup();
        let known = devices.clone();
        devices.extend(probed);
        devices.sort_unstable();
        devices.dedup();
        let addrs: Vec<DeviceAddress> = devices
            .iter()
            .map(|&device| DeviceAddress {
                account: *account,
                device,
            })
            .collect();
        let mut deleted = Deleted::default();
        self.detach_discovery()?;
        // By a scan of the account's keys: also those of a device no list names.
        stores.keys.remove_account_keys(account)?;
        stores.key_packages.remove_account_key_packages(account)?;
        stores.push.remove_account_push_targets(account)?;
        crate::store::fault::check(crate::store::fault::Site::AccountDeletion)
            .map_err(|e| crate::store::StoreError::from_io("account deletion", &e))?;
        deleted.uploads = self.blobs.remove_account(account).map_err(Error::from)? as u64;
        for addr in &addrs {
            let purged = self.services.mailboxes().purge(addr)?;
            deleted.messages += purged.messages;
            deleted.devices += u64::from(purged.messages > 0 || known.contains(&addr.device));
        }
        match stores.accounts.remove_account(account) {
            // A record that does not decode is removed all the same.
            Ok(_) | Err(crate::store::StoreError::Corrupt(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.services.accounts().forget(account);
        // Linked devices (P7): slots deposited for it, and removal intents naming it
        // (their devices' data went with the account's).
        self.services.provisioning().forget_account(account)?;
        for addr in stores.accounts.device_removals()? {
            if addr.account == *account {
                stores.accounts.remove_device_removal(&addr)?;
            }
        }
        // In-memory buckets too: none outlives the account by more than a request
        // already past its checks (housekeeping forgets that one once it refills).
        self.services.rate_limits().forget_account(account);
        // Again: an evaluation that passed its check before the first detach may
        // have stored a bucket since (discovery takes no tombstone guard yet).
        self.detach_discovery()?;
        Ok(deleted)
    }

    /// Discovery's part of a deletion: the account's tag (lookups stop finding it
    /// at once, the filter drops its key from the next day's files) and its stored
    /// evaluation bucket; with the verification service, the account's open session
    /// and discovery's in-memory buckets.
    fn detach_discovery(&self) -> Result<()> {
        let account = &self.account;
        if let Some(v) = &self.verification {
            v.forget_account(account)?;
            v.discovery().forget_account(account);
        }
        self.services.stores().discovery.detach(account)?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
