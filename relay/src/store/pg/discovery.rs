//! [`DiscoveryStore`] on PostgreSQL (tables in `V4__discovery.sql`):
//! - `discovery_tags`: tag → account, filter key, discoverable, verified day (one
//!   account per tag, by its primary key);
//! - `discovery_accounts`: account → tag (one tag per account), evaluation bucket;
//! - `discovery_number_buckets`: the number's bucket, keyed by a hash of its tag as on
//!   sled, with `detached_until` (NULL: held; 0: detached, unseen; else its expiry).
//!
//! `attach` and `detach` are one transaction each that locks the account's row, then
//! the tag's; a race between nodes on rows that did not exist yet ends in a unique
//! violation, a deadlock or a serialization failure for the loser, which runs its
//! transaction again (at most 5 times, `rows::ATTEMPTS`) and then sees the winner's rows.

use tern_platform::clock::UnixMillis;
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::AccountId;
use tokio_postgres::types::ToSql;

use super::rows::{account_of, body, col, db_time, tag_of, time_of};
use super::PgBackend;
use crate::store::{DiscoveryStore, StoreResult, TagRecord, DETACHED_NUMBER_RETENTION_MS};

/// Filter keys read per statement by `discoverable_keys`.
const KEYS_PAGE: i64 = 10_000;

/// The number bucket's key column.
fn number_key(tag: &Tag) -> Vec<u8> {
    crate::store::discovery::number_bucket_hash(tag).to_vec()
}

const DETACH_NUMBER: &str = "UPDATE discovery_number_buckets SET detached_until = 0 \
     WHERE bucket_key = $1 AND detached_until IS NULL";

impl PgBackend {
    /// The filter keys of discoverable tags, read `page` at a time in the tags'
    /// order (keyset pagination), each page one statement with its own deadline: a
    /// large tag set is never one result under one statement timeout. A tag attached,
    /// detached or hidden during the read may be in or out, as in a read a moment
    /// earlier or later; no tag is read twice.
    pub(super) fn discoverable_keys_paged(&self, page: i64) -> StoreResult<Vec<u64>> {
        let page = page.max(1);
        let mut keys = Vec::new();
        // The empty bytea sorts before every tag.
        let mut after: Vec<u8> = Vec::new();
        // Each full page moves `after` past the rows it read: it ends.
        loop {
            let rows = self.run(self.rows(
                "SELECT tag, filter_key FROM discovery_tags \
                 WHERE discoverable AND tag > $1 ORDER BY tag LIMIT $2",
                &[&after, &page],
            ))?;
            for r in &rows {
                // Bit for bit, as written.
                keys.push(col::<i64>(r, 1)? as u64);
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == page => after = col::<Vec<u8>>(last, 0)?,
                _ => return Ok(keys),
            }
        }
    }
}

impl DiscoveryStore for PgBackend {
    fn attach(
        &self,
        account: &AccountId,
        tag: &Tag,
        rec: &TagRecord,
    ) -> StoreResult<Option<AccountId>> {
        let (a, t) = (account.as_bytes().to_vec(), tag.0.to_vec());
        let key = rec.key.0 as i64; // bit for bit
        let (on, day) = (rec.discoverable, db_time(rec.verified_at));
        let body = body(|tx| {
            let (a, t) = (a.clone(), t.clone());
            let account = *account;
            let tag = *tag;
            Box::pin(async move {
                // The account's row first, then the tag's: one order for every attach.
                let mine = tx
                    .query_opt(
                        "SELECT tag FROM discovery_accounts WHERE account = $1 FOR UPDATE",
                        &[&a],
                    )
                    .await?;
                let had_row = mine.is_some();
                let old: Option<Vec<u8>> = match &mine {
                    Some(r) => col(r, 0)?,
                    None => None,
                };
                if let Some(old) = old {
                    tx.execute(
                        "DELETE FROM discovery_tags WHERE tag = $1 AND account = $2",
                        &[&old, &a],
                    )
                    .await?;
                    let old = tag_of(&old)?;
                    if old != tag {
                        tx.execute(DETACH_NUMBER, &[&number_key(&old)]).await?;
                    }
                }
                tx.execute(
                    "UPDATE discovery_number_buckets SET detached_until = NULL \
                     WHERE bucket_key = $1 AND detached_until IS NOT NULL",
                    &[&number_key(&tag)],
                )
                .await?;
                let owner = tx
                    .query_opt(
                        "SELECT account FROM discovery_tags WHERE tag = $1 FOR UPDATE",
                        &[&t],
                    )
                    .await?;
                let previous = match owner {
                    Some(row) => {
                        let p: Vec<u8> = col(&row, 0)?;
                        tx.execute(
                            "UPDATE discovery_tags SET account = $2, filter_key = $3, \
                             discoverable = $4, verified_at = $5 WHERE tag = $1",
                            &[&t, &a, &key, &on, &day],
                        )
                        .await?;
                        tx.execute(
                            "UPDATE discovery_accounts SET tag = NULL WHERE account = $1 AND tag = $2",
                            &[&p, &t],
                        )
                        .await?;
                        Some(account_of(&p)?)
                    }
                    // A plain insert: a node inserting the same tag meanwhile makes
                    // this run fail (unique violation) and run again.
                    None => {
                        tx.execute(
                            "INSERT INTO discovery_tags (tag, account, filter_key, discoverable, \
                             verified_at) VALUES ($1, $2, $3, $4, $5)",
                            &[&t, &a, &key, &on, &day],
                        )
                        .await?;
                        None
                    }
                };
                if had_row {
                    tx.execute(
                        "UPDATE discovery_accounts SET tag = $2 WHERE account = $1",
                        &[&a, &t],
                    )
                    .await?;
                } else {
                    tx.execute(
                        "INSERT INTO discovery_accounts (account, tag) VALUES ($1, $2)",
                        &[&a, &t],
                    )
                    .await?;
                }
                Ok(previous.filter(|p| *p != account))
            })
        });
        self.run(self.tx_retrying(body))
    }

    fn by_tag(&self, tag: &Tag) -> StoreResult<Option<TagRecord>> {
        let rows = self.run(self.rows(
            "SELECT account, filter_key, discoverable, verified_at \
             FROM discovery_tags WHERE tag = $1",
            &[&tag.0.as_slice()],
        ))?;
        rows.first()
            .map(|r| {
                Ok(TagRecord {
                    account: account_of(col(r, 0)?)?,
                    key: FilterKey(col::<i64>(r, 1)? as u64), // bit for bit
                    discoverable: col(r, 2)?,
                    verified_at: time_of(col(r, 3)?),
                })
            })
            .transpose()
    }

    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(Tag, TagRecord)>> {
        let rows = self.run(self.rows(
            "SELECT tag FROM discovery_accounts WHERE account = $1",
            &[&account.as_bytes().as_slice()],
        ))?;
        let tag: Option<Vec<u8>> = match rows.first() {
            Some(r) => col(r, 0)?,
            None => None,
        };
        let Some(tag) = tag else {
            return Ok(None);
        };
        let tag = tag_of(&tag)?;
        // Only a record that names the account, as on sled.
        Ok(self
            .by_tag(&tag)?
            .filter(|r| r.account == *account)
            .map(|r| (tag, r)))
    }

    fn set_discoverable(&self, account: &AccountId, on: bool) -> StoreResult<bool> {
        let Some((tag, _)) = self.of_account(account)? else {
            return Ok(false);
        };
        let n = self.run(self.exec(
            "UPDATE discovery_tags SET discoverable = $3 WHERE tag = $1 AND account = $2",
            &[&tag.0.as_slice(), &account.as_bytes().as_slice(), &on],
        ))?;
        Ok(n == 1)
    }

    fn detach(&self, account: &AccountId) -> StoreResult<()> {
        let a = account.as_bytes().to_vec();
        let body = body(|tx| {
            let a = a.clone();
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "DELETE FROM discovery_accounts WHERE account = $1 RETURNING tag",
                        &[&a],
                    )
                    .await?;
                let tag: Option<Vec<u8>> = match &row {
                    Some(r) => col(r, 0)?,
                    None => None,
                };
                if let Some(tag) = tag {
                    tx.execute(
                        "DELETE FROM discovery_tags WHERE tag = $1 AND account = $2",
                        &[&tag, &a],
                    )
                    .await?;
                    tx.execute(DETACH_NUMBER, &[&number_key(&tag_of(&tag)?)])
                        .await?;
                }
                Ok(())
            })
        });
        self.run(self.tx_retrying(body))
    }

    fn sweep_number_buckets(&self, now: UnixMillis, max: usize) -> StoreResult<usize> {
        let now = db_time(now);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let until = now.saturating_add(db_time(DETACHED_NUMBER_RETENTION_MS));
        self.run(async {
            let client = self.client().await?;
            // Refilled or expired: removed. SKIP LOCKED leaves a bucket an attach
            // holds right now to the next sweep.
            let removed = client
                .execute(
                    "DELETE FROM discovery_number_buckets WHERE bucket_key IN ( \
                       SELECT bucket_key FROM discovery_number_buckets \
                       WHERE detached_until IS NOT NULL \
                         AND (tat <= $1 OR (detached_until <> 0 AND detached_until <= $1)) \
                       LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&now, &max],
                )
                .await
                .map_err(|e| self.classify(&e))?;
            let left = max.saturating_sub(i64::try_from(removed).unwrap_or(i64::MAX));
            if left > 0 {
                // Seen for the first time: the retention starts now.
                client
                    .execute(
                        "UPDATE discovery_number_buckets SET detached_until = $3 \
                         WHERE bucket_key IN ( \
                           SELECT bucket_key FROM discovery_number_buckets \
                           WHERE detached_until = 0 AND tat > $1 \
                           LIMIT $2 FOR UPDATE SKIP LOCKED)",
                        &[&now, &left, &until],
                    )
                    .await
                    .map_err(|e| self.classify(&e))?;
            }
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }

    fn holds_tags(&self) -> StoreResult<bool> {
        let rows = self.run(self.rows("SELECT EXISTS (SELECT 1 FROM discovery_tags)", &[]))?;
        rows.first().map_or(Ok(false), |r| col(r, 0))
    }

    fn discoverable_keys(&self) -> StoreResult<Vec<u64>> {
        self.discoverable_keys_paged(KEYS_PAGE)
    }

    fn bucket(&self, account: &AccountId) -> StoreResult<Option<u64>> {
        let rows = self.run(self.rows(
            "SELECT bucket_tat FROM discovery_accounts WHERE account = $1",
            &[&account.as_bytes().as_slice()],
        ))?;
        let tat: Option<i64> = match rows.first() {
            Some(r) => col(r, 0)?,
            None => None,
        };
        Ok(tat.map(time_of))
    }

    fn number_bucket(&self, tag: &Tag) -> StoreResult<Option<u64>> {
        let rows = self.run(self.rows(
            "SELECT tat FROM discovery_number_buckets WHERE bucket_key = $1",
            &[&number_key(tag)],
        ))?;
        rows.first().map(|r| col(r, 0).map(time_of)).transpose()
    }

    fn set_buckets(
        &self,
        account: &AccountId,
        account_tat: u64,
        tag: &Tag,
        number_tat: u64,
    ) -> StoreResult<()> {
        let (a, at) = (account.as_bytes().to_vec(), db_time(account_tat));
        let (n, nt) = (number_key(tag), db_time(number_tat));
        let body = body(|tx| {
            let (a, n) = (a.clone(), n.clone());
            Box::pin(async move {
                // Both in one transaction, pipelined.
                let (pa, pn): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 2]) =
                    ([&a, &at], [&n, &nt]);
                let account = tx.execute(
                    "INSERT INTO discovery_accounts (account, bucket_tat) VALUES ($1, $2) \
                     ON CONFLICT (account) DO UPDATE SET bucket_tat = EXCLUDED.bucket_tat",
                    &pa,
                );
                let number = tx.execute(
                    "INSERT INTO discovery_number_buckets (bucket_key, tat) VALUES ($1, $2) \
                     ON CONFLICT (bucket_key) DO UPDATE SET tat = EXCLUDED.tat",
                    &pn,
                );
                futures::try_join!(account, number)?;
                Ok(())
            })
        });
        self.run(self.tx_retrying(body))
    }
}
