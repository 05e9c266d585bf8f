//! Operator commands. Offline, on a stopped relay's data directory (the credential
//! is file-system access to it): they open the stores as a relay does, under the
//! directory's lock ([`lock`]), so they refuse while a relay or another admin
//! command holds the directory. Online, through a running relay's
//! admin listener (`server`), with the token it wrote to `admin.token`
//! ([`token`]); [`client`] is the command line's side, which picks the way.

pub mod client;
pub mod lock;
pub mod migrate;
mod objects;
mod reload;
pub mod rotate;
pub(crate) mod server;
pub mod token;

use std::sync::Arc;

use tern_platform::clock::{Clock, SystemClock};
use tern_proto::AccountId;

use crate::config::Config;
use crate::core::budget::Budget;
use crate::deletion::{AccountDeletion, Deleted, DeletionAuthority, Operator};
use crate::error::{Error, Result};
use crate::export::{ExportOptions, Exported};
use crate::media::BlobStore;
use crate::server::Services;

/// Re-reads the configuration for `tern-relay admin reload`: the file, with the
/// command line's flags applied again ([`crate::Relay::set_config_source`]).
pub type ConfigSource = Box<dyn Fn() -> Result<Config> + Send + Sync>;

/// An account id from its 32 hex digits.
pub fn parse_account(hex: &str) -> Result<AccountId> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::BadRequest(
            "an account id is 32 hexadecimal digits".into(),
        ));
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| Error::BadRequest("not hexadecimal".into()))?;
    }
    Ok(AccountId(id))
}

/// A device as `list-devices` shows it: no key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRow {
    /// The device id within its account (1: the primary).
    pub id: u32,
    /// Whether it is the account's primary device.
    pub primary: bool,
    /// The UTC day (days since 1970) it was registered or added, if known.
    pub created_day: Option<u32>,
    /// The last UTC day it authenticated, if known.
    pub last_seen_day: Option<u32>,
}

/// The devices of `account` as the stores hold them; a deleted (or being deleted)
/// account is unknown.
pub(crate) fn devices(services: &Services, account: &AccountId) -> Result<Vec<DeviceRow>> {
    let stores = services.stores();
    if being_deleted(services, account)? {
        return Err(Error::UnknownRecipient);
    }
    let record = stores
        .accounts
        .get(account)?
        .ok_or(Error::UnknownRecipient)?;
    let days = stores
        .accounts
        .days(account)?
        .unwrap_or_else(|| crate::store::AccountDays::unknown(&record));
    Ok(record
        .devices
        .iter()
        .map(|(id, _key)| {
            let d = days.of(*id);
            DeviceRow {
                id: id.get(),
                primary: *id == tern_proto::DeviceId::PRIMARY,
                created_day: d.created,
                last_seen_day: d.last_seen,
            }
        })
        .collect())
}

/// Whether `account` is deleted or being deleted: tombstoned here, or with a
/// deletion recorded in the stores (by another node sharing them, before this
/// node's sweeper tombstones it; or one that failed and waits for its retry).
pub(crate) fn being_deleted(services: &Services, account: &AccountId) -> Result<bool> {
    Ok(services.tombstones().contains(account)
        || services
            .stores()
            .accounts
            .deletions()?
            .iter()
            .any(|(a, _)| a == account))
}

/// `tern-relay admin backup` on a stopped relay's data directory (the stores opened
/// as a relay opens them, under its lock): see [`crate::store::backup::backup_new`],
/// keeping `[budget] min_free_disk_bytes` free on the destination.
/// Refused before anything is opened for a relay on PostgreSQL, and for a data
/// directory in another format than this binary's (opening it would migrate it in
/// place, or fail).
pub fn backup(
    config: &Config,
    dest: &std::path::Path,
    cancel: &std::sync::atomic::AtomicBool,
) -> std::result::Result<crate::store::backup::BackedUp, Box<dyn std::error::Error + Send + Sync>> {
    use crate::store::version;
    if config.storage.backend == crate::config::StorageBackend::Postgres {
        return Err(
            "backup refused: this relay keeps its state in PostgreSQL: back up the database with its own tools"
                .into(),
        );
    }
    config.validate()?;
    let _lock = lock::DirLock::take(&config.data_dir)?;
    match version::read(&config.data_dir)? {
        Some(v) if v == version::CURRENT => {}
        None => {
            return Err(format!(
                "backup refused: {} holds no relay data",
                config.data_dir.display()
            )
            .into())
        }
        Some(v) => {
            return Err(format!(
                "backup refused: {} is in data format {v} and this tern-relay reads format {}: \
                 back it up with the tern-relay that wrote it, or start this one on it first \
                 (which migrates it), then back it up",
                config.data_dir.display(),
                version::CURRENT
            )
            .into())
        }
    }
    let stores = crate::server::open_stores_locked(config, &SystemClock)?;
    let reserve = config.budget.min_free_disk_bytes;
    Ok(crate::store::backup::backup_new(
        &stores, dest, cancel, reserve,
    )?)
}

/// `tern-relay admin list-devices` on a stopped relay's data directory.
pub async fn list_devices(config: &Config, account: AccountId) -> Result<Vec<DeviceRow>> {
    let offline = open(config).await?;
    let listed = devices(&offline.services, &account);
    offline.services.mailboxes().close()?;
    listed
}

/// The services and deletion of a stopped relay's data directory.
struct Offline {
    services: Arc<Services>,
    deletion: AccountDeletion,
    /// The data directory's lock (dropped after the stores).
    _lock: lock::DirLock,
}

async fn open(config: &Config) -> Result<Offline> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (lock, stores) = crate::server::open_stores(config, clock.as_ref())?;
    let ttl = config
        .message_ttl()
        .ok_or_else(|| Error::Config("invalid message_ttl".into()))?;
    let budget = Arc::new(Budget::new(config.budget.limits()));
    let blobs = Arc::new(BlobStore::open(
        &config.data_dir,
        stores.blobs.clone(),
        clock.clone(),
        crate::server::blob_limits(&config.media),
        budget.clone(),
    )?);
    // No certificate is issued offline: a throwaway key stands in for the relay's.
    let signer = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let services = Arc::new(Services::with_budget(
        stores,
        clock,
        config.mailbox_limits(),
        ttl,
        config.durability,
        signer,
        &config.rate_limits,
        budget,
    )?);
    let deletion = AccountDeletion::new(services.clone(), blobs);
    Ok(Offline {
        services,
        deletion,
        _lock: lock,
    })
}

/// `tern-relay admin delete-account`: finishes interrupted deletions, deletes the
/// account, scrubs the mailbox log and flushes every store.
pub async fn delete_account(config: &Config, account: AccountId) -> Result<Deleted> {
    let offline = open(config).await?;
    offline.deletion.resume().await?;
    let deleted = offline
        .deletion
        .delete(DeletionAuthority::Operator(Operator::offline(), account))
        .await?;
    offline.services.mailboxes().close()?;
    Ok(deleted)
}

/// `tern-relay admin export-account`: finishes interrupted deletions (an account
/// being deleted has no export, also when finishing its deletion fails), then writes the account's export to `out`.
pub async fn export_account(
    config: &Config,
    account: AccountId,
    options: ExportOptions,
    out: &mut dyn std::io::Write,
) -> Result<Exported> {
    let offline = open(config).await?;
    offline.deletion.resume().await?;
    let stores = offline.services.stores();
    // A deletion that failed again is not finished: what is left is no export.
    if being_deleted(&offline.services, &account)? {
        offline.services.mailboxes().close()?;
        return Err(crate::Error::UnknownRecipient);
    }
    let now = SystemClock.now();
    let exported = crate::export::write(stores, &account, now, options, out);
    offline.services.mailboxes().close()?;
    exported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_32_hex_digits() {
        assert_eq!(
            parse_account("000102030405060708090a0B0c0d0e0f").expect("id"),
            AccountId([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
        );
        for bad in [
            "",
            "00",
            &"0".repeat(33),
            &"g".repeat(32),
            "é".repeat(16).as_str(),
        ] {
            assert!(parse_account(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_offline_commands_refuse_while_the_data_directory_is_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let held = open(&config).await.expect("first open");
        let second = delete_account(&config, AccountId([1; 16])).await;
        match second {
            Err(e) => assert!(e.to_string().contains("in use by a running relay"), "{e}"),
            Ok(d) => panic!("opened twice: {d:?}"),
        }
        drop(held);
        let unknown = delete_account(&config, AccountId([1; 16])).await;
        assert!(
            matches!(unknown, Err(Error::UnknownRecipient)),
            "{unknown:?}"
        );
    }

    #[tokio::test]
    async fn a_deletion_recorded_in_the_stores_hides_the_account_without_a_tombstone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let offline = open(&config).await.expect("open");
        let services = &offline.services;
        let device = services
            .accounts()
            .register(crate::testing::registration(5))
            .await
            .expect("register");
        let account = device.address().account;
        assert!(!being_deleted(services, &account).expect("check"));
        assert_eq!(devices(services, &account).expect("devices").len(), 1);
        // As another node records it (this one's tombstones do not know it yet).
        services
            .stores()
            .accounts
            .put_deletion(&account, &[tern_proto::DeviceId::PRIMARY])
            .expect("record");
        assert!(!services.tombstones().contains(&account));
        assert!(being_deleted(services, &account).expect("check"));
        assert!(matches!(
            devices(services, &account),
            Err(Error::UnknownRecipient)
        ));
        services.mailboxes().close().expect("close");
    }

    #[tokio::test]
    async fn an_offline_export_then_deletion_of_an_account() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let offline = open(&config).await.expect("open");
        let device = offline
            .services
            .accounts()
            .register(crate::testing::registration(4))
            .await
            .expect("register");
        offline.services.mailboxes().close().expect("close");
        drop(offline);
        let account = device.address().account;
        let mut out = Vec::new();
        let options = ExportOptions::default();
        let exported = export_account(&config, account, options, &mut out)
            .await
            .expect("export");
        assert_eq!((exported.devices, exported.messages), (1, 0));
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        let id: String = account
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v["account"]["id"], id.as_str());
        delete_account(&config, account).await.expect("delete");
        let gone = export_account(&config, account, options, &mut Vec::new()).await;
        assert!(matches!(gone, Err(Error::UnknownRecipient)), "{gone:?}");
    }
}
