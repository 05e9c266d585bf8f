//! Multi-recipient sends through the mailboxes service: refusals per account and per
//! device, the commit reserve, and the body's life in the store.

use std::time::Duration;

use bytes::Bytes;
use tern_proto::{
    AccountId, DeviceId, ErrorCode, MessageId, MultiSend, MultiSendResult, RecipientAccount,
    Refused,
};

use super::append_multi;
use crate::core::auth::AuthenticatedDevice;
use crate::core::delivery::DeliveryWindow;
use crate::core::limits::Limits;
use crate::core::rate::AddressPrefix;
use crate::error::Error;
use crate::store::{MailboxStore, StoredMessage};
use crate::testing::{device, fixture, msgs, Fixture};

const TOKEN: &[u8] = b"delivery token";

fn prefix() -> AddressPrefix {
    AddressPrefix::from(std::net::IpAddr::from([127, 0, 0, 1]))
}

fn to(d: &AuthenticatedDevice, devices: &[u32]) -> RecipientAccount {
    RecipientAccount {
        account: d.address().account,
        delivery_token: Bytes::from_static(TOKEN),
        device_list_version: 0,
        devices: devices
            .iter()
            .map(|&i| DeviceId::new(i).expect("id"))
            .collect(),
        parts: Vec::new(),
    }
}

fn send(recipients: Vec<RecipientAccount>) -> MultiSend {
    MultiSend {
        message_id: MessageId([9; 16]),
        body: Bytes::from(vec![0xB0; 64]),
        recipients,
    }
}

async fn multi(f: &Fixture, s: &MultiSend, reserve: bool) -> crate::Result<MultiSendResult> {
    append_multi(&f.services, s, prefix(), reserve)?
        .commit()
        .await
}

async fn accounts(f: &Fixture, seeds: &[u8]) -> Vec<AuthenticatedDevice> {
    let mut out = Vec::new();
    for &s in seeds {
        let d = device(f, s).await;
        f.set_token(&d, TOKEN).await;
        out.push(d);
    }
    out
}

fn pull(f: &Fixture, d: &AuthenticatedDevice) -> Vec<StoredMessage> {
    f.services
        .mailboxes()
        .pull(d, &mut DeliveryWindow::new(1000))
        .expect("pull")
        .messages
}

async fn ack(f: &Fixture, d: &AuthenticatedDevice, seqs: &[u64]) {
    f.services
        .mailboxes()
        .ack(d, seqs)
        .expect("ack")
        .commit()
        .await
        .expect("commit");
}

#[tokio::test]
async fn every_device_gets_the_body_stored_once_until_the_last_ack() {
    let f = fixture(Limits::default());
    let ds = accounts(&f, &[1, 2, 3]).await;
    let second = f.add_device(&ds[0], 1, [77; 32]).await.expect("device");
    let mut r0 = to(&ds[0], &[1, second.get()]);
    r0.parts = vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")];
    let s = send(vec![r0, to(&ds[1], &[1]), to(&ds[2], &[1])]);
    let result = multi(&f, &s, false).await.expect("send");
    assert_eq!(
        result,
        MultiSendResult {
            accepted: 4,
            refused: Vec::new()
        }
    );
    assert_eq!(f.store.shared_bodies(), 1);
    let got = pull(&f, &ds[0]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].shared_body.as_ref(), Some(&s.body));
    assert_eq!(&got[0].payload[..], b"one", "the first device's part");
    for d in &ds[1..] {
        let got = pull(&f, d);
        assert_eq!(got[0].shared_body.as_ref(), Some(&s.body));
        assert!(got[0].payload.is_empty());
        ack(&f, d, &[got[0].seq]).await;
        assert_eq!(f.store.shared_bodies(), 1, "not before the last ack");
    }
    ack(&f, &ds[0], &[got[0].seq]).await;
    let second = f.store.read(
        &tern_proto::DeviceAddress {
            account: ds[0].address().account,
            device: second,
        },
        0,
        10,
    );
    let second = second.expect("read");
    assert_eq!(&second[0].payload[..], b"two");
    f.store
        .remove(
            &tern_proto::DeviceAddress {
                account: ds[0].address().account,
                device: DeviceId::new(2).expect("id"),
            },
            &[second[0].seq],
        )
        .expect("ack");
    assert_eq!(f.store.shared_bodies(), 0, "deleted after the last ack");
}

#[tokio::test]
async fn refusals_are_per_account_and_per_device_and_store_nothing_for_them() {
    let f = fixture(Limits {
        max_queued_messages: 2,
        ..Limits::default()
    });
    let ds = accounts(&f, &[1, 2, 3, 4]).await;
    f.send(&ds[0], *ds[3].address(), &msgs(0..2, 4))
        .await
        .expect("fill");
    let mut wrong = to(&ds[1], &[1]);
    wrong.delivery_token = Bytes::from_static(b"wrong");
    let mut nobody = to(&ds[2], &[1]);
    nobody.account = AccountId([0xEE; 16]);
    let s = send(vec![
        to(&ds[0], &[1, 5]),
        wrong,
        nobody,
        to(&ds[2], &[1]),
        to(&ds[3], &[1]),
    ]);
    let result = multi(&f, &s, false).await.expect("send");
    let refused = |recipient, device: Option<u32>, code| Refused {
        recipient,
        device: device.map(|d| DeviceId::new(d).expect("id")),
        code,
    };
    assert_eq!(
        result,
        MultiSendResult {
            accepted: 2,
            refused: vec![
                refused(0, Some(5), ErrorCode::UnknownRecipient),
                refused(1, None, ErrorCode::Unauthorized),
                refused(2, None, ErrorCode::Unauthorized),
                refused(4, Some(1), ErrorCode::MailboxFull),
            ],
        }
    );
    assert_eq!(pull(&f, &ds[0]).len(), 1);
    assert!(pull(&f, &ds[1]).is_empty(), "nothing for a wrong token");
    assert_eq!(pull(&f, &ds[3]).len(), 2, "nothing past the full mailbox");
    assert_eq!(f.store.shared_bodies(), 1);
}

#[tokio::test]
async fn all_refused_stores_nothing() {
    let f = fixture(Limits::default());
    let ds = accounts(&f, &[1]).await;
    let mut wrong = to(&ds[0], &[1, 2]);
    wrong.delivery_token = Bytes::from_static(b"wrong");
    let result = multi(&f, &send(vec![wrong, to(&ds[0], &[3])]), false)
        .await
        .expect("answered");
    assert_eq!(result.accepted, 0);
    assert_eq!(result.refused.len(), 2);
    assert_eq!(f.store.shared_bodies(), 0);
    assert_eq!(f.store.totals(), Default::default());
}

#[tokio::test]
async fn a_commit_may_pass_the_queue_limit_by_the_reserve_and_no_further() {
    let f = fixture(Limits {
        max_queued_messages: 3,
        ..Limits::default()
    });
    let ds = accounts(&f, &[1, 2]).await;
    f.send(&ds[0], *ds[1].address(), &msgs(0..3, 4))
        .await
        .expect("fill");
    let s = send(vec![to(&ds[1], &[1])]);
    let plain = multi(&f, &s, false).await.expect("send");
    assert_eq!(plain.refused[0].code, ErrorCode::MailboxFull);
    for i in 0..super::COMMIT_RESERVE {
        let r = multi(&f, &s, true).await.expect("commit");
        assert_eq!(r.accepted, 1, "reserved entry {i}");
    }
    let past = multi(&f, &s, true).await.expect("commit");
    assert_eq!(past.refused[0].code, ErrorCode::MailboxFull);
    assert_eq!(pull(&f, &ds[1]).len(), 3 + 64);
}

#[tokio::test]
async fn a_body_over_the_configured_envelope_size_is_refused_whole() {
    let f = fixture(Limits {
        max_envelope_bytes: 32,
        ..Limits::default()
    });
    let ds = accounts(&f, &[1]).await;
    let err = multi(&f, &send(vec![to(&ds[0], &[1])]), false)
        .await
        .expect_err("too large");
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert_eq!(err.code(), ErrorCode::TooLarge);
    assert_eq!(f.store.shared_bodies(), 0);
}

#[tokio::test]
async fn expiry_and_purges_release_the_body() {
    let f = fixture(Limits::default());
    let ds = accounts(&f, &[1, 2, 3]).await;
    let s = send(vec![to(&ds[0], &[1]), to(&ds[1], &[1]), to(&ds[2], &[1])]);
    multi(&f, &s, false).await.expect("send");
    let mailboxes = f.services.mailboxes();
    mailboxes.purge(ds[0].address()).expect("purge");
    assert_eq!(f.store.shared_bodies(), 1, "two entries left");
    f.clock.advance(Duration::from_secs(3601));
    assert!(pull(&f, &ds[1]).is_empty(), "expired: never delivered");
    assert_eq!(mailboxes.sweep(100).expect("sweep"), 2);
    assert_eq!(f.store.shared_bodies(), 0, "expired with its entries");
    assert_eq!(f.store.totals(), Default::default());
}

/// A shared backend may refuse entries the checks let through: on PostgreSQL, an
/// account another node is deleting (its intent written, its tombstone not yet here).
/// That recipient is answered refused, not counted as accepted, and gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_store_refuses_at_commit_is_reported_refused() {
    use crate::store::pg::testdb;
    let (_pg, opts) = testdb::db();
    let pg = std::sync::Arc::new(testdb::node(&opts, "a"));
    let memory = std::sync::Arc::new(crate::store::MemoryStore::new());
    let mut stores = crate::store::Stores::all(memory.clone());
    stores.mailboxes = pg.clone();
    let f = crate::testing::fixture_on(stores, memory);
    let ds = accounts(&f, &[1, 2, 3]).await;
    let second = f.add_device(&ds[1], 2, [78; 32]).await.expect("device");
    let deleting = ds[1].address().account;
    testdb::begin_deletion(&pg, &deleting);
    let s = send(vec![
        to(&ds[0], &[1]),
        to(&ds[1], &[1, second.get()]),
        to(&ds[2], &[1]),
    ]);
    let result = multi(&f, &s, false).await.expect("send");
    // Each device on its own: seq 0 does not tell a deletion from a removed device.
    let refused = |recipient| {
        [1, second.get()].map(|d| Refused {
            recipient,
            device: Some(tern_proto::DeviceId::new(d).expect("device")),
            code: ErrorCode::Unauthorized,
        })
    };
    assert_eq!(
        result,
        MultiSendResult {
            accepted: 2,
            refused: refused(1).to_vec(),
        }
    );
    assert_eq!(pull(&f, &ds[0]).len(), 1);
    assert!(
        pull(&f, &ds[1]).is_empty(),
        "nothing for the account being deleted"
    );
    assert_eq!(pull(&f, &ds[2]).len(), 1);
    // Only the account being deleted: refused, the send itself answered.
    let alone = multi(&f, &send(vec![to(&ds[1], &[1, second.get()])]), false).await;
    assert_eq!(
        alone.expect("answered"),
        MultiSendResult {
            accepted: 0,
            refused: refused(0).to_vec(),
        }
    );
    assert!(pull(&f, &ds[1]).is_empty());
}
