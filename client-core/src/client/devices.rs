//! Signed device lists on the sending side (the rules of ARCHITECTURE §13): which of
//! an account's devices a message may be encrypted to, which prekey bundles may
//! start a session, and this account's own list, which only the primary signs.
//!
//! The rules, for a contact and for this account's own other devices alike:
//! - a list is verified with the identity key we trust for the account, never one
//!   from a bundle, and an older list, or another list under the same version, is
//!   refused (the cached one stays);
//! - messages are encrypted only to devices both in the list and on the relay;
//! - a bundle must match its list entry (agreement key and device key), and its
//!   signed prekey verifies under the identity or that entry's device key;
//! - an account that never published a list keeps the rule from before lists:
//!   identity-signed bundles only, so the relay still cannot add a device. Once a
//!   list was seen, a missing one is refused (no downgrade).

use tern_proto::{AccountId, DeviceBundle, DeviceId};

use super::state::State;
use crate::crypto::devices::{
    sign_device_list, DeviceEntry, DeviceList, DeviceListRefusal, VerifiedDeviceList,
};
use crate::crypto::x3dh::{PreKeyBundle, PrekeySigner, VerifiedBundle};
use crate::store::records::{ContactRecord, PendingLink};
use crate::store::Batch;
use crate::{Error, Result};

/// How soon a listed device without a session is looked for again.
const RECHECK_MS: u64 = 60 * 1000;

/// What applying the relay's view of an account's devices came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ListCheck {
    /// Devices to encrypt to that have no session yet: fetch their bundles.
    pub(crate) new: Vec<u32>,
    /// Why the relay's list was refused, if it was (the cached one stays in force).
    pub(crate) refused: Option<String>,
}

/// How a new version of this account's own list differs from the current one.
#[derive(Clone)]
pub(crate) enum ListChange {
    /// The same devices (a first list, or one re-signed under a newer version).
    Same,
    /// A device joins with these keys.
    Add(DeviceEntry),
    /// A device leaves.
    Remove(DeviceId),
}

fn parse_cached(record: &ContactRecord) -> Option<DeviceList> {
    if record.device_list_version == 0 {
        return None;
    }
    DeviceList::parse(&record.device_list).ok()
}

impl State {
    /// The list version sends to `account` carry (0: not checked).
    pub(crate) fn list_version(&self, account: &AccountId) -> u64 {
        self.contacts
            .get(account)
            .map_or(0, |c| c.device_list_version)
    }

    /// Makes `account`'s device list due a check with the relay at the next send
    /// (after a `STALE_DEVICE_LIST`).
    pub(crate) fn check_list_now(&mut self, account: &AccountId) -> Result<()> {
        if let Some(mut record) = self.contacts.get(account).cloned() {
            record.devices_checked_ms = 0;
            let mut batch = Batch::new();
            self.put_contact(*account, record, &mut batch);
            self.commit(batch, false)?;
        }
        Ok(())
    }

    /// Listed devices of `account` we could not start a session with yet (one that
    /// has not published its keys, say): the list is checked again in a minute
    /// rather than a day.
    pub(crate) fn recheck_soon(&mut self, account: &AccountId, now_ms: u64) -> Result<()> {
        if let Some(mut record) = self.contacts.get(account).cloned() {
            record.devices_checked_ms = now_ms
                .saturating_sub(super::contacts::DEVICE_CHECK_MS)
                .saturating_add(RECHECK_MS);
            let mut batch = Batch::new();
            self.put_contact(*account, record, &mut batch);
            self.commit(batch, false)?;
        }
        Ok(())
    }

    /// Applies the relay's answer about `account`'s devices: its device ids and its
    /// signed list (both empty if it has none). A list that verifies and is newer is
    /// cached; devices outside `list ∩ ids` are dropped with their unsent copies.
    pub(crate) fn apply_device_list(
        &mut self,
        account: &AccountId,
        ids: &[u32],
        list: &[u8],
        signature: &[u8],
        now_ms: u64,
    ) -> Result<ListCheck> {
        let own = (*account == self.keys.address.account).then_some(self.keys.address.device);
        let record = match own {
            Some(_) => Some(self.own_contact()),
            None => self.contacts.get(account).cloned(),
        };
        let Some(mut record) = record else {
            return Ok(ListCheck::default());
        };
        if own.is_some() && !list.is_empty() {
            // Our own list from the relay (one the primary published, say): kept
            // as ours too if it verifies and is newer.
            if let Err(e @ Error::Store(_)) = self.store_own_list(list, signature) {
                return Err(e);
            }
            record = self.own_contact();
        }
        let mut refused = None;
        let trusted: Option<[u8; 32]> = record.identity_key[..].try_into().ok();
        if list.is_empty() && signature.is_empty() {
            if record.device_list_version > 0 {
                refused = Some(DeviceListRefusal::Missing.to_string());
            }
        } else if let Some(identity) = trusted.filter(|_| !record.blocked()) {
            let cached = (record.device_list_version > 0)
                .then_some((record.device_list_version, &record.device_list[..]));
            match VerifiedDeviceList::verify(&identity, account, list, signature, cached) {
                Ok(verified) if verified.version() > record.device_list_version => {
                    record.device_list_version = verified.version();
                    record.device_list = verified.bytes().to_vec();
                    record.device_list_signature = verified.signature().to_vec();
                }
                Ok(_) => {}
                Err(e) => refused = Some(format!("device list: {e}")),
            }
        }
        let allowed: Vec<u32> = match parse_cached(&record) {
            Some(l) => ids
                .iter()
                .copied()
                .filter(|id| l.entries.iter().any(|e| e.id.get() == *id))
                .collect(),
            None => ids.to_vec(),
        };
        let allowed: Vec<u32> = allowed
            .into_iter()
            .filter(|id| own.is_none_or(|d| d.get() != *id))
            .collect();
        if self.contacts.get(account) != Some(&record) {
            let mut batch = Batch::new();
            self.put_contact(*account, record, &mut batch);
            self.commit(batch, false)?;
        }
        let new = self.update_devices(account, &allowed, now_ms)?;
        Ok(ListCheck { new, refused })
    }

    /// The cached list of `account`, verified again under the identity we trust
    /// (what a bundle is checked against); `None` for a legacy account.
    pub(crate) fn verified_list(&self, account: &AccountId) -> Option<VerifiedDeviceList> {
        let c = self.contacts.get(account)?;
        if c.device_list_version == 0 {
            return None;
        }
        let identity: [u8; 32] = c.identity_key[..].try_into().ok()?;
        VerifiedDeviceList::verify(
            &identity,
            account,
            &c.device_list,
            &c.device_list_signature,
            None,
        )
        .ok()
    }

    /// Checks a fetched bundle of `account` before it may start a session: with a
    /// list, the device must be listed with this agreement key and its signed prekey
    /// verify under the identity or the listed device key; without one (a legacy
    /// account) only an identity-signed bundle passes. `Err` says why it is skipped.
    pub(crate) fn check_bundle(
        &self,
        account: &AccountId,
        listed: Option<&VerifiedDeviceList>,
        bundle: &DeviceBundle,
    ) -> std::result::Result<VerifiedBundle, &'static str> {
        if *account == self.keys.address.account && bundle.device == self.keys.address.device {
            return Err("this device");
        }
        let keys = PreKeyBundle {
            identity_key: bundle.identity_key,
            identity_dh: bundle.identity_dh.key,
            identity_dh_signature: bundle.identity_dh.signature,
            signed_prekey_id: bundle.signed_prekey.id,
            signed_prekey: bundle.signed_prekey.key,
            signed_prekey_signature: bundle.signed_prekey.signature,
            one_time_prekey: bundle.one_time_prekey,
        };
        let listed = listed.map(|l| (l, bundle.device));
        if let Some((list, device)) = listed {
            if list.entry(device).is_none() {
                return Err("a device the signed list does not name");
            }
        }
        // The wire does not say which key signed: the identity (a primary) or the
        // listed device key (a linked device); either must verify.
        keys.verify_listed(PrekeySigner::Identity, listed)
            .or_else(|_| keys.verify_listed(PrekeySigner::Device, listed))
            .map_err(|_| "a prekey bundle that does not match the signed list")
    }

    /// This account's own list, as last verified or signed here.
    pub(crate) fn own_list(&self) -> Option<DeviceList> {
        if self.local.device_list.is_empty() {
            return None;
        }
        DeviceList::parse(&self.local.device_list).ok()
    }

    /// Whether this device may sign lists: only the primary holds the identity key.
    pub(crate) fn is_primary(&self) -> bool {
        self.keys.address.device == DeviceId::PRIMARY && self.keys.identity.is_some()
    }

    /// The entry of this device, for a list that starts with it.
    fn own_entry(&self) -> DeviceEntry {
        DeviceEntry {
            id: self.keys.address.device,
            device_key: self.keys.device.public(),
            identity_dh: self.keys.identity_dh.public(),
        }
    }

    /// Signs the next version of this account's list with `change` applied, and
    /// stores its version durably before it may be published, so a crash never
    /// reuses a version. Only the primary signs.
    pub(crate) fn next_own_list(&mut self, change: ListChange) -> Result<(Vec<u8>, [u8; 64])> {
        if !self.is_primary() {
            return Err(Error::NotPrimary);
        }
        let mut entries = match self.own_list() {
            Some(l) => l.entries,
            None => vec![self.own_entry()],
        };
        match change {
            ListChange::Add(entry) => {
                entries.retain(|e| e.id != entry.id);
                entries.push(entry);
                entries.sort_by_key(|e| e.id.get());
            }
            ListChange::Remove(id) => entries.retain(|e| e.id != id),
            ListChange::Same => {}
        }
        let list = DeviceList {
            account: self.keys.address.account,
            version: self.local.device_list_version + 1,
            entries,
        };
        let identity = self.keys.identity.as_ref().ok_or(Error::NotPrimary)?;
        let (bytes, signature) = sign_device_list(identity.signing_key(), &list)?;
        let mut local = self.local.clone();
        local.device_list_version = list.version;
        let mut batch = Batch::new();
        batch.put_local(&local);
        self.commit(batch, true)?;
        self.local = local;
        Ok((bytes, signature))
    }

    /// Stores a list of this account that verified under its identity key (signed
    /// here, taken from the relay, or synced from the primary) if it is newer than
    /// the one held; it is also what sends to the other devices use. Returns whether
    /// it was stored.
    pub(crate) fn store_own_list(&mut self, list: &[u8], signature: &[u8]) -> Result<bool> {
        let mut batch = Batch::new();
        let Some(local) = self.stage_own_list(list, signature, &mut batch)? else {
            return Ok(false);
        };
        self.commit(batch, true)?;
        self.local = local;
        Ok(true)
    }

    /// [`State::store_own_list`] into `batch`: the local record to take once the
    /// batch is written, or `None` if the list is not newer.
    pub(crate) fn stage_own_list(
        &mut self,
        list: &[u8],
        signature: &[u8],
        batch: &mut Batch,
    ) -> Result<Option<crate::store::records::LocalRecord>> {
        let account = self.keys.address.account;
        let held = self
            .own_list()
            .map(|l| (l.version, &self.local.device_list[..]));
        let identity = self.keys.identity_key;
        let verified = match VerifiedDeviceList::verify(&identity, &account, list, signature, held)
        {
            Ok(verified) => verified,
            // One that crossed a newer one on its way: nothing to do.
            Err(Error::DeviceList(DeviceListRefusal::Older { .. })) => return Ok(None),
            Err(e) => return Err(e),
        };
        if held.is_some_and(|(v, _)| verified.version() <= v) {
            return Ok(None);
        }
        let mut local = self.local.clone();
        local.device_list_version = local.device_list_version.max(verified.version());
        local.device_list = verified.bytes().to_vec();
        local.device_list_signature = verified.signature().to_vec();
        let mut record = self.own_contact();
        record.device_list_version = verified.version();
        record.device_list = local.device_list.clone();
        record.device_list_signature = local.device_list_signature.clone();
        batch.put_local(&local);
        self.put_contact(account, record, batch);
        Ok(Some(local))
    }

    /// This account as a contact (its own identity and token), so its other devices
    /// are sent to, and their messages read, by the same rules as anyone's.
    pub(crate) fn own_contact(&self) -> ContactRecord {
        let mut record = self
            .contacts
            .get(&self.keys.address.account)
            .cloned()
            .unwrap_or_default();
        record.identity_key = self.keys.identity_key.to_vec();
        record.changed_identity_key.clear();
        record.delivery_token = self.keys.delivery_token.to_vec();
        record
    }

    /// Whether the account has devices besides this one (by its own list).
    pub(crate) fn has_other_devices(&self) -> bool {
        self.own_list()
            .is_some_and(|l| l.entries.iter().any(|e| e.id != self.keys.address.device))
    }

    /// Records a device linked here that has yet to say it joined.
    pub(crate) fn add_pending_link(&mut self, device: DeviceId, deadline_ms: u64) -> Result<()> {
        let mut local = self.local.clone();
        local.pending_links.retain(|p| p.device_id != device.get());
        local.pending_links.push(PendingLink {
            device_id: device.get(),
            deadline_ms,
        });
        self.put_local(local)
    }

    /// A linked device has joined (or was removed): it is no longer pending.
    pub(crate) fn settle_link(&mut self, device: DeviceId) -> Result<bool> {
        if !self
            .local
            .pending_links
            .iter()
            .any(|p| p.device_id == device.get())
        {
            return Ok(false);
        }
        let mut local = self.local.clone();
        local.pending_links.retain(|p| p.device_id != device.get());
        self.put_local(local)?;
        Ok(true)
    }

    /// Pending links past their deadline at `now_ms`.
    pub(crate) fn expired_links(&self, now_ms: u64) -> Vec<DeviceId> {
        self.local
            .pending_links
            .iter()
            .filter(|p| p.deadline_ms <= now_ms)
            .filter_map(|p| DeviceId::try_from(p.device_id).ok())
            .collect()
    }

    fn put_local(&mut self, local: crate::store::records::LocalRecord) -> Result<()> {
        let mut batch = Batch::new();
        batch.put_local(&local);
        self.commit(batch, true)?;
        self.local = local;
        Ok(())
    }
}
