//! Mailboxes on a real PostgreSQL: the conformance rules, shared commits, seq order
//! across nodes, the expiry index, deletion intents, and a database that goes away.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::testdb::{
    answer, append_pair, begin_deletion, db, deletions_table, execute, node, one_batch, sql,
};
use super::*;
use crate::store::conformance::{self, addr, msg};
use crate::store::{Envelope, MailboxStore, Usage};

#[test]
fn conformance_rules() {
    let (pg, opts) = db();
    let a = node(&opts, "a");
    conformance::mailbox_rules(&a);
    conformance::seqs_are_per_mailbox(&a);
    conformance::purge_rules(&a);
    // Totals on an empty database of their own.
    pg.create_db("totals");
    let mut t = opts.clone();
    t.url = pg.conn_str("totals");
    conformance::totals_rules(&node(&t, "t"));
}

#[test]
fn seqs_grow_across_reopen() {
    let (_pg, opts) = db();
    conformance::seqs_grow_across_reopen(&|| Box::new(node(&opts, "a")));
}

#[test]
fn concurrent_appends_share_commits() {
    let (_pg, opts) = db();
    let a = Arc::new(node(&opts, "a"));
    // Eight threads that each wait for their append (the trait's sync path).
    let (c0, r0) = a.writer_stats();
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let a = a.clone();
            s.spawn(move || {
                for i in 0..125u32 {
                    let to = addr(100 + t, 1 + i % 4);
                    a.append(&to, &[msg(t, 64)], 1_000, 9_000).expect("append");
                }
            });
        }
    });
    let (c1, r1) = a.writer_stats();
    assert_eq!(r1 - r0, 1_000);
    assert!(c1 - c0 < 1_000, "{} commits for 1,000 appends", c1 - c0);
    // Eight threads that stage theirs and wait for all at the end (the relay's path).
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let a = a.clone();
            s.spawn(move || {
                let staged: Vec<_> = (0..125u32)
                    .map(|i| {
                        let to = addr(100 + t, 1 + i % 4);
                        a.queue_append(&to, &[msg(t, 64)], 1_000, 9_000)
                            .expect("stage")
                    })
                    .collect();
                for rx in staged {
                    a.run(async { rx.await.expect("answer") }).expect("append");
                }
            });
        }
    });
    let (c2, r2) = a.writer_stats();
    assert_eq!(r2 - r1, 1_000);
    assert!(
        c2 - c1 <= 50,
        "{} commits for 1,000 staged appends",
        c2 - c1
    );
    let total: i64 = sql(&a, "SELECT count(*) FROM messages")[0].get(0);
    assert_eq!(total, 2_000);
    // Every mailbox's seqs are 1..=n with no gap or repeat.
    let gaps: i64 = sql(
        &a,
        "SELECT count(*) FROM (SELECT account, device, max(seq) AS m, count(*) AS n \
         FROM messages GROUP BY account, device) g WHERE m <> n",
    )[0]
    .get(0);
    assert_eq!(gaps, 0);
}

#[test]
fn two_nodes_one_mailbox_keep_seq_order() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let to = addr(42, 1);
    let per_writer = 150u8;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let seen = std::thread::scope(|s| {
        for (i, n) in [&a, &b, &a, &b].into_iter().enumerate() {
            let done = &done;
            s.spawn(move || {
                for k in 0..per_writer {
                    n.append(&to, &[msg(k, 16 + i)], 1_000, 9_000)
                        .expect("append");
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // A reader on node a follows a cursor while the writers run.
        let reader = s.spawn(|| {
            let mut cursor = 0u64;
            let mut seen = Vec::new();
            for _ in 0..100_000 {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 4;
                let batch = a.read(&to, cursor, 64).expect("read");
                for m in &batch {
                    assert!(m.seq > cursor, "{} after the cursor {cursor}", m.seq);
                    cursor = m.seq;
                    seen.push(m.seq);
                }
                if finished && batch.is_empty() {
                    return seen;
                }
            }
            panic!("the reader did not finish");
        });
        reader.join().expect("reader")
    });
    let all: Vec<u64> = a
        .read(&to, 0, 10_000)
        .expect("read")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(all.len(), 4 * per_writer as usize);
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
    // Nothing appeared below the cursor after the reader passed it.
    assert_eq!(seen, all);
    assert_eq!(a.usage(&to).expect("usage").messages, all.len() as u64);
}

#[test]
fn expired_is_swept_through_the_index_and_only_while_still_expired() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    // Enough rows that the planner would rather not scan the table.
    let staged: Vec<_> = (0..200u32)
        .map(|i| {
            let msgs: Vec<Envelope> = (0..20u8).map(|k| msg(k, 8)).collect();
            a.queue_append(&addr(7, 1 + i), &msgs, 1_000, 100_000 + u64::from(i))
                .expect("stage")
        })
        .collect();
    for rx in staged {
        a.run(async { rx.await.expect("answer") }).expect("append");
    }
    let to = addr(8, 1);
    let seqs = a
        .append(&to, &[msg(1, 5), msg(2, 6)], 1_000, 2_000)
        .expect("append");
    sql(&a, "ANALYZE messages");
    let plan: Vec<String> = sql(
        &a,
        "EXPLAIN SELECT account, device, seq, expires_at FROM messages WHERE expires_at <= 2000 \
         ORDER BY expires_at, account, device, seq LIMIT 100",
    )
    .iter()
    .map(|r| r.get(0))
    .collect();
    let plan = plan.join("\n");
    // Through the expiry index, never the table: an ordered index scan, or a bitmap
    // scan of the index whose rows (only the expired ones) are then sorted. Which of
    // the two the planner picks depends on its statistics.
    assert!(plan.contains("messages_expiry"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");

    let due = a.expired(2_000, 100).expect("expired");
    assert_eq!(due.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    // An entry that claims an earlier expiry than the message has deletes nothing.
    let mut stale = due.clone();
    stale[0].expires_at = 1_500;
    assert_eq!(
        a.expire(&to, &stale[..1]).expect("expire"),
        Usage::default()
    );
    assert_eq!(
        a.expire(&to, &due).expect("expire"),
        Usage {
            messages: 2,
            bytes: 11
        }
    );
    assert!(a.expired(2_000, 100).expect("expired").is_empty());
    assert_eq!(a.usage(&to).expect("usage"), Usage::default());
    assert_eq!(a.expired(100_000, 10).expect("expired").len(), 10);
}

/// A batch that sends to and acks in a mailbox the deletion check refuses: the send
/// is refused, the ack still deletes (the head locked with nothing added), and the
/// other mailbox's send in the batch is stored.
#[test]
fn a_batch_sending_to_and_acking_in_a_refused_mailbox_applies_the_ack_alone() {
    let (_pg, opts) = db();
    deletions_table(&opts);
    let a = node(&opts, "a");
    let (gone, kept) = (addr(11, 1), addr(12, 1));
    let seqs = a
        .append(&gone, &[msg(1, 4), msg(2, 4)], 1_000, 9_000)
        .expect("append");
    let before = a.totals();
    begin_deletion(&a, &gone.account);
    let (sent, acked, other) = one_batch(&a, || {
        Ok((
            a.queue_append(&gone, &[msg(3, 4)], 1_000, 9_000)?,
            a.queue_remove(&gone, &seqs[..1])?,
            a.queue_append(&kept, &[msg(4, 4)], 1_000, 9_000)?,
        ))
    });
    let sent = answer(&a, sent);
    assert!(matches!(sent, Err(StoreError::Deleted)), "{sent:?}");
    assert_eq!(answer(&a, acked).expect("acked").messages, 1);
    assert_eq!(answer(&a, other).expect("kept").len(), 1);
    let left = a.read(&gone, 0, 10).expect("read");
    assert_eq!(left.iter().map(|m| m.seq).collect::<Vec<_>>(), &seqs[1..]);
    assert_eq!(
        a.usage(&gone).expect("usage").messages,
        1,
        "the head agrees"
    );
    assert_eq!(a.totals().messages, before.messages, "one acked, one sent");
}

#[test]
fn an_append_to_an_account_being_deleted_is_refused() {
    let (pg, opts) = db();
    deletions_table(&opts);
    let a = node(&opts, "a");
    let (gone, kept) = (addr(9, 1), addr(10, 1));
    a.append(&gone, &[msg(1, 4)], 1_000, 9_000)
        .expect("before the intent");
    let before = a.totals();
    assert_eq!(begin_deletion(&a, &gone.account), 1);
    // Staged together: the one to the account being deleted fails alone.
    let (x, y) = append_pair(&a, (&gone, msg(2, 4)), (&kept, msg(3, 4)));
    assert!(matches!(x, Err(StoreError::Deleted)), "{x:?}");
    assert_eq!(y.expect("kept").len(), 1);
    assert_eq!(a.read(&gone, 0, 10).expect("read").len(), 1);
    assert_eq!(a.usage(&gone).expect("usage").messages, 1);
    assert_eq!(a.totals().messages, before.messages + 1);
    // The purge leaves nothing of the account in the mailbox tables but its closed head.
    assert_eq!(a.purge(&gone).expect("purge").messages, 1);
    assert!(matches!(
        a.append(&gone, &[msg(4, 4)], 1_000, 9_000),
        Err(StoreError::Deleted)
    ));
    let left: i64 = sql(
        &a,
        "SELECT (SELECT count(*) FROM mailbox_heads WHERE account = decode(repeat('09', 16), 'hex') \
           AND closed_at IS NULL) \
         + (SELECT count(*) FROM messages WHERE account = decode(repeat('09', 16), 'hex'))",
    )[0]
    .get(0);
    assert_eq!(left, 0);
    drop(pg);
}

#[test]
fn db_down_gives_unavailable_within_deadline_and_recovers() {
    let (pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(11, 1);
    a.append(&to, &[msg(1, 4)], 1_000, 9_000).expect("append");
    pg.kill();
    let started = Instant::now();
    let err = a
        .append(&to, &[msg(2, 4)], 1_000, 9_000)
        .expect_err("database down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        a.read(&to, 0, 10),
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        a.remove(&to, &[1]),
        Err(StoreError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(6), "bounded");
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let seqs = loop {
        match a.append(&to, &[msg(3, 4)], 1_000, 9_000) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // What was acknowledged is there; what failed was not acknowledged.
    let ids: Vec<u8> = a
        .read(&to, 0, 10)
        .expect("read")
        .iter()
        .map(|m| m.message_id.0[0])
        .collect();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&3));
    assert!(seqs[0] >= 2);
}

#[test]
fn a_purge_deletes_what_was_staged_before_it() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(12, 1);
    let staged: Vec<_> = (0..50u8)
        .map(|i| {
            a.queue_append(&to, &[msg(i, 4)], 1_000, 9_000)
                .expect("stage")
        })
        .collect();
    let purged = a.purge(&to).expect("purge");
    for rx in staged {
        a.run(async { rx.await.expect("answer") }).expect("append");
    }
    assert_eq!(purged.messages, 50, "every staged append committed first");
    assert!(a.read(&to, 0, 100).expect("read").is_empty());
    assert_eq!(a.totals().messages, 0);
}

#[test]
fn usage_and_totals_are_exact_for_own_commits_and_at_most_a_second_behind_others() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let to = addr(13, 1);
    let (u, t) = b.usage_and_totals(&to).expect("b");
    assert_eq!((u.messages, t.messages), (0, 0));
    a.append(&to, &[msg(1, 4), msg(2, 4)], 1_000, 9_000)
        .expect("append");
    let (u, t) = a.usage_and_totals(&to).expect("a");
    assert_eq!((u.messages, u.bytes, t.messages, t.mailboxes), (2, 8, 2, 1));
    // b's cached view may lag, but by no more than the cache's age bound.
    std::thread::sleep(super::mailboxes::TOTALS_MAX_AGE + Duration::from_millis(50));
    let (u, t) = b.usage_and_totals(&to).expect("b");
    assert_eq!((u.messages, t.messages, t.bytes), (2, 2, 8));
    // An ack on b is b's own commit: exact at once, there.
    let seqs: Vec<u64> = b.seqs(&to, 0, 10).expect("seqs");
    b.remove(&to, &seqs[..1]).expect("remove");
    let (u, t) = b.usage_and_totals(&to).expect("b");
    assert_eq!((u.messages, t.messages), (1, 1));
    assert_eq!(a.usage(&to).expect("exact").messages, 1);
}

#[test]
fn appends_staged_in_order_get_seqs_in_that_order_across_pipelined_batches() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (to, other) = (addr(14, 1), addr(15, 1));
    let mut staged = Vec::new();
    for i in 0..10_000u32 {
        let m = Envelope {
            message_id: tern_proto::MessageId(
                [0u8; 12]
                    .into_iter()
                    .chain(i.to_be_bytes())
                    .collect::<Vec<u8>>()
                    .try_into()
                    .unwrap(),
            ),
            payload: bytes::Bytes::from_static(b"x"),
        };
        staged.push(a.queue_append(&to, &[m], 1_000, 9_000).expect("stage"));
        // Traffic to another mailbox in between, so batches differ in what they lock.
        if i % 3 == 0 {
            drop(
                a.queue_append(&other, &[msg(1, 1)], 1_000, 9_000)
                    .expect("stage"),
            );
        }
    }
    let mut seqs = Vec::new();
    for rx in staged {
        seqs.extend(a.run(async { rx.await.expect("answer") }).expect("append"));
    }
    assert_eq!(seqs, (1..=10_000).collect::<Vec<u64>>());
    let ids: Vec<u32> = a
        .read(&to, 0, 20_000)
        .expect("read")
        .iter()
        .map(|m| u32::from_be_bytes(m.message_id.0[12..].try_into().unwrap()))
        .collect();
    assert_eq!(ids, (0..10_000).collect::<Vec<u32>>());
    // More rows than one batch takes: several batches, in flight together.
    let (commits, _) = a.writer_stats();
    assert!(commits >= 3, "{commits} batches");
}

#[test]
fn a_failover_to_the_promoted_standby_keeps_every_acknowledged_append() {
    let primary = crate::testing::TestPostgres::start_with(&[("fsync", "on")]);
    primary.create_db("tern");
    let standby = primary.standby("node_standby");
    // The standby first: only `target_session_attrs=read-write` takes the node past
    // it to the primary (on the standby every append would fail).
    let mut opts = PgOptions::new(format!(
        "host={},{} port=5432,5432 user=tern dbname=tern target_session_attrs=read-write",
        standby.dir().display(),
        primary.dir().display()
    ));
    opts.connect_timeout = Duration::from_millis(500);
    opts.statement_timeout = Duration::from_millis(1000);
    opts.require_accounts = false;
    let a = node(&opts, "a");
    let to = addr(12, 1);
    for i in 0..50u8 {
        a.append(&to, &[msg(i, 8)], 1_000, 9_000).expect("append");
    }
    primary.kill();
    // The standby is up but read-only: no host takes writes, nothing is acknowledged.
    let err = a
        .append(&to, &[msg(200, 8)], 1_000, 9_000)
        .expect_err("no read-write host");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    standby.promote();
    let promoted = Instant::now();
    let seqs = loop {
        match a.append(&to, &[msg(50, 8)], 1_000, 9_000) {
            Ok(s) => break s,
            Err(e) => {
                assert!(promoted.elapsed() < Duration::from_secs(15), "{e:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    // The pool left its dead connections and found the new primary by itself. The
    // promoted standby has no live seq epoch: numbering goes on in the next one, above
    // any seq the old primary may have handed out from a tail the standby never had.
    assert_eq!(seqs, vec![(1 << 40) + 1]);
    let ids: Vec<u8> = a
        .read(&to, 0, 100)
        .expect("read")
        .iter()
        .map(|m| m.message_id.0[0])
        .collect();
    assert_eq!(ids, (0..=50).collect::<Vec<u8>>());
}

#[test]
fn with_accounts_required_a_send_to_an_account_or_device_without_a_row_leaves_nothing() {
    // A send queued on one node before a deletion on another and committed after the
    // deletion finished (intent removed, account row gone) must not land; nor one to
    // a device removed meanwhile (its row gone before its mailbox is purged).
    let (_pg, mut opts) = db();
    opts.require_accounts = true;
    let a = node(&opts, "a");
    let (gone, kept, removed) = (addr(21, 1), addr(22, 1), addr(22, 2));
    execute(
        &a,
        "INSERT INTO accounts (account, identity_key) VALUES ($1, $2)",
        &[&kept.account.as_bytes().as_slice(), &vec![7u8; 32]],
    );
    execute(
        &a,
        "INSERT INTO devices (account, device, device_key) VALUES ($1, 1, $2)",
        &[&kept.account.as_bytes().as_slice(), &vec![8u8; 32]],
    );
    let x = a
        .queue_append(&gone, &[msg(1, 4)], 1_000, 9_000)
        .expect("stage");
    let y = a
        .queue_append(&kept, &[msg(2, 4)], 1_000, 9_000)
        .expect("stage");
    let z = a
        .queue_append(&removed, &[msg(3, 4)], 1_000, 9_000)
        .expect("stage");
    let x = a.run(async { Ok(x.await.expect("answer")) }).expect("run");
    let y = a.run(async { Ok(y.await.expect("answer")) }).expect("run");
    let z = a.run(async { Ok(z.await.expect("answer")) }).expect("run");
    assert!(matches!(x, Err(StoreError::Deleted)), "{x:?}");
    assert_eq!(y.expect("kept").len(), 1);
    assert!(matches!(z, Err(StoreError::Deleted)), "{z:?}");
    let left: i64 = sql(
        &a,
        "SELECT (SELECT count(*) FROM mailbox_heads WHERE account = decode(repeat('15', 16), 'hex')) \
         + (SELECT count(*) FROM messages WHERE account = decode(repeat('15', 16), 'hex'))",
    )[0]
    .get(0);
    assert_eq!(left, 0);
    assert_eq!(a.totals().messages, 1);
}

#[test]
fn a_purge_pages_through_a_mailbox_larger_than_a_page() {
    assert!(mailboxes::PURGE_PAGE.contains(&format!("OFFSET {} - 1", mailboxes::PURGE_PAGE_ROWS)));
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (to, other) = (addr(23, 1), addr(23, 2));
    let n = mailboxes::PURGE_PAGE_ROWS as usize * 2 + 17;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let msgs: Vec<Envelope> = chunk.iter().map(|&i| msg(i as u8, 4)).collect();
        a.append(&to, &msgs, 1_000, 9_000).expect("append");
    }
    a.append(&other, &[msg(1, 4)], 1_000, 9_000)
        .expect("append");
    let purged = a.purge(&to).expect("purge");
    assert_eq!(purged.messages, n as u64);
    assert_eq!(purged.bytes, 4 * n as u64);
    assert!(a.read(&to, 0, 10).expect("read").is_empty());
    assert_eq!(a.read(&other, 0, 10).expect("read").len(), 1);
    assert_eq!(a.totals().messages, 1);
    let heads: i64 = sql(
        &a,
        "SELECT count(*) FROM mailbox_heads WHERE account = decode(repeat('17', 16), 'hex') \
         AND closed_at IS NULL",
    )[0]
    .get(0);
    assert_eq!(heads, 1, "only the other device's head is left open");
}

#[test]
fn a_statement_that_fails_inside_a_pipelined_batch_commits_nothing_of_it() {
    // The writer sends COMMIT behind the batch's statements; when one of them fails,
    // the server rolls the transaction back and the batch must not count as committed.
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(24, 1);
    sql(
        &a,
        "ALTER TABLE messages ADD CONSTRAINT refuse_ff CHECK (get_byte(message_id, 0) <> 255)",
    );
    let before = a.totals();
    let err = a
        .append(&to, &[msg(255, 4)], 1_000, 9_000)
        .expect_err("the insert fails");
    assert!(!matches!(err, StoreError::Deleted), "{err:?}");
    assert_eq!(a.usage(&to).expect("usage"), Usage::default());
    assert_eq!(a.totals().messages, before.messages);
    // The head's seq was rolled back with the rest: the next append gets seq 1.
    assert_eq!(
        a.append(&to, &[msg(1, 4)], 1_000, 9_000).expect("append"),
        vec![1]
    );
    assert_eq!(a.read(&to, 0, 10).expect("read").len(), 1);
}

#[test]
fn acks_sends_and_expiry_on_two_nodes_keep_heads_and_totals_exact() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let boxes: Vec<_> = (0..6u32).map(|i| addr(60, 1 + i)).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Bounded by time, not rounds: on a loaded machine the senders can outlast any
    // fixed number of idle rounds of the ackers and the sweep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    std::thread::scope(|s| {
        // Two senders on a: staged appends, some expiring at once.
        for t in 0..2u8 {
            let (a, boxes, done) = (&a, &boxes, &done);
            s.spawn(move || {
                let staged: Vec<_> = (0..300usize)
                    .map(|i| {
                        let to = &boxes[(i * 7 + usize::from(t)) % boxes.len()];
                        let until = if i % 5 == 0 { 2_000 } else { 9_000_000 };
                        a.queue_append(to, &[msg(t, 10 + i % 50)], 1_000, until)
                            .expect("stage")
                    })
                    .collect();
                for rx in staged {
                    a.run(async { rx.await.expect("answer") }).expect("append");
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        // Ackers on both nodes, each acking what it read in every mailbox at once (one
        // batch spanning mailboxes), often the same seqs as the other.
        for n in [&a, &b, &b] {
            let (boxes, done) = (&boxes, &done);
            s.spawn(move || {
                while std::time::Instant::now() < deadline {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 2;
                    let mut staged = Vec::new();
                    for to in boxes {
                        let seqs: Vec<u64> = n.seqs(to, 0, 20).expect("seqs");
                        if !seqs.is_empty() {
                            staged.push(n.queue_remove(to, &seqs).expect("stage"));
                        }
                    }
                    let idle = staged.is_empty();
                    for rx in staged {
                        n.run(async { rx.await.expect("answer") }).expect("ack");
                    }
                    if finished && idle {
                        return;
                    }
                }
                panic!("the acker did not finish");
            });
        }
        // The sweep on b, meanwhile.
        let (b, boxes, done) = (&b, &boxes, &done);
        s.spawn(move || {
            while std::time::Instant::now() < deadline {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 2;
                let due = b.expired(2_000, 50).expect("expired");
                for to in boxes {
                    b.expire(to, &due).expect("expire");
                }
                if finished && due.is_empty() {
                    return;
                }
            }
            panic!("the sweep did not finish");
        });
    });
    let wrong: i64 = sql(
        &a,
        "SELECT count(*) FROM mailbox_heads h WHERE \
         h.messages <> (SELECT count(*) FROM messages m \
           WHERE m.account = h.account AND m.device = h.device) \
         OR h.bytes <> (SELECT coalesce(sum(octet_length(payload)), 0) FROM messages m \
           WHERE m.account = h.account AND m.device = h.device)",
    )[0]
    .get(0);
    assert_eq!(wrong, 0, "every head counts its rows");
    let row = &sql(
        &a,
        "SELECT (SELECT sum(messages) FROM mailbox_totals)::int8, \
           (SELECT count(*) FROM messages)::int8, \
           (SELECT sum(bytes) FROM mailbox_totals)::int8, \
           (SELECT coalesce(sum(octet_length(payload)), 0) FROM messages)::int8, \
           (SELECT sum(mailboxes) FROM mailbox_totals)::int8, \
           (SELECT count(*) FROM mailbox_heads WHERE messages > 0)::int8",
    )[0];
    let v: Vec<i64> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(
        (v[0], v[2], v[4]),
        (v[1], v[3], v[5]),
        "totals match a recount"
    );
    assert_eq!(v[1], 0, "everything was acked or expired");
}

/// Names a synchronous standby that never comes (`"nobody"`), or none (`""`): while
/// one is named, every synchronous commit waits for it, a commit that does not wait
/// for the flush does not.
///
/// Returns once commits behave so. `SHOW` on one session is not enough: whether
/// commits wait is a flag in shared memory that the checkpointer sets when it gets
/// to the reload, which under load comes later. So a probe commits synchronously
/// until it is seen waiting for the standby (then it is cancelled, which leaves it
/// committed locally), or, with none named, until it commits.
fn sync_standby(a: &PgBackend, names: &str) {
    sql(
        a,
        &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"),
    );
    sql(a, "SELECT pg_reload_conf()");
    let pool = &a.pool;
    // Past the backend's own deadline: under load the checkpointer can take seconds.
    let within = Duration::from_secs(30);
    let took = a.run_within(within + Duration::from_secs(5), async move {
        let probe = pool.get().await.expect("a probe session");
        let watch = pool.get().await.expect("a watching session");
        let pid: i32 = probe
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let until = Instant::now() + within;
        while Instant::now() < until {
            // SET LOCAL: the session goes back to the pool as it came.
            let commit = probe.batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; \
                 SELECT pg_logical_emit_message(true, 'probe', ''); COMMIT",
            );
            tokio::pin!(commit);
            loop {
                tokio::select! {
                    done = &mut commit => {
                        done.expect("the probe commit");
                        if names.is_empty() {
                            return Ok(true);
                        }
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {
                        if names.is_empty() {
                            if Instant::now() >= until {
                                return Ok(false);
                            }
                            continue;
                        }
                        let waits: bool = watch
                            .query_one(
                                "SELECT coalesce(bool_or(wait_event = 'SyncRep'), false) \
                                 FROM pg_stat_activity WHERE pid = $1",
                                &[&pid],
                            )
                            .await
                            .expect("pg_stat_activity")
                            .get(0);
                        if waits {
                            let cancelled: bool = watch
                                .query_one("SELECT pg_cancel_backend($1)", &[&pid])
                                .await
                                .expect("cancel the probe")
                                .get(0);
                            assert!(cancelled, "the probe's session was gone");
                            // Cancelled while waiting for the standby: committed
                            // locally, a warning, no error.
                            (&mut commit).await.expect("the cancelled probe");
                            return Ok(true);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(false)
    });
    assert!(took.expect("the probe"), "the reload did not take");
}

#[test]
fn an_ack_is_answered_only_once_a_synchronous_commit_covers_it() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(70, 1);
    let seqs = a
        .append(&to, &[msg(1, 8), msg(2, 8)], 1_000, 9_000)
        .expect("append");
    a.remove(&to, &seqs[..1]).expect("an ack");
    sync_standby(&a, "nobody");
    let acked = a.remove(&to, &seqs[1..]);
    sync_standby(&a, "");
    assert!(
        matches!(acked, Err(StoreError::Unavailable(_))),
        "{acked:?}"
    );
}

/// A send commits without waiting for the flush, so its head is free for the next
/// batch (and other nodes' acks) at once, and is answered only once a synchronous
/// commit covers it.
#[test]
fn a_send_frees_its_head_at_commit_and_is_answered_only_once_a_synchronous_commit_covers_it() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(71, 1);
    a.append(&to, &[msg(1, 8)], 1_000, 9_000).expect("append");
    let key = super::keys::params(&to);
    sync_standby(&a, "nobody");
    let (sent, head) = std::thread::scope(|s| {
        let send = s.spawn(|| a.append(&to, &[msg(2, 8)], 1_000, 9_000));
        let mut committed = false;
        for _ in 0..100 {
            if a.read(&to, 0, 10).expect("read").len() == 2 {
                committed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Committed, not answered: nobody holds the head.
        let head = committed.then(|| {
            a.run(async {
                let e = |e: tokio_postgres::Error| a.classify(&e);
                let mut c = a.client().await?;
                let tx = c.transaction().await.map_err(e)?;
                tx.execute(
                    "SELECT 1 FROM mailbox_heads WHERE account = $1 AND device = $2 \
                     FOR UPDATE NOWAIT",
                    &[&key.0, &key.1],
                )
                .await
                .map_err(e)?;
                tx.rollback().await.map_err(e)
            })
        });
        (send.join().expect("no panic"), head)
    });
    sync_standby(&a, "");
    let head = head.expect("the send never committed");
    assert!(head.is_ok(), "the head was held: {head:?}");
    assert!(matches!(sent, Err(StoreError::Unavailable(_))), "{sent:?}");
    // Stored all the same (a send answered UNAVAILABLE may be): a retry stores it
    // again under its message id and the recipient drops the copy.
    assert_eq!(a.read(&to, 0, 10).expect("read").len(), 2);
}

/// A batch waiting for its durability barrier holds no place in the writer's
/// pipeline: with a synchronous standby that never comes, more than
/// [`PIPELINE`](super::writer::PIPELINE) batches commit one after another while none
/// of them has been answered, up to [`UNANSWERED`](super::writer::UNANSWERED); the
/// next waits, uncommitted. Each is answered once the barrier can commit.
#[test]
fn batches_waiting_for_their_barrier_leave_the_pipeline_to_the_next() {
    let (_pg, mut opts) = db();
    // Long enough that no batch gives up while the test waits for the next commit.
    opts.statement_timeout = Duration::from_secs(10);
    let a = node(&opts, "a");
    let most = super::writer::UNANSWERED;
    let to: Vec<_> = (0..=most as u32).map(|i| addr(100, i + 1)).collect();
    a.append(&addr(99, 1), &[msg(1, 8)], 1_000, 9_000)
        .expect("a first append");
    sync_standby(&a, "nobody");
    let (committed, answered_early, sent) = std::thread::scope(|s| {
        let mut sends = Vec::new();
        let mut committed = 0;
        for to in &to {
            sends.push(s.spawn(|| a.append(to, &[msg(1, 8)], 1_000, 9_000)));
            // Readable before the next is queued: a batch of its own each.
            let readable = (0..200).any(|_| {
                let seen = a.read(to, 0, 10).is_ok_and(|m| m.len() == 1);
                if !seen {
                    std::thread::sleep(Duration::from_millis(5));
                }
                seen
            });
            if !readable {
                break;
            }
            committed += 1;
        }
        let answered_early = sends.iter().any(|s| s.is_finished());
        sync_standby(&a, "");
        let sent: Vec<_> = sends
            .into_iter()
            .map(|s| s.join().expect("no panic"))
            .collect();
        (committed, answered_early, sent)
    });
    assert_eq!(
        committed, most,
        "batches committed while the earlier waited"
    );
    assert!(!answered_early, "a send was answered before its barrier");
    assert_eq!(sent.len(), most + 1);
    for r in sent {
        assert!(r.is_ok(), "answered once the barrier committed: {r:?}");
    }
}

/// An ack records its mailbox's usage as of its commit (as a send does), so the next
/// send's check needs no read of the head first.
#[test]
fn an_ack_leaves_its_mailboxs_usage_known() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(110, 1);
    let seqs = a
        .append(&to, &[msg(1, 8), msg(2, 8), msg(3, 8)], 1_000, 9_000)
        .expect("append");
    a.remove(&to, &seqs[..2]).expect("ack");
    let known = a.mail().expect("mail").usage.fresh(&to);
    assert_eq!(known, Some(a.usage(&to).expect("usage")));
    assert_eq!(known.map(|u| u.messages), Some(1));
}

/// The store tells of a send's mailbox as soon as its commit makes it readable, not
/// after the durability barrier: a connected recipient is woken without waiting for
/// the flush (or, here, for a synchronous standby that never comes).
#[test]
fn a_send_is_told_of_once_readable_before_its_barrier() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (tx, told) = std::sync::mpsc::channel();
    let hook = move |to: &[tern_proto::DeviceAddress]| drop(tx.send(to.to_vec()));
    assert!(a.on_visible(Arc::new(hook)));
    assert!(!a.on_visible(Arc::new(|_: &[_]| {})), "one hook per store");
    let to = addr(72, 1);
    a.append(&to, &[msg(1, 8)], 1_000, 9_000).expect("append");
    assert_eq!(told.recv_timeout(Duration::from_secs(10)), Ok(vec![to]));
    sync_standby(&a, "nobody");
    let (sent, early, waiting) = std::thread::scope(|s| {
        let send = s.spawn(|| a.append(&to, &[msg(2, 8)], 1_000, 9_000));
        let early = told.recv_timeout(Duration::from_secs(10));
        let waiting = !send.is_finished();
        (send.join().expect("no panic"), early, waiting)
    });
    sync_standby(&a, "");
    assert_eq!(early, Ok(vec![to]), "told");
    assert!(waiting, "told only once the send was answered");
    assert!(matches!(sent, Err(StoreError::Unavailable(_))), "{sent:?}");
}

/// A batch's statements go out with its `COMMIT`, so the server runs them even after
/// the writer gave up at its deadline (here 1.5 s). Each statement gets half of what
/// is left of the deadline: a batch held up past the deadline was rolled back by the
/// server, and what was answered `UNAVAILABLE` did not happen after all.
#[test]
fn a_batch_answered_unavailable_at_the_deadline_does_not_commit_later() {
    let (pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(82, 1);
    let seqs = a.append(&to, &[msg(1, 8)], 1_000, 9_000).expect("append");
    let (rt, mut sessions) = super::testdb::sessions(&pg, 2);
    let (mut head, mut row) = (sessions.remove(0), sessions.remove(0));
    let key = super::keys::params(&to);
    let seq = seqs[0] as i64;
    // The ack's head held 0.9 s, then its row 0.9 s more: 1.8 s in all had each
    // statement the whole statement timeout.
    let head_tx = rt.block_on(head.transaction()).expect("begin");
    rt.block_on(head_tx.execute(
        "SELECT 1 FROM mailbox_heads WHERE account = $1 AND device = $2 FOR UPDATE",
        &[&key.0, &key.1],
    ))
    .expect("head");
    let row_tx = rt.block_on(row.transaction()).expect("begin");
    rt.block_on(row_tx.execute(
        "SELECT 1 FROM messages WHERE account = $1 AND device = $2 AND seq = $3 FOR UPDATE",
        &[&key.0, &key.1, &seq],
    ))
    .expect("row");
    let acked = std::thread::scope(|s| {
        let ack = s.spawn(|| a.remove(&to, &seqs));
        std::thread::sleep(Duration::from_millis(900));
        rt.block_on(head_tx.rollback()).expect("release the head");
        std::thread::sleep(Duration::from_millis(900));
        rt.block_on(row_tx.rollback()).expect("release the row");
        ack.join().expect("no panic")
    });
    assert!(
        matches!(acked, Err(StoreError::Unavailable(_))),
        "{acked:?}"
    );
    // Whatever was still running on the server has ended by now.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a.read(&to, 0, 10).expect("read").len(),
        1,
        "not deleted later"
    );
}

/// A two-worker runtime, as a relay's, and `opts` running on it.
fn on_a_runtime_of_two(opts: &PgOptions) -> (tokio::runtime::Runtime, PgOptions) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut shared = opts.clone();
    shared.runtime = Some(rt.handle().clone());
    (rt, shared)
}

/// On the relay's own runtime (`PgOptions::runtime`, as `tern-relay serve` opens the
/// backend): blocking calls from more tasks than the runtime has workers, each waiting
/// on connections those same workers drive, are all answered; so is an awaited read.
#[test]
fn on_the_relays_runtime_blocking_calls_from_every_worker_are_answered() {
    let (_pg, opts) = db();
    let (rt, shared) = on_a_runtime_of_two(&opts);
    let a = Arc::new(node(&shared, "a"));
    let to = addr(7, 1);
    let appends: Vec<_> = (0..8u8)
        .map(|t| {
            let a = a.clone();
            // A blocking call on a worker, as a relay's handler makes one.
            rt.spawn(async move { a.append(&to, &[msg(t, 64)], 1_000, 9_000) })
        })
        .collect();
    let read = rt.block_on(async {
        let all = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(appends))
            .await
            .expect("every blocking call answered");
        for r in all {
            r.expect("task").expect("append");
        }
        a.read_later(&to, 0, 100).expect("awaitable").await
    });
    assert_eq!(read.expect("read").len(), 8);
    // The backend goes before the runtime its connections run on.
    drop(a);
}

/// On the relay's own runtime, blocking calls past the limit fail at once as
/// `Unavailable` (a full blocking pool would leave no thread to drive the connections
/// and deadlines); those waiting are answered, and a call is taken again after.
#[test]
fn on_the_relays_runtime_calls_past_the_limit_fail_at_once() {
    let (_pg, opts) = db();
    let (rt, shared) = on_a_runtime_of_two(&opts);
    let mut a = node(&shared, "a");
    a.blocked = tokio::sync::Semaphore::new(2);
    let a = Arc::new(a);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let a = a.clone();
            rt.spawn(async move { a.run(a.rows("SELECT pg_sleep(0.4)", &[])) })
        })
        .collect();
    let mut waited = 0;
    while a.blocked.available_permits() > 0 && waited < 2_000 {
        std::thread::sleep(Duration::from_millis(1));
        waited += 1;
    }
    assert_eq!(a.blocked.available_permits(), 0, "both slow calls waiting");
    let started = Instant::now();
    match a.run(a.rows("SELECT 1", &[])) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("are waiting"), "{m}"),
        other => panic!("want Unavailable past the limit, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(200), "at once");
    for call in slow {
        rt.block_on(call)
            .expect("task")
            .expect("the waiting calls are answered");
    }
    assert_eq!(sql(&a, "SELECT 1").len(), 1, "taken again after");
}

/// A delivery's read (`read_page_later`) that fails on a serialization failure is run
/// once more, as the other statements are: CockroachDB retries a statement itself
/// only while its answer fits its results buffer, and a page can be larger. Twice is
/// an error, not a loop. (The failures come from a view over the table whose filter
/// raises SQLSTATE 40001 while a counter says so.)
#[test]
fn a_delivery_read_is_run_once_more_after_a_serialization_failure() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(72, 1);
    a.append(&to, &[msg(1, 8)], 1_000, 9_000).expect("append");
    sql(&a, "CREATE SEQUENCE reads");
    let fail_while = |n: i64| {
        sql(
            &a,
            &format!(
                "CREATE OR REPLACE FUNCTION conflict() RETURNS bool LANGUAGE plpgsql AS $$ \
                 BEGIN IF nextval('reads') <= {n} THEN \
                 RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END IF; \
                 RETURN true; END $$"
            ),
        );
    };
    fail_while(1);
    sql(&a, "ALTER TABLE messages RENAME TO messages_kept");
    sql(
        &a,
        "CREATE VIEW messages AS SELECT * FROM messages_kept WHERE conflict()",
    );
    let read = || a.run(a.read_page_later(to, 0, 10));
    let page = read().expect("read on the second try");
    assert_eq!(page.len(), 1);
    // Every read from now on fails: one more try, then the error.
    fail_while(i64::MAX);
    let before: i64 = sql(&a, "SELECT last_value FROM reads")[0].get(0);
    assert!(read().is_err(), "a read that always fails");
    let after: i64 = sql(&a, "SELECT last_value FROM reads")[0].get(0);
    assert_eq!(after - before, 2, "tried twice");
}
