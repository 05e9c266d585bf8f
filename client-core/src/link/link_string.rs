//! The device link a new device shows (as text and a QR code) and the primary reads:
//! `tern-link:` + base64url (no padding) of
//! `1 || slot_id(16) || hpke_public(32) || linking_secret(32) || device_key(32) ||
//! identity_dh(32) || relay address (UTF-8)`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use tern_proto::address::{RelayAddress, RelayHost};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// The link's text prefix.
pub const LINK_PREFIX: &str = "tern-link:";
const LINK_VERSION: u8 = 1;
/// Bytes before the relay address.
const FIXED_LEN: usize = 1 + 16 + 32 + 32 + 32 + 32;
/// The longest relay address a link carries (a QR code holds about 2900 bytes).
const MAX_RELAY_LEN: usize = 1024;

/// What a new device hands the primary: where to deposit the payload, how to seal it,
/// and the new device's public keys for the primary to vouch for. It holds the
/// linking secret, so it is shown only to the user (never logged; `Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct Link {
    /// The provisioning slot on the relay.
    pub slot_id: [u8; 16],
    /// The new device's HPKE (X25519) public key.
    pub hpke_public: [u8; 32],
    /// The HPKE PSK: only a holder of the link can seal a payload that opens.
    pub linking_secret: [u8; 32],
    /// The new device's Ed25519 device key.
    pub device_key: [u8; 32],
    /// The new device's X25519 identity agreement key.
    pub identity_dh: [u8; 32],
    /// The relay the new device waits on (the account's home relay).
    pub relay: RelayAddress,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.linking_secret.zeroize();
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Parses a link; every malformed input is [`Error::InvalidLink`].
    pub fn parse(s: &str) -> Result<Link> {
        let bad = || Error::InvalidLink;
        let text = s.trim().strip_prefix(LINK_PREFIX).ok_or_else(bad)?;
        // Refuse before decoding what could not be a link (base64 is 4/3 the bytes).
        if text.len() > (FIXED_LEN + MAX_RELAY_LEN) * 4 / 3 + 4 {
            return Err(bad());
        }
        let b = Zeroizing::new(URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?);
        if b.len() <= FIXED_LEN || b.len() > FIXED_LEN + MAX_RELAY_LEN {
            return Err(bad());
        }
        if b[0] != LINK_VERSION {
            return Err(bad());
        }
        let key = |at: usize| -> Result<[u8; 32]> { b[at..at + 32].try_into().map_err(|_| bad()) };
        let relay = std::str::from_utf8(&b[FIXED_LEN..])
            .map_err(|_| bad())?
            .parse::<RelayAddress>()
            .map_err(|_| bad())?;
        let link = Link {
            slot_id: b[1..17].try_into().map_err(|_| bad())?,
            hpke_public: key(17)?,
            linking_secret: key(49)?,
            device_key: key(81)?,
            identity_dh: key(113)?,
            relay,
        };
        let ed25519_ok = VerifyingKey::from_bytes(&link.device_key).is_ok_and(|k| !k.is_weak());
        if !ed25519_ok || !contributory(&link.hpke_public) || !contributory(&link.identity_dh) {
            return Err(bad());
        }
        Ok(link)
    }

    /// Refuses a link for another relay than `ours` ([`Error::LinkOtherRelay`]): the
    /// fingerprint must match (the same pinned certificate) and the two addresses
    /// must share a host (a relay of several nodes may list them in another order).
    pub fn check_relay(&self, ours: &RelayAddress) -> Result<()> {
        let same_host =
            |a: &RelayHost, b: &RelayHost| a.port == b.port && a.host.eq_ignore_ascii_case(&b.host);
        let theirs = self.relay.hosts();
        let shared = ours
            .hosts()
            .iter()
            .any(|h| theirs.iter().any(|t| same_host(h, t)));
        if self.relay.fingerprint != ours.fingerprint || !shared {
            return Err(Error::LinkOtherRelay);
        }
        Ok(())
    }
}

impl std::str::FromStr for Link {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Link::parse(s)
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = Zeroizing::new(Vec::with_capacity(FIXED_LEN + 64));
        b.push(LINK_VERSION);
        b.extend_from_slice(&self.slot_id);
        b.extend_from_slice(&self.hpke_public);
        b.extend_from_slice(&self.linking_secret);
        b.extend_from_slice(&self.device_key);
        b.extend_from_slice(&self.identity_dh);
        b.extend_from_slice(self.relay.to_string().as_bytes());
        write!(f, "{LINK_PREFIX}{}", URL_SAFE_NO_PAD.encode(&b[..]))
    }
}

/// Whether an X25519 public key is not of small order: a clamped scalar is a multiple
/// of the cofactor, so a small-order point gives the all-zero output.
fn contributory(public: &[u8; 32]) -> bool {
    StaticSecret::from([1u8; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}
