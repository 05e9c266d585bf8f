//! Phone verification values: an E.164 number, a 6-digit code, a session id.
//!
//! Only bytes are checked here (no normalising: the client normalises). A number
//! never shows its digits through `Debug` and is zeroized when dropped, so neither a
//! log line nor a freed buffer keeps it (P9).

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::code::ErrorCode;
use crate::error::{Malformed, Problem};

/// Length of a [`VerificationId`].
pub const VERIFICATION_ID_LEN: usize = 16;
/// Digits in a verification code.
pub const CODE_LEN: usize = 6;

/// A phone number in E.164 form: `+`, a non-zero digit, then 6 to 14 more ASCII
/// digits (`^\+[1-9][0-9]{6,14}$`). Zeroized on drop; `Debug` shows no digits and
/// there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct E164(Zeroizing<String>);

impl E164 {
    /// Checks `s` against `^\+[1-9][0-9]{6,14}$`; anything else is
    /// [`ErrorCode::InvalidNumber`] (the error names no digits).
    pub fn parse(s: &str) -> Result<Self, Malformed> {
        if is_e164(s.as_bytes()) {
            Ok(E164(Zeroizing::new(s.to_owned())))
        } else {
            Err(invalid_number("start_verification.number"))
        }
    }

    /// The number, `+` included (for the verifier and the OPRF only).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number's bytes, `+` included.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("E164(<number>)")
    }
}

fn is_e164(b: &[u8]) -> bool {
    matches!(b, [b'+', b'1'..=b'9', rest @ ..]
        if (6..=14).contains(&rest.len()) && rest.iter().all(u8::is_ascii_digit))
}

fn invalid_number(field: &'static str) -> Malformed {
    Malformed::new(
        field,
        Problem::Missing("not an E.164 number"),
        ErrorCode::InvalidNumber,
    )
}

/// A verification code: exactly six ASCII digits. Zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Code([u8; CODE_LEN]);

impl Code {
    /// Six ASCII digits, or [`ErrorCode::BadRequest`]. Not counted as an attempt: such
    /// a code can never match, so refusing it teaches a guesser nothing.
    pub fn parse(s: &str) -> Result<Self, Malformed> {
        let bytes: [u8; CODE_LEN] = s
            .as_bytes()
            .try_into()
            .ok()
            .filter(|b: &[u8; CODE_LEN]| b.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| {
                Malformed::new(
                    "check_verification.code",
                    Problem::Missing("a code of 6 digits"),
                    ErrorCode::BadRequest,
                )
            })?;
        Ok(Code(bytes))
    }

    /// The code for a number below 10^6, zero-padded.
    pub fn from_number(n: u32) -> Option<Self> {
        if n >= 1_000_000 {
            return None;
        }
        let mut out = [b'0'; CODE_LEN];
        let mut n = n;
        for d in out.iter_mut().rev() {
            // n % 10 < 10, so the cast cannot truncate.
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        Some(Code(out))
    }

    /// The six ASCII digits.
    pub fn as_bytes(&self) -> &[u8; CODE_LEN] {
        &self.0
    }

    /// The digits as a string slice.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl Drop for Code {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(<digits>)")
    }
}

/// A verification session's id: 16 random bytes chosen by the relay.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerificationId(pub [u8; VERIFICATION_ID_LEN]);

impl VerificationId {
    /// Lower-case hex (the dev verifier's file name).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for VerificationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerificationId({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_accepts_exactly_the_regex() {
        for ok in [
            "+1555010",
            "+15550100123",
            "+447700900123",
            "+123456789012345",
        ] {
            assert!(E164::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "+",
            "0123",
            "15550100123",
            "+05550100123",
            "+123456",
            "+1234567890123456",
            "+1555a100123",
            "+1 5550100123",
            "+1555010012３",
            " +15550100123",
            "+15550100123\n",
        ] {
            let e = E164::parse(bad).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidNumber, "{bad:?}");
            assert!(!e.to_string().contains("555"), "{e}");
        }
    }

    #[test]
    fn debug_shows_no_digits() {
        let n = E164::parse("+15550100123").unwrap();
        assert_eq!(format!("{n:?}"), "E164(<number>)");
        let c = Code::parse("012345").unwrap();
        assert!(!format!("{c:?}").contains("012345"));
    }

    #[test]
    fn codes_are_six_ascii_digits() {
        assert_eq!(Code::parse("000000").unwrap().as_str(), "000000");
        for bad in ["", "12345", "1234567", "12345a", "１２３４５６"] {
            assert_eq!(Code::parse(bad).unwrap_err().code(), ErrorCode::BadRequest);
        }
        assert_eq!(Code::from_number(42).unwrap().as_str(), "000042");
        assert_eq!(Code::from_number(999_999).unwrap().as_str(), "999999");
        assert!(Code::from_number(1_000_000).is_none());
    }
}
