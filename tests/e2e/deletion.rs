//! Account deletion on a real relay process: afterwards the relay answers for the
//! account exactly as for an id that never existed, and neither its database nor any
//! other file of its data directory holds the account's id or its messages (nor its
//! discovery tag record, its evaluation bucket or an open verification's code file).
//! Other accounts' media stays.

use std::path::Path;
use std::sync::Arc;

use tern_client::identity::DeviceKeyPair;
use tern_client::media;
use tern_client::net::{KeyUpload, RelayConnection, SignedKey};
use tern_client::store::SledKv;
use tern_client::{Client, Error, Event};
use tern_proto::{AccountId, DeviceAddress, DeviceId};

use crate::media::Interrupted;
use crate::support::hex;
use crate::support::{envelope, files_under, register, within, Device, RelayProcess};

const TOKEN: &[u8] = b"bob's delivery token";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn keys(dev: &Device) -> KeyUpload {
    let (dh, spk): ([u8; 32], [u8; 32]) = (rand::random(), rand::random());
    KeyUpload {
        identity_dh: Some(SignedKey {
            id: 0,
            key: dh,
            signature: dev.identity.certify_agreement_key(&dh),
        }),
        signed_prekey: Some(SignedKey {
            id: 1,
            key: spk,
            signature: dev.identity.certify_signed_prekey(1, &spk),
        }),
        one_time: (0..5).map(|id| (id, rand::random())).collect(),
    }
}

/// The relay's answer, as the client sees it (code and detail).
fn answer<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    r.expect_err("refused").to_string()
}

/// Every (tree, key, value) of the relay's sled database, read through sled.
fn records(db_dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let db = sled::open(db_dir).expect("open the relay's database");
    let mut out = Vec::new();
    for name in db.tree_names() {
        let tree = String::from_utf8_lossy(&name).into_owned();
        for record in db.open_tree(&name).expect("tree").iter() {
            let (k, v) = record.expect("record");
            out.push((tree.clone(), k.to_vec(), v.to_vec()));
        }
    }
    out
}

/// No sled record and no other file of a stopped relay's data directory holds
/// `gone` (nor, outside the database, any of `payloads`); `kept` is still found,
/// which shows the scan sees ids where they are.
fn nothing_of(relay_dir: &Path, gone: &AccountId, kept: &AccountId, payloads: &[&[u8]]) {
    let all = records(&relay_dir.join("db"));
    for (tree, k, v) in &all {
        assert!(
            !contains(k, gone.as_bytes()) && !contains(v, gone.as_bytes()),
            "the deleted account's id in a record of {tree}: {k:?}"
        );
    }
    assert!(
        all.iter().any(|(_, k, _)| contains(k, kept.as_bytes())),
        "the scan finds the remaining account"
    );
    let db_dir = relay_dir.join("db");
    let files: Vec<_> = files_under(relay_dir)
        .into_iter()
        .filter(|f| !f.starts_with(&db_dir))
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(relay_dir.join("mailboxes"))),
        "the log's segments are among the files scanned: {files:?}"
    );
    assert!(
        files_under(&relay_dir.join("uploads")).is_empty(),
        "no upload in progress left"
    );
    assert!(
        files_under(&relay_dir.join("dev-verification")).is_empty(),
        "no verification code left"
    );
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        let name = file.to_string_lossy();
        assert!(!contains(&bytes, gone.as_bytes()), "id in {name}");
        assert!(
            !name.contains(&hex(gone.as_bytes())),
            "id in the name {name}"
        );
        for p in payloads {
            assert!(!contains(&bytes, p), "a message of the account in {name}");
        }
    }
}

#[tokio::test]
async fn a_deleted_account_leaves_nothing_and_answers_like_one_that_never_existed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let mut relay = crate::verification::relay_with(
        &relay_dir,
        "[verification]\nverifier = \"dev-file\"\n",
        &["--allow-dev-verifier"],
    )
    .expect("relay");
    let addr = relay.address.clone();
    let alice = register(&addr).await;
    let bob = register(&addr).await;
    let account = bob.address.account;

    // A verified number (its discovery tag names the account), an evaluation (its
    // stored bucket), and a second verification left open at the deletion.
    let number = |n: &str| tern_proto::verification::E164::parse(n).expect("E.164");
    let (session, _) = within(bob.conn.start_verification(number("+12015550188")))
        .await
        .expect("started");
    let code = std::fs::read_to_string(relay_dir.join("dev-verification").join(session.to_hex()))
        .expect("the code file");
    let code = tern_proto::verification::Code::parse(&code).expect("6 digits");
    assert!(within(bob.conn.check_verification(session, code))
        .await
        .expect("verified"));
    let chunk =
        tern_client::discovery::blind(&["+12015550199".to_string()], &mut rand::thread_rng())
            .expect("blind")
            .remove(0);
    within(bob.conn.discovery_evaluate(chunk.blinded))
        .await
        .expect("evaluated");
    within(bob.conn.start_verification(number("+12015550177")))
        .await
        .expect("a session left open");

    // Fill Bob's account: a second device (offline, with queued messages), keys for
    // both, a token, messages for both, a finished and an unfinished upload, and a
    // forward of Alice's blob.
    let key2 = DeviceKeyPair::generate();
    let device2 = within(bob.conn.add_device(&bob.identity, &account, &key2.public()))
        .await
        .expect("second device");
    let bob2 = DeviceAddress {
        account,
        device: device2,
    };
    let (second, _) = Device::connect(&addr, bob2, key2, bob.identity.clone()).await;
    within(second.conn.publish_keys(&keys(&second)))
        .await
        .expect("keys");
    let _ = second.go_offline().await;
    within(bob.conn.publish_keys(&keys(&bob)))
        .await
        .expect("keys");
    within(bob.conn.set_delivery_token(TOKEN))
        .await
        .expect("token");
    within(alice.conn.send(&bob2, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    within(alice.conn.send(&bob.address, [envelope(3)]))
        .await
        .expect("send (pushed, never acknowledged)");
    let (anon, _) = within(RelayConnection::connect(&addr))
        .await
        .expect("connect");
    within(anon.sealed_send(&bob2, TOKEN, [envelope(4)]))
        .await
        .expect("sealed send");

    let plain = dir.path().join("bob.bin");
    std::fs::write(&plain, vec![9u8; 70_000]).expect("write");
    within(media::upload(
        &bob.conn,
        &plain,
        &dir.path().join("bob.sealed"),
    ))
    .await
    .expect("finished upload");
    let half = dir.path().join("half.sealed");
    let pointer = media::encrypt_file(&plain, &half).await.expect("encrypt");
    let mut cut = Interrupted {
        inner: std::io::Cursor::new(std::fs::read(&half).expect("read")),
        stop: 20_000,
    };
    within(
        bob.conn
            .upload_blob(&pointer.blob_id, pointer.sealed_size, &mut cut),
    )
    .await
    .expect_err("cut off");
    within(async {
        while files_under(&relay_dir.join("uploads")).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let photo = dir.path().join("alice.bin");
    let content: Vec<u8> = (0..90_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&photo, &content).expect("write");
    let (x, _) = within(media::upload(&alice.conn, &photo, &dir.path().join("x")))
        .await
        .expect("alice's upload");
    within(media::forward(&bob.conn, &x))
        .await
        .expect("bob forwards it");

    within(bob.conn.delete_account(&bob.identity, &bob.address))
        .await
        .expect("deleted");
    // Answered only once scrubbed: the running relay's log already holds neither
    // Bob's addresses nor his messages.
    let payloads: Vec<Vec<u8>> = (1..=4).map(|i| envelope(i).payload.to_vec()).collect();
    let segments = files_under(&relay_dir.join("mailboxes"));
    assert!(!segments.is_empty());
    for file in &segments {
        let bytes = std::fs::read(file).expect("read");
        assert!(!contains(&bytes, account.as_bytes()), "{}", file.display());
        for p in &payloads {
            assert!(!contains(&bytes, p), "a message in {}", file.display());
        }
    }
    assert!(bob.conn.is_closed());

    // Every answer about Bob is the one about an id that never existed.
    let unknown = AccountId(rand::random());
    let at = |account, device| DeviceAddress { account, device };
    let (d1, d2) = (bob.address.device, device2);
    for (gone, never) in [(at(account, d1), at(unknown, d1)), (bob2, at(unknown, d2))] {
        assert_eq!(
            answer(within(alice.conn.send(&gone, [envelope(9)])).await),
            answer(within(alice.conn.send(&never, [envelope(9)])).await),
            "send"
        );
        assert_eq!(
            answer(within(anon.sealed_send(&gone, TOKEN, [envelope(9)])).await),
            answer(within(anon.sealed_send(&never, TOKEN, [envelope(9)])).await),
            "sealed send"
        );
        let (by_gone, _) = within(RelayConnection::connect(&addr)).await.expect("c");
        let (by_never, _) = within(RelayConnection::connect(&addr)).await.expect("c");
        assert_eq!(
            answer(within(by_gone.authenticate(&gone, &bob.key)).await),
            answer(within(by_never.authenticate(&never, &bob.key)).await),
            "auth"
        );
    }
    assert_eq!(
        answer(within(alice.conn.fetch_keys(&account, None)).await),
        answer(within(alice.conn.fetch_keys(&unknown, None)).await),
        "fetch keys"
    );
    assert_eq!(
        answer(within(anon.fetch_keys_with_token(&account, None, TOKEN)).await),
        answer(within(anon.fetch_keys_with_token(&unknown, None, TOKEN)).await),
        "fetch keys with the token"
    );
    assert_eq!(
        answer(within(anon.list_devices(&account, TOKEN)).await),
        answer(within(anon.list_devices(&unknown, TOKEN)).await),
        "list devices"
    );
    // Alice's blob, which Bob forwarded, stays.
    let out = dir.path().join("x.out");
    within(media::download(&alice.conn, &x, &out))
        .await
        .expect("download");
    assert_eq!(std::fs::read(&out).expect("read"), content);

    for conn in [alice.conn, anon] {
        conn.close().await;
    }
    relay.stop().expect("stop");
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    nothing_of(&relay_dir, &account, &alice.address.account, &payloads);
}

#[tokio::test]
async fn a_deletion_cut_short_by_a_crash_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let faults = [("TERN_FAULTS", "account_deletion=enospc")];
    let mut relay =
        RelayProcess::start_with_env(&relay_dir, "127.0.0.1:0", &[], &faults).expect("relay");
    let addr = relay.address.clone();
    let alice = register(&addr).await;
    let bob = register(&addr).await;
    let account = bob.address.account;
    within(bob.conn.publish_keys(&keys(&bob)))
        .await
        .expect("keys");
    within(bob.conn.set_delivery_token(TOKEN))
        .await
        .expect("token");
    within(alice.conn.send(&bob.address, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    // The fault strikes after the first removal, with the intent on disk.
    within(bob.conn.delete_account(&bob.identity, &bob.address))
        .await
        .expect_err("cut short");
    relay.crash().expect("crash");

    let mut relay = RelayProcess::start(&relay_dir, &[]).expect("restart");
    assert!(relay
        .log_text()
        .contains("interrupted account deletions finished"));
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    assert_eq!(
        answer(within(anon.list_devices(&account, TOKEN)).await),
        answer(within(anon.list_devices(&AccountId(rand::random()), TOKEN)).await),
    );
    anon.close().await;
    relay.stop().expect("stop");
    let payloads: Vec<Vec<u8>> = (1..=2).map(|i| envelope(i).payload.to_vec()).collect();
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    nothing_of(&relay_dir, &account, &alice.address.account, &payloads);
}

fn store(dir: &Path, name: &str) -> Arc<SledKv> {
    Arc::new(SledKv::open(&dir.join(name), &[7u8; 32]).expect("device store"))
}

#[tokio::test]
async fn a_client_that_deletes_its_account_stops_and_forgets_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let (alice, _alice_events) = Client::register(&relay.address, store(dir.path(), "alice"))
        .await
        .expect("alice");
    let (bob, mut events) = Client::register(&relay.address, store(dir.path(), "bob"))
        .await
        .expect("bob");
    let card = bob.contact_card().await;
    alice.add_contact(&card).await.expect("add");
    alice.send(&bob.account(), b"hello").await.expect("send");
    within(async { while !matches!(events.recv().await, Some(Event::Message(_))) {} }).await;

    within(bob.delete_account()).await.expect("deleted");
    within(async { while events.recv().await.is_some() {} }).await;
    drop(bob);
    assert!(matches!(
        Client::open(store(dir.path(), "bob")).await,
        Err(Error::NotRegistered)
    ));
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let never = AccountId(rand::random());
    assert_eq!(
        answer(within(anon.list_devices(&card.account, &card.delivery_token)).await),
        answer(within(anon.list_devices(&never, &card.delivery_token)).await),
    );
    let first = DeviceAddress {
        account: card.account,
        device: DeviceId::PRIMARY,
    };
    assert_eq!(
        answer(within(anon.sealed_send(&first, &card.delivery_token, [envelope(1)])).await),
        answer(
            within(anon.sealed_send(
                &DeviceAddress {
                    account: never,
                    ..first
                },
                &card.delivery_token,
                [envelope(1)]
            ))
            .await
        ),
    );
    anon.close().await;
    alice.shutdown().await;
}

#[tokio::test]
async fn a_deletion_closes_every_other_connection_of_the_account() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let addr = relay.address.clone();
    let alice = register(&addr).await;
    let bob = register(&addr).await;
    let account = bob.address.account;
    let key2 = DeviceKeyPair::generate();
    let device2 = within(bob.conn.add_device(&bob.identity, &account, &key2.public()))
        .await
        .expect("second device");
    let bob2 = DeviceAddress {
        account,
        device: device2,
    };
    let (second, _) = Device::connect(&addr, bob2, key2, bob.identity.clone()).await;

    within(bob.conn.delete_account(&bob.identity, &bob.address))
        .await
        .expect("deleted");
    let Error::Closed(why) = within(second.conn.closed()).await else {
        panic!("closed")
    };
    assert_eq!(why, "the account was deleted");
    // Another account's connection stays.
    within(alice.conn.send(&alice.address, [envelope(1)]))
        .await
        .expect("alice still served");
    alice.conn.close().await;
    relay.stop().expect("stop");
}
