//! The commit pipeline's state rules: a group's head op becomes one MLS commit and
//! one `GroupCommit` request, stored (with the MLS state that holds the commit
//! pending) before it leaves; the relay's answer applies it, or clears it to be
//! planned again after a `STALE_EPOCH`.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::{e2e, v1, AccountId, CommitId, DeviceId, GroupCommit, GroupHandle, MessageId};
use tern_proto::{MultiSend, RecipientAccount};

use super::group_records::{GroupOpRecord, PendingCommitRecord, OP_ADD, OP_META, OP_REMOVE};
use super::groups::{accounts, GroupChange, GroupId};
use super::state::{corrupt, State};
use super::Event;
use crate::groups::{Changes, GroupMeta, Member};
use crate::store::Batch;
use crate::{Error, Result};

/// What the worker does next for a group.
pub(crate) enum GroupStep {
    /// Nothing to commit.
    Idle,
    /// Register the handle with the relay (`CreateGroup`) first.
    Register {
        handle: [u8; 16],
        token_hash: [u8; 32],
    },
    /// Send this commit (again).
    Send(GroupCommit),
    /// Fetch key packages of these accounts, then plan the head op.
    Fetch(Vec<AccountId>),
    /// Plan the head op (no key packages needed).
    Plan,
    /// Waiting for the inbox to reach the relay's epoch.
    Wait,
}

fn random16(rng: &mut (impl RngCore + CryptoRng)) -> [u8; 16] {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b
}

fn accounts_of(op: &GroupOpRecord) -> Vec<AccountId> {
    op.accounts
        .iter()
        .filter_map(|a| AccountId::try_from(&a[..]).ok())
        .collect()
}

/// One `RecipientAccount` per account of `members` (none without a token).
fn recipients(
    members: &[Member],
    token: impl Fn(&AccountId) -> Option<[u8; 32]>,
) -> Vec<RecipientAccount> {
    let mut out: Vec<RecipientAccount> = Vec::new();
    for m in members {
        match out.iter_mut().find(|r| r.account == m.account) {
            Some(r) => r.devices.push(m.device),
            None => {
                let Some(t) = token(&m.account) else { continue };
                out.push(RecipientAccount {
                    account: m.account,
                    delivery_token: t.to_vec().into(),
                    // Group sends go to the leaves of the roster, not to a device
                    // list: nothing to check against.
                    device_list_version: 0,
                    devices: vec![m.device],
                    parts: Vec::new(),
                })
            }
        }
    }
    out
}

impl State {
    /// Group ids with work for the worker.
    pub(crate) fn busy_groups(&self) -> Vec<Vec<u8>> {
        self.groups
            .iter()
            .filter(|(_, r)| !r.registered || r.pending.is_some() || !r.ops.is_empty())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The next step of `group`'s commit pipeline.
    pub(crate) fn group_step(&mut self, group: &[u8]) -> Result<GroupStep> {
        let Some(record) = self.groups.get(group).cloned() else {
            return Ok(GroupStep::Idle);
        };
        let session = self.session_mut(group)?;
        if !record.registered {
            let token_hash = session
                .token_hash()
                .map_err(|e| Error::Group(e.to_string()))?;
            let handle = record.handle[..].try_into().map_err(|_| corrupt())?;
            return Ok(GroupStep::Register { handle, token_hash });
        }
        if let Some(pending) = &record.pending {
            let wire =
                v1::GroupCommitRequest::decode(&pending.request[..]).map_err(|_| corrupt())?;
            let commit = GroupCommit::try_from(wire).map_err(|_| corrupt())?;
            return Ok(GroupStep::Send(commit));
        }
        if record.wait_epoch > session.epoch() {
            return Ok(GroupStep::Wait);
        }
        match record.ops.first() {
            None => Ok(GroupStep::Idle),
            Some(op) if op.kind == OP_ADD => Ok(GroupStep::Fetch(accounts_of(op))),
            Some(_) => Ok(GroupStep::Plan),
        }
    }

    /// The relay has the handle.
    pub(crate) fn group_registered(&mut self, group: &[u8]) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        record.registered = true;
        let mut batch = Batch::new();
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)
    }

    /// Whether a fetched key package may be added for `account`: its credential's
    /// account and identity key are the ones we hold, and it is not this device.
    pub(crate) fn acceptable_key_package(&self, account: &AccountId, kp: &[u8]) -> bool {
        let Ok(m) = crate::groups::GroupDevice::verify_key_package(kp) else {
            return false;
        };
        let pinned = if *account == self.keys.address.account {
            self.keys.identity_key.to_vec()
        } else {
            self.contacts
                .get(account)
                .map(|c| c.identity_key.clone())
                .unwrap_or_default()
        };
        m.account == *account
            && m.identity_key[..] == pinned[..]
            && !(m.account == self.keys.address.account && m.device == self.keys.address.device)
    }

    /// Plans `group`'s head op as one commit (with `key_packages` for an add),
    /// stored with its MLS state before it is returned. `None`: the op came to
    /// nothing (everyone already in, or gone) and was dropped.
    pub(crate) fn plan_commit(
        &mut self,
        group: &[u8],
        key_packages: Vec<Vec<u8>>,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Option<GroupCommit>> {
        let mut record = self.groups.get(group).cloned().ok_or(Error::UnknownGroup)?;
        let Some(op) = record.ops.first().cloned() else {
            return Ok(None);
        };
        let mut changes = Changes::default();
        match op.kind {
            OP_ADD => changes.add = key_packages,
            OP_REMOVE => changes.remove_accounts = accounts_of(&op),
            OP_META => {
                changes.meta =
                    Some(GroupMeta::decode(&op.meta).map_err(|e| Error::Group(e.to_string()))?)
            }
            _ => {
                let device = DeviceId::try_from(op.device).map_err(|_| corrupt())?;
                if let Some(account) = accounts_of(&op).first() {
                    changes.remove_devices = vec![(*account, device)];
                }
            }
        }
        // New members can send at once with the tokens we know.
        let before = self.session_mut(group)?.members();
        let mut tokens = e2e::MemberTokens::default();
        for m in &before {
            if tokens
                .tokens
                .iter()
                .any(|t| t.account_id == m.account.as_bytes()[..])
            {
                continue;
            }
            if let Some(t) = self.member_token(group, &m.account) {
                tokens.tokens.push(e2e::MemberToken {
                    account_id: m.account.as_bytes().to_vec().into(),
                    delivery_token: t.to_vec().into(),
                    device_list_version: 0,
                });
            }
        }
        changes.member_tokens = Some(tokens.encode_to_vec());
        let me = self.keys.address;
        let session = self.session_mut(group)?;
        let staged = session
            .commit(&changes, now_ms)
            .map_err(|e| Error::Group(e.to_string()))?;
        let planned = staged.value;
        let mut batch = Batch::new();
        batch.extend_ops(staged.ops);
        let nothing =
            planned.added.is_empty() && planned.removed.is_empty() && !planned.meta_changed;
        let others: Vec<Member> = before
            .into_iter()
            .filter(|m| !(m.account == me.account && m.device == me.device))
            .collect();
        let mut sends = Vec::new();
        let to_members = recipients(&others, |a| self.member_token(group, a));
        if !to_members.is_empty() {
            sends.push(MultiSend {
                message_id: MessageId(random16(rng)),
                body: planned.commit.clone().into(),
                recipients: to_members,
            });
        }
        if let Some(welcome) = &planned.welcome {
            let bytes = welcome.body();
            let to_new = recipients(&welcome.to, |a| self.member_token(group, a));
            if !to_new.is_empty() {
                sends.push(MultiSend {
                    message_id: MessageId(random16(rng)),
                    body: bytes.into(),
                    recipients: to_new,
                });
            }
        }
        if nothing || sends.is_empty() {
            // Nothing to commit (or nobody to tell): the op goes, the commit with it.
            let cleared = self
                .session_mut(group)?
                .clear_pending()
                .map_err(|e| Error::Group(e.to_string()))?;
            let mut batch = Batch::new();
            batch.extend_ops(cleared.ops);
            record.ops.remove(0);
            self.put_group(group, record, &mut batch);
            self.commit(batch, true)?;
            return Ok(None);
        }
        let handle: [u8; 16] = record.handle[..].try_into().map_err(|_| corrupt())?;
        let commit = GroupCommit {
            handle: GroupHandle(handle),
            epoch: planned.epoch,
            epoch_token: planned.epoch_token,
            next_token_hash: planned.next_token_hash,
            commit_id: CommitId(random16(rng)),
            sends,
        };
        record.pending = Some(PendingCommitRecord {
            request: v1::GroupCommitRequest::from(commit.clone()).encode_to_vec(),
            op: Some(op),
        });
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        Ok(Some(commit))
    }

    /// The relay took `group`'s pending commit: the group moves on, the op goes.
    pub(crate) fn commit_accepted(&mut self, group: &[u8]) -> Result<Vec<Event>> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(Vec::new());
        };
        let session = self.session_mut(group)?;
        let mut batch = Batch::new();
        let mut events = Vec::new();
        let gid = GroupId(group.try_into().map_err(|_| corrupt())?);
        // The inbox may have seen the winner first (our own commit never comes back).
        if session.has_pending() {
            let staged = session
                .apply_pending()
                .map_err(|e| Error::Group(e.to_string()))?;
            batch.extend_ops(staged.ops);
            let applied = staged.value;
            if !applied.added.is_empty() {
                events.push(Event::GroupChanged {
                    group: gid,
                    change: GroupChange::Added(accounts(&applied.added)),
                });
            }
            if !applied.removed.is_empty() {
                events.push(Event::GroupChanged {
                    group: gid,
                    change: GroupChange::Removed(accounts(&applied.removed)),
                });
            }
            if let Some(meta) = applied.meta {
                events.push(Event::GroupChanged {
                    group: gid,
                    change: GroupChange::Renamed { name: meta.name },
                });
            }
        }
        let done = record.pending.take().and_then(|p| p.op);
        if done.is_some() && record.ops.first() == done.as_ref() {
            record.ops.remove(0);
        }
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.prepare_group(group)?;
        Ok(events)
    }

    /// Another commit won the epoch (the relay is at `current`): ours is cleared;
    /// the op is planned again once the inbox has applied the winner.
    pub(crate) fn commit_stale(&mut self, group: &[u8], current: u64) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        let session = self.session_mut(group)?;
        let mut batch = Batch::new();
        if session.has_pending() {
            let staged = session
                .clear_pending()
                .map_err(|e| Error::Group(e.to_string()))?;
            batch.extend_ops(staged.ops);
        }
        record.pending = None;
        record.wait_epoch = current;
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.prepare_group(group)
    }

    /// The relay refused the commit for good (`UNKNOWN_GROUP`: the handle expired,
    /// or this device is no longer of the epoch): the op is dropped.
    pub(crate) fn commit_refused(&mut self, group: &[u8]) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        let session = self.session_mut(group)?;
        let mut batch = Batch::new();
        if session.has_pending() {
            let staged = session
                .clear_pending()
                .map_err(|e| Error::Group(e.to_string()))?;
            batch.extend_ops(staged.ops);
        }
        // The commit in flight always carries the head op.
        record.pending = None;
        if !record.ops.is_empty() {
            record.ops.remove(0);
        }
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.prepare_group(group)
    }
}
