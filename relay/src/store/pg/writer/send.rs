//! A batch with sends: one statement that takes the seqs and writes the rows, then the
//! batch's removals if any, then COMMIT, all sent at once (one round trip), on a
//! connection that commits without waiting for the flush; then a durability barrier
//! before the callers hear.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tern_proto::DeviceAddress;
use tokio::sync::oneshot;

use super::acks::removed;
use super::sql::{NOTIFY, REMOVE};
use super::{
    addr_of, removal_cols, AccountCheck, Failure, Lane, Op, Open, Outcome, Part, TotalsDelta,
    Writer,
};
use crate::store::pg::keys::params;
use crate::store::pg::mailboxes::usage_of;

/// How long a batch waits for its NOTIFY after its COMMIT was answered, at most.
const NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Which mailboxes take sends, as an SQL condition on `s.a` (account) and `s.dv`
/// (device), evaluated with the statement's snapshot. That snapshot predates the head
/// locks the statement may wait for, so a deletion that completes meanwhile is not
/// seen here: its closed head (V15) refuses the send instead.
fn check(accounts: AccountCheck) -> &'static str {
    macro_rules! intents {
        () => {
            "NOT EXISTS (SELECT 1 FROM account_deletions d WHERE d.account = s.a)"
        };
    }
    match accounts {
        AccountCheck::None => "true",
        AccountCheck::Intents => intents!(),
        // Also a mailbox whose device row is gone (a removed device: its removal
        // deletes the row before it purges the mailbox).
        AccountCheck::IntentsAndRows => concat!(
            intents!(),
            " AND EXISTS (SELECT 1 FROM accounts c WHERE c.account = s.a) \
             AND EXISTS (SELECT 1 FROM devices v WHERE v.account = s.a AND v.device = s.dv)"
        ),
    }
}

/// The batch's statement for `accounts`. Parameters: the mailboxes, sorted by
/// (account, device) ($1 account, $2 device, $3 messages appended, $4 their bytes as
/// the head counts them, $5 whether the batch also removes from it); the message rows
/// ($6 account, $7 device, $8 how far below the mailbox's new last seq, $9 message id,
/// $10 payload, $11 accepted at, $12 expires at, $13 shared body id, $14 its length);
/// the shared bodies ($15 id, $16 payload, $17 expires at); $18 the totals slot.
///
/// `h` locks every head of the batch in key order (as every mailbox transaction takes
/// them) and takes the seqs, from at least the session's seq floor (`tern.seq_floor`,
/// see `take_epoch` in `store::pg`; a session without one fails the
/// statement rather than number below it); a closed head is locked but left alone and returns
/// nothing, and a mailbox refused by the check is not touched unless the batch also
/// removes from it (then locked with nothing added, so that the removals take no
/// head out of order). `m` numbers each mailbox's rows below its new last seq, `sb`
/// stores each body with the entries written, `tot` adds to the totals slot what was
/// written. Rows of kind 1 are the heads (with whether they took the sends), of kind
/// 3 what the totals slot was given (messages, bytes, mailboxes), of kind 4 the
/// session's seq floor (which the durability barrier checks), of kind 5 whether the
/// other nodes' news was noted ([`notes_sql`]: `$19`, `$20`).
pub(in crate::store::pg) fn send_sql(accounts: AccountCheck) -> String {
    format!(
        "WITH src AS (SELECT s.a, s.dv, s.n, s.b, s.r, ({check}) AS ok, \
             current_setting('tern.seq_floor')::int8 AS fl \
           FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::bool[]) \
             s(a, dv, n, b, r)), \
         h AS (INSERT INTO mailbox_heads AS h (account, device, last_seq, messages, bytes) \
           SELECT a, dv, CASE WHEN ok AND n > 0 THEN fl + n ELSE 0 END, \
             CASE WHEN ok THEN n ELSE 0 END, CASE WHEN ok THEN b ELSE 0 END \
           FROM src WHERE ok OR r \
           ON CONFLICT (account, device) DO UPDATE \
           SET last_seq = greatest(h.last_seq, EXCLUDED.last_seq - EXCLUDED.messages) \
               + EXCLUDED.messages, \
             messages = h.messages + EXCLUDED.messages, bytes = h.bytes + EXCLUDED.bytes \
           WHERE h.closed_at IS NULL \
           RETURNING h.account, h.device, h.last_seq, h.messages, h.bytes), \
         hk AS (SELECT h.*, src.n, src.ok FROM h JOIN src ON src.a = h.account AND src.dv = h.device), \
         m AS (INSERT INTO messages (account, device, seq, message_id, payload, accepted_at, \
             expires_at, body_id, body_len) \
           SELECT r.a, r.dv, hk.last_seq - r.back, r.id, r.p, r.at, r.x, r.bid, r.bl \
           FROM unnest($6::bytea[], $7::int8[], $8::int8[], $9::bytea[], $10::bytea[], \
             $11::int8[], $12::int8[], $13::bytea[], $14::int8[]) r(a, dv, back, id, p, at, x, bid, bl) \
           JOIN hk ON hk.account = r.a AND hk.device = r.dv AND hk.ok \
           RETURNING account, device, seq, message_id, accepted_at, expires_at, body_id, \
             CASE WHEN $20::text IS NOT NULL AND octet_length(payload) <= {carried_bytes} \
               THEN payload END AS payload, \
             octet_length(payload)::int8 AS own), \
         refs AS (SELECT body_id, count(*)::int8 AS n FROM m WHERE body_id IS NOT NULL \
           GROUP BY body_id), \
         sb AS (INSERT INTO shared_bodies (id, payload, expires_at, refs) \
           SELECT b.id, b.p, b.x, refs.n \
           FROM unnest($15::bytea[], $16::bytea[], $17::int8[]) b(id, p, x) \
           JOIN refs ON refs.body_id = b.id \
           RETURNING octet_length(payload)::int8 AS len), \
         tot AS (UPDATE mailbox_totals t SET messages = t.messages + mm.c, \
             bytes = t.bytes + mm.own + bb.len, mailboxes = t.mailboxes + ee.e \
           FROM (SELECT count(*)::int8 AS c, coalesce(sum(own), 0)::int8 AS own FROM m) mm, \
             (SELECT coalesce(sum(len), 0)::int8 AS len FROM sb) bb, \
             (SELECT count(*)::int8 AS e FROM hk WHERE ok AND n > 0 AND messages = n) ee \
           WHERE t.slot = $18::int4 AND mm.c > 0 \
           RETURNING mm.c, mm.own + bb.len AS b, ee.e), \
         {notes} \
         SELECT 1, account, device, last_seq, messages, bytes, ok FROM hk \
         UNION ALL SELECT 3, NULL, NULL, c, b, e, true FROM tot \
         UNION ALL SELECT 4, NULL, NULL, current_setting('tern.seq_floor')::int8, 0, 0, true \
         UNION ALL SELECT 5, NULL, NULL, 0, 0, 0, v IS NOT NULL FROM note",
        check = check(accounts),
        carried_bytes = CARRIED_BYTES,
        notes = notes_sql(),
    )
}

/// The other nodes' news of a batch, made by [`send_sql`] as it writes (the rows'
/// seqs are known only there) and kept in the session setting `tern.note` for the
/// NOTIFY that follows the COMMIT ([`NOTIFY`]), unless `$20` (the origin, `<8
/// hex>;`) is null (nobody to tell: nothing is made): `$19` (the batch's nonce and a
/// space), then notes separated by spaces, each `$20` and entries separated by
/// commas. An entry is a mailbox that took sends, `m<address hex>`, followed by
/// `,r<address hex>:<seq before>:<rows>` when its rows are few, small, not shared and
/// their text fits (older nodes skip that part and read the mailbox): rows
/// `<seq>.<message id hex>.<accepted at>.<expires at>.<payload base64>` separated by `~` (the base64 keeps PostgreSQL's line breaks,
/// which cost less to keep than to strip). The seq before is the head's last seq less
/// the rows appended: the mailbox's last seq before them, or the seq floor when that
/// moved the head up (above any seq a reader can have seen, so it matches none).
///
/// Materialized, each entry is made once (inlined, its subquery would run wherever
/// the entry is named). Chunks: an entry is at most [`ENTRY_MAX`] bytes, and a note
/// gathers the entries whose running total of bytes falls in one [`ENTRY_MAX`] step,
/// so it holds less than two steps and the origin, under PostgreSQL's 8,000-byte
/// NOTIFY payload.
fn notes_sql() -> String {
    format!(
        "car AS (SELECT m.account, m.device FROM m GROUP BY m.account, m.device \
           HAVING count(*) <= {rows} AND sum(m.own) <= {bytes} AND bool_and(m.body_id IS NULL)), \
         ent AS MATERIALIZED (SELECT hk.account || substr(int8send(hk.device), 5) AS k, \
             hk.last_seq - hk.n AS before, \
             (SELECT string_agg(m.seq || '.' || encode(m.message_id, 'hex') || '.' || \
                 m.accepted_at || '.' || m.expires_at || '.' || \
                 encode(m.payload, 'base64'), '~' ORDER BY m.seq) \
               FROM m JOIN car USING (account, device) \
               WHERE m.account = hk.account AND m.device = hk.device) AS rows \
           FROM hk WHERE $20::text IS NOT NULL AND hk.ok AND hk.n > 0), \
         ents AS MATERIALIZED (SELECT k, 'm' || encode(k, 'hex') || \
             CASE WHEN octet_length(rows) <= {carried} \
             THEN ',r' || encode(k, 'hex') || ':' || before || ':' || rows ELSE '' END AS e \
           FROM ent), \
         chunks AS (SELECT k, e, sum(octet_length(e) + 1) OVER (ORDER BY k) / {entry} AS c \
           FROM ents), \
         note AS (SELECT set_config('tern.note', $19::text || coalesce((SELECT \
             string_agg(x, ' ') FROM (SELECT $20::text || string_agg(e, ',' ORDER BY k) AS x \
               FROM chunks GROUP BY c) q), ''), false) AS v WHERE $20::text IS NOT NULL)",
        rows = CARRIED_ROWS,
        bytes = CARRIED_BYTES,
        carried = ENTRY_MAX - 150,
        entry = ENTRY_MAX,
    )
}

/// The most rows of one mailbox a note carries.
const CARRIED_ROWS: usize = 8;
/// The most payload bytes of one mailbox a note carries.
const CARRIED_BYTES: usize = 2700;

/// The longest entry of a note, in bytes (see [`notes_sql`]).
const ENTRY_MAX: usize = 3900;

/// The parameters of [`send_sql`].
#[derive(Default)]
struct SendCols<'a> {
    accounts: Vec<&'a [u8]>,
    devices: Vec<i64>,
    counts: Vec<i64>,
    bytes: Vec<i64>,
    removes: Vec<bool>,
    m_accounts: Vec<&'a [u8]>,
    m_devices: Vec<i64>,
    m_back: Vec<i64>,
    m_ids: Vec<&'a [u8]>,
    m_payloads: Vec<&'a [u8]>,
    m_accepted: Vec<i64>,
    m_expires: Vec<i64>,
    m_body_ids: Vec<Option<&'a [u8]>>,
    m_body_lens: Vec<Option<i64>>,
    b_ids: Vec<&'a [u8]>,
    b_payloads: Vec<&'a [u8]>,
    b_expires: Vec<i64>,
}

/// One message row of a mailbox: its id, payload, times, and shared body (id, length).
struct Row<'a> {
    id: &'a [u8],
    payload: &'a [u8],
    at: i64,
    until: i64,
    body: Option<(&'a [u8], i64)>,
}

impl<'a> SendCols<'a> {
    /// Every mailbox of the batch, and its rows numbered in queue order: the k-th of n
    /// appended to a mailbox gets its new last seq less n - k.
    fn of(ops: &'a [Op], parts: &'a BTreeMap<DeviceAddress, Part>) -> SendCols<'a> {
        let mut c = SendCols::default();
        for (to, part) in parts {
            let (account, device) = params(to);
            c.accounts.push(account);
            c.devices.push(device);
            c.counts.push(part.appended.0);
            c.bytes.push(part.appended.1);
            c.removes.push(!part.removes.is_empty());
            let mut back = part.appended.0;
            let mut push = |r: Row<'a>| {
                back -= 1;
                c.m_accounts.push(account);
                c.m_devices.push(device);
                c.m_back.push(back);
                c.m_ids.push(r.id);
                c.m_payloads.push(r.payload);
                c.m_accepted.push(r.at);
                c.m_expires.push(r.until);
                c.m_body_ids.push(r.body.map(|b| b.0));
                c.m_body_lens.push(r.body.map(|b| b.1));
            };
            for &(i, j) in &part.appends {
                match ops.get(i) {
                    Some(Op::Append {
                        msgs,
                        accepted_at,
                        expires_at,
                        ..
                    }) => {
                        for m in msgs {
                            push(Row {
                                id: m.message_id.0.as_slice(),
                                payload: &m.payload,
                                at: *accepted_at,
                                until: *expires_at,
                                body: None,
                            });
                        }
                    }
                    Some(Op::AppendShared {
                        id,
                        message_id,
                        body,
                        entries,
                        accepted_at,
                        expires_at,
                        ..
                    }) => {
                        if let Some(e) = entries.get(j) {
                            push(Row {
                                id: message_id.0.as_slice(),
                                payload: &e.part,
                                at: *accepted_at,
                                until: *expires_at,
                                body: Some((id.as_slice(), body.len() as i64)),
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        for op in ops {
            if let Op::AppendShared {
                id,
                body,
                expires_at,
                ..
            } = op
            {
                c.b_ids.push(id.as_slice());
                c.b_payloads.push(body);
                c.b_expires.push(*expires_at);
            }
        }
        c
    }
}

impl Writer {
    /// A batch with sends (and maybe removals): `BEGIN`, [`send_sql`], the removals
    /// ([`REMOVE`]: its heads are locked already), `COMMIT`, pipelined. `locked` hears
    /// once the statement has answered (its heads are held), so that the next batch
    /// takes its locks after this one.
    pub(super) async fn send(
        &self,
        ops: &[Op],
        parts: &BTreeMap<DeviceAddress, Part>,
        lane: Lane,
        locked: oneshot::Sender<()>,
    ) -> Result<Outcome, Failure> {
        let started = Instant::now();
        let totals_slot = lane.totals_row(self.slot);
        let cols = SendCols::of(ops, parts);
        let del = removal_cols(parts);
        // Wrapped before BEGIN: a BEGIN given up at the deadline must not leave its
        // connection in the pool inside a transaction nobody commits.
        // Commits without waiting for the flush: the heads are free for the next
        // batch (and the other nodes' acks) at once; the barrier below makes the
        // batch durable before anyone hears.
        let open = Open::from(&self.lazy, &self.hosts).await?;
        let tx = open.client()?;
        // Prepared first (once per connection), so that each statement below goes
        // out when first polled, in the order written.
        let send_st = tx.prepare_cached(&self.send_sql).await?;
        let remove_st = tx.prepare_cached(REMOVE).await?;
        // The batch's mailboxes with appends: told of after the COMMIT, here and on
        // the other nodes.
        let appended: Vec<DeviceAddress> = parts
            .iter()
            .filter(|(_, p)| !p.appends.is_empty())
            .map(|(to, _)| *to)
            .collect();
        // The other nodes hear of the batch's mailboxes (with their rows, where small)
        // through the notes its statement leaves for the NOTIFY after the COMMIT,
        // started by a nonce of the batch's own.
        let notes = match self.notes.get() {
            Some(n) if !appended.is_empty() => match (n.origin)() {
                Some(origin) => match tx.prepare_cached(NOTIFY).await {
                    Ok(st) => {
                        let nonce = format!("{:016x} ", rand::random::<u64>());
                        Some((n.channel, origin, nonce, st))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a batch's cross-node hints were not sent");
                        None
                    }
                },
                None => None,
            },
            _ => None,
        };
        let origin = notes.as_ref().map(|(_, origin, _, _)| origin.as_str());
        let nonce = notes.as_ref().map(|(_, _, nonce, _)| nonce.as_str());
        let begin = self.begin(started)?;
        let c = &cols;
        let send = async {
            let rows = tx
                .query(
                    &send_st,
                    &[
                        &c.accounts,
                        &c.devices,
                        &c.counts,
                        &c.bytes,
                        &c.removes,
                        &c.m_accounts,
                        &c.m_devices,
                        &c.m_back,
                        &c.m_ids,
                        &c.m_payloads,
                        &c.m_accepted,
                        &c.m_expires,
                        &c.m_body_ids,
                        &c.m_body_lens,
                        &c.b_ids,
                        &c.b_payloads,
                        &c.b_expires,
                        &totals_slot,
                        &nonce,
                        &origin,
                    ],
                )
                .await;
            let _ = locked.send(());
            rows
        };
        let remove = async {
            if del.accounts.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(
                &remove_st,
                &[&del.accounts, &del.devices, &del.a, &totals_slot],
            )
            .await
        };
        // After the COMMIT, in a transaction of its own: its failure (a full
        // notification queue) loses hints, which the re-check covers, never the batch,
        // and the batch waits for it at most NOTIFY_WAIT after the COMMIT's answer.
        let (commit_answered, answered) = oneshot::channel::<()>();
        let commit = async {
            let r = tx.batch_execute("COMMIT").await;
            let _ = commit_answered.send(());
            r
        };
        let notify = async {
            let Some((channel, _, nonce, st)) = &notes else {
                return;
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [channel, nonce];
            let sent = tx.execute(st, &params);
            tokio::pin!(sent);
            let waited = async {
                let _ = answered.await;
                tokio::time::sleep(NOTIFY_WAIT).await;
            };
            // Biased: polled first, the NOTIFY goes out right behind the COMMIT.
            let outcome = tokio::select! {
                biased;
                r = &mut sent => r.map(drop).map_err(|e| e.to_string()),
                () = waited => Err(format!("no answer within {NOTIFY_WAIT:?}")),
            };
            if let Err(e) = outcome {
                tracing::debug!(error = %e, "a batch's cross-node hints were not sent");
            }
        };
        // Should a statement fail, the server answers the COMMIT of the aborted
        // transaction with a rollback: every result is checked before the batch counts
        // as committed.
        let (began, sent, removed_rows, committed, ()) =
            futures::join!(tx.batch_execute(&begin), send, remove, commit, notify);
        began?;
        let sent = sent?;
        let removed_rows = removed_rows?;
        committed?;
        open.committed();
        drop(lane);
        let mut out = Outcome::default();
        let mut delta = TotalsDelta::default();
        let mut floor = None;
        for row in &sent {
            let kind: i32 = row.try_get(0)?;
            if kind == 4 {
                floor = Some(row.try_get::<_, i64>(3)?);
                continue;
            }
            if kind == 5 {
                // The notes for the other nodes (read by the NOTIFY).
                continue;
            }
            if kind == 3 {
                delta.messages += row.try_get::<_, i64>(3)?;
                delta.bytes += row.try_get::<_, i64>(4)?;
                delta.mailboxes += row.try_get::<_, i64>(5)?;
                continue;
            }
            if !row.try_get::<_, bool>(6)? {
                continue;
            }
            let to = addr_of(row.try_get(1)?, row.try_get(2)?).map_err(Failure::Other)?;
            out.heads
                .insert(to, (row.try_get(3)?, row.try_get(4)?, row.try_get(5)?));
        }
        // Refused: a mailbox the check turned away, or whose head is closed.
        out.refused = parts
            .iter()
            .filter(|(to, p)| !p.appends.is_empty() && !out.heads.contains_key(*to))
            .map(|(to, _)| *to)
            .collect();
        let recorded = removed(&removed_rows, &mut out, &mut delta, &self.usage)?;
        self.totals.apply(delta);
        // Exact as of this commit (the heads were locked and changed by it); where
        // the batch's removals changed the mailbox, `removed` recorded the heads after.
        for (to, &(_, messages, bytes)) in &out.heads {
            if !recorded.contains(to) {
                self.usage.set(*to, usage_of(messages, bytes));
            }
        }
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let rows = ops.iter().map(Op::rows).sum::<usize>() as u64;
        self.stats.rows.fetch_add(rows, Ordering::Relaxed);
        // Readable now: connected recipients are woken without waiting for the flush.
        // Should the commit be lost with the WAL's tail, its seqs are never handed out
        // again (seq epochs), and its sender, never answered, sends again.
        if let Some(hook) = self.visible.get() {
            let took: Vec<DeviceAddress> = appended
                .into_iter()
                .filter(|to| out.heads.contains_key(to))
                .collect();
            if !took.is_empty() {
                hook(&took);
            }
        }
        // Committed and visible (counted above even should the barrier fail); durable
        // before answered. A send answered `UNAVAILABLE` here may be stored: its retry
        // is stored again under its message id, and the recipient drops the copy.
        self.durable(floor).await?;
        Ok(out)
    }
}
