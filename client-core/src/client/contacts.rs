//! Contacts: adding them, their identity keys and changes to them (with the messages
//! held meanwhile), their devices, and the sessions with those devices.

use rand::{CryptoRng, RngCore};
use tern_proto::{AccountId, DeviceId};

use super::state::{corrupt, Outcome, State};
use crate::crypto::sessions::SessionSet;
use crate::store::records::{ContactDevice, ContactRecord, HeldRecord};
use crate::store::{Batch, InboxStore, SessionStore};
use crate::{Error, Result};
use tern_proto::DeviceBundle;

/// How often a contact's device list is checked with the relay while sending to it.
pub(crate) const DEVICE_CHECK_MS: u64 = 24 * 3600 * 1000;
/// Messages held at most per contact while an identity change waits for the user.
pub(crate) const MAX_HELD: u32 = 1000;

/// Why a contact's sessions could not be started.
pub(crate) enum StartError {
    /// The relay handed out a different identity key than the one we trust.
    IdentityChanged { first: bool },
    /// The contact has no devices with keys.
    NoDevices,
    /// Something failed locally.
    Fatal(Error),
}

impl State {
    pub(crate) fn contact(&self, account: &AccountId) -> Option<&ContactRecord> {
        self.contacts.get(account)
    }

    /// Stores `record` for `account` in `batch` and caches it.
    pub(super) fn put_contact(
        &mut self,
        account: AccountId,
        record: ContactRecord,
        batch: &mut Batch,
    ) {
        batch.put_contact(&account, &record);
        self.contacts.insert(account, record);
    }

    /// Adds a contact from a card the user trusts (scanned or received out of band).
    /// A card with a different identity key than the one already trusted is
    /// surfaced as a change, exactly like one seen on the network.
    pub(crate) fn add_contact(
        &mut self,
        account: AccountId,
        identity_key: [u8; 32],
        delivery_token: [u8; 32],
    ) -> Result<bool> {
        let mut record = self.contacts.get(&account).cloned().unwrap_or_default();
        let mut changed = false;
        if record.identity_key.is_empty() {
            record.identity_key = identity_key.to_vec();
        } else if record.identity_key != identity_key {
            changed = record.changed_identity_key.is_empty();
            record.changed_identity_key = identity_key.to_vec();
        }
        record.delivery_token = delivery_token.to_vec();
        let mut batch = Batch::new();
        self.put_contact(account, record, &mut batch);
        self.commit(batch, false)?;
        self.flush()?;
        Ok(changed)
    }

    /// Accepts a contact's changed identity key, if it is still `key` (the one the
    /// user compared): old sessions go and unsent messages will be encrypted again
    /// for new sessions. Held messages are then taken with [`State::held`].
    pub(crate) fn accept_identity(&mut self, account: &AccountId, key: &[u8; 32]) -> Result<bool> {
        let Some(mut record) = self.contacts.get(account).cloned() else {
            return Ok(false);
        };
        if record.changed_identity_key != key {
            return Ok(false);
        }
        let mut batch = Batch::new();
        record.identity_key = std::mem::take(&mut record.changed_identity_key);
        record.held = 0;
        // A list signed by the old identity says nothing about the new one (whose
        // versions start again): the next check takes the new identity's list.
        record.device_list_version = 0;
        record.device_list.clear();
        record.device_list_signature.clear();
        record.devices_checked_ms = 0;
        let outbox = self.unprepared_outbox(account, |c| c.sent, &mut batch);
        let devices = std::mem::take(&mut record.devices);
        for d in &devices {
            if let Ok(device) = DeviceId::try_from(d.device_id) {
                batch.delete_session(account, device);
            }
        }
        batch.put_contact(account, &record);
        self.commit(batch, true)?;
        // The caches follow only once the store has the change.
        for d in &devices {
            if let Ok(device) = DeviceId::try_from(d.device_id) {
                self.sessions.remove(&(*account, device));
            }
        }
        self.outbox.extend(outbox);
        self.contacts.insert(*account, record);
        Ok(true)
    }

    /// Messages held for `account` under the identity key now trusted, oldest first,
    /// each with its sequence number (delete it with [`Batch::delete_held`] in the
    /// message's own write). Held messages under any other key are deleted.
    pub(crate) fn held(&mut self, account: &AccountId) -> Result<Vec<(u64, HeldRecord)>> {
        let Some(trusted) = self.contacts.get(account).map(|c| c.identity_key.clone()) else {
            return Ok(Vec::new());
        };
        let mut held = Vec::new();
        let mut stale = Batch::new();
        for (seq, record) in self.kv.held()? {
            if record.sender != account.as_bytes() {
                continue;
            }
            if record.identity_key == trusted {
                held.push((seq, record));
            } else {
                stale.delete_held(seq);
            }
        }
        self.commit(stale, false)?;
        Ok(held)
    }

    /// Decrypts the messages held for `account` under the key now trusted, each
    /// held record deleted in the same write as the message it becomes; one flush at
    /// the end. Returns what each came to, oldest first.
    pub(crate) fn release_held(
        &mut self,
        account: &AccountId,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        for (seq, h) in self.held(account)? {
            let (Ok(device), Ok(identity_key)) = (
                DeviceId::try_from(h.sender_device),
                <[u8; 32]>::try_from(&h.identity_key[..]),
            ) else {
                continue;
            };
            let mut delete = Batch::new();
            delete.delete_held(seq);
            let outcome = self.accept(
                *account,
                device,
                identity_key,
                &h.message_id,
                &h.content,
                // A held broadcast opens with the shared body it came with.
                (!h.shared_body.is_empty()).then_some(&h.shared_body[..]),
                now_ms,
                rng,
                &mut delete,
            )?;
            // The held record went with the message's own write, or goes alone.
            self.commit(delete, false)?;
            outcomes.push(outcome);
        }
        self.flush()?;
        Ok(outcomes)
    }

    /// The session set with `device` of `account`, loaded into the cache if needed.
    pub(super) fn session(
        &mut self,
        account: &AccountId,
        device: DeviceId,
    ) -> Result<&mut SessionSet> {
        let key = (*account, device);
        if !self.sessions.contains_key(&key) {
            let set = match self.kv.session(account, device)? {
                Some(bytes) => SessionSet::from_bytes(&bytes).map_err(Error::Crypto)?,
                None => SessionSet::default(),
            };
            self.sessions.insert(key, set);
        }
        self.sessions.get_mut(&key).ok_or_else(corrupt)
    }

    /// Stores the cached session set with `device` of `account` in `batch`.
    pub(super) fn save_session(
        &mut self,
        account: &AccountId,
        device: DeviceId,
        batch: &mut Batch,
    ) -> Result<()> {
        let bytes = self.session(account, device)?.to_bytes();
        batch.put_session(account, device, &bytes);
        Ok(())
    }

    /// Whether sending to `account` needs its devices' bundles first. (A device is
    /// listed only once it has a session, so an empty list means none yet.)
    pub(crate) fn needs_bundles(&mut self, account: &AccountId) -> Result<bool> {
        Ok(self
            .contacts
            .get(account)
            .is_none_or(|c| c.devices.is_empty()))
    }

    /// Starts sessions with every device in `bundles` that has none yet.
    pub(crate) fn start_sessions(
        &mut self,
        account: AccountId,
        bundles: &[DeviceBundle],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), StartError> {
        let Some(first) = bundles.first() else {
            return Err(StartError::NoDevices);
        };
        let mut record = self.contacts.get(&account).cloned().unwrap_or_default();
        if record.identity_key.is_empty() {
            record.identity_key = first.identity_key.to_vec();
        }
        if let Some(other) = bundles
            .iter()
            .find(|b| record.identity_key != b.identity_key)
        {
            let first = record.changed_identity_key.is_empty();
            record.changed_identity_key = other.identity_key.to_vec();
            let mut batch = Batch::new();
            self.put_contact(account, record, &mut batch);
            self.commit(batch, false).map_err(StartError::Fatal)?;
            return Err(StartError::IdentityChanged { first });
        }
        let mut batch = Batch::new();
        let (our_id, our_dh) = (self.keys.identity_key, self.keys.identity_dh.clone());
        let listed = self.verified_list(&account);
        for b in bundles {
            // A bundle that does not verify (or that the signed list does not vouch
            // for) is skipped, not fatal: other devices work.
            let bundle = match self.check_bundle(&account, listed.as_ref(), b) {
                Ok(bundle) => bundle,
                Err(reason) => {
                    tracing::debug!(reason, "a prekey bundle was refused; skipped");
                    continue;
                }
            };
            let set = self
                .session(&account, b.device)
                .map_err(StartError::Fatal)?;
            if set.has_session() {
                continue;
            }
            if set.initiate(rng, &our_id, &our_dh, &bundle).is_err() {
                tracing::warn!("a contact device's prekey bundle failed verification; skipped");
                continue;
            }
            self.save_session(&account, b.device, &mut batch)
                .map_err(StartError::Fatal)?;
            record.devices.retain(|d| d.device_id != b.device.get());
            record.devices.push(ContactDevice {
                device_id: b.device.get(),
                identity_dh: b.identity_dh.key.to_vec(),
            });
        }
        if record.devices.is_empty() {
            return Err(StartError::NoDevices);
        }
        self.put_contact(account, record, &mut batch);
        self.commit(batch, false).map_err(StartError::Fatal)
    }

    /// The contact's delivery token, if we know one.
    pub(crate) fn token_of(&self, account: &AccountId) -> Option<[u8; 32]> {
        self.contacts.get(account)?.delivery_token[..]
            .try_into()
            .ok()
    }

    /// The contact's delivery token, if its device list is due a check with the relay
    /// (daily, and only for contacts we can ask anonymously).
    pub(crate) fn devices_due(&self, account: &AccountId, now_ms: u64) -> Option<[u8; 32]> {
        let c = self.contacts.get(account)?;
        if c.blocked() || c.devices.is_empty() {
            return None;
        }
        if now_ms.saturating_sub(c.devices_checked_ms) < DEVICE_CHECK_MS {
            return None;
        }
        c.delivery_token[..].try_into().ok()
    }

    /// Applies the relay's list of a contact's devices: devices gone are dropped
    /// (their unsent copies with them); returns the ids we have no session with yet.
    /// The check is recorded either way.
    pub(crate) fn update_devices(
        &mut self,
        account: &AccountId,
        ids: &[u32],
        now_ms: u64,
    ) -> Result<Vec<u32>> {
        let Some(mut record) = self.contacts.get(account).cloned() else {
            return Ok(Vec::new());
        };
        record.devices_checked_ms = now_ms;
        let gone: Vec<u32> = record
            .devices
            .iter()
            .map(|d| d.device_id)
            .filter(|d| !ids.contains(d))
            .collect();
        let new: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|d| !record.devices.iter().any(|k| k.device_id == *d))
            .collect();
        record.devices.retain(|d| ids.contains(&d.device_id));
        let mut batch = Batch::new();
        batch.put_contact(account, &record);
        let outbox = if gone.is_empty() {
            Vec::new()
        } else {
            self.unprepared_outbox(account, |c| !gone.contains(&c.device_id), &mut batch)
        };
        self.commit(batch, false)?;
        self.contacts.insert(*account, record);
        self.outbox.extend(outbox);
        Ok(new)
    }

    /// Forgets a contact's delivery token the relay no longer accepts.
    pub(crate) fn drop_token(&mut self, account: &AccountId) -> Result<()> {
        if let Some(mut record) = self.contacts.get(account).cloned() {
            record.delivery_token.clear();
            let mut batch = Batch::new();
            self.put_contact(*account, record, &mut batch);
            self.commit(batch, false)?;
        }
        Ok(())
    }

    /// Drops a contact device the relay no longer knows.
    pub(crate) fn drop_device(&mut self, account: &AccountId, device: u32) -> Result<()> {
        let mut batch = Batch::new();
        let mut contact = self.contacts.get(account).cloned();
        if let Some(record) = contact.as_mut() {
            record.devices.retain(|d| d.device_id != device);
            batch.put_contact(account, record);
        }
        // Its copies are moot; the messages wait for the contact's other devices (or
        // fail if it has none left).
        let outbox = self.unprepared_outbox(account, |c| c.device_id != device, &mut batch);
        self.commit(batch, false)?;
        if let Some(record) = contact {
            self.contacts.insert(*account, record);
        }
        self.outbox.extend(outbox);
        Ok(())
    }

    /// The sealed-sender recipient key of a contact device.
    pub(crate) fn device_identity_dh(&self, account: &AccountId, device: u32) -> Option<[u8; 32]> {
        self.contacts
            .get(account)?
            .devices
            .iter()
            .find(|d| d.device_id == device)
            .and_then(|d| d.identity_dh[..].try_into().ok())
    }

    /// A message under an identity key other than the trusted one. Only a message
    /// that proves the new key can raise a change: a prekey message under it that
    /// decrypts in a fresh session, which takes the new key's secrets. Anything else
    /// is dropped, so someone replaying another user's old certificate cannot block
    /// that user. Held messages are kept encrypted, unread, until the user accepts.
    pub(super) fn hold(
        &mut self,
        held: HeldRecord,
        mut contact: ContactRecord,
        rng: &mut (impl RngCore + CryptoRng),
        extra: &mut Batch,
    ) -> Result<Outcome> {
        let key: [u8; 32] = held.identity_key[..].try_into().map_err(|_| corrupt())?;
        if let Err(e) = self.decrypt_with(SessionSet::default(), &key, &held.content, rng)? {
            return Ok(Outcome::Dropped(format!(
                "a message under an identity key it does not prove: {e}"
            )));
        }
        let first = contact.changed_identity_key != key;
        if first {
            contact.changed_identity_key = key.to_vec();
            contact.held = 0;
        }
        if contact.held >= MAX_HELD {
            return Ok(Outcome::Dropped(
                "too many messages held for a changed identity key".into(),
            ));
        }
        contact.held += 1;
        let sender = AccountId::try_from(&held.sender[..]).map_err(|_| corrupt())?;
        let mut local = self.local.clone();
        let seq = local.next_inbox_seq;
        local.next_inbox_seq += 1;
        let mut batch = Batch::new();
        batch.put_held(seq, &held);
        batch.put_local(&local);
        batch.put_contact(&sender, &contact);
        batch.append(extra);
        self.commit(batch, false)?;
        self.local = local;
        self.contacts.insert(sender, contact);
        Ok(Outcome::Held {
            contact: sender,
            first,
        })
    }
}
