//! A welcome whose ratchet tree would make it too large for one envelope (about
//! 300 bytes a leaf: groups of some 800 devices and more) carries the tree as an
//! attachment instead (`GroupWelcome.ratchet_tree_pointer`). The tree is always
//! encrypted, under a key only the welcome's GroupInfo carries (`groups/tree.rs`):
//! the pointer names the blob and its size, never a key.
//!
//! Send side: the commit's tree ciphertext is fixed when the commit is planned
//! (the pending commit is stored encoded and resent byte for byte);
//! [`State::welcome_body`] keeps it in the device store with the pending commit,
//! in the same batch. The worker uploads it ([`upload_tree`]) before every send of
//! the `GroupCommit` (a relay that has it says so) and never sends the commit while
//! the upload fails for now; a permanent refusal, or one for now lasting
//! [`TREE_UPLOAD_WAIT_MS`], gives the commit up if it was never handed to the
//! relay, and sends it without its tree otherwise ([`UploadFailed`]). The ciphertext goes
//! in the batch that settles the commit (answered, stale or refused) or forgets
//! the group.
//!
//! Receive side: `State::receive` cannot download, so a welcome with a pointer is
//! examined (encrypted to our key package, carrying the tree's key), acknowledged
//! and held ([`State::hold_welcome`]); the worker fetches the tree after its
//! commits and messages, over the connection that identifies no one
//! ([`fetch_trees`]), and [`State::tree_fetched`] checks it against the pointer
//! and joins exactly as an inline welcome would. Failures are per welcome
//! ([`FetchFailure`]): `NOT_FOUND` counts toward [`TREE_ATTEMPTS`], others back
//! off up to [`TREE_RETRY_MAX_MS`], a bad blob is given up at once, each given up
//! with an [`Event::Dropped`]; the group's held envelopes then stay held, as for
//! any welcome that never came. Held welcomes are bounded:
//! [`HELD_WELCOMES_MAX`], [`HELD_WELCOMES_MAX_BYTES`] and
//! [`HELD_WELCOME_MAX_AGE_MS`], oldest dropped first.

use prost::Message;
use sha2::{Digest, Sha256};

use tern_proto::{AccountId, DeviceId};

use super::anonymous::AnonymousLink;
use super::group_commit::welcome_devices;
use super::group_records::{dedup_account, GroupOpRecord, GroupRecord, TreeLostRecord};
use super::group_retry::device_removal;
use super::send::Round;
use super::state::{Outcome, State};
use super::{Event, Shared};
use crate::groups::{GroupError, TreePointer, Welcome};
use crate::net::RelayConnection;
use crate::store::records::seq_key;
use crate::store::{Batch, Namespace, StoreError};
use crate::{Error, ErrorCode, Result};

/// The default largest welcome body sent with its tree inline: the relay's
/// default envelope limit less room for a relay configured a little lower. The
/// relay does not announce its limit.
pub const WELCOME_INLINE_MAX: usize = tern_proto::limits::DEFAULT_MAX_ENVELOPE - 16 * 1024;
/// Largest tree attachment a device fetches (sealed bytes): a tree of some 50,000
/// leaves, past any group the relay takes commits for.
pub(crate) const TREE_MAX: u64 = 16 * 1024 * 1024;
/// Tries to fetch a tree before its welcome is given up.
pub(crate) const TREE_ATTEMPTS: u32 = 5;
/// The first retry's delay; each one after waits twice as long.
const TREE_RETRY_MS: u64 = 2_000;
/// The longest wait between fetches (the welcome is held at most a week).
pub(crate) const TREE_RETRY_MAX_MS: u64 = 3600 * 1000;
/// Most welcomes held for their tree.
pub(crate) const HELD_WELCOMES_MAX: usize = 16;
/// Most welcome bytes held.
pub(crate) const HELD_WELCOMES_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// How long a welcome waits for its tree: a week (the blob lives 30 days).
pub(crate) const HELD_WELCOME_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// How long a tree upload refused for now (the relay busy, rate limited) may
/// hold its commit before it counts as refused for good: the group's commits
/// and its other changes wait behind it.
pub(crate) const TREE_UPLOAD_WAIT_MS: u64 = 24 * 3600 * 1000;

/// What a failed tree upload does to its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadFailed {
    /// Tried again next round.
    Wait,
    /// Never handed to the relay: given up as a refused commit.
    GiveUp,
    /// Handed to the relay before (it may hold it, the answer lost): sent again
    /// without its tree, so no member forks. The relay may still have the tree
    /// (the blob expired only, or a limit changed), so once the commit is
    /// answered the new devices are removed only if nothing comes from them
    /// within [`HELD_WELCOME_MAX_AGE_MS`] (`GroupRecord::tree_lost_waits`); a
    /// later upload that succeeds clears `PendingCommitRecord::tree_lost`.
    SendAnyway,
}

/// Key of a group's tree upload: this prefix, then the group id.
const UPLOAD_PREFIX: &[u8] = b"up";
/// Key of the held welcomes' index.
const HELD_INDEX: &[u8] = b"index";
/// Key of a held welcome: this prefix, then its arrival seq.
const HELD_PREFIX: &[u8] = b"in";

/// Id under which welcome message ids (and groups joined, by epoch) are seen.
pub(super) const WELCOME_DEDUP: &[u8] = b"tern group welcome";

/// `Namespace::GroupTree`, key `up` ‖ group id: the encrypted tree the group's
/// pending commit's welcome points at.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TreeUploadRecord {
    /// The blob id.
    #[prost(bytes = "vec", tag = "1")]
    pub blob_id: Vec<u8>,
    /// The ciphertext (its key is only in the welcome's GroupInfo).
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
}

/// One held welcome, in [`HeldWelcomeIndex`].
#[derive(Clone, PartialEq, Message)]
pub(crate) struct HeldWelcomeEntry {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub message_id: Vec<u8>,
    /// Bytes held (the welcome and its pointer).
    #[prost(uint64, tag = "3")]
    pub len: u64,
    #[prost(uint64, tag = "4")]
    pub held_at_ms: u64,
    /// Fetches that failed.
    #[prost(uint32, tag = "5")]
    pub attempts: u32,
    /// Not fetched again before this.
    #[prost(uint64, tag = "6")]
    pub next_try_ms: u64,
    /// Fetches that failed, of any kind (the wait grows with them).
    #[prost(uint32, tag = "7")]
    pub waits: u32,
}

/// `Namespace::GroupTree`, key `index`: the held welcomes, oldest first.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct HeldWelcomeIndex {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<HeldWelcomeEntry>,
    #[prost(uint64, tag = "2")]
    pub next_seq: u64,
}

/// `Namespace::GroupTree`, key `in` ‖ seq: a welcome waiting for its tree.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct HeldWelcomeRecord {
    /// The MLS welcome.
    #[prost(bytes = "vec", tag = "1")]
    pub welcome: Vec<u8>,
    /// The tree attachment's blob id.
    #[prost(bytes = "vec", tag = "2")]
    pub blob_id: Vec<u8>,
    /// Its length.
    #[prost(uint64, tag = "3")]
    pub sealed_size: u64,
}

impl HeldWelcomeRecord {
    fn pointer(&self) -> Option<TreePointer> {
        Some(TreePointer {
            blob_id: self.blob_id[..].try_into().ok()?,
            sealed_size: self.sealed_size,
        })
    }
}

fn upload_key(group: &[u8]) -> Vec<u8> {
    [UPLOAD_PREFIX, group].concat()
}

fn held_key(seq: u64) -> Vec<u8> {
    [HELD_PREFIX, &seq_key(seq)[..]].concat()
}

fn decode<T: Message + Default>(v: &[u8]) -> Result<T> {
    Ok(T::decode(v).map_err(|_| StoreError::Corrupt)?)
}

/// Whether `sealed` is the blob `pointer` names.
pub(crate) fn matches_pointer(pointer: &TreePointer, sealed: &[u8]) -> bool {
    sealed.len() as u64 == pointer.sealed_size
        && <[u8; 32]>::from(Sha256::digest(sealed)) == pointer.blob_id
}

/// Events of held welcomes given up, the ones due to be fetched (seq, pointer),
/// whether others wait for a later try.
pub(crate) type DueTrees = (Vec<Event>, Vec<(u64, TreePointer)>, bool);

impl State {
    fn commit_pending(&self, group: &[u8]) -> bool {
        self.groups.get(group).is_some_and(|g| g.pending.is_some())
    }

    /// The body of `welcome` for `group`'s commit being planned: its (encrypted)
    /// tree inline while it fits [`State::welcome_inline_max`]; past that the
    /// tree's ciphertext is staged in `batch` for the worker to upload, and the
    /// body points at it.
    pub(super) fn welcome_body(
        &self,
        group: &[u8],
        welcome: &Welcome,
        batch: &mut Batch,
    ) -> Result<Vec<u8>> {
        if welcome.inline_len() <= self.welcome_inline_max {
            batch.delete(Namespace::GroupTree, upload_key(group));
            return Ok(welcome.body());
        }
        let record = TreeUploadRecord {
            blob_id: welcome.tree_blob_id.to_vec(),
            sealed: welcome.ratchet_tree.clone(),
        };
        batch.put(Namespace::GroupTree, upload_key(group), &record);
        Ok(welcome.body_with_tree_pointer())
    }

    fn tree_upload_record(&self, group: &[u8]) -> Result<Option<TreeUploadRecord>> {
        match self.kv.get(Namespace::GroupTree, &upload_key(group))? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The tree `group`'s pending commit waits for the relay to have: its pointer
    /// and ciphertext (None: nothing to upload).
    /// Every time before the commit leaves: a relay that has the blob answers so
    /// at once, and its life is extended.
    pub(crate) fn tree_upload(&self, group: &[u8]) -> Result<Option<([u8; 32], Vec<u8>)>> {
        let Some(r) = self.tree_upload_record(group)? else {
            return Ok(None);
        };
        if !self.commit_pending(group) {
            return Ok(None);
        }
        let blob_id = r.blob_id[..].try_into().map_err(|_| StoreError::Corrupt)?;
        Ok(Some((blob_id, r.sealed)))
    }

    /// Marks `group`'s pending commit as handed to the relay, durably, before
    /// each send.
    pub(crate) fn commit_sending(&mut self, group: &[u8]) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        // A wait for its tree ends as it goes.
        match record.pending.as_mut() {
            Some(p) if p.unsent || p.upload_waiting_since_ms != 0 => {
                p.unsent = false;
                p.upload_waiting_since_ms = 0;
            }
            _ => return Ok(()),
        }
        let mut batch = Batch::new();
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)
    }

    /// `group`'s tree upload succeeded: a wait for it ends, and the welcome's
    /// tree is no longer lost. Stored durably.
    pub(crate) fn tree_uploaded(&mut self, group: &[u8]) -> Result<()> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(());
        };
        match record.pending.as_mut() {
            Some(p) if p.upload_waiting_since_ms != 0 || p.tree_lost => {
                p.upload_waiting_since_ms = 0;
                if std::mem::take(&mut p.tree_lost) {
                    // Its welcome has its tree: no wait on the devices it adds.
                    let added = welcome_devices(p);
                    record
                        .tree_lost_waits
                        .retain(|w| !added.contains(&(w.account.clone(), w.device)));
                }
            }
            _ => return Ok(()),
        }
        let mut batch = Batch::new();
        self.put_group(group, record, &mut batch);
        self.commit(batch, true)
    }

    /// Queues the removal of devices in `record.tree_lost_waits` from which
    /// nothing came within [`HELD_WELCOME_MAX_AGE_MS`], once each (a refused
    /// commit drops it for good); entries of devices no longer leaves go, and
    /// so do removals a wait queued whose wait is gone.
    pub(super) fn tree_lost_due(
        &mut self,
        group: &[u8],
        record: &mut GroupRecord,
        now_ms: u64,
    ) -> Result<()> {
        let same = |o: &GroupOpRecord, w: &TreeLostRecord| {
            o.tree_lost && o.accounts.first() == Some(&w.account) && o.device == w.device
        };
        let waits = &record.tree_lost_waits;
        record
            .ops
            .retain(|o| !o.tree_lost || waits.iter().any(|w| same(o, w)));
        // A queued wait whose removal is gone (refused, or planned to nothing) has
        // done its part: kept, it would hold the group busy every round.
        let ops = &record.ops;
        record
            .tree_lost_waits
            .retain(|w| !w.queued || ops.iter().any(|o| same(o, w)));
        if record.tree_lost_waits.is_empty() {
            return Ok(());
        }
        let members = self.session_mut(group)?.members();
        record.tree_lost_waits.retain(|w| {
            members
                .iter()
                .any(|m| m.account.as_bytes()[..] == w.account[..] && m.device.get() == w.device)
        });
        for w in record.tree_lost_waits.iter_mut() {
            if w.queued || now_ms.saturating_sub(w.since_ms) < HELD_WELCOME_MAX_AGE_MS {
                continue;
            }
            let (Ok(account), Ok(device)) = (
                AccountId::try_from(&w.account[..]),
                DeviceId::try_from(w.device),
            ) else {
                continue;
            };
            w.queued = true;
            record.ops.push(GroupOpRecord {
                tree_lost: true,
                ..device_removal(&account, device)
            });
        }
        Ok(())
    }

    /// `group`'s tree upload failed, for good (`refused`) or for now, at
    /// `now_ms`: what becomes of its commit ([`UploadFailed`]). A commit already
    /// handed to the relay is never given up; a wait past
    /// [`TREE_UPLOAD_WAIT_MS`] counts as a refusal. Stored durably.
    pub(crate) fn tree_upload_failed(
        &mut self,
        group: &[u8],
        refused: bool,
        now_ms: u64,
    ) -> Result<UploadFailed> {
        let Some(mut record) = self.groups.get(group).cloned() else {
            return Ok(UploadFailed::Wait);
        };
        let Some(pending) = record.pending.as_mut() else {
            return Ok(UploadFailed::Wait);
        };
        if pending.upload_waiting_since_ms == 0 {
            pending.upload_waiting_since_ms = now_ms.max(1);
        }
        let waited = now_ms.saturating_sub(pending.upload_waiting_since_ms);
        // Once sent without its tree, it does not wait for it again.
        let verdict = match (
            refused || waited >= TREE_UPLOAD_WAIT_MS || pending.tree_lost,
            pending.unsent,
        ) {
            (false, _) => UploadFailed::Wait,
            (true, true) => UploadFailed::GiveUp,
            (true, false) => UploadFailed::SendAnyway,
        };
        if verdict == UploadFailed::SendAnyway && !pending.tree_lost {
            pending.tree_lost = true;
            // The devices it adds wait from now: anything from them, even
            // before the answer, shows they joined.
            for (account, device) in welcome_devices(pending) {
                record
                    .tree_lost_waits
                    .retain(|w| !(w.account == account && w.device == device));
                record.tree_lost_waits.push(TreeLostRecord {
                    account,
                    device,
                    since_ms: now_ms.max(1),
                    queued: false,
                });
            }
        }
        if verdict == UploadFailed::GiveUp {
            self.commit_refused(group)?;
        } else if self.groups.get(group) != Some(&record) {
            let mut batch = Batch::new();
            self.put_group(group, record, &mut batch);
            self.commit(batch, true)?;
        }
        Ok(verdict)
    }

    /// Stages the deletion of `group`'s tree ciphertext in `batch` (its commit
    /// settled, or the group is gone).
    pub(super) fn drop_tree_upload(group: &[u8], batch: &mut Batch) {
        batch.delete(Namespace::GroupTree, upload_key(group));
    }

    /// Deletes `group`'s tree ciphertext if its commit settled (answered, stale,
    /// refused, lost to another member's commit, or the group gone).
    pub(crate) fn settle_tree_upload(&mut self, group: &[u8]) -> Result<()> {
        if self.commit_pending(group)
            || self
                .kv
                .get(Namespace::GroupTree, &upload_key(group))?
                .is_none()
        {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.delete(Namespace::GroupTree, upload_key(group));
        self.commit(batch, true)
    }

    /// [`State::settle_tree_upload`] for every group (when the worker starts:
    /// settled before a crash, or the group forgotten since).
    pub(crate) fn settle_tree_uploads(&mut self) -> Result<()> {
        let mut batch = Batch::new();
        for (key, _) in self.kv.scan(Namespace::GroupTree)? {
            let Some(group) = key.strip_prefix(UPLOAD_PREFIX) else {
                continue;
            };
            if !self.commit_pending(group) {
                batch.delete(Namespace::GroupTree, key.clone());
            }
        }
        self.commit(batch, true)
    }

    fn held_welcome_index(&self) -> Result<HeldWelcomeIndex> {
        match self.kv.get(Namespace::GroupTree, HELD_INDEX)? {
            Some(v) => decode(&v),
            None => Ok(HeldWelcomeIndex::default()),
        }
    }

    /// Whether welcomes wait for their trees (the worker has fetching to do).
    pub(crate) fn has_held_welcomes(&self) -> Result<bool> {
        Ok(!self.held_welcome_index()?.entries.is_empty())
    }

    /// Keeps a welcome whose tree is an attachment until the worker fetched it
    /// (stored, not durably, like [`State::receive`]). Only one encrypted to a key
    /// package of this device and carrying its tree's key is held: anyone else who
    /// has the delivery token cannot make it download or push welcomes out.
    pub(super) fn hold_welcome(
        &mut self,
        message_id: &[u8],
        welcome: Vec<u8>,
        pointer: TreePointer,
        now_ms: u64,
    ) -> Result<Outcome> {
        if pointer.sealed_size > TREE_MAX {
            return Ok(Outcome::Dropped(
                "a welcome whose tree attachment is larger than any group's".into(),
            ));
        }
        match self.group_device()?.examine_welcome(&welcome) {
            Ok(_) => {}
            Err(GroupError::Store(e)) if !matches!(e, StoreError::Corrupt) => return Err(e.into()),
            Err(e) => return Ok(Outcome::Dropped(format!("a welcome refused: {e}"))),
        }
        let mut index = self.held_welcome_index()?;
        if index.entries.iter().any(|e| e.message_id == message_id) {
            return Ok(Outcome::Duplicate);
        }
        let seq = index.next_seq;
        index.next_seq += 1;
        index.entries.push(HeldWelcomeEntry {
            seq,
            message_id: message_id.to_vec(),
            len: (welcome.len() + 40) as u64,
            held_at_ms: now_ms,
            attempts: 0,
            next_try_ms: now_ms,
            waits: 0,
        });
        let mut batch = Batch::new();
        let mut events = Vec::new();
        prune(&mut index, now_ms, &mut batch, &mut events);
        // Larger than the whole bound, it went itself.
        if index.entries.last().is_some_and(|e| e.seq == seq) {
            batch.put(
                Namespace::GroupTree,
                held_key(seq),
                &HeldWelcomeRecord {
                    welcome,
                    blob_id: pointer.blob_id.to_vec(),
                    sealed_size: pointer.sealed_size,
                },
            );
        }
        batch.put(Namespace::GroupTree, HELD_INDEX.to_vec(), &index);
        self.commit(batch, false)?;
        tracing::debug!("held a welcome until its ratchet tree is fetched");
        Ok(Outcome::Synced(events))
    }

    /// The held welcomes whose tree is due to be fetched now: (seq, pointer). The
    /// ones past the bound go first (their events in the first value), durably.
    /// The last value: whether others wait for a later try.
    pub(crate) fn held_welcomes_due(&mut self, now_ms: u64) -> Result<DueTrees> {
        let mut index = self.held_welcome_index()?;
        let mut events = Vec::new();
        if index.entries.is_empty() {
            return Ok((events, Vec::new(), false));
        }
        let mut batch = Batch::new();
        prune(&mut index, now_ms, &mut batch, &mut events);
        if !batch.is_empty() {
            batch.put(Namespace::GroupTree, HELD_INDEX.to_vec(), &index);
            self.commit(batch, true)?;
        }
        let mut due = Vec::new();
        let mut later = false;
        let mut lost = Vec::new();
        for e in &index.entries {
            if e.next_try_ms > now_ms {
                later = true;
                continue;
            }
            match self.held_record(e.seq)?.and_then(|r| r.pointer()) {
                Some(pointer) => due.push((e.seq, pointer)),
                None => lost.push(e.seq),
            }
        }
        for seq in lost {
            self.unhold_welcome(seq, true, now_ms)?;
            events.push(lost_event());
        }
        Ok((events, due, later))
    }

    /// Held welcome `seq`'s record (None: missing or corrupt).
    fn held_record(&self, seq: u64) -> Result<Option<HeldWelcomeRecord>> {
        Ok(self
            .kv
            .get(Namespace::GroupTree, &held_key(seq))?
            .and_then(|v| HeldWelcomeRecord::decode(v.as_slice()).ok()))
    }

    /// Removes held welcome `seq`, durably; with `seen`, its message id is
    /// remembered so the relay cannot bring it back.
    fn unhold_welcome(&mut self, seq: u64, seen: bool, now_ms: u64) -> Result<()> {
        let mut index = self.held_welcome_index()?;
        let mut batch = Batch::new();
        if let Some(i) = index.entries.iter().position(|e| e.seq == seq) {
            let e = index.entries.remove(i);
            if seen {
                batch.put_seen(&dedup_account(WELCOME_DEDUP), &e.message_id, now_ms);
            }
        }
        batch.delete(Namespace::GroupTree, held_key(seq));
        batch.put(Namespace::GroupTree, HELD_INDEX.to_vec(), &index);
        self.commit(batch, false)?;
        self.flush()
    }

    /// The ciphertext of held welcome `seq`'s tree arrived: checked against its
    /// pointer, then joined as an inline welcome (every check of one), and the
    /// welcome goes; one that fails its checks goes with an [`Event::Dropped`].
    /// Stored durably. Returns the events.
    pub(crate) fn tree_fetched(
        &mut self,
        seq: u64,
        sealed: &[u8],
        now_ms: u64,
    ) -> Result<Vec<Event>> {
        let index = self.held_welcome_index()?;
        let Some(entry) = index.entries.iter().find(|e| e.seq == seq).cloned() else {
            return Ok(Vec::new());
        };
        let Some((record, pointer)) = self
            .held_record(seq)?
            .and_then(|r| r.pointer().map(|p| (r, p)))
        else {
            self.unhold_welcome(seq, true, now_ms)?;
            return Ok(vec![lost_event()]);
        };
        let out = if matches_pointer(&pointer, sealed) {
            // Opened under the key in the welcome's GroupInfo, then joined.
            match self.join_welcome(&entry.message_id, &record.welcome, sealed, now_ms) {
                Err(Error::Store(e)) if !matches!(e, StoreError::Corrupt) => {
                    return Err(Error::Store(e))
                }
                Err(e) => Outcome::Dropped(format!("a held welcome: {e}")),
                Ok(out) => out,
            }
        } else {
            Outcome::Dropped(
                "a ratchet tree attachment that is not the blob its pointer names".into(),
            )
        };
        let (events, seen) = match out {
            Outcome::Synced(events) => (events, false),
            Outcome::Dropped(reason) => {
                tracing::debug!(%reason, "dropped a held welcome");
                (vec![Event::Dropped { reason }], true)
            }
            // A copy of a welcome joined already (a relay replaying it under
            // another id): seen, so it is not held and downloaded again.
            Outcome::Duplicate => (Vec::new(), true),
            _ => (Vec::new(), false),
        };
        // After the join's own write: a crash between the two finds the welcome
        // again, a duplicate by its message id.
        self.unhold_welcome(seq, seen, now_ms)?;
        Ok(events)
    }

    /// Fetching held welcome `seq`'s tree failed (`reason`, counted as `how`):
    /// tried again later, or given up with an [`Event::Dropped`]. Stored durably.
    pub(crate) fn tree_fetch_failed(
        &mut self,
        seq: u64,
        reason: &str,
        how: FetchFailure,
        now_ms: u64,
    ) -> Result<Vec<Event>> {
        let mut index = self.held_welcome_index()?;
        let Some(e) = index.entries.iter_mut().find(|e| e.seq == seq) else {
            return Ok(Vec::new());
        };
        if how == FetchFailure::Missing {
            e.attempts += 1;
        }
        e.waits = e.waits.saturating_add(1);
        if how == FetchFailure::Bad || e.attempts >= TREE_ATTEMPTS {
            tracing::debug!(%reason, "gave up a welcome whose ratchet tree cannot be fetched");
            self.unhold_welcome(seq, true, now_ms)?;
            return Ok(vec![Event::Dropped {
                reason: format!("a welcome whose ratchet tree cannot be fetched: {reason}"),
            }]);
        }
        let wait = TREE_RETRY_MS
            .saturating_mul(1 << (e.waits - 1).min(20))
            .min(TREE_RETRY_MAX_MS);
        e.next_try_ms = now_ms.saturating_add(wait);
        let mut batch = Batch::new();
        batch.put(Namespace::GroupTree, HELD_INDEX.to_vec(), &index);
        self.commit(batch, true)?;
        Ok(Vec::new())
    }
}

fn lost_event() -> Event {
    Event::Dropped {
        reason: "a held welcome whose stored record is lost".into(),
    }
}

/// Drops what is past the bound from `index`: the ones held too long, then the
/// oldest while too many or too large.
pub(crate) fn prune(
    index: &mut HeldWelcomeIndex,
    now_ms: u64,
    batch: &mut Batch,
    events: &mut Vec<Event>,
) {
    let mut drop = |e: HeldWelcomeEntry, reason: &str| {
        batch.delete(Namespace::GroupTree, held_key(e.seq));
        batch.put_seen(&dedup_account(WELCOME_DEDUP), &e.message_id, now_ms);
        tracing::debug!(%reason, "dropped a held welcome");
        events.push(Event::Dropped {
            reason: reason.into(),
        });
    };
    let (old, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut index.entries)
        .into_iter()
        .partition(|e| now_ms.saturating_sub(e.held_at_ms) > HELD_WELCOME_MAX_AGE_MS);
    for e in old {
        drop(e, "a welcome whose ratchet tree never came (held 7 days)");
    }
    index.entries = kept;
    let mut bytes: u64 = index.entries.iter().map(|e| e.len).sum();
    while index.entries.len() > HELD_WELCOMES_MAX || bytes > HELD_WELCOMES_MAX_BYTES {
        let e = index.entries.remove(0);
        bytes -= e.len;
        drop(
            e,
            "a welcome waiting for its ratchet tree, past the bound on held ones",
        );
    }
}

/// What became of a tree upload before its commit leaves.
pub(super) enum Upload {
    /// The relay has the tree (or there is none): the commit may leave.
    Done,
    /// Not now (the relay is busy): tried again next round.
    Wait(Round),
    /// The relay will never take it (too large, over quota), or it waited past
    /// [`TREE_UPLOAD_WAIT_MS`], and the commit was never sent: given up (the
    /// reason).
    GaveUp(String),
}

/// Before `group`'s pending commit leaves: the relay gets its welcome's tree.
/// Uploaded every time: a relay that has it says so, and keeps it longer.
pub(super) async fn upload_tree(
    shared: &Shared,
    conn: &RelayConnection,
    group: &[u8],
) -> Result<Upload> {
    let Some((blob_id, sealed)) = shared.state.lock().await.tree_upload(group)? else {
        return Ok(Upload::Done);
    };
    let size = sealed.len() as u64;
    let mut source = std::io::Cursor::new(sealed);
    let e = match conn.upload_blob(&blob_id, size, &mut source).await {
        Ok(_) => {
            shared.state.lock().await.tree_uploaded(group)?;
            return Ok(Upload::Done);
        }
        Err(e) => e,
    };
    let refused = match e.relay_code() {
        Some(ErrorCode::TooLarge | ErrorCode::QuotaExceeded) => true,
        Some(_) => false,
        None => return Err(e),
    };
    tracing::debug!(error = %e, "a welcome's ratchet tree was not uploaded");
    let verdict = shared
        .state
        .lock()
        .await
        .tree_upload_failed(group, refused, shared.now_ms())?;
    Ok(match verdict {
        UploadFailed::Wait => Upload::Wait(Round::Wait),
        UploadFailed::SendAnyway => Upload::Done,
        UploadFailed::GiveUp => {
            Upload::GaveUp(format!("the relay refused the welcome's ratchet tree: {e}"))
        }
    })
}

/// A sink that takes at most `cap` bytes: a relay cannot make a device hold more
/// than the pointer says.
struct Bounded {
    bytes: Vec<u8>,
    cap: usize,
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.cap {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "more bytes than the pointer's size",
            )));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// How long a tree's download may take: a minute, and a second per 64 KiB
/// (16 MiB: some five minutes).
fn download_timeout(sealed_size: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + sealed_size / (64 * 1024))
}

/// Downloads a tree's ciphertext (whole: it is small next to the bound).
async fn download(anon: &AnonymousLink, pointer: &TreePointer) -> Result<Vec<u8>> {
    let cap = usize::try_from(pointer.sealed_size).unwrap_or(usize::MAX);
    let mut tries = 0;
    loop {
        let conn = anon.get().await?;
        let mut sink = Bounded {
            bytes: Vec::new(),
            cap,
        };
        match conn.download_blob(&pointer.blob_id, 0, &mut sink).await {
            Ok(_) => return Ok(sink.bytes),
            // The relay closes an idle anonymous connection: once more on a new one.
            Err(Error::Closed(_)) if tries == 0 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// How a failed fetch counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchFailure {
    /// The relay has no such blob (`NOT_FOUND`): one of [`TREE_ATTEMPTS`].
    Missing,
    /// The relay refused otherwise, or could not be reached: tried again after a
    /// growing wait (at most [`TREE_RETRY_MAX_MS`]) while the welcome is held.
    Later,
    /// The blob is not what its pointer says: given up at once.
    Bad,
}

/// Fetches the trees of held welcomes that are due and joins their groups. Each
/// welcome's failure is its own ([`FetchFailure`]); only the device's own store
/// failing ends the round with an error.
pub(super) async fn fetch_trees(shared: &Shared, anon: &AnonymousLink) -> Result<Round> {
    let (events, due, later) = shared
        .state
        .lock()
        .await
        .held_welcomes_due(shared.now_ms())?;
    for e in events {
        shared.emit(e);
    }
    let mut round = if later { Round::Wait } else { Round::Idle };
    for (seq, pointer) in due {
        let bound = match shared.group_settings.tree_download_timeout_ms {
            Some(ms) => std::time::Duration::from_millis(ms),
            None => download_timeout(pointer.sealed_size),
        };
        let fetched = tokio::time::timeout(bound, download(anon, &pointer)).await;
        let mut state = shared.state.lock().await;
        let now = shared.now_ms();
        let failed = |e: &Error| match e.relay_code() {
            Some(ErrorCode::NotFound) => FetchFailure::Missing,
            Some(_) => FetchFailure::Later,
            None if matches!(e, Error::Media(_)) => FetchFailure::Bad,
            None => FetchFailure::Later,
        };
        let events = match fetched {
            Ok(Ok(sealed)) => {
                round.merge(Round::Progress);
                state.tree_fetched(seq, &sealed, now)?
            }
            Ok(Err(Error::Store(e))) => return Err(Error::Store(e)),
            Ok(Err(e)) => {
                round.merge(Round::Wait);
                state.tree_fetch_failed(seq, &e.to_string(), failed(&e), now)?
            }
            Err(_) => {
                round.merge(Round::Wait);
                state.tree_fetch_failed(seq, "timed out", FetchFailure::Later, now)?
            }
        };
        if !events.is_empty() {
            shared.outbox.notify_one();
        }
        for e in events {
            shared.emit(e);
        }
    }
    Ok(round)
}
