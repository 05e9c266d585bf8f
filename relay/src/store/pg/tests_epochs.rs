//! Seq epochs (V16): a send committed without waiting for the flush, seen by a reader
//! and then lost with the WAL's tail, never gives its seq to another message.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tern_proto::DeviceAddress;

use super::testdb::{db, db_with, execute, node};
use super::*;
use crate::store::conformance::{addr, msg};
use crate::store::{MailboxStore, StoreError};

const FOREVER: u64 = 9_000_000_000_000;

fn seqs(b: &PgBackend, of: &DeviceAddress) -> Vec<u64> {
    let page = b.read(of, 0, 100).expect("read");
    page.iter().map(|m| m.seq).collect()
}

/// Appends message `n` until it is acknowledged (the database coming back); its seq.
fn append_until_stored(b: &PgBackend, to: &DeviceAddress, n: u8) -> u64 {
    let start = Instant::now();
    loop {
        match b.append(to, &[msg(n, 1)], 1_000, FOREVER) {
            Ok(s) => return s[0],
            Err(StoreError::Unavailable(e)) => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "no recovery: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("append: {e:?}"),
        }
    }
}

/// Sends one message to a mailbox (after `prepare`), kills the server before the
/// send's commit is flushed, and sends another once it is back: the two seqs.
fn crash_after_an_unflushed_send(prepare: impl FnOnce(&PgBackend, &DeviceAddress)) -> (u64, u64) {
    // The WAL writer flushes asynchronous commits only every 10 s, and nothing else
    // commits here: the send's commit is still unflushed when the server is killed.
    let (pg, mut opts) = db_with(&[("wal_writer_delay", "10s"), ("autovacuum", "off")]);
    // No barrier: the send is answered once committed, as a reader on another node
    // may see it before the barrier.
    opts.durability = crate::store::Durability::Os;
    let b = node(&opts, "a");
    let to = addr(1, 1);
    prepare(&b, &to);
    let lost = append_until_stored(&b, &to, 1);
    assert_eq!(seqs(&b, &to), vec![lost], "visible before the flush");

    pg.kill();
    pg.restart();
    let next = append_until_stored(&b, &to, 2);
    let page = b.read(&to, 0, 100).expect("read");
    assert!(
        page.iter().all(|m| m.message_id != msg(1, 1).message_id),
        "the unflushed send survived the crash, so this run shows nothing"
    );
    assert!(page.iter().any(|m| m.seq == next), "{page:?}");
    (lost, next)
}

#[test]
fn a_send_lost_with_the_wal_tail_never_gives_its_seq_to_another_message() {
    let (lost, next) = crash_after_an_unflushed_send(|_, _| {});
    // Without the epochs the head's last seq rolls back with the lost commit, and the
    // next send takes the lost one's seq: a stale ack of it would delete this one.
    assert_eq!(lost, 1, "the first epoch numbers from 1");
    assert!(
        next >> 40 > lost >> 40,
        "seq {next:#x} is not in a later epoch than the lost {lost:#x}"
    );
}

/// A mailbox moved from an embedded relay starts at that store's epoch floor: the
/// epoch after a lost tail must lie above it too.
#[test]
fn after_a_migration_a_lost_tail_moves_seqs_above_the_imported_heads() {
    let (lost, next) = crash_after_an_unflushed_send(|b, to| {
        b.import_seq_floor(&[*to], 5 << 40).expect("import");
    });
    assert_eq!(
        lost,
        (5 << 40) + 1,
        "numbering goes on from the imported head"
    );
    assert!(
        next >> 40 > lost >> 40,
        "seq {next:#x} is not in a later epoch than the lost {lost:#x}"
    );
}

#[test]
fn connections_made_while_nothing_was_lost_keep_the_epoch() {
    let (_pg, opts) = db();
    let b = node(&opts, "a");
    let to = addr(2, 1);
    let first = append_until_stored(&b, &to, 1);
    // Every session but this one's ends (nothing is lost): the writer connects again.
    let killer = node(&opts, "killer");
    execute(
        &killer,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
        &[],
    );
    let second = append_until_stored(&b, &to, 2);
    assert_eq!((first, second), (1, 2), "dense, in the first epoch");
    assert_eq!(seqs(&b, &to), vec![first, second]);
}

#[test]
fn a_writer_without_an_epoch_takes_no_seq() {
    let (_pg, opts) = db();
    let setup = node(&opts, "setup");
    // The last epoch is taken and none is live (as after a crash): a new connection
    // cannot take one.
    execute(&setup, "UPDATE seq_epochs SET epoch = 8388607", &[]);
    let b = node(&opts, "b");
    let to = addr(3, 1);
    let err = b.append(&to, &[msg(1, 1)], 1_000, FOREVER).unwrap_err();
    assert!(err.to_string().contains("seq_epochs"), "{err:?}");
    assert!(seqs(&setup, &to).is_empty());
}

/// The live epoch gone under a running writer (as crash recovery leaves it): the next
/// batch, committed under the old floor, is not acknowledged, the writer's idle
/// connections go, and the batch after it takes the next epoch.
#[test]
fn a_batch_committed_under_an_epoch_no_longer_live_is_not_acknowledged() {
    let (_pg, opts) = db();
    let b = node(&opts, "a");
    let to = addr(5, 1);
    assert_eq!(append_until_stored(&b, &to, 1), 1);
    execute(&b, "DELETE FROM seq_epoch_live", &[]);
    let err = b.append(&to, &[msg(2, 1)], 1_000, FOREVER).unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("restarted or failed over")),
        "{err:?}"
    );
    let next = append_until_stored(&b, &to, 3);
    assert_eq!(next, (1 << 40) + 1, "numbered in the next epoch");
}
