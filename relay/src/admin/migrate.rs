//! `tern-relay admin migrate`: copies a stopped embedded relay's whole state (sled and
//! the mailbox log) into an empty PostgreSQL database, then verifies the copy.
//!
//! Messages keep their seqs, ids and times, and are copied [`BATCH`] at a time (memory
//! stays bounded whatever a mailbox holds). Every mailbox head (also of devices with
//! no message) is raised to the embedded store's seq floor, so seqs handed out on
//! PostgreSQL continue above every seq a client ever saw. A shared body (a
//! multi-recipient message) is stored once in the target, its `refs` the entries
//! copied. Key packages keep their order and last-resort mark; group handles keep
//! their epoch, token hash, last commit id and day. A database that already
//! holds an account, a mailbox or a message is refused: a second run cannot double
//! anything, and a failed run is started over on a fresh database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_platform::clock::{Clock, SystemClock};
use tern_proto::{DeviceAddress, MessageId};

use crate::config::{Config, MailboxBackend};
use crate::error::{Error, Result};
use crate::store::pg::PgBackend;
use crate::store::{
    AccountStore, BlobIndex, KeyStore, LogOptions, LogStore, MailboxStore, SledStore, StoredMessage,
};

/// Messages read and inserted at a time.
pub const BATCH: usize = 10_000;
/// Accounts, blobs and other records inserted at a time.
const ROWS: usize = 5_000;

/// What a migration copied and how long it took.
#[derive(Debug, Clone, Default)]
pub struct Migrated {
    /// Items copied per kind, in the order copied.
    pub copied: Vec<(&'static str, u64)>,
    /// Mailboxes whose count and digest matched on both sides.
    pub mailboxes_verified: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Peak resident memory (VmHWM), KiB, where the kernel reports it.
    pub peak_rss_kib: Option<u64>,
}

impl std::fmt::Display for Migrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (kind, n) in &self.copied {
            writeln!(f, "  {kind:<26} {n}")?;
        }
        writeln!(
            f,
            "  mailboxes verified         {}",
            self.mailboxes_verified
        )?;
        write!(f, "  time {:.1} s", self.elapsed.as_secs_f64())?;
        match self.peak_rss_kib {
            Some(k) => write!(f, ", peak RSS {:.1} MiB", k as f64 / 1024.0),
            None => Ok(()),
        }
    }
}

/// Peak resident set size of this process (VmHWM in /proc/self/status), KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mismatch(what: impl std::fmt::Display) -> Error {
    Error::Store(crate::store::StoreError::Backend(format!(
        "verification failed: {what}"
    )))
}

/// The database at `url`, with `[postgres]`'s password file and TLS roots, and
/// deadlines long enough for a batch.
fn target(config: &Config, url: &str) -> Result<PgBackend> {
    let mut opts = crate::server::pg_options(config, url.to_owned())?;
    // One copy at a time, with statements as long as a large batch needs.
    opts.pool_size = 2;
    opts.connect_timeout = opts.connect_timeout.max(Duration::from_secs(5));
    opts.statement_timeout = Duration::from_secs(300);
    opts.node_id = "admin-migrate".into();
    // The copy is durable whatever the relay's own durability.
    opts.durability = crate::store::Durability::Fsync;
    crate::server::open_pg(&opts)
}

/// SHA-256 over a mailbox's (seq, message id, payload length, payload) stream, and its
/// count, read [`BATCH`] at a time; each page is also handed to `on_page` (the copy).
/// The source and the copy are hashed by this one function, so they can only agree
/// when their messages do.
fn digest_with(
    store: &dyn MailboxStore,
    of: &DeviceAddress,
    mut on_page: impl FnMut(&[crate::store::StoredMessage]) -> Result<()>,
) -> Result<(u64, [u8; 32])> {
    let (mut h, mut n, mut after) = (Sha256::new(), 0u64, 0u64);
    // Each page moves `after` past what it read: bounded by the mailbox's size.
    loop {
        let page = store.read(of, after, BATCH)?;
        let Some(last) = page.last() else {
            return Ok((n, h.finalize().into()));
        };
        after = last.seq;
        for m in &page {
            h.update(m.seq.to_be_bytes());
            h.update(m.message_id.0);
            h.update((m.payload.len() as u64).to_be_bytes());
            h.update(&m.payload);
            // A shared body counts too (absent for a message of its own, so such
            // a mailbox hashes as before).
            if let Some(body) = &m.shared_body {
                h.update((body.len() as u64).to_be_bytes());
                h.update(body);
            }
        }
        n += page.len() as u64;
        on_page(&page)?;
    }
}

/// The shared bodies copied so far: each stored once in the target, under an id of
/// its own. Entries of one body have its message id, expiry and bytes; two bodies
/// alike in all three are stored as one (nobody could tell them apart).
#[derive(Default)]
struct SharedBodies {
    ids: HashMap<(MessageId, u64, [u8; 32]), [u8; 16]>,
}

impl SharedBodies {
    /// The target's id for `m`'s body (copied on first sight), or `None` for a
    /// message of its own.
    fn id_of(&mut self, pg: &PgBackend, m: &StoredMessage) -> Result<Option<[u8; 16]>> {
        let Some(body) = &m.shared_body else {
            return Ok(None);
        };
        let key = (m.message_id, m.expires_at, Sha256::digest(body).into());
        if let Some(id) = self.ids.get(&key) {
            return Ok(Some(*id));
        }
        let id: [u8; 16] = rand::random();
        pg.import_body(&id, body, m.expires_at)?;
        self.ids.insert(key, id);
        Ok(Some(id))
    }
}

fn digest(store: &dyn MailboxStore, of: &DeviceAddress) -> Result<(u64, [u8; 32])> {
    digest_with(store, of, |_| Ok(()))
}

/// Copies the embedded stores of `config.data_dir` into the empty database at `to`
/// and verifies the copy; with `objects`, also every blob's bytes into the object
/// store of `[objects]`. Refused while a relay runs on the data directory.
pub fn migrate(config: &Config, to: &str, objects: bool) -> Result<Migrated> {
    let started = Instant::now();
    let s3 = match (objects, config.objects.settings()?) {
        (false, _) => None,
        (true, Some(s3)) => Some(s3),
        (true, None) => {
            return Err(Error::Config(
                "--objects needs [objects] url (and its keys) in the configuration".into(),
            ))
        }
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Config(format!("{}: {e}", config.data_dir.display())))?;
    let _lock = super::lock::DirLock::take(&config.data_dir)?;
    let sled = SledStore::open(&config.data_dir.join("db"), config.storage.cache_mb << 20)?;
    let log = match config.storage.mailboxes {
        MailboxBackend::Log => Some(LogStore::open(
            &config.data_dir.join("mailboxes"),
            LogOptions {
                segment_bytes: config.storage.segment_mb << 20,
                now: SystemClock.now(),
                ..LogOptions::default()
            },
        )?),
        MailboxBackend::Sled => None,
    };
    let pg = target(config, to)?;
    if !pg.import_target_empty()? {
        return Err(Error::Config(
            "the target database already holds accounts or messages: migrate into an empty database".into(),
        ));
    }
    let mut copied: Vec<(&'static str, u64)> = Vec::new();
    let mut heads: Vec<DeviceAddress> = Vec::new();

    // Accounts with their devices and days.
    let ids = sled.dump_account_ids()?;
    let mut devices = 0u64;
    for chunk in ids.chunks(ROWS) {
        let mut rows = Vec::with_capacity(chunk.len());
        for id in chunk {
            let (Some(rec), Some(days)) = (sled.get(id)?, sled.days(id)?) else {
                continue;
            };
            devices += rec.devices.len() as u64;
            heads.extend(rec.devices.iter().map(|(d, _)| DeviceAddress {
                account: *id,
                device: *d,
            }));
            rows.push((*id, rec, days));
        }
        pg.import_accounts(&rows)?;
    }
    copied.push(("accounts", ids.len() as u64));
    copied.push(("devices", devices));
    let tokens = sled.dump_token_ids()?;
    for id in &tokens {
        if let Some(hash) = sled.delivery_token(id)? {
            pg.set_delivery_token(id, &hash)?;
        }
    }
    copied.push(("delivery tokens", tokens.len() as u64));
    let deletions = sled.deletions()?;
    for (id, devs) in &deletions {
        pg.put_deletion(id, devs)?;
    }
    copied.push(("deletion intents", deletions.len() as u64));
    // Linked devices: each account's highest device id ever (so no id is handed out
    // twice), its signed device list, and device removals in progress.
    let mut marks = Vec::with_capacity(ROWS);
    let mut lists = 0u64;
    for id in &ids {
        if let Some(last) = sled.last_device(id)? {
            marks.push((*id, last));
        }
        if marks.len() == ROWS {
            pg.import_last_devices(&marks)?;
            marks.clear();
        }
        if let Some(list) = sled.device_list(id)? {
            if !pg.put_device_list(id, &list)? {
                return Err(mismatch("a device list was not taken"));
            }
            lists += 1;
        }
    }
    pg.import_last_devices(&marks)?;
    copied.push(("device lists", lists));
    let removals = sled.device_removals()?;
    for of in &removals {
        pg.put_device_removal(of)?;
    }
    if pg.device_removals()?.len() != removals.len() {
        return Err(mismatch("device removal intents"));
    }
    copied.push(("device removal intents", removals.len() as u64));

    // Published keys.
    let (mut signed, mut one_time) = (0u64, 0u64);
    let key_devices = sled.dump_key_devices()?;
    for of in &key_devices {
        let k = sled.dump_keys(of)?;
        signed += u64::from(k.identity_dh.is_some()) + u64::from(k.signed_prekey.is_some());
        one_time += k.one_time.len() as u64;
        pg.publish(
            of,
            k.identity_dh.as_ref(),
            k.signed_prekey.as_ref(),
            &k.one_time,
        )?;
    }
    copied.push(("devices with keys", key_devices.len() as u64));
    copied.push(("signed keys", signed));
    copied.push(("one-time keys", one_time));

    // Discovery: tags, accounts' tags and buckets, number buckets.
    let d = sled.dump_discovery()?;
    for c in d.tags.chunks(ROWS) {
        pg.import_discovery(c, &[], &[])?;
    }
    for c in d.accounts.chunks(ROWS) {
        pg.import_discovery(&[], c, &[])?;
    }
    for c in d.numbers.chunks(ROWS) {
        pg.import_discovery(&[], &[], c)?;
    }
    copied.push(("discovery tags", d.tags.len() as u64));
    copied.push(("account buckets", d.accounts.len() as u64));
    copied.push(("number buckets", d.numbers.len() as u64));
    drop(d);
    // The published filter: the nodes serve what clients hold, deltas continue.
    let files = crate::discovery::publish::whole_files(&config.data_dir.join("discovery"))?;
    copied.push(("discovery filter files", pg.import_published(&files)?));

    // The blob index.
    let blobs = sled.dump_blobs()?;
    for c in blobs.chunks(ROWS) {
        pg.import_blobs(c)?;
    }
    copied.push(("blobs", blobs.len() as u64));
    let charges = sled.dump_charges()?;
    for c in charges.chunks(ROWS) {
        pg.import_charges(c)?;
    }
    copied.push(("blob charges", charges.len() as u64));
    let uploads = sled.dump_uploads()?;
    for (account, id, meta) in &uploads {
        pg.put_upload(account, id, meta)?;
    }
    copied.push(("uploads in progress", uploads.len() as u64));
    if let Some(s3) = &s3 {
        let (moved, present) = super::objects::copy(&config.data_dir, s3, &blobs)?;
        copied.push(("blob objects copied", moved));
        copied.push(("blob objects already there", present));
    }

    // Mailboxes, a batch at a time, each hashed as it is read.
    let (source, mailboxes, floor): (&dyn MailboxStore, _, _) = match &log {
        Some(log) => (log, log.dump_mailboxes(), log.seq_floor()),
        None => (&sled, sled.dump_mailboxes()?, sled.seq_floor()),
    };
    let mut messages = 0u64;
    let mut digests = Vec::with_capacity(mailboxes.len());
    let mut bodies = SharedBodies::default();
    for of in &mailboxes {
        let (n, hash) = digest_with(source, of, |page| {
            let ids = page
                .iter()
                .map(|m| bodies.id_of(&pg, m))
                .collect::<Result<Vec<_>>>()?;
            Ok(pg.import_messages(of, page, &ids)?)
        })?;
        messages += n;
        digests.push((n, hash));
    }
    heads.extend(mailboxes.iter().copied());
    heads.sort_by_key(crate::store::codec::addr_bytes);
    heads.dedup();
    for c in heads.chunks(ROWS) {
        pg.import_seq_floor(c, floor)?;
    }
    copied.push(("mailboxes", mailboxes.len() as u64));
    copied.push(("messages", messages));
    let shared = bodies.ids.len() as u64;
    copied.push(("shared bodies", shared));
    drop(bodies.ids);

    // MLS key packages (per device: the pool in order, the last-resort one) and
    // group epochs.
    let packages = sled.dump_key_packages()?;
    let (mut pool, mut last_resort) = (0u64, 0u64);
    for chunk in packages.chunks(ROWS) {
        pool += chunk.iter().map(|d| d.one_time.len() as u64).sum::<u64>();
        last_resort += chunk.iter().filter(|d| d.last_resort.is_some()).count() as u64;
        pg.import_key_packages(chunk)?;
    }
    copied.push(("devices with key packages", packages.len() as u64));
    copied.push(("key packages", pool));
    copied.push(("last-resort key packages", last_resort));
    drop(packages);
    let mut groups = 0u64;
    let mut after = None;
    // Each page moves `after` past what it read: bounded by the handles held.
    loop {
        let page = crate::store::GroupStore::groups_after(&sled, after.as_ref(), ROWS)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(*last);
        groups += page.len() as u64;
        pg.import_groups(&page)?;
    }
    copied.push(("group handles", groups));

    // Verification: row counts, then every mailbox's count and digest.
    let expected = [
        ("accounts", ids.len() as u64),
        ("devices", devices),
        ("delivery_tokens", tokens.len() as u64),
        ("account_deletions", deletions.len() as u64),
        ("one_time_keys", one_time),
        ("blobs", blobs.len() as u64),
        ("blob_charges", charges.len() as u64),
        ("uploads", uploads.len() as u64),
        ("mailbox_heads", heads.len() as u64),
        ("messages", messages),
        ("shared_bodies", shared),
        ("key_packages", pool),
        ("last_resort_key_packages", last_resort),
        ("group_epochs", groups),
    ];
    let counts = pg.import_counts()?;
    for (table, want) in expected {
        let got = counts.iter().find(|(t, _)| *t == table).map(|(_, n)| *n);
        if got != Some(want) {
            return Err(mismatch(format!(
                "{table}: {want} copied, {got:?} in the database"
            )));
        }
    }
    let mut verified = 0;
    for (of, want) in mailboxes.iter().zip(&digests) {
        if digest(&pg, of)? != *want {
            return Err(mismatch("a mailbox's messages differ"));
        }
        verified += 1;
    }
    drop(log);
    Ok(Migrated {
        copied,
        mailboxes_verified: verified,
        elapsed: started.elapsed(),
        peak_rss_kib: peak_rss_kib(),
    })
}

#[cfg(test)]
mod tests;
