//! Conformance rules of linked devices: ids never reused, device removal, signed
//! device lists, the idle scan, removal intents, and provisioning slots.

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use crate::store::*;

fn at(account: AccountId, device: DeviceId) -> DeviceAddress {
    DeviceAddress { account, device }
}

fn id(n: u32) -> DeviceId {
    DeviceId::new(n).expect("device id")
}

fn ids(store: &dyn AccountStore, account: &AccountId) -> Vec<u32> {
    let rec = store.get(account).expect("get").expect("account");
    rec.devices.iter().map(|(d, _)| d.get()).collect()
}

fn list(version: u64, b: u8) -> StoredList {
    StoredList {
        version,
        list: vec![b; 40 + usize::from(b)],
        signature: [b; 64],
    }
}

/// The device verbs of [`AccountStore`]. Uses accounts `[60..64; 16]` only, and
/// tolerates other rules' accounts in the same store.
pub(in crate::store) fn device_rules(store: &dyn AccountStore) {
    let (alice, bob) = (AccountId([60; 16]), AccountId([61; 16]));
    let rec = |b: u8| AccountRecord {
        identity_key: [b; 32],
        devices: vec![(DeviceId::PRIMARY, [b; 32])],
    };
    store.create_on(&alice, &rec(1), Some(100)).expect("create");
    store.create_on(&bob, &rec(2), Some(100)).expect("create");
    let add = |account: &AccountId, key: u8, day: u32| {
        store
            .add_device(account, &[key; 32], day)
            .expect("add")
            .expect("account exists")
            .get()
    };

    // Ids are never reused: not after removing the highest, nor the same key again.
    assert_eq!((add(&alice, 10, 100), add(&alice, 11, 100)), (2, 3));
    assert!(store
        .remove_device_record(&at(alice, id(3)))
        .expect("remove"));
    assert_eq!(add(&alice, 12, 101), 4, "3 stays used");
    assert!(store
        .remove_device_record(&at(alice, id(4)))
        .expect("remove"));
    assert!(store
        .remove_device_record(&at(alice, id(2)))
        .expect("remove"));
    assert_eq!(ids(store, &alice), vec![1]);
    assert_eq!(add(&alice, 11, 101), 5, "a removed key comes back new");
    assert_eq!(add(&alice, 11, 101), 5, "and is then found again");
    assert_eq!(add(&bob, 20, 100), 2, "per account");

    // Removal takes the one device row and its days, nothing else, never device 1.
    assert_eq!(add(&alice, 13, 102), 6);
    assert!(!store
        .remove_device_record(&at(alice, DeviceId::PRIMARY))
        .expect("primary"));
    assert!(!store
        .remove_device_record(&at(alice, id(3)))
        .expect("gone already"));
    assert!(!store
        .remove_device_record(&at(alice, id(99)))
        .expect("never was"));
    assert!(!store
        .remove_device_record(&at(AccountId([63; 16]), id(2)))
        .expect("no account"));
    assert!(store
        .remove_device_record(&at(alice, id(5)))
        .expect("remove"));
    let left = store.get(&alice).expect("get").expect("account");
    assert_eq!(
        left.devices,
        vec![(DeviceId::PRIMARY, [1; 32]), (id(6), [13; 32])]
    );
    let days = store.days(&alice).expect("days").expect("account");
    assert_eq!(
        days.devices
            .iter()
            .map(|(d, _)| d.get())
            .collect::<Vec<_>>(),
        vec![1, 6]
    );
    assert_eq!(days.of(id(6)), DeviceDays::new_on(Some(102)));
    assert_eq!(ids(store, &bob), vec![1, 2], "another account untouched");
    assert!(!store
        .touch_device(&at(alice, id(5)), 200)
        .expect("touch a removed device"));

    // Device lists: only newer versions, only for an account that exists.
    assert_eq!(store.device_list(&alice).expect("list"), None);
    assert_eq!(store.device_list_version(&alice).expect("version"), 0);
    assert!(!store
        .put_device_list(&AccountId([63; 16]), &list(1, 1))
        .expect("no account"));
    assert_eq!(store.device_list(&AccountId([63; 16])).expect("list"), None);
    assert!(!store.put_device_list(&alice, &list(0, 1)).expect("zero"));
    assert!(store.put_device_list(&alice, &list(1, 1)).expect("first"));
    assert_eq!(store.device_list(&alice).expect("list"), Some(list(1, 1)));
    assert!(!store.put_device_list(&alice, &list(1, 2)).expect("equal"));
    assert!(store.put_device_list(&alice, &list(3, 3)).expect("newer"));
    assert!(!store.put_device_list(&alice, &list(2, 2)).expect("older"));
    assert_eq!(store.device_list(&alice).expect("list"), Some(list(3, 3)));
    assert_eq!(store.device_list_version(&alice).expect("version"), 3);
    assert_eq!(
        store
            .device_list_version(&AccountId([63; 16]))
            .expect("none"),
        0
    );
    assert_eq!(store.device_list(&bob).expect("list"), None);

    // Idle: devices other than the primary last seen before the day; unknown days
    // (records older than days) never count.
    let carol = AccountId([62; 16]);
    store
        .create_on(
            &carol,
            &AccountRecord {
                identity_key: [3; 32],
                devices: vec![(DeviceId::PRIMARY, [3; 32]), (id(2), [4; 32])],
            },
            None,
        )
        .expect("create");
    let mine = |before: u32| -> Vec<DeviceAddress> {
        let mut v: Vec<DeviceAddress> = store
            .idle_devices(before, 10_000)
            .expect("idle")
            .into_iter()
            .filter(|a| [alice, bob, carol].contains(&a.account))
            .collect();
        v.sort_by_key(codec::addr_bytes);
        v
    };
    assert_eq!(mine(100), vec![]);
    assert_eq!(mine(101), vec![at(bob, id(2))]);
    assert_eq!(mine(103), vec![at(alice, id(6)), at(bob, id(2))]);
    assert!(store.touch_device(&at(bob, id(2)), 150).expect("touch"));
    assert!(store
        .touch_device(&at(alice, DeviceId::PRIMARY), 150)
        .expect("touch"));
    assert_eq!(mine(150), vec![at(alice, id(6))]);
    assert_eq!(store.idle_devices(103, 1).expect("idle").len(), 1, "max");
    assert_eq!(store.idle_devices(103, 0).expect("idle"), vec![]);

    // Removal intents.
    let intents = [at(alice, id(6)), at(bob, id(2)), at(alice, id(9))];
    for a in &intents {
        store.put_device_removal(a).expect("intent");
    }
    store.put_device_removal(&intents[0]).expect("idempotent");
    let mut got = store.device_removals().expect("intents");
    got.sort_by_key(codec::addr_bytes);
    let mut want = intents.to_vec();
    want.sort_by_key(codec::addr_bytes);
    assert_eq!(got, want);
    for a in &intents {
        store.remove_device_removal(a).expect("done");
    }
    store
        .remove_device_removal(&intents[0])
        .expect("idempotent");
    assert_eq!(store.device_removals().expect("intents"), vec![]);

    // The list goes with the account; a new account on the id starts afresh.
    store
        .remove_account(&alice)
        .expect("remove")
        .expect("was there");
    assert_eq!(store.device_list(&alice).expect("list"), None);
    assert!(!store.put_device_list(&alice, &list(9, 9)).expect("gone"));
    store.create_on(&alice, &rec(1), Some(300)).expect("again");
    assert_eq!(store.device_list(&alice).expect("list"), None);
    assert!(store.put_device_list(&alice, &list(1, 4)).expect("first"));
}

/// Provisioning slots: bounded opens, a single deposit, a single take by the reader,
/// nothing after expiry, the sweep, and forgetting an account's deposits. Starts from
/// an empty store.
pub(in crate::store) fn slot_rules(store: &dyn ProvisioningStore) {
    let (reader, stranger) = ([1u8; 32], [2u8; 32]);
    let alice = AccountId([64; 16]);
    let two = id(2);
    let slot = |b: u8| [b; 16];
    let payload = vec![7u8; 1000];
    let open = |b: u8, expires: u64, now: u64, max: usize| {
        store
            .open(&slot(b), &reader, expires, now, max)
            .expect("open")
    };
    let take = |b: u8, r: &[u8; 32], now: u64| store.take(&slot(b), r, now).expect("take");

    assert_eq!(open(1, 1_000, 0, 3), SlotOpen::Opened);
    assert_eq!(
        store.open(&slot(1), &stranger, 1_000, 0, 3).expect("open"),
        SlotOpen::Exists
    );
    assert_eq!(take(1, &reader, 10), SlotTake::Pending);
    assert_eq!(take(1, &stranger, 10), SlotTake::Missing);
    assert_eq!(take(9, &reader, 10), SlotTake::Missing);
    let deposit = |b: u8, to: &AccountId, bytes: &[u8], now: u64| {
        store
            .deposit(&slot(b), to, two, bytes, now)
            .expect("deposit")
    };
    assert!(!deposit(9, &alice, &payload, 10), "unknown");
    assert!(deposit(1, &alice, &payload, 10));
    assert!(!deposit(1, &alice, b"other", 10), "single use");
    assert_eq!(
        take(1, &stranger, 11),
        SlotTake::Missing,
        "the wrong reader learns nothing, and takes nothing"
    );
    assert_eq!(take(1, &reader, 11), SlotTake::Payload(payload.clone()));
    assert_eq!(take(1, &reader, 11), SlotTake::Missing, "taken once");
    assert!(!deposit(1, &alice, &payload, 11), "taken");

    // Expiry: nothing is deposited or taken at or after it.
    assert_eq!(open(2, 100, 0, 3), SlotOpen::Opened);
    assert_eq!(open(3, 100, 0, 3), SlotOpen::Opened);
    assert!(!deposit(2, &alice, &payload, 100), "expired");
    assert!(deposit(3, &alice, &payload, 99));
    assert_eq!(take(3, &reader, 100), SlotTake::Missing);
    assert_eq!(take(2, &reader, 100), SlotTake::Missing);

    // The bound counts live slots: 2 and 3 have expired, 4 to 6 fill it (and an
    // open that finds the store full drops the expired ones).
    for b in 4..=6 {
        assert_eq!(open(b, 1_000, 100, 3), SlotOpen::Opened);
    }
    assert_eq!(open(7, 1_000, 100, 3), SlotOpen::Full);
    assert_eq!(open(7, 1_000, 999, 3), SlotOpen::Full);
    // An expired slot's id opens afresh, empty.
    assert_eq!(open(3, 1_000, 100, 4), SlotOpen::Opened);
    assert_eq!(take(3, &reader, 101), SlotTake::Pending);
    // The sweep deletes expired slots, at most `max` a call.
    assert_eq!(store.sweep(1_000, 2).expect("sweep"), 2);
    assert_eq!(store.sweep(1_000, 10).expect("sweep"), 2, "the rest");
    assert_eq!(store.sweep(1_000, 10).expect("sweep"), 0);
    assert_eq!(take(4, &reader, 1_000), SlotTake::Missing);

    // An account's deposits go with it (P7); another's stay.
    let bob = AccountId([65; 16]);
    assert_eq!(open(4, 2_000, 1_000, 3), SlotOpen::Opened);
    assert_eq!(open(5, 2_000, 1_000, 3), SlotOpen::Opened);
    assert!(deposit(4, &alice, &payload, 1_001));
    assert!(deposit(5, &bob, &payload, 1_001));
    store.forget_account(&alice).expect("forget");
    assert_eq!(take(4, &reader, 1_002), SlotTake::Missing);
    assert_eq!(take(5, &reader, 1_002), SlotTake::Payload(payload));
}
