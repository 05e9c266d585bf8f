//! A request that was refused before it reached a service.

use std::fmt;

use super::RequestKind;
use crate::code::ErrorCode;
use crate::error::{Malformed, Problem};
use crate::reply::ErrorReply;

/// A client frame that decoded but is not a valid request. It keeps the request id,
/// so a relay can still answer it (with [`RequestError::to_reply`]), and says which
/// request and field were wrong.
///
/// The code is the one a relay has always answered such a field with: a malformed id,
/// key length or hash length is [`ErrorCode::BadRequest`]; a key or signature that
/// takes part in authentication ([`Request::Register`](super::Request::Register),
/// [`Request::AddDevice`](super::Request::AddDevice),
/// [`Request::Auth`](super::Request::Auth), the signatures of
/// [`Request::PublishKeys`](super::Request::PublishKeys)) is
/// [`ErrorCode::Unauthorized`]; an ack of more than
/// [`MAX_ACK_SEQS`](crate::limits::MAX_ACK_SEQS) is [`ErrorCode::TooLarge`]; a
/// frame without a body is [`ErrorCode::BadRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    id: u64,
    kind: Option<RequestKind>,
    malformed: Malformed,
}

impl RequestError {
    pub(crate) fn new(id: u64, kind: Option<RequestKind>, malformed: Malformed) -> Self {
        RequestError {
            id,
            kind,
            malformed,
        }
    }

    /// The request id, to answer with.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Which request; `None` for a frame without a body.
    pub fn kind(&self) -> Option<RequestKind> {
        self.kind
    }

    /// The field as named in `tern.proto` (`send.recipient_account`, ...).
    pub fn field(&self) -> &'static str {
        self.malformed.field()
    }

    /// What was wrong with it.
    pub fn problem(&self) -> &Problem {
        self.malformed.problem()
    }

    /// The code the relay answers with.
    pub fn code(&self) -> ErrorCode {
        self.malformed.code()
    }

    /// The text the relay answers with (opaque for failed authentication).
    pub fn client_message(&self) -> String {
        self.malformed.client_message()
    }

    /// The whole field error.
    pub fn malformed(&self) -> &Malformed {
        &self.malformed
    }

    /// The answer a relay sends: [`RequestError::code`] with
    /// [`RequestError::client_message`], no retry advice.
    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply::new(self.code(), self.client_message())
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(kind) => write!(f, "request {} ({kind}): {}", self.id, self.malformed),
            None => write!(f, "request {}: {}", self.id, self.malformed),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.malformed)
    }
}
