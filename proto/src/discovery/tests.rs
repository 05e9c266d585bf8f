use proptest::prelude::*;

use super::*;

/// Deterministic pseudo-random keys (splitmix64), distinct with overwhelming odds.
fn keys(n: usize, seed: u64) -> Vec<u64> {
    let mut state = seed;
    (0..n).map(|_| xorf::splitmix64(&mut state)).collect()
}

#[test]
fn split_output_takes_the_tag_and_the_key_from_separate_bytes() {
    let mut out = [0u8; 64];
    for (i, b) in out.iter_mut().enumerate() {
        *b = i as u8;
    }
    let (tag, key) = split_output(&out);
    assert_eq!(tag.0, core::array::from_fn(|i| i as u8));
    assert_eq!(key.0, u64::from_le_bytes([16, 17, 18, 19, 20, 21, 22, 23]));
    assert_eq!(format!("{tag:?}"), "Tag(..)", "tags are never printed");
}

#[test]
fn a_snapshot_round_trips_and_holds_every_key() {
    for n in [0, 1, 2, 3, 100, 10_000] {
        let ks = keys(n, n as u64);
        let snap = FilterSnapshot::build(7, ks.clone()).expect("builds");
        let bytes = snap.encode();
        let back = FilterSnapshot::decode(&bytes).expect("decodes");
        assert_eq!((back.day, back.keys), (7, n as u32));
        assert_eq!(back.filter.fingerprints, snap.filter.fingerprints);
        assert_eq!(back.encode(), bytes);
        assert!(ks.iter().all(|k| back.contains(FilterKey(*k))), "n = {n}");
    }
}

#[test]
fn a_snapshot_has_no_false_positives_among_a_million_non_keys() {
    let ks = keys(10_000, 1);
    let snap = FilterSnapshot::build(1, ks).expect("builds");
    let hits = keys(1_000_000, 99)
        .into_iter()
        .filter(|k| snap.contains(FilterKey(*k)))
        .count();
    // Expected 10^6 / 2^32 ≈ 0.0002 (and the non-keys are distinct from the keys).
    assert_eq!(hits, 0);
}

#[test]
fn the_encoding_is_at_most_4_5_bytes_per_user_at_100k() {
    let n = 100_000;
    let snap = FilterSnapshot::build(1, keys(n, 5)).expect("builds");
    let per_user = snap.encode().len() as f64 / n as f64;
    assert!(per_user <= 4.5, "{per_user} B/user");
}

#[test]
fn a_snapshot_decoder_refuses_what_could_index_out_of_bounds() {
    let good = FilterSnapshot::build(3, keys(1000, 3))
        .expect("builds")
        .encode();
    let patch = |at: usize, v: u32| {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let seg_len = u32::from_le_bytes([good[20], good[21], good[22], good[23]]);
    let scl = u32::from_le_bytes([good[28], good[29], good[30], good[31]]);
    let cases: Vec<(Vec<u8>, FilterDecodeError)> = vec![
        (good[..35].to_vec(), FilterDecodeError::Truncated),
        (
            good[..good.len() - 1].to_vec(),
            FilterDecodeError::Truncated,
        ),
        ([&good[..], &[0]].concat(), FilterDecodeError::Trailing),
        ([b"TDF2", &good[4..]].concat(), FilterDecodeError::Magic),
        (patch(20, seg_len * 2), FilterDecodeError::Descriptor),
        (patch(20, 3), FilterDecodeError::Descriptor),
        (patch(24, seg_len), FilterDecodeError::Descriptor),
        (patch(28, scl + 1), FilterDecodeError::Descriptor),
        (patch(28, scl + seg_len), FilterDecodeError::Descriptor),
        (patch(32, u32::MAX), FilterDecodeError::TooLarge),
        (patch(8, u32::MAX), FilterDecodeError::Descriptor),
    ];
    for (i, (bytes, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            FilterSnapshot::decode(&bytes).map(|_| ()),
            Err(want),
            "case {i}"
        );
    }
    // No segment counted (found by review): xorf's third hash would index past the
    // array, so `contains` would panic on a filter the decoder let through.
    let mut headless = Vec::new();
    headless.extend_from_slice(b"TDF1");
    for v in [3u32, 0] {
        headless.extend_from_slice(&v.to_le_bytes());
    }
    headless.extend_from_slice(&7u64.to_le_bytes());
    for v in [4u32, 3, 0, 8] {
        headless.extend_from_slice(&v.to_le_bytes());
    }
    headless.push(0);
    assert_eq!(
        FilterSnapshot::decode(&headless).map(|_| ()),
        Err(FilterDecodeError::Descriptor)
    );
    // A zero value where the bitmap says non-zero.
    let mut zero = good.clone();
    let first_value = zero.len() - 4;
    zero[first_value..].copy_from_slice(&[0; 4]);
    assert_eq!(
        FilterSnapshot::decode(&zero).map(|_| ()),
        Err(FilterDecodeError::Bitmap)
    );
}

#[test]
fn a_delta_is_the_exact_difference_and_round_trips() {
    let old = vec![1, 3, 5, 7];
    let new = vec![2, 3, 7, 8, 9];
    let d = FilterDelta::between(10, &old, 11, &new);
    assert_eq!(d.added, [2, 8, 9]);
    assert_eq!(d.removed, [1, 5]);
    let bytes = d.encode();
    assert_eq!(bytes.len(), d.encoded_len());
    assert_eq!(FilterDelta::decode(&bytes), Ok(d.clone()));
    let next = FilterDelta::between(11, &new, 12, &[]);
    let both = [bytes.clone(), next.encode()].concat();
    assert_eq!(FilterDelta::decode_all(&both), Ok(vec![d.clone(), next]));
    let gap = FilterDelta::between(13, &[], 14, &[4]);
    let broken = [bytes.clone(), gap.encode()].concat();
    assert_eq!(
        FilterDelta::decode_all(&broken),
        Err(FilterDecodeError::Chain)
    );
    assert_eq!(FilterDelta::decode_all(&[]), Ok(vec![]));
}

#[test]
fn a_delta_decoder_refuses_unsorted_overlapping_or_short_lists() {
    let enc = |added: Vec<u64>, removed: Vec<u64>| {
        FilterDelta {
            base_day: 1,
            day: 2,
            added,
            removed,
        }
        .encode()
    };
    let unsorted = [
        enc(vec![2, 1], vec![]),
        enc(vec![], vec![1, 1]),
        enc(vec![1], vec![1]),
    ];
    for b in unsorted {
        assert_eq!(FilterDelta::decode(&b), Err(FilterDecodeError::Unsorted));
    }
    let good = enc(vec![1, 2], vec![3]);
    assert_eq!(
        FilterDelta::decode(&good[..good.len() - 1]),
        Err(FilterDecodeError::Truncated)
    );
    assert_eq!(
        FilterDelta::decode(&[&good[..], &[0]].concat()),
        Err(FilterDecodeError::Trailing)
    );
    let mut huge = good.clone();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        FilterDelta::decode(&huge),
        Err(FilterDecodeError::Truncated)
    );
}

/// A snapshot header, fields in order, little-endian.
fn header(keys: u32, seg_len: u32, seg_count_len: u32, slots: u32) -> Vec<u8> {
    let mut h = b"TDF1".to_vec();
    for v in [1u32, keys] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&5u64.to_le_bytes());
    for v in [seg_len, seg_len - 1, seg_count_len, slots] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

#[test]
fn slots_beyond_what_the_keys_justify_are_refused_before_allocating() {
    // A consistent descriptor of 2^25 slots, no key, and its whole (zero) bitmap: 4 MiB
    // of input that, decoded, would be a 128 MiB slot array. (2^28 slots, the most
    // the header may state, would be 1 GiB from a 32 MiB bitmap.)
    let slots = 1u32 << 25;
    let seg = 1u32 << 18;
    let mut b = header(0, seg, slots - 2 * seg, slots);
    b.resize(b.len() + (slots as usize) / 8, 0);
    assert_eq!(
        FilterSnapshot::decode(&b).map(|_| ()),
        Err(FilterDecodeError::Descriptor)
    );
    // The same with a key claimed but no value present: the counts disagree.
    let mut b = header(1_000_000, seg, slots - 2 * seg, slots);
    b.resize(b.len() + (slots as usize) / 8, 0);
    assert_eq!(
        FilterSnapshot::decode(&b).map(|_| ()),
        Err(FilterDecodeError::Bitmap)
    );
    // Real filters stay within the bound, from 0 keys up.
    for n in [
        0usize, 1, 2, 3, 4, 5, 7, 10, 31, 100, 1000, 4097, 65_535, 65_536, 100_000, 300_000,
    ] {
        let snap = FilterSnapshot::build(1, keys(n, 3)).expect("builds");
        assert!(snap.filter.fingerprints.len() <= max_slots(n), "{n} keys");
        FilterSnapshot::decode(&snap.encode()).expect("decodes");
    }
}

#[test]
fn a_large_snapshot_cannot_claim_many_more_slots_than_its_keys() {
    for keys in [1usize << 16, 1_000_000, 10_000_000] {
        let bound = max_slots(keys);
        assert!(bound < keys * 13 / 10 + 800_000, "{keys}: {bound}");
    }
    assert!(max_slots((1 << 16) - 1) >= 21 * ((1 << 16) - 1) + 12);
}

/// A small real snapshot and delta, encoded, for mutation.
fn encoded(n: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let old = keys(n, seed);
    let mut new = keys(n / 2, seed ^ 1);
    new.extend_from_slice(&old[..n / 2]);
    new.sort_unstable();
    new.dedup();
    let mut sorted_old = old.clone();
    sorted_old.sort_unstable();
    let snap = FilterSnapshot::build(2, new.clone()).expect("builds");
    let delta = FilterDelta::between(1, &sorted_old, 2, &new);
    (snap.encode(), delta.encode())
}

proptest! {
    #[test]
    fn mutated_snapshots_and_deltas_give_typed_errors_never_panics(
        n in 0usize..300,
        seed in any::<u64>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        field in 0usize..9,
        value in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(1 << 28), Just(1 << 18), any::<u32>()],
        cut in any::<usize>(),
        probes in proptest::collection::vec(any::<u64>(), 1..16),
    ) {
        let (snap, delta) = encoded(n, seed);
        for original in [snap, delta] {
            let mut b = original.clone();
            // A header field (4 bytes at 4·field) set to a chosen value.
            if 4 * field + 4 <= b.len() {
                b[4 * field..4 * field + 4].copy_from_slice(&value.to_le_bytes());
            }
            for (at, byte) in &edits {
                let len = b.len().max(1);
                if let Some(x) = b.get_mut(at % len) {
                    *x ^= byte;
                }
            }
            let truncated = &b[..cut % (b.len() + 1)];
            for input in [&b[..], truncated] {
                if let Ok(s) = FilterSnapshot::decode(input) {
                    prop_assert!(s.filter.fingerprints.len() <= max_slots(s.keys as usize));
                    for p in &probes {
                        let _ = s.contains(FilterKey(*p));
                    }
                }
                let _ = FilterDelta::decode_all(input);
            }
        }
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = FilterSnapshot::decode(&bytes);
        let _ = FilterDelta::decode_all(&bytes);
    }

    #[test]
    fn a_decoded_snapshot_answers_any_key_in_bounds(
        seed in any::<u64>(), extra in 0usize..64, probe in any::<u64>(),
    ) {
        // Any descriptor the decoder accepts: contains never indexes out of bounds.
        let snap = FilterSnapshot::build(1, keys(extra, seed)).expect("builds");
        let back = FilterSnapshot::decode(&snap.encode()).expect("decodes");
        let _ = back.contains(FilterKey(probe));
    }
}
