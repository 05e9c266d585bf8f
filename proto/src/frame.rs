//! Length-prefixed framing: a 4-byte big-endian length, then that many bytes of one
//! protobuf message.
//!
//! The decoder keeps "not enough bytes yet" (`Ok(None)`) apart from "these bytes can
//! never form a valid frame" (`Err`), and checks the announced length against its
//! limit before it reserves a single byte for the body, so a peer cannot make the
//! relay allocate by announcing a huge frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use crate::limits::DEFAULT_MAX_FRAME;
use crate::reply::{ServerFrameError, ServerMessage};
use crate::request::{ClientRequest, RequestError};
use crate::v1;

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// A frame that can never be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length is over the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The decoder's limit.
        max: usize,
    },
    /// The body is not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The body's repeated fields hold more elements than any request allows
    /// (counted before decoding: see [`crate::shape`]). The frame was consumed.
    #[error("frame holds more than {max} elements")]
    TooManyElements {
        /// The limit.
        max: usize,
        /// The frame's request id, if it came first; else 0.
        request_id: u64,
    },
}

/// Splits a byte stream into frames of at most `max` bytes each.
#[derive(Debug, Clone)]
pub struct Decoder {
    max: usize,
}

impl Decoder {
    /// A decoder accepting frame bodies of up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Decoder { max }
    }

    /// The largest body this decoder accepts.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes the next whole frame body off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `buf` then has capacity reserved for the
    /// rest of the frame (never more than the limit).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_LEN];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        let total = HEADER_LEN + len;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// Takes the next whole frame off `buf` and decodes it as `M`.
    pub fn decode_message<M: prost::Message + Default>(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<M>, FrameError> {
        match self.decode(buf)? {
            Some(body) => Ok(Some(M::decode(body)?)),
            None => Ok(None),
        }
    }
}

impl Decoder {
    /// Takes the next whole frame off `buf`, decodes it as the wire message `M` and
    /// checks it into the domain type `T`. The three outcomes stay apart:
    /// `Ok(None)` needs more bytes; `Err` is a frame that can never be read;
    /// `Ok(Some(Err(_)))` decoded but does not validate (a [`RequestError`] keeps
    /// the request id, so it can still be answered).
    pub fn decode_checked<M, T>(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Result<T, T::Error>>, FrameError>
    where
        M: prost::Message + Default,
        T: TryFrom<M>,
    {
        Ok(self.decode_message::<M>(buf)?.map(T::try_from))
    }

    /// [`Decoder::decode_checked`] for the relay: the next client frame as a request.
    /// Its repeated fields are counted before it decodes ([`crate::shape`]).
    pub fn decode_request(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Result<ClientRequest, RequestError>>, FrameError> {
        let Some(body) = self.decode(buf)? else {
            return Ok(None);
        };
        let max = crate::shape::MAX_FRAME_ELEMENTS;
        if let Err(request_id) = crate::shape::client_frame_within(&body, max) {
            return Err(FrameError::TooManyElements { max, request_id });
        }
        let frame = <v1::ClientFrame as prost::Message>::decode(body)?;
        Ok(Some(ClientRequest::try_from(frame)))
    }

    /// [`Decoder::decode_checked`] for the client: the next server frame.
    pub fn decode_server_message(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<Result<ServerMessage, ServerFrameError>>, FrameError> {
        self.decode_checked::<v1::ServerFrame, ServerMessage>(buf)
    }
}

/// Appends `msg` to `out` as one frame.
pub fn encode<M: prost::Message>(msg: &M, out: &mut BytesMut) {
    put(msg, msg.encoded_len(), out);
}

/// Appends `msg`, whose encoded length is `len`, as one frame.
fn put<M: prost::Message>(msg: &M, len: usize, out: &mut BytesMut) {
    out.reserve(HEADER_LEN + len);
    // Frames are bounded far below 4 GiB by every sender's own limit.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: capacity was reserved above.
    let _ = msg.encode(out);
}

/// Appends `first`, then whatever `next` yields, as frames to `out` until `next` runs
/// dry or `out` holds `limit` bytes: one stream write for everything that is ready.
/// `queued` (how many more the caller knows are waiting) sizes `out` up front, from
/// `first`'s size, so the batch is built without regrowing: each regrowth copies it.
pub fn encode_ready<M: prost::Message>(
    first: &M,
    queued: usize,
    mut next: impl FnMut() -> Option<M>,
    limit: usize,
    out: &mut BytesMut,
) {
    let len = first.encoded_len();
    let one = HEADER_LEN + len;
    out.reserve(
        queued
            .saturating_add(1)
            .saturating_mul(one)
            .min(limit + one),
    );
    put(first, len, out);
    while out.len() < limit {
        match next() {
            Some(m) => encode(&m, out),
            None => break,
        }
    }
}

/// The encoded size of `msg` as one frame, header included.
pub fn encoded_len<M: prost::Message>(msg: &M) -> usize {
    HEADER_LEN + msg.encoded_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ping(id: u64) -> v1::ClientFrame {
        v1::ClientFrame {
            request_id: id,
            body: Some(v1::client_frame::Body::Ping(v1::PingRequest {})),
        }
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let mut wire = BytesMut::new();
        encode(&ping(1), &mut wire);
        let mut dec = Decoder::new(1024);
        let mut partial = BytesMut::from(&wire[..wire.len() - 1]);
        assert!(dec.decode(&mut partial).expect("valid prefix").is_none());
        let mut short_header = BytesMut::from(&wire[..2]);
        assert!(dec
            .decode(&mut short_header)
            .expect("valid prefix")
            .is_none());
    }

    #[test]
    fn encode_ready_stops_at_the_limit_or_when_dry() {
        let mut queue: Vec<_> = (2..100).map(ping).collect();
        queue.reverse();
        let mut out = BytesMut::new();
        let queued = queue.len();
        encode_ready(&ping(1), queued, || queue.pop(), 20, &mut out);
        let one = encoded_len(&ping(1));
        assert!(
            out.len() >= 20 && out.len() < 20 + one,
            "stopped at the limit: {}",
            out.len()
        );
        let mut out = BytesMut::new();
        encode_ready(&ping(1), 0, || None, 1 << 20, &mut out);
        assert_eq!(out.len(), one);
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut wire = BytesMut::new();
        wire.put_u32(u32::MAX);
        let mut dec = Decoder::new(1024);
        let cap_before = wire.capacity();
        match dec.decode(&mut wire) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(wire.capacity(), cap_before, "no allocation for the body");
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut wire = BytesMut::new();
        wire.put_u32(3);
        wire.put_slice(&[0xff, 0xff, 0xff]);
        let mut dec = Decoder::new(1024);
        assert!(matches!(
            dec.decode_message::<v1::ClientFrame>(&mut wire),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn typed_decoding_keeps_incomplete_invalid_and_refused_apart() {
        use crate::{ErrorCode, Request};
        let mut wire = BytesMut::new();
        encode(&ping(1), &mut wire);
        encode(
            &v1::ClientFrame {
                request_id: 2,
                body: None,
            },
            &mut wire,
        );
        wire.put_u32(3);
        wire.put_slice(&[0xff, 0xff, 0xff]);
        wire.put_u32(100);
        let mut dec = Decoder::new(1024);
        let first = dec.decode_request(&mut wire).expect("readable");
        assert!(matches!(
            first,
            Some(Ok(ClientRequest {
                id: 1,
                request: Request::Ping
            }))
        ));
        let refused = dec.decode_request(&mut wire).expect("readable");
        assert!(
            matches!(&refused, Some(Err(e)) if e.id() == 2 && e.code() == ErrorCode::BadRequest)
        );
        assert!(matches!(
            dec.decode_request(&mut wire),
            Err(FrameError::Malformed(_))
        ));
        assert!(dec.decode_request(&mut wire).expect("a prefix").is_none());

        let mut wire = BytesMut::new();
        encode(&v1::ServerFrame::from(ServerMessage::QueueEmpty), &mut wire);
        assert_eq!(
            dec.decode_server_message(&mut wire).expect("readable"),
            Some(Ok(ServerMessage::QueueEmpty))
        );
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(ids in proptest::collection::vec(any::<u64>(), 1..20),
                                    chunk in 1usize..64) {
            let mut wire = BytesMut::new();
            for id in &ids {
                encode(&ping(*id), &mut wire);
            }
            let mut dec = Decoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(msg) = dec.decode_message::<v1::ClientFrame>(&mut buf)? {
                    got.push(msg.request_id);
                }
            }
            prop_assert_eq!(got, ids);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = Decoder::new(256);
            while let Ok(Some(_)) = dec.decode_message::<v1::ClientFrame>(&mut buf) {}
        }
    }
}
