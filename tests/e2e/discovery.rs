//! Discovery over the wire, with the relay in-process (a test attaches a verified
//! number through its service, as phone verification will): the anonymous filter
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
