//! The commit pipeline's state rules: a group's head op becomes one MLS commit and
//! one `GroupCommit` request, stored (with the MLS state that holds the commit
//! pending) before it leaves; the relay's answer applies it, or clears it to be
//! planned again after a `STALE_EPOCH`.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::{e2e, v1, AccountId, CommitId, DeviceId, GroupCommit, GroupHandle, MessageId};
use tern_proto::{MultiSend, MultiSendResult, RecipientAccount};

use super::group_meta::merge_meta;
use super::group_records::{
    GroupOpRecord, GroupOutboxRecord, GroupRecipient, GroupRecord, PendingCommitRecord, OP_ADD,
    OP_META, OP_READD_DEVICE, OP_REMOVE, OP_REMOVE_DEVICE,
};
use super::group_retry::{
    device_removal, refuse_token, refused_devices, verdict, ResendRecord, TokenWaitRecord, Verdict,
};
use super::groups::{commit_events, GroupId, GROUP_WELCOME};
use super::state::{corrupt, State};
use super::Event;
use crate::groups::{Changes, GroupMeta, Member};
use crate::store::records::seq_key;
use crate::store::{Batch, Namespace};
use crate::{Error, Result};

/// An op that renews this device's leaf (an empty commit with a new path).
pub(crate) const OP_UPDATE: u32 = 6;

/// What the worker does next for a group.
pub(crate) enum GroupStep {
    /// Nothing to commit now: no op, or the head op waits for a member's delivery
    /// token (the `MemberInfo` that brings it wakes the worker; its hourly round
    /// checks the bound).
    Idle,
    /// Register the handle with the relay (`CreateGroup`) first.
    Register {
        handle: [u8; 16],
        token_hash: [u8; 32],
    },
    /// Send this commit (again).
    Send(GroupCommit),
    /// Fetch key packages of these accounts (of this one device of theirs, for
    /// a re-add), then plan the head op.
    Fetch(Vec<AccountId>, Option<DeviceId>),
    /// Plan the head op (no key packages needed).
    Plan,
    /// Waiting for the inbox to reach the relay's epoch.
    Wait,
}

/// `interval` × U(1, 1.5).
fn jitter(interval: u64, rng: &mut impl RngCore) -> u64 {
    interval.saturating_add(rng.next_u64() % (interval / 2 + 1))
}

/// Whether a commit of this op carries an update path (renewing the committer's
/// leaf): every kind but an add-only commit (RFC 9420 §12.4).
fn renews_leaf(op: &GroupOpRecord) -> bool {
    op.kind != OP_ADD
}

fn random16(rng: &mut (impl RngCore + CryptoRng)) -> [u8; 16] {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b
}

/// The removal of every device of `accounts`.
pub(crate) fn removal(accounts: &[AccountId]) -> GroupOpRecord {
    GroupOpRecord {
        kind: OP_REMOVE,
        accounts: accounts.iter().map(|a| a.as_bytes().to_vec()).collect(),
        ..GroupOpRecord::default()
    }
}

/// Drops ops equal to an earlier one with nothing between them that undoes it (an
/// op of another kind on the same accounts): a repeated `LeaveRequest` must not
/// grow the queue, while "remove, add, remove" keeps all three. Metadata edits
/// are never dropped (in "rename X, Y, X" the last one counts). Whether any went.
pub(crate) fn dedup_ops(ops: &mut Vec<GroupOpRecord>) -> bool {
    let before = ops.len();
    let mut kept: Vec<GroupOpRecord> = Vec::with_capacity(before);
    for op in ops.drain(..) {
        let repeated = op.kind != OP_META
            && kept.iter().rposition(|k| *k == op).is_some_and(|i| {
                !kept[i + 1..].iter().any(|k| {
                    k.kind != op.kind && k.accounts.iter().any(|a| op.accounts.contains(a))
                })
            });
        if !repeated {
            kept.push(op);
        }
    }
    *ops = kept;
    ops.len() != before
}

/// Adds `devices` of `account` to `to`.
pub(crate) fn add_devices(to: &mut Vec<GroupRecipient>, account: &AccountId, devices: &[DeviceId]) {
    let devices = devices.iter().map(|d| d.get());
    match to.iter_mut().find(|r| r.account == account.as_bytes()) {
        Some(r) => {
            for d in devices {
                if !r.devices.contains(&d) {
                    r.devices.push(d);
                }
            }
        }
        None => to.push(GroupRecipient {
            account: account.as_bytes().to_vec(),
            devices: devices.collect(),
        }),
    }
}

pub(crate) fn accounts_of(op: &GroupOpRecord) -> Vec<AccountId> {
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
            .filter(|(_, r)| {
                !r.registered
                    || r.pending.is_some()
                    || !r.ops.is_empty()
                    || r.resends.iter().any(|x| x.commit)
                    || !r.tree_lost_waits.is_empty()
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Other members' accounts whose delivery token this device lacks (a commit
    /// could not reach them).
    pub(crate) fn tokenless(&mut self, group: &[u8]) -> Result<Vec<AccountId>> {
        let me = self.keys.address.account;
        let members = self.session_mut(group)?.members();
        let mut out: Vec<AccountId> = Vec::new();
        for m in members {
            if m.account != me
                && !out.contains(&m.account)
                && self.member_token(group, &m.account).is_none()
            {
                out.push(m.account);
            }
        }
        Ok(out)
    }

    /// [`State::next_group_step`] waiting for tokens without a bound.
    #[cfg(test)]
    pub(crate) fn group_step(&mut self, group: &[u8]) -> Result<GroupStep> {
        self.next_group_step(group, 0, u64::MAX)
    }

    /// The next step of `group`'s commit pipeline at `now_ms`. A head op waits
    /// while a member has no usable delivery token (its `MemberInfo` brings one);
    /// each such account is timed on its own, and those waited for
    /// `token_wait_ms` are removed first. A resent commit waiting for a token is
    /// timed the same way.
    pub(crate) fn next_group_step(
        &mut self,
        group: &[u8],
        now_ms: u64,
        token_wait_ms: u64,
    ) -> Result<GroupStep> {
        let Some(record) = self.groups.get(group).cloned() else {
            return Ok(GroupStep::Idle);
        };
        let session = self.session_mut(group)?;
        if !record.registered {
            let token_hash = session.token_hash().map_err(Error::group)?;
            let handle = record.handle[..].try_into().map_err(|_| corrupt())?;
            return Ok(GroupStep::Register { handle, token_hash });
        }
        if let Some(pending) = &record.pending {
            return Ok(GroupStep::Send(pending.commit()?));
        }
        if record.wait_epoch > session.epoch() {
            return Ok(GroupStep::Wait);
        }
        if record.ops.is_empty()
            && !record.resends.iter().any(|r| r.commit)
            && record.tree_lost_waits.is_empty()
        {
            return Ok(GroupStep::Idle);
        }
        let before = record.clone();
        let mut record = record;
        self.tree_lost_due(group, &mut record, now_ms)?;
        // Waits alone start no token-wait clocks.
        if record.ops.is_empty() && !record.resends.iter().any(|r| r.commit) {
            if record != before {
                let mut batch = Batch::new();
                self.put_group(group, record, &mut batch);
                self.commit(batch, true)?;
            }
            return Ok(GroupStep::Idle);
        }
        dedup_ops(&mut record.ops);
        self.drop_stale_readds(group, &mut record)?;
        // The members the head op removes need not be reached.
        let removed = match record.ops.first() {
            Some(op) if op.kind == OP_REMOVE => accounts_of(op),
            _ => Vec::new(),
        };
        let mut missing = self.tokenless(group)?;
        missing.retain(|a| !removed.contains(a));
        let legacy = std::mem::take(&mut record.token_wait_since_ms);
        record
            .token_waits
            .retain(|w| missing.iter().any(|a| a.as_bytes()[..] == w.account[..]));
        let mut past = Vec::new();
        for a in &missing {
            let since = match record
                .token_waits
                .iter()
                .find(|w| w.account == a.as_bytes())
            {
                Some(w) => w.since_ms,
                None => {
                    let since = if legacy > 0 { legacy } else { now_ms.max(1) };
                    record.token_waits.push(TokenWaitRecord {
                        account: a.as_bytes().to_vec(),
                        since_ms: since,
                    });
                    since
                }
            };
            if now_ms.saturating_sub(since) >= token_wait_ms {
                past.push(*a);
            }
        }
        if !past.is_empty() {
            // Unreachable past the bound: any commit would leave them behind, so
            // their removal is committed first.
            record
                .token_waits
                .retain(|w| !past.iter().any(|a| a.as_bytes()[..] == w.account[..]));
            record.ops.insert(0, removal(&past));
            missing.retain(|a| !past.contains(a));
        }
        if record != before {
            let mut batch = Batch::new();
            self.put_group(group, record.clone(), &mut batch);
            self.commit(batch, true)?;
        }
        if !missing.is_empty() {
            return Ok(GroupStep::Idle);
        }
        match record.ops.first() {
            None => Ok(GroupStep::Idle),
            Some(op) if op.kind == OP_ADD => Ok(GroupStep::Fetch(accounts_of(op), None)),
            // A re-add takes one package of that device, not one of each.
            Some(op) if op.kind == OP_READD_DEVICE => match DeviceId::try_from(op.device) {
                Ok(d) => Ok(GroupStep::Fetch(accounts_of(op), Some(d))),
                Err(_) => Ok(GroupStep::Plan),
            },
            Some(_) => Ok(GroupStep::Plan),
        }
    }

    /// Drops head `OP_READD_DEVICE`s that [`State::readd_changes`] would drop
    /// anyway (another epoch, a device no longer a leaf) before any key package is
    /// fetched for them.
    fn drop_stale_readds(&mut self, group: &[u8], record: &mut GroupRecord) -> Result<()> {
        while let Some(op) = record.ops.first() {
            if op.kind != OP_READD_DEVICE {
                break;
            }
            let (account, device) = (accounts_of(op).first().copied(), op.device);
            let session = self.session_mut(group)?;
            let leaf = session
                .members()
                .iter()
                .any(|m| Some(m.account) == account && m.device.get() == device);
            if leaf && session.epoch() == op.epoch {
                break;
            }
            tracing::debug!("a re-add dropped before its fetch: the group moved on");
            record.ops.remove(0);
        }
        Ok(())
    }

    /// Queues an update commit (OP_UPDATE) in every group where this device's leaf
    /// is due a renewal: `interval_ms` × U(1, 1.5) after it was last renewed
    /// (drawn anew each time, so members do not all update at once). When the
    /// account's delivery token changed, every device announces it again; the
    /// primary device alone also queues an update.
    pub(crate) fn queue_due_updates(
        &mut self,
        now_ms: u64,
        interval_ms: u64,
        rng: &mut impl RngCore,
    ) -> Result<()> {
        let token = self.keys.delivery_token.to_vec();
        let primary = self.keys.address.device == DeviceId::PRIMARY;
        let mut batch = Batch::new();
        let ids: Vec<Vec<u8>> = self.groups.keys().cloned().collect();
        for id in ids {
            let Some(old) = self.groups.get(&id).cloned() else {
                continue;
            };
            if old.leaving {
                continue;
            }
            let mut record = old.clone();
            if record.leaf_updated_ms == 0 {
                // First seen (created or joined): the leaf is new.
                record.leaf_updated_ms = now_ms.max(1);
            }
            if record.leaf_due_ms == 0 {
                record.leaf_due_ms = record
                    .leaf_updated_ms
                    .saturating_add(jitter(interval_ms, rng));
            }
            let mut due = now_ms >= record.leaf_due_ms;
            if record.announced_token.is_empty() {
                record.announced_token = token.clone();
            } else if record.announced_token != token {
                record.announce = true;
                due |= primary;
            }
            if due && !record.ops.iter().any(|op| op.kind == OP_UPDATE) {
                // The interval restarts now, so an update that comes to nothing
                // (nobody else in the group) is not queued again at once.
                record.leaf_updated_ms = now_ms.max(1);
                record.leaf_due_ms = now_ms.max(1).saturating_add(jitter(interval_ms, rng));
                record.ops.push(GroupOpRecord {
                    kind: OP_UPDATE,
                    ..GroupOpRecord::default()
                });
            }
            if record != old {
                self.put_group(&id, record, &mut batch);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.commit(batch, true)
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
                let edit = GroupMeta::decode(&op.meta).map_err(Error::group)?;
                let current = self.session_mut(group)?.meta().map_err(Error::group)?;
                changes.meta = Some(merge_meta(&current, &edit, op.meta_fields));
            }
            // An empty commit: a new path, this leaf's keys renewed.
            OP_UPDATE => {}
            OP_REMOVE_DEVICE => {
                let device = DeviceId::try_from(op.device).map_err(|_| corrupt())?;
                if let Some(account) = accounts_of(&op).first() {
                    changes.remove_devices = vec![(*account, device)];
                }
            }
            OP_READD_DEVICE => match self.readd_changes(group, &op, &key_packages)? {
                Some(readd) => changes = readd,
                None => return self.drop_head_op(group, record),
            },
            kind => {
                // Not a kind this client knows (a newer one's record): never guessed at.
                tracing::debug!(kind, "a group op of an unknown kind dropped");
                return self.drop_head_op(group, record);
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
        let staged = session.commit(&changes, now_ms).map_err(Error::group)?;
        let planned = staged.value;
        let mut batch = Batch::new();
        batch.extend_ops(staged.ops);
        let nothing = op.kind != OP_UPDATE
            && planned.added.is_empty()
            && planned.removed.is_empty()
            && !planned.meta_changed;
        let same = |a: &Member, b: &Member| a.account == b.account && a.device == b.device;
        let others: Vec<Member> = before
            .into_iter()
            .filter(|m| !(m.account == me.account && m.device == me.device))
            .collect();
        // Every device that stays must get the commit, or it forks: without a
        // token the op waits (`next_group_step` keeps it from coming back at once).
        let unreachable = others.iter().any(|m| {
            !planned.removed.iter().any(|r| same(r, m))
                && self.member_token(group, &m.account).is_none()
        });
        if unreachable {
            let batch = self.clear_pending_batch(group)?;
            self.commit(batch, true)?;
            return Ok(None);
        }
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
            let to_new = recipients(&welcome.to, |a| self.member_token(group, a));
            if !to_new.is_empty() {
                // Its tree inline, or as an attachment the worker uploads first.
                let bytes = self.welcome_body(group, welcome, &mut batch)?;
                sends.push(MultiSend {
                    message_id: MessageId(random16(rng)),
                    body: bytes.into(),
                    recipients: to_new,
                });
            }
        }
        if nothing || sends.is_empty() {
            // Nothing to commit (or nobody to tell): the op goes, the commit with it.
            let mut batch = self.clear_pending_batch(group)?;
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
            unsent: true,
            ..PendingCommitRecord::default()
        });
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        Ok(Some(commit))
    }

    /// Drops `group`'s head op before anything was committed for it.
    fn drop_head_op(
        &mut self,
        group: &[u8],
        mut record: GroupRecord,
    ) -> Result<Option<GroupCommit>> {
        let mut batch = Batch::new();
        if !record.ops.is_empty() {
            record.ops.remove(0);
        }
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        Ok(None)
    }

    /// [`State::commit_answered`] with no refusals.
    #[cfg(test)]
    pub(crate) fn commit_accepted(&mut self, group: &[u8]) -> Result<Vec<Event>> {
        self.commit_accepted_at(group, 0)
    }

    /// [`State::commit_accepted`] answered at `now_ms`.
    #[cfg(test)]
    pub(crate) fn commit_accepted_at(&mut self, group: &[u8], now_ms: u64) -> Result<Vec<Event>> {
        let sends = match self.groups.get(group).and_then(|r| r.pending.as_ref()) {
            Some(p) => p.commit()?.sends.len(),
            None => 0,
        };
        self.commit_answered(group, &vec![MultiSendResult::default(); sends], now_ms)
    }

    /// The relay took `group`'s pending commit (its answer per send in
    /// `results`): the group moves on, the op goes. Refused devices are judged by
    /// [`verdict`]: devices refused for now, or whose account refused the token,
    /// get the same bytes again (same message id) through the group outbox, ahead
    /// of the group's other messages; devices the relay does not know are queued
    /// for removal. Without one result per send (a retried commit whose first
    /// answer was lost: the relay keeps no results), every send goes again to all
    /// its recipients, who drop what they already have by its id.
    pub(crate) fn commit_answered(
        &mut self,
        group: &[u8],
        results: &[MultiSendResult],
        now_ms: u64,
    ) -> Result<Vec<Event>> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(Vec::new());
        };
        let session = self.session_mut(group)?;
        let mut batch = Batch::new();
        let mut events = Vec::new();
        let gid = GroupId(group.try_into().map_err(|_| corrupt())?);
        // The inbox may have seen the winner first (our own commit never comes back).
        if session.has_pending() {
            let staged = session.apply_pending().map_err(Error::group)?;
            batch.extend_ops(staged.ops);
            let members = session.members();
            let applied = &staged.value;
            record.note_new_leaves(&applied.new_leaves, applied.epoch, &members, now_ms);
            if !record.pending.as_ref().is_some_and(|p| p.tree_lost) {
                record.joined(&applied.new_leaves);
            }
            events = commit_events(gid, applied);
        }
        let pending = record.pending.take();
        Self::drop_tree_upload(group, &mut batch);
        let done = pending.as_ref().and_then(|p| p.op.clone());
        if done.is_some() && record.ops.first() == done.as_ref() {
            record.ops.remove(0);
        }
        if done.as_ref().is_some_and(renews_leaf) {
            record.leaf_updated_ms = now_ms.max(1);
            // Drawn again at the next look.
            record.leaf_due_ms = 0;
        }
        let sends = match &pending {
            Some(p) => p.commit()?.sends,
            None => Vec::new(),
        };
        // Refused tokens of members gone are of no more use.
        let members = self.session_mut(group)?.members();
        record.refused_tokens.retain(|t| {
            members
                .iter()
                .any(|m| m.account.as_bytes()[..] == t.account[..])
        });
        let own = self.keys.address.account;
        let lost = results.len() != sends.len();
        let tree_lost = pending.as_ref().is_some_and(|p| p.tree_lost);
        let mut resends = Vec::new();
        for (i, send) in sends.iter().enumerate() {
            let mut again: Vec<GroupRecipient> = Vec::new();
            if lost {
                for to in &send.recipients {
                    add_devices(&mut again, &to.account, &to.devices);
                }
            }
            for f in results
                .get(i)
                .filter(|_| !lost)
                .map_or(&[][..], |r| &r.refused)
            {
                let Some(to) = send.recipients.get(f.recipient as usize) else {
                    continue;
                };
                let devices = refused_devices(send, f);
                match verdict(f, &to.account, &own) {
                    Verdict::Retry => add_devices(&mut again, &to.account, &devices),
                    Verdict::TokenRefused => {
                        refuse_token(&mut record, &to.account, &to.delivery_token);
                        add_devices(&mut again, &to.account, &devices);
                    }
                    Verdict::DeviceGone => {
                        for d in devices {
                            record.ops.push(device_removal(&to.account, d));
                        }
                    }
                }
            }
            // A welcome without its tree is not sent again: its devices wait
            // for removal.
            let skip = tree_lost && send.body.first() == Some(&GROUP_WELCOME);
            if !again.is_empty() && !skip {
                resends.push(GroupOutboxRecord {
                    group_id: group.to_vec(),
                    message_id: send.message_id.0.to_vec(),
                    envelope: send.body.to_vec(),
                    to: again,
                    control: true,
                    ..GroupOutboxRecord::default()
                });
            }
        }
        if tree_lost {
            // Its welcome's tree may never have reached the relay: the devices
            // it added (waiting since the loss, `tree_upload_failed`) have a
            // full wait from now to show they joined (`group_tree.rs`).
            let added = pending.as_ref().map(welcome_devices).unwrap_or_default();
            for w in record.tree_lost_waits.iter_mut() {
                if added.contains(&(w.account.clone(), w.device)) {
                    w.since_ms = now_ms.max(1);
                }
            }
        }
        dedup_ops(&mut record.ops);
        let mut queued = Vec::new();
        if !resends.is_empty() {
            for r in resends {
                let seq = self.local.next_outbox_seq;
                self.local.next_outbox_seq += 1;
                batch.put(Namespace::GroupOutbox, seq_key(seq), &r);
                record.resends.push(ResendRecord {
                    seq,
                    first_ms: now_ms.max(1),
                    commit: true,
                });
                queued.push((seq, r));
            }
            batch.put_local(&self.local);
        }
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.group_outbox.extend(queued);
        self.prepare_group(group)?;
        Ok(events)
    }

    /// Another commit won the epoch (the relay is at `current`): ours is cleared;
    /// the op is planned again once the inbox has applied the winner.
    pub(crate) fn commit_stale(&mut self, group: &[u8], current: u64) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        let mut batch = self.clear_pending_batch(group)?;
        record.pending_lost();
        record.wait_epoch = current;
        record.stale_commits = record.stale_commits.saturating_add(1);
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.prepare_group(group)
    }

    /// A batch clearing `group`'s pending commit, if it has one, and its welcome's
    /// stored tree ciphertext.
    fn clear_pending_batch(&mut self, group: &[u8]) -> Result<Batch> {
        let session = self.session_mut(group)?;
        let mut batch = Batch::new();
        Self::drop_tree_upload(group, &mut batch);
        if session.has_pending() {
            let staged = session.clear_pending().map_err(Error::group)?;
            batch.extend_ops(staged.ops);
        }
        Ok(batch)
    }

    /// The relay refused the commit for good (`UNKNOWN_GROUP`: the handle expired,
    /// or this device is no longer of the epoch): the op is dropped.
    pub(crate) fn commit_refused(&mut self, group: &[u8]) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        let mut batch = self.clear_pending_batch(group)?;
        // The commit in flight always carries the head op.
        record.pending_lost();
        if !record.ops.is_empty() {
            record.ops.remove(0);
        }
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)?;
        self.prepare_group(group)
    }
}

/// The devices `pending`'s welcomes go to: (account, device).
pub(super) fn welcome_devices(pending: &PendingCommitRecord) -> Vec<(Vec<u8>, u32)> {
    let Ok(commit) = pending.commit() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for send in commit
        .sends
        .iter()
        .filter(|s| s.body.first() == Some(&GROUP_WELCOME))
    {
        for to in &send.recipients {
            for d in &to.devices {
                out.push((to.account.as_bytes().to_vec(), d.get()));
            }
        }
    }
    out
}

impl PendingCommitRecord {
    /// The commit as it was sent (stored encoded, so a resend is byte for byte).
    pub(super) fn commit(&self) -> Result<GroupCommit> {
        let wire = v1::GroupCommitRequest::decode(&self.request[..]).map_err(|_| corrupt())?;
        GroupCommit::try_from(wire).map_err(|_| corrupt())
    }
}
