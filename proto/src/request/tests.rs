use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::device_list::{DeviceEntry, DeviceList};
use crate::keys::SignedKey;

/// typed -> v1 -> bytes -> v1 -> typed.
fn round_trip(r: ClientRequest) -> Result<ClientRequest, RequestError> {
    let bytes = v1::ClientFrame::from(r).encode_to_vec();
    ClientRequest::try_from(v1::ClientFrame::decode(&bytes[..]).expect("decodes"))
}

fn address() -> DeviceAddress {
    DeviceAddress {
        account: AccountId([1; 16]),
        device: DeviceId::PRIMARY,
    }
}

fn envelope(n: u8) -> Envelope {
    Envelope {
        message_id: MessageId([n; 16]),
        payload: Bytes::from(vec![n; 40]),
    }
}

fn signed(id: u32) -> SignedKey {
    SignedKey {
        id,
        key: [7; 32],
        signature: [8; 64],
    }
}

/// One valid request of every kind.
fn one_of_each() -> Vec<Request> {
    vec![
        Request::Register {
            identity_key: [1; 32],
            device_key: [2; 32],
            device_signature: [3; 64],
            session_proof: [4; 64],
        },
        Request::AddDevice {
            account: AccountId([5; 16]),
            device_key: [6; 32],
            device_signature: [7; 64],
        },
        Request::Auth {
            address: address(),
            signature: [9; 64],
        },
        Request::Send {
            to: address(),
            envelopes: vec![envelope(1), envelope(2)],
            device_list_version: 0,
        },
        Request::Send {
            to: address(),
            envelopes: vec![envelope(1)],
            device_list_version: 7,
        },
        Request::Ack {
            seqs: vec![1, 5, 9],
        },
        Request::Ping,
        Request::PublishKeys(KeyUpload {
            identity_dh: Some(signed(0)),
            signed_prekey: Some(signed(3)),
            one_time: vec![(1, [1; 32]), (2, [2; 32])],
        }),
        Request::FetchKeys {
            account: AccountId([3; 16]),
            device: None,
            delivery_token: None,
        },
        Request::FetchKeys {
            account: AccountId([3; 16]),
            device: DeviceId::new(2),
            delivery_token: Some(Bytes::from_static(b"token")),
        },
        Request::SenderCertificate,
        Request::SetDeliveryToken {
            token_hash: [4; 32],
        },
        Request::SealedSend {
            to: address(),
            delivery_token: Bytes::from_static(b"token"),
            envelopes: vec![envelope(3)],
            device_list_version: 2,
        },
        Request::RelayInfo,
        Request::BlobStatus { blob_id: [5; 32] },
        Request::TouchBlob { blob_id: [6; 32] },
        Request::ListDevices {
            account: AccountId([7; 16]),
            delivery_token: Bytes::from_static(b"t"),
        },
        Request::DeleteAccount { signature: [8; 64] },
        Request::DiscoveryEvaluate {
            blinded: BlindedBatch::new(Bytes::from(vec![9; 4 * 32])).expect("4 points"),
        },
        Request::DiscoveryLookup {
            tags: vec![Tag([1; 16]), Tag([2; 16])],
        },
        Request::DiscoveryFilter {
            since_day: 20_000,
            day: 20_001,
            part: 3,
        },
        Request::SetDiscoverable(false),
        Request::StartVerification {
            number: E164::parse("+15550100123").expect("E.164"),
        },
        Request::CheckVerification {
            session: VerificationId([7; 16]),
            code: Code::parse("012345").expect("6 digits"),
            discoverable: None,
        },
        Request::CheckVerification {
            session: VerificationId([8; 16]),
            code: Code::parse("999999").expect("6 digits"),
            discoverable: Some(false),
        },
        Request::OpenProvisioning {
            slot: SlotId([1; 16]),
            reader_hash: [2; 32],
        },
        Request::DepositProvisioning {
            slot: SlotId([1; 16]),
            device: DeviceId::new(3).expect("not 0"),
            payload: Bytes::from(vec![4; 48]),
        },
        Request::TakeProvisioning {
            slot: SlotId([1; 16]),
            reader_secret: [5; 32],
        },
        Request::PublishDeviceList(signed_list(2, &[1, 3])),
        Request::RemoveDevice {
            device: DeviceId::new(3).expect("not 0"),
            list: Some(signed_list(3, &[1])),
        },
        Request::RemoveDevice {
            device: DeviceId::new(4).expect("not 0"),
            list: None,
        },
        Request::PublishKeyPackages {
            key_packages: vec![Bytes::from_static(&[7; 300]), Bytes::from_static(&[8; 300])],
            last_resort: Some(Bytes::from_static(&[9; 300])),
            replace: true,
        },
        Request::FetchKeyPackages {
            account: AccountId([6; 16]),
            device: None,
            delivery_token: Bytes::from_static(b"token"),
        },
        Request::CreateGroup {
            handle: crate::GroupHandle([3; 16]),
            token_hash: [4; 32],
        },
        Request::GroupCommit(crate::groups::tests::commit()),
        Request::MultiSend(crate::groups::tests::multi(&[(1, 2), (2, 1)], true)),
    ]
}

fn signed_list(version: u64, ids: &[u32]) -> SignedDeviceList {
    let list = DeviceList {
        account: AccountId([6; 16]),
        version,
        entries: ids
            .iter()
            .map(|&id| DeviceEntry {
                id: DeviceId::new(id).expect("not 0"),
                device_key: [id as u8; 32],
                identity_dh: [id as u8 + 1; 32],
            })
            .collect(),
    };
    let bytes = Bytes::from(list.encode().expect("valid list"));
    SignedDeviceList {
        list,
        bytes,
        signature: [9; 64],
    }
}

#[test]
fn one_request_of_every_kind_round_trips() {
    let all = one_of_each();
    let mut kinds: Vec<_> = all.iter().map(Request::kind).collect();
    kinds.dedup();
    assert_eq!(kinds.len(), 32, "every ClientFrame body");
    for (id, request) in all.into_iter().enumerate() {
        let r = ClientRequest {
            id: id as u64,
            request,
        };
        assert_eq!(round_trip(r.clone()), Ok(r));
    }
}

#[test]
fn the_wire_form_is_what_the_client_sent_before() {
    // A send as `client-core` built it by hand.
    let by_hand = v1::ClientFrame {
        request_id: 3,
        body: Some(Body::Send(v1::SendRequest {
            recipient_account: Bytes::copy_from_slice(&[1; 16]),
            recipient_device: 1,
            envelopes: vec![v1::Envelope {
                message_id: Bytes::copy_from_slice(&[1; 16]),
                payload: Bytes::from(vec![1; 40]),
            }],
            device_list_version: 0,
        })),
    };
    let typed = ClientRequest {
        id: 3,
        request: Request::Send {
            to: address(),
            envelopes: vec![envelope(1)],
            device_list_version: 0,
        },
    };
    assert_eq!(
        v1::ClientFrame::from(typed).encode_to_vec(),
        by_hand.encode_to_vec()
    );
    // FetchKeys for every device is device_id 0; an identity_dh left out is empty.
    let fetch = Body::from(Request::FetchKeys {
        account: AccountId([3; 16]),
        device: None,
        delivery_token: None,
    });
    assert!(matches!(
        &fetch,
        Body::FetchKeys(v1::FetchKeysRequest { device_id: 0, delivery_token, .. })
            if delivery_token.is_empty()
    ));
    // A token is field 3, as is.
    let fetch = Body::from(Request::FetchKeys {
        account: AccountId([3; 16]),
        device: DeviceId::new(1),
        delivery_token: Some(Bytes::from_static(b"t0ken")),
    });
    assert!(matches!(
        &fetch,
        Body::FetchKeys(v1::FetchKeysRequest { device_id: 1, delivery_token, .. })
            if delivery_token == &b"t0ken"[..]
    ));
    let Body::PublishKeys(p) = Body::from(Request::PublishKeys(KeyUpload::default())) else {
        panic!("publish keys");
    };
    assert_eq!(p, v1::PublishKeysRequest::default());
}

#[test]
fn payloads_are_not_copied() {
    let payload = Bytes::from(vec![9u8; 1000]);
    let frame = v1::ClientFrame {
        request_id: 1,
        body: Some(Body::Send(v1::SendRequest {
            recipient_account: Bytes::copy_from_slice(&[1; 16]),
            recipient_device: 1,
            envelopes: vec![v1::Envelope {
                message_id: Bytes::copy_from_slice(&[1; 16]),
                payload: payload.clone(),
            }],
            device_list_version: 0,
        })),
    };
    let Ok(ClientRequest {
        request: Request::Send { envelopes, .. },
        ..
    }) = ClientRequest::try_from(frame)
    else {
        panic!("a valid send");
    };
    assert_eq!(envelopes[0].payload.as_ptr(), payload.as_ptr());
}

/// Valid bodies, one per kind, to break one field at a time.
fn valid(kind: RequestKind) -> Body {
    one_of_each()
        .into_iter()
        .find(|r| r.kind() == kind)
        .map(Body::from)
        .expect("one of each")
}

fn refused(body: Body) -> RequestError {
    let frame = v1::ClientFrame {
        request_id: 41,
        body: Some(body),
    };
    match ClientRequest::try_from(frame) {
        Ok(r) => panic!("accepted {r:?}"),
        Err(e) => e,
    }
}

const SHORT: Bytes = Bytes::from_static(&[1; 3]);

/// Each malformed field, with the field named and the code the relay answers with.
fn malformed_cases() -> Vec<(Body, &'static str, ErrorCode)> {
    use ErrorCode::{BadRequest as BAD, TooLarge, Unauthorized as UNAUTH};
    let register = |f: fn(&mut v1::RegisterRequest)| {
        let Body::Register(mut r) = valid(RequestKind::Register) else {
            unreachable!()
        };
        f(&mut r);
        Body::Register(r)
    };
    let add = |f: fn(&mut v1::AddDeviceRequest)| {
        let Body::AddDevice(mut r) = valid(RequestKind::AddDevice) else {
            unreachable!()
        };
        f(&mut r);
        Body::AddDevice(r)
    };
    let auth = |f: fn(&mut v1::AuthRequest)| {
        let Body::Auth(mut r) = valid(RequestKind::Auth) else {
            unreachable!()
        };
        f(&mut r);
        Body::Auth(r)
    };
    let send = |f: fn(&mut v1::SendRequest)| {
        let Body::Send(mut r) = valid(RequestKind::Send) else {
            unreachable!()
        };
        f(&mut r);
        Body::Send(r)
    };
    let sealed = |f: fn(&mut v1::SealedSendRequest)| {
        let Body::SealedSend(mut r) = valid(RequestKind::SealedSend) else {
            unreachable!()
        };
        f(&mut r);
        Body::SealedSend(r)
    };
    let publish = |f: fn(&mut v1::PublishKeysRequest)| {
        let Body::PublishKeys(mut r) = valid(RequestKind::PublishKeys) else {
            unreachable!()
        };
        f(&mut r);
        Body::PublishKeys(r)
    };
    vec![
        (
            register(|r| r.identity_key = SHORT),
            "register.identity_key",
            UNAUTH,
        ),
        (
            register(|r| r.device_key = Bytes::new()),
            "register.device_key",
            UNAUTH,
        ),
        (
            register(|r| r.device_signature = SHORT),
            "register.device_signature",
            UNAUTH,
        ),
        (
            register(|r| r.session_proof = SHORT),
            "register.session_proof",
            UNAUTH,
        ),
        (add(|r| r.account_id = SHORT), "add_device.account_id", BAD),
        (
            add(|r| r.device_key = SHORT),
            "add_device.device_key",
            UNAUTH,
        ),
        (
            add(|r| r.device_signature = Bytes::new()),
            "add_device.device_signature",
            UNAUTH,
        ),
        (auth(|r| r.account_id = SHORT), "auth.account_id", BAD),
        (auth(|r| r.device_id = 0), "auth.device_id", BAD),
        (auth(|r| r.signature = SHORT), "auth.signature", UNAUTH),
        (
            send(|r| r.recipient_account = SHORT),
            "send.recipient_account",
            BAD,
        ),
        (
            send(|r| r.recipient_device = 0),
            "send.recipient_device",
            BAD,
        ),
        (
            send(|r| r.envelopes[1].message_id = SHORT),
            "send.envelopes.message_id",
            BAD,
        ),
        (
            Body::Ack(v1::AckRequest {
                seqs: vec![1; MAX_ACK_SEQS + 1],
            }),
            "ack.seqs",
            TooLarge,
        ),
        (
            publish(|r| r.identity_dh = SHORT),
            "publish_keys.identity_dh",
            BAD,
        ),
        (
            publish(|r| r.identity_dh_signature = SHORT),
            "publish_keys.identity_dh_signature",
            UNAUTH,
        ),
        (
            publish(|r| {
                if let Some(k) = r.signed_prekey.as_mut() {
                    k.public_key = SHORT;
                }
            }),
            "publish_keys.signed_prekey.public_key",
            BAD,
        ),
        (
            publish(|r| {
                if let Some(k) = r.signed_prekey.as_mut() {
                    k.signature = Bytes::new();
                }
            }),
            "publish_keys.signed_prekey.signature",
            UNAUTH,
        ),
        (
            publish(|r| r.one_time_prekeys[1].public_key = SHORT),
            "publish_keys.one_time_prekeys.public_key",
            BAD,
        ),
        (
            Body::FetchKeys(v1::FetchKeysRequest {
                account_id: SHORT,
                device_id: 1,
                delivery_token: Bytes::from_static(b"t"),
            }),
            "fetch_keys.account_id",
            BAD,
        ),
        (
            Body::SetDeliveryToken(v1::SetDeliveryTokenRequest { token_hash: SHORT }),
            "set_delivery_token.token_hash",
            BAD,
        ),
        (
            sealed(|r| r.recipient_account = SHORT),
            "sealed_send.recipient_account",
            BAD,
        ),
        (
            sealed(|r| r.recipient_device = 0),
            "sealed_send.recipient_device",
            BAD,
        ),
        (
            sealed(|r| r.envelopes[0].message_id = Bytes::new()),
            "sealed_send.envelopes.message_id",
            BAD,
        ),
        (
            Body::BlobStatus(v1::BlobStatusRequest { blob_id: SHORT }),
            "blob_status.blob_id",
            BAD,
        ),
        (
            Body::TouchBlob(v1::TouchBlobRequest {
                blob_id: Bytes::from_static(&[0; 33]),
            }),
            "touch_blob.blob_id",
            BAD,
        ),
        (
            Body::ListDevices(v1::ListDevicesRequest {
                account_id: SHORT,
                delivery_token: SHORT,
            }),
            "list_devices.account_id",
            BAD,
        ),
        (
            Body::DeleteAccount(v1::DeleteAccountRequest { signature: SHORT }),
            "delete_account.signature",
            UNAUTHORIZED,
        ),
        (
            Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
                blinded: Bytes::from(vec![1; 3 * 32]),
            }),
            "discovery_evaluate.blinded",
            BAD,
        ),
        (
            Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
                blinded: Bytes::from(vec![1; 8192 * 32]),
            }),
            "discovery_evaluate.blinded",
            TooLarge,
        ),
        (
            Body::DiscoveryLookup(v1::DiscoveryLookupRequest { tags: SHORT }),
            "discovery_lookup.tags",
            BAD,
        ),
        (
            Body::StartVerification(v1::StartVerificationRequest {
                number: "+0123456789".into(),
            }),
            "start_verification.number",
            ErrorCode::InvalidNumber,
        ),
        (
            Body::CheckVerification(v1::CheckVerificationRequest {
                session_id: SHORT,
                code: "123456".into(),
                discoverable: None,
            }),
            "check_verification.session_id",
            BAD,
        ),
        (
            Body::CheckVerification(v1::CheckVerificationRequest {
                session_id: Bytes::from_static(&[1; 16]),
                code: "12345".into(),
                discoverable: Some(true),
            }),
            "check_verification.code",
            BAD,
        ),
        (
            Body::OpenProvisioning(v1::OpenProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 15]),
                reader_hash: Bytes::from_static(&[2; 32]),
            }),
            "open_provisioning.slot_id",
            BAD,
        ),
        (
            Body::OpenProvisioning(v1::OpenProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 16]),
                reader_hash: Bytes::from_static(&[2; 31]),
            }),
            "open_provisioning.reader_hash",
            BAD,
        ),
        (
            Body::DepositProvisioning(v1::DepositProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 16]),
                device_id: 0,
                payload: Bytes::from_static(&[3; 48]),
            }),
            "deposit_provisioning.device_id",
            BAD,
        ),
        (
            Body::DepositProvisioning(v1::DepositProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 16]),
                device_id: 2,
                payload: Bytes::from_static(&[3; 47]),
            }),
            "deposit_provisioning.payload",
            BAD,
        ),
        (
            Body::DepositProvisioning(v1::DepositProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 16]),
                device_id: 2,
                payload: Bytes::from(vec![3; crate::limits::MAX_LINK_PAYLOAD + 1]),
            }),
            "deposit_provisioning.payload",
            ErrorCode::TooLarge,
        ),
        (
            Body::TakeProvisioning(v1::TakeProvisioningRequest {
                slot_id: Bytes::from_static(&[1; 16]),
                reader_secret: Bytes::new(),
            }),
            "take_provisioning.reader_secret",
            BAD,
        ),
        (
            Body::PublishDeviceList(v1::PublishDeviceListRequest {
                device_list: signed_list(1, &[1]).bytes.slice(1..),
                signature: Bytes::from_static(&[0; 64]),
            }),
            "publish_device_list.device_list",
            BAD,
        ),
        (
            Body::PublishDeviceList(v1::PublishDeviceListRequest {
                device_list: signed_list(1, &[1]).bytes,
                signature: Bytes::from_static(&[0; 63]),
            }),
            "publish_device_list.device_list",
            UNAUTHORIZED,
        ),
        (
            Body::RemoveDevice(v1::RemoveDeviceRequest {
                device_id: 2,
                device_list: Bytes::new(),
                signature: Bytes::from_static(&[0; 64]),
            }),
            "remove_device.device_list",
            BAD,
        ),
        (
            Body::RemoveDevice(v1::RemoveDeviceRequest {
                device_id: 0,
                device_list: Bytes::new(),
                signature: Bytes::new(),
            }),
            "remove_device.device_id",
            BAD,
        ),
    ]
    .into_iter()
    .chain(crate::groups::tests::malformed())
    .collect()
}

#[test]
fn each_malformed_field_is_refused_with_the_relays_code_and_the_request_id() {
    for (body, field, code) in malformed_cases() {
        let kind = body_kind(&body);
        let e = refused(body);
        assert_eq!(
            (e.id(), e.kind(), e.field(), e.code()),
            (41, Some(kind), field, code),
            "{e}"
        );
        let reply = e.to_reply();
        assert_eq!((reply.code, reply.retry_after_ms), (code, 0));
        assert_eq!(reply.message, e.client_message());
        if code == ErrorCode::Unauthorized {
            assert_eq!(reply.message, "unauthorized", "opaque, as before");
        }
    }
}

#[test]
fn every_kind_that_has_fields_to_break_is_covered() {
    let covered: Vec<_> = malformed_cases()
        .iter()
        .map(|(b, _, _)| body_kind(b))
        .collect();
    for r in one_of_each() {
        let kind = r.kind();
        let nothing_to_check = matches!(
            kind,
            RequestKind::Ping
                | RequestKind::SenderCertificate
                | RequestKind::RelayInfo
                | RequestKind::DiscoveryFilter
                | RequestKind::SetDiscoverable
        );
        assert!(nothing_to_check || covered.contains(&kind), "{kind}");
    }
}

#[test]
fn messages_stay_close_to_the_relays() {
    let e = refused(Body::Send(v1::SendRequest {
        recipient_account: Bytes::from_static(&[1; 15]),
        recipient_device: 1,
        envelopes: vec![],
        device_list_version: 0,
    }));
    assert_eq!(
        e.client_message(),
        "bad request: account id must be 16 bytes, got 15"
    );
    let e = refused(Body::Auth(v1::AuthRequest {
        account_id: Bytes::from_static(&[1; 16]),
        device_id: 0,
        signature: Bytes::new(),
    }));
    assert_eq!(e.client_message(), "bad request: device id 0 is reserved");
    let e = refused(Body::Ack(v1::AckRequest {
        seqs: vec![0; 5000],
    }));
    assert_eq!(e.client_message(), "ack of 5000 exceeds the limit of 4096");
    assert_eq!(
        e.problem(),
        &Problem::TooMany {
            what: "ack",
            got: 5000,
            max: MAX_ACK_SEQS
        }
    );
}

#[test]
fn an_empty_body_is_a_bad_request_that_keeps_its_id() {
    let e = ClientRequest::try_from(v1::ClientFrame {
        request_id: 5,
        body: None,
    })
    .expect_err("no body");
    assert_eq!(
        (e.id(), e.kind(), e.code()),
        (5, None, ErrorCode::BadRequest)
    );
    assert_eq!(e.client_message(), "bad request: empty request");
}

#[test]
fn edges_that_are_valid() {
    // An ack of exactly the limit; an empty send; fetch keys for device 0 (all).
    let ack = Body::Ack(v1::AckRequest {
        seqs: vec![1; MAX_ACK_SEQS],
    });
    assert!(
        matches!(Request::try_from(ack), Ok(Request::Ack { seqs }) if seqs.len() == MAX_ACK_SEQS)
    );
    let fetch = Body::FetchKeys(v1::FetchKeysRequest {
        account_id: Bytes::from_static(&[1; 16]),
        device_id: 0,
        delivery_token: Bytes::new(),
    });
    assert_eq!(
        Request::try_from(fetch),
        Ok(Request::FetchKeys {
            account: AccountId([1; 16]),
            device: None,
            delivery_token: None,
        })
    );
    // A token of any length is taken as it is; an empty one is no token.
    let fetch = Body::FetchKeys(v1::FetchKeysRequest {
        account_id: Bytes::from_static(&[1; 16]),
        device_id: 7,
        delivery_token: Bytes::from_static(&[9; 100]),
    });
    assert_eq!(
        Request::try_from(fetch),
        Ok(Request::FetchKeys {
            account: AccountId([1; 16]),
            device: DeviceId::new(7),
            delivery_token: Some(Bytes::from_static(&[9; 100])),
        })
    );
    // An empty identity_dh leaves it unchanged, whatever its signature field holds.
    let publish = Body::PublishKeys(v1::PublishKeysRequest {
        identity_dh_signature: SHORT,
        ..Default::default()
    });
    assert_eq!(
        Request::try_from(publish),
        Ok(Request::PublishKeys(KeyUpload::default()))
    );
    // Delivery tokens are any bytes: the relay hashes them.
    let list = Body::ListDevices(v1::ListDevicesRequest {
        account_id: Bytes::from_static(&[1; 16]),
        delivery_token: Bytes::new(),
    });
    assert!(Request::try_from(list).is_ok());
}

#[test]
fn needs_authentication_is_the_protocols_list() {
    let mut needing: Vec<_> = one_of_each()
        .iter()
        .map(Request::kind)
        .filter(|k| k.needs_authentication())
        .map(RequestKind::as_str)
        .collect();
    // Two fetches, with and without a token: the kind is one.
    needing.dedup();
    assert_eq!(
        needing,
        [
            "add_device",
            "send",
            "ack",
            "publish_keys",
            "fetch_keys",
            "sender_certificate",
            "set_delivery_token",
            "delete_account",
            "discovery_evaluate",
            "discovery_lookup",
            "set_discoverable",
            "start_verification",
            "check_verification",
            "deposit_provisioning",
            "publish_device_list",
            "remove_device",
            "publish_key_packages"
        ]
    );
}

fn evaluate(len: usize) -> Result<ClientRequest, RequestError> {
    ClientRequest::try_from(v1::ClientFrame {
        request_id: 5,
        body: Some(Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
            blinded: Bytes::from(vec![1; len]),
        })),
    })
}

fn lookup(len: usize) -> Result<ClientRequest, RequestError> {
    ClientRequest::try_from(v1::ClientFrame {
        request_id: 6,
        body: Some(Body::DiscoveryLookup(v1::DiscoveryLookupRequest {
            tags: Bytes::from(vec![1; len]),
        })),
    })
}

#[test]
fn a_blinded_batch_is_a_power_of_two_of_points_up_to_4096() {
    for points in [1, 2, 4, 64, 1024, 4096] {
        let r = evaluate(points * 32).expect("a valid batch");
        let Request::DiscoveryEvaluate { blinded } = r.request else {
            panic!("an evaluate")
        };
        assert_eq!(blinded.len(), points);
    }
    for len in [0, 31, 33, 3 * 32, 5 * 32, 4095 * 32, 32 * 4096 + 1] {
        let e = evaluate(len).expect_err("not a power of two of points");
        assert_eq!(
            (e.id(), e.code(), e.field()),
            (5, ErrorCode::BadRequest, "discovery_evaluate.blinded"),
            "{len} bytes"
        );
    }
    for len in [4097 * 32, 8192 * 32, 1 << 20] {
        let e = evaluate(len).expect_err("too many points");
        assert_eq!(
            (e.code(), e.kind()),
            (ErrorCode::TooLarge, Some(RequestKind::DiscoveryEvaluate))
        );
    }
}

#[test]
fn a_lookup_holds_one_to_256_tags() {
    for tags in [1, 2, 255, 256] {
        assert!(lookup(tags * 16).is_ok(), "{tags} tags");
    }
    for len in [0, 15, 17, 16 * 3 + 1] {
        let e = lookup(len).expect_err("not whole tags");
        assert_eq!(
            (e.id(), e.code()),
            (6, ErrorCode::BadRequest),
            "{len} bytes"
        );
    }
    let e = lookup(257 * 16).expect_err("too many tags");
    assert_eq!(e.code(), ErrorCode::TooLarge);
}

fn any_address() -> impl Strategy<Value = DeviceAddress> {
    (any::<[u8; 16]>(), 1u32..).prop_map(|(a, d)| DeviceAddress {
        account: AccountId(a),
        device: DeviceId::new(d).expect("not 0"),
    })
}

fn any_envelopes() -> impl Strategy<Value = Vec<Envelope>> {
    proptest::collection::vec(
        (
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(id, payload)| Envelope {
                message_id: MessageId(id),
                payload: payload.into(),
            }),
        0..4,
    )
}

fn any_signed(with_id: bool) -> impl Strategy<Value = SignedKey> {
    (any::<u32>(), any::<[u8; 32]>(), any::<[u8; 64]>()).prop_map(move |(id, key, signature)| {
        SignedKey {
            id: if with_id { id } else { 0 },
            key,
            signature,
        }
    })
}

fn any_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<[u8; 64]>(),
            any::<[u8; 64]>()
        )
            .prop_map(
                |(identity_key, device_key, device_signature, session_proof)| Request::Register {
                    identity_key,
                    device_key,
                    device_signature,
                    session_proof
                }
            ),
        (any::<[u8; 16]>(), any::<[u8; 32]>(), any::<[u8; 64]>()).prop_map(
            |(a, device_key, device_signature)| Request::AddDevice {
                account: AccountId(a),
                device_key,
                device_signature
            }
        ),
        (any_address(), any::<[u8; 64]>())
            .prop_map(|(address, signature)| Request::Auth { address, signature }),
        (any_address(), any_envelopes()).prop_map(|(to, envelopes)| Request::Send {
            to,
            envelopes,
            device_list_version: 0
        }),
        proptest::collection::vec(any::<u64>(), 0..50).prop_map(|seqs| Request::Ack { seqs }),
        Just(Request::Ping),
        (
            proptest::option::of(any_signed(false)),
            proptest::option::of(any_signed(true)),
            proptest::collection::vec((any::<u32>(), any::<[u8; 32]>()), 0..4)
        )
            .prop_map(
                |(identity_dh, signed_prekey, one_time)| Request::PublishKeys(KeyUpload {
                    identity_dh,
                    signed_prekey,
                    one_time
                })
            ),
        (
            any::<[u8; 16]>(),
            any::<u32>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 1..40))
        )
            .prop_map(|(a, d, t)| Request::FetchKeys {
                account: AccountId(a),
                device: DeviceId::new(d),
                delivery_token: t.map(Bytes::from),
            }),
        Just(Request::SenderCertificate),
        any::<[u8; 32]>().prop_map(|token_hash| Request::SetDeliveryToken { token_hash }),
        (any_address(), any_bytes(), any_envelopes()).prop_map(
            |(to, delivery_token, envelopes)| Request::SealedSend {
                to,
                delivery_token,
                envelopes,
                device_list_version: 9
            }
        ),
        Just(Request::RelayInfo),
        any::<[u8; 32]>().prop_map(|blob_id| Request::BlobStatus { blob_id }),
        any::<[u8; 32]>().prop_map(|blob_id| Request::TouchBlob { blob_id }),
        (any::<[u8; 16]>(), any_bytes()).prop_map(|(a, delivery_token)| Request::ListDevices {
            account: AccountId(a),
            delivery_token
        }),
        any::<[u8; 64]>().prop_map(|signature| Request::DeleteAccount { signature }),
        "\\+[1-9][0-9]{6,14}".prop_map(|n| Request::StartVerification {
            number: E164::parse(&n).expect("matches the pattern")
        }),
        (any::<[u8; 16]>(), 0u32..1_000_000, any::<Option<bool>>()).prop_map(
            |(s, c, discoverable)| Request::CheckVerification {
                session: VerificationId(s),
                code: Code::from_number(c).expect("below 10^6"),
                discoverable,
            }
        ),
    ]
}

proptest! {
    #[test]
    fn every_valid_request_round_trips(id in any::<u64>(), request in any_request()) {
        let r = ClientRequest { id, request };
        prop_assert_eq!(round_trip(r.clone()), Ok(r));
    }

    #[test]
    fn any_bytes_decode_and_check_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frame) = v1::ClientFrame::decode(&bytes[..]) {
            let id = frame.request_id;
            match ClientRequest::try_from(frame) {
                // What is accepted goes back to the wire and checks the same.
                Ok(r) => prop_assert_eq!(round_trip(r.clone()), Ok(r)),
                Err(e) => prop_assert_eq!(e.id(), id),
            }
        }
    }

    #[test]
    fn any_frame_of_a_known_shape_checks_without_panicking(
        id in any::<u64>(), a in any_bytes(), b in any_bytes(), c in any_bytes(), n in any::<u32>(),
        seqs in proptest::collection::vec(any::<u64>(), 0..10), which in 0usize..32, text in ".{0,20}",
    ) {
        // Valid protobuf with arbitrary field contents reaches every check.
        let body = match which {
            0 => Body::Register(v1::RegisterRequest { identity_key: a, device_key: b, device_signature: c.clone(), session_proof: c }),
            1 => Body::AddDevice(v1::AddDeviceRequest { account_id: a, device_key: b, device_signature: c }),
            2 => Body::Auth(v1::AuthRequest { account_id: a, device_id: n, signature: b }),
            3 => Body::Send(v1::SendRequest { recipient_account: a, recipient_device: n, envelopes: vec![v1::Envelope { message_id: b, payload: c }], device_list_version: u64::from(n) }),
            4 => Body::Ack(v1::AckRequest { seqs }),
            5 => Body::PublishKeys(v1::PublishKeysRequest {
                identity_dh: a, identity_dh_signature: b.clone(),
                signed_prekey: Some(v1::SignedPreKey { id: n, public_key: b.clone(), signature: c.clone() }),
                one_time_prekeys: vec![v1::OneTimePreKey { id: n, public_key: c }],
            }),
            6 => Body::FetchKeys(v1::FetchKeysRequest { account_id: a, device_id: n, delivery_token: b }),
            7 => Body::SetDeliveryToken(v1::SetDeliveryTokenRequest { token_hash: a }),
            8 => Body::SealedSend(v1::SealedSendRequest { recipient_account: a, recipient_device: n, delivery_token: b, envelopes: vec![v1::Envelope { message_id: c, payload: Bytes::new() }], device_list_version: 1 }),
            9 => Body::BlobStatus(v1::BlobStatusRequest { blob_id: a }),
            10 => Body::TouchBlob(v1::TouchBlobRequest { blob_id: a }),
            11 => Body::ListDevices(v1::ListDevicesRequest { account_id: a, delivery_token: b }),
            12 => Body::Ping(v1::PingRequest {}),
            13 => Body::RelayInfo(v1::RelayInfoRequest {}),
            14 => Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest { blinded: a }),
            15 => Body::DiscoveryLookup(v1::DiscoveryLookupRequest { tags: a }),
            16 => Body::DiscoveryFilter(v1::DiscoveryFilterRequest { since_day: n, day: n, part: n }),
            17 => Body::SetDiscoverable(v1::SetDiscoverableRequest { discoverable: n % 2 == 0 }),
            18 => Body::DeleteAccount(v1::DeleteAccountRequest { signature: a }),
            19 => Body::StartVerification(v1::StartVerificationRequest { number: text }),
            20 => Body::CheckVerification(v1::CheckVerificationRequest {
                session_id: a,
                code: text,
                discoverable: (n % 3 != 0).then_some(n % 2 == 0),
            }),
            21 => Body::OpenProvisioning(v1::OpenProvisioningRequest { slot_id: a, reader_hash: b }),
            22 => Body::DepositProvisioning(v1::DepositProvisioningRequest { slot_id: a, device_id: n, payload: b }),
            23 => Body::TakeProvisioning(v1::TakeProvisioningRequest { slot_id: a, reader_secret: b }),
            24 => Body::PublishDeviceList(v1::PublishDeviceListRequest { device_list: a, signature: b }),
            25 => Body::RemoveDevice(v1::RemoveDeviceRequest { device_id: n, device_list: a, signature: b }),
            26 => Body::PublishKeyPackages(v1::PublishKeyPackagesRequest { key_packages: vec![a], last_resort: b, replace: n % 2 == 0 }),
            27 => Body::FetchKeyPackages(v1::FetchKeyPackagesRequest { account_id: a, device_id: n, delivery_token: b }),
            28 => Body::CreateGroup(v1::CreateGroupRequest { handle: a, token_hash: b }),
            29 => Body::MultiSend(v1::MultiSendRequest { message_id: a, body: b, recipients: vec![v1::RecipientAccount {
                account_id: c.clone(), delivery_token: c.clone(), device_list_version: 0, devices: vec![n, n / 2], parts: vec![c] }] }),
            30 => Body::GroupCommit(v1::GroupCommitRequest { handle: a.clone(), epoch: u64::from(n), epoch_token: b.clone(), next_token_hash: b, commit_id: a,
                sends: vec![v1::MultiSendRequest { message_id: c.clone(), body: c, recipients: vec![] }] }),
            _ => Body::SenderCertificate(v1::SenderCertificateRequest {}),
        };
        let kind = body_kind(&body);
        match ClientRequest::try_from(v1::ClientFrame { request_id: id, body: Some(body) }) {
            Ok(r) => prop_assert_eq!(r.request.kind(), kind),
            Err(e) => prop_assert_eq!((e.id(), e.kind()), (id, Some(kind))),
        }
    }
}
