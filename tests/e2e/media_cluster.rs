//! Media across relay nodes sharing one PostgreSQL database and one S3-compatible
//! object store (`[objects]`): bytes uploaded through one node are served by another,
//! forwards and repeated uploads move nothing, the bucket holds one object per blob,
//! an upload cut on one node resumes on another, and expiry sweeps run on one node
//! (the holder of the lease "sweep") however many share the stores.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_client::media;
use tern_client::net::RelayConnection;

use crate::media::Interrupted;
use crate::support::{digest, hex};
use crate::support::{envelope, files_under, register, within, Device, PgNodes, STEP};

const MIB: usize = 1 << 20;

fn plain_file(dir: &Path, name: &str, len: usize, seed: usize) -> PathBuf {
    let bytes: Vec<u8> = (0..len).map(|i| ((i * 7 + seed) % 253) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

#[tokio::test]
async fn an_upload_through_one_node_is_served_by_another_and_forwards_move_nothing() {
    let c = PgNodes::with_objects(&[]);
    let a = c.start_node("a", "", None);
    let b = c.start_node("b", "", Some(&a));
    let alice = register(&a.address).await;
    let work = tempfile::tempdir().expect("tempdir");
    // Over two parts.
    let src = plain_file(work.path(), "photo", 11 * MIB, 1);
    let sealed = work.path().join("sealed");
    let (pointer, up) = within(media::upload(&alice.conn, &src, &sealed))
        .await
        .expect("upload on a");
    assert!(!up.existed);
    let only = vec![format!("blobs/{}", hex(&pointer.blob_id))];
    assert_eq!(c.s3().objects("blobs/"), only, "one object per blob");

    // Downloaded through b, without an account.
    let (anon, _) = within(RelayConnection::connect(&b.address))
        .await
        .expect("connect to b");
    let out = work.path().join("out");
    let n = within(media::download(&anon, &pointer, &out))
        .await
        .expect("download on b");
    assert_eq!(n, std::fs::metadata(&src).expect("size").len());
    assert_eq!(digest(&out), digest(&src), "the same bytes");

    // A forward and a repeated upload on b: the blob's life moves, no bytes do.
    let bob = register(&b.address).await;
    within(media::forward(&bob.conn, &pointer))
        .await
        .expect("forward on b");
    let again = within(media::resume_upload(&bob.conn, &pointer, &sealed))
        .await
        .expect("upload again on b");
    assert!(again.existed, "b knew the blob");
    assert_eq!(again.sent, 0, "no bytes moved");
    assert_eq!(c.s3().files(), only, "one object, no staging left");
    assert_eq!(c.count("SELECT count(*) FROM blobs").await, 1);
    for node in [&a, &b] {
        assert!(
            files_under(&node.data_dir.join("blobs")).is_empty(),
            "no blob bytes on a node's disk"
        );
    }
}

/// Waits until the bucket's manifest of the one upload in progress says `committed`
/// bytes went as parts: the cut node has settled what reached it.
async fn settled_parts(c: &PgNodes, committed: u64) {
    let deadline = Instant::now() + STEP;
    loop {
        let manifests: Vec<String> = c
            .s3()
            .objects("uploads/")
            .into_iter()
            .filter(|f| f.ends_with(".parts"))
            .collect();
        if let [one] = manifests.as_slice() {
            let path = c.s3().root().join(c.s3().bucket()).join(one);
            if let Ok(text) = std::fs::read(&path) {
                if let Ok(m) = serde_json::from_slice::<serde_json::Value>(&text) {
                    if m["committed"].as_u64() == Some(committed) {
                        return;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no settled manifest: {:?}",
            c.s3().files()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_upload_cut_on_one_node_resumes_on_another() {
    let c = PgNodes::with_objects(&[]);
    let a = c.start_node("a", "", None);
    let b = c.start_node("b", "", Some(&a));
    let alice = register(&a.address).await;
    let work = tempfile::tempdir().expect("tempdir");
    let src = plain_file(work.path(), "video", 12 * MIB, 2);
    let sealed = work.path().join("sealed");
    let pointer = media::encrypt_file(&src, &sealed).await.expect("encrypt");
    // Two 5 MiB parts reach the object store through a, one more MiB only a's memory.
    let mut cut = Interrupted {
        inner: std::io::Cursor::new(std::fs::read(&sealed).expect("read")),
        stop: 11 * MIB as u64,
    };
    within(
        alice
            .conn
            .upload_blob(&pointer.blob_id, pointer.sealed_size, &mut cut),
    )
    .await
    .expect_err("cut off");
    settled_parts(&c, 10 * MIB as u64).await;

    // The same device on b resumes from the parts a committed.
    let (addr, key, identity) = (alice.address, alice.key.clone(), alice.identity.clone());
    let (on_b, _) = Device::connect(&b.address, addr, key, identity).await;
    let up = within(media::resume_upload(&on_b.conn, &pointer, &sealed))
        .await
        .expect("resume on b");
    assert!(!up.existed);
    assert_eq!(
        up.sent,
        pointer.sealed_size - 10 * MIB as u64,
        "resumed from a's parts, not restarted"
    );
    assert_eq!(
        c.s3().files(),
        vec![format!("blobs/{}", hex(&pointer.blob_id))],
        "one object, no staging or parts left"
    );
    assert_eq!(c.count("SELECT count(*) FROM uploads").await, 0);

    // And it is whole: downloaded back through a.
    let (anon, _) = within(RelayConnection::connect(&a.address))
        .await
        .expect("connect to a");
    let out = work.path().join("out");
    within(media::download(&anon, &pointer, &out))
        .await
        .expect("download on a");
    assert_eq!(digest(&out), digest(&src));
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// The numbers `field=` carries on the log's lines that contain `what`.
fn logged(log: &str, what: &str, field: &str) -> Vec<u64> {
    plain(log)
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let at = l.find(&format!("{field}="))? + field.len() + 1;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test]
async fn expiry_sweeps_run_on_one_node_of_three() {
    let c = PgNodes::with_objects(&[]);
    // Messages and blobs live a second; each node wakes every 500 ms, and only the
    // holder of the lease "sweep" (held for three intervals, renewed each pass) sweeps.
    let extra = "[expiry]\nmessage_ttl = \"1s\"\nsweep_interval = \"500ms\"\n\
                 [media]\nblob_ttl = \"1s\"";
    let a = c.start_node("a", extra, None);
    let b = c.start_node("b", extra, Some(&a));
    let third = c.start_node("c", extra, Some(&a));
    let nodes = [&a, &b, &third];
    let alice = register(&a.address).await;
    let (bob, _, _) = register(&b.address).await.go_offline().await;

    // Four rounds of messages, each expiring in a later pass, and a blob.
    let work = tempfile::tempdir().expect("tempdir");
    let src = plain_file(work.path(), "note", 100_000, 3);
    within(media::upload(
        &alice.conn,
        &src,
        &work.path().join("sealed"),
    ))
    .await
    .expect("upload");
    let rounds = 4;
    for round in 0..rounds {
        within(
            alice
                .conn
                .send(&bob, (0..5).map(|i| envelope(round * 5 + i))),
        )
        .await
        .expect("send on a");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    // Everything expired is deleted from the shared stores, by the sweeps alone.
    let deadline = Instant::now() + STEP;
    loop {
        let left = c.count("SELECT count(*) FROM messages").await
            + c.count("SELECT count(*) FROM blobs").await
            + c.s3().objects("blobs/").len() as i64;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} left after the sweeps");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.count("SELECT count(*) FROM object_gc").await, 0);

    // All by one node: the others logged no sweep, and each message was swept once.
    let sweepers: Vec<usize> = (0..3)
        .filter(|&i| {
            let log = nodes[i].log_text();
            !logged(&log, "deleted expired messages", "messages").is_empty()
                || !logged(&log, "deleted expired media", "blobs").is_empty()
        })
        .collect();
    assert_eq!(sweepers.len(), 1, "sweeping nodes: {sweepers:?}");
    let log = nodes[sweepers[0]].log_text();
    let passes = logged(&log, "deleted expired messages", "messages");
    assert_eq!(
        passes.iter().sum::<u64>(),
        u64::from(rounds) * 5,
        "{passes:?}"
    );
    assert!(passes.len() >= 2, "several passes, one node: {passes:?}");
    assert_eq!(logged(&log, "deleted expired media", "blobs"), vec![1]);
}
