//! The [`MailboxStore`] verbs of the log, and its [`Flush`]: appends go through the
//! writer, everything else through the in-memory index.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tern_platform::clock::UnixMillis;
use tern_proto::DeviceAddress;
use tracing::warn;

use super::record::{self, MessageHeader};
use super::{io, lock, Loc, LogStore, Segment, Writer, EARLY_SPARE, MAX_PENDING};
use crate::store::seq::SeqCounters;
use crate::store::{
    Envelope, Expired, Flush, MailboxStore, SharedAppend, StoreError, StoreResult, StoredMessage,
    Totals, Usage,
};

/// An entry's body record (offset, length) in the entry's segment.
type BodyAt = Option<(u64, u32)>;

/// What an append places: each record's mailbox, seq and location, and the body
/// (offset, record length) if it wrote one.
pub(super) struct Placed {
    pub(super) records: Vec<(DeviceAddress, u64, Loc)>,
    pub(super) body: Option<(u64, u32)>,
}

impl LogStore {
    /// Writes the records `encode` puts in the buffer (given the offset it starts at
    /// in the active segment, the seq counters and that segment's id) with one
    /// `write`, then indexes them: all or nothing.
    pub(super) fn write_records(
        &self,
        encode: impl FnOnce(&mut Vec<u8>, u64, &mut SeqCounters, u64) -> StoreResult<Placed>,
    ) -> StoreResult<Vec<u64>> {
        let shared = &*self.shared;
        let mut w = lock(&shared.writer);
        if w.len >= shared.segment_bytes {
            shared.roll(&mut w)?;
        } else if w.grows && w.len >= EARLY_SPARE && lock(&shared.spare).is_some() {
            // A growing segment is left as soon as a spare is ready; if that fails,
            // this one still has room.
            if let Err(e) = shared.roll(&mut w) {
                warn!(error = %e, "mailbox log: moving to a prepared segment failed");
            }
        }
        let w = &mut *w;
        let start = w.len;
        w.buf.clear();
        let placed = encode(&mut w.buf, start, &mut w.seqs, w.active.id)?;
        // Only into a zero-filled spare: an overwrite of blocks already written needs
        // no new ones, so a full disk cannot fail the flush's write (a segment that
        // grows, as on a nearly full disk, refuses each append that finds no room).
        if shared.write_behind && !w.grows && w.buf.len() <= MAX_PENDING {
            // An injected failure refuses the append here, as it refuses a write.
            crate::store::fault::check(crate::store::fault::Site::LogAppend)
                .map_err(|e| io("appending", e))?;
            let mut pending = lock(&shared.pending);
            if pending.bytes.len() + w.buf.len() > MAX_PENDING {
                // No flush came for a while: these go now (on failure this append
                // is refused with nothing of it kept, and the log latches).
                drop(pending);
                shared.write_pending(w)?;
                pending = lock(&shared.pending);
            }
            if pending.bytes.is_empty() {
                pending.segment = w.active.id;
                pending.start = start;
            }
            pending.bytes.extend_from_slice(&w.buf);
        } else {
            self.write_now(w, start, &placed)?;
        }
        self.placed(w, placed)
    }

    /// Writes an append at once (not write-behind, or too large to wait): after the
    /// appends pending, so the file is written in order.
    fn write_now(&self, w: &mut Writer, start: u64, placed: &Placed) -> StoreResult<()> {
        let shared = &*self.shared;
        shared.write_pending(w)?;
        // On failure nothing is indexed, and the next append starts a new segment
        // rather than write over part of what may have reached this one.
        let written = crate::store::fault::check(crate::store::fault::Site::LogAppend)
            .and_then(|()| w.active.file.write_all_at(&w.buf, start));
        if let Err(e) = written {
            w.len = w.len.max(shared.segment_bytes);
            // Part of the batch may have reached the file; a restart's scan must not
            // deliver a send that was refused. Best effort: where nothing arrived,
            // there is nothing to cover.
            let max_seq = placed.records.iter().map(|r| r.1).max().unwrap_or(0);
            if let Ok(dead) = record::dead_header(w.buf.len() as u64, max_seq) {
                if w.active.file.write_all_at(&dead, start).is_ok() {
                    w.dirty = true;
                }
            }
            return Err(io("appending", e));
        }
        Ok(())
    }

    /// Indexes an append written (or pending), and moves the writer past it.
    fn placed(&self, w: &mut Writer, placed: Placed) -> StoreResult<Vec<u64>> {
        let shared = &*self.shared;
        let due = w.spare_due(shared.segment_bytes);
        if w.len < due && w.len + w.buf.len() as u64 >= due {
            // Half way through the segment (or into a growing one): have the next
            // one prepared.
            if let Some((wake, _)) = &self.background {
                let _ = wake.send(());
            }
        }
        w.len += w.buf.len() as u64;
        w.dirty = true;
        if w.buf.capacity() > 4 << 20 {
            w.buf = Vec::new();
        }
        // Indexed before the writer is released, so a roll never deletes a segment
        // whose messages are not counted yet; a body before its entries.
        let mut index = lock(&shared.index);
        if let Some((offset, len)) = placed.body {
            index.add_body(w.active.id, offset, len);
        }
        for (to, seq, loc) in &placed.records {
            index.insert(*to, *seq, *loc);
        }
        Ok(placed.records.into_iter().map(|(_, seq, _)| seq).collect())
    }
}

impl MailboxStore for LogStore {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        self.write_records(|buf, start, seqs, segment| {
            let mut records = Vec::with_capacity(msgs.len());
            for (m, seq) in msgs.iter().zip(seqs.take(to, msgs.len())?) {
                let offset = start + buf.len() as u64;
                let header = MessageHeader {
                    to: *to,
                    seq,
                    accepted_at,
                    expires_at,
                    message_id: m.message_id,
                };
                let len = record::encode_message(buf, &header, &m.payload);
                let len = u32::try_from(len).map_err(|_| StoreError::Corrupt("record too long"))?;
                let loc = Loc {
                    segment,
                    offset,
                    len,
                    expires_at,
                    body: None,
                };
                records.push((*to, seq, loc));
            }
            Ok(Placed {
                records,
                body: None,
            })
        })
    }

    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        self.append_shared_records(append)
    }

    fn shared_bodies(&self) -> u64 {
        lock(&self.shared.index).bodies.len() as u64
    }

    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // Runs of adjacent records in one segment, each read with one pread.
        struct Run {
            segment: Arc<Segment>,
            start: u64,
            end: u64,
            /// Seq, offset, length, and an entry's body.
            items: Vec<(u64, u64, u64, BodyAt)>,
        }
        let mut runs: Vec<Run> = Vec::new();
        {
            let index = lock(&self.shared.index);
            let Some(mailbox) = index.mailboxes.get(of) else {
                return Ok(Vec::new());
            };
            for (&seq, loc) in mailbox.entries.range(first..).take(max) {
                let item = (seq, loc.offset, u64::from(loc.len), loc.body);
                match runs.last_mut() {
                    Some(r) if r.segment.id == loc.segment && r.end == loc.offset => {
                        r.end += u64::from(loc.len);
                        r.items.push(item);
                    }
                    _ => {
                        let Some(s) = index.segments.get(&loc.segment) else {
                            return Err(StoreError::Corrupt("message in a missing segment"));
                        };
                        runs.push(Run {
                            segment: s.segment.clone(),
                            start: loc.offset,
                            end: loc.offset + u64::from(loc.len),
                            items: vec![item],
                        });
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(runs.iter().map(|r| r.items.len()).sum());
        let mut lost = Vec::new();
        for run in runs {
            let mut buf = vec![0u8; usize::try_from(run.end - run.start).unwrap_or(usize::MAX)];
            self.shared
                .read_at(&run.segment, &mut buf, run.start)
                .map_err(|e| io("reading", e))?;
            let buf = Bytes::from(buf);
            for (seq, offset, len, body) in run.items {
                let at = (offset - run.start) as usize;
                let rec = buf.slice(at..at + len as usize);
                let m = record::decode_message(&rec)?
                    .filter(|m| m.header.seq == seq && m.header.to == *of);
                // An entry's body, read from its segment.
                let shared_body = match (&m, body) {
                    (Some(m), Some((at, blen))) if m.body == Some(at) => {
                        self.read_body(&run.segment, at, blen)?.map(Some)
                    }
                    (Some(m), None) if m.body.is_none() => Some(None),
                    _ => None,
                };
                match (m, shared_body) {
                    (Some(m), Some(shared_body)) => {
                        out.push(StoredMessage {
                            seq,
                            message_id: m.header.message_id,
                            payload: m.payload,
                            accepted_at: m.header.accepted_at,
                            expires_at: m.header.expires_at,
                            shared_body,
                        });
                    }
                    // Removed and scrubbed since it was located, or damaged on disk.
                    _ => lost.push(seq),
                }
            }
        }
        if !lost.is_empty() {
            let (gone, empty) = lock(&self.shared.index).remove(of, lost.into_iter());
            for s in empty {
                self.shared.delete_segment(s.id);
            }
            if gone.messages > 0 {
                warn!(
                    damaged = gone.messages,
                    "damaged mailbox log records dropped"
                );
            }
        }
        Ok(out)
    }

    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // From the in-memory index: no segment is read.
        let index = lock(&self.shared.index);
        Ok(index.mailboxes.get(of).map_or_else(Vec::new, |m| {
            m.entries
                .range(first..)
                .take(max)
                .map(|(s, _)| *s)
                .collect()
        }))
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        self.shared.remove(of, seqs)
    }

    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.usage_and_totals(of).map(|(usage, _)| usage)
    }

    fn totals(&self) -> Totals {
        lock(&self.shared.index).totals()
    }

    fn usage_and_totals(&self, of: &DeviceAddress) -> StoreResult<(Usage, Totals)> {
        let index = lock(&self.shared.index);
        let usage = index
            .mailboxes
            .get(of)
            .map_or_else(Usage::default, |m| m.usage);
        Ok((usage, index.totals()))
    }

    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        Ok(crate::store::due(
            &lock(&self.shared.index).expiry,
            now,
            max,
        ))
    }

    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        // No header is written now, unlike an ack: a restart never indexes an expired
        // message, so the scrub's write is soon enough, and a sweep of thousands
        // costs no write each.
        let seqs = Expired::seqs_of(entries, of);
        let (removed, empty) = lock(&self.shared.index).remove(of, seqs.into_iter());
        for s in empty {
            self.shared.delete_segment(s.id);
        }
        Ok(removed)
    }

    fn settle(&self) -> StoreResult<()> {
        self.shared.scrub()
    }

    fn sweep_files(&self, now: UnixMillis) -> StoreResult<()> {
        self.shared.sweep_files(now)
    }
}

impl Flush for LogStore {
    fn flush(&self) -> StoreResult<()> {
        self.shared.flush()
    }
}
