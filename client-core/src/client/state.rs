//! The client's state, free of network I/O: what is cached from the device store, and
//! how it is created, loaded and written. The rules that change it live beside it,
//! one module each: `keys` (prekeys, rotation, delivery token), `contacts` (contacts,
//! identity changes, sessions), `outbox` and `inbox`. Every rule takes the current
//! time and, where it needs randomness, the random source as arguments.
//!
//! Each change is written to the device store as one atomic [`Batch`] (session,
//! counters and the record it produced together), so the store always holds a state
//! some prefix of the client's history left. The caller makes the batches durable
//! ([`State::flush`]) before anything leaves the device: a ciphertext before its
//! session is stored could reuse ratchet keys after a crash, and an acknowledgement
//! before its message is stored could lose it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rand::{CryptoRng, RngCore};
use tern_proto::{AccountId, DeviceAddress, DeviceId};
use zeroize::Zeroizing;

use super::broadcast::BroadcastRecord;
use super::group_records::{GroupOutboxRecord, GroupRecord};
use super::keys::PREKEY_BATCH;
use super::{ReceivedMessage, SEEN_RETENTION_MS};
use crate::crypto::sealed;
use crate::crypto::sessions::SessionSet;
use crate::crypto::x3dh::AgreementKeyPair;
use crate::identity::{DeviceKeyPair, IdentityKeyPair};
use crate::store::by_seq;
use crate::store::records::{ContactRecord, LocalRecord, OutboxRecord, PreKeyKind, PreKeyRecord};
use crate::store::{
    Batch, ContactStore, IdentityStore, KvStore, Namespace, OutboxStore, PreKeyStore, StoreError,
};
use crate::{Error, Result};

/// This device's long-term keys, parsed from [`LocalRecord`].
pub(crate) struct Keys {
    /// The identity key pair: only on the primary (a linked device holds none).
    pub(crate) identity: Option<IdentityKeyPair>,
    /// The account's identity public key.
    pub(crate) identity_key: [u8; 32],
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
    /// A sync message from another device of this account, applied; these events
    /// follow.
    Synced(Vec<super::Event>),
}

/// The client state behind one lock.
pub(crate) struct State {
    pub(super) kv: Arc<dyn KvStore>,
    pub(super) local: LocalRecord,
    pub(crate) keys: Keys,
    pub(super) contacts: HashMap<AccountId, ContactRecord>,
    pub(super) sessions: HashMap<(AccountId, DeviceId), SessionSet>,
    pub(super) signed_prekeys: BTreeMap<u32, (AgreementKeyPair, PreKeyRecord)>,
    pub(super) outbox: BTreeMap<u64, OutboxRecord>,
    /// Seen ids written since the last flush, for duplicates inside one batch.
    pub(super) unflushed_seen: HashSet<Vec<u8>>,
    /// One-time prekeys consumed since the last check with the relay.
    pub(crate) consumed_prekeys: u32,
    pub(super) certificates: sealed::CertificateCache,
    /// The broadcast parts of outbox records, by outbox seq.
    pub(super) broadcasts: BTreeMap<u64, BroadcastRecord>,
    /// This device's MLS client (`None`: a device without a group credential).
    pub(super) group_device: Option<crate::groups::GroupDevice>,
    /// Loaded groups, by group id.
    pub(super) group_sessions: HashMap<Vec<u8>, crate::groups::GroupSession>,
    /// This device's groups, by group id.
    pub(super) groups: BTreeMap<Vec<u8>, GroupRecord>,
    /// Group messages on their way, by outbox seq.
    pub(super) group_outbox: BTreeMap<u64, GroupOutboxRecord>,
    /// The largest welcome body sent with its ratchet tree inline
    /// ([`super::group_tree`]).
    pub(super) welcome_inline_max: usize,
}

pub(super) fn corrupt() -> Error {
    Error::Store(StoreError::Corrupt)
}

pub(super) fn fixed32(b: &[u8]) -> Result<[u8; 32]> {
    b.try_into().map_err(|_| corrupt())
}

pub(super) fn account_of(b: &[u8]) -> Result<AccountId> {
    AccountId::try_from(b).map_err(|_| corrupt())
}

/// 32 bytes from `rng`.
pub(crate) fn random32(rng: &mut (impl RngCore + CryptoRng)) -> [u8; 32] {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    b
}

/// This device's MLS client, when it can prove its device key: the primary signs
/// its own certificate; a linked device has the one its link payload carried.
pub(super) fn group_device(
    kv: &Arc<dyn KvStore>,
    keys: &Keys,
    local: &LocalRecord,
) -> Option<crate::groups::GroupDevice> {
    let secret: [u8; 32] = local.device_secret[..].try_into().ok()?;
    let device_key = keys.device.public();
    let certificate = match keys.identity.as_ref() {
        Some(identity) => identity.certify_device(Some(&keys.address.account), &device_key),
        None => {
            let stored = kv
                .get(
                    Namespace::GroupCredential,
                    super::group_records::CREDENTIAL_KEY,
                )
                .ok()??;
            let record: super::group_records::CredentialRecord =
                prost::Message::decode(&stored[..]).ok()?;
            record.certificate[..].try_into().ok()?
        }
    };
    let credential = crate::groups::DeviceCredential {
        account: keys.address.account,
        device: keys.address.device,
        identity_key: keys.identity_key,
        certificate,
    };
    crate::groups::GroupDevice::new(kv.clone(), &secret, credential).ok()
}

impl Keys {
    fn from_local(local: &LocalRecord) -> Result<Keys> {
        let identity_dh = AgreementKeyPair::from_secret(fixed32(&local.identity_dh_secret)?);
        let (identity, identity_key, identity_dh_signature) = if local.identity_secret.is_empty() {
            // A linked device: the primary vouched for its keys at link time.
            let signature: [u8; 64] = local.identity_dh_signature[..]
                .try_into()
                .map_err(|_| corrupt())?;
            (None, fixed32(&local.identity_key)?, signature)
        } else {
            let identity =
                IdentityKeyPair::from_secret(&Zeroizing::new(fixed32(&local.identity_secret)?));
            let signature = identity.certify_agreement_key(&identity_dh.public());
            let public = identity.public();
            (Some(identity), public, signature)
        };
        Ok(Keys {
            identity_key,
            device: DeviceKeyPair::from_secret(&Zeroizing::new(fixed32(&local.device_secret)?)),
            identity,
            identity_dh,
            identity_dh_signature,
            address: DeviceAddress {
                account: account_of(&local.account_id)?,
                device: DeviceId::try_from(local.device_id).map_err(|_| corrupt())?,
            },
            relay_signing_key: fixed32(&local.relay_signing_key)?,
            delivery_token: fixed32(&local.delivery_token)?,
        })
    }
}

/// A freshly registered (or linked) device's secrets, before they are stored.
pub(crate) struct NewDevice<'a> {
    pub(crate) relay: String,
    /// The identity secret: only the primary has one (empty on a linked device).
    pub(crate) identity_secret: &'a [u8],
    /// What a linked device takes from the primary's payload instead.
    pub(crate) linked: Option<LinkedKeys>,
    pub(crate) device_secret: &'a [u8; 32],
    pub(crate) identity_dh: &'a AgreementKeyPair,
    pub(crate) address: DeviceAddress,
    pub(crate) relay_signing_key: [u8; 32],
}

/// What a linked device learns from the primary's link payload.
pub(crate) struct LinkedKeys {
    pub(crate) identity_key: [u8; 32],
    pub(crate) identity_dh_signature: [u8; 64],
    /// The account's delivery token (already set on the relay by the primary).
    pub(crate) delivery_token: [u8; 32],
    /// The identity's certificate over this device's key (its group credential).
    pub(crate) device_signature: [u8; 64],
}

impl State {
    /// Stores a newly registered device with its first prekeys (not yet published).
    pub(crate) fn create(
        kv: Arc<dyn KvStore>,
        new: NewDevice<'_>,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<State> {
        let (state, batch) = State::create_unwritten(kv, new, now_ms, rng)?;
        state.commit(batch, true)?;
        Ok(state)
    }

    /// [`State::create`] without the write: the state and the batch that stores it.
    pub(crate) fn create_unwritten(
        kv: Arc<dyn KvStore>,
        new: NewDevice<'_>,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(State, Batch)> {
        let linked = new.linked.as_ref();
        let local = LocalRecord {
            relay: new.relay,
            identity_secret: new.identity_secret.to_vec(),
            identity_key: linked.map(|l| l.identity_key.to_vec()).unwrap_or_default(),
            identity_dh_signature: linked
                .map(|l| l.identity_dh_signature.to_vec())
                .unwrap_or_default(),
            token_published: linked.is_some(),
            device_secret: new.device_secret.to_vec(),
            identity_dh_secret: new.identity_dh.secret_bytes().to_vec(),
            account_id: new.address.account.as_bytes().to_vec(),
            device_id: new.address.device.get(),
            relay_signing_key: new.relay_signing_key.to_vec(),
            delivery_token: match linked {
                Some(l) => l.delivery_token.to_vec(),
                None => random32(rng).to_vec(),
            },
            next_prekey_id: 1,
            signed_prekey_id: 0,
            next_inbox_seq: 1,
            next_outbox_seq: 1,
            keys_published: false,
            ..LocalRecord::default()
        };
        let mut state = State::from_parts(kv, local)?;
        let mut batch = state.rotate_signed_prekey(now_ms, rng).0;
        batch.append(&mut state.new_one_time_prekeys(PREKEY_BATCH, now_ms, rng).0);
        batch.put_local(&state.local);
        Ok((state, batch))
    }

    /// Loads a device from its store; `Ok(None)` if it holds no device (or one
    /// still joining an account).
    pub(crate) fn load(kv: Arc<dyn KvStore>, now_ms: u64) -> Result<Option<State>> {
        let Some(local) = kv.local()?.filter(|l| !l.is_joining()) else {
            return Ok(None);
        };
        let mut state = State::from_parts(kv, local)?;
        state.contacts = state.kv.contacts()?.into_iter().collect();
        for (id, record) in state.kv.prekeys(PreKeyKind::Signed)? {
            let pair = AgreementKeyPair::from_secret(fixed32(&record.secret)?);
            state.signed_prekeys.insert(id, (pair, record));
        }
        state.outbox = state.kv.outbox()?.into_iter().collect();
        state.broadcasts = by_seq(state.kv.scan(Namespace::Broadcasts)?)?
            .into_iter()
            .collect();
        for (key, value) in state.kv.scan(Namespace::Groups)? {
            let record = prost::Message::decode(&value[..]).map_err(|_| corrupt())?;
            state.groups.insert(key, record);
        }
        state.group_outbox = by_seq(state.kv.scan(Namespace::GroupOutbox)?)?
            .into_iter()
            .collect();
        // Duplicates older than the relay's longest retention cannot arrive any more.
        let prune = crate::store::InboxStore::seen_before(
            &*state.kv,
            now_ms.saturating_sub(SEEN_RETENTION_MS),
        )?;
        state.commit(prune, false)?;
        Ok(Some(state))
    }

    fn from_parts(kv: Arc<dyn KvStore>, local: LocalRecord) -> Result<State> {
        let keys = Keys::from_local(&local)?;
        let group_device = group_device(&kv, &keys, &local);
        Ok(State {
            keys,
            kv,
            local,
            contacts: HashMap::new(),
            sessions: HashMap::new(),
            signed_prekeys: BTreeMap::new(),
            outbox: BTreeMap::new(),
            unflushed_seen: HashSet::new(),
            consumed_prekeys: 0,
            certificates: sealed::CertificateCache::default(),
            broadcasts: BTreeMap::new(),
            group_device,
            group_sessions: HashMap::new(),
            groups: BTreeMap::new(),
            group_outbox: BTreeMap::new(),
            welcome_inline_max: super::group_tree::WELCOME_INLINE_MAX,
        })
    }

    pub(crate) fn relay(&self) -> &str {
        &self.local.relay
    }

    /// Writes `batch` as one atomic change (nothing for an empty one unless durable).
    pub(super) fn commit(&self, batch: Batch, durable: bool) -> Result<()> {
        if batch.is_empty() && !durable {
            return Ok(());
        }
        Ok(batch.commit(&*self.kv, durable)?)
    }

    /// Makes every change so far durable.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.commit(Batch::new(), true)?;
        self.unflushed_seen.clear();
        Ok(())
    }

    /// Reloads everything from the store: after a failed write, the caches may be
    /// ahead of what the store holds.
    pub(crate) fn reload(&mut self, now_ms: u64) -> Result<()> {
        let mut fresh = State::load(self.kv.clone(), now_ms)?.ok_or(Error::NotRegistered)?;
        fresh.welcome_inline_max = self.welcome_inline_max;
        *self = fresh;
        Ok(())
    }
}
