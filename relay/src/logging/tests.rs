use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

fn redacted(s: &str) -> String {
    redact_addresses(s).into_owned()
}

#[test]
fn addresses_ports_brackets_and_zones_go() {
    for (input, want) in [
        ("from 127.0.0.1 now", "from <addr> now"),
        ("peer=10.1.2.3:443,", "peer=<addr>,"),
        ("peer:10.1.2.3.", "peer:<addr>."),
        ("v10.0.0.1", "v<addr>"),
        ("a:::1", "<addr>:1"), // "a::" is an address too; ":1" is none
        ("[::1]:443", "<addr>"),
        ("to [2001:db8::8a2e:370:7334]:9 ok", "to <addr> ok"),
        ("fe80::1%eth0 up", "<addr> up"),
        ("[fe80::1%2]:443", "<addr>"),
        ("::ffff:192.0.2.1", "<addr>"),
        ("2001:db8:1:2:3:4:5:6", "<addr>"),
        // Found by fuzzing: an address right after another's zone.
        ("[2001:db8::17%e8::17%e4:443 x", "[<addr><addr>:443 x"),
        // Found by fuzzing: two addresses in one run of hex digits and colons.
        ("at fe40::1001:db8::17 x", "at <addr><addr> x"),
        ("at 2.0.2.31:db8::17 x", "at <addr>:<addr> x"),
        ("at ::fde23.0.2.33 x", "at <addr><addr> x"),
        (
            "Transmit { destination: 127.0.0.1:5000, src_ip: Some(127.0.0.1), ecn: None }",
            "Transmit { destination: <addr>, src_ip: Some(<addr>), ecn: None }",
        ),
    ] {
        assert_eq!(redacted(input), want, "{input}");
    }
}

#[test]
fn what_is_not_an_address_stays() {
    for text in [
        "tern_relay::net::conn: connection closed",
        "quinn::endpoint",
        "2025-01-01T12:34:56.789012Z",
        "quinn 0.11.12, 1.5ms",
        "deadbeef cafe:babe",
        "a.b.c.d 999.1.1.1 1.2.3 1.2.3.4.5",
        "ünïcode ok",
    ] {
        assert!(matches!(redact_addresses(text), Cow::Borrowed(_)), "{text}");
    }
}

fn no_address_left(out: &str) -> bool {
    out.split(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
        .flat_map(|w| [w, w.trim_matches(|c| c == ':' || c == '.')])
        .all(|w| w.parse::<IpAddr>().is_err() || w == "::")
}

proptest! {
    #[test]
    fn any_address_in_any_form_is_redacted(
        v4 in any::<u32>(),
        v6 in any::<u128>(),
        port in any::<u16>(),
        before in "([a-z]{1,5}[ =(:\\[])?[ (\\[]?",
        after in "[ ,;)\\].]{0,3}",
    ) {
        let v4 = Ipv4Addr::from(v4);
        let v6 = Ipv6Addr::from(v6);
        for form in [
            v4.to_string(),
            SocketAddr::from((v4, port)).to_string(),
            v6.to_string(),
            SocketAddr::from((v6, port)).to_string(),
            format!("{:?}", SocketAddr::from((v6, port))),
        ] {
            let text = format!("{before}{form}{after}");
            let out = redacted(&text);
            prop_assert!(!out.contains(&form), "{text} -> {out}");
            prop_assert!(no_address_left(&out), "{text} -> {out}");
        }
    }

    #[test]
    fn never_panics(text in "\\PC{0,80}") {
        let _ = redact_addresses(&text);
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_quinn_udp_warning_through_the_installed_formatter_names_no_address() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .event_format(Redacting(tracing_subscriber::fmt::format()))
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        tracing::warn!(
            target: "quinn_udp",
            "sendmsg error: Os {{ code: 22 }}, Transmit: {{ destination: 192.0.2.7:4433, src_ip: Some(::1) }}"
        );
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("sendmsg error"), "{text}");
    assert!(
        !text.contains("192.0.2.7") && !text.contains("::1"),
        "{text}"
    );
    assert_eq!(text.matches(REDACTED).count(), 2, "{text}");
}

#[test]
fn phone_numbers_are_redacted_too() {
    assert_eq!(redact_numbers("to=+15550100123 code"), "to=<number> code");
    assert_eq!(
        redact_numbers("{\"to\":\"+447700900123\"} and +1234567890123456789"),
        "{\"to\":\"<number>\"} and <number>"
    );
    for kept in ["+123456", "1 + 2", "+", "a+b", "15550100123"] {
        assert_eq!(redact_numbers(kept), kept);
    }
}

proptest! {
    #[test]
    fn redacting_numbers_never_panics(text in "\\PC{0,80}") {
        let _ = redact_numbers(&text);
    }
}

#[test]
fn the_http_clients_debug_lines_are_capped_unless_named() {
    let f = super::filter("debug").expect("filter").to_string();
    for d in [
        "reqwest=warn",
        "hyper_util=warn",
        "hyper=warn",
        "deadpool.postgres=error",
    ] {
        assert!(f.contains(d), "{d} in {f}");
    }
    let named = super::filter("debug,reqwest=debug")
        .expect("filter")
        .to_string();
    assert!(!named.contains("reqwest=warn"), "{named}");
}
