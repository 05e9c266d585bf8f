//! Group epochs: `CreateGroup` and `GroupCommit`.
//!
//! A commit runs under its handle's lock (this node's, then the store's, which on
//! PostgreSQL is held across nodes):
//! 1. an unknown handle: `UNKNOWN_GROUP`;
//! 2. an older epoch: `OK` if it is the commit that made the current epoch (same
//!    commit id, one epoch back: a retry whose answer was lost; nothing is appended
//!    again, and no per-send results are given, as the relay keeps none), else
//!    `STALE_EPOCH` with the current epoch;
//! 3. a later epoch: `STALE_EPOCH` (a client never does this);
//! 4. the current epoch: a token whose SHA-256 is not the stored hash is
//!    `UNKNOWN_GROUP` (a removed member learns no more than a stranger); else the
//!    sends are appended and made durable, and only then is the epoch moved on (and
//!    made durable) with the next token's hash, the commit id and today's day.
//!
//! Appending first means a crash between the two leaves the commit delivered and
//! the epoch unmoved: the committer's retry appends it again (recipients drop the
//! duplicate by message id). It never leaves a moved epoch whose commit nobody got.
//! The epoch moves even when every recipient was refused: the refusals are in the
//! answer, and the committer resends to the devices it fixes.

use tern_proto::{GroupCommit, GroupHandle, MultiSendResult};

use super::Groups;
use crate::core::rate::AddressPrefix;
use crate::error::{Error, Result};
use crate::server::Services;
use crate::store::{GroupState, StoreError};

impl Groups {
    /// Registers `handle` at epoch 0 with the hash of epoch 0's token; `GROUP_EXISTS`
    /// if it is taken. Counted against `from`'s `create_groups_per_prefix`.
    pub(crate) async fn create(
        &self,
        handle: &GroupHandle,
        token_hash: &[u8; 32],
        from: AddressPrefix,
    ) -> Result<()> {
        self.budget.check_reserve()?;
        self.rates.create_group(from)?;
        let state = GroupState {
            epoch: 0,
            token_hash: *token_hash,
            last_commit_id: [0; 16],
            touched_day: self.today(),
        };
        match self.groups.insert_group(&handle.0, &state) {
            Err(StoreError::Exists) => return Err(Error::GroupExists),
            other => other?,
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
        let handle = &commit.handle.0;
        let _local = self.locks.lock(*handle).await;
        let _shared = self.groups.lock_group(handle)?;
        let state = self.groups.group(handle)?.ok_or(Error::UnknownGroup)?;
        let stale = Error::StaleEpoch {
            current: state.epoch,
        };
        if commit.epoch != state.epoch {
            let retry = commit.epoch.checked_add(1) == Some(state.epoch)
                && commit.commit_id.0 == state.last_commit_id;
            return if retry {
                Ok((state.epoch, Vec::new()))
            } else {
                Err(stale)
            };
        }
        // A wrong token answers as an unknown handle does.
        crate::accounts::check_token_hash(Some(&state.token_hash), &commit.epoch_token)
            .map_err(|_| Error::UnknownGroup)?;
        let next_epoch = state.epoch.checked_add(1).ok_or(stale)?;
        // Every send appended before any is awaited: they share one flush.
        let mut appended = Vec::with_capacity(commit.sends.len());
        for send in &commit.sends {
            appended.push(crate::mailboxes::append_multi(services, send, from, true)?);
        }
        let mut results = Vec::with_capacity(appended.len());
        for a in appended {
            results.push(a.commit().await?);
        }
        let next = GroupState {
            epoch: next_epoch,
            token_hash: commit.next_token_hash,
            last_commit_id: commit.commit_id.0,
            touched_day: self.today(),
        };
        if !self.groups.advance_group(handle, &state, &next)? {
            // Only a writer that ignores the lock gets here (or the handle was swept).
            let current = self.groups.group(handle)?.ok_or(Error::UnknownGroup)?;
            return Err(Error::StaleEpoch {
                current: current.epoch,
            });
        }
        self.commit.commit().await?;
        Ok((next_epoch, results))
    }
}
