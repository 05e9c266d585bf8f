//! The expiry sweep, on the mailbox log and on sled: 1,000,000 messages stored, of
//! which 10,000 have expired; one sweep pass finds and deletes those 10,000 (with
//! their index entries and the mailboxes' usage counters) and leaves the rest. 64-byte
//! payloads keep the setup's disk use modest; the sweep's cost is per message, not per
//! byte.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_benches::load::now_ms;
use tern_benches::{Backend, BenchRelay};
use tern_proto::{AccountId, DeviceAddress, DeviceId, MessageId};
use tern_relay::store::{Durability, Envelope};

const STORED: u64 = 1_000_000;
const EXPIRED: u64 = 10_000;
const MAILBOXES: u64 = 1_000;

fn device(i: u64) -> DeviceAddress {
    let mut account = [0u8; 16];
    account[..8].copy_from_slice(&i.to_be_bytes());
    DeviceAddress {
        account: AccountId(account),
        device: DeviceId::PRIMARY,
    }
}

fn batch(n: u64, first_id: u64) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(first_id + i).to_be_bytes());
            Envelope {
                message_id: MessageId(id),
                payload: Bytes::from(vec![0x5a; 64]),
            }
        })
        .collect()
}

fn sweep(c: &mut Criterion) {
    for backend in Backend::ALL {
        sweep_on(c, backend);
    }
}

fn sweep_on(c: &mut Criterion, backend: Backend) {
    let relay = BenchRelay::new(backend, Durability::Os).unwrap();
    let now = now_ms();
    let far = now + 30 * 24 * 3600 * 1000;
    // The standing population: 1M live messages over 1,000 mailboxes.
    let per_box = STORED / MAILBOXES;
    let setup = Instant::now();
    for m in 0..MAILBOXES {
        relay
            .store
            .append(&device(m), &batch(per_box, m * per_box), now, far)
            .unwrap();
    }
    relay.store.flush().unwrap();
    eprintln!(
        "{}: stored {STORED} messages in {:?}",
        backend.name(),
        setup.elapsed()
    );

    let mut group = c.benchmark_group("expiry_sweep");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(EXPIRED));
    let mut next_id = STORED;
    group.bench_function(format!("1M_stored_10k_expired/{}", backend.name()), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // 10k messages that expired a moment ago, spread over 100 mailboxes.
                for m in 0..100 {
                    relay
                        .store
                        .append(
                            &device(m),
                            &batch(EXPIRED / 100, next_id),
                            now - 10,
                            now - 1,
                        )
                        .unwrap();
                    next_id += EXPIRED / 100;
                }
                let start = Instant::now();
                let deleted = relay.services.mailboxes().sweep(EXPIRED as usize).unwrap();
                total += start.elapsed();
                assert_eq!(deleted, EXPIRED, "exactly the expired ones go");
            }
            total
        });
    });
    group.finish();
    let remaining: u64 = (0..MAILBOXES)
        .map(|m| relay.store.usage(&device(m)).unwrap().messages)
        .sum();
    assert_eq!(remaining, STORED, "nothing live was swept");
}

criterion_group!(benches, sweep);
criterion_main!(benches);
