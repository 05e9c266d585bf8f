//! The bodies of Tern's fuzz targets: every parser of bytes that arrive from the
//! network or from disk, each behind one `pub fn <target>(data: &[u8])`.
//!
//! A body returns normally for every input, whether the input is valid or not; it
//! panics only when the code under test breaks a rule: a panic inside a parser, a
//! value that does not survive a round trip to the wire, a failed decryption that
//! changed a session, a log that reads differently after a reopen. cargo-fuzz
//! (`fuzz/`, outside the workspace) calls these bodies under libFuzzer; the test
//! `tests/replay.rs` calls them on every file of `fuzz/corpus/`, so a plain
//! `cargo test` replays the corpus without a fuzzer. See `fuzz/README.md`.
//!
//! # Layout
//! - [`wire`]: frames, requests, replies, ids and addresses, contact cards, the
//!   published discovery filter.
//! - [`crypto`]: the X3DH header, the ratchet header and session, the stored session
//!   set, sealed sender, attachment decryption.
//! - [`store`]: the relay's mailbox log scan.
//! - [`logs`]: the relay's redaction of addresses from log lines.
//! - [`groups`]: an incoming group envelope (MLS) at a group member.
//! - [`stateful`]: two clients' sessions through a relay mailbox that drops,
//!   duplicates, reorders and corrupts.
//! - [`seeds`]: valid inputs made by the code itself, for the seed corpus.
//! - [`TARGETS`]: every target by name.
//!
//! Randomness inside a body comes from a seeded generator, so an input replays the
//! same way every time.
#![forbid(unsafe_code)]
// A fuzz body's job is to panic on a broken rule, and its fixtures are built from
// fixed keys that cannot fail: here an `expect` is an assertion.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod crypto;
mod fixture;
pub mod groups;
pub mod logs;
pub mod seeds;
pub mod stateful;
pub mod store;
pub mod wire;

pub use crypto::{attachment, ratchet, sealed_open, session_record, x3dh_header};
pub use groups::group_envelope;
pub use logs::redact;
pub use stateful::two_clients;
pub use store::log_scan;
pub use wire::{
    contact_card, discovery_filter, frame_decoder, ids_and_addresses, replies, requests,
};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and its
/// `fuzz/corpus/<name>/` directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_decoder", frame_decoder),
    ("requests", requests),
    ("replies", replies),
    ("ids_and_addresses", ids_and_addresses),
    ("contact_card", contact_card),
    ("x3dh_header", x3dh_header),
    ("ratchet", ratchet),
    ("session_record", session_record),
    ("sealed_open", sealed_open),
    ("attachment", attachment),
    ("log_scan", log_scan),
    ("two_clients", two_clients),
    ("redact", redact),
    ("discovery_filter", discovery_filter),
    ("group_envelope", group_envelope),
];

/// The body of the target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
