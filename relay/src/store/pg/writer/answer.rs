//! Answering a committed batch: each caller's seqs, or the usage its acks freed.

use std::collections::{BTreeMap, HashMap, HashSet};

use tern_proto::DeviceAddress;

use super::{Op, Outcome, Part, Writer};
use crate::store::{SharedEntry, StoreError, StoreResult, Usage};

impl Writer {
    /// Hands each caller its part of a committed batch.
    pub(super) fn answer(&self, ops: Vec<Op>, parts: &BTreeMap<DeviceAddress, Part>, out: Outcome) {
        let mut freed: HashMap<usize, Usage> = HashMap::new();
        for (to, seq, len) in &out.deleted {
            if let Some(&i) = parts.get(to).and_then(|p| p.removes.get(seq)) {
                let u = freed.entry(i).or_default();
                u.messages += 1;
                u.bytes += len;
            }
        }
        // Seqs per mailbox in queue order, as the insert numbered them.
        let mut next: HashMap<DeviceAddress, i64> = parts
            .iter()
            .filter_map(|(to, p)| {
                let &(last, _, _) = out.heads.get(to)?;
                Some((*to, last - p.appended.0))
            })
            .collect();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append {
                    to, msgs, reply, ..
                } => {
                    let result = if out.refused.contains(&to) {
                        Err(StoreError::Deleted)
                    } else if let Some(base) = next.get_mut(&to) {
                        let seqs = (1..=msgs.len() as i64)
                            .map(|k| (*base + k) as u64)
                            .collect();
                        *base += msgs.len() as i64;
                        Ok(seqs)
                    } else {
                        Err(StoreError::Backend("mailbox head missing".into()))
                    };
                    let _ = reply.send(result);
                }
                Op::Remove { reply, .. } => {
                    let _ = reply.send(Ok(freed.get(&i).copied().unwrap_or_default()));
                }
                Op::AppendShared { entries, reply, .. } => {
                    let _ = reply.send(shared_seqs(&entries, &out.refused, &mut next));
                }
            }
        }
    }
}

/// A shared append's seqs, one per entry, taken from `next` in queue order. An entry to
/// a refused mailbox (an account being deleted) was not written: its seq is 0 (no
/// message has it), also when every entry is refused (the body was not stored
/// either): the caller refuses those devices one by one, as for a send that stored
/// some.
fn shared_seqs(
    entries: &[SharedEntry],
    refused: &HashSet<DeviceAddress>,
    next: &mut HashMap<DeviceAddress, i64>,
) -> StoreResult<Vec<u64>> {
    let mut seqs = Vec::with_capacity(entries.len());
    for e in entries {
        if refused.contains(&e.to) {
            seqs.push(0);
            continue;
        }
        let Some(base) = next.get_mut(&e.to) else {
            return Err(StoreError::Backend("mailbox head missing".into()));
        };
        *base += 1;
        seqs.push(*base as u64);
    }
    Ok(seqs)
}
