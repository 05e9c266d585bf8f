//! `[admin]`: the admin HTTP listener (metrics, health, admin commands).

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, and the admin commands
/// (which need the token in `admin.token`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens (TCP): `"auto"` (the default: 127.0.0.1, on the relay's
    /// port + 1, so 7444 beside 7443, and any free port when the relay's is 0),
    /// an address, or `""`/`"off"` for no listener. An address off loopback (for a
    /// Prometheus elsewhere) gets a second listener on loopback, any free port, which
    /// `admin.addr` names for the local `tern-relay admin` commands.
    #[schemars(with = "String")]
    pub listen: AdminListen,
    /// Whether the admin commands (`/admin/...`) answer peers that are not on
    /// loopback. Off by default: with a listener on another address, only
    /// `/metrics`, `/healthz` and `/readyz` answer them. Turn it on only on a
    /// network you trust: the token crosses it in clear text.
    pub allow_remote_admin: bool,
}

/// Where the admin listener listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminListen {
    /// Loopback, on the relay's port + 1 (port 0 when the relay's is 0).
    #[default]
    Auto,
    /// This address.
    At(SocketAddr),
    /// No admin listener: no metrics, and admin commands only offline.
    Off,
}

impl AdminListen {
    /// The address to bind, for a relay listening on `relay`; `None` when off.
    pub fn resolve(self, relay: SocketAddr) -> Option<SocketAddr> {
        match self {
            AdminListen::Off => None,
            AdminListen::At(a) => Some(a),
            AdminListen::Auto => {
                let port = match relay.port() {
                    0 => 0,
                    p => p.checked_add(1).unwrap_or(0),
                };
                Some(SocketAddr::from(([127, 0, 0, 1], port)))
            }
        }
    }
}

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "" | "off" => Ok(AdminListen::Off),
            "auto" => Ok(AdminListen::Auto),
            a => a.parse().map(AdminListen::At).map_err(|_| {
                format!("admin.listen: {a:?} is not \"auto\", \"off\" or an address like \"127.0.0.1:7444\"")
            }),
        }
    }
}

impl Serialize for AdminListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            AdminListen::Auto => s.serialize_str("auto"),
            AdminListen::Off => s.serialize_str("off"),
            AdminListen::At(a) => s.collect_str(a),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl AdminConfig {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<()> {
        if let AdminListen::At(a) = self.listen {
            if a.ip().is_unspecified() {
                return Err(Error::Config(format!(
                    "admin.listen {a}: name one address (the admin token would cross every network in clear text)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_loopback_on_the_next_port_and_zero_stays_zero() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            AdminListen::Auto.resolve(at("0.0.0.0:7443")),
            Some(at("127.0.0.1:7444"))
        );
        assert_eq!(
            AdminListen::Auto.resolve(at("127.0.0.1:0")),
            Some(at("127.0.0.1:0"))
        );
        assert_eq!(
            AdminListen::Auto.resolve(at("[::1]:65535")),
            Some(at("127.0.0.1:0"))
        );
        assert_eq!(AdminListen::Off.resolve(at("127.0.0.1:1")), None);
        let fixed = AdminListen::At(at("127.0.0.1:9100"));
        assert_eq!(fixed.resolve(at("127.0.0.1:1")), Some(at("127.0.0.1:9100")));
    }

    #[test]
    fn parses_off_auto_and_addresses_and_refuses_the_rest() {
        for (text, want) in [
            ("", AdminListen::Off),
            ("off", AdminListen::Off),
            ("auto", AdminListen::Auto),
            ("127.0.0.1:0", AdminListen::At(([127, 0, 0, 1], 0).into())),
        ] {
            assert_eq!(text.parse::<AdminListen>(), Ok(want), "{text:?}");
        }
        for bad in ["on", "localhost", "127.0.0.1", "7444"] {
            assert!(bad.parse::<AdminListen>().is_err(), "{bad:?}");
        }
        let any = AdminConfig {
            listen: AdminListen::At(([0, 0, 0, 0], 7444).into()),
            ..AdminConfig::default()
        };
        assert!(any.validate().is_err());
    }
}
