//! One group: commits, the pending commit, the epoch token, encrypting and
//! processing group envelopes.

use mls_rs::extension::ExtensionType;
use mls_rs::group::proposal::Proposal;
use mls_rs::group::{CommitEffect, ExportedTree, ReceivedMessage};
use mls_rs::{Client, ExtensionList, Group, MlsMessage, WireFormat};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::device::{mls_time, MlsConfig};
use super::meta::{GroupMeta, MEMBER_TOKENS_EXTENSION};
use super::storage::{StagedMlsStore, KEPT_EPOCHS};
use super::tree::{new_tree_key, seal_tree, TREE_KEY_EXTENSION};
use super::wrap::{WrapKey, KEY_LABEL, TAG_LABEL, TAG_LEN};
use super::{
    Changes, CommitApplied, DeviceCredential, GroupDevice, GroupError, Member, PlannedCommit,
    Processed, Staged, Welcome, EPOCH_TOKEN_LABEL, HANDLE_LEN,
};
use crate::store::records::{MlsTagRecord, MlsWrapKey};
use crate::store::{Namespace, Op};
use tern_proto::{AccountId, DeviceId};

/// One group this device is a member of. Every call that changes the group
/// returns its writes ([`Staged`]); on an error it reloads the group from the
/// store, so the state is as before the call.
pub struct GroupSession {
    group: Group<MlsConfig>,
    client: Client<MlsConfig>,
    store: StagedMlsStore,
    handle: [u8; HANDLE_LEN],
    /// The envelope tag of the epoch the pending commit leads to, once computed
    /// (reset by every call that may change the pending commit).
    next_tag: Option<[u8; TAG_LEN]>,
}

impl std::fmt::Debug for GroupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSession")
            .field("epoch", &self.group.current_epoch())
            .finish_non_exhaustive()
    }
}

impl GroupSession {
    pub(crate) fn from_group(
        group: Group<MlsConfig>,
        client: Client<MlsConfig>,
        store: StagedMlsStore,
    ) -> Result<Self, GroupError> {
        let handle = GroupMeta::from_extensions(&group.context().extensions)?.handle;
        Ok(GroupSession {
            group,
            client,
            store,
            handle,
            next_tag: None,
        })
    }

    /// The MLS group id.
    pub fn group_id(&self) -> &[u8] {
        self.group.group_id()
    }

    /// The relay handle.
    pub fn handle(&self) -> [u8; HANDLE_LEN] {
        self.handle
    }

    /// The current epoch (the relay's epoch number for the handle).
    pub fn epoch(&self) -> u64 {
        self.group.current_epoch()
    }

    /// The group's metadata in this epoch.
    pub fn meta(&self) -> Result<GroupMeta, GroupError> {
        GroupMeta::from_extensions(&self.group.context().extensions)
    }

    /// Every leaf, in leaf order.
    pub fn members(&self) -> Vec<Member> {
        self.group
            .roster()
            .members_iter()
            .filter_map(|m| Member::from_mls(&m).ok())
            .collect()
    }

    /// This device's leaf.
    pub fn me(&self) -> Result<Member, GroupError> {
        let index = self.group.current_member_index();
        self.group
            .member_at_index(index)
            .ok_or(GroupError::UnknownSender)
            .and_then(|m| Member::from_mls(&m))
    }

    /// Whether a commit of this device is pending.
    pub fn has_pending(&self) -> bool {
        self.group.has_pending_commit()
    }

    /// This epoch's token: only members of the epoch can compute it, and the relay
    /// accepts a commit only with it (it holds its SHA-256).
    pub fn epoch_token(&self) -> Result<[u8; 32], GroupError> {
        token_of(&self.group, &self.handle)
    }

    /// SHA-256 of [`GroupSession::epoch_token`] (for `CreateGroup` at epoch 0).
    pub fn token_hash(&self) -> Result<[u8; 32], GroupError> {
        Ok(Sha256::digest(self.epoch_token()?).into())
    }

    /// The current epoch's envelope key.
    pub fn wrap_key(&self) -> Result<WrapKey, GroupError> {
        wrap_key(&self.group, &self.handle)
    }

    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, GroupError>,
    ) -> Result<Staged<T>, GroupError> {
        self.store.discard();
        self.next_tag = None;
        match f(self) {
            Ok(value) => Ok(Staged {
                value,
                ops: self.store.take(),
            }),
            Err(e) => {
                self.store.discard();
                self.reload()?;
                Err(e)
            }
        }
    }

    /// The envelope tag of the epoch this device's pending commit leads to (None:
    /// no commit pending). Members that applied the commit send under it, and the
    /// relay may deliver their envelopes before it answers the commit: one under
    /// this tag proves the commit was taken.
    pub fn pending_tag(&mut self) -> Result<Option<[u8; TAG_LEN]>, GroupError> {
        if !self.group.has_pending_commit() {
            return Ok(None);
        }
        if self.next_tag.is_none() {
            let mut next = self.group.clone();
            next.apply_pending_commit()?;
            self.next_tag = Some(wrap_key(&next, &self.handle)?.tag);
        }
        Ok(self.next_tag)
    }

    /// Reloads the group as the store holds it.
    fn reload(&mut self) -> Result<(), GroupError> {
        self.next_tag = None;
        let id = self.group.group_id().to_vec();
        let tree = self
            .store
            .get(Namespace::MlsTree, &id)?
            .ok_or(GroupError::UnknownGroup)?;
        self.group = self
            .client
            .load_group_with_ratchet_tree(&id, ExportedTree::from_bytes(&tree)?)?;
        Ok(())
    }

    /// Builds one commit with `changes` (an empty one is a key update), left
    /// pending. Adds of devices already in the group (unless the same commit
    /// removes their leaf) and removals of absent ones are left out (a re-plan
    /// after losing a race).
    pub fn commit(
        &mut self,
        changes: &Changes,
        now_ms: u64,
    ) -> Result<Staged<PlannedCommit>, GroupError> {
        if self.group.has_pending_commit() {
            return Err(GroupError::PendingCommit);
        }
        self.guarded(|s| s.build_commit(changes, now_ms))
    }

    fn build_commit(
        &mut self,
        changes: &Changes,
        now_ms: u64,
    ) -> Result<PlannedCommit, GroupError> {
        let members = self.members();
        let me = self.me()?;
        let same = |a: &Member, b: &Member| a.account == b.account && a.device == b.device;
        let removed: Vec<Member> = members
            .iter()
            .filter(|m| !same(m, &me))
            .filter(|m| {
                changes.remove_accounts.contains(&m.account)
                    || changes
                        .remove_devices
                        .iter()
                        .any(|(a, d)| *a == m.account && *d == m.device)
            })
            .cloned()
            .collect();
        // A device whose leaf this commit removes may come back with a new leaf
        // (a re-add of a device left behind); other present devices are left out.
        let mut added: Vec<Member> = Vec::new();
        let mut add_messages = Vec::new();
        for kp in &changes.add {
            let m = GroupDevice::verify_key_package(kp)?;
            let present = members
                .iter()
                .filter(|x| !removed.iter().any(|r| same(r, x)))
                .chain(&added)
                .any(|x| same(x, &m));
            if present {
                continue;
            }
            add_messages.push(MlsMessage::from_bytes(kp)?);
            added.push(m);
        }
        let meta_changed = match &changes.meta {
            Some(meta) => {
                meta.check()?;
                if meta.handle != self.handle {
                    return Err(GroupError::HandleChanged);
                }
                *meta != self.meta()?
            }
            None => false,
        };
        let token = self.epoch_token()?;
        let wrap = self.wrap_key()?;
        let epoch = self.epoch();
        let mut context_ext = self.group.context().extensions.clone();
        let mut builder = self.group.commit_builder().commit_time(mls_time(now_ms));
        for msg in add_messages {
            builder = builder.add_member(msg)?;
        }
        for m in &removed {
            builder = builder.remove_member(m.index)?;
        }
        if let (Some(meta), true) = (&changes.meta, meta_changed) {
            context_ext.set(meta.extension());
            builder = builder.set_group_context_ext(context_ext)?;
        }
        // The welcome's tree is encrypted under a key only its GroupInfo carries:
        // drawn now, before the tree exists.
        let tree_key = new_tree_key();
        if !added.is_empty() {
            let mut ext = ExtensionList::new();
            if let Some(tokens) = &changes.member_tokens {
                ext.set(mls_rs::Extension::new(
                    ExtensionType::new(MEMBER_TOKENS_EXTENSION),
                    tokens.clone(),
                ));
            }
            ext.set(mls_rs::Extension::new(
                ExtensionType::new(TREE_KEY_EXTENSION),
                tree_key.to_vec(),
            ));
            builder = builder.set_group_info_ext(ext);
        }
        let out = builder.build()?;
        let commit = wrap.wrap(&out.commit_message().to_bytes()?)?;
        let welcome = match (out.welcome_messages().first(), out.ratchet_tree()) {
            (Some(w), Some(tree)) => {
                let (ratchet_tree, tree_blob_id) = seal_tree(&tree_key, &tree.to_bytes()?)?;
                Some(Welcome {
                    welcome: w.to_bytes()?,
                    ratchet_tree,
                    tree_blob_id,
                    to: added.clone(),
                })
            }
            (None, _) => None,
            (Some(_), None) => return Err(GroupError::Rejected("welcome without a tree".into())),
        };
        // The next epoch's token, from a copy with the commit applied.
        let mut next = self.group.clone();
        next.apply_pending_commit()?;
        let next_token_hash = Sha256::digest(token_of(&next, &self.handle)?).into();
        let next_tag = wrap_key(&next, &self.handle)?.tag;
        self.persist(false)?;
        self.next_tag = Some(next_tag);
        Ok(PlannedCommit {
            epoch,
            epoch_token: token,
            next_token_hash,
            commit,
            welcome,
            added,
            removed,
            meta_changed,
        })
    }

    /// A commit made with whatever `build` adds, wrapped, left pending (tests make
    /// commits an honest member would not).
    #[cfg(test)]
    pub(crate) fn raw_commit(
        &mut self,
        build: impl FnOnce(
            mls_rs::group::CommitBuilder<'_, MlsConfig>,
        ) -> Result<mls_rs::group::CommitBuilder<'_, MlsConfig>, GroupError>,
    ) -> Result<Staged<Vec<u8>>, GroupError> {
        self.guarded(|s| {
            let wrap = s.wrap_key()?;
            let out = build(s.group.commit_builder())?.build()?;
            let commit = wrap.wrap(&out.commit_message().to_bytes()?)?;
            s.persist(false)?;
            Ok(commit)
        })
    }

    /// The relay accepted the pending commit: the group moves to the next epoch.
    pub fn apply_pending(&mut self) -> Result<Staged<CommitApplied>, GroupError> {
        if !self.group.has_pending_commit() {
            return Err(GroupError::NoPendingCommit);
        }
        self.guarded(|s| {
            let before = s.members();
            let meta_before = s.meta()?;
            let me = s.me()?;
            let d = s.group.apply_pending_commit()?;
            s.persist(true)?;
            let adds = added_devices(&d.effect);
            Ok(s.applied(me, &before, meta_before, &adds))
        })
    }

    /// The relay refused the pending commit (another won the epoch): drop it.
    pub fn clear_pending(&mut self) -> Result<Staged<()>, GroupError> {
        self.guarded(|s| {
            s.group.clear_pending_commit();
            s.persist(false)
        })
    }

    /// Encrypts an application message (an encoded `GroupContent`) into a group
    /// envelope. Refused while a commit is pending.
    pub fn encrypt(&mut self, content: &[u8]) -> Result<Staged<Vec<u8>>, GroupError> {
        if self.group.has_pending_commit() {
            return Err(GroupError::PendingCommit);
        }
        self.guarded(|s| {
            let msg = s.group.encrypt_application_message(content, Vec::new())?;
            let envelope = s.wrap_key()?.wrap(&msg.to_bytes()?)?;
            s.persist(false)?;
            Ok(envelope)
        })
    }

    /// Processes an incoming group envelope of this group (current or one of the
    /// last [`KEPT_EPOCHS`] epochs). When the commit removes this device, the
    /// staged writes delete the group.
    pub fn process(
        &mut self,
        envelope: &[u8],
        now_ms: u64,
    ) -> Result<Staged<Processed>, GroupError> {
        let tag = super::wrap::envelope_tag(envelope)?;
        let record = self
            .store
            .state_record(self.group_id())?
            .ok_or(GroupError::UnknownGroup)?;
        let key = record
            .wrap_keys
            .iter()
            .find(|k| k.tag == tag)
            .ok_or(GroupError::UnknownTag)
            .and_then(wrap_key_of)?;
        let bytes = key.unwrap(envelope)?;
        let msg = MlsMessage::from_bytes(&bytes)?;
        if msg.wire_format() != WireFormat::PrivateMessage {
            return Err(GroupError::Malformed);
        }
        self.guarded(|s| s.process_message(msg, now_ms))
    }

    fn process_message(&mut self, msg: MlsMessage, now_ms: u64) -> Result<Processed, GroupError> {
        let before = self.members();
        let meta_before = self.meta()?;
        let sender_of = |index: u32, list: &[Member]| {
            list.iter()
                .find(|m| m.index == index)
                .cloned()
                .ok_or(GroupError::UnknownSender)
        };
        match self
            .group
            .process_incoming_message_with_time(msg, mls_time(now_ms))?
        {
            ReceivedMessage::ApplicationMessage(d) => {
                let sender = sender_of(d.sender_index, &before)?;
                self.persist(false)?;
                Ok(Processed::Message {
                    sender,
                    content: d.data().to_vec(),
                })
            }
            ReceivedMessage::Commit(d) => {
                let committer = sender_of(d.committer, &before)?;
                let removed_self = matches!(d.effect, CommitEffect::Removed { .. });
                if removed_self {
                    let epoch = self.epoch();
                    self.store.discard();
                    for op in self.store.forget_ops(self.group_id())? {
                        self.store.stage(op);
                    }
                    return Ok(Processed::Commit(Box::new(CommitApplied {
                        committer,
                        epoch,
                        added: Vec::new(),
                        removed: Vec::new(),
                        new_leaves: Vec::new(),
                        meta: None,
                        removed_self: true,
                    })));
                }
                self.persist(true)?;
                let adds = added_devices(&d.effect);
                Ok(Processed::Commit(Box::new(self.applied(
                    committer,
                    &before,
                    meta_before,
                    &adds,
                ))))
            }
            _ => Err(GroupError::Rejected(
                "not an application message or commit".into(),
            )),
        }
    }

    fn applied(
        &self,
        committer: Member,
        before: &[Member],
        meta_before: GroupMeta,
        adds: &[(AccountId, DeviceId)],
    ) -> CommitApplied {
        let after = self.members();
        let key = |m: &Member| (m.index, m.device_key);
        let added: Vec<Member> = after
            .iter()
            .filter(|m| !before.iter().any(|b| key(b) == key(m)))
            .cloned()
            .collect();
        let removed: Vec<Member> = before
            .iter()
            .filter(|b| !after.iter().any(|m| key(b) == key(m)))
            .cloned()
            .collect();
        // A device re-added (its leaf removed and a fresh one added, maybe at
        // another index) neither came nor went. Only under the same device and
        // identity keys: a leaf claiming the device under other keys is an added
        // leaf, and its identity is checked against the pins like any other.
        let same = |a: &Member, b: &Member| {
            a.account == b.account
                && a.device == b.device
                && a.device_key == b.device_key
                && a.identity_key == b.identity_key
        };
        // By the commit's adds: a device re-added may get its old index back
        // under the same device key, which the roster alone does not show.
        let new_leaves = after
            .iter()
            .filter(|m| adds.contains(&(m.account, m.device)))
            .cloned()
            .collect();
        let (added, removed): (Vec<Member>, Vec<Member>) = (
            added
                .into_iter()
                .filter(|m: &Member| !removed.iter().any(|r| same(m, r)))
                .collect(),
            removed
                .iter()
                .filter(|r| !after.iter().any(|m| same(m, r)))
                .cloned()
                .collect(),
        );
        let meta = self.meta().ok().filter(|m| *m != meta_before);
        CommitApplied {
            committer,
            epoch: self.epoch(),
            added,
            removed,
            new_leaves,
            meta,
            removed_self: false,
        }
    }

    /// Stages the group's state; on a new epoch also its tree and envelope key.
    pub(crate) fn persist(&mut self, new_epoch: bool) -> Result<(), GroupError> {
        self.group.write_to_storage_without_ratchet_tree()?;
        if !new_epoch {
            return Ok(());
        }
        let id = self.group_id().to_vec();
        self.store.stage(Op::Put(
            Namespace::MlsTree,
            id.clone(),
            self.group.export_tree().to_bytes()?,
        ));
        let key = self.wrap_key()?;
        let mut record = self.store.state_record(&id)?.unwrap_or_default();
        record.wrap_keys.retain(|k| k.epoch != key.epoch);
        record.wrap_keys.push(MlsWrapKey {
            epoch: key.epoch,
            tag: key.tag.to_vec(),
            key: key.key.to_vec(),
        });
        record.wrap_keys.sort_by_key(|k| k.epoch);
        let live = KEPT_EPOCHS as usize + 1;
        if record.wrap_keys.len() > live {
            let gone = record.wrap_keys.len() - live;
            for old in record.wrap_keys.drain(..gone) {
                self.store.stage(Op::Delete(Namespace::MlsTag, old.tag));
            }
        }
        self.store.stage(Op::Put(
            Namespace::MlsTag,
            key.tag.to_vec(),
            prost::Message::encode_to_vec(&MlsTagRecord {
                group_id: id.clone(),
                epoch: key.epoch,
            }),
        ));
        self.store.put_state_record(&id, &record);
        Ok(())
    }
}

/// The devices a commit's Add proposals bring (their credentials; none that
/// does not parse, which MLS validation refused already).
fn added_devices(effect: &CommitEffect) -> Vec<(AccountId, DeviceId)> {
    let new_epoch = match effect {
        CommitEffect::NewEpoch(n) => n,
        CommitEffect::Removed { new_epoch, .. } => new_epoch,
        CommitEffect::ReInit(_) => return Vec::new(),
    };
    new_epoch
        .applied_proposals
        .iter()
        .filter_map(|p| match &p.proposal {
            Proposal::Add(add) => DeviceCredential::of(add.signing_identity())
                .ok()
                .map(|c| (c.account, c.device)),
            _ => None,
        })
        .collect()
}

fn token_of(group: &Group<MlsConfig>, handle: &[u8; HANDLE_LEN]) -> Result<[u8; 32], GroupError> {
    let secret = group.export_secret(EPOCH_TOKEN_LABEL, handle, 32)?;
    secret
        .as_bytes()
        .try_into()
        .map_err(|_| GroupError::Rejected("exporter length".into()))
}

fn wrap_key(group: &Group<MlsConfig>, handle: &[u8; HANDLE_LEN]) -> Result<WrapKey, GroupError> {
    let tag = group.export_secret(TAG_LABEL, handle, TAG_LEN)?;
    let key = group.export_secret(KEY_LABEL, handle, 32)?;
    let bad = |_| GroupError::Rejected("exporter length".into());
    Ok(WrapKey {
        epoch: group.current_epoch(),
        tag: tag.as_bytes().try_into().map_err(bad)?,
        key: Zeroizing::new(key.as_bytes().try_into().map_err(bad)?),
    })
}

fn wrap_key_of(k: &MlsWrapKey) -> Result<WrapKey, GroupError> {
    let bad = |_| GroupError::Store(crate::store::StoreError::Corrupt);
    Ok(WrapKey {
        epoch: k.epoch,
        tag: k.tag.as_slice().try_into().map_err(bad)?,
        key: Zeroizing::new(k.key.as_slice().try_into().map_err(bad)?),
    })
}
