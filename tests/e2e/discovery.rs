//! Discovery over the wire, with the relay in-process (a test attaches a verified
//! number through its service, as phone verification does): the anonymous filter
//! download and the authentication gate on evaluation, lookups and the setting.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tern_platform::clock::SystemClock;
use tern_proto::discovery::{FilterKey, FilterSnapshot};
use tern_proto::{frame, v1};
use tern_relay::config::Config;
use tern_relay::Relay;

use crate::support::{files_under, within};

async fn raw(relay: &Relay) -> (quinn::Endpoint, quinn::SendStream, quinn::RecvStream) {
    let address = relay.address();
    let (config, _) = tern_client::net::tls::pinned_client_config(address.fingerprint).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let target = format!("{}:{}", address.host, address.port)
        .parse()
        .unwrap();
    let conn = within(endpoint.connect(target, &address.host).unwrap())
        .await
        .unwrap();
    let (send, recv) = within(conn.open_bi()).await.unwrap();
    (endpoint, send, recv)
}

async fn ask(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    id: u64,
    body: v1::client_frame::Body,
) -> v1::response::Result {
    let mut out = BytesMut::new();
    frame::encode(
        &v1::ClientFrame {
            request_id: id,
            body: Some(body),
        },
        &mut out,
    );
    within(send.write_all(&out)).await.unwrap();
    let mut decoder = frame::Decoder::new(1 << 20);
    loop {
        if let Some(f) = decoder.decode_message::<v1::ServerFrame>(buf).unwrap() {
            match f.body {
                Some(v1::server_frame::Body::Response(r)) => {
                    assert_eq!(r.request_id, id);
                    return r.result.expect("a result");
                }
                other => panic!("expected a response, got {other:?}"),
            }
        }
        let chunk = within(recv.read_chunk(64 * 1024, true))
            .await
            .unwrap()
            .expect("stream open");
        buf.extend_from_slice(&chunk.bytes);
    }
}

fn code(r: &v1::response::Result) -> Option<v1::ErrorCode> {
    match r {
        v1::response::Result::Error(e) => v1::ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

#[tokio::test]
async fn the_filter_is_anonymous_and_evaluation_needs_an_account() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let relay = Relay::start(&config, Arc::new(SystemClock)).await.unwrap();
    let number = b"+15557654321";
    let account = tern_proto::AccountId([7; 16]);
    relay.discovery().attach_verified(&account, number).unwrap();
    relay.discovery().republish().unwrap();
    let (_tag, key) = relay.discovery().oprf().tag_of(number).unwrap();

    let (_endpoint, mut send, mut recv) = raw(&relay).await;
    let mut buf = BytesMut::new();
    let filter = v1::client_frame::Body::DiscoveryFilter(v1::DiscoveryFilterRequest::default());
    let part = match ask(&mut send, &mut recv, &mut buf, 1, filter).await {
        v1::response::Result::DiscoveryFilterPart(p) => p,
        other => panic!("a filter part, got {other:?}"),
    };
    assert_eq!((part.parts, part.part), (1, 0));
    let snapshot = FilterSnapshot::decode(&part.data).expect("a snapshot");
    assert!(snapshot.contains(FilterKey(key.0)));

    // Evaluation, lookups and the setting need an authenticated account, even when
    // malformed.
    let bodies = [
        v1::client_frame::Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
            blinded: Bytes::from(vec![0xe2; 32]),
        }),
        v1::client_frame::Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
            blinded: Bytes::from(vec![1; 3 * 32]),
        }),
        v1::client_frame::Body::DiscoveryLookup(v1::DiscoveryLookupRequest {
            tags: Bytes::from(vec![1; 16]),
        }),
        v1::client_frame::Body::SetDiscoverable(v1::SetDiscoverableRequest {
            discoverable: false,
        }),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let r = ask(&mut send, &mut recv, &mut buf, 10 + i as u64, body).await;
        assert_eq!(code(&r), Some(v1::ErrorCode::Unauthorized), "request {i}");
    }

    // The relay's disk holds the number in no form.
    let digits = &number[1..];
    for file in files_under(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(digits.len()).any(|w| w == digits),
            "{} holds the number",
            file.display()
        );
    }
    relay.shutdown().await.unwrap();
}

// ---- The client's discovery against real relay processes (issue 13, package D). ----
//
// Here the relay's offline seed hook (`tern_relay::discovery::seed`) attaches the
// numbers while the relay is stopped; the round trip through verification (webhook
// and dev-file verifier, `set_discoverable(false)`, a restart with the filter marked
// stale, then discovery) is in discovery_privacy.rs.

mod client_sync {
    use std::path::Path;
    use std::sync::Arc;

    use tern_client::store::SledKv;
    use tern_client::{Client, ErrorCode, Events};
    use tern_proto::AccountId;
    use tern_relay::config::Config;

    use crate::support::{within, RelayProcess};

    fn store(dir: &Path, name: &str) -> Arc<SledKv> {
        Arc::new(SledKv::open(&dir.join(name), &[9u8; 32]).expect("device store"))
    }

    /// Users' numbers, in E.164, and how one address book writes them.
    const USERS: [(&str, &str); 4] = [
        ("+442079460101", "020 7946 0101"),
        ("+442079460102", "+44 (0)20 7946 0102"),
        ("+442079460103", "0044 20 7946 0103"),
        ("+442079460104", "+44-20-7946-0104"),
    ];
    const SYNCER: &str = "+442079460100";
    const OTHER_SYNCER: &str = "+442079460200";

    /// The relay's `discovery_evaluate` lines so far, as `batch=… bytes=…`.
    fn evaluations(relay: &RelayProcess) -> Vec<String> {
        relay
            .log_text()
            .lines()
            .filter(|l| l.contains("discovery_evaluate") && l.contains("batch="))
            .map(|l| {
                let at = l.find("batch=").expect("batch");
                l[at..].trim().to_owned()
            })
            .collect()
    }

    async fn discover(c: &Client, book: &[String]) -> tern_client::client::DiscoveryReport {
        // The relay publishes its first filter just after it starts listening.
        for _ in 0..100 {
            match within(c.discover(book, "GB")).await {
                Err(e) if e.relay_code() == Some(ErrorCode::Unavailable) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => return other.expect("discover"),
            }
        }
        panic!("no discovery filter published");
    }

    struct World {
        _dir: tempfile::TempDir,
        relay: RelayProcess,
        syncer: (Client, Events),
        other: (Client, Events),
        users: Vec<(Client, Events)>,
    }

    /// A relay with six accounts: two that sync, four users with numbers, all
    /// seeded offline, the relay restarted on its port.
    async fn world() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("relay");
        let mut relay =
            RelayProcess::start(&data, &["--log", "info,tern_relay=debug"]).expect("relay");
        let mut reg = Vec::new();
        for name in ["syncer", "other", "u1", "u2", "u3", "u4"] {
            reg.push(
                Client::register(&relay.address, store(dir.path(), name))
                    .await
                    .expect("register"),
            );
        }
        let mut pairs: Vec<(AccountId, String)> = vec![
            (reg[0].0.account(), SYNCER.into()),
            (reg[1].0.account(), OTHER_SYNCER.into()),
        ];
        for (i, (e164, _)) in USERS.iter().enumerate() {
            pairs.push((reg[2 + i].0.account(), (*e164).into()));
        }
        let port = relay.address.port;
        relay.stop().expect("stop");
        let config = Config {
            data_dir: data.clone(),
            ..Config::default()
        };
        assert_eq!(
            tern_relay::discovery::seed::attach_numbers(
                &config.data_dir,
                &pairs
                    .iter()
                    .map(|(a, n)| (*a, n.as_str()))
                    .collect::<Vec<_>>()
            )
            .expect("seed"),
            6
        );
        let relay = RelayProcess::start_at(
            &data,
            &format!("127.0.0.1:{port}"),
            &["--log", "info,tern_relay=debug"],
        )
        .expect("restart");
        let mut reg = reg.into_iter();
        let syncer = reg.next().expect("syncer");
        let other = reg.next().expect("other");
        World {
            _dir: dir,
            relay,
            syncer,
            other,
            users: reg.collect(),
        }
    }

    #[tokio::test]
    async fn finds_exactly_the_discoverable_contacts_and_caches_what_it_evaluated() {
        let w = world().await;
        let syncer = &w.syncer.0;
        // The fourth user turns discoverability off: lookups follow at once.
        within(w.users[3].0.set_discoverable(false))
            .await
            .expect("off");
        let mut book: Vec<String> = USERS.iter().map(|(_, b)| (*b).to_owned()).collect();
        book.extend((0..5).map(|i| format!("020 7946 09{i:02}"))); // non-users
        book.push("not a number".into());
        book.push("+44 20".into());
        book.push(USERS[0].0.into()); // a duplicate, in another format

        let report = discover(syncer, &book).await;
        let mut expected: Vec<(String, AccountId)> = (0..3)
            .map(|i| (USERS[i].0.to_owned(), w.users[i].0.account()))
            .collect();
        expected.sort();
        assert_eq!(report.found, expected);
        assert_eq!(
            report.invalid,
            vec!["not a number".to_owned(), "+44 20".into()]
        );
        assert_eq!(report.evaluated, 9);
        // One batch of 9 numbers, padded to 16 points.
        assert_eq!(evaluations(&w.relay), vec!["batch=16 bytes=512".to_owned()]);
        // Each found user is a contact now, known by its identity key.
        for u in &w.users[..3] {
            assert!(syncer.safety_number(&u.0.account()).await.is_some());
        }
        assert!(syncer
            .safety_number(&w.users[3].0.account())
            .await
            .is_none());

        // A second sync of the same book evaluates nothing.
        let again = discover(syncer, &book).await;
        assert_eq!((again.found, again.evaluated), (expected.clone(), 0));
        assert_eq!(evaluations(&w.relay).len(), 1);

        // Forgetting discovery: the next sync evaluates every number again.
        within(syncer.forget_discovery()).await.expect("forget");
        let fresh = discover(syncer, &book).await;
        assert_eq!((fresh.found, fresh.evaluated), (expected, 9));
        assert_eq!(evaluations(&w.relay).len(), 2);
    }

    #[tokio::test]
    async fn the_relay_sees_the_same_of_two_books_of_one_size() {
        let w = world().await;
        let book_a: Vec<String> = (0..300)
            .map(|i| format!("+44207946{:04}", 1000 + i))
            .collect();
        let book_b: Vec<String> = (0..300)
            .map(|i| format!("020 7946 {:04}", 5000 + i))
            .collect();
        let a = discover(&w.syncer.0, &book_a).await;
        let seen_a = evaluations(&w.relay);
        let b = discover(&w.other.0, &book_b).await;
        let seen_b: Vec<String> = evaluations(&w.relay)[seen_a.len()..].to_vec();
        assert_eq!((a.evaluated, b.evaluated), (300, 300));
        assert!(a.found.is_empty() && b.found.is_empty());
        assert_eq!(seen_a, vec!["batch=512 bytes=16384".to_owned()]);
        assert_eq!(seen_a, seen_b);
    }
}
