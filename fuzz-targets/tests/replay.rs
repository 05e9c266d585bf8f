//! Replays every file of `fuzz/corpus/<target>/` through its target's body, so the
//! corpus (seeds and every crash found, kept as regressions) runs in the normal test
//! suite without a fuzzer.
#![allow(clippy::expect_used)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use tern_fuzz_targets::{seeds, target, TARGETS};

fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_corpus_file_passes_its_target() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for dir in std::fs::read_dir(corpus()).expect("fuzz/corpus exists") {
        let dir = dir.expect("a corpus entry").path();
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let body = target(&name).unwrap_or_else(|| panic!("fuzz/corpus/{name} names no target"));
        for file in std::fs::read_dir(&dir).expect("a target's corpus") {
            let path = file.expect("a corpus file").path();
            let data = std::fs::read(&path).expect("reading a corpus file");
            if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                failures.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "corpus files that panic: {failures:#?}"
    );
    assert!(replayed >= TARGETS.len(), "only {replayed} corpus files");
}

#[test]
fn every_target_has_a_corpus_and_a_fuzz_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (name, _) in TARGETS {
        let files = std::fs::read_dir(corpus().join(name))
            .unwrap_or_else(|_| panic!("fuzz/corpus/{name} is missing"))
            .count();
        assert!(files > 0, "fuzz/corpus/{name} is empty");
        assert!(
            fuzz.join(format!("{name}.rs")).is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
    }
}

#[test]
fn fresh_seeds_pass_their_targets() {
    // The committed seeds are these, written once; after a format change they are
    // still valid inputs, only less useful: rerun the write_corpus example.
    for (name, seed, bytes) in seeds::all() {
        let body = target(name).expect("a seed names a target");
        let ok = catch_unwind(AssertUnwindSafe(|| body(&bytes))).is_ok();
        assert!(ok, "seed {name}/{seed} panics");
    }
}
