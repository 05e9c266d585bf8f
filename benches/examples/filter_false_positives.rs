//! The discovery filter's false-positive figure: 2^32 random non-keys against a
//! snapshot of 10^6 keys (unused slots left 0). About one hit is expected at a rate of
//! 2^-32; the run fails if there are more than 8.
//!
//! `cargo run --release -p tern-benches --example filter_false_positives`

#![allow(clippy::expect_used, missing_docs)]

use tern_proto::discovery::{FilterKey, FilterSnapshot};

fn main() {
    let mut state = 11u64;
    let keys: Vec<u64> = (0..1_000_000)
        .map(|_| xorf::splitmix64(&mut state))
        .collect();
    let snap = FilterSnapshot::build(1, keys).expect("builds");
    let mut probe = 0x5eed_u64;
    let queries = 1u64 << 32;
    let hits = (0..queries)
        .filter(|_| snap.contains(FilterKey(xorf::splitmix64(&mut probe))))
        .count();
    println!("{hits} false positives in 2^32 queries against 10^6 keys (about 1 expected)");
    assert!(hits <= 8, "{hits} false positives; about 1 expected");
}
