#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::{AccountId, DeviceId, MessageId};

use super::*;
use crate::store::pg::testdb;
use crate::store::{
    AccountRecord, BlobMeta, DiscoveryStore, Envelope, Flush, OneTimeKey, SignedKey, StoredMessage,
    TagRecord, UploadMeta,
};

fn addr(a: u8, d: u32) -> DeviceAddress {
    DeviceAddress::from_wire(&[a; 16], d).expect("address")
}

fn env(i: u32) -> Envelope {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    Envelope {
        message_id: MessageId(id),
        payload: Bytes::from(vec![(i % 251) as u8; 10 + (i as usize % 7)]),
    }
}

fn signed(id: u32, b: u8) -> SignedKey {
    SignedKey {
        id,
        key: [b; 32],
        signature: [b; 64],
    }
}

fn a_list() -> crate::store::StoredList {
    crate::store::StoredList {
        version: 7,
        list: vec![5; 92],
        signature: [6; 64],
    }
}

fn all(store: &dyn MailboxStore, of: &DeviceAddress) -> Vec<StoredMessage> {
    store.read(of, 0, 100_000).expect("read")
}

/// Seeds sled and the log through the store APIs, migrates into a real PostgreSQL and
/// reads every item back through the PostgreSQL stores.
#[test]
fn an_embedded_relay_is_copied_whole_and_seqs_continue_above() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let (a, b, c) = (AccountId([1; 16]), AccountId([2; 16]), AccountId([3; 16]));
    let d1 = DeviceId::PRIMARY;
    let d2 = DeviceId::new(2).expect("id");
    let tag_a = Tag([7; 16]);
    let tag_b = Tag([8; 16]);
    let (blob1, blob2) = ([0x11; 32], [0x22; 32]);
    let (mbox1, mbox2, mbox3) = (addr(1, 1), addr(1, 2), addr(2, 1));
    let mut expected: Vec<(DeviceAddress, Vec<StoredMessage>)> = Vec::new();
    let b_buckets;
    {
        let sled = SledStore::open(&dir.path().join("db"), 1 << 20).expect("sled");
        let log =
            LogStore::open(&dir.path().join("mailboxes"), LogOptions::default()).expect("log");
        let rec = |k: u8| AccountRecord {
            identity_key: [k; 32],
            devices: vec![(d1, [k + 1; 32])],
        };
        sled.create_on(&a, &rec(10), Some(19_000)).expect("a");
        assert_eq!(
            sled.add_device(&a, &[99; 32], 19_001).expect("add"),
            Some(d2)
        );
        sled.touch_device(
            &DeviceAddress {
                account: a,
                device: d2,
            },
            19_005,
        )
        .expect("touch");
        // A linked device removed: its id (3) stays used; a's list and the removal
        // intent are copied.
        let d3 = sled.add_device(&a, &[98; 32], 19_001).expect("add");
        assert_eq!(d3, DeviceId::new(3));
        assert!(sled.remove_device_record(&addr(1, 3)).expect("remove"));
        assert!(sled.put_device_list(&a, &a_list()).expect("list"));
        sled.put_device_removal(&addr(1, 3)).expect("intent");
        sled.create_on(&b, &rec(20), None).expect("b");
        sled.create_on(&c, &rec(30), Some(19_002)).expect("c");
        sled.create_on(&AccountId([4; 16]), &rec(40), None)
            .expect("quiet");
        sled.set_delivery_token(&a, &[5; 32]).expect("token");
        sled.put_deletion(&c, &[d1]).expect("intent");
        sled.publish(
            &mbox1,
            Some(&signed(1, 1)),
            Some(&signed(2, 2)),
            &[
                OneTimeKey {
                    id: 7,
                    key: [7; 32],
                },
                OneTimeKey {
                    id: 9,
                    key: [9; 32],
                },
            ],
        )
        .expect("keys");
        sled.publish(
            &mbox3,
            None,
            None,
            &[OneTimeKey {
                id: 3,
                key: [3; 32],
            }],
        )
        .expect("one-time only");
        let rec_tag = |acc: AccountId, on: bool| TagRecord {
            account: acc,
            key: FilterKey(u64::MAX - 3),
            discoverable: on,
            verified_at: 86_400_000 * 19_000,
        };
        sled.attach(&a, &tag_a, &rec_tag(a, true))
            .expect("attach a");
        sled.attach(&b, &tag_b, &rec_tag(b, false))
            .expect("attach b");
        sled.set_buckets(&a, 1_234, &tag_a, 5_678).expect("buckets");
        sled.set_buckets(&b, 4_321, &tag_b, 8_765).expect("buckets");
        sled.detach(&b).expect("detach b");
        b_buckets = (
            sled.bucket(&b).expect("bucket"),
            sled.number_bucket(&tag_b).expect("nb"),
        );
        assert_eq!(
            b_buckets.1,
            Some(8_765),
            "a detached number keeps its bucket"
        );
        let meta = |size| BlobMeta {
            size,
            created_at: 1_000,
            last_used_at: 2_000,
            expires_at: 86_400_000 * 30_000,
        };
        sled.insert_blob(&blob1, &meta(100), &a).expect("blob");
        sled.insert_blob(&blob2, &meta(50), &b).expect("blob");
        let up = UploadMeta {
            size: 77,
            started_at: 3,
            touched_at: 4,
        };
        sled.put_upload(&a, &[0x33; 32], &up).expect("upload");
        // Three mailboxes; an ack leaves a gap in mailbox 1.
        let at = SystemClock.now();
        for (to, n) in [(mbox1, 30u32), (mbox2, 5), (mbox3, 12)] {
            let msgs: Vec<Envelope> = (0..n).map(|i| env(i + n * 100)).collect();
            log.append(&to, &msgs, at, at + 86_400_000).expect("append");
        }
        let seqs: Vec<u64> = all(&log, &mbox1)[10..15].iter().map(|m| m.seq).collect();
        log.remove(&mbox1, &seqs).expect("ack");
        for to in [mbox1, mbox2, mbox3] {
            expected.push((to, all(&log, &to)));
        }
        assert_eq!(expected[0].1.len(), 25);
        log.flush().expect("flush log");
        sled.flush().expect("flush sled");
    }
    let (_pg, opts) = testdb::db();
    let migrated = migrate(&config, &opts.url, false).expect("migrate");
    let count = |kind: &str| {
        migrated
            .copied
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, n)| *n)
            .expect("kind")
    };
    assert_eq!(count("accounts"), 4);
    assert_eq!(count("devices"), 5);
    assert_eq!(count("messages"), 25 + 5 + 12);
    assert_eq!(count("one-time keys"), 3);
    assert_eq!(migrated.mailboxes_verified, 3);
    assert!(migrated.peak_rss_kib.is_some());

    let pg = testdb::node(&opts, "after");
    // Accounts, days, tokens, deletion intents.
    let got = pg.get(&a).expect("get").expect("a");
    assert_eq!(got.identity_key, [10; 32]);
    assert_eq!(got.devices, vec![(d1, [11; 32]), (d2, [99; 32])]);
    let days = pg.days(&a).expect("days").expect("a");
    assert_eq!(days.created, Some(19_000));
    assert_eq!(days.of(d2).created, Some(19_001));
    assert_eq!(days.of(d2).last_seen, Some(19_005));
    assert_eq!(pg.days(&b).expect("days").expect("b").created, None);
    assert_eq!(pg.delivery_token(&a).expect("token"), Some([5; 32]));
    assert_eq!(pg.delivery_token(&b).expect("token"), None);
    assert_eq!(pg.deletions().expect("intents"), vec![(c, vec![d1])]);
    // Linked devices: the list, the removal intent, and no id handed out twice.
    assert_eq!(count("device lists"), 1);
    assert_eq!(pg.device_list(&a).expect("list"), Some(a_list()));
    assert_eq!(pg.device_list(&b).expect("list"), None);
    assert_eq!(pg.device_removals().expect("intents"), vec![addr(1, 3)]);
    assert_eq!(pg.last_device(&a).expect("mark"), Some(3));
    assert_eq!(
        pg.add_device(&a, &[97; 32], 19_010).expect("add"),
        DeviceId::new(4),
        "3 was used on the embedded store"
    );
    // Keys.
    let published = pg.published(&mbox1).expect("published");
    assert!(published.identity_dh);
    assert_eq!(published.signed_prekey_id, Some(2));
    assert_eq!(published.one_time, 2);
    let fetched = pg.fetch(&mbox1, true).expect("fetch").expect("keys");
    assert_eq!(fetched.identity_dh, signed(1, 1));
    assert_eq!(fetched.signed_prekey, signed(2, 2));
    assert_eq!(
        fetched.one_time,
        Some(OneTimeKey {
            id: 7,
            key: [7; 32]
        })
    );
    assert_eq!(pg.one_time_count(&mbox3).expect("count"), 1);
    // Discovery: tags, buckets, the detached number's bucket.
    let ra = pg.by_tag(&tag_a).expect("tag").expect("a's tag");
    assert_eq!(
        (ra.account, ra.key, ra.discoverable),
        (a, FilterKey(u64::MAX - 3), true)
    );
    assert_eq!(pg.of_account(&a).expect("of").map(|(t, _)| t), Some(tag_a));
    assert_eq!(
        pg.of_account(&b).expect("of"),
        None,
        "b detached its number"
    );
    assert_eq!(pg.bucket(&a).expect("bucket"), Some(1_234));
    assert_eq!(
        (
            pg.bucket(&b).expect("bucket"),
            pg.number_bucket(&tag_b).expect("nb")
        ),
        b_buckets
    );
    assert_eq!(pg.number_bucket(&tag_a).expect("nb"), Some(5_678));
    assert_eq!(pg.discoverable_keys().expect("keys"), vec![u64::MAX - 3]);
    // Blobs, charges, uploads.
    assert_eq!(pg.blob(&blob1).expect("blob").map(|m| m.size), Some(100));
    assert_eq!(
        pg.blob(&blob2).expect("blob").map(|m| m.last_used_at),
        Some(2_000)
    );
    assert_eq!(pg.charges_of(&a).expect("charges"), vec![(30_000, 100)]);
    assert_eq!(pg.account_bytes(&b, 0).expect("bytes"), 50);
    assert_eq!(
        pg.upload(&a, &[0x33; 32]).expect("upload"),
        Some(UploadMeta {
            size: 77,
            started_at: 3,
            touched_at: 4
        })
    );
    // Messages with their seqs (the gap too), ids and times; usage and totals.
    for (to, msgs) in &expected {
        assert_eq!(&all(&pg, to), msgs);
        assert_eq!(pg.usage(to).expect("usage").messages, msgs.len() as u64);
    }
    // The next append continues above every copied seq, in a mailbox with messages
    // and in one with none.
    let top = expected
        .iter()
        .flat_map(|(_, m)| m.iter().map(|m| m.seq))
        .max();
    let next = pg
        .append(&mbox1, &[env(1)], 1, u64::MAX / 4)
        .expect("append");
    assert!(Some(next[0]) > top, "{next:?} above {top:?}");
    let fresh = addr(4, 1);
    let next = pg
        .append(&fresh, &[env(2)], 1, u64::MAX / 4)
        .expect("append");
    assert!(Some(next[0]) > top, "{next:?} above {top:?}");

    // A second run is refused: the database holds accounts now.
    let again = migrate(&config, &opts.url, false);
    assert!(
        matches!(&again, Err(e) if e.to_string().contains("already holds")),
        "{again:?}"
    );
}

/// Shared bodies (stored once in the target, with their refs), key packages (the
/// pool in order, the last-resort one marked) and group epochs are copied.
#[test]
fn shared_bodies_key_packages_and_group_epochs_are_copied() {
    use crate::store::{
        GroupState, GroupStore, KeyPackageCounts, KeyPackageStore, SharedAppend, SharedEntry,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let (m1, m2, m3) = (addr(1, 1), addr(1, 2), addr(2, 1));
    let (body1, body2) = (Bytes::from(vec![0xB1; 3_000]), Bytes::from(vec![0xB2; 50]));
    let pkg = |i: u8| Bytes::from(vec![i; 100 + usize::from(i)]);
    let state = |epoch: u64, b: u8| GroupState {
        epoch,
        token_hash: [b; 32],
        last_commit_id: [b ^ 0xFF; 16],
        touched_day: 20_000 + epoch as u32,
    };
    let (h1, h2) = ([0x61; 16], [0x62; 16]);
    let mut expected: Vec<(DeviceAddress, Vec<StoredMessage>)> = Vec::new();
    let seqs1;
    {
        let sled = SledStore::open(&dir.path().join("db"), 1 << 20).expect("sled");
        let log =
            LogStore::open(&dir.path().join("mailboxes"), LogOptions::default()).expect("log");
        let at = SystemClock.now();
        let shared = |body: &Bytes, to: &[DeviceAddress], id: u8| {
            let entries: Vec<SharedEntry> = to
                .iter()
                .map(|a| SharedEntry {
                    to: *a,
                    part: Bytes::from(vec![id; a.device.get() as usize]),
                })
                .collect();
            log.append_shared(&SharedAppend {
                message_id: MessageId([id; 16]),
                body,
                entries: &entries,
                accepted_at: at,
                expires_at: at + 86_400_000,
            })
            .expect("append shared")
        };
        log.append(&m1, &[env(1)], at, at + 86_400_000)
            .expect("append");
        seqs1 = shared(&body1, &[m1, m2, m3], 7);
        shared(&body2, &[m1, m3], 8);
        log.append(&m3, &[env(2)], at, at + 86_400_000)
            .expect("append");
        for to in [m1, m2, m3] {
            expected.push((to, all(&log, &to)));
        }
        assert_eq!(log.shared_bodies(), 2);
        sled.publish_key_packages(&m1, &[pkg(1), pkg(2), pkg(3)], Some(&pkg(9)), false)
            .expect("publish");
        sled.publish_key_packages(&m3, &[], Some(&pkg(8)), false)
            .expect("publish");
        sled.publish_key_packages(&m2, &[pkg(4)], None, false)
            .expect("publish");
        sled.insert_group(&h1, &state(0, 1)).expect("group");
        sled.insert_group(&h2, &state(0, 2)).expect("group");
        assert!(sled
            .advance_group(&h2, &state(0, 2), &state(5, 3))
            .expect("advance"));
        log.flush().expect("flush log");
        sled.flush().expect("flush sled");
    }
    let (_pg, opts) = testdb::db();
    let migrated = migrate(&config, &opts.url, false).expect("migrate");
    let count = |kind: &str| {
        migrated
            .copied
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, n)| *n)
            .expect("kind")
    };
    assert_eq!(count("messages"), 7);
    assert_eq!(count("shared bodies"), 2);
    assert_eq!(count("key packages"), 4);
    assert_eq!(count("last-resort key packages"), 2);
    assert_eq!(count("group handles"), 2);
    assert_eq!(migrated.mailboxes_verified, 3);

    let pg = testdb::node(&opts, "after");
    // Each body once, its refs the entries copied; the entries read as before.
    let refs: Vec<(i64, i32)> = testdb::sql(
        &pg,
        "SELECT refs, octet_length(payload) FROM shared_bodies ORDER BY refs",
    )
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    assert_eq!(refs, vec![(2, 50), (3, 3_000)]);
    for (to, msgs) in &expected {
        assert_eq!(&all(&pg, to), msgs);
        let bytes: u64 = msgs.iter().map(StoredMessage::len).sum();
        assert_eq!(pg.usage(to).expect("usage").bytes, bytes);
    }
    let own: u64 = [env(1), env(2)]
        .iter()
        .map(|e| e.payload.len() as u64)
        .sum();
    assert_eq!(
        pg.totals().bytes,
        own + 3_000 + 50 + (1 + 2 + 1) + (1 + 1),
        "each body counted once"
    );
    // The body goes with its last entry's ack, on PostgreSQL now.
    for (to, seq) in [m1, m2, m3].iter().zip(&seqs1) {
        pg.remove(to, &[*seq]).expect("ack");
    }
    assert_eq!(pg.shared_bodies(), 1);
    // Key packages: the pool in order, then the last-resort one, kept.
    for i in 1..=3 {
        let got = pg.take_key_package(&m1, true).expect("take").expect("one");
        assert_eq!((got.key_package, got.last_resort), (pkg(i), false));
    }
    let got = pg.take_key_package(&m1, true).expect("take").expect("one");
    assert_eq!((got.key_package, got.last_resort), (pkg(9), true));
    assert_eq!(
        pg.key_package_counts(&m3).expect("counts"),
        KeyPackageCounts {
            one_time: 0,
            last_resort: true
        }
    );
    assert_eq!(
        pg.key_package_counts(&m2).expect("counts"),
        KeyPackageCounts {
            one_time: 1,
            last_resort: false
        }
    );
    // Group epochs: epoch, token hash, last commit id and day.
    assert_eq!(pg.group(&h1).expect("group"), Some(state(0, 1)));
    assert_eq!(pg.group(&h2).expect("group"), Some(state(5, 3)));
    assert_eq!(pg.groups_after(None, 10).expect("list").len(), 2);
}

/// A body some of whose entries were acked in the source is copied with refs = the
/// entries left (fewer than it was sent with), and goes with the last of them.
#[test]
fn a_body_partly_acked_in_the_source_is_copied_with_the_entries_left() {
    use crate::store::{SharedAppend, SharedEntry};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let to = [addr(3, 1), addr(3, 2), addr(4, 1), addr(4, 2)];
    let body = Bytes::from(vec![0xB9; 2_000]);
    let seqs;
    {
        let _sled = SledStore::open(&dir.path().join("db"), 1 << 20).expect("sled");
        let log =
            LogStore::open(&dir.path().join("mailboxes"), LogOptions::default()).expect("log");
        let at = SystemClock.now();
        let entries: Vec<SharedEntry> = to
            .iter()
            .map(|a| SharedEntry {
                to: *a,
                part: Bytes::from_static(b"pp"),
            })
            .collect();
        seqs = log
            .append_shared(&SharedAppend {
                message_id: MessageId([9; 16]),
                body: &body,
                entries: &entries,
                accepted_at: at,
                expires_at: at + 86_400_000,
            })
            .expect("append shared");
        // Two of the four acked before the move.
        log.remove(&to[0], &[seqs[0]]).expect("ack");
        log.remove(&to[2], &[seqs[2]]).expect("ack");
        log.settle().expect("settle");
        log.flush().expect("flush");
    }
    let (_pg, opts) = testdb::db();
    let migrated = migrate(&config, &opts.url, false).expect("migrate");
    assert!(migrated
        .copied
        .iter()
        .any(|(k, n)| *k == "shared bodies" && *n == 1));
    let pg = testdb::node(&opts, "after");
    let refs: Vec<i64> = testdb::sql(&pg, "SELECT refs FROM shared_bodies")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(refs, vec![2], "the entries left, not the four sent");
    for (i, of) in to.iter().enumerate() {
        let read = all(&pg, of);
        assert_eq!(read.len(), usize::from(i % 2 == 1), "mailbox {i}");
        if let Some(m) = read.first() {
            assert_eq!(m.shared_body.as_deref(), Some(&body[..]));
        }
    }
    assert_eq!(pg.totals().bytes, 2_000 + 2 * 2, "the body once, two parts");
    pg.remove(&to[1], &[seqs[1]]).expect("ack");
    assert_eq!(pg.shared_bodies(), 1, "one entry still holds it");
    pg.remove(&to[3], &[seqs[3]]).expect("ack");
    assert_eq!(pg.shared_bodies(), 0, "gone with the last entry left");
    assert_eq!(pg.totals().bytes, 0);
}
