//! Targets over the wire crate: what a relay or a client reads off a stream.

use std::fmt::Debug;

use bytes::BytesMut;
use prost::Message;
use tern_client::ContactCard;
use tern_proto::address::Fingerprint;
use tern_proto::frame::{Decoder, FrameError, DEFAULT_MAX_FRAME};
use tern_proto::{
    v1, AccountId, BlobStreamRequest, BlobStreamResponse, ClientRequest, DeviceAddress, ErrorReply,
    MessageId, RelayAddress, ServerMessage,
};

/// The frame decoder over client frames (as a relay reads them) or server frames (as
/// a client reads them), fed in chunks. The first byte chooses: bit 7 the direction,
/// bit 6 a small frame limit (64 bytes) instead of the default, bits 0-5 the chunk
/// size less one. Rule: the frames and errors are the same whatever the chunking.
pub fn frame_decoder(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(control & 0x3f) + 1;
    let max = if control & 0x40 != 0 {
        64
    } else {
        DEFAULT_MAX_FRAME
    };
    if control & 0x80 == 0 {
        let step = |d: &mut Decoder, b: &mut BytesMut| d.decode_request(b);
        compare_chunked(stream, max, chunk, step);
    } else {
        let step = |d: &mut Decoder, b: &mut BytesMut| d.decode_server_message(b);
        compare_chunked(stream, max, chunk, step);
    }
}

type Step<T> = fn(&mut Decoder, &mut BytesMut) -> Result<Option<T>, FrameError>;

fn compare_chunked<T: Debug>(stream: &[u8], max: usize, chunk: usize, step: Step<T>) {
    let whole = decode_stream(stream, max, stream.len().max(1), step);
    let chunked = decode_stream(stream, max, chunk, step);
    assert_eq!(whole, chunked, "chunks of {chunk} decode differently");
}

/// What a connection reads from `stream` arriving `chunk` bytes at a time: each frame
/// (or refusal) in order, then the error that ends the stream, if any.
fn decode_stream<T: Debug>(stream: &[u8], max: usize, chunk: usize, step: Step<T>) -> Vec<String> {
    let mut decoder = Decoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match step(&mut decoder, &mut buf) {
                Ok(Some(frame)) => out.push(format!("{frame:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error: {e}"));
                    return out;
                }
            }
        }
    }
    out.push(format!("{} bytes left", buf.len()));
    out
}

/// Every request conversion: the bytes as a `ClientFrame` into a [`ClientRequest`],
/// and as a media `BlobStreamRequest`. Rule: an accepted request goes back to the wire
/// and decodes to the same value; a refusal can be answered.
pub fn requests(data: &[u8]) {
    if let Ok(frame) = v1::ClientFrame::decode(data) {
        match ClientRequest::try_from(frame) {
            Ok(request) => {
                let wire = v1::ClientFrame::from(request.clone()).encode_to_vec();
                let again = v1::ClientFrame::decode(&wire[..]).expect("our own encoding");
                assert_eq!(ClientRequest::try_from(again), Ok(request));
            }
            Err(refused) => {
                let _ = (refused.to_reply(), refused.kind(), refused.to_string());
            }
        }
    }
    if let Ok(wire) = v1::BlobStreamRequest::decode(data) {
        if let Ok(request) = BlobStreamRequest::try_from(wire) {
            let back = v1::BlobStreamRequest::from(request).encode_to_vec();
            let again = v1::BlobStreamRequest::decode(&back[..]).expect("our own encoding");
            assert_eq!(BlobStreamRequest::try_from(again).ok(), Some(request));
        }
    }
}

/// What a client reads from a relay: the bytes as a `ServerFrame` into a
/// [`ServerMessage`], as a media `BlobStreamResponse`, and as an `Error`. Rule: an
/// accepted message goes back to the wire and decodes to the same value.
pub fn replies(data: &[u8]) {
    if let Ok(frame) = v1::ServerFrame::decode(data) {
        match ServerMessage::try_from(frame) {
            Ok(message) => {
                let wire = v1::ServerFrame::from(message.clone()).encode_to_vec();
                let again = v1::ServerFrame::decode(&wire[..]).expect("our own encoding");
                assert_eq!(ServerMessage::try_from(again), Ok(message));
            }
            Err(e) => {
                let _ = (e.request_id(), e.to_string());
            }
        }
    }
    if let Ok(wire) = v1::BlobStreamResponse::decode(data) {
        if let Ok(response) = BlobStreamResponse::try_from(wire) {
            let back = v1::BlobStreamResponse::from(response.clone()).encode_to_vec();
            let again = v1::BlobStreamResponse::decode(&back[..]).expect("our own encoding");
            assert_eq!(BlobStreamResponse::try_from(again).ok(), Some(response));
        }
    }
    if let Ok(wire) = v1::Error::decode(data) {
        let reply = ErrorReply::from(wire);
        assert_eq!(ErrorReply::from(v1::Error::from(reply.clone())), reply);
    }
}

/// Ids from wire bytes (the whole input; after a 4-byte device number for a device
/// address) and relay addresses and fingerprints from text. Rule: what parses prints
/// back to what parses to the same value.
pub fn ids_and_addresses(data: &[u8]) {
    if let Ok(account) = AccountId::try_from(data) {
        assert_eq!(&account.as_bytes()[..], data);
    }
    if let Ok(id) = MessageId::try_from(data) {
        assert_eq!(&id.as_bytes()[..], data);
    }
    if let Some((device, account)) = data.split_first_chunk::<4>() {
        let device = u32::from_be_bytes(*device);
        if let Ok(address) = DeviceAddress::from_wire(account, device) {
            assert_eq!(&address.account.as_bytes()[..], account);
            assert_eq!(address.device.get(), device);
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(address) = text.parse::<RelayAddress>() {
        let printed = address.to_string();
        assert_eq!(printed.parse::<RelayAddress>(), Ok(address), "{printed}");
    }
    if let Ok(fingerprint) = text.parse::<Fingerprint>() {
        let printed = fingerprint.to_string();
        assert_eq!(printed.parse::<Fingerprint>(), Ok(fingerprint), "{printed}");
    }
}

/// A contact card as a user pastes it. Rule: what parses prints back to what parses
/// to the same card.
pub fn contact_card(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(card) = text.parse::<ContactCard>() {
        let printed = card.to_string();
        assert_eq!(printed.parse::<ContactCard>().ok(), Some(card), "{printed}");
    }
}

/// A published discovery filter as a client downloads it: a snapshot ("TDF1") or
/// concatenated deltas ("TDD1"). Rules: no panic; what decodes encodes back to the
/// same bytes (the encodings are canonical); a decoded snapshot answers any key
/// without indexing out of bounds.
pub fn discovery_filter(data: &[u8]) {
    use tern_proto::discovery::{FilterDelta, FilterKey, FilterSnapshot};
    if let Ok(snapshot) = FilterSnapshot::decode(data) {
        assert_eq!(snapshot.encode(), data, "snapshot re-encodes");
        for chunk in data.chunks(8).take(64) {
            let mut key = [0u8; 8];
            key[..chunk.len()].copy_from_slice(chunk);
            let _ = snapshot.contains(FilterKey(u64::from_le_bytes(key)));
        }
    }
    if let Ok(deltas) = FilterDelta::decode_all(data) {
        let mut again = Vec::new();
        for d in &deltas {
            d.encode_into(&mut again);
        }
        assert_eq!(again, data, "deltas re-encode");
    }
}
