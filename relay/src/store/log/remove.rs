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

impl Taken {
    /// Its record as a dead span.
    fn dead(&self) -> Dead {
        Dead {
            offset: self.loc.offset,
            len: u64::from(self.loc.len),
            seq: self.seq,
        }
    }
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
                s.dead.push(t.dead());
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
        // One header per run of records that lie end to end, segment by segment.
        'segments: for group in taken.chunk_by(|a, b| a.loc.segment == b.loc.segment) {
            let Some(segment) = group.first().and_then(|t| t.segment.clone()) else {
                written += group.len();
                continue;
            };
            for (run, n) in Dead::join(group.iter().map(Taken::dead)) {
                let marked = record::dead_header(run.len, run.seq)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|h| self.write_over(&segment, &h, run.offset));
                if let Err(e) = marked {
                    failure = Some(e);
                    break 'segments;
                }
                if dirty.iter().all(|d| d.id != segment.id) {
                    dirty.push(segment.clone());
                }
                written += n;
            }
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

    fn dead(offset: u64, len: u64, seq: u64) -> Dead {
        Dead { offset, len, seq }
    }

    #[test]
    fn spans_end_to_end_join_with_their_highest_seq() {
        let spans = [
            dead(20, 10, 2),
            dead(30, 10, 1),
            dead(40, 5, 3),
            // A gap.
            dead(50, 10, 4),
        ];
        assert_eq!(
            Dead::join(spans),
            vec![(dead(20, 25, 3), 3), (dead(50, 10, 4), 1)]
        );
        assert!(Dead::join([]).is_empty());
    }
}
