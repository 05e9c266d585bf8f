//! `benches/sitting` builds its ratio table from a sitting's outputs: canned outputs of
//! the peers (`../shared/peers/run`, offline and online) and of `tern-load` (JSON), two
//! rounds, one failed run. Nothing is run but the script's table step.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::Command;

fn table() -> String {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(here.join("sitting"))
        .arg("--table-from")
        .arg(here.join("tests/sitting"))
        .output()
        .expect("python3 runs benches/sitting");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn row<'a>(table: &'a str, label: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label:?} in\n{table}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

#[test]
fn the_table_has_each_figure_of_both_sides_over_the_rounds() {
    let t = table();
    // Medians, and the range when the rounds differ.
    assert_eq!(
        row(&t, "offline accept, msg/s")[1..],
        [
            "149k (140k–158k)",
            "164k (151k–177k)",
            "67.5k (60k–75k)",
            "90.5k (78k–103k)"
        ]
    );
    // Redis's figures are AOF always's, not everysec's printed before them.
    assert_eq!(row(&t, "offline drain, msg/s")[3], "75k (67k–83k)");
    assert_eq!(
        row(&t, "online peak, recipient connected, msg/s")[1..],
        ["110k (100k–120k)", "82k", "59k", "64k"]
    );
    // Today's end-to-end mode, Tern only, beside the relay-only peak.
    assert_eq!(
        row(
            &t,
            "online peak, end to end (Tern's client crypto inside the clock), msg/s"
        )[1..],
        ["11.5k", "—", "—", "—"]
    );
    assert_eq!(
        row(&t, "online at 3,000 msg/s: p50 / p99, ms")[1..3],
        [
            "0.40 (0.38–0.41) / 2.25 (1.90–2.60)",
            "1.22 (1.16–1.28) / 2.95 (2.20–3.70)"
        ]
    );
    // Only the round that did not fail; the peers are not pinned.
    assert_eq!(
        row(
            &t,
            "online at 3,000 msg/s, pinned (relay=0 load=1): p50 / p99, ms"
        )[1..],
        ["0.30 / 1.50", "—", "—", "—"]
    );
    assert_eq!(
        row(&t, "**server CPU per message at 3,000 msg/s, µs**")[1..],
        ["59 (58–60)", "62 (61–63)", "72", "19"]
    );
    assert_eq!(
        row(&t, "envelope bytes")[1..],
        ["1,015", "1,024", "1,024", "1,024"]
    );
    assert_eq!(row(&t, "offline accept")[2..], ["0.91×", "2.21×", "1.65×"]);
    assert_eq!(row(&t, "server CPU per message at 3,000 msg/s")[2], "0.95×");
    assert!(t.contains("- round 2, r2-tern-online-3000-pinned: stalled"));
    assert!(t.contains("on commit abc1234"));
    assert!(t.contains("`tern-load online --presealed`"));
}

#[test]
fn the_table_is_the_one_kept_beside_the_outputs() {
    let expected = include_str!("sitting/expected.md");
    assert_eq!(table(), expected);
}
