//! The [`MailboxStore`] verbs of [`SledStore`], with shared bodies.
//!
//! A multi-recipient append stores its body once under `B` (key: the first entry's
//! address and seq, which is never handed out again; value: expires at, body) and one
//! `M` entry per mailbox, in one batch. An entry's value is a message's with the top
//! bit of `accepted at` set, then the body's key, then its part. How many entries
//! point at each body is counted in memory, rebuilt from the entries at open, where a
//! body none points at is deleted; the entry that takes the count to 0 deletes the
//! body in its own batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tern_platform::clock::UnixMillis;
use tern_proto::{DeviceAddress, MessageId};

use super::{
    backend, encode_usage, expiry_key, msg_key, usage_key, SledStore, EXPIRY, EXPIRY_KEY_LEN, MSG,
    MSG_HEADER_LEN, MSG_KEY_LEN,
};
use crate::store::codec::{addr_bytes, fixed, parse_addr, ADDR_LEN};
use crate::store::{
    Envelope, Expired, MailboxStore, SharedAppend, StoreError, StoreResult, StoredMessage, Totals,
    Usage, PURGE_PAGE,
};

/// The tag of body keys.
const BODY: u8 = b'B';
/// `B`, then the first entry's address and seq.
pub(super) const BODY_KEY_LEN: usize = 1 + ADDR_LEN + 8;
/// Set in an entry's `accepted at` (a real time never has it).
const ENTRY_FLAG: u64 = 1 << 63;

pub(super) type BodyKey = [u8; BODY_KEY_LEN];

/// Each body's entries and length, counted in memory.
#[derive(Debug, Default)]
pub(super) struct BodyRefs(
    Mutex<HashMap<BodyKey, (u64, u64)>>,
    /// Entries reads skipped because their body was gone.
    AtomicU64,
);

impl BodyRefs {
    fn lock(&self) -> MutexGuard<'_, HashMap<BodyKey, (u64, u64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn body_key(first: &DeviceAddress, seq: u64) -> BodyKey {
    let mut k = [0u8; BODY_KEY_LEN];
    k[0] = BODY;
    k[1..1 + ADDR_LEN].copy_from_slice(&addr_bytes(first));
    k[1 + ADDR_LEN..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// A stored message or entry value, decoded.
pub(super) struct Value<'a> {
    message_id: MessageId,
    accepted_at: UnixMillis,
    expires_at: UnixMillis,
    /// The payload, or an entry's part.
    payload: &'a [u8],
    body: Option<BodyKey>,
}

pub(super) fn decode_value(v: &[u8]) -> StoreResult<Value<'_>> {
    if v.len() < MSG_HEADER_LEN {
        return Err(StoreError::Corrupt("message"));
    }
    let accepted = u64::from_be_bytes(fixed(&v[16..24])?);
    let (body, payload) = if accepted & ENTRY_FLAG != 0 {
        let end = MSG_HEADER_LEN + BODY_KEY_LEN;
        let key = v
            .get(MSG_HEADER_LEN..end)
            .ok_or(StoreError::Corrupt("entry"))?;
        (Some(fixed(key)?), &v[end..])
    } else {
        (None, &v[MSG_HEADER_LEN..])
    };
    Ok(Value {
        message_id: MessageId(fixed(&v[..16])?),
        accepted_at: accepted & !ENTRY_FLAG,
        expires_at: u64::from_be_bytes(fixed(&v[24..32])?),
        payload,
        body,
    })
}

fn encode_value(
    message_id: &MessageId,
    accepted_at: UnixMillis,
    expires_at: UnixMillis,
    body: Option<&BodyKey>,
    payload: &[u8],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(MSG_HEADER_LEN + BODY_KEY_LEN + payload.len());
    value.extend_from_slice(message_id.as_bytes());
    let flag = if body.is_some() { ENTRY_FLAG } else { 0 };
    value.extend_from_slice(&(accepted_at | flag).to_be_bytes());
    value.extend_from_slice(&expires_at.to_be_bytes());
    if let Some(k) = body {
        value.extend_from_slice(k);
    }
    value.extend_from_slice(payload);
    value
}

/// The key of the body whose first entry is `first`'s `seq`, for tests.
#[cfg(test)]
pub(super) fn body_key_of(first: &DeviceAddress, seq: u64) -> BodyKey {
    body_key(first, seq)
}

/// A body key no entry names, for tests.
#[cfg(test)]
pub(super) fn body_key_for_tests() -> BodyKey {
    body_key(&crate::store::conformance::addr(99, 9), 1)
}

impl SledStore {
    /// Counts each body's entries (once, at open: a pass over every message) and
    /// deletes the bodies none points at; returns how many it deleted. The totals
    /// then count each body once.
    pub(super) fn count_bodies(&self) -> StoreResult<u64> {
        let mut refs: HashMap<BodyKey, (u64, u64)> = HashMap::new();
        for kv in self.mailboxes.scan_prefix([MSG]) {
            let (_, v) = kv.map_err(backend)?;
            if let Some(k) = decode_value(&v)?.body {
                refs.entry(k).or_default().0 += 1;
            }
        }
        let mut orphans = sled::Batch::default();
        let mut dropped = 0;
        for kv in self.mailboxes.scan_prefix([BODY]) {
            let (k, v) = kv.map_err(backend)?;
            let key: BodyKey = fixed(&k)?;
            let len = v.len().saturating_sub(8) as u64;
            match refs.get_mut(&key) {
                Some(r) => r.1 = len,
                None => {
                    orphans.remove(k);
                    dropped += 1;
                }
            }
        }
        self.mailboxes.apply_batch(orphans).map_err(backend)?;
        let mut held = self.bodies.lock();
        for (k, (n, len)) in refs {
            // The usage keys counted the body once per entry.
            self.totals.sub_bytes((n - 1) * len);
            held.insert(k, (n, len));
        }
        Ok(dropped)
    }

    /// Deletes the messages at `seqs` and their expiry entries in one batch, plus the
    /// extra expiry entries given, adjusting usage; a body whose last entry goes is
    /// deleted in the same batch.
    fn delete(
        &self,
        of: &DeviceAddress,
        seqs: impl Iterator<Item = u64>,
        extra_expiry: &[Expired],
    ) -> StoreResult<Usage> {
        let mut batch = sled::Batch::default();
        let mut removed = Usage::default();
        // Held to the end: the counts change only once the batch is applied.
        let mut bodies = self.bodies.lock();
        let mut released: HashMap<BodyKey, u64> = HashMap::new();
        // Bytes the totals keep: bodies that other entries still point at.
        let mut kept = 0;
        // Reads below do not see the pending batch: a repeated seq must count once.
        let seqs: std::collections::BTreeSet<u64> = seqs.collect();
        for seq in seqs {
            let key = msg_key(of, seq);
            if let Some(v) = self.mailboxes.get(key).map_err(backend)? {
                let value = decode_value(&v)?;
                let mut len = value.payload.len() as u64;
                if let Some(k) = value.body {
                    let (refs, blen) = bodies.get(&k).copied().unwrap_or((1, 0));
                    let gone = released.entry(k).or_default();
                    *gone += 1;
                    len += blen;
                    if *gone >= refs {
                        batch.remove(&k[..]);
                    } else {
                        kept += blen;
                    }
                }
                batch.remove(&key[..]);
                batch.remove(&expiry_key(value.expires_at, of, seq)[..]);
                removed.messages += 1;
                removed.bytes += len;
            }
        }
        for e in extra_expiry {
            batch.remove(&expiry_key(e.expires_at, &e.to, e.seq)[..]);
        }
        let mut change = None;
        if removed.messages > 0 {
            let before = self.current_usage(of)?;
            let mut usage = before;
            usage.messages = usage.messages.saturating_sub(removed.messages);
            usage.bytes = usage.bytes.saturating_sub(removed.bytes);
            if usage.messages == 0 {
                batch.remove(&usage_key(of)[..]);
            } else {
                batch.insert(&usage_key(of)[..], &encode_usage(usage)[..]);
            }
            change = Some((before, usage));
        }
        self.mailboxes.apply_batch(batch).map_err(backend)?;
        if let Some((before, after)) = change {
            self.totals.change(before, after);
            self.totals.add_bytes(kept);
        }
        for (k, gone) in released {
            if let Some(r) = bodies.get_mut(&k) {
                r.0 = r.0.saturating_sub(gone);
                if r.0 == 0 {
                    bodies.remove(&k);
                }
            }
        }
        Ok(removed)
    }

    fn body(&self, key: &BodyKey) -> StoreResult<Option<Bytes>> {
        Ok(self
            .mailboxes
            .get(key)
            .map_err(backend)?
            .filter(|v| v.len() >= 8)
            .map(|v| Bytes::copy_from_slice(&v[8..])))
    }
}

impl SledStore {
    /// Entries reads skipped because their shared body was gone (for the metrics).
    pub fn bodies_missing(&self) -> u64 {
        self.bodies.1.load(Ordering::Relaxed)
    }
}

impl MailboxStore for SledStore {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        let before = self.current_usage(to)?;
        let mut usage = before;
        let mut batch = sled::Batch::default();
        let seqs = self
            .seqs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(to, msgs.len())?;
        for (m, &seq) in msgs.iter().zip(&seqs) {
            let value = encode_value(&m.message_id, accepted_at, expires_at, None, &m.payload);
            batch.insert(&msg_key(to, seq)[..], value);
            batch.insert(&expiry_key(expires_at, to, seq)[..], &[][..]);
            usage.messages += 1;
            usage.bytes += m.payload.len() as u64;
        }
        batch.insert(&usage_key(to)[..], &encode_usage(usage)[..]);
        self.mailboxes.apply_batch(batch).map_err(backend)?;
        self.totals.change(before, usage);
        Ok(seqs)
    }

    fn append_shared(&self, append: &SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        let Some(first) = append.entries.first() else {
            return Ok(Vec::new());
        };
        let mut seqs = Vec::with_capacity(append.entries.len());
        {
            let mut counters = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
            for e in append.entries {
                let seq = counters.take(&e.to, 1)?;
                seqs.push(*seq.first().ok_or(StoreError::Corrupt("no seq"))?);
            }
        }
        let key = body_key(&first.to, seqs[0]);
        let mut batch = sled::Batch::default();
        let mut value = Vec::with_capacity(8 + append.body.len());
        value.extend_from_slice(&append.expires_at.to_be_bytes());
        value.extend_from_slice(append.body);
        batch.insert(&key[..], value);
        let mut changes = Vec::with_capacity(append.entries.len());
        for (i, (e, &seq)) in append.entries.iter().zip(&seqs).enumerate() {
            let value = encode_value(
                &append.message_id,
                append.accepted_at,
                append.expires_at,
                Some(&key),
                &e.part,
            );
            batch.insert(&msg_key(&e.to, seq)[..], value);
            batch.insert(&expiry_key(append.expires_at, &e.to, seq)[..], &[][..]);
            let before = self.current_usage(&e.to)?;
            let after = Usage {
                messages: before.messages + 1,
                bytes: before.bytes + append.entry_bytes(i),
            };
            batch.insert(&usage_key(&e.to)[..], &encode_usage(after)[..]);
            changes.push((before, after));
        }
        let mut bodies = self.bodies.lock();
        self.mailboxes.apply_batch(batch).map_err(backend)?;
        let n = append.entries.len() as u64;
        bodies.insert(key, (n, append.body.len() as u64));
        drop(bodies);
        for (before, after) in changes {
            self.totals.change(before, after);
        }
        self.totals.sub_bytes((n - 1) * append.body.len() as u64);
        Ok(seqs)
    }

    fn shared_bodies(&self) -> u64 {
        self.bodies.lock().len() as u64
    }

    fn read(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<StoredMessage>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(max.min(256));
        for kv in self
            .mailboxes
            .range(msg_key(of, start)..=msg_key(of, u64::MAX))
            .take(max)
        {
            let (k, v) = kv.map_err(backend)?;
            if k.len() != MSG_KEY_LEN {
                return Err(StoreError::Corrupt("message"));
            }
            let value = decode_value(&v)?;
            let shared_body = match &value.body {
                // The range is not a snapshot: expiry (or the last ack) may have
                // deleted the entry and its body since the entry was read. Skipped,
                // as the log does; the entry itself is gone or going.
                Some(key) => match self.body(key)? {
                    Some(body) => Some(body),
                    None => {
                        self.bodies.1.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("skipped an entry whose shared body is gone");
                        continue;
                    }
                },
                None => None,
            };
            out.push(StoredMessage {
                seq: u64::from_be_bytes(fixed(&k[1 + ADDR_LEN..])?),
                message_id: value.message_id,
                accepted_at: value.accepted_at,
                expires_at: value.expires_at,
                payload: Bytes::copy_from_slice(value.payload),
                shared_body,
            });
        }
        Ok(out)
    }

    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // The seq is the key's tail; values (with payloads) are dropped unread.
        let mut out = Vec::with_capacity(max.min(PURGE_PAGE));
        for kv in self
            .mailboxes
            .range(msg_key(of, start)..=msg_key(of, u64::MAX))
            .take(max)
        {
            let (k, _) = kv.map_err(backend)?;
            let tail = k
                .get(1 + ADDR_LEN..)
                .ok_or(StoreError::Corrupt("message key"))?;
            out.push(u64::from_be_bytes(fixed(tail)?));
        }
        Ok(out)
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        self.delete(of, seqs.iter().copied(), &[])
    }

    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.current_usage(of)
    }

    fn totals(&self) -> Totals {
        self.totals.read()
    }

    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        let mut end = [0u8; 9];
        end[0] = EXPIRY;
        end[1..].copy_from_slice(&now.to_be_bytes());
        let mut out = Vec::new();
        // Everything up to and including `now`: the bound is the first key past it.
        let upper = {
            let mut u = [0xffu8; EXPIRY_KEY_LEN];
            u[..9].copy_from_slice(&end);
            u
        };
        for kv in self.mailboxes.range(&[EXPIRY][..]..=&upper[..]).take(max) {
            let (k, _) = kv.map_err(backend)?;
            if k.len() != EXPIRY_KEY_LEN {
                return Err(StoreError::Corrupt("expiry entry"));
            }
            out.push(Expired {
                expires_at: u64::from_be_bytes(fixed(&k[1..9])?),
                to: parse_addr(&k[9..9 + ADDR_LEN])?,
                seq: u64::from_be_bytes(fixed(&k[9 + ADDR_LEN..])?),
            });
        }
        Ok(out)
    }

    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        let mine: Vec<Expired> = entries.iter().filter(|e| e.to == *of).copied().collect();
        // The extra entries cover an expiry entry whose message is already gone.
        self.delete(of, mine.iter().map(|e| e.seq), &mine)
    }
}
