//! Phone verification: attach a number to this account so contacts who have it can
//! find the account (discovery). The relay sends a 6-digit code to the number; the
//! app asks the user for it and confirms. The relay keeps only the number's
//! discovery tag, never the number.
//!
//! Numbers must already be E.164 (`+`, country code, subscriber number, digits
//! only); turning an address book's national formats into E.164 is the discovery
//! normaliser's job.

use tern_proto::{Code, VerificationId, E164};

use super::Client;
use crate::{Error, Result};

impl Client {
    /// Starts verifying `number` (E.164, checked against `^\+[1-9][0-9]{6,14}$`,
    /// else [`Error::InvalidNumber`]): the relay sends it a code valid for 10
    /// minutes. A new start replaces this account's earlier session. The relay
    /// limits starts per number, per address and per account (`RATE_LIMITED`, see
    /// [`Error::retry_after`]); it answers `UNAVAILABLE` if it offers no
    /// verification or could not send the code.
    pub async fn start_verification(&self, number: &str) -> Result<VerificationId> {
        let number = E164::parse(number).map_err(|_| Error::InvalidNumber)?;
        let (conn, _) = self.connections().await?;
        let (session, _expires_at_ms) = conn.start_verification(number).await?;
        Ok(session)
    }

    /// Confirms session `id` with the `code` the user received (six digits, else
    /// [`Error::InvalidCode`], which costs no attempt). On success the number is
    /// verified and the answer is whether the account is now discoverable by it:
    /// the relay's `discovery.default_discoverable`, normally on. Use this when the
    /// app keeps the relay's default; when the user has chosen, use
    /// [`Self::confirm_verification_with`], which never leaves the account
    /// discoverable against that choice, not even for a moment. A wrong code is the
    /// relay's `WRONG_CODE` with [`Error::attempts_left`]; after the last one, or
    /// after 10 minutes (`EXPIRED`), the session is gone (`NOT_FOUND`): start again.
    /// A failed verification never touches a number verified before.
    pub async fn confirm_verification(&self, id: VerificationId, code: &str) -> Result<bool> {
        self.confirm_code(id, code, None).await
    }

    /// [`Self::confirm_verification`] with the user's choice: the number's tag is
    /// attached discoverable as `discoverable` says, in the same step that verifies
    /// it (a later [`Self::set_discoverable`] would leave a moment in which the
    /// account can be found). Returns whether the account is discoverable, which
    /// is `discoverable`.
    pub async fn confirm_verification_with(
        &self,
        id: VerificationId,
        code: &str,
        discoverable: bool,
    ) -> Result<bool> {
        self.confirm_code(id, code, Some(discoverable)).await
    }

    async fn confirm_code(
        &self,
        id: VerificationId,
        code: &str,
        choice: Option<bool>,
    ) -> Result<bool> {
        let code = Code::parse(code.trim()).map_err(|_| Error::InvalidCode)?;
        let (conn, _) = self.connections().await?;
        conn.check_verification_as(id, code, choice).await
    }
}
