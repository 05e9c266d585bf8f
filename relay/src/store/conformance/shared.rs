//! Shared bodies: a multi-recipient append stores its body once, every entry counts
//! in its mailbox, and the body goes with its last entry.

use bytes::Bytes;
use tern_proto::MessageId;

use super::{addr, msg};
use crate::store::{MailboxStore, SharedAppend, SharedEntry, Totals, Usage};

fn entries(to: &[tern_proto::DeviceAddress], part: &[u8]) -> Vec<SharedEntry> {
    to.iter()
        .map(|a| SharedEntry {
            to: *a,
            part: Bytes::copy_from_slice(part),
        })
        .collect()
}

fn shared<'a>(body: &'a Bytes, entries: &'a [SharedEntry], expires_at: u64) -> SharedAppend<'a> {
    SharedAppend {
        message_id: MessageId([0xAB; 16]),
        body,
        entries,
        accepted_at: 1_000,
        expires_at,
    }
}

/// Stored once, counted per entry, deleted after the last ack, by expiry and by
/// purges; order within a mailbox kept with messages of its own.
pub(in crate::store) fn shared_body_rules(store: &dyn MailboxStore) {
    let five: Vec<_> = (0..5).map(|d| addr(60, d + 1)).collect();
    let base = store.totals();
    let before = store
        .append(&five[0], &[msg(1, 7)], 1_000, 9_000)
        .expect("append")[0];
    let body = Bytes::from(vec![0xBB; 300]);
    let es = entries(&five, b"pt");
    let seqs = store
        .append_shared(&shared(&body, &es, 9_000))
        .expect("append shared");
    assert_eq!(seqs.len(), 5);
    assert!(seqs[0] > before, "after the mailbox's earlier message");
    let after = store
        .append(&five[0], &[msg(2, 7)], 1_000, 9_000)
        .expect("append")[0];
    assert!(after > seqs[0], "and before its later one");
    assert_eq!(store.shared_bodies(), 1, "one body for five mailboxes");
    for (a, seq) in five.iter().zip(&seqs) {
        let read = store.read(a, 0, 10).expect("read");
        let m = read.iter().find(|m| m.seq == *seq).expect("entry");
        assert_eq!(m.shared_body.as_deref(), Some(&body[..]));
        assert_eq!(&m.payload[..], b"pt");
        assert_eq!(m.message_id, MessageId([0xAB; 16]));
        assert_eq!((m.accepted_at, m.expires_at), (1_000, 9_000));
    }
    let read = store.read(&five[0], 0, 10).expect("read");
    assert_eq!(
        read.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![before, seqs[0], after]
    );
    assert!(read[0].shared_body.is_none() && read[2].shared_body.is_none());
    assert_eq!(
        store.usage(&five[1]).expect("usage"),
        Usage {
            messages: 1,
            bytes: 302
        },
        "an entry counts its part and the body"
    );
    assert_eq!(
        store.totals(),
        Totals {
            messages: base.messages + 7,
            bytes: base.bytes + 14 + 300 + 5 * 2,
            mailboxes: base.mailboxes + 5,
        },
        "the relay counts the body once"
    );

    // Acks: the body stays until the last one.
    for (a, seq) in five[..4].iter().zip(&seqs) {
        assert_eq!(
            store.remove(a, &[*seq]).expect("ack"),
            Usage {
                messages: 1,
                bytes: 302
            }
        );
        assert_eq!(store.shared_bodies(), 1);
    }
    let last = store.read(&five[4], 0, 10).expect("read");
    assert_eq!(last[0].shared_body.as_deref(), Some(&body[..]));
    store.remove(&five[4], &[seqs[4]]).expect("ack");
    assert_eq!(store.shared_bodies(), 0, "gone with the last ack");
    store.remove(&five[0], &[before, after]).expect("ack");
    assert_eq!(store.totals(), base);

    // Expiry deletes the entries and the body.
    let two = [addr(61, 1), addr(61, 2)];
    let es = entries(&two, b"");
    store
        .append_shared(&shared(&body, &es, 2_000))
        .expect("append shared");
    let due = store.expired(2_000, 10).expect("expired");
    assert_eq!(due.len(), 2);
    for a in &two {
        assert_eq!(store.expire(a, &due).expect("expire").messages, 1);
    }
    assert_eq!(store.shared_bodies(), 0, "expired with its entries");
    assert_eq!(store.totals(), base);

    // Purges release their mailbox's reference.
    let es = entries(&two, b"x");
    store
        .append_shared(&shared(&body, &es, 9_000))
        .expect("append shared");
    assert_eq!(store.purge(&two[0]).expect("purge").messages, 1);
    assert_eq!(store.shared_bodies(), 1, "the other device still holds it");
    assert_eq!(
        store.read(&two[1], 0, 10).expect("read")[0]
            .shared_body
            .as_deref(),
        Some(&body[..])
    );
    store.purge(&two[1]).expect("purge");
    assert_eq!(store.shared_bodies(), 0);
    assert_eq!(store.totals(), base);

    // No entries: nothing stored.
    assert!(store
        .append_shared(&shared(&body, &[], 9_000))
        .expect("empty")
        .is_empty());
    assert_eq!(store.shared_bodies(), 0);
    store.flush().expect("flush");
}

/// Across a reopen (`open` opens the same store again, the previous one dropped
/// first): entries and their body are still there, counted as before, and the body
/// goes with the last ack; one whose entries were all acked before is not back.
pub(in crate::store) fn shared_bodies_across_reopen(open: &dyn Fn() -> Box<dyn MailboxStore>) {
    let three = [addr(70, 1), addr(70, 2), addr(70, 3)];
    let kept = Bytes::from(vec![0xC1; 200]);
    let acked = Bytes::from(vec![0xC2; 100]);
    let (seqs, base) = {
        let store = open();
        let base = store.totals();
        let es = entries(&three, b"p");
        let seqs = store
            .append_shared(&shared(&kept, &es, 9_000))
            .expect("append shared");
        let gone = store
            .append_shared(&shared(&acked, &es[..2], 9_000))
            .expect("append shared");
        store.remove(&three[0], &[seqs[0], gone[0]]).expect("ack");
        store.remove(&three[1], &[gone[1]]).expect("ack");
        store.flush().expect("flush");
        (seqs, base)
    };
    let store = open();
    assert_eq!(store.shared_bodies(), 1, "the acked body is not back");
    assert_eq!(
        store.totals(),
        Totals {
            messages: base.messages + 2,
            bytes: base.bytes + 200 + 2,
            mailboxes: base.mailboxes + 2,
        }
    );
    for (a, seq) in three[1..].iter().zip(&seqs[1..]) {
        let read = store.read(a, 0, 10).expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].seq, *seq);
        assert_eq!(read[0].shared_body.as_deref(), Some(&kept[..]));
        assert_eq!(store.usage(a).expect("usage").bytes, 201);
    }
    store.remove(&three[1], &[seqs[1]]).expect("ack");
    assert_eq!(store.shared_bodies(), 1);
    store.remove(&three[2], &[seqs[2]]).expect("ack");
    assert_eq!(store.shared_bodies(), 0);
    assert_eq!(store.totals(), base);
    store.flush().expect("flush");
}
