//! Accounts, keys and the blob index on a real PostgreSQL: the conformance rules the
//! embedded stores pass, and what only several nodes on one database can break.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use tern_proto::{AccountId, DeviceAddress, DeviceId};

use crate::store::conformance;
use crate::store::pg::testdb::{db, node};
use crate::store::pg::PgBackend;
use crate::store::{
    AccountRecord, AccountStore, BlobIndex, BlobMeta, FetchedKeys, KeyStore, OneTimeKey, Published,
    SignedKey, StoreError, StoreResult,
};

#[test]
fn conformance_on_postgres() {
    let (_pg, opts) = db();
    let store = node(&opts, "a");
    // The order of the embedded stores' conformance test: the rules share ids.
    conformance::account_rules(&store);
    conformance::day_rules(&store);
    conformance::key_rules(&store);
    conformance::key_account_rules(&store);
    conformance::blob_rules(&store);
    conformance::deletion_rules(&store);
    conformance::device_rules(&store);
    schema_holds_only_what_the_traits_gave(&store);
}

/// The tables this package made, with each column's type: ids, keys and hashes as
/// bytea, numbers as bigint. No text column anywhere (no IP, no number, no name).
fn schema_holds_only_what_the_traits_gave(store: &PgBackend) {
    let expected: BTreeMap<&str, &[(&str, &str)]> = BTreeMap::from([
        (
            "accounts",
            &[
                ("account", "bytea"),
                ("identity_key", "bytea"),
                ("created_day", "bigint"),
                ("last_device", "bigint"),
                ("device_list_version", "bigint"),
                ("device_list", "bytea"),
                ("device_list_signature", "bytea"),
            ][..],
        ),
        (
            "device_removals",
            &[("account", "bytea"), ("device", "bigint")][..],
        ),
        (
            "devices",
            &[
                ("account", "bytea"),
                ("device", "bigint"),
                ("device_key", "bytea"),
                ("created_day", "bigint"),
                ("seen_day", "bigint"),
            ][..],
        ),
        (
            "delivery_tokens",
            &[("account", "bytea"), ("token_hash", "bytea")][..],
        ),
        (
            "account_deletions",
            &[("account", "bytea"), ("devices", "ARRAY")][..],
        ),
        (
            "device_keys",
            &[
                ("account", "bytea"),
                ("device", "bigint"),
                ("identity_dh", "bytea"),
                ("signed_prekey", "bytea"),
            ][..],
        ),
        (
            "one_time_keys",
            &[
                ("account", "bytea"),
                ("device", "bigint"),
                ("key_id", "bigint"),
                ("key", "bytea"),
            ][..],
        ),
        (
            "blobs",
            &[
                ("blob_id", "bytea"),
                ("size", "bigint"),
                ("created_at", "bigint"),
                ("last_used_at", "bigint"),
                ("expires_at", "bigint"),
            ][..],
        ),
        (
            "blob_charges",
            &[("account", "bytea"), ("day", "bigint"), ("bytes", "bigint")][..],
        ),
        (
            "uploads",
            &[
                ("account", "bytea"),
                ("blob_id", "bytea"),
                ("size", "bigint"),
                ("started_at", "bigint"),
                ("touched_at", "bigint"),
            ][..],
        ),
    ]);
    store
        .run(async {
            let c = store.client().await?;
            let e = |e: tokio_postgres::Error| store.classify(&e);
            let mut rows = 0usize;
            for (table, columns) in &expected {
                let got = c
                    .query(
                        "SELECT column_name::text, data_type::text FROM information_schema.columns \
                         WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                        &[table],
                    )
                    .await
                    .map_err(e)?;
                let got: Vec<(String, String)> =
                    got.iter().map(|r| (r.get(0), r.get(1))).collect();
                let want: Vec<(String, String)> = columns
                    .iter()
                    .map(|(c, t)| (c.to_string(), t.to_string()))
                    .collect();
                assert_eq!(got, want, "columns of {table}");
                // Every value as stored: only bytea, bigint and bigint[] come back.
                for row in c
                    .query(&format!("SELECT * FROM {table}"), &[])
                    .await
                    .map_err(e)?
                {
                    rows += 1;
                    for column in row.columns() {
                        let t = column.type_();
                        assert!(
                            [
                                tokio_postgres::types::Type::BYTEA,
                                tokio_postgres::types::Type::INT8,
                                tokio_postgres::types::Type::INT8_ARRAY
                            ]
                            .contains(t),
                            "{table}.{} is {t}",
                            column.name()
                        );
                    }
                }
            }
            assert!(rows > 0, "the conformance run left rows to look at");
            Ok(())
        })
        .expect("schema");
}

#[test]
fn concurrent_fetches_on_one_node() {
    let (_pg, opts) = db();
    conformance::concurrent_fetches(Arc::new(node(&opts, "a")));
}

/// Two nodes on one database, calls alternating between them.
struct TwoNodes {
    nodes: [PgBackend; 2],
    next: AtomicUsize,
}

impl TwoNodes {
    fn pick(&self) -> &PgBackend {
        &self.nodes[self.next.fetch_add(1, Ordering::Relaxed) % 2]
    }
}

impl KeyStore for TwoNodes {
    fn publish(
        &self,
        of: &DeviceAddress,
        identity_dh: Option<&SignedKey>,
        signed_prekey: Option<&SignedKey>,
        one_time: &[OneTimeKey],
    ) -> StoreResult<u64> {
        self.pick()
            .publish(of, identity_dh, signed_prekey, one_time)
    }
    fn fetch(&self, of: &DeviceAddress, one_time: bool) -> StoreResult<Option<FetchedKeys>> {
        self.pick().fetch(of, one_time)
    }
    fn one_time_count(&self, of: &DeviceAddress) -> StoreResult<u64> {
        self.pick().one_time_count(of)
    }
    fn published(&self, of: &DeviceAddress) -> StoreResult<Published> {
        self.pick().published(of)
    }
    fn remove_device(&self, of: &DeviceAddress) -> StoreResult<()> {
        self.pick().remove_device(of)
    }
    fn remove_account_keys(&self, account: &AccountId) -> StoreResult<()> {
        self.pick().remove_account_keys(account)
    }
}

#[test]
fn concurrent_fetches_across_two_nodes() {
    let (_pg, opts) = db();
    let nodes = TwoNodes {
        nodes: [node(&opts, "a"), node(&opts, "b")],
        next: AtomicUsize::new(0),
    };
    conformance::concurrent_fetches(Arc::new(nodes));
}

#[test]
fn add_device_from_two_nodes_at_once() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let id = AccountId([40; 16]);
    a.create_on(
        &id,
        &AccountRecord {
            identity_key: [1; 32],
            devices: vec![(DeviceId::PRIMARY, [1; 32])],
        },
        Some(3),
    )
    .expect("create");
    const EACH: u8 = 8;
    let start = Barrier::new(2 * EACH as usize);
    let added: Vec<(u8, DeviceId)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2 * EACH)
            .map(|i| {
                let (start, on) = (&start, if i % 2 == 0 { &a } else { &b });
                s.spawn(move || {
                    start.wait();
                    let d = on
                        .add_device(&id, &[10 + i; 32], 4)
                        .expect("no error under contention")
                        .expect("account exists");
                    (i, d)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let mut ids: Vec<u32> = added.iter().map(|(_, d)| d.get()).collect();
    ids.sort_unstable();
    let want: Vec<u32> = (2..2 + 2 * u32::from(EACH)).collect();
    assert_eq!(ids, want, "distinct ids, none skipped");
    let rec = b.get(&id).expect("get").expect("account");
    assert_eq!(rec.devices.len(), 1 + 2 * EACH as usize);
    for (i, d) in &added {
        assert_eq!(rec.device_key(*d), Some(&[10 + i; 32]));
    }
    // The same key from both nodes at once: one device, one id for both.
    let key = [99; 32];
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| a.add_device(&id, &key, 5).expect("a"));
        let y = s.spawn(|| b.add_device(&id, &key, 5).expect("b"));
        (x.join().expect("a"), y.join().expect("b"))
    });
    assert_eq!(x, y);
    assert_eq!(
        a.get(&id).expect("get").expect("account").devices.len(),
        2 + 2 * EACH as usize
    );
}

#[test]
fn bad_values_are_typed_errors_never_panics() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let meta = BlobMeta {
        size: 1,
        created_at: 1,
        last_used_at: 1,
        expires_at: u64::MAX,
    };
    let err = a
        .insert_blob(&[1; 32], &meta, &AccountId([1; 16]))
        .expect_err("beyond a bigint");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert_eq!(
        a.blob(&[1; 32]).expect("blob"),
        None,
        "nothing half-written"
    );
    // An intent whose device list does not decode is returned with none, as in sled.
    crate::store::pg::testdb::execute(
        &a,
        "INSERT INTO account_deletions VALUES ($1, '{0, 5}')",
        &[&&[7u8; 16][..]],
    );
    assert_eq!(
        a.deletions().expect("deletions"),
        vec![(AccountId([7; 16]), vec![])]
    );
    // A record the trait could not have written is refused by the table.
    let short = a.run(async {
        let c = a.client().await?;
        c.execute(
            "INSERT INTO accounts (account, identity_key) VALUES ($1, $2)",
            &[&&[7u8; 15][..], &&[1u8; 32][..]],
        )
        .await
        .map_err(|e| a.classify(&e))
    });
    assert!(matches!(short, Err(StoreError::Backend(_))), "{short:?}");
}

#[test]
fn adding_and_removing_devices_from_two_nodes_at_once_never_reuses_an_id() {
    let (_pg, opts) = db();
    let (a, b) = (node(&opts, "a"), node(&opts, "b"));
    let id = AccountId([41; 16]);
    a.create_on(
        &id,
        &AccountRecord {
            identity_key: [1; 32],
            devices: vec![(DeviceId::PRIMARY, [1; 32])],
        },
        Some(3),
    )
    .expect("create");
    const THREADS: u8 = 12;
    const ROUNDS: u8 = 3;
    let start = Barrier::new(THREADS as usize);
    // Each thread adds a device and removes it again, on alternating nodes.
    let handed: Vec<u32> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let start = &start;
                let (on, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                s.spawn(move || {
                    start.wait();
                    let mut got = Vec::new();
                    for r in 0..ROUNDS {
                        let key = [100 + i * ROUNDS + r; 32];
                        let d = on
                            .add_device(&id, &key, 4)
                            .expect("no error under contention")
                            .expect("account exists");
                        assert!(other
                            .remove_device_record(&DeviceAddress {
                                account: id,
                                device: d
                            })
                            .expect("remove"));
                        got.push(d.get());
                    }
                    got
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect()
    });
    let mut sorted = handed.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), handed.len(), "an id was handed out twice");
    let total = u32::from(THREADS) * u32::from(ROUNDS);
    assert_eq!(sorted, (2..2 + total).collect::<Vec<_>>());
    assert_eq!(b.get(&id).expect("get").expect("account").devices.len(), 1);
    assert_eq!(
        a.add_device(&id, &[7; 32], 5).expect("add"),
        DeviceId::new(2 + total),
        "above every id ever used"
    );
}

#[test]
fn an_account_from_before_the_mark_keeps_its_highest_id_used() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let id = AccountId([42; 16]);
    let three = DeviceId::new(3).expect("id");
    // As stored before V11: devices, no mark.
    a.create_on(
        &id,
        &AccountRecord {
            identity_key: [1; 32],
            devices: vec![
                (DeviceId::PRIMARY, [1; 32]),
                (DeviceId::new(2).expect("id"), [2; 32]),
                (three, [3; 32]),
            ],
        },
        None,
    )
    .expect("create");
    assert_eq!(a.last_device(&id).expect("mark"), None);
    assert!(a
        .remove_device_record(&DeviceAddress {
            account: id,
            device: three
        })
        .expect("remove"));
    assert_eq!(a.last_device(&id).expect("mark"), Some(3));
    assert_eq!(
        a.add_device(&id, &[9; 32], 1).expect("add"),
        DeviceId::new(4)
    );
    // A version beyond a bigint is a typed error and changes nothing.
    let list = crate::store::StoredList {
        version: u64::MAX,
        list: vec![1; 10],
        signature: [1; 64],
    };
    let err = a.put_device_list(&id, &list).expect_err("beyond a bigint");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert_eq!(a.device_list(&id).expect("list"), None);
}

#[test]
fn the_idle_scan_uses_the_partial_index() {
    let (_pg, opts) = db();
    let a = node(&opts, "a");
    let plan = a
        .run(async {
            let c = a.client().await?;
            let e = |e: tokio_postgres::Error| a.classify(&e);
            c.batch_execute("SET enable_seqscan = off")
                .await
                .map_err(e)?;
            let rows = c
                .query(
                    "EXPLAIN SELECT account, device FROM devices WHERE device > 1 \
                     AND seen_day < 10 ORDER BY seen_day, account, device LIMIT 5",
                    &[],
                )
                .await
                .map_err(e)?;
            c.batch_execute("RESET enable_seqscan").await.map_err(e)?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
        .expect("explain");
    assert!(plan.contains("devices_idle"), "{plan}");
}
