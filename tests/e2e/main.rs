//! End-to-end tests: the real `tern-relay` binary (or, where a test must move the
//! clock, the relay library in-process) with real clients over QUIC on loopback, on
//! sled databases in temporary directories.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

mod client;
mod connections;
mod crash;
mod deletion;
mod delivery;
mod discovery;
mod expiry;
mod export;
mod keys;
mod limits;
mod media;
mod media_privacy;
mod security;
mod storage;
mod support;
