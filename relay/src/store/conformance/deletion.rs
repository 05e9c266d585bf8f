//! Conformance rules of account deletion's store verbs and the mailbox purge.

use super::*;

/// Account deletion's store verbs: each removes what belongs to the account and
/// nothing of another's.
pub(in crate::store) fn deletion_rules(store: &(impl AccountStore + KeyStore + BlobIndex)) {
    let (alice, bob) = (AccountId([21; 16]), AccountId([22; 16]));
    let rec = |b: u8| AccountRecord {
        identity_key: [b; 32],
        devices: vec![(DeviceId::PRIMARY, [b; 32])],
    };
    for (id, b) in [(alice, 1), (bob, 2)] {
        store.create(&id, &rec(b)).expect("create");
        store.set_delivery_token(&id, &[b; 32]).expect("token");
    }
    assert_eq!(store.remove_account(&alice).expect("remove"), Some(rec(1)));
    assert_eq!(store.get(&alice).expect("get"), None);
    assert_eq!(store.delivery_token(&alice).expect("token"), None);
    assert_eq!(
        store.remove_account(&alice).expect("again"),
        None,
        "idempotent"
    );
    assert_eq!(store.get(&bob).expect("get"), Some(rec(2)));
    assert_eq!(store.delivery_token(&bob).expect("token"), Some([2; 32]));
    store.create(&alice, &rec(3)).expect("the id is free again");

    // Deletion intents.
    assert!(store.deletions().expect("intents").is_empty());
    let devices = [DeviceId::PRIMARY, DeviceId::new(3).expect("id")];
    store.put_deletion(&alice, &devices[..1]).expect("intent");
    store.put_deletion(&alice, &devices).expect("replaced");
    store.put_deletion(&bob, &[]).expect("intent");
    let mut intents = store.deletions().expect("intents");
    intents.sort();
    assert_eq!(intents, vec![(alice, devices.to_vec()), (bob, vec![])]);
    store.remove_deletion(&alice).expect("done");
    store.remove_deletion(&bob).expect("done");
    store.remove_deletion(&bob).expect("idempotent");
    assert!(store.deletions().expect("intents").is_empty());

    // Keys: published counts, then removal of one device's keys only.
    let (a1, a2) = (addr(21, 1), addr(22, 1));
    let signed = |id: u32| SignedKey {
        id,
        key: [id as u8; 32],
        signature: [1; 64],
    };
    let otks: Vec<OneTimeKey> = (0..3).map(|id| OneTimeKey { id, key: [9; 32] }).collect();
    assert_eq!(
        store.published(&a1).expect("published"),
        Published::default()
    );
    for a in [a1, a2] {
        store
            .publish(&a, Some(&signed(1)), Some(&signed(7)), &otks)
            .expect("publish");
    }
    assert_eq!(
        store.published(&a1).expect("published"),
        Published {
            identity_dh: true,
            signed_prekey_id: Some(7),
            one_time: 3
        }
    );
    store.remove_device(&a1).expect("remove keys");
    assert_eq!(
        store.published(&a1).expect("published"),
        Published::default()
    );
    assert_eq!(store.fetch(&a1, true).expect("fetch"), None);
    store.remove_device(&a1).expect("idempotent");
    assert_eq!(store.published(&a2).expect("published").one_time, 3);

    // Media: charges and uploads go; blobs (naming no one) and others' stay.
    let day = 20_000;
    let noon = day * DAY_MS + DAY_MS / 2;
    let meta = |size, days| BlobMeta {
        size,
        created_at: noon,
        last_used_at: noon,
        expires_at: noon + days * DAY_MS,
    };
    let upload = UploadMeta {
        size: 5,
        started_at: noon,
        touched_at: noon,
    };
    store
        .insert_blob(&[1; 32], &meta(10, 1), &alice)
        .expect("blob");
    store
        .insert_blob(&[2; 32], &meta(20, 3), &alice)
        .expect("blob");
    store
        .insert_blob(&[3; 32], &meta(30, 1), &bob)
        .expect("blob");
    store.put_upload(&alice, &[4; 32], &upload).expect("upload");
    store.put_upload(&alice, &[5; 32], &upload).expect("upload");
    store.put_upload(&bob, &[6; 32], &upload).expect("upload");
    assert_eq!(
        store.charges_of(&alice).expect("charges"),
        vec![(day + 1, 10), (day + 3, 20)]
    );
    let mut gone = store.remove_account_media(&alice).expect("remove account");
    gone.sort_unstable();
    assert_eq!(gone, vec![[4; 32], [5; 32]]);
    assert!(store.charges_of(&alice).expect("charges").is_empty());
    assert_eq!(store.account_bytes(&alice, noon).expect("bytes"), 0);
    assert!(store.uploads_of(&alice).expect("uploads").is_empty());
    assert!(store
        .remove_account_media(&alice)
        .expect("again")
        .is_empty());
    // Its charges' expiry entries went with them: expiring finds only bob's.
    assert_eq!(
        store
            .expire_charges(noon + 10 * DAY_MS, 100)
            .expect("expire"),
        1
    );
    assert!(store.blob(&[1; 32]).expect("blob").is_some(), "blobs stay");
    assert!(store.blob(&[2; 32]).expect("blob").is_some(), "blobs stay");
    assert_eq!(store.uploads_of(&bob).expect("uploads"), vec![([6; 32], 5)]);
}

/// Purge empties one mailbox and leaves the others.
pub(in crate::store) fn purge_rules(store: &dyn MailboxStore) {
    let (a, a2, b) = (addr(31, 1), addr(31, 2), addr(32, 1));
    let before = store.totals();
    let many: Vec<Envelope> = (0..50).map(|i| msg(i, 3)).collect();
    for _ in 0..3 {
        store.append(&a, &many, 1_000, 9_000).expect("append");
    }
    store
        .append(&a2, &[msg(1, 7)], 1_000, 9_000)
        .expect("append");
    store
        .append(&b, &[msg(2, 11)], 1_000, 9_000)
        .expect("append");
    assert_eq!(
        store.purge(&a).expect("purge"),
        Usage {
            messages: 150,
            bytes: 450
        }
    );
    assert!(store.read(&a, 0, 1_000).expect("read").is_empty());
    assert_eq!(store.usage(&a).expect("usage"), Usage::default());
    assert_eq!(store.purge(&a).expect("again"), Usage::default());
    assert_eq!(store.read(&a2, 0, 10).expect("read").len(), 1);
    // `seqs` lists what `read` reads, in pages, never across mailboxes.
    let listed = store.seqs(&a2, 0, 10).expect("seqs");
    assert_eq!(listed, vec![store.read(&a2, 0, 1).expect("read")[0].seq]);
    assert!(store.seqs(&a2, listed[0], 10).expect("seqs").is_empty());
    assert!(store.seqs(&a2, u64::MAX, 10).expect("seqs").is_empty());
    // A mailbox of more than two purge pages.
    let big = addr(33, 1);
    let one: Vec<Envelope> = (0..=255u8).map(|i| msg(i, 1)).collect();
    let pages = 2 * PURGE_PAGE / one.len() + 1;
    for _ in 0..pages {
        store.append(&big, &one, 1_000, 9_000).expect("append");
    }
    let n = (pages * one.len()) as u64;
    let seqs = store.seqs(&big, 0, 3).expect("seqs");
    let read: Vec<u64> = store
        .read(&big, 0, 3)
        .expect("read")
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, read);
    assert_eq!(
        store.purge(&big).expect("purge"),
        Usage {
            messages: n,
            bytes: n
        }
    );
    assert!(store.seqs(&big, 0, 10).expect("seqs").is_empty());
    assert_eq!(store.read(&b, 0, 10).expect("read").len(), 1);
    let after = store.totals();
    assert_eq!(after.messages, before.messages + 2);
    assert_eq!(after.bytes, before.bytes + 18);
    assert!(store
        .expired(10_000, 1_000)
        .expect("expired")
        .iter()
        .all(|e| e.to != a));
}
