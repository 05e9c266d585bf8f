//! The on-disk format of mailbox log segments.
//!
//! A segment starts with a header (magic, format version, the sequence-number floor at
//! its creation, CRC). The floor is `epoch << 40` of the open that created it
//! (`store/seq.rs`); segments from before per-mailbox seqs hold the next relay-wide seq
//! there, below `1 << 40`, and read the same way. Records follow back to back:
//!
//! ```text
//! len: u32 | crc: u32 | kind: u8 | body: len - 1 bytes
//! ```
//!
//! - `kind = 1`, a message: account and device (20), seq (8), accepted at (8), expires
//!   at (8), message id (16), then the ciphertext. The CRC covers `len`, kind and body,
//!   so a damaged length is caught too.
//! - `kind = 2`, a shared body (format 2): expires at (8), then the ciphertext that
//!   several entries point at. It names no mailbox.
//! - `kind = 3`, an entry (format 2): as a message, then the offset of its body's
//!   record in the same segment (8), then the mailbox's part (often empty). A body is
//!   always written in the same `write` as its entries, before them.
//! - `kind = 0`, a dead span: one or more removed messages, merged. It keeps the
//!   highest seq among them (8), so the next open's epoch is above it and sequence
//!   numbers never go back after a restart.
//!   Its CRC covers `len`, `kind` and that seq: the rest is a punched hole (or zeros)
//!   that the scan skips.
//!
//! How many entries point at a body is not stored: the scan at open counts them, and
//! drops a body none points at (its last entry was acked or expired before a
//! crash), so nothing is ever decremented twice.
//!
//! Format 2 (the header's version byte) adds kinds 2 and 3. This relay reads formats
//! 1 and 2 and writes 2; a segment of a later format stops the open with an error
//! naming it, rather than be read as damage. (A relay of format 1 takes a format-2
//! header for a damaged one: it reads nothing from that segment and keeps it.)
//!
//! All integers are big-endian. A scan stops at a length of zero or one that runs past
//! the end of the file: that is the torn tail of a crash, never acknowledged (a record
//! is acknowledged only after the fsync that covers it). A record whose CRC fails
//! inside the file is skipped when a valid record (or the end) follows where its length
//! says; otherwise its length cannot be trusted and the scan of that segment stops.

use bytes::Bytes;
use tern_proto::{DeviceAddress, MessageId};

use crate::store::codec::{addr_bytes, fixed, parse_addr, ADDR_LEN};
use crate::store::{StoreError, StoreResult};
use tern_platform::clock::UnixMillis;

/// "TERNLOG" and the format version this relay writes.
pub(super) const MAGIC: &[u8; 8] = b"TERNLOG\x02";
/// The format version in [`MAGIC`]: the newest this relay reads.
pub(super) const FORMAT: u8 = 2;
/// Magic, seq floor, CRC.
pub(super) const HEADER_LEN: u64 = 8 + 8 + 4;
/// Length and CRC.
pub(super) const PREFIX_LEN: usize = 8;
const KIND_DEAD: u8 = 0;
const KIND_MESSAGE: u8 = 1;
const KIND_BODY: u8 = 2;
const KIND_ENTRY: u8 = 3;
/// What a scan reads of every record to know what it is: prefix, kind, and a dead
/// span's highest seq.
pub(super) const PEEK_LEN: usize = PREFIX_LEN + 1 + 8;
/// Prefix, kind, address, seq, accepted at, expires at, message id.
pub(super) const MESSAGE_OVERHEAD: usize = PREFIX_LEN + 1 + ADDR_LEN + 8 + 8 + 8 + 16;
/// A message's fields and the body's offset.
pub(super) const ENTRY_OVERHEAD: usize = MESSAGE_OVERHEAD + 8;
/// Prefix, kind, expires at.
pub(super) const BODY_OVERHEAD: usize = PREFIX_LEN + 1 + 8;

/// A segment's header.
pub(super) fn header(seq_floor: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seq_floor.to_be_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// A valid header's format version if it is newer than this relay reads.
pub(super) fn newer_format(h: &[u8]) -> Option<u8> {
    let (magic, rest) = (h.get(..7)?, h.get(7..HEADER_LEN as usize)?);
    let crc = u32::from_be_bytes(rest[9..13].try_into().ok()?);
    (magic == &MAGIC[..7] && rest[0] > FORMAT && crc32fast::hash(&h[..16]) == crc)
        .then_some(rest[0])
}

/// The seq floor of a segment header (format 1 or 2); `None` if it is not a valid
/// header.
pub(super) fn parse_header(h: &[u8]) -> Option<u64> {
    if h.len() != HEADER_LEN as usize || h[..7] != MAGIC[..7] || !(1..=FORMAT).contains(&h[7]) {
        return None;
    }
    let crc = u32::from_be_bytes(h[16..20].try_into().ok()?);
    let floor = u64::from_be_bytes(h[8..16].try_into().ok()?);
    (crc32fast::hash(&h[..16]) == crc).then_some(floor)
}

/// A message record's fields, as written.
#[derive(Debug, Clone, Copy)]
pub(super) struct MessageHeader {
    pub(super) to: DeviceAddress,
    pub(super) seq: u64,
    pub(super) accepted_at: UnixMillis,
    pub(super) expires_at: UnixMillis,
    pub(super) message_id: MessageId,
}

/// Appends a message record to `out`; returns its length.
pub(super) fn encode_message(out: &mut Vec<u8>, h: &MessageHeader, payload: &[u8]) -> usize {
    let start = out.len();
    let len = (MESSAGE_OVERHEAD - PREFIX_LEN + payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&addr_bytes(&h.to));
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.accepted_at.to_be_bytes());
    out.extend_from_slice(&h.expires_at.to_be_bytes());
    out.extend_from_slice(h.message_id.as_bytes());
    out.extend_from_slice(payload);
    let crc = record_crc(&out[start..]);
    out[start + 4..start + PREFIX_LEN].copy_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// Appends a shared body's record to `out`; returns its length.
pub(super) fn encode_body(out: &mut Vec<u8>, expires_at: UnixMillis, body: &[u8]) -> usize {
    let start = out.len();
    let len = (BODY_OVERHEAD - PREFIX_LEN + body.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(KIND_BODY);
    out.extend_from_slice(&expires_at.to_be_bytes());
    out.extend_from_slice(body);
    let crc = record_crc(&out[start..]);
    out[start + 4..start + PREFIX_LEN].copy_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// Appends an entry's record to `out`, pointing at the body record at `body` in the
/// same segment; returns its length.
pub(super) fn encode_entry(out: &mut Vec<u8>, h: &MessageHeader, body: u64, part: &[u8]) -> usize {
    let start = out.len();
    let len = (ENTRY_OVERHEAD - PREFIX_LEN + part.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(KIND_ENTRY);
    out.extend_from_slice(&addr_bytes(&h.to));
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.accepted_at.to_be_bytes());
    out.extend_from_slice(&h.expires_at.to_be_bytes());
    out.extend_from_slice(h.message_id.as_bytes());
    out.extend_from_slice(&body.to_be_bytes());
    out.extend_from_slice(part);
    let crc = record_crc(&out[start..]);
    out[start + 4..start + PREFIX_LEN].copy_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// A record's CRC: over its length, then everything after the CRC (for a dead span,
/// everything in its header).
fn record_crc(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[..4]);
    hasher.update(&record[PREFIX_LEN..]);
    hasher.finalize()
}

/// The first bytes of a dead span of `span` bytes (at least [`PEEK_LEN`]) whose
/// highest seq is `max_seq`; the rest of the span is not read.
pub(super) fn dead_header(span: u64, max_seq: u64) -> StoreResult<[u8; PEEK_LEN]> {
    let len = u32::try_from(span - PREFIX_LEN as u64)
        .map_err(|_| StoreError::Corrupt("dead span too long"))?;
    let mut h = [0u8; PEEK_LEN];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[8] = KIND_DEAD;
    h[9..].copy_from_slice(&max_seq.to_be_bytes());
    let crc = record_crc(&h);
    h[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(h)
}

/// What a record prefix says comes next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// A record of this many bytes in all (prefix included).
    Record(u64),
    /// A dead span of this many bytes in all, with its highest seq: skip it.
    Dead(u64, u64),
    /// The end of the valid log.
    End,
}

/// Reads the first [`PEEK_LEN`] bytes of a record, `remaining` bytes from the end.
pub(super) fn next(peek: &[u8; PEEK_LEN], remaining: u64) -> Next {
    let len = u64::from(u32::from_be_bytes([peek[0], peek[1], peek[2], peek[3]]));
    let total = PREFIX_LEN as u64 + len;
    if total < PEEK_LEN as u64 || total > remaining {
        return Next::End;
    }
    let crc = u32::from_be_bytes([peek[4], peek[5], peek[6], peek[7]]);
    if peek[8] == KIND_DEAD && crc == record_crc(peek) {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&peek[9..]);
        Next::Dead(total, u64::from_be_bytes(seq))
    } else {
        Next::Record(total)
    }
}

/// A decoded message or entry record.
#[derive(Debug)]
pub(super) struct Message {
    pub(super) header: MessageHeader,
    /// The payload, or an entry's part.
    pub(super) payload: Bytes,
    /// An entry's body record offset.
    pub(super) body: Option<u64>,
}

/// Decodes one whole record (prefix included). `Ok(None)` for a record that is not a
/// valid message or entry: a damaged one, or one overwritten since it was located.
pub(super) fn decode_message(record: &Bytes) -> StoreResult<Option<Message>> {
    Ok(match decode_header(record)? {
        Some(Decoded::Message(header)) => Some(Message {
            header,
            payload: record.slice(MESSAGE_OVERHEAD..),
            body: None,
        }),
        Some(Decoded::Entry(header, body)) => Some(Message {
            header,
            payload: record.slice(ENTRY_OVERHEAD..),
            body: Some(body),
        }),
        _ => None,
    })
}

/// Decodes one whole body record (prefix included): its expiry and bytes; `None` if
/// it is not a valid body record.
pub(super) fn decode_body(record: &Bytes) -> StoreResult<Option<(UnixMillis, Bytes)>> {
    Ok(match decode_header(record)? {
        Some(Decoded::Body(expires_at)) => Some((expires_at, record.slice(BODY_OVERHEAD..))),
        _ => None,
    })
}

/// What a valid record is, without its bytes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Decoded {
    /// A message of its own.
    Message(MessageHeader),
    /// An entry, and the offset of its body's record.
    Entry(MessageHeader, u64),
    /// A shared body, and when it expires.
    Body(UnixMillis),
}

/// What one whole record (prefix included) is, as [`decode_message`] but with no
/// copy of the payload: what a scan at start needs.
pub(super) fn decode_header(record: &[u8]) -> StoreResult<Option<Decoded>> {
    if record.len() < PREFIX_LEN + 1 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(fixed(&record[..4])?) as usize;
    let crc = u32::from_be_bytes(fixed(&record[4..8])?);
    if len + PREFIX_LEN != record.len() || record_crc(record) != crc {
        return Ok(None);
    }
    let kind = record[8];
    if kind == KIND_BODY {
        if record.len() < BODY_OVERHEAD {
            return Ok(None);
        }
        return Ok(Some(Decoded::Body(u64::from_be_bytes(fixed(
            &record[9..BODY_OVERHEAD],
        )?))));
    }
    let overhead = match kind {
        KIND_MESSAGE => MESSAGE_OVERHEAD,
        KIND_ENTRY => ENTRY_OVERHEAD,
        _ => return Ok(None),
    };
    if record.len() < overhead {
        return Ok(None);
    }
    let b = &record[9..MESSAGE_OVERHEAD];
    let Ok(to) = parse_addr(&b[..ADDR_LEN]) else {
        return Ok(None);
    };
    let header = MessageHeader {
        to,
        seq: u64::from_be_bytes(fixed(&b[20..28])?),
        accepted_at: u64::from_be_bytes(fixed(&b[28..36])?),
        expires_at: u64::from_be_bytes(fixed(&b[36..44])?),
        message_id: MessageId(fixed(&b[44..60])?),
    };
    Ok(Some(if kind == KIND_ENTRY {
        let body = u64::from_be_bytes(fixed(&record[MESSAGE_OVERHEAD..ENTRY_OVERHEAD])?);
        Decoded::Entry(header, body)
    } else {
        Decoded::Message(header)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_for(seq: u64) -> MessageHeader {
        MessageHeader {
            to: DeviceAddress::from_wire(&[7; 16], 3).expect("addr"),
            seq,
            accepted_at: 10,
            expires_at: 20,
            message_id: MessageId([9; 16]),
        }
    }

    #[test]
    fn message_round_trip() {
        let mut buf = Vec::new();
        let n = encode_message(&mut buf, &header_for(42), b"ciphertext");
        assert_eq!(n, buf.len());
        let peek: [u8; PEEK_LEN] = buf[..PEEK_LEN].try_into().expect("peek");
        assert_eq!(next(&peek, n as u64), Next::Record(n as u64));
        let m = decode_message(&Bytes::from(buf))
            .expect("decode")
            .expect("valid");
        assert_eq!(m.header.seq, 42);
        assert_eq!(m.header.message_id, MessageId([9; 16]));
        assert_eq!((m.header.accepted_at, m.header.expires_at), (10, 20));
        assert_eq!(&m.payload[..], b"ciphertext");
    }

    #[test]
    fn damage_is_detected() {
        let mut buf = Vec::new();
        encode_message(&mut buf, &header_for(1), b"ciphertext");
        for i in (0..4).chain(PREFIX_LEN..buf.len()) {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert!(
                decode_message(&Bytes::from(bad)).expect("decode").is_none(),
                "flip at {i}"
            );
        }
        assert!(decode_message(&Bytes::from(buf[..buf.len() - 1].to_vec()))
            .expect("decode")
            .is_none());
    }

    #[test]
    fn dead_spans_and_the_end_are_recognised() {
        let h = dead_header(4096, 77).expect("header");
        assert_eq!(next(&h, 4096), Next::Dead(4096, 77));
        assert_eq!(next(&h, 4095), Next::End, "runs past the end");
        assert_eq!(next(&[0; PEEK_LEN], 100), Next::End, "zeros: torn tail");
        for i in [5, 10] {
            let mut not_dead = h;
            not_dead[i] ^= 1;
            assert_eq!(next(&not_dead, 4096), Next::Record(4096), "flip at {i}");
        }
    }

    #[test]
    fn bodies_and_entries_round_trip() {
        let mut buf = Vec::new();
        let b = encode_body(&mut buf, 99, b"shared");
        let e = encode_entry(&mut buf, &header_for(7), 0, b"part");
        let body = Bytes::copy_from_slice(&buf[..b]);
        let entry = Bytes::copy_from_slice(&buf[b..b + e]);
        let (expires_at, bytes) = decode_body(&body).expect("decode").expect("body");
        assert_eq!((expires_at, &bytes[..]), (99, &b"shared"[..]));
        let m = decode_message(&entry).expect("decode").expect("entry");
        assert_eq!((m.header.seq, m.body), (7, Some(0)));
        assert_eq!(&m.payload[..], b"part");
        assert!(
            decode_message(&body).expect("decode").is_none(),
            "a body is no message"
        );
        assert!(
            decode_body(&entry).expect("decode").is_none(),
            "an entry is no body"
        );
        for i in (0..4).chain(PREFIX_LEN..entry.len()) {
            let mut bad = entry.to_vec();
            bad[i] ^= 1;
            assert!(decode_message(&Bytes::from(bad)).expect("decode").is_none());
        }
    }

    #[test]
    fn formats_one_and_two_are_read_and_a_later_one_is_named() {
        let mut v1 = header(5);
        v1[7] = 1;
        let crc = crc32fast::hash(&v1[..16]);
        v1[16..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(parse_header(&v1), Some(5), "format 1 still reads");
        assert_eq!(newer_format(&header(5)), None);
        let mut v3 = v1;
        v3[7] = 3;
        let crc = crc32fast::hash(&v3[..16]);
        v3[16..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(parse_header(&v3), None);
        assert_eq!(newer_format(&v3), Some(3));
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = header(77);
        assert_eq!(parse_header(&h), Some(77));
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(parse_header(&bad), None);
        assert_eq!(parse_header(&h[..10]), None);
    }
}
