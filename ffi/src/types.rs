//! The records and enums the bindings see, and their conversions. Ids and keys
//! travel as bytes (`ByteArray`, `Data`, `bytes`); their lengths are checked here.

use tern_client::media::AttachmentPointer;
use tern_proto::{AccountId, MessageId};

use crate::error::{invalid, TernError};

pub(crate) fn account(bytes: &[u8]) -> Result<AccountId, TernError> {
    AccountId::try_from(bytes).map_err(|e| invalid(e.to_string()))
}

pub(crate) fn accounts(list: &[Vec<u8>]) -> Result<Vec<AccountId>, TernError> {
    list.iter().map(|a| account(a)).collect()
}

pub(crate) fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], TernError> {
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

pub(crate) fn group_id(bytes: &[u8]) -> Result<tern_client::GroupId, TernError> {
    Ok(tern_client::GroupId(key32(bytes, "a group id")?))
}

fn ids(list: Vec<AccountId>) -> Vec<Vec<u8>> {
    list.iter().map(|a| a.as_bytes().to_vec()).collect()
}

fn id(message: MessageId) -> Vec<u8> {
    message.as_bytes().to_vec()
}

/// An attachment: upload it with `upload_attachment`, send it with
/// `send_with_attachments`, fetch a received one with `download_attachment`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Attachment {
    /// The pointer in its wire form: what messages carry. It holds the
    /// attachment's key: keep it only where the app keeps messages.
    pub pointer: Vec<u8>,
    /// Plaintext size in bytes.
    pub size: u64,
    /// For the app, e.g. "image/jpeg".
    pub content_type: String,
    /// For the app.
    pub file_name: String,
}

impl From<&AttachmentPointer> for Attachment {
    fn from(p: &AttachmentPointer) -> Self {
        Attachment {
            pointer: p.to_bytes(),
            size: p.size,
            content_type: p.content_type.clone(),
            file_name: p.file_name.clone(),
        }
    }
}

impl Attachment {
    /// The pointer, from its wire form (the other fields are read from it).
    pub(crate) fn parse(&self) -> Result<AttachmentPointer, TernError> {
        AttachmentPointer::from_bytes(&self.pointer).map_err(|e| invalid(e.to_string()))
    }
}

pub(crate) fn pointers(list: &[Attachment]) -> Result<Vec<AttachmentPointer>, TernError> {
    list.iter().map(Attachment::parse).collect()
}

fn attachments(list: &[AttachmentPointer]) -> Vec<Attachment> {
    list.iter().map(Attachment::from).collect()
}

/// A decrypted message, kept on the device until `confirm(seq)`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Message {
    /// Pass it to `confirm` once the app has stored the message.
    pub seq: u64,
    /// The sender's account id (16 bytes).
    pub sender: Vec<u8>,
    /// The sender's device.
    pub sender_device: u32,
    /// The sender's id for this message (16 bytes).
    pub message_id: Vec<u8>,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// The sender's clock when sent (Unix ms; the sender's claim).
    pub sent_at_ms: u64,
    /// When this device decrypted it (Unix ms).
    pub received_at_ms: u64,
    /// Attachments: fetch them with `download_attachment`.
    pub attachments: Vec<Attachment>,
    /// Attachments this version cannot read (left out of `attachments`).
    pub unreadable_attachments: u32,
    /// Set for a message another device of this account sent: its recipient.
    pub sent_to: Option<Vec<u8>>,
}

impl From<tern_client::ReceivedMessage> for Message {
    fn from(m: tern_client::ReceivedMessage) -> Self {
        Message {
            seq: m.seq,
            sender: m.sender.as_bytes().to_vec(),
            sender_device: m.sender_device.get(),
            message_id: id(m.message_id),
            attachments: attachments(&m.attachments),
            body: m.body,
            sent_at_ms: m.sent_at_ms,
            received_at_ms: m.received_at_ms,
            unreadable_attachments: u32::try_from(m.unreadable_attachments).unwrap_or(u32::MAX),
            sent_to: m.sent_to.map(|a| a.as_bytes().to_vec()),
        }
    }
}

/// A group message, kept on the device until `confirm(seq)`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct GroupMessage {
    /// Pass it to `confirm` once the app has stored the message.
    pub seq: u64,
    /// The group's id (32 bytes).
    pub group: Vec<u8>,
    /// The sender's account id.
    pub sender: Vec<u8>,
    /// The sender's device.
    pub sender_device: u32,
    /// The sender's id for this message.
    pub message_id: Vec<u8>,
    /// The application's bytes.
    pub body: Vec<u8>,
    /// The sender's clock when sent (Unix ms).
    pub sent_at_ms: u64,
    /// When this device decrypted it (Unix ms).
    pub received_at_ms: u64,
    /// Attachments.
    pub attachments: Vec<Attachment>,
}

impl From<tern_client::GroupMessage> for GroupMessage {
    fn from(m: tern_client::GroupMessage) -> Self {
        GroupMessage {
            seq: m.seq,
            group: m.group.0.to_vec(),
            sender: m.sender.as_bytes().to_vec(),
            sender_device: m.sender_device.get(),
            message_id: id(m.message_id),
            attachments: attachments(&m.attachments),
            body: m.body,
            sent_at_ms: m.sent_at_ms,
            received_at_ms: m.received_at_ms,
        }
    }
}

/// How a group's membership or metadata changed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum GroupChange {
    /// These accounts joined.
    Added {
        /// Their account ids.
        accounts: Vec<Vec<u8>>,
    },
    /// These accounts were removed.
    Removed {
        /// Their account ids.
        accounts: Vec<Vec<u8>>,
    },
    /// This device left the group.
    Left,
    /// This device was removed from the group.
    RemovedSelf,
    /// The name, description or picture changed (see `groups()`).
    Renamed {
        /// The new name.
        name: String,
    },
    /// A change this version of the bindings does not name.
    Other {
        /// What it is, for a log on the device.
        description: String,
    },
}

impl From<tern_client::GroupChange> for GroupChange {
    fn from(c: tern_client::GroupChange) -> Self {
        use tern_client::GroupChange as C;
        match c {
            C::Added(a) => GroupChange::Added { accounts: ids(a) },
            C::Removed(a) => GroupChange::Removed { accounts: ids(a) },
            C::Left => GroupChange::Left,
            C::RemovedSelf => GroupChange::RemovedSelf,
            C::Renamed { name } => GroupChange::Renamed { name },
            other => GroupChange::Other {
                description: format!("{other:?}"),
            },
        }
    }
}

/// What the client tells the app, from `EventStream.next()`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum TernEvent {
    /// Connected and authenticated; queued messages follow.
    Connected,
    /// The connection was lost; the client reconnects with backoff.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A new message: store it, then `confirm(message.seq)`.
    Message {
        /// The message.
        message: Message,
    },
    /// The relay has stored a message for every device of its recipient.
    Sent {
        /// The id `send` returned.
        message_id: Vec<u8>,
        /// The recipient.
        to: Vec<u8>,
    },
    /// A message was given up on (its recipient does not exist, say).
    SendFailed {
        /// The id `send` returned.
        message_id: Vec<u8>,
        /// The recipient.
        to: Vec<u8>,
        /// Why.
        reason: String,
    },
    /// A contact's identity key changed: sends to it fail and its messages are
    /// held until `accept_identity` (compare safety numbers first).
    IdentityChanged {
        /// The contact.
        contact: Vec<u8>,
    },
    /// An envelope that could not be opened was discarded.
    Dropped {
        /// Why (never content).
        reason: String,
    },
    /// A device linked to this account joined.
    DeviceJoined {
        /// Its id.
        device: u32,
    },
    /// A device was removed from this account.
    DeviceRemoved {
        /// Its id.
        device: u32,
    },
    /// This device was removed from its account; the client has stopped.
    Removed,
    /// A group message: store it, then `confirm(message.seq)`.
    GroupMessage {
        /// The message.
        message: GroupMessage,
    },
    /// This device was added to a group.
    GroupJoined {
        /// The group.
        group: Vec<u8>,
        /// Who added it.
        added_by: Vec<u8>,
        /// The group's name.
        name: String,
    },
    /// A group leaf claims `account` under another identity key than the pinned one.
    GroupIdentityMismatch {
        /// The group.
        group: Vec<u8>,
        /// The account the leaf claims.
        account: Vec<u8>,
    },
    /// A group's membership or metadata changed.
    GroupChanged {
        /// The group.
        group: Vec<u8>,
        /// What changed.
        change: GroupChange,
    },
    /// An event this version of the bindings does not name.
    Other {
        /// What it is, for a log on the device.
        description: String,
    },
}

impl From<tern_client::Event> for TernEvent {
    fn from(e: tern_client::Event) -> Self {
        use tern_client::Event as E;
        match e {
            E::Connected => TernEvent::Connected,
            E::Disconnected { reason } => TernEvent::Disconnected { reason },
            E::Message(m) => TernEvent::Message { message: m.into() },
            E::Sent { message_id, to } => TernEvent::Sent {
                message_id: id(message_id),
                to: to.as_bytes().to_vec(),
            },
            E::SendFailed {
                message_id,
                to,
                reason,
            } => TernEvent::SendFailed {
                message_id: id(message_id),
                to: to.as_bytes().to_vec(),
                reason,
            },
            E::IdentityChanged { contact } => TernEvent::IdentityChanged {
                contact: contact.as_bytes().to_vec(),
            },
            E::Dropped { reason } => TernEvent::Dropped { reason },
            E::DeviceJoined { device } => TernEvent::DeviceJoined {
                device: device.get(),
            },
            E::DeviceRemoved { device } => TernEvent::DeviceRemoved {
                device: device.get(),
            },
            E::Removed => TernEvent::Removed,
            E::GroupMessage(m) => TernEvent::GroupMessage { message: m.into() },
            E::GroupJoined {
                group,
                added_by,
                name,
            } => TernEvent::GroupJoined {
                group: group.0.to_vec(),
                added_by: added_by.as_bytes().to_vec(),
                name,
            },
            E::GroupIdentityMismatch { group, account } => TernEvent::GroupIdentityMismatch {
                group: group.0.to_vec(),
                account: account.as_bytes().to_vec(),
            },
            E::GroupChanged { group, change } => TernEvent::GroupChanged {
                group: group.0.to_vec(),
                change: change.into(),
            },
            other => TernEvent::Other {
                description: format!("{other:?}"),
            },
        }
    }
}

/// A contact card, parsed: what `add_contact` takes as text.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ContactCardInfo {
    /// The account id.
    pub account: Vec<u8>,
    /// Its identity key.
    pub identity_key: Vec<u8>,
}

/// A changed identity key waiting for `accept_identity`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ChangedIdentity {
    /// The new key: pass it to `accept_identity`.
    pub identity_key: Vec<u8>,
    /// The safety number it would give: compare it with the contact's first.
    pub safety_number: String,
}

/// One device of this account.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Device {
    /// Its id.
    pub id: u32,
    /// Whether it is the primary (device 1, which holds the identity key).
    pub primary: bool,
    /// Whether it is the device this client runs on.
    pub this_device: bool,
}

impl From<tern_client::DeviceInfo> for Device {
    fn from(d: tern_client::DeviceInfo) -> Self {
        Device {
            id: d.id.get(),
            primary: d.primary,
            this_device: d.this_device,
        }
    }
}

/// A group as this device sees it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Group {
    /// Its id (32 bytes).
    pub id: Vec<u8>,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its picture, if any.
    pub picture: Option<Attachment>,
    /// Member accounts, this one included.
    pub members: Vec<Vec<u8>>,
    /// Members this device cannot reach yet (no delivery token).
    pub unreachable: Vec<Vec<u8>>,
    /// Membership operations not yet committed.
    pub pending_ops: u64,
    /// The group's epoch on this device.
    pub epoch: u64,
}

impl From<tern_client::GroupInfo> for Group {
    fn from(g: tern_client::GroupInfo) -> Self {
        Group {
            id: g.id.0.to_vec(),
            name: g.name,
            description: g.description,
            picture: g.picture.as_ref().map(Attachment::from),
            members: ids(g.members),
            unreachable: ids(g.unreachable),
            pending_ops: u64::try_from(g.pending_ops).unwrap_or(u64::MAX),
            epoch: g.epoch,
        }
    }
}

/// A number discovery found.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Discovered {
    /// The number, E.164.
    pub number: String,
    /// Its account, now a contact.
    pub account: Vec<u8>,
}

/// What `discover` found.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct DiscoveryReport {
    /// Discoverable users among the numbers, now contacts.
    pub found: Vec<Discovered>,
    /// Entries that are not valid phone numbers, as given.
    pub invalid: Vec<String>,
    /// How many numbers went to the relay (blinded) to be evaluated.
    pub evaluated: u64,
}

impl From<tern_client::client::DiscoveryReport> for DiscoveryReport {
    fn from(r: tern_client::client::DiscoveryReport) -> Self {
        DiscoveryReport {
            found: r
                .found
                .into_iter()
                .map(|(number, a)| Discovered {
                    number,
                    account: a.as_bytes().to_vec(),
                })
                .collect(),
            invalid: r.invalid,
            evaluated: u64::try_from(r.evaluated).unwrap_or(u64::MAX),
        }
    }
}

/// Where the relay sends this device's content-free wake-ups.
#[derive(Clone, PartialEq, Eq, uniffi::Enum)]
pub enum PushTarget {
    /// A UnifiedPush endpoint: the https URL the device's distributor gave it.
    UnifiedPush {
        /// The endpoint URL.
        endpoint: String,
    },
    /// The app publisher's gateway (holding the APNs or FCM keys): its URL, which
    /// must be on the relay operator's list, and the device's token there.
    Gateway {
        /// The gateway URL.
        url: String,
        /// The APNs or FCM token (APNs as hex).
        device_token: String,
    },
}

// A target addresses one phone: it stays out of logs (P9).
impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushTarget::UnifiedPush { .. } => "PushTarget::UnifiedPush(..)",
            PushTarget::Gateway { .. } => "PushTarget::Gateway(..)",
        })
    }
}

impl From<PushTarget> for tern_client::PushTarget {
    fn from(t: PushTarget) -> Self {
        match t {
            PushTarget::UnifiedPush { endpoint } => Self::UnifiedPush { endpoint },
            PushTarget::Gateway { url, device_token } => Self::Gateway { url, device_token },
        }
    }
}

impl From<tern_client::PushTarget> for PushTarget {
    fn from(t: tern_client::PushTarget) -> Self {
        match t {
            tern_client::PushTarget::UnifiedPush { endpoint } => Self::UnifiedPush { endpoint },
            tern_client::PushTarget::Gateway { url, device_token } => {
                Self::Gateway { url, device_token }
            }
        }
    }
}
