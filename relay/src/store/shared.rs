//! Shared bodies: what a multi-recipient append gives a [`super::MailboxStore`].

use bytes::Bytes;
use tern_platform::clock::UnixMillis;
use tern_proto::{DeviceAddress, MessageId};

use super::StoredMessage;

impl StoredMessage {
    /// Its bytes as a mailbox and a delivery window count them: payload (or part)
    /// and shared body.
    pub fn len(&self) -> u64 {
        (self.payload.len() + self.shared_body.as_ref().map_or(0, Bytes::len)) as u64
    }

    /// Whether it holds no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One mailbox's entry in a [`SharedAppend`]: the mailbox and its part (often empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEntry {
    /// The recipient device's mailbox.
    pub to: DeviceAddress,
    /// What only this device gets besides the body.
    pub part: Bytes,
}

impl SharedEntry {
    /// What an entry with `part` adds to its mailbox's usage: its part and `body`.
    pub fn bytes(part: &[u8], body: &[u8]) -> u64 {
        (part.len() + body.len()) as u64
    }
}

/// A multi-recipient append: the body stored once and one entry per mailbox pointing
/// at it, all with one message id, acceptance and expiry. The mailboxes are distinct.
#[derive(Debug, Clone, Copy)]
pub struct SharedAppend<'a> {
    /// The sender's id for the message.
    pub message_id: MessageId,
    /// The body every entry shares (non-empty).
    pub body: &'a Bytes,
    /// One entry per recipient mailbox.
    pub entries: &'a [SharedEntry],
    /// When the relay accepted it.
    pub accepted_at: UnixMillis,
    /// When the body and every entry expire.
    pub expires_at: UnixMillis,
}

impl SharedAppend<'_> {
    /// What entry `i` adds to its mailbox's usage: its part and the body.
    pub fn entry_bytes(&self, i: usize) -> u64 {
        self.entries
            .get(i)
            .map_or(0, |e| SharedEntry::bytes(&e.part, self.body))
    }

    /// What the append adds to the relay's stored bytes: the body once, and every
    /// part.
    pub fn stored_bytes(&self) -> u64 {
        self.body.len() as u64
            + self
                .entries
                .iter()
                .map(|e| e.part.len() as u64)
                .sum::<u64>()
    }
}
