//! Accounts, devices, delivery token hashes and deletion intents in PostgreSQL
//! (`migrations/V3__accounts.sql`), with the contract of [`AccountStore`].
//!
//! A record is the `accounts` row and its `devices` rows, read in one statement so a
//! read never sees half of a change. Devices come back in id order (the order the
//! embedded store keeps them in, as each added device takes the highest id plus one).
//! A new device id is chosen under the account row's lock (`FOR UPDATE`), so two
//! nodes adding devices to one account at once get distinct ids, and neither fails.
//! It is one past the highest id the account ever had (`last_device`, V11, kept by
//! additions and removals under the same lock; NULL on older rows, where the highest
//! listed id is all there is), so a removed device's id is never handed out again.
//! The signed device list lives on the account row (V11), so it goes with it.

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::rows::{
    account_of, col, day_of, device_of, exec_in, fixed, one_in, opt_in, query_in, signed,
    transaction, u32_of, unsigned, TxError,
};
use super::PgBackend;
use crate::store::{
    AccountDays, AccountRecord, AccountStore, DeviceDays, StoreError, StoreResult, StoredList,
};

/// The account row's lock: serialises device additions and removals across nodes.
const LOCK_LAST: &str = "SELECT 1 FROM accounts WHERE account = $1 FOR UPDATE";
/// The highest device id the account ever had: the stored mark or the highest listed
/// id, whichever is higher (read after the lock, by a statement whose snapshot then
/// includes a device another node added while this one waited).
const LAST: &str = "SELECT greatest((SELECT coalesce(last_device, 0) FROM accounts \
     WHERE account = $1), (SELECT coalesce(max(device), 0) FROM devices WHERE account = $1))";

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
                let locked = opt_in(&tx, LOCK_LAST, &[&account]).await?;
                if locked.is_none() {
                    return Ok(None);
                }
                let row = one_in(
                    &tx,
                    "SELECT min(device) FROM devices WHERE account = $1 AND device_key = $2",
                    &[&account, &key],
                )
                .await?;
                if let Some(existing) = col::<Option<i64>>(&row, 0)? {
                    return Ok(Some(device_of(existing)?));
                }
                let last = col::<i64>(&one_in(&tx, LAST, &[&account]).await?, 0)?;
                let next =
                    device_of(last + 1).map_err(|_| StoreError::Corrupt("device ids exhausted"))?;
                exec_in(
                    &tx,
                    "INSERT INTO devices (account, device, device_key, created_day, seen_day) \
                     VALUES ($1, $2, $3, $4, $4)",
                    &[&account, &dev(next), &key, &day],
                )
                .await?;
                exec_in(
                    &tx,
                    "UPDATE accounts SET last_device = $2 WHERE account = $1",
                    &[&account, &dev(next)],
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

    fn device_list_version(&self, id: &AccountId) -> StoreResult<u64> {
        self.run(async {
            let rows = self
                .rows(
                    "SELECT device_list_version FROM accounts WHERE account = $1",
                    &[&&id.as_bytes()[..]],
                )
                .await?;
            rows.first().map_or(Ok(0), |row| {
                unsigned(self.col(row, 0)?, "device list version")
            })
        })
    }

    fn device_list(&self, id: &AccountId) -> StoreResult<Option<StoredList>> {
        self.run(async {
            let rows = self
                .rows(
                    "SELECT device_list_version, device_list, device_list_signature \
                     FROM accounts WHERE account = $1 AND device_list IS NOT NULL",
                    &[&&id.as_bytes()[..]],
                )
                .await?;
            rows.first()
                .map(|row| {
                    Ok(StoredList {
                        version: unsigned(self.col(row, 0)?, "device list version")?,
                        list: self.col::<&[u8]>(row, 1)?.to_vec(),
                        signature: fixed(self.col::<&[u8]>(row, 2)?)?,
                    })
                })
                .transpose()
        })
    }

    /// A version beyond a bigint (2^63 - 1) is refused as a backend error.
    fn put_device_list(&self, id: &AccountId, list: &StoredList) -> StoreResult<bool> {
        let version = signed(list.version)?;
        let n = self.run(self.exec(
            "UPDATE accounts SET device_list_version = $2, device_list = $3, \
             device_list_signature = $4 WHERE account = $1 AND device_list_version < $2",
            &[
                &&id.as_bytes()[..],
                &version,
                &list.list.as_slice(),
                &&list.signature[..],
            ],
        ))?;
        Ok(n > 0)
    }

    fn remove_device_record(&self, of: &DeviceAddress) -> StoreResult<bool> {
        if of.device == DeviceId::PRIMARY {
            return Ok(false);
        }
        let account = &of.account.as_bytes()[..];
        let device = dev(of.device);
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                // Under add_device's lock: the mark is raised to the highest id first,
                // so the removed one is never handed out again.
                if opt_in(&tx, LOCK_LAST, &[&account]).await?.is_none() {
                    return Ok(false);
                }
                exec_in(
                    &tx,
                    &format!(
                        "UPDATE accounts SET last_device = nullif(({LAST}), 0) WHERE account = $1"
                    ),
                    &[&account],
                )
                .await?;
                exec_in(
                    &tx,
                    "DELETE FROM devices WHERE account = $1 AND device = $2",
                    &[&account, &device],
                )
                .await?
                    > 0
            })
        })
    }

    fn idle_devices(&self, seen_before_day: u32, max: usize) -> StoreResult<Vec<DeviceAddress>> {
        // The partial index `devices_idle` (V11) serves this.
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self.run(self.rows(
            "SELECT account, device FROM devices WHERE device > 1 AND seen_day < $1 \
             ORDER BY seen_day, account, device LIMIT $2",
            &[&i64::from(seen_before_day), &limit],
        ))?;
        rows.iter().map(|row| self.address(row)).collect()
    }

    fn put_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.run(self.exec(
            "INSERT INTO device_removals (account, device) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&&of.account.as_bytes()[..], &dev(of.device)],
        ))
        .map(drop)
    }

    fn device_removals(&self) -> StoreResult<Vec<DeviceAddress>> {
        let rows = self.run(self.rows(
            "SELECT account, device FROM device_removals ORDER BY account, device",
            &[],
        ))?;
        rows.iter().map(|row| self.address(row)).collect()
    }

    fn remove_device_removal(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.run(self.exec(
            "DELETE FROM device_removals WHERE account = $1 AND device = $2",
            &[&&of.account.as_bytes()[..], &dev(of.device)],
        ))
        .map(drop)
    }
}

impl PgBackend {
    /// A row's (account, device) columns.
    fn address(&self, row: &tokio_postgres::Row) -> StoreResult<DeviceAddress> {
        Ok(DeviceAddress {
            account: account_of(self.col::<&[u8]>(row, 0)?)?,
            device: device_of(self.col(row, 1)?)?,
        })
    }

    /// Sets each account's highest device id ever (a copy from the embedded store,
    /// `admin migrate`), never lowering one; accounts not here are left alone.
    pub fn import_last_devices(&self, marks: &[(AccountId, u32)]) -> StoreResult<()> {
        let accounts: Vec<&[u8]> = marks.iter().map(|(a, _)| &a.as_bytes()[..]).collect();
        let lasts: Vec<i64> = marks.iter().map(|(_, d)| i64::from(*d)).collect();
        self.run(self.exec(
            "UPDATE accounts a SET last_device = greatest(a.last_device, m.last) \
             FROM unnest($1::bytea[], $2::bigint[]) AS m(account, last) \
             WHERE a.account = m.account AND m.last > 0",
            &[&accounts, &lasts],
        ))
        .map(drop)
    }

    /// The highest device id the account ever had, as stored (`None`: no mark).
    pub fn last_device(&self, id: &AccountId) -> StoreResult<Option<u32>> {
        self.run(async {
            let rows = self
                .rows(
                    "SELECT last_device FROM accounts WHERE account = $1",
                    &[&&id.as_bytes()[..]],
                )
                .await?;
            match rows.first() {
                Some(row) => self
                    .col::<Option<i64>>(row, 0)?
                    .map(|d| u32_of(d, "last device"))
                    .transpose(),
                None => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests;
