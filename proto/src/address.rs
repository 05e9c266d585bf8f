//! Relay addresses: `tern://<fingerprint>@host:port`, where the fingerprint is the
//! SHA-256 of the relay's certificate (DER), base64url without padding. Clients pin
//! it: a relay presenting any other certificate is refused.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The URL scheme.
pub const SCHEME: &str = "tern://";

/// A relay's pinned certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// A relay address with its pinned fingerprint.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelayAddress {
    /// The certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

/// A string that is not a relay address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay address: {0}")]
pub struct AddressError(&'static str);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| AddressError("fingerprint is not base64url"))?;
        Ok(Fingerprint(bytes.try_into().map_err(|_| {
            AddressError("fingerprint is not 32 bytes")
        })?))
    }
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{SCHEME}{}@[{}]:{}",
                self.fingerprint, self.host, self.port
            )
        } else {
            write!(
                f,
                "{SCHEME}{}@{}:{}",
                self.fingerprint, self.host, self.port
            )
        }
    }
}

impl fmt::Debug for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayAddress({self})")
    }
}

impl FromStr for RelayAddress {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, AddressError> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or(AddressError("must start with tern://"))?;
        let (fp, hostport) = rest.split_once('@').ok_or(AddressError("missing '@'"))?;
        let fingerprint = fp.parse()?;
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once("]:")
                .ok_or(AddressError("bad IPv6 literal"))?;
            (h, p)
        } else {
            hostport
                .rsplit_once(':')
                .ok_or(AddressError("missing port"))?
        };
        if host.is_empty() {
            return Err(AddressError("missing host"));
        }
        // Brackets only delimit an IPv6 literal: inside a host they would print back
        // as a different address.
        if host.contains(['[', ']']) {
            return Err(AddressError("bracket in host"));
        }
        let port = port.parse().map_err(|_| AddressError("bad port"))?;
        Ok(RelayAddress {
            fingerprint,
            host: host.to_owned(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for host in ["127.0.0.1", "::1", "relay.example.org"] {
            let a = RelayAddress {
                fingerprint: Fingerprint([0xab; 32]),
                host: host.into(),
                port: 7443,
            };
            let s = a.to_string();
            assert_eq!(s.parse::<RelayAddress>(), Ok(a), "{s}");
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        let fp = Fingerprint([1; 32]).to_string();
        for bad in [
            format!("quic://{fp}@h:1"),
            format!("tern://{fp}h:1"),
            format!("tern://{fp}@h"),
            format!("tern://{fp}@h:99999"),
            format!("tern://{fp}@:1"),
            "tern://AAAA@h:1".to_owned(),
            "tern://!!!@h:1".to_owned(),
            // A bracket inside the host would print back as another address (found
            // by the ids_and_addresses fuzz target).
            format!("tern://{fp}@a]:1:80"),
            format!("tern://{fp}@[a]b]:80"),
            format!("tern://{fp}@a[b:80"),
        ] {
            assert!(bad.parse::<RelayAddress>().is_err(), "{bad}");
        }
    }
}
