use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::keys::SignedKey;

/// typed -> v1 -> bytes -> v1 -> typed.
fn round_trip(m: ServerMessage) -> Result<ServerMessage, ServerFrameError> {
    let bytes = v1::ServerFrame::from(m).encode_to_vec();
    ServerMessage::try_from(v1::ServerFrame::decode(&bytes[..]).expect("decodes"))
}

fn bundle(device: u32, one_time: bool) -> DeviceBundle {
    DeviceBundle {
        device: DeviceId::new(device).expect("not 0"),
        identity_key: [1; 32],
        identity_dh: SignedKey {
            id: 0,
            key: [2; 32],
            signature: [3; 64],
        },
        signed_prekey: SignedKey {
            id: 9,
            key: [4; 32],
            signature: [5; 64],
        },
        one_time_prekey: one_time.then_some((7, [6; 32])),
    }
}

fn one_of_each() -> Vec<Reply> {
    vec![
        Reply::Register(DeviceAddress {
            account: AccountId([1; 16]),
            device: DeviceId::PRIMARY,
        }),
        Reply::AddDevice(DeviceId::new(2).expect("not 0")),
        Reply::Auth {
            queued: 12,
            next_certificate: None,
        },
        Reply::Auth {
            queued: 0,
            next_certificate: Some(NextCertificate {
                fingerprint: crate::Fingerprint([7; 32]),
                switch_at_ms: 1_700_000_000_000,
            }),
        },
        Reply::Send { accepted: 3 },
        Reply::Ack { deleted: 2 },
        Reply::Ping,
        Reply::PublishKeys {
            one_time_prekeys: 100,
        },
        Reply::FetchKeys(vec![bundle(1, true), bundle(2, false)]),
        Reply::SenderCertificate(IssuedCertificate {
            certificate: Bytes::from_static(b"encoded"),
            signature: [8; 64],
        }),
        Reply::SetDeliveryToken,
        Reply::RelayInfo {
            signing_key: [9; 32],
        },
        Reply::BlobStatus(Some(BlobStatus {
            size: 10,
            expires_at_ms: 11,
        })),
        Reply::BlobStatus(None),
        Reply::TouchBlob { expires_at_ms: 12 },
        Reply::ListDevices {
            devices: vec![DeviceId::PRIMARY, DeviceId::new(3).expect("not 0")],
            list: None,
        },
        Reply::ListDevices {
            devices: vec![DeviceId::PRIMARY],
            list: Some(signed_list()),
        },
        Reply::DeleteAccount,
        Reply::DiscoveryEvaluated(Bytes::from(vec![3; 64])),
        Reply::DiscoveryFound(vec![DiscoveredAccount {
            tag: Tag([4; 16]),
            account: AccountId([5; 16]),
            identity_key: [6; 32],
        }]),
        Reply::DiscoveryFound(vec![]),
        Reply::DiscoveryFilterPart(FilterPart {
            day: 20_000,
            kind: FilterKind::Deltas,
            parts: 3,
            part: 2,
            data: Bytes::from_static(b"TDD1"),
        }),
        Reply::SetDiscoverable,
        Reply::VerificationStarted {
            session: VerificationId([8; 16]),
            expires_at_ms: 600_000,
        },
        Reply::Verified { discoverable: true },
        Reply::Verified {
            discoverable: false,
        },
        Reply::OpenProvisioning {
            expires_at_ms: 600_000,
        },
        Reply::DepositProvisioning,
        Reply::TakeProvisioning(None),
        Reply::TakeProvisioning(Some(Bytes::from(vec![7; 48]))),
        Reply::PublishDeviceList,
        Reply::RemoveDevice,
        Reply::PublishKeyPackages { stored: 99 },
        Reply::FetchKeyPackages(vec![
            crate::FetchedKeyPackage {
                device: DeviceId::PRIMARY,
                key_package: Bytes::from_static(&[1; 280]),
                last_resort: false,
            },
            crate::FetchedKeyPackage {
                device: DeviceId::new(2).expect("not 0"),
                key_package: Bytes::from_static(&[2; 280]),
                last_resort: true,
            },
        ]),
        Reply::CreateGroup,
        Reply::GroupCommit {
            epoch: 8,
            results: vec![multi_result(), crate::MultiSendResult::default()],
        },
        Reply::MultiSend(multi_result()),
    ]
}

fn multi_result() -> crate::MultiSendResult {
    crate::MultiSendResult {
        accepted: 5,
        refused: vec![
            crate::Refused {
                recipient: 0,
                device: None,
                code: ErrorCode::Unauthorized,
            },
            crate::Refused {
                recipient: 2,
                device: DeviceId::new(3),
                code: ErrorCode::MailboxFull,
            },
        ],
    }
}

fn signed_list() -> SignedDeviceList {
    let list = crate::device_list::DeviceList {
        account: AccountId([6; 16]),
        version: 4,
        entries: vec![crate::device_list::DeviceEntry {
            id: DeviceId::PRIMARY,
            device_key: [1; 32],
            identity_dh: [2; 32],
        }],
    };
    let bytes = Bytes::from(list.encode().expect("valid"));
    SignedDeviceList {
        list,
        bytes,
        signature: [3; 64],
    }
}

#[test]
fn malformed_verification_replies_fail_their_request() {
    for len in [0, 15, 17] {
        let wire = Wire::VerificationStarted(v1::VerificationStarted {
            session_id: Bytes::from(vec![1; len]),
            expires_at_ms: 1,
        });
        let e = ServerMessage::try_from(response(9, wire)).expect_err("malformed");
        assert_eq!(e.request_id(), Some(9));
        assert_eq!(e.malformed().field(), "verification_started.session_id");
    }
}

#[test]
fn a_next_certificate_with_a_short_fingerprint_is_malformed() {
    let short = v1::NextCertificate {
        fingerprint: Bytes::from(vec![1; 31]),
        switch_at_ms: 1,
    };
    let pushed = v1::ServerFrame {
        body: Some(Body::NextCertificate(short.clone())),
    };
    let e = ServerMessage::try_from(pushed).expect_err("malformed");
    assert_eq!(e.request_id(), None);
    assert_eq!(e.malformed().field(), "next_certificate.fingerprint");
    let answered = Wire::Auth(v1::AuthResponse {
        queued: 1,
        next_certificate: Some(short),
    });
    let e = ServerMessage::try_from(response(9, answered)).expect_err("malformed");
    assert_eq!(e.request_id(), Some(9));
}

#[test]
fn a_wrong_code_carries_its_attempts_left() {
    let m = ServerMessage::Response {
        id: 4,
        result: Err(ErrorReply::wrong_code(3)),
    };
    let Ok(ServerMessage::Response { result: Err(e), .. }) = round_trip(m) else {
        panic!("an error reply")
    };
    assert_eq!((e.code, e.attempts_left), (ErrorCode::WrongCode, 3));
}

#[test]
fn malformed_discovery_replies_fail_their_request() {
    let bad = [
        Wire::DiscoveryEvaluated(v1::DiscoveryEvaluated {
            evaluated: Bytes::from(vec![1; 33]),
        }),
        Wire::DiscoveryEvaluated(v1::DiscoveryEvaluated::default()),
        Wire::DiscoveryFound(v1::DiscoveryFound {
            accounts: vec![v1::DiscoveredAccount {
                tag: Bytes::from(vec![1; 15]),
                account_id: Bytes::from(vec![1; 16]),
                identity_key: Bytes::from(vec![1; 32]),
            }],
        }),
        Wire::DiscoveryFilterPart(v1::DiscoveryFilterPart {
            kind: 7,
            parts: 1,
            ..Default::default()
        }),
        Wire::DiscoveryFilterPart(v1::DiscoveryFilterPart {
            kind: v1::FilterKind::Snapshot as i32,
            parts: 2,
            part: 2,
            ..Default::default()
        }),
    ];
    for wire in bad {
        let e = ServerMessage::try_from(response(9, wire)).expect_err("malformed");
        assert_eq!(e.request_id(), Some(9));
    }
}

#[test]
fn every_reply_and_message_round_trips() {
    let mut messages: Vec<_> = one_of_each()
        .into_iter()
        .enumerate()
        .map(|(id, r)| ServerMessage::Response {
            id: id as u64,
            result: Ok(r),
        })
        .collect();
    messages.push(ServerMessage::Response {
        id: 0,
        result: Err(ErrorReply {
            code: ErrorCode::RateLimited,
            message: "rate limited: retry after 5 ms".into(),
            retry_after_ms: 5,
            attempts_left: 0,
            current_epoch: 0,
        }),
    });
    messages.push(ServerMessage::Response {
        id: 3,
        result: Err(ErrorReply::stale_epoch(41)),
    });
    messages.push(ServerMessage::Delivery(Delivery {
        seq: 4,
        message_id: MessageId([4; 16]),
        payload: Bytes::from_static(b"ciphertext"),
        shared_body: None,
        accepted_at_ms: 1,
        expires_at_ms: 2,
    }));
    messages.push(ServerMessage::Delivery(Delivery {
        seq: 5,
        message_id: MessageId([5; 16]),
        payload: Bytes::new(),
        shared_body: Some(Bytes::from_static(b"\x02group")),
        accepted_at_ms: 1,
        expires_at_ms: 2,
    }));
    messages.push(ServerMessage::QueueEmpty);
    messages.push(ServerMessage::NextCertificate(NextCertificate {
        fingerprint: crate::Fingerprint([9; 32]),
        switch_at_ms: 5,
    }));
    for m in messages {
        assert_eq!(round_trip(m.clone()), Ok(m));
    }
}

#[test]
fn an_error_reply_shows_its_message_or_else_its_code() {
    let e = ErrorReply::new(ErrorCode::BadRequest, "bad request: empty request");
    assert_eq!(e.to_string(), "bad request: empty request");
    assert_eq!(e.retry_after_ms, 0);
    assert_eq!(
        ErrorReply::new(ErrorCode::NotFound, "").to_string(),
        "not found"
    );
}

#[test]
fn an_unknown_error_code_is_unspecified() {
    let frame = v1::ServerFrame {
        body: Some(Body::Response(v1::Response {
            request_id: 3,
            result: Some(Wire::Error(v1::Error {
                code: 99,
                message: "from the future".into(),
                retry_after_ms: 0,
                attempts_left: 0,
                current_epoch: 0,
            })),
        })),
    };
    let Ok(ServerMessage::Response {
        id: 3,
        result: Err(e),
    }) = ServerMessage::try_from(frame)
    else {
        panic!("an error reply");
    };
    assert_eq!(e.code, ErrorCode::Unspecified);
}

fn response(id: u64, result: Wire) -> v1::ServerFrame {
    v1::ServerFrame {
        body: Some(Body::Response(v1::Response {
            request_id: id,
            result: Some(result),
        })),
    }
}

fn wire_bundle() -> v1::PreKeyBundle {
    v1::PreKeyBundle::from(&bundle(1, true))
}

#[test]
fn a_malformed_reply_fails_its_own_request() {
    let short = Bytes::from_static(&[1; 3]);
    let cases: Vec<(Wire, &str)> = vec![
        (
            Wire::Register(v1::RegisterResponse {
                account_id: short.clone(),
                device_id: 1,
            }),
            "register_response.account_id",
        ),
        (
            Wire::Register(v1::RegisterResponse {
                account_id: Bytes::from_static(&[1; 16]),
                device_id: 0,
            }),
            "register_response.device_id",
        ),
        (
            Wire::AddDevice(v1::AddDeviceResponse { device_id: 0 }),
            "add_device_response.device_id",
        ),
        (
            Wire::SenderCertificate(v1::SenderCertificateResponse {
                certificate: Bytes::new(),
                signature: short.clone(),
            }),
            "sender_certificate_response.signature",
        ),
        (
            Wire::RelayInfo(v1::RelayInfoResponse {
                signing_key: short.clone(),
            }),
            "relay_info_response.signing_key",
        ),
        (
            Wire::ListDevices(v1::ListDevicesResponse {
                device_ids: vec![1, 0],
                ..Default::default()
            }),
            "list_devices_response.device_ids",
        ),
        (
            Wire::ListDevices(v1::ListDevicesResponse {
                device_ids: vec![1],
                device_list: signed_list().bytes.slice(..30),
                device_list_signature: Bytes::from_static(&[0; 64]),
            }),
            "list_devices_response.device_list",
        ),
        (
            Wire::ListDevices(v1::ListDevicesResponse {
                device_ids: vec![1],
                device_list: signed_list().bytes,
                device_list_signature: short.clone(),
            }),
            "list_devices_response.device_list",
        ),
        (
            Wire::TakeProvisioning(v1::TakeProvisioningResponse {
                payload: Bytes::from(vec![0; crate::limits::MAX_LINK_PAYLOAD + 1]),
            }),
            "take_provisioning.payload",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    device_id: 0,
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.device_id",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    identity_key: short.clone(),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.identity_key",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    identity_dh: short.clone(),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.identity_dh",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    identity_dh_signature: short.clone(),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.identity_dh_signature",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    signed_prekey: None,
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.signed_prekey",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    signed_prekey: Some(v1::SignedPreKey {
                        id: 1,
                        public_key: short.clone(),
                        signature: Bytes::copy_from_slice(&[1; 64]),
                    }),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.signed_prekey.public_key",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    signed_prekey: Some(v1::SignedPreKey {
                        id: 1,
                        public_key: Bytes::copy_from_slice(&[1; 32]),
                        signature: short.clone(),
                    }),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.signed_prekey.signature",
        ),
        (
            Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: vec![v1::PreKeyBundle {
                    one_time_prekey: Some(v1::OneTimePreKey {
                        id: 1,
                        public_key: short.clone(),
                    }),
                    ..wire_bundle()
                }],
            }),
            "pre_key_bundle.one_time_prekey.public_key",
        ),
    ];
    for (wire, field) in cases {
        let e = ServerMessage::try_from(response(17, wire)).expect_err(field);
        assert_eq!((e.request_id(), e.malformed().field()), (Some(17), field));
    }
}

#[test]
fn a_broken_frame_fails_the_connection() {
    let no_result = v1::ServerFrame {
        body: Some(Body::Response(v1::Response {
            request_id: 4,
            result: None,
        })),
    };
    let bad_delivery = v1::ServerFrame {
        body: Some(Body::Delivery(v1::Delivery {
            message_id: Bytes::from_static(&[1; 15]),
            ..Default::default()
        })),
    };
    for (frame, field) in [
        (no_result, "response.result"),
        (bad_delivery, "delivery.message_id"),
        (v1::ServerFrame { body: None }, "server_frame.body"),
    ] {
        let e = ServerMessage::try_from(frame).expect_err(field);
        assert_eq!((e.request_id(), e.malformed().field()), (None, field));
    }
}

#[test]
fn delivery_payloads_are_not_copied() {
    let payload = Bytes::from(vec![3u8; 500]);
    let frame = v1::ServerFrame {
        body: Some(Body::Delivery(v1::Delivery {
            seq: 1,
            message_id: Bytes::from_static(&[1; 16]),
            payload: payload.clone(),
            accepted_at_ms: 0,
            expires_at_ms: 0,
            shared_body: payload.slice(100..),
        })),
    };
    let Ok(ServerMessage::Delivery(d)) = ServerMessage::try_from(frame) else {
        panic!("a delivery");
    };
    assert_eq!(d.payload.as_ptr(), payload.as_ptr());
    let shared = d.shared_body.clone().expect("a shared body");
    assert_eq!(shared.as_ptr(), payload[100..].as_ptr());
    let back = v1::Delivery::from(d);
    assert_eq!(back.payload.as_ptr(), payload.as_ptr());
    assert_eq!(back.shared_body.as_ptr(), payload[100..].as_ptr());
}

proptest! {
    #[test]
    fn any_bytes_decode_and_check_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frame) = v1::ServerFrame::decode(&bytes[..]) {
            if let Ok(m) = ServerMessage::try_from(frame) {
                prop_assert_eq!(round_trip(m.clone()), Ok(m));
            }
        }
    }

    #[test]
    fn error_replies_round_trip(id in any::<u64>(), code in 0i32..19, message in ".{0,40}", retry_after_ms in any::<u64>(), attempts_left in any::<u32>(), current_epoch in any::<u64>()) {
        let m = ServerMessage::Response {
            id,
            result: Err(ErrorReply { code: ErrorCode::from_wire(code), message, retry_after_ms, attempts_left, current_epoch }),
        };
        prop_assert_eq!(round_trip(m.clone()), Ok(m));
    }
}
