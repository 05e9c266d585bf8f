//! A full disk and the relay-wide budgets, on real relay processes: an injected
//! ENOSPC (the relay binary of these tests has the `fault-injection` feature, see
//! `relay/src/store/fault.rs`), a free-disk reserve above the real free space, and
//! `max_queued_messages`. Sends are refused with `UNAVAILABLE` and a retry time;
//! drains and acks go on; a restart shows nothing stored was lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_client::media;
use tern_client::net::Delivery;
use tern_client::ErrorCode;

use crate::support::{envelope, number, register, within, Device, RelayProcess};

/// A relay whose faults file is `faults` (absent: no faults), with `config` as its
/// TOML configuration.
fn relay(dir: &Path, listen: &str, config: &str, faults: &Path) -> RelayProcess {
    let file = dir.join("relay.toml");
    std::fs::write(&file, config).unwrap();
    let faults = format!("file:{}", faults.display());
    RelayProcess::start_with_env(
        &dir.join("relay"),
        listen,
        &["--config", file.to_str().unwrap()],
        &[("TERN_FAULTS", &faults)],
    )
    .unwrap()
}

fn same_port(r: &RelayProcess) -> String {
    format!("127.0.0.1:{}", r.address.port)
}

const SMALL_SEGMENTS: &str = "durability = \"fsync\"\n[storage]\nsegment_mb = 1\n";

fn assert_unavailable_with_retry(e: &tern_client::Error) {
    assert_eq!(e.relay_code(), Some(ErrorCode::Unavailable), "{e}");
    assert!(e.retry_after().is_some_and(|t| t > Duration::ZERO), "{e}");
}

async fn ack(d: &Device, deliveries: &[Delivery]) {
    let seqs: Vec<u64> = deliveries.iter().map(|d| d.seq).collect();
    within(d.conn.ack(&seqs)).await.expect("ack answered");
}

fn numbers(ds: &[Delivery]) -> Vec<u32> {
    ds.iter().map(number).collect()
}

#[tokio::test]
async fn enospc_refuses_sends_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let mut r = relay(dir.path(), "127.0.0.1:0", SMALL_SEGMENTS, &faults);
    let alice = register(&r.address).await;
    let bob = register(&r.address).await;
    let (bob_at, key, identity) = bob.go_offline().await;
    for batch in 0..10 {
        within(
            alice
                .conn
                .send(&bob_at, (batch * 10..batch * 10 + 10).map(envelope)),
        )
        .await
        .expect("queued");
    }

    // The disk is full for the log: every send is refused, none is stored.
    std::fs::write(&faults, "log_append=enospc").unwrap();
    for i in 100..103 {
        let refused = within(alice.conn.send(&bob_at, [envelope(i)]))
            .await
            .expect_err("no space");
        assert_unavailable_with_retry(&refused);
    }
    // Bob drains and acks half: acks need no new space.
    let (mut bob, queued) = Device::connect(&r.address, bob_at, key, identity).await;
    assert_eq!(queued, 100);
    let got = bob.drain().await;
    assert_eq!(numbers(&got), (0..100).collect::<Vec<_>>());
    ack(&bob, &got[..50]).await;

    // An upload whose bytes meet a full disk is refused; it resumes once there is
    // room, sending only what did not reach the relay.
    let src = dir.path().join("plain");
    std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
    let sealed = dir.path().join("sealed");
    let pointer = media::encrypt_file(&src, &sealed).await.expect("encrypt");
    std::fs::write(&faults, "log_append=enospc,blob_write=enospc@after:1").unwrap();
    let refused = within(media::resume_upload(&alice.conn, &pointer, &sealed))
        .await
        .expect_err("no space for the second write");
    assert_eq!(
        refused.relay_code(),
        Some(ErrorCode::Unavailable),
        "{refused}"
    );
    std::fs::write(&faults, "log_append=enospc").unwrap();
    // The relay may still be settling the refused stream.
    let uploaded = within(crate::media::resume_once_settled(
        &alice.conn,
        &pointer,
        &sealed,
    ))
    .await
    .expect("resumed");
    assert!(
        uploaded.sent < pointer.sealed_size,
        "resumed, not restarted"
    );

    // A crash, then a start with room again: the 50 unacked are all there, the
    // acked ones gone, and sends are taken again.
    r.crash().unwrap();
    std::fs::remove_file(&faults).unwrap();
    let r = relay(dir.path(), &same_port(&r), SMALL_SEGMENTS, &faults);
    let queued = bob.reconnect(&r.address).await;
    assert_eq!(queued, 50);
    let got = bob.drain().await;
    assert_eq!(numbers(&got), (50..100).collect::<Vec<_>>());
    ack(&bob, &got).await;
    within(bob.conn.send(&bob.address, [envelope(200)]))
        .await
        .expect("a send after the restart");
    let out = dir.path().join("out");
    within(media::download(&bob.conn, &pointer, &out))
        .await
        .expect("the blob survived");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[tokio::test]
async fn disk_reserve_refuses_sends_but_not_drains() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let mut r = relay(dir.path(), "127.0.0.1:0", "", &faults);
    let mut alice = register(&r.address).await;
    let bob = register(&r.address).await;
    let (bob_at, key, identity) = bob.go_offline().await;
    within(alice.conn.send(&bob_at, (0..5).map(envelope)))
        .await
        .expect("queued");
    let src = dir.path().join("plain");
    std::fs::write(&src, vec![3u8; 100_000]).unwrap();
    let sealed: PathBuf = dir.path().join("sealed");
    let (pointer, _) = within(media::upload(&alice.conn, &src, &sealed))
        .await
        .expect("uploaded");
    r.stop().unwrap();

    // More free space asked for than any disk has: the reserve holds from the start.
    let reserve = "[budget]\nmin_free_disk_bytes = 4611686018427387904\n";
    let mut r = relay(dir.path(), &same_port(&r), reserve, &faults);
    alice.reconnect(&r.address).await;
    let refused = within(alice.conn.send(&bob_at, [envelope(5)]))
        .await
        .expect_err("under the reserve");
    assert_unavailable_with_retry(&refused);
    let other = dir.path().join("other");
    std::fs::write(&other, vec![4u8; 1000]).unwrap();
    let refused = within(media::upload(&alice.conn, &other, &dir.path().join("o")))
        .await
        .expect_err("uploads too");
    assert_eq!(
        refused.relay_code(),
        Some(ErrorCode::Unavailable),
        "{refused}"
    );
    let (conn, _inbox) = within(tern_client::net::RelayConnection::connect(&r.address))
        .await
        .unwrap();
    let refused = within(conn.register(
        &tern_client::identity::IdentityKeyPair::generate(),
        &tern_client::identity::DeviceKeyPair::generate(),
    ))
    .await
    .expect_err("registrations too");
    assert_eq!(
        refused.relay_code(),
        Some(ErrorCode::Unavailable),
        "{refused}"
    );

    // Drains, acks and downloads go on.
    let (mut bob, queued) = Device::connect(&r.address, bob_at, key, identity).await;
    assert_eq!(queued, 5);
    let got = bob.drain().await;
    assert_eq!(numbers(&got), vec![0, 1, 2, 3, 4]);
    ack(&bob, &got[..3]).await;
    let out = dir.path().join("out");
    within(media::download(&bob.conn, &pointer, &out))
        .await
        .expect("download");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    r.stop().unwrap();

    // With the default reserve: nothing queued was lost, and sends are taken.
    let r = relay(dir.path(), &same_port(&r), "", &faults);
    assert_eq!(bob.reconnect(&r.address).await, 2);
    assert_eq!(numbers(&bob.drain().await), vec![3, 4]);
    alice.reconnect(&r.address).await;
    within(alice.conn.send(&bob.address, [envelope(5)]))
        .await
        .expect("taken again");
}

#[tokio::test]
async fn the_queued_messages_budget_is_relay_wide() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let r = relay(
        dir.path(),
        "127.0.0.1:0",
        "[budget]\nmax_queued_messages = 10\n",
        &faults,
    );
    let alice = register(&r.address).await;
    let mut bob = register(&r.address).await;
    let carol = register(&r.address).await;
    // Bob and Carol are online; their deliveries stay queued until acked.
    within(alice.conn.send(&bob.address, (0..6).map(envelope)))
        .await
        .expect("6");
    within(alice.conn.send(&carol.address, (6..10).map(envelope)))
        .await
        .expect("10");
    let refused = within(alice.conn.send(&carol.address, [envelope(10)]))
        .await
        .expect_err("the 11th, relay-wide");
    assert_unavailable_with_retry(&refused);
    let mut got = Vec::new();
    while got.len() < 6 {
        got.push(bob.next_delivery().await);
    }
    ack(&bob, &got).await;
    within(alice.conn.send(&carol.address, [envelope(10)]))
        .await
        .expect("taken after Bob's drain");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        SmallFs {
            path: path.to_owned(),
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Fills the file system under `dir` with one file until a write finds it full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 64 << 10];
    // Bounded: a 64 MiB tmpfs takes at most 1024 blocks.
    for _ in 0..100_000 {
        if f.write_all(&block).and_then(|()| f.sync_data()).is_err() {
            return path;
        }
    }
    panic!("the file system never filled up");
}

/// The real kernel's ENOSPC, sled and fsync included, on a 64 MiB tmpfs. Needs root;
/// `.ci/run` runs it when `id -u` is 0:
/// `cargo test -p tern-tests --test e2e storage::enospc_on_a_real_small_filesystem -- --ignored`
#[tokio::test]
#[ignore = "needs root to mount a tmpfs; run as documented above"]
async fn enospc_on_a_real_small_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small"), "64m");
    let faults = dir.path().join("no-faults");
    let config = "durability = \"fsync\"\n[storage]\nsegment_mb = 1\ncache_mb = 8\n\
                  [budget]\nmin_free_disk_bytes = 0\n";
    let mut r = relay(&fs.path, "127.0.0.1:0", config, &faults);
    let alice = register(&r.address).await;
    let bob = register(&r.address).await;
    let (bob_at, key, identity) = bob.go_offline().await;
    let filler = fill(&fs.path);

    // Sends go into what the log prepared ahead, then are refused; each answer is
    // either stored or refused with UNAVAILABLE.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..20_000u32 {
        let mut e = envelope(i);
        e.payload = vec![i as u8; 4000].into();
        match within(alice.conn.send(&bob_at, [e])).await {
            Ok(_) => accepted.push(i),
            Err(err) => {
                if err.relay_code() != Some(ErrorCode::Unavailable) {
                    panic!("{err}; relay log:\n{}", r.log_text());
                }
                assert!(err.retry_after().is_some(), "{err}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 3, "the disk never refused a send");
    // A registration writes sled, which may still have room in what it allocated;
    // if it has none, the refusal is typed.
    let (conn, _inbox) = within(tern_client::net::RelayConnection::connect(&r.address))
        .await
        .unwrap();
    let registered = within(conn.register(
        &tern_client::identity::IdentityKeyPair::generate(),
        &tern_client::identity::DeviceKeyPair::generate(),
    ))
    .await;
    if let Err(e) = registered {
        assert_eq!(e.relay_code(), Some(ErrorCode::Unavailable), "{e}");
    }

    // Drains and acks work on the full disk.
    let (mut bob, _) = Device::connect(&r.address, bob_at, key, identity).await;
    let mut got = Vec::new();
    while got.len() < accepted.len() {
        let d = bob.next_delivery().await;
        got.push(d);
        if got.len() % 200 == 0 || got.len() == accepted.len() {
            ack(&bob, &got[got.len() - got.len().min(200)..]).await;
        }
    }
    assert_eq!(numbers(&got), accepted);

    // A crash, room made, a restart: nothing acked comes back, sends are taken.
    r.crash().unwrap();
    std::fs::remove_file(filler).unwrap();
    let r = relay(&fs.path, &same_port(&r), config, &faults);
    assert_eq!(
        bob.reconnect(&r.address).await,
        0,
        "acked messages stay deleted"
    );
    within(bob.conn.send(&bob.address, [envelope(1)]))
        .await
        .expect("a send once there is room");
    drop(r);
}
