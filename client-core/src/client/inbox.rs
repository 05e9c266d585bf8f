//! What comes in: a delivery is opened (sealed sender), its certificate checked, its
//! content decrypted and stored in the inbox until the app confirms it; duplicates
//! are recognised, and messages under a changed identity key are held.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::{AccountId, DeviceId};

use super::group_rejoin::RejoinVerdict;
use super::state::{Outcome, State};
use super::sync::Applied;
use super::ReceivedMessage;
use crate::crypto::message::{self, PreKeyId};
use crate::crypto::sessions::SessionSet;
use crate::crypto::x3dh::AgreementKeyPair;
use crate::crypto::{sealed, CryptoError};
use crate::store::records::{seen_key, ContactDevice, HeldRecord, InboxRecord, PreKeyKind};
use crate::store::{Batch, InboxStore, Namespace, PreKeyStore, StoreError};
use crate::{Error, Result};
use tern_proto::Delivery;

impl State {
    /// Opens, checks and decrypts one delivery, storing the result (not durably). An
    /// `Err` is a local failure: the delivery must not be acknowledged.
    pub(crate) fn receive(
        &mut self,
        delivery: &Delivery,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Outcome> {
        // A group message or welcome: the shared body alone, no 1:1 part (or, from
        // a relay that stores it per mailbox, the payload; its first byte tells it
        // from a sealed envelope's 0x01).
        let group_body = match (&delivery.shared_body, delivery.payload.first()) {
            (Some(body), None) => Some(&body[..]),
            (None, Some(0x02 | 0x03)) => Some(&delivery.payload[..]),
            (None, None) => return Ok(Outcome::Dropped("an empty envelope".into())),
            _ => None,
        };
        if let Some(body) = group_body {
            return self.receive_group(delivery.message_id.as_bytes(), body, now_ms);
        }
        let (cert, content) = match sealed::open(&self.keys.identity_dh, &delivery.payload) {
            Ok(opened) => opened,
            Err(e) => return Ok(Outcome::Dropped(format!("sealed envelope: {e}"))),
        };
        // The certificate must have been valid when the relay accepted the message, so
        // a device that was offline for a day still reads what was sent meanwhile.
        let checked_at = match delivery.accepted_at_ms {
            0 => now_ms,
            at => at,
        };
        if let Err(e) = self
            .certificates
            .validate(&cert, &self.keys.relay_signing_key, checked_at)
        {
            return Ok(Outcome::Dropped(format!("sender certificate: {e}")));
        }
        self.accept(
            cert.account,
            cert.device,
            cert.identity_key,
            delivery.message_id.as_bytes(),
            &content,
            delivery.shared_body.as_deref(),
            now_ms,
            rng,
            &mut Batch::new(),
        )
    }

    /// A message whose sender the certificate established: duplicate check, identity
    /// check, decryption, then the inbox. `extra` joins whatever batch this writes
    /// (and is left for the caller if it writes none).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept(
        &mut self,
        sender: AccountId,
        device: DeviceId,
        identity_key: [u8; 32],
        message_id: &[u8],
        content: &[u8],
        shared_body: Option<&[u8]>,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
        extra: &mut Batch,
    ) -> Result<Outcome> {
        let seen = seen_key(&sender, message_id);
        if self.unflushed_seen.contains(&seen) || self.kv.seen(&sender, message_id)? {
            return Ok(Outcome::Duplicate);
        }
        let mut contact = if sender == self.keys.address.account {
            // This account's other devices: trusted under its own identity only, and
            // never held as an identity change (ours cannot change).
            if identity_key != self.keys.identity_key {
                return Ok(Outcome::Dropped(
                    "a message from this account under another identity key".into(),
                ));
            }
            self.own_contact()
        } else {
            self.contacts.get(&sender).cloned().unwrap_or_default()
        };
        if contact.identity_key.is_empty() {
            // First contact: trust on first use; the safety number lets users check.
            contact.identity_key = identity_key.to_vec();
        } else if contact.identity_key != identity_key {
            let held = HeldRecord {
                sender: sender.as_bytes().to_vec(),
                sender_device: device.get(),
                identity_key: identity_key.to_vec(),
                message_id: message_id.to_vec(),
                content: content.to_vec(),
                shared_body: shared_body.map(<[u8]>::to_vec).unwrap_or_default(),
            };
            return self.hold(held, contact, rng, extra);
        }
        let set = self.session(&sender, device)?.clone();
        let (set, opened) = match self.decrypt_with(set, &identity_key, content, rng)? {
            Ok(done) => done,
            Err(e) => return Ok(Outcome::Dropped(format!("decryption: {e}"))),
        };
        let mut plaintext = opened.plaintext;
        if plaintext.sender_account != sender.as_bytes()[..]
            || plaintext.sender_device != device.get()
        {
            return Ok(Outcome::Dropped(
                "the sender inside the message differs from its certificate".into(),
            ));
        }
        // A request to be re-added to a group: the client's own business, alone.
        let rejoin = plaintext.group_rejoin.take();
        let mut readd = None;
        if let Some(rejoin) = &rejoin {
            if plaintext.sync.is_some()
                || plaintext.broadcast.is_some()
                || !plaintext.body.is_empty()
            {
                return Ok(Outcome::Dropped("a rejoin request carrying more".into()));
            }
            match self.judge_rejoin(
                sender,
                device,
                &identity_key,
                rejoin,
                plaintext.sent_at_ms,
                now_ms,
            )? {
                RejoinVerdict::Readd(group, record) => readd = Some((group, record)),
                RejoinVerdict::Dropped(reason) => {
                    tracing::debug!(reason, "a rejoin request dropped");
                }
            }
        }
        // A broadcast: the body is the shared one its key opens, from this sender.
        if let Some(broadcast) = plaintext.broadcast.take() {
            let inner = match super::broadcast::open_body(&broadcast, shared_body) {
                Ok(inner) => inner,
                Err(reason) => return Ok(Outcome::Dropped(reason)),
            };
            if inner.sender_account != plaintext.sender_account
                || inner.sender_device != plaintext.sender_device
                || inner.sync.is_some()
            {
                return Ok(Outcome::Dropped(
                    "a broadcast body from another sender".into(),
                ));
            }
            plaintext.body = inner.body;
            plaintext.attachments = inner.attachments;
            plaintext.sent_at_ms = inner.sent_at_ms;
        }
        // Own-device sync only from this account, under its identity key.
        let mut synced = None;
        if let Some(sync) = plaintext.sync.take() {
            let own = self.keys.address.account;
            if sender != own || identity_key != self.keys.identity_key {
                return Ok(Outcome::Dropped("sync from another account".into()));
            }
            match self.apply_sync(device, sync, now_ms, rng)? {
                Ok(applied) => synced = Some(applied),
                Err(reason) => return Ok(Outcome::Dropped(reason)),
            }
        }
        if rejoin.is_some() {
            synced = Some(Applied::Done(Vec::new()));
        }
        if plaintext.delivery_token.len() == 32 {
            contact.delivery_token = plaintext.delivery_token.to_vec();
        }
        if let Some(dh) = opened.sender_identity_dh {
            if !contact.devices.iter().any(|d| d.device_id == device.get()) {
                // A device new to us (a linked one, say): check the list at the next send.
                contact.devices_checked_ms = 0;
            }
            contact.devices.retain(|d| d.device_id != device.get());
            contact.devices.push(ContactDevice {
                device_id: device.get(),
                identity_dh: dh.to_vec(),
            });
        }
        let mut local = self.local.clone();
        let seq = local.next_inbox_seq;
        let (inbox, events) = match synced {
            None => (
                Some(InboxRecord {
                    sender: sender.as_bytes().to_vec(),
                    sender_device: device.get(),
                    message_id: message_id.to_vec(),
                    body: plaintext.body.to_vec(),
                    sent_at_ms: plaintext.sent_at_ms,
                    received_at_ms: now_ms,
                    attachments: plaintext
                        .attachments
                        .iter()
                        .map(Message::encode_to_vec)
                        .collect(),
                    sent_to: Vec::new(),
                }),
                Vec::new(),
            ),
            Some(Applied::Transcript(t)) => (
                Some(InboxRecord {
                    sender: sender.as_bytes().to_vec(),
                    sender_device: device.get(),
                    message_id: t.message_id.to_vec(),
                    body: t.body.to_vec(),
                    sent_at_ms: t.sent_at_ms,
                    received_at_ms: now_ms,
                    attachments: t.attachments.iter().map(Message::encode_to_vec).collect(),
                    sent_to: t.recipient_account.to_vec(),
                }),
                Vec::new(),
            ),
            Some(Applied::Done(events)) => (None, events),
        };
        if inbox.is_some() {
            local.next_inbox_seq += 1;
        }
        // A sync message may have changed the record meanwhile (the own list).
        if sender == self.keys.address.account {
            let mut merged = self.own_contact();
            merged.devices = contact.devices;
            merged.devices_checked_ms = merged.devices_checked_ms.min(contact.devices_checked_ms);
            contact = merged;
        }
        let mut batch = Batch::new();
        batch.put_session(&sender, device, &set.to_bytes());
        if let Some(inbox) = &inbox {
            batch.put_inbox(seq, inbox);
        }
        batch.put_seen(&sender, message_id, now_ms);
        batch.put_local(&local);
        // Most messages change nothing about their sender: no contact write then.
        // A rejoin request makes no stranger a contact (it is dropped, above).
        let keep_contact =
            rejoin.is_none() || sender == self.keys.address.account || self.is_contact(&sender);
        if self.contacts.get(&sender) != Some(&contact) && keep_contact {
            batch.put_contact(&sender, &contact);
        }
        if let Some(id) = opened.one_time_prekey {
            batch.delete_prekey(PreKeyKind::OneTime, id);
        }
        if let Some((group, record)) = &readd {
            batch.put(Namespace::Groups, group.clone(), &**record);
        }
        batch.append(extra);
        self.commit(batch, false)?;
        if let Some((group, record)) = readd {
            self.groups.insert(group, *record);
        }
        // The caches follow only once the store has the change.
        self.sessions.insert((sender, device), set);
        if keep_contact {
            self.contacts.insert(sender, contact);
        }
        self.local = local;
        self.unflushed_seen.insert(seen);
        if opened.one_time_prekey.is_some() {
            self.consumed_prekeys += 1;
        }
        match inbox {
            Some(inbox) => Ok(Outcome::Message(ReceivedMessage::from_record(seq, &inbox)?)),
            None => Ok(Outcome::Synced(events)),
        }
    }

    /// Decrypts `content` in `set`, a copy the caller keeps only on success. The
    /// outer error is a local storage failure (nothing may be acknowledged); the
    /// inner one means the message does not decrypt.
    pub(super) fn decrypt_with(
        &self,
        mut set: SessionSet,
        identity_key: &[u8; 32],
        content: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<std::result::Result<(SessionSet, message::Decrypted), CryptoError>> {
        let mut store_error = None;
        let result = {
            let (kv, signed) = (&self.kv, &self.signed_prekeys);
            let mut prekeys = |id: PreKeyId| -> Option<AgreementKeyPair> {
                match id {
                    PreKeyId::Signed(id) => signed.get(&id).map(|(pair, _)| pair.clone()),
                    PreKeyId::OneTime(id) => {
                        let record = match kv.prekey(PreKeyKind::OneTime, id) {
                            Ok(r) => r?,
                            // A record that does not parse is a key we do not have.
                            Err(StoreError::Corrupt) => return None,
                            Err(e) => {
                                store_error = Some(e);
                                return None;
                            }
                        };
                        Some(AgreementKeyPair::from_secret(
                            record.secret[..].try_into().ok()?,
                        ))
                    }
                }
            };
            message::decrypt(
                rng,
                &mut set,
                (&self.keys.identity_key, &self.keys.identity_dh),
                identity_key,
                &mut prekeys,
                content,
            )
        };
        if let Some(e) = store_error {
            return Err(Error::Store(e));
        }
        Ok(result.map(|d| (set, d)))
    }

    /// The app has the message: it leaves the inbox.
    pub(crate) fn confirm(&mut self, seq: u64) -> Result<()> {
        let mut batch = Batch::new();
        batch.delete_inbox(seq);
        // Group messages share the inbox's numbering.
        batch.delete(Namespace::GroupInbox, crate::store::records::seq_key(seq));
        self.commit(batch, true)
    }

    /// Messages received but not yet confirmed by the app, oldest first.
    pub(crate) fn unconfirmed(&self) -> Result<Vec<ReceivedMessage>> {
        self.kv
            .inbox()?
            .iter()
            .map(|(seq, record)| ReceivedMessage::from_record(*seq, record))
            .collect()
    }
}
