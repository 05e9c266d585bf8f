//! Group deliveries: a `0x02` shared body is routed by its envelope tag, checked
//! for duplicates (before MLS, which would refuse a replay as an error), processed
//! and stored with the MLS state it advanced in one batch; a `0x03` body is a
//! welcome, joined after its members' identity keys are checked against the
//! pinned ones (a welcome whose tree is an attachment waits for the worker to
//! fetch it first: `group_tree.rs`).
//!
//! What is checked on receive:
//! - Every leaf's identity key against the key pinned for its account: this
//!   account's own, a contact's, or the first one this group showed (kept in
//!   [`GroupRecord::pins`]). A welcome naming a leaf under another key is
//!   dropped; a commit adding one is refused (not applied); a message from one is
//!   dropped. Both raise [`Event::GroupIdentityMismatch`].
//! - A welcome comes from this account or a contact not awaiting an identity
//!   decision, for a group this device is not in, once per group and epoch.
//! - Commits pass the MLS rules of `crate::groups::rules` (metadata and handle).
//! - An envelope under the tag of the epoch this device's own pending commit
//!   leads to proves the relay took that commit: it is applied first.
//! - An envelope under a tag of no known epoch is held (`held.rs`) and tried
//!   again after every commit or welcome applied.
//! - Any refusal is a dropped delivery (acknowledged): only a failing local
//!   store is an error, so nothing a sender does can stall the inbox.

mod held;

#[cfg(test)]
pub(crate) use held::{HELD_MAX, HELD_MAX_BYTES};

use prost::Message;
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::AccountId;

use super::group_commit::OP_UPDATE;
use super::group_meta::rebase_meta_op;
use super::group_records::{
    dedup_account, GroupInboxRecord, GroupOpRecord, GroupRecord, MemberTokenRecord, PinRecord,
    OP_META, OP_READD_DEVICE, OP_REMOVE,
};
use super::group_tree::WELCOME_DEDUP;
use super::groups::{
    commit_events, GroupChange, GroupId, GroupMessage, GROUP_ENVELOPE, GROUP_WELCOME,
};
use super::state::{Outcome, State};
use super::Event;
use crate::groups::{parse_welcome, GroupError, Member, Processed, WelcomeTree};
use crate::store::records::{seen_key, seq_key};
use crate::store::{Batch, InboxStore, Namespace, StoreError};
use crate::{Error, Result};

/// A group error on receive: a dropped delivery, unless the local store failed.
fn refused(e: GroupError, what: &str) -> Result<Outcome> {
    match e {
        GroupError::Store(e) if !matches!(e, StoreError::Corrupt) => Err(e.into()),
        e => Ok(Outcome::Dropped(format!("{what}: {e}"))),
    }
}

impl State {
    /// A group delivery (`shared_body` a group envelope or a welcome): processed and
    /// stored (not durably), like [`State::receive`]. Only a failing local store is
    /// an `Err`; anything else the delivery brings is dropped.
    pub(crate) fn receive_group(
        &mut self,
        message_id: &[u8],
        body: &[u8],
        now_ms: u64,
    ) -> Result<Outcome> {
        let out = match body.first() {
            Some(&GROUP_ENVELOPE) => self.receive_envelope(message_id, body, now_ms),
            Some(&GROUP_WELCOME) => self.receive_welcome(message_id, &body[1..], now_ms),
            _ => Ok(Outcome::Dropped("an unknown kind of shared body".into())),
        };
        match out {
            Err(Error::Store(e)) if !matches!(e, StoreError::Corrupt) => Err(Error::Store(e)),
            Err(e) => Ok(Outcome::Dropped(format!("a group delivery: {e}"))),
            ok => ok,
        }
    }

    fn seen_group(&self, key_account: &AccountId, message_id: &[u8]) -> Result<bool> {
        let seen = seen_key(key_account, message_id);
        Ok(self.unflushed_seen.contains(&seen) || self.kv.seen(key_account, message_id)?)
    }

    /// The identity key pinned for `account` in a group: this account's own, a
    /// contact's, or the first one the group showed.
    pub(crate) fn pinned_key(&self, record: &GroupRecord, account: &AccountId) -> Option<Vec<u8>> {
        if *account == self.keys.address.account {
            return Some(self.keys.identity_key.to_vec());
        }
        if let Some(c) = self.contacts.get(account) {
            if !c.identity_key.is_empty() {
                return Some(c.identity_key.clone());
            }
        }
        record
            .pins
            .iter()
            .find(|p| p.account == account.as_bytes())
            .map(|p| p.identity_key.clone())
    }

    /// The leaves whose identity key is not the pinned one; accounts seen for the
    /// first time are pinned in `record`.
    fn check_leaves(&self, record: &mut GroupRecord, leaves: &[Member]) -> Vec<Member> {
        let mut wrong = Vec::new();
        for m in leaves {
            match self.pinned_key(record, &m.account) {
                Some(key) if key == m.identity_key => {}
                Some(_) => wrong.push(m.clone()),
                None => record.pins.push(PinRecord {
                    account: m.account.as_bytes().to_vec(),
                    identity_key: m.identity_key.to_vec(),
                }),
            }
        }
        wrong
    }

    /// A welcome: joined at once with its tree inline, or held until the worker
    /// fetched its tree (`group_tree.rs`).
    fn receive_welcome(&mut self, message_id: &[u8], body: &[u8], now_ms: u64) -> Result<Outcome> {
        if self.seen_group(&dedup_account(WELCOME_DEDUP), message_id)? {
            return Ok(Outcome::Duplicate);
        }
        match parse_welcome(body) {
            Ok((welcome, WelcomeTree::Inline(tree))) => {
                self.join_welcome(message_id, &welcome, &tree, now_ms)
            }
            Ok((welcome, WelcomeTree::Pointer(pointer))) => {
                self.hold_welcome(message_id, welcome, pointer, now_ms)
            }
            Err(_) => Ok(Outcome::Dropped("a welcome that does not decode".into())),
        }
    }

    /// Joins from a welcome and its ratchet tree, after every check a welcome
    /// passes (stored, not durably).
    pub(super) fn join_welcome(
        &mut self,
        message_id: &[u8],
        welcome: &[u8],
        tree: &[u8],
        now_ms: u64,
    ) -> Result<Outcome> {
        let dedup = dedup_account(WELCOME_DEDUP);
        if self.seen_group(&dedup, message_id)? {
            return Ok(Outcome::Duplicate);
        }
        let device = self.group_device()?;
        let joined = match device.join(welcome, tree, now_ms) {
            Ok(joined) => joined,
            Err(e) => return refused(e, "a welcome refused"),
        };
        let session = joined.value.session;
        let id = session.group_id().to_vec();
        // Once per group and epoch: a relay replaying a welcome (one made with a
        // last-resort key package still joins) cannot bring back a group this
        // device is in, left, or was removed from at that epoch.
        let mut group_epoch = id.clone();
        group_epoch.extend_from_slice(&session.epoch().to_be_bytes());
        if self.seen_group(&dedup, &group_epoch)? {
            return Ok(Outcome::Duplicate);
        }
        // A group this device is in: only a re-add of a device left behind, to a
        // later epoch of the same group (same handle), replaces the stale state.
        let stale = match self.groups.get(&id).cloned() {
            None => None,
            Some(old) if old.leaving => {
                return Ok(Outcome::Dropped("a welcome to a group being left".into()));
            }
            Some(old) => {
                let current = self.session_mut(&id).ok().map(|s| s.epoch());
                let behind = old.behind_since_ms != 0 || current.is_none_or(|e| old.wait_epoch > e);
                if !behind
                    || old.handle != session.handle()
                    || current.is_some_and(|e| session.epoch() <= e)
                {
                    return Ok(Outcome::Duplicate);
                }
                Some(old)
            }
        };
        let added_by = joined.value.added_by;
        let own = added_by.account == self.keys.address.account;
        let trusted = own
            || self
                .contacts
                .get(&added_by.account)
                .is_some_and(|c| !c.identity_key.is_empty() && !c.blocked());
        if !trusted {
            return Ok(Outcome::Dropped(
                "a welcome from an account that is not a contact".into(),
            ));
        }
        // The metadata as this device last saw it, for its kept edits.
        let stale_meta = match &stale {
            Some(_) => self.session_mut(&id).ok().and_then(|s| s.meta().ok()),
            None => None,
        };
        let mut dropped_ops = 0;
        let mut record = GroupRecord {
            handle: session.handle().to_vec(),
            registered: true,
            announce: true,
            // Keys first seen in the group stay pinned across a re-add.
            pins: stale.as_ref().map(|r| r.pins.clone()).unwrap_or_default(),
            // Asked to re-add this device should it be left behind.
            added_by: added_by.account.as_bytes().to_vec(),
            ops_user: true,
            ..GroupRecord::default()
        };
        if let Some(stale) = &stale {
            // What the user asked for while behind still goes out; what this
            // device decided from its stale view (removals of devices it could
            // not reach, an update, a re-add) does not. A metadata edit leaves
            // out the fields another member changed since (`rebase_meta_op`).
            // Re-adds this device took stay counted; re-added by its own
            // account, it keeps asking the account that first added it.
            // Ops an older client queued carry no `user`: only re-adds and
            // updates are known not to be the user's.
            let users = |o: &GroupOpRecord| match stale.ops_user {
                true => o.user,
                false => !matches!(o.kind, OP_READD_DEVICE | OP_UPDATE),
            };
            for o in stale.ops.iter().filter(|o| users(o)) {
                let kept = match (o.kind, &stale_meta) {
                    (OP_META, Some(m)) => rebase_meta_op(o, m, &joined.value.meta),
                    (OP_META, None) => None,
                    _ => Some(o.clone()),
                };
                match kept {
                    Some(o) => record.ops.push(GroupOpRecord { user: true, ..o }),
                    None => dropped_ops += 1,
                }
            }
            record.readds = stale.readds.clone();
            // Tree-lost waits go: judged from a stale view, they could remove a
            // device that joined while this one was behind.
            if own && !stale.added_by.is_empty() {
                record.added_by = stale.added_by.clone();
            }
        }
        if !self
            .check_leaves(&mut record, &session.members())
            .is_empty()
        {
            return Ok(Outcome::Dropped(
                "a welcome naming an account under another identity key".into(),
            ));
        }
        if let Some(tokens) = joined
            .value
            .member_tokens
            .and_then(|t| e2e::MemberTokens::decode(&t[..]).ok())
        {
            for t in tokens.tokens {
                if t.delivery_token.len() == 32 {
                    record.tokens.push(MemberTokenRecord {
                        account: t.account_id.to_vec(),
                        token: t.delivery_token.to_vec(),
                    });
                }
            }
        }
        let gid = GroupId::of(&id)?;
        let mut batch = Batch::new();
        if stale.is_some() {
            // Its queued messages were for epochs nobody reads any more.
            self.stage_forget_group(&id, &mut batch)?;
            self.forget_group_cache(&id);
        }
        batch.extend_ops(joined.ops);
        batch.put_seen(&dedup, message_id, now_ms);
        batch.put_seen(&dedup, &group_epoch, now_ms);
        self.put_group(&id, record, &mut batch);
        if let Err(e) = self.commit(batch, false) {
            self.group_sessions.remove(&id);
            return Err(e);
        }
        self.unflushed_seen.insert(seen_key(&dedup, message_id));
        self.unflushed_seen.insert(seen_key(&dedup, &group_epoch));
        self.group_sessions.insert(id, session);
        let mut events = vec![Event::GroupJoined {
            group: gid,
            added_by: added_by.account,
            name: joined.value.meta.name,
        }];
        // The app hears of what its user asked for that no longer goes out.
        for _ in 0..dropped_ops {
            events.push(Event::Dropped {
                reason: "a group change dropped: the group changed it since".into(),
            });
        }
        events.append(&mut self.retry_held(now_ms)?);
        Ok(Outcome::Synced(events))
    }

    /// The group whose pending commit (this device's) leads to the epoch of `tag`:
    /// that commit's MLS side is applied (the relay took it: a member already
    /// sends in its epoch). Its record stays pending for the relay's answer, which
    /// still has the per-device refusals to handle. Returns its events.
    fn apply_own_commit_for(&mut self, tag: &[u8; 16], now_ms: u64) -> Result<Option<Vec<Event>>> {
        let pending: Vec<Vec<u8>> = self
            .groups
            .iter()
            .filter(|(_, r)| r.pending.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for group in pending {
            let next = self
                .session_mut(&group)?
                .pending_tag()
                .map_err(Error::group)?;
            if next.as_ref() != Some(tag) {
                continue;
            }
            let gid = GroupId::of(&group)?;
            let staged = self
                .session_mut(&group)?
                .apply_pending()
                .map_err(Error::group)?;
            let mut batch = Batch::new();
            batch.extend_ops(staged.ops);
            if let Some(mut record) = self.groups.get(&group).cloned() {
                let members = self.session_mut(&group)?.members();
                let applied = &staged.value;
                record.note_new_leaves(&applied.new_leaves, applied.epoch, &members, now_ms);
                if !record.pending.as_ref().is_some_and(|p| p.tree_lost) {
                    record.joined(&applied.new_leaves);
                }
                self.put_group(&group, record, &mut batch);
            }
            if let Err(e) = self.commit(batch, false) {
                self.group_sessions.remove(&group);
                return Err(e);
            }
            return Ok(Some(commit_events(gid, &staged.value)));
        }
        Ok(None)
    }

    /// The group of `tag`'s epoch; failing that, this device's pending commit that
    /// leads to it is applied first (its events go to `events`, `applied` set).
    fn route_tag(
        &mut self,
        tag: &[u8; 16],
        now_ms: u64,
        events: &mut Vec<Event>,
        applied: &mut bool,
    ) -> Result<Option<Vec<u8>>> {
        let route = |state: &Self| -> Result<Option<Vec<u8>>> {
            match state.group_device()?.route_tag(tag) {
                Ok(r) => Ok(r.map(|(group, _epoch)| group)),
                Err(GroupError::Store(e)) => Err(e.into()),
                Err(e) => Err(Error::group(e)),
            }
        };
        if let Some(group) = route(self)? {
            return Ok(Some(group));
        }
        match self.apply_own_commit_for(tag, now_ms)? {
            Some(mut applied_events) => {
                *applied = true;
                events.append(&mut applied_events);
                route(self)
            }
            None => Ok(None),
        }
    }

    fn receive_envelope(
        &mut self,
        message_id: &[u8],
        envelope: &[u8],
        now_ms: u64,
    ) -> Result<Outcome> {
        let tag = match crate::groups::envelope_tag(envelope) {
            Ok(t) => t,
            Err(e) => return refused(e, "group envelope"),
        };
        let mut events = Vec::new();
        let mut applied = false;
        let Some(group) = self.route_tag(&tag, now_ms, &mut events, &mut applied)? else {
            return self.hold_envelope(message_id, envelope, &tag, now_ms);
        };
        let out =
            self.process_routed(&group, message_id, envelope, now_ms, events, &mut applied)?;
        if !applied {
            return Ok(out);
        }
        // A new epoch: what waited for it may route now.
        let mut more = self.retry_held(now_ms)?;
        if more.is_empty() {
            return Ok(out);
        }
        Ok(Outcome::Synced(match out {
            Outcome::Synced(mut e) => {
                e.append(&mut more);
                e
            }
            Outcome::Dropped(reason) => {
                more.insert(0, Event::Dropped { reason });
                more
            }
            _ => more,
        }))
    }

    /// Processes an envelope routed to `group`, after `events` (of our pending
    /// commit applied for it); `applied` is set when it is a commit applied.
    fn process_routed(
        &mut self,
        group: &[u8],
        message_id: &[u8],
        envelope: &[u8],
        now_ms: u64,
        mut events: Vec<Event>,
        applied: &mut bool,
    ) -> Result<Outcome> {
        let out = self.process_envelope(group, message_id, envelope, now_ms, &mut events, applied);
        if !matches!(out, Ok(Outcome::Synced(_) | Outcome::Duplicate)) {
            // What was processed and not stored must not stay in the cache.
            self.group_sessions.remove(group);
        }
        match out {
            Ok(Outcome::Synced(mut more)) => {
                events.append(&mut more);
                Ok(Outcome::Synced(events))
            }
            // The pending commit applied first is stored; its events still count.
            Ok(other) if !events.is_empty() => {
                if let Outcome::Dropped(reason) = other {
                    tracing::debug!(%reason, "discarded a group envelope");
                }
                Ok(Outcome::Synced(events))
            }
            other => other,
        }
    }

    fn process_envelope(
        &mut self,
        group: &[u8],
        message_id: &[u8],
        envelope: &[u8],
        now_ms: u64,
        events: &mut Vec<Event>,
        applied_epoch: &mut bool,
    ) -> Result<Outcome> {
        let dedup = dedup_account(group);
        if self.seen_group(&dedup, message_id)? {
            return Ok(Outcome::Duplicate);
        }
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(Outcome::Dropped("a group envelope of a group left".into()));
        };
        let gid = GroupId::of(group)?;
        let session = self.session_mut(group)?;
        let staged = match session.process(envelope, now_ms) {
            Ok(s) => s,
            Err(e) => return refused(e, "group message"),
        };
        let epoch = session.epoch();
        let mut batch = Batch::new();
        batch.put_seen(&dedup, message_id, now_ms);
        let mut local = self.local.clone();
        let mut inbox = None;
        match staged.value {
            Processed::Message { sender, content } => {
                // The ratchet moved: stored whatever the content comes to.
                batch.extend_ops(staged.ops);
                if !self
                    .check_leaves(&mut record, std::slice::from_ref(&sender))
                    .is_empty()
                {
                    self.put_group(group, record, &mut batch);
                    self.commit(batch, false)?;
                    self.unflushed_seen.insert(seen_key(&dedup, message_id));
                    return Ok(Outcome::Synced(vec![Event::GroupIdentityMismatch {
                        group: gid,
                        account: sender.account,
                    }]));
                }
                // It joined: a welcome sent without its tree reached it.
                record.joined(std::slice::from_ref(&sender));
                let Ok(content) = e2e::GroupContent::decode(&content[..]) else {
                    self.put_group(group, record, &mut batch);
                    self.commit(batch, false)?;
                    self.unflushed_seen.insert(seen_key(&dedup, message_id));
                    return Ok(Outcome::Dropped(
                        "group content that does not decode".into(),
                    ));
                };
                match content.control {
                    Some(Control::MemberInfo(info)) => {
                        if info.delivery_token.len() == 32 {
                            record
                                .tokens
                                .retain(|t| t.account != sender.account.as_bytes());
                            record.tokens.push(MemberTokenRecord {
                                account: sender.account.as_bytes().to_vec(),
                                token: info.delivery_token.to_vec(),
                            });
                        }
                    }
                    Some(Control::Leave(_)) => {
                        // Every remaining member queues the removal; one commit wins
                        // and the others' plans find nobody left to remove.
                        if sender.account != self.keys.address.account {
                            record.ops.push(GroupOpRecord {
                                kind: OP_REMOVE,
                                accounts: vec![sender.account.as_bytes().to_vec()],
                                ..GroupOpRecord::default()
                            });
                        }
                    }
                    None => {
                        let seq = local.next_inbox_seq;
                        local.next_inbox_seq += 1;
                        let r = GroupInboxRecord {
                            group_id: group.to_vec(),
                            sender: sender.account.as_bytes().to_vec(),
                            sender_device: sender.device.get(),
                            message_id: message_id.to_vec(),
                            body: content.body.to_vec(),
                            sent_at_ms: content.sent_at_ms,
                            received_at_ms: now_ms,
                            attachments: content
                                .attachments
                                .iter()
                                .map(Message::encode_to_vec)
                                .collect(),
                        };
                        batch.put(Namespace::GroupInbox, seq_key(seq), &r);
                        inbox = Some((seq, r));
                    }
                }
            }
            Processed::Commit(applied) => {
                let wrong = self.check_leaves(&mut record, &applied.added);
                if let Some(m) = wrong.first() {
                    // Not applied: the staged writes go, the cache is reloaded. The
                    // group's later epochs cannot reach this device any more.
                    self.group_sessions.remove(group);
                    if let Some(mut marked) = self.groups.get(group).cloned() {
                        if marked.behind_since_ms == 0 {
                            marked.behind_since_ms = now_ms;
                            self.put_group(group, marked, &mut batch);
                        }
                    }
                    self.commit(batch, false)?;
                    self.unflushed_seen.insert(seen_key(&dedup, message_id));
                    tracing::debug!("a commit adding a leaf under another identity key");
                    return Ok(Outcome::Synced(vec![Event::GroupIdentityMismatch {
                        group: gid,
                        account: m.account,
                    }]));
                }
                batch.extend_ops(staged.ops);
                *applied_epoch = true;
                if applied.removed_self {
                    self.stage_forget_group(group, &mut batch)?;
                    batch.put_local(&local);
                    self.commit(batch, false)?;
                    self.forget_group_cache(group);
                    self.unflushed_seen.insert(seen_key(&dedup, message_id));
                    return Ok(Outcome::Synced(vec![Event::GroupChanged {
                        group: gid,
                        change: GroupChange::RemovedSelf,
                    }]));
                }
                // Another member's commit took the epoch: ours (if any) lost,
                // and its welcome's tree with it.
                record.pending_lost();
                Self::drop_tree_upload(group, &mut batch);
                if record.wait_epoch <= epoch {
                    record.wait_epoch = 0;
                }
                let members = self.session_mut(group)?.members();
                record.note_new_leaves(&applied.new_leaves, applied.epoch, &members, now_ms);
                // Its committer joined; a device re-added has a new welcome.
                record.joined(std::slice::from_ref(&applied.committer));
                record.joined(&applied.new_leaves);
                events.extend(commit_events(gid, &applied));
            }
        }
        batch.put_local(&local);
        self.put_group(group, record, &mut batch);
        self.commit(batch, false)?;
        self.local = local;
        self.unflushed_seen.insert(seen_key(&dedup, message_id));
        let mut out = Vec::new();
        if let Some((seq, r)) = inbox {
            out.push(Event::GroupMessage(GroupMessage::from_record(seq, &r)?));
        }
        Ok(Outcome::Synced(out))
    }
}
