//! Which peers count as one: an IPv4 address or an IPv6 /64 by default (one host
//! usually owns a whole /64), as connection caps and rate limits both count them.

use std::net::IpAddr;

/// The leading bits of a peer's address that count as one peer. IPv4-mapped IPv6
/// addresses count as IPv4. Its `Debug` never shows the address, and it has no
/// `Display`: it must not reach a log (P9).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressPrefix {
    /// The leading bits of an IPv4 address (the rest zero).
    V4(u32),
    /// The leading bits of an IPv6 address (the rest zero).
    V6(u128),
}

impl AddressPrefix {
    /// The first `v4_bits` of an IPv4 address or `v6_bits` of an IPv6 one.
    pub fn of(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(v4_bits)).unwrap_or(0);
                AddressPrefix::V4(u32::from(a) & mask)
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(v6_bits)).unwrap_or(0);
                AddressPrefix::V6(u128::from(a) & mask)
            }
        }
    }
}

impl From<IpAddr> for AddressPrefix {
    /// An IPv4 address, or an IPv6 /64.
    fn from(ip: IpAddr) -> Self {
        AddressPrefix::of(ip, 32, 64)
    }
}

impl std::fmt::Debug for AddressPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressPrefix::V4(_) => "AddressPrefix::V4(..)",
            AddressPrefix::V6(_) => "AddressPrefix::V6(..)",
        })
    }
}
