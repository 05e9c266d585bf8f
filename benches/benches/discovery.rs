//! Contact discovery on the relay: the blind evaluation of a padded batch of 1024
//! points (decode + scalar multiplication + encode, through the relay's own path),
//! reported per element (target ≤ 50 µs); the filter build from keys to the encoded
//! snapshot at 100k and 1M discoverable users (target ≤ 5 s at 1M); its decode and a
//! membership test. The encoded bytes per user (target ≤ 4.5) and a 1 % churn
//! delta's share of the snapshot (target ≤ 5 %) are printed once, before the runs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{RngCore, SeedableRng};
use tern_proto::discovery::{FilterDelta, FilterKey, FilterSnapshot};
use tern_relay::discovery::Oprf;

fn keys(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut k: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    k.sort_unstable();
    k.dedup();
    k
}

/// 1024 valid blinded points: random inputs blinded by a client.
fn blinded(n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut out = Vec::with_capacity(32 * n);
    for i in 0..n {
        let input = format!("+1555{i:07}");
        let b = voprf::OprfClient::<voprf::Ristretto255>::blind(input.as_bytes(), &mut rng)
            .expect("blind");
        out.extend_from_slice(&b.message.serialize());
    }
    out
}

/// This thread's CPU time (user + system) in clock ticks, on Linux: wall time on a
/// shared machine counts other processes' turns too.
fn thread_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn evaluate(c: &mut Criterion) {
    let oprf = Oprf::generate(&mut rand::rngs::StdRng::seed_from_u64(1)).expect("key");
    let batch = blinded(1024);
    if let Some(before) = thread_cpu_ticks() {
        let rounds = 40;
        let wall = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(oprf.evaluate_batch(&batch).expect("valid points"));
        }
        let wall = wall.elapsed();
        let ticks = thread_cpu_ticks().unwrap_or(before) - before;
        // Linux reports these in USER_HZ, 100 a second.
        let cpu_us = ticks as f64 * 10_000.0 / (rounds * 1024) as f64;
        let wall_us = wall.as_secs_f64() * 1e6 / (rounds * 1024) as f64;
        eprintln!("evaluate: {cpu_us:.1} µs CPU per element ({wall_us:.1} µs wall)");
    }
    let mut g = c.benchmark_group("evaluate");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("1024", |b| {
        b.iter(|| oprf.evaluate_batch(&batch).expect("valid points"))
    });
    g.finish();
}

fn sizes() {
    for n in [100_000usize, 1_000_000] {
        let k = keys(n, n as u64);
        let snap = FilterSnapshot::build(1, k.clone()).expect("build");
        let bytes = snap.encode().len();
        // 1 % of users leave and 1 % arrive.
        let churn = n / 100;
        let mut next: Vec<u64> = k[churn..].to_vec();
        next.extend(keys(churn, 99 + n as u64));
        next.sort_unstable();
        next.dedup();
        let delta = FilterDelta::between(1, &k, 2, &next).encode().len();
        eprintln!(
            "filter n={n}: {bytes} B = {:.3} B/user ({} slots); 1% churn delta {delta} B = {:.2} % of the snapshot",
            bytes as f64 / n as f64,
            snap.filter.fingerprints.len(),
            100.0 * delta as f64 / bytes as f64
        );
    }
}

fn filter(c: &mut Criterion) {
    sizes();
    let mut g = c.benchmark_group("filter_build");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, n) in [("100k", 100_000usize), ("1M", 1_000_000)] {
        let k = keys(n, n as u64);
        g.bench_with_input(BenchmarkId::from_parameter(name), &k, |b, k| {
            b.iter(|| FilterSnapshot::build(1, k.clone()).expect("build").encode())
        });
    }
    g.finish();

    let bytes = FilterSnapshot::build(1, keys(1_000_000, 3))
        .expect("build")
        .encode();
    let mut g = c.benchmark_group("filter_decode");
    g.sample_size(10);
    g.bench_function("1M", |b| {
        b.iter(|| FilterSnapshot::decode(&bytes).expect("decode"))
    });
    g.finish();

    let snap = FilterSnapshot::decode(&bytes).expect("decode");
    let probes = keys(1024, 4);
    let mut g = c.benchmark_group("contains");
    g.throughput(Throughput::Elements(probes.len() as u64));
    g.bench_function("1M/1024", |b| {
        b.iter(|| {
            probes
                .iter()
                .filter(|k| snap.contains(FilterKey(**k)))
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, evaluate, filter);
criterion_main!(benches);
