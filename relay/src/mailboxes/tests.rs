use std::sync::Arc;
use std::time::Duration;

use tern_proto::{DeviceAddress, DeviceId};

use crate::core::delivery::DeliveryWindow;
use crate::core::limits::Limits;
use crate::error::Error;
use crate::store::{MailboxStore, Usage};
use crate::testing::{device, fixture, ids, msgs};

#[tokio::test]
async fn delivers_in_order_and_ack_deletes() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..3, 8))
        .await
        .expect("send");
    f.send(&alice, *bob.address(), &msgs(3..5, 8))
        .await
        .expect("send");

    let mut window = DeliveryWindow::new(3);
    let first = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    assert_eq!(ids(&first), vec![0, 1, 2], "window of three");
    assert!(!first.queue_empty);
    assert!(!first.drained, "an ack must pull again: more is stored");
    assert!(
        f.services
            .mailboxes()
            .pull(&bob, &mut window)
            .expect("pull")
            .messages
            .is_empty(),
        "window full"
    );

    let seqs: Vec<u64> = first.messages.iter().map(|m| m.seq).collect();
    let removed = f
        .services
        .mailboxes()
        .ack(&bob, &seqs)
        .expect("ack")
        .commit()
        .await
        .expect("commit");
    assert_eq!(removed.messages, 3);
    seqs.iter().for_each(|s| assert!(window.on_acked(*s)));
    let rest = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    assert_eq!(ids(&rest), vec![3, 4]);
    assert!(rest.queue_empty);
    assert!(rest.drained, "only new mail has more");
    f.services
        .mailboxes()
        .ack(
            &bob,
            &rest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        )
        .expect("ack")
        .commit()
        .await
        .expect("commit");
    assert_eq!(
        f.services.mailboxes().usage(&bob).expect("usage"),
        Usage::default(),
        "store is empty after acks"
    );
    assert_eq!(
        f.services.mailboxes().tracked_devices(),
        0,
        "no per-device state left behind"
    );
}

#[tokio::test]
async fn a_device_cannot_ack_another_devices_mailbox() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..2, 8))
        .await
        .expect("send");
    let seqs: Vec<u64> = f
        .services
        .mailboxes()
        .pull(&bob, &mut DeliveryWindow::new(10))
        .expect("pull")
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(
        f.services
            .mailboxes()
            .ack(&alice, &seqs)
            .expect("ack")
            .commit()
            .await
            .expect("commit")
            .messages,
        0
    );
    assert_eq!(
        f.services.mailboxes().usage(&bob).expect("usage").messages,
        2
    );
    let mut alice_window = DeliveryWindow::new(10);
    assert!(f
        .services
        .mailboxes()
        .pull(&alice, &mut alice_window)
        .expect("pull")
        .messages
        .is_empty());
}

#[tokio::test]
async fn limits_refuse_whole_sends_and_keep_what_is_stored() {
    let f = fixture(Limits {
        max_envelope_bytes: 16,
        max_batch: 4,
        max_queued_messages: 5,
        max_queued_bytes: 60,
    });
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let to = *bob.address();
    f.send(&alice, to, &msgs(0..4, 10)).await.expect("send");
    assert!(matches!(
        f.send(&alice, to, &msgs(4..6, 1)).await,
        Err(Error::MailboxFull(_))
    ));
    assert!(matches!(
        f.send(&alice, to, &msgs(4..5, 21)).await,
        Err(Error::TooLarge { .. })
    ));
    f.send(&alice, to, &msgs(4..5, 16))
        .await
        .expect("exactly at the envelope limit");
    // 4x10 + 16 = 56 bytes, 5 messages: now full on count.
    assert!(matches!(
        f.send(&alice, to, &msgs(5..6, 1)).await,
        Err(Error::MailboxFull(_))
    ));
    assert!(matches!(
        f.send(&alice, to, &msgs(0..5, 1)).await,
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        f.services.mailboxes().usage(&bob).expect("usage"),
        Usage {
            messages: 5,
            bytes: 56
        }
    );
    let all = f
        .services
        .mailboxes()
        .pull(&bob, &mut DeliveryWindow::new(100))
        .expect("pull");
    assert_eq!(ids(&all), vec![0, 1, 2, 3, 4], "nothing stored was lost");
}

#[tokio::test]
async fn unknown_recipients_are_refused() {
    let f = fixture(Limits::default());
    let alice = device(&f, 1).await;
    let nobody = DeviceAddress::from_wire(&[0xee; 16], 1).expect("addr");
    assert!(matches!(
        f.send(&alice, nobody, &msgs(0..1, 1)).await,
        Err(Error::UnknownRecipient)
    ));
    let no_device = DeviceAddress {
        account: alice.address().account,
        device: DeviceId::new(9).expect("id"),
    };
    assert!(matches!(
        f.send(&alice, no_device, &msgs(0..1, 1)).await,
        Err(Error::UnknownRecipient)
    ));
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_are_swept() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..2, 8))
        .await
        .expect("send");
    f.clock.advance(Duration::from_secs(1800));
    f.send(&alice, *bob.address(), &msgs(2..3, 8))
        .await
        .expect("send");
    f.clock.advance(Duration::from_secs(1800));

    // The first two are exactly at their expiry: never delivered, swept or not.
    let pull = f
        .services
        .mailboxes()
        .pull(&bob, &mut DeliveryWindow::new(10))
        .expect("pull");
    assert_eq!(ids(&pull), vec![2]);
    assert!(pull.queue_empty);

    assert_eq!(
        f.services.mailboxes().sweep(1).expect("sweep"),
        1,
        "bounded batch"
    );
    assert_eq!(f.services.mailboxes().sweep(100).expect("sweep"), 1);
    assert_eq!(f.services.mailboxes().sweep(100).expect("sweep"), 0);
    assert_eq!(f.store.usage(bob.address()).expect("usage").messages, 1);
    f.clock.advance(Duration::from_secs(1800));
    assert_eq!(f.services.mailboxes().sweep(100).expect("sweep"), 1);
    assert_eq!(
        f.store.usage(bob.address()).expect("usage"),
        Usage::default()
    );
}

#[tokio::test]
async fn subscriptions_wake_and_displace() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let first = f.services.mailboxes().subscribe(&bob);
    first.changed().await; // the initial wake-up
    f.send(&alice, *bob.address(), &msgs(0..1, 1))
        .await
        .expect("send");
    tokio::time::timeout(Duration::from_secs(5), first.changed())
        .await
        .expect("woken by a send");
    assert!(!first.displaced());
    let second = f.services.mailboxes().subscribe(&bob);
    tokio::time::timeout(Duration::from_secs(5), first.changed())
        .await
        .expect("woken by displacement");
    assert!(first.displaced());
    second.changed().await; // its initial wake-up
    drop(first);
    // The displaced subscription's drop leaves the new one in place.
    f.send(&alice, *bob.address(), &msgs(1..2, 1))
        .await
        .expect("send");
    tokio::time::timeout(Duration::from_secs(5), second.changed())
        .await
        .expect("still subscribed");
    drop(second);
    assert_eq!(f.services.mailboxes().tracked_devices(), 0);
}

#[tokio::test]
async fn pull_stops_at_the_windows_byte_bound_and_never_says_empty_early() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..5, 8))
        .await
        .expect("send");
    let mut window = DeliveryWindow::new(100).with_max_bytes(20);
    let first = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    assert_eq!(ids(&first), vec![0, 1], "a third would pass 20 bytes");
    assert!(!first.queue_empty);
    assert!(!first.drained, "stopped by the byte bound, not the end");
    assert!(window.on_acked(first.messages[0].seq));
    let next = f
        .services
        .mailboxes()
        .pull(&bob, &mut window)
        .expect("pull");
    assert_eq!(ids(&next), vec![2]);
    assert!(!next.queue_empty);
}

#[test]
fn a_sweep_deletes_log_segments_kept_past_their_deadline() {
    use crate::core::expiry::Ttl;
    use crate::store::{GroupCommit, LogOptions, LogStore};
    use tern_platform::clock::{Clock, ManualClock};
    use tern_proto::limits::MAX_MESSAGE_TTL_MS;

    let dir = tempfile::tempdir().expect("tempdir");
    // A segment whose header no scan can read: kept, but only until its deadline.
    let damaged = dir.path().join("0000000000000001.seg");
    std::fs::write(&damaged, [0xEEu8; 200]).expect("write");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let options = LogOptions {
        background: false,
        now: clock.now(),
        ..LogOptions::default()
    };
    let store = Arc::new(LogStore::open(dir.path(), options).expect("open"));
    let commit = GroupCommit::start(store.clone(), crate::store::Durability::Os).expect("commit");
    let rates = Arc::new(crate::core::rate::RateLimits::new(
        &crate::config::RateLimitsConfig::default(),
        clock.clone(),
    ));
    let mailboxes = super::Mailboxes::new(
        store,
        clock.clone(),
        Limits::default(),
        Ttl::MAX,
        Arc::new(commit),
        rates,
        Arc::default(),
    );
    mailboxes.sweep(100).expect("sweep");
    assert!(damaged.exists());
    clock.advance(Duration::from_millis(MAX_MESSAGE_TTL_MS));
    mailboxes.sweep(100).expect("sweep");
    assert!(!damaged.exists(), "deleted at its deadline");
}

/// The memory store, with every mailbox read after the first `ok_reads` failing (a
/// database lost in the middle of a pull).
struct FailingReads {
    inner: Arc<crate::store::MemoryStore>,
    ok_reads: std::sync::atomic::AtomicUsize,
}

impl crate::store::Flush for FailingReads {
    fn flush(&self) -> crate::store::StoreResult<()> {
        self.inner.flush()
    }
}

impl MailboxStore for FailingReads {
    fn append(
        &self,
        to: &DeviceAddress,
        msgs: &[crate::store::Envelope],
        accepted_at: u64,
        expires_at: u64,
    ) -> crate::store::StoreResult<Vec<u64>> {
        self.inner.append(to, msgs, accepted_at, expires_at)
    }

    fn append_shared(
        &self,
        append: &crate::store::SharedAppend<'_>,
    ) -> crate::store::StoreResult<Vec<u64>> {
        self.inner.append_shared(append)
    }

    fn read(
        &self,
        of: &DeviceAddress,
        after: u64,
        max: usize,
    ) -> crate::store::StoreResult<Vec<crate::store::StoredMessage>> {
        use std::sync::atomic::Ordering;
        let left = self.ok_reads.load(Ordering::SeqCst);
        if left == 0 {
            return Err(crate::store::StoreError::Unavailable("read lost".into()));
        }
        self.ok_reads.store(left - 1, Ordering::SeqCst);
        self.inner.read(of, after, max)
    }

    fn remove(&self, of: &DeviceAddress, seqs: &[u64]) -> crate::store::StoreResult<Usage> {
        self.inner.remove(of, seqs)
    }

    fn usage(&self, of: &DeviceAddress) -> crate::store::StoreResult<Usage> {
        self.inner.usage(of)
    }

    fn totals(&self) -> crate::store::Totals {
        self.inner.totals()
    }

    fn expired(
        &self,
        now: u64,
        max: usize,
    ) -> crate::store::StoreResult<Vec<crate::store::Expired>> {
        self.inner.expired(now, max)
    }

    fn expire(
        &self,
        of: &DeviceAddress,
        entries: &[crate::store::Expired],
    ) -> crate::store::StoreResult<Usage> {
        self.inner.expire(of, entries)
    }
}

#[tokio::test]
async fn a_pull_whose_second_read_fails_returns_what_the_first_found() {
    second_read_fails(false).await;
}

/// The same through [`crate::mailboxes::Mailboxes::pull_later`] (the delivery
/// task's), on a store without `read_later` (it reads on the caller's thread).
#[tokio::test]
async fn a_later_pull_whose_second_read_fails_returns_what_the_first_found() {
    second_read_fails(true).await;
}

async fn second_read_fails(later: bool) {
    let memory = Arc::new(crate::store::MemoryStore::new());
    let failing = Arc::new(FailingReads {
        inner: memory.clone(),
        ok_reads: usize::MAX.into(),
    });
    let mut stores = crate::store::Stores::all(memory.clone());
    stores.mailboxes = failing.clone();
    let f = crate::testing::fixture_on(stores, memory);
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    f.send(&alice, *bob.address(), &msgs(0..2, 8))
        .await
        .expect("send");
    f.clock.advance(Duration::from_secs(3600));
    f.send(&alice, *bob.address(), &msgs(2..6, 8))
        .await
        .expect("send");

    // The first read (three: two expired, one live) leaves room, so a second read
    // follows, and fails.
    failing
        .ok_reads
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let mut window = DeliveryWindow::new(3);
    let pull = pull_by(&f, &bob, &mut window, later)
        .await
        .expect("what the first read found");
    assert_eq!(ids(&pull), vec![2], "the live message the first read found");
    assert!(pull.read_failed.is_some(), "the caller must pull again");
    assert!(!pull.queue_empty);
    assert_eq!(window.in_flight(), 1);

    // A pull whose first read fails has nothing to return: an error.
    let failed = pull_by(&f, &bob, &mut window, later).await;
    assert!(failed.is_err());

    // The database back: the rest follows, nothing skipped or pushed twice.
    failing
        .ok_reads
        .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    let rest = pull_by(&f, &bob, &mut window, later).await.expect("pull");
    assert_eq!(ids(&rest), vec![3, 4]);
    assert!(rest.read_failed.is_none());
}

async fn pull_by(
    f: &crate::testing::Fixture,
    device: &crate::core::auth::AuthenticatedDevice,
    window: &mut DeliveryWindow,
    later: bool,
) -> crate::error::Result<crate::mailboxes::Pull> {
    let mailboxes = f.services.mailboxes();
    if later {
        mailboxes.pull_later(device, window).await
    } else {
        mailboxes.pull(device, window)
    }
}
