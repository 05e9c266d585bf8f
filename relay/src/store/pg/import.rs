//! Bulk writes for `tern-relay admin migrate`: rows copied from an embedded relay as
//! they were (ids, seqs, days, times), in multi-row `unnest` inserts. Only for an
//! empty database that no relay serves yet: they bypass the stores' rules (seq
//! allocation, charges on insert) on purpose.

use tern_proto::discovery::Tag;
use tern_proto::{AccountId, DeviceAddress};

use super::rows::{col, exec_in, query_in, signed, transaction, unsigned};
use super::PgBackend;
use crate::store::{
    AccountDays, AccountRecord, BlobId, BlobMeta, DumpedPackages, GroupState, HandleBytes,
    StoreError, StoreResult, StoredMessage, TagRecord,
};

/// The tables an import fills, in the order the summary lists them.
pub const TABLES: [&str; 18] = [
    "accounts",
    "devices",
    "delivery_tokens",
    "account_deletions",
    "device_keys",
    "one_time_keys",
    "discovery_tags",
    "discovery_accounts",
    "discovery_number_buckets",
    "blobs",
    "blob_charges",
    "uploads",
    "mailbox_heads",
    "messages",
    "shared_bodies",
    "key_packages",
    "last_resort_key_packages",
    "group_epochs",
];

fn seq(v: u64) -> StoreResult<i64> {
    // Embedded seqs are (epoch << 40) | n with epochs below 2^23: one at or above 2^63
    // is not a seq any embedded store hands out.
    i64::try_from(v).map_err(|_| StoreError::Corrupt("sequence number at or above 2^63"))
}

fn dev(a: &DeviceAddress) -> i64 {
    super::keys::params(a).1
}

impl PgBackend {
    /// Whether the database holds no account, mailbox, message, shared body, key
    /// package (of the pool or last-resort) or group handle (a target an import may
    /// fill).
    pub fn import_target_empty(&self) -> StoreResult<bool> {
        let rows = self.run(self.rows(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM accounts LIMIT 1) a) \
                  + (SELECT count(*) FROM (SELECT 1 FROM mailbox_heads LIMIT 1) h) \
                  + (SELECT count(*) FROM (SELECT 1 FROM messages LIMIT 1) m) \
                  + (SELECT count(*) FROM (SELECT 1 FROM shared_bodies LIMIT 1) b) \
                  + (SELECT count(*) FROM (SELECT 1 FROM key_packages LIMIT 1) k) \
                  + (SELECT count(*) FROM (SELECT 1 FROM last_resort_key_packages LIMIT 1) l) \
                  + (SELECT count(*) FROM (SELECT 1 FROM group_epochs LIMIT 1) g)",
            &[],
        ))?;
        let n: i64 = match rows.first() {
            Some(row) => self.col(row, 0)?,
            None => 0,
        };
        Ok(n == 0)
    }

    /// Rows in each of [`TABLES`].
    pub fn import_counts(&self) -> StoreResult<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for table in TABLES {
            let rows = self.run(self.rows(&format!("SELECT count(*) FROM {table}"), &[]))?;
            let n: i64 = match rows.first() {
                Some(row) => self.col(row, 0)?,
                None => 0,
            };
            out.push((table, unsigned(n, "count")?));
        }
        Ok(out)
    }

    /// Inserts accounts with their devices and days, as they were.
    pub fn import_accounts(
        &self,
        accounts: &[(AccountId, AccountRecord, AccountDays)],
    ) -> StoreResult<()> {
        let (mut ids, mut keys, mut created) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d_acc, mut d_id, mut d_key, mut d_created, mut d_seen) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, rec, days) in accounts {
            ids.push(&id.as_bytes()[..]);
            keys.push(&rec.identity_key[..]);
            created.push(days.created.map(i64::from));
            for (device, key) in &rec.devices {
                let d = days.of(*device);
                d_acc.push(&id.as_bytes()[..]);
                d_id.push(i64::from(device.get()));
                d_key.push(&key[..]);
                d_created.push(d.created.map(i64::from));
                d_seen.push(d.last_seen.map(i64::from));
            }
        }
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "INSERT INTO accounts (account, identity_key, created_day) \
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[])",
                    &[&ids, &keys, &created],
                )
                .await?;
                exec_in(
                    &tx,
                    "INSERT INTO devices (account, device, device_key, created_day, seen_day) \
                     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::int8[], \
                     $5::int8[])",
                    &[&d_acc, &d_id, &d_key, &d_created, &d_seen],
                )
                .await?;
            })
        })
    }

    /// Inserts blob records as they were (no charge: charges are copied apart).
    pub fn import_blobs(&self, blobs: &[(BlobId, BlobMeta)]) -> StoreResult<()> {
        let ids: Vec<&[u8]> = blobs.iter().map(|(id, _)| &id[..]).collect();
        let mut cols: [Vec<i64>; 4] = Default::default();
        for (_, m) in blobs {
            for (col, v) in
                cols.iter_mut()
                    .zip([m.size, m.created_at, m.last_used_at, m.expires_at])
            {
                col.push(signed(v)?);
            }
        }
        let [size, created, used, expires] = &cols;
        self.run(self.exec(
            "INSERT INTO blobs (blob_id, size, created_at, last_used_at, expires_at) \
             SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])",
            &[&ids, size, created, used, expires],
        ))
        .map(drop)
    }

    /// Inserts charges: account, UTC day, bytes.
    pub fn import_charges(&self, charges: &[(AccountId, u64, u64)]) -> StoreResult<()> {
        let accounts: Vec<&[u8]> = charges.iter().map(|(a, _, _)| &a.as_bytes()[..]).collect();
        let days = charges
            .iter()
            .map(|c| signed(c.1))
            .collect::<StoreResult<Vec<_>>>()?;
        let bytes = charges
            .iter()
            .map(|c| signed(c.2))
            .collect::<StoreResult<Vec<_>>>()?;
        self.run(self.exec(
            "INSERT INTO blob_charges (account, day, bytes) \
             SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[])",
            &[&accounts, &days, &bytes],
        ))
        .map(drop)
    }

    /// Inserts discovery records as they were: tags, the accounts' tags and bucket
    /// TATs, and the number buckets by hashed key (with their detachment).
    pub fn import_discovery(
        &self,
        tags: &[(Tag, TagRecord)],
        accounts: &[(AccountId, Option<Tag>, Option<u64>)],
        numbers: &[([u8; 16], u64, Option<u64>)],
    ) -> StoreResult<()> {
        let t_tag: Vec<&[u8]> = tags.iter().map(|(t, _)| &t.0[..]).collect();
        let t_acc: Vec<&[u8]> = tags
            .iter()
            .map(|(_, r)| &r.account.as_bytes()[..])
            .collect();
        // The filter key is a u64 kept bit for bit in a bigint.
        let t_key: Vec<i64> = tags
            .iter()
            .map(|(_, r)| i64::from_ne_bytes(r.key.0.to_ne_bytes()))
            .collect();
        let t_disc: Vec<bool> = tags.iter().map(|(_, r)| r.discoverable).collect();
        let t_at = tags
            .iter()
            .map(|(_, r)| signed(r.verified_at))
            .collect::<StoreResult<Vec<_>>>()?;
        let a_acc: Vec<&[u8]> = accounts.iter().map(|(a, _, _)| &a.as_bytes()[..]).collect();
        let a_tag: Vec<Option<&[u8]>> = accounts
            .iter()
            .map(|(_, t, _)| t.as_ref().map(|t| &t.0[..]))
            .collect();
        let a_tat = accounts
            .iter()
            .map(|(_, _, t)| t.map(signed).transpose())
            .collect::<StoreResult<Vec<_>>>()?;
        let n_key: Vec<&[u8]> = numbers.iter().map(|(k, _, _)| &k[..]).collect();
        let n_tat = numbers
            .iter()
            .map(|(_, t, _)| signed(*t))
            .collect::<StoreResult<Vec<_>>>()?;
        let n_det = numbers
            .iter()
            .map(|(_, _, d)| d.map(signed).transpose())
            .collect::<StoreResult<Vec<_>>>()?;
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "INSERT INTO discovery_tags (tag, account, filter_key, discoverable, \
                     verified_at) SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], \
                     $4::bool[], $5::int8[])",
                    &[&t_tag, &t_acc, &t_key, &t_disc, &t_at],
                )
                .await?;
                exec_in(
                    &tx,
                    "INSERT INTO discovery_accounts (account, tag, bucket_tat) \
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[])",
                    &[&a_acc, &a_tag, &a_tat],
                )
                .await?;
                exec_in(
                    &tx,
                    "INSERT INTO discovery_number_buckets (bucket_key, tat, detached_until) \
                     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[])",
                    &[&n_key, &n_tat, &n_det],
                )
                .await?;
            })
        })
    }

    /// Inserts a shared body that no entry points at yet (`refs` 0: each entry
    /// [`PgBackend::import_messages`] copies adds one), and adds its bytes to the
    /// relay-wide totals, once.
    pub fn import_body(&self, id: &[u8; 16], payload: &[u8], expires_at: u64) -> StoreResult<()> {
        let (id, expires) = (&id[..], signed(expires_at)?);
        let bytes = signed(payload.len() as u64)?;
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "INSERT INTO shared_bodies (id, payload, expires_at, refs) \
                     VALUES ($1, $2, $3, 0)",
                    &[&id, &payload, &expires],
                )
                .await?;
                exec_in(
                    &tx,
                    super::writer::ADD_TOTALS,
                    &[&0i32, &0i64, &bytes, &0i64],
                )
                .await?;
            })
        })
    }

    /// Inserts `msgs` (in seq order, none already there) into `to`'s mailbox with
    /// their own seqs, ids and times, in one transaction that also adds them to the
    /// mailbox's head (whose `last_seq` becomes at least the highest seq copied) and
    /// to the relay-wide totals. `bodies[i]` names the body (imported before) of
    /// `msgs[i]` when that is an entry; the body's `refs` counts it.
    pub fn import_messages(
        &self,
        to: &DeviceAddress,
        msgs: &[StoredMessage],
        bodies: &[Option<[u8; 16]>],
    ) -> StoreResult<()> {
        let Some(last) = msgs.last() else {
            return Ok(());
        };
        let mut body_ids: Vec<Option<&[u8]>> = Vec::with_capacity(msgs.len());
        let mut body_lens: Vec<Option<i64>> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let id = bodies.get(i).and_then(|b| b.as_ref());
            match (&m.shared_body, id) {
                (None, None) => {
                    body_ids.push(None);
                    body_lens.push(None);
                }
                (Some(b), Some(id)) => {
                    body_ids.push(Some(&id[..]));
                    body_lens.push(Some(signed(b.len() as u64)?));
                }
                _ => return Err(StoreError::Backend("an entry without its body id".into())),
            }
        }
        let refs: Vec<&[u8]> = body_ids.iter().flatten().copied().collect();
        let account = &to.account.as_bytes()[..];
        let device = dev(to);
        let last = seq(last.seq)?;
        let seqs = msgs
            .iter()
            .map(|m| seq(m.seq))
            .collect::<StoreResult<Vec<_>>>()?;
        let ids: Vec<&[u8]> = msgs.iter().map(|m| &m.message_id.0[..]).collect();
        let payloads: Vec<&[u8]> = msgs.iter().map(|m| &m.payload[..]).collect();
        let accepted = msgs
            .iter()
            .map(|m| signed(m.accepted_at))
            .collect::<StoreResult<Vec<_>>>()?;
        let expires = msgs
            .iter()
            .map(|m| signed(m.expires_at))
            .collect::<StoreResult<Vec<_>>>()?;
        let count = signed(msgs.len() as u64)?;
        // The mailbox counts each entry with its body; the relay counted the body
        // once, when it was imported.
        let own = signed(msgs.iter().map(|m| m.payload.len() as u64).sum())?;
        let bytes = signed(msgs.iter().map(|m| m.len()).sum())?;
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                let rows = query_in(
                    &tx,
                    "INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account, device) DO UPDATE SET \
                     last_seq = greatest(h.last_seq, EXCLUDED.last_seq), \
                     messages = h.messages + EXCLUDED.messages, bytes = h.bytes + EXCLUDED.bytes \
                     RETURNING messages",
                    &[&account, &device, &last, &count, &bytes],
                )
                .await?;
                let after: i64 = match rows.first() {
                    Some(row) => col(row, 0)?,
                    None => count,
                };
                exec_in(
                    &tx,
                    "INSERT INTO messages (account, device, seq, message_id, payload, \
                     accepted_at, expires_at, body_id, body_len) SELECT $1, $2, * \
                     FROM unnest($3::int8[], $4::bytea[], $5::bytea[], $6::int8[], $7::int8[], \
                     $8::bytea[], $9::int8[])",
                    &[
                        &account, &device, &seqs, &ids, &payloads, &accepted, &expires, &body_ids,
                        &body_lens,
                    ],
                )
                .await?;
                // The mailbox was empty before this batch: one more mailbox.
                let new_mailbox = i64::from(after == count);
                exec_in(
                    &tx,
                    super::writer::ADD_TOTALS,
                    &[&0i32, &count, &own, &new_mailbox],
                )
                .await?;
                // The bodies after the head and the totals slot, in id order, as
                // every mailbox transaction locks them.
                if !refs.is_empty() {
                    exec_in(
                        &tx,
                        "WITH r AS (SELECT id, count(*)::int8 AS n FROM unnest($1::bytea[]) id \
                           GROUP BY id), \
                         lk AS (SELECT b.id FROM shared_bodies b JOIN r ON b.id = r.id \
                           ORDER BY b.id FOR UPDATE OF b) \
                         UPDATE shared_bodies b SET refs = b.refs + r.n \
                         FROM r JOIN lk ON lk.id = r.id WHERE b.id = r.id",
                        &[&refs],
                    )
                    .await?;
                }
            })
        })
    }

    /// Raises the heads of `mailboxes` (made empty where missing) to `last_seq` at
    /// least, so seqs handed out here continue above every seq the embedded store
    /// handed out, in mailboxes emptied since too; and the seq epochs (V16) to the
    /// epoch of `last_seq`, ending the live one, so that the next epoch a connection
    /// takes numbers from those heads and the one after a lost tail lies above them.
    pub fn import_seq_floor(&self, mailboxes: &[DeviceAddress], last_seq: u64) -> StoreResult<()> {
        let accounts: Vec<&[u8]> = mailboxes
            .iter()
            .map(|a| &a.account.as_bytes()[..])
            .collect();
        let devices: Vec<i64> = mailboxes.iter().map(dev).collect();
        let floor = seq(last_seq)?;
        self.run(self.exec(
            "WITH h AS (INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes) \
               SELECT a, d, $3, 0, 0 FROM unnest($1::bytea[], $2::int8[]) AS u(a, d) \
               ON CONFLICT (account, device) DO UPDATE SET \
               last_seq = greatest(h.last_seq, EXCLUDED.last_seq)), \
             e AS (UPDATE seq_epochs SET epoch = greatest(epoch, $3::int8 >> 40) WHERE id = 0) \
             DELETE FROM seq_epoch_live",
            &[&accounts, &devices, &floor],
        ))
        .map(drop)
    }

    /// Inserts devices' key packages as they were: the pool in order (ids 1, 2, …, so
    /// the oldest is still handed out first) and the last-resort package.
    pub fn import_key_packages(&self, devices: &[DumpedPackages]) -> StoreResult<()> {
        let (mut acc, mut dev_ids, mut ids, mut packages) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut l_acc, mut l_dev, mut l_package) = (Vec::new(), Vec::new(), Vec::new());
        for d in devices {
            for (n, p) in d.one_time.iter().enumerate() {
                acc.push(&d.device.account.as_bytes()[..]);
                dev_ids.push(dev(&d.device));
                ids.push(signed(n as u64 + 1)?);
                packages.push(&p[..]);
            }
            if let Some(p) = &d.last_resort {
                l_acc.push(&d.device.account.as_bytes()[..]);
                l_dev.push(dev(&d.device));
                l_package.push(&p[..]);
            }
        }
        self.run(async {
            let mut client = self.client().await?;
            transaction!(self, client, |tx| {
                exec_in(
                    &tx,
                    "INSERT INTO key_packages (account, device, id, package) \
                     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[])",
                    &[&acc, &dev_ids, &ids, &packages],
                )
                .await?;
                exec_in(
                    &tx,
                    "INSERT INTO last_resort_key_packages (account, device, package) \
                     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[])",
                    &[&l_acc, &l_dev, &l_package],
                )
                .await?;
            })
        })
    }

    /// Inserts group handles with their states as they were.
    pub fn import_groups(&self, groups: &[(HandleBytes, GroupState)]) -> StoreResult<()> {
        let handles: Vec<&[u8]> = groups.iter().map(|(h, _)| &h[..]).collect();
        let epochs = groups
            .iter()
            .map(|(_, s)| signed(s.epoch))
            .collect::<StoreResult<Vec<_>>>()?;
        let tokens: Vec<&[u8]> = groups.iter().map(|(_, s)| &s.token_hash[..]).collect();
        let commits: Vec<&[u8]> = groups.iter().map(|(_, s)| &s.last_commit_id[..]).collect();
        let days: Vec<i64> = groups
            .iter()
            .map(|(_, s)| i64::from(s.touched_day))
            .collect();
        self.run(self.exec(
            "INSERT INTO group_epochs (handle, epoch, token_hash, last_commit_id, touched_day) \
             SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[], $5::int8[])",
            &[&handles, &epochs, &tokens, &commits, &days],
        ))
        .map(drop)
    }
}
