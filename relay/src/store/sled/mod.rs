//! The embedded default: sled on disk.
//!
//! One tree holds every mailbox, so a message, its expiry entry and its device's usage
//! counter change in one atomic batch. Keys are tagged and big-endian, so sled's
//! order is the order we read in:
//!
//! | key | value |
//! |---|---|
//! | `M` account device seq | message id, accepted at, expires at, payload |
//! | `U` account device | queued messages, queued bytes |
//! | `E` expires-at account device seq | (empty) |
//! | `Q` | the epoch of the last open's sequence numbers |
//! | `B` account device seq | a shared body: expires at, bytes (`sled/mailboxes.rs`) |
//!
//! Sequence numbers are per mailbox (`store/seq.rs`): each open takes the next epoch,
//! flushed before any append, and counts each mailbox's messages in memory.
//!
//! Accounts live in their own tree, keyed by account id; delivery token hashes in
//! another; signed device lists (account id -> version, signature, list bytes) in
//! `device_lists`, and device removals in progress (account id, device id) in
//! `device_removals`. Nothing indexes devices by last-seen day: the idle scan walks
//! the accounts from a cursor, a bounded number per call (`sled/accounts.rs`). Prekeys live in a `keys` tree:
//!
//! | key | value |
//! |---|---|
//! | `I` account device | identity agreement key: id, key, signature |
//! | `S` account device | signed prekey: id, key, signature |
//! | `O` account device id | one-time prekey |
//!
//! MLS key packages (`key_packages`, `sled/keys.rs`), group epochs (`groups`,
//! `sled/groups.rs`) and push targets (`push_targets`, `sled/push.rs`) have trees of
//! their own.
//!
//! The blob index (`blobs`): records naming no account in one tree, what is tied to
//! an account (uploads in progress, quota charges) in another.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_proto::DeviceAddress;

use super::codec::{addr_bytes, fixed, parse_addr, ADDR_LEN};
use super::seq::SeqCounters;
use super::{
    codec, FetchedKeys, Flush, KeyStore, OneTimeKey, Published, SignedKey, StoreError, StoreResult,
    Totals, Usage,
};

mod accounts;
mod blobs;
mod discovery;
mod dump;
mod groups;
mod keys;
mod mailboxes;
mod push;
mod snapshot;

pub use self::dump::{DeviceKeysDump, DiscoveryDump};
pub use self::keys::DumpedPackages;
use tern_platform::clock::UnixMillis;

const MSG: u8 = b'M';
const USAGE: u8 = b'U';
const EXPIRY: u8 = b'E';
const EPOCH: [u8; 1] = [b'Q'];
const MSG_KEY_LEN: usize = 1 + ADDR_LEN + 8;
const EXPIRY_KEY_LEN: usize = 1 + 8 + ADDR_LEN + 8;
const MSG_HEADER_LEN: usize = 16 + 8 + 8;

/// Mailboxes and accounts in a sled database on disk.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    mailboxes: sled::Tree,
    accounts: sled::Tree,
    tokens: sled::Tree,
    keys: sled::Tree,
    /// Deletion intents: account id -> its device ids, until the deletion completes.
    deletions: sled::Tree,
    /// Signed device lists: account id -> version, signature, list.
    device_lists: sled::Tree,
    /// Device removals in progress: account id and device id -> (empty).
    device_removals: sled::Tree,
    /// Where the idle scan goes on from: the last account key it finished.
    idle_cursor: Arc<Mutex<Option<sled::IVec>>>,
    /// Blob records and their expiry index; no account ids.
    blobs: sled::Tree,
    /// Uploads in progress and quota charges: what ties an account to media.
    blob_quota: sled::Tree,
    /// Discovery tags and buckets (`sled/discovery.rs`); no numbers.
    discovery: sled::Tree,
    /// MLS key packages per device (`sled/keys.rs`).
    key_packages: sled::Tree,
    /// Group handles and their epochs (`sled/groups.rs`); no account ids.
    groups: sled::Tree,
    /// Push targets per device (`sled/push.rs`).
    push_targets: sled::Tree,
    /// This open's seq epoch and each mailbox's count in it.
    seqs: Arc<Mutex<SeqCounters>>,
    /// What every mailbox holds, summed from the usage keys at open.
    totals: Arc<SledTotals>,
    /// Each shared body's entries, counted at open (`sled/mailboxes.rs`).
    bodies: Arc<mailboxes::BodyRefs>,
}

/// [`Totals`] as atomics, changed after each batch that changes a usage key.
#[derive(Debug, Default)]
struct SledTotals {
    messages: AtomicU64,
    bytes: AtomicU64,
    mailboxes: AtomicU64,
}

impl SledTotals {
    /// A mailbox went from `before` to `after`.
    fn change(&self, before: Usage, after: Usage) {
        let add = |a: &AtomicU64, from: u64, to: u64| {
            if to >= from {
                a.fetch_add(to - from, Ordering::Relaxed);
            } else {
                a.fetch_sub(from - to, Ordering::Relaxed);
            }
        };
        add(&self.messages, before.messages, after.messages);
        add(&self.bytes, before.bytes, after.bytes);
        add(
            &self.mailboxes,
            u64::from(before.messages > 0),
            u64::from(after.messages > 0),
        );
    }

    /// Shared bodies the usage keys count once per entry, counted once here.
    fn sub_bytes(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn read(&self) -> Totals {
        Totals {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            mailboxes: self.mailboxes.load(Ordering::Relaxed),
        }
    }
}

fn tagged(tag: u8, a: &DeviceAddress) -> [u8; 1 + ADDR_LEN] {
    let mut k = [0u8; 1 + ADDR_LEN];
    k[0] = tag;
    k[1..].copy_from_slice(&addr_bytes(a));
    k
}

fn backend(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::from_io("sled", &io),
        e => StoreError::Backend(e.to_string()),
    }
}

fn msg_key(a: &DeviceAddress, seq: u64) -> [u8; MSG_KEY_LEN] {
    let mut k = [0u8; MSG_KEY_LEN];
    k[0] = MSG;
    k[1..1 + ADDR_LEN].copy_from_slice(&addr_bytes(a));
    k[1 + ADDR_LEN..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn usage_key(a: &DeviceAddress) -> [u8; 1 + ADDR_LEN] {
    tagged(USAGE, a)
}

fn expiry_key(at: UnixMillis, a: &DeviceAddress, seq: u64) -> [u8; EXPIRY_KEY_LEN] {
    let mut k = [0u8; EXPIRY_KEY_LEN];
    k[0] = EXPIRY;
    k[1..9].copy_from_slice(&at.to_be_bytes());
    k[9..9 + ADDR_LEN].copy_from_slice(&addr_bytes(a));
    k[9 + ADDR_LEN..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn encode_usage(u: Usage) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&u.messages.to_be_bytes());
    v[8..].copy_from_slice(&u.bytes.to_be_bytes());
    v
}

fn decode_usage(v: &[u8]) -> StoreResult<Usage> {
    if v.len() != 16 {
        return Err(StoreError::Corrupt("usage"));
    }
    Ok(Usage {
        messages: u64::from_be_bytes(fixed(&v[..8])?),
        bytes: u64::from_be_bytes(fixed(&v[8..])?),
    })
}

/// Counters for a new epoch, one above the last open's (an old database, whose seqs
/// came from sled's id generator and are far below epoch 1, has none yet). The new
/// epoch is on disk before any seq of it is handed out, so a crash cannot repeat it.
fn next_epoch(db: &sled::Db, mailboxes: &sled::Tree) -> StoreResult<SeqCounters> {
    let last = match mailboxes.get(EPOCH).map_err(backend)? {
        Some(v) => u64::from_be_bytes(fixed(&v)?),
        None => 0,
    };
    let epoch = last
        .checked_add(1)
        .ok_or(StoreError::Corrupt("sequence number epochs exhausted"))?;
    let counters = SeqCounters::new(epoch)?;
    mailboxes
        .insert(EPOCH, &epoch.to_be_bytes()[..])
        .map_err(backend)?;
    db.flush().map_err(backend)?;
    Ok(counters)
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<Self> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Background flushes for durability "os"; "fsync" flushes explicitly.
            .flush_every_ms(Some(500));
        // sled lets go of its file lock from a background thread after the last
        // handle drops: a store reopened at once (a restart in-process) waits for it,
        // up to a second.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if attempts < 50 && e.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    return Err(StoreError::Locked)
                }
                Err(e) => return Err(backend(e)),
            }
        };
        let mailboxes = db.open_tree("mailboxes").map_err(backend)?;
        let accounts = db.open_tree("accounts").map_err(backend)?;
        let tokens = db.open_tree("delivery_tokens").map_err(backend)?;
        let keys = db.open_tree("keys").map_err(backend)?;
        let deletions = db.open_tree("deletions").map_err(backend)?;
        let device_lists = db.open_tree("device_lists").map_err(backend)?;
        let device_removals = db.open_tree("device_removals").map_err(backend)?;
        let blobs = db.open_tree("blobs").map_err(backend)?;
        let blob_quota = db.open_tree("blob_quota").map_err(backend)?;
        let discovery = db.open_tree("discovery").map_err(backend)?;
        let key_packages = db.open_tree("key_packages").map_err(backend)?;
        let groups = db.open_tree("groups").map_err(backend)?;
        let push_targets = db.open_tree("push_targets").map_err(backend)?;
        let seqs = Arc::new(Mutex::new(next_epoch(&db, &mailboxes)?));
        let store = SledStore {
            db,
            mailboxes,
            accounts,
            tokens,
            keys,
            deletions,
            device_lists,
            device_removals,
            idle_cursor: Arc::default(),
            blobs,
            blob_quota,
            discovery,
            key_packages,
            groups,
            push_targets,
            seqs,
            totals: Arc::default(),
            bodies: Arc::default(),
        };
        store.migrate_blobs()?;
        store.sum_usage()?;
        store.count_bodies()?;
        Ok(store)
    }

    /// Messages queued across every mailbox; an O(n) scan, for tests and admin tools.
    pub fn count_messages(&self) -> StoreResult<u64> {
        let mut n = 0;
        for kv in self.mailboxes.scan_prefix([MSG]) {
            kv.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    /// Sums the usage keys into the totals (once, at open: O(mailboxes)).
    fn sum_usage(&self) -> StoreResult<()> {
        for kv in self.mailboxes.scan_prefix([USAGE]) {
            let (_, v) = kv.map_err(backend)?;
            self.totals.change(Usage::default(), decode_usage(&v)?);
        }
        Ok(())
    }

    fn current_usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        match self.mailboxes.get(usage_key(of)).map_err(backend)? {
            Some(v) => decode_usage(&v),
            None => Ok(Usage::default()),
        }
    }
}

impl Flush for SledStore {
    fn flush(&self) -> StoreResult<()> {
        self.db.flush().map(|_| ()).map_err(backend)
    }
}

impl KeyStore for SledStore {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        let mut batch = sled::Batch::default();
        if let Some(k) = identity_dh {
            batch.insert(&tagged(b'I', of)[..], &codec::encode_signed(k)[..]);
        }
        if let Some(k) = signed_prekey {
            batch.insert(&tagged(b'S', of)[..], &codec::encode_signed(k)[..]);
        }
        for k in one_time {
            let mut key = tagged(b'O', of).to_vec();
            key.extend_from_slice(&k.id.to_be_bytes());
            batch.insert(key, &k.key[..]);
        }
        self.keys.apply_batch(batch).map_err(backend)?;
        self.one_time_count(of)
    }

    fn fetch(&self, of: &DeviceAddress, take: bool) -> StoreResult<Option<FetchedKeys>> {
        let get = |tag| -> StoreResult<Option<SignedKey>> {
            self.keys
                .get(tagged(tag, of))
                .map_err(backend)?
                .map(|v| codec::decode_signed(&v))
                .transpose()
        };
        let (Some(identity_dh), Some(signed_prekey)) = (get(b'I')?, get(b'S')?) else {
            return Ok(None);
        };
        // Take the first one-time key; `remove` is atomic, so of two concurrent
        // fetchers only one gets it and the other moves on to the next.
        let one_time = loop {
            if !take {
                break None;
            }
            let Some(kv) = self.keys.scan_prefix(tagged(b'O', of)).next() else {
                break None;
            };
            let (k, v) = kv.map_err(backend)?;
            if self.keys.remove(&k).map_err(backend)?.is_some() {
                break Some(OneTimeKey {
                    id: u32::from_be_bytes(fixed(&k[1 + ADDR_LEN..])?),
                    key: fixed(&v)?,
                });
            }
        };
        Ok(Some(FetchedKeys {
            identity_dh,
            signed_prekey,
            one_time,
        }))
    }

    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        let mut n = 0;
        for kv in self.keys.scan_prefix(tagged(b'O', of)) {
            kv.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        let signed = match self.keys.get(tagged(b'S', of)).map_err(backend)? {
            Some(v) => Some(codec::decode_signed(&v)?.id),
            None => None,
        };
        Ok(Published {
            identity_dh: self.keys.contains_key(tagged(b'I', of)).map_err(backend)?,
            signed_prekey_id: signed,
            one_time: self.one_time_count(of)?,
        })
    }

    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        batch.remove(&tagged(b'I', of)[..]);
        batch.remove(&tagged(b'S', of)[..]);
        for kv in self.keys.scan_prefix(tagged(b'O', of)) {
            let (k, _) = kv.map_err(backend)?;
            batch.remove(k);
        }
        self.keys.apply_batch(batch).map_err(backend)
    }

    fn remove_account_keys(&self, account: &tern_proto::AccountId) -> StoreResult<()> {
        // Every key is a tag, then the device address, which starts with the account.
        let mut batch = sled::Batch::default();
        for tag in [b'I', b'S', b'O'] {
            let mut prefix = [0u8; 17];
            prefix[0] = tag;
            prefix[1..].copy_from_slice(account.as_bytes());
            for kv in self.keys.scan_prefix(prefix) {
                let (k, _) = kv.map_err(backend)?;
                batch.remove(k);
            }
        }
        self.keys.apply_batch(batch).map_err(backend)
    }
}

#[cfg(test)]
mod tests;
