//! Verification sessions, in memory only: a number lives here from the start of its
//! session to its end (verified, out of attempts, replaced or expired), never on disk.

use std::collections::HashMap;

use subtle::ConstantTimeEq;
use tern_platform::clock::UnixMillis;
use tern_proto::{AccountId, Code, VerificationId, E164};

/// One session: whose, which number, the code sent, until when, how many tries.
pub(crate) struct Session {
    pub(crate) account: AccountId,
    /// Zeroized when the session is dropped (`E164` wipes itself).
    pub(crate) number: E164,
    pub(crate) code: Code,
    pub(crate) expires_at: UnixMillis,
    pub(crate) attempts_left: u32,
}

/// What a check found.
pub(crate) enum Checked {
    /// The code is right; the session is gone and hands back its number.
    Verified(E164),
    /// Wrong; this many tries remain (0: the session is gone).
    Wrong { attempts_left: u32 },
    /// No such session for this account.
    NotFound,
    /// The code expired; the session is gone.
    Expired,
}

/// Every open session, at most one per account.
#[derive(Default)]
pub(crate) struct Sessions {
    by_id: HashMap<VerificationId, Session>,
    by_account: HashMap<AccountId, VerificationId>,
}

impl Sessions {
    /// Opens `session` under `id`; returns the id of the account's session it
    /// replaces, if any.
    pub(crate) fn insert(
        &mut self,
        id: VerificationId,
        session: Session,
    ) -> Option<VerificationId> {
        let replaced = self.by_account.insert(session.account, id);
        if let Some(old) = replaced {
            self.by_id.remove(&old);
        }
        self.by_id.insert(id, session);
        replaced
    }

    /// Removes a session (its number is zeroized as it drops).
    pub(crate) fn remove(&mut self, id: &VerificationId) -> Option<Session> {
        let s = self.by_id.remove(id)?;
        if self.by_account.get(&s.account) == Some(id) {
            self.by_account.remove(&s.account);
        }
        Some(s)
    }

    /// The account's session, removed (account deletion).
    pub(crate) fn remove_account(&mut self, account: &AccountId) -> Option<VerificationId> {
        let id = self.by_account.get(account).copied()?;
        self.remove(&id).map(|_| id)
    }

    /// Checks `code` for `account`'s session `id` at `now`. Another account's
    /// session is `NotFound`, as an unknown one.
    pub(crate) fn check(
        &mut self,
        id: &VerificationId,
        account: &AccountId,
        code: &Code,
        now: UnixMillis,
    ) -> Checked {
        let Some(s) = self.by_id.get_mut(id) else {
            return Checked::NotFound;
        };
        if s.account != *account {
            return Checked::NotFound;
        }
        if now >= s.expires_at {
            self.remove(id);
            return Checked::Expired;
        }
        if bool::from(s.code.as_bytes().ct_eq(code.as_bytes())) {
            return match self.remove(id) {
                Some(s) => Checked::Verified(s.number),
                None => Checked::NotFound,
            };
        }
        s.attempts_left = s.attempts_left.saturating_sub(1);
        let attempts_left = s.attempts_left;
        if attempts_left == 0 {
            self.remove(id);
        }
        Checked::Wrong { attempts_left }
    }

    /// Drops every session expired at `now`; returns their ids.
    pub(crate) fn sweep(&mut self, now: UnixMillis) -> Vec<VerificationId> {
        let expired: Vec<_> = (self.by_id.iter())
            .filter(|(_, s)| now >= s.expires_at)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.remove(id);
        }
        expired
    }

    /// Open sessions.
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The account's open session and its tries left (for export).
    pub(crate) fn of_account(&self, account: &AccountId) -> Option<(UnixMillis, u32)> {
        let id = self.by_account.get(account)?;
        self.by_id.get(id).map(|s| (s.expires_at, s.attempts_left))
    }
}
