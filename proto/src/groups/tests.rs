use bytes::Bytes;

use super::*;
use crate::request::{ClientRequest, Request};
use crate::v1::client_frame::Body;

/// A multi-send to accounts `(account byte, device count)`, with or without parts.
pub(crate) fn multi(shape: &[(u8, u32)], parts: bool) -> MultiSend {
    MultiSend {
        message_id: MessageId([5; 16]),
        body: Bytes::from_static(b"\x02shared body"),
        recipients: shape
            .iter()
            .map(|&(a, n)| RecipientAccount {
                account: AccountId([a; 16]),
                delivery_token: Bytes::from(vec![a; 32]),
                device_list_version: u64::from(a),
                devices: (1..=n).map(|d| DeviceId::new(d).expect("not 0")).collect(),
                parts: if parts {
                    (1..=n).map(|d| Bytes::from(vec![d as u8; 40])).collect()
                } else {
                    Vec::new()
                },
            })
            .collect(),
    }
}

pub(crate) fn commit() -> GroupCommit {
    GroupCommit {
        handle: GroupHandle([3; 16]),
        epoch: 7,
        epoch_token: [4; 32],
        next_token_hash: [5; 32],
        commit_id: CommitId([6; 16]),
        sends: vec![multi(&[(1, 2), (2, 2)], false), multi(&[(3, 1)], false)],
    }
}

fn wire_multi(f: impl FnOnce(&mut v1::MultiSendRequest)) -> Body {
    let mut m = v1::MultiSendRequest::from(multi(&[(1, 2), (2, 1)], true));
    f(&mut m);
    Body::MultiSend(m)
}

fn wire_commit(f: impl FnOnce(&mut v1::GroupCommitRequest)) -> Body {
    let mut c = v1::GroupCommitRequest::from(commit());
    f(&mut c);
    Body::GroupCommit(c)
}

fn publish(f: impl FnOnce(&mut v1::PublishKeyPackagesRequest)) -> Body {
    let mut p = v1::PublishKeyPackagesRequest {
        key_packages: vec![Bytes::from_static(&[1; 300])],
        last_resort: Bytes::from_static(&[2; 300]),
        replace: false,
    };
    f(&mut p);
    Body::PublishKeyPackages(p)
}

/// Each malformed field of the group requests, the field named and the code.
pub(crate) fn malformed() -> Vec<(Body, &'static str, ErrorCode)> {
    use ErrorCode::{BadRequest as BAD, TooLarge};
    let thousand_and_one = || {
        let mut m = multi(&[(1, 500), (2, 501)], false);
        m.recipients[1].devices = (1..=501)
            .map(|d| DeviceId::new(d).expect("not 0"))
            .collect();
        v1::MultiSendRequest::from(m)
    };
    vec![
        (
            publish(|p| p.key_packages.push(Bytes::new())),
            "publish_key_packages.key_packages",
            BAD,
        ),
        (
            publish(|p| {
                p.key_packages
                    .push(Bytes::from(vec![1; MAX_KEY_PACKAGE + 1]))
            }),
            "publish_key_packages.key_packages",
            TooLarge,
        ),
        (
            publish(|p| p.key_packages = vec![Bytes::from_static(&[1; 8]); 201]),
            "publish_key_packages.key_packages",
            TooLarge,
        ),
        (
            publish(|p| p.last_resort = Bytes::from(vec![1; MAX_KEY_PACKAGE + 1])),
            "publish_key_packages.last_resort",
            TooLarge,
        ),
        (
            Body::FetchKeyPackages(v1::FetchKeyPackagesRequest {
                account_id: Bytes::from_static(&[1; 15]),
                device_id: 0,
                delivery_token: Bytes::new(),
            }),
            "fetch_key_packages.account_id",
            BAD,
        ),
        (
            Body::CreateGroup(v1::CreateGroupRequest {
                handle: Bytes::from_static(&[1; 15]),
                token_hash: Bytes::from_static(&[1; 32]),
            }),
            "create_group.handle",
            BAD,
        ),
        (
            Body::CreateGroup(v1::CreateGroupRequest {
                handle: Bytes::from_static(&[1; 16]),
                token_hash: Bytes::from_static(&[1; 31]),
            }),
            "create_group.token_hash",
            BAD,
        ),
        (
            wire_multi(|m| m.message_id = Bytes::new()),
            "multi_send.message_id",
            BAD,
        ),
        (
            wire_multi(|m| m.body = Bytes::new()),
            "multi_send.body",
            BAD,
        ),
        (
            wire_multi(|m| m.body = Bytes::from(vec![0; crate::limits::DEFAULT_MAX_ENVELOPE + 1])),
            "multi_send.body",
            TooLarge,
        ),
        (
            wire_multi(|m| m.recipients.clear()),
            "multi_send.recipients",
            BAD,
        ),
        (
            Body::MultiSend(thousand_and_one()),
            "multi_send.recipients.devices",
            TooLarge,
        ),
        (
            wire_multi(|m| {
                let again = m.recipients[0].clone();
                m.recipients.push(again);
            }),
            "multi_send.recipients.account_id",
            BAD,
        ),
        (
            wire_multi(|m| m.recipients[0].account_id = Bytes::from_static(&[1; 3])),
            "multi_send.recipients.account_id",
            BAD,
        ),
        (
            wire_multi(|m| m.recipients[0].devices = vec![2, 2]),
            "multi_send.recipients.devices",
            BAD,
        ),
        (
            wire_multi(|m| m.recipients[0].devices = vec![0, 2]),
            "multi_send.recipients.devices",
            BAD,
        ),
        (
            wire_multi(|m| {
                m.recipients[0].devices.clear();
                m.recipients[0].parts.clear();
            }),
            "multi_send.recipients.devices",
            BAD,
        ),
        (
            wire_multi(|m| {
                m.recipients[0].parts.pop();
            }),
            "multi_send.recipients.parts",
            BAD,
        ),
        (
            wire_multi(|m| {
                m.recipients[0].parts[0] =
                    Bytes::from(vec![0; crate::limits::DEFAULT_MAX_ENVELOPE + 1]);
            }),
            "multi_send.recipients.parts",
            TooLarge,
        ),
        (
            wire_commit(|c| c.handle = Bytes::new()),
            "group_commit.handle",
            BAD,
        ),
        (
            wire_commit(|c| c.epoch_token = Bytes::from_static(&[1; 16])),
            "group_commit.epoch_token",
            BAD,
        ),
        (
            wire_commit(|c| c.next_token_hash = Bytes::new()),
            "group_commit.next_token_hash",
            BAD,
        ),
        (
            wire_commit(|c| c.commit_id = Bytes::new()),
            "group_commit.commit_id",
            BAD,
        ),
        (wire_commit(|c| c.sends.clear()), "group_commit.sends", BAD),
        (
            wire_commit(|c| {
                let third = c.sends[0].clone();
                c.sends.push(third);
            }),
            "group_commit.sends",
            TooLarge,
        ),
        (
            wire_commit(|c| {
                let mut big = multi(&[(1, 600)], false);
                big.recipients[0].devices = (1..=600)
                    .map(|d| DeviceId::new(d).expect("not 0"))
                    .collect();
                c.sends = vec![big.clone().into(), {
                    big.recipients[0].account = AccountId([2; 16]);
                    big.into()
                }];
            }),
            "group_commit.sends",
            TooLarge,
        ),
        (
            wire_commit(|c| c.sends[1].recipients.clear()),
            "multi_send.recipients",
            BAD,
        ),
    ]
}

fn check(body: Body) -> Result<Request, crate::RequestError> {
    ClientRequest::try_from(v1::ClientFrame {
        request_id: 9,
        body: Some(body),
    })
    .map(|r| r.request)
}

#[test]
fn a_thousand_devices_are_accepted_and_a_thousand_and_one_are_not() {
    let mut m = multi(&[(1, 1), (2, 999)], false);
    assert_eq!(m.device_count(), 1000);
    assert!(check(Body::MultiSend(m.clone().into())).is_ok());
    m.recipients[0]
        .devices
        .push(DeviceId::new(2).expect("not 0"));
    let e = check(Body::MultiSend(m.into())).expect_err("1001 devices");
    assert_eq!(e.code(), ErrorCode::TooLarge);
}

#[test]
fn parts_are_per_device_and_empty_parts_mean_none() {
    let m = multi(&[(1, 3)], true);
    assert_eq!(m.recipients[0].part(2), Bytes::from(vec![3; 40]));
    let m = multi(&[(1, 3)], false);
    assert!(m.recipients[0].part(2).is_empty());
}

#[test]
fn the_same_device_in_two_accounts_is_fine() {
    let m = multi(&[(1, 2), (2, 2)], false);
    assert!(check(Body::MultiSend(m.into())).is_ok());
}

#[test]
fn an_empty_last_resort_keeps_the_current_one() {
    let Ok(Request::PublishKeyPackages { last_resort, .. }) =
        check(publish(|p| p.last_resort = Bytes::new()))
    else {
        panic!("valid publish");
    };
    assert_eq!(last_resort, None);
}

#[test]
fn bodies_and_parts_are_not_copied() {
    let m = multi(&[(1, 2)], true);
    let body = m.body.clone();
    let part = m.recipients[0].parts[1].clone();
    let Ok(Request::MultiSend(back)) = check(Body::MultiSend(m.into())) else {
        panic!("valid send");
    };
    assert_eq!(back.body.as_ptr(), body.as_ptr());
    assert_eq!(back.recipients[0].parts[1].as_ptr(), part.as_ptr());
}

#[test]
fn debug_output_hides_handles_and_tokens() {
    let c = commit();
    let shown = format!("{c:?} {:?}", c.handle);
    assert!(!shown.contains("[3, 3"), "{shown}");
    assert!(!shown.contains("[4, 4"), "{shown}");
    let token = format!("{:?}", multi(&[(7, 1)], false).recipients[0]);
    assert!(token.contains("delivery_token: \"..\""), "{token}");
}
