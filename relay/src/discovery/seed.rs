//! Offline seeding of discoverable accounts into a stopped relay's data directory:
//! a hook for end-to-end tests and the load generator (`tern-load discovery`) until
//! phone verification attaches numbers over the wire. It writes what a verification
//! would (a tag under the relay's OPRF key, discoverable), and never the number.
//! Like the admin commands, it refuses while a relay runs on the directory.

use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use tern_platform::clock::{Clock, SystemClock};
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::{AccountId, DeviceId};

use super::Oprf;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{Stores, TagRecord, DAY_MS};

fn open(config: &Config) -> Result<(Stores, u64)> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let stores = crate::server::open_stores(config, clock.as_ref())?;
    let now = clock.now();
    Ok((stores, now - now % DAY_MS))
}

fn close(stores: &Stores) -> Result<()> {
    stores.mailboxes.settle()?;
    Ok(stores.flush.flush()?)
}

/// Gives each existing account the tag of its number (E.164 bytes), discoverable,
/// as a verification would. Returns how many were attached.
pub fn attach_numbers(config: &Config, pairs: &[(AccountId, String)]) -> Result<usize> {
    let (stores, day) = open(config)?;
    let oprf = Oprf::load_or_create(&config.data_dir, &mut rand::rngs::OsRng)?;
    for (account, number) in pairs {
        if stores.accounts.get(account)?.is_none() {
            return Err(Error::BadRequest("no such account to seed".into()));
        }
        let (tag, key) = oprf.tag_of(number.as_bytes())?;
        let rec = TagRecord {
            account: *account,
            key,
            discoverable: true,
            verified_at: day,
        };
        stores.discovery.attach(account, &tag, &rec)?;
    }
    close(&stores)?;
    Ok(pairs.len())
}

/// Creates `count` accounts (random keys, one device) each with a random tag and
/// filter key, discoverable: users no address book will hold, which fill the
/// filter and the tag store as `count` verified users would. Deterministic in
/// `seed`. Returns the accounts.
pub fn filler_accounts(config: &Config, count: usize, seed: u64) -> Result<Vec<AccountId>> {
    let (stores, day) = open(config)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut b = [0u8; 16 + 32 + 32 + 16 + 8];
        rng.fill_bytes(&mut b);
        let account =
            AccountId::try_from(&b[..16]).map_err(|_| Error::Config("account id".into()))?;
        let mut identity_key = [0u8; 32];
        identity_key.copy_from_slice(&b[16..48]);
        let mut device_key = [0u8; 32];
        device_key.copy_from_slice(&b[48..80]);
        stores.accounts.create(
            &account,
            &crate::store::AccountRecord {
                identity_key,
                devices: vec![(DeviceId::PRIMARY, device_key)],
            },
        )?;
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&b[80..96]);
        let mut key = [0u8; 8];
        key.copy_from_slice(&b[96..]);
        let rec = TagRecord {
            account,
            key: FilterKey(u64::from_le_bytes(key)),
            discoverable: true,
            verified_at: day,
        };
        stores.discovery.attach(&account, &Tag(tag), &rec)?;
        out.push(account);
    }
    close(&stores)?;
    Ok(out)
}
