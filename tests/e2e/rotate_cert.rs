//! `tern-relay admin rotate-cert` against a real relay process: refused without the
//! admin token; with it, the next certificate is announced to authenticated clients
//! (pushed to open connections, in the auth reply of new ones), which pin it beside
//! the current one; from the switch time the relay serves it to new connections
//! without a restart, and after one the clients that saw the announcement reconnect
//! under it and talk, while one that was offline the whole overlap is refused with
//! the typed pin error.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_client::net::RelayConnection;
use tern_client::{Client, Error, Event};
use tern_proto::{Fingerprint, RelayAddress};

use crate::client::{next_match, next_message, store};
use crate::support::{register, relay_binary, within, RelayProcess, STEP};

/// The overlap the test gives clients: long enough for the steps before the switch
/// on a loaded machine, short enough to wait out.
const OVERLAP: &str = "6s";

fn rotate(data_dir: &Path, extra: &[&str]) -> Output {
    Command::new(relay_binary())
        .args(["admin", "rotate-cert", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("run tern-relay admin rotate-cert")
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

/// The fingerprint on the line of `rotate-cert`'s output that starts with `label`.
fn fingerprint_after(stdout: &str, label: &str) -> Fingerprint {
    let hex = stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().last())
        .unwrap_or_else(|| panic!("no {label:?} line in {stdout}"));
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    Fingerprint(bytes.try_into().expect("32 bytes"))
}

async fn connected(events: &mut tern_client::Events) {
    next_match(events, |e| matches!(e, Event::Connected).then_some(())).await;
}

#[tokio::test]
async fn a_rotated_certificate_is_announced_then_served_and_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    let mut relay = RelayProcess::start(&data, &[]).expect("relay");
    let old = relay.address.clone();

    // Alice and Bob: clients connected and pinned to the current certificate.
    let (alice, mut alice_events) = Client::register(&old, store(dir.path(), "alice"))
        .await
        .expect("alice");
    let (bob, mut bob_events) = Client::register(&old, store(dir.path(), "bob"))
        .await
        .expect("bob");
    connected(&mut alice_events).await;
    connected(&mut bob_events).await;
    // Carol: registered, then offline for the whole overlap.
    let (carol, _) = Client::register(&old, store(dir.path(), "carol"))
        .await
        .expect("carol");
    carol.shutdown().await;
    drop(carol);
    // A connection authenticated before the rotation: told by a push.
    let mut dave = register(&old).await;
    let mut pushed = dave.conn.next_certificate();

    // Without the token, and with a wrong one: refused, nothing staged.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "not the token").expect("write");
    let missing = dir.path().join("no.token");
    for token in [&wrong, &missing] {
        let out = rotate(&data, &["--token-file", token.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("401"), "{stderr}");
    }
    assert!(!data.join("relay-cert-rotation.json").exists());
    assert!(pushed.borrow().is_none());

    // With it: staged beside the current one, announced.
    let before = now_ms();
    let out = rotate(&data, &["--overlap", OVERLAP]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fingerprint_after(&stdout, "current"), old.fingerprint);
    let next = fingerprint_after(&stdout, "next");
    assert_ne!(next, old.fingerprint);
    assert!(data.join("relay-cert.next.pem").exists());

    let told = within(pushed.wait_for(Option::is_some))
        .await
        .map(|n| *n)
        .expect("pushed")
        .expect("a certificate");
    assert_eq!(told.fingerprint, next);
    let switch_at = told.switch_at_ms;
    assert!(
        (before + 5_000..=now_ms() + 6_000).contains(&switch_at),
        "{switch_at}"
    );
    // A new connection (still under the current certificate) hears it in its
    // authentication reply.
    dave.reconnect(&old).await;
    assert_eq!(*dave.conn.next_certificate().borrow(), Some(told));
    // The clients pinned it beside the current one.
    within(async {
        while alice.relay_certificate().1.is_none() || bob.relay_certificate().1.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(alice.relay_certificate(), (old.fingerprint, Some(told)));
    // A second rotation while one is staged is refused unless it replaces it.
    let again = rotate(&data, &["--overlap", "1h"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--replace"));

    // Until the switch the current certificate is served.
    let new_address = RelayAddress {
        fingerprint: next,
        ..old.clone()
    };
    let early = within(RelayConnection::connect(&new_address)).await;
    assert!(
        matches!(early, Err(Error::FingerprintMismatch)),
        "{early:?}"
    );

    // From the switch time, new connections get the next certificate, without a
    // restart; the old pin alone is refused with the typed pin error.
    let wait = switch_at.saturating_sub(now_ms()) + 200;
    assert!(
        wait < STEP.as_millis() as u64,
        "switch too far off: {wait} ms"
    );
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (fresh, _) = within(RelayConnection::connect(&new_address))
        .await
        .expect("connect under the next certificate");
    assert_eq!(fresh.presented(), Some(next));
    fresh.close().await;
    let stale = within(RelayConnection::connect(&old)).await;
    assert!(
        matches!(stale, Err(Error::FingerprintMismatch)),
        "{stale:?}"
    );
    // The relay moved the files: the next certificate is its certificate.
    within(async {
        while data.join("relay-cert-rotation.json").exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // A restart (on the same port) serves the new certificate; Alice and Bob
    // reconnect under it, drop the old pin, and talk.
    relay.stop().expect("stop");
    let listen = format!("127.0.0.1:{}", old.port);
    relay = RelayProcess::start_at(&data, &listen, &[]).expect("restart");
    assert_eq!(relay.address.fingerprint, next);
    connected(&mut alice_events).await;
    connected(&mut bob_events).await;
    assert_eq!(alice.relay_certificate(), (next, None));
    assert_eq!(bob.relay_certificate(), (next, None));
    alice
        .add_contact(&bob.contact_card().await)
        .await
        .expect("add");
    alice
        .send(&bob.account(), b"after the switch")
        .await
        .expect("send");
    let m = next_message(&mut bob_events).await;
    assert_eq!(m.body, b"after the switch");
    bob.confirm(m.seq).await.expect("confirm");
    // Alice's store holds the new pin: reopened, she connects under it.
    alice.shutdown().await;
    drop(alice);
    let (alice, mut alice_events) = Client::open(store(dir.path(), "alice"))
        .await
        .expect("reopen alice");
    connected(&mut alice_events).await;
    assert_eq!(alice.relay_certificate(), (next, None));

    // Carol never connected during the overlap: the typed pin error, every time.
    let (carol, mut carol_events) = Client::open(store(dir.path(), "carol"))
        .await
        .expect("reopen carol");
    let reason = next_match(&mut carol_events, |e| match e {
        Event::Disconnected { reason } => Some(reason),
        Event::Connected => panic!("connected under a certificate it never pinned"),
        _ => None,
    })
    .await;
    assert_eq!(reason, Error::FingerprintMismatch.to_string());
    assert_eq!(carol.relay_certificate(), (old.fingerprint, None));

    for c in [alice, bob, carol] {
        c.shutdown().await;
    }
    dave.conn.close().await;
}
