//! Broadcast lists: one message to many contacts, uploaded once.
//!
//! The message (a PADMÉ-padded `Plaintext`) is encrypted once under a fresh random
//! key K with ChaCha20-Poly1305 (nonce 0: K encrypts nothing else) into the *shared
//! body* `0x04 ‖ ciphertext`. Each recipient device gets the ordinary 1:1 envelope
//! the outbox prepares, sealed as usual, whose `Plaintext` carries only
//! `broadcast = {K, SHA-256(shared body)}`; one `MultiSend` carries the shared body
//! and every device's envelope. The recipient opens its envelope, checks the digest,
//! decrypts the body and sees an ordinary message from the sender.
//!
//! Each recipient is an ordinary outbox record (same message id for all of them),
//! so durability, retries, dedup and `Event::Sent` are those of 1:1 messages; the
//! record's broadcast part (K and the shared body) sits beside it in
//! `Namespace::Broadcasts` under the record's outbox seq. A recipient whose delivery
//! token we lack (or that the relay refuses) loses its broadcast part and gets the
//! message as an ordinary 1:1 message with the same id.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use prost::Message;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use tern_proto::e2e::sync_message::Kind;
use tern_proto::{e2e, AccountId, DeviceId, MessageId};
use zeroize::Zeroizing;

use rand::rngs::OsRng;
use tern_proto::{MultiSend, RecipientAccount, Refused};

use super::anonymous::AnonymousLink;
use super::outbox::MAX_BODY;
use super::send::{certificate, Round, SEAL_PER_ROUND, SEND_BYTES};
use super::state::{corrupt, random32, State};
use super::{Event, Shared};
use crate::crypto::sealed::{self, SenderCertificate};
use crate::crypto::{message, padding};
use crate::media::AttachmentPointer;
use crate::net::RelayConnection;
use crate::store::records::{seq_key, OutboxRecord};
use crate::store::{Batch, Namespace};
use crate::ErrorCode;
use crate::{Error, Result};

/// The first byte of a broadcast's shared body.
pub(crate) const BROADCAST_BODY: u8 = 0x04;

/// `Namespace::Broadcasts`, key: the outbox record's seq. The broadcast part of one
/// recipient's outbox record.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BroadcastRecord {
    /// K, the body's one-time key.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) key: Vec<u8>,
    /// `0x04 ‖ ChaCha20-Poly1305(K, nonce 0, padded Plaintext)`.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) shared_body: Vec<u8>,
}

/// Encrypts a padded plaintext under a fresh key: (K, shared body).
fn seal_body(
    padded: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>)> {
    let key = Zeroizing::new(random32(rng));
    let cipher = ChaCha20Poly1305::new((&*key).into());
    let ciphertext = cipher
        .encrypt(&[0u8; 12].into(), padded)
        .map_err(|_| Error::Group("broadcast encryption failed".into()))?;
    let mut body = Vec::with_capacity(1 + ciphertext.len());
    body.push(BROADCAST_BODY);
    body.extend_from_slice(&ciphertext);
    Ok((key, body))
}

/// Opens a shared body under the key and digest a 1:1 envelope carried; `Err` is
/// why it is dropped.
pub(crate) fn open_body(
    broadcast: &e2e::BroadcastKey,
    shared_body: Option<&[u8]>,
) -> std::result::Result<e2e::Plaintext, String> {
    let body = shared_body.ok_or("a broadcast key without its body")?;
    if Sha256::digest(body)[..] != broadcast.digest[..] {
        return Err("a broadcast body that does not match its digest".into());
    }
    let key: [u8; 32] = broadcast.key[..]
        .try_into()
        .map_err(|_| "a broadcast key of the wrong length")?;
    let ciphertext = match body.split_first() {
        Some((&BROADCAST_BODY, rest)) => rest,
        _ => return Err("not a broadcast body".into()),
    };
    let padded = Zeroizing::new(
        ChaCha20Poly1305::new((&key).into())
            .decrypt(&[0u8; 12].into(), ciphertext)
            .map_err(|_| "a broadcast body that does not decrypt")?,
    );
    let encoded = padding::unpad(&padded).ok_or("a badly padded broadcast body")?;
    e2e::Plaintext::decode(encoded).map_err(|_| "a broadcast body that does not decode".into())
}

/// One recipient account of a broadcast send: its outbox record and the sealed
/// envelopes for its devices.
pub(crate) struct BroadcastRecipient {
    pub(crate) seq: u64,
    pub(crate) account: AccountId,
    pub(crate) token: [u8; 32],
    pub(crate) list_version: u64,
    pub(crate) devices: Vec<DeviceId>,
    pub(crate) parts: Vec<Vec<u8>>,
}

/// One `MultiSend` of a broadcast.
pub(crate) struct BroadcastSend {
    pub(crate) message_id: MessageId,
    pub(crate) body: Vec<u8>,
    pub(crate) recipients: Vec<BroadcastRecipient>,
}

impl BroadcastSend {
    fn bytes(&self) -> usize {
        self.body.len()
            + self
                .recipients
                .iter()
                .map(|r| 64 + r.parts.iter().map(|p| p.len() + 8).sum::<usize>())
                .sum::<usize>()
    }

    fn devices(&self) -> usize {
        self.recipients.iter().map(|r| r.devices.len()).sum()
    }
}

impl State {
    /// Queues `body` for every account in `recipients`, encrypted once: stored
    /// before this returns. Returns the message's id (the same for every recipient).
    pub(crate) fn enqueue_broadcast(
        &mut self,
        recipients: &[AccountId],
        body: &[u8],
        attachments: &[AttachmentPointer],
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<MessageId> {
        let own = self.keys.address.account;
        let mut to: Vec<AccountId> = Vec::new();
        for r in recipients {
            if *r != own && !to.contains(r) {
                to.push(*r);
            }
        }
        if to.is_empty() {
            return Err(Error::NoRecipients);
        }
        let wire: Vec<Vec<u8>> = attachments
            .iter()
            .map(AttachmentPointer::to_bytes)
            .collect();
        let size = body.len() + wire.iter().map(|a| a.len() + 4).sum::<usize>();
        if size > MAX_BODY {
            return Err(Error::TooLarge { max: MAX_BODY });
        }
        if to
            .iter()
            .any(|r| self.contacts.get(r).is_some_and(|c| c.blocked()))
        {
            return Err(Error::UntrustedIdentity);
        }
        let padded = message::pad_plaintext(&e2e::Plaintext {
            body: body.to_vec().into(),
            delivery_token: self.keys.delivery_token.to_vec().into(),
            sent_at_ms: now_ms,
            sender_account: own.as_bytes().to_vec().into(),
            sender_device: self.keys.address.device.get(),
            attachments: attachments.iter().map(AttachmentPointer::to_wire).collect(),
            ..e2e::Plaintext::default()
        })
        .ok_or(Error::TooLarge { max: MAX_BODY })?;
        let (key, shared_body) = seal_body(&padded, rng)?;
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let mut batch = Batch::new();
        let mut queued = Vec::new();
        for recipient in &to {
            let seq = self.local.next_outbox_seq;
            self.local.next_outbox_seq += 1;
            let record = OutboxRecord {
                message_id: id.to_vec(),
                recipient: recipient.as_bytes().to_vec(),
                body: body.to_vec(),
                created_ms: now_ms,
                attachments: wire.clone(),
                ..OutboxRecord::default()
            };
            batch.put_outbox(seq, &record);
            // Without the contact's token the relay takes no multi-send for it: it
            // gets an ordinary message.
            let part = self.token_of(recipient).map(|_| BroadcastRecord {
                key: key.to_vec(),
                shared_body: shared_body.clone(),
            });
            if let Some(part) = &part {
                batch.put(Namespace::Broadcasts, seq_key(seq), part);
            }
            queued.push((seq, record, part));
            if self.has_other_devices() {
                let transcript = e2e::SentTranscript {
                    recipient_account: recipient.as_bytes().to_vec().into(),
                    message_id: id.to_vec().into(),
                    sent_at_ms: now_ms,
                    body: body.to_vec().into(),
                    attachments: attachments.iter().map(AttachmentPointer::to_wire).collect(),
                };
                self.queue_sync(Kind::Sent(transcript), now_ms, rng, &mut batch);
            }
        }
        batch.put_local(&self.local);
        self.commit(batch, false)?;
        for (seq, record, part) in queued {
            let known = self
                .contacts
                .get(&crate::client::state::account_of(&record.recipient)?)
                .is_some_and(|c| !c.devices.is_empty());
            self.outbox.insert(seq, record);
            if let Some(part) = part {
                self.broadcasts.insert(seq, part);
            }
            if known {
                let _ = self.prepare(seq, now_ms);
            }
        }
        self.flush()?;
        Ok(MessageId(id))
    }

    /// The `broadcast` field for outbox record `seq`'s envelopes, if it is a
    /// broadcast's: its key and the shared body's digest.
    pub(crate) fn broadcast_key(&self, seq: u64) -> Option<e2e::BroadcastKey> {
        self.broadcasts.get(&seq).map(|b| e2e::BroadcastKey {
            key: b.key.clone().into(),
            digest: Sha256::digest(&b.shared_body).to_vec().into(),
        })
    }

    /// Whether outbox record `seq` goes by multi-send.
    pub(crate) fn is_broadcast(&self, seq: u64) -> bool {
        self.broadcasts.contains_key(&seq)
    }

    /// Forgets record `seq`'s broadcast part (in `batch`, and the cache): once its
    /// copies are sent, or when it falls back to an ordinary message.
    pub(crate) fn drop_broadcast_part(&mut self, seq: u64, batch: &mut Batch) {
        if self.broadcasts.remove(&seq).is_some() {
            batch.delete(Namespace::Broadcasts, seq_key(seq));
        }
    }

    /// Turns record `seq` into an ordinary 1:1 message (its recipient's token was
    /// refused): its copies are encrypted again without the broadcast key.
    pub(crate) fn unbroadcast(&mut self, seq: u64) -> Result<()> {
        let Some(mut record) = self.outbox.get(&seq).cloned() else {
            return Ok(());
        };
        let mut batch = Batch::new();
        self.drop_broadcast_part(seq, &mut batch);
        // Copies already sent carried the broadcast: the recipient has those.
        record.copies.retain(|c| c.sent);
        record.prepared = false;
        batch.put_outbox(seq, &record);
        self.commit(batch, false)?;
        self.outbox.insert(seq, record);
        Ok(())
    }

    /// The multi-sends for every broadcast copy ready to leave: sealed under
    /// `certificate`, grouped by message, each request within `max_bytes` and the
    /// relay's recipient limit. At most `max` envelopes in all.
    pub(crate) fn broadcast_sends(
        &self,
        certificate: &SenderCertificate,
        max: usize,
        max_bytes: usize,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<BroadcastSend>> {
        let mut sends: Vec<BroadcastSend> = Vec::new();
        let mut sealed_total = 0;
        for (seq, part) in &self.broadcasts {
            let Some(record) = self.outbox.get(seq) else {
                continue;
            };
            if !record.prepared || sealed_total >= max {
                continue;
            }
            let account = super::state::account_of(&record.recipient)?;
            let Some(token) = self.token_of(&account) else {
                continue;
            };
            let message_id =
                MessageId(<[u8; 16]>::try_from(&record.message_id[..]).map_err(|_| corrupt())?);
            let mut recipient = BroadcastRecipient {
                seq: *seq,
                account,
                token,
                list_version: self.list_version(&account),
                devices: Vec::new(),
                parts: Vec::new(),
            };
            for c in record.copies.iter().filter(|c| !c.sent) {
                let (Ok(device), Some(dh)) = (
                    DeviceId::try_from(c.device_id),
                    self.device_identity_dh(&account, c.device_id),
                ) else {
                    continue;
                };
                recipient
                    .parts
                    .push(sealed::seal(rng, &dh, certificate, &c.content)?);
                recipient.devices.push(device);
                sealed_total += 1;
            }
            if recipient.devices.is_empty() {
                continue;
            }
            let fits = |s: &BroadcastSend| {
                s.message_id == message_id
                    && s.body == part.shared_body
                    && s.devices() + recipient.devices.len()
                        <= tern_proto::limits::MAX_RECIPIENT_DEVICES
                    && s.bytes() + recipient.parts.iter().map(Vec::len).sum::<usize>() + 64
                        <= max_bytes
            };
            match sends.iter_mut().find(|s| fits(s)) {
                Some(send) => send.recipients.push(recipient),
                None => sends.push(BroadcastSend {
                    message_id,
                    body: part.shared_body.clone(),
                    recipients: vec![recipient],
                }),
            }
        }
        Ok(sends)
    }
}

/// Sends every broadcast copy ready to leave, one `MultiSend` per message (more if it
/// is large), over the anonymous link; applies the relay's per-device answers.
pub(super) async fn send_broadcasts(
    shared: &Shared,
    conn: &RelayConnection,
    anon: &AnonymousLink,
    cached: &mut Option<SenderCertificate>,
) -> Result<Round> {
    if shared.state.lock().await.broadcasts.is_empty() {
        return Ok(Round::Idle);
    }
    let cert = certificate(conn, cached, shared.now_ms()).await?;
    let sends =
        shared
            .state
            .lock()
            .await
            .broadcast_sends(cert, SEAL_PER_ROUND, SEND_BYTES, &mut OsRng)?;
    let mut round = Round::Idle;
    for send in sends {
        let request = MultiSend {
            message_id: send.message_id,
            body: send.body.clone().into(),
            recipients: send
                .recipients
                .iter()
                .map(|r| RecipientAccount {
                    account: r.account,
                    delivery_token: r.token.to_vec().into(),
                    device_list_version: r.list_version,
                    devices: r.devices.clone(),
                    parts: r.parts.iter().map(|p| p.clone().into()).collect(),
                })
                .collect(),
        };
        let result = anon.run(|c| c.multi_send(request.clone())).await;
        let mut state = shared.state.lock().await;
        let result = match result {
            Ok(result) => result,
            Err(e) => match e.relay_code() {
                Some(ErrorCode::TooLarge | ErrorCode::BadRequest) => {
                    let reason = e.to_string();
                    for r in &send.recipients {
                        super::send::fail_one(shared, &mut state, r.seq, r.account, &reason)?;
                    }
                    round = Round::Progress;
                    continue;
                }
                Some(_) => return Ok(Round::Wait),
                None => return Err(e),
            },
        };
        round = Round::Progress;
        for (i, r) in send.recipients.iter().enumerate() {
            let refused: Vec<&Refused> = result
                .refused
                .iter()
                .filter(|f| f.recipient as usize == i)
                .collect();
            let whole = refused.iter().find(|f| f.device.is_none());
            let sent: Vec<u32> = match whole {
                Some(_) => Vec::new(),
                None => r
                    .devices
                    .iter()
                    .filter(|d| !refused.iter().any(|f| f.device == Some(**d)))
                    .map(|d| d.get())
                    .collect(),
            };
            if !sent.is_empty() {
                if let Some((id, to)) = state.mark_sent(r.seq, &sent)? {
                    shared.emit(Event::Sent { message_id: id, to });
                }
            }
            for f in &refused {
                match (f.code, f.device) {
                    // The account's devices changed: its list is checked at the
                    // next round, which prepares copies for the new ones.
                    (ErrorCode::StaleDeviceList, _) => state.check_list_now(&r.account)?,
                    // A rotated token: an ordinary message until a new one comes.
                    (ErrorCode::Unauthorized, _) => {
                        state.drop_token(&r.account)?;
                        state.unbroadcast(r.seq)?;
                    }
                    (ErrorCode::UnknownRecipient, Some(device)) => {
                        state.drop_device(&r.account, device.get())?;
                    }
                    _ => round = Round::Wait,
                }
            }
        }
    }
    Ok(round)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    fn sealed(body: &[u8]) -> (e2e::BroadcastKey, Vec<u8>) {
        let padded = message::pad_plaintext(&e2e::Plaintext {
            body: body.to_vec().into(),
            ..e2e::Plaintext::default()
        })
        .expect("pads");
        let (key, shared) = seal_body(&padded, &mut OsRng).expect("seal");
        let digest = Sha256::digest(&shared).to_vec();
        (
            e2e::BroadcastKey {
                key: key.to_vec().into(),
                digest: digest.into(),
            },
            shared,
        )
    }

    #[test]
    fn a_body_opens_under_its_key_and_digest_only() {
        let (key, shared) = sealed(b"to all");
        let opened = open_body(&key, Some(&shared)).expect("opens");
        assert_eq!(&opened.body[..], b"to all");
        // Padded: the relay sees a PADMÉ length, at least 256.
        assert!(shared.len() > 256);
        assert_eq!(shared[0], BROADCAST_BODY);

        assert!(open_body(&key, None).is_err(), "no body");
        let mut flipped = shared.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(open_body(&key, Some(&flipped)).is_err(), "digest mismatch");
        let (other, other_body) = sealed(b"another");
        assert!(open_body(&other, Some(&shared)).is_err(), "other digest");
        let wrong_key = e2e::BroadcastKey {
            key: vec![7u8; 32].into(),
            ..key.clone()
        };
        assert!(open_body(&wrong_key, Some(&shared)).is_err(), "wrong key");
        let mut kind = other_body.clone();
        kind[0] = 0x02;
        let digest = Sha256::digest(&kind).to_vec().into();
        let relabelled = e2e::BroadcastKey { digest, ..other };
        assert!(
            open_body(&relabelled, Some(&kind)).is_err(),
            "not a 0x04 body"
        );
    }
}
