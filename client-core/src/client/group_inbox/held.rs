//! Group envelopes whose tag routes to no epoch this device knows yet. Their
//! commit or welcome may still come: a resent commit or welcome (same message id)
//! can arrive after messages of the epoch it leads to, and mailboxes filled along
//! other relays' retry paths may reorder. Dropping them would leave this device
//! behind for good, so they are acknowledged and kept (in the batch the ack waits
//! for), and tried again after every commit or welcome this device applies, in
//! arrival order, until a pass applies none. A tag is unrelated to its group until
//! that epoch is known, so the bound is one for the device: [`HELD_MAX`]
//! envelopes, [`HELD_MAX_BYTES`] bytes and [`HELD_MAX_AGE_MS`], oldest dropped
//! first, each with an [`Event::Dropped`].

use super::super::group_records::{HeldEntry, HeldEnvelopeRecord, HeldIndexRecord, HELD_INDEX_KEY};
use super::super::state::{Outcome, State};
use super::super::Event;
use crate::store::records::seq_key;
use crate::store::{Batch, Namespace, StoreError};
use crate::{Error, Result};

/// Most envelopes held.
pub(crate) const HELD_MAX: usize = 256;
/// Most bytes held (sixty-four envelopes of the relay's default largest).
pub(crate) const HELD_MAX_BYTES: usize = 16 * 1024 * 1024;
/// How long one is held: no relay keeps a message longer, so its commit cannot
/// come later than this either.
pub(crate) const HELD_MAX_AGE_MS: u64 = tern_proto::limits::MAX_MESSAGE_TTL_MS;
/// Shortest envelope worth holding: kind, tag, nonce and AEAD tag around an MLS
/// message, which carries at least the group id (32 bytes) and a signature (64);
/// the smallest real one (an empty message, padded) is 211 bytes.
const MIN_ENVELOPE: usize = 1 + 16 + 12 + 16 + 32 + 64;

impl State {
    fn held_index(&self) -> Result<HeldIndexRecord> {
        match self.kv.get(Namespace::GroupHeld, HELD_INDEX_KEY)? {
            Some(v) => Ok(prost::Message::decode(&v[..]).map_err(|_| StoreError::Corrupt)?),
            None => Ok(HeldIndexRecord::default()),
        }
    }

    /// Keeps a group envelope of no known epoch (stored, not durably).
    pub(super) fn hold_envelope(
        &mut self,
        message_id: &[u8],
        envelope: &[u8],
        tag: &[u8; 16],
        now_ms: u64,
    ) -> Result<Outcome> {
        if envelope.len() < MIN_ENVELOPE {
            return Ok(Outcome::Dropped("a group envelope too short".into()));
        }
        let mut index = self.held_index()?;
        if index.entries.iter().any(|e| e.message_id == message_id) {
            return Ok(Outcome::Duplicate);
        }
        let seq = index.next_seq;
        index.next_seq += 1;
        index.entries.push(HeldEntry {
            seq,
            message_id: message_id.to_vec(),
            tag: tag.to_vec(),
            len: envelope.len() as u64,
            held_at_ms: now_ms,
        });
        let mut batch = Batch::new();
        let mut events = Vec::new();
        prune(&mut index, now_ms, &mut batch, &mut events);
        // Larger than the whole bound, it went itself (its delete is harmless).
        if index.entries.last().is_some_and(|e| e.seq == seq) {
            let record = HeldEnvelopeRecord {
                envelope: envelope.to_vec(),
            };
            batch.put(Namespace::GroupHeld, seq_key(seq), &record);
        }
        batch.put(Namespace::GroupHeld, HELD_INDEX_KEY.to_vec(), &index);
        self.commit(batch, false)?;
        tracing::debug!("held a group envelope of an epoch not known yet");
        Ok(Outcome::Synced(events))
    }

    /// Tries the held envelopes again (after a commit or welcome was applied, and
    /// when the worker starts): each whose tag now routes is processed and goes,
    /// in arrival order, pass after pass until one applies none. Returns their
    /// events; the ones past the bound go with an [`Event::Dropped`].
    pub(crate) fn retry_held(&mut self, now_ms: u64) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut index = self.held_index()?;
        if index.entries.is_empty() || self.group_device.is_none() {
            return Ok(events);
        }
        let mut batch = Batch::new();
        prune(&mut index, now_ms, &mut batch, &mut events);
        if !batch.is_empty() {
            batch.put(Namespace::GroupHeld, HELD_INDEX_KEY.to_vec(), &index);
            self.commit(batch, false)?;
        }
        // Every pass but the last removes one at least.
        for _ in 0..=index.entries.len() {
            let mut progressed = false;
            let mut i = 0;
            while i < index.entries.len() {
                let entry = index.entries[i].clone();
                let Ok(tag) = <[u8; 16]>::try_from(&entry.tag[..]) else {
                    return Err(StoreError::Corrupt.into());
                };
                let mut found = Vec::new();
                let routed = self.route_tag(&tag, now_ms, &mut found, &mut false)?;
                let Some(group) = routed else {
                    events.append(&mut found);
                    i += 1;
                    continue;
                };
                let out = match self.kv.get(Namespace::GroupHeld, &seq_key(entry.seq))? {
                    Some(v) => {
                        let record: HeldEnvelopeRecord =
                            prost::Message::decode(&v[..]).map_err(|_| StoreError::Corrupt)?;
                        let out = self.process_routed(
                            &group,
                            &entry.message_id,
                            &record.envelope,
                            now_ms,
                            found,
                            &mut false,
                        );
                        match out {
                            Err(Error::Store(e)) if !matches!(e, StoreError::Corrupt) => {
                                return Err(e.into())
                            }
                            Err(e) => Outcome::Dropped(format!("a held group envelope: {e}")),
                            Ok(out) => out,
                        }
                    }
                    None => Outcome::Synced(found),
                };
                match out {
                    Outcome::Synced(mut more) => events.append(&mut more),
                    Outcome::Dropped(reason) => events.push(Event::Dropped { reason }),
                    _ => {}
                }
                // After the envelope's own write: a crash between the two finds
                // it again, a duplicate by its message id.
                index.entries.remove(i);
                let mut batch = Batch::new();
                batch.delete(Namespace::GroupHeld, seq_key(entry.seq));
                batch.put(Namespace::GroupHeld, HELD_INDEX_KEY.to_vec(), &index);
                self.commit(batch, false)?;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        Ok(events)
    }
}

/// Drops what is past the bound from `index`: the ones held too long, then the
/// oldest while too many or too large.
fn prune(index: &mut HeldIndexRecord, now_ms: u64, batch: &mut Batch, events: &mut Vec<Event>) {
    let mut drop = |e: HeldEntry, reason: &str| {
        batch.delete(Namespace::GroupHeld, seq_key(e.seq));
        tracing::debug!(%reason, "dropped a held group envelope");
        events.push(Event::Dropped {
            reason: reason.into(),
        });
    };
    let (old, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut index.entries)
        .into_iter()
        .partition(|e| now_ms.saturating_sub(e.held_at_ms) > HELD_MAX_AGE_MS);
    for e in old {
        drop(e, "a group envelope whose epoch never came (held 30 days)");
    }
    index.entries = kept;
    let mut bytes: u64 = index.entries.iter().map(|e| e.len).sum();
    while index.entries.len() > HELD_MAX || bytes > HELD_MAX_BYTES as u64 {
        let e = index.entries.remove(0);
        bytes -= e.len;
        drop(
            e,
            "a group envelope of an epoch not known yet, past the bound on held ones",
        );
    }
}
