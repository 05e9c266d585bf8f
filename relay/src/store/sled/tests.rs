use super::*;
use crate::store::{AccountStore, Envelope, MailboxStore};
use bytes::Bytes;
use tern_proto::MessageId;
use tern_proto::{AccountId, DeviceId};

#[test]
fn conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    super::super::conformance::mailbox_rules(&store);
    super::super::conformance::seqs_are_per_mailbox(&store);
    super::super::conformance::shared_body_rules(&store);
    super::super::conformance::account_rules(&store);
    super::super::conformance::day_rules(&store);
    super::super::conformance::key_rules(&store);
    super::super::conformance::key_account_rules(&store);
    super::super::conformance::blob_rules(&store);
    super::super::conformance::deletion_rules(&store);
    super::super::conformance::purge_rules(&store);
    super::super::conformance::discovery_rules(&store);
}

#[test]
fn discovery_tags_survive_reopen() {
    use crate::store::{DiscoveryStore, TagRecord};
    use tern_proto::discovery::{FilterKey, Tag};
    let dir = tempfile::tempdir().expect("tempdir");
    let alice = AccountId([1; 16]);
    let rec = TagRecord {
        account: alice,
        key: FilterKey(7),
        discoverable: true,
        verified_at: 0,
    };
    {
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        store.attach(&alice, &Tag([3; 16]), &rec).expect("attach");
        store
            .set_buckets(&alice, 99, &Tag([9; 16]), 99)
            .expect("bucket");
        store.flush().expect("flush");
    }
    let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
    assert_eq!(store.by_tag(&Tag([3; 16])).expect("by_tag"), Some(rec));
    assert_eq!(store.bucket(&alice).expect("bucket"), Some(99));
}

#[test]
fn seqs_grow_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    super::super::conformance::seqs_grow_across_reopen(&|| {
        Box::new(SledStore::open(dir.path(), 8 << 20).expect("open"))
    });
}

#[test]
fn concurrent_fetches_never_share_a_one_time_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    super::super::conformance::concurrent_fetches(std::sync::Arc::new(store));
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let to = DeviceAddress::from_wire(&[3; 16], 1).expect("addr");
    let seqs = {
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        let msgs: Vec<Envelope> = (0..3u8)
            .map(|i| Envelope {
                message_id: MessageId([i; 16]),
                payload: Bytes::from(vec![i; 10]),
            })
            .collect();
        let seqs = store.append(&to, &msgs, 1, 100).expect("append");
        store.remove(&to, &seqs[..1]).expect("remove");
        store.flush().expect("flush");
        seqs
    };
    let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
    let left = store.read(&to, 0, 10).expect("read");
    assert_eq!(left.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs[1..]);
    assert_eq!(
        store.usage(&to).expect("usage"),
        Usage {
            messages: 2,
            bytes: 20
        }
    );
    let later = store
        .append(
            &to,
            &[Envelope {
                message_id: MessageId([9; 16]),
                payload: Bytes::new(),
            }],
            1,
            100,
        )
        .expect("append");
    assert!(
        later[0] > seqs[2],
        "sequence numbers keep increasing after a restart"
    );
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    assert!(mailboxes::decode_value(&[0; 31]).is_err());
    let mut entry = [0u8; 40];
    entry[16] = 0x80;
    assert!(
        mailboxes::decode_value(&entry).is_err(),
        "an entry cut short"
    );
    assert!(decode_usage(&[1, 2, 3]).is_err());
    assert!(codec::decode_account(&[0; 33]).is_err());
    assert!(blobs::decode_blob(&[0; 48]).is_err());
    assert!(blobs::decode_blob_v1(&[0; 32]).is_err());
}

#[test]
fn format_1_blob_records_lose_their_uploader_at_open() {
    use super::super::{BlobIndex, BlobMeta, DAY_MS};
    let dir = tempfile::tempdir().expect("tempdir");
    let owner = [0xA7u8; 16];
    let expires_at = 20_000 * DAY_MS + 5;
    // A database as format 1 wrote it: owner in the record, a running total, and
    // an upload in progress, all in the "blobs" tree.
    {
        let db = sled::open(dir.path()).expect("open");
        let tree = db.open_tree("blobs").expect("tree");
        let record = [
            &100u64.to_be_bytes()[..],
            &1u64.to_be_bytes(),
            &2u64.to_be_bytes(),
            &expires_at.to_be_bytes(),
            &owner,
        ]
        .concat();
        tree.insert([&[b'B'][..], &[1; 32]].concat(), record)
            .expect("record");
        tree.insert(
            [&[b'X'][..], &expires_at.to_be_bytes(), &[1; 32]].concat(),
            &[][..],
        )
        .expect("expiry");
        tree.insert([&[b'A'][..], &owner].concat(), &100u64.to_be_bytes()[..])
            .expect("total");
        let upload = [5u64.to_be_bytes(), 1u64.to_be_bytes(), 1u64.to_be_bytes()].concat();
        tree.insert([&[b'P'][..], &owner, &[2; 32]].concat(), upload)
            .expect("upload");
        db.flush().expect("flush");
    }
    for _ in 0..2 {
        // Opened twice: the second open finds format 2 and changes nothing.
        let store = SledStore::open(dir.path(), 8 << 20).expect("open migrates");
        let account = AccountId(owner);
        assert_eq!(
            store.blob(&[1; 32]).expect("blob"),
            Some(BlobMeta {
                size: 100,
                created_at: 1,
                last_used_at: 2,
                expires_at,
            })
        );
        assert_eq!(
            store.account_bytes(&account, expires_at).expect("charge"),
            100
        );
        assert_eq!(
            store
                .account_bytes(&account, expires_at + DAY_MS)
                .expect("charge"),
            0
        );
        assert_eq!(
            store
                .upload(&account, &[2; 32])
                .expect("upload")
                .map(|u| u.size),
            Some(5)
        );
        assert_eq!(
            store.expired_blobs(expires_at, 10).expect("expired"),
            vec![[1; 32]]
        );
        for kv in store.blobs.iter() {
            let (k, v) = kv.expect("record");
            assert!(
                !k.windows(16).any(|w| w == owner) && !v.windows(16).any(|w| w == owner),
                "the blobs tree names the uploader: {k:?}"
            );
        }
    }
}

#[test]
fn a_blob_index_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = sled::open(dir.path()).expect("open");
        let tree = db.open_tree("blobs").expect("tree");
        tree.insert([b'V'], &(blobs::FORMAT + 1).to_be_bytes()[..])
            .expect("version");
        db.flush().expect("flush");
    }
    assert!(matches!(
        SledStore::open(dir.path(), 8 << 20),
        Err(StoreError::Corrupt(_))
    ));
}

#[test]
fn totals_follow_changes_and_are_summed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = DeviceAddress::from_wire(&[1; 16], 1).expect("addr");
    let b = DeviceAddress::from_wire(&[2; 16], 1).expect("addr");
    let env = |i: u8, n: usize| Envelope {
        message_id: MessageId([i; 16]),
        payload: Bytes::from(vec![i; n]),
    };
    {
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        super::super::conformance::totals_rules(&store);
        let s = store
            .append(&a, &[env(1, 3), env(2, 4)], 5, u64::MAX)
            .expect("append");
        store.append(&b, &[env(3, 1)], 5, u64::MAX).expect("append");
        store.remove(&a, &[s[0]]).expect("remove");
        store.flush().expect("flush");
    }
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    let t = store.totals();
    assert_eq!((t.messages, t.bytes, t.mailboxes), (2, 5, 2));
}

#[test]
fn an_unreadable_deletion_intent_is_skipped_or_kept_with_no_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    let (alice, bob) = (AccountId([1; 16]), AccountId([2; 16]));
    store
        .put_deletion(&alice, &[DeviceId::PRIMARY])
        .expect("intent");
    // Bob's device list cut short; a key that is no account id at all.
    store
        .deletions
        .insert(bob.as_bytes(), &[0u8, 0, 1][..])
        .expect("insert");
    store
        .deletions
        .insert(&[9u8; 5][..], &[0u8, 0, 0, 1][..])
        .expect("insert");
    let mut found = store.deletions().expect("readable ones");
    found.sort();
    assert_eq!(found, vec![(alice, vec![DeviceId::PRIMARY]), (bob, vec![])]);
}

#[test]
fn an_account_record_in_the_first_format_is_read_and_kept_on_its_next_write() {
    use crate::store::DeviceDays;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    let id = AccountId([5; 16]);
    // The first format: identity key, then (device id, key) per device; no days.
    let mut old = vec![2u8; 32];
    old.extend_from_slice(&1u32.to_be_bytes());
    old.extend_from_slice(&[3; 32]);
    store.accounts.insert(id.as_bytes(), old).expect("insert");
    let rec = store.get(&id).expect("get").expect("account");
    assert_eq!(rec.identity_key, [2; 32]);
    assert_eq!(rec.devices, vec![(DeviceId::PRIMARY, [3; 32])]);
    let days = store.days(&id).expect("days").expect("account");
    assert_eq!(days.created, None);
    assert_eq!(
        days.devices,
        vec![(DeviceId::PRIMARY, DeviceDays::default())]
    );
    // A touch writes the new format; the record and its devices are unchanged.
    let a = DeviceAddress {
        account: id,
        device: DeviceId::PRIMARY,
    };
    assert!(store.touch_device(&a, 40).expect("touch"));
    let second = store
        .add_device(&id, &[4; 32], 41)
        .expect("add")
        .expect("account");
    let raw = store
        .accounts
        .get(id.as_bytes())
        .expect("get")
        .expect("raw");
    assert_eq!(
        raw[0],
        codec::ACCOUNT_V3,
        "rewritten in the versioned format"
    );
    let rec = store.get(&id).expect("get").expect("account");
    assert_eq!(
        rec.devices,
        vec![(DeviceId::PRIMARY, [3; 32]), (second, [4; 32])]
    );
    let days = store.days(&id).expect("days").expect("account");
    assert_eq!(
        days.devices[0].1,
        DeviceDays {
            created: None,
            last_seen: Some(40)
        }
    );
    assert_eq!(
        days.devices[1].1,
        DeviceDays {
            created: Some(41),
            last_seen: Some(41)
        }
    );
    // A record of neither format is corrupt, not a panic.
    store
        .accounts
        .insert(id.as_bytes(), vec![9u8; 33])
        .expect("insert");
    assert!(matches!(store.get(&id), Err(StoreError::Corrupt(_))));
    assert!(matches!(store.days(&id), Err(StoreError::Corrupt(_))));
    assert!(store.touch_device(&a, 42).is_err());
}

#[test]
fn shared_bodies_survive_reopen_and_unheld_ones_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    super::super::conformance::shared_bodies_across_reopen(&|| {
        Box::new(SledStore::open(dir.path(), 8 << 20).expect("open"))
    });
    // A body whose entries are gone (a crash between the two) is deleted at open.
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    let key = mailboxes::body_key_for_tests();
    store.mailboxes.insert(key, &[0u8; 12][..]).expect("insert");
    drop(store);
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    assert!(store.mailboxes.get(key).expect("get").is_none());
    assert_eq!(store.shared_bodies(), 0);
}

#[test]
fn a_read_skips_an_entry_whose_body_expiry_deleted_meanwhile() {
    use crate::store::{SharedAppend, SharedEntry};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    let (a, b) = (
        crate::store::conformance::addr(80, 1),
        crate::store::conformance::addr(80, 2),
    );
    let own = |i: u8| crate::store::Envelope {
        message_id: tern_proto::MessageId([i; 16]),
        payload: bytes::Bytes::from_static(b"own"),
    };
    let first = store.append(&a, &[own(1)], 1_000, 9_000).expect("append")[0];
    let body = bytes::Bytes::from_static(b"body");
    let entries = [a, b].map(|to| SharedEntry {
        to,
        part: bytes::Bytes::new(),
    });
    let seqs = store
        .append_shared(&SharedAppend {
            message_id: tern_proto::MessageId([2; 16]),
            body: &body,
            entries: &entries,
            accepted_at: 1_000,
            expires_at: 2_000,
        })
        .expect("append shared");
    let last = store.append(&a, &[own(3)], 1_000, 9_000).expect("append")[0];
    // Where a read stands after taking the entry from the range and before reading
    // its body, when the sweep has deleted both meanwhile: the body is gone.
    let key = mailboxes::body_key_of(&a, seqs[0]);
    store.mailboxes.remove(key).expect("remove");
    let read = store.read(&a, 0, 10).expect("a read does not fail");
    assert_eq!(
        read.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![first, last],
        "the entry is skipped, the messages around it delivered"
    );
    assert_eq!(store.bodies_missing(), 1, "the skip is counted");
    assert!(store.read(&b, 0, 10).expect("read").is_empty());
    assert_eq!(store.bodies_missing(), 2);
}
