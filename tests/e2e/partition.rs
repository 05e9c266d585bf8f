//! A database that hangs under a relay node (a network partition, a stopped host):
//! connections to it stay open and nothing answers. Sends fail UNAVAILABLE in bounded
//! time, the relay stays responsive and its memory bounded, and once the database
//! answers again sends succeed by themselves; the recipient gets every acknowledged
//! message once and nothing else.

use std::time::{Duration, Instant};

use crate::support::{envelope, number, register, send_until_stored, within, Device, PgNodes};
use tern_client::net::RelayConnection;
use tern_proto::ErrorCode;

/// The node's database deadlines (connect 500 ms + statement 1 s).
const DB_KEYS: &str = "statement_timeout = \"1s\"\nconnect_timeout = \"500ms\"";

/// How long any send may wait for its answer while the database hangs: two deadlines
/// (its own and the request's ahead of it), the writer's queue, and slack.
const BOUND: Duration = Duration::from_secs(6);

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_database_that_hangs_fails_sends_unavailable_in_bounded_time_and_recovers() {
    let nodes = PgNodes::start(&[]);
    let pg = &nodes.pg;
    let node = nodes.start_node("a", DB_KEYS, None);
    let pid = node.pid().expect("pid");
    let alice = register(&node.address).await;
    let (bob_addr, bob_key, bob_id) = register(&node.address).await.go_offline().await;
    let mut acked: Vec<u32> = Vec::new();
    for i in 1..=20 {
        within(alice.conn.send(&bob_addr, [envelope(i)]))
            .await
            .expect("send");
        acked.push(i);
    }
    let rss_before = rss_kib(pid);

    pg.pause();
    let started = Instant::now();
    // A burst issued at once (each request leaves at the call), then each answer.
    let burst: Vec<_> = (1_000..1_300u32)
        .map(|i| {
            let send = alice.conn.send(&bob_addr, [envelope(i)]);
            async move { (send.await, started.elapsed()) }
        })
        .collect();
    let answers = tokio::spawn(futures::future::join_all(burst));
    // Meanwhile the relay takes a new connection and answers it (no database needed).
    let ping_started = Instant::now();
    let (other, _inbox) = within(RelayConnection::connect(&node.address))
        .await
        .expect("connect while the database hangs");
    within(other.ping()).await.expect("ping");
    let ping = ping_started.elapsed();
    let answers = within(answers).await.expect("burst");
    let slowest = answers.iter().map(|(_, t)| *t).max().unwrap_or_default();
    // Each send costs at most a wait of its own and one for the request ahead of it
    // (not one deadline per send ahead: 300 × 1.5 s).
    assert!(slowest < BOUND, "slowest answer after {slowest:?}");
    assert!(
        ping < Duration::from_secs(1),
        "ping on a new connection took {ping:?}"
    );
    for (answer, _) in &answers {
        let err = answer
            .as_ref()
            .expect_err("no database, no acknowledgement");
        assert_eq!(err.relay_code(), Some(ErrorCode::Unavailable), "{err}");
    }
    let rss_after = rss_kib(pid);
    eprintln!(
        "partition: {} sends answered UNAVAILABLE, slowest after {slowest:?}; ping on a new \
         connection {ping:?}; relay RSS {rss_before} -> {rss_after} KiB",
        answers.len()
    );

    // The failed sends leave nothing behind (their staged appends answered and gone).
    assert!(
        rss_after < rss_before + 32 * 1024,
        "relay RSS grew from {rss_before} to {rss_after} KiB"
    );

    pg.resume();
    let next = send_until_stored(&alice.conn, &bob_addr, 2_000, Duration::from_millis(100)).await;
    acked.push(next);
    for i in 3_000..3_020 {
        within(alice.conn.send(&bob_addr, [envelope(i)]))
            .await
            .expect("send after recovery");
        acked.push(i);
    }
    // Exactly what was acknowledged, each once, in order.
    let (mut bob, queued) = Device::connect(&node.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, acked.len() as u64);
    let got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(got, acked);
}
