//! The client's state and every rule that changes it, free of network I/O: keys and
//! prekeys, contacts and their identity keys, sessions, the outbox and the inbox.
//!
//! Each change is written to the device store as one atomic batch (session, counters
//! and the record it produced together), so the store always holds a state some prefix
//! of the client's history left. The caller makes the batches durable (`flush`)
//! before anything leaves the device: a ciphertext before its session is stored could
//! reuse ratchet keys after a crash, and an acknowledgement before its message is
//! stored could lose it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use rand::rngs::OsRng;
use rand::RngCore;
use tern_proto::{e2e, AccountId, DeviceAddress, DeviceId, MessageId};
use zeroize::Zeroizing;

use super::records::*;
use super::{ReceivedMessage, SEEN_RETENTION_MS};
use crate::crypto::message::{self, PreKeyId};
use crate::crypto::sessions::SessionSet;
use crate::crypto::x3dh::{AgreementKeyPair, PreKeyBundle};
use crate::crypto::{padding, sealed, CryptoError};
use crate::identity::{DeviceKeyPair, IdentityKeyPair};
use crate::media::AttachmentPointer;
use crate::net::{Delivery, DeviceBundle, KeyUpload, SignedKey};
use crate::store::{KvStore, Namespace, Op, StoreError};
use crate::{Error, Result};

/// How often a contact's device list is checked with the relay while sending to it.
pub(crate) const DEVICE_CHECK_MS: u64 = 24 * 3600 * 1000;
/// Messages held at most per contact while an identity change waits for the user.
pub(crate) const MAX_HELD: u32 = 1000;
/// One-time prekeys generated per upload.
pub(crate) const PREKEY_BATCH: u32 = 100;
/// Below this many one-time prekeys on the relay, upload another batch.
pub(crate) const PREKEY_LOW: u32 = 25;
/// A signed prekey is replaced after this long...
pub(crate) const SIGNED_PREKEY_ROTATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// ...and its secret kept this long after, for prekey messages still in flight
/// (the relay keeps messages at most 30 days).
pub(crate) const SIGNED_PREKEY_GRACE_MS: u64 = 30 * 24 * 3600 * 1000;

/// The largest message body `send` accepts: what fits the largest padding bucket
/// with the plaintext's own fields.
pub const MAX_BODY: usize = padding::MAX_PLAINTEXT - 256;

/// This device's long-term keys, parsed from [`LocalRecord`].
pub(crate) struct Keys {
    pub(crate) identity: IdentityKeyPair,
    pub(crate) device: DeviceKeyPair,
    pub(crate) identity_dh: AgreementKeyPair,
    pub(crate) identity_dh_signature: [u8; 64],
    pub(crate) address: DeviceAddress,
    pub(crate) relay_signing_key: [u8; 32],
    pub(crate) delivery_token: [u8; 32],
}

/// What one received envelope came to.
pub(crate) enum Outcome {
    /// A new message, stored in the inbox.
    Message(ReceivedMessage),
    /// Already received: acknowledge and drop.
    Duplicate,
    /// From a contact whose identity key changed; held until the user accepts it.
    /// `first` when this is the first sign of the change.
    Held { contact: AccountId, first: bool },
    /// Could not be opened, verified or decrypted; acknowledged and dropped.
    Dropped(String),
}

/// Why a contact's sessions could not be started.
pub(crate) enum StartError {
    /// The relay handed out a different identity key than the one we trust.
    IdentityChanged { first: bool },
    /// The contact has no devices with keys.
    NoDevices,
    /// Something failed locally.
    Fatal(Error),
}

/// The client state behind one lock.
pub(crate) struct State {
    kv: Arc<dyn KvStore>,
    local: LocalRecord,
    pub(crate) keys: Keys,
    contacts: HashMap<AccountId, ContactRecord>,
    sessions: HashMap<(AccountId, DeviceId), SessionSet>,
    signed_prekeys: BTreeMap<u32, (AgreementKeyPair, PreKeyRecord)>,
    outbox: BTreeMap<u64, OutboxRecord>,
    /// Seen ids written since the last flush, for duplicates inside one batch.
    unflushed_seen: HashSet<Vec<u8>>,
    /// One-time prekeys consumed since the last check with the relay.
    pub(crate) consumed_prekeys: u32,
    certificates: sealed::CertificateCache,
}

fn store_err(e: StoreError) -> Error {
    Error::Store(e)
}

fn fixed32(b: &[u8]) -> Result<[u8; 32]> {
    b.try_into().map_err(|_| Error::Store(StoreError::Corrupt))
}

fn account_of(b: &[u8]) -> Result<AccountId> {
    AccountId::try_from(b).map_err(|_| Error::Store(StoreError::Corrupt))
}

/// 32 bytes from the OS's random source.
pub(crate) fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

impl Keys {
    fn from_local(local: &LocalRecord) -> Result<Keys> {
        let identity =
            IdentityKeyPair::from_secret(&Zeroizing::new(fixed32(&local.identity_secret)?));
        let identity_dh = AgreementKeyPair::from_secret(fixed32(&local.identity_dh_secret)?);
        let identity_dh_signature = identity.certify_agreement_key(&identity_dh.public());
        Ok(Keys {
            device: DeviceKeyPair::from_secret(&Zeroizing::new(fixed32(&local.device_secret)?)),
            identity,
            identity_dh,
            identity_dh_signature,
            address: DeviceAddress {
                account: account_of(&local.account_id)?,
                device: DeviceId::try_from(local.device_id)
                    .map_err(|_| Error::Store(StoreError::Corrupt))?,
            },
            relay_signing_key: fixed32(&local.relay_signing_key)?,
            delivery_token: fixed32(&local.delivery_token)?,
        })
    }
}

/// A freshly registered device's secrets, before they are stored.
pub(crate) struct NewDevice<'a> {
    pub(crate) relay: String,
    pub(crate) identity_secret: &'a [u8; 32],
    pub(crate) device_secret: &'a [u8; 32],
    pub(crate) identity_dh: &'a AgreementKeyPair,
    pub(crate) address: DeviceAddress,
    pub(crate) relay_signing_key: [u8; 32],
}

impl State {
    /// Stores a newly registered device with its first prekeys (not yet published).
    pub(crate) fn create(kv: Arc<dyn KvStore>, new: NewDevice<'_>, now_ms: u64) -> Result<State> {
        let local = LocalRecord {
            relay: new.relay,
            identity_secret: new.identity_secret.to_vec(),
            device_secret: new.device_secret.to_vec(),
            identity_dh_secret: new.identity_dh.secret_bytes().to_vec(),
            account_id: new.address.account.as_bytes().to_vec(),
            device_id: new.address.device.get(),
            relay_signing_key: new.relay_signing_key.to_vec(),
            delivery_token: random32().to_vec(),
            next_prekey_id: 1,
            signed_prekey_id: 0,
            next_inbox_seq: 1,
            next_outbox_seq: 1,
            keys_published: false,
            token_published: false,
            pending_delivery_token: Vec::new(),
        };
        let mut state = State::from_parts(kv, local)?;
        let mut ops = state.rotate_signed_prekey(now_ms).0;
        ops.extend(state.new_one_time_prekeys(PREKEY_BATCH, now_ms).0);
        ops.push(state.local_op());
        state.kv.apply(ops, true).map_err(store_err)?;
        Ok(state)
    }

    /// Loads a device from its store; `Ok(None)` if it holds no device.
    pub(crate) fn load(kv: Arc<dyn KvStore>, now_ms: u64) -> Result<Option<State>> {
        let Some(bytes) = kv.get(Namespace::Local, LOCAL_KEY).map_err(store_err)? else {
            return Ok(None);
        };
        let local =
            LocalRecord::decode(&bytes[..]).map_err(|_| Error::Store(StoreError::Corrupt))?;
        let mut state = State::from_parts(kv, local)?;
        let corrupt = |_| Error::Store(StoreError::Corrupt);
        for (k, v) in state.kv.scan(Namespace::Contacts).map_err(store_err)? {
            state.contacts.insert(
                account_of(&k)?,
                ContactRecord::decode(&v[..]).map_err(corrupt)?,
            );
        }
        for (k, v) in state.kv.scan(Namespace::PreKeys).map_err(store_err)? {
            if let Some((PreKeyKind::Signed, id)) = parse_prekey_key(&k) {
                let record = PreKeyRecord::decode(&v[..]).map_err(corrupt)?;
                let pair = AgreementKeyPair::from_secret(fixed32(&record.secret)?);
                state.signed_prekeys.insert(id, (pair, record));
            }
        }
        for (k, v) in state.kv.scan(Namespace::Outbox).map_err(store_err)? {
            let seq = parse_seq_key(&k).ok_or(Error::Store(StoreError::Corrupt))?;
            state
                .outbox
                .insert(seq, OutboxRecord::decode(&v[..]).map_err(corrupt)?);
        }
        // Duplicates older than the relay's longest retention cannot arrive any more.
        let mut prune = Vec::new();
        for (k, v) in state.kv.scan(Namespace::Seen).map_err(store_err)? {
            let at = <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if at + SEEN_RETENTION_MS < now_ms {
                prune.push(Op::Delete(Namespace::Seen, k));
            }
        }
        state.kv.apply(prune, false).map_err(store_err)?;
        Ok(Some(state))
    }

    fn from_parts(kv: Arc<dyn KvStore>, local: LocalRecord) -> Result<State> {
        Ok(State {
            keys: Keys::from_local(&local)?,
            kv,
            local,
            contacts: HashMap::new(),
            sessions: HashMap::new(),
            signed_prekeys: BTreeMap::new(),
            outbox: BTreeMap::new(),
            unflushed_seen: HashSet::new(),
            consumed_prekeys: 0,
            certificates: sealed::CertificateCache::default(),
        })
    }

    pub(crate) fn relay(&self) -> &str {
        &self.local.relay
    }

    fn local_op(&self) -> Op {
        Op::Put(
            Namespace::Local,
            LOCAL_KEY.to_vec(),
            self.local.encode_to_vec(),
        )
    }

    fn apply(&mut self, ops: Vec<Op>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.kv.apply(ops, false).map_err(store_err)
    }

    /// Makes every change so far durable.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.kv.apply(Vec::new(), true).map_err(store_err)?;
        self.unflushed_seen.clear();
        Ok(())
    }

    // ----- prekeys -----

    fn next_prekey_id(&mut self) -> u32 {
        let id = self.local.next_prekey_id;
        self.local.next_prekey_id = id.wrapping_add(1).max(1);
        id
    }

    /// A fresh prekey: its id, key pair, and the op that stores its secret.
    fn new_prekey(
        &mut self,
        kind: PreKeyKind,
        now_ms: u64,
    ) -> (u32, AgreementKeyPair, PreKeyRecord, Op) {
        let id = self.next_prekey_id();
        let pair = AgreementKeyPair::generate(&mut OsRng);
        let record = PreKeyRecord {
            secret: pair.secret_bytes().to_vec(),
            created_ms: now_ms,
            replaced_ms: 0,
        };
        let op = Op::Put(
            Namespace::PreKeys,
            prekey_key(kind, id),
            record.encode_to_vec(),
        );
        (id, pair, record, op)
    }

    /// A new signed prekey becomes current; the previous one stays for the grace period.
    fn rotate_signed_prekey(&mut self, now_ms: u64) -> (Vec<Op>, SignedKey) {
        let mut ops = Vec::new();
        if let Some((_, old)) = self.signed_prekeys.get_mut(&self.local.signed_prekey_id) {
            old.replaced_ms = now_ms;
            ops.push(Op::Put(
                Namespace::PreKeys,
                prekey_key(PreKeyKind::Signed, self.local.signed_prekey_id),
                old.encode_to_vec(),
            ));
        }
        let (id, pair, record, op) = self.new_prekey(PreKeyKind::Signed, now_ms);
        ops.push(op);
        let signed = SignedKey {
            id,
            key: pair.public(),
            signature: self.keys.identity.certify_signed_prekey(id, &pair.public()),
        };
        self.signed_prekeys.insert(id, (pair, record));
        self.local.signed_prekey_id = id;
        ops.push(self.local_op());
        (ops, signed)
    }

    fn new_one_time_prekeys(&mut self, n: u32, now_ms: u64) -> (Vec<Op>, Vec<(u32, [u8; 32])>) {
        let mut ops = Vec::with_capacity(n as usize + 1);
        let mut public = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (id, pair, _, op) = self.new_prekey(PreKeyKind::OneTime, now_ms);
            ops.push(op);
            public.push((id, pair.public()));
        }
        ops.push(self.local_op());
        (ops, public)
    }

    fn current_signed_prekey(&self) -> Option<SignedKey> {
        let id = self.local.signed_prekey_id;
        self.signed_prekeys.get(&id).map(|(pair, _)| SignedKey {
            id,
            key: pair.public(),
            signature: self.keys.identity.certify_signed_prekey(id, &pair.public()),
        })
    }

    /// Everything the relay should hold that it may not: the whole set after
    /// registering, a new signed prekey when the current one is due, more one-time
    /// prekeys when `relay_count` is low. Stored (durably) before it is returned, so
    /// the relay never hands out a key whose secret we lost. `None`: nothing to do.
    pub(crate) fn key_upload(
        &mut self,
        relay_count: Option<u32>,
        now_ms: u64,
    ) -> Result<Option<KeyUpload>> {
        let mut ops = Vec::new();
        let mut upload = KeyUpload::default();
        if !self.local.keys_published {
            upload.identity_dh = Some(SignedKey {
                id: 0,
                key: self.keys.identity_dh.public(),
                signature: self.keys.identity_dh_signature,
            });
            upload.signed_prekey = self.current_signed_prekey();
            upload.one_time = self.one_time_publics()?;
        }
        let due = self
            .signed_prekeys
            .get(&self.local.signed_prekey_id)
            .is_none_or(|(_, r)| r.created_ms + SIGNED_PREKEY_ROTATION_MS <= now_ms);
        if due {
            let (o, signed) = self.rotate_signed_prekey(now_ms);
            ops.extend(o);
            upload.signed_prekey = Some(signed);
        }
        if relay_count.is_some_and(|c| c < PREKEY_LOW) {
            let (o, keys) = self.new_one_time_prekeys(PREKEY_BATCH, now_ms);
            ops.extend(o);
            upload.one_time.extend(keys);
        }
        // Signed prekeys past their grace period go.
        let expired: Vec<u32> = self
            .signed_prekeys
            .iter()
            .filter(|(_, (_, r))| {
                r.replaced_ms != 0 && r.replaced_ms + SIGNED_PREKEY_GRACE_MS < now_ms
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.signed_prekeys.remove(&id);
            ops.push(Op::Delete(
                Namespace::PreKeys,
                prekey_key(PreKeyKind::Signed, id),
            ));
        }
        if !ops.is_empty() {
            self.kv.apply(ops, true).map_err(store_err)?;
        }
        let nothing = upload.identity_dh.is_none()
            && upload.signed_prekey.is_none()
            && upload.one_time.is_empty();
        Ok((!nothing).then_some(upload))
    }

    fn one_time_publics(&self) -> Result<Vec<(u32, [u8; 32])>> {
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(Namespace::PreKeys).map_err(store_err)? {
            if let Some((PreKeyKind::OneTime, id)) = parse_prekey_key(&k) {
                let record =
                    PreKeyRecord::decode(&v[..]).map_err(|_| Error::Store(StoreError::Corrupt))?;
                out.push((
                    id,
                    AgreementKeyPair::from_secret(fixed32(&record.secret)?).public(),
                ));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Records that the relay holds everything [`State::key_upload`] returned.
    pub(crate) fn keys_published(&mut self) -> Result<()> {
        if !self.local.keys_published {
            self.local.keys_published = true;
            let op = self.local_op();
            self.kv.apply(vec![op], true).map_err(store_err)?;
        }
        Ok(())
    }

    /// A delivery token the relay does not have yet: ours after registering, or a
    /// rotated one.
    pub(crate) fn unpublished_token(&self) -> Option<[u8; 32]> {
        if !self.local.token_published {
            return Some(self.keys.delivery_token);
        }
        self.local.pending_delivery_token[..].try_into().ok()
    }

    /// Records that the relay has `token`; a rotated token takes over from here.
    pub(crate) fn token_published(&mut self, token: &[u8; 32]) -> Result<()> {
        let mut local = self.local.clone();
        if self.keys.delivery_token == *token {
            local.token_published = true;
        } else if local.pending_delivery_token == token {
            local.delivery_token = token.to_vec();
            local.pending_delivery_token.clear();
            local.token_published = true;
        } else {
            return Ok(());
        }
        let op = Op::Put(Namespace::Local, LOCAL_KEY.to_vec(), local.encode_to_vec());
        self.kv.apply(vec![op], true).map_err(store_err)?;
        self.local = local;
        self.keys.delivery_token = *token;
        Ok(())
    }

    /// A new delivery token: once the relay has it, contacts holding the old one can no
    /// longer send sealed and fall back to identified sends until a message from us
    /// brings the new one.
    pub(crate) fn rotate_delivery_token(&mut self) -> Result<()> {
        let mut local = self.local.clone();
        local.pending_delivery_token = random32().to_vec();
        let op = Op::Put(Namespace::Local, LOCAL_KEY.to_vec(), local.encode_to_vec());
        self.kv.apply(vec![op], true).map_err(store_err)?;
        self.local = local;
        Ok(())
    }

    // ----- contacts -----

    pub(crate) fn contact(&self, account: &AccountId) -> Option<&ContactRecord> {
        self.contacts.get(account)
    }

    fn put_contact(&mut self, account: AccountId, record: ContactRecord) -> Op {
        let op = Op::Put(
            Namespace::Contacts,
            account.as_bytes().to_vec(),
            record.encode_to_vec(),
        );
        self.contacts.insert(account, record);
        op
    }

    /// Adds a contact from a card the user trusts (scanned or received out of band).
    /// A card with a different identity key than the one already trusted is
    /// surfaced as a change, exactly like one seen on the network.
    pub(crate) fn add_contact(
        &mut self,
        account: AccountId,
        identity_key: [u8; 32],
        delivery_token: [u8; 32],
    ) -> Result<bool> {
        let mut record = self.contacts.get(&account).cloned().unwrap_or_default();
        let mut changed = false;
        if record.identity_key.is_empty() {
            record.identity_key = identity_key.to_vec();
        } else if record.identity_key != identity_key {
            changed = record.changed_identity_key.is_empty();
            record.changed_identity_key = identity_key.to_vec();
        }
        record.delivery_token = delivery_token.to_vec();
        let op = self.put_contact(account, record);
        self.apply(vec![op])?;
        self.flush()?;
        Ok(changed)
    }

    /// Accepts a contact's changed identity key, if it is still `key` (the one the
    /// user compared): old sessions go and unsent messages will be encrypted again
    /// for new sessions. Held messages are then taken with [`State::held`].
    pub(crate) fn accept_identity(&mut self, account: &AccountId, key: &[u8; 32]) -> Result<bool> {
        let Some(mut record) = self.contacts.get(account).cloned() else {
            return Ok(false);
        };
        if record.changed_identity_key != key {
            return Ok(false);
        }
        let mut ops = Vec::new();
        record.identity_key = std::mem::take(&mut record.changed_identity_key);
        record.held = 0;
        let outbox = self.unprepared_outbox(account, |c| c.sent, &mut ops);
        let devices = std::mem::take(&mut record.devices);
        for d in &devices {
            if let Ok(device) = DeviceId::try_from(d.device_id) {
                ops.push(Op::Delete(
                    Namespace::Sessions,
                    session_key(account, device),
                ));
            }
        }
        ops.push(Op::Put(
            Namespace::Contacts,
            account.as_bytes().to_vec(),
            record.encode_to_vec(),
        ));
        self.kv.apply(ops, true).map_err(store_err)?;
        // The caches follow only once the store has the change.
        for d in &devices {
            if let Ok(device) = DeviceId::try_from(d.device_id) {
                self.sessions.remove(&(*account, device));
            }
        }
        self.outbox.extend(outbox);
        self.contacts.insert(*account, record);
        Ok(true)
    }

    /// Messages held for `account` under the identity key now trusted, oldest first,
    /// each with its record key (pass it to [`State::accept`] to delete it with the
    /// message's own write). Held messages under any other key are deleted.
    pub(crate) fn held(&mut self, account: &AccountId) -> Result<Vec<(Vec<u8>, HeldRecord)>> {
        let Some(trusted) = self.contacts.get(account).map(|c| c.identity_key.clone()) else {
            return Ok(Vec::new());
        };
        let mut held = Vec::new();
        let mut stale = Vec::new();
        for (k, v) in self.kv.scan(Namespace::Held).map_err(store_err)? {
            let record =
                HeldRecord::decode(&v[..]).map_err(|_| Error::Store(StoreError::Corrupt))?;
            if record.sender != account.as_bytes() {
                continue;
            }
            if record.identity_key == trusted {
                held.push((k, record));
            } else {
                stale.push(Op::Delete(Namespace::Held, k));
            }
        }
        self.kv.apply(stale, false).map_err(store_err)?;
        held.sort_by_key(|(k, _)| parse_seq_key(k).unwrap_or(0));
        Ok(held)
    }

    /// Decrypts the messages held for `account` under the key now trusted, each
    /// held record deleted in the same write as the message it becomes; one flush at
    /// the end. Returns what each came to, oldest first.
    pub(crate) fn release_held(
        &mut self,
        account: &AccountId,
        now_ms: u64,
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for (record_key, h) in self.held(account)? {
            let (Ok(device), Ok(identity_key)) = (
                DeviceId::try_from(h.sender_device),
                <[u8; 32]>::try_from(&h.identity_key[..]),
            ) else {
                continue;
            };
            let mut delete = vec![Op::Delete(Namespace::Held, record_key)];
            let outcome = self.accept(
                *account,
                device,
                identity_key,
                &h.message_id,
                &h.content,
                now_ms,
                &mut delete,
            )?;
            // The held record went with the message's own write, or goes alone.
            self.apply(delete)?;
            outcomes.push(outcome);
        }
        self.flush()?;
        Ok(outcomes)
    }

    fn session(&mut self, account: &AccountId, device: DeviceId) -> Result<&mut SessionSet> {
        let key = (*account, device);
        if !self.sessions.contains_key(&key) {
            let set = match self
                .kv
                .get(Namespace::Sessions, &session_key(account, device))
                .map_err(store_err)?
            {
                Some(bytes) => SessionSet::from_bytes(&bytes).map_err(Error::Crypto)?,
                None => SessionSet::default(),
            };
            self.sessions.insert(key, set);
        }
        self.sessions
            .get_mut(&key)
            .ok_or(Error::Store(StoreError::Corrupt))
    }

    fn session_op(&mut self, account: &AccountId, device: DeviceId) -> Result<Op> {
        let bytes = self.session(account, device)?.to_bytes();
        Ok(Op::Put(
            Namespace::Sessions,
            session_key(account, device),
            bytes.to_vec(),
        ))
    }

    /// Whether sending to `account` needs its devices' bundles first. (A device is
    /// listed only once it has a session, so an empty list means none yet.)
    pub(crate) fn needs_bundles(&mut self, account: &AccountId) -> Result<bool> {
        Ok(self
            .contacts
            .get(account)
            .is_none_or(|c| c.devices.is_empty()))
    }

    /// Starts sessions with every device in `bundles` that has none yet.
    pub(crate) fn start_sessions(
        &mut self,
        account: AccountId,
        bundles: &[DeviceBundle],
    ) -> Result<(), StartError> {
        let Some(first) = bundles.first() else {
            return Err(StartError::NoDevices);
        };
        let mut record = self.contacts.get(&account).cloned().unwrap_or_default();
        if record.identity_key.is_empty() {
            record.identity_key = first.identity_key.to_vec();
        }
        if let Some(other) = bundles
            .iter()
            .find(|b| record.identity_key != b.identity_key)
        {
            let first = record.changed_identity_key.is_empty();
            record.changed_identity_key = other.identity_key.to_vec();
            let op = self.put_contact(account, record);
            self.apply(vec![op]).map_err(StartError::Fatal)?;
            return Err(StartError::IdentityChanged { first });
        }
        let mut ops = Vec::new();
        let (our_id, our_dh) = (self.keys.identity.public(), self.keys.identity_dh.clone());
        for b in bundles {
            let bundle = PreKeyBundle {
                identity_key: b.identity_key,
                identity_dh: b.identity_dh.key,
                identity_dh_signature: b.identity_dh.signature,
                signed_prekey_id: b.signed_prekey.id,
                signed_prekey: b.signed_prekey.key,
                signed_prekey_signature: b.signed_prekey.signature,
                one_time_prekey: b.one_time_prekey,
            };
            let set = self
                .session(&account, b.device)
                .map_err(StartError::Fatal)?;
            if set.has_session() {
                continue;
            }
            // A bundle that does not verify is skipped, not fatal: other devices work.
            let started = bundle
                .verify()
                .and_then(|bundle| set.initiate(&mut OsRng, &our_id, &our_dh, &bundle));
            if started.is_err() {
                tracing::warn!("a contact device's prekey bundle failed verification; skipped");
                continue;
            }
            ops.push(
                self.session_op(&account, b.device)
                    .map_err(StartError::Fatal)?,
            );
            record.devices.retain(|d| d.device_id != b.device.get());
            record.devices.push(ContactDevice {
                device_id: b.device.get(),
                identity_dh: b.identity_dh.key.to_vec(),
            });
        }
        if record.devices.is_empty() {
            return Err(StartError::NoDevices);
        }
        ops.push(self.put_contact(account, record));
        self.apply(ops).map_err(StartError::Fatal)
    }

    // ----- outbox -----

    /// Queues `body` for `recipient`: stored before this returns.
    pub(crate) fn enqueue(
        &mut self,
        recipient: &AccountId,
        body: &[u8],
        attachments: &[AttachmentPointer],
        now_ms: u64,
    ) -> Result<MessageId> {
        let attachments: Vec<Vec<u8>> = attachments
            .iter()
            .map(AttachmentPointer::to_bytes)
            .collect();
        let size = body.len() + attachments.iter().map(|a| a.len() + 4).sum::<usize>();
        if size > MAX_BODY {
            return Err(Error::TooLarge { max: MAX_BODY });
        }
        if self
            .contacts
            .get(recipient)
            .is_some_and(ContactRecord::blocked)
        {
            return Err(Error::UntrustedIdentity);
        }
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let seq = self.local.next_outbox_seq;
        self.local.next_outbox_seq += 1;
        let record = OutboxRecord {
            message_id: id.to_vec(),
            recipient: recipient.as_bytes().to_vec(),
            body: body.to_vec(),
            created_ms: now_ms,
            copies: Vec::new(),
            prepared: false,
            attachments,
        };
        let ops = vec![
            Op::Put(Namespace::Outbox, seq_key(seq), record.encode_to_vec()),
            self.local_op(),
        ];
        self.apply(ops)?;
        self.outbox.insert(seq, record);
        // With sessions already there, encrypt now: the message and its session
        // state then share one durable write instead of one each. Otherwise (or if
        // this fails) the worker prepares it and reports what goes wrong.
        let known = self
            .contacts
            .get(recipient)
            .is_some_and(|c| !c.devices.is_empty());
        if known {
            let _ = self.prepare(seq, now_ms);
        }
        self.flush()?;
        Ok(MessageId(id))
    }

    pub(crate) fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The outbox, oldest first.
    pub(crate) fn outbox(&self) -> impl Iterator<Item = (&u64, &OutboxRecord)> {
        self.outbox.iter()
    }

    /// Encrypts message `seq` for every device of its recipient that has no copy.
    pub(crate) fn prepare(&mut self, seq: u64, now_ms: u64) -> Result<()> {
        let Some(mut record) = self.outbox.get(&seq).cloned() else {
            return Ok(());
        };
        if record.prepared {
            return Ok(());
        }
        let recipient = account_of(&record.recipient)?;
        let devices: Vec<u32> = self
            .contacts
            .get(&recipient)
            .map(|c| c.devices.iter().map(|d| d.device_id).collect())
            .unwrap_or_default();
        if devices.is_empty() {
            // Not prepared: the next round fetches the contact's devices first.
            return Ok(());
        }
        let padded = message::pad_plaintext(&e2e::Plaintext {
            body: record.body.clone().into(),
            delivery_token: self.keys.delivery_token.to_vec().into(),
            sent_at_ms: now_ms,
            sender_account: self.keys.address.account.as_bytes().to_vec().into(),
            sender_device: self.keys.address.device.get(),
            attachments: record
                .attachments
                .iter()
                .map(|a| e2e::AttachmentPointer::decode(&a[..]))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::Store(StoreError::Corrupt))?,
        })
        .ok_or(Error::TooLarge { max: MAX_BODY })?;
        let mut ops = Vec::new();
        let identity_dh_signature = self.keys.identity_dh_signature;
        for d in devices {
            if record.copies.iter().any(|c| c.device_id == d) {
                continue;
            }
            let device = DeviceId::try_from(d).map_err(|_| Error::Store(StoreError::Corrupt))?;
            let content = message::encrypt(
                self.session(&recipient, device)?,
                &identity_dh_signature,
                &padded,
            )?;
            record.copies.push(OutboxCopy {
                device_id: d,
                content,
                sent: false,
            });
            ops.push(self.session_op(&recipient, device)?);
        }
        record.prepared = true;
        ops.push(Op::Put(
            Namespace::Outbox,
            seq_key(seq),
            record.encode_to_vec(),
        ));
        self.apply(ops)?;
        self.outbox.insert(seq, record);
        Ok(())
    }

    /// Marks copies sent; returns the message id once every copy is.
    pub(crate) fn mark_sent(
        &mut self,
        seq: u64,
        devices: &[u32],
    ) -> Result<Option<(MessageId, AccountId)>> {
        let Some(record) = self.outbox.get_mut(&seq) else {
            return Ok(None);
        };
        for c in record.copies.iter_mut() {
            if devices.contains(&c.device_id) {
                c.sent = true;
            }
        }
        if record.prepared && record.copies.iter().all(|c| c.sent) {
            let done = self
                .outbox
                .remove(&seq)
                .ok_or(Error::Store(StoreError::Corrupt))?;
            self.apply(vec![Op::Delete(Namespace::Outbox, seq_key(seq))])?;
            let id = <[u8; 16]>::try_from(&done.message_id[..])
                .map_err(|_| Error::Store(StoreError::Corrupt))?;
            return Ok(Some((MessageId(id), account_of(&done.recipient)?)));
        }
        let op = Op::Put(Namespace::Outbox, seq_key(seq), record.encode_to_vec());
        self.apply(vec![op])?;
        Ok(None)
    }

    /// Gives up on a message (the recipient does not exist, say).
    pub(crate) fn fail(&mut self, seq: u64) -> Result<Option<MessageId>> {
        let Some(record) = self.outbox.remove(&seq) else {
            return Ok(None);
        };
        self.apply(vec![Op::Delete(Namespace::Outbox, seq_key(seq))])?;
        Ok(<[u8; 16]>::try_from(&record.message_id[..])
            .ok()
            .map(MessageId))
    }

    /// Forgets a contact's delivery token the relay no longer accepts.
    pub(crate) fn drop_token(&mut self, account: &AccountId) -> Result<()> {
        if let Some(mut record) = self.contacts.get(account).cloned() {
            record.delivery_token.clear();
            let op = self.put_contact(*account, record);
            self.apply(vec![op])?;
        }
        Ok(())
    }

    /// Drops a contact device the relay no longer knows.
    pub(crate) fn drop_device(&mut self, account: &AccountId, device: u32) -> Result<()> {
        let mut ops = Vec::new();
        let mut contact = self.contacts.get(account).cloned();
        if let Some(record) = contact.as_mut() {
            record.devices.retain(|d| d.device_id != device);
            ops.push(Op::Put(
                Namespace::Contacts,
                account.as_bytes().to_vec(),
                record.encode_to_vec(),
            ));
        }
        // Its copies are moot; the messages wait for the contact's other devices (or
        // fail if it has none left).
        let outbox = self.unprepared_outbox(account, |c| c.device_id != device, &mut ops);
        self.apply(ops)?;
        if let Some(record) = contact {
            self.contacts.insert(*account, record);
        }
        self.outbox.extend(outbox);
        Ok(())
    }

    /// `account`'s outbox records with only the copies `keep` keeps, marked for
    /// preparing again; their writes go to `ops`, the caller updates the cache.
    fn unprepared_outbox(
        &self,
        account: &AccountId,
        keep: impl Fn(&OutboxCopy) -> bool,
        ops: &mut Vec<Op>,
    ) -> Vec<(u64, OutboxRecord)> {
        let mut outbox = Vec::new();
        for (seq, out) in &self.outbox {
            if out.recipient == account.as_bytes() {
                let mut out = out.clone();
                out.copies.retain(&keep);
                out.prepared = false;
                ops.push(Op::Put(
                    Namespace::Outbox,
                    seq_key(*seq),
                    out.encode_to_vec(),
                ));
                outbox.push((*seq, out));
            }
        }
        outbox
    }

    /// The contact's delivery token, if its device list is due a check with the relay
    /// (daily, and only for contacts we can ask anonymously).
    pub(crate) fn devices_due(&self, account: &AccountId, now_ms: u64) -> Option<[u8; 32]> {
        let c = self.contacts.get(account)?;
        if c.blocked() || c.devices.is_empty() {
            return None;
        }
        if now_ms.saturating_sub(c.devices_checked_ms) < DEVICE_CHECK_MS {
            return None;
        }
        c.delivery_token[..].try_into().ok()
    }

    /// Applies the relay's list of a contact's devices: devices gone are dropped
    /// (their unsent copies with them); returns the ids we have no session with yet.
    /// The check is recorded either way.
    pub(crate) fn update_devices(
        &mut self,
        account: &AccountId,
        ids: &[u32],
        now_ms: u64,
    ) -> Result<Vec<u32>> {
        let Some(mut record) = self.contacts.get(account).cloned() else {
            return Ok(Vec::new());
        };
        record.devices_checked_ms = now_ms;
        let gone: Vec<u32> = record
            .devices
            .iter()
            .map(|d| d.device_id)
            .filter(|d| !ids.contains(d))
            .collect();
        let new: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|d| !record.devices.iter().any(|k| k.device_id == *d))
            .collect();
        record.devices.retain(|d| ids.contains(&d.device_id));
        let mut ops = vec![Op::Put(
            Namespace::Contacts,
            account.as_bytes().to_vec(),
            record.encode_to_vec(),
        )];
        let outbox = if gone.is_empty() {
            Vec::new()
        } else {
            self.unprepared_outbox(account, |c| !gone.contains(&c.device_id), &mut ops)
        };
        self.apply(ops)?;
        self.contacts.insert(*account, record);
        self.outbox.extend(outbox);
        Ok(new)
    }

    /// After sessions with new devices started: unsent messages to `account` get
    /// copies for them too.
    pub(crate) fn reprepare(&mut self, account: &AccountId) -> Result<()> {
        let mut ops = Vec::new();
        let outbox = self.unprepared_outbox(account, |_| true, &mut ops);
        self.apply(ops)?;
        self.outbox.extend(outbox);
        Ok(())
    }

    /// Reloads everything from the store: after a failed write, the caches may be
    /// ahead of what the store holds.
    pub(crate) fn reload(&mut self, now_ms: u64) -> Result<()> {
        let fresh = State::load(self.kv.clone(), now_ms)?.ok_or(Error::NotRegistered)?;
        *self = fresh;
        Ok(())
    }

    // ----- inbox -----

    /// Opens, checks and decrypts one delivery, storing the result (not durably). An
    /// `Err` is a local failure: the delivery must not be acknowledged.
    pub(crate) fn receive(&mut self, delivery: &Delivery, now_ms: u64) -> Result<Outcome> {
        let (cert, content) = match sealed::open(&self.keys.identity_dh, &delivery.payload) {
            Ok(opened) => opened,
            Err(e) => return Ok(Outcome::Dropped(format!("sealed envelope: {e}"))),
        };
        // The certificate must have been valid when the relay accepted the message, so
        // a device that was offline for a day still reads what was sent meanwhile.
        let checked_at = match delivery.accepted_at_ms {
            0 => now_ms,
            at => at,
        };
        if let Err(e) = self
            .certificates
            .validate(&cert, &self.keys.relay_signing_key, checked_at)
        {
            return Ok(Outcome::Dropped(format!("sender certificate: {e}")));
        }
        self.accept(
            cert.account,
            cert.device,
            cert.identity_key,
            delivery.message_id.as_bytes(),
            &content,
            now_ms,
            &mut Vec::new(),
        )
    }

    /// A message whose sender the certificate established: duplicate check, identity
    /// check, decryption, then the inbox. `extra` joins whatever batch this writes
    /// (and is left for the caller if it writes none).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept(
        &mut self,
        sender: AccountId,
        device: DeviceId,
        identity_key: [u8; 32],
        message_id: &[u8],
        content: &[u8],
        now_ms: u64,
        extra: &mut Vec<Op>,
    ) -> Result<Outcome> {
        let seen = seen_key(&sender, message_id);
        if self.unflushed_seen.contains(&seen)
            || self
                .kv
                .get(Namespace::Seen, &seen)
                .map_err(store_err)?
                .is_some()
        {
            return Ok(Outcome::Duplicate);
        }
        let mut contact = self.contacts.get(&sender).cloned().unwrap_or_default();
        if contact.identity_key.is_empty() {
            // First contact: trust on first use; the safety number lets users check.
            contact.identity_key = identity_key.to_vec();
        } else if contact.identity_key != identity_key {
            let held = HeldRecord {
                sender: sender.as_bytes().to_vec(),
                sender_device: device.get(),
                identity_key: identity_key.to_vec(),
                message_id: message_id.to_vec(),
                content: content.to_vec(),
            };
            return self.hold(held, contact, extra);
        }
        let set = self.session(&sender, device)?.clone();
        let (set, opened) = match self.decrypt_with(set, &identity_key, content)? {
            Ok(done) => done,
            Err(e) => return Ok(Outcome::Dropped(format!("decryption: {e}"))),
        };
        let plaintext = opened.plaintext;
        if plaintext.sender_account != sender.as_bytes()[..]
            || plaintext.sender_device != device.get()
        {
            return Ok(Outcome::Dropped(
                "the sender inside the message differs from its certificate".into(),
            ));
        }
        if plaintext.delivery_token.len() == 32 {
            contact.delivery_token = plaintext.delivery_token.to_vec();
        }
        if let Some(dh) = opened.sender_identity_dh {
            contact.devices.retain(|d| d.device_id != device.get());
            contact.devices.push(ContactDevice {
                device_id: device.get(),
                identity_dh: dh.to_vec(),
            });
        }
        let mut local = self.local.clone();
        let seq = local.next_inbox_seq;
        local.next_inbox_seq += 1;
        let inbox = InboxRecord {
            sender: sender.as_bytes().to_vec(),
            sender_device: device.get(),
            message_id: message_id.to_vec(),
            body: plaintext.body.to_vec(),
            sent_at_ms: plaintext.sent_at_ms,
            received_at_ms: now_ms,
            attachments: plaintext
                .attachments
                .iter()
                .map(Message::encode_to_vec)
                .collect(),
        };
        let mut ops = vec![
            Op::Put(
                Namespace::Sessions,
                session_key(&sender, device),
                set.to_bytes().to_vec(),
            ),
            Op::Put(Namespace::Inbox, seq_key(seq), inbox.encode_to_vec()),
            Op::Put(Namespace::Seen, seen.clone(), now_ms.to_be_bytes().to_vec()),
            Op::Put(Namespace::Local, LOCAL_KEY.to_vec(), local.encode_to_vec()),
        ];
        // Most messages change nothing about their sender: no contact write then.
        if self.contacts.get(&sender) != Some(&contact) {
            ops.push(Op::Put(
                Namespace::Contacts,
                sender.as_bytes().to_vec(),
                contact.encode_to_vec(),
            ));
        }
        if let Some(id) = opened.one_time_prekey {
            ops.push(Op::Delete(
                Namespace::PreKeys,
                prekey_key(PreKeyKind::OneTime, id),
            ));
        }
        ops.append(extra);
        self.apply(ops)?;
        // The caches follow only once the store has the change.
        self.sessions.insert((sender, device), set);
        self.contacts.insert(sender, contact);
        self.local = local;
        self.unflushed_seen.insert(seen);
        if opened.one_time_prekey.is_some() {
            self.consumed_prekeys += 1;
        }
        Ok(Outcome::Message(ReceivedMessage::from_record(seq, &inbox)?))
    }

    /// A message under an identity key other than the trusted one. Only a message
    /// that proves the new key can raise a change: a prekey message under it that
    /// decrypts in a fresh session, which takes the new key's secrets. Anything else
    /// is dropped, so someone replaying another user's old certificate cannot block
    /// that user. Held messages are kept encrypted, unread, until the user accepts.
    fn hold(
        &mut self,
        held: HeldRecord,
        mut contact: ContactRecord,
        extra: &mut Vec<Op>,
    ) -> Result<Outcome> {
        let key: [u8; 32] = held.identity_key[..]
            .try_into()
            .map_err(|_| Error::Store(StoreError::Corrupt))?;
        if let Err(e) = self.decrypt_with(SessionSet::default(), &key, &held.content)? {
            return Ok(Outcome::Dropped(format!(
                "a message under an identity key it does not prove: {e}"
            )));
        }
        let first = contact.changed_identity_key != key;
        if first {
            contact.changed_identity_key = key.to_vec();
            contact.held = 0;
        }
        if contact.held >= MAX_HELD {
            return Ok(Outcome::Dropped(
                "too many messages held for a changed identity key".into(),
            ));
        }
        contact.held += 1;
        let sender =
            AccountId::try_from(&held.sender[..]).map_err(|_| Error::Store(StoreError::Corrupt))?;
        let mut local = self.local.clone();
        let seq = local.next_inbox_seq;
        local.next_inbox_seq += 1;
        let mut ops = vec![
            Op::Put(Namespace::Held, seq_key(seq), held.encode_to_vec()),
            Op::Put(Namespace::Local, LOCAL_KEY.to_vec(), local.encode_to_vec()),
            Op::Put(
                Namespace::Contacts,
                sender.as_bytes().to_vec(),
                contact.encode_to_vec(),
            ),
        ];
        ops.append(extra);
        self.apply(ops)?;
        self.local = local;
        self.contacts.insert(sender, contact);
        Ok(Outcome::Held {
            contact: sender,
            first,
        })
    }

    /// Decrypts `content` in `set`, a copy the caller keeps only on success. The
    /// outer error is a local storage failure (nothing may be acknowledged); the
    /// inner one means the message does not decrypt.
    fn decrypt_with(
        &self,
        mut set: SessionSet,
        identity_key: &[u8; 32],
        content: &[u8],
    ) -> Result<std::result::Result<(SessionSet, message::Decrypted), CryptoError>> {
        let mut store_error = None;
        let result = {
            let (kv, signed) = (&self.kv, &self.signed_prekeys);
            let mut prekeys = |id: PreKeyId| -> Option<AgreementKeyPair> {
                match id {
                    PreKeyId::Signed(id) => signed.get(&id).map(|(pair, _)| pair.clone()),
                    PreKeyId::OneTime(id) => {
                        let key = prekey_key(PreKeyKind::OneTime, id);
                        let bytes = match kv.get(Namespace::PreKeys, &key) {
                            Ok(b) => b?,
                            Err(e) => {
                                store_error = Some(e);
                                return None;
                            }
                        };
                        let record = PreKeyRecord::decode(&bytes[..]).ok()?;
                        Some(AgreementKeyPair::from_secret(
                            record.secret[..].try_into().ok()?,
                        ))
                    }
                }
            };
            message::decrypt(
                &mut OsRng,
                &mut set,
                (&self.keys.identity.public(), &self.keys.identity_dh),
                identity_key,
                &mut prekeys,
                content,
            )
        };
        if let Some(e) = store_error {
            return Err(store_err(e));
        }
        Ok(result.map(|d| (set, d)))
    }

    /// The app has the message: it leaves the inbox.
    pub(crate) fn confirm(&mut self, seq: u64) -> Result<()> {
        self.kv
            .apply(vec![Op::Delete(Namespace::Inbox, seq_key(seq))], true)
            .map_err(store_err)
    }

    /// Messages received but not yet confirmed by the app, oldest first.
    pub(crate) fn unconfirmed(&self) -> Result<Vec<ReceivedMessage>> {
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(Namespace::Inbox).map_err(store_err)? {
            let seq = parse_seq_key(&k).ok_or(Error::Store(StoreError::Corrupt))?;
            let record =
                InboxRecord::decode(&v[..]).map_err(|_| Error::Store(StoreError::Corrupt))?;
            out.push(ReceivedMessage::from_record(seq, &record)?);
        }
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }

    /// The sealed-sender recipient key of a contact device.
    pub(crate) fn device_identity_dh(&self, account: &AccountId, device: u32) -> Option<[u8; 32]> {
        self.contacts
            .get(account)?
            .devices
            .iter()
            .find(|d| d.device_id == device)
            .and_then(|d| d.identity_dh[..].try_into().ok())
    }
}
