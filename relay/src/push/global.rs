//! Against SSRF: a UnifiedPush endpoint is any URL a device names, so the relay
//! connects (discovery and POSTs) only to globally routable addresses. The check is
//! in the resolver, on the addresses actually connected to, so DNS rebinding after
//! registration gains nothing; IP-literal hosts skip the resolver and are checked
//! at registration ([`literal_allowed`]). Gateways on the operator's allowlist use
//! another client: they are trusted as configured and may be internal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is globally routable (not loopback, private, link-local, CGNAT,
/// ULA, multicast, unspecified, documentation or reserved, nor such an address in
/// an IPv4-mapped, -compatible, NAT64 or 6to4 form).
pub(crate) fn global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => global_v4(v4),
        IpAddr::V6(v6) => global_v6(v6),
    }
}

fn global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0
        || a == 10
        || a == 127
        || a >= 224
        || a == 100 && (64..128).contains(&b)
        || a == 169 && b == 254
        || a == 172 && (16..32).contains(&b)
        || a == 192 && b == 168
        || a == 192 && b == 0 && (c == 0 || c == 2)
        || a == 198 && (b == 18 || b == 19)
        || a == 198 && b == 51 && c == 100
        || a == 203 && b == 0 && c == 113)
}

fn global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return global_v4(v4);
    }
    match s {
        // Unspecified, loopback and the deprecated IPv4-compatible ::/96.
        [0, 0, 0, 0, 0, 0, _, _] => false,
        // NAT64 (RFC 6052) well-known prefix: the IPv4 address it carries decides.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => global_v4(embedded(hi, lo)),
        // 6to4: likewise.
        [0x2002, hi, lo, ..] => global_v4(embedded(hi, lo)),
        // Local-use NAT64, Teredo, ORCHID/benchmarking, documentation.
        [0x64, 0xff9b, 1, ..] | [0x2001, 0 | 2 | 0x10..=0x2f | 0xdb8, ..] => false,
        // Only global unicast (2000::/3) is routed on the Internet; everything else
        // (ULA, link-local, multicast, SIIT's ::ffff:0:0/96, discard) is refused.
        // Less 3fff::/20, documentation (RFC 9637).
        [first, second, ..] => {
            first & 0xe000 == 0x2000 && !(first == 0x3fff && second & 0xf000 == 0)
        }
    }
}

/// Whether an IP-literal host may be connected to: a global address, or loopback
/// when `allow_loopback` (tests).
pub(crate) fn literal_allowed(ip: IpAddr, allow_loopback: bool) -> bool {
    global(ip) || allow_loopback && loopback(ip)
}

fn loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|a| a.is_loopback()),
    }
}

/// A resolver that answers only with addresses [`literal_allowed`] accepts; a
/// name with none fails to resolve like an unknown one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GlobalOnly {
    pub(crate) allow_loopback: bool,
}

impl Resolve for GlobalOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_loopback = self.allow_loopback;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept: Vec<SocketAddr> = found
                .filter(|a| literal_allowed(a.ip(), allow_loopback))
                .collect();
            if kept.is_empty() {
                return Err("no global address".into());
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn only_globally_routable_addresses_pass() {
        for ok in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
        ] {
            assert!(global(ip(ok)), "{ok}");
        }
        for no in [
            "0.0.0.0",
            "10.1.2.3",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            "2001:db8::1",
            "::ffff:0:7f00:1",
            "100::1",
            "3fff::1",
            "5f00::1",
            "fec0::1",
        ] {
            assert!(!global(ip(no)), "{no}");
        }
    }

    #[test]
    fn loopback_passes_only_when_allowed() {
        assert!(!literal_allowed(ip("127.0.0.1"), false));
        assert!(literal_allowed(ip("127.0.0.1"), true));
        assert!(literal_allowed(ip("::1"), true));
        assert!(!literal_allowed(ip("10.0.0.1"), true));
        assert!(!literal_allowed(ip("169.254.169.254"), true));
    }

    #[tokio::test]
    async fn the_resolver_drops_loopback_names() {
        let strict = GlobalOnly {
            allow_loopback: false,
        };
        let name: Name = "localhost".parse().expect("name");
        assert!(strict.resolve(name).await.is_err());
        let lenient = GlobalOnly {
            allow_loopback: true,
        };
        let name: Name = "localhost".parse().expect("name");
        let addrs: Vec<_> = lenient.resolve(name).await.expect("resolves").collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
