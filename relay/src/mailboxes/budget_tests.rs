//! Relay-wide budgets and the disk reserve, as the services apply them.

use std::sync::Arc;

use tern_proto::{ErrorCode, KeyUpload};

use crate::config::RateLimitsConfig;
use crate::core::budget::{Budget, BudgetLimits, DiskSample, RETRY_AFTER_MS};
use crate::core::delivery::DeliveryWindow;
use crate::core::limits::Limits;
use crate::error::Error;
use crate::testing::{device, fixture_with_budget, msgs, registration, Fixture};

fn fixture(limits: BudgetLimits) -> (Fixture, Arc<Budget>) {
    let budget = Arc::new(Budget::new(limits));
    let f = fixture_with_budget(
        Limits::default(),
        &RateLimitsConfig::default(),
        budget.clone(),
    );
    (f, budget)
}

fn assert_full(e: &Error) {
    assert!(matches!(e, Error::StorageFull { .. }), "{e:?}");
    let reply = e.to_reply();
    assert_eq!(reply.code, ErrorCode::Unavailable);
    assert_eq!(reply.retry_after_ms, RETRY_AFTER_MS);
}

fn full_disk() -> [DiskSample; 1] {
    // Under the default reserve of 1 GiB.
    [DiskSample {
        free: (1 << 30) - 1,
        size: 100 << 30,
    }]
}

#[tokio::test]
async fn the_eleventh_message_relay_wide_is_refused_until_a_drain() {
    let (f, _) = fixture(BudgetLimits {
        max_queued_messages: 10,
        ..BudgetLimits::default()
    });
    let (alice, bob, carol) = (
        device(&f, 1).await,
        device(&f, 2).await,
        device(&f, 3).await,
    );
    f.send(&alice, *bob.address(), &msgs(0..6, 8))
        .await
        .expect("6");
    f.send(&alice, *carol.address(), &msgs(0..4, 8))
        .await
        .expect("10");
    let e = f
        .send(&alice, *carol.address(), &msgs(4..5, 8))
        .await
        .expect_err("the 11th, to another mailbox");
    assert_full(&e);
    assert_eq!(
        f.services
            .mailboxes()
            .usage(&carol)
            .expect("usage")
            .messages,
        4
    );

    // Bob drains: room again.
    let mut window = DeliveryWindow::new(64);
    let pulled = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    let seqs: Vec<u64> = pulled.messages.iter().map(|m| m.seq).collect();
    f.services
        .mailboxes()
        .ack(&bob, &seqs)
        .expect("ack")
        .commit()
        .await
        .expect("commit");
    f.send(&alice, *carol.address(), &msgs(4..5, 8))
        .await
        .expect("accepted after the drain");
}

#[tokio::test]
async fn queued_bytes_are_a_relay_wide_budget() {
    let (f, _) = fixture(BudgetLimits {
        max_queued_bytes: 100,
        ..BudgetLimits::default()
    });
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..2, 50))
        .await
        .expect("100 bytes");
    assert_full(
        &f.send(&alice, *alice.address(), &msgs(0..1, 1))
            .await
            .expect_err("101"),
    );
}

#[tokio::test]
async fn under_the_reserve_writes_are_refused_and_drains_work() {
    let (f, budget) = fixture(BudgetLimits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let token = [7u8; 32];
    f.set_token(&bob, &token).await;
    f.send(&alice, *bob.address(), &msgs(0..3, 8))
        .await
        .expect("queued");

    assert!(budget.record_disk(&full_disk()));
    assert_full(
        &f.send(&alice, *bob.address(), &msgs(3..4, 8))
            .await
            .expect_err("send"),
    );
    assert_full(
        &f.sealed_send(*bob.address(), &token, &msgs(3..4, 8))
            .await
            .expect_err("sealed send"),
    );
    assert_full(
        &f.services
            .accounts()
            .register(registration(9))
            .await
            .expect_err("registration"),
    );
    assert_full(
        &f.services
            .keys()
            .publish(&bob, &KeyUpload::default())
            .await
            .expect_err("publish keys"),
    );

    // Drains, acks and sweeps go on.
    let mut window = DeliveryWindow::new(64);
    let pulled = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    assert_eq!(pulled.messages.len(), 3);
    let seqs: Vec<u64> = pulled.messages.iter().map(|m| m.seq).collect();
    let acked = f
        .services
        .mailboxes()
        .ack(&bob, &seqs)
        .expect("ack")
        .commit()
        .await
        .expect("commit");
    assert_eq!(acked.messages, 3);
    f.services.mailboxes().sweep(100).expect("sweep");

    // Space is back: so are sends.
    assert!(!budget.record_disk(&[DiskSample {
        free: 1 << 30,
        size: 100 << 30,
    }]));
    f.send(&alice, *bob.address(), &msgs(3..4, 8))
        .await
        .expect("send");
    f.services
        .accounts()
        .register(registration(9))
        .await
        .expect("registration");
}

#[test]
fn a_full_disk_is_unavailable_with_a_retry_time() {
    let enospc = std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
    let e = Error::from(crate::store::StoreError::from_io("appending", &enospc));
    assert!(matches!(e, Error::Store(crate::store::StoreError::NoSpace)));
    assert_eq!(e.code(), ErrorCode::Unavailable);
    assert_eq!(e.retry_after_ms(), RETRY_AFTER_MS);
    let other = std::io::Error::other("bad sector");
    let e = Error::from(crate::store::StoreError::from_io("appending", &other));
    assert_eq!(
        e.code(),
        ErrorCode::Internal,
        "other I/O errors stay internal"
    );
    let blob = crate::media::BlobError::from(enospc);
    assert_eq!(Error::from(blob).code(), ErrorCode::Unavailable);
}
