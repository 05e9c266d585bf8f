//! The sync logic against a fake relay: what is cached when a request fails, and
//! the bounds on the filter a relay sends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tern_proto::discovery::{
    DiscoveredAccount, FilterDelta, FilterKind, FilterPart, FilterSnapshot, Tag,
};
use tern_proto::AccountId;

use super::sync::{refresh_filter, sync, Pending, Transport, MAX_FILTER_PARTS};
use crate::discovery::{self, DiscoveryError};
use crate::store::MemoryKv;
use crate::{Error, ErrorCode, Result};

type FilterFn = dyn Fn(u32, u32, u32) -> Result<FilterPart> + Send + Sync;

/// A relay whose evaluation is the OPRF with key 1 (it echoes the points).
struct Fake {
    /// Evaluation requests so far.
    calls: AtomicUsize,
    /// Which evaluation requests (by order) are refused.
    refuse: Mutex<Vec<usize>>,
    filter: Mutex<Box<FilterFn>>,
}

fn refused(code: ErrorCode) -> Error {
    Error::Relay {
        code,
        message: String::new(),
        retry_after_ms: 0,
        attempts_left: 0,
        current_epoch: 0,
    }
}

fn snapshot_part(day: u32) -> FilterPart {
    let s = FilterSnapshot::build(day, vec![1, 2, 3]).expect("snapshot");
    FilterPart {
        day,
        kind: FilterKind::Snapshot,
        parts: 1,
        part: 0,
        data: Bytes::from(s.encode()),
    }
}

impl Fake {
    fn new() -> Self {
        Fake {
            calls: AtomicUsize::new(0),
            refuse: Mutex::new(Vec::new()),
            filter: Mutex::new(Box::new(|_, _, _| Ok(snapshot_part(9)))),
        }
    }
    fn set_filter(&self, f: impl Fn(u32, u32, u32) -> Result<FilterPart> + Send + Sync + 'static) {
        *self.filter.lock().unwrap() = Box::new(f);
    }
}

impl Transport for Fake {
    fn evaluate(&self, blinded: Bytes) -> Pending<Bytes> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let refuse = self.refuse.lock().unwrap().contains(&call);
        Box::pin(async move {
            if refuse {
                Err(refused(ErrorCode::RateLimited))
            } else {
                Ok(blinded)
            }
        })
    }
    fn filter(&self, since_day: u32, day: u32, part: u32) -> Pending<FilterPart> {
        let r = (self.filter.lock().unwrap())(since_day, day, part);
        Box::pin(async move { r })
    }
    fn lookup(&self, _tags: Vec<Tag>) -> Pending<Vec<DiscoveredAccount>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// `n` distinct London numbers, as an address book writes them.
fn book(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("020 7946 {i:04}")).collect()
}

fn cached(kv: &MemoryKv, book: &[String]) -> usize {
    book.iter()
        .filter(|n| {
            let e164 = discovery::normalise(n, "GB").expect("valid");
            discovery::cached(kv, &e164).expect("store").is_some()
        })
        .count()
}

const ME: AccountId = AccountId([1; 16]);

#[tokio::test]
async fn a_failed_filter_refresh_keeps_every_answered_evaluation() {
    let kv = MemoryKv::new();
    let fake = Fake::new();
    fake.set_filter(|_, _, _| Err(refused(ErrorCode::Unavailable)));
    let numbers = book(5);
    let e = sync(&fake, &kv, &numbers, "GB", 20_000, ME)
        .await
        .err()
        .expect("the filter fails");
    assert_eq!(e.relay_code(), Some(ErrorCode::Unavailable));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cached(&kv, &numbers), 5);

    // The retry evaluates nothing again.
    fake.set_filter(|_, _, _| Ok(snapshot_part(9)));
    let synced = sync(&fake, &kv, &numbers, "GB", 20_000, ME)
        .await
        .expect("sync");
    assert_eq!(synced.report.evaluated, 0);
    assert!(synced.report.invalid.is_empty());
    assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_batch_does_not_drop_the_others() {
    let kv = MemoryKv::new();
    let fake = Fake::new();
    // Two batches (4096 + 1); the first is refused, the second answered.
    fake.refuse.lock().unwrap().push(0);
    let numbers = book(4097);
    let e = sync(&fake, &kv, &numbers, "GB", 20_000, ME)
        .await
        .err()
        .expect("a batch is refused");
    assert_eq!(e.relay_code(), Some(ErrorCode::RateLimited));
    assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cached(&kv, &numbers), 1);

    let synced = sync(&fake, &kv, &numbers, "GB", 20_000, ME)
        .await
        .expect("sync");
    assert_eq!(synced.report.evaluated, 4096);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    assert_eq!(cached(&kv, &numbers), 4097);
}

#[tokio::test]
async fn the_filter_part_count_is_bounded() {
    let kv = MemoryKv::new();
    let fake = Fake::new();
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    fake.set_filter(move |_, _, part| {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut p = snapshot_part(9);
        p.parts = MAX_FILTER_PARTS + 1;
        p.part = part;
        Ok(p)
    });
    let e = refresh_filter(&fake, &kv).await.expect_err("refused");
    assert!(matches!(
        e,
        Error::Discovery(DiscoveryError::TooManyParts { parts, max })
            if parts == MAX_FILTER_PARTS + 1 && max == MAX_FILTER_PARTS
    ));
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "no other part was asked for"
    );
    assert!(discovery::load_filter(&kv).expect("store").is_none());
}

#[tokio::test]
async fn every_part_must_match_the_first() {
    let whole = snapshot_part(9).data;
    let half = whole.len() / 2;
    // Part 1 of another day, then of another kind, then numbered wrong.
    for case in 0..3u32 {
        let kv = MemoryKv::new();
        let fake = Fake::new();
        let data = whole.clone();
        fake.set_filter(move |_, _, part| {
            let mut p = FilterPart {
                day: 9,
                kind: FilterKind::Snapshot,
                parts: 2,
                part,
                data: if part == 0 {
                    data.slice(..half)
                } else {
                    data.slice(half..)
                },
            };
            if part == 1 {
                match case {
                    0 => p.day = 10,
                    1 => p.kind = FilterKind::Deltas,
                    _ => p.part = 0,
                }
            }
            Ok(p)
        });
        let e = refresh_filter(&fake, &kv).await.expect_err("refused");
        assert!(
            matches!(
                e,
                Error::Discovery(DiscoveryError::PartMismatch { part: 1 })
            ),
            "case {case}: {e:?}"
        );
    }
    // Split the same way and consistent, it is taken.
    let kv = MemoryKv::new();
    let fake = Fake::new();
    fake.set_filter(move |_, _, part| {
        Ok(FilterPart {
            day: 9,
            kind: FilterKind::Snapshot,
            parts: 2,
            part,
            data: if part == 0 {
                whole.slice(..half)
            } else {
                whole.slice(half..)
            },
        })
    });
    let f = refresh_filter(&fake, &kv).await.expect("filter");
    assert_eq!(f.day(), 9);
}

#[tokio::test]
async fn deltas_that_do_not_follow_bring_a_snapshot() {
    let kv = MemoryKv::new();
    let fake = Fake::new();
    refresh_filter(&fake, &kv).await.expect("first snapshot");
    // Deltas from day 7 do not follow day 9; a snapshot of day 12 is then asked for.
    fake.set_filter(|since, _, _| {
        if since == 0 {
            return Ok(snapshot_part(12));
        }
        let d = FilterDelta::between(7, &[1], 12, &[1, 4]);
        Ok(FilterPart {
            day: 12,
            kind: FilterKind::Deltas,
            parts: 1,
            part: 0,
            data: Bytes::from(d.encode()),
        })
    });
    let f = refresh_filter(&fake, &kv).await.expect("snapshot");
    assert_eq!((f.day(), f.snapshot_day()), (12, 12));
}
