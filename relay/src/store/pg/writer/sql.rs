//! The writer's statements and the `unnest` columns they take.

use tern_proto::DeviceAddress;

use super::super::bodies::{deleted_cols, release};

/// Per-mailbox columns for `unnest`: the mailbox and one number (a seq).
#[derive(Default)]
pub(super) struct HeadCols<'a> {
    pub(super) accounts: Vec<&'a [u8]>,
    pub(super) devices: Vec<i64>,
    pub(super) a: Vec<i64>,
}

impl<'a> HeadCols<'a> {
    pub(super) fn push(&mut self, to: &'a DeviceAddress, a: i64) {
        let (account, device) = crate::store::pg::keys::params(to);
        self.accounts.push(account);
        self.devices.push(device);
        self.a.push(a);
    }
}

// The heads of a batch of removals, locked in (account, device) order; on each, the
// session's seq floor (which the durability barrier checks).
pub(super) const LOCK_HEADS: &str = "SELECT current_setting('tern.seq_floor')::int8 \
     FROM mailbox_heads h \
     JOIN unnest($1::bytea[], $2::int8[]) d(a, dv) ON h.account = d.a AND h.device = d.dv \
     ORDER BY h.account, h.device FOR UPDATE OF h";

// After the heads are locked (LOCK_HEADS, or a send statement): the totals slot `sl`
// (locked before any body, as every transaction orders them: heads, slot, bodies; the
// filter on it is always true, a one-time filter run before `d` reads a row), the
// rows and their bodies, then their heads' counts (a head exists while its mailbox has
// rows, so the insert never adds one), then the totals slot's counts. Rows of kind 0 are
// the deleted messages (seq, the mailbox's bytes, the relay's), of kind 1 the heads
// after (messages, bytes), of kind 2 the bodies deleted (length).
pub(super) const REMOVE: &str = concat!(
    "WITH sl AS (SELECT 1 FROM mailbox_totals WHERE slot = $4 FOR UPDATE), \
     d AS (DELETE FROM messages m \
       USING unnest($1::bytea[], $2::int8[], $3::int8[]) k(a, dv, s) \
       WHERE m.account = k.a AND m.device = k.dv AND m.seq = k.s \
         AND (SELECT count(*) FROM sl) >= 0 \
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

/// A batch's cross-node hints, after its `COMMIT` (`CommitNotes`): the notes its send
/// statement left in `tern.note` (see `notes_sql`), if that batch's nonce (`$2`, with
/// its space) starts them, on channel `$1`. A batch that failed left no note of its
/// own (its setting rolled back), so an older note is never sent twice.
pub(super) const NOTIFY: &str = "SELECT pg_notify($1, n) \
     FROM unnest(string_to_array(substr(current_setting('tern.note', true), \
       length($2::text) + 1), ' ')) n \
     WHERE starts_with(current_setting('tern.note', true), $2::text) AND n <> ''";

/// Rows of `mailbox_totals` (V2 creates 0..64).
pub(super) const TOTAL_SLOTS: i32 = 64;

/// Adds to a totals slot: slot, messages, bytes, mailboxes.
pub(crate) const ADD_TOTALS: &str = "UPDATE mailbox_totals SET messages = messages + $2, \
     bytes = bytes + $3, mailboxes = mailboxes + $4 WHERE slot = $1";

/// How the writer's statements are planned, as far as the engine lets us say: set for
/// the sessions of the writer's own connections ([`Plans::options`]), which run
/// nothing else.
///
/// Generic plans ([`Plans::generic`]): its statements (data-modifying CTEs over
/// `unnest` arrays) would otherwise be planned again at every execution (PostgreSQL
/// keeps custom plans when the arrays' sizes change their estimates), about 1.2 ms of
/// database CPU per batch against 0.1 ms, where the generic plan (hash joins, index
/// lookups) suits any batch size.
///
/// No sequential scans ([`Plans::keyed`]): every row they touch is found by its key,
/// but a plan is made once per connection, and `messages` keeps few live rows among
/// many dead ones until autovacuum comes (a mailbox's rows live from send to ack).
/// Planned while the table looked empty, an ack's `DELETE` joined `messages` by a scan
/// of every page, dead rows and all: 1,300 pages per ack after 15,000 messages,
/// growing until the next vacuum and analyze.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(in crate::store::pg) struct Plans {
    /// `plan_cache_mode` is known (PostgreSQL 12 or later; YugabyteDB 2.25,
    /// CockroachDB 23.2).
    pub(in crate::store::pg) generic: bool,
    /// `enable_seqscan` is known.
    pub(in crate::store::pg) keyed: bool,
}

impl Plans {
    /// The session options (`-c name=value`, each with a leading space) that say so.
    pub(in crate::store::pg) fn options(self) -> String {
        let mut out = String::new();
        if self.generic {
            out.push_str(" -c plan_cache_mode=force_generic_plan");
        }
        if self.keyed {
            out.push_str(" -c enable_seqscan=off");
        }
        out
    }
}

/// How the writer begins a transaction whose statements may each run `each`.
pub(in crate::store::pg) fn begin_for(each: std::time::Duration) -> String {
    let each = each.as_millis().max(1);
    format!("BEGIN; SET LOCAL statement_timeout = {each}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use std::time::Duration;

    use super::super::{send_sql, AccountCheck};
    use super::{begin_for, Plans, LOCK_HEADS, REMOVE};
    use crate::store::pg::testdb::{db, deletions_table, node};

    /// The writer's statements find every row by its key whatever the statistics say:
    /// planned on a fresh database (empty tables, as at a relay's first batches) on
    /// the writer's connections, none of them scans a table. Without
    /// `enable_seqscan = off`, an ack's `DELETE` joined `messages` by a scan of every
    /// page (see [`Plans`]).
    #[test]
    fn the_writers_statements_scan_no_table_when_planned_on_empty_tables() {
        let (_pg, opts) = db();
        deletions_table(&opts);
        let b = node(&opts, "a");
        let statements = [
            ("send", send_sql(AccountCheck::Intents), 20),
            ("remove", REMOVE.to_owned(), 4),
            ("lock", LOCK_HEADS.to_owned(), 2),
        ];
        let plans = Plans {
            generic: true,
            keyed: true,
        };
        let explained = b
            .run(async {
                // The writer's own kind of connection.
                let lazy = b.lazy_commit_pool(1, plans)?;
                let c = lazy
                    .get()
                    .await
                    .map_err(|e| crate::store::pg::pool_error(e, "the test's database"))?;
                let mut out = Vec::new();
                for (name, statement, params) in &statements {
                    let nulls = vec!["NULL"; *params].join(", ");
                    let begin = begin_for(Duration::from_secs(5));
                    let setup = format!("{begin}; PREPARE {name} AS {statement}");
                    c.batch_execute(&setup).await.map_err(|e| b.classify(&e))?;
                    let rows = c
                        .query(&format!("EXPLAIN EXECUTE {name}({nulls})"), &[])
                        .await
                        .map_err(|e| b.classify(&e))?;
                    c.batch_execute(&format!("ROLLBACK; DEALLOCATE {name}"))
                        .await
                        .map_err(|e| b.classify(&e))?;
                    let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    out.push((*name, plan.join("\n")));
                }
                Ok(out)
            })
            .expect("explain");
        for (name, plan) in explained {
            assert!(plan.contains("Index"), "{name} uses an index:\n{plan}");
            assert!(!plan.contains("Seq Scan"), "{name} scans a table:\n{plan}");
        }
    }
}
