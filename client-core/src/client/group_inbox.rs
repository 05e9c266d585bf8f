//! Group deliveries: a `0x02` shared body is routed by its envelope tag, checked
//! for duplicates (before MLS, which would refuse a replay as an error), processed
//! and stored with the MLS state it advanced in one batch; a `0x03` body is a
//! welcome, joined after its members' identity keys are checked against the
//! pinned ones.

use prost::Message;
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::AccountId;

use super::group_records::{
    dedup_account, GroupInboxRecord, GroupOpRecord, GroupRecord, MemberTokenRecord, OP_REMOVE,
};
use super::groups::{accounts, GroupChange, GroupId, GroupMessage, GROUP_ENVELOPE, GROUP_WELCOME};
use super::state::State;
use super::Event;
use crate::groups::Processed;
use crate::store::records::{seen_key, seq_key};
use crate::store::{Batch, InboxStore, Namespace};
use crate::{Error, Result};

impl State {
    /// A group delivery (`shared_body` a group envelope or a welcome): processed and
    /// stored (not durably), like [`State::receive`].
    pub(crate) fn receive_group(
        &mut self,
        message_id: &[u8],
        body: &[u8],
        now_ms: u64,
    ) -> Result<super::state::Outcome> {
        use super::state::Outcome;
        match body.first() {
            Some(&GROUP_ENVELOPE) => self.receive_envelope(message_id, body, now_ms),
            Some(&GROUP_WELCOME) => self.receive_welcome(message_id, &body[1..], now_ms),
            _ => Ok(Outcome::Dropped("an unknown kind of shared body".into())),
        }
    }

    fn seen_group(&self, key_account: &AccountId, message_id: &[u8]) -> Result<bool> {
        let seen = seen_key(key_account, message_id);
        Ok(self.unflushed_seen.contains(&seen) || self.kv.seen(key_account, message_id)?)
    }

    fn receive_welcome(
        &mut self,
        message_id: &[u8],
        body: &[u8],
        now_ms: u64,
    ) -> Result<super::state::Outcome> {
        use super::state::Outcome;
        let dedup = dedup_account(b"tern group welcome");
        if self.seen_group(&dedup, message_id)? {
            return Ok(Outcome::Duplicate);
        }
        let Ok(welcome) = e2e::GroupWelcome::decode(body) else {
            return Ok(Outcome::Dropped("a welcome that does not decode".into()));
        };
        let device = self.group_device()?;
        let joined = match device.join(&welcome.welcome, &welcome.ratchet_tree, now_ms) {
            Ok(joined) => joined,
            Err(crate::groups::GroupError::Store(e)) => return Err(e.into()),
            Err(e) => return Ok(Outcome::Dropped(format!("a welcome refused: {e}"))),
        };
        let session = joined.value.session;
        let id = session.group_id().to_vec();
        if self.groups.contains_key(&id) {
            return Ok(Outcome::Duplicate);
        }
        // Members' identity keys must be the ones pinned for contacts.
        for m in session.members() {
            if let Some(c) = self.contacts.get(&m.account) {
                if !c.identity_key.is_empty() && c.identity_key != m.identity_key {
                    return Ok(Outcome::Dropped(
                        "a welcome naming a contact under another identity key".into(),
                    ));
                }
            }
        }
        let mut record = GroupRecord {
            handle: session.handle().to_vec(),
            registered: true,
            announce: true,
            ..GroupRecord::default()
        };
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
        let mut batch = Batch::new();
        batch.extend_ops(joined.ops);
        batch.put_seen(&dedup, message_id, now_ms);
        self.put_group(&id, record, &mut batch);
        self.commit(batch, false)?;
        self.unflushed_seen.insert(seen_key(&dedup, message_id));
        self.group_sessions.insert(id.clone(), session);
        Ok(Outcome::Synced(vec![Event::GroupJoined {
            group: GroupId::of(&id)?,
            added_by: joined.value.added_by.account,
            name: joined.value.meta.name,
        }]))
    }

    fn receive_envelope(
        &mut self,
        message_id: &[u8],
        envelope: &[u8],
        now_ms: u64,
    ) -> Result<super::state::Outcome> {
        use super::state::Outcome;
        let routed = match self.group_device()?.route(envelope) {
            Ok(r) => r,
            Err(crate::groups::GroupError::Store(e)) => return Err(e.into()),
            Err(e) => return Ok(Outcome::Dropped(format!("group envelope: {e}"))),
        };
        let Some((group, _epoch)) = routed else {
            return Ok(Outcome::Dropped(
                "a group envelope of no known epoch".into(),
            ));
        };
        let dedup = dedup_account(&group);
        if self.seen_group(&dedup, message_id)? {
            return Ok(Outcome::Duplicate);
        }
        let Some(mut record) = self.groups.get(&group).cloned() else {
            return Ok(Outcome::Dropped("a group envelope of a group left".into()));
        };
        let session = self.session_mut(&group)?;
        let staged = match session.process(envelope, now_ms) {
            Ok(s) => s,
            Err(crate::groups::GroupError::Store(e)) => return Err(e.into()),
            Err(e) => return Ok(Outcome::Dropped(format!("group message: {e}"))),
        };
        let epoch = session.epoch();
        let gid = GroupId::of(&group)?;
        let mut batch = Batch::new();
        batch.extend_ops(staged.ops);
        batch.put_seen(&dedup, message_id, now_ms);
        let mut events = Vec::new();
        let mut local = self.local.clone();
        let mut inbox = None;
        match staged.value {
            Processed::Message { sender, content } => {
                let Ok(content) = e2e::GroupContent::decode(&content[..]) else {
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
                            group_id: group.clone(),
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
                if applied.removed_self {
                    batch.extend_ops(
                        self.group_device()?
                            .forget(&group)
                            .map_err(|e| Error::Group(e.to_string()))?,
                    );
                    batch.delete(Namespace::Groups, group.clone());
                    for seq in self.group_outbox_of(&group) {
                        batch.delete(Namespace::GroupOutbox, seq_key(seq));
                    }
                    batch.put_local(&local);
                    self.commit(batch, false)?;
                    self.forget_group_cache(&group);
                    self.unflushed_seen.insert(seen_key(&dedup, message_id));
                    return Ok(Outcome::Synced(vec![Event::GroupChanged {
                        group: gid,
                        change: GroupChange::RemovedSelf,
                    }]));
                }
                // Another member's commit took the epoch: ours (if any) lost.
                record.pending = None;
                if record.wait_epoch <= epoch {
                    record.wait_epoch = 0;
                }
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
        }
        batch.put_local(&local);
        self.put_group(&group, record, &mut batch);
        self.commit(batch, false)?;
        self.local = local;
        self.unflushed_seen.insert(seen_key(&dedup, message_id));
        if let Some((seq, r)) = inbox {
            events.push(Event::GroupMessage(GroupMessage::from_record(seq, &r)?));
        }
        Ok(Outcome::Synced(events))
    }
}
