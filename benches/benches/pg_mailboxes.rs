//! Mailboxes on PostgreSQL: appends/s from concurrent appenders of 1 KiB envelopes
//! (each waits for its commit, as a send does), then drain (read + remove) per second,
//! with the writer's rows per transaction. Starts its own PostgreSQL with `fsync=on`
//! and `synchronous_commit=on`.
//!
//! `cargo bench -p tern-benches --bench pg_mailboxes` (`TERN_PG_BENCH_SECS`, default 5;
//! `TERN_PG_BENCH_APPENDERS`, default 64).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};
use tern_relay::store::pg::{PgBackend, PgOptions};
use tern_relay::store::{Envelope, MailboxStore};
use tern_relay::testing::TestPostgres;

/// Concurrent appenders (`TERN_PG_BENCH_APPENDERS`, default 64).
fn appenders() -> u32 {
    std::env::var("TERN_PG_BENCH_APPENDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

fn main() {
    let secs: u64 = std::env::var("TERN_PG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let pg = TestPostgres::start_with(&[("fsync", "on"), ("synchronous_commit", "on")]);
    pg.create_db("bench");
    let mut opts = PgOptions::new(pg.conn_str("bench"));
    opts.node_id = "bench".into();
    // Appends to accounts the bench never registers.
    opts.require_accounts = false;
    let store = Arc::new(PgBackend::open(&opts).expect("open"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let payload = Bytes::from(vec![0x5a; 1024]);
    let addr = |i: u32| DeviceAddress::from_wire(&[(i % 251) as u8 + 1; 16], 1 + i).expect("addr");

    // Appends.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (c0, r0) = store.writer_stats();
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..appenders())
            .map(|i| {
                let (store, stop, done, payload) =
                    (store.clone(), stop.clone(), done.clone(), payload.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mut id = [0u8; 16];
                        id[..8].copy_from_slice(&n.to_be_bytes());
                        let env = Envelope {
                            message_id: MessageId(id),
                            payload: payload.clone(),
                        };
                        let staged = store
                            .stage_append(&addr(i), &[env], 1_000, u64::MAX)
                            .expect("stage");
                        staged.wait().await.expect("append");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("task");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (c1, r1) = store.writer_stats();
    let appended = done.load(Ordering::Relaxed);
    println!(
        "append: {appended} msgs in {elapsed:.2} s = {:.0} msg/s; {} commits, {:.1} rows/commit",
        appended as f64 / elapsed,
        c1 - c0,
        (r1 - r0) as f64 / (c1 - c0).max(1) as f64
    );

    // Drain: each task reads its mailbox a window at a time and removes what it read.
    let drained = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..appenders())
            .map(|i| {
                let (store, drained) = (store.clone(), drained.clone());
                tokio::spawn(async move {
                    let mut cursor = 0;
                    loop {
                        let batch = store.read(&addr(i), cursor, 64).expect("read");
                        let Some(last) = batch.last() else { return };
                        cursor = last.seq;
                        let seqs: Vec<u64> = batch.iter().map(|m| m.seq).collect();
                        let removed = store
                            .stage_remove(&addr(i), &seqs)
                            .expect("stage")
                            .wait()
                            .await
                            .expect("remove");
                        drained.fetch_add(removed.messages, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (c2, r2) = store.writer_stats();
    let drained = drained.load(Ordering::Relaxed);
    println!(
        "drain: {drained} msgs in {elapsed:.2} s = {:.0} msg/s; {} commits, {:.1} rows/commit",
        drained as f64 / elapsed,
        c2 - c1,
        (r2 - r1) as f64 / (c2 - c1).max(1) as f64
    );
    assert_eq!(drained, appended);
}
