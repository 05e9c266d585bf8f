//! Open verification sessions behind [`VerificationSessions`]: in memory for an
//! embedded relay ([`MemorySessions`]), in PostgreSQL for relay nodes sharing one
//! database (`store/pg/verification.rs`), so a check on one node finds a start made
//! on another.
//!
//! A session never holds the number: the start evaluates the number's tag (the OPRF,
//! under the key in `discovery-oprf-key`) and the session keeps that, as the tag store
//! does. Nor does it hold the code: it holds HMAC-SHA256(code key, session id ‖ code),
//! the code key derived from the OPRF key file, so the database alone reveals neither.

use std::collections::HashMap;
use std::sync::Mutex;

use subtle::ConstantTimeEq;
use tern_platform::clock::UnixMillis;
use tern_proto::discovery::{FilterKey, Tag};
use tern_proto::{AccountId, VerificationId};

use crate::store::StoreResult;

/// One session: whose, which number's tag, the code's MAC, until when, how many tries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoredSession {
    /// The account verifying.
    pub account: AccountId,
    /// The number's tag, evaluated at the start.
    pub tag: Tag,
    /// The number's filter key (from the same evaluation).
    pub key: FilterKey,
    /// HMAC-SHA256(code key, session id ‖ code).
    pub code_mac: [u8; 32],
    /// When the code expires (Unix ms).
    pub expires_at: UnixMillis,
    /// Tries left (at least 1 while the session is open).
    pub attempts_left: u32,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("expires_at", &self.expires_at)
            .field("attempts_left", &self.attempts_left)
            .finish_non_exhaustive()
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The code is right; the session is gone and hands back its number's tag.
    Verified {
        /// The number's tag.
        tag: Tag,
        /// Its filter key.
        key: FilterKey,
    },
    /// Wrong; this many tries remain (0: the session is gone).
    Wrong {
        /// Tries left.
        attempts_left: u32,
    },
    /// No such session for this account (or another check took its last try).
    NotFound,
    /// The code expired; the session is gone.
    Expired,
}

/// The open sessions, at most one per account.
///
/// Contract: a right code ends the session and is seen by one check only; a wrong
/// one takes one try, atomically, so concurrent checks (on any node) never get more
/// tries than the session had; a check of another account's session is `NotFound`.
pub trait VerificationSessions: Send + Sync + 'static {
    /// Opens `session` under `id`; returns the id of the account's session it
    /// replaces, if any (that session is gone).
    fn open(
        &self,
        id: &VerificationId,
        session: &StoredSession,
    ) -> StoreResult<Option<VerificationId>>;
    /// Removes a session (its code could not be sent).
    fn remove(&self, id: &VerificationId) -> StoreResult<()>;
    /// Checks `code_mac` for `account`'s session `id` at `now`, in constant time.
    fn check(
        &self,
        id: &VerificationId,
        account: &AccountId,
        code_mac: &[u8; 32],
        now: UnixMillis,
    ) -> StoreResult<Checked>;
    /// Removes the account's session (account deletion); returns its id.
    fn remove_account(&self, account: &AccountId) -> StoreResult<Option<VerificationId>>;
    /// Removes at most `max` sessions expired at `now`; returns their ids.
    fn sweep(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<VerificationId>>;
    /// Open sessions.
    fn count(&self) -> StoreResult<usize>;
    /// The account's open session: when its code expires and its tries left.
    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(UnixMillis, u32)>>;
}

/// Sessions in memory (an embedded relay): lost on restart, as a start is cheap.
#[derive(Default)]
pub struct MemorySessions {
    inner: Mutex<Sessions>,
}

impl std::fmt::Debug for MemorySessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemorySessions(..)")
    }
}

#[derive(Default)]
struct Sessions {
    by_id: HashMap<VerificationId, StoredSession>,
    by_account: HashMap<AccountId, VerificationId>,
}

impl Sessions {
    fn remove(&mut self, id: &VerificationId) -> Option<StoredSession> {
        let s = self.by_id.remove(id)?;
        if self.by_account.get(&s.account) == Some(id) {
            self.by_account.remove(&s.account);
        }
        Some(s)
    }
}

impl MemorySessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // Every method finishes its updates before it could panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VerificationSessions for MemorySessions {
    fn open(
        &self,
        id: &VerificationId,
        session: &StoredSession,
    ) -> StoreResult<Option<VerificationId>> {
        let mut s = self.lock();
        let replaced = s.by_account.insert(session.account, *id);
        if let Some(old) = replaced {
            s.by_id.remove(&old);
        }
        s.by_id.insert(*id, *session);
        Ok(replaced)
    }

    fn remove(&self, id: &VerificationId) -> StoreResult<()> {
        self.lock().remove(id);
        Ok(())
    }

    fn check(
        &self,
        id: &VerificationId,
        account: &AccountId,
        code_mac: &[u8; 32],
        now: UnixMillis,
    ) -> StoreResult<Checked> {
        let mut all = self.lock();
        let Some(s) = all.by_id.get_mut(id) else {
            return Ok(Checked::NotFound);
        };
        if s.account != *account {
            return Ok(Checked::NotFound);
        }
        if now >= s.expires_at {
            all.remove(id);
            return Ok(Checked::Expired);
        }
        if bool::from(s.code_mac.ct_eq(code_mac)) {
            return Ok(match all.remove(id) {
                Some(s) => Checked::Verified {
                    tag: s.tag,
                    key: s.key,
                },
                None => Checked::NotFound,
            });
        }
        s.attempts_left = s.attempts_left.saturating_sub(1);
        let attempts_left = s.attempts_left;
        if attempts_left == 0 {
            all.remove(id);
        }
        Ok(Checked::Wrong { attempts_left })
    }

    fn remove_account(&self, account: &AccountId) -> StoreResult<Option<VerificationId>> {
        let mut s = self.lock();
        let Some(id) = s.by_account.get(account).copied() else {
            return Ok(None);
        };
        Ok(s.remove(&id).map(|_| id))
    }

    fn sweep(&self, now: UnixMillis, max: usize) -> StoreResult<Vec<VerificationId>> {
        let mut s = self.lock();
        let expired: Vec<_> = (s.by_id.iter())
            .filter(|(_, s)| now >= s.expires_at)
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        for id in &expired {
            s.remove(id);
        }
        Ok(expired)
    }

    fn count(&self) -> StoreResult<usize> {
        Ok(self.lock().by_id.len())
    }

    fn of_account(&self, account: &AccountId) -> StoreResult<Option<(UnixMillis, u32)>> {
        let s = self.lock();
        Ok(s.by_account
            .get(account)
            .and_then(|id| s.by_id.get(id))
            .map(|s| (s.expires_at, s.attempts_left)))
    }
}
