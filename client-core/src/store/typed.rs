//! Typed stores over a [`KvStore`]: one narrow trait per kind of record (this
//! device's identity, prekeys, sessions, contacts, the outbox, the inbox), each
//! implemented for every `KvStore`, and one [`Batch`] that collects typed writes to
//! any of them so a change still reaches the store as one atomic
//! [`KvStore::apply`].
//!
//! Reads go through the traits; writes only through a [`Batch`]. The record keys and
//! encodings are those of [`super::records`] and never change: stores written by
//! earlier versions read the same.

use prost::Message;
use tern_proto::{AccountId, DeviceId};

use super::records::{
    parse_prekey_key, parse_seq_key, prekey_key, seen_key, seq_key, session_key, ContactRecord,
    HeldRecord, InboxRecord, LocalRecord, OutboxRecord, PreKeyKind, PreKeyRecord, LOCAL_KEY,
};
use super::{KvStore, Namespace, Op, StoreError, StoreResult};

fn decode<M: Message + Default>(bytes: &[u8]) -> StoreResult<M> {
    M::decode(bytes).map_err(|_| StoreError::Corrupt)
}

fn seq_of(key: &[u8]) -> StoreResult<u64> {
    parse_seq_key(key).ok_or(StoreError::Corrupt)
}

/// This device's own keys, address and counters.
pub(crate) trait IdentityStore {
    /// The device's record; `None` for a store that holds no device.
    fn local(&self) -> StoreResult<Option<LocalRecord>>;
}

/// Prekey secrets, by kind and id.
pub(crate) trait PreKeyStore {
    /// One prekey's secret, if still kept.
    fn prekey(&self, kind: PreKeyKind, id: u32) -> StoreResult<Option<PreKeyRecord>>;
    /// Every prekey of `kind`, by id (ascending).
    fn prekeys(&self, kind: PreKeyKind) -> StoreResult<Vec<(u32, PreKeyRecord)>>;
}

/// Ratchet sessions, by contact device, as the opaque bytes of a session set.
pub(crate) trait SessionStore {
    /// The encoded session set with `device` of `account`, if any.
    fn session(&self, account: &AccountId, device: DeviceId) -> StoreResult<Option<Vec<u8>>>;
}

/// Contacts' identity keys, delivery tokens and devices, by account.
pub(crate) trait ContactStore {
    /// Every contact.
    fn contacts(&self) -> StoreResult<Vec<(AccountId, ContactRecord)>>;
}

/// Messages on their way out, by sequence number.
pub(crate) trait OutboxStore {
    /// The whole outbox, oldest first.
    fn outbox(&self) -> StoreResult<Vec<(u64, OutboxRecord)>>;
}

/// What came in: decrypted messages the app has not confirmed, messages held under a
/// changed identity key, and the ids already received.
pub(crate) trait InboxStore {
    /// Unconfirmed messages, oldest first.
    fn inbox(&self) -> StoreResult<Vec<(u64, InboxRecord)>>;
    /// Held messages, oldest first.
    fn held(&self) -> StoreResult<Vec<(u64, HeldRecord)>>;
    /// Whether `message_id` from `sender` was received already.
    fn seen(&self, sender: &AccountId, message_id: &[u8]) -> StoreResult<bool>;
    /// Deletes of the received ids recorded before `cutoff_ms`.
    fn seen_before(&self, cutoff_ms: u64) -> StoreResult<Batch>;
}

impl<K: KvStore + ?Sized> IdentityStore for K {
    fn local(&self) -> StoreResult<Option<LocalRecord>> {
        self.get(Namespace::Local, LOCAL_KEY)?
            .map(|b| decode(&b))
            .transpose()
    }
}

impl<K: KvStore + ?Sized> PreKeyStore for K {
    fn prekey(&self, kind: PreKeyKind, id: u32) -> StoreResult<Option<PreKeyRecord>> {
        self.get(Namespace::PreKeys, &prekey_key(kind, id))?
            .map(|b| decode(&b))
            .transpose()
    }

    fn prekeys(&self, kind: PreKeyKind) -> StoreResult<Vec<(u32, PreKeyRecord)>> {
        let mut out = Vec::new();
        for (k, v) in self.scan(Namespace::PreKeys)? {
            match parse_prekey_key(&k) {
                Some((k, id)) if k == kind => out.push((id, decode(&v)?)),
                _ => {}
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }
}

impl<K: KvStore + ?Sized> SessionStore for K {
    fn session(&self, account: &AccountId, device: DeviceId) -> StoreResult<Option<Vec<u8>>> {
        self.get(Namespace::Sessions, &session_key(account, device))
    }
}

impl<K: KvStore + ?Sized> ContactStore for K {
    fn contacts(&self) -> StoreResult<Vec<(AccountId, ContactRecord)>> {
        self.scan(Namespace::Contacts)?
            .into_iter()
            .map(|(k, v)| {
                let account = AccountId::try_from(&k[..]).map_err(|_| StoreError::Corrupt)?;
                Ok((account, decode(&v)?))
            })
            .collect()
    }
}

impl<K: KvStore + ?Sized> OutboxStore for K {
    fn outbox(&self) -> StoreResult<Vec<(u64, OutboxRecord)>> {
        by_seq(self.scan(Namespace::Outbox)?)
    }
}

impl<K: KvStore + ?Sized> InboxStore for K {
    fn inbox(&self) -> StoreResult<Vec<(u64, InboxRecord)>> {
        by_seq(self.scan(Namespace::Inbox)?)
    }

    fn held(&self) -> StoreResult<Vec<(u64, HeldRecord)>> {
        by_seq(self.scan(Namespace::Held)?)
    }

    fn seen(&self, sender: &AccountId, message_id: &[u8]) -> StoreResult<bool> {
        Ok(self
            .get(Namespace::Seen, &seen_key(sender, message_id))?
            .is_some())
    }

    fn seen_before(&self, cutoff_ms: u64) -> StoreResult<Batch> {
        let mut batch = Batch::default();
        for (k, v) in self.scan(Namespace::Seen)? {
            let at = <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if at < cutoff_ms {
                batch.0.push(Op::Delete(Namespace::Seen, k));
            }
        }
        Ok(batch)
    }
}

pub(crate) fn by_seq<M: Message + Default>(
    records: Vec<(Vec<u8>, Vec<u8>)>,
) -> StoreResult<Vec<(u64, M)>> {
    let mut out = records
        .into_iter()
        .map(|(k, v)| Ok((seq_of(&k)?, decode(&v)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    out.sort_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// Typed writes to any of the stores, applied together: after a crash either all of
/// them happened or none did.
#[derive(Debug, Default)]
pub(crate) struct Batch(Vec<Op>);

impl Batch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends raw operations (staged by the MLS store).
    pub(crate) fn extend_ops(&mut self, ops: Vec<Op>) {
        self.0.extend(ops);
    }

    /// Whether the batch writes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Moves every write of `other` to the end of this batch.
    pub(crate) fn append(&mut self, other: &mut Batch) {
        self.0.append(&mut other.0);
    }

    /// Applies the batch to `kv`; with `durable`, returns once it is on disk.
    pub(crate) fn commit(self, kv: &dyn KvStore, durable: bool) -> StoreResult<()> {
        kv.apply(self.0, durable)
    }

    /// Sets this device's record.
    pub(crate) fn put_local(&mut self, record: &LocalRecord) {
        self.put(Namespace::Local, LOCAL_KEY.to_vec(), record);
    }

    /// Stores a prekey secret.
    pub(crate) fn put_prekey(&mut self, kind: PreKeyKind, id: u32, record: &PreKeyRecord) {
        self.put(Namespace::PreKeys, prekey_key(kind, id), record);
    }

    /// Deletes a prekey secret.
    pub(crate) fn delete_prekey(&mut self, kind: PreKeyKind, id: u32) {
        self.delete(Namespace::PreKeys, prekey_key(kind, id));
    }

    /// Stores an encoded session set.
    pub(crate) fn put_session(&mut self, account: &AccountId, device: DeviceId, set: &[u8]) {
        self.0.push(Op::Put(
            Namespace::Sessions,
            session_key(account, device),
            set.to_vec(),
        ));
    }

    /// Deletes a session set.
    pub(crate) fn delete_session(&mut self, account: &AccountId, device: DeviceId) {
        self.delete(Namespace::Sessions, session_key(account, device));
    }

    /// Sets a contact.
    pub(crate) fn put_contact(&mut self, account: &AccountId, record: &ContactRecord) {
        self.put(Namespace::Contacts, account.as_bytes().to_vec(), record);
    }

    /// Sets an outbox message.
    pub(crate) fn put_outbox(&mut self, seq: u64, record: &OutboxRecord) {
        self.put(Namespace::Outbox, seq_key(seq), record);
    }

    /// Deletes an outbox message.
    pub(crate) fn delete_outbox(&mut self, seq: u64) {
        self.delete(Namespace::Outbox, seq_key(seq));
    }

    /// Stores a received message.
    pub(crate) fn put_inbox(&mut self, seq: u64, record: &InboxRecord) {
        self.put(Namespace::Inbox, seq_key(seq), record);
    }

    /// Deletes a received message.
    pub(crate) fn delete_inbox(&mut self, seq: u64) {
        self.delete(Namespace::Inbox, seq_key(seq));
    }

    /// Stores a held message.
    pub(crate) fn put_held(&mut self, seq: u64, record: &HeldRecord) {
        self.put(Namespace::Held, seq_key(seq), record);
    }

    /// Deletes a held message.
    pub(crate) fn delete_held(&mut self, seq: u64) {
        self.delete(Namespace::Held, seq_key(seq));
    }

    /// Records that `message_id` from `sender` arrived at `at_ms`.
    pub(crate) fn put_seen(&mut self, sender: &AccountId, message_id: &[u8], at_ms: u64) {
        self.0.push(Op::Put(
            Namespace::Seen,
            seen_key(sender, message_id),
            at_ms.to_be_bytes().to_vec(),
        ));
    }

    pub(crate) fn put(&mut self, ns: Namespace, key: Vec<u8>, record: &impl Message) {
        self.0.push(Op::Put(ns, key, record.encode_to_vec()));
    }

    pub(crate) fn delete(&mut self, ns: Namespace, key: Vec<u8>) {
        self.0.push(Op::Delete(ns, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryKv;

    /// The record keys are the on-disk format: they must not move.
    #[test]
    fn typed_writes_keep_the_record_keys() {
        let account = AccountId([7; 16]);
        let device = DeviceId::try_from(3).expect("device");
        let mut batch = Batch::new();
        batch.put_local(&LocalRecord::default());
        batch.put_prekey(PreKeyKind::OneTime, 9, &PreKeyRecord::default());
        batch.put_session(&account, device, b"set");
        batch.put_contact(&account, &ContactRecord::default());
        batch.put_outbox(2, &OutboxRecord::default());
        batch.put_inbox(5, &InboxRecord::default());
        batch.put_held(6, &HeldRecord::default());
        batch.put_seen(&account, b"id", 11);
        let keys: Vec<(Namespace, Vec<u8>)> = batch
            .0
            .iter()
            .filter_map(|op| match op {
                Op::Put(ns, k, _) => Some((*ns, k.clone())),
                Op::Delete(..) => None,
            })
            .collect();
        let mut session = vec![7; 16];
        session.extend_from_slice(&[0, 0, 0, 3]);
        let mut seen = vec![7; 16];
        seen.extend_from_slice(b"id");
        assert_eq!(
            keys,
            vec![
                (Namespace::Local, b"local".to_vec()),
                (Namespace::PreKeys, vec![2, 0, 0, 0, 9]),
                (Namespace::Sessions, session),
                (Namespace::Contacts, vec![7; 16]),
                (Namespace::Outbox, 2u64.to_be_bytes().to_vec()),
                (Namespace::Inbox, 5u64.to_be_bytes().to_vec()),
                (Namespace::Held, 6u64.to_be_bytes().to_vec()),
                (Namespace::Seen, seen),
            ]
        );
    }

    #[test]
    fn one_batch_reaches_every_store_and_reads_back_typed() {
        let kv = MemoryKv::new();
        let account = AccountId([1; 16]);
        let device = DeviceId::try_from(1).expect("device");
        let mut batch = Batch::new();
        batch.put_session(&account, device, b"set");
        batch.put_outbox(
            4,
            &OutboxRecord {
                body: b"hi".to_vec(),
                ..OutboxRecord::default()
            },
        );
        batch.put_seen(&account, b"m", 100);
        batch.commit(&kv, true).expect("commit");
        assert_eq!(
            kv.session(&account, device).expect("session"),
            Some(b"set".to_vec())
        );
        let outbox = kv.outbox().expect("outbox");
        assert_eq!(outbox.len(), 1);
        assert_eq!((outbox[0].0, outbox[0].1.body.as_slice()), (4, &b"hi"[..]));
        assert!(kv.seen(&account, b"m").expect("seen"));
        assert!(kv.seen_before(100).expect("prune").is_empty());
        kv.seen_before(101)
            .expect("prune")
            .commit(&kv, false)
            .expect("commit");
        assert!(!kv.seen(&account, b"m").expect("seen"));
    }
}
