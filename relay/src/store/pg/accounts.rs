//! Accounts, devices, delivery token hashes and deletion intents in PostgreSQL
//! (`migrations/V3__accounts.sql`), with the contract of [`AccountStore`].
//!
//! A record is the `accounts` row and its `devices` rows, read in one statement so a
//! read never sees half of a change. Devices come back in id order (the order the
//! embedded store keeps them in, as each added device takes the highest id plus one).
//! A new device id is chosen under the account row's lock (`FOR UPDATE`), so two
//! nodes adding devices to one account at once get distinct ids, and neither fails.

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::rows::{
    account_of, col, day_of, device_of, exec_in, fixed, one_in, opt_in, query_in, transaction,
    TxError,
};
use super::PgBackend;
use crate::store::{AccountDays, AccountRecord, AccountStore, DeviceDays, StoreError, StoreResult};

/// An account with its devices, one row per device (none: a `NULL` device).
const RECORD: &str = "SELECT a.identity_key, a.created_day, d.device, d.device_key, \
     d.created_day, d.seen_day FROM accounts a LEFT JOIN devices d ON d.account = a.account \
     WHERE a.account = $1 ORDER BY d.device";

fn dev(d: DeviceId) -> i64 {
    i64::from(d.get())
}

fn day(d: Option<u32>) -> Option<i64> {
    d.map(i64::from)
}

impl PgBackend {
    /// The record and days of an account, `None` without it.
    fn record(&self, id: &AccountId) -> StoreResult<Option<(AccountRecord, AccountDays)>> {
        self.run(async {
            let rows = self.rows(RECORD, &[&&id.as_bytes()[..]]).await?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let mut rec = AccountRecord {
                identity_key: fixed(self.col::<&[u8]>(first, 0)?)?,
                devices: Vec::with_capacity(rows.len()),
            };
            let mut days = AccountDays {
                created: day_of(self.col(first, 1)?)?,
                devices: Vec::with_capacity(rows.len()),
            };
            for row in &rows {
                let Some(device) = self.col::<Option<i64>>(row, 2)? else {
                    continue;
                };
                let device = device_of(device)?;
                rec.devices
                    .push((device, fixed(self.col::<&[u8]>(row, 3)?)?));
                days.devices.push((
                    device,
                    DeviceDays {
                        created: day_of(self.col(row, 4)?)?,
                        last_seen: day_of(self.col(row, 5)?)?,
                    },
                ));
            }
            Ok(Some((rec, days)))
        })
    }
}

impl AccountStore for PgBackend {
    fn create_on(
        &self,
        id: &AccountId,
        record: &AccountRecord,
        created: Option<u32>,
    ) -> StoreResult<()> {
        let account = &id.as_bytes()[..];
        let devices: Vec<i64> = record.devices.iter().map(|(d, _)| dev(*d)).collect();
        let keys: Vec<&[u8]> = record.devices.iter().map(|(_, k)| &k[..]).collect();
        let created = day(created);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                let inserted = exec_in(
                    &tx,
                    "INSERT INTO accounts (account, identity_key, created_day) \
                     VALUES ($1, $2, $3) ON CONFLICT (account) DO NOTHING",
                    &[&account, &&record.identity_key[..], &created],
                )
                .await?;
                if inserted == 0 {
                    return Err(TxError::Store(StoreError::Exists));
                }
                exec_in(
                    &tx,
                    "INSERT INTO devices (account, device, device_key, created_day, seen_day) \
                     SELECT $1, d, k, $4, $4 FROM unnest($2::bigint[], $3::bytea[]) AS u(d, k)",
                    &[&account, &devices, &keys, &created],
                )
                .await?;
            })
        })
    }

    fn days(&self, id: &AccountId) -> StoreResult<Option<AccountDays>> {
        Ok(self.record(id)?.map(|(_, days)| days))
    }

    fn touch_device(&self, of: &DeviceAddress, day: u32) -> StoreResult<bool> {
        // Writes only on a later day: on every other authentication it changes nothing.
        let n = self.run(self.exec(
            "UPDATE devices SET seen_day = $3 WHERE account = $1 AND device = $2 \
             AND (seen_day IS NULL OR seen_day < $3)",
            &[
                &&of.account.as_bytes()[..],
                &dev(of.device),
                &i64::from(day),
            ],
        ))?;
        Ok(n > 0)
    }

    fn get(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        Ok(self.record(id)?.map(|(rec, _)| rec))
    }

    fn add_device(
        &self,
        id: &AccountId,
        device_key: &[u8; 32],
        day: u32,
    ) -> StoreResult<Option<DeviceId>> {
        let account = &id.as_bytes()[..];
        let key = &device_key[..];
        let day = i64::from(day);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                // The account row's lock serialises device additions across nodes. The
                // ids are read by a later statement, whose snapshot (read committed)
                // then includes a device another node added while this one waited.
                let locked = opt_in(
                    &tx,
                    "SELECT 1 FROM accounts WHERE account = $1 FOR UPDATE",
                    &[&account],
                )
                .await?;
                if locked.is_none() {
                    return Ok(None);
                }
                let row = one_in(
                    &tx,
                    "SELECT (SELECT min(device) FROM devices \
                     WHERE account = $1 AND device_key = $2), \
                     (SELECT coalesce(max(device), 0) + 1 FROM devices WHERE account = $1)",
                    &[&account, &key],
                )
                .await?;
                if let Some(existing) = col::<Option<i64>>(&row, 0)? {
                    return Ok(Some(device_of(existing)?));
                }
                let next = device_of(col(&row, 1)?)
                    .map_err(|_| StoreError::Corrupt("device ids exhausted"))?;
                exec_in(
                    &tx,
                    "INSERT INTO devices (account, device, device_key, created_day, seen_day) \
                     VALUES ($1, $2, $3, $4, $4)",
                    &[&account, &dev(next), &key, &day],
                )
                .await?;
                Some(next)
            })
        })
    }

    fn set_delivery_token(&self, id: &AccountId, token_hash: &[u8; 32]) -> StoreResult<()> {
        self.run(self.exec(
            "INSERT INTO delivery_tokens (account, token_hash) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET token_hash = EXCLUDED.token_hash",
            &[&&id.as_bytes()[..], &&token_hash[..]],
        ))
        .map(drop)
    }

    fn delivery_token(&self, id: &AccountId) -> StoreResult<Option<[u8; 32]>> {
        self.run(async {
            let rows = self
                .rows(
                    "SELECT token_hash FROM delivery_tokens WHERE account = $1",
                    &[&&id.as_bytes()[..]],
                )
                .await?;
            rows.first()
                .map(|row| fixed(self.col::<&[u8]>(row, 0)?))
                .transpose()
        })
    }

    fn remove_account(&self, id: &AccountId) -> StoreResult<Option<AccountRecord>> {
        let account = &id.as_bytes()[..];
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                // The account row first: the lock add_device takes, so no device is
                // added between the two deletions.
                let gone = opt_in(
                    &tx,
                    "DELETE FROM accounts WHERE account = $1 RETURNING identity_key",
                    &[&account],
                )
                .await?;
                let devices = query_in(
                    &tx,
                    "DELETE FROM devices WHERE account = $1 RETURNING device, device_key",
                    &[&account],
                )
                .await?;
                exec_in(
                    &tx,
                    "DELETE FROM delivery_tokens WHERE account = $1",
                    &[&account],
                )
                .await?;
                match gone {
                    None => None,
                    Some(row) => {
                        let mut rec = AccountRecord {
                            identity_key: fixed(col::<&[u8]>(&row, 0)?)?,
                            devices: Vec::with_capacity(devices.len()),
                        };
                        for d in &devices {
                            rec.devices
                                .push((device_of(col(d, 0)?)?, fixed(col::<&[u8]>(d, 1)?)?));
                        }
                        rec.devices.sort_by_key(|(d, _)| *d);
                        Some(rec)
                    }
                }
            })
        })
    }

    fn put_deletion(&self, id: &AccountId, devices: &[DeviceId]) -> StoreResult<()> {
        let devices: Vec<i64> = devices.iter().map(|d| dev(*d)).collect();
        self.run(self.exec(
            "INSERT INTO account_deletions (account, devices) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET devices = EXCLUDED.devices",
            &[&&id.as_bytes()[..], &devices],
        ))
        .map(drop)
    }

    /// As the embedded store: an intent whose device list does not decode is returned
    /// with none (the deletion then takes the account record's), and counted in one
    /// warn without ids.
    fn deletions(&self) -> StoreResult<Vec<(AccountId, Vec<DeviceId>)>> {
        let rows = self.run(self.rows("SELECT account, devices FROM account_deletions", &[]))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut no_devices = 0u64;
        for row in &rows {
            let account = account_of(self.col::<&[u8]>(row, 0)?)?;
            let devices = self
                .col::<Vec<i64>>(row, 1)?
                .into_iter()
                .map(device_of)
                .collect::<StoreResult<Vec<_>>>()
                .unwrap_or_else(|_| {
                    no_devices += 1;
                    Vec::new()
                });
            out.push((account, devices));
        }
        if no_devices > 0 {
            tracing::warn!(
                no_devices,
                "unreadable account deletion intents (store corruption)"
            );
        }
        Ok(out)
    }

    fn remove_deletion(&self, id: &AccountId) -> StoreResult<()> {
        self.run(self.exec(
            "DELETE FROM account_deletions WHERE account = $1",
            &[&&id.as_bytes()[..]],
        ))
        .map(drop)
    }
}

#[cfg(test)]
mod tests;
