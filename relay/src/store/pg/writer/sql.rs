//! The writer's statements and the `unnest` columns they take.

use tern_proto::{DeviceAddress, MessageId};

use super::super::bodies::{deleted_cols, release};

/// Per-mailbox columns for `unnest`.
#[derive(Default)]
pub(super) struct HeadCols<'a> {
    pub(super) accounts: Vec<&'a [u8]>,
    pub(super) devices: Vec<i64>,
    pub(super) a: Vec<i64>,
    pub(super) b: Vec<i64>,
    pub(super) c: Vec<i64>,
}

impl<'a> HeadCols<'a> {
    pub(super) fn push(&mut self, to: &'a DeviceAddress, a: i64, b: i64, c: i64) {
        self.accounts.push(to.account.as_bytes().as_slice());
        self.devices.push(i64::from(to.device.get()));
        self.a.push(a);
        self.b.push(b);
        self.c.push(c);
    }
}

/// The rows [`INSERT_MESSAGES`] takes; an entry of a shared body has its part as
/// payload and the body's id and length.
#[derive(Default)]
pub(super) struct InsertCols<'a> {
    pub(super) accounts: Vec<&'a [u8]>,
    pub(super) devices: Vec<i64>,
    pub(super) seqs: Vec<i64>,
    pub(super) ids: Vec<&'a [u8]>,
    pub(super) payloads: Vec<&'a [u8]>,
    pub(super) accepted: Vec<i64>,
    pub(super) expires: Vec<i64>,
    pub(super) body_ids: Vec<Option<&'a [u8]>>,
    pub(super) body_lens: Vec<Option<i64>>,
}

/// One row of [`InsertCols`].
pub(super) struct Row<'a> {
    pub(super) seq: i64,
    pub(super) id: &'a MessageId,
    pub(super) payload: &'a [u8],
    pub(super) at: i64,
    pub(super) until: i64,
    /// The shared body's id and length, for an entry.
    pub(super) body: Option<(&'a [u8], i64)>,
}

impl<'a> InsertCols<'a> {
    pub(super) fn push(&mut self, to: &'a DeviceAddress, r: Row<'a>) {
        self.accounts.push(to.account.as_bytes().as_slice());
        self.devices.push(i64::from(to.device.get()));
        self.seqs.push(r.seq);
        self.ids.push(r.id.0.as_slice());
        self.payloads.push(r.payload);
        self.accepted.push(r.at);
        self.expires.push(r.until);
        self.body_ids.push(r.body.map(|b| b.0));
        self.body_lens.push(r.body.map(|b| b.1));
    }
}

// The rows come sorted by (account, device), so the locks are taken in that order. A
// closed head (its mailbox deleted, V15) is locked but left alone and not returned.
pub(super) const UPSERT_HEADS: &str =
    "INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes) \
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) \
     ON CONFLICT (account, device) DO UPDATE SET last_seq = h.last_seq + EXCLUDED.last_seq, \
       messages = h.messages + EXCLUDED.messages, bytes = h.bytes + EXCLUDED.bytes \
     WHERE h.closed_at IS NULL \
     RETURNING account, device, last_seq, messages, bytes";

/// (The devices, `$2`, are not needed here; the condition on them only gives both
/// checks the same parameters.)
pub(super) const INTENTS: &str = "SELECT account, NULL::int8 FROM account_deletions \
     WHERE account = ANY($1::bytea[]) AND cardinality($2::int8[]) >= 0";

/// Also a mailbox whose device row is gone (a removed device: its removal deletes the
/// row before it purges the mailbox, so a send that resolved it earlier leaves nothing).
pub(super) const INTENTS_OR_NO_ROW: &str =
    "SELECT t.a, t.dv FROM unnest($1::bytea[], $2::int8[]) t(a, dv) \
     WHERE EXISTS (SELECT 1 FROM account_deletions d WHERE d.account = t.a) \
       OR NOT EXISTS (SELECT 1 FROM accounts c WHERE c.account = t.a) \
       OR NOT EXISTS (SELECT 1 FROM devices v WHERE v.account = t.a AND v.device = t.dv)";

pub(super) const INSERT_MESSAGES: &str = "INSERT INTO messages \
     (account, device, seq, message_id, payload, accepted_at, expires_at, body_id, body_len) \
     SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::bytea[], $5::bytea[], \
       $6::int8[], $7::int8[], $8::bytea[], $9::int8[])";

// Rows of kind 0 are the deleted messages (account, device, seq, the mailbox's bytes,
// the relay's bytes: the part only), of kind 2 the bodies deleted with their last
// entry (their length).
pub(super) const DELETE_MESSAGES: &str = concat!(
    "WITH d AS (DELETE FROM messages m \
       USING unnest($1::bytea[], $2::int8[], $3::int8[]) k(a, dv, s) \
       WHERE m.account = k.a AND m.device = k.dv AND m.seq = k.s \
       RETURNING m.account, m.device, m.seq, ",
    deleted_cols!(),
    ")",
    release!(),
    "SELECT 0, account, device, seq, p + bl, p FROM d \
     UNION ALL SELECT 2, NULL, NULL, len, 0, 0 FROM gone"
);

pub(super) const DECREMENT_HEADS: &str = "UPDATE mailbox_heads h \
     SET messages = h.messages - d.m, bytes = h.bytes - d.b \
     FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[]) d(a, dv, m, b) \
     WHERE h.account = d.a AND h.device = d.dv";

// The heads of a batch of removals, locked in (account, device) order.
pub(super) const LOCK_HEADS: &str = "SELECT 1 FROM mailbox_heads h \
     JOIN unnest($1::bytea[], $2::int8[]) d(a, dv) ON h.account = d.a AND h.device = d.dv \
     ORDER BY h.account, h.device FOR UPDATE OF h";

// After LOCK_HEADS: the rows and their bodies, then their heads' counts (a head exists
// while its mailbox has rows, so the insert never adds one), then the totals slot.
// Rows of kind 0 are the deleted messages (seq, the mailbox's bytes, the relay's), of
// kind 1 the heads after (messages, bytes), of kind 2 the bodies deleted (length).
pub(super) const REMOVE: &str = concat!(
    "WITH d AS (DELETE FROM messages m \
       USING unnest($1::bytea[], $2::int8[], $3::int8[]) k(a, dv, s) \
       WHERE m.account = k.a AND m.device = k.dv AND m.seq = k.s \
       RETURNING m.account, m.device, m.seq, ",
    deleted_cols!(),
    ")",
    release!(),
    ", per AS (SELECT account, device, count(*)::int8 AS c, sum(p + bl)::int8 AS b, \
         sum(p)::int8 AS own FROM d GROUP BY account, device), \
     dec AS (INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes) \
       SELECT account, device, 0, -c, -b FROM per ORDER BY account, device \
       ON CONFLICT (account, device) DO UPDATE \
       SET messages = h.messages + EXCLUDED.messages, bytes = h.bytes + EXCLUDED.bytes \
       RETURNING h.account, h.device, h.messages, h.bytes), \
     tot AS (UPDATE mailbox_totals t SET messages = t.messages - s.c, \
       bytes = t.bytes - s.b, mailboxes = t.mailboxes - s.e \
       FROM (SELECT coalesce(sum(per.c), 0)::int8 AS c, \
         (coalesce(sum(per.own), 0) + (SELECT coalesce(sum(len), 0) FROM gone))::int8 AS b, \
         count(*) FILTER (WHERE dec.messages = 0)::int8 AS e \
         FROM dec JOIN per USING (account, device)) s \
       WHERE t.slot = $4 AND s.c > 0) \
     SELECT 0, account, device, seq, p + bl, p FROM d \
     UNION ALL SELECT 1, account, device, messages, bytes, 0 FROM dec \
     UNION ALL SELECT 2, NULL, NULL, len, 0, 0 FROM gone"
);

pub(super) const FORGET_EMPTY_HEADS: &str = "DELETE FROM mailbox_heads h \
     USING unnest($1::bytea[], $2::int8[]) d(a, dv) \
     WHERE h.account = d.a AND h.device = d.dv AND h.messages = 0 AND h.closed_at IS NULL";

/// Rows of `mailbox_totals` (V2 creates 0..64).
pub(super) const TOTAL_SLOTS: i32 = 64;

/// Adds to a totals slot: slot, messages, bytes, mailboxes.
pub(crate) const ADD_TOTALS: &str = "UPDATE mailbox_totals SET messages = messages + $2, \
     bytes = bytes + $3, mailboxes = mailboxes + $4 WHERE slot = $1";
