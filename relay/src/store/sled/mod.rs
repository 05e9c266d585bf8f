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
//! MLS key packages (`key_packages`, `sled/keys.rs`) and group epochs (`groups`,
//! `sled/groups.rs`) have trees of their own.
//!
//! The blob index (`blobs`): records naming no account in one tree, what is tied to
//! an account (uploads in progress, quota charges) in another.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};

use super::codec::{addr_bytes, fixed, parse_addr, ADDR_LEN};
use super::seq::SeqCounters;
use super::{
    codec, Envelope, Expired, FetchedKeys, Flush, KeyStore, MailboxStore, OneTimeKey, Published,
    SignedKey, StoreError, StoreResult, StoredMessage, Totals, Usage, PURGE_PAGE,
};

mod accounts;
mod blobs;
mod discovery;
mod dump;
mod groups;
mod keys;

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
    /// This open's seq epoch and each mailbox's count in it.
    seqs: Arc<Mutex<SeqCounters>>,
    /// What every mailbox holds, summed from the usage keys at open.
    totals: Arc<SledTotals>,
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

fn decode_message(key: &[u8], v: &[u8]) -> StoreResult<StoredMessage> {
    if key.len() != MSG_KEY_LEN || v.len() < MSG_HEADER_LEN {
        return Err(StoreError::Corrupt("message"));
    }
    Ok(StoredMessage {
        seq: u64::from_be_bytes(fixed(&key[1 + ADDR_LEN..])?),
        message_id: MessageId(fixed(&v[..16])?),
        accepted_at: u64::from_be_bytes(fixed(&v[16..24])?),
        expires_at: u64::from_be_bytes(fixed(&v[24..32])?),
        payload: Bytes::copy_from_slice(&v[MSG_HEADER_LEN..]),
    })
}

/// (expires_at, payload length) of a stored message value.
fn message_meta(v: &[u8]) -> StoreResult<(UnixMillis, u64)> {
    if v.len() < MSG_HEADER_LEN {
        return Err(StoreError::Corrupt("message"));
    }
    Ok((
        u64::from_be_bytes(fixed(&v[24..32])?),
        (v.len() - MSG_HEADER_LEN) as u64,
    ))
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
            seqs,
            totals: Arc::default(),
        };
        store.migrate_blobs()?;
        store.sum_usage()?;
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

    /// Deletes the messages at `seqs` and their expiry entries in one batch, plus the
    /// extra expiry entries given, adjusting usage.
    fn delete(
        &self,
        of: &DeviceAddress,
        seqs: impl Iterator<Item = u64>,
        extra_expiry: &[Expired],
    ) -> StoreResult<Usage> {
        let mut batch = sled::Batch::default();
        let mut removed = Usage::default();
        // Reads below do not see the pending batch: a repeated seq must count once.
        let seqs: std::collections::BTreeSet<u64> = seqs.collect();
        for seq in seqs {
            let key = msg_key(of, seq);
            if let Some(v) = self.mailboxes.get(key).map_err(backend)? {
                let (expires_at, len) = message_meta(&v)?;
                batch.remove(&key[..]);
                batch.remove(&expiry_key(expires_at, of, seq)[..]);
                removed.messages += 1;
                removed.bytes += len;
            }
        }
        for e in extra_expiry {
            batch.remove(&expiry_key(e.expires_at, &e.to, e.seq)[..]);
        }
        let mut change = None;
        if removed.messages > 0 {
            let before = self.current_usage(of)?;
            let mut usage = before;
            usage.messages = usage.messages.saturating_sub(removed.messages);
            usage.bytes = usage.bytes.saturating_sub(removed.bytes);
            if usage.messages == 0 {
                batch.remove(&usage_key(of)[..]);
            } else {
                batch.insert(&usage_key(of)[..], &encode_usage(usage)[..]);
            }
            change = Some((before, usage));
        }
        self.mailboxes.apply_batch(batch).map_err(backend)?;
        if let Some((before, after)) = change {
            self.totals.change(before, after);
        }
        Ok(removed)
    }
}

impl MailboxStore for SledStore {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        let before = self.current_usage(to)?;
        let mut usage = before;
        let mut batch = sled::Batch::default();
        let seqs = self
            .seqs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(to, msgs.len())?;
        for (m, &seq) in msgs.iter().zip(&seqs) {
            let mut value = Vec::with_capacity(MSG_HEADER_LEN + m.payload.len());
            value.extend_from_slice(m.message_id.as_bytes());
            value.extend_from_slice(&accepted_at.to_be_bytes());
            value.extend_from_slice(&expires_at.to_be_bytes());
            value.extend_from_slice(&m.payload);
            batch.insert(&msg_key(to, seq)[..], value);
            batch.insert(&expiry_key(expires_at, to, seq)[..], &[][..]);
            usage.messages += 1;
            usage.bytes += m.payload.len() as u64;
        }
        batch.insert(&usage_key(to)[..], &encode_usage(usage)[..]);
        self.mailboxes.apply_batch(batch).map_err(backend)?;
        self.totals.change(before, usage);
        Ok(seqs)
    }

    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(max.min(256));
        for kv in self
            .mailboxes
            .range(msg_key(of, start)..=msg_key(of, u64::MAX))
            .take(max)
        {
            let (k, v) = kv.map_err(backend)?;
            out.push(decode_message(&k, &v)?);
        }
        Ok(out)
    }

    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // The seq is the key's tail; values (with payloads) are dropped unread.
        let mut out = Vec::with_capacity(max.min(PURGE_PAGE));
        for kv in self
            .mailboxes
            .range(msg_key(of, start)..=msg_key(of, u64::MAX))
            .take(max)
        {
            let (k, _) = kv.map_err(backend)?;
            let tail = k
                .get(1 + ADDR_LEN..)
                .ok_or(StoreError::Corrupt("message key"))?;
            out.push(u64::from_be_bytes(fixed(tail)?));
        }
        Ok(out)
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        self.delete(of, seqs.iter().copied(), &[])
    }

    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.current_usage(of)
    }

    fn totals(&self) -> Totals {
        self.totals.read()
    }

    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        let mut end = [0u8; 9];
        end[0] = EXPIRY;
        end[1..].copy_from_slice(&now.to_be_bytes());
        let mut out = Vec::new();
        // Everything up to and including `now`: the bound is the first key past it.
        let upper = {
            let mut u = [0xffu8; EXPIRY_KEY_LEN];
            u[..9].copy_from_slice(&end);
            u
        };
        for kv in self.mailboxes.range(&[EXPIRY][..]..=&upper[..]).take(max) {
            let (k, _) = kv.map_err(backend)?;
            if k.len() != EXPIRY_KEY_LEN {
                return Err(StoreError::Corrupt("expiry entry"));
            }
            out.push(Expired {
                expires_at: u64::from_be_bytes(fixed(&k[1..9])?),
                to: parse_addr(&k[9..9 + ADDR_LEN])?,
                seq: u64::from_be_bytes(fixed(&k[9 + ADDR_LEN..])?),
            });
        }
        Ok(out)
    }

    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        let mine: Vec<Expired> = entries.iter().filter(|e| e.to == *of).copied().collect();
        // The extra entries cover an expiry entry whose message is already gone.
        self.delete(of, mine.iter().map(|e| e.seq), &mine)
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
