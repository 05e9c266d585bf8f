//! Published prekeys in PostgreSQL (`migrations/V3__accounts.sql`), with the contract
//! of [`KeyStore`]: each one-time prekey is handed out at most once, across nodes too.
//!
//! A fetch is one statement: it reads the device's signed keys and, when both are
//! there, deletes the lowest one-time key it can lock (`FOR UPDATE SKIP LOCKED`), so
//! concurrent fetches on any nodes take different keys and none waits on another.
//!
//! MLS key packages (`migrations/V12__groups.sql`) follow the same rule: a fetch
//! deletes the lowest id it can lock, or reads the last-resort package.

use std::collections::BTreeMap;

use bytes::Bytes;

use tern_proto::{AccountId, DeviceAddress};

use super::rows::{col, exec_in, one_in, transaction, u32_of, unsigned};
use super::PgBackend;
use crate::store::{
    codec, FetchedKeys, FetchedPackage, KeyPackageCounts, KeyPackageStore, KeyStore, OneTimeKey,
    Published, SignedKey, StoreError, StoreResult,
};

/// The signed keys of `$1, $2`, and (when `$3`) one one-time key taken out of the pool.
const FETCH: &str = "WITH k AS ( \
       SELECT identity_dh, signed_prekey FROM device_keys \
       WHERE account = $1 AND device = $2 \
         AND identity_dh IS NOT NULL AND signed_prekey IS NOT NULL), \
     o AS ( \
       DELETE FROM one_time_keys WHERE $3 AND EXISTS (SELECT 1 FROM k) \
         AND account = $1 AND device = $2 \
         AND key_id = (SELECT key_id FROM one_time_keys WHERE account = $1 AND device = $2 \
                       ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED) \
       RETURNING key_id, key) \
     SELECT k.identity_dh, k.signed_prekey, o.key_id, o.key FROM k LEFT JOIN o ON true";

/// A device address as its two key columns.
pub(super) fn params(of: &DeviceAddress) -> (&[u8], i64) {
    (&of.account.as_bytes()[..], i64::from(of.device.get()))
}

impl KeyStore for PgBackend {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        let (account, device) = params(of);
        let identity_dh = identity_dh.map(|k| codec::encode_signed(k).to_vec());
        let signed_prekey = signed_prekey.map(|k| codec::encode_signed(k).to_vec());
        // The last key with an id wins, as it would written one after the other (one
        // statement may not change a row twice).
        let pool: BTreeMap<u32, [u8; 32]> = one_time.iter().map(|k| (k.id, k.key)).collect();
        let ids: Vec<i64> = pool.keys().map(|id| i64::from(*id)).collect();
        let keys: Vec<&[u8]> = pool.values().map(|k| &k[..]).collect();
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                if identity_dh.is_some() || signed_prekey.is_some() {
                    exec_in(
                        &tx,
                        "INSERT INTO device_keys (account, device, identity_dh, signed_prekey) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (account, device) DO UPDATE SET \
                         identity_dh = coalesce(EXCLUDED.identity_dh, device_keys.identity_dh), \
                         signed_prekey = coalesce(EXCLUDED.signed_prekey, device_keys.signed_prekey)",
                        &[&account, &device, &identity_dh, &signed_prekey],
                    )
                    .await?;
                }
                if !ids.is_empty() {
                    exec_in(
                        &tx,
                        "INSERT INTO one_time_keys (account, device, key_id, key) \
                         SELECT $1, $2, i, k FROM unnest($3::bigint[], $4::bytea[]) AS u(i, k) \
                         ON CONFLICT (account, device, key_id) DO UPDATE SET key = EXCLUDED.key",
                        &[&account, &device, &ids, &keys],
                    )
                    .await?;
                }
                let row = one_in(
                        &tx,
                        "SELECT count(*) FROM one_time_keys WHERE account = $1 AND device = $2",
                        &[&account, &device],
                    )
                    .await?;
                unsigned(col(&row, 0)?, "one-time key count")?
            })
        })
    }

    fn fetch(&self, of: &DeviceAddress, one_time: bool) -> StoreResult<Option<FetchedKeys>> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self.rows(FETCH, &[&account, &device, &one_time]).await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let one_time = match self.col::<Option<i64>>(row, 2)? {
                None => None,
                Some(id) => Some(OneTimeKey {
                    id: u32_of(id, "one-time key id")?,
                    key: super::rows::fixed(self.col::<&[u8]>(row, 3)?)?,
                }),
            };
            Ok(Some(FetchedKeys {
                identity_dh: codec::decode_signed(self.col::<&[u8]>(row, 0)?)?,
                signed_prekey: codec::decode_signed(self.col::<&[u8]>(row, 1)?)?,
                one_time,
            }))
        })
    }

    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self
                .rows(
                    "SELECT count(*) FROM one_time_keys WHERE account = $1 AND device = $2",
                    &[&account, &device],
                )
                .await?;
            let row = rows
                .first()
                .ok_or(StoreError::Backend("count returned no row".into()))?;
            unsigned(self.col(row, 0)?, "one-time key count")
        })
    }

    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self
                .rows(
                    "SELECT k.identity_dh IS NOT NULL, k.signed_prekey, \
                     (SELECT count(*) FROM one_time_keys \
                     WHERE account = $1 AND device = $2) \
                     FROM (VALUES (1)) AS one \
                     LEFT JOIN device_keys k ON k.account = $1 AND k.device = $2",
                    &[&account, &device],
                )
                .await?;
            let row = rows
                .first()
                .ok_or(StoreError::Backend("published returned no row".into()))?;
            let signed = self
                .col::<Option<&[u8]>>(row, 1)?
                .map(codec::decode_signed)
                .transpose()?;
            Ok(Published {
                identity_dh: self.col::<Option<bool>>(row, 0)?.unwrap_or(false),
                signed_prekey_id: signed.map(|k| k.id),
                one_time: unsigned(self.col(row, 2)?, "one-time key count")?,
            })
        })
    }

    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.delete_device_rows(&["device_keys", "one_time_keys"], of)
    }

    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()> {
        self.delete_account_rows(&["device_keys", "one_time_keys"], account)
    }
}

/// The first key of a device's key-package advisory lock (PostgreSQL's two-key space;
/// see `blobs::BLOB_LOCKS`): publishes of one device are serialised, so the ids they
/// give never collide. The second key folds the address; two devices sharing it
/// only wait for each other.
const KEY_PACKAGE_LOCKS: i32 = 7263_0017;

fn package_lock(of: &DeviceAddress) -> i32 {
    let a = of.account.as_bytes();
    i32::from_be_bytes([a[0], a[1], a[2], a[3]]) ^ (of.device.get() as i32)
}

/// A one-time package taken out of `$1, $2`'s pool when `$3`, else (or when the pool
/// is empty) the device's last-resort package.
const TAKE_PACKAGE: &str = "WITH o AS ( \
       DELETE FROM key_packages WHERE $3 AND account = $1 AND device = $2 \
         AND id = (SELECT id FROM key_packages WHERE account = $1 AND device = $2 \
                   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
       RETURNING package) \
     SELECT package, false FROM o \
     UNION ALL \
     SELECT package, true FROM last_resort_key_packages \
       WHERE account = $1 AND device = $2 AND NOT EXISTS (SELECT 1 FROM o)";

impl KeyPackageStore for PgBackend {
    fn publish_key_packages(
        &self,
        of: &DeviceAddress,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
        replace: bool,
    ) -> StoreResult<u64> {
        let (account, device) = params(of);
        let lock = package_lock(of);
        let packages: Vec<&[u8]> = one_time.iter().map(|p| &p[..]).collect();
        let last_resort = last_resort.map(|p| &p[..]);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    &[&KEY_PACKAGE_LOCKS, &lock],
                )
                .await?;
                if replace {
                    exec_in(
                        &tx,
                        "DELETE FROM key_packages WHERE account = $1 AND device = $2",
                        &[&account, &device],
                    )
                    .await?;
                }
                if !packages.is_empty() {
                    exec_in(
                        &tx,
                        "INSERT INTO key_packages (account, device, id, package) \
                         SELECT $1, $2, \
                           (SELECT coalesce(max(id), 0) FROM key_packages \
                            WHERE account = $1 AND device = $2) + n, p \
                         FROM unnest($3::bytea[]) WITH ORDINALITY AS u(p, n)",
                        &[&account, &device, &packages],
                    )
                    .await?;
                }
                if let Some(p) = last_resort {
                    exec_in(
                        &tx,
                        "INSERT INTO last_resort_key_packages (account, device, package) \
                         VALUES ($1, $2, $3) ON CONFLICT (account, device) \
                         DO UPDATE SET package = EXCLUDED.package",
                        &[&account, &device, &p],
                    )
                    .await?;
                }
                let row = one_in(
                    &tx,
                    "SELECT count(*) FROM key_packages WHERE account = $1 AND device = $2",
                    &[&account, &device],
                )
                .await?;
                unsigned(col(&row, 0)?, "key package count")?
            })
        })
    }

    fn take_key_package(
        &self,
        of: &DeviceAddress,
        one_time: bool,
    ) -> StoreResult<Option<FetchedPackage>> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self
                .rows(TAKE_PACKAGE, &[&account, &device, &one_time])
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            Ok(Some(FetchedPackage {
                key_package: Bytes::copy_from_slice(self.col::<&[u8]>(row, 0)?),
                last_resort: self.col(row, 1)?,
            }))
        })
    }

    fn key_package_counts(&self, of: &DeviceAddress) -> StoreResult<KeyPackageCounts> {
        let (account, device) = params(of);
        self.run(async {
            let rows = self
                .rows(
                    "SELECT (SELECT count(*) FROM key_packages WHERE account = $1 AND device = $2), \
                     EXISTS (SELECT 1 FROM last_resort_key_packages \
                             WHERE account = $1 AND device = $2)",
                    &[&account, &device],
                )
                .await?;
            let row = rows
                .first()
                .ok_or(StoreError::Backend("counts returned no row".into()))?;
            Ok(KeyPackageCounts {
                one_time: unsigned(self.col(row, 0)?, "key package count")?,
                last_resort: self.col(row, 1)?,
            })
        })
    }

    fn remove_key_packages(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.delete_device_rows(&["key_packages", "last_resort_key_packages"], of)
    }

    fn remove_account_key_packages(&self, account: &AccountId) -> StoreResult<()> {
        self.delete_account_rows(&["key_packages", "last_resort_key_packages"], account)
    }
}

impl PgBackend {
    /// Deletes one device's rows from each of `tables`, in one transaction.
    fn delete_device_rows(&self, tables: &[&str], of: &DeviceAddress) -> StoreResult<()> {
        let (account, device) = params(of);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                for table in tables {
                    let sql = format!("DELETE FROM {table} WHERE account = $1 AND device = $2");
                    exec_in(&tx, &sql, &[&account, &device]).await?;
                }
            })
        })
    }

    /// Deletes an account's rows from each of `tables`, in one transaction.
    pub(super) fn delete_account_rows(
        &self,
        tables: &[&str],
        account: &AccountId,
    ) -> StoreResult<()> {
        let account = &account.as_bytes()[..];
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                for table in tables {
                    let sql = format!("DELETE FROM {table} WHERE account = $1");
                    exec_in(&tx, &sql, &[&account]).await?;
                }
            })
        })
    }
}
