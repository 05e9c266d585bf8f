//! Tern wire protocol: the protobuf messages exchanged between clients and relays,
//! the typed requests and replies they carry, the length-prefixed frame codec,
//! validated identifiers, and the byte layouts that devices sign.
//!
//! This crate holds wire types only: no cryptography, no storage, no I/O policy. It is
//! the only place that converts to and from the generated [`v1`] types: relay and
//! client speak in [`ClientRequest`], [`ServerMessage`] and the media messages, and
//! convert at the edge with `TryFrom` (which validates) and `From` (which cannot
//! fail).
//!
//! # Layout
//! - [`request`]: [`ClientRequest`] and [`Request`], one variant per request;
//!   `TryFrom<v1::ClientFrame>` checks ids, lengths and counts and refuses with a
//!   [`RequestError`] that keeps the request id and the [`ErrorCode`] to answer with.
//! - [`reply`]: [`ServerMessage`] (response, delivery, end of queue), [`Reply`],
//!   [`ErrorReply`] and [`Delivery`].
//! - [`code`]: the domain [`ErrorCode`].
//! - [`discovery`]: contact discovery as bytes: [`discovery::Tag`],
//!   [`discovery::FilterKey`], blinded batches, and the published filter's snapshot
//!   and delta encodings with their checking decoders.
//! - [`error`]: [`Malformed`] and [`Problem`]: which field of a wire message was
//!   wrong and how.
//! - [`keys`]: prekeys as published ([`KeyUpload`]) and fetched ([`DeviceBundle`]).
//! - [`certificate`]: [`SenderCertificate`] with its exact wire encoding, and
//!   [`IssuedCertificate`].
//! - [`media`]: [`BlobId`], [`BlobStatus`], and the transfer stream's
//!   [`BlobStreamRequest`] and [`BlobStreamResponse`].
//! - [`frame`]: length-prefixed framing, with the size limit checked before any
//!   allocation, and "incomplete" kept apart from "invalid" (and, for typed
//!   decoding, "invalid" apart from "decoded but refused").
//! - [`ids`]: [`AccountId`], [`DeviceId`], [`MessageId`], [`DeviceAddress`], each
//!   checked when built from wire bytes.
//! - [`auth`]: the exact bytes an identity or device key signs.
//! - [`device_list`]: an account's device list, as its identity key signs it.
//! - [`address`]: relay addresses with their pinned certificate fingerprint.
//! - [`limits`]: protocol constants and default limits.
//! - [`v1`]: the generated prost types for `proto/tern.proto` (client <-> relay).
//! - [`e2e`]: the generated prost types for `proto/e2e.proto` (client <-> client,
//!   inside envelopes).
//!
//! # Quick start
//! A client frames a typed request; a relay decodes and checks it in one step, and
//! answers a refused request by its id.
//! ```
//! use bytes::BytesMut;
//! use tern_proto::{frame, v1, ClientRequest, ErrorCode, Request, ServerMessage};
//!
//! let ping = ClientRequest { id: 7, request: Request::Ping };
//! let mut wire = BytesMut::new();
//! frame::encode(&v1::ClientFrame::from(ping.clone()), &mut wire);
//! // A request the relay must refuse: a fetch for an account id of 3 bytes.
//! let bad = v1::ClientFrame {
//!     request_id: 8,
//!     body: Some(v1::client_frame::Body::FetchKeys(v1::FetchKeysRequest {
//!         account_id: vec![1, 2, 3].into(),
//!         ..Default::default()
//!     })),
//! };
//! frame::encode(&bad, &mut wire);
//!
//! let mut decoder = frame::Decoder::new(frame::DEFAULT_MAX_FRAME);
//! let first = decoder.decode_request(&mut wire)?.expect("one whole frame");
//! assert_eq!(first, Ok(ping));
//! let refused = decoder.decode_request(&mut wire)?.expect("one whole frame");
//! let error = refused.expect_err("a 3-byte account id");
//! assert_eq!((error.id(), error.code()), (8, ErrorCode::BadRequest));
//!
//! // The relay's answer, as the client reads it back.
//! let answer = ServerMessage::Response { id: error.id(), result: Err(error.to_reply()) };
//! let frame = v1::ServerFrame::from(answer.clone());
//! assert_eq!(ServerMessage::try_from(frame), Ok(answer));
//! assert!(decoder.decode_request(&mut wire)?.is_none(), "nothing left");
//! # Ok::<(), tern_proto::frame::FrameError>(())
//! ```
#![forbid(unsafe_code)]

pub mod address;
pub mod auth;
pub mod certificate;
pub mod code;
pub mod device_list;
pub mod discovery;
pub mod error;
pub mod frame;
pub mod groups;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod media;
pub mod push;
pub mod reply;
pub mod request;
pub mod shape;
pub mod verification;

pub use address::{Fingerprint, RelayAddress};
pub use certificate::{IssuedCertificate, SenderCertificate};
pub use code::ErrorCode;
pub use device_list::{DeviceEntry, DeviceList, DeviceListError, SignedDeviceList};
pub use error::{Malformed, Problem};
pub use groups::{
    CommitId, FetchedKeyPackage, GroupCommit, GroupHandle, MultiSend, MultiSendResult,
    RecipientAccount, Refused,
};
pub use ids::{AccountId, DeviceAddress, DeviceId, IdError, MessageId};
pub use keys::{DeviceBundle, KeyUpload, SignedKey};
pub use media::{BlobId, BlobStatus, BlobStreamRequest, BlobStreamResponse};
pub use push::PushTarget;
pub use reply::{Delivery, ErrorReply, NextCertificate, Reply, ServerFrameError, ServerMessage};
pub use request::{ClientRequest, Envelope, Request, RequestError, RequestKind, SlotId};
pub use verification::{Code, VerificationId, E164};

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
    /// The connection's account was deleted (at its request); there is nothing to
    /// reconnect to.
    pub const ACCOUNT_DELETED: u32 = 4;
    /// The connection's device was removed from its account (by the primary, by
    /// itself, or idle): its credentials no longer authenticate.
    pub const DEVICE_REMOVED: u32 = 5;
}
