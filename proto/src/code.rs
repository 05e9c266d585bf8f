//! The error codes a relay answers with, as a domain enum.

use std::fmt;

use crate::v1;

/// Why a relay refused a request: one variant per `tern.v1.ErrorCode`.
///
/// A code this version does not know decodes as [`ErrorCode::Unspecified`], so a
/// newer relay's answer is still an error, never a panic or a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No code given, or one this version does not know.
    Unspecified,
    /// The request is malformed: a missing field, a wrong length, an unknown variant.
    BadRequest,
    /// Not authenticated, a bad signature, or not allowed for this device.
    Unauthorized,
    /// No such account or device.
    UnknownRecipient,
    /// The recipient's mailbox holds its maximum count or bytes; retry later.
    MailboxFull,
    /// An envelope, frame or list is larger than the relay accepts.
    TooLarge,
    /// Too many requests; retry after the given time.
    RateLimited,
    /// The message has expired.
    Expired,
    /// The relay failed; nothing was stored for this request.
    Internal,
    /// The relay is shutting down or overloaded; retry elsewhere or later.
    Unavailable,
    /// No such blob (never uploaded, or expired).
    NotFound,
    /// The account's storage quota is used up.
    QuotaExceeded,
    /// Not an E.164 phone number.
    InvalidNumber,
    /// A wrong verification code; the reply says how many attempts are left.
    WrongCode,
    /// Discovery needs a verified phone number.
    NotVerified,
    /// The send named an older version of the recipient's device list than the
    /// relay holds: fetch the list, encrypt for its devices, send again.
    StaleDeviceList,
    /// A group commit named an epoch that is not the group's current one: the
    /// reply's `current_epoch` says which is.
    StaleEpoch,
    /// No such group handle, or a wrong epoch token (the two look the same).
    UnknownGroup,
    /// The group handle is taken.
    GroupExists,
    /// The relay refuses this push target: a gateway URL not on its operator's
    /// allowlist, an endpoint that is not https, or a relay that sends no wake-ups.
    PushTargetRefused,
    /// The UnifiedPush endpoint did not answer the discovery request as the
    /// UnifiedPush server specification asks.
    PushEndpointUnverified,
}

impl ErrorCode {
    /// The code for a wire value; unknown values are [`ErrorCode::Unspecified`].
    pub fn from_wire(code: i32) -> Self {
        v1::ErrorCode::try_from(code).map_or(ErrorCode::Unspecified, ErrorCode::from)
    }

    /// The wire value.
    pub fn to_wire(self) -> i32 {
        v1::ErrorCode::from(self) as i32
    }

    /// A short lowercase name, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "unspecified",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownRecipient => "unknown recipient",
            ErrorCode::MailboxFull => "mailbox full",
            ErrorCode::TooLarge => "too large",
            ErrorCode::RateLimited => "rate limited",
            ErrorCode::Expired => "expired",
            ErrorCode::Internal => "internal error",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not found",
            ErrorCode::QuotaExceeded => "quota exceeded",
            ErrorCode::InvalidNumber => "invalid number",
            ErrorCode::WrongCode => "wrong code",
            ErrorCode::NotVerified => "not verified",
            ErrorCode::StaleDeviceList => "stale device list",
            ErrorCode::StaleEpoch => "stale epoch",
            ErrorCode::UnknownGroup => "unknown group",
            ErrorCode::GroupExists => "group exists",
            ErrorCode::PushTargetRefused => "push target refused",
            ErrorCode::PushEndpointUnverified => "push endpoint unverified",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<v1::ErrorCode> for ErrorCode {
    fn from(code: v1::ErrorCode) -> Self {
        match code {
            v1::ErrorCode::Unspecified => ErrorCode::Unspecified,
            v1::ErrorCode::BadRequest => ErrorCode::BadRequest,
            v1::ErrorCode::Unauthorized => ErrorCode::Unauthorized,
            v1::ErrorCode::UnknownRecipient => ErrorCode::UnknownRecipient,
            v1::ErrorCode::MailboxFull => ErrorCode::MailboxFull,
            v1::ErrorCode::TooLarge => ErrorCode::TooLarge,
            v1::ErrorCode::RateLimited => ErrorCode::RateLimited,
            v1::ErrorCode::Expired => ErrorCode::Expired,
            v1::ErrorCode::Internal => ErrorCode::Internal,
            v1::ErrorCode::Unavailable => ErrorCode::Unavailable,
            v1::ErrorCode::NotFound => ErrorCode::NotFound,
            v1::ErrorCode::QuotaExceeded => ErrorCode::QuotaExceeded,
            v1::ErrorCode::InvalidNumber => ErrorCode::InvalidNumber,
            v1::ErrorCode::WrongCode => ErrorCode::WrongCode,
            v1::ErrorCode::NotVerified => ErrorCode::NotVerified,
            v1::ErrorCode::StaleDeviceList => ErrorCode::StaleDeviceList,
            v1::ErrorCode::StaleEpoch => ErrorCode::StaleEpoch,
            v1::ErrorCode::UnknownGroup => ErrorCode::UnknownGroup,
            v1::ErrorCode::GroupExists => ErrorCode::GroupExists,
            v1::ErrorCode::PushTargetRefused => ErrorCode::PushTargetRefused,
            v1::ErrorCode::PushEndpointUnverified => ErrorCode::PushEndpointUnverified,
        }
    }
}

impl From<ErrorCode> for v1::ErrorCode {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Unspecified => v1::ErrorCode::Unspecified,
            ErrorCode::BadRequest => v1::ErrorCode::BadRequest,
            ErrorCode::Unauthorized => v1::ErrorCode::Unauthorized,
            ErrorCode::UnknownRecipient => v1::ErrorCode::UnknownRecipient,
            ErrorCode::MailboxFull => v1::ErrorCode::MailboxFull,
            ErrorCode::TooLarge => v1::ErrorCode::TooLarge,
            ErrorCode::RateLimited => v1::ErrorCode::RateLimited,
            ErrorCode::Expired => v1::ErrorCode::Expired,
            ErrorCode::Internal => v1::ErrorCode::Internal,
            ErrorCode::Unavailable => v1::ErrorCode::Unavailable,
            ErrorCode::NotFound => v1::ErrorCode::NotFound,
            ErrorCode::QuotaExceeded => v1::ErrorCode::QuotaExceeded,
            ErrorCode::InvalidNumber => v1::ErrorCode::InvalidNumber,
            ErrorCode::WrongCode => v1::ErrorCode::WrongCode,
            ErrorCode::NotVerified => v1::ErrorCode::NotVerified,
            ErrorCode::StaleDeviceList => v1::ErrorCode::StaleDeviceList,
            ErrorCode::StaleEpoch => v1::ErrorCode::StaleEpoch,
            ErrorCode::UnknownGroup => v1::ErrorCode::UnknownGroup,
            ErrorCode::GroupExists => v1::ErrorCode::GroupExists,
            ErrorCode::PushTargetRefused => v1::ErrorCode::PushTargetRefused,
            ErrorCode::PushEndpointUnverified => v1::ErrorCode::PushEndpointUnverified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_code_round_trips_and_unknown_ones_are_unspecified() {
        for wire in 0..=20 {
            let code = ErrorCode::from_wire(wire);
            assert_eq!(code.to_wire(), wire);
            assert_ne!(code.as_str(), "");
        }
        assert_eq!(ErrorCode::from_wire(1), ErrorCode::BadRequest);
        assert_eq!(ErrorCode::from_wire(10), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_wire(12), ErrorCode::InvalidNumber);
        assert_eq!(ErrorCode::from_wire(13), ErrorCode::WrongCode);
        assert_eq!(ErrorCode::from_wire(15), ErrorCode::StaleDeviceList);
        assert_eq!(ErrorCode::from_wire(16), ErrorCode::StaleEpoch);
        assert_eq!(ErrorCode::from_wire(18), ErrorCode::GroupExists);
        assert_eq!(ErrorCode::from_wire(19), ErrorCode::PushTargetRefused);
        assert_eq!(ErrorCode::from_wire(20), ErrorCode::PushEndpointUnverified);
        for unknown in [-1, 1000, i32::MAX, i32::MIN] {
            assert_eq!(ErrorCode::from_wire(unknown), ErrorCode::Unspecified);
        }
    }
}
