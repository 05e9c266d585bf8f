//! More store rules: account days, account-wide key removal, a purge without reads.

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use super::{addr, msg};
use crate::store::*;

/// Created and last-seen days: stamped at creation and at an added device, moved
/// on at most once per day, gone with the account.
pub(in crate::store) fn day_rules(store: &dyn AccountStore) {
    let id = AccountId([21; 16]);
    let rec = AccountRecord {
        identity_key: [1; 32],
        devices: vec![(DeviceId::PRIMARY, [2; 32])],
    };
    assert_eq!(store.days(&id).expect("days"), None);
    store.create_on(&id, &rec, Some(10)).expect("create");
    let primary = DeviceDays {
        created: Some(10),
        last_seen: Some(10),
    };
    let days = store.days(&id).expect("days").expect("account");
    assert_eq!(days.created, Some(10));
    assert_eq!(days.devices, vec![(DeviceId::PRIMARY, primary)]);
    let second = store
        .add_device(&id, &[3; 32], 12)
        .expect("add")
        .expect("account exists");
    let a = DeviceAddress {
        account: id,
        device: DeviceId::PRIMARY,
    };
    assert!(!store.touch_device(&a, 10).expect("touch"), "seen today");
    assert!(!store.touch_device(&a, 9).expect("touch"), "never back");
    assert!(store.touch_device(&a, 13).expect("touch"), "a new day");
    assert!(!store.touch_device(&a, 13).expect("touch"), "once a day");
    let days = store.days(&id).expect("days").expect("account");
    assert_eq!(
        days.devices,
        vec![
            (
                DeviceId::PRIMARY,
                DeviceDays {
                    created: Some(10),
                    last_seen: Some(13)
                }
            ),
            (
                second,
                DeviceDays {
                    created: Some(12),
                    last_seen: Some(12)
                }
            ),
        ]
    );
    assert_eq!(
        store.get(&id).expect("get").map(|r| r.devices.len()),
        Some(2)
    );
    // Unknown devices and accounts: nothing to touch.
    let ghost = DeviceAddress {
        account: id,
        device: DeviceId::new(9).expect("id"),
    };
    assert!(!store.touch_device(&ghost, 14).expect("touch"));
    let nobody = DeviceAddress {
        account: AccountId([22; 16]),
        device: DeviceId::PRIMARY,
    };
    assert!(!store.touch_device(&nobody, 14).expect("touch"));
    assert_eq!(store.days(&nobody.account).expect("days"), None);
    // `create` without a day: unknown, until a touch gives the last-seen day.
    let plain = AccountId([23; 16]);
    store.create(&plain, &rec).expect("create");
    let unknown = store.days(&plain).expect("days").expect("account");
    assert_eq!(unknown.created, None);
    assert_eq!(unknown.devices[0].1, DeviceDays::default());
    let p = DeviceAddress {
        account: plain,
        device: DeviceId::PRIMARY,
    };
    assert!(store.touch_device(&p, 5).expect("touch"));
    let touched = store.days(&plain).expect("days").expect("account");
    assert_eq!(
        touched.devices[0].1,
        DeviceDays {
            created: None,
            last_seen: Some(5)
        },
        "a touch never invents a created day"
    );
    store.remove_account(&id).expect("remove");
    assert_eq!(store.days(&id).expect("days"), None);
}

/// `remove_account` deletes every key under the account, of any device (also one
/// that no record or intent names), and nothing of another account.
pub(in crate::store) fn key_account_rules(store: &dyn KeyStore) {
    let signed = |id: u32| SignedKey {
        id,
        key: [id as u8; 32],
        signature: [0; 64],
    };
    let otks = [OneTimeKey {
        id: 1,
        key: [5; 32],
    }];
    let mine = [addr(31, 1), addr(31, 2), addr(31, 77)];
    let (before, after) = (addr(30, 1), addr(32, 1));
    for a in mine.iter().chain([&before, &after]) {
        store
            .publish(a, Some(&signed(1)), Some(&signed(2)), &otks)
            .expect("publish");
    }
    store
        .remove_account_keys(&AccountId([31; 16]))
        .expect("remove account keys");
    for a in &mine {
        assert_eq!(store.published(a).expect("published"), Published::default());
        assert_eq!(store.fetch(a, true).expect("fetch"), None);
    }
    for a in [&before, &after] {
        assert_eq!(store.published(a).expect("published").one_time, 1);
    }
    store
        .remove_account_keys(&AccountId([31; 16]))
        .expect("idempotent");
}

/// A mailbox store whose reads fail: the purge must get by with seqs.
struct NoPayloads(MemoryStore);

impl Flush for NoPayloads {
    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

impl MailboxStore for NoPayloads {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[Envelope],
        accepted_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<Vec<u64>> {
        self.0.append(to, msgs, accepted_at, expires_at)
    }
    fn append_shared(&self, append: &crate::store::SharedAppend<'_>) -> StoreResult<Vec<u64>> {
        self.0.append_shared(append)
    }
    fn read(&self, _: &DeviceAddress, _: u64, _: usize) -> StoreResult<Vec<StoredMessage>> {
        Err(StoreError::Backend("payloads read".into()))
    }
    fn seqs(&self, of: &DeviceAddress, after: u64, max: usize) -> StoreResult<Vec<u64>> {
        self.0.seqs(of, after, max)
    }
    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> StoreResult<Usage> {
        assert!(seqs.len() <= PURGE_PAGE, "a bounded page");
        self.0.remove(of, seqs)
    }
    fn usage(&self, of: &DeviceAddress) -> StoreResult<Usage> {
        self.0.usage(of)
    }
    fn totals(&self) -> Totals {
        self.0.totals()
    }
    fn expired(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<Expired>> {
        self.0.expired(now, max)
    }
    fn expire(&self, of: &DeviceAddress, entries: &[Expired]) -> StoreResult<Usage> {
        self.0.expire(of, entries)
    }
}

#[test]
fn a_purge_reads_no_payload_and_removes_in_bounded_pages() {
    let store = NoPayloads(MemoryStore::new());
    let a = addr(40, 1);
    let many: Vec<Envelope> = (0..=255u8).map(|i| msg(i, 2)).collect();
    for _ in 0..9 {
        store.append(&a, &many, 1_000, 9_000).expect("append");
    }
    assert_eq!(
        store.purge(&a).expect("purge"),
        Usage {
            messages: 9 * 256,
            bytes: 9 * 512
        }
    );
    assert_eq!(store.usage(&a).expect("usage"), Usage::default());
}
