use super::*;

#[test]
fn conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    super::super::conformance::mailbox_rules(&store);
    super::super::conformance::account_rules(&store);
    super::super::conformance::key_rules(&store);
}

#[test]
fn concurrent_fetches_never_share_a_one_time_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path(), 8 << 20).expect("open");
    super::super::conformance::concurrent_fetches(std::sync::Arc::new(store));
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let to = DeviceAddress::from_wire(&[3; 16], 1).expect("addr");
    let seqs = {
        let store = SledStore::open(dir.path(), 8 << 20).expect("open");
        let msgs: Vec<Envelope> = (0..3u8)
            .map(|i| Envelope {
                message_id: MessageId([i; 16]),
                payload: Bytes::from(vec![i; 10]),
            })
            .collect();
        let seqs = store.append(&to, &msgs, 1, 100).expect("append");
        store.remove(&to, &seqs[..1]).expect("remove");
        store.flush().expect("flush");
        seqs
    };
    let store = SledStore::open(dir.path(), 8 << 20).expect("reopen");
    let left = store.read(&to, 0, 10).expect("read");
    assert_eq!(left.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs[1..]);
    assert_eq!(
        store.usage(&to).expect("usage"),
        Usage {
            messages: 2,
            bytes: 20
        }
    );
    let later = store
        .append(
            &to,
            &[Envelope {
                message_id: MessageId([9; 16]),
                payload: Bytes::new(),
            }],
            1,
            100,
        )
        .expect("append");
    assert!(
        later[0] > seqs[2],
        "sequence numbers keep increasing after a restart"
    );
}

#[test]
fn corrupt_records_are_errors_not_panics() {
    assert!(decode_message(&[MSG; 3], &[0; 40]).is_err());
    assert!(decode_usage(&[1, 2, 3]).is_err());
    assert!(codec::decode_account(&[0; 33]).is_err());
    assert!(message_meta(&[0; 5]).is_err());
}
