use proptest::prelude::*;

use super::*;

fn fp() -> String {
    Fingerprint([1; 32]).to_string()
}

#[test]
fn round_trips() {
    for host in ["127.0.0.1", "::1", "relay.example.org"] {
        let a = RelayAddress::new(Fingerprint([0xab; 32]), host, 7443);
        let s = a.to_string();
        assert_eq!(s.parse::<RelayAddress>(), Ok(a), "{s}");
    }
}

#[test]
fn single_host_prints_as_before() {
    let fp = fp();
    for s in [
        format!("tern://{fp}@127.0.0.1:7443"),
        format!("tern://{fp}@[::1]:7443"),
        format!("tern://{fp}@relay.example.org:1"),
    ] {
        let a: RelayAddress = s.parse().unwrap();
        assert!(a.more_hosts.is_empty());
        assert_eq!(a.to_string(), s);
    }
}

#[test]
fn several_hosts_parse_in_order_and_print_back() {
    let fp = fp();
    let s = format!("tern://{fp}@a.example:7443,[2001:db8::1]:7444,10.0.0.2:1");
    let a: RelayAddress = s.parse().unwrap();
    assert_eq!(a.host, "a.example");
    assert_eq!(a.port, 7443);
    let hosts: Vec<(String, u16)> = a.hosts().into_iter().map(|h| (h.host, h.port)).collect();
    assert_eq!(
        hosts,
        [
            ("a.example".to_owned(), 7443),
            ("2001:db8::1".to_owned(), 7444),
            ("10.0.0.2".to_owned(), 1)
        ]
    );
    assert_eq!(a.to_string(), s);
}

#[test]
fn sixteen_hosts_and_no_more() {
    let fp = fp();
    let list = |n: u16| {
        (1..=n)
            .map(|p| format!("h:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let a: RelayAddress = format!("tern://{fp}@{}", list(16)).parse().unwrap();
    assert_eq!(a.hosts().len(), MAX_HOSTS);
    assert_eq!(
        format!("tern://{fp}@{}", list(17)).parse::<RelayAddress>(),
        Err(AddressError::TooManyHosts)
    );
}

#[test]
fn rejects_bad_addresses_with_their_reason() {
    use AddressError::*;
    let fp = fp();
    for (bad, why) in [
        (format!("quic://{fp}@h:1"), Scheme),
        (format!("tern://{fp}h:1"), MissingAt),
        (format!("tern://{fp}@h"), MissingPort),
        (format!("tern://{fp}@h:99999"), BadPort),
        (format!("tern://{fp}@h:0"), BadPort),
        (format!("tern://{fp}@h:+80"), BadPort),
        (format!("tern://{fp}@h:"), BadPort),
        (format!("tern://{fp}@:1"), MissingHost),
        ("tern://AAAA@h:1".to_owned(), FingerprintLength),
        ("tern://!!!@h:1".to_owned(), FingerprintEncoding),
        // A bracket inside the host would print back as another address (found
        // by the ids_and_addresses fuzz target).
        (format!("tern://{fp}@a]:1:80"), BracketInHost),
        (format!("tern://{fp}@[a]b]:80"), BracketInHost),
        (format!("tern://{fp}@a[b:80"), BracketInHost),
        (format!("tern://{fp}@[::1:80"), BadIpv6),
        (format!("tern://{fp}@"), EmptyEntry),
        (format!("tern://{fp}@h:1,"), EmptyEntry),
        (format!("tern://{fp}@,h:1"), EmptyEntry),
        (format!("tern://{fp}@h:1,,g:1"), EmptyEntry),
        (format!("tern://{fp}@h:1,g"), MissingPort),
        (format!("tern://{fp}@h:1,g:70000"), BadPort),
        (format!("tern://{fp}@h:1,h:1"), DuplicateHost),
        (
            format!("tern://{fp}@H.example:1,h.EXAMPLE:1"),
            DuplicateHost,
        ),
        (format!("tern://{fp}@[::1]:1,[0::1]:1"), DuplicateHost),
        (format!("tern://{fp}@[::1]:1,::1:1"), DuplicateHost),
    ] {
        assert_eq!(bad.parse::<RelayAddress>(), Err(why), "{bad}");
    }
}

#[test]
fn the_same_host_on_another_port_is_another_node() {
    let a: RelayAddress = format!("tern://{}@h:1,h:2", fp()).parse().unwrap();
    assert_eq!(a.hosts().len(), 2);
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
        "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,12}){0,3}",
    ]
}

fn address() -> impl Strategy<Value = RelayAddress> {
    (
        any::<[u8; 32]>(),
        prop::collection::vec((host(), 1..=u16::MAX), 1..=MAX_HOSTS),
    )
        .prop_map(|(fp, entries)| {
            let mut hosts: Vec<RelayHost> = Vec::new();
            for (host, port) in entries {
                let h = RelayHost { host, port };
                if !hosts.iter().any(|o| o.identity() == h.identity()) {
                    hosts.push(h);
                }
            }
            let first = hosts.remove(0);
            RelayAddress {
                fingerprint: Fingerprint(fp),
                host: first.host,
                port: first.port,
                more_hosts: hosts,
            }
        })
}

proptest! {
    #[test]
    fn display_parses_back(a in address()) {
        let printed = a.to_string();
        prop_assert_eq!(printed.parse::<RelayAddress>(), Ok(a), "{}", printed);
    }

    #[test]
    fn arbitrary_strings_never_panic(s in ".{0,200}") {
        if let Ok(a) = s.parse::<RelayAddress>() {
            prop_assert_eq!(a.to_string().parse::<RelayAddress>(), Ok(a));
        }
    }

    #[test]
    fn address_like_strings_never_panic(
        fp in any::<[u8; 32]>(),
        list in "[\\[\\]a-z0-9:.,@]{0,80}",
    ) {
        let s = format!("tern://{}@{list}", Fingerprint(fp));
        if let Ok(a) = s.parse::<RelayAddress>() {
            prop_assert!(a.hosts().len() <= MAX_HOSTS);
            prop_assert_eq!(a.to_string().parse::<RelayAddress>(), Ok(a));
        }
    }
}
