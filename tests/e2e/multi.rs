//! Multi-recipient sends over QUIC against a real relay process: one upload, the
//! body stored once on the relay's disk, every device delivered, bad requests typed.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_client::identity::DeviceKeyPair;
use tern_client::net::{Incoming, RelayConnection};
use tern_proto::{
    frame, v1, ClientRequest, DeviceAddress, DeviceId, ErrorCode, MessageId, MultiSend,
    MultiSendResult, RecipientAccount, RelayAddress, Reply, Request, ServerMessage,
};

use crate::support::{files_under, register, within, Device, RelayProcess, STEP};

const TOKEN: &[u8] = b"multi-send delivery token";
const MARKER: &[u8] = b"MULTI-BODY-MARKER-41f9c2";

/// A raw anonymous QUIC connection with the relay pinned: the request stream.
struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    next_id: u64,
}

impl Raw {
    async fn open(relay: &RelayAddress) -> Raw {
        let (config, _) = tern_client::net::tls::pinned_client_config(relay.fingerprint).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let target = format!("{}:{}", relay.host, relay.port).parse().unwrap();
        let conn = within(endpoint.connect(target, &relay.host).unwrap())
            .await
            .unwrap();
        let (send, recv) = within(conn.open_bi()).await.unwrap();
        Raw {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            next_id: 1,
        }
    }

    /// Sends one multi-send frame and reads its answer.
    async fn multi_send(&mut self, m: MultiSend) -> Result<MultiSendResult, ErrorCode> {
        let id = self.next_id;
        self.next_id += 1;
        let frame: v1::ClientFrame = ClientRequest {
            id,
            request: Request::MultiSend(m),
        }
        .into();
        let mut out = BytesMut::new();
        frame::encode(&frame, &mut out);
        within(self.send.write_all(&out)).await.unwrap();
        let mut decoder = frame::Decoder::new(1 << 20);
        loop {
            if let Some(f) = decoder
                .decode_message::<v1::ServerFrame>(&mut self.buf)
                .unwrap()
            {
                match ServerMessage::try_from(f).unwrap() {
                    ServerMessage::Response { id: got, result } => {
                        assert_eq!(got, id);
                        return match result {
                            Ok(Reply::MultiSend(r)) => Ok(r),
                            Ok(other) => panic!("unexpected reply {other:?}"),
                            Err(e) => Err(e.code),
                        };
                    }
                    other => panic!("expected a response, got {other:?}"),
                }
            }
            let chunk = within(self.recv.read_chunk(64 * 1024, true))
                .await
                .unwrap()
                .expect("stream open");
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }
}

/// An account with two connected devices and a delivery token.
async fn account(relay: &RelayAddress) -> (Device, Device) {
    let first = register(relay).await;
    within(first.conn.set_delivery_token(TOKEN)).await.unwrap();
    let key = DeviceKeyPair::generate();
    let id = within(
        first
            .conn
            .add_device(&first.identity, &first.address.account, &key.public()),
    )
    .await
    .unwrap();
    let address = DeviceAddress {
        account: first.address.account,
        device: id,
    };
    let (second, _) = Device::connect(relay, address, key, first.identity.clone()).await;
    (first, second)
}

fn recipient(a: &Device, devices: &[DeviceId]) -> RecipientAccount {
    RecipientAccount {
        account: a.address.account,
        delivery_token: Bytes::from_static(TOKEN),
        device_list_version: 0,
        devices: devices.to_vec(),
        parts: Vec::new(),
    }
}

fn body(n: u8) -> Bytes {
    let mut b = MARKER.to_vec();
    b.push(n);
    b.resize(3000, 0x77);
    Bytes::from(b)
}

fn multi(n: u8, recipients: Vec<RecipientAccount>) -> MultiSend {
    MultiSend {
        message_id: MessageId([n; 16]),
        body: body(n),
        recipients,
    }
}

/// How often `needle` appears in the files under `dir`.
fn occurrences(dir: &std::path::Path, needle: &[u8]) -> usize {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|bytes| bytes.windows(needle.len()).filter(|w| *w == needle).count())
        .sum()
}

#[tokio::test]
async fn one_upload_reaches_six_devices_and_the_relay_stores_the_body_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let mut devices = Vec::new();
    for _ in 0..3 {
        let (a, b) = account(&relay.address).await;
        devices.push(a);
        devices.push(b);
    }
    let recipients: Vec<RecipientAccount> = devices
        .chunks(2)
        .map(|p| recipient(&p[0], &[p[0].address.device, p[1].address.device]))
        .collect();
    let mut raw = Raw::open(&relay.address).await;
    let result = raw.multi_send(multi(1, recipients.clone())).await.unwrap();
    assert_eq!(
        result,
        MultiSendResult {
            accepted: 6,
            refused: Vec::new()
        }
    );
    let mut marker = MARKER.to_vec();
    marker.push(1);
    assert_eq!(
        occurrences(&relay.data_dir, &marker),
        1,
        "the relay's data directory holds the body once"
    );
    let mut seqs = Vec::new();
    for d in &mut devices {
        let got = d.next_delivery().await;
        assert_eq!(got.message_id, MessageId([1; 16]));
        assert_eq!(got.shared_body.as_ref(), Some(&body(1)), "the body, once");
        assert!(got.payload.is_empty());
        seqs.push(got.seq);
    }
    for (d, seq) in devices.iter().zip(&seqs) {
        within(d.conn.ack(&[*seq])).await.unwrap();
    }
    // Gone from the disk after the last ack (the scrub runs every 500 ms).
    let deadline = Instant::now() + STEP;
    while occurrences(&relay.data_dir, &marker) > 0 {
        assert!(Instant::now() < deadline, "the body stayed on disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn malformed_multi_sends_get_typed_errors_and_earlier_messages_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let (mut alice, alice2) = account(&relay.address).await;
    let (bob, _bob2) = account(&relay.address).await;
    assert_eq!(alice.next().await, Incoming::QueueEmpty);
    let (addr2, key2, id2) = alice2.go_offline().await;
    let both = [alice.address.device, addr2.device];
    let mut raw = Raw::open(&relay.address).await;
    let first = raw
        .multi_send(multi(1, vec![recipient(&alice, &both)]))
        .await
        .unwrap();
    assert_eq!(first.accepted, 2);

    // 1001 devices.
    let many: Vec<DeviceId> = (1..=1001).map(|i| DeviceId::new(i).unwrap()).collect();
    let err = raw.multi_send(multi(2, vec![recipient(&bob, &many)])).await;
    assert_eq!(err, Err(ErrorCode::TooLarge));
    // The same account twice.
    let err = raw
        .multi_send(multi(
            3,
            vec![recipient(&bob, &both[..1]), recipient(&bob, &both[..1])],
        ))
        .await;
    assert_eq!(err, Err(ErrorCode::BadRequest));
    // Parts that do not match the devices.
    let mut mismatched = recipient(&bob, &both);
    mismatched.parts = vec![Bytes::from_static(b"one part")];
    let err = raw.multi_send(multi(4, vec![mismatched])).await;
    assert_eq!(err, Err(ErrorCode::BadRequest));
    // A wrong token and an unknown device: refused per recipient, the rest stored.
    let mut wrong = recipient(&bob, &both[..1]);
    wrong.delivery_token = Bytes::from_static(b"wrong");
    let unknown = DeviceId::new(9).unwrap();
    let mixed = raw
        .multi_send(multi(
            5,
            vec![wrong, recipient(&alice, &[both[0], unknown])],
        ))
        .await
        .unwrap();
    assert_eq!(mixed.accepted, 1);
    assert_eq!(
        mixed
            .refused
            .iter()
            .map(|r| (r.recipient, r.device, r.code))
            .collect::<Vec<_>>(),
        vec![
            (0, None, ErrorCode::Unauthorized),
            (1, Some(unknown), ErrorCode::UnknownRecipient)
        ]
    );

    // Alice's first device: the first and the last; her offline device, the first.
    let got: Vec<MessageId> = vec![
        alice.next_delivery().await.message_id,
        alice.next_delivery().await.message_id,
    ];
    assert_eq!(got, vec![MessageId([1; 16]), MessageId([5; 16])]);
    let (mut alice2, queued) = Device::connect(&relay.address, addr2, key2, id2).await;
    assert_eq!(queued, 1);
    let d = alice2.next_delivery().await;
    assert_eq!(d.shared_body.as_ref(), Some(&body(1)));
    // Nothing of the refused sends reached the disk.
    for n in 2..=4u8 {
        let mut marker = MARKER.to_vec();
        marker.push(n);
        assert_eq!(occurrences(&relay.data_dir, &marker), 0, "send {n}");
    }
    let conn = within(RelayConnection::connect(&relay.address))
        .await
        .unwrap()
        .0;
    within(conn.ping()).await.unwrap();
}

/// A relay whose connections must authenticate or make an anonymous request within
/// 1 s, and may then idle for a minute.
fn relay_with_deadline(dir: &std::path::Path) -> RelayProcess {
    let file = dir.join("relay.toml");
    std::fs::write(
        &file,
        "[connections]\nauth_deadline = \"1s\"\nanonymous_idle = \"60s\"\n",
    )
    .unwrap();
    RelayProcess::start(&dir.join("relay"), &["--config", file.to_str().unwrap()]).unwrap()
}

#[tokio::test]
async fn a_multi_send_that_stores_nothing_leaves_the_connection_pending() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_deadline(dir.path());
    let (bob, _bob2) = account(&relay.address).await;
    let started = Instant::now();
    let mut stored = Raw::open(&relay.address).await;
    let sent = stored
        .multi_send(multi(1, vec![recipient(&bob, &[bob.address.device])]))
        .await
        .unwrap();
    assert_eq!(sent.accepted, 1);
    let mut refused = Raw::open(&relay.address).await;
    let mut wrong = recipient(&bob, &[bob.address.device]);
    wrong.delivery_token = Bytes::from_static(b"not bob's token");
    let none = refused.multi_send(multi(2, vec![wrong])).await.unwrap();
    assert_eq!((none.accepted, none.refused.len()), (0, 1));
    // Still pending: closed at the authentication deadline, not after a minute idle.
    let e = within(refused.conn.closed()).await;
    assert!(
        matches!(&e, quinn::ConnectionError::ApplicationClosed(c)
            if &c.reason[..] == b"authentication deadline"),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The one that stored something is anonymous: still open.
    assert!(stored.conn.close_reason().is_none());
}

#[tokio::test]
async fn a_maximal_multi_send_fits_before_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).unwrap();
    let (mut bob, _bob2) = account(&relay.address).await;
    // A body at the wire's limit and 1,000 devices with a 64-byte part each: some
    // 390 KB, over the 264 KiB frame limit before authentication.
    let mut recipients = vec![RecipientAccount {
        parts: vec![Bytes::from(vec![0x55; 64])],
        ..recipient(&bob, &[bob.address.device])
    }];
    for i in 1..tern_proto::limits::MAX_RECIPIENT_DEVICES as u32 {
        let mut account = [0xA5; 16];
        account[..4].copy_from_slice(&i.to_be_bytes());
        recipients.push(RecipientAccount {
            account: tern_proto::AccountId(account),
            delivery_token: Bytes::from(vec![0x77; 32]),
            device_list_version: 0,
            devices: vec![DeviceId::PRIMARY],
            parts: vec![Bytes::from(vec![0x55; 64])],
        });
    }
    let send = MultiSend {
        message_id: MessageId([7; 16]),
        body: Bytes::from(vec![0x42; tern_proto::limits::DEFAULT_MAX_ENVELOPE]),
        recipients,
    };
    let frame: v1::ClientFrame = ClientRequest {
        id: 1,
        request: Request::MultiSend(send.clone()),
    }
    .into();
    assert!(frame::encoded_len(&frame) > 264 * 1024);
    let mut raw = Raw::open(&relay.address).await;
    let result = raw.multi_send(send).await.unwrap();
    assert_eq!(result.accepted, 1);
    assert_eq!(
        result.refused.len(),
        999,
        "strangers, refused in the answer"
    );
    let got = bob.next_delivery().await;
    assert_eq!(got.message_id, MessageId([7; 16]));
}
