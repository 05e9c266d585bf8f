use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::SigningKey;
use tern_proto::DeviceId;

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
        assert_eq!(text.parse::<Link>().expect("FromStr"), link);
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

/// What a primary with `identity` would seal for the device that made `link`.
fn payload_for(identity: &SigningKey, link: &Link, listed: bool) -> LinkPayload {
    use crate::crypto::devices::{sign_device_list, DeviceEntry, DeviceList};
    use ed25519_dalek::Signer;
    let account = tern_proto::AccountId([3; 16]);
    let device_id = DeviceId::new(2).expect("id");
    let mut entries = vec![DeviceEntry {
        id: DeviceId::PRIMARY,
        device_key: SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes(),
        identity_dh: [5; 32],
    }];
    if listed {
        entries.push(DeviceEntry {
            id: device_id,
            device_key: link.device_key,
            identity_dh: link.identity_dh,
        });
    }
    let list = DeviceList {
        account,
        version: 2,
        entries,
    };
    let (device_list, device_list_signature) = sign_device_list(identity, &list).expect("sign");
    LinkPayload {
        account,
        device_id,
        identity_key: identity.verifying_key().to_bytes(),
        device_signature: identity
            .sign(&tern_proto::auth::device_certificate(
                Some(&account),
                &link.device_key,
            ))
            .to_bytes(),
        identity_dh_signature: identity
            .sign(&tern_proto::auth::identity_agreement_key(&link.identity_dh))
            .to_bytes(),
        device_list,
        device_list_signature,
        delivery_token: [6; 32],
        relay_signing_key: [7; 32],
        contacts: vec![
            LinkedContact {
                account: tern_proto::AccountId([8; 16]),
                identity_key: [9; 32],
                delivery_token: Some([10; 32]),
            },
            LinkedContact {
                account: tern_proto::AccountId([11; 16]),
                identity_key: [12; 32],
                delivery_token: None,
            },
        ],
        contacts_complete: true,
        created_at_ms: 1_700_000_000_000,
    }
}

#[test]
fn a_sealed_payload_opens_for_the_device_that_made_the_link() {
    let keys = JoinKeys::generate();
    let link = Link::parse(&keys.link(&relay()).to_string()).expect("primary reads it");
    let identity = SigningKey::generate(&mut rand::rngs::OsRng);
    let payload = payload_for(&identity, &link, true);
    let sealed = seal_payload(&link, &payload).expect("seal");
    let opened = open_payload(&keys, &relay(), &sealed).expect("open");
    assert_eq!(opened, payload);
    let list = opened
        .verify(&link.device_key, &link.identity_dh)
        .expect("vouched");
    assert_eq!(list.version(), 2);
    // Restored from its stored form, the device opens it too.
    let restored = JoinKeys::from_bytes(&keys.to_bytes()).expect("keys");
    assert_eq!(
        open_payload(&restored, &relay(), &sealed).expect("open"),
        payload
    );
}

#[test]
fn a_payload_sealed_without_the_linking_secret_is_rejected() {
    let keys = JoinKeys::generate();
    let identity = SigningKey::generate(&mut rand::rngs::OsRng);
    // The relay knows the slot id and the HPKE key, not the linking secret.
    let mut forged = keys.link(&relay());
    forged.linking_secret = [0; 32];
    let payload = payload_for(&identity, &forged, true);
    let sealed = seal_payload(&forged, &payload).expect("seal");
    assert!(matches!(
        open_payload(&keys, &relay(), &sealed),
        Err(Error::LinkRejected)
    ));
    // Sealed for another relay (the fingerprint is in HPKE's info).
    let mut elsewhere = keys.link(&relay());
    elsewhere.relay.fingerprint.0[0] ^= 1;
    let sealed = seal_payload(&elsewhere, &payload).expect("seal");
    assert!(matches!(
        open_payload(&keys, &relay(), &sealed),
        Err(Error::LinkRejected)
    ));
}

#[test]
fn a_payload_that_does_not_vouch_for_this_device_is_malformed() {
    let keys = JoinKeys::generate();
    let link = keys.link(&relay());
    let identity = SigningKey::generate(&mut rand::rngs::OsRng);
    let unlisted = payload_for(&identity, &link, false);
    let mut other_device = payload_for(&identity, &link, true);
    other_device.device_signature =
        payload_for(&identity, &JoinKeys::generate().link(&relay()), true).device_signature;
    let mut other_dh = payload_for(&identity, &link, true);
    other_dh.identity_dh_signature = [0; 64];
    let mut other_identity = payload_for(&identity, &link, true);
    other_identity.identity_key = SigningKey::generate(&mut rand::rngs::OsRng)
        .verifying_key()
        .to_bytes();
    for payload in [unlisted, other_device, other_dh, other_identity] {
        let sealed = seal_payload(&link, &payload).expect("seal");
        assert!(matches!(
            open_payload(&keys, &relay(), &sealed),
            Err(Error::LinkPayload(_))
        ));
    }
}

#[test]
fn a_payload_with_a_bad_field_does_not_decode() {
    let keys = JoinKeys::generate();
    let link = keys.link(&relay());
    let identity = SigningKey::generate(&mut rand::rngs::OsRng);
    let good = payload_for(&identity, &link, true);
    assert_eq!(LinkPayload::decode(&good.encode()).expect("decodes"), good);
    let malformed = |b: &[u8]| matches!(LinkPayload::decode(b), Err(Error::LinkPayload(_)));
    assert!(malformed(b"\xff\xff\xff"));
    assert!(malformed(&[]), "every field missing");
    let mut primary = good.clone();
    primary.device_id = DeviceId::PRIMARY;
    assert!(malformed(&primary.encode()), "device 1 is never linked");
    let mut no_list = good.clone();
    no_list.device_list.clear();
    assert!(malformed(&no_list.encode()));
    // A field one byte short: re-encode by hand through prost's wire format.
    let mut bytes = good.encode().to_vec();
    let token = [6u8; 32];
    let at = bytes
        .windows(34)
        .position(|w| w[0] == 0x42 && w[1] == 32 && w[2..] == token)
        .expect("the token field (tag 8)");
    bytes[at + 1] = 31;
    bytes.remove(at + 2);
    assert!(malformed(&bytes), "a 31-byte delivery token");
}

proptest::proptest! {
    #[test]
    fn parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
        let _ = Link::parse(&encode(&bytes));
        let _ = Link::parse(&String::from_utf8_lossy(&bytes));
        let _ = LinkPayload::decode(&bytes);
        let _ = JoinKeys::from_bytes(&bytes);
        let _ = open_payload(&JoinKeys::generate(), &relay(), &bytes);
    }
}
