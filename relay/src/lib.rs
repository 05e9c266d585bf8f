//! Tern relay: holds end-to-end encrypted envelopes for devices that are offline,
//! pushes them to devices that are online, deletes each on acknowledgement, and
//! deletes whatever is undelivered when it expires (30 days at most).
//!
//! The relay never sees plaintext or who sent a message: it stores opaque
//! ciphertext under the recipient's (account, device) address.
//!
//! # Layout
//! - [`core`]: the rules, free of I/O (limits, expiry, delivery window, rate,
//!   relay-wide budgets, and the signature checks that yield proof tokens). Time is an
//!   argument.
//! - The services, each applying rules to stores:
//!   - [`mailboxes`]: queued messages per device: per-device ordering, subscriptions
//!     and wake-ups, one append-then-commit call, pull, ack, sweep.
//!   - [`accounts`]: accounts and devices, session proofs, delivery tokens.
//!   - `keys`: the key directory (signed and one-time prekeys).
//!   - `groups`: the MLS delivery service: key packages, and each group handle's
//!     epoch (commits ordered one per epoch).
//!   - `certificates`: sender certificates, signed with the relay's key.
//!   - [`media`]: encrypted media, content-addressed files stored once per id.
//!   - [`deletion`]: account deletion and linked-device removal, with the
//!     tombstones that hide a deleted account (or removed device) from every other
//!     service.
//!   - [`provisioning`]: the slots through which a new device receives its link
//!     payload.
//!   - [`discovery`]: contact discovery: the OPRF key, tags of verified numbers,
//!     evaluation and lookup limits, and the published filter.
//!   - [`verification`]: phone verification sessions, verifiers (webhook, dev
//!     file), start limits; a verified number becomes a discovery tag.
//!   - [`push`]: push targets and content-free wake-ups for devices that are not
//!     connected (UnifiedPush endpoints, app publishers' gateways).
//! - [`store`]: the storage traits, the mailbox log, sled and in-memory backends, how
//!   they are composed ([`store::Stores`]) and made durable ([`store::GroupCommit`]);
//!   [`store::pg`]: the shared PostgreSQL backend, for relays of several nodes.
//! - [`cluster`]: what a node does when several share one database: cross-node
//!   wake-ups and displacement (hints behind [`cluster::notify::Notifier`], with a
//!   periodic re-check), the node heartbeat.
//! - `net`: QUIC endpoint, TLS certificate, admission of new connections (per-address
//!   caps, Retry, the unauthenticated pool), per-connection sessions that decode a
//!   request, call a service and encode its answer.
//! - [`server`]: [`Relay`], a running relay with orderly shutdown, and the
//!   [`server::Services`] it builds.
//! - [`metrics`]: the Prometheus metrics (aggregates only); [`admin`]: operator
//!   commands, offline and through the running relay's admin listener.
//! - [`cli`]: the `tern-relay` command line; [`logging`]: its log formatter, which
//!   redacts IP addresses from every line (P9).
//! - [`config`] (a leaf: it imports no service), [`error`]. Time comes from
//!   [`tern_platform::clock`].
//! - [`testing`]: test helpers other crates' tests use too ([`testing::TestPostgres`]: a
//!   real PostgreSQL cluster per test).
//!
//! [`accounts`], [`mailboxes`], [`core`] and [`store`] are exported for benches and
//! tests, which drive the services through [`server::Services`] without a network;
//! `keys`, `certificates` and `net` are crate-private.
//!
//! # The services without a network
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tern_relay::Result<()> {
//! use std::sync::Arc;
//! use ed25519_dalek::{Signer, SigningKey};
//! use tern_platform::clock::SystemClock;
//! use tern_relay::core::{auth, delivery::DeliveryWindow, expiry::Ttl, limits::Limits};
//! use tern_relay::server::Services;
//! use tern_relay::store::{Durability, Envelope, MemoryStore, Stores};
//!
//! let stores = Stores::all(Arc::new(MemoryStore::new()));
//! let clock = Arc::new(SystemClock);
//! let signer = SigningKey::from_bytes(&[9; 32]);
//! let services =
//!     Services::new(stores, clock, Limits::default(), Ttl::MAX, Durability::Fsync, signer)?;
//!
//! // A registration, as a connection proves it: the identity vouches for the device,
//! // the device signs the connection's exporter value.
//! let (identity, device) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
//! let exporter = [7; 32];
//! let device_key = device.verifying_key().to_bytes();
//! let verified = auth::verify_registration(
//!     &identity.verifying_key().to_bytes(),
//!     &device_key,
//!     &identity.sign(&tern_proto::auth::device_certificate(None, &device_key)).to_bytes(),
//!     &device.sign(&tern_proto::auth::session_proof(&exporter)).to_bytes(),
//!     &exporter,
//! )?;
//! let alice = services.accounts().register(verified).await?;
//!
//! // One append, then its group commit; a note to self.
//! let to = services.accounts().recipient(&alice, *alice.address())?;
//! let note = Envelope {
//!     message_id: tern_proto::MessageId([1; 16]),
//!     payload: "hi".into(),
//! };
//! assert_eq!(services.mailboxes().append(&to, &[note])?.commit().await?, 1);
//!
//! let pulled = services.mailboxes().pull(&alice, &mut DeliveryWindow::new(8))?;
//! assert_eq!(pulled.messages[0].payload, "hi");
//! # Ok(())
//! # }
//! ```
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

// Exported for benches and tests: they drive the services without a network.
pub mod accounts;
pub mod core;
pub mod mailboxes;
pub mod store;

// Exported for media tests (the received-bytes counter).
pub mod media;

// Exported for phone verification, benches and tests.
pub mod discovery;
pub mod provisioning;
pub mod verification;

// The binary and embedders.
pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod deletion;
pub mod error;
pub mod export;
pub mod logging;
pub mod metrics;
pub mod push;
pub mod server;

pub(crate) mod certificates;
pub(crate) mod groups;
pub(crate) mod keys;
pub(crate) mod locks;
pub(crate) mod net;
pub mod testing;

pub use error::{Error, Result};
pub use server::Relay;
