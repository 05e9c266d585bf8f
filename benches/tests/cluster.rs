//! `tern-load online --nodes 2` at a tiny size: two relay processes over one real
//! PostgreSQL, every sender on node A and every recipient on node B; every message
//! arrives once, and the latency and cost fields are there and sane.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::process::Command;

use tern_relay::testing::TestPostgres;

mod common;

use common::{number, run};

/// The latency fields of a run of `messages`, in order, and no sum of them absurd.
fn check_latencies(v: &serde_json::Value) {
    let (p50, p99, p999, max) = (
        number(v, "p50_us"),
        number(v, "p99_us"),
        number(v, "p999_us"),
        number(v, "max_us"),
    );
    assert!(p50 > 0.0, "{v}");
    assert!(p50 <= p99 && p99 <= p999 && p999 <= max, "{v}");
    // Far above any real figure, far below a unit mix-up (ns or a clock across runs).
    assert!(max < 30e6, "{v}");
}

#[test]
fn two_nodes_deliver_every_message_across_and_report_the_database_costs() {
    let pg = TestPostgres::start_with(&[
        ("max_connections", "200"),
        ("shared_preload_libraries", "pg_stat_statements"),
    ]);
    pg.create_db("tern");
    let url = pg.conn_str("tern");
    let v = run(&[
        "online",
        "--nodes",
        "2",
        "--postgres",
        &url,
        "--pairs",
        "2",
        "--messages",
        "300",
        "--rate",
        "200",
        "--size",
        "64",
    ]);
    assert_eq!(v["mode"], "online");
    assert_eq!(number(&v, "messages"), 300.0);
    assert_eq!(number(&v, "nodes"), 2.0);
    check_latencies(&v);
    let rate = number(&v, "msgs_per_sec");
    assert!(rate > 50.0 && rate < 260.0, "paced near 200/s: {v}");
    // Node A takes the sends, node B pushes: both work for every message.
    assert!(number(&v, "node_a_cpu_us_per_msg") > 0.0, "{v}");
    assert!(number(&v, "node_b_cpu_us_per_msg") > 0.0, "{v}");
    // Each message is written (a send), then deleted (an ack): WAL holding at least
    // its payload, and write transactions, shared by batches.
    assert!(number(&v, "wal_bytes_per_msg") > 64.0, "{v}");
    let xacts = number(&v, "pg_write_xacts_per_msg");
    assert!(xacts > 0.0 && xacts < 10.0, "{v}");
    assert!(number(&v, "pg_cpu_us_per_msg") > 0.0, "{v}");
    // A send, a read and an ack at least, each a statement.
    let statements = number(&v, "pg_statements_per_msg");
    assert!((1.0..100.0).contains(&statements), "{v}");
}

#[test]
fn two_nodes_without_a_database_given_start_their_own() {
    let v = run(&[
        "online",
        "--nodes",
        "2",
        "--pairs",
        "1",
        "--messages",
        "100",
        "--rate",
        "200",
        "--size",
        "32",
    ]);
    assert_eq!(number(&v, "messages"), 100.0);
    assert_eq!(number(&v, "nodes"), 2.0);
    check_latencies(&v);
    assert!(number(&v, "wal_bytes_per_msg") > 32.0, "{v}");
}

#[test]
fn two_nodes_refuse_a_relay_they_did_not_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(["online", "--nodes", "2", "--json"])
        .args([
            "--relay",
            "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:1",
        ])
        .output()
        .expect("run tern-load");
    assert!(!out.status.success());
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert!(
        v["error"].as_str().expect("error").contains("--relay"),
        "{v}"
    );
}
