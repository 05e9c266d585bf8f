//! This device's MLS client: its leaf identity, key packages, creating and joining
//! groups, loading them, and routing an incoming envelope to its group.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mls_rs::client_builder::{
    BaseConfig, WithCryptoProvider, WithGroupStateStorage, WithIdentityProvider,
    WithKeyPackageRepo, WithMlsRules,
};
use mls_rs::crypto::SignatureSecretKey;
use mls_rs::extension::recommended::LastResortKeyPackageExt;
use mls_rs::extension::ExtensionType;
use mls_rs::group::ExportedTree;
use mls_rs::time::MlsTime;
use mls_rs::{CipherSuite, Client, ExtensionList, MlsMessage};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use prost::Message;
use zeroize::Zeroizing;

use super::identity::{DeviceCredential, TernIdentity};
use super::meta::{GroupMeta, MEMBER_TOKENS_EXTENSION, META_EXTENSION};
use super::rules::TernRules;
use super::session::GroupSession;
use super::storage::StagedMlsStore;
use super::tree::{open_tree, tree_key_of};
use super::{GroupError, Joined, Member, Staged, GROUP_ID_LEN, KEY_PACKAGE_LIFETIME_SECS};
use crate::store::records::MlsTagRecord;
use crate::store::{KvStore, Namespace, Op};

/// The ciphersuite: X25519, ChaCha20-Poly1305, SHA-256, Ed25519.
pub(crate) const CIPHER_SUITE: CipherSuite = CipherSuite::CURVE25519_CHACHA;

pub(crate) type MlsConfig = WithCryptoProvider<
    RustCryptoProvider,
    WithIdentityProvider<
        TernIdentity,
        WithMlsRules<
            TernRules,
            WithGroupStateStorage<StagedMlsStore, WithKeyPackageRepo<StagedMlsStore, BaseConfig>>,
        >,
    >,
>;

pub(crate) fn mls_time(now_ms: u64) -> MlsTime {
    MlsTime::from_duration_since_epoch(Duration::from_millis(now_ms))
}

/// This device's MLS client over the device store.
pub struct GroupDevice {
    client: Client<MlsConfig>,
    store: StagedMlsStore,
    me: DeviceCredential,
}

impl std::fmt::Debug for GroupDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupDevice")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl GroupDevice {
    /// The MLS client of the device whose Ed25519 secret is `device_secret`, with
    /// its credential (checked here: the certificate must cover this device's key).
    pub fn new(
        kv: Arc<dyn KvStore>,
        device_secret: &[u8; 32],
        credential: DeviceCredential,
    ) -> Result<Self, GroupError> {
        credential.verify(
            &SigningKey::from_bytes(device_secret)
                .verifying_key()
                .to_bytes(),
        )?;
        Ok(Self::new_unchecked(kv, device_secret, credential))
    }

    /// [`GroupDevice::new`] without the credential check (tests make bad leaves).
    pub(crate) fn new_unchecked(
        kv: Arc<dyn KvStore>,
        device_secret: &[u8; 32],
        credential: DeviceCredential,
    ) -> Self {
        Self::with_rules(
            kv,
            device_secret,
            credential,
            TernRules::default(),
            TernIdentity::default(),
        )
    }

    /// A device whose own commits skip Tern's rules (tests make a misbehaving
    /// member).
    #[cfg(test)]
    pub(crate) fn misbehaving(
        kv: Arc<dyn KvStore>,
        device_secret: &[u8; 32],
        credential: DeviceCredential,
    ) -> Self {
        Self::with_rules(
            kv,
            device_secret,
            credential,
            TernRules::unchecked(),
            TernIdentity::lax(),
        )
    }

    fn with_rules(
        kv: Arc<dyn KvStore>,
        device_secret: &[u8; 32],
        credential: DeviceCredential,
        rules: TernRules,
        identity: TernIdentity,
    ) -> Self {
        let key = SigningKey::from_bytes(device_secret);
        let public = key.verifying_key().to_bytes();
        let store = StagedMlsStore::new(kv);
        let client = Client::builder()
            .key_package_repo(store.clone())
            .group_state_storage(store.clone())
            .mls_rules(rules)
            .identity_provider(identity)
            .crypto_provider(RustCryptoProvider::default())
            .extension_types([
                ExtensionType::new(META_EXTENSION),
                ExtensionType::new(MEMBER_TOKENS_EXTENSION),
                ExtensionType::LAST_RESORT_KEY_PACKAGE,
            ])
            .key_package_lifetime(Duration::from_secs(KEY_PACKAGE_LIFETIME_SECS))
            .signing_identity(
                credential.signing_identity(&public),
                SignatureSecretKey::new(key.to_keypair_bytes().to_vec()),
                CIPHER_SUITE,
            )
            .build();
        GroupDevice {
            client,
            store,
            me: credential,
        }
    }

    /// This device's credential.
    pub fn credential(&self) -> &DeviceCredential {
        &self.me
    }

    /// Runs `f`; on error drops whatever it staged.
    fn staged<T>(
        &self,
        f: impl FnOnce() -> Result<T, GroupError>,
    ) -> Result<Staged<T>, GroupError> {
        self.store.discard();
        match f() {
            Ok(value) => Ok(Staged {
                value,
                ops: self.store.take(),
            }),
            Err(e) => {
                self.store.discard();
                Err(e)
            }
        }
    }

    /// `count` fresh one-time key packages (encoded MLS messages, for
    /// `PublishKeyPackages`); their secrets are in the staged writes.
    pub fn key_packages(
        &self,
        count: usize,
        now_ms: u64,
    ) -> Result<Staged<Vec<Vec<u8>>>, GroupError> {
        self.staged(|| {
            (0..count)
                .map(|_| {
                    let kp = self.client.generate_key_package_message(
                        ExtensionList::new(),
                        ExtensionList::new(),
                        Some(mls_time(now_ms)),
                    )?;
                    Ok(kp.to_bytes()?)
                })
                .collect()
        })
    }

    /// A last-resort key package: the relay hands it out when the one-time ones
    /// run out; joining with it keeps its secret (rotate it, and delete the old
    /// secret with [`GroupDevice::forget_key_package`] after a grace period).
    pub fn last_resort_key_package(&self, now_ms: u64) -> Result<Staged<Vec<u8>>, GroupError> {
        self.staged(|| {
            let mut ext = ExtensionList::new();
            ext.set_from(LastResortKeyPackageExt)
                .map_err(|e| GroupError::Rejected(e.to_string()))?;
            let kp = self.client.generate_key_package_message(
                ext,
                ExtensionList::new(),
                Some(mls_time(now_ms)),
            )?;
            Ok(kp.to_bytes()?)
        })
    }

    /// Deletes a key package's secret (by its encoded message).
    pub fn forget_key_package(&self, key_package: &[u8]) -> Result<Vec<Op>, GroupError> {
        let id = Self::key_package_id(key_package)?;
        Ok(vec![Self::forget_key_package_id(&id)])
    }

    /// A key package's reference (the key its secret is stored under).
    pub fn key_package_id(key_package: &[u8]) -> Result<Vec<u8>, GroupError> {
        let msg = MlsMessage::from_bytes(key_package)?;
        let kp = msg.into_key_package().ok_or(GroupError::BadKeyPackage)?;
        let provider = RustCryptoProvider::default();
        let cs = mls_rs::CryptoProvider::cipher_suite_provider(&provider, CIPHER_SUITE)
            .ok_or(GroupError::BadKeyPackage)?;
        Ok(kp.to_reference(&cs)?.to_vec())
    }

    /// The write that deletes the secret of the key package `id`
    /// ([`GroupDevice::key_package_id`]).
    pub fn forget_key_package_id(id: &[u8]) -> Op {
        Op::Delete(Namespace::MlsKeyPackage, id.to_vec())
    }

    /// Checks a fetched key package: ours ciphersuite, a valid Tern credential. The
    /// caller then checks the member's identity key against the pinned one and the
    /// device against the account's verified device list.
    pub fn verify_key_package(key_package: &[u8]) -> Result<Member, GroupError> {
        let msg = MlsMessage::from_bytes(key_package).map_err(|_| GroupError::BadKeyPackage)?;
        let kp = msg.into_key_package().ok_or(GroupError::BadKeyPackage)?;
        if kp.cipher_suite() != CIPHER_SUITE {
            return Err(GroupError::BadKeyPackage);
        }
        let id = kp.signing_identity();
        let c = DeviceCredential::verified(id)?;
        Ok(Member {
            account: c.account,
            device: c.device,
            identity_key: c.identity_key,
            device_key: id
                .signature_key
                .as_bytes()
                .try_into()
                .map_err(|_| GroupError::BadKeyPackage)?,
            index: 0,
        })
    }

    /// Creates a group with this device its only member, at epoch 0. `group_id` is
    /// random ([`GROUP_ID_LEN`] bytes); `meta.handle` is the relay handle.
    pub fn create(
        &self,
        group_id: [u8; GROUP_ID_LEN],
        meta: &GroupMeta,
        now_ms: u64,
    ) -> Result<Staged<GroupSession>, GroupError> {
        self.create_with_id(group_id.to_vec(), meta, now_ms)
    }

    /// [`GroupDevice::create`] with an id of any length (tests make bad groups).
    pub(crate) fn create_with_id(
        &self,
        group_id: Vec<u8>,
        meta: &GroupMeta,
        now_ms: u64,
    ) -> Result<Staged<GroupSession>, GroupError> {
        meta.check()?;
        self.staged(|| {
            let mut ext = ExtensionList::new();
            ext.set(meta.extension());
            ext.set_from(mls_rs::extension::built_in::RequiredCapabilitiesExt {
                extensions: vec![ExtensionType::new(META_EXTENSION)],
                proposals: vec![],
                credentials: vec![mls_rs::identity::CredentialType::new(
                    super::identity::CREDENTIAL_TYPE,
                )],
            })
            .map_err(|e| GroupError::Rejected(e.to_string()))?;
            let group = self.client.create_group_with_id(
                group_id,
                ext,
                ExtensionList::new(),
                Some(mls_time(now_ms)),
            )?;
            let mut session =
                GroupSession::from_group(group, self.client.clone(), self.store.clone())?;
            session.persist(true)?;
            Ok(session)
        })
    }

    /// The key of a welcome's ratchet tree, from its GroupInfo: this also shows
    /// that the welcome is encrypted to one of this device's key packages (it
    /// stores nothing).
    pub fn examine_welcome(&self, welcome: &[u8]) -> Result<Zeroizing<[u8; 32]>, GroupError> {
        let welcome = MlsMessage::from_bytes(welcome)?;
        let info = self.client.examine_welcome_message(&welcome)?;
        tree_key_of(info.extensions())
    }

    /// Joins a group from a welcome and its encrypted ratchet tree
    /// ([`super::Welcome::ratchet_tree`]), opened under the key in the welcome's
    /// GroupInfo. The caller checks the members' identity keys against the pinned
    /// ones.
    pub fn join(
        &self,
        welcome: &[u8],
        ratchet_tree: &[u8],
        now_ms: u64,
    ) -> Result<Staged<Joined>, GroupError> {
        let key = self.examine_welcome(welcome)?;
        let welcome = MlsMessage::from_bytes(welcome)?;
        let tree = ExportedTree::from_bytes(&open_tree(&key, ratchet_tree)?)?;
        self.staged(|| {
            let (group, info) =
                self.client
                    .join_group(Some(tree), &welcome, Some(mls_time(now_ms)))?;
            // Group ids key the client's records: one of another length is refused
            // before anything is stored.
            if group.group_id().len() != GROUP_ID_LEN {
                return Err(GroupError::BadGroupId);
            }
            let member_tokens = info
                .group_info_extensions
                .get(ExtensionType::new(MEMBER_TOKENS_EXTENSION))
                .map(|e| e.extension_data().to_vec());
            let added_by = group
                .member_at_index(info.sender)
                .ok_or(GroupError::UnknownSender)
                .and_then(|m| Member::from_mls(&m))?;
            // A state this device still has for the group (left behind, now
            // re-added) goes: nothing of it may merge into the new one.
            for op in self.store.forget_ops(group.group_id())? {
                self.store.stage(op);
            }
            let mut session =
                GroupSession::from_group(group, self.client.clone(), self.store.clone())?;
            let meta = session.meta()?;
            session.persist(true)?;
            Ok(Joined {
                session,
                added_by,
                meta,
                member_tokens,
            })
        })
    }

    /// Joins from a welcome body (`0x03 ‖ GroupWelcome`, [`super::Welcome::body`])
    /// that carries its tree inline.
    pub fn join_body(&self, body: &[u8], now_ms: u64) -> Result<Staged<Joined>, GroupError> {
        let Some((&super::WELCOME_KIND, rest)) = body.split_first() else {
            return Err(GroupError::Malformed);
        };
        match super::parse_welcome(rest)? {
            (welcome, super::WelcomeTree::Inline(tree)) => self.join(&welcome, &tree, now_ms),
            // The caller fetches the tree and calls `join` with it.
            (_, super::WelcomeTree::Pointer(_)) => Err(GroupError::TreeNotInline),
        }
    }

    /// Loads a group from the store (None: not a group of this device).
    pub fn load(&self, group_id: &[u8]) -> Result<Option<GroupSession>, GroupError> {
        self.store.discard();
        let Some(tree) = self.store.get(Namespace::MlsTree, group_id)? else {
            return Ok(None);
        };
        let tree = ExportedTree::from_bytes(&tree)?;
        let group = match self.client.load_group_with_ratchet_tree(group_id, tree) {
            Ok(g) => g,
            Err(mls_rs::error::MlsError::GroupNotFound) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(GroupSession::from_group(
            group,
            self.client.clone(),
            self.store.clone(),
        )?))
    }

    /// Which group and epoch an incoming envelope is for, by its tag (None: no live
    /// epoch of any group has it).
    pub fn route(&self, envelope: &[u8]) -> Result<Option<(Vec<u8>, u64)>, GroupError> {
        self.route_tag(&super::wrap::envelope_tag(envelope)?)
    }

    /// Which group and epoch an envelope tag belongs to (None: no live epoch of any
    /// group has it).
    pub fn route_tag(&self, tag: &[u8]) -> Result<Option<(Vec<u8>, u64)>, GroupError> {
        let Some(v) = self.store.kv().get(Namespace::MlsTag, tag)? else {
            return Ok(None);
        };
        let r =
            MlsTagRecord::decode(v.as_slice()).map_err(|_| crate::store::StoreError::Corrupt)?;
        Ok(Some((r.group_id, r.epoch)))
    }

    /// The writes that delete a group's state (left, or removed).
    pub fn forget(&self, group_id: &[u8]) -> Result<Vec<Op>, GroupError> {
        Ok(self.store.forget_ops(group_id)?)
    }
}
