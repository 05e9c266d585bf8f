use super::*;

fn relay() -> RelayAddress {
    "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:7443"
        .parse()
        .expect("address")
}

#[test]
fn join_keys_round_trip() {
    let keys = JoinKeys::generate();
    let back = JoinKeys::from_bytes(&keys.to_bytes()).expect("round trip");
    assert_eq!(back.to_bytes(), keys.to_bytes());
    assert_eq!(back.link(&relay()), keys.link(&relay()));
    assert!(JoinKeys::from_bytes(&keys.to_bytes()[1..]).is_err());
    let mut other = keys.to_bytes();
    other[0] = 2;
    assert!(matches!(
        JoinKeys::from_bytes(&other),
        Err(Error::InvalidLink)
    ));
    assert_ne!(keys.reader_hash(), keys.reader_secret());
}
