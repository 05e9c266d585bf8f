//! Hooks for end-to-end tests and `tern-load`: give numbers to accounts directly in
//! a **stopped** relay's data directory, without phone verification. Not for
//! production data: nothing here checks that anyone holds a number.
//!
//! Both functions open `<data_dir>/db` (sled; its lock refuses them while a relay
//! runs there) and the OPRF key `<data_dir>/discovery-oprf-key` (made if missing,
//! as a relay's first start would), attach the numbers' tags discoverable, flush,
//! and mark the published filter stale, so the next start rebuilds today's files
//! with the new tags instead of serving those written before (see
//! [`super::publish`]). Numbers are E.164 strings exactly as clients send them
//! (`+` and 7 to 15 digits); they are not kept.

use std::path::Path;

use rand::{RngCore, SeedableRng};
use tern_proto::discovery::Tag;
use tern_proto::{AccountId, DeviceId};

use super::{publish, Oprf};
use crate::error::{Error, Result};
use crate::store::{AccountRecord, AccountStore, DiscoveryStore, SledStore, TagRecord};

/// sled's cache while seeding: writes only, so a small one does.
const SEED_CACHE_BYTES: u64 = 64 << 20;
/// Tags written per sled batch.
const CHUNK: usize = 10_000;

/// An account made by [`synthetic_accounts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededAccount {
    /// Its id (random).
    pub account: AccountId,
    /// Its identity key: 32 random bytes (not a key anyone can sign with).
    pub identity_key: [u8; 32],
    /// The number attached to it.
    pub number: String,
}

fn open(data_dir: &Path) -> Result<(SledStore, Oprf)> {
    std::fs::create_dir_all(data_dir)?;
    let store = SledStore::open(&data_dir.join("db"), SEED_CACHE_BYTES)?;
    let oprf = Oprf::load_or_create(data_dir, &mut rand::rngs::OsRng)?;
    Ok((store, oprf))
}

fn valid(number: &str) -> bool {
    let digits = number.strip_prefix('+').unwrap_or("");
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn record(account: AccountId, key: tern_proto::discovery::FilterKey) -> TagRecord {
    TagRecord {
        account,
        key,
        discoverable: true,
        verified_at: 0,
    }
}

/// Tags of `numbers`, computed on every core (about 60 µs each).
fn tags(oprf: &Oprf, numbers: &[&str]) -> Result<Vec<(Tag, tern_proto::discovery::FilterKey)>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = numbers.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = numbers
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|n| oprf.tag_of(n.as_bytes()))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(numbers.len());
        for p in parts {
            let done = p
                .join()
                .map_err(|_| Error::Unavailable("a seeding thread failed"))??;
            out.extend(done);
        }
        Ok(out)
    })
}

/// Gives each account of `pairs` the tag of its number, discoverable, as a verified
/// number would (a number held by another account moves, as in
/// [`DiscoveryStore::attach`]). Every account must exist (registered before the
/// relay stopped): an unknown one, or a number that is not E.164, is
/// `BAD_REQUEST` before anything is written. Returns how many were attached.
pub fn attach_numbers(data_dir: &Path, pairs: &[(AccountId, &str)]) -> Result<usize> {
    let (store, oprf) = open(data_dir)?;
    for (i, (account, number)) in pairs.iter().enumerate() {
        if !valid(number) {
            return Err(Error::BadRequest(format!("number {i} is not E.164")));
        }
        if store.get(account)?.is_none() {
            return Err(Error::BadRequest(format!("account {i} does not exist")));
        }
    }
    let numbers: Vec<&str> = pairs.iter().map(|(_, n)| *n).collect();
    for ((account, _), (tag, key)) in pairs.iter().zip(tags(&oprf, &numbers)?) {
        store.attach(account, &tag, &record(*account, key))?;
    }
    crate::store::Flush::flush(&store)?;
    publish::mark_stale(&data_dir.join("discovery"))?;
    Ok(pairs.len())
}

/// Creates one account per number, fast (for `tern-load discovery`): a random id
/// (from `seed`), random identity and primary-device keys, and the number's tag,
/// discoverable. The numbers must be distinct, E.164, and held by no account yet
/// (a number already held is refused before anything is written; duplicates within
/// `numbers` are not checked).
/// Fast because nothing is flushed until the end and the tags (one OPRF each) are
/// computed on every core; not measured at 1M yet.
pub fn synthetic_accounts(
    data_dir: &Path,
    numbers: &[&str],
    seed: u64,
) -> Result<Vec<SeededAccount>> {
    if let Some(i) = numbers.iter().position(|n| !valid(n)) {
        return Err(Error::BadRequest(format!("number {i} is not E.164")));
    }
    let (store, oprf) = open(data_dir)?;
    let tags = tags(&oprf, numbers)?;
    // A number held already would get a second record (and its old account's
    // entry would point at the new one's): refused before anything is written.
    for (i, (tag, _)) in tags.iter().enumerate() {
        if store.by_tag(tag)?.is_some() {
            return Err(Error::BadRequest(format!("number {i} is held already")));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut made = Vec::with_capacity(numbers.len());
    for number in numbers {
        let mut identity_key = [0u8; 32];
        rng.fill_bytes(&mut identity_key);
        let mut device_key = [0u8; 32];
        rng.fill_bytes(&mut device_key);
        let rec = AccountRecord {
            identity_key,
            devices: vec![(DeviceId::PRIMARY, device_key)],
        };
        let account = loop {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let id = AccountId(id);
            match store.create(&id, &rec) {
                Ok(()) => break id,
                Err(crate::store::StoreError::Exists) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        made.push(SeededAccount {
            account,
            identity_key,
            number: (*number).to_owned(),
        });
    }
    let items: Vec<(AccountId, Tag, TagRecord)> = made
        .iter()
        .zip(tags)
        .map(|(m, (tag, key))| (m.account, tag, record(m.account, key)))
        .collect();
    for chunk in items.chunks(CHUNK) {
        store.attach_fresh(chunk)?;
    }
    crate::store::Flush::flush(&store)?;
    publish::mark_stale(&data_dir.join("discovery"))?;
    Ok(made)
}
