use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

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

fn encode(b: &[u8]) -> String {
    format!("{LINK_PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
}

/// The link's bytes for `keys`, to alter one part at a time.
fn raw(keys: &JoinKeys) -> Vec<u8> {
    let text = keys.link(&relay()).to_string();
    URL_SAFE_NO_PAD
        .decode(text.strip_prefix(LINK_PREFIX).expect("prefix"))
        .expect("base64")
}

#[test]
fn a_link_round_trips_through_its_text() {
    let keys = JoinKeys::generate();
    let multi: RelayAddress =
        "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@a.example:1,[::1]:2"
            .parse()
            .expect("address");
    for relay in [relay(), multi] {
        let link = keys.link(&relay);
        let text = link.to_string();
        assert!(text.starts_with("tern-link:"));
        assert_eq!(Link::parse(&text).expect("parses"), link);
        assert_eq!(Link::parse(&format!(" {text}\n")).expect("trimmed"), link);
    }
    let link = keys.link(&relay());
    assert_eq!(link.slot_id, keys.slot_id());
    assert_eq!(
        link.device_key,
        keys.device_signing_key().verifying_key().to_bytes()
    );
    assert!(
        !format!("{link:?}").contains(&URL_SAFE_NO_PAD.encode(link.linking_secret)),
        "Debug hides the linking secret"
    );
}

#[test]
fn every_malformed_link_is_invalid_link() {
    let keys = JoinKeys::generate();
    let good = raw(&keys);
    let text = encode(&good);
    let invalid = |s: &str| matches!(Link::parse(s), Err(Error::InvalidLink));
    // Prefix.
    assert!(invalid(text.strip_prefix(LINK_PREFIX).expect("prefix")));
    assert!(invalid(&text.replacen("tern-link:", "tern-contact:", 1)));
    // Base64.
    assert!(invalid(&format!("{text}!")));
    assert!(invalid(&format!("{text}=")), "padding is refused");
    // Length: nothing after the fixed part, cut keys, far too long.
    assert!(invalid(&encode(&good[..145])));
    assert!(invalid(&encode(&good[..100])));
    assert!(invalid(LINK_PREFIX));
    assert!(invalid(&encode(&[good.clone(), vec![b'a'; 2000]].concat())));
    // Version.
    let mut b = good.clone();
    b[0] = 2;
    assert!(invalid(&encode(&b)));
    // Relay address: not UTF-8, not an address.
    let mut b = good[..145].to_vec();
    b.extend_from_slice(&[0xff, 0xfe]);
    assert!(invalid(&encode(&b)));
    let mut b = good[..145].to_vec();
    b.extend_from_slice(b"tern://nope");
    assert!(invalid(&encode(&b)));
    // Points: a small-order X25519 key (HPKE or identity agreement), an Ed25519 key
    // that is not a point or is weak.
    for at in [17, 113] {
        let mut b = good.clone();
        b[at..at + 32].copy_from_slice(&[0; 32]);
        assert!(invalid(&encode(&b)), "small-order X25519 at {at}");
    }
    // Some small y has no x on the curve.
    let not_a_point = (2u8..64)
        .map(|y| {
            let mut k = [0u8; 32];
            k[0] = y;
            k
        })
        .find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err())
        .expect("a y off the curve");
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    for key in [not_a_point, identity_point] {
        let mut b = good.clone();
        b[81..113].copy_from_slice(&key);
        assert!(invalid(&encode(&b)), "bad Ed25519 key");
    }
    assert!(Link::parse(&text).is_ok(), "the unaltered link parses");
}

#[test]
fn a_link_for_another_relay_is_refused() {
    let link = JoinKeys::generate().link(&relay());
    assert!(link.check_relay(&relay()).is_ok());
    let same: RelayAddress =
        "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@b.example:9,127.0.0.1:7443"
            .parse()
            .expect("address");
    assert!(link.check_relay(&same).is_ok(), "a shared host is enough");
    for other in [
        "tern://AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:7443",
        "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@127.0.0.1:7444",
        "tern://AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA@other.example:7443",
    ] {
        let other: RelayAddress = other.parse().expect("address");
        assert!(matches!(
            link.check_relay(&other),
            Err(Error::LinkOtherRelay)
        ));
    }
}
