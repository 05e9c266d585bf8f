//! `tern-relay admin migrate`: an embedded relay with messages queued is stopped, its
//! data directory copied into PostgreSQL by the command, and the same relay (same
//! certificate and keys) started on the database serves exactly what was queued.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use tern_relay::testing::TestPostgres;

use crate::support::hex;
use crate::support::{envelope, number, register, relay_binary, within, Device, RelayProcess};

/// `admin export-account --ciphertexts` of `account` on `data` (with `config`).
fn export(data: &Path, config: Option<&Path>, account: &str) -> Value {
    let mut cmd = Command::new(relay_binary());
    cmd.args([
        "admin",
        "export-account",
        account,
        "--ciphertexts",
        "--data-dir",
    ])
    .arg(data);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("run tern-relay admin export-account");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut export: Value = serde_json::from_slice(&out.stdout).expect("an export is JSON");
    // The one field that differs between two exports of the same state: when each
    // was made.
    let generated = export
        .as_object_mut()
        .and_then(|o| o.remove("generated_at_ms"));
    assert!(generated.is_some(), "{export}");
    export
}

#[tokio::test]
async fn a_stopped_relay_moves_to_postgres_and_serves_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;
    // 40 queued, 10 of them delivered and acked while Bob was online: a gap below.
    assert_eq!(
        within(alice.conn.send(&bob_addr, (0..10).map(envelope)))
            .await
            .unwrap(),
        10
    );
    let (mut bob, _) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    let first = bob.drain().await;
    assert_eq!(first.len(), 10);
    let seqs: Vec<u64> = first.iter().map(|d| d.seq).collect();
    within(bob.conn.ack(&seqs)).await.unwrap();
    let (bob_addr, bob_key, bob_id) = bob.go_offline().await;
    assert_eq!(
        within(alice.conn.send(&bob_addr, (10..40).map(envelope)))
            .await
            .unwrap(),
        30
    );
    let pg = TestPostgres::start();
    pg.create_db("tern");
    let url = pg.conn_str("tern");

    // While the relay runs, the command is refused and copies nothing.
    let migrate = || {
        Command::new(relay_binary())
            .args(["admin", "migrate", "--to", &url, "--data-dir"])
            .arg(&data)
            .output()
            .expect("run tern-relay admin migrate")
    };
    let busy = migrate();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("running relay"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let address = relay.address.clone();
    let filter = within(alice.conn.discovery_filter(0, 0, 0)).await.unwrap();
    relay.stop().unwrap();
    let accounts = [
        hex(alice.address.account.as_bytes()),
        hex(bob_addr.account.as_bytes()),
    ];
    let before: Vec<Value> = accounts.iter().map(|a| export(&data, None, a)).collect();
    let items = &before[1]["account"]["devices"][0]["queue"]["items"];
    assert_eq!(items.as_array().map(Vec::len), Some(30), "{items}");
    assert!(items[0]["ciphertext"].is_string(), "{items}");
    let done = migrate();
    let out = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(
        done.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(out.contains("messages") && out.contains(" 30\n"), "{out}");
    // Today's snapshot and key list: the nodes serve what clients already hold.
    assert!(out.contains("discovery filter files     2\n"), "{out}");

    // The same data directory (certificate, keys) on the database.
    let config = dir.path().join("pg.toml");
    std::fs::write(
        &config,
        format!("[storage]\nbackend = \"postgres\"\n[postgres]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    // Each account exported from the database is the one exported before the move.
    for (account, before) in accounts.iter().zip(&before) {
        let after = export(&data, Some(&config), account);
        assert_eq!(&after, before, "export of {account}");
    }
    let relay = RelayProcess::start(&data, &["--config", &config.to_string_lossy()]).unwrap();
    assert_eq!(
        relay.address.to_string().split('@').next(),
        address.to_string().split('@').next(),
        "one certificate"
    );
    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 30);
    let served = within(bob.conn.discovery_filter(0, 0, 0)).await.unwrap();
    assert_eq!(served, filter, "the same filter part");
    let got = bob.drain().await;
    assert_eq!(
        got.iter().map(number).collect::<Vec<_>>(),
        (10..40).collect::<Vec<_>>()
    );
    assert_eq!(got[3].payload, envelope(13).payload);
    // New messages continue above the copied seqs.
    let top = got.iter().map(|d| d.seq).max().unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.seq).collect();
    within(bob.conn.ack(&seqs)).await.unwrap();
    drop(alice);
    let carol = register(&relay.address).await;
    assert_eq!(
        within(carol.conn.send(&bob.address, [envelope(99)]))
            .await
            .unwrap(),
        1
    );
    let next = bob.next_delivery().await;
    assert_eq!(number(&next), 99);
    assert!(next.seq > top, "{} above {top}", next.seq);
}

#[tokio::test]
async fn blob_bytes_move_to_the_object_store_and_download_through_postgres() {
    use sha2::{Digest, Sha256};
    use tern_client::media;
    use tern_client::net::RelayConnection;
    use tern_relay::testing::TestS3;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let alice = register(&relay.address).await;
    // Over one part of the object store's.
    let src = dir.path().join("photo");
    let plain: Vec<u8> = (0..(6usize << 20) + 4321)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    std::fs::write(&src, &plain).unwrap();
    let (pointer, _) = within(media::upload(&alice.conn, &src, &dir.path().join("sealed")))
        .await
        .expect("upload to the embedded relay");
    alice.conn.close().await;
    relay.stop().unwrap();

    let (pg, s3) = (TestPostgres::start(), TestS3::start());
    pg.create_db("tern");
    let url = pg.conn_str("tern");
    let config = dir.path().join("pg.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nbackend = \"postgres\"\n[postgres]\nurl = \"{url}\"\n{}",
            s3.objects_toml()
        ),
    )
    .unwrap();
    let keys = s3.key_env();
    let done = Command::new(relay_binary())
        .args(["admin", "migrate", "--to", &url, "--objects", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .envs(keys)
        .output()
        .expect("run tern-relay admin migrate --objects");
    assert!(
        done.status.success(),
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let objects: Vec<String> = s3.files();
    assert_eq!(
        objects.iter().filter(|f| f.starts_with("blobs/")).count(),
        1,
        "one object per blob: {objects:?}"
    );
    assert!(
        objects.iter().all(|f| !f.starts_with("uploads/")),
        "no staging left: {objects:?}"
    );

    // The relay on PostgreSQL and the object store serves the blob.
    let relay = RelayProcess::start_with_env(
        &data,
        "127.0.0.1:0",
        &["--config", &config.to_string_lossy()],
        &keys,
    )
    .unwrap();
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let out = dir.path().join("out");
    let n = within(media::download(&anon, &pointer, &out))
        .await
        .expect("download through the PostgreSQL relay");
    assert_eq!(n, plain.len() as u64);
    assert_eq!(
        Sha256::digest(std::fs::read(&out).unwrap()),
        Sha256::digest(&plain)
    );
}
