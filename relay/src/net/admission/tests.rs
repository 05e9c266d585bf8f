use std::net::IpAddr;

use proptest::prelude::*;

use super::*;

fn config() -> ConnectionsConfig {
    ConnectionsConfig {
        max_unauthenticated: 10,
        max_per_address: 3,
        max_handshakes_per_address: 2,
        retry: Retry::Never,
        ..ConnectionsConfig::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn admitted(d: Decision) -> AdmissionGuard {
    match d {
        Decision::Admit(g) => g,
        _ => panic!("expected admission"),
    }
}

#[test]
fn prefixes_group_an_ipv6_slash_64_and_single_ipv4_addresses() {
    let p = |s| AddressPrefix::of(ip(s), 32, 64);
    assert!(p("2001:db8:1:2::1") == p("2001:db8:1:2:ffff::9"));
    assert!(p("2001:db8:1:2::1") != p("2001:db8:1:3::1"));
    assert!(p("127.0.0.1") != p("127.0.0.2"));
    assert!(p("::ffff:127.0.0.1") == p("127.0.0.1"), "mapped is IPv4");
    let p24 = |s| AddressPrefix::of(ip(s), 24, 128);
    assert!(p24("10.0.0.1") == p24("10.0.0.200"));
    assert!(p24("::1") != p24("::2"));
}

#[test]
fn per_address_caps_refuse_validated_and_ignore_unvalidated_peers() {
    let a = Admission::new(&config(), 100);
    let mut first = admitted(a.admit(ip("127.0.0.1"), false, true));
    let mut second = admitted(a.admit(ip("127.0.0.1"), false, true));
    // Two handshakes in progress: the cap on handshakes.
    assert!(matches!(
        a.admit(ip("127.0.0.1"), false, true),
        Decision::Ignore
    ));
    assert!(matches!(
        a.admit(ip("127.0.0.1"), true, false),
        Decision::Refuse
    ));
    first.handshake_done();
    let mut third = admitted(a.admit(ip("127.0.0.1"), true, false));
    // Three connections: the cap on connections.
    second.handshake_done();
    third.handshake_done();
    assert!(matches!(
        a.admit(ip("127.0.0.1"), true, false),
        Decision::Refuse
    ));
    // Another address is untouched.
    let _other = admitted(a.admit(ip("127.0.0.2"), false, true));
    drop(first);
    let _again = admitted(a.admit(ip("127.0.0.1"), true, false));
}

#[test]
fn retry_under_load_always_and_never() {
    let under_load = ConnectionsConfig {
        retry: Retry::UnderLoad,
        retry_above_handshakes: 1,
        ..config()
    };
    let a = Admission::new(&under_load, 100);
    let mut g = admitted(a.admit(ip("10.0.0.1"), false, true));
    assert!(matches!(
        a.admit(ip("10.0.0.2"), false, true),
        Decision::Retry
    ));
    // A validated peer (it answered the Retry) is admitted.
    let _v = admitted(a.admit(ip("10.0.0.2"), true, false));
    g.handshake_done();
    drop(_v);
    let _calm = admitted(a.admit(ip("10.0.0.3"), false, true));

    let always = Admission::new(
        &ConnectionsConfig {
            retry: Retry::Always,
            ..config()
        },
        100,
    );
    assert!(matches!(
        always.admit(ip("10.0.0.1"), false, true),
        Decision::Retry
    ));
    let _v = admitted(always.admit(ip("10.0.0.1"), true, false));
}

#[test]
fn the_unauthenticated_pool_is_apart_from_the_authenticated_one() {
    let a = Admission::new(
        &ConnectionsConfig {
            max_unauthenticated: 2,
            max_per_address: 100,
            max_handshakes_per_address: 100,
            ..config()
        },
        1,
    );
    let mut one = admitted(a.admit(ip("10.0.0.1"), true, false));
    let mut two = admitted(a.admit(ip("10.0.0.1"), true, false));
    assert!(
        matches!(a.admit(ip("10.0.0.9"), true, false), Decision::Refuse),
        "unauthenticated pool full"
    );
    assert!(one.promote(), "one authenticated place");
    assert!(one.promote(), "promoting twice takes nothing more");
    assert!(!two.promote(), "the authenticated pool is full");
    assert_eq!(a.totals().unauthenticated, 1);
    // The pool of authenticated connections is full: new ones are refused at once.
    assert!(matches!(
        a.admit(ip("10.0.0.9"), true, false),
        Decision::Refuse
    ));
    drop(one);
    assert!(two.promote());
}

#[derive(Debug, Clone)]
enum Op {
    Open(u8, bool),
    HandshakeDone(usize),
    Promote(usize),
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, any::<bool>()).prop_map(|(a, v)| Op::Open(a, v)),
        any::<usize>().prop_map(Op::HandshakeDone),
        any::<usize>().prop_map(Op::Promote),
        any::<usize>().prop_map(Op::Close),
    ]
}

proptest! {
    #[test]
    fn counts_return_to_zero_and_caps_hold(ops in proptest::collection::vec(op(), 0..200)) {
        let c = ConnectionsConfig {
            retry: Retry::UnderLoad,
            retry_above_handshakes: 5,
            ..config()
        };
        let a = Admission::new(&c, 4);
        let mut open: Vec<(u8, AdmissionGuard)> = Vec::new();
        for op in ops {
            match op {
                Op::Open(addr, validated) => {
                    let peer = IpAddr::from([10, 0, 0, addr]);
                    if let Decision::Admit(g) = a.admit(peer, validated, !validated) {
                        open.push((addr, g));
                    }
                }
                Op::HandshakeDone(i) if !open.is_empty() => {
                    let n = open.len();
                    open[i % n].1.handshake_done();
                }
                Op::Promote(i) if !open.is_empty() => {
                    let n = open.len();
                    open[i % n].1.promote();
                }
                Op::Close(i) if !open.is_empty() => {
                    let n = open.len();
                    open.swap_remove(i % n);
                }
                _ => {}
            }
            for addr in 0..4u8 {
                let here = open.iter().filter(|(a, _)| *a == addr).count();
                prop_assert!(here <= c.max_per_address);
                let shaking = open.iter().filter(|(a, g)| *a == addr && g.handshaking).count();
                prop_assert!(shaking <= c.max_handshakes_per_address);
            }
            let t = a.totals();
            prop_assert_eq!(t.connections, open.len());
            prop_assert_eq!(t.unauthenticated, open.iter().filter(|(_, g)| g.unauthenticated).count());
            prop_assert!(t.unauthenticated <= c.max_unauthenticated);
            prop_assert!(open.len() - t.unauthenticated <= 4, "authenticated pool");
        }
        open.clear();
        prop_assert_eq!(a.totals(), Totals::default());
    }
}
