//! Groups on MLS, the client's side of them (the MLS core is `crate::groups`): the
//! public types, and the state rules, without a network. Each MLS transition is
//! written in the same atomic batch as its effect (the outbox envelope, the inbox
//! record, the commit in flight), so a restart at any point loses nothing and
//! repeats nothing.
//!
//! - **Create**: the group exists at once on this device (epoch 0); the worker
//!   registers its handle with the relay and commits the adds queued with it.
//! - **Membership** (add, remove, leave's removal by the others, metadata): ops
//!   queued per group, committed one at a time by the worker (`group_send.rs`). A
//!   commit the relay refuses as stale is cleared; the op waits until the inbox has
//!   applied the winner and is planned again against the new roster.
//! - **Messages**: encrypted when queued (or, with a commit in flight, once it is
//!   answered), for the devices of that epoch; one `MultiSend` per message.
//! - **Receiving**: a `0x02` shared body is routed by its tag, checked for
//!   duplicates, processed, and stored; a `0x03` body is a welcome.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::e2e::{self, group_content::Control};
use tern_proto::{AccountId, DeviceId, MessageId};

use super::group_records::{
    GroupInboxRecord, GroupOpRecord, GroupOutboxRecord, GroupRecipient, GroupRecord, OP_ADD,
    OP_REMOVE,
};
use super::outbox::MAX_BODY;
use super::state::{corrupt, State};
use super::Event;
use crate::groups::{CommitApplied, GroupDevice, GroupMeta, GroupSession, Member};
use crate::media::AttachmentPointer;
use crate::store::records::seq_key;
use crate::store::{Batch, Namespace};
use crate::{Error, Result};

/// The first byte of a shared body that is a group envelope, and of a welcome.
pub(crate) use crate::groups::{
    wrap::ENVELOPE_KIND as GROUP_ENVELOPE, WELCOME_KIND as GROUP_WELCOME,
};

/// A group's id on this device (the MLS group id; never sent to the relay).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; 32]);

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A prefix is enough to tell groups apart in a log.
        write!(f, "GroupId({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

impl GroupId {
    pub(super) fn of(bytes: &[u8]) -> Result<GroupId> {
        Ok(GroupId(bytes.try_into().map_err(|_| corrupt())?))
    }
}

/// How this device keeps its groups: set through
/// [`ClientOptions`](super::ClientOptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupSettings {
    /// A leaf renewed this long ago (× U(1, 1.5), drawn per renewal) is renewed
    /// by an update commit.
    pub(crate) update_interval_ms: u64,
    /// How long a commit waits for a member's delivery token (timed per account)
    /// before removing the member it cannot reach.
    pub(crate) token_wait_ms: u64,
    /// The largest welcome body sent with its ratchet tree inline.
    pub(crate) welcome_inline_max: usize,
    /// How long a `STALE_EPOCH` wait may stay unmet after the mailbox was read to
    /// its end before this device asks to be re-added.
    pub(crate) rejoin_after_ms: u64,
    /// How long one download of a welcome's ratchet tree may take (None: a
    /// minute and a second per 64 KiB).
    pub(crate) tree_download_timeout_ms: Option<u64>,
}

/// The default of [`ClientOptions::group_update_interval`](super::ClientOptions::group_update_interval): 7 days.
pub const GROUP_UPDATE_INTERVAL: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 3600);
/// The default of [`ClientOptions::group_token_wait`](super::ClientOptions::group_token_wait): 7 days.
pub const GROUP_TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The default of [`ClientOptions::group_rejoin_after`](super::ClientOptions::group_rejoin_after): 1 day.
pub const GROUP_REJOIN_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            update_interval_ms: GROUP_UPDATE_INTERVAL.as_millis() as u64,
            token_wait_ms: GROUP_TOKEN_WAIT.as_millis() as u64,
            welcome_inline_max: super::group_tree::WELCOME_INLINE_MAX,
            rejoin_after_ms: GROUP_REJOIN_AFTER.as_millis() as u64,
            tree_download_timeout_ms: None,
        }
    }
}

/// A group as this device sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its picture (an uploaded attachment), if it has one.
    pub picture: Option<AttachmentPointer>,
    /// Member accounts (this one included), each once.
    pub members: Vec<AccountId>,
    /// Membership operations not yet committed.
    pub pending_ops: usize,
    /// Members this device has no delivery token for yet: its commits wait for
    /// their announcement (at most the client's
    /// [`group_token_wait`](super::ClientOptions::group_token_wait), then they are
    /// removed).
    pub unreachable: Vec<AccountId>,
    /// The group's epoch on this device (it moves with every commit: membership,
    /// metadata, key updates).
    pub epoch: u64,
    /// How many commits of this device lost their epoch to another member's
    /// (`STALE_EPOCH`) and were planned again.
    pub rebased_commits: u64,
}

/// A group message, stored on the device until the app confirms it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    /// Position in this device's inbox; pass it to [`Client::confirm`](super::Client::confirm).
    pub seq: u64,
    /// The group.
    pub group: GroupId,
    /// The sender's account (its MLS leaf, checked against its identity key).
    pub sender: AccountId,
    /// The sender's device.
    pub sender_device: DeviceId,
    /// The sender's id for this message.
    pub message_id: MessageId,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// The sender's clock when it was sent (Unix ms; the sender's claim).
    pub sent_at_ms: u64,
    /// When this device decrypted it (Unix ms).
    pub received_at_ms: u64,
    /// Attachments it points at.
    pub attachments: Vec<AttachmentPointer>,
}

impl GroupMessage {
    pub(super) fn from_record(seq: u64, r: &GroupInboxRecord) -> Result<Self> {
        Ok(GroupMessage {
            seq,
            group: GroupId::of(&r.group_id)?,
            sender: AccountId::try_from(&r.sender[..]).map_err(|_| corrupt())?,
            sender_device: DeviceId::try_from(r.sender_device).map_err(|_| corrupt())?,
            message_id: MessageId(r.message_id[..].try_into().map_err(|_| corrupt())?),
            body: r.body.clone(),
            sent_at_ms: r.sent_at_ms,
            received_at_ms: r.received_at_ms,
            attachments: r
                .attachments
                .iter()
                .filter_map(|a| AttachmentPointer::from_bytes(a).ok())
                .collect(),
        })
    }
}

/// How a group's membership changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupChange {
    /// These accounts (or new devices of them) joined.
    Added(Vec<AccountId>),
    /// These accounts (or devices of them) were removed.
    Removed(Vec<AccountId>),
    /// This device left the group.
    Left,
    /// This device was removed from the group: it reads nothing more of it.
    RemovedSelf,
    /// The name, description or picture changed (the new ones are in
    /// [`Client::groups`](super::Client::groups)).
    Renamed {
        /// The new name.
        name: String,
    },
}

/// The events of an applied commit, for this device's own commits and the
/// members' alike: accounts added, accounts removed, metadata changed.
pub(super) fn commit_events(group: GroupId, applied: &CommitApplied) -> Vec<Event> {
    let mut events = Vec::new();
    if !applied.added.is_empty() {
        events.push(Event::GroupChanged {
            group,
            change: GroupChange::Added(accounts(&applied.added)),
        });
    }
    if !applied.removed.is_empty() {
        events.push(Event::GroupChanged {
            group,
            change: GroupChange::Removed(accounts(&applied.removed)),
        });
    }
    if let Some(meta) = &applied.meta {
        events.push(Event::GroupChanged {
            group,
            change: GroupChange::Renamed {
                name: meta.name.clone(),
            },
        });
    }
    events
}

pub(super) fn accounts(members: &[Member]) -> Vec<AccountId> {
    let mut out: Vec<AccountId> = Vec::new();
    for m in members {
        if !out.contains(&m.account) {
            out.push(m.account);
        }
    }
    out
}

impl State {
    pub(super) fn group_device(&self) -> Result<&GroupDevice> {
        self.group_device
            .as_ref()
            .ok_or_else(|| Error::Group("this device has no group credential".into()))
    }

    /// The session of `group`, loaded into the cache if needed.
    pub(super) fn session_mut(&mut self, group: &[u8]) -> Result<&mut GroupSession> {
        if !self.group_sessions.contains_key(group) {
            let session = self
                .group_device()?
                .load(group)
                .map_err(Error::group)?
                .ok_or(Error::UnknownGroup)?;
            self.group_sessions.insert(group.to_vec(), session);
        }
        self.group_sessions
            .get_mut(group)
            .ok_or(Error::UnknownGroup)
    }

    pub(super) fn put_group(&mut self, id: &[u8], mut record: GroupRecord, batch: &mut Batch) {
        // No op an older client wrote is left: all carry `user` from now on.
        record.ops_user |= record.ops.is_empty();
        batch.put(Namespace::Groups, id.to_vec(), &record);
        self.groups.insert(id.to_vec(), record);
    }

    /// Accounts named for a group must be contacts whose token we hold (a member
    /// without one could never be sent to).
    fn check_contacts(&self, contacts: &[AccountId]) -> Result<Vec<AccountId>> {
        let own = self.keys.address.account;
        let mut out = Vec::new();
        for c in contacts {
            if *c == own || out.contains(c) {
                continue;
            }
            let contact = self.contacts.get(c).ok_or(Error::NotAContact)?;
            if contact.blocked() {
                return Err(Error::UntrustedIdentity);
            }
            if self.token_of(c).is_none() {
                return Err(Error::NotAContact);
            }
            out.push(*c);
        }
        Ok(out)
    }

    /// Creates a group with this device its only member and queues the adds of
    /// `contacts` (and of this account's other devices): stored before it returns.
    pub(crate) fn create_group(
        &mut self,
        name: &str,
        contacts: &[AccountId],
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<GroupId> {
        let mut add = self.check_contacts(contacts)?;
        if self.has_other_devices() {
            add.push(self.keys.address.account);
        }
        let mut id = [0u8; 32];
        rng.fill_bytes(&mut id);
        let mut handle = [0u8; 16];
        rng.fill_bytes(&mut handle);
        let meta = GroupMeta {
            handle,
            name: name.to_string(),
            description: String::new(),
            picture: None,
        };
        if meta.check().is_err() {
            return Err(Error::TooLarge {
                max: crate::groups::meta::MAX_NAME,
            });
        }
        let staged = self
            .group_device()?
            .create(id, &meta, now_ms)
            .map_err(Error::group)?;
        let mut batch = Batch::new();
        batch.extend_ops(staged.ops);
        let mut record = GroupRecord {
            handle: handle.to_vec(),
            ..GroupRecord::default()
        };
        if !add.is_empty() {
            record.ops.push(GroupOpRecord {
                kind: OP_ADD,
                accounts: add.iter().map(|a| a.as_bytes().to_vec()).collect(),
                user: true,
                ..GroupOpRecord::default()
            });
        }
        self.put_group(&id, record, &mut batch);
        self.commit(batch, true)?;
        self.group_sessions.insert(id.to_vec(), staged.value);
        Ok(GroupId(id))
    }

    /// Queues a membership op for `group`: stored before it returns.
    pub(crate) fn queue_group_op(&mut self, group: &GroupId, op: GroupOpRecord) -> Result<()> {
        let mut record = self
            .groups
            .get(&group.0[..])
            .cloned()
            .ok_or(Error::UnknownGroup)?;
        if record.leaving {
            return Err(Error::LeavingGroup);
        }
        record.ops.push(op);
        let mut batch = Batch::new();
        self.put_group(&group.0, record, &mut batch);
        self.commit(batch, true)
    }

    /// Queues the adds of `contacts` to `group`.
    pub(crate) fn add_group_members(
        &mut self,
        group: &GroupId,
        contacts: &[AccountId],
    ) -> Result<()> {
        let add = self.check_contacts(contacts)?;
        if add.is_empty() {
            return Err(Error::NoRecipients);
        }
        let op = GroupOpRecord {
            kind: OP_ADD,
            accounts: add.iter().map(|a| a.as_bytes().to_vec()).collect(),
            user: true,
            ..GroupOpRecord::default()
        };
        self.queue_group_op(group, op)
    }

    /// Queues the removal of every device of `member` from `group`.
    pub(crate) fn remove_group_member(
        &mut self,
        group: &GroupId,
        member: &AccountId,
    ) -> Result<()> {
        let op = GroupOpRecord {
            kind: OP_REMOVE,
            accounts: vec![member.as_bytes().to_vec()],
            user: true,
            ..GroupOpRecord::default()
        };
        self.queue_group_op(group, op)
    }

    /// A device joined this account: every group queues the add of its devices
    /// (the ones already in are left out when the commit is planned).
    pub(crate) fn own_device_joined(&mut self) -> Result<()> {
        let own = self.keys.address.account.as_bytes().to_vec();
        self.queue_everywhere(GroupOpRecord {
            kind: OP_ADD,
            accounts: vec![own],
            user: true,
            ..GroupOpRecord::default()
        })
    }

    /// Devices left this account: every group queues their removal.
    pub(crate) fn own_devices_removed(&mut self, devices: &[DeviceId]) -> Result<()> {
        for d in devices {
            self.queue_everywhere(GroupOpRecord {
                kind: super::group_records::OP_REMOVE_DEVICE,
                accounts: vec![self.keys.address.account.as_bytes().to_vec()],
                device: d.get(),
                user: true,
                ..GroupOpRecord::default()
            })?;
        }
        Ok(())
    }

    fn queue_everywhere(&mut self, op: GroupOpRecord) -> Result<()> {
        let ids: Vec<Vec<u8>> = self
            .groups
            .iter()
            .filter(|(_, r)| !r.leaving)
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for id in ids {
            if let Some(mut record) = self.groups.get(&id).cloned() {
                record.ops.push(op.clone());
                self.put_group(&id, record, &mut batch);
            }
        }
        self.commit(batch, true)
    }

    /// The groups of this device.
    pub(crate) fn group_list(&mut self) -> Result<Vec<GroupInfo>> {
        let ids: Vec<Vec<u8>> = self.groups.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            let (pending_ops, rebased_commits) = self
                .groups
                .get(&id)
                .map_or((0, 0), |r| (r.ops.len(), r.stale_commits));
            let unreachable = self.tokenless(&id)?;
            let session = self.session_mut(&id)?;
            let meta = session.meta().map_err(Error::group)?;
            let picture = meta
                .picture
                .as_ref()
                .and_then(|p| AttachmentPointer::from_bytes(&p.encode_to_vec()).ok());
            out.push(GroupInfo {
                id: GroupId::of(&id)?,
                name: meta.name,
                description: meta.description,
                picture,
                members: accounts(&session.members()),
                epoch: session.epoch(),
                pending_ops,
                unreachable,
                rebased_commits,
            });
        }
        Ok(out)
    }

    /// Queues a group message (or this device's control message): stored before it
    /// returns, and encrypted at once unless a commit of this device is in flight.
    pub(crate) fn enqueue_group(
        &mut self,
        group: &GroupId,
        content: e2e::GroupContent,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<MessageId> {
        let _ = now_ms;
        let mut batch = Batch::new();
        let (seq, record, id) = self.stage_group_message(group, content, rng, &mut batch)?;
        self.commit(batch, false)?;
        self.group_outbox.insert(seq, record);
        self.prepare_group(&group.0)?;
        self.flush()?;
        Ok(id)
    }

    /// Stages a group message in `batch` (the caller commits it, then puts the
    /// record in `group_outbox` and calls [`State::prepare_group`]).
    pub(super) fn stage_group_message(
        &mut self,
        group: &GroupId,
        content: e2e::GroupContent,
        rng: &mut (impl RngCore + CryptoRng),
        batch: &mut Batch,
    ) -> Result<(u64, GroupOutboxRecord, MessageId)> {
        if !self.groups.contains_key(&group.0[..]) {
            return Err(Error::UnknownGroup);
        }
        let control = content.control.is_some();
        let content = content.encode_to_vec();
        if content.len() > MAX_BODY {
            return Err(Error::TooLarge { max: MAX_BODY });
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let seq = self.local.next_outbox_seq;
        self.local.next_outbox_seq += 1;
        let record = GroupOutboxRecord {
            group_id: group.0.to_vec(),
            message_id: id.to_vec(),
            content,
            control,
            ..GroupOutboxRecord::default()
        };
        batch.put(Namespace::GroupOutbox, seq_key(seq), &record);
        batch.put_local(&self.local);
        Ok((seq, record, MessageId(id)))
    }

    /// Encrypts `group`'s queued messages, oldest first, unless a commit of this
    /// device is in flight (MLS takes no application message then).
    pub(crate) fn prepare_group(&mut self, group: &[u8]) -> Result<()> {
        let seqs: Vec<u64> = self
            .group_outbox
            .iter()
            .filter(|(_, r)| r.group_id == group && r.envelope.is_empty())
            .map(|(s, _)| *s)
            .collect();
        if seqs.is_empty() || self.groups.get(group).is_none_or(|r| r.pending.is_some()) {
            return Ok(());
        }
        for seq in seqs {
            let Some(mut record) = self.group_outbox.get(&seq).cloned() else {
                continue;
            };
            let session = self.session_mut(group)?;
            if session.has_pending() {
                return Ok(());
            }
            let me = session.me().map_err(Error::group)?;
            let mut to: Vec<GroupRecipient> = Vec::new();
            for m in session.members() {
                if m.account == me.account && m.device == me.device {
                    continue;
                }
                match to.iter_mut().find(|r| r.account == m.account.as_bytes()) {
                    Some(r) => r.devices.push(m.device.get()),
                    None => to.push(GroupRecipient {
                        account: m.account.as_bytes().to_vec(),
                        devices: vec![m.device.get()],
                    }),
                }
            }
            let staged = session.encrypt(&record.content).map_err(Error::group)?;
            record.envelope = staged.value;
            record.content.clear();
            record.to = to;
            let mut batch = Batch::new();
            batch.extend_ops(staged.ops);
            batch.put(Namespace::GroupOutbox, seq_key(seq), &record);
            self.commit(batch, false)?;
            self.group_outbox.insert(seq, record);
        }
        Ok(())
    }

    /// Encrypts the queued messages of every group whose commit has settled (a
    /// commit cleared by the inbox, when another member's won, leaves them queued
    /// in clear).
    pub(crate) fn prepare_groups(&mut self) -> Result<()> {
        let mut groups: Vec<Vec<u8>> = Vec::new();
        for r in self.group_outbox.values() {
            if r.envelope.is_empty() && !groups.contains(&r.group_id) {
                groups.push(r.group_id.clone());
            }
        }
        for g in groups {
            if self.groups.contains_key(&g) {
                self.prepare_group(&g)?;
            }
        }
        Ok(())
    }

    /// A group message is out (or given up): it leaves the outbox.
    pub(crate) fn group_sent(&mut self, seq: u64) -> Result<()> {
        self.settle_group_send(seq, super::group_retry::SendOutcome::default(), 0)?;
        Ok(())
    }

    pub(super) fn group_outbox_of(&self, group: &[u8]) -> Vec<u64> {
        self.group_outbox
            .iter()
            .filter(|(_, r)| r.group_id == group)
            .map(|(s, _)| *s)
            .collect()
    }

    /// Stages the deletion of everything this device holds of `group` (its MLS
    /// state, its record, its queued messages), for a group left or removed from;
    /// after the batch is committed, [`State::forget_group_cache`].
    pub(super) fn stage_forget_group(&self, group: &[u8], batch: &mut Batch) -> Result<()> {
        batch.extend_ops(self.group_device()?.forget(group).map_err(Error::group)?);
        batch.delete(Namespace::Groups, group.to_vec());
        Self::drop_tree_upload(group, batch);
        for seq in self.group_outbox_of(group) {
            batch.delete(Namespace::GroupOutbox, seq_key(seq));
        }
        Ok(())
    }

    pub(super) fn forget_group_cache(&mut self, group: &[u8]) {
        self.groups.remove(group);
        self.group_sessions.remove(group);
        for seq in self.group_outbox_of(group) {
            self.group_outbox.remove(&seq);
        }
    }

    /// Leaves `group`: a `LeaveRequest` goes to the members (the others then commit
    /// the removal); this device's state of the group is deleted once it is out.
    pub(crate) fn leave_group(
        &mut self,
        group: &GroupId,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<()> {
        let content = e2e::GroupContent {
            sent_at_ms: now_ms,
            control: Some(Control::Leave(e2e::LeaveRequest {})),
            ..e2e::GroupContent::default()
        };
        self.enqueue_group(group, content, now_ms, rng)?;
        let mut record = self
            .groups
            .get(&group.0[..])
            .cloned()
            .ok_or(Error::UnknownGroup)?;
        // Nothing more is committed from here; the request is the last word.
        record.ops.clear();
        record.leaving = true;
        let mut batch = Batch::new();
        self.put_group(&group.0, record, &mut batch);
        self.commit(batch, true)
    }

    /// Group messages received but not yet confirmed, oldest first.
    pub(crate) fn unconfirmed_group(&self) -> Result<Vec<GroupMessage>> {
        crate::store::by_seq::<GroupInboxRecord>(self.kv.scan(Namespace::GroupInbox)?)?
            .iter()
            .map(|(seq, r)| GroupMessage::from_record(*seq, r))
            .collect()
    }
}
