//! Shared bodies on PostgreSQL (`migrations/V13__shared_bodies.sql`): a multi-recipient
//! append stores its body once in `shared_bodies` and one `messages` row per mailbox
//! (an entry: its part as `payload`, and `body_id`, `body_len`).
//!
//! - The append goes through the [writer](super::writer) like any other: the heads
//!   locked in (account, device) order, then the body (`refs` = the entries written)
//!   and the entries, in the batch's one transaction.
//! - Every statement that deletes messages (ack, expiry, purge) releases their bodies
//!   in the same statement ([`release!`]): the bodies' rows are locked in id order,
//!   last (every mailbox transaction locks its heads, then its totals slot, then
//!   bodies, so two transactions never wait on each other in a cycle), `refs` goes
//!   down by the entries deleted, and a body whose count reaches 0 is deleted.
//! - A mailbox counts an entry as (part + body) bytes; the relay-wide totals count
//!   the body once: added by the append, subtracted by the deletion that takes it.
//! - A read fetches the page's bodies by id in a second statement. An entry whose
//!   body is gone is skipped and counted ([`PgBackend::bodies_missing`]): at debug
//!   when the entry is expired or itself gone since (expiry or the last ack raced the
//!   read), at warn (no ids) when it is unexpired and still there, which is damage.
//!   Skipped rather than refused: the body cannot come back, and a refused read would
//!   hold every later message of the mailbox until the entry expires.
//! - A body whose count drifted above its entries (a `messages` row deleted by hand,
//!   a node of an older release acking without releasing) would never reach 0: the
//!   expiry sweep also deletes every body [`LEAKED_BODY_GRACE_MS`] past its expiry,
//!   whatever its count ([`PgBackend::sweep_leaked_bodies`]).

use std::collections::HashMap;

use bytes::Bytes;
use tern_proto::MessageId;
use tokio::sync::oneshot;

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tern_platform::clock::UnixMillis;

use tern_proto::DeviceAddress;

use super::keys::params;
use super::mailboxes::{from_db, to_db, TotalsDelta};
use super::writer::Op;
use super::{classify, pool_error, PgBackend};
use crate::store::{SharedAppend, StoreError, StoreResult, StoredMessage};

/// A page of a mailbox: $1 account, $2 device, after seq $3, at most $4.
const READ_PAGE: &str = "SELECT seq, message_id, payload, accepted_at, expires_at, body_id \
     FROM messages WHERE account = $1 AND device = $2 AND seq > $3 ORDER BY seq LIMIT $4";

/// How long past its expiry a body is kept whatever its count. The entries expire
/// with it and their own sweep releases it first, so only a body whose count
/// drifted is still there a day later, and no release is under way on it.
pub(crate) const LEAKED_BODY_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

/// Bodies one statement of the leak sweep deletes at most.
const LEAK_PAGE: i64 = 1_000;

/// Statements one leak sweep runs at most (the next sweep takes the rest).
const LEAK_PAGES: usize = 10;

/// Deletes up to `$2` bodies that expired at `$1` or before, whatever their count,
/// and takes their bytes off totals slot `$3`; returns (bodies, bytes). The slot is
/// locked first and the rows in id order, as a release locks them, and one a release
/// deleted meanwhile is skipped (counted by neither twice).
const SWEEP_LEAKED: &str = "WITH sl AS (SELECT 1 FROM mailbox_totals WHERE slot = $3 FOR UPDATE), \
     due AS (SELECT id FROM shared_bodies WHERE expires_at <= $1 AND (SELECT count(*) FROM sl) >= 0 \
       ORDER BY expires_at LIMIT $2), \
     lk AS (SELECT b.id FROM shared_bodies b JOIN due ON b.id = due.id \
       ORDER BY b.id FOR UPDATE OF b), \
     gone AS (DELETE FROM shared_bodies b USING lk WHERE b.id = lk.id \
       RETURNING octet_length(b.payload)::int8 AS len), \
     s AS (SELECT count(*)::int8 AS n, coalesce(sum(len), 0)::int8 AS b FROM gone), \
     tot AS (UPDATE mailbox_totals t SET bytes = t.bytes - s.b FROM s \
       WHERE t.slot = $3 AND s.n > 0) \
     SELECT n, b FROM s";

/// Of the seqs `$3` of mailbox (`$1`, `$2`), those still there and unexpired by the
/// database's clock (a read has no clock of its own).
const UNEXPIRED: &str = "SELECT seq FROM messages WHERE account = $1 AND device = $2 \
     AND seq = ANY($3::int8[]) \
     AND expires_at > (extract(epoch FROM clock_timestamp()) * 1000)::int8";

/// A fresh body id: 16 random bytes (no sequence, which Citus and its peers lack).
pub(super) fn new_id() -> [u8; 16] {
    rand::random()
}

/// The tail of a statement whose CTE `d` deleted messages, returning at least their
/// `body_id`: releases those entries' bodies. `gone` returns each deleted body's
/// length (`len`).
macro_rules! release {
    () => {
        ", rel AS (SELECT body_id AS id, count(*)::int8 AS n FROM d \
             WHERE body_id IS NOT NULL GROUP BY body_id), \
           lk AS (SELECT b.id, b.refs, rel.n, octet_length(b.payload)::int8 AS len \
             FROM shared_bodies b JOIN rel ON b.id = rel.id ORDER BY b.id FOR UPDATE OF b), \
           kept AS (UPDATE shared_bodies b SET refs = lk.refs - lk.n FROM lk \
             WHERE b.id = lk.id AND lk.refs > lk.n RETURNING b.id), \
           gone AS (DELETE FROM shared_bodies b USING lk \
             WHERE b.id = lk.id AND lk.refs <= lk.n RETURNING lk.len) "
    };
}
pub(super) use release;

/// What `d` returns for [`release!`] and the counts: the body, the part's bytes (`p`)
/// and the body's (`bl`, 0 for a message of its own).
macro_rules! deleted_cols {
    () => {
        "body_id, octet_length(payload)::int8 AS p, coalesce(body_len, 0)::int8 AS bl"
    };
}
pub(super) use deleted_cols;

/// The main query after `d` and [`release!`]: rows deleted, the mailbox's bytes they
/// held (each entry with its body) and the relay's (the parts, and the bodies deleted).
macro_rules! deleted_counts {
    () => {
        "SELECT count(*), coalesce(sum(p + bl), 0)::int8, \
           (coalesce(sum(p), 0) + (SELECT coalesce(sum(len), 0) FROM gone))::int8 FROM d"
    };
}
pub(super) use deleted_counts;

const READ_BODIES: &str = "SELECT id, payload FROM shared_bodies WHERE id = ANY($1::bytea[])";

impl PgBackend {
    /// Queues a shared append for the writer; the receiver hears each entry's seq
    /// after COMMIT (or why it failed).
    pub fn queue_append_shared(
        &self,
        append: &SharedAppend<'_>,
    ) -> StoreResult<oneshot::Receiver<StoreResult<Vec<u64>>>> {
        let (reply, rx) = oneshot::channel();
        self.enqueue(Op::AppendShared {
            id: new_id(),
            message_id: append.message_id,
            body: append.body.clone(),
            entries: append.entries.to_vec(),
            accepted_at: super::mailboxes::to_db(append.accepted_at),
            expires_at: super::mailboxes::to_db(append.expires_at),
            reply,
        })?;
        Ok(rx)
    }

    /// Up to `max` messages of the mailbox after seq `after`, entries with their bodies.
    pub(super) fn read_page(
        &self,
        (account, device): (&[u8], i64),
        after: i64,
        max: i64,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = self.run(self.rows(READ_PAGE, &[&account, &device, &after, &max]))?;
        self.page(rows, (account, device))
    }

    /// [`PgBackend::read_page`] for an async caller ([`PgBackend::detached`]): the
    /// caller's thread serves its other tasks meanwhile (a delivery's read on every
    /// wake-up, where `read_page` would lend the thread to the call and cost the
    /// runtime a hand-over of its worker each time).
    /// The bodies of shared entries (group messages), when the page has any, are
    /// still read as `read_page` reads them.
    pub(super) async fn read_page_later(
        &self,
        of: DeviceAddress,
        after: i64,
        max: i64,
    ) -> StoreResult<Vec<StoredMessage>> {
        let pool = self.pool.clone();
        let hosts = self.hosts.clone();
        let rows = self
            .detached(async move {
                let (account, device) = params(&of);
                let client = pool.get().await.map_err(|e| pool_error(e, &hosts))?;
                // Once more on a serialization failure, as `rows` does: CockroachDB
                // retries a statement itself only while its answer fits its results
                // buffer, and a page can be larger.
                super::retried(|| async {
                    let st = client.prepare_cached(READ_PAGE).await?;
                    client.query(&st, &[&account, &device, &after, &max]).await
                })
                .await
                .map_err(|e| classify(&e, &hosts))
            })
            .await?;
        self.page(rows, params(&of))
    }

    /// The messages of a page's rows, with their bodies (read here if shared).
    fn page(
        &self,
        rows: Vec<tokio_postgres::Row>,
        (account, device): (&[u8], i64),
    ) -> StoreResult<Vec<StoredMessage>> {
        // The page's bodies in one more statement (a join would not run on Citus,
        // where bodies are not co-located with the mailbox).
        let mut ids: Vec<Vec<u8>> = Vec::new();
        for r in &rows {
            if let Some(id) = self.col::<Option<Vec<u8>>>(r, 5)? {
                ids.push(id);
            }
        }
        ids.sort();
        ids.dedup();
        let bodies = self.bodies(&ids)?;
        let damaged = self.damaged(&rows, &bodies, (account, device))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let shared_body = match self.col::<Option<Vec<u8>>>(r, 5)? {
                None => None,
                Some(id) => match bodies.get(&id) {
                    Some(b) => Some(b.clone()),
                    None => {
                        self.skipped_entry(damaged.contains(&self.col::<i64>(r, 0)?));
                        continue;
                    }
                },
            };
            let id: &[u8] = self.col(r, 1)?;
            out.push(StoredMessage {
                seq: self.col::<i64>(r, 0)? as u64,
                message_id: MessageId(
                    id.try_into()
                        .map_err(|_| StoreError::Corrupt("message id"))?,
                ),
                payload: Bytes::from(self.col::<Vec<u8>>(r, 2)?),
                accepted_at: from_db(self.col(r, 3)?),
                expires_at: from_db(self.col(r, 4)?),
                shared_body,
            });
        }
        Ok(out)
    }

    /// Of the page's entries whose body is missing, those unexpired and still there
    /// (damage, not a race with expiry or the last ack).
    fn damaged(
        &self,
        rows: &[tokio_postgres::Row],
        bodies: &HashMap<Vec<u8>, Bytes>,
        (account, device): (&[u8], i64),
    ) -> StoreResult<HashSet<i64>> {
        let mut missing = Vec::new();
        for r in rows {
            if let Some(id) = self.col::<Option<Vec<u8>>>(r, 5)? {
                if !bodies.contains_key(&id) {
                    missing.push(self.col::<i64>(r, 0)?);
                }
            }
        }
        if missing.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = self.run(self.rows(UNEXPIRED, &[&account, &device, &missing]))?;
        rows.iter().map(|r| self.col::<i64>(r, 0)).collect()
    }

    fn skipped_entry(&self, damaged: bool) {
        if let Ok(mail) = self.mail() {
            mail.skipped.fetch_add(1, Ordering::Relaxed);
        }
        if damaged {
            tracing::warn!("skipped an unexpired entry whose shared body is missing (damage)");
        } else {
            tracing::debug!("skipped an entry whose shared body expiry or an ack deleted");
        }
    }

    /// Entries reads skipped because their shared body was gone (for the metrics).
    pub fn bodies_missing(&self) -> u64 {
        self.mail().map_or(0, |m| m.skipped.load(Ordering::Relaxed))
    }

    /// Deletes the bodies that expired a day (`LEAKED_BODY_GRACE_MS`) before `now` or
    /// earlier whatever their count (a count that drifted above the entries left
    /// would keep them forever), oldest first, up to 10 statements of 1 000 per call,
    /// their bytes off the totals as a release takes them; returns how many. A
    /// release of an entry whose body is gone deletes the entry and nothing else.
    pub fn sweep_leaked_bodies(&self, now: UnixMillis) -> StoreResult<u64> {
        let mail = self.mail()?;
        let before = to_db(now.saturating_sub(LEAKED_BODY_GRACE_MS));
        let mut total = 0u64;
        for _ in 0..LEAK_PAGES {
            let rows = self.run(self.rows(SWEEP_LEAKED, &[&before, &LEAK_PAGE, &mail.slot]))?;
            let row = rows
                .first()
                .ok_or_else(|| StoreError::Backend("leaked bodies: no row".into()))?;
            let (n, bytes): (i64, i64) = (self.col(row, 0)?, self.col(row, 1)?);
            if n > 0 {
                mail.totals.apply(TotalsDelta {
                    bytes: -bytes,
                    ..Default::default()
                });
            }
            total += n.max(0) as u64;
            if n < LEAK_PAGE {
                break;
            }
        }
        if total > 0 {
            tracing::warn!(
                bodies = total,
                "deleted shared bodies a day past their expiry that no entry released"
            );
        }
        Ok(total)
    }

    /// The bodies of `ids` that exist, by id.
    pub(super) fn bodies(&self, ids: &[Vec<u8>]) -> StoreResult<HashMap<Vec<u8>, Bytes>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self.run(self.rows(READ_BODIES, &[&ids]))?;
        rows.iter()
            .map(|r| {
                let id: Vec<u8> = self.col(r, 0)?;
                Ok((id, Bytes::from(self.col::<Vec<u8>>(r, 1)?)))
            })
            .collect()
    }

    /// Shared bodies held (a count over the table: for tests and checks).
    pub(super) fn count_bodies(&self) -> StoreResult<u64> {
        let rows = self.run(self.rows("SELECT count(*) FROM shared_bodies", &[]))?;
        match rows.first() {
            Some(r) => Ok(self.col::<i64>(r, 0)?.max(0) as u64),
            None => Ok(0),
        }
    }
}
