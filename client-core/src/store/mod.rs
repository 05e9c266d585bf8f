//! Device storage: everything a device keeps (its keys, sessions, the outbox, received
//! messages not yet taken by the app) behind one narrow trait, [`KvStore`], with an
//! in-memory implementation for tests and a sled one encrypted at rest.
//!
//! Inside the crate, typed stores sit over it (`typed.rs`): one trait per kind of
//! record (identity, prekeys, sessions, contacts, outbox, inbox) for reads, and one
//! `Batch` of typed writes across all of them, committed as one [`KvStore::apply`].
//! `records.rs` holds the record keys and encodings, which are the disk format.
//!
//! # Contract
//! - Values are key material and message plaintext: a store that writes to disk must
//!   encrypt them ([`SledKv`] does, with a key the app supplies) and must not reveal
//!   the record keys either (they name contacts).
//! - [`KvStore::apply`] is atomic: after a crash either every operation of a batch
//!   happened or none did; with `durable` it returns only once the batch is on disk.
//!   The client relies on this to acknowledge a message to the relay only after the
//!   decrypted message and the updated session are both stored.

mod memory;
pub(crate) mod records;
mod sled;
mod typed;

pub use self::memory::MemoryKv;
pub use self::sled::SledKv;
pub(crate) use self::typed::{
    by_seq, Batch, ContactStore, IdentityStore, InboxStore, OutboxStore, PreKeyStore, SessionStore,
};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A record failed to decrypt or parse: the wrong storage key, or a damaged file.
    #[error("a stored record could not be read (wrong storage key or damaged data)")]
    Corrupt,
}

/// Result with [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

/// Record namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Namespace {
    /// This device's own keys and address.
    Local = 1,
    /// Prekey secrets by id.
    PreKeys = 2,
    /// Ratchet sessions by contact device.
    Sessions = 3,
    /// Contacts' identity keys and delivery tokens, by account.
    Contacts = 4,
    /// Messages waiting to be sent.
    Outbox = 5,
    /// Decrypted messages the app has not taken yet.
    Inbox = 6,
    /// Message ids already received, to drop duplicates.
    Seen = 7,
    /// Messages from a contact whose identity key changed, held until accepted.
    Held = 8,
    /// Contact discovery: cached OPRF outputs by number, and the relay's filter.
    Discovery = 9,
    /// A group's MLS state (no ratchet tree) and its wrap keys, by MLS group id.
    MlsState = 10,
    /// A group's prior-epoch MLS secrets, by group id then epoch (the last 3 kept).
    MlsEpoch = 11,
    /// A group's ratchet tree, by group id (written when the epoch changes).
    MlsTree = 12,
    /// Secrets of this device's MLS key packages, by key package reference.
    MlsKeyPackage = 13,
    /// Group envelope tags of the live epochs, to route an incoming envelope.
    MlsTag = 14,
    /// The broadcast part (one-time key, shared body) of outbox records, by seq.
    Broadcasts = 24,
    /// Groups of this device (handle, queued ops, commit in flight), by group id.
    Groups = 25,
    /// Group messages on their way, by outbox seq.
    GroupOutbox = 26,
    /// Group messages the app has not confirmed, by inbox seq.
    GroupInbox = 27,
    /// A linked device's group credential: the identity's certificate over its
    /// device key, from the link payload (key `certificate`).
    GroupCredential = 28,
    /// Group envelopes of an epoch not known yet, by arrival seq.
    GroupHeld = 29,
    /// Ratchet trees as attachments: a planned welcome's encrypted tree until its
    /// commit settles (key `up` ‖ group id), and received welcomes waiting for
    /// theirs to be fetched (`in` ‖ arrival seq, with an index).
    GroupTree = 31,
}

impl Namespace {
    /// Every namespace.
    pub(crate) const ALL: [Namespace; 21] = [
        Namespace::Local,
        Namespace::PreKeys,
        Namespace::Sessions,
        Namespace::Contacts,
        Namespace::Outbox,
        Namespace::Inbox,
        Namespace::Seen,
        Namespace::Held,
        Namespace::Discovery,
        Namespace::MlsState,
        Namespace::MlsEpoch,
        Namespace::MlsTree,
        Namespace::MlsKeyPackage,
        Namespace::MlsTag,
        Namespace::Broadcasts,
        Namespace::Groups,
        Namespace::GroupOutbox,
        Namespace::GroupInbox,
        Namespace::GroupCredential,
        Namespace::GroupHeld,
        Namespace::GroupTree,
    ];
}

/// Deletes every record of every namespace, in one durable batch.
pub(crate) fn clear(kv: &dyn KvStore) -> StoreResult<()> {
    let mut ops = Vec::new();
    for ns in Namespace::ALL {
        ops.extend(kv.scan(ns)?.into_iter().map(|(k, _)| Op::Delete(ns, k)));
    }
    kv.apply(ops, true)
}

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets a record.
    Put(Namespace, Vec<u8>, Vec<u8>),
    /// Deletes a record.
    Delete(Namespace, Vec<u8>),
}

/// A device's records. See the module docs for the contract.
pub trait KvStore: Send + Sync + 'static {
    /// The record, if present.
    fn get(&self, ns: Namespace, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Every record of a namespace, in no particular order.
    fn scan(&self, ns: Namespace) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Applies every operation or none; with `durable`, returns once on disk.
    fn apply(&self, ops: Vec<Op>, durable: bool) -> StoreResult<()>;
}

#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub(crate) fn rules(kv: &dyn KvStore) {
        assert_eq!(kv.get(Namespace::Sessions, b"bob").expect("get"), None);
        kv.apply(
            vec![
                Op::Put(Namespace::Sessions, b"bob".to_vec(), b"state-1".to_vec()),
                Op::Put(Namespace::Sessions, b"carol".to_vec(), b"state-2".to_vec()),
                Op::Put(
                    Namespace::Inbox,
                    b"bob".to_vec(),
                    b"other namespace".to_vec(),
                ),
            ],
            true,
        )
        .expect("apply");
        assert_eq!(
            kv.get(Namespace::Sessions, b"bob").expect("get"),
            Some(b"state-1".to_vec())
        );
        assert_eq!(
            kv.get(Namespace::Inbox, b"bob").expect("get"),
            Some(b"other namespace".to_vec())
        );
        let mut all = kv.scan(Namespace::Sessions).expect("scan");
        all.sort();
        assert_eq!(
            all,
            vec![
                (b"bob".to_vec(), b"state-1".to_vec()),
                (b"carol".to_vec(), b"state-2".to_vec())
            ]
        );
        kv.apply(
            vec![
                Op::Delete(Namespace::Sessions, b"carol".to_vec()),
                Op::Put(Namespace::Sessions, b"bob".to_vec(), b"state-3".to_vec()),
                Op::Delete(Namespace::Outbox, b"absent".to_vec()),
            ],
            false,
        )
        .expect("apply");
        assert_eq!(
            kv.scan(Namespace::Sessions).expect("scan"),
            vec![(b"bob".to_vec(), b"state-3".to_vec())]
        );
        assert!(kv.scan(Namespace::Outbox).expect("scan").is_empty());
        // Empty keys and values are records like any other.
        kv.apply(
            vec![Op::Put(Namespace::Local, Vec::new(), Vec::new())],
            true,
        )
        .expect("apply");
        assert_eq!(
            kv.get(Namespace::Local, b"").expect("get"),
            Some(Vec::new())
        );
    }
}
