//! What the `tern-load` test files share: a run of the binary and its JSON fields.
#![allow(clippy::expect_used, clippy::unwrap_used, dead_code)]

use std::process::Command;

/// Runs `tern-load` with `args` and `--json` against the relay built beside it; the
/// one JSON object it prints.
pub(crate) fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-load"))
        .args(args)
        .args([
            "--json",
            "--relay-bin",
            env!("CARGO_BIN_EXE_tern-relay-bench"),
        ])
        .output()
        .expect("run tern-load");
    assert!(
        out.status.success(),
        "tern-load {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// A numeric field of a report, which must be there.
pub(crate) fn number(v: &serde_json::Value, field: &str) -> f64 {
    v.get(field)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{field} missing in {v}"))
}
