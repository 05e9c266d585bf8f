//! What the client stores, record by record: the disk format, so keys and encodings
//! never change. Values are protobuf (prost) so the format can grow; keys are
//! fixed-width binary so scans come back in a useful order. The device store encrypts
//! both.

use tern_proto::{AccountId, DeviceId};

/// `Namespace::Local`, key [`LOCAL_KEY`]: this device's keys and counters.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LocalRecord {
    #[prost(string, tag = "1")]
    pub(crate) relay: String,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) identity_secret: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) device_secret: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) identity_dh_secret: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub(crate) account_id: Vec<u8>,
    #[prost(uint32, tag = "6")]
    pub(crate) device_id: u32,
    /// The relay's sender-certificate signing key, learned over the pinned connection.
    #[prost(bytes = "vec", tag = "7")]
    pub(crate) relay_signing_key: Vec<u8>,
    /// Our delivery token: contacts need it to write to us sealed.
    #[prost(bytes = "vec", tag = "8")]
    pub(crate) delivery_token: Vec<u8>,
    /// The id the next generated prekey gets (signed and one-time share the counter).
    #[prost(uint32, tag = "9")]
    pub(crate) next_prekey_id: u32,
    /// The signed prekey contacts are given now.
    #[prost(uint32, tag = "10")]
    pub(crate) signed_prekey_id: u32,
    #[prost(uint64, tag = "11")]
    pub(crate) next_inbox_seq: u64,
    #[prost(uint64, tag = "12")]
    pub(crate) next_outbox_seq: u64,
    /// Whether the relay has all our keys (false between generating and uploading).
    #[prost(bool, tag = "13")]
    pub(crate) keys_published: bool,
    /// Whether the relay has the hash of `delivery_token` (false after a rotation
    /// until the worker has set it).
    #[prost(bool, tag = "14")]
    pub(crate) token_published: bool,
    /// A rotated token not yet set on the relay; it replaces `delivery_token` (and
    /// goes into messages) only once the relay has it.
    #[prost(bytes = "vec", tag = "15")]
    pub(crate) pending_delivery_token: Vec<u8>,
    /// The version of this account's device list we hold (the primary writes v+1
    /// here before it publishes it; 0: never published, a single-device account).
    #[prost(uint64, tag = "16")]
    pub(crate) device_list_version: u64,
    /// This account's device list, exactly the bytes the identity signed, verified
    /// before it was stored (empty: none yet).
    #[prost(bytes = "vec", tag = "17")]
    pub(crate) device_list: Vec<u8>,
    /// The identity's signature over `device_list`.
    #[prost(bytes = "vec", tag = "18")]
    pub(crate) device_list_signature: Vec<u8>,
    /// A device still joining an account: its `JoinKeys` bytes, while it waits for
    /// the primary's payload (every other field but `relay` is then empty).
    #[prost(bytes = "vec", tag = "19")]
    pub(crate) joining: Vec<u8>,
    /// Devices this primary linked that have not said they joined yet.
    #[prost(message, repeated, tag = "20")]
    pub(crate) pending_links: Vec<PendingLink>,
    /// A linked device's copy of the account's identity public key (the primary
    /// derives it from `identity_secret`, which a linked device never holds).
    #[prost(bytes = "vec", tag = "21")]
    pub(crate) identity_key: Vec<u8>,
    /// A linked device's identity signature over its agreement key, from the link
    /// payload (the primary signs its own when it loads).
    #[prost(bytes = "vec", tag = "22")]
    pub(crate) identity_dh_signature: Vec<u8>,
}

impl LocalRecord {
    /// Whether this is a device still waiting to join an account (no keys yet).
    pub(crate) fn is_joining(&self) -> bool {
        !self.joining.is_empty() && self.account_id.is_empty()
    }
}

/// A device linked by this primary, removed again if it has not joined by `deadline_ms`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PendingLink {
    #[prost(uint32, tag = "1")]
    pub(crate) device_id: u32,
    #[prost(uint64, tag = "2")]
    pub(crate) deadline_ms: u64,
}

pub(crate) const LOCAL_KEY: &[u8] = b"local";

/// `Namespace::Local`, key [`RELAY_PIN_KEY`]: the certificate the relay announced it
/// serves next (a rotation), pinned beside the current one (the fingerprint in
/// `LocalRecord::relay`) until a connection is made under it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RelayPinRecord {
    /// SHA-256 of the next certificate.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) next_fingerprint: Vec<u8>,
    /// When the relay said it starts serving it (Unix ms).
    #[prost(uint64, tag = "2")]
    pub(crate) switch_at_ms: u64,
}

pub(crate) const RELAY_PIN_KEY: &[u8] = b"relay-pin";

/// `Namespace::PreKeys`, key [`prekey_key`]: a prekey secret.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PreKeyRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) secret: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub(crate) created_ms: u64,
    /// Signed prekeys only: when a newer one replaced it (0 while current).
    #[prost(uint64, tag = "3")]
    pub(crate) replaced_ms: u64,
}

/// Which kind of prekey a [`PreKeyRecord`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreKeyKind {
    Signed = 1,
    OneTime = 2,
}

pub(crate) fn prekey_key(kind: PreKeyKind, id: u32) -> Vec<u8> {
    let mut k = vec![kind as u8];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn parse_prekey_key(key: &[u8]) -> Option<(PreKeyKind, u32)> {
    let (&kind, id) = key.split_first()?;
    let id = u32::from_be_bytes(id.try_into().ok()?);
    match kind {
        1 => Some((PreKeyKind::Signed, id)),
        2 => Some((PreKeyKind::OneTime, id)),
        _ => None,
    }
}

/// `Namespace::Contacts`, key: the account id.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ContactRecord {
    /// The identity key we trust for this contact.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) identity_key: Vec<u8>,
    /// A different identity key seen since, waiting for the user to accept it.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) changed_identity_key: Vec<u8>,
    /// The contact's delivery token (empty until known).
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) delivery_token: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub(crate) devices: Vec<ContactDevice>,
    /// Messages held under `changed_identity_key`, to bound what a change can store.
    #[prost(uint32, tag = "5")]
    pub(crate) held: u32,
    /// When the contact's device list was last checked with the relay (Unix ms).
    #[prost(uint64, tag = "6")]
    pub(crate) devices_checked_ms: u64,
    /// The version of the contact's verified device list we hold (0: none seen, a
    /// legacy contact whose bundles must be identity-signed).
    #[prost(uint64, tag = "7")]
    pub(crate) device_list_version: u64,
    /// That list, exactly the bytes its identity signed.
    #[prost(bytes = "vec", tag = "8")]
    pub(crate) device_list: Vec<u8>,
    /// The identity's signature over `device_list`.
    #[prost(bytes = "vec", tag = "9")]
    pub(crate) device_list_signature: Vec<u8>,
}

impl ContactRecord {
    pub(crate) fn blocked(&self) -> bool {
        !self.changed_identity_key.is_empty()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ContactDevice {
    #[prost(uint32, tag = "1")]
    pub(crate) device_id: u32,
    /// The device's identity agreement key: sealed envelopes are sealed to it.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) identity_dh: Vec<u8>,
}

/// `Namespace::Sessions` key: account id then device id.
pub(crate) fn session_key(account: &AccountId, device: DeviceId) -> Vec<u8> {
    let mut k = account.as_bytes().to_vec();
    k.extend_from_slice(&device.get().to_be_bytes());
    k
}

/// `Namespace::Outbox`, key: [`seq_key`]. A message on its way to a contact.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OutboxRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) message_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) recipient: Vec<u8>,
    /// The plaintext, kept until every device's copy is encrypted.
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) body: Vec<u8>,
    #[prost(uint64, tag = "4")]
    pub(crate) created_ms: u64,
    /// Encrypted once per recipient device, stored before it leaves the device so a
    /// retry resends the same ciphertext rather than reusing ratchet keys.
    #[prost(message, repeated, tag = "5")]
    pub(crate) copies: Vec<OutboxCopy>,
    /// Whether `copies` is complete.
    #[prost(bool, tag = "6")]
    pub(crate) prepared: bool,
    /// Encoded attachment pointers the message carries.
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub(crate) attachments: Vec<Vec<u8>>,
    /// An own-device sync message (an encoded `tern.e2e.v1.SyncMessage`) sent in
    /// place of `body`, to this account's other devices; empty for a message.
    #[prost(bytes = "vec", tag = "8")]
    pub(crate) sync: Vec<u8>,
    /// A request to be re-added to a group (an encoded `tern.e2e.v1.GroupRejoin`)
    /// sent in place of `body`; empty for a message.
    #[prost(bytes = "vec", tag = "9")]
    pub(crate) rejoin: Vec<u8>,
}

impl OutboxRecord {
    /// The client's own business (a sync or a rejoin request): no event for the app.
    pub(crate) fn is_control(&self) -> bool {
        !self.sync.is_empty() || !self.rejoin.is_empty()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct OutboxCopy {
    #[prost(uint32, tag = "1")]
    pub(crate) device_id: u32,
    /// An encoded `tern.e2e.v1.Content`.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) content: Vec<u8>,
    #[prost(bool, tag = "3")]
    pub(crate) sent: bool,
}

/// `Namespace::Inbox`, key: [`seq_key`]. A decrypted message the app has not
/// confirmed yet.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InboxRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) sender: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub(crate) sender_device: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) message_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) body: Vec<u8>,
    #[prost(uint64, tag = "5")]
    pub(crate) sent_at_ms: u64,
    #[prost(uint64, tag = "6")]
    pub(crate) received_at_ms: u64,
    /// Encoded attachment pointers.
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub(crate) attachments: Vec<Vec<u8>>,
    /// A message another device of this account sent: its recipient (empty for a
    /// message received).
    #[prost(bytes = "vec", tag = "8")]
    pub(crate) sent_to: Vec<u8>,
}

/// `Namespace::Held`, key: [`seq_key`]. A message from a contact whose identity key
/// changed, kept unread until the user accepts the new key.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HeldRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) sender: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub(crate) sender_device: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) message_id: Vec<u8>,
    /// The encoded `tern.e2e.v1.Content`, still ratchet-encrypted.
    #[prost(bytes = "vec", tag = "5")]
    pub(crate) content: Vec<u8>,
    /// A broadcast's shared body (still encrypted under the key the content
    /// carries), kept so the message opens once released. Empty: none.
    #[prost(bytes = "vec", tag = "6")]
    pub(crate) shared_body: Vec<u8>,
}

pub(crate) fn seq_key(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

pub(crate) fn parse_seq_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// `Namespace::Seen` key: sender account then message id; the value is the time of
/// receipt (big-endian ms), so old entries can be pruned.
pub(crate) fn seen_key(sender: &AccountId, message_id: &[u8]) -> Vec<u8> {
    let mut k = sender.as_bytes().to_vec();
    k.extend_from_slice(message_id);
    k
}

/// `Namespace::MlsState`, key: the MLS group id. A group's MLS state: the mls-rs
/// snapshot without its ratchet tree (that is `Namespace::MlsTree`), and the wrap
/// keys of the live epochs.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MlsStateRecord {
    /// The mls-rs snapshot (opaque; it holds the device's signing key).
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) snapshot: Vec<u8>,
    /// One more than the highest prior epoch stored in `Namespace::MlsEpoch` (0: none).
    #[prost(uint64, tag = "2")]
    pub(crate) epochs_end: u64,
    /// The envelope keys of the current epoch and up to 3 prior ones, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub(crate) wrap_keys: Vec<MlsWrapKey>,
}

/// The group-envelope tag and key of one epoch.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MlsWrapKey {
    #[prost(uint64, tag = "1")]
    pub(crate) epoch: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) tag: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) key: Vec<u8>,
}

/// `Namespace::MlsTag`, key: an envelope tag (16 bytes). Which group and epoch it is.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MlsTagRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) group_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub(crate) epoch: u64,
}

/// `Namespace::MlsEpoch` key: the group id then the epoch (big-endian); the value is
/// mls-rs's prior-epoch record as it gives it.
pub(crate) fn mls_epoch_key(group_id: &[u8], epoch: u64) -> Vec<u8> {
    let mut k = group_id.to_vec();
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}
