//! Shared bodies in the log: a multi-recipient send writes its body once (record
//! kind 2) and one entry per mailbox (kind 3) pointing at it, in one `write`.
//!
//! The index counts each body's entries; the count is never stored. A body leaves
//! the index with its last entry (ack, expiry, purge, a damaged read) and is queued
//! for the scrub, which marks it dead and punches its bytes out. A crash before that
//! leaves a body no live entry points at: the scan at open drops it.

use std::sync::Arc;

use bytes::Bytes;

use super::mailboxes::Placed;
use super::record::{self, MessageHeader};
use super::{io, Dead, Index, Loc, LogStore, Segment};
use crate::store::{SharedAppend, StoreError, StoreResult};

/// A body in the index.
#[derive(Debug, Clone, Copy)]
pub(super) struct Body {
    /// Entries that point at it.
    refs: u64,
    /// Its record's length.
    len: u32,
}

impl Index {
    /// Indexes a body no entry points at yet: it counts as live in its segment and
    /// its bytes count once in the totals.
    pub(super) fn add_body(&mut self, segment: u64, offset: u64, len: u32) {
        self.bodies.insert((segment, offset), Body { refs: 0, len });
        self.totals.bytes += u64::from(len) - record::BODY_OVERHEAD as u64;
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live += 1;
        }
    }

    /// One more entry points at the body.
    pub(super) fn hold_body(&mut self, segment: u64, offset: u64) {
        if let Some(b) = self.bodies.get_mut(&(segment, offset)) {
            b.refs += 1;
        }
    }

    /// An entry pointing at the body is gone; with the last one the body goes too,
    /// queued for the scrub. Returns its segment if that leaves it with nothing live.
    pub(super) fn release_body(&mut self, segment: u64, offset: u64) -> Option<Arc<Segment>> {
        let body = self.bodies.get_mut(&(segment, offset))?;
        body.refs = body.refs.saturating_sub(1);
        if body.refs > 0 {
            return None;
        }
        self.drop_body(segment, offset);
        self.take_if_empty(segment)
    }

    /// Takes a body out of the index and queues its record for the scrub.
    fn drop_body(&mut self, segment: u64, offset: u64) {
        let Some(body) = self.bodies.remove(&(segment, offset)) else {
            return;
        };
        self.totals.bytes -= u64::from(body.len) - record::BODY_OVERHEAD as u64;
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live -= 1;
            s.dead.push(Dead {
                offset,
                len: u64::from(body.len),
                seq: 0,
            });
        }
    }

    /// After a segment's scan: drops its bodies no entry points at (their last
    /// entry was removed before a restart); returns how many.
    pub(super) fn drop_unheld(&mut self, segment: u64) -> u64 {
        let unheld: Vec<u64> = self
            .bodies
            .iter()
            .filter(|((s, _), b)| *s == segment && b.refs == 0)
            .map(|((_, offset), _)| *offset)
            .collect();
        for &offset in &unheld {
            self.drop_body(segment, offset);
        }
        unheld.len() as u64
    }
}

impl LogStore {
    /// [`crate::store::MailboxStore::append_shared`]: the body's record, then one
    /// entry per mailbox, in one write.
    pub(super) fn append_shared_records(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        if append.entries.is_empty() {
            return Ok(Vec::new());
        }
        let expires_at = append.expires_at;
        self.write_records(|buf, start, seqs, segment| {
            let body_offset = start + buf.len() as u64;
            let body_len = record::encode_body(buf, expires_at, append.body);
            let body_len =
                u32::try_from(body_len).map_err(|_| StoreError::Corrupt("record too long"))?;
            let mut records = Vec::with_capacity(append.entries.len());
            for e in append.entries {
                let seq = seqs
                    .take(&e.to, 1)?
                    .first()
                    .copied()
                    .ok_or(StoreError::Corrupt("no seq"))?;
                let offset = start + buf.len() as u64;
                let header = MessageHeader {
                    to: e.to,
                    seq,
                    accepted_at: append.accepted_at,
                    expires_at,
                    message_id: append.message_id,
                };
                let len = record::encode_entry(buf, &header, body_offset, &e.part);
                let len = u32::try_from(len).map_err(|_| StoreError::Corrupt("record too long"))?;
                let loc = Loc {
                    segment,
                    offset,
                    len,
                    expires_at,
                    body: Some((body_offset, body_len)),
                };
                records.push((e.to, seq, loc));
            }
            Ok(Placed {
                records,
                body: Some((body_offset, body_len)),
            })
        })
    }

    /// A body's bytes, read from its record; `None` if the record is no longer a
    /// valid body (scrubbed since, or damaged).
    pub(super) fn read_body(
        &self,
        segment: &Segment,
        offset: u64,
        len: u32,
    ) -> StoreResult<Option<Bytes>> {
        let mut buf = vec![0u8; len as usize];
        self.shared
            .read_at(segment, &mut buf, offset)
            .map_err(|e| io("reading a body", e))?;
        Ok(record::decode_body(&Bytes::from(buf))?.map(|(_, body)| body))
    }
}
