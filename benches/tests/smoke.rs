//! Each `tern-load` mode at a tiny size, so the harness cannot rot: it starts its own
//! relay process, moves every message exactly once and prints the JSON fields.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::process::Command;

use tern_benches::load::pin::{cpus_allowed, Pinning};
use tern_benches::load::COMMON_FIELDS;

mod common;

use common::{number, run};

#[test]
fn online_moves_every_message() {
    let v = run(&["online", "--pairs", "2", "--messages", "40", "--size", "64"]);
    for f in &COMMON_FIELDS[1..] {
        number(&v, f);
    }
    assert_eq!(v["mode"], "online");
    assert_eq!(v["sealing"], "end-to-end");
    assert_eq!(v["pinning"], "none");
    assert_eq!(number(&v, "messages"), 40.0);
    assert!(number(&v, "msgs_per_sec") > 0.0);
    assert!(number(&v, "p50_us") > 0.0 && number(&v, "p99_us") >= number(&v, "p50_us"));
    assert!(number(&v, "relay_peak_rss_kib") > 0.0);
    assert!(number(&v, "relay_switches_per_msg") > 0.0);
    // Padded to PADMÉ's 256-byte floor, plus the sealing.
    assert!(number(&v, "envelope_bytes") > 256.0);
}

#[test]
fn online_presealed_moves_every_message_without_opening_one() {
    let v = run(&[
        "online",
        "--presealed",
        "--pairs",
        "2",
        "--messages",
        "300",
        "--size",
        "1024",
    ]);
    assert_eq!(v["mode"], "online");
    assert_eq!(v["sealing"], "presealed");
    assert_eq!(number(&v, "messages"), 300.0);
    assert!(number(&v, "msgs_per_sec") > 0.0);
    assert!(number(&v, "seal_msgs_per_sec") > 0.0);
    assert!(number(&v, "p50_us") > 0.0 && number(&v, "p99_us") >= number(&v, "p50_us"));
    assert!(number(&v, "relay_cpu_us_per_msg") > 0.0);
    assert_eq!(number(&v, "fsync"), 1.0);
    // The 1 KiB body, padded (PADMÉ) and sealed.
    assert!(number(&v, "envelope_bytes") > 1024.0);
}

#[test]
fn online_presealed_at_a_fixed_rate_with_relay_and_load_pinned() {
    // Separate CPUs where this test may use two; the same one otherwise.
    let allowed = cpus_allowed(std::process::id()).expect("this process's CPUs");
    let cpus = Pinning::parse(&format!("load={allowed}"))
        .expect("a CPU list")
        .load
        .expect("CPUs");
    let (relay, load) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    let pin = format!("relay={relay},load={load}");
    let v = run(&[
        "online",
        "--presealed",
        "--pairs",
        "2",
        "--messages",
        "200",
        "--size",
        "64",
        "--rate",
        "400",
        "--pin",
        &pin,
    ]);
    assert_eq!(v["sealing"], "presealed");
    assert_eq!(v["pinning"], format!("relay={relay} load={load}"));
    assert_eq!(number(&v, "target_rate"), 400.0);
    assert_eq!(number(&v, "messages"), 200.0);
}

#[test]
fn a_pinning_that_is_not_one_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(["online", "--presealed", "--pin", "relay=zero"])
        .output()
        .expect("run tern-load");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay=zero"));
}

#[test]
fn offline_accepts_then_drains_every_message() {
    let v = run(&[
        "offline",
        "--recipients",
        "2",
        "--messages",
        "50",
        "--size",
        "32",
        "--durability",
        "fsync",
        "--batch",
        "8",
    ]);
    assert_eq!(v["mode"], "offline");
    assert_eq!(v["sealing"], "presealed");
    assert_eq!(number(&v, "messages"), 50.0);
    assert!(number(&v, "msgs_per_sec") > 0.0);
    assert!(number(&v, "drain_msgs_per_sec") > 0.0);
    assert!(number(&v, "decrypt_msgs_per_sec") > 0.0);
    assert!(number(&v, "envelope_bytes") > 256.0);
    assert!(number(&v, "relay_switches_per_msg") > 0.0);
}

#[test]
fn connections_reports_memory_per_connection() {
    let v = run(&["connections", "--count", "8"]);
    assert_eq!(v["mode"], "connections");
    assert!(number(&v, "rss_per_conn_kib") >= 0.0);
    assert_eq!(number(&v, "connections"), 8.0);
}

#[test]
fn media_moves_an_attachment_both_ways() {
    let v = run(&["media", "--size", "300000"]);
    assert_eq!(v["mode"], "media");
    for f in [
        "upload_mb_per_sec",
        "download_mb_per_sec",
        "client_peak_rss_kib",
        "relay_peak_rss_kib",
    ] {
        assert!(number(&v, f) > 0.0, "{f}");
    }
}

#[test]
fn a_failed_run_says_why_on_stdout_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(["online", "--json", "--relay-bin", "/nonexistent/tern-relay"])
        .output()
        .expect("run tern-load");
    assert!(!out.status.success());
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let error = v["error"].as_str().expect("an error field");
    assert!(error.contains("/nonexistent/tern-relay"), "{error}");
}

#[test]
fn restart_keeps_every_message_and_reports_the_time_to_serve() {
    let v = run(&[
        "restart",
        "--recipients",
        "2",
        "--messages",
        "300",
        "--batch",
        "64",
        "--drain",
        "1",
    ]);
    assert_eq!(v["mode"], "restart");
    assert_eq!(number(&v, "drained_before_restart"), 150.0);
    assert_eq!(number(&v, "messages"), 300.0);
    let (address, ping) = (
        number(&v, "restart_to_address_s"),
        number(&v, "restart_to_ping_s"),
    );
    assert!(address > 0.0 && ping >= address, "{address} then {ping}");
    assert!(number(&v, "relay_peak_rss_kib") > 0.0);
    assert!(number(&v, "restart_relay_rss_kib") > 0.0);
    assert!(number(&v, "mailbox_disk_mib") > 0.0);
}
