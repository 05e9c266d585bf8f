//! Closed heads (V15): a deleted mailbox's head stays, closed, and no send takes a seq
//! from it again, even one whose statement began before the deletion committed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use super::mailboxes::CLOSE_HEAD;
use super::testdb::{append_pair, db, execute, node, sql};
use super::*;
use crate::store::conformance::{addr, msg};
use tern_proto::DeviceAddress;

use crate::store::{MailboxStore, StoreResult, Usage};

/// The open heads and the messages of account `a` (its first byte).
fn left(b: &PgBackend, a: u8) -> (i64, i64) {
    let row = &super::testdb::query(
        b,
        "SELECT (SELECT count(*) FROM mailbox_heads WHERE account = $1 AND closed_at IS NULL), \
           (SELECT count(*) FROM messages WHERE account = $1)",
        &[&addr(a, 1).account.as_bytes().as_slice()],
    )[0];
    (row.get(0), row.get(1))
}

#[test]
fn a_purged_mailbox_keeps_a_closed_head_that_refuses_sends() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let (gone, kept) = (addr(70, 1), addr(70, 2));
    a.append(&gone, &[msg(1, 4), msg(2, 4)], 1_000, 9_000)
        .expect("append");
    a.append(&kept, &[msg(3, 4)], 1_000, 9_000).expect("append");
    let before = a.totals();
    assert_eq!(a.purge(&gone).expect("purge").messages, 2);
    // No intent, no missing row (the mailbox store alone): the closed head refuses.
    assert!(matches!(
        a.append(&gone, &[msg(4, 4)], 1_000, 9_000),
        Err(StoreError::Deleted)
    ));
    // Staged with a send that goes through: that one alone fails.
    let (x, y) = append_pair(&a, (&gone, msg(5, 4)), (&kept, msg(6, 4)));
    assert!(matches!(x, Err(StoreError::Deleted)), "{x:?}");
    assert_eq!(y.expect("kept"), vec![2]);
    let head = &sql(
        &a,
        "SELECT last_seq, messages, bytes, closed_at IS NOT NULL FROM mailbox_heads \
         WHERE account = decode(repeat('46', 16), 'hex') AND device = 1",
    )[0];
    assert_eq!(
        (
            head.get::<_, i64>(0),
            head.get::<_, i64>(1),
            head.get::<_, i64>(2),
            head.get::<_, bool>(3)
        ),
        (2, 0, 0, true),
        "closed, empty, its seqs kept"
    );
    assert_eq!(a.usage(&gone).expect("usage"), Usage::default());
    assert_eq!(a.totals().messages, before.messages - 2 + 1);
    assert_eq!(a.totals().mailboxes, before.mailboxes - 1);
    // A purge again finds nothing; a purge of a mailbox never written closes it too.
    assert_eq!(a.purge(&gone).expect("again"), Usage::default());
    let never = addr(71, 1);
    assert_eq!(a.purge(&never).expect("purge"), Usage::default());
    assert!(matches!(
        a.append(&never, &[msg(7, 4)], 1_000, 9_000),
        Err(StoreError::Deleted)
    ));
    assert_eq!(left(&a, 70), (1, 2), "only the kept device's head and rows");
    assert_eq!(left(&a, 71), (0, 0));
}

/// Runs a mailbox deletion's last transaction by hand (the head closed first, then
/// `deletion`'s statements on the account and device) while a send to `to` waits for
/// the head, and returns the send's answer once the deletion has committed.
fn send_during_deletion(
    a: &PgBackend,
    to: DeviceAddress,
    deletion: &[&str],
) -> StoreResult<Vec<u64>> {
    let key = super::keys::params(&to);
    a.run(async {
        let e = |e: tokio_postgres::Error| a.classify(&e);
        let mut c = a.client().await?;
        let tx = c.transaction().await.map_err(e)?;
        tx.query_one(CLOSE_HEAD, &[&key.0, &key.1])
            .await
            .map_err(e)?;
        let waiting = a.queue_append(&to, &[msg(2, 4)], 1_000, 9_000)?;
        let blocked = super::testdb::a_session_waits(&tx).await.map_err(e)?;
        assert!(blocked, "the send never waited on the head");
        for statement in deletion {
            tx.execute(*statement, &[&key.0, &key.1]).await.map_err(e)?;
        }
        tx.commit().await.map_err(e)?;
        Ok(waiting.await.expect("answer"))
    })
    .expect("run")
}

const PURGE: [&str; 2] = [
    "DELETE FROM messages WHERE account = $1 AND device = $2",
    "UPDATE mailbox_heads SET messages = 0, bytes = 0 WHERE account = $1 AND device = $2",
];

#[test]
fn a_send_waiting_on_a_head_its_deletion_closes_is_refused_and_leaves_nothing() {
    // The send's snapshot (and the deletion check made with it) predates the
    // deletion, and no intent is left to see: only the closed head refuses it.
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let to = addr(72, 1);
    a.append(&to, &[msg(1, 4)], 1_000, 9_000).expect("append");
    let sent = send_during_deletion(&a, to, &PURGE);
    assert!(matches!(sent, Err(StoreError::Deleted)), "{sent:?}");
    assert_eq!(left(&a, 72), (0, 0), "no head recreated, no row");
    assert!(a.read(&to, 0, 10).expect("read").is_empty());
}

#[test]
fn a_send_that_saw_the_account_before_its_deletion_leaves_nothing() {
    // With the accounts schema: the deletion removes the account's and device's rows
    // in the transaction that closes the head; the send's check, made with a snapshot
    // taken before, still sees them.
    let (_pg, mut opts) = db();
    opts.require_accounts = true;
    let a = node(&opts, "a");
    let to = addr(73, 1);
    let account = to.account.as_bytes().as_slice();
    execute(
        &a,
        "INSERT INTO accounts (account, identity_key) VALUES ($1, $2)",
        &[&account, &vec![7u8; 32]],
    );
    execute(
        &a,
        "INSERT INTO devices (account, device, device_key) VALUES ($1, 1, $2)",
        &[&account, &vec![8u8; 32]],
    );
    a.append(&to, &[msg(1, 4)], 1_000, 9_000).expect("append");
    let mut deletion = PURGE.to_vec();
    deletion.push("DELETE FROM devices WHERE account = $1 AND device = $2");
    deletion.push("DELETE FROM accounts WHERE account = $1 AND $2::int8 > 0");
    let sent = send_during_deletion(&a, to, &deletion);
    assert!(matches!(sent, Err(StoreError::Deleted)), "{sent:?}");
    assert_eq!(left(&a, 73), (0, 0), "no head recreated, no row");
}
