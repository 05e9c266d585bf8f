//! Group epochs: `CreateGroup` and `GroupCommit`.
//!
//! A commit is first checked whole, holding no lock: each send's sizes and parts,
//! one unit of the sender prefix's sealed-send rate (for the whole commit), the
//! disk reserve; then the handle's state as read:
//! 1. an unknown handle: `UNKNOWN_GROUP`;
//! 2. an older epoch: `OK` if it is the commit that made the current epoch (same
//!    commit id, one epoch back: a retry whose answer was lost; nothing is appended
//!    again, and no per-send results are given, as the relay keeps none), else
//!    `STALE_EPOCH` with the current epoch;
//! 3. a later epoch: `STALE_EPOCH` (a client never does this);
//! 4. the current epoch with a token whose SHA-256 is not the stored hash:
//!    `UNKNOWN_GROUP` (a removed member learns no more than a stranger).
//!
//! Only then does it take its handle's lock (this node's, then one of the store's
//! lock slots, at most a quarter of the PostgreSQL pool per node, waited for at
//! most [`super::LOCK_SLOT_WAIT`], else `UNAVAILABLE`; then the store's, which
//! on PostgreSQL is the handle's row, locked on the one connection the commit
//! uses), read the state again under it and check it again, append the sends,
//! make them durable, and only then move the epoch on (and make it durable) with
//! the next token's hash, the commit id and today's day.
//!
//! Appending first means a crash between the two leaves the commit delivered and
//! the epoch unmoved: the committer's retry appends it again (recipients drop the
//! duplicate by message id). It never leaves a moved epoch whose commit nobody got.
//! Once one send stored something the epoch moves: a later send refused whole (the
//! relay's budget) is answered refused for each of its recipients. The epoch moves
//! even when every recipient was refused: the refusals are in the answer, and the
//! committer resends to the devices it fixes. A commit's sends are under no rate
//! but the one unit above, and may pass `max_queued_messages` by the commit reserve.

use tern_proto::{ErrorCode, GroupCommit, GroupHandle, MultiSend, MultiSendResult, Refused};

use super::Groups;
use crate::core::rate::AddressPrefix;
use crate::error::{Error, Result};
use crate::server::Services;
use crate::store::{GroupState, HandleBytes, StoreError};

impl Groups {
    /// Registers `handle` at epoch 0 with the hash of epoch 0's token; `GROUP_EXISTS`
    /// if it is taken, `UNAVAILABLE` past `max_groups`. Counted against `from`'s
    /// `create_groups_per_prefix`.
    pub(crate) async fn create(
        &self,
        handle: &GroupHandle,
        token_hash: &[u8; 32],
        from: AddressPrefix,
    ) -> Result<()> {
        self.budget.check_reserve()?;
        self.rates.create_group(from)?;
        self.take_room()?;
        let state = GroupState {
            epoch: 0,
            token_hash: *token_hash,
            last_commit_id: [0; 16],
            touched_day: self.today(),
        };
        if let Err(e) = self.groups.insert_group(&handle.0, &state) {
            self.release_room();
            return Err(match e {
                StoreError::Exists => Error::GroupExists,
                e => e.into(),
            });
        }
        self.commit.commit().await?;
        Ok(())
    }

    /// Applies `commit` as the module docs say; the group's new epoch and one result
    /// per send.
    pub(crate) async fn commit(
        &self,
        services: &Services,
        commit: &GroupCommit,
        from: AddressPrefix,
    ) -> Result<(u64, Vec<MultiSendResult>)> {
        // Whatever can refuse the whole commit, before any lock and before any send
        // is stored: then a commit is either refused with nothing stored, or its
        // epoch moves.
        for send in &commit.sends {
            services.mailboxes().check_multi(send)?;
        }
        self.rates.multi_send(&from)?;
        self.budget.check_reserve()?;
        let handle = &commit.handle.0;
        // Unknown handles, wrong tokens and stale epochs take no lock (on
        // PostgreSQL, no connection held): only a member's commit waits for one.
        if let Some(retried) = check(self.groups.group(handle)?.as_ref(), commit)? {
            return Ok((retried, Vec::new()));
        }
        let _local = self.locks.lock(*handle).await;
        // Before the store's lock takes its connection: a bounded share of the pool.
        let _slot = self.lock_slot().await?;
        let lock = self.groups.lock_group(handle)?.ok_or(Error::UnknownGroup)?;
        let state = *lock.state();
        // Read again under the lock: another commit may have moved it meanwhile.
        if let Some(retried) = check(Some(&state), commit)? {
            return Ok((retried, Vec::new()));
        }
        let stale = Error::StaleEpoch {
            current: state.epoch,
        };
        let next_epoch = state.epoch.checked_add(1).ok_or(stale)?;
        let results = self.append(services, commit, from).await?;
        let next = GroupState {
            epoch: next_epoch,
            token_hash: commit.next_token_hash,
            last_commit_id: commit.commit_id.0,
            touched_day: self.today(),
        };
        if !self.groups.advance_locked(handle, lock, &next)? {
            self.swept_meanwhile(handle, &next)?;
        }
        self.commit.commit().await?;
        Ok((next_epoch, results))
    }

    /// One of the store's lock slots, waited for at most [`super::LOCK_SLOT_WAIT`];
    /// `None` for a store whose lock holds nothing.
    async fn lock_slot(&self) -> Result<Option<tokio::sync::SemaphorePermit<'_>>> {
        let Some(slots) = &self.lock_slots else {
            return Ok(None);
        };
        match tokio::time::timeout(super::LOCK_SLOT_WAIT, slots.acquire()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(Error::Store(StoreError::Unavailable(
                "too many group commits hold a lock on this node".into(),
            ))),
        }
    }

    /// After a compare-and-set that failed: a handle the sweeper deleted while the
    /// commit was appended (idle past `group_idle_days`; an embedded store's sweep
    /// does not wait for the handle's lock, PostgreSQL's skips a locked row) comes
    /// back at the new epoch, as the commit is delivered. Anything else is a writer
    /// that ignored the lock: `STALE_EPOCH`.
    fn swept_meanwhile(&self, handle: &HandleBytes, next: &GroupState) -> Result<()> {
        let current = match self.groups.group(handle)? {
            None => match self.groups.insert_group(handle, next) {
                Ok(()) => {
                    self.tally_restored();
                    return Ok(());
                }
                Err(StoreError::Exists) => self.groups.group(handle)?,
                Err(e) => return Err(e.into()),
            },
            current => current,
        };
        Err(Error::StaleEpoch {
            current: current.ok_or(Error::UnknownGroup)?.epoch,
        })
    }

    /// Appends the commit's sends (all before any is awaited: they share one
    /// flush) and waits until they are durable. A send refused whole once an
    /// earlier one stored something (the relay's budget, a store failure) is
    /// answered as refused for each of its recipients: the epoch moves with the
    /// stored commit, and the committer sends that one again (always `UNAVAILABLE`).
    async fn append(
        &self,
        services: &Services,
        commit: &GroupCommit,
        from: AddressPrefix,
    ) -> Result<Vec<MultiSendResult>> {
        let mut appended = Vec::with_capacity(commit.sends.len());
        let mut stored = false;
        for send in &commit.sends {
            match crate::mailboxes::append_multi(services, send, from, true) {
                Ok(a) => {
                    stored |= a.accepted() > 0;
                    appended.push(Ok(a));
                }
                Err(_) if stored => appended.push(Err(refused_whole(send))),
                Err(e) => return Err(e),
            }
        }
        let mut results = Vec::with_capacity(appended.len());
        for a in appended {
            results.push(match a {
                Ok(a) => a.commit().await?,
                Err(refused) => refused,
            });
        }
        Ok(results)
    }
}

/// What `state` (`None`: no such handle) answers to `commit`: `Ok(None)` to go on
/// (the current epoch with its token), `Ok(Some(epoch))` for a retry of the commit
/// that made the current epoch (answered without appending), else the refusal.
fn check(state: Option<&GroupState>, commit: &GroupCommit) -> Result<Option<u64>> {
    let state = state.ok_or(Error::UnknownGroup)?;
    if commit.epoch != state.epoch {
        let retry = commit.epoch.checked_add(1) == Some(state.epoch)
            && commit.commit_id.0 == state.last_commit_id;
        if retry {
            return Ok(Some(state.epoch));
        }
        return Err(Error::StaleEpoch {
            current: state.epoch,
        });
    }
    // A wrong token answers as an unknown handle does.
    crate::accounts::check_token_hash(Some(&state.token_hash), &commit.epoch_token)
        .map_err(|_| Error::UnknownGroup)?;
    Ok(None)
}

/// `send` refused for every device of every recipient, always `UNAVAILABLE`: the
/// committer sends it again later. The error's own code could say more (INTERNAL,
/// or UNAUTHORIZED for an account deleted under the store), but a client reads a
/// per-account UNAUTHORIZED as its token refused and other codes as permanent.
fn refused_whole(send: &MultiSend) -> MultiSendResult {
    let code = ErrorCode::Unavailable;
    let refused = (0..send.recipients.len())
        .map(|i| Refused {
            recipient: u32::try_from(i).unwrap_or(u32::MAX),
            device: None,
            code,
        })
        .collect();
    MultiSendResult {
        accepted: 0,
        refused,
    }
}
