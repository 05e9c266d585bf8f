//! Own-device sync: what one device of an account tells its other devices, sealed
//! and sent like any message to the account itself (its own contact record, under
//! the device-list rules of `devices`).
//!
//! - A message sent here goes, as a `SentTranscript`, to the other devices, which
//!   show it as sent ([`super::ReceivedMessage::sent_to`]).
//! - A contact added or accepted here goes as `ContactsSync`.
//! - A new list signed by the primary goes as `DeviceListSync`.
//! - A linked device that has opened its payload says `DeviceJoined`.
//!
//! A sync message is accepted only from this account under this account's identity
//! key; from anyone else it is dropped.

use prost::Message;
use rand::{CryptoRng, RngCore};
use tern_proto::e2e::{self, sync_message::Kind};
use tern_proto::{AccountId, DeviceId, MessageId};

use super::state::State;
use super::Event;
use crate::store::records::OutboxRecord;
use crate::store::Batch;
use crate::Result;

/// What a received sync message changes beyond its own write.
pub(crate) enum Applied {
    /// A transcript of a message another device sent: shown as a message.
    Transcript(e2e::SentTranscript),
    /// Applied; these events follow.
    Done(Vec<Event>),
}

impl State {
    /// Queues `sync` for this account's other devices, in `batch` (nothing when it
    /// has none).
    pub(crate) fn queue_sync(
        &mut self,
        kind: Kind,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
        batch: &mut Batch,
    ) {
        if !self.has_other_devices() {
            return;
        }
        let own = self.keys.address.account;
        let record = OutboxRecord {
            created_ms: now_ms,
            sync: e2e::SyncMessage { kind: Some(kind) }.encode_to_vec(),
            ..OutboxRecord::default()
        };
        self.queue_control(&own, record, rng, batch);
    }

    /// Queues `record` (a sync or another message of the client's own, no body)
    /// for `recipient` under a new message id, in `batch`.
    pub(crate) fn queue_control(
        &mut self,
        recipient: &AccountId,
        mut record: OutboxRecord,
        rng: &mut (impl RngCore + CryptoRng),
        batch: &mut Batch,
    ) {
        let own = self.keys.address.account;
        if *recipient == own && !self.contacts.contains_key(&own) {
            let record = self.own_contact();
            self.put_contact(own, record, batch);
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let seq = self.local.next_outbox_seq;
        self.local.next_outbox_seq += 1;
        record.message_id = id.to_vec();
        record.recipient = recipient.as_bytes().to_vec();
        batch.put_outbox(seq, &record);
        batch.put_local(&self.local);
        self.outbox.insert(seq, record);
    }

    /// Queues `kind` for the other devices and stores it durably.
    pub(crate) fn sync_now(
        &mut self,
        kind: Kind,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<()> {
        let mut batch = Batch::new();
        self.queue_sync(kind, now_ms, rng, &mut batch);
        if batch.is_empty() {
            return Ok(());
        }
        self.commit(batch, true)
    }

    /// A contact as the other devices should learn it.
    pub(crate) fn contact_sync(&self, account: &AccountId) -> Option<Kind> {
        let c = self.contacts.get(account)?;
        Some(Kind::Contacts(e2e::ContactsSync {
            contacts: vec![e2e::LinkedContact {
                account_id: account.as_bytes().to_vec().into(),
                identity_key: c.identity_key.clone().into(),
                delivery_token: c.delivery_token.clone().into(),
            }],
        }))
    }

    /// Applies a sync message from device `from` of this account (the caller checked
    /// that it is ours). Writes its own changes durably; `Err` only for a local
    /// failure.
    pub(crate) fn apply_sync(
        &mut self,
        from: DeviceId,
        sync: e2e::SyncMessage,
        now_ms: u64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<std::result::Result<Applied, String>> {
        match sync.kind {
            Some(Kind::Sent(t)) => {
                if AccountId::try_from(&t.recipient_account[..]).is_err() {
                    return Ok(Err("a sent transcript without its recipient".into()));
                }
                if MessageId::try_from(&t.message_id[..]).is_err() {
                    return Ok(Err("a sent transcript without a message id".into()));
                }
                Ok(Ok(Applied::Transcript(t)))
            }
            Some(Kind::Contacts(c)) => {
                for linked in c.contacts {
                    // An empty token: a contact known by account id alone.
                    let token = match &linked.delivery_token[..] {
                        [] => Ok(None),
                        t => <[u8; 32]>::try_from(t).map(Some),
                    };
                    let (Ok(account), Ok(identity), Ok(token)) = (
                        AccountId::try_from(&linked.account_id[..]),
                        <[u8; 32]>::try_from(&linked.identity_key[..]),
                        token,
                    ) else {
                        continue;
                    };
                    if account == self.keys.address.account {
                        // This account's own delivery token, rotated by the primary.
                        if let (Some(token), true) = (
                            token,
                            from == DeviceId::PRIMARY && identity == self.keys.identity_key,
                        ) {
                            self.take_synced_token(token)?;
                        }
                        continue;
                    }
                    self.apply_synced_contact(account, identity, token)?;
                }
                Ok(Ok(Applied::Done(Vec::new())))
            }
            Some(Kind::DeviceList(l)) => {
                if from != DeviceId::PRIMARY {
                    return Ok(Err(
                        "a device list from a device other than the primary".into()
                    ));
                }
                let before = self.own_list().map(|l| l.entries).unwrap_or_default();
                match self.store_own_list(&l.device_list, &l.signature) {
                    Ok(stored) => {
                        // Our devices changed: check them at the next send.
                        let own = self.keys.address.account;
                        self.check_list_now(&own)?;
                        let after = self.own_list().map(|l| l.entries).unwrap_or_default();
                        let gone: Vec<DeviceId> = match stored {
                            true => before
                                .iter()
                                .filter(|b| !after.iter().any(|a| a.id == b.id))
                                .map(|b| b.id)
                                .collect(),
                            false => Vec::new(),
                        };
                        // A removed device leaves this account's groups.
                        self.own_devices_removed(&gone)?;
                        let events = gone
                            .into_iter()
                            .map(|device| Event::DeviceRemoved { device })
                            .collect();
                        Ok(Ok(Applied::Done(events)))
                    }
                    Err(crate::Error::Store(e)) => Err(e.into()),
                    Err(e) => Ok(Err(format!("own device list: {e}"))),
                }
            }
            Some(Kind::Joined(j)) => {
                let Ok(device) = DeviceId::try_from(j.device_id) else {
                    return Ok(Err("a join without a device".into()));
                };
                if device != from {
                    return Ok(Err("a device announced another's join".into()));
                }
                if self.settle_link(device)? {
                    // What the payload had no room for follows now that a session
                    // with the device exists.
                    let mut batch = Batch::new();
                    self.sync_remaining_contacts(now_ms, rng, &mut batch);
                    self.commit(batch, false)?;
                }
                let own = self.keys.address.account;
                self.check_list_now(&own)?;
                // The primary adds the new device to this account's groups.
                if self.is_primary() {
                    self.own_device_joined()?;
                }
                Ok(Ok(Applied::Done(vec![Event::DeviceJoined { device }])))
            }
            None => Ok(Err("an empty sync message".into())),
        }
    }

    /// This account's delivery token as a contact sync, for the other devices after
    /// the primary rotated it.
    pub(crate) fn own_token_sync(&self) -> Kind {
        Kind::Contacts(e2e::ContactsSync {
            contacts: vec![e2e::LinkedContact {
                account_id: self.keys.address.account.as_bytes().to_vec().into(),
                identity_key: self.keys.identity_key.to_vec().into(),
                delivery_token: self.keys.delivery_token.to_vec().into(),
            }],
        })
    }

    /// The account's delivery token from the primary (already set on the relay).
    fn take_synced_token(&mut self, token: [u8; 32]) -> Result<()> {
        if self.keys.delivery_token == token {
            return Ok(());
        }
        let mut local = self.local.clone();
        local.delivery_token = token.to_vec();
        local.pending_delivery_token.clear();
        local.token_published = true;
        let mut batch = Batch::new();
        batch.put_local(&local);
        self.commit(batch, true)?;
        self.local = local;
        self.keys.delivery_token = token;
        Ok(())
    }

    /// A contact another device of this account added or accepted: the user's
    /// decision there stands here, with no identity-change echo.
    fn apply_synced_contact(
        &mut self,
        account: AccountId,
        identity: [u8; 32],
        token: Option<[u8; 32]>,
    ) -> Result<()> {
        if account == self.keys.address.account {
            return Ok(());
        }
        let known = self.contacts.get(&account);
        let changed =
            known.is_some_and(|c| !c.identity_key.is_empty() && c.identity_key != identity);
        match token {
            Some(token) => {
                self.add_contact(account, identity, token)?;
            }
            // No token on the other device: a new contact is known by id alone; one
            // already known here keeps the token this device holds.
            None if known.is_none() => {
                self.add_contact(account, identity, [0; 32])?;
                self.drop_token(&account)?;
            }
            None => {}
        }
        if changed {
            self.accept_identity(&account, &identity)?;
        }
        Ok(())
    }
}
