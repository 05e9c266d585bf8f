//! A connection's standing: pending, anonymous or authenticated, with the limits and
//! the deadline each one has, and its place in the admission pools.

use super::{End, Session};
use crate::error::{Error, Result};
use crate::net::admission::AdmissionGuard;
use tern_proto::Reply;

/// What the accept loop hands a connection: its admission places and the deadline to
/// authenticate by.
pub(crate) struct Admitted {
    pub(crate) guard: AdmissionGuard,
    pub(crate) deadline: tokio::time::Instant,
}

/// How far a connection has identified itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    Pending,
    Anonymous,
    Authenticated,
}

impl Session {
    /// The frame limit for the connection's standing.
    pub(super) fn frame_limit(&self) -> usize {
        match self.standing {
            Standing::Authenticated => self.settings.max_frame,
            _ => self.settings.unauthenticated_frame,
        }
    }

    /// Takes a place among `max_connections` for a connection that is about to
    /// authenticate or make an anonymous request; if none is free, answers
    /// `UNAVAILABLE` and ends the connection.
    pub(super) async fn take_place(&mut self, id: u64) -> bool {
        if self.standing == Standing::Authenticated || self.admission.promote() {
            return true;
        }
        self.reply(id, Err(Error::Unavailable("at capacity"))).await;
        self.ending = Some(End::Full);
        false
    }

    /// Answers an anonymous request; a success counts as one.
    pub(super) async fn anonymous_reply(&mut self, id: u64, reply: Result<Reply>) {
        if reply.is_ok() {
            self.anonymous_request();
        }
        self.reply(id, reply).await
    }

    /// Records a successful anonymous request: a pending connection becomes
    /// anonymous, and an anonymous one's idle time starts again. False if there is no
    /// place for it among `max_connections`.
    pub(super) fn anonymous_request(&mut self) -> bool {
        if self.standing == Standing::Authenticated {
            return true;
        }
        if !self.admission.promote() {
            return false;
        }
        self.standing = Standing::Anonymous;
        self.deadline = tokio::time::Instant::now() + self.settings.anonymous_idle;
        true
    }

    /// Lifts the limits before authentication once authenticated.
    pub(super) fn authenticated_now(&mut self) {
        self.standing = Standing::Authenticated;
        let window = quinn::VarInt::from_u32(self.settings.authenticated_receive_window);
        self.conn.set_receive_window(window);
    }
}
