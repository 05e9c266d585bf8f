//! Acks in the log: records that lie end to end are marked dead by one header.

use super::*;

#[test]
fn an_ack_of_a_batch_marks_it_dead_with_one_header_and_keeps_it_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    let store = manual(dir.path(), 1 << 20);
    let batch: Vec<Envelope> = (1..=5).map(|i| msg(i, &[i; 90])).collect();
    let first = store.append(&a, &batch, 1, 100).expect("append");
    let between = one(&store, &b, 6, &[6; 90]);
    let later: Vec<Envelope> = (7..=8).map(|i| msg(i, &[i; 90])).collect();
    let second = store.append(&a, &later, 1, 100).expect("append");
    store.flush().expect("flush");
    let places: Vec<_> = first
        .iter()
        .chain(&second)
        .map(|s| place(&store, &a, *s))
        .collect();
    // Named out of order: the runs follow the file.
    let mut acked: Vec<u64> = first.iter().chain(&second).copied().collect();
    acked.reverse();
    store.remove(&a, &acked).expect("remove");

    // One header over the first batch, one over the second; the records inside a
    // run keep their own headers (not written), and b's message between is live.
    let (segment, offset, _) = places[0];
    let first_span: u64 = places[..5].iter().map(|p| p.2).sum();
    assert_eq!(
        peek(dir.path(), segment, offset),
        record::Next::Dead(first_span, first[4])
    );
    for p in &places[1..5] {
        assert_eq!(peek(dir.path(), p.0, p.1), record::Next::Record(p.2));
    }
    let second_span: u64 = places[5..].iter().map(|p| p.2).sum();
    assert_eq!(
        peek(dir.path(), places[5].0, places[5].1),
        record::Next::Dead(second_span, second[1])
    );
    let (bs, bo, bl) = place(&store, &b, between);
    assert_eq!(peek(dir.path(), bs, bo), record::Next::Record(bl));

    // After a crash (no scrub, no flush of the index) the acks hold.
    crash(store);
    let store = manual(dir.path(), 1 << 20);
    assert!(seqs(&store, &a).is_empty(), "acked ones stay gone");
    assert_eq!(seqs(&store, &b), vec![between]);
    assert!(disk_holds(dir.path(), &[3; 90]), "not scrubbed yet");
    store.scrub().expect("scrub");
    for i in [1u8, 3, 5, 7, 8] {
        assert!(!disk_holds(dir.path(), &[i; 90]), "ciphertext {i} scrubbed");
    }
    assert!(disk_holds(dir.path(), &[6; 90]));
}

#[test]
fn a_run_cut_by_a_failed_write_keeps_what_was_not_marked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (addr(1), addr(2));
    // Three records to a segment: two of a's (a run) and one of b's, which keeps
    // the segment once a's are gone.
    let store = manual(dir.path(), 450);
    let mut s = Vec::new();
    for i in [1u8, 4] {
        s.push(one(&store, &a, i, &[i; 80]));
        s.push(one(&store, &a, i + 1, &[i + 1; 80]));
        one(&store, &b, i + 2, &[i + 2; 80]);
    }
    store.flush().expect("flush");
    let (first, inside) = (place(&store, &a, s[0]), place(&store, &a, s[1]));
    let second = place(&store, &a, s[2]).0;
    assert_eq!(first.0, inside.0);
    assert_ne!(first.0, second);
    refuse_writes(&store, dir.path(), second);
    assert!(
        store.remove(&a, &s).is_err(),
        "the second run's write fails"
    );
    assert_eq!(
        seqs(&store, &a),
        vec![s[2], s[3]],
        "the first run is removed"
    );
    // By one header over both of its records.
    assert_eq!(
        peek(dir.path(), first.0, first.1),
        record::Next::Dead(first.2 + inside.2, s[1])
    );
    assert_eq!(
        peek(dir.path(), inside.0, inside.1),
        record::Next::Record(inside.2)
    );
    store.flush().expect("flush");
    crash(store);
    let store = manual(dir.path(), 450);
    assert_eq!(
        seqs(&store, &a),
        vec![s[2], s[3]],
        "and so across a restart"
    );
    assert_eq!(seqs(&store, &b).len(), 2);
}
