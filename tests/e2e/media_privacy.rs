//! What a relay keeps about who uploads media, checked on the disk of a real relay
//! process: a finished blob's record names no account, and a forward leaves no trace
//! of the forwarder.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_client::media;
use tern_client::net::RelayConnection;

use crate::support::{files_under, register, within, RelayProcess};

const DAY_MS: u64 = 86_400_000;
const TTL_MS: u64 = 30 * DAY_MS;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    u64::try_from(since.unwrap_or(Duration::ZERO).as_millis()).expect("ms")
}

/// A record of the relay's sled database: tree, key, value.
type Record = (String, Vec<u8>, Vec<u8>);

/// Every record of every tree, read back through sled (its files are a log of
/// pages, where a deleted record's bytes may linger until sled reuses the space; see
/// ARCHITECTURE.md).
fn records(db_dir: &Path) -> Vec<Record> {
    let db = sled::open(db_dir).expect("open the relay's database");
    let mut out = Vec::new();
    for name in db.tree_names() {
        let tree_name = String::from_utf8_lossy(&name).into_owned();
        for record in db.open_tree(&name).expect("tree").iter() {
            let (k, v) = record.expect("record");
            out.push((tree_name.clone(), k.to_vec(), v.to_vec()));
        }
    }
    out
}

#[tokio::test]
async fn no_blob_record_holds_an_account_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay_dir = dir.path().join("relay");
    let mut relay = RelayProcess::start(&relay_dir, &[]).expect("relay");
    let (alice, bob) = (
        register(&relay.address).await,
        register(&relay.address).await,
    );
    let plain = dir.path().join("photo");
    std::fs::write(&plain, vec![5u8; 300_000]).expect("write");
    let before = now_ms();
    let (pointer, _) = within(media::upload(
        &alice.conn,
        &plain,
        &dir.path().join("sealed"),
    ))
    .await
    .expect("upload");
    // Bob forwards it: the relay learns that he has the pointer, and keeps nothing.
    let forwarded = within(media::forward(&bob.conn, &pointer))
        .await
        .expect("forward");
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    let status = within(anon.blob_status(&pointer.blob_id))
        .await
        .expect("status")
        .expect("the relay has it");
    let after = now_ms();
    assert_eq!(status.size, pointer.sealed_size);
    // Expiry is reported to the day: the start of the UTC day the blob expires on.
    for reported in [status.expires_at_ms, forwarded] {
        assert_eq!(reported % DAY_MS, 0, "rounded to the day: {reported}");
        assert!(reported > before + TTL_MS - DAY_MS && reported <= after + TTL_MS);
    }
    for conn in [alice.conn, bob.conn, anon] {
        conn.close().await;
    }
    relay.stop().expect("stop");

    let (alice, bob) = (alice.address.account, bob.address.account);
    // Outside the database (blob files, uploads, the mailbox log, keys), no file
    // holds either account id.
    let db_dir = relay_dir.join("db");
    let outside: Vec<_> = files_under(&relay_dir)
        .into_iter()
        .filter(|f| !f.starts_with(&db_dir))
        .collect();
    assert!(
        outside
            .iter()
            .any(|f| f.starts_with(relay_dir.join("blobs"))),
        "the blob file is among the files scanned: {outside:?}"
    );
    for file in &outside {
        let bytes = std::fs::read(file).expect("read");
        for account in [&alice, &bob] {
            assert!(
                !contains(&bytes, account.as_bytes()),
                "an account id in {}",
                file.display()
            );
        }
    }
    // In the database: the blob's records name no one; Alice appears only in her
    // account's own records and in her quota charges, Bob (who only forwarded) only
    // in his account's own records.
    let all = records(&db_dir);
    let blob_records = all.iter().filter(|(tree, _, _)| tree == "blobs").count();
    assert!(blob_records >= 2, "the blob's record and its expiry entry");
    let mut charges = 0;
    for (tree, k, v) in &all {
        let has = |needle: &[u8]| contains(k, needle) || contains(v, needle);
        assert!(
            !(has(&pointer.blob_id) && (has(alice.as_bytes()) || has(bob.as_bytes()))),
            "a record in {tree} ties an account to the blob"
        );
        for (who, account) in [("alice", &alice), ("bob", &bob)] {
            if !has(account.as_bytes()) {
                continue;
            }
            match tree.as_str() {
                "accounts" | "delivery_tokens" | "keys" => {}
                "blob_quota" if who == "alice" => {
                    // A charge: (account, day) -> bytes, or its expiry entry.
                    assert!(matches!(k.first(), Some(b'Q' | b'R')), "{k:?}");
                    assert_eq!(k.len(), 25);
                    charges += 1;
                }
                _ => panic!("{who}'s account id in a record of {tree}: {k:?}"),
            }
        }
    }
    assert_eq!(charges, 2, "one charge for Alice, and its expiry entry");
    assert!(
        all.iter()
            .any(|(tree, k, _)| tree == "accounts" && contains(k, alice.as_bytes())),
        "the scan finds an account id where one is"
    );
}
