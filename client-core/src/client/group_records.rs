//! What the client keeps about its groups beyond the MLS state (which
//! `crate::groups` stores): the relay handle, the members' delivery tokens, queued
//! membership operations, the commit in flight, queued group messages and received
//! ones the app has not confirmed. Record keys are encrypted by the device store
//! like every other, so group ids never appear in clear on disk.

use tern_proto::AccountId;

/// `Namespace::Groups`, key: the MLS group id. One group of this device.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GroupRecord {
    /// The relay handle (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) handle: Vec<u8>,
    /// Whether the relay has the handle (this device created the group and sent
    /// `CreateGroup`, or joined it).
    #[prost(bool, tag = "2")]
    pub(crate) registered: bool,
    /// Membership operations waiting to be committed, oldest first.
    #[prost(message, repeated, tag = "3")]
    pub(crate) ops: Vec<GroupOpRecord>,
    /// The commit sent and not yet answered (its MLS side is pending in the group).
    #[prost(message, optional, tag = "4")]
    pub(crate) pending: Option<PendingCommitRecord>,
    /// Delivery tokens of members that are not (or not yet) contacts.
    #[prost(message, repeated, tag = "5")]
    pub(crate) tokens: Vec<MemberTokenRecord>,
    /// After a `STALE_EPOCH`: the relay's epoch to reach (through the inbox) before
    /// the head op is planned again.
    #[prost(uint64, tag = "6")]
    pub(crate) wait_epoch: u64,
    /// This device's `MemberInfo` (its delivery token) is still to be sent.
    #[prost(bool, tag = "7")]
    pub(crate) announce: bool,
    /// This device asked to leave: once its `LeaveRequest` is out, the group goes.
    #[prost(bool, tag = "8")]
    pub(crate) leaving: bool,
    /// Since when (Unix ms) the head op has waited for a member's delivery token
    /// (0: not waiting); past the client's bound those members are removed.
    #[prost(uint64, tag = "20")]
    pub(crate) token_wait_since_ms: u64,
    /// The delivery token this device last told the group (its `MemberInfo`), or
    /// the one it had when the group came; another one is announced again.
    #[prost(bytes = "vec", tag = "21")]
    pub(crate) announced_token: Vec<u8>,
    /// When (Unix ms) this device's leaf was last renewed (0: not yet recorded).
    #[prost(uint64, tag = "22")]
    pub(crate) leaf_updated_ms: u64,
    /// Commits of this device the relay refused as `STALE_EPOCH` (then rebased).
    #[prost(uint64, tag = "23")]
    pub(crate) stale_commits: u64,
    /// Members without a usable delivery token, each with since when (replaces
    /// `token_wait_since_ms`: the bound is per account).
    #[prost(message, repeated, tag = "24")]
    pub(crate) token_waits: Vec<super::group_retry::TokenWaitRecord>,
    /// Delivery tokens the relay refused for an account (`UNAUTHORIZED`): not used
    /// again for it.
    #[prost(message, repeated, tag = "25")]
    pub(crate) refused_tokens: Vec<MemberTokenRecord>,
    /// When (Unix ms) this device's next update commit is due (the interval with
    /// jitter, drawn when the leaf was renewed; 0: not drawn yet).
    #[prost(uint64, tag = "26")]
    pub(crate) leaf_due_ms: u64,
    /// Queued group messages of this group that are resent (a commit or welcome
    /// the relay refused for some devices, or a message refused for now).
    #[prost(message, repeated, tag = "27")]
    pub(crate) resends: Vec<super::group_retry::ResendRecord>,
    /// Identity keys first seen in this group for accounts that are neither this
    /// one nor contacts: a later leaf of the account must show the same key.
    #[prost(message, repeated, tag = "30")]
    pub(crate) pins: Vec<PinRecord>,
    /// Since when (Unix ms) this device knows it is left behind in this group (it
    /// refused a commit, so the group's later epochs cannot reach it; 0: not).
    /// A welcome re-adding it is then taken over the stale state.
    #[prost(uint64, tag = "31")]
    pub(crate) behind_since_ms: u64,
    /// The account whose device added this one (empty: this device created the
    /// group). A device left behind asks it, and its own other devices, to re-add it.
    #[prost(bytes = "vec", tag = "32")]
    pub(crate) added_by: Vec<u8>,
    /// When (Unix ms) this device last asked to be re-added (`GroupRejoin`).
    #[prost(uint64, tag = "33")]
    pub(crate) rejoin_asked_ms: u64,
    /// Since when (Unix ms) a `STALE_EPOCH` wait is unmet with the mailbox read to
    /// its end (0: no such wait).
    #[prost(uint64, tag = "34")]
    pub(crate) wait_unmet_since_ms: u64,
    /// Devices this device agreed to re-add, each with when: one a day each.
    #[prost(message, repeated, tag = "35")]
    pub(crate) readds: Vec<ReaddRecord>,
    /// Requests sent since this device last joined: each unanswered one doubles
    /// the wait before the next (a request nobody can take, such as one from a
    /// leaf under a key other than the pinned one, is not sent daily forever).
    #[prost(uint32, tag = "36")]
    pub(crate) rejoin_asks: u32,
    /// The epoch each leaf was last added in, and when this device saw it (leaves
    /// older than its join are not here). A rejoin request naming an earlier
    /// epoch and sent before that time predates the device's current leaf.
    #[prost(message, repeated, tag = "37")]
    pub(crate) leaf_epochs: Vec<LeafEpochRecord>,
    /// Devices a commit of this device added whose welcome went without its
    /// tree upload (`PendingCommitRecord::tree_lost`), each with since when: the
    /// relay may still have had the tree, so each is removed only if nothing
    /// came from it within `HELD_WELCOME_MAX_AGE_MS` (`group_tree.rs`). Set when
    /// the loss is (`tree_upload_failed`), so anything from the device before
    /// the answer counts; dropped on a re-add of this device (its view was stale).
    #[prost(message, repeated, tag = "38")]
    pub(crate) tree_lost_waits: Vec<TreeLostRecord>,
    /// Every queued op carries `GroupOpRecord::user` (set once the queue is
    /// empty, as an older client did not write it): a re-add keeps only user
    /// ops. Without it a re-add drops only re-adds and updates, as before.
    #[prost(bool, tag = "39")]
    pub(crate) ops_user: bool,
}

/// A device whose welcome may have gone without its tree, and since when.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TreeLostRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub(crate) device: u32,
    #[prost(uint64, tag = "3")]
    pub(crate) since_ms: u64,
    /// Its removal was queued (once: a refused commit drops it for good).
    #[prost(bool, tag = "4")]
    pub(crate) queued: bool,
}

/// When a leaf came: its device, the epoch its commit led to, and when (Unix ms,
/// this device's clock) this device applied that commit (0: not recorded, as
/// an older client wrote it).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LeafEpochRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub(crate) device: u32,
    #[prost(uint64, tag = "3")]
    pub(crate) epoch: u64,
    #[prost(uint64, tag = "4")]
    pub(crate) added_at_ms: u64,
}

impl GroupRecord {
    /// Records the leaves a commit leading to `epoch` added (`new_leaves`),
    /// applied at `now_ms`; entries of devices no longer among `members` go.
    pub(crate) fn note_new_leaves(
        &mut self,
        new_leaves: &[crate::groups::Member],
        epoch: u64,
        members: &[crate::groups::Member],
        now_ms: u64,
    ) {
        let same = |r: &LeafEpochRecord, m: &crate::groups::Member| {
            r.account == m.account.as_bytes() && r.device == m.device.get()
        };
        for m in new_leaves {
            self.leaf_epochs.retain(|r| !same(r, m));
            self.leaf_epochs.push(LeafEpochRecord {
                account: m.account.as_bytes().to_vec(),
                device: m.device.get(),
                epoch,
                added_at_ms: now_ms,
            });
        }
        self.leaf_epochs
            .retain(|r| members.iter().any(|m| same(r, m)));
    }

    /// `devices` showed they joined (or got a new leaf): no removal waits on
    /// them (`tree_lost_waits`). A removal such a wait queued is withdrawn by
    /// `tree_lost_due` under the lock that plans commits, never here (the inbox
    /// runs between a step's planning and its commit).
    pub(crate) fn joined(&mut self, devices: &[crate::groups::Member]) {
        self.tree_lost_waits.retain(|w| {
            !devices
                .iter()
                .any(|m| w.account == m.account.as_bytes() && w.device == m.device.get())
        });
    }

    /// The pending commit will never be answered (stale, refused, or another
    /// commit took its epoch): it goes, and so do the waits its lost tree set on the
    /// devices it added, but for those whose removal is already queued.
    pub(crate) fn pending_lost(&mut self) {
        let Some(pending) = self.pending.take().filter(|p| p.tree_lost) else {
            return;
        };
        let added = super::group_commit::welcome_devices(&pending);
        self.tree_lost_waits
            .retain(|w| w.queued || !added.contains(&(w.account.clone(), w.device)));
    }

    /// When `account`'s `device` was last added, if this device saw it.
    pub(crate) fn leaf_added(&self, account: &AccountId, device: u32) -> Option<&LeafEpochRecord> {
        self.leaf_epochs
            .iter()
            .find(|r| r.account == account.as_bytes() && r.device == device)
    }

    /// The epoch `account`'s `device` was last added in, if this device saw it.
    #[cfg(test)]
    pub(crate) fn leaf_epoch(&self, account: &AccountId, device: u32) -> Option<u64> {
        self.leaf_added(account, device).map(|r| r.epoch)
    }
}

/// A re-add this device queued for another device (`GroupRejoin`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ReaddRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub(crate) device: u32,
    #[prost(uint64, tag = "3")]
    pub(crate) at_ms: u64,
}

/// An account's identity key as this group first showed it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PinRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) identity_key: Vec<u8>,
}

/// A member's delivery token as a group member told it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MemberTokenRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) token: Vec<u8>,
}

/// One membership operation.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GroupOpRecord {
    /// [`OP_ADD`], [`OP_REMOVE`], [`OP_REMOVE_DEVICE`], [`OP_META`],
    /// [`OP_READD_DEVICE`] or `OP_UPDATE` (`group_commit.rs`).
    #[prost(uint32, tag = "1")]
    pub(crate) kind: u32,
    /// The accounts it adds or removes.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub(crate) accounts: Vec<Vec<u8>>,
    /// With a device op: the device.
    #[prost(uint32, tag = "3")]
    pub(crate) device: u32,
    /// With [`OP_META`]: the encoded new metadata.
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) meta: Vec<u8>,
    /// With [`OP_META`]: which fields of `meta` it sets (bits of
    /// `META_NAME`/`META_DESCRIPTION`/`META_PICTURE` in `groups.rs`; 0: all).
    #[prost(uint32, tag = "20")]
    pub(crate) meta_fields: u32,
    /// With [`OP_READD_DEVICE`]: the epoch the request was taken in. The re-add is
    /// planned in that epoch only: a commit since may have re-added the device
    /// already (its other devices and the account that added it may all be asked).
    #[prost(uint64, tag = "21")]
    pub(crate) epoch: u64,
    /// Queued by this account's own action (an API call, a device linked to or
    /// removed from the account), not judged from this device's view of the
    /// group (a token wait, a device the relay refused, a `LeaveRequest`): only
    /// such ops outlive a re-add of this device, whose old view was stale.
    #[prost(bool, tag = "22")]
    pub(crate) user: bool,
    /// An `OP_REMOVE_DEVICE` a tree-lost wait queued (`tree_lost_due`): it goes
    /// if the device shows it joined. A removal the relay asked for stays.
    #[prost(bool, tag = "23")]
    pub(crate) tree_lost: bool,
}

pub(crate) const OP_ADD: u32 = 1;
pub(crate) const OP_REMOVE: u32 = 2;
pub(crate) const OP_REMOVE_DEVICE: u32 = 4;
pub(crate) const OP_META: u32 = 5;
/// One commit removing a device's leaf and adding a fresh key package of that same
/// device: the device was left behind and asked to be re-added (`GroupRejoin`).
pub(crate) const OP_READD_DEVICE: u32 = 7;

/// A commit sent to the relay: resent as it is (same commit id) until answered.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PendingCommitRecord {
    /// The encoded `tern.v1.GroupCommitRequest`.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) request: Vec<u8>,
    /// The op it carries (popped once the relay accepts it).
    #[prost(message, optional, tag = "2")]
    pub(crate) op: Option<GroupOpRecord>,
    /// Not yet handed to the relay (cleared, durably, before the first send).
    /// Once sent the relay may hold it though no answer came, so it is never
    /// given up, only resent; a record without the flag (an older client's)
    /// counts as sent.
    #[prost(bool, tag = "3")]
    pub(crate) unsent: bool,
    /// Since when (Unix ms) its welcome's tree upload has been refused for now
    /// (0: not, or it succeeded or the commit went since); past
    /// `TREE_UPLOAD_WAIT_MS` it counts as refused for good.
    #[prost(uint64, tag = "4")]
    pub(crate) upload_waiting_since_ms: u64,
    /// Sent again without its welcome's tree (the relay refused the upload, and
    /// no later upload succeeded): the devices it adds may never join, so once
    /// it is answered their removal waits (`GroupRecord::tree_lost_waits`).
    #[prost(bool, tag = "5")]
    pub(crate) tree_lost: bool,
}

/// `Namespace::GroupOutbox`, key: an outbox seq. A group message on its way.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GroupOutboxRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) message_id: Vec<u8>,
    /// The encoded `GroupContent`, kept until it is encrypted.
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) content: Vec<u8>,
    /// The group envelope, once encrypted (stored with the MLS state it advanced).
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) envelope: Vec<u8>,
    /// The devices of the epoch it was encrypted in, other than this one.
    #[prost(message, repeated, tag = "5")]
    pub(crate) to: Vec<GroupRecipient>,
    /// Whether it is this client's own `MemberInfo` or `LeaveRequest` (no event).
    #[prost(bool, tag = "6")]
    pub(crate) control: bool,
}

/// One account's devices a group message goes to.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GroupRecipient {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) account: Vec<u8>,
    #[prost(uint32, repeated, tag = "2")]
    pub(crate) devices: Vec<u32>,
}

/// `Namespace::GroupInbox`, key: an inbox seq (the 1:1 inbox's counter). A group
/// message the app has not confirmed.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct GroupInboxRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) group_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) sender: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub(crate) sender_device: u32,
    #[prost(bytes = "vec", tag = "4")]
    pub(crate) message_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub(crate) body: Vec<u8>,
    #[prost(uint64, tag = "6")]
    pub(crate) sent_at_ms: u64,
    #[prost(uint64, tag = "7")]
    pub(crate) received_at_ms: u64,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub(crate) attachments: Vec<Vec<u8>>,
}

/// `Namespace::GroupHeld`, key [`HELD_INDEX_KEY`]: the group envelopes whose tag
/// routes to no epoch this device knows yet (their commit or welcome may still
/// come), in arrival order. Each one's bytes are a record of its own, keyed by its
/// seq, so a retry reads only the envelopes whose tag now routes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HeldIndexRecord {
    /// Oldest first.
    #[prost(message, repeated, tag = "1")]
    pub(crate) entries: Vec<HeldEntry>,
    /// The seq the next held envelope gets.
    #[prost(uint64, tag = "2")]
    pub(crate) next_seq: u64,
}

/// One held group envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HeldEntry {
    /// The key of its [`HeldEnvelopeRecord`] (`seq_key`).
    #[prost(uint64, tag = "1")]
    pub(crate) seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) message_id: Vec<u8>,
    /// Its envelope tag (16 bytes), to route it without reading it.
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) tag: Vec<u8>,
    /// Its length in bytes, for the bound on what is held.
    #[prost(uint64, tag = "4")]
    pub(crate) len: u64,
    /// When (Unix ms) it arrived.
    #[prost(uint64, tag = "5")]
    pub(crate) held_at_ms: u64,
}

/// `Namespace::GroupHeld`, key: a [`HeldEntry::seq`]. A held envelope's bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HeldEnvelopeRecord {
    /// The whole shared body (`0x02 ‖ tag ‖ …`).
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) envelope: Vec<u8>,
}

pub(crate) const HELD_INDEX_KEY: &[u8] = b"index";

/// `Namespace::GroupCredential`, key [`CREDENTIAL_KEY`]: a linked device's
/// certificate from its link payload (the primary signs its own when it loads).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CredentialRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) certificate: Vec<u8>,
}

pub(crate) const CREDENTIAL_KEY: &[u8] = b"certificate";

/// `Namespace::GroupCredential`, key [`LAST_RESORT_KEY`]: this device's last-resort
/// key packages, the one on the relay and the ones it replaced, whose secrets are
/// kept while a welcome made with them may still wait in the mailbox.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LastResortRecord {
    /// The reference of the one last published.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) current: Vec<u8>,
    /// Replaced ones, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub(crate) retired: Vec<RetiredKeyPackage>,
}

/// A replaced last-resort key package.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RetiredKeyPackage {
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub(crate) retired_at_ms: u64,
}

pub(crate) const LAST_RESORT_KEY: &[u8] = b"last resort";

/// The account a group's duplicate check files message ids under: group messages
/// are checked before MLS, when the sender is not known yet.
pub(crate) fn dedup_account(group_id: &[u8]) -> AccountId {
    let mut a = [0u8; 16];
    for (i, b) in group_id.iter().enumerate() {
        a[i % 16] ^= b;
    }
    AccountId(a)
}
