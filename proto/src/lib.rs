//! Tern wire protocol: the protobuf messages exchanged between clients and relays,
//! the length-prefixed frame codec, validated identifiers, and the byte layouts
//! that devices sign.
//!
//! This crate holds wire types only: no cryptography, no storage, no I/O policy.
//!
//! # Layout
//! - [`v1`]: the generated prost types for `proto/tern.proto` (client <-> relay).
//! - [`e2e`]: the generated prost types for `proto/e2e.proto` (client <-> client,
//!   inside envelopes).
//! - [`frame`]: length-prefixed framing, with the size limit checked before any
//!   allocation, and "incomplete" kept apart from "invalid".
//! - [`ids`]: [`AccountId`], [`DeviceId`], [`MessageId`], [`DeviceAddress`], each
//!   checked when built from wire bytes.
//! - [`auth`]: the exact bytes an identity or device key signs.
//! - [`limits`]: protocol constants and default limits.
//!
//! # Quick start
//! ```
//! use bytes::BytesMut;
//! use tern_proto::{frame, v1};
//!
//! let ping = v1::ClientFrame {
//!     request_id: 7,
//!     body: Some(v1::client_frame::Body::Ping(v1::PingRequest {})),
//! };
//! let mut wire = BytesMut::new();
//! frame::encode(&ping, &mut wire);
//!
//! let mut decoder = frame::Decoder::new(frame::DEFAULT_MAX_FRAME);
//! let decoded: v1::ClientFrame = decoder.decode_message(&mut wire)?.expect("one whole frame");
//! assert_eq!(decoded, ping);
//! # Ok::<(), tern_proto::frame::FrameError>(())
//! ```
#![forbid(unsafe_code)]

pub mod address;
pub mod auth;
pub mod frame;
pub mod ids;
pub mod limits;

pub use address::{Fingerprint, RelayAddress};
pub use ids::{AccountId, DeviceAddress, DeviceId, IdError, MessageId};

/// The generated protobuf types of `tern.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

/// The generated protobuf types of `tern.e2e.v1`: what clients put inside envelopes.
/// The relay never parses these.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod e2e {
    include!(concat!(env!("OUT_DIR"), "/tern.e2e.v1.rs"));
}

/// The ALPN protocol id every Tern connection negotiates.
pub const ALPN: &[u8] = b"tern/1";

/// QUIC application close codes a relay uses.
pub mod close {
    /// Normal close.
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol (an oversized frame, no control stream).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A newer connection of the same device took over its deliveries.
    pub const DISPLACED: u32 = 2;
    /// The relay is shutting down; reconnect later.
    pub const SHUTTING_DOWN: u32 = 3;
}
