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
//! - `kind = 0`, a dead span: one or more removed messages, merged. It keeps the
//!   highest seq among them (8), so the next open's epoch is above it and sequence
//!   numbers never go back after a restart.
//!   Its CRC covers `len`, `kind` and that seq: the rest is a punched hole (or zeros)
//!   that the scan skips.
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

/// "TERNLOG" and a format version.
pub(super) const MAGIC: &[u8; 8] = b"TERNLOG\x01";
/// Magic, seq floor, CRC.
pub(super) const HEADER_LEN: u64 = 8 + 8 + 4;
/// Length and CRC.
pub(super) const PREFIX_LEN: usize = 8;
const KIND_DEAD: u8 = 0;
const KIND_MESSAGE: u8 = 1;
/// What a scan reads of every record to know what it is: prefix, kind, and a dead
/// span's highest seq.
pub(super) const PEEK_LEN: usize = PREFIX_LEN + 1 + 8;
/// Prefix, kind, address, seq, accepted at, expires at, message id.
pub(super) const MESSAGE_OVERHEAD: usize = PREFIX_LEN + 1 + ADDR_LEN + 8 + 8 + 8 + 16;

/// A segment's header.
pub(super) fn header(seq_floor: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seq_floor.to_be_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The seq floor of a segment header; `None` if it is not a valid header.
pub(super) fn parse_header(h: &[u8]) -> Option<u64> {
    if h.len() != HEADER_LEN as usize || &h[..8] != MAGIC {
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

/// A decoded message record.
#[derive(Debug)]
pub(super) struct Message {
    pub(super) header: MessageHeader,
    pub(super) payload: Bytes,
}

/// Decodes one whole record (prefix included). `Ok(None)` for a record that is not a
/// valid message: a damaged one, or one overwritten since it was located.
pub(super) fn decode_message(record: &Bytes) -> StoreResult<Option<Message>> {
    Ok(decode_header(record)?.map(|header| Message {
        header,
        payload: record.slice(MESSAGE_OVERHEAD..),
    }))
}

/// The header of one whole record (prefix included), as [`decode_message`] but with
/// no copy of the payload: what a scan at start needs.
pub(super) fn decode_header(record: &[u8]) -> StoreResult<Option<MessageHeader>> {
    if record.len() < MESSAGE_OVERHEAD {
        return Ok(None);
    }
    let len = u32::from_be_bytes(fixed(&record[..4])?) as usize;
    let crc = u32::from_be_bytes(fixed(&record[4..8])?);
    if len + PREFIX_LEN != record.len() || record[8] != KIND_MESSAGE || record_crc(record) != crc {
        return Ok(None);
    }
    let b = &record[9..MESSAGE_OVERHEAD];
    let Ok(to) = parse_addr(&b[..ADDR_LEN]) else {
        return Ok(None);
    };
    Ok(Some(MessageHeader {
        to,
        seq: u64::from_be_bytes(fixed(&b[20..28])?),
        accepted_at: u64::from_be_bytes(fixed(&b[28..36])?),
        expires_at: u64::from_be_bytes(fixed(&b[36..44])?),
        message_id: MessageId(fixed(&b[44..60])?),
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
    fn headers_round_trip_and_reject_damage() {
        let h = header(77);
        assert_eq!(parse_header(&h), Some(77));
        let mut bad = h;
        bad[9] ^= 1;
        assert_eq!(parse_header(&bad), None);
        assert_eq!(parse_header(&h[..10]), None);
    }
}
