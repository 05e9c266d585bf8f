//! The contact card: what a user hands a contact (as text or a QR code).

use base64::Engine as _;
use tern_proto::AccountId;

use crate::{Error, Result};

/// What a user hands a contact (as text or a QR code) so the contact can write to
/// them: their account, identity key and delivery token. Sealed from the very first
/// message, and the identity key needs no trust on first use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactCard {
    /// The account.
    pub account: AccountId,
    /// Its identity key.
    pub identity_key: [u8; 32],
    /// Its delivery token.
    pub delivery_token: [u8; 32],
}

const CARD_PREFIX: &str = "tern-contact:";
const CARD_VERSION: u8 = 1;

impl std::fmt::Display for ContactCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = vec![CARD_VERSION];
        b.extend_from_slice(self.account.as_bytes());
        b.extend_from_slice(&self.identity_key);
        b.extend_from_slice(&self.delivery_token);
        write!(
            f,
            "{CARD_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    }
}

impl std::str::FromStr for ContactCard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidContactCard;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim().strip_prefix(CARD_PREFIX).ok_or_else(bad)?)
            .map_err(|_| bad())?;
        if b.len() != 1 + 16 + 32 + 32 || b[0] != CARD_VERSION {
            return Err(bad());
        }
        Ok(ContactCard {
            account: AccountId::try_from(&b[1..17]).map_err(|_| bad())?,
            identity_key: b[17..49].try_into().map_err(|_| bad())?,
            delivery_token: b[49..81].try_into().map_err(|_| bad())?,
        })
    }
}
