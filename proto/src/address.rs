//! Relay addresses: `tern://<fingerprint>@host:port`, where the fingerprint is the
//! SHA-256 of the relay's certificate (DER), base64url without padding. Clients pin
//! it: a relay presenting any other certificate is refused.
//!
//! A relay that runs as several nodes over one database lists them all, separated by
//! commas: `tern://<fingerprint>@host1:port,[2001:db8::1]:port,…` (at most
//! [`MAX_HOSTS`], IPv6 literals in brackets, no empty entries, no host listed twice).
//! Every node presents the same certificate, so the one fingerprint pins them all.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The URL scheme.
pub const SCHEME: &str = "tern://";

/// The most hosts one relay address lists.
pub const MAX_HOSTS: usize = 16;

/// A relay's pinned certificate fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

/// One host of a relay address and its UDP port.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelayHost {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

/// A relay address with its pinned fingerprint.
///
/// The first listed host is in `host` and `port`, the others (for a relay that runs
/// as several nodes) in `more_hosts`, in the order written; a client tries them all
/// in random order ([`RelayAddress::hosts`] lists them). Parsing enforces the rules
/// in the module docs; a value built by hand that breaks them prints as a string
/// that does not parse.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelayAddress {
    /// The certificate fingerprint, the same for every listed host.
    pub fingerprint: Fingerprint,
    /// The first listed host: name or IP literal (IPv6 without brackets).
    pub host: String,
    /// The first listed host's UDP port.
    pub port: u16,
    /// The hosts listed after the first; empty for a single-host address.
    pub more_hosts: Vec<RelayHost>,
}

/// Why a string is not a relay address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// It does not start with `tern://`.
    #[error("invalid relay address: must start with tern://")]
    Scheme,
    /// No `@` between the fingerprint and the hosts.
    #[error("invalid relay address: missing '@'")]
    MissingAt,
    /// The fingerprint is not base64url (without padding).
    #[error("invalid relay address: fingerprint is not base64url")]
    FingerprintEncoding,
    /// The fingerprint does not decode to 32 bytes.
    #[error("invalid relay address: fingerprint is not 32 bytes")]
    FingerprintLength,
    /// An entry of the host list is empty (`a:1,,b:1`, a trailing comma).
    #[error("invalid relay address: empty host entry")]
    EmptyEntry,
    /// More than [`MAX_HOSTS`] hosts.
    #[error("invalid relay address: more than {MAX_HOSTS} hosts")]
    TooManyHosts,
    /// The same host and port listed twice.
    #[error("invalid relay address: a host is listed twice")]
    DuplicateHost,
    /// A bracketed IPv6 literal without its closing `]:`.
    #[error("invalid relay address: bad IPv6 literal")]
    BadIpv6,
    /// An entry without `:port`.
    #[error("invalid relay address: missing port")]
    MissingPort,
    /// An entry with an empty host.
    #[error("invalid relay address: missing host")]
    MissingHost,
    /// A bracket inside a host (brackets only delimit an IPv6 literal).
    #[error("invalid relay address: bracket in host")]
    BracketInHost,
    /// A port that is not a number from 1 to 65535.
    #[error("invalid relay address: port is not 1..65535")]
    BadPort,
}

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
            .map_err(|_| AddressError::FingerprintEncoding)?;
        Ok(Fingerprint(
            bytes
                .try_into()
                .map_err(|_| AddressError::FingerprintLength)?,
        ))
    }
}

impl fmt::Display for RelayHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for RelayHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayHost({self})")
    }
}

impl RelayHost {
    /// Parses one entry of a host list: `host:port` or `[ipv6]:port`.
    fn parse(entry: &str) -> Result<RelayHost, AddressError> {
        if entry.is_empty() {
            return Err(AddressError::EmptyEntry);
        }
        let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
            v6.split_once("]:").ok_or(AddressError::BadIpv6)?
        } else {
            entry.rsplit_once(':').ok_or(AddressError::MissingPort)?
        };
        if host.is_empty() {
            return Err(AddressError::MissingHost);
        }
        // Brackets only delimit an IPv6 literal: inside a host they would print back
        // as a different address.
        if host.contains(['[', ']']) {
            return Err(AddressError::BracketInHost);
        }
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddressError::BadPort);
        }
        let port: u16 = port.parse().map_err(|_| AddressError::BadPort)?;
        if port == 0 {
            return Err(AddressError::BadPort);
        }
        Ok(RelayHost {
            host: host.to_owned(),
            port,
        })
    }

    /// What makes two entries the same host: the IP address for a literal (so `::1`
    /// and `0::1` match), else the name without case.
    fn identity(&self) -> (Result<IpAddr, String>, u16) {
        let host = self
            .host
            .parse::<IpAddr>()
            .map_err(|_| self.host.to_ascii_lowercase());
        (host, self.port)
    }
}

impl RelayAddress {
    /// A single-host address.
    pub fn new(fingerprint: Fingerprint, host: impl Into<String>, port: u16) -> Self {
        RelayAddress {
            fingerprint,
            host: host.into(),
            port,
            more_hosts: Vec::new(),
        }
    }

    /// Every listed host, in the order written (the first is `host` and `port`).
    pub fn hosts(&self) -> Vec<RelayHost> {
        let mut all = Vec::with_capacity(1 + self.more_hosts.len());
        all.push(RelayHost {
            host: self.host.clone(),
            port: self.port,
        });
        all.extend(self.more_hosts.iter().cloned());
        all
    }
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}@", self.fingerprint)?;
        for (i, host) in self.hosts().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{host}")?;
        }
        Ok(())
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
        let rest = s.strip_prefix(SCHEME).ok_or(AddressError::Scheme)?;
        let (fp, list) = rest.split_once('@').ok_or(AddressError::MissingAt)?;
        let fingerprint = fp.parse()?;
        let mut hosts: Vec<RelayHost> = Vec::new();
        // A comma never appears inside an entry (not in a host name, an IPv6 literal
        // or a port), so splitting on it first is exact.
        for entry in list.split(',') {
            if hosts.len() == MAX_HOSTS {
                return Err(AddressError::TooManyHosts);
            }
            let host = RelayHost::parse(entry)?;
            if hosts.iter().any(|h| h.identity() == host.identity()) {
                return Err(AddressError::DuplicateHost);
            }
            hosts.push(host);
        }
        let mut hosts = hosts.into_iter();
        let first = hosts.next().ok_or(AddressError::EmptyEntry)?;
        Ok(RelayAddress {
            fingerprint,
            host: first.host,
            port: first.port,
            more_hosts: hosts.collect(),
        })
    }
}

#[cfg(test)]
mod tests;
