//! Valid inputs for every target, made by the code under test itself, plus a few
//! edge cases: the seed corpus. `cargo run -p tern-fuzz-targets --example
//! write_corpus` writes them under `fuzz/corpus/<target>/seed-<name>`.

use bytes::{Bytes, BytesMut};
use prost::Message;
use rand::RngCore;
use tern_client::crypto::{attachment, sealed};
use tern_client::ContactCard;
use tern_proto::address::Fingerprint;
use tern_proto::discovery::{BlindedBatch, DiscoveredAccount, FilterKind, FilterPart, Tag};
use tern_proto::frame;
use tern_proto::{
    v1, AccountId, BlobStatus, BlobStreamRequest, BlobStreamResponse, ClientRequest, Code,
    CommitId, Delivery, DeviceAddress, DeviceBundle, DeviceEntry, DeviceId, DeviceList, Envelope,
    ErrorCode, ErrorReply, GroupCommit, GroupHandle, KeyUpload, MessageId, MultiSend,
    RecipientAccount, RelayAddress, Reply, Request, ServerMessage, SignedDeviceList, SignedKey,
    SlotId, VerificationId, E164,
};
use tern_relay::store::{Flush, LogOptions, LogStore, MailboxStore};

use crate::crypto::ATTACHMENT_KEY;
use crate::fixture::{next_messages, rng, FIXTURE};
use crate::stateful::encode_ops;
use crate::store::SEGMENT_NAME;

/// One seed: target, file name (without the `seed-` prefix), bytes.
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_owned(), bytes));
    };
    for (name, request) in client_requests() {
        add(
            "requests",
            name,
            v1::ClientFrame::from(request).encode_to_vec(),
        );
    }
    for (name, request) in blob_requests() {
        add(
            "requests",
            name,
            v1::BlobStreamRequest::from(request).encode_to_vec(),
        );
    }
    for (name, message) in server_messages() {
        add(
            "replies",
            name,
            v1::ServerFrame::from(message).encode_to_vec(),
        );
    }
    for (name, response) in blob_responses() {
        add(
            "replies",
            name,
            v1::BlobStreamResponse::from(response).encode_to_vec(),
        );
    }
    frames(&mut add);
    ids(&mut add);
    crypto(&mut add);
    discovery(&mut add);
    add("log_scan", "empty", Vec::new());
    add("log_scan", "three-mailboxes", segment());
    add(
        "two_clients",
        "conversation",
        encode_ops(&[
            (0, 0, 0),
            (0, 0, 0),
            (2, 1, 0),
            (2, 1, 0),
            (0, 1, 0),
            (2, 0, 0),
        ]),
    );
    add(
        "two_clients",
        "drop-duplicate-reorder-corrupt-restart",
        encode_ops(&[
            (0, 0, 0),
            (0, 0, 0),
            (0, 0, 0),
            (0, 0, 0),
            (3, 1, 0),
            (4, 1, 0),
            (2, 1, 0),
            (5, 1, 1),
            (6, 1, 3),
            (7, 1, 0),
            (2, 1, 0),
            (0, 1, 0),
            (7, 0, 0),
            (2, 0, 0),
        ]),
    );
    out
}

/// Snapshots of 0, 1 and 100 keys, a delta chain, and a snapshot cut short.
fn discovery(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    use tern_proto::discovery::{FilterDelta, FilterSnapshot};
    let keys: Vec<u64> = (1..=100u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    for n in [0, 1, 100] {
        let snapshot = FilterSnapshot::build(20_000, keys[..n].to_vec()).expect("distinct keys");
        add(
            "discovery_filter",
            &format!("snapshot-{n}"),
            snapshot.encode(),
        );
    }
    let full = FilterSnapshot::build(20_000, keys.clone()).expect("distinct keys");
    let bytes = full.encode();
    add(
        "discovery_filter",
        "snapshot-truncated",
        bytes[..bytes.len() / 2].to_vec(),
    );
    let first = FilterDelta::between(20_000, &keys[..50], 20_001, &keys[10..60]);
    let second = FilterDelta::between(20_001, &keys[10..60], 20_002, &keys[..0]);
    let mut chain = first.encode();
    second.encode_into(&mut chain);
    add("discovery_filter", "deltas-two", chain);
    add(
        "discovery_filter",
        "delta-empty",
        FilterDelta::between(1, &[], 2, &[]).encode(),
    );
}

fn address(account: u8, device: u32) -> DeviceAddress {
    DeviceAddress {
        account: AccountId([account; 16]),
        device: DeviceId::new(device).unwrap_or(DeviceId::PRIMARY),
    }
}

fn envelope(n: u8, len: usize) -> Envelope {
    Envelope {
        message_id: MessageId([n; 16]),
        payload: Bytes::from(vec![n; len]),
    }
}

fn signed(id: u32) -> SignedKey {
    SignedKey {
        id,
        key: [id as u8; 32],
        signature: [3; 64],
    }
}

fn client_requests() -> Vec<(&'static str, ClientRequest)> {
    let r = |id, request| ClientRequest { id, request };
    vec![
        ("ping", r(1, Request::Ping)),
        (
            "register",
            r(
                2,
                Request::Register {
                    identity_key: [1; 32],
                    device_key: [2; 32],
                    device_signature: [3; 64],
                    session_proof: [4; 64],
                },
            ),
        ),
        (
            "add-device",
            r(
                3,
                Request::AddDevice {
                    account: AccountId([5; 16]),
                    device_key: [6; 32],
                    device_signature: [7; 64],
                },
            ),
        ),
        (
            "auth",
            r(
                4,
                Request::Auth {
                    address: address(8, 2),
                    signature: [9; 64],
                },
            ),
        ),
        (
            "send",
            r(
                5,
                Request::Send {
                    to: address(10, 1),
                    envelopes: vec![envelope(1, 40), envelope(2, 0)],
                    device_list_version: 3,
                },
            ),
        ),
        (
            "ack",
            r(
                6,
                Request::Ack {
                    seqs: vec![1, 2, u64::MAX],
                },
            ),
        ),
        (
            "publish-keys",
            r(
                7,
                Request::PublishKeys(KeyUpload {
                    identity_dh: Some(signed(1)),
                    signed_prekey: Some(signed(2)),
                    one_time: vec![(3, [3; 32]), (4, [4; 32])],
                }),
            ),
        ),
        (
            "fetch-keys",
            r(
                8,
                Request::FetchKeys {
                    account: AccountId([11; 16]),
                    device: None,
                    delivery_token: None,
                },
            ),
        ),
        ("sender-certificate", r(9, Request::SenderCertificate)),
        (
            "set-delivery-token",
            r(
                10,
                Request::SetDeliveryToken {
                    token_hash: [12; 32],
                },
            ),
        ),
        (
            "sealed-send",
            r(
                11,
                Request::SealedSend {
                    to: address(13, 3),
                    delivery_token: Bytes::from_static(b"token"),
                    envelopes: vec![envelope(4, 100)],
                    device_list_version: 0,
                },
            ),
        ),
        ("relay-info", r(12, Request::RelayInfo)),
        (
            "blob-status",
            r(13, Request::BlobStatus { blob_id: [14; 32] }),
        ),
        (
            "touch-blob",
            r(14, Request::TouchBlob { blob_id: [15; 32] }),
        ),
        (
            "list-devices",
            r(
                15,
                Request::ListDevices {
                    account: AccountId([16; 16]),
                    delivery_token: Bytes::from_static(b"token"),
                },
            ),
        ),
        (
            "delete-account",
            r(
                16,
                Request::DeleteAccount {
                    signature: [17; 64],
                },
            ),
        ),
        (
            "discovery-evaluate",
            r(
                16,
                Request::DiscoveryEvaluate {
                    blinded: BlindedBatch::new(Bytes::from(vec![17; 2 * 32])).expect("2 points"),
                },
            ),
        ),
        (
            "discovery-lookup",
            r(
                17,
                Request::DiscoveryLookup {
                    tags: vec![Tag([18; 16])],
                },
            ),
        ),
        (
            "discovery-filter",
            r(
                18,
                Request::DiscoveryFilter {
                    since_day: 20_000,
                    day: 20_001,
                    part: 1,
                },
            ),
        ),
        ("set-discoverable", r(19, Request::SetDiscoverable(true))),
        (
            "start-verification",
            r(
                20,
                Request::StartVerification {
                    number: E164::parse("+15550100123").expect("E.164"),
                },
            ),
        ),
        (
            "check-verification",
            r(
                21,
                Request::CheckVerification {
                    session: VerificationId([22; 16]),
                    code: Code::parse("123456").expect("6 digits"),
                    discoverable: None,
                },
            ),
        ),
        (
            "check-verification-hidden",
            r(
                22,
                Request::CheckVerification {
                    session: VerificationId([23; 16]),
                    code: Code::parse("654321").expect("6 digits"),
                    discoverable: Some(false),
                },
            ),
        ),
        (
            "open-provisioning",
            r(
                23,
                Request::OpenProvisioning {
                    slot: SlotId([24; 16]),
                    reader_hash: [25; 32],
                },
            ),
        ),
        (
            "deposit-provisioning",
            r(
                24,
                Request::DepositProvisioning {
                    slot: SlotId([24; 16]),
                    device: DeviceId::new(2).expect("not 0"),
                    payload: Bytes::from(vec![26; 200]),
                },
            ),
        ),
        (
            "take-provisioning",
            r(
                25,
                Request::TakeProvisioning {
                    slot: SlotId([24; 16]),
                    reader_secret: [27; 32],
                },
            ),
        ),
        (
            "publish-device-list",
            r(26, Request::PublishDeviceList(device_list())),
        ),
        (
            "remove-device",
            r(
                27,
                Request::RemoveDevice {
                    device: DeviceId::new(2).expect("not 0"),
                    list: Some(device_list()),
                },
            ),
        ),
        (
            "publish-key-packages",
            r(
                28,
                Request::PublishKeyPackages {
                    key_packages: vec![Bytes::from_static(&[29; 256]); 2],
                    last_resort: Some(Bytes::from_static(&[30; 256])),
                    replace: false,
                },
            ),
        ),
        (
            "fetch-key-packages",
            r(
                29,
                Request::FetchKeyPackages {
                    account: AccountId([31; 16]),
                    device: None,
                    delivery_token: Bytes::from_static(&[32; 32]),
                },
            ),
        ),
        (
            "create-group",
            r(
                30,
                Request::CreateGroup {
                    handle: GroupHandle([33; 16]),
                    token_hash: [34; 32],
                },
            ),
        ),
        (
            "group-commit",
            r(
                31,
                Request::GroupCommit(GroupCommit {
                    handle: GroupHandle([33; 16]),
                    epoch: 3,
                    epoch_token: [35; 32],
                    next_token_hash: [36; 32],
                    commit_id: CommitId([37; 16]),
                    sends: vec![multi_send(38, false), multi_send(39, false)],
                }),
            ),
        ),
        (
            "multi-send",
            r(32, Request::MultiSend(multi_send(40, true))),
        ),
    ]
}

/// A multi-recipient send to two accounts of two devices, with or without parts.
fn multi_send(seed: u8, parts: bool) -> MultiSend {
    let devices = vec![DeviceId::PRIMARY, DeviceId::new(2).expect("not 0")];
    MultiSend {
        message_id: MessageId([seed; 16]),
        body: Bytes::from(vec![seed; 300]),
        recipients: (0..2u8)
            .map(|a| RecipientAccount {
                account: AccountId([seed.wrapping_add(a); 16]),
                delivery_token: Bytes::from(vec![a; 32]),
                device_list_version: u64::from(a),
                devices: devices.clone(),
                parts: match parts {
                    true => vec![Bytes::from(vec![a; 120]); 2],
                    false => Vec::new(),
                },
            })
            .collect(),
    }
}

/// A two-device list (the signature is not checked by the wire layer).
fn device_list() -> SignedDeviceList {
    let list = DeviceList {
        account: AccountId([28; 16]),
        version: 2,
        entries: (1..=2)
            .map(|id| DeviceEntry {
                id: DeviceId::new(id).expect("not 0"),
                device_key: [id as u8; 32],
                identity_dh: [id as u8 + 2; 32],
            })
            .collect(),
    };
    let bytes = Bytes::from(list.encode().expect("a valid list"));
    SignedDeviceList {
        list,
        bytes,
        signature: [29; 64],
    }
}

fn blob_requests() -> Vec<(&'static str, BlobStreamRequest)> {
    vec![
        (
            "upload",
            BlobStreamRequest::Upload {
                blob_id: [1; 32],
                size: 1 << 20,
            },
        ),
        (
            "download",
            BlobStreamRequest::Download {
                blob_id: [2; 32],
                offset: 100,
            },
        ),
        (
            "export",
            BlobStreamRequest::Export {
                include_ciphertexts: true,
            },
        ),
    ]
}

fn server_messages() -> Vec<(&'static str, ServerMessage)> {
    let ok = |id, reply| ServerMessage::Response {
        id,
        result: Ok(reply),
    };
    let bundle = DeviceBundle {
        device: DeviceId::PRIMARY,
        identity_key: [1; 32],
        identity_dh: signed(1),
        signed_prekey: signed(2),
        one_time_prekey: Some((3, [3; 32])),
    };
    vec![
        ("register", ok(1, Reply::Register(address(1, 1)))),
        (
            "auth",
            ok(
                2,
                Reply::Auth {
                    queued: 3,
                    next_certificate: Some(tern_proto::NextCertificate {
                        fingerprint: tern_proto::Fingerprint([6; 32]),
                        switch_at_ms: 1_800_000_000_000,
                    }),
                },
            ),
        ),
        ("send", ok(3, Reply::Send { accepted: 2 })),
        ("ack", ok(4, Reply::Ack { deleted: 1 })),
        ("fetch-keys", ok(5, Reply::FetchKeys(vec![bundle]))),
        (
            "blob-status",
            ok(
                6,
                Reply::BlobStatus(Some(BlobStatus {
                    size: 10,
                    expires_at_ms: 20,
                })),
            ),
        ),
        (
            "list-devices",
            ok(
                7,
                Reply::ListDevices {
                    devices: vec![DeviceId::PRIMARY, DeviceId::new(2).expect("not 0")],
                    list: Some(device_list()),
                },
            ),
        ),
        (
            "discovery-found",
            ok(
                10,
                Reply::DiscoveryFound(vec![DiscoveredAccount {
                    tag: Tag([1; 16]),
                    account: AccountId([2; 16]),
                    identity_key: [3; 32],
                }]),
            ),
        ),
        (
            "discovery-filter-part",
            ok(
                11,
                Reply::DiscoveryFilterPart(FilterPart {
                    day: 20_000,
                    kind: FilterKind::Snapshot,
                    parts: 2,
                    part: 0,
                    data: Bytes::from_static(b"TDF1"),
                }),
            ),
        ),
        (
            "rate-limited",
            ServerMessage::Response {
                id: 8,
                result: Err(ErrorReply {
                    code: ErrorCode::RateLimited,
                    message: "slow down".into(),
                    retry_after_ms: 1500,
                    attempts_left: 0,
                    current_epoch: 0,
                }),
            },
        ),
        (
            "verification-started",
            ok(
                12,
                Reply::VerificationStarted {
                    session: VerificationId([12; 16]),
                    expires_at_ms: 600_000,
                },
            ),
        ),
        ("verified", ok(13, Reply::Verified { discoverable: true })),
        (
            "wrong-code",
            ServerMessage::Response {
                id: 14,
                result: Err(ErrorReply::wrong_code(4)),
            },
        ),
        (
            "delivery",
            ServerMessage::Delivery(Delivery {
                seq: 9,
                message_id: MessageId([9; 16]),
                payload: Bytes::from_static(b"ciphertext"),
                shared_body: None,
                accepted_at_ms: 1,
                expires_at_ms: 2,
            }),
        ),
        (
            "shared-delivery",
            ServerMessage::Delivery(Delivery {
                seq: 10,
                message_id: MessageId([10; 16]),
                payload: Bytes::new(),
                shared_body: Some(Bytes::from_static(b"\x02group message")),
                accepted_at_ms: 1,
                expires_at_ms: 2,
            }),
        ),
        (
            "stale-epoch",
            ServerMessage::Response {
                id: 15,
                result: Err(ErrorReply::stale_epoch(9)),
            },
        ),
        ("queue-empty", ServerMessage::QueueEmpty),
    ]
}

fn blob_responses() -> Vec<(&'static str, BlobStreamResponse)> {
    vec![
        (
            "upload-ready",
            BlobStreamResponse::UploadReady {
                offset: 5,
                exists: false,
            },
        ),
        (
            "download-ready",
            BlobStreamResponse::DownloadReady {
                size: 10,
                offset: 0,
            },
        ),
        (
            "blob-error",
            BlobStreamResponse::Error(ErrorReply::new(ErrorCode::NotFound, "")),
        ),
        ("export-ready", BlobStreamResponse::ExportReady),
    ]
}

fn frames(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    let mut client = BytesMut::new();
    for (_, request) in client_requests().into_iter().take(6) {
        frame::encode(&v1::ClientFrame::from(request), &mut client);
    }
    let mut server = BytesMut::new();
    for (_, message) in server_messages() {
        frame::encode(&v1::ServerFrame::from(message), &mut server);
    }
    let with = |control: u8, stream: &[u8]| [&[control][..], stream].concat();
    add("frame_decoder", "client-whole", with(0x3f, &client));
    add("frame_decoder", "client-chunks-of-3", with(0x02, &client));
    add("frame_decoder", "server-chunks-of-7", with(0x86, &server));
    add("frame_decoder", "server-small-limit", with(0xc0, &server));
    add(
        "frame_decoder",
        "too-large",
        with(0x00, &[0xff, 0xff, 0xff, 0xff, 1]),
    );
    add(
        "frame_decoder",
        "torn",
        with(0x01, &client[..client.len() - 3]),
    );
}

fn ids(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    add("ids_and_addresses", "account", vec![7; 16]);
    add(
        "ids_and_addresses",
        "device-address",
        [&2u32.to_be_bytes()[..], &[7; 16]].concat(),
    );
    for (name, host) in [
        ("v4", "127.0.0.1"),
        ("v6", "::1"),
        ("name", "relay.example.org"),
    ] {
        let address = RelayAddress::new(Fingerprint([0xab; 32]), host, 7443);
        add("ids_and_addresses", name, address.to_string().into_bytes());
    }
    let mut nodes = RelayAddress::new(Fingerprint([0xab; 32]), "relay1.example.org", 7443);
    nodes.more_hosts = vec![tern_proto::address::RelayHost {
        host: "2001:db8::2".into(),
        port: 7443,
    }];
    add(
        "ids_and_addresses",
        "several-hosts",
        nodes.to_string().into_bytes(),
    );
    let card = ContactCard {
        account: AccountId([1; 16]),
        identity_key: [2; 32],
        delivery_token: [3; 32],
    };
    add("contact_card", "card", card.to_string().into_bytes());
    add("contact_card", "padded", format!("  {card}\n").into_bytes());
    for (name, line) in [
        ("quinn-udp", "WARN quinn_udp: sendmsg error: Os { code: 1 }, destination: 203.0.113.9:4433, src_ip: Some(10.0.0.1)"),
        ("v6-port", "peer [2001:db8::17%eth0]:443 closed; next fe80::1 and ::ffff:192.0.2.1."),
        ("module-path", "INFO tern_relay::net::conn: closed after 10.5s at 12:30:01"),
    ] {
        add("redact", name, line.as_bytes().to_vec());
    }
}

fn crypto(add: &mut impl FnMut(&'static str, &str, Vec<u8>)) {
    let f = &*FIXTURE;
    add("x3dh_header", "alice-to-bob", f.initial.to_bytes().to_vec());
    let mut with_one_time = f.initial.clone();
    with_one_time.one_time_prekey_id = Some(9);
    add("x3dh_header", "one-time", with_one_time.to_bytes().to_vec());
    for (i, m) in next_messages(3).into_iter().enumerate() {
        add("ratchet", &format!("alice-{i}"), m);
    }
    add("ratchet", "bob-session", f.bob_session.to_bytes().to_vec());
    add("session_record", "empty", Vec::new());
    let mut set = tern_client::crypto::sessions::SessionSet::default();
    let verified = f.bob.bundle().verify().expect("fixed keys verify");
    set.initiate(&mut rng(), &f.alice.id(), &f.alice.dh, &verified)
        .expect("initiate");
    add("session_record", "pending", set.to_bytes().to_vec());
    let _ = set.encrypt(b"one").expect("encrypt");
    add("session_record", "after-send", set.to_bytes().to_vec());

    let sealed =
        sealed::seal(&mut rng(), &f.bob.dh.public(), &f.certificate, b"content").expect("seal");
    add("sealed_open", "to-bob", sealed);
    let (encoded, signature) = f.certificate.as_issued();
    let len = u8::try_from(encoded.len()).expect("a certificate under 256 bytes");
    add(
        "sealed_open",
        "certificate",
        [&[len][..], encoded, &signature[..]].concat(),
    );

    for (name, size, control) in [
        ("empty", 0, 0),
        ("small", 100, 0),
        ("two-segments", 70_000, 3),
    ] {
        let mut plaintext = vec![0u8; size];
        rng().fill_bytes(&mut plaintext);
        let mut ciphertext = Vec::new();
        attachment::encrypt(&mut rng(), &ATTACHMENT_KEY, &plaintext[..], &mut ciphertext)
            .expect("encrypt");
        add("attachment", name, [&[control][..], &ciphertext].concat());
    }
}

/// A segment the log itself wrote: three mailboxes, one message removed.
fn segment() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let options = LogOptions {
        background: false,
        ..LogOptions::default()
    };
    {
        let store = LogStore::open(dir.path(), options).expect("open");
        for (n, to) in [address(1, 1), address(2, 1), address(2, 2)]
            .iter()
            .enumerate()
        {
            let msgs = [envelope(n as u8, 10 + n), envelope(n as u8 + 10, 0)];
            store
                .append(to, &msgs, 1, 2_000_000_000_000)
                .expect("append");
        }
        store.remove(&address(1, 1), &[1]).expect("remove");
        store.flush().expect("flush");
    }
    std::fs::read(dir.path().join(SEGMENT_NAME)).expect("the first segment")
}
