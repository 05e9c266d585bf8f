//! The index's totals across every mailbox, kept beside the per-mailbox usage so that
//! [`crate::store::MailboxStore::totals`] is O(1).

use super::Index;
use crate::store::{Totals, Usage};

impl Index {
    /// Adds to the totals (a removal: [`Index::uncount`]).
    pub(super) fn count(&mut self, messages: u64, bytes: u64) {
        self.totals.messages += messages;
        self.totals.bytes += bytes;
    }

    pub(super) fn uncount(&mut self, removed: Usage) {
        self.totals.messages -= removed.messages;
        self.totals.bytes -= removed.bytes;
    }

    /// What every mailbox holds together.
    pub(super) fn totals(&self) -> Totals {
        Totals {
            messages: self.totals.messages,
            bytes: self.totals.bytes,
            mailboxes: self.mailboxes.len() as u64,
        }
    }
}
