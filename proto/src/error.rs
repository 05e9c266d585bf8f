//! What is wrong with a wire message that decoded but does not validate.

use crate::code::ErrorCode;
use crate::ids::IdError;

/// What was wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// Not a valid identifier (a wrong length, device id 0).
    #[error(transparent)]
    Id(#[from] IdError),
    /// Bytes of the wrong length.
    #[error("{what} must be {expected} bytes, got {got}")]
    Length {
        /// What the bytes are, for people.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length received.
        got: usize,
    },
    /// More items than the protocol allows.
    #[error("{what} of {got} exceeds the limit of {max}")]
    TooMany {
        /// What there are too many of, for people.
        what: &'static str,
        /// How many arrived.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A required part is absent (an empty body or oneof): the phrase says which.
    #[error("{0}")]
    Missing(&'static str),
    /// The bytes are not a protobuf message of the expected type.
    #[error("{0} does not decode")]
    Undecodable(&'static str),
    /// Something that must appear once appears twice: the phrase says what.
    #[error("{0} appears twice")]
    Duplicate(&'static str),
    /// A list whose length must match another's.
    #[error("{what}: expected {expected}, got {got}")]
    Count {
        /// What was counted, for people.
        what: &'static str,
        /// The count required.
        expected: usize,
        /// The count received.
        got: usize,
    },
    /// Not a well-formed device list.
    #[error(transparent)]
    DeviceList(#[from] crate::device_list::DeviceListError),
    /// A value of the wrong form (characters outside the allowed set): the phrase
    /// says which form was expected.
    #[error("{0}")]
    Invalid(&'static str),
}

/// A wire message that decoded but does not validate: which field, what was wrong
/// with it, and the [`ErrorCode`] a relay answers such a request with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Malformed {
    field: &'static str,
    problem: Problem,
    code: ErrorCode,
}

impl Malformed {
    pub(crate) fn new(field: &'static str, problem: impl Into<Problem>, code: ErrorCode) -> Self {
        Malformed {
            field,
            problem: problem.into(),
            code,
        }
    }

    /// The field, as named in `tern.proto` (`message.field`, e.g. `send.recipient_account`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What was wrong with it.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// The code a relay answers with.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The text a relay sends with [`Malformed::code`]: the problem for a bad
    /// request, nothing more than "unauthorized" for a failed authentication (those
    /// stay opaque).
    pub fn client_message(&self) -> String {
        match self.code {
            ErrorCode::BadRequest => format!("bad request: {}", self.problem),
            ErrorCode::Unauthorized => "unauthorized".to_owned(),
            _ => self.problem.to_string(),
        }
    }
}

/// Bytes as a fixed-size array, or the [`Malformed`] for `field`.
pub(crate) fn array<const N: usize>(
    bytes: &[u8],
    field: &'static str,
    what: &'static str,
    code: ErrorCode,
) -> Result<[u8; N], Malformed> {
    bytes.try_into().map_err(|_| {
        Malformed::new(
            field,
            Problem::Length {
                what,
                expected: N,
                got: bytes.len(),
            },
            code,
        )
    })
}

/// An id error as a bad request on `field` (how a relay answers every malformed id).
pub(crate) fn bad_id(field: &'static str) -> impl FnOnce(IdError) -> Malformed {
    move |e| Malformed::new(field, e, ErrorCode::BadRequest)
}
