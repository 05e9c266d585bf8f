//! Shared bodies on a real PostgreSQL: the conformance rules, and the rows behind them
//! (one body row per multi-recipient append, gone after the last ack, by expiry, and
//! with the last mailbox's purge).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};

use super::testdb::{db, execute, node, query, sql};
use super::PgBackend;
use crate::store::conformance::{self, addr, msg};
use crate::store::{MailboxStore, SharedAppend, SharedEntry, StoreError};

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
    let ack = a.queue_remove(&n[1], &[seqs[1]]).expect("stage");
    let more = a
        .queue_append(&n[1], &[msg(1, 3)], 1_000, 9_000)
        .expect("stage");
    a.run(async { Ok(ack.await.expect("answer")) })
        .expect("run")
        .expect("ack");
    a.run(async { Ok(more.await.expect("answer")) })
        .expect("run")
        .expect("append");
    assert_eq!(rows(&a), (1, 4, 4));
    for (to, seq) in n[2..5].iter().zip(&seqs[2..5]) {
        assert_eq!(a.remove(to, &[*seq]).expect("ack").bytes, 10_001);
    }
    assert_eq!(rows(&a), (1, 1, 1));
    assert_eq!(a.remove(&n[5], &[seqs[5]]).expect("ack").bytes, 10_001);
    assert_eq!(rows(&a), (0, 0, 0), "gone after the last ack");
    assert_eq!(a.totals().bytes, 3, "the one message of its own is left");
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
    execute(
        &a,
        "INSERT INTO account_deletions VALUES ($1, '{1}')",
        &[&deleting.account.as_bytes().as_slice()],
    );
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
    assert!(matches!(refused, Err(StoreError::Deleted)), "{refused:?}");
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
