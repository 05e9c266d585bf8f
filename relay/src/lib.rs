//! Tern relay: holds end-to-end encrypted envelopes for devices that are offline,
//! pushes them to devices that are online, deletes each on acknowledgement, and
//! deletes whatever is undelivered when it expires (30 days at most).
//!
//! The relay never sees plaintext or who sent a message: it stores opaque
//! ciphertext under the recipient's (account, device) address.
//!
//! # Layout
//! - [`core`]: the rules, free of I/O (limits, expiry, delivery window, signature
//!   checks). Time is an argument.
//! - [`store`]: [`store::MailboxStore`] and [`store::AccountStore`], with sled (the
//!   embedded default) and in-memory implementations.
//! - [`media`]: encrypted media, content-addressed files stored once per id.
//! - [`hub`]: ties rules to stores: per-device locks, wake-ups, group commit, sweeps.
//! - [`commit`]: group commit, so concurrent sends share fsyncs.
//! - [`net`]: QUIC endpoint, TLS certificate, per-connection sessions.
//! - [`server`]: [`Relay`], a running relay with orderly shutdown.
//! - [`cli`]: the `tern-relay` command line.
//! - [`config`], [`error`]. Time comes from [`tern_platform::clock`].
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

pub mod cli;
pub mod commit;
pub mod config;
pub mod core;
pub mod error;
pub mod hub;
pub mod media;
pub mod net;
pub mod server;
pub mod store;

pub use error::{Error, Result};
pub use server::Relay;
