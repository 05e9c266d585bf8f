//! Phone verification on a connection: `StartVerification` and
//! `CheckVerification`, for authenticated devices only. The start is limited per
//! address prefix, so the connection's prefix goes with it (in memory only, P9).

use tern_proto::{Reply, Request};

use super::Session;
use crate::error::{Error, Result};

impl Session {
    /// Answers a verification request (any other request is a bug of the caller and
    /// answered `BAD_REQUEST`).
    pub(super) async fn verification(&mut self, id: u64, request: Request) {
        let result = self.verification_reply(request).await;
        self.reply(id, result).await
    }

    async fn verification_reply(&self, request: Request) -> Result<Reply> {
        let account = self.authenticated()?.address().account;
        let service = &self.settings.verification;
        match request {
            Request::StartVerification { number } => {
                let (session, expires_at_ms) = service.start(&account, self.prefix, number).await?;
                Ok(Reply::VerificationStarted {
                    session,
                    expires_at_ms,
                })
            }
            Request::CheckVerification {
                session,
                code,
                discoverable,
            } => {
                let discoverable = service
                    .check(&account, &session, &code, discoverable)
                    .await?;
                Ok(Reply::Verified { discoverable })
            }
            _ => Err(Error::BadRequest("not a verification request".into())),
        }
    }
}
