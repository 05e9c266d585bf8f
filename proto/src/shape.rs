//! How many elements a client frame's repeated fields hold, counted on the wire
//! before it is decoded.
//!
//! A decoded element costs far more than its bytes: an empty `RecipientAccount` is
//! 2 bytes on the wire and about 120 in memory, so a 1 MiB frame of them would take
//! over 100 MiB while it decodes, before any count in it is checked. The walk below
//! reads only tags and lengths (prost's own wire functions) and allocates nothing.

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, DecodeContext, WireType};

/// Elements a client frame may hold in its repeated fields, all together. Above every
/// count the requests allow (a send's batch is less than this, a multi-send 1,000
/// devices with their parts, an ack 4,096 seqs), and at about 120 bytes per decoded
/// element about 11 MiB at most while a frame decodes (its vector's last doubling
/// included).
pub const MAX_FRAME_ELEMENTS: usize = 65_536;

/// What a field listed in a [`Shape`] holds.
#[derive(Clone, Copy)]
enum Kind {
    /// Messages, whose own listed fields count too.
    Message(Shape),
    /// One element per occurrence (bytes, or a message not looked into).
    Leaf,
    /// Scalars, packed (one element per varint) or not (one per occurrence).
    Scalars,
}

/// The fields of a message that hold repeated elements, or lead to some.
type Shape = &'static [(u32, Kind)];

const RECIPIENT: Shape = &[(4, Kind::Scalars), (5, Kind::Leaf)];
const MULTI_SEND: Shape = &[(3, Kind::Message(RECIPIENT))];
const SEND: Shape = &[(3, Kind::Leaf)];
const ACK: Shape = &[(1, Kind::Scalars)];
const PUBLISH_KEYS: Shape = &[(4, Kind::Leaf)];
const SEALED_SEND: Shape = &[(4, Kind::Leaf)];
const PUBLISH_KEY_PACKAGES: Shape = &[(1, Kind::Leaf)];
const GROUP_COMMIT: Shape = &[(6, Kind::Message(MULTI_SEND))];

/// `ClientFrame`: the requests with repeated fields (a test checks against
/// `tern.proto` that none is missing).
const CLIENT_FRAME: Shape = &[
    (5, Kind::Message(SEND)),
    (6, Kind::Message(ACK)),
    (8, Kind::Message(PUBLISH_KEYS)),
    (12, Kind::Message(SEALED_SEND)),
    (29, Kind::Message(PUBLISH_KEY_PACKAGES)),
    (32, Kind::Message(GROUP_COMMIT)),
    (33, Kind::Message(MULTI_SEND)),
];

/// Whether the client frame `body` holds at most `max` elements in its repeated
/// fields; if not, `Err` with the frame's request id when it came before the count
/// ran over (so the refusal can name it), else 0. Bytes that are not a valid message
/// pass: decoding them fails anyway.
pub(crate) fn client_frame_within(body: &[u8], max: usize) -> Result<(), u64> {
    let mut count = 0;
    match walk(body, CLIENT_FRAME, max, &mut count) {
        Err(Stop::Over) => Err(split_request_id(body).0),
        _ => Ok(()),
    }
}

/// A client frame's request id (field 1) if it is the frame's first field, as
/// encoders put it, and the bytes after it; else 0 and `body` whole.
pub fn split_request_id(body: &[u8]) -> (u64, &[u8]) {
    let mut rest = body;
    match decode_key(&mut rest) {
        Ok((1, WireType::Varint)) => match decode_varint(&mut rest) {
            Ok(id) => (id, rest),
            Err(_) => (0, body),
        },
        _ => (0, body),
    }
}

/// Why a walk stopped early.
enum Stop {
    /// More than `max` elements.
    Over,
    /// Not a valid message.
    Malformed,
}

fn walk(mut buf: &[u8], shape: Shape, max: usize, count: &mut usize) -> Result<(), Stop> {
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).map_err(|_| Stop::Malformed)?;
        let listed = shape.iter().find(|(t, _)| *t == tag).map(|(_, k)| *k);
        // This field's elements, and a message to look into after them.
        let (elements, nested) = match (wire, listed) {
            (WireType::LengthDelimited, Some(kind)) => {
                let len = usize::try_from(decode_varint(&mut buf).map_err(|_| Stop::Malformed)?)
                    .map_err(|_| Stop::Malformed)?;
                let inner = buf.get(..len).ok_or(Stop::Malformed)?;
                buf.advance(len);
                match kind {
                    // Every varint ends in a byte under 0x80.
                    Kind::Scalars => (inner.iter().filter(|b| **b < 0x80).count(), None),
                    Kind::Leaf => (1, None),
                    Kind::Message(inner_shape) => (1, Some((inner, inner_shape))),
                }
            }
            (_, listed) => {
                prost::encoding::skip_field(wire, tag, &mut buf, DecodeContext::default())
                    .map_err(|_| Stop::Malformed)?;
                (usize::from(listed.is_some()), None)
            }
        };
        *count += elements;
        if *count > max {
            return Err(Stop::Over);
        }
        if let Some((inner, inner_shape)) = nested {
            walk(inner, inner_shape, max, count)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use prost::Message;

    use super::*;
    use crate::v1;

    fn frame(body: v1::client_frame::Body) -> Vec<u8> {
        v1::ClientFrame {
            request_id: 1,
            body: Some(body),
        }
        .encode_to_vec()
    }

    fn multi_send(recipients: usize, devices: usize) -> v1::MultiSendRequest {
        v1::MultiSendRequest {
            recipients: (0..recipients)
                .map(|_| v1::RecipientAccount {
                    devices: (1..=devices as u32).collect(),
                    parts: vec![vec![1].into(); devices],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn count(body: &[u8]) -> usize {
        let mut n = 0;
        assert!(walk(body, CLIENT_FRAME, usize::MAX, &mut n).is_ok());
        n
    }

    #[test]
    fn counts_the_elements_of_each_request() {
        let send = |n| {
            frame(v1::client_frame::Body::Send(v1::SendRequest {
                envelopes: vec![v1::Envelope::default(); n],
                ..Default::default()
            }))
        };
        // The request itself, then one per envelope.
        assert_eq!(count(&send(3)), 4);
        let ack = frame(v1::client_frame::Body::Ack(v1::AckRequest {
            seqs: vec![1, 300, u64::MAX],
        }));
        assert_eq!(count(&ack), 4, "packed: one per varint, however long");
        // A multi-send of 2 accounts with 3 devices each: the request, 2 accounts,
        // 6 devices, 6 parts.
        let multi = frame(v1::client_frame::Body::MultiSend(multi_send(2, 3)));
        assert_eq!(count(&multi), 15);
        let commit = frame(v1::client_frame::Body::GroupCommit(
            v1::GroupCommitRequest {
                sends: vec![multi_send(2, 3), multi_send(1, 1)],
                ..Default::default()
            },
        ));
        assert_eq!(count(&commit), 1 + 1 + 14 + 1 + 3);
        let ping = frame(v1::client_frame::Body::Ping(v1::PingRequest::default()));
        assert_eq!(count(&ping), 0);
    }

    #[test]
    fn unpacked_scalars_count_one_each() {
        // seqs 1 and 2 as two varint fields (tag 1, wire type 0), which decoders
        // must accept for a packed field.
        let ack = [0x08, 0x01, 0x08, 0x02];
        let body = frame_with(6, &ack);
        assert_eq!(count(&body), 3);
        assert_eq!(
            v1::ClientFrame::decode(body.as_slice())
                .map(|f| f.body)
                .expect("decodes"),
            Some(v1::client_frame::Body::Ack(v1::AckRequest {
                seqs: vec![1, 2]
            }))
        );
    }

    /// A `ClientFrame` holding `inner` as field `tag`.
    fn frame_with(tag: u8, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(u32::from(tag), WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(inner.len() as u64, &mut out);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn a_frame_of_empty_elements_is_refused_before_it_decodes() {
        // 1 MiB of empty recipients (2 bytes each).
        let mut recipients = Vec::new();
        while recipients.len() < 1 << 20 {
            recipients.extend_from_slice(&[0x1a, 0x00]);
        }
        let body = frame_with(33, &recipients);
        assert_eq!(client_frame_within(&body, MAX_FRAME_ELEMENTS), Err(0));
        // The request id, when it comes first, names the refusal.
        let mut named = vec![0x08, 0x2a];
        named.extend_from_slice(&body);
        assert_eq!(client_frame_within(&named, MAX_FRAME_ELEMENTS), Err(42));
        // The largest multi-send the requests allow passes.
        let most = frame(v1::client_frame::Body::MultiSend(multi_send(
            1,
            crate::limits::MAX_RECIPIENT_DEVICES,
        )));
        assert_eq!(client_frame_within(&most, MAX_FRAME_ELEMENTS), Ok(()));
        assert_eq!(
            client_frame_within(b"\xff\xff", MAX_FRAME_ELEMENTS),
            Ok(()),
            "malformed passes"
        );
    }

    /// Every repeated field reachable from `ClientFrame` in `tern.proto` is in the
    /// shapes above, so a new one cannot escape the count.
    #[test]
    fn the_shapes_cover_every_repeated_field_of_a_client_frame() {
        let proto = include_str!("../proto/tern.proto");
        // message name -> (field number, type, repeated)
        let mut messages: BTreeMap<String, Vec<(u32, String, bool)>> = BTreeMap::new();
        // The blocks open: a message's name, or None for a oneof (its fields are the
        // message's) or an enum (its values are not fields).
        let mut open: Vec<(Option<String>, bool)> = Vec::new();
        for line in proto.lines() {
            let line = line.split("//").next().unwrap_or("").trim();
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["message", name, "{"] => open.push((Some((*name).to_owned()), false)),
                ["oneof", _, "{"] => open.push((None, false)),
                ["enum", _, "{"] => open.push((None, true)),
                ["}"] => {
                    open.pop();
                }
                _ if !line.contains('=') || words.first() == Some(&"option") => {}
                _ => {
                    let Some((_, false)) = open.last() else {
                        continue;
                    };
                    let Some(name) = open.iter().rev().find_map(|(n, _)| n.clone()) else {
                        continue;
                    };
                    let (repeated, rest) = match words.first() {
                        Some(&"repeated") => (true, &words[1..]),
                        Some(&"optional") => (false, &words[1..]),
                        _ => (false, &words[..]),
                    };
                    let field = match rest {
                        [ty, _, "=", number] => number
                            .strip_suffix(';')
                            .and_then(|n| n.parse::<u32>().ok())
                            .map(|n| (n, (*ty).to_owned())),
                        _ => None,
                    };
                    // Anything else with an `=` in a message (a map, options, a field
                    // over two lines) would escape the check: this parser must learn it.
                    let Some((n, ty)) = field else {
                        panic!("tern.proto: a line this test cannot read: {line:?}");
                    };
                    messages.entry(name).or_default().push((n, ty, repeated));
                }
            }
        }
        assert!(messages.contains_key("ClientFrame"), "parsed tern.proto");
        let mut seen = BTreeSet::new();
        check(&messages, "ClientFrame", Some(CLIENT_FRAME), &mut seen);
    }

    /// Every repeated field of `name` (and of the messages under it) is listed in
    /// `shape`; a message field leading to one is listed as a message.
    fn check(
        messages: &BTreeMap<String, Vec<(u32, String, bool)>>,
        name: &str,
        shape: Option<Shape>,
        seen: &mut BTreeSet<String>,
    ) {
        // A message reached again under the same table is checked once.
        if !seen.insert(format!("{name}/{:p}", shape.unwrap_or(&[]))) {
            return;
        }
        for (n, ty, repeated) in messages.get(name).into_iter().flatten() {
            let listed = shape.and_then(|s| s.iter().find(|(t, _)| t == n).map(|(_, k)| *k));
            let is_message = messages.contains_key(ty);
            if *repeated {
                let scalar = !is_message && ty != "bytes" && ty != "string";
                match listed {
                    None => panic!("{name}.{n} ({ty}) is repeated but not in the shapes"),
                    // Packed scalars are one element per varint, not per field.
                    Some(Kind::Scalars) => assert!(scalar, "{name}.{n} ({ty}) is no scalar"),
                    Some(_) => assert!(!scalar, "{name}.{n} ({ty}) must count as scalars"),
                }
            }
            if is_message {
                let inner = match listed {
                    Some(Kind::Message(s)) => Some(s),
                    // Not looked into: nothing under it may repeat.
                    _ => None,
                };
                check(messages, ty, inner, seen);
            }
        }
    }
}
