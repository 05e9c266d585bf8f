//! Rules every store must keep, run against each backend.

use bytes::Bytes;
use tern_proto::{AccountId, DeviceAddress, DeviceId, MessageId};

use super::*;

mod deletion;
mod devices;
mod discovery;
mod groups;
mod more;
mod push;
mod shared;
pub(super) use deletion::{deletion_rules, purge_rules};
pub(super) use devices::{device_rules, slot_rules};
pub(super) use discovery::discovery_rules;
pub(super) use groups::{
    concurrent_advances, concurrent_key_package_fetches, group_rules, key_package_rules,
};
pub(super) use more::{day_rules, key_account_rules};
pub(super) use push::{gateway, push_rules};
pub(super) use shared::{shared_bodies_across_reopen, shared_body_rules};

pub(in crate::store) fn addr(a: u8, d: u32) -> DeviceAddress {
    DeviceAddress::from_wire(&[a; 16], d).expect("valid address")
}

pub(super) fn msg(i: u8, len: usize) -> Envelope {
    Envelope {
        message_id: MessageId([i; 16]),
        payload: Bytes::from(vec![i; len]),
    }
}

pub(super) fn mailbox_rules(store: &dyn MailboxStore) {
    let alice = addr(1, 1);
    let alice2 = addr(1, 2);

    // Order and sequence numbers.
    let seqs = store
        .append(&alice, &[msg(1, 10), msg(2, 20), msg(3, 30)], 1_000, 5_000)
        .expect("append");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs increase");
    store
        .append(&alice2, &[msg(9, 5)], 1_000, 9_000)
        .expect("append");
    let read = store.read(&alice, 0, 10).expect("read");
    assert_eq!(
        read.iter().map(|m| m.message_id).collect::<Vec<_>>(),
        vec![MessageId([1; 16]), MessageId([2; 16]), MessageId([3; 16])]
    );
    assert_eq!(read[1].payload, Bytes::from(vec![2u8; 20]));
    assert_eq!((read[0].accepted_at, read[0].expires_at), (1_000, 5_000));
    assert_eq!(
        store.usage(&alice).expect("usage"),
        Usage {
            messages: 3,
            bytes: 60
        }
    );

    // Reads page from a cursor and never cross into another mailbox.
    let page = store.read(&alice, seqs[0], 1).expect("read");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].seq, seqs[1]);
    assert!(store.read(&alice, seqs[2], 10).expect("read").is_empty());
    assert!(store.read(&alice, u64::MAX, 10).expect("read").is_empty());

    // Remove deletes only what exists in this mailbox.
    let other_seq = store.read(&alice2, 0, 1).expect("read")[0].seq;
    assert_eq!(
        store.remove(&alice, &[other_seq + 1_000]).expect("remove"),
        Usage::default()
    );
    assert_eq!(
        store.read(&alice2, 0, 10).expect("read").len(),
        1,
        "other device untouched"
    );
    let removed = store
        .remove(&alice, &[seqs[0], seqs[0], 12_345])
        .expect("remove");
    assert_eq!(
        removed,
        Usage {
            messages: 1,
            bytes: 10
        }
    );
    assert_eq!(
        store.usage(&alice).expect("usage"),
        Usage {
            messages: 2,
            bytes: 50
        }
    );

    // The expiry index returns what is due, oldest first, and expire deletes it.
    assert!(store.expired(4_999, 100).expect("expired").is_empty());
    let due = store.expired(5_000, 100).expect("expired");
    assert_eq!(
        due.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[1..].to_vec()
    );
    assert!(due.iter().all(|e| e.to == alice && e.expires_at == 5_000));
    assert_eq!(
        store.expired(5_000, 1).expect("expired").len(),
        1,
        "bounded"
    );
    let gone = store.expire(&alice, &due).expect("expire");
    assert_eq!(
        gone,
        Usage {
            messages: 2,
            bytes: 50
        }
    );
    assert!(store.read(&alice, 0, 10).expect("read").is_empty());
    assert_eq!(store.usage(&alice).expect("usage"), Usage::default());
    assert!(store.expired(5_000, 100).expect("expired").is_empty());
    let later = store.expired(u64::MAX, 100).expect("expired");
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].to, alice2);

    // Acked messages leave no expiry entry behind.
    let s = store
        .append(&alice, &[msg(4, 1)], 1_000, 6_000)
        .expect("append");
    store.remove(&alice, &s).expect("remove");
    assert!(store
        .expired(6_000, 100)
        .expect("expired")
        .iter()
        .all(|e| e.to != alice));
    store.flush().expect("flush");
}

/// Seqs are per mailbox: what one mailbox is given moves no other mailbox's seqs, and
/// the same seq in two mailboxes names two messages.
pub(super) fn seqs_are_per_mailbox(store: &dyn MailboxStore) {
    let (alice, bob) = (addr(21, 1), addr(22, 1));
    let first = store
        .append(&alice, &[msg(1, 3)], 1_000, 9_000)
        .expect("append")[0];
    let to_bob: Vec<Envelope> = (0..50).map(|i| msg(i, 2)).collect();
    let bobs = store.append(&bob, &to_bob, 1_000, 9_000).expect("append");
    assert!(bobs.windows(2).all(|w| w[0] < w[1]), "seqs increase");
    let next = store
        .append(&alice, &[msg(2, 3)], 1_000, 9_000)
        .expect("append")[0];
    assert_eq!(next, first + 1, "50 sends to bob did not move alice's seqs");
    assert_eq!(bobs[0], first, "bob counts on his own, from the same start");

    // Bob's message with alice's first seq stays when alice acks hers.
    let gone = store.remove(&alice, &[first]).expect("remove");
    assert_eq!(gone.messages, 1);
    assert_eq!(store.read(&bob, 0, 100).expect("read").len(), 50);
    assert_eq!(store.read(&bob, 0, 1).expect("read")[0].seq, first);
    store.remove(&alice, &[next]).expect("remove");
    store.remove(&bob, &bobs).expect("remove");
    store.flush().expect("flush");
}

/// After a reopen a mailbox's new seqs are above every seq it was ever given, removed
/// ones included, even when it was emptied; a stale ack deletes nothing new. `open`
/// opens the same store again (the previous one is dropped first).
pub(super) fn seqs_grow_across_reopen(open: &dyn Fn() -> Box<dyn MailboxStore>) {
    let (alice, bob) = (addr(31, 1), addr(32, 1));
    let mut given = Vec::new();
    {
        let store = open();
        let s = store
            .append(&alice, &[msg(1, 4), msg(2, 4), msg(3, 4)], 1_000, 9_000)
            .expect("append");
        store
            .append(&bob, &[msg(4, 4), msg(5, 4)], 1_000, 9_000)
            .expect("append");
        store.remove(&alice, &s[1..]).expect("remove");
        store.flush().expect("flush");
        given.extend(s);
    }
    {
        let store = open();
        let s = store
            .append(&alice, &[msg(6, 4)], 1_000, 9_000)
            .expect("append");
        assert!(given.iter().all(|g| s[0] > *g), "{s:?} after {given:?}");
        given.extend(s);
        // Alice's mailbox empties.
        store.remove(&alice, &given).expect("remove");
        assert_eq!(store.usage(&alice).expect("usage"), Usage::default());
        store.flush().expect("flush");
    }
    let store = open();
    let s = store
        .append(&alice, &[msg(7, 4)], 1_000, 9_000)
        .expect("append");
    assert!(given.iter().all(|g| s[0] > *g), "{s:?} after {given:?}");
    assert_eq!(
        store.remove(&alice, &given).expect("remove"),
        Usage::default(),
        "a stale ack deletes nothing new"
    );
    assert_eq!(store.read(&alice, 0, 10).expect("read").len(), 1);
    assert_eq!(store.read(&bob, 0, 10).expect("read").len(), 2);
    store.flush().expect("flush");
}

pub(super) fn account_rules(store: &dyn AccountStore) {
    let id = AccountId([7; 16]);
    let rec = AccountRecord {
        identity_key: [1; 32],
        devices: vec![(DeviceId::PRIMARY, [2; 32])],
    };
    assert_eq!(store.get(&id).expect("get"), None);
    store.create(&id, &rec).expect("create");
    assert!(matches!(store.create(&id, &rec), Err(StoreError::Exists)));
    assert_eq!(store.get(&id).expect("get"), Some(rec));

    let second = store
        .add_device(&id, &[3; 32], 1)
        .expect("add")
        .expect("account exists");
    assert_eq!(second.get(), 2);
    assert_eq!(
        store.add_device(&id, &[3; 32], 1).expect("add"),
        Some(second),
        "idempotent"
    );
    assert_eq!(
        store
            .add_device(&AccountId([8; 16]), &[3; 32], 1)
            .expect("add"),
        None
    );
    let got = store.get(&id).expect("get").expect("exists");
    assert_eq!(got.device_key(second), Some(&[3; 32]));
    assert_eq!(got.device_key(DeviceId::PRIMARY), Some(&[2; 32]));
}

pub(super) fn key_rules(store: &(impl KeyStore + AccountStore)) {
    let dev = addr(5, 1);
    let signed = |id: u32, b: u8| SignedKey {
        id,
        key: [b; 32],
        signature: [b; 64],
    };
    assert_eq!(
        store.fetch(&dev, true).expect("fetch"),
        None,
        "nothing published"
    );
    // A pool without the signed keys hands out nothing.
    store
        .publish(
            &dev,
            None,
            None,
            &[OneTimeKey {
                id: 1,
                key: [1; 32],
            }],
        )
        .expect("publish");
    assert_eq!(store.fetch(&dev, true).expect("fetch"), None);
    let n = store
        .publish(
            &dev,
            Some(&signed(0, 7)),
            Some(&signed(10, 8)),
            &[
                OneTimeKey {
                    id: 2,
                    key: [2; 32],
                },
                OneTimeKey {
                    id: 1,
                    key: [1; 32],
                },
            ],
        )
        .expect("publish");
    assert_eq!(n, 2, "same id replaces");
    let withheld = store.fetch(&dev, false).expect("fetch").expect("published");
    assert_eq!(withheld.one_time, None, "asked for none, none taken");
    assert_eq!(store.one_time_count(&dev).expect("count"), 2);
    let first = store.fetch(&dev, true).expect("fetch").expect("published");
    assert_eq!(first.identity_dh, signed(0, 7));
    assert_eq!(first.signed_prekey, signed(10, 8));
    let second = store.fetch(&dev, true).expect("fetch").expect("published");
    let ids = [first.one_time.map(|k| k.id), second.one_time.map(|k| k.id)];
    assert_eq!(
        ids,
        [Some(1), Some(2)],
        "each one-time key once, lowest id first"
    );
    let third = store.fetch(&dev, true).expect("fetch").expect("published");
    assert_eq!(
        third.one_time, None,
        "falls back to the signed prekey alone"
    );
    assert_eq!(store.one_time_count(&dev).expect("count"), 0);
    // Rotation replaces the signed prekey; other devices are untouched.
    store
        .publish(&dev, None, Some(&signed(11, 9)), &[])
        .expect("publish");
    assert_eq!(
        store
            .fetch(&dev, true)
            .expect("fetch")
            .expect("published")
            .signed_prekey
            .id,
        11
    );
    assert_eq!(store.fetch(&addr(5, 2), true).expect("fetch"), None);

    let acct = AccountId([5; 16]);
    assert_eq!(store.delivery_token(&acct).expect("token"), None);
    store.set_delivery_token(&acct, &[1; 32]).expect("set");
    store.set_delivery_token(&acct, &[2; 32]).expect("rotate");
    assert_eq!(store.delivery_token(&acct).expect("token"), Some([2; 32]));
}

pub(super) fn concurrent_fetches<S: KeyStore>(store: std::sync::Arc<S>) {
    let dev = addr(6, 1);
    let signed = SignedKey {
        id: 1,
        key: [1; 32],
        signature: [1; 64],
    };
    let pool: Vec<OneTimeKey> = (0..200).map(|id| OneTimeKey { id, key: [3; 32] }).collect();
    store
        .publish(&dev, Some(&signed), Some(&signed), &pool)
        .expect("publish");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..60)
                    .filter_map(|_| {
                        store
                            .fetch(&dev, true)
                            .expect("fetch")
                            .and_then(|k| k.one_time)
                            .map(|k| k.id)
                    })
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    let handed_out = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        handed_out,
        "no one-time prekey was handed out twice"
    );
    assert_eq!(handed_out, 200, "240 fetches drain a pool of 200");
}

/// The blob index: records, expiry, uploads, and charges that expire by UTC day.
pub(super) fn blob_rules(store: &dyn BlobIndex) {
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    // Noon of a UTC day, so "later the same day" is well inside it.
    let day = 20_000;
    let noon = day * DAY_MS + DAY_MS / 2;
    let meta = |size, expires_at| BlobMeta {
        size,
        created_at: noon,
        last_used_at: noon,
        expires_at,
    };
    let upload = UploadMeta {
        size: 100,
        started_at: noon,
        touched_at: noon,
    };

    // An upload is tied to its account until the blob is inserted, which ends it.
    store.put_upload(&alice, &[1; 32], &upload).expect("upload");
    assert_eq!(
        store.uploads_of(&alice).expect("uploads"),
        vec![([1; 32], 100)]
    );
    assert!(store.uploads_of(&bob).expect("uploads").is_empty());
    store
        .insert_blob(&[1; 32], &meta(100, noon + 2 * DAY_MS), &alice)
        .expect("insert");
    assert_eq!(store.upload(&alice, &[1; 32]).expect("upload"), None);
    assert_eq!(
        store.blob(&[1; 32]).expect("blob"),
        Some(meta(100, noon + 2 * DAY_MS))
    );

    // Charges add up per account, whatever day they run to.
    store
        .insert_blob(&[2; 32], &meta(50, noon + 10 * DAY_MS), &alice)
        .expect("insert");
    store
        .insert_blob(&[3; 32], &meta(7, noon + DAY_MS), &bob)
        .expect("insert");
    assert_eq!(store.account_bytes(&alice, noon).expect("bytes"), 150);
    assert_eq!(store.account_bytes(&bob, noon).expect("bytes"), 7);

    // A forward moves the blob, not the charge; a removal uncharges no one.
    let touched = store
        .touch_blob(&[1; 32], noon + DAY_MS, noon + 20 * DAY_MS)
        .expect("touch")
        .expect("present");
    assert_eq!(
        (touched.last_used_at, touched.expires_at),
        (noon + DAY_MS, noon + 20 * DAY_MS)
    );
    assert_eq!(store.touch_blob(&[9; 32], noon, noon).expect("touch"), None);
    assert_eq!(
        store.remove_blob(&[2; 32]).expect("remove"),
        Some(meta(50, noon + 10 * DAY_MS))
    );
    assert_eq!(store.blob(&[2; 32]).expect("blob"), None);
    assert_eq!(store.account_bytes(&alice, noon).expect("bytes"), 150);

    // Expiry index: soonest first, only what is due.
    assert_eq!(
        store.expired_blobs(noon + DAY_MS, 10).expect("expired"),
        vec![[3; 32]]
    );
    assert_eq!(
        store
            .expired_blobs(noon + 30 * DAY_MS, 10)
            .expect("expired"),
        vec![[3; 32], [1; 32]]
    );
    assert_eq!(
        store
            .expired_blobs(noon + 30 * DAY_MS, 1)
            .expect("expired")
            .len(),
        1
    );

    // A charge is due until the end of the UTC day its blob was to expire on.
    let last_ms_of = |d: u64| (d + 1) * DAY_MS - 1;
    assert_eq!(
        store
            .account_bytes(&alice, last_ms_of(day + 2))
            .expect("bytes"),
        150
    );
    assert_eq!(
        store
            .account_bytes(&alice, (day + 3) * DAY_MS)
            .expect("bytes"),
        50,
        "the first charge ended with its day, though the blob was forwarded"
    );
    assert_eq!(
        store
            .account_bytes(&bob, (day + 2) * DAY_MS)
            .expect("bytes"),
        0
    );
    // The sweep deletes charges of past days, a bounded number at a time.
    assert_eq!(
        store.expire_charges((day + 3) * DAY_MS, 1).expect("expire"),
        1
    );
    assert_eq!(
        store
            .expire_charges((day + 3) * DAY_MS, 10)
            .expect("expire"),
        1
    );
    assert_eq!(
        store
            .expire_charges((day + 3) * DAY_MS, 10)
            .expect("expire"),
        0
    );
    assert_eq!(store.account_bytes(&alice, noon).expect("bytes"), 50);
    assert_eq!(store.account_bytes(&bob, noon).expect("bytes"), 0);

    // Stale uploads: by when bytes last arrived.
    store.put_upload(&bob, &[4; 32], &upload).expect("upload");
    store
        .put_upload(
            &alice,
            &[5; 32],
            &UploadMeta {
                touched_at: noon + 10,
                ..upload
            },
        )
        .expect("upload");
    assert_eq!(
        store.stale_uploads(noon + 1, 10).expect("stale"),
        vec![(bob, [4; 32])]
    );
    assert_eq!(store.stale_uploads(noon + 11, 10).expect("stale").len(), 2);
    assert_eq!(store.stale_uploads(noon + 11, 1).expect("stale").len(), 1);
    store.remove_upload(&bob, &[4; 32]).expect("remove");
    assert_eq!(store.upload(&bob, &[4; 32]).expect("upload"), None);
}

/// [`MailboxStore::totals`] follows appends, removals and expiry (run on an empty
/// store).
pub(super) fn totals_rules(store: &dyn MailboxStore) {
    let (a, b) = (addr(7, 1), addr(8, 1));
    let totals = |messages, bytes, mailboxes| Totals {
        messages,
        bytes,
        mailboxes,
    };
    assert_eq!(store.totals(), Totals::default());
    let seqs = store
        .append(&a, &[msg(1, 10), msg(2, 20)], 1_000, 5_000)
        .expect("append");
    store
        .append(&b, &[msg(3, 5)], 1_000, 2_000)
        .expect("append");
    assert_eq!(store.totals(), totals(3, 35, 2));
    assert_eq!(
        store.usage_and_totals(&a).expect("usage and totals"),
        (store.usage(&a).expect("usage"), totals(3, 35, 2))
    );
    store
        .remove(&a, &[seqs[0], seqs[0], 999_999])
        .expect("remove");
    assert_eq!(
        store.totals(),
        totals(2, 25, 2),
        "a repeat or absent seq counts nothing"
    );
    let due = store.expired(2_000, 10).expect("expired");
    store.expire(&b, &due).expect("expire");
    assert_eq!(
        store.totals(),
        totals(1, 20, 1),
        "an emptied mailbox is not counted"
    );
    store.remove(&a, &[seqs[1]]).expect("remove");
    assert_eq!(store.totals(), Totals::default());
}
