//! `tern-relay admin migrate`: an embedded relay with messages queued is stopped, its
//! data directory copied into PostgreSQL by the command, and the same relay (same
//! certificate and keys) started on the database serves exactly what was queued.

use std::process::Command;

use tern_relay::testing::TestPostgres;

use crate::support::{envelope, number, register, relay_binary, within, Device, RelayProcess};

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
