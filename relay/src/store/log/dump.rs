//! Enumeration for `tern-relay admin migrate`: every mailbox holding messages, and a
//! seq above every seq the log handed out.

use tern_proto::DeviceAddress;

use super::{lock, seq, LogStore};
use crate::store::codec::addr_bytes;

impl LogStore {
    /// Every mailbox holding messages, in address order.
    pub fn dump_mailboxes(&self) -> Vec<DeviceAddress> {
        let mut out: Vec<DeviceAddress> =
            lock(&self.shared.index).mailboxes.keys().copied().collect();
        out.sort_by_key(addr_bytes);
        out
    }

    /// A seq above every seq this log ever handed out (its open's epoch floor).
    pub fn seq_floor(&self) -> u64 {
        seq::floor(lock(&self.shared.writer).seqs.epoch())
    }
}
