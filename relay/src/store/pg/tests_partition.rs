//! A database that hangs (a network partition, a stopped host): connections stay open
//! and nothing answers. Calls fail `Unavailable` in bounded time, the writer answers
//! every queued append, nothing acknowledged is lost, nothing failed before it was
//! written appears, and the backend recovers by itself once the database answers.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};
use tokio::sync::oneshot;

use super::testdb::{db, node};
use super::writer::{MAX_ROWS, STALE};
use super::*;
use crate::store::conformance::addr;
use crate::store::{Envelope, MailboxStore};

/// The writer's answer to a queued append.
type Answer = oneshot::Receiver<StoreResult<Vec<u64>>>;

/// How long the sends keep trying once the database is back.
const RECOVERY: Duration = Duration::from_secs(15);

/// Message number `n` (its id starts with `n`).
fn env(n: u64) -> Envelope {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    Envelope {
        message_id: MessageId(id),
        payload: Bytes::from(n.to_be_bytes().to_vec()),
    }
}

fn number(id: &MessageId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().unwrap())
}

/// Every message in `of` as (number, seq), read through the store.
fn stored(b: &PgBackend, of: &DeviceAddress) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = b.read(of, after, 10_000).expect("read");
        let Some(last) = page.last() else {
            return out;
        };
        after = last.seq;
        out.extend(page.iter().map(|m| (number(&m.message_id), m.seq)));
    }
}

/// Sessions of the relay left inside a transaction nobody is running (a BEGIN whose
/// answer came after its caller gave up, on a connection that went back to the pool).
/// A dropped connection's session stays so only until its Terminate arrives.
fn idle_in_transaction(pg: &crate::testing::TestPostgres) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&pg.conn_str("tern"), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tern-relay' \
             AND state = 'idle in transaction' AND state_change < now() - interval '200 ms'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
    })
}

/// Appends one message at a time until one is acknowledged (each failure must be
/// `Unavailable`); its number and seq.
fn recover(b: &PgBackend, to: &DeviceAddress, mut n: u64) -> (u64, u64) {
    let start = Instant::now();
    loop {
        match b.append(to, &[env(n)], 1_000, 9_000_000_000_000) {
            Ok(seqs) => return (n, seqs[0]),
            Err(StoreError::Unavailable(_)) => {
                assert!(start.elapsed() < RECOVERY, "appends did not recover");
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("after resume: {e:?}"),
        }
    }
}

/// `err` is `Unavailable`, and came within `deadline` (and a second) of `started`.
fn unavailable_within<T: std::fmt::Debug>(
    err: &Result<T, StoreError>,
    started: Instant,
    deadline: Duration,
) {
    assert!(matches!(err, Err(StoreError::Unavailable(_))), "{err:?}");
    assert!(
        started.elapsed() < deadline + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_paused_database_fails_every_call_in_bounded_time_writes_nothing_and_recovers() {
    let (pg, opts) = db();
    let b = node(&opts, "a");
    let deadline = opts.connect_timeout + opts.statement_timeout;
    let to = addr(1, 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for n in 1..=10 {
        let seqs = b
            .append(&to, &[env(n)], 1_000, 9_000_000_000_000)
            .expect("append");
        acked.insert(n, seqs[0]);
    }

    pg.pause();
    // One append, as `append` waits for it: `run`'s deadline fires (the server, which
    // would enforce statement_timeout, is stopped). The writer's own answer is kept.
    let started = Instant::now();
    let mut first = b
        .queue_append(&to, &[env(100)], 1_000, 9_000_000_000_000)
        .expect("queue");
    let mut answered = false;
    let err = b.run(async {
        let answer = (&mut first).await;
        answered = true;
        answer.unwrap_or_else(|_| Err(StoreError::Backend("writer gone".into())))
    });
    unavailable_within(&err, started, deadline);
    // A read, through a pooled connection that gets no answer, or a new one that gets
    // no start-up reply.
    let started = Instant::now();
    let err = b.read(&to, 0, 100);
    unavailable_within(&err, started, deadline);

    // Reads one after another, as a connection serves its pipelined requests: once
    // one got no answer, the next fail at once rather than each after a deadline.
    let started = Instant::now();
    for _ in 0..20 {
        let err = b.read(&to, 0, 100);
        assert!(matches!(err, Err(StoreError::Unavailable(_))), "{err:?}");
    }
    assert!(
        started.elapsed() < deadline * 2 + Duration::from_secs(1),
        "20 reads took {:?}",
        started.elapsed()
    );

    // Many appends at once: 12 that fill a batch each (each batch's BEGIN waits for
    // its deadline), then 8 threads × 20. Without failing what waited past the
    // deadline in the queue, the last would hear after 12 deadlines or more.
    let started = Instant::now();
    let mut answers: Vec<(Vec<u64>, Answer)> = Vec::new();
    let mut next = 1_000u64;
    for _ in 0..12 {
        let msgs: Vec<Envelope> = (next..next + MAX_ROWS as u64).map(env).collect();
        let rx = b
            .queue_append(&to, &msgs, 1_000, 9_000_000_000_000)
            .expect("queue");
        answers.push(((next..next + MAX_ROWS as u64).collect(), rx));
        next += MAX_ROWS as u64;
    }
    let mut failed: Vec<u64> = Vec::new();
    let small = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (b, small) = (&b, &small);
            s.spawn(move || {
                for i in 0..20u64 {
                    let n = 1_000_000 + t * 100 + i;
                    let rx = b
                        .queue_append(&addr(2, 1 + t as u32), &[env(n)], 1_000, 9_000_000_000_000)
                        .expect("queue");
                    small.lock().unwrap().push((vec![n], rx));
                }
            });
        }
    });
    answers.extend(small.into_inner().unwrap());
    if answered {
        failed.push(100);
    } else {
        answers.push((vec![100], first));
    }
    let bound = deadline * 2 + Duration::from_secs(1);
    let mut stale = 0;
    for (numbers, rx) in answers {
        let left = bound.saturating_sub(started.elapsed());
        let answer = rt
            .block_on(async { tokio::time::timeout(left, rx).await })
            .unwrap_or_else(|_| panic!("no answer within {bound:?} while paused"))
            .expect("the writer answers");
        match answer {
            Err(StoreError::Unavailable(m)) => stale += usize::from(m.contains(STALE)),
            other => panic!("while paused: {other:?}"),
        }
        failed.extend(numbers);
    }
    assert!(stale > 0, "no append failed as stale in the queue");
    let err = b.read(&to, 0, 1);
    assert!(matches!(err, Err(StoreError::Unavailable(_))), "{err:?}");

    pg.resume();
    // A BEGIN that got no answer before its deadline must not leave its connection in
    // the pool: once the server answers it, the next user's statements would run in a
    // transaction nobody commits (acknowledged, then rolled back with the session).
    for _ in 0..20 {
        assert_eq!(
            idle_in_transaction(&pg),
            0,
            "a connection left inside a transaction"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let (n, seq) = recover(&b, &to, 10_000_000);
    acked.insert(n, seq);
    // Exactly what was acknowledged, at its seq; nothing that failed while the database
    // was stopped (none of it was written past BEGIN).
    let mut all = stored(&b, &to);
    for t in 0..8u32 {
        all.extend(stored(&b, &addr(2, 1 + t)));
    }
    let got: HashMap<u64, u64> = all.iter().copied().collect();
    assert_eq!(got.len(), all.len(), "a message stored twice");
    assert_eq!(got, acked);
    assert!(failed.iter().all(|n| !got.contains_key(n)));
}

/// What one appender saw.
#[derive(Default)]
struct Seen {
    acked: HashMap<u64, u64>,
    stale: Vec<u64>,
    sent: Vec<u64>,
    slowest: Duration,
}

#[test]
fn a_database_paused_mid_flight_loses_nothing_acknowledged() {
    let (pg, opts) = db();
    let b = Arc::new(node(&opts, "a"));
    let deadline = opts.connect_timeout + opts.statement_timeout;
    // Queue wait, then the lock's and the commit's deadlines.
    let bound = deadline * 3 + Duration::from_secs(1);
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (b, stop, acks) = (b.clone(), stop.clone(), acks.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let to = addr(3, 1 + (t % 4) as u32);
                let mut seen = Seen::default();
                for i in 0..100_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let n = t << 32 | i;
                    let started = Instant::now();
                    let rx = b
                        .queue_append(&to, &[env(n)], 1_000, 9_000_000_000_000)
                        .expect("queue");
                    seen.sent.push(n);
                    let answer = rt
                        .block_on(async { tokio::time::timeout(bound, rx).await })
                        .unwrap_or_else(|_| panic!("no answer within {bound:?}"))
                        .expect("the writer answers");
                    seen.slowest = seen.slowest.max(started.elapsed());
                    match answer {
                        Ok(seqs) => {
                            seen.acked.insert(n, seqs[0]);
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(StoreError::Unavailable(m)) if m.contains(STALE) => seen.stale.push(n),
                        Err(StoreError::Unavailable(_)) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                seen
            })
        })
        .collect();
    let wait_for = |count: usize, what: &str| {
        let start = Instant::now();
        while acks.load(Ordering::Relaxed) < count {
            assert!(
                start.elapsed() < RECOVERY,
                "{what}: {} acks",
                acks.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(200, "before the pause");
    pg.pause();
    let during = acks.load(Ordering::Relaxed);
    // The partition lasts longer than the deadline, so appends fail meanwhile.
    std::thread::sleep(deadline * 2);
    pg.resume();
    wait_for(during + 200, "after resume");
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let mut all = Vec::new();
    for d in 1..=4 {
        all.extend(stored(&b, &addr(3, d)));
    }
    let got: HashMap<u64, u64> = all.iter().copied().collect();
    assert_eq!(got.len(), all.len(), "a message stored twice");
    let sent: std::collections::HashSet<u64> = seen.iter().flat_map(|s| s.sent.clone()).collect();
    assert!(
        got.keys().all(|n| sent.contains(n)),
        "a stored message nobody sent"
    );
    for s in &seen {
        for (n, seq) in &s.acked {
            assert_eq!(
                got.get(n),
                Some(seq),
                "acknowledged message {n} lost or moved"
            );
        }
        assert!(
            s.stale.iter().all(|n| !got.contains_key(n)),
            "a stale append written"
        );
        assert!(s.slowest < bound, "{:?}", s.slowest);
    }
    let failed = seen
        .iter()
        .map(|s| s.sent.len() - s.acked.len())
        .sum::<usize>();
    assert!(failed > 0, "no append failed while the database was paused");
    assert_eq!(
        idle_in_transaction(&pg),
        0,
        "a connection left inside a transaction"
    );
}
