//! `tern-relay admin export-account` on a real relay's data directory: the export
//! holds what the relay stored and validates against the published JSON Schema.

use std::process::Command;

use base64::Engine as _;
use serde_json::Value;

use crate::support::hex;
use crate::support::{envelope, register, relay_binary, within, RelayProcess};

fn admin(args: &[&str], data_dir: &std::path::Path) -> std::process::Output {
    admin_with(args, data_dir, &[])
}

fn admin_with(
    args: &[&str],
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(relay_binary())
        .envs(env.iter().copied())
        .arg("admin")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run tern-relay admin")
}

#[tokio::test]
async fn an_offline_export_holds_the_queue_and_validates_against_the_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    // Without an admin listener the command works on the data directory, which the
    // running relay holds (tests/e2e/admin.rs: with one, through the relay).
    let mut relay = RelayProcess::start(&relay_dir, &["--admin-listen", "off"]).expect("relay");
    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;
    within(bob.conn.set_delivery_token(b"token"))
        .await
        .expect("token");
    let (bob_addr, _, _) = bob.go_offline().await;
    within(alice.conn.send(&bob_addr, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    let id = hex(bob_addr.account.as_bytes());
    let out = dir.path().join("export.json");
    let out_arg = out.to_string_lossy().into_owned();
    let args = ["export-account", &id, "--ciphertexts", "--out", &out_arg];
    // The user's own file, where an older export put its partial file.
    let mine = dir.path().join("export.partial");
    std::fs::write(&mine, b"mine").expect("write");

    let busy = admin(&args, &relay_dir);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by a running relay"));
    assert!(!out.exists(), "a failed export leaves no file");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let partials = left
        .iter()
        .filter(|n| n.to_string_lossy().ends_with(".partial"))
        .count();
    assert_eq!(partials, 1, "no partial file of its own left: {left:?}");
    assert_eq!(std::fs::read(&mine).expect("still there"), b"mine");
    alice.conn.close().await;
    relay.stop().expect("stop");

    let done = admin(&args, &relay_dir);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let export: Value = serde_json::from_slice(&std::fs::read(&out).expect("read")).expect("JSON");
    validate(&export);
    assert_eq!(export["account"]["id"], id.as_str());
    assert_eq!(export["account"]["delivery_token_set"], true);
    // Registered, and signed in, today (UTC days; the test may straddle midnight).
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        / 86_400;
    let device = &export["account"]["devices"][0];
    for day in [
        &export["account"]["created_day"],
        &device["created_day"],
        &device["last_seen_day"],
    ] {
        let day = day.as_u64().expect("a day");
        assert!(day + 1 >= today && day <= today, "{day} vs {today}");
    }
    assert_eq!(export["discovery"], Value::Null, "no number verified");
    assert_eq!(export["verification"]["pending"], false);
    let items = &export["account"]["devices"][0]["queue"]["items"];
    for (i, n) in [1u32, 2].into_iter().enumerate() {
        let e = envelope(n);
        assert_eq!(items[i]["message_id"], hex(&e.message_id.0).as_str());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&e.payload);
        assert_eq!(items[i]["ciphertext"], b64.as_str());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A deletion that fails part way, and fails again when the export resumes it:
    // the export refuses the half-deleted account.
    let faults = [("TERN_FAULTS", "account_deletion=enospc")];
    let failed = admin_with(&["delete-account", &id], &relay_dir, &faults);
    assert!(!failed.status.success());
    let half = dir.path().join("half.json");
    let half_arg = half.to_string_lossy().into_owned();
    let refused = admin_with(
        &["export-account", &id, "--out", &half_arg],
        &relay_dir,
        &faults,
    );
    assert!(
        !refused.status.success(),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert!(!half.exists());

    // Without the fault, the export's resume finishes the deletion: after it there
    // is nothing to export.
    let again = dir.path().join("again.json");
    let again_arg = again.to_string_lossy().into_owned();
    let gone = admin(&["export-account", &id, "--out", &again_arg], &relay_dir);
    assert!(!gone.status.success());
    assert!(!again.exists());
}

fn validate(export: &Value) {
    let schema: Value = serde_json::from_str(tern_relay::export::SCHEMA_V1).expect("schema");
    let validator = jsonschema::validator_for(&schema).expect("valid schema");
    let errors: Vec<String> = validator
        .iter_errors(export)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn a_client_exports_its_account_over_its_authenticated_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;
    // Pushed to Bob, never acknowledged: still queued.
    within(alice.conn.send(&bob.address, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    let mut out = Vec::new();
    let len = within(bob.conn.export_account(true, &mut out))
        .await
        .expect("export");
    assert_eq!(len, out.len() as u64);
    let export: Value = serde_json::from_slice(&out).expect("JSON");
    validate(&export);
    assert_eq!(
        export["account"]["id"],
        hex(bob.address.account.as_bytes()).as_str()
    );
    let items = &export["account"]["devices"][0]["queue"]["items"];
    for (i, n) in [1u32, 2].into_iter().enumerate() {
        let e = envelope(n);
        assert_eq!(items[i]["message_id"], hex(&e.message_id.0).as_str());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&e.payload);
        assert_eq!(items[i]["ciphertext"], b64.as_str());
    }
    let mut without = Vec::new();
    within(bob.conn.export_account(false, &mut without))
        .await
        .expect("export");
    let without: Value = serde_json::from_slice(&without).expect("JSON");
    assert!(without["account"]["devices"][0]["queue"]["items"][0]
        .get("ciphertext")
        .is_none());
    // `exports_per_account` = "4/1day": two more, then refused with a retry time.
    for _ in 0..2 {
        within(bob.conn.export_account(false, &mut Vec::new()))
            .await
            .expect("export");
    }
    let limited = within(bob.conn.export_account(false, &mut Vec::new()))
        .await
        .expect_err("a fifth export today");
    assert_eq!(
        limited.relay_code(),
        Some(tern_client::ErrorCode::RateLimited)
    );
    assert!(limited.retry_after().is_some_and(|d| !d.is_zero()));

    // Only for an authenticated connection's own account.
    let (anon, _) = within(tern_client::net::RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let refused = within(anon.export_account(false, &mut Vec::new()))
        .await
        .expect_err("not authenticated");
    assert_eq!(
        refused.relay_code(),
        Some(tern_client::ErrorCode::Unauthorized)
    );

    // The client's call writes a file only its user can read.
    let store = std::sync::Arc::new(
        tern_client::store::SledKv::open(&dir.path().join("carol"), &[7u8; 32]).expect("store"),
    );
    let (carol, _events) = tern_client::Client::register(&relay.address, store)
        .await
        .expect("carol");
    let path = dir.path().join("carol-export.json");
    within(carol.export_account(&path, false))
        .await
        .expect("export");
    let export: Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
    validate(&export);
    assert_eq!(
        export["account"]["id"],
        hex(carol.account().as_bytes()).as_str()
    );
    assert_eq!(export["account"]["delivery_token_set"], true);
    assert_eq!(
        export["account"]["devices"][0]["prekeys"]["identity_dh"],
        true
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    carol.shutdown().await;
}
