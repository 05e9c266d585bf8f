//! Removing messages (acks): marked deleted on disk before the call returns.
//!
//! A removal takes the entries out of the index, then writes a dead-span header
//! ([`record::dead_header`]) in place over each run of its records that lie end to
//! end (a send's batch does: one write then marks the batch's whole ack), so a
//! restart's scan skips them, and only then queues the spans for the scrub that
//! punches out their ciphertext. The
//! segments written go on `Shared::ack_dirty`, which the next flush syncs: under
//! `durability = "fsync"` the group commit an ack waits for makes the mark durable.
//! Until the spans are queued the segments still count the records live, so neither a
//! scrub nor a segment deletion can race the header writes.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tern_proto::DeviceAddress;

use super::{io, lock, record, Dead, Index, Loc, Segment, Shared};
use crate::store::{StoreResult, Usage};

/// A message taken out of the index whose record is not yet marked dead.
#[derive(Debug)]
pub(super) struct Taken {
    seq: u64,
    loc: Loc,
    segment: Option<Arc<Segment>>,
}

/// The longest span one dead header covers (its length is a `u32`).
const RUN_MAX: u64 = u32::MAX as u64;

/// `taken` cut into runs, in order: consecutive entries whose records lie end to end
/// in one segment, `max` bytes at most, each marked by one header. An entry without
/// a segment is a run of its own.
fn runs(taken: &[Taken], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut span = 0;
    for (i, t) in taken.iter().enumerate() {
        let len = u64::from(t.loc.len);
        let joins = match (out.last(), i.checked_sub(1).and_then(|p| taken.get(p))) {
            (Some(run), Some(prev)) => {
                run.end == i
                    && prev.segment.is_some()
                    && t.segment.is_some()
                    && prev.loc.segment == t.loc.segment
                    && prev.loc.offset + u64::from(prev.loc.len) == t.loc.offset
                    && span + len <= max
            }
            _ => false,
        };
        match out.last_mut() {
            Some(run) if joins => {
                run.end = i + 1;
                span += len;
            }
            _ => {
                out.push(i..i + 1);
                span = len;
            }
        }
    }
    out
}

impl Index {
    /// Takes the given messages out of `of`'s mailbox and the expiry order; their
    /// segments keep counting them live until [`Index::retire`].
    pub(super) fn take(
        &mut self,
        of: &DeviceAddress,
        seqs: impl Iterator<Item = u64>,
    ) -> (Usage, Vec<Taken>) {
        let mut removed = Usage::default();
        let Some(mailbox) = self.mailboxes.get_mut(of) else {
            return (removed, Vec::new());
        };
        let taken: Vec<(u64, Loc)> = seqs
            .filter_map(|seq| Some((seq, mailbox.entries.remove(&seq)?)))
            .collect();
        let mut own = 0;
        for (_, loc) in &taken {
            removed.messages += 1;
            removed.bytes += loc.payload_len();
            own += loc.own_len();
        }
        mailbox.usage.messages -= removed.messages;
        mailbox.usage.bytes -= removed.bytes;
        let empty = mailbox.entries.is_empty();
        // A shared body's bytes leave the totals with the body (`Index::retire`).
        self.uncount(Usage {
            messages: removed.messages,
            bytes: own,
        });
        if empty {
            self.mailboxes.remove(of);
        }
        let taken = taken
            .into_iter()
            .map(|(seq, loc)| {
                self.expiry.remove(&(loc.expires_at, *of, seq));
                let segment = self.segments.get(&loc.segment).map(|s| s.segment.clone());
                Taken { seq, loc, segment }
            })
            .collect();
        (removed, taken)
    }

    /// Undoes [`Index::take`] for messages whose records were not marked dead.
    pub(super) fn put_back(&mut self, of: &DeviceAddress, taken: &[Taken]) {
        if taken.is_empty() {
            return;
        }
        let mailbox = self.mailboxes.entry(*of).or_default();
        for t in taken {
            mailbox.entries.insert(t.seq, t.loc);
            mailbox.usage.messages += 1;
            mailbox.usage.bytes += t.loc.payload_len();
            self.expiry.insert((t.loc.expires_at, *of, t.seq));
        }
        let bytes = taken.iter().map(|t| t.loc.own_len()).sum();
        self.count(taken.len() as u64, bytes);
    }

    /// Queues taken messages for the scrub, with a shared body whose last entry
    /// they were; returns the segments left with nothing live (to delete).
    pub(super) fn retire(&mut self, taken: &[Taken]) -> Vec<Arc<Segment>> {
        let mut empty = Vec::new();
        for t in taken {
            if let Some(s) = self.segments.get_mut(&t.loc.segment) {
                s.live -= 1;
                s.dead.push(Dead {
                    offset: t.loc.offset,
                    len: u64::from(t.loc.len),
                    seq: t.seq,
                });
            }
            if let Some((offset, _)) = t.loc.body {
                empty.extend(self.release_body(t.loc.segment, offset));
            }
            empty.extend(self.take_if_empty(t.loc.segment));
        }
        empty
    }

    /// Takes messages out and queues them for the scrub at once, with no header
    /// written now (for expired messages, and records found damaged or already gone);
    /// returns what was removed and the segments left with nothing live.
    pub(super) fn remove(
        &mut self,
        of: &DeviceAddress,
        seqs: impl Iterator<Item = u64>,
    ) -> (Usage, Vec<Arc<Segment>>) {
        let (removed, taken) = self.take(of, seqs);
        let empty = self.retire(&taken);
        (removed, empty)
    }
}

impl Shared {
    /// Removes messages, each marked dead on disk before this returns (see the module
    /// docs). If a write fails, the messages not yet marked stay queued and readable,
    /// and the error is returned; those already marked stay removed.
    pub(super) fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        let (removed, mut taken) = lock(&self.index).take(of, seqs.iter().copied());
        if taken.is_empty() {
            return Ok(removed);
        }
        // In file order, whatever order the ack named them in: the runs are longest.
        taken.sort_unstable_by_key(|t| (t.loc.segment, t.loc.offset));
        let mut written = 0;
        let mut dirty: Vec<Arc<Segment>> = Vec::new();
        let mut failure = None;
        let copying = self.copying.read().unwrap_or_else(|e| e.into_inner());
        for run in runs(&taken, RUN_MAX) {
            let records = &taken[run.clone()];
            if let Some((first, segment)) =
                records.first().and_then(|t| Some((t, t.segment.as_ref()?)))
            {
                let span = records.iter().map(|t| u64::from(t.loc.len)).sum();
                let max_seq = records.iter().map(|t| t.seq).max().unwrap_or(first.seq);
                let marked = record::dead_header(span, max_seq)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|h| segment.file.write_all_at(&h, first.loc.offset));
                if let Err(e) = marked {
                    failure = Some(e);
                    break;
                }
                if dirty.iter().all(|d| d.id != segment.id) {
                    dirty.push(segment.clone());
                }
            }
            written = run.end;
        }
        // All of them (a failed write may have reached part of its header): a span
        // noted needlessly is only copied again.
        self.note_overwritten(taken.iter().filter_map(|t| {
            let segment = t.segment.as_ref()?;
            Some((segment.id, (t.loc.offset, u64::from(t.loc.len))))
        }));
        drop(copying);
        {
            let mut ack_dirty = lock(&self.ack_dirty);
            for s in dirty {
                if ack_dirty.iter().all(|d| d.id != s.id) {
                    ack_dirty.push(s);
                }
            }
        }
        let empty = {
            let mut index = lock(&self.index);
            index.put_back(of, &taken[written..]);
            index.retire(&taken[..written])
        };
        for s in empty {
            self.delete_segment(s.id);
        }
        match failure {
            Some(e) => Err(io("marking removed messages", e)),
            None => Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of `len` bytes at `offset` of segment `segment` (none: `u64::MAX`).
    fn at(segment: u64, offset: u64, len: u32) -> Taken {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        Taken {
            seq: offset,
            loc: Loc {
                segment,
                offset,
                len,
                expires_at: 0,
                body: None,
            },
            segment: (segment != u64::MAX).then(|| Arc::new(Segment { id: segment, file })),
        }
    }

    #[test]
    fn runs_join_records_end_to_end_in_one_segment_up_to_the_limit() {
        let taken = [
            at(1, 20, 10),
            at(1, 30, 10),
            at(1, 40, 5),
            // A gap.
            at(1, 50, 10),
            // Another segment at the offset that would have followed.
            at(2, 60, 10),
            at(2, 70, 10),
            // No segment: alone, and joined by nothing.
            at(u64::MAX, 80, 10),
            at(2, 90, 10),
        ];
        assert_eq!(runs(&taken, RUN_MAX), vec![0..3, 3..4, 4..6, 6..7, 7..8]);
        // A run ends where its span would pass the limit.
        assert_eq!(runs(&taken[..3], 20), vec![0..2, 2..3]);
        assert_eq!(runs(&taken[..3], 25), vec![0..3]);
        assert_eq!(runs(&taken[..3], 9), vec![0..1, 1..2, 2..3]);
        assert!(runs(&[], RUN_MAX).is_empty());
    }
}
