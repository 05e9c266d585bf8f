//! Identifiers, validated when built from wire bytes.

use std::fmt;

use crate::limits::{ACCOUNT_ID_LEN, MESSAGE_ID_LEN};

/// A wire value that does not form a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value has the wrong length.
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        /// Which identifier.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// Device id 0 is reserved.
    #[error("device id 0 is reserved")]
    ZeroDevice,
}

/// An account's opaque id: 16 random bytes chosen by the relay. It reveals nothing
/// about the account's owner (P6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub [u8; ACCOUNT_ID_LEN]);

/// A device within an account; numbered from 1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceId(u32);

/// A message id chosen by the sender; recipients drop duplicates by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; MESSAGE_ID_LEN]);

/// One device's mailbox address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct DeviceAddress {
    /// The account.
    pub account: AccountId,
    /// The device within it.
    pub device: DeviceId,
}

impl AccountId {
    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8; ACCOUNT_ID_LEN] {
        &self.0
    }
}

impl DeviceId {
    /// The first device of every account.
    pub const PRIMARY: DeviceId = DeviceId(1);

    /// A device id; `None` for the reserved 0.
    pub fn new(id: u32) -> Option<Self> {
        (id != 0).then_some(DeviceId(id))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for DeviceId {
    type Error = IdError;
    fn try_from(id: u32) -> Result<Self, IdError> {
        DeviceId::new(id).ok_or(IdError::ZeroDevice)
    }
}

impl MessageId {
    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8; MESSAGE_ID_LEN] {
        &self.0
    }
}

impl DeviceAddress {
    /// Validates an (account, device) pair received on the wire.
    pub fn from_wire(account: &[u8], device: u32) -> Result<Self, IdError> {
        Ok(DeviceAddress {
            account: AccountId::try_from(account)?,
            device: DeviceId::try_from(device)?,
        })
    }
}

fn fixed<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], IdError> {
    bytes.try_into().map_err(|_| IdError::Length {
        what,
        expected: N,
        got: bytes.len(),
    })
}

impl TryFrom<&[u8]> for AccountId {
    type Error = IdError;
    fn try_from(bytes: &[u8]) -> Result<Self, IdError> {
        fixed("account id", bytes).map(AccountId)
    }
}

impl TryFrom<&[u8]> for MessageId {
    type Error = IdError;
    fn try_from(bytes: &[u8]) -> Result<Self, IdError> {
        fixed("message id", bytes).map(MessageId)
    }
}

fn hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

// Debug prints ids in full for tests and debug logs; P9 keeps them out of info logs,
// which is the callers' job, so Display is deliberately not implemented.
impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccountId(")?;
        hex(f, &self.0)?;
        f.write_str(")")
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MessageId(")?;
        hex(f, &self.0)?;
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_lengths_are_rejected() {
        assert_eq!(
            AccountId::try_from(&[0u8; 15][..]),
            Err(IdError::Length {
                what: "account id",
                expected: 16,
                got: 15
            })
        );
        assert!(MessageId::try_from(&[0u8; 17][..]).is_err());
        assert!(MessageId::try_from(&[7u8; 16][..]).is_ok());
    }

    #[test]
    fn device_zero_is_reserved() {
        assert_eq!(DeviceId::try_from(0), Err(IdError::ZeroDevice));
        assert_eq!(DeviceId::try_from(3).map(DeviceId::get), Ok(3));
        assert!(DeviceAddress::from_wire(&[1; 16], 0).is_err());
    }
}
