//! Operating a relay: `init` and `check-config`, log formats, data-directory
//! versions, systemd readiness and the unit file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tern_client::net::Incoming;

use crate::support::{
    envelope, number, register, relay_binary, within, Device, RelayProcess, STEP,
};

fn run(args: &[&str]) -> Output {
    Command::new(relay_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern-relay")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn init_writes_a_config_a_relay_starts_on_and_check_config_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    let f = file.to_str().unwrap();
    let out = run(&["init", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("\n[expiry]\n") && written.contains("\nmessage_ttl = \"30days\"\n"));
    assert!(
        !run(&["init", f]).status.success(),
        "init never overwrites a file"
    );

    let ok = run(&["check-config", f]);
    assert!(
        ok.status.success(),
        "{}{}",
        text(&ok.stdout),
        text(&ok.stderr)
    );
    assert!(text(&ok.stdout).contains(": ok"));

    // The file as written is what a relay starts on.
    let mut relay = RelayProcess::start(&dir.path().join("data"), &["--config", f]).unwrap();
    let mut bob = register(&relay.address).await;
    let alice = register(&relay.address).await;
    within(alice.conn.send(&bob.address, [envelope(1)]))
        .await
        .unwrap();
    assert_eq!(number(&bob.next_delivery().await), 1);
    relay.stop().unwrap();

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listne = \"127.0.0.1:1\"\n[limits]\nmax_batch = \"many\"\n[expiry]\nmessage_ttl = \"40days\"\n\
         [budget]\nmin_free_disk_percent = 90\n",
    )
    .unwrap();
    let out = run(&["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let report = text(&out.stdout);
    for key in [
        "listne",
        "limits.max_batch",
        "expiry.message_ttl",
        "budget.min_free_disk_percent",
    ] {
        assert!(report.contains(key), "{key} not named in:\n{report}");
    }
    assert!(
        text(&out.stderr).contains("4 problem(s)"),
        "{}",
        text(&out.stderr)
    );
}

/// Registers two devices, sends one message and delivers it: lines at every level.
async fn traffic(relay: &RelayProcess) {
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    within(alice.conn.send(&bob.address, [envelope(7)]))
        .await
        .unwrap();
    let d = bob.next_delivery().await;
    within(bob.conn.ack(&[d.seq])).await.unwrap();
}

#[tokio::test]
async fn text_logs_in_a_file_hold_no_escape_codes_and_json_logs_parse_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    // Text, standard error to a file (support.rs sends it to `<data dir>.log`).
    let mut relay = RelayProcess::start(&dir.path().join("text"), &["--log", "debug"]).unwrap();
    traffic(&relay).await;
    relay.stop().unwrap();
    let log = relay.log_text();
    assert!(log.contains("relay started"), "{log}");
    assert!(!log.contains('\u{1b}'), "an escape code in a log file");
    assert!(!log.contains("127.0.0.1"), "an address in the log (P9)");

    let mut relay = RelayProcess::start(
        &dir.path().join("json"),
        &["--log-format", "json", "--log", "debug"],
    )
    .unwrap();
    traffic(&relay).await;
    relay.stop().unwrap();
    let log = relay.log_text();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if let Some(m) = v["fields"]["message"].as_str() {
            messages.push(m.to_owned());
        }
    }
    for expected in ["relay started", "shutting down", "stopped"] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected} in {messages:?}"
        );
    }
    assert!(log.lines().count() > 3);
    assert!(!log.contains('\u{1b}'));
    assert!(!log.contains("127.0.0.1"), "an address in the log (P9)");
}

/// Runs `tern-relay serve` on `data` expecting it to refuse to start; its stderr.
fn refused(data: &Path) -> String {
    let mut child = Command::new(relay_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the relay started");
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("the relay did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_previous_format_directory_is_migrated_and_a_future_one_refused() {
    use tern_relay::store::version;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    // A directory of the previous format: what a relay before the version file left,
    // the same layout without it.
    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;
    within(alice.conn.send(&bob_addr, (0..5).map(envelope)))
        .await
        .unwrap();
    drop(alice);
    relay.stop().unwrap();
    assert_eq!(version::read(&data).unwrap(), Some(version::CURRENT));
    std::fs::remove_file(data.join(version::FILE)).unwrap();
    assert_eq!(version::read(&data).unwrap(), Some(1));

    let mut relay = RelayProcess::start(&data, &[]).unwrap();
    let log = relay.log_text();
    assert!(
        log.contains("migrating the data directory in place"),
        "{log}"
    );
    assert!(log.contains("--reflink"), "the backup hint: {log}");
    assert_eq!(
        std::fs::read_to_string(data.join(version::FILE)).unwrap(),
        format!("{}\n", version::CURRENT)
    );
    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 5);
    let got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(got, (0..5).collect::<Vec<_>>());
    bob.go_offline().await;
    relay.stop().unwrap();

    // A directory a newer relay wrote: refused, untouched, with what to do.
    version::write(&data, version::CURRENT + 1).unwrap();
    let err = refused(&data);
    assert!(
        err.contains(&format!("data format {}", version::CURRENT + 1))
            && err.contains("newer tern-relay")
            && err.contains("restore the backup"),
        "{err}"
    );
    assert_eq!(version::read(&data).unwrap(), Some(version::CURRENT + 1));
}

#[tokio::test]
async fn readiness_is_signalled_on_notify_socket_once_the_relay_serves() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(STEP)).unwrap();
    let mut relay = RelayProcess::start_with_env(
        &dir.path().join("relay"),
        "127.0.0.1:0",
        &[],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the step");
    let got = text(&buf[..n]);
    assert!(got.lines().any(|l| l == "READY=1"), "{got:?}");
    // Ready means serving: a client registers at once.
    let _device = register(&relay.address).await;
    relay.stop().unwrap();
    let n = socket.recv(&mut buf).expect("the stop is announced");
    assert!(text(&buf[..n]).lines().any(|l| l == "STOPPING=1"));
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!(
            "systemd-analyze is not installed, so deploy/tern-relay.service cannot be \
             checked: install the `systemd` package (apt-get install systemd)"
        );
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(repo_file("deploy/tern-relay.service")).unwrap();
    for needed in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=tern-relay",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
    ] {
        assert!(unit.contains(needed), "{needed} missing from the unit");
    }
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tern-relay.service");
    let binary = relay_binary();
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/tern-relay", binary.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

/// `tern-relay admin backup DIR` on the relay of `data`; the command's output.
fn backup_command(dir: &Path, data: &Path) -> Output {
    Command::new(relay_binary())
        .args(["admin", "backup"])
        .arg(dir)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .expect("run tern-relay admin backup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_sends_are_in_flight_restores_everything_acknowledged_before_it() {
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    // Small segments: the backup copies several, and the log rolls while it runs.
    // Rates above what the senders can reach: under load the backup takes longer,
    // more sends go through meanwhile, and the default 1000 a minute (and 500 a day
    // into a mailbox past 1000 queued) refused them part way.
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[storage]\nsegment_mb = 1\n[rate_limits]\nsends_per_account = \"100000/1m\"\n\
         intake_above_queued = 100000\n",
    )
    .unwrap();
    let live = dir.path().join("live");
    let mut relay = RelayProcess::start(&live, &["--config", config.to_str().unwrap()]).unwrap();
    let address = relay.address.clone();
    let alice = register(&address).await;
    let (bob_addr, bob_key, bob_id) = register(&address).await.go_offline().await;
    // Carol acknowledges hers before the backup: they must not come back.
    let mut carol = register(&address).await;
    assert_eq!(carol.next().await, Incoming::QueueEmpty);
    within(alice.conn.send(&carol.address, (0..3).map(envelope)))
        .await
        .unwrap();
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(carol.next_delivery().await.seq);
    }
    assert_eq!(within(carol.conn.ack(&acked)).await.unwrap(), 3);
    // An attachment uploaded before the backup: its blob is in it.
    let photo = dir.path().join("photo.bin");
    let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&photo, &plain).unwrap();
    let (pointer, _) = within(tern_client::media::upload(
        &alice.conn,
        &photo,
        &dir.path().join("photo.sealed"),
    ))
    .await
    .unwrap();

    // Sends to Bob keep going, from several tasks, during the backup.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alice = Arc::new(alice);
    let mut senders = Vec::new();
    for task in 0..4u32 {
        let (alice, accepted, stop) = (alice.clone(), accepted.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..2000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let n = task * 100_000 + i;
                let mut e = envelope(n);
                e.payload = bytes::Bytes::from(vec![n as u8; 8000]);
                within(alice.conn.send(&bob_addr, [e])).await.unwrap();
                accepted.lock().unwrap().push(n);
            }
        }));
    }
    // Let some traffic through, then back up, by the running relay, while it goes on.
    let deadline = Instant::now() + STEP;
    while accepted.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "the sends do not go through");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before: Vec<u32> = accepted.lock().unwrap().clone();
    let backup_dir = dir.path().join("backup");
    let (to, data) = (backup_dir.clone(), live.clone());
    let out = tokio::task::spawn_blocking(move || backup_command(&to, &data))
        .await
        .unwrap();
    let during = accepted.lock().unwrap().len() - before.len();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let said = text(&out.stdout);
    assert!(
        out.status.success() && said.contains("by the running relay"),
        "{said}{}",
        text(&out.stderr)
    );
    eprintln!(
        "{}; {} sends acknowledged before it, {during} during it",
        said.trim(),
        before.len()
    );
    assert!(said.contains("1 blob files"), "the attachment: {said}");
    let segments: usize = said
        .split(" mailbox log segments")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segment count in {said}"));
    assert!(segments >= 2, "the log rolled: {said}");
    // Refused: an existing directory (this one), one inside the data directory.
    let again = backup_command(&backup_dir, &live);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );
    let inside = backup_command(&live.join("copy"), &live);
    assert!(!inside.status.success());
    assert!(
        text(&inside.stderr).contains("inside the data directory"),
        "{}",
        text(&inside.stderr)
    );
    assert!(!live.join("copy").exists());
    let (carol_addr, carol_key, carol_id) = carol.go_offline().await;
    drop(alice);
    relay.stop().unwrap();

    // Restore: the backup copied into a new directory, a relay process started on it.
    let restored = dir.path().join("restored");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&backup_dir)
        .arg(&restored)
        .status()
        .unwrap();
    assert!(status.success());
    let mut relay = RelayProcess::start(&restored, &[]).unwrap();
    assert_eq!(
        relay.address.fingerprint, address.fingerprint,
        "the same certificate"
    );
    let (mut bob, _) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    // Acked as they come (the relay pushes at most a window ahead).
    let mut got = std::collections::HashSet::new();
    let mut unacked = Vec::new();
    while let Incoming::Delivery(d) = bob.next().await {
        assert_eq!(d.payload.len(), 8000, "whole payloads");
        assert!(got.insert(number(&d)), "delivered twice");
        unacked.push(d.seq);
        if unacked.len() >= 64 {
            within(bob.conn.ack(&std::mem::take(&mut unacked)))
                .await
                .unwrap();
        }
    }
    let missing: Vec<&u32> = before.iter().filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, not restored: {missing:?}"
    );
    let fetched = dir.path().join("photo.out");
    within(tern_client::media::download(&bob.conn, &pointer, &fetched))
        .await
        .unwrap();
    assert!(std::fs::read(&fetched).unwrap() == plain, "the attachment");
    let (mut carol, queued) =
        Device::connect(&relay.address, carol_addr, carol_key, carol_id).await;
    assert_eq!(queued, 0, "acknowledged before the backup: not restored");
    assert!(carol.drain().await.is_empty());
    relay.stop().unwrap();
}

#[tokio::test]
async fn a_stopped_relay_is_backed_up_from_its_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let mut relay = RelayProcess::start(&live, &[]).unwrap();
    let alice = register(&relay.address).await;
    let (bob_addr, bob_key, bob_id) = register(&relay.address).await.go_offline().await;
    within(alice.conn.send(&bob_addr, (0..4).map(envelope)))
        .await
        .unwrap();
    drop(alice);
    relay.crash().unwrap();
    // A crash left admin.addr: the command does not call it (nobody holds the data
    // directory), and backs up from the directory.
    assert!(live.join("admin.addr").exists());
    let backup_dir = dir.path().join("backup");
    let out = backup_command(&backup_dir, &live);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(!said.contains("running relay"), "{said}");
    let mut relay = RelayProcess::start(&backup_dir, &[]).unwrap();
    assert!(
        !relay.log_text().contains("removed the admin.addr"),
        "a backup holds no admin.addr"
    );
    let (mut bob, queued) = Device::connect(&relay.address, bob_addr, bob_key, bob_id).await;
    assert_eq!(queued, 4);
    let got: Vec<u32> = bob.drain().await.iter().map(number).collect();
    assert_eq!(got, (0..4).collect::<Vec<_>>());
    bob.go_offline().await;
    relay.stop().unwrap();
    // The crashed relay's directory: its stale admin.addr goes at the next start.
    let mut relay = RelayProcess::start(&live, &[]).unwrap();
    assert!(relay.log_text().contains("removed the admin.addr"));
    relay.stop().unwrap();
}

/// The names beside `dest` of backups left part way.
fn partials(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_fills_the_disk_fails_cleanly_and_one_without_room_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    std::fs::write(&faults, "backup_write=enospc").unwrap();
    let plan = format!("file:{}", faults.display());
    let live = dir.path().join("live");
    let relay =
        RelayProcess::start_with_env(&live, "127.0.0.1:0", &[], &[("TERN_FAULTS", &plan)]).unwrap();
    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    within(alice.conn.send(&bob.address, (0..3).map(envelope)))
        .await
        .unwrap();
    // The disk fills up under the backup: it fails, and leaves nothing.
    let dest = dir.path().join("backup");
    let out = backup_command(&dest, &live);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no space"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dest.exists());
    assert!(
        partials(dir.path()).is_empty(),
        "{:?}",
        partials(dir.path())
    );
    // The relay serves on: what was queued is delivered, and a send goes through.
    for _ in 0..3 {
        bob.next_delivery().await;
    }
    within(alice.conn.send(&bob.address, [envelope(3)]))
        .await
        .unwrap();
    bob.next_delivery().await;
    // With room again, the next backup is written.
    std::fs::write(&faults, "").unwrap();
    let out = backup_command(&dest, &live);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dest.join(tern_relay::store::version::FILE).exists());
    drop((alice, bob));

    // A destination without room for the data directory and the reserve: refused
    // before anything is written, naming both figures.
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[budget]\nmin_free_disk_bytes = 9223372036854775807\n",
    )
    .unwrap();
    let full = dir.path().join("full");
    let _full = RelayProcess::start(&full, &["--config", config.to_str().unwrap()]).unwrap();
    let dest = dir.path().join("no-room");
    let out = backup_command(&dest, &full);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("needs about") && said.contains("bytes free"),
        "{said}"
    );
    assert!(!dest.exists());
    assert!(partials(dir.path()).is_empty());
}
