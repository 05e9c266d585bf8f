//! The privacy scan (issue 13): a relay process at `--log trace` verifies marker
//! numbers through the webhook and through the dev-file verifier (one user then
//! turns discoverability off); the relay stops, the test marks its published filter
//! stale (touching no number) and starts it again on the same data directory, port
//! and settings, so it publishes the verified tags; a verified user discovers over
//! an address book of the user numbers, the non-user markers and their national
//! forms, finding exactly the discoverable others; one account is deleted, the
//! relay stops. Then no file under its data directory (raw bytes, recursively, sled
//! included) and neither stdout nor stderr of either run holds any marker number as
//! digits, national digits, E.164, or the SHA-256 of either (raw or hex). The test's
//! gateway did receive the numbers, so the scan looks for bytes that really went
//! through the relay.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_client::client::DiscoveryReport;
use tern_client::store::SledKv;
use tern_client::{Client, ErrorCode};

use crate::http::TestHttpServer;
use crate::support::hex;
use crate::support::{files_under, relay_binary, within, STEP};

/// A marker number: E.164, and as an address book in its region writes it.
struct Marker {
    e164: &'static str,
    national: &'static str,
    region: &'static str,
}

const fn marker(e164: &'static str, national: &'static str, region: &'static str) -> Marker {
    Marker {
        e164,
        national,
        region,
    }
}

/// Users, all verified: the first discovers (and is deleted), the last turns
/// discoverability off. Fictional ranges that libphonenumber takes as valid.
const USERS: [Marker; 3] = [
    marker("+12015550123", "(201) 555-0123", "US"),
    marker("+442079460123", "020 7946 0123", "GB"),
    marker("+12015550124", "201-555-0124", "US"),
];
/// A non-user whose verification was started, never confirmed: the relay saw it.
const NON_USER: Marker = marker("+12015550199", "(201) 555-0199", "US");
/// A non-user only in the address book.
const BOOK_ONLY: Marker = marker("+442079460999", "020 7946 0999", "GB");

fn markers() -> impl Iterator<Item = &'static Marker> {
    USERS.iter().chain([&NON_USER, &BOOK_ONLY])
}

/// Every form of `m` the scan looks for.
fn forms(m: &Marker) -> Vec<(String, Vec<u8>)> {
    let digits = m.e164.trim_start_matches('+');
    let national: String = m.national.chars().filter(char::is_ascii_digit).collect();
    let national = national.trim_start_matches('0').to_owned();
    let mut out = vec![
        ("E.164".to_owned(), m.e164.as_bytes().to_vec()),
        ("digits".to_owned(), digits.as_bytes().to_vec()),
        ("national digits".to_owned(), national.into_bytes()),
    ];
    for (name, text) in [("E.164", m.e164), ("digits", digits)] {
        let sha = Sha256::digest(text.as_bytes());
        out.push((format!("sha256({name})"), sha.to_vec()));
        out.push((format!("hex sha256({name})"), hex(&sha).into_bytes()));
        out.push((
            format!("HEX sha256({name})"),
            hex(&sha).to_uppercase().into_bytes(),
        ));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// How the test starts its relay: config, flags, where its output goes.
struct Setup<'a> {
    dir: &'a Path,
    data: PathBuf,
    toml: String,
    extra: &'a [&'a str],
}

/// A relay process whose stdout and stderr both go to files outside its data dir.
struct Traced {
    child: std::process::Child,
    address: tern_proto::RelayAddress,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Traced {
    /// Starts run `run` (names its output files) listening on `listen`.
    fn start(setup: &Setup<'_>, run: &str, listen: &str) -> Traced {
        let config = setup.dir.join("relay.toml");
        std::fs::write(&config, &setup.toml).expect("config");
        let stdout = setup.dir.join(format!("{run}.stdout"));
        let stderr = setup.dir.join(format!("{run}.stderr"));
        let child = Command::new(relay_binary())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&setup.data)
            .args(["--listen", listen, "--log", "trace"])
            .args(setup.extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout"))
            .stderr(std::fs::File::create(&stderr).expect("stderr"))
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + STEP;
        let address = loop {
            let text = std::fs::read_to_string(&stdout).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find_map(|l| l.strip_prefix("tern-relay listening on "))
            {
                break line.parse().expect("address");
            }
            assert!(
                Instant::now() < deadline,
                "no address; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Traced {
            child,
            address,
            stdout,
            stderr,
        }
    }

    /// SIGTERM, then wait (bounded), as an operator stops it.
    fn stop(mut self) -> [PathBuf; 2] {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + STEP;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "relay ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        [self.stdout.clone(), self.stderr.clone()]
    }
}

fn store(dir: &Path, name: &str) -> Arc<SledKv> {
    Arc::new(SledKv::open(&dir.join(name), &[7u8; 32]).expect("device store"))
}

/// Scans every file under `data` and every run's output files for every form of
/// every marker number; panics naming what was found where.
fn scan(data: &Path, runs: &[[PathBuf; 2]]) {
    let mut files = files_under(data);
    assert!(
        !files.is_empty(),
        "the data directory holds the relay's files"
    );
    for [stdout, stderr] in runs {
        let trace = std::fs::read_to_string(stderr).unwrap_or_default();
        assert!(trace.contains("TRACE"), "{} is at trace", stderr.display());
        files.extend([stdout.clone(), stderr.clone()]);
    }
    let mut found = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for m in markers() {
            for (form, needle) in forms(m) {
                if contains(&bytes, &needle) {
                    found.push(format!("{form} of {} in {}", m.e164, file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "numbers found:\n{}", found.join("\n"));
}

/// Discovery over `book`, once the restarted relay has published its filter.
async fn discover(c: &Client, book: &[&str], region: &str) -> DiscoveryReport {
    for _ in 0..100 {
        match within(c.discover(book, region)).await {
            Err(e) if e.relay_code() == Some(ErrorCode::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.expect("discover"),
        }
    }
    panic!("no discovery filter published");
}

/// Runs the whole scenario against relays started by `setup` and returns both
/// runs' output files: every user verifies (`code` fetches the code the relay
/// sent for a number), the last turns discoverability off, the non-user's session
/// stays unconfirmed; restart with the filter marked stale; the first user
/// discovers, then is deleted.
async fn exercise<F>(setup: &Setup<'_>, code: F) -> Vec<[PathBuf; 2]>
where
    F: Fn(&str, &tern_proto::VerificationId) -> String,
{
    let relay = Traced::start(setup, "first", "127.0.0.1:0");
    let address = relay.address.clone();
    let mut users = Vec::new();
    for (i, m) in USERS.iter().enumerate() {
        let (client, _events) = Client::register(&address, store(setup.dir, &format!("user{i}")))
            .await
            .expect("register");
        let id = within(client.start_verification(m.e164))
            .await
            .expect("started");
        let discoverable = within(client.confirm_verification(id, &code(m.e164, &id)))
            .await
            .expect("verified");
        assert!(discoverable, "discoverable by default once verified");
        users.push(client);
    }
    within(users[2].set_discoverable(false)).await.expect("off");
    let (other, _events) = Client::register(&address, store(setup.dir, "other"))
        .await
        .expect("register");
    within(other.start_verification(NON_USER.e164))
        .await
        .expect("started, never confirmed");
    let first = relay.stop();

    // The filter published at the first start predates the verifications.
    tern_relay::discovery::publish::mark_stale(&setup.data.join("discovery")).expect("stale");
    let relay = Traced::start(setup, "second", &format!("127.0.0.1:{}", address.port));
    assert_eq!(relay.address, address, "same port, same certificate");

    // Every marker in E.164 and the US ones in national form, read in the US.
    let mut book: Vec<&str> = markers().map(|m| m.e164).collect();
    book.extend(markers().filter(|m| m.region == "US").map(|m| m.national));
    let report = discover(&users[0], &book, "US").await;
    // Not itself, not the user who turned discoverability off, no non-user.
    let expected = vec![(USERS[1].e164.to_owned(), users[1].account())];
    assert_eq!(report.found, expected);
    assert!(report.invalid.is_empty(), "{:?}", report.invalid);
    assert_eq!(report.evaluated, 5);
    assert!(users[0].safety_number(&users[1].account()).await.is_some());
    assert!(users[0].safety_number(&users[2].account()).await.is_none());
    // The GB ones in national form: the same numbers, cached, evaluated again never.
    let gb: Vec<&str> = markers()
        .filter(|m| m.region == "GB")
        .map(|m| m.national)
        .collect();
    let again = discover(&users[0], &gb, "GB").await;
    assert_eq!((again.found, again.evaluated), (expected, 0));

    within(users[0].delete_account()).await.expect("deleted");
    for c in users.iter().skip(1).chain([&other]) {
        c.shutdown().await;
    }
    let second = relay.stop();
    // The second run's log, scanned too, covers the discovery.
    let log = std::fs::read_to_string(&second[1]).expect("log");
    assert!(log.contains("discovery_evaluate"), "the relay evaluated");
    vec![first, second]
}

#[tokio::test]
async fn no_number_reaches_disk_or_logs_through_the_webhook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = TestHttpServer::start().await.expect("http");
    let setup = Setup {
        dir: dir.path(),
        data: dir.path().join("relay"),
        toml: format!(
            "[verification]\nverifier = \"webhook\"\n[verification.webhook]\nurl = \"{}\"\nallow_http = true\n",
            server.url("/sms")
        ),
        extra: &[],
    };
    let srv = &server;
    let runs = exercise(&setup, |number, _| {
        crate::verification::code_sent(srv, number)
            .as_str()
            .to_owned()
    })
    .await;
    // Sanity: the numbers did go through the relay, to the gateway.
    let sent: Vec<String> = (server.requests().iter())
        .filter_map(|r| r.json())
        .filter_map(|j| j["to"].as_str().map(str::to_owned))
        .collect();
    for m in USERS.iter().chain([&NON_USER]) {
        assert!(sent.iter().any(|s| s == m.e164), "{} sent", m.e164);
    }
    scan(&setup.data, &runs);
}

#[tokio::test]
async fn no_number_reaches_disk_or_logs_through_the_dev_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = Setup {
        dir: dir.path(),
        data: dir.path().join("relay"),
        toml: "[verification]\nverifier = \"dev-file\"\n".to_owned(),
        extra: &["--allow-dev-verifier"],
    };
    let codes = setup.data.join("dev-verification");
    let runs = exercise(&setup, |_, id| {
        std::fs::read_to_string(codes.join(id.to_hex())).expect("code file")
    })
    .await;
    scan(&setup.data, &runs);
}
