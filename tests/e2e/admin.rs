//! The admin listener of a real relay process: `/metrics` during traffic (the
//! counters move; no account, device, token, address or blob id in it), `/healthz`
//! and `/readyz`, and every `tern-relay admin` command against the running relay,
//! with its token and refused (and counted) without it or with a wrong one.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use tern_client::media;
use tern_client::net::RelayConnection;

use crate::support::{envelope, hex, register, relay_binary, within, RelayProcess};

/// The admin listener's address, from the file the relay writes beside its token.
pub(crate) fn admin_addr(relay: &RelayProcess) -> String {
    std::fs::read_to_string(relay.data_dir.join("admin.addr"))
        .expect("admin.addr")
        .trim()
        .to_owned()
}

/// One HTTP/1.0 request on a fresh connection: (status, body).
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin listener");
    s.set_read_timeout(Some(crate::support::STEP))
        .expect("timeout");
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

pub(crate) fn scrape(addr: &str) -> String {
    let (status, body) = http(addr, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    body
}

/// `name{labels}` → value, histogram buckets included.
pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub(crate) fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

/// The label names a scrape may carry: small fixed sets, never an identifier.
const LABELS: &[&str] = &[
    "kind",
    "cause",
    "code",
    "direction",
    "what",
    "command",
    "reason",
    "version",
    "le",
];

#[tokio::test]
async fn metrics_move_with_traffic_and_name_no_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let addr = admin_addr(&relay);
    assert_eq!(http(&addr, "GET", "/healthz", None), (200, "ok\n".into()));
    // Probes at once (several checkers): each answered, none colliding with another.
    let probes: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http(&addr, "GET", "/readyz", None))
        })
        .collect();
    for p in probes {
        assert_eq!(p.join().expect("probe"), (200, "ready\n".into()));
    }
    let before = samples(&scrape(&addr));

    let alice = register(&relay.address).await;
    let mut bob = register(&relay.address).await;
    const TOKEN: &[u8] = b"bob's delivery token";
    within(bob.conn.set_delivery_token(TOKEN))
        .await
        .expect("token");
    within(alice.conn.send(&bob.address, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    let (anon, _) = within(RelayConnection::connect(&relay.address))
        .await
        .expect("connect");
    within(anon.sealed_send(&bob.address, TOKEN, [envelope(3)]))
        .await
        .expect("sealed send");
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(bob.next_delivery().await.seq);
    }
    within(bob.conn.ack(&seqs)).await.expect("ack");
    let plain = dir.path().join("photo.bin");
    std::fs::write(&plain, vec![7u8; 50_000]).expect("write");
    let (pointer, _) = within(media::upload(
        &alice.conn,
        &plain,
        &dir.path().join("photo.sealed"),
    ))
    .await
    .expect("upload");
    let mut downloaded = Vec::new();
    within(bob.conn.download_blob(&pointer.blob_id, 0, &mut downloaded))
        .await
        .expect("download");
    // A refused request: an unknown recipient.
    let nobody = tern_proto::DeviceAddress {
        account: tern_proto::AccountId([0x5a; 16]),
        device: tern_proto::DeviceId::PRIMARY,
    };
    assert!(within(alice.conn.send(&nobody, [envelope(4)]))
        .await
        .is_err());

    let text = scrape(&addr);
    let after = samples(&text);
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert!(
        moved("tern_connections_total{kind=\"authenticated\"}") >= 2.0,
        "{text}"
    );
    assert!(
        moved("tern_connections_total{kind=\"anonymous\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(moved("tern_sends_total{kind=\"direct\"}"), 1.0, "{text}");
    assert_eq!(moved("tern_sent_envelopes_total{kind=\"direct\"}"), 2.0);
    assert_eq!(moved("tern_sends_total{kind=\"sealed\"}"), 1.0);
    assert_eq!(moved("tern_sent_envelopes_total{kind=\"sealed\"}"), 1.0);
    assert!(moved("tern_deliveries_total") >= 3.0, "{text}");
    assert_eq!(moved("tern_acked_messages_total"), 3.0, "{text}");
    assert!(moved("tern_group_commit_size_count") >= 1.0, "{text}");
    assert!(moved("tern_group_commit_seconds_count") >= 2.0, "{text}");
    assert!(moved("tern_fsync_seconds_count") >= 1.0, "{text}");
    assert!(
        moved("tern_errors_total{code=\"unknown_recipient\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        moved("tern_blob_transfers_total{direction=\"upload\"}"),
        1.0
    );
    assert_eq!(
        moved("tern_blob_transfers_total{direction=\"download\"}"),
        1.0
    );
    let sealed_size = downloaded.len() as f64;
    assert!(moved("tern_blob_transfer_bytes_total{direction=\"upload\"}") >= sealed_size);
    assert!(moved("tern_blob_transfer_bytes_total{direction=\"download\"}") >= sealed_size);
    assert!(value(&after, "tern_blob_bytes") >= sealed_size, "{text}");
    assert_eq!(
        value(&after, "tern_queued_messages"),
        0.0,
        "all acknowledged"
    );
    assert!(value(&after, "tern_uptime_seconds") > 0.0);
    let version = format!(
        "tern_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&after, &version), 1.0, "{text}");
    assert!(value(&after, "tern_connections_open") >= 3.0, "{text}");

    // Aggregates only: label names from a fixed set, and no identifier anywhere.
    for series in after.keys() {
        if let Some((_, labels)) = series.split_once('{') {
            for pair in labels.trim_end_matches('}').split(',') {
                let name = pair.split('=').next().unwrap_or_default();
                assert!(LABELS.contains(&name), "label {name} in {series}");
            }
        }
    }
    let token_text = std::fs::read_to_string(relay.data_dir.join("admin.token")).expect("token");
    let mut secrets = vec![
        hex(alice.address.account.as_bytes()),
        hex(bob.address.account.as_bytes()),
        hex(&pointer.blob_id),
        hex(TOKEN),
        String::from_utf8_lossy(TOKEN).into_owned(),
        "127.0.0.1".to_owned(),
        token_text.trim().to_owned(),
    ];
    secrets.extend([&alice, &bob].iter().map(|d| hex(&d.key.public())));
    let lower = text.to_lowercase();
    for s in &secrets {
        assert!(
            !lower.contains(&s.to_lowercase()),
            "{s} in the metrics:\n{text}"
        );
    }
    // Device ids are small numbers: none may be a label value (but a bucket's bound
    // or the version), nor a series be named after a device.
    for series in after.keys() {
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        assert!(
            !name.contains("device"),
            "a device in a series name: {series}"
        );
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (label, value) = pair.split_once('=').expect("label=value");
            let value = value.trim_matches('"');
            assert!(
                ["le", "version"].contains(&label) || !value.bytes().all(|b| b.is_ascii_digit()),
                "a number as a label value: {series}"
            );
        }
    }
}

fn admin(args: &[&str], data_dir: &Path, extra: &[&str]) -> Output {
    Command::new(relay_binary())
        .arg("admin")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .output()
        .expect("run tern-relay admin")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test]
async fn every_admin_command_works_with_the_token_and_is_refused_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[rate_limits]\nsends_per_account = \"1000/1m\"\n").expect("config");
    let relay_dir = dir.path().join("relay");
    let config_arg = config.to_string_lossy().into_owned();
    let mut relay = RelayProcess::start(&relay_dir, &["--config", &config_arg]).expect("relay");
    let addr = admin_addr(&relay);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(relay_dir.join("admin.token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let alice = register(&relay.address).await;
    let bob = register(&relay.address).await;
    let (bob_addr, _, _) = bob.go_offline().await;
    within(alice.conn.send(&bob_addr, [envelope(1), envelope(2)]))
        .await
        .expect("send");
    let (alice_id, bob_id) = (
        hex(alice.address.account.as_bytes()),
        hex(bob_addr.account.as_bytes()),
    );

    // Without the token, and with a wrong one: refused, every command, and counted.
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "0".repeat(64)).expect("wrong token");
    let missing = dir.path().join("missing.token");
    let nowhere = dir.path().join("backup");
    let nowhere = nowhere.to_string_lossy().into_owned();
    let commands: [&[&str]; 6] = [
        &["stats"],
        &["list-devices", &alice_id],
        &["export-account", &bob_id],
        &["delete-account", &bob_id],
        &["reload"],
        &["backup", &nowhere],
    ];
    for token in [&wrong, &missing] {
        let token = token.to_string_lossy().into_owned();
        for args in commands {
            refused(&admin(args, &relay_dir, &["--token-file", &token]));
        }
    }
    let (status, body) = http(&addr, "GET", "/admin/stats", None);
    assert_eq!(status, 401);
    let dir_text = relay_dir.to_string_lossy();
    assert!(
        !body.contains(&*dir_text),
        "no data-dir path to a stranger: {body}"
    );
    assert_eq!(http(&addr, "POST", "/admin/reload", Some("nope")).0, 401);
    let after = samples(&scrape(&addr));
    assert_eq!(
        value(&after, "tern_admin_refused_total{reason=\"wrong\"}"),
        7.0
    );
    assert_eq!(
        value(&after, "tern_admin_refused_total{reason=\"missing\"}"),
        7.0
    );
    assert!(
        !dir.path().join("backup").exists(),
        "a refused backup wrote nothing"
    );
    // An address named on the command line gets a token only from a file named too.
    let url = format!("http://{addr}");
    let no_token = admin(&["stats"], &relay_dir, &["--admin-url", &url]);
    assert!(!no_token.status.success());
    assert!(
        String::from_utf8_lossy(&no_token.stderr).contains("needs --token-file"),
        "{}",
        String::from_utf8_lossy(&no_token.stderr)
    );
    let token_file = relay_dir.join("admin.token").to_string_lossy().into_owned();
    let named = ok(&admin(
        &["stats"],
        &relay_dir,
        &["--admin-url", &url, "--token-file", &token_file],
    ));
    assert!(named.contains("tern_uptime_seconds"), "{named}");

    // With it (read from the data directory): every command.
    let table = ok(&admin(&["stats"], &relay_dir, &[]));
    assert!(
        table.contains("tern_sends_total{kind=\"direct\"}"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&admin(&["stats", "--json"], &relay_dir, &[]))).expect("JSON");
    assert!(json.as_array().is_some_and(|a| !a.is_empty()), "{json}");

    let listed = ok(&admin(&["list-devices", &alice_id], &relay_dir, &[]));
    assert!(
        listed
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("1 ") && l.contains("yes")),
        "{listed}"
    );
    let devices: serde_json::Value = serde_json::from_str(&ok(&admin(
        &["list-devices", &alice_id, "--json"],
        &relay_dir,
        &[],
    )))
    .expect("JSON");
    assert_eq!(devices[0]["id"], 1);
    assert_eq!(devices[0]["primary"], true);
    assert!(devices[0]["last_seen_day"].is_u64(), "{devices}");
    assert!(devices[0].get("key").is_none(), "no keys: {devices}");

    let export: serde_json::Value = serde_json::from_str(&ok(&admin(
        &["export-account", &bob_id, "--ciphertexts"],
        &relay_dir,
        &[],
    )))
    .expect("an export is JSON");
    assert_eq!(export["account"]["id"], bob_id.as_str());
    let items = &export["account"]["devices"][0]["queue"]["items"];
    assert_eq!(items.as_array().map(Vec::len), Some(2), "{export}");
    let out = dir.path().join("bob.json");
    let out_arg = out.to_string_lossy().into_owned();
    ok(&admin(
        &["export-account", &bob_id, "--out", &out_arg],
        &relay_dir,
        &[],
    ));
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("the file")).expect("JSON");
    assert_eq!(file["account"]["id"], bob_id.as_str());

    // Reload: nothing changed; a rate changed (and in force); other keys refused.
    assert!(ok(&admin(&["reload"], &relay_dir, &[])).contains("nothing changed"));
    std::fs::write(&config, "[rate_limits]\nsends_per_account = \"1/1h\"\n").expect("config");
    let reloaded = ok(&admin(&["reload"], &relay_dir, &[]));
    assert!(reloaded.contains("sends_per_account"), "{reloaded}");
    let mut limited = false;
    for n in 10..13 {
        let sent = within(alice.conn.send(&bob_addr, [envelope(n)])).await;
        limited |= matches!(&sent, Err(e) if e.to_string().to_lowercase().contains("rate"));
    }
    assert!(limited, "the reloaded rate is in force");
    let after = samples(&scrape(&addr));
    assert!(
        value(
            &after,
            "tern_rate_limited_total{kind=\"sends_per_account\"}"
        ) >= 1.0
    );
    std::fs::write(
        &config,
        "[rate_limits]\nsends_per_account = \"1/1h\"\nmax_keys = 5\n[media]\nmax_concurrent_uploads = 1\n",
    )
    .expect("config");
    let refused_reload = admin(&["reload"], &relay_dir, &[]);
    assert!(!refused_reload.status.success());
    let err = String::from_utf8_lossy(&refused_reload.stderr);
    assert!(
        err.contains("rate_limits.max_keys") && err.contains("media"),
        "{err}"
    );

    // Deletion by the running relay; the account is gone for the other commands.
    let deleted = ok(&admin(&["delete-account", &bob_id], &relay_dir, &[]));
    assert!(
        deleted.contains("by the running relay: 1 devices"),
        "{deleted}"
    );
    let gone = admin(&["list-devices", &bob_id], &relay_dir, &[]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("404"));

    // Stopped: the offline commands work again, and the online-only ones say so.
    alice.conn.close().await;
    relay.stop().expect("stop");
    assert!(!relay_dir.join("admin.addr").exists());
    let offline = ok(&admin(&["list-devices", &alice_id], &relay_dir, &[]));
    assert!(offline.contains("yes"), "{offline}");
    let stats = admin(&["stats"], &relay_dir, &[]);
    assert!(!stats.status.success());
    assert!(String::from_utf8_lossy(&stats.stderr).contains("no running relay"));
}

#[tokio::test]
async fn readyz_fails_at_the_disk_reserve_and_healthz_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[budget]\nmin_free_disk_bytes = 9223372036854775807\n",
    )
    .expect("config");
    let config_arg = config.to_string_lossy().into_owned();
    let relay =
        RelayProcess::start(&dir.path().join("relay"), &["--config", &config_arg]).expect("relay");
    let addr = admin_addr(&relay);
    assert_eq!(http(&addr, "GET", "/healthz", None).0, 200);
    let (status, body) = http(&addr, "GET", "/readyz", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("reserve"), "{body}");
    let s = samples(&scrape(&addr));
    assert_eq!(value(&s, "tern_disk_below_reserve"), 1.0);
    // And with the listener off, there is none.
    let off =
        RelayProcess::start(&dir.path().join("off"), &["--admin-listen", "off"]).expect("relay");
    assert!(!off.data_dir.join("admin.addr").exists());
    assert!(!off.data_dir.join("admin.token").exists());
}

#[test]
fn an_admin_address_that_cannot_be_bound_stops_the_start_with_nothing_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("relay");
    // Held here: the relay cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = held.local_addr().expect("addr").to_string();
    let mut child = Command::new(relay_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", &at])
        .arg("--data-dir")
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + crate::support::STEP;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay started without its admin listener");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(err.contains("admin.listen"), "{err}");
    assert!(
        !out.contains("listening"),
        "announced before failing: {out}"
    );
    assert!(!data.join("admin.addr").exists());
    assert!(!data.join("admin.token").exists());
    drop(held);
}
