use rand::rngs::OsRng;
use tern_proto::discovery::{FilterDelta, FilterKey, FilterSnapshot, MAX_DISCOVERY_BATCH};
use voprf::{BlindedElement, OprfServer, Ristretto255};

use super::*;
use crate::store::MemoryKv;

fn numbers(n: usize, base: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("+4420{:08}", base + i as u64))
        .collect()
}

#[test]
fn padded_sizes_depend_only_on_the_count() {
    let mut last_total = 0;
    for n in 1..=10_000usize {
        let sizes = chunk_sizes(n);
        let total: usize = sizes.iter().sum();
        assert!(total >= n && total >= last_total, "n={n}");
        for (i, s) in sizes.iter().enumerate() {
            assert!(s.is_power_of_two() && *s <= MAX_DISCOVERY_BATCH, "n={n}");
            if i + 1 < sizes.len() {
                assert_eq!(*s, MAX_DISCOVERY_BATCH);
            }
        }
        // Padding is less than the last chunk: no chunk is all padding.
        assert!(total - n < *sizes.last().expect("a chunk"), "n={n}");
        last_total = total;
    }
    assert!(chunk_sizes(0).is_empty());
    assert_eq!(chunk_sizes(1000), vec![1024]);
    assert_eq!(chunk_sizes(4097), vec![4096, 1]);
    assert_eq!(chunk_sizes(9000), vec![4096, 4096, 1024]);
}

#[test]
fn two_books_of_one_size_give_batches_of_the_same_shape() {
    for n in [1, 300, 1000, 4096, 5000] {
        let a = blind(&numbers(n, 0), &mut OsRng).expect("blind");
        let b = blind(&numbers(n, 50_000_000), &mut OsRng).expect("blind");
        let shape = |c: &[BlindedChunk]| c.iter().map(|c| c.blinded.len()).collect::<Vec<_>>();
        assert_eq!(shape(&a), shape(&b));
        assert_eq!(
            shape(&a),
            chunk_sizes(n).iter().map(|s| s * 32).collect::<Vec<_>>()
        );
        // Every point, padding included, is a valid point the relay will take.
        for chunk in &a {
            for p in chunk.blinded.chunks_exact(32) {
                assert!(BlindedElement::<Ristretto255>::deserialize(p).is_ok());
            }
        }
    }
}

#[test]
fn unblinded_outputs_are_the_servers_prf() {
    let server = OprfServer::<Ristretto255>::new(&mut OsRng).expect("key");
    let book = numbers(5, 7);
    let chunks = blind(&book, &mut OsRng).expect("blind");
    assert_eq!(chunks.len(), 1);
    let mut evaluated = Vec::new();
    for p in chunks[0].blinded.chunks_exact(32) {
        let e = server.blind_evaluate(&BlindedElement::deserialize(p).expect("point"));
        evaluated.extend_from_slice(&e.serialize());
    }
    let out = chunks[0].finalize(&evaluated, 20_000).expect("finalize");
    assert_eq!(out.len(), 5);
    for (number, o) in &out {
        let full = server.evaluate(number.as_bytes()).expect("evaluate");
        let mut b = [0u8; 64];
        b.copy_from_slice(&full);
        let (tag, key) = split_output(&b);
        assert_eq!((o.tag, o.key, o.day), (tag, key, 20_000));
    }
    // A short answer and a non-point are typed errors.
    assert!(matches!(
        chunks[0].finalize(&evaluated[..32], 1),
        Err(BlindError::Count { sent: 8, got: 1 })
    ));
    let mut bad = evaluated.clone();
    bad[..32].fill(0xff);
    assert_eq!(
        chunks[0].finalize(&bad, 1),
        Err(BlindError::Point { index: 0 })
    );
}

#[test]
fn normalising_takes_valid_numbers_only() {
    assert!(is_e164("+442079460123"));
    for bad in [
        "",
        "+",
        "442079460123",
        "+0442079460123",
        "+1234567890123456",
        "+44a",
    ] {
        assert!(!is_e164(bad), "{bad}");
    }
    assert_eq!(
        normalise("+44 20 7946 0123", "US").as_deref(),
        Some("+442079460123")
    );
    assert_eq!(
        normalise("0044 (20) 7946-0123", "DE").as_deref(),
        Some("+442079460123")
    );
    for bad in ["hello", "+44", "12", "+44 20 7946 0123 4567 89"] {
        assert_eq!(normalise(bad, "GB"), None, "{bad}");
    }
}

#[cfg(feature = "phonenumbers")]
#[test]
fn national_formats_are_read_in_the_default_region() {
    assert_eq!(
        normalise("020 7946 0123", "GB").as_deref(),
        Some("+442079460123")
    );
    assert_eq!(
        normalise("(202) 555-0143", "us").as_deref(),
        Some("+12025550143")
    );
    // A number not valid for its country is refused.
    assert_eq!(normalise("+44 20 7946", "GB"), None);
}

fn snapshot(day: u32, keys: &[u64]) -> FilterSnapshot {
    FilterSnapshot::build(day, keys.to_vec()).expect("build")
}

#[test]
fn the_local_filter_folds_deltas_exactly() {
    let mut f = LocalFilter::new(snapshot(10, &[1, 2, 3, 4]));
    let d11 = FilterDelta::between(10, &[1, 2, 3, 4], 11, &[1, 2, 4, 5]);
    let d12 = FilterDelta::between(11, &[1, 2, 4, 5], 12, &[1, 2, 3, 4]);
    f.apply(&d11).expect("apply");
    assert!(f.contains(FilterKey(5)) && !f.contains(FilterKey(3)));
    // A delta that does not follow is refused and changes nothing.
    assert_eq!(
        f.apply(&d11),
        Err(LocalFilterError::Gap { have: 11, got: 10 })
    );
    f.apply(&d12).expect("apply");
    for k in 1..=4 {
        assert!(f.contains(FilterKey(k)), "{k}");
    }
    assert!(!f.contains(FilterKey(5)));
    assert_eq!(f.day(), 12);
    // Back to the snapshot's set: nothing held, and the record says so.
    let again = LocalFilter::decode(&f.encode_snapshot(), Some(&f.encode_delta())).expect("decode");
    assert_eq!(again.day(), 12);
    assert!(!again.contains(FilterKey(5)) && again.contains(FilterKey(3)));
    assert!(!again.wants_snapshot());
}

#[test]
fn many_changes_ask_for_a_new_snapshot() {
    let keys: Vec<u64> = (1..=1000).collect();
    let mut f = LocalFilter::new(snapshot(1, &keys));
    let more: Vec<u64> = (1..=1060).collect();
    f.apply(&FilterDelta::between(1, &keys, 2, &more))
        .expect("apply");
    assert!(f.wants_snapshot());
}

#[test]
fn outputs_and_filter_persist_and_are_forgotten_at_once() {
    let kv = MemoryKv::new();
    let o = CachedOutput {
        tag: Tag([7; 16]),
        key: FilterKey(99),
        day: 3,
    };
    cache(&kv, &[("+442079460123".into(), o)]).expect("cache");
    assert_eq!(cached(&kv, "+442079460123").expect("get"), Some(o));
    assert_eq!(cached(&kv, "+442079460124").expect("get"), None);
    let f = LocalFilter::new(snapshot(4, &[99, 100]));
    store_filter(&kv, &f, true).expect("store");
    let loaded = load_filter(&kv).expect("load").expect("a filter");
    assert!(loaded.contains(FilterKey(99)));
    // Other namespaces are untouched by forgetting.
    kv.apply(
        vec![Op::Put(Namespace::Contacts, b"c".to_vec(), b"v".to_vec())],
        true,
    )
    .expect("put");
    forget(&kv).expect("forget");
    assert!(kv.scan(Namespace::Discovery).expect("scan").is_empty());
    assert_eq!(cached(&kv, "+442079460123").expect("get"), None);
    assert!(load_filter(&kv).expect("load").is_none());
    assert_eq!(kv.scan(Namespace::Contacts).expect("scan").len(), 1);
    // A damaged output record is an error, a damaged filter is downloaded again.
    kv.apply(
        vec![
            Op::Put(Namespace::Discovery, output_record("+1"), vec![1, 2]),
            Op::Put(Namespace::Discovery, SNAPSHOT_RECORD.to_vec(), vec![0; 40]),
        ],
        true,
    )
    .expect("put");
    assert!(matches!(cached(&kv, "+1"), Err(StoreError::Corrupt)));
    assert!(load_filter(&kv).expect("load").is_none());
}
