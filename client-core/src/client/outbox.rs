//! What goes out: a message is queued, encrypted once per recipient device (the
//! ciphertext stored before it leaves, so a retry resends it rather than reusing
//! ratchet keys), sealed for each device under the current sender certificate, and
//! marked sent device by device. The network worker only moves the sealed bytes.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::e2e::sync_message::Kind;
use tern_proto::{e2e, AccountId, DeviceId, MessageId};

use super::state::{account_of, corrupt, State};
use crate::crypto::sealed::{self, SenderCertificate};
use crate::crypto::{message, padding};
use crate::media::AttachmentPointer;
use crate::store::records::{ContactRecord, OutboxCopy, OutboxRecord};
use crate::store::Batch;
use crate::{Error, Result};

/// The largest message body `send` accepts: what pads to at most
/// [`padding::MAX_PADDED`] with the plaintext's own fields.
pub const MAX_BODY: usize = padding::MAX_PLAINTEXT - 256;

/// One envelope ready to leave: sealed for its recipient device.
pub(crate) struct SealedCopy {
    /// The outbox message it is a copy of.
    pub(crate) seq: u64,
    pub(crate) message_id: MessageId,
    /// The sealed-sender envelope's bytes.
    pub(crate) payload: Vec<u8>,
}

/// Every unsent copy for one contact device, in outbox order.
pub(crate) struct DeviceSends {
    pub(crate) device: DeviceId,
    pub(crate) copies: Vec<SealedCopy>,
}

impl State {
    /// Queues `body` for `recipient`: stored before this returns.
    pub(crate) fn enqueue(
        &mut self,
        recipient: &AccountId,
        body: &[u8],
        attachments: &[AttachmentPointer],
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<MessageId> {
        let pointers = attachments;
        let attachments: Vec<Vec<u8>> = pointers.iter().map(AttachmentPointer::to_bytes).collect();
        let size = body.len() + attachments.iter().map(|a| a.len() + 4).sum::<usize>();
        if size > MAX_BODY {
            return Err(Error::TooLarge { max: MAX_BODY });
        }
        if self
            .contacts
            .get(recipient)
            .is_some_and(ContactRecord::blocked)
        {
            return Err(Error::UntrustedIdentity);
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let seq = self.local.next_outbox_seq;
        self.local.next_outbox_seq += 1;
        let record = OutboxRecord {
            message_id: id.to_vec(),
            recipient: recipient.as_bytes().to_vec(),
            body: body.to_vec(),
            created_ms: now_ms,
            copies: Vec::new(),
            prepared: false,
            attachments,
            ..OutboxRecord::default()
        };
        let mut batch = Batch::new();
        batch.put_outbox(seq, &record);
        // The account's other devices show it as sent; queued in the same write (a
        // message to this account itself reaches them as it is).
        if *recipient != self.keys.address.account && self.has_other_devices() {
            let transcript = e2e::SentTranscript {
                recipient_account: recipient.as_bytes().to_vec().into(),
                message_id: id.to_vec().into(),
                sent_at_ms: now_ms,
                body: body.to_vec().into(),
                attachments: pointers.iter().map(AttachmentPointer::to_wire).collect(),
            };
            self.queue_sync(Kind::Sent(transcript), now_ms, rng, &mut batch);
        }
        batch.put_local(&self.local);
        self.commit(batch, false)?;
        self.outbox.insert(seq, record);
        // With sessions already there, encrypt now: the message and its session
        // state then share one durable write instead of one each. Otherwise (or if
        // this fails) the worker prepares it and reports what goes wrong.
        let known = self
            .contacts
            .get(recipient)
            .is_some_and(|c| !c.devices.is_empty());
        if known {
            let _ = self.prepare(seq, now_ms);
        }
        self.flush()?;
        Ok(MessageId(id))
    }

    pub(crate) fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The outbox, oldest first.
    pub(crate) fn outbox(&self) -> impl Iterator<Item = (&u64, &OutboxRecord)> {
        self.outbox.iter()
    }

    /// Encrypts message `seq` for every device of its recipient that has no copy.
    pub(crate) fn prepare(&mut self, seq: u64, now_ms: u64) -> Result<()> {
        let Some(mut record) = self.outbox.get(&seq).cloned() else {
            return Ok(());
        };
        if record.prepared {
            return Ok(());
        }
        let recipient = account_of(&record.recipient)?;
        let own = self.keys.address;
        let devices: Vec<u32> = self
            .contacts
            .get(&recipient)
            .map(|c| c.devices.iter().map(|d| d.device_id).collect())
            .unwrap_or_default();
        // Never to this device itself.
        let devices: Vec<u32> = devices
            .into_iter()
            .filter(|d| recipient != own.account || *d != own.device.get())
            .collect();
        if devices.is_empty() {
            // Not prepared: the next round fetches the contact's devices first.
            return Ok(());
        }
        let sync = match record.sync.is_empty() {
            true => None,
            false => Some(e2e::SyncMessage::decode(&record.sync[..]).map_err(|_| corrupt())?),
        };
        let group_rejoin = match record.rejoin.is_empty() {
            true => None,
            false => Some(e2e::GroupRejoin::decode(&record.rejoin[..]).map_err(|_| corrupt())?),
        };
        // A broadcast's envelopes carry only its key: the body travels once, shared.
        let broadcast = self.broadcast_key(seq);
        let (body, attachments) = match broadcast {
            Some(_) => (Vec::new(), Vec::new()),
            None => (record.body.clone(), record.attachments.clone()),
        };
        let padded = message::pad_plaintext(&e2e::Plaintext {
            sync,
            broadcast,
            group_rejoin,
            body: body.into(),
            delivery_token: self.keys.delivery_token.to_vec().into(),
            sent_at_ms: now_ms,
            sender_account: self.keys.address.account.as_bytes().to_vec().into(),
            sender_device: self.keys.address.device.get(),
            attachments: attachments
                .iter()
                .map(|a| e2e::AttachmentPointer::decode(&a[..]))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| corrupt())?,
        })
        .ok_or(Error::TooLarge { max: MAX_BODY })?;
        let mut batch = Batch::new();
        let identity_dh_signature = self.keys.identity_dh_signature;
        for d in devices {
            if record.copies.iter().any(|c| c.device_id == d) {
                continue;
            }
            let device = DeviceId::try_from(d).map_err(|_| corrupt())?;
            let content = message::encrypt(
                self.session(&recipient, device)?,
                &identity_dh_signature,
                &padded,
            )?;
            record.copies.push(OutboxCopy {
                device_id: d,
                content,
                sent: false,
            });
            self.save_session(&recipient, device, &mut batch)?;
        }
        record.prepared = true;
        batch.put_outbox(seq, &record);
        self.commit(batch, false)?;
        self.outbox.insert(seq, record);
        Ok(())
    }

    /// Up to `max` unsent copies to `recipient`, oldest first, grouped by device and
    /// sealed for it under `certificate`, with the contact's delivery token when we
    /// have one (without it the send has to identify us). Copies for a device with no
    /// known sealing key wait. `max` bounds how long the caller holds the state and
    /// how long a sealed copy waits to leave, so a backlog never goes out under a
    /// certificate that expired while it was being sent.
    pub(crate) fn sealed_sends(
        &self,
        recipient: &AccountId,
        certificate: &SenderCertificate,
        max: usize,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Vec<DeviceSends>, Option<[u8; 32]>)> {
        let mut plans: Vec<(DeviceSends, [u8; 32])> = Vec::new();
        let mut sealed = 0;
        for (seq, r) in self.outbox() {
            if sealed == max {
                break;
            }
            // Broadcast copies leave by multi-send (`broadcast_sends`).
            if r.recipient != recipient.as_bytes() || self.is_broadcast(*seq) {
                continue;
            }
            let Ok(id) = <[u8; 16]>::try_from(&r.message_id[..]) else {
                continue;
            };
            for c in r.copies.iter().filter(|c| !c.sent) {
                if sealed == max {
                    break;
                }
                let Ok(device) = DeviceId::try_from(c.device_id) else {
                    continue;
                };
                let at = match plans.iter().position(|(p, _)| p.device == device) {
                    Some(at) => at,
                    None => {
                        let Some(identity_dh) = self.device_identity_dh(recipient, c.device_id)
                        else {
                            continue;
                        };
                        let sends = DeviceSends {
                            device,
                            copies: Vec::new(),
                        };
                        plans.push((sends, identity_dh));
                        plans.len() - 1
                    }
                };
                let (sends, identity_dh) = &mut plans[at];
                let payload = sealed::seal(rng, identity_dh, certificate, &c.content)?;
                sealed += 1;
                sends.copies.push(SealedCopy {
                    seq: *seq,
                    message_id: MessageId(id),
                    payload,
                });
            }
        }
        let token: Option<[u8; 32]> = self
            .contact(recipient)
            .and_then(|c| c.delivery_token[..].try_into().ok());
        Ok((plans.into_iter().map(|(p, _)| p).collect(), token))
    }

    /// Marks copies sent; returns the message id once every copy is.
    pub(crate) fn mark_sent(
        &mut self,
        seq: u64,
        devices: &[u32],
    ) -> Result<Option<(MessageId, AccountId)>> {
        let Some(record) = self.outbox.get_mut(&seq) else {
            return Ok(None);
        };
        for c in record.copies.iter_mut() {
            if devices.contains(&c.device_id) {
                c.sent = true;
            }
        }
        let mut batch = Batch::new();
        if record.prepared && record.copies.iter().all(|c| c.sent) {
            let done = self.outbox.remove(&seq).ok_or_else(corrupt)?;
            batch.delete_outbox(seq);
            self.drop_broadcast_part(seq, &mut batch);
            self.commit(batch, false)?;
            // Sync messages are the client's own business: no event for them.
            if done.is_control() {
                return Ok(None);
            }
            let id = <[u8; 16]>::try_from(&done.message_id[..]).map_err(|_| corrupt())?;
            return Ok(Some((MessageId(id), account_of(&done.recipient)?)));
        }
        batch.put_outbox(seq, record);
        self.commit(batch, false)?;
        Ok(None)
    }

    /// Gives up on a message (the recipient does not exist, say).
    pub(crate) fn fail(&mut self, seq: u64) -> Result<Option<MessageId>> {
        let Some(record) = self.outbox.remove(&seq) else {
            return Ok(None);
        };
        let mut batch = Batch::new();
        batch.delete_outbox(seq);
        self.drop_broadcast_part(seq, &mut batch);
        self.commit(batch, false)?;
        if record.is_control() {
            return Ok(None);
        }
        Ok(<[u8; 16]>::try_from(&record.message_id[..])
            .ok()
            .map(MessageId))
    }

    /// `account`'s outbox records with only the copies `keep` keeps, marked for
    /// preparing again; their writes go to `batch`, the caller updates the cache.
    pub(super) fn unprepared_outbox(
        &self,
        account: &AccountId,
        keep: impl Fn(&OutboxCopy) -> bool,
        batch: &mut Batch,
    ) -> Vec<(u64, OutboxRecord)> {
        let mut outbox = Vec::new();
        for (seq, out) in &self.outbox {
            if out.recipient == account.as_bytes() {
                let mut out = out.clone();
                out.copies.retain(&keep);
                out.prepared = false;
                batch.put_outbox(*seq, &out);
                outbox.push((*seq, out));
            }
        }
        outbox
    }

    /// After sessions with new devices started: unsent messages to `account` get
    /// copies for them too.
    pub(crate) fn reprepare(&mut self, account: &AccountId) -> Result<()> {
        let mut batch = Batch::new();
        let outbox = self.unprepared_outbox(account, |_| true, &mut batch);
        self.commit(batch, false)?;
        self.outbox.extend(outbox);
        Ok(())
    }
}
