//! Shared bodies on a real PostgreSQL: the conformance rules, and the rows behind them
//! (one body row per multi-recipient append, gone after the last ack, by expiry, and
//! with the last mailbox's purge).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};

use super::bodies::LEAKED_BODY_GRACE_MS;
use super::outage::tests::logged;
use super::testdb::{answer, db, execute, node, one_batch, query, sql};
use super::PgBackend;
use crate::store::conformance::{self, addr, msg};
use crate::store::{MailboxStore, SharedAppend, SharedEntry};

fn entries(to: &[DeviceAddress]) -> Vec<SharedEntry> {
    to.iter()
        .map(|a| SharedEntry {
            to: *a,
            part: Bytes::from_static(b"p"),
        })
        .collect()
}

fn append<'a>(body: &'a Bytes, entries: &'a [SharedEntry], expires_at: u64) -> SharedAppend<'a> {
    SharedAppend {
        message_id: MessageId([0x5B; 16]),
        body,
        entries,
        accepted_at: 1_000,
        expires_at,
    }
}

fn count(a: &PgBackend, statement: &str) -> i64 {
    sql(a, statement)[0].get(0)
}

/// (bodies, their refs summed, entries pointing at a body).
fn rows(a: &PgBackend) -> (i64, i64, i64) {
    (
        count(a, "SELECT count(*) FROM shared_bodies"),
        count(a, "SELECT coalesce(sum(refs), 0)::int8 FROM shared_bodies"),
        count(a, "SELECT count(*) FROM messages WHERE body_id IS NOT NULL"),
    )
}

#[test]
fn conformance_rules() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    conformance::shared_body_rules(&a);
    conformance::shared_bodies_across_reopen(&|| Box::new(node(&opts, "a")));
    assert_eq!(rows(&a), (0, 0, 0));
}

#[test]
fn a_body_to_n_mailboxes_is_one_row_until_the_last_ack() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let n: Vec<_> = (1..=6).map(|d| addr(40, d)).collect();
    let body = Bytes::from(vec![0xB0; 10_000]);
    let es = entries(&n);
    let seqs = a.append_shared(&append(&body, &es, 9_000)).expect("append");
    assert_eq!(rows(&a), (1, 6, 6), "one body, six entries");
    let stored = count(&a, "SELECT octet_length(payload)::int8 FROM shared_bodies");
    assert_eq!(stored, 10_000);
    // Acks of every kind of batch: alone, and beside an append in one transaction.
    a.remove(&n[0], &[seqs[0]]).expect("ack");
    ack_beside_an_append(&a, &n[1], seqs[1]);
    assert_eq!(rows(&a), (1, 4, 4));
    for (to, seq) in n[2..5].iter().zip(&seqs[2..5]) {
        assert_eq!(a.remove(to, &[*seq]).expect("ack").bytes, 10_001);
    }
    assert_eq!(rows(&a), (1, 1, 1));
    assert_eq!(a.remove(&n[5], &[seqs[5]]).expect("ack").bytes, 10_001);
    assert_eq!(rows(&a), (0, 0, 0), "gone after the last ack");
    assert_eq!(
        a.totals().bytes,
        3,
        "the message of its own is left (the gate's were removed)"
    );
}

/// Acks `seq` of `of` and appends a message of 3 bytes to it in one writer
/// transaction ([`super::testdb::one_batch`]).
fn ack_beside_an_append(a: &PgBackend, of: &DeviceAddress, seq: u64) {
    let (commits, _) = a.writer_stats();
    let (ack, more) = one_batch(a, || {
        Ok((
            a.queue_remove(of, &[seq])?,
            a.queue_append(of, &[msg(1, 3)], 1_000, 9_000)?,
        ))
    });
    assert_eq!(answer(a, ack).expect("ack").messages, 1);
    answer(a, more).expect("append");
    assert_eq!(
        a.writer_stats().0,
        commits + 4,
        "the gate's two appends and its removal, then the ack and the append in one"
    );
}

/// Every transaction takes its heads, then its totals slot, then bodies. An ack or a
/// purge waiting for its slot thus holds no body yet, and a transaction that holds the
/// slot and then releases the same body (a batch of sends with an ack does) takes it
/// at once, where the other order deadlocked (a stall of `deadlock_timeout`, then a
/// failed batch).
#[test]
fn a_release_takes_the_totals_slot_before_the_body() {
    let (pg, opts) = db();
    let a = node(&opts, "a");
    let n: Vec<_> = (1..=3).map(|d| addr(47, d)).collect();
    let body = Bytes::from(vec![0xB4; 300]);
    let es = entries(&n);
    let seqs = a.append_shared(&append(&body, &es, 9_000)).expect("append");
    let (rt, mut sessions) = super::testdb::sessions(&pg, 1);
    let other = &mut sessions[0];
    let ack = || a.remove(&n[0], &[seqs[0]]);
    let purge = || a.purge(&n[1]);
    let releases: [(
        &str,
        &(dyn Fn() -> crate::store::StoreResult<crate::store::Usage> + Sync),
    ); 2] = [("an ack", &ack), ("a purge", &purge)];
    for (what, release) in releases {
        let tx = rt.block_on(other.transaction()).expect("begin");
        rt.block_on(tx.batch_execute(
            "SET LOCAL lock_timeout = '5s'; SELECT 1 FROM mailbox_totals FOR UPDATE",
        ))
        .expect("every slot");
        std::thread::scope(|s| {
            let done = s.spawn(release);
            let waits = rt.block_on(super::testdb::a_session_waits(&tx));
            assert!(waits.expect("pg_locks"), "{what} never waited for its slot");
            // NOWAIT: a body the release held would fail here at once (a blocking
            // lock would deadlock, and a retried victim would hide it).
            let body =
                rt.block_on(tx.query("SELECT refs FROM shared_bodies FOR UPDATE NOWAIT", &[]));
            assert!(body.is_ok(), "{what} held the body: {body:?}");
            rt.block_on(tx.rollback()).expect("rollback");
            let freed = done.join().expect("no panic");
            assert_eq!(freed.expect(what).bytes, 301, "{what}");
        });
    }
    assert_eq!(rows(&a), (1, 1, 1), "the third entry holds the body");
}

#[test]
fn expiry_deletes_the_body_and_its_entries() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let n: Vec<_> = (1..=3).map(|d| addr(41, d)).collect();
    let body = Bytes::from(vec![0xB1; 500]);
    let es = entries(&n);
    a.append_shared(&append(&body, &es, 2_000)).expect("append");
    a.append(&n[0], &[msg(2, 5)], 1_000, 9_000).expect("append");
    assert_eq!(rows(&a), (1, 3, 3));
    let due = a.expired(2_000, 100).expect("expired");
    assert_eq!(due.len(), 3);
    for to in &n {
        a.expire(to, &due).expect("expire");
    }
    assert_eq!(rows(&a), (0, 0, 0), "the body and its entries expired");
    assert_eq!(count(&a, "SELECT count(*) FROM messages"), 1);
    assert_eq!(a.totals().bytes, 5);
}

#[test]
fn deleting_an_account_drops_its_refs() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (gone, kept) = ([addr(42, 1), addr(42, 2)], addr(43, 1));
    let body = Bytes::from(vec![0xB2; 700]);
    let es = entries(&[gone[0], kept, gone[1]]);
    a.append_shared(&append(&body, &es, 9_000)).expect("append");
    // Account deletion purges each of its devices' mailboxes.
    for of in &gone {
        assert_eq!(a.purge(of).expect("purge").bytes, 701);
    }
    assert_eq!(rows(&a), (1, 1, 1), "the other account's entry holds it");
    let read = a.read(&kept, 0, 10).expect("read");
    assert_eq!(read[0].shared_body.as_deref(), Some(&body[..]));
    a.purge(&kept).expect("purge");
    assert_eq!(rows(&a), (0, 0, 0));
    assert_eq!(a.totals().bytes, 0);
}

#[test]
fn an_account_being_deleted_gets_no_entry() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (deleting, kept) = (addr(44, 1), addr(45, 1));
    super::testdb::begin_deletion(&a, &deleting.account);
    let body = Bytes::from(vec![0xB3; 40]);
    let es = entries(&[deleting, kept]);
    let seqs = a.append_shared(&append(&body, &es, 9_000)).expect("append");
    assert_eq!(seqs.len(), 2);
    assert_eq!(rows(&a), (1, 1, 1), "one entry, counted once");
    let held = query(
        &a,
        "SELECT count(*) FROM mailbox_heads WHERE account = $1",
        &[&deleting.account.as_bytes().as_slice()],
    );
    assert_eq!(held[0].get::<_, i64>(0), 0);
    assert_eq!(a.totals().bytes, 41);
    let only = entries(&[deleting]);
    let refused = a.append_shared(&append(&body, &only, 9_000));
    assert_eq!(refused.expect("answered"), vec![0], "refused, not stored");
    assert_eq!(rows(&a), (1, 1, 1));
}

#[test]
fn concurrent_acks_on_two_nodes_release_a_body_exactly_once() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let to: Vec<_> = (1..=40).map(|d| addr(46, d)).collect();
    for round in 0..3u8 {
        let body = Bytes::from(vec![round; 2_000]);
        let es = entries(&to);
        let seqs = a.append_shared(&append(&body, &es, 9_000)).expect("append");
        assert_eq!(rows(&a), (1, 40, 40));
        // Each node acks half the entries, one at a time, while the other does:
        // every release takes the body's row lock, so the count ends at 0 once.
        std::thread::scope(|s| {
            for (n, half) in [(&a, 0..20), (&b, 20..40)] {
                let (to, seqs) = (&to, &seqs);
                s.spawn(move || {
                    for i in half {
                        assert_eq!(n.remove(&to[i], &[seqs[i]]).expect("ack").messages, 1);
                    }
                });
            }
        });
        assert_eq!(rows(&a), (0, 0, 0), "round {round}");
    }
    let slots = count(
        &a,
        "SELECT coalesce(sum(bytes), 0)::int8 FROM mailbox_totals",
    );
    assert_eq!(slots, 0, "the totals lost each body once");
}

/// The relay's bytes summed over the totals slots in the database.
fn slot_bytes(a: &PgBackend) -> i64 {
    count(
        a,
        "SELECT coalesce(sum(bytes), 0)::int8 FROM mailbox_totals",
    )
}

#[test]
fn a_body_whose_count_drifted_is_swept_a_day_past_its_expiry() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let n: Vec<_> = (1..=3).map(|d| addr(47, d)).collect();
    let body = Bytes::from(vec![0xB4; 500]);
    let es = entries(&n);
    a.append_shared(&append(&body, &es, 10_000))
        .expect("append");
    a.append(&n[0], &[msg(3, 5)], 1_000, u64::MAX)
        .expect("append");
    // An entry acked without releasing its body (a node of an older release).
    execute(&a, "UPDATE shared_bodies SET refs = refs + 1", &[]);
    let due = a.expired(10_000, 100).expect("expired");
    for to in &n {
        a.expire(to, &due).expect("expire");
    }
    assert_eq!(rows(&a), (1, 1, 0), "leaked: no entry, one ref");
    assert_eq!(slot_bytes(&a), 505);
    // The relay's sweep calls the hook before expiring entries.
    a.sweep_files(10_000 + LEAKED_BODY_GRACE_MS - 1)
        .expect("sweep");
    assert_eq!(rows(&a), (1, 1, 0), "kept until a day past its expiry");
    a.sweep_files(10_000 + LEAKED_BODY_GRACE_MS).expect("sweep");
    assert_eq!(rows(&a), (0, 0, 0), "swept");
    assert_eq!(slot_bytes(&a), 5, "its bytes taken off the totals once");
    assert_eq!(a.totals().bytes, 5);
    assert_eq!(a.sweep_leaked_bodies(u64::MAX).expect("sweep"), 0);
    assert_eq!(slot_bytes(&a), 5);
}

#[test]
fn the_sweep_pages_through_many_leaked_bodies() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = [addr(48, 1)];
    let es = entries(&to);
    let body = Bytes::from(vec![0xB5; 10]);
    for i in 0..1_005u64 {
        a.append_shared(&append(&body, &es, 10_000 + i))
            .expect("append");
    }
    // Every entry deleted by hand, nothing released: 1 005 bodies leaked.
    execute(&a, "DELETE FROM messages", &[]);
    execute(&a, "DELETE FROM mailbox_heads", &[]);
    let now = 10_000 + LEAKED_BODY_GRACE_MS;
    // Up to the fifth body's expiry only: the oldest first.
    assert_eq!(a.sweep_leaked_bodies(now + 4).expect("sweep"), 5);
    assert_eq!(a.sweep_leaked_bodies(now + 2_000).expect("sweep"), 1_000);
    assert_eq!(rows(&a).0, 0);
    assert_eq!(
        slot_bytes(&a),
        1_005,
        "the parts deleted by hand stay counted"
    );
}

#[test]
fn releasing_an_entry_whose_body_was_swept_deletes_only_the_entry() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let n: Vec<_> = (1..=2).map(|d| addr(49, d)).collect();
    let body = Bytes::from(vec![0xB6; 300]);
    let es = entries(&n);
    let seqs = a
        .append_shared(&append(&body, &es, 10_000))
        .expect("append");
    // The entries' own sweep fell a day behind: the body goes first.
    assert_eq!(
        a.sweep_leaked_bodies(10_000 + LEAKED_BODY_GRACE_MS)
            .expect("sweep"),
        1
    );
    assert_eq!(rows(&a), (0, 0, 2));
    assert_eq!(slot_bytes(&a), 2);
    // A read skips the expired entry (counted, at debug only).
    let text = logged(|| assert!(a.read(&n[0], 0, 10).expect("read").is_empty()));
    assert_eq!(a.bodies_missing(), 1);
    assert!(text.is_empty(), "{text}");
    // An ack and the expiry release a body that is gone: the entries go, no count
    // goes below zero.
    assert_eq!(a.remove(&n[0], &[seqs[0]]).expect("ack").bytes, 301);
    let due = a.expired(10_000, 10).expect("expired");
    assert_eq!(a.expire(&n[1], &due).expect("expire").bytes, 301);
    assert_eq!(count(&a, "SELECT count(*) FROM messages"), 0);
    assert_eq!(
        count(
            &a,
            "SELECT count(*) FROM mailbox_heads WHERE messages <> 0 OR bytes <> 0"
        ),
        0
    );
    assert_eq!(slot_bytes(&a), 0);
    assert_eq!(
        count(
            &a,
            "SELECT coalesce(sum(messages), 0)::int8 FROM mailbox_totals"
        ),
        0
    );
}

#[test]
fn an_unexpired_entry_without_its_body_is_skipped_with_a_warning() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(50, 1);
    let body = Bytes::from(vec![0xB7; 100]);
    let es = entries(&[to]);
    a.append_shared(&append(&body, &es, u64::MAX))
        .expect("append");
    a.append(&to, &[msg(4, 6)], 1_000, u64::MAX)
        .expect("append");
    // Damage: the body deleted by hand.
    execute(&a, "DELETE FROM shared_bodies", &[]);
    let mut read = Vec::new();
    let text = logged(|| read = a.read(&to, 0, 10).expect("read"));
    assert_eq!(read.len(), 1, "the later message still delivered");
    assert_eq!(read[0].payload.len(), 6);
    assert_eq!(a.bodies_missing(), 1);
    assert!(text.contains("WARN") && text.contains("damage"), "{text}");
    // One line, no fields: no ids.
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(!text.contains("account"), "{text}");
}

#[test]
fn an_import_target_holding_only_a_last_resort_key_package_is_not_empty() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    assert!(a.import_target_empty().expect("check"));
    execute(
        &a,
        "INSERT INTO last_resort_key_packages VALUES ($1, 1, '\\x01')",
        &[&[7u8; 16].as_slice()],
    );
    assert!(!a.import_target_empty().expect("check"));
}

#[test]
fn a_count_of_bodies_that_fails_fails_the_test() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    assert_eq!(a.shared_bodies(), 0);
    execute(
        &a,
        "ALTER TABLE shared_bodies RENAME TO shared_bodies_away",
        &[],
    );
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.shared_bodies()));
    assert!(counted.is_err(), "a failed count read as {counted:?}");
}
