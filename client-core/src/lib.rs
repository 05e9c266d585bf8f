//! Tern client library: the device side of Tern. It owns every key, encrypts end to
//! end, and talks to relays over QUIC with the relay's certificate pinned.
//!
//! # Layout
//! - [`client`]: [`Client`], what an app uses: register or open a device, send and
//!   receive end-to-end encrypted messages and attachments. The async shell
//!   (`client/mod.rs`, and `worker.rs`, which only moves bytes to and from the relay)
//!   over rules free of I/O that take the time and the random source as arguments:
//!   `state.rs` (what is cached, loading and writing), `keys.rs` (prekeys, their
//!   rotation, the delivery token), `contacts.rs` (contacts, identity changes, held
//!   messages, sessions), `outbox.rs` (queue, encrypt, seal) and `inbox.rs` (open,
//!   check, decrypt, store). [`ClientOptions`] supplies the clock.
//! - [`crypto`]: X3DH (with [`crypto::x3dh::VerifiedBundle`]), the Double Ratchet,
//!   session sets, the message layer, sealed sender, padding, attachment encryption.
//!   No I/O.
//! - [`discovery`]: contact discovery's device side: normalising numbers, blinding
//!   them for the relay's OPRF, the cache of outputs, the local copy of the filter.
//! - [`media`]: attachments: encrypt, upload once, download, forward without re-upload.
//! - [`link`]: linking a new device: the link it shows, the keys it waits with, the
//!   HPKE-sealed payload the primary deposits for it.
//! - [`identity`]: the account's Ed25519 identity key and each device's own key.
//! - [`net`]: [`net::RelayConnection`], the wire protocol: a pipelined connection to one
//!   relay (register, authenticate, send, receive pushes, acknowledge, media streams).
//! - [`safety`]: safety numbers two users compare to check each other's identity.
//! - [`store`]: device storage: [`store::KvStore`], in memory or in sled encrypted at
//!   rest, and inside the crate the typed stores over it (identity, prekeys,
//!   sessions, contacts, outbox, inbox) whose writes go out as one atomic batch.
//! - [`error`]: the crate's [`Error`], with the relay's refusals as [`ErrorCode`].
//!
//! # Quick start
//! ```no_run
//! # async fn run(storage_key: [u8; 32]) -> tern_client::Result<()> {
//! use std::sync::Arc;
//! use tern_client::{store::SledKv, Client, ContactCard, Event};
//!
//! let relay = "tern://<fingerprint>@127.0.0.1:7443".parse()?;
//! let store = Arc::new(SledKv::open("device".as_ref(), &storage_key)?);
//! let (client, mut events) = Client::register(&relay, store).await?; // later: Client::open
//! let bob: ContactCard = "tern-contact:...".parse()?;                   // from Bob, out of band
//! client.add_contact(&bob).await?;
//! client.send(&bob.account, b"hello").await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         // store m.body in the app, then:
//!         client.confirm(m.seq).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod crypto;
pub mod discovery;
pub mod error;
pub mod groups;
pub mod identity;
pub mod link;
pub mod media;
pub mod net;
pub mod safety;
pub mod store;

pub use client::{
    Client, ClientOptions, ContactCard, DeviceInfo, Event, Events, GroupChange, GroupId, GroupInfo,
    GroupMessage, Joining, LinkedDevice, ReceivedMessage, GROUP_REJOIN_AFTER, GROUP_TOKEN_WAIT,
    GROUP_UPDATE_INTERVAL,
};
#[doc(no_inline)]
pub use error::ErrorCode;
pub use error::{Error, Result};
pub use tern_proto::PushTarget;
#[doc(no_inline)]
pub use tern_proto::VerificationId;
