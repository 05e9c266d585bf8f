//! Writes the seed corpus: every seed of `tern_fuzz_targets::seeds` as
//! `fuzz/corpus/<target>/seed-<name>`. Run once after a format change:
//! `cargo run -p tern-fuzz-targets --example write_corpus`.
#![allow(clippy::expect_used)]

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, name, bytes) in tern_fuzz_targets::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
    }
}
