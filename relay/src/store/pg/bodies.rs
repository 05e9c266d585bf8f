//! Shared bodies on PostgreSQL (`migrations/V13__shared_bodies.sql`): a multi-recipient
//! append stores its body once in `shared_bodies` and one `messages` row per mailbox
//! (an entry: its part as `payload`, and `body_id`, `body_len`).
//!
//! - The append goes through the [writer](super::writer) like any other: the heads
//!   locked in (account, device) order, then the body (`refs` = the entries written)
//!   and the entries, in the batch's one transaction.
//! - Every statement that deletes messages (ack, expiry, purge) releases their bodies
//!   in the same statement ([`release!`]): the bodies' rows are locked in id order
//!   (after the heads, which every mailbox transaction takes first, so two
//!   transactions never wait on each other in a cycle), `refs` goes down by the
//!   entries deleted, and a body whose count reaches 0 is deleted.
//! - A mailbox counts an entry as (part + body) bytes; the relay-wide totals count
//!   the body once: added by the append, subtracted by the deletion that takes it.
//! - A read fetches the page's bodies by id in a second statement; an entry whose
//!   body is gone (it cannot be, short of damage) is skipped, as the log does.

use std::collections::HashMap;

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};
use tokio::sync::oneshot;

use super::mailboxes::from_db;
use super::writer::Op;
use super::PgBackend;
use crate::store::{SharedAppend, SharedEntry, StoreError, StoreResult, StoredMessage};

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

/// Inserts bodies: id, payload, expires at, refs.
pub(super) const INSERT_BODIES: &str = "INSERT INTO shared_bodies (id, payload, expires_at, refs) \
     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::int8[])";

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
        let rows = self.run(self.rows(
            "SELECT seq, message_id, payload, accepted_at, expires_at, body_id FROM messages \
             WHERE account = $1 AND device = $2 AND seq > $3 ORDER BY seq LIMIT $4",
            &[&account, &device, &after, &max],
        ))?;
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
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let shared_body = match self.col::<Option<Vec<u8>>>(r, 5)? {
                None => None,
                // Deleted since the page was read (the entry went with it): skipped.
                Some(id) => match bodies.get(&id) {
                    Some(b) => Some(b.clone()),
                    None => continue,
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

/// One shared append's body as the writer inserts it, once its refused entries are
/// known.
pub(super) struct BodyRow<'a> {
    pub(super) id: &'a [u8],
    pub(super) payload: &'a [u8],
    pub(super) expires_at: i64,
    pub(super) refs: i64,
}

/// Entries of `entries` whose mailbox is not in `refused`.
pub(super) fn kept(
    entries: &[SharedEntry],
    refused: &std::collections::HashSet<DeviceAddress>,
) -> i64 {
    entries.iter().filter(|e| !refused.contains(&e.to)).count() as i64
}
