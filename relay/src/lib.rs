//! Tern relay: holds end-to-end encrypted envelopes for devices that are offline,
//! pushes them to devices that are online, deletes each on acknowledgement, and
//! deletes whatever is undelivered when it expires (30 days at most).
//!
//! The relay never sees plaintext or who sent a message: it stores opaque
//! ciphertext under the recipient's (account, device) address.
//!
//! # Layout
//! - [`core`]: the rules, free of I/O (limits, expiry, delivery window, rate, and the
//!   signature checks that yield proof tokens). Time is an argument.
//! - The services, each applying rules to stores:
//!   - [`mailboxes`]: queued messages per device: per-device ordering, subscriptions
//!     and wake-ups, one append-then-commit call, pull, ack, sweep.
//!   - [`accounts`]: accounts and devices, session proofs, delivery tokens.
//!   - `keys`: the key directory (signed and one-time prekeys).
//!   - `certificates`: sender certificates, signed with the relay's key.
//!   - [`blobs`]: encrypted media, content-addressed files stored once per id.
//! - [`store`]: the storage traits, the mailbox log, sled and in-memory backends, how
//!   they are composed ([`store::Stores`]) and made durable ([`store::GroupCommit`]).
//! - `net`: QUIC endpoint, TLS certificate, per-connection sessions that decode a
//!   request, call a service and encode its answer.
//! - [`server`]: [`Relay`], a running relay with orderly shutdown, and the
//!   [`server::Services`] it builds.
//! - [`cli`]: the `tern-relay` command line.
//! - [`config`] (a leaf: it imports no service), [`error`]. Time comes from
//!   [`tern_platform::clock`].
//!
//! Modules exported only for benches and tests are marked so; the rest is
//! `pub(crate)`.
//!
//! # Running one in-process
//! ```no_run
//! # async fn run() -> tern_relay::Result<()> {
//! use std::sync::Arc;
//! use tern_platform::clock::SystemClock;
//! use tern_relay::{config::Config, Relay};
//!
//! let mut config = Config::default();
//! config.listen = "127.0.0.1:0".parse().expect("address");
//! let relay = Relay::start(&config, Arc::new(SystemClock)).await?;
//! println!("{}", relay.address()); // tern://<fingerprint>@127.0.0.1:<port>
//! relay.shutdown().await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod accounts;
pub mod blobs;
pub(crate) mod certificates;
pub mod cli;
pub mod config;
pub mod core;
pub mod error;
pub(crate) mod keys;
pub mod mailboxes;
pub(crate) mod net;
pub mod server;
pub mod store;
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
pub use server::Relay;
