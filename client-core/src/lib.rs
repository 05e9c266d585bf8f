//! Tern client library: the device side of Tern. It owns every key, and talks to
//! relays over QUIC with the relay's certificate pinned.
//!
//! # Layout
//! - [`crypto`]: end-to-end cryptography: sealed sender, padding.
//! - [`media`]: attachments: encrypt, upload once, download, forward without re-upload.
//! - [`identity`]: the account's Ed25519 identity key and each device's own key.
//! - [`net`]: [`net::RelayConnection`], a pipelined connection to one relay: register,
//!   authenticate, send envelopes, receive pushed deliveries, acknowledge them.
//! - [`safety`]: safety numbers two users compare to check each other's identity.
//! - [`store`]: device storage: [`store::KvStore`], in memory or in sled encrypted at rest.
//! - [`error`]: the crate's [`Error`].
//!
//! # Quick start
//! ```no_run
//! # async fn run() -> tern_client::Result<()> {
//! use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
//! use tern_client::net::RelayConnection;
//!
//! let relay = "tern://<fingerprint>@127.0.0.1:7443".parse()?;
//! let (identity, device) = (IdentityKeyPair::generate(), DeviceKeyPair::generate());
//! let (conn, mut inbox) = RelayConnection::connect(&relay).await?;
//! let me = conn.register(&identity, &device).await?;
//! while let Some(incoming) = inbox.recv().await {
//!     // decrypt, persist, then acknowledge
//! #   let _ = (incoming, me);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod media;
pub mod net;
pub mod safety;
pub mod store;

pub use client::{Client, ContactCard, Event, Events, ReceivedMessage};
pub use error::{Error, Result};
