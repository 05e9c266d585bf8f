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

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;
    use crate::store::conformance::{addr, msg};
    use crate::store::{LogOptions, MailboxStore};

    #[test]
    fn mailboxes_holding_messages_are_listed_and_the_floor_is_above_every_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(dir.path(), LogOptions::default()).expect("open");
        let kept = log
            .append(&addr(2, 1), &[msg(1, 5)], 1, u64::MAX / 2)
            .expect("append");
        log.append(&addr(1, 1), &[msg(2, 5)], 1, u64::MAX / 2)
            .expect("append");
        let emptied = log
            .append(&addr(3, 1), &[msg(3, 5)], 1, u64::MAX / 2)
            .expect("append");
        log.remove(&addr(3, 1), &emptied).expect("ack");
        assert_eq!(log.dump_mailboxes(), vec![addr(1, 1), addr(2, 1)]);
        drop(log);
        let log = LogStore::open(dir.path(), LogOptions::default()).expect("reopen");
        let top = kept[0].max(emptied[0]);
        assert!(log.seq_floor() > top, "{} > {top}", log.seq_floor());
    }
}
