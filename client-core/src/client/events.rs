//! What the client hands the app: decrypted messages and events.

use tern_proto::{AccountId, DeviceId, MessageId};
use tokio::sync::mpsc;

use super::groups::{GroupChange, GroupId, GroupMessage};
use crate::media::AttachmentPointer;
use crate::store::records::InboxRecord;
use crate::store::StoreError;
use crate::{Error, Result};

/// A decrypted message, stored on the device until the app confirms it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Position in this device's inbox; pass it to [`Client::confirm`](super::Client::confirm).
    pub seq: u64,
    /// The sender's account, as the relay certified it inside the sealed envelope.
    pub sender: AccountId,
    /// The sender's device.
    pub sender_device: DeviceId,
    /// The sender's id for this message (the same for every copy of it).
    pub message_id: MessageId,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// The sender's clock when it was sent (Unix ms; the sender's claim).
    pub sent_at_ms: u64,
    /// When this device decrypted it (Unix ms).
    pub received_at_ms: u64,
    /// Attachments it points at: fetch them with [`Client::download_attachment`](super::Client::download_attachment).
    pub attachments: Vec<AttachmentPointer>,
    /// Attachment pointers this version cannot read (a newer sender's format, or
    /// damage): left out of `attachments`, counted here so the app can say so.
    pub unreadable_attachments: usize,
    /// A message another device of this account sent, shown here as sent: its
    /// recipient (`sender` is then this account). `None` for a message received.
    pub sent_to: Option<AccountId>,
}

impl ReceivedMessage {
    pub(super) fn from_record(seq: u64, r: &InboxRecord) -> Result<Self> {
        let corrupt = || Error::Store(StoreError::Corrupt);
        // A pointer that does not parse is left out, not the message.
        let (mut attachments, mut unreadable_attachments) = (Vec::new(), 0);
        for a in &r.attachments {
            match AttachmentPointer::from_bytes(a) {
                Ok(p) => attachments.push(p),
                Err(_) => unreadable_attachments += 1,
            }
        }
        Ok(ReceivedMessage {
            seq,
            sender: AccountId::try_from(&r.sender[..]).map_err(|_| corrupt())?,
            sender_device: DeviceId::try_from(r.sender_device).map_err(|_| corrupt())?,
            message_id: MessageId(r.message_id[..].try_into().map_err(|_| corrupt())?),
            body: r.body.clone(),
            sent_at_ms: r.sent_at_ms,
            received_at_ms: r.received_at_ms,
            attachments,
            unreadable_attachments,
            sent_to: match r.sent_to.len() {
                0 => None,
                _ => Some(AccountId::try_from(&r.sent_to[..]).map_err(|_| corrupt())?),
            },
        })
    }
}

/// What the client tells the app.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Connected and authenticated; queued messages follow.
    Connected,
    /// The connection was lost; the client reconnects with backoff.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A new message. Call [`Client::confirm`](super::Client::confirm) once the app has stored it.
    Message(ReceivedMessage),
    /// The relay has stored a message for every device of its recipient.
    Sent {
        /// The id [`Client::send`](super::Client::send) returned.
        message_id: MessageId,
        /// The recipient.
        to: AccountId,
    },
    /// A message was given up on (its recipient does not exist, say).
    SendFailed {
        /// The id [`Client::send`](super::Client::send) returned.
        message_id: MessageId,
        /// The recipient.
        to: AccountId,
        /// Why.
        reason: String,
    },
    /// A contact's identity key changed. Sending to it is refused and its messages
    /// are held until [`Client::accept_identity`](super::Client::accept_identity); compare safety numbers first.
    IdentityChanged {
        /// The contact.
        contact: AccountId,
    },
    /// An envelope that could not be opened or decrypted was discarded.
    Dropped {
        /// Why (never message content).
        reason: String,
    },
    /// A device linked to this account has joined it and is in use.
    DeviceJoined {
        /// The new device.
        device: DeviceId,
    },
    /// A device was removed from this account.
    DeviceRemoved {
        /// The device.
        device: DeviceId,
    },
    /// This device was removed from its account (by the primary, or idle): the
    /// relay refuses it from now on and the client has stopped.
    Removed,
    /// A group message. Call [`Client::confirm`](super::Client::confirm) with its
    /// `seq` once the app has stored it.
    GroupMessage(GroupMessage),
    /// This device was added to a group.
    GroupJoined {
        /// The group.
        group: GroupId,
        /// The member that added it.
        added_by: AccountId,
        /// The group's name.
        name: String,
    },
    /// A leaf of a group names `account` under an identity key other than the one
    /// pinned for it (this account's own, the contact's, or the first one this
    /// group showed for it). A commit adding such a leaf is refused (this device
    /// then no longer follows the group until it is added again); a message from
    /// such a leaf is dropped. Never shown as `account`'s.
    GroupIdentityMismatch {
        /// The group.
        group: GroupId,
        /// The account the leaf claims.
        account: AccountId,
    },
    /// A group's membership or metadata changed, or this device left it or was
    /// removed from it.
    GroupChanged {
        /// The group.
        group: GroupId,
        /// What changed.
        change: GroupChange,
    },
}

/// The stream of [`Event`]s. Ends once the client is shut down.
#[derive(Debug)]
pub struct Events(pub(super) mpsc::UnboundedReceiver<Event>);

impl Events {
    /// The next event; `None` once the client is shut down.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}
