//! Rebuilding the index at start: one pass over a segment's records.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tracing::warn;

use super::record::{self, Decoded, Next, HEADER_LEN, PEEK_LEN};
use super::{io, Dead, Index, Loc, Segment, SegmentState};
use crate::core::expiry::is_expired;
use crate::store::{StoreError, StoreResult};
use tern_platform::clock::UnixMillis;

/// What a scan counts across segments.
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// The next free sequence number.
    pub(super) next_seq: u64,
    /// Records skipped as damaged.
    pub(super) damaged: u64,
    /// Messages expired at `now`: not indexed, queued for the scrub.
    pub(super) expired: u64,
    /// Shared bodies no entry points at any more: dropped, queued for the scrub.
    pub(super) orphans: u64,
}

/// Indexes one segment's messages that have not expired at `now`; returns its seq
/// floor, or `None` if its header is damaged.
pub(super) fn scan(
    segment: &Arc<Segment>,
    index: &mut Index,
    now: UnixMillis,
    counts: &mut Counts,
) -> StoreResult<Option<u64>> {
    let Counts {
        next_seq,
        damaged,
        expired,
        orphans,
    } = counts;
    let file_len = segment
        .file
        .metadata()
        .map_err(|e| io("reading a segment", e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, &segment.file);
    let mut header = [0u8; HEADER_LEN as usize];
    if file_len < HEADER_LEN || reader.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    if let Some(format) = record::newer_format(&header) {
        return Err(StoreError::Backend(format!(
            "mailbox log segment {} is format {format}, written by a newer relay (this one \
             reads up to {}): run that relay, or restore the data directory it had",
            segment.id,
            record::FORMAT
        )));
    }
    let Some(floor) = record::parse_header(&header) else {
        return Ok(None);
    };
    let mut state = SegmentState::new(segment.clone());
    let mut found = Vec::new();
    // Shared bodies in this segment, by offset: their record lengths.
    let mut bodies: HashMap<u64, u32> = HashMap::new();
    let mut pos = HEADER_LEN;
    let read = |e| io("reading a segment", e);
    // One buffer for every record: an allocation per record was a tenth of a start.
    let mut rec = Vec::new();
    while file_len - pos >= PEEK_LEN as u64 {
        let mut prefix = [0u8; PEEK_LEN];
        reader.read_exact(&mut prefix).map_err(read)?;
        let total = match record::next(&prefix, file_len - pos) {
            Next::End => break,
            Next::Dead(total, max_seq) => {
                *next_seq = (*next_seq).max(max_seq.saturating_add(1));
                // Punched again by the next scrub: a crash between writing a dead
                // header and punching the hole must not leave the ciphertext behind.
                state.dead.push(Dead {
                    offset: pos,
                    len: total,
                    seq: max_seq,
                });
                let skip = i64::try_from(total - prefix.len() as u64)
                    .map_err(|_| StoreError::Corrupt("dead span"))?;
                reader.seek_relative(skip).map_err(read)?;
                total
            }
            Next::Record(total) => {
                let len = u32::try_from(total).map_err(|_| StoreError::Corrupt("record"))?;
                rec.clear();
                rec.extend_from_slice(&prefix);
                rec.resize(len as usize, 0);
                reader.read_exact(&mut rec[prefix.len()..]).map_err(read)?;
                match record::decode_header(&rec)? {
                    Some(Decoded::Body(expires_at)) if is_expired(now, expires_at) => {
                        state.dead.push(Dead {
                            offset: pos,
                            len: total,
                            seq: 0,
                        });
                    }
                    Some(Decoded::Body(_)) => {
                        bodies.insert(pos, len);
                    }
                    // Expiry wins over a restart: never indexed, and punched by the
                    // first scrub.
                    Some(Decoded::Message(h) | Decoded::Entry(h, _))
                        if is_expired(now, h.expires_at) =>
                    {
                        *next_seq = (*next_seq).max(h.seq.saturating_add(1));
                        state.dead.push(Dead {
                            offset: pos,
                            len: total,
                            seq: h.seq,
                        });
                        *expired += 1;
                    }
                    Some(d @ (Decoded::Message(h) | Decoded::Entry(h, _))) => found.push((
                        h,
                        Loc {
                            segment: segment.id,
                            offset: pos,
                            len,
                            expires_at: h.expires_at,
                            body: match d {
                                Decoded::Entry(_, at) => Some((at, 0)),
                                _ => None,
                            },
                        },
                    )),
                    // Damaged, or a dead header torn by a crash. Its length is
                    // trusted only if a valid record (or the end) follows there; it is
                    // never scrubbed, since its extent is not known for sure.
                    None if valid_at(&segment.file, pos + total, file_len)? => {
                        *damaged += 1;
                    }
                    None => {
                        *damaged += 1;
                        state.pinned = true;
                        warn!(
                            segment = segment.id,
                            offset = pos,
                            "mailbox log segment damaged; the rest of it is kept, unread"
                        );
                        break;
                    }
                }
                total
            }
        };
        pos += total;
    }
    // An entry whose body is missing (damaged, or expired before it) is dropped.
    found.retain_mut(|(h, loc)| match loc.body {
        None => true,
        Some((at, _)) => match bodies.get(&at) {
            Some(&blen) => {
                loc.body = Some((at, blen));
                true
            }
            None => {
                *damaged += 1;
                *next_seq = (*next_seq).max(h.seq.saturating_add(1));
                state.dead.push(Dead {
                    offset: loc.offset,
                    len: u64::from(loc.len),
                    seq: h.seq,
                });
                false
            }
        },
    });
    index.segments.insert(segment.id, state);
    for (&offset, &len) in &bodies {
        index.add_body(segment.id, offset, len);
    }
    for (h, loc) in found {
        let known = index
            .mailboxes
            .get(&h.to)
            .is_some_and(|m| m.entries.contains_key(&h.seq));
        if known {
            *damaged += 1;
            continue;
        }
        *next_seq = (*next_seq).max(h.seq.saturating_add(1));
        index.insert(h.to, h.seq, loc);
    }
    *orphans += index.drop_unheld(segment.id);
    Ok(Some(floor))
}

/// Whether a scan could go on at `pos`: the end of the file, a dead span, nothing but
/// zeros to the end (a pre-zeroed tail), or a message record whose CRC holds.
fn valid_at(file: &File, pos: u64, file_len: u64) -> StoreResult<bool> {
    if file_len.saturating_sub(pos) < PEEK_LEN as u64 {
        return Ok(true);
    }
    let mut peek = [0u8; PEEK_LEN];
    file.read_exact_at(&mut peek, pos)
        .map_err(|e| io("reading a segment", e))?;
    match record::next(&peek, file_len - pos) {
        Next::Dead(..) => Ok(true),
        // The end only if nothing but zeros follows (a pre-zeroed tail): zeros inside
        // a record do not count.
        Next::End => {
            let mut chunk = vec![0u8; 1 << 20];
            let mut at = pos;
            while at < file_len {
                let n = usize::try_from(file_len - at).map_or(chunk.len(), |r| r.min(chunk.len()));
                file.read_exact_at(&mut chunk[..n], at)
                    .map_err(|e| io("reading a segment", e))?;
                if chunk[..n].iter().any(|b| *b != 0) {
                    return Ok(false);
                }
                at += n as u64;
            }
            Ok(true)
        }
        Next::Record(total) => {
            let mut rec = vec![0u8; usize::try_from(total).unwrap_or(0)];
            file.read_exact_at(&mut rec, pos)
                .map_err(|e| io("reading a segment", e))?;
            Ok(record::decode_header(&rec)?.is_some())
        }
    }
}
