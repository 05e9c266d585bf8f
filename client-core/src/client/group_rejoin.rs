//! A group device left behind asks to be re-added, and a member re-adds it.
//!
//! Asking (`GroupRejoin`, a sealed 1:1 message with no body): a device asks when it
//! refused a commit (`GroupRecord::behind_since_ms`), or when a `STALE_EPOCH` wait
//! is still unmet [`GroupSettings::rejoin_after_ms`](super::groups::GroupSettings)
//! after the mailbox was read to its end (the relay's `QueueEmpty`: the epoch it
//! named can no longer come; its commit expired at the relay, say). It asks its
//! account's other devices and the account that added it: once a
//! [`REJOIN_EVERY_MS`] per group at first, the wait doubling after each request
//! that brings no welcome, up to [`REJOIN_MAX_WAIT_MS`]. A request a member
//! cannot take (this device's leaf shows a key other than the one pinned for its
//! account) is thus not sent daily forever; a re-add cannot recover such a leaf,
//! only removing it can.
//!
//! Taking a request ([`State::judge_rejoin`]): the group is here and not being
//! left; the sender is not blocked and shows the identity key pinned for its
//! account (this account's own, a contact's, or the first one the group showed);
//! its device is a leaf of the current epoch under that key; the epoch it names is
//! below the current one; it was not sent before that leaf came (a request naming
//! an epoch below the leaf's, sent, by its authenticated time, more than
//! [`REJOIN_SKEW_MS`] before this device applied the leaf's commit: another
//! member re-added the device and this copy came late; `GroupRecord::leaf_epochs`)
//! — a request sent after the add is taken, as that re-add's welcome never
//! reached the device, and past a week and a day after the add none is told
//! apart; and this device re-added it no sooner than a [`REJOIN_EVERY_MS`] ago. Then an `OP_READD_DEVICE` is queued; anything else is
//! dropped quietly (a debug log naming no account).
//!
//! Planning ([`State::readd_changes`]): in the epoch the request was taken in
//! only, for a device still a leaf, with a fresh key package of exactly that
//! device (the only one fetched); one commit removes its leaf and adds it back.
//! Otherwise the op is dropped: another re-add may have come first, and a device
//! still behind (that re-add's welcome lost) asks again, and is taken.

use std::sync::atomic::Ordering;

use prost::Message;
use rand::rngs::OsRng;
use rand::{CryptoRng, RngCore};
use tern_proto::{e2e, AccountId, DeviceId};

use super::group_commit::accounts_of;
use super::group_records::{
    GroupOpRecord, GroupRecord, LeafEpochRecord, ReaddRecord, OP_READD_DEVICE,
};
use super::group_tree::HELD_WELCOME_MAX_AGE_MS;
use super::send::Round;
use super::state::State;
use super::Shared;
use crate::groups::{Changes, GroupDevice};
use crate::store::records::OutboxRecord;
use crate::store::{Batch, StoreError};
use crate::{Error, Result};

/// At most one request per group, and one re-add per device, this often.
pub(crate) const REJOIN_EVERY_MS: u64 = 24 * 3600 * 1000;

/// The longest wait between two requests for one group.
pub(crate) const REJOIN_MAX_WAIT_MS: u64 = 30 * REJOIN_EVERY_MS;

/// The wait after `asks` requests unanswered: a day after the first, doubling
/// after each further one, at most [`REJOIN_MAX_WAIT_MS`].
fn rejoin_wait(asks: u32) -> u64 {
    let doublings = asks.saturating_sub(1).min(5);
    (REJOIN_EVERY_MS << doublings).min(REJOIN_MAX_WAIT_MS)
}

/// How far a request's send time may run ahead of this device's clock and still
/// count as sent before a leaf came.
pub(crate) const REJOIN_SKEW_MS: u64 = 3600 * 1000;

/// Whether a request naming `epoch`, sent at `sent_at_ms`, was sent before the
/// device's current leaf came (`added`): a re-add answered it already and this
/// copy came late. A request naming an older epoch but sent after the add is
/// taken: that re-add's welcome never reached the device (its tree could not be
/// downloaded, its pin check failed, the re-adder never sent it), and dropping
/// it would shut the device out for good. Past the longest a welcome is held
/// (and a day) no late copy is told apart any more; nor without a recorded time.
fn predates_leaf(epoch: u64, sent_at_ms: u64, added: &LeafEpochRecord, now_ms: u64) -> bool {
    epoch < added.epoch
        && added.added_at_ms != 0
        && now_ms.saturating_sub(added.added_at_ms) <= HELD_WELCOME_MAX_AGE_MS + REJOIN_EVERY_MS
        && sent_at_ms.saturating_add(REJOIN_SKEW_MS) < added.added_at_ms
}

/// What a received `GroupRejoin` comes to.
#[derive(Debug)]
pub(crate) enum RejoinVerdict {
    /// A re-add is queued: the group's record with it, to store.
    Readd(Vec<u8>, Box<GroupRecord>),
    /// Dropped, for this reason (logged at debug level only).
    Dropped(&'static str),
}

/// The worker's look, every send round (so at least hourly): queues the requests
/// due. Progress when one was queued.
pub(super) async fn ask_due(shared: &Shared) -> Result<Round> {
    let drained = shared.drained.load(Ordering::Relaxed);
    let after = shared.group_settings.rejoin_after_ms;
    let queued =
        shared
            .state
            .lock()
            .await
            .queue_rejoins(shared.now_ms(), drained, after, &mut OsRng)?;
    Ok(if queued { Round::Progress } else { Round::Idle })
}

impl State {
    /// Asks to be re-added in every group this device is left behind in (see the
    /// module). `drained`: the mailbox was read to its end on this connection.
    /// Whether a request was queued.
    pub(crate) fn queue_rejoins(
        &mut self,
        now_ms: u64,
        drained: bool,
        rejoin_after_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<bool> {
        let mut batch = Batch::new();
        let mut queued = false;
        let ids: Vec<Vec<u8>> = self.groups.keys().cloned().collect();
        for id in ids {
            let Some(old) = self.groups.get(&id).cloned() else {
                continue;
            };
            let quiet =
                old.behind_since_ms == 0 && old.wait_epoch == 0 && old.wait_unmet_since_ms == 0;
            if old.leaving {
                continue;
            }
            if quiet {
                // Caught up: a later fall behind asks at the first pace again.
                if old.rejoin_asks != 0 {
                    let mut record = old;
                    record.rejoin_asks = 0;
                    self.put_group(&id, record, &mut batch);
                }
                continue;
            }
            let epoch = match self.session_mut(&id) {
                Ok(s) => s.epoch(),
                Err(Error::Store(e)) if !matches!(e, StoreError::Corrupt) => {
                    return Err(Error::Store(e))
                }
                Err(_) => continue,
            };
            let mut record = old.clone();
            if record.wait_epoch <= epoch {
                record.wait_unmet_since_ms = 0;
                if record.behind_since_ms == 0 {
                    record.rejoin_asks = 0;
                }
            } else if drained && record.wait_unmet_since_ms == 0 {
                record.wait_unmet_since_ms = now_ms.max(1);
            }
            // A persisted timer counts only once this connection read the mailbox
            // to its end: the awaited commit may still be queued there.
            let waited = drained
                && record.wait_unmet_since_ms != 0
                && now_ms.saturating_sub(record.wait_unmet_since_ms) >= rejoin_after_ms;
            let asked = record.rejoin_asked_ms != 0
                && now_ms.saturating_sub(record.rejoin_asked_ms) < rejoin_wait(record.rejoin_asks);
            if (record.behind_since_ms != 0 || waited) && !asked {
                let to = self.rejoin_recipients(&record);
                let body = e2e::GroupRejoin {
                    group_id: id.clone().into(),
                    epoch,
                }
                .encode_to_vec();
                for account in &to {
                    self.queue_rejoin(account, &body, now_ms, rng, &mut batch);
                }
                if !to.is_empty() {
                    record.rejoin_asked_ms = now_ms.max(1);
                    record.rejoin_asks = record.rejoin_asks.saturating_add(1);
                    queued = true;
                    tracing::debug!("asked to be re-added to a group");
                }
            }
            if record != old {
                self.put_group(&id, record, &mut batch);
            }
        }
        if !batch.is_empty() {
            self.commit(batch, true)?;
        }
        Ok(queued)
    }

    /// Who is asked: this account (its other devices), and the account that
    /// added this device if it is a contact not blocked.
    fn rejoin_recipients(&self, record: &GroupRecord) -> Vec<AccountId> {
        let own = self.keys.address.account;
        let mut to = Vec::new();
        if self.has_other_devices() {
            to.push(own);
        }
        if let Ok(adder) = AccountId::try_from(&record.added_by[..]) {
            let known = self
                .contacts
                .get(&adder)
                .is_some_and(|c| !c.identity_key.is_empty() && !c.blocked());
            if adder != own && known {
                to.push(adder);
            }
        }
        to
    }

    /// Whether `account` is a contact with a pinned identity key. A rejoin
    /// request from anyone else is dropped and makes them no contact.
    pub(crate) fn is_contact(&self, account: &AccountId) -> bool {
        self.contacts
            .get(account)
            .is_some_and(|c| !c.identity_key.is_empty())
    }

    /// Queues the encoded `GroupRejoin` for `account`'s devices, in `batch`.
    pub(crate) fn queue_rejoin(
        &mut self,
        account: &AccountId,
        body: &[u8],
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
        batch: &mut Batch,
    ) {
        let record = OutboxRecord {
            created_ms: now_ms,
            rejoin: body.to_vec(),
            ..OutboxRecord::default()
        };
        self.queue_control(account, record, rng, batch);
    }

    /// Judges a `GroupRejoin` from `sender`'s `device`, which showed
    /// `identity_key` (the caller decrypted it under that key) and sent it at
    /// `sent_at_ms` (its authenticated `Plaintext.sent_at_ms`). Nothing is
    /// written: a re-add's record is for the caller to store. `Err` only for a
    /// local failure.
    pub(crate) fn judge_rejoin(
        &mut self,
        sender: AccountId,
        device: DeviceId,
        identity_key: &[u8; 32],
        rejoin: &e2e::GroupRejoin,
        sent_at_ms: u64,
        now_ms: u64,
    ) -> Result<RejoinVerdict> {
        use RejoinVerdict::Dropped;
        let group = rejoin.group_id.to_vec();
        let Some(mut record) = self.groups.get(&group).cloned() else {
            return Ok(Dropped("a rejoin request for a group not here"));
        };
        if record.leaving {
            return Ok(Dropped("a rejoin request for a group being left"));
        }
        let own = sender == self.keys.address.account;
        if !own && !self.is_contact(&sender) {
            return Ok(Dropped("a rejoin request from no contact"));
        }
        if !own && self.contacts.get(&sender).is_some_and(|c| c.blocked()) {
            return Ok(Dropped("a rejoin request from a blocked contact"));
        }
        if self.pinned_key(&record, &sender).as_deref() != Some(&identity_key[..]) {
            return Ok(Dropped("a rejoin request without the pinned identity key"));
        }
        let session = match self.session_mut(&group) {
            Ok(s) => s,
            Err(Error::Store(e)) if !matches!(e, StoreError::Corrupt) => {
                return Err(Error::Store(e))
            }
            Err(_) => return Ok(Dropped("a rejoin request for a group that does not load")),
        };
        let epoch = session.epoch();
        let leaf = session
            .members()
            .into_iter()
            .find(|m| m.account == sender && m.device == device);
        match leaf {
            None => return Ok(Dropped("a rejoin request from a device not in the group")),
            Some(m) if m.identity_key != *identity_key => {
                return Ok(Dropped("a rejoin request from a leaf under another key"))
            }
            Some(_) => {}
        }
        if rejoin.epoch >= epoch {
            return Ok(Dropped("a rejoin request from a device not behind"));
        }
        if record
            .leaf_added(&sender, device.get())
            .is_some_and(|added| predates_leaf(rejoin.epoch, sent_at_ms, added, now_ms))
        {
            return Ok(Dropped("a rejoin request older than the device's leaf"));
        }
        record
            .readds
            .retain(|r| now_ms.saturating_sub(r.at_ms) < REJOIN_EVERY_MS);
        if record
            .readds
            .iter()
            .any(|r| r.account == sender.as_bytes() && r.device == device.get())
        {
            return Ok(Dropped("a second rejoin request within a day"));
        }
        record.readds.push(ReaddRecord {
            account: sender.as_bytes().to_vec(),
            device: device.get(),
            at_ms: now_ms.max(1),
        });
        record.ops.push(GroupOpRecord {
            kind: OP_READD_DEVICE,
            accounts: vec![sender.as_bytes().to_vec()],
            device: device.get(),
            epoch,
            ..GroupOpRecord::default()
        });
        Ok(RejoinVerdict::Readd(group, Box::new(record)))
    }

    /// The commit of an `OP_READD_DEVICE` (see the module): `None` drops it.
    pub(crate) fn readd_changes(
        &mut self,
        group: &[u8],
        op: &GroupOpRecord,
        key_packages: &[Vec<u8>],
    ) -> Result<Option<Changes>> {
        let (Some(account), Ok(device)) = (
            accounts_of(op).first().copied(),
            DeviceId::try_from(op.device),
        ) else {
            return Ok(None);
        };
        let session = self.session_mut(group)?;
        if session.epoch() != op.epoch {
            tracing::debug!("a re-add dropped: the group moved on since its request");
            return Ok(None);
        }
        if !session
            .members()
            .iter()
            .any(|m| m.account == account && m.device == device)
        {
            tracing::debug!("a re-add dropped: the device is no longer in the group");
            return Ok(None);
        }
        let package = key_packages.iter().find(|kp| {
            GroupDevice::verify_key_package(kp)
                .is_ok_and(|m| m.account == account && m.device == device)
                && self.acceptable_key_package(&account, kp)
        });
        let Some(package) = package else {
            tracing::debug!("a re-add dropped: no key package of the device");
            return Ok(None);
        };
        Ok(Some(Changes {
            add: vec![package.clone()],
            remove_devices: vec![(account, device)],
            ..Changes::default()
        }))
    }
}
