use serde_json::Value;
use tern_proto::DeviceAddress;

use super::*;
use crate::deletion::tests::{fill, world};
use sha2::{Digest, Sha256};

use crate::deletion::tests::TOKEN;
use crate::store::{AccountStore, BlobIndex, MailboxStore, TagRecord, DAY_MS};
use tern_proto::discovery::{FilterKey, Tag};

fn schema() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA_V1).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("a valid JSON Schema")
}

/// When the tests export: day 3, noon.
const NOW: u64 = 3 * DAY_MS + DAY_MS / 2;

fn export(stores: &Stores, account: &AccountId, options: ExportOptions) -> Value {
    export_live(stores, account, options, Live::default())
}

fn export_live(stores: &Stores, account: &AccountId, options: ExportOptions, live: Live) -> Value {
    let mut out = Vec::new();
    write_with(stores, account, NOW, options, live, &mut out).expect("export");
    serde_json::from_slice(&out).expect("JSON")
}

/// Gives `account` a discovery tag verified on day 2, and its buckets.
fn discoverable(stores: &Stores, account: &AccountId, account_tat: u64, number_tat: u64) -> Tag {
    let tag = Tag([0xab; 16]);
    let rec = TagRecord {
        account: *account,
        key: FilterKey(7),
        discoverable: false,
        verified_at: 2 * DAY_MS,
    };
    stores
        .discovery
        .attach(account, &tag, &rec)
        .expect("attach");
    stores
        .discovery
        .set_buckets(account, account_tat, &tag, number_tat)
        .expect("buckets");
    tag
}

fn valid(v: &Value) {
    let validator = schema();
    let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn an_export_holds_every_stored_item_and_matches_the_schema() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let stores = w.f.services.stores();
    // Registered on day 0; the first device signs in again on day 3.
    w.f.clock
        .advance(std::time::Duration::from_millis(3 * DAY_MS));
    let exporter = [2u8; 32];
    let proof = ed25519_dalek::Signer::sign(
        &ed25519_dalek::SigningKey::from_bytes(&[102; 32]),
        &tern_proto::auth::session_proof(&exporter),
    )
    .to_bytes();
    w.f.services
        .accounts()
        .authenticate(*bob.address(), &exporter, &proof)
        .expect("authenticate");
    // A push target on the first device: exported whole (the user's own data).
    let push = tern_proto::PushTarget::Gateway {
        url: "https://gw.example/wake".into(),
        device_token: "bob-token".into(),
    };
    let first = DeviceAddress {
        account,
        device: tern_proto::DeviceId::PRIMARY,
    };
    stores
        .push
        .put_push_target(&first, &push)
        .expect("push target");
    let v = export(stores, &account, ExportOptions::default());
    let devs = &v["account"]["devices"];
    assert_eq!(
        devs[0]["push_target"],
        serde_json::json!({"kind": "gateway", "url": "https://gw.example/wake", "device_token": "bob-token"})
    );
    assert_eq!(
        devs[1]["push_target"],
        serde_json::json!({"kind": "unified_push", "endpoint": "https://up.example/bob2"})
    );
    valid(&v);
    assert_eq!(v["account"]["created_day"], 0);
    let days = |d: &Value| (d["created_day"].clone(), d["last_seen_day"].clone());
    let devs = &v["account"]["devices"];
    assert_eq!(days(&devs[0]), (Value::from(0), Value::from(3)));
    assert_eq!(days(&devs[1]), (Value::from(0), Value::from(0)));
    assert_eq!(v["schema"], EXPORT_SCHEMA);
    assert_eq!(v["version"], EXPORT_VERSION);
    let acct = &v["account"];
    assert_eq!(acct["id"], hex(account.as_bytes()));
    assert_eq!(acct["delivery_token_set"], true);
    let record = AccountStore::get(w.f.store.as_ref(), &account)
        .expect("get")
        .expect("bob");
    assert_eq!(acct["identity_key"], b64(&record.identity_key));
    let devices = acct["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), record.devices.len());
    for (d, (id, key)) in devices.iter().zip(&record.devices) {
        assert_eq!(d["id"], id.get());
        assert_eq!(d["key"], b64(key));
        let addr = DeviceAddress {
            account,
            device: *id,
        };
        let stored = w.f.store.read(&addr, 0, 100).expect("read");
        let items = d["queue"]["items"].as_array().expect("items");
        assert_eq!(d["queue"]["messages"], stored.len() as u64);
        assert_eq!(items.len(), stored.len());
        for (item, m) in items.iter().zip(&stored) {
            assert_eq!(item["seq"], m.seq.to_string(), "a decimal string");
            assert_eq!(item["message_id"], hex(m.message_id.as_bytes()));
            assert_eq!(item["bytes"], m.payload.len() as u64);
            assert!(item.get("ciphertext").is_none(), "not asked for");
        }
    }
    // Bob's first device published keys (4 one-time prekeys), the second did not.
    assert_eq!(devices[0]["queue"]["messages"], 3);
    assert_eq!(devices[1]["queue"]["messages"], 2);
    assert_eq!(
        devices[0]["prekeys"],
        serde_json::json!({"identity_dh": true, "signed_prekey_id": 1, "one_time": 4})
    );
    assert_eq!(
        devices[1]["prekeys"],
        serde_json::json!({"identity_dh": false, "signed_prekey_id": null, "one_time": 0})
    );
    // MLS key packages as counts: two each, a last resort on the second.
    assert_eq!(
        devices[0]["key_packages"],
        serde_json::json!({"one_time": 2, "last_resort": false})
    );
    assert_eq!(
        devices[1]["key_packages"],
        serde_json::json!({"one_time": 2, "last_resort": true})
    );
    let media = &v["media"];
    let charged: u64 =
        w.f.store
            .charges_of(&account)
            .expect("charges")
            .iter()
            .map(|(_, b)| b)
            .sum();
    assert!(charged > 0);
    assert_eq!(media["charges"][0]["bytes"], charged);
    assert_eq!(
        media["uploads_in_progress"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(media["uploads_in_progress"][0]["size"], 100);
    assert_eq!(media["owned_blobs"], serde_json::json!([]));
    assert_eq!(v["discovery"], Value::Null, "no tag");
    assert_eq!(
        v["verification"],
        serde_json::json!({"verified_at_day": null, "pending": false, "session": null})
    );
    assert_eq!(
        v["rate_limits"]["discovery_evaluations"],
        serde_json::json!({"account_full_at_ms": null, "number_full_at_ms": null})
    );
    let text = v.to_string();
    let hash: [u8; 32] = Sha256::digest(TOKEN).into();
    for secret in [&TOKEN, &hash] {
        assert!(!text.contains(&hex(secret)) && !text.contains(&b64(secret)));
    }
}

#[tokio::test]
async fn ciphertexts_are_in_only_when_asked_for_and_match() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let stores = w.f.services.stores();
    let v = export(
        stores,
        &bob.address().account,
        ExportOptions {
            include_ciphertexts: true,
        },
    );
    valid(&v);
    let items = &v["account"]["devices"][0]["queue"]["items"];
    let stored = w.f.store.read(bob.address(), 0, 100).expect("read");
    assert_eq!(items.as_array().map(Vec::len), Some(stored.len()));
    for (item, m) in items.as_array().into_iter().flatten().zip(&stored) {
        assert_eq!(item["ciphertext"], b64(&m.payload));
    }
}

#[tokio::test]
async fn the_discovery_tag_setting_buckets_and_verification_are_exported() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let stores = w.f.services.stores();
    // The account's bucket refills after the export; its number's already has.
    let tag = discoverable(stores, &account, NOW + 5_000, NOW - 1);
    let pending = |a: &AccountId| (*a == account).then_some((NOW + 600_000, 4));
    let v = export_live(
        stores,
        &account,
        ExportOptions::default(),
        Live {
            verification_pending: Some(&pending),
        },
    );
    valid(&v);
    assert_eq!(
        v["discovery"],
        serde_json::json!({"tag": hex(&tag.0), "discoverable": false, "verified_at_day": 2})
    );
    assert_eq!(
        v["verification"],
        serde_json::json!({"verified_at_day": 2, "pending": true,
            "session": {"expires_at_ms": NOW + 600_000, "attempts_left": 4}})
    );
    assert_eq!(
        v["rate_limits"]["discovery_evaluations"],
        serde_json::json!({"account_full_at_ms": NOW + 5_000, "number_full_at_ms": null})
    );
    stores
        .discovery
        .set_discoverable(&account, true)
        .expect("on");
    let v = export(stores, &account, ExportOptions::default());
    assert_eq!(v["discovery"]["discoverable"], true);
    assert_eq!(v["verification"]["pending"], false, "no sessions given");
}

#[test]
fn the_schema_is_version_1_and_refuses_what_it_does_not_name() {
    let raw: Value = serde_json::from_str(SCHEMA_V1).expect("JSON");
    assert_eq!(raw["properties"]["version"]["const"], EXPORT_VERSION);
    assert_eq!(raw["properties"]["schema"]["const"], EXPORT_SCHEMA);
    let mut doc = serde_json::json!({
        "schema": EXPORT_SCHEMA, "version": 1, "generated_at_ms": 5,
        "account": {"id": "00".repeat(16), "identity_key": b64(&[1; 32]),
            "created_day": null, "delivery_token_set": false, "devices": []},
        "discovery": null,
        "verification": {"verified_at_day": null, "pending": false, "session": null},
        "rate_limits": {"discovery_evaluations": {"account_full_at_ms": null, "number_full_at_ms": null}},
        "media": {"charges": [], "uploads_in_progress": [], "owned_blobs": []}
    });
    assert!(schema().is_valid(&doc));
    doc["account"]["phone"] = Value::from("+15550100");
    assert!(!schema().is_valid(&doc), "an extra field");
    doc["account"].as_object_mut().map(|a| a.remove("phone"));
    doc["discovery"] = serde_json::json!({"tag": "00".repeat(16), "discoverable": true,
        "verified_at_day": 1, "number": "+15550100"});
    assert!(!schema().is_valid(&doc), "a number beside the tag");
    doc["discovery"] = Value::Null;
    doc["version"] = Value::from(2);
    assert!(!schema().is_valid(&doc), "another version");
}

#[tokio::test]
async fn an_unknown_account_has_no_export() {
    let w = world();
    let mut out = Vec::new();
    let r = write(
        w.f.services.stores(),
        &AccountId([9; 16]),
        0,
        ExportOptions::default(),
        &mut out,
    );
    assert!(matches!(r, Err(Error::UnknownRecipient)));
    assert!(out.is_empty());
}

#[tokio::test]
async fn the_export_names_the_list_version_and_which_devices_are_primary_and_listed() {
    let w = world();
    let (_, bob) = fill(&w).await;
    let account = bob.address().account;
    let stores = w.f.services.stores();
    let v = export(stores, &account, ExportOptions::default());
    valid(&v);
    assert_eq!(v["account"]["device_list_version"], 0, "none published");
    let devices = v["account"]["devices"].as_array().expect("devices");
    let flags = |d: &Value| (d["primary"].clone(), d["listed"].clone());
    assert_eq!(flags(&devices[0]), (Value::from(true), Value::from(false)));
    assert_eq!(flags(&devices[1]), (Value::from(false), Value::from(false)));

    // A list naming only the primary, version 4.
    let record = AccountStore::get(w.f.store.as_ref(), &account)
        .expect("get")
        .expect("bob");
    let list = tern_proto::DeviceList {
        account,
        version: 4,
        entries: vec![tern_proto::DeviceEntry {
            id: tern_proto::DeviceId::PRIMARY,
            device_key: record.devices[0].1,
            identity_dh: [1; 32],
        }],
    };
    let stored = crate::store::StoredList {
        version: 4,
        list: list.encode().expect("valid"),
        signature: [0; 64],
    };
    assert!(stores
        .accounts
        .put_device_list(&account, &stored)
        .expect("put"));
    let v = export(stores, &account, ExportOptions::default());
    valid(&v);
    assert_eq!(v["account"]["device_list_version"], 4);
    let devices = v["account"]["devices"].as_array().expect("devices");
    assert_eq!(flags(&devices[0]), (Value::from(true), Value::from(true)));
    assert_eq!(flags(&devices[1]), (Value::from(false), Value::from(false)));
}

#[test]
fn exports_past_the_gate_are_refused_until_one_ends() {
    let gate = ExportGate::new(2);
    let first = gate.enter().expect("a place");
    let _second = gate.enter().expect("a place");
    let refused = gate.enter().expect_err("no place left");
    assert_eq!(refused.code(), tern_proto::ErrorCode::Unavailable);
    assert_eq!(refused.retry_after_ms(), EXPORT_RETRY_MS);
    drop(first);
    assert!(gate.enter().is_ok(), "a place again once an export ended");
}

/// A stopping relay waits for the exports running (their writers wait on the
/// runtime's timers from blocking threads), at most its bound, and starts no more.
#[test]
fn closing_the_gate_waits_for_running_exports_and_refuses_new_ones() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let gate = ExportGate::new(4);
        let running = gate.enter().expect("a place");
        let held = gate.enter().expect("a place");
        let ends = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(running);
        });
        assert!(
            !gate.close(std::time::Duration::from_millis(300)).await,
            "one still running at the bound"
        );
        drop(held);
        assert!(gate.close(std::time::Duration::from_secs(5)).await);
        ends.join().expect("no panic");
        assert!(gate.enter().is_err(), "a closed gate starts no export");
    });
}
