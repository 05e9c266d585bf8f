//! End-to-end tests: the real `tern-relay` binary (or, where a test must move the
//! clock, the relay library in-process) with real clients over QUIC on loopback, on
//! sled databases in temporary directories.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

mod admin;
mod bindings;
mod client;
mod cluster;
mod connections;
mod crash;
mod crowd;
mod deletion;
mod delivery;
mod discovery;
mod discovery_cluster;
mod discovery_privacy;
mod expiry;
mod export;
mod failover;
mod groups;
// The test HTTP server (a gateway for the verification webhook).
#[path = "../src/http.rs"]
#[allow(unreachable_pub)]
mod http;
mod keys;
mod limits;
mod linking;
mod linking_pg;
mod media;
mod media_cluster;
mod media_objects;
mod media_privacy;
mod migrate;
mod multi;
mod multihost;
mod ops;
mod partition;
mod push;
mod rotate_cert;
mod security;
mod storage;
mod support;
mod verification;
