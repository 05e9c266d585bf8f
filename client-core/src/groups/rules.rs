//! The MLS rules every Tern device applies to a commit, its own or a received one:
//! the commit options, and which proposals a commit may carry.
//!
//! A commit may add, remove or update leaves and replace the GroupContext
//! extensions; nothing else (no PSK, re-init, external init or custom proposal:
//! Tern sends none). A new extension list must carry [`GroupMeta`] that decodes
//! and is within its limits, under the group's handle: a member that drops or
//! corrupts the metadata, or moves the group to another handle, has its commit
//! refused before it is applied (and every member refuses it alike).

use std::convert::Infallible;

use mls_rs::client_builder::PaddingMode;
use mls_rs::error::IntoAnyError;
use mls_rs::group::{GroupContext, Roster};
use mls_rs::mls_rules::{
    CommitDirection, CommitOptions, CommitSource, DefaultMlsRules, EncryptionOptions,
    ProposalBundle,
};
use mls_rs::MlsRules;
use mls_rs_core::group::ProposalType;

use super::meta::GroupMeta;

/// Why a commit's proposals were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// The new GroupContext extensions carry no metadata, or metadata that does
    /// not decode or is over its limits.
    #[error("a commit with malformed group metadata")]
    BadMeta,
    /// The new metadata names another handle.
    #[error("a commit that changes the group handle")]
    HandleChanged,
    /// A proposal of a type Tern does not use.
    #[error("a commit with a proposal of a type Tern does not use")]
    Forbidden,
}

impl IntoAnyError for RulesError {
    fn into_dyn_error(self) -> Result<Box<dyn std::error::Error + Send + Sync>, Self> {
        Ok(Box::new(self))
    }
}

/// Tern's MLS rules (see the module).
#[derive(Debug, Clone)]
pub struct TernRules {
    options: DefaultMlsRules,
    /// Tests make a misbehaving member that skips the checks on its own commits.
    check: bool,
}

impl TernRules {
    #[cfg(test)]
    pub(crate) fn unchecked() -> Self {
        TernRules {
            check: false,
            ..TernRules::default()
        }
    }
}

impl Default for TernRules {
    fn default() -> Self {
        TernRules {
            options: DefaultMlsRules::new()
                .with_commit_options(
                    CommitOptions::new()
                        .with_path_required(true)
                        // The tree travels beside the welcome (it may be large).
                        .with_ratchet_tree_extension(false)
                        .with_single_welcome_message(true)
                        .with_allow_external_commit(false),
                )
                // Commits are encrypted too, and everything is PADMÉ-padded.
                .with_encryption_options(EncryptionOptions::new(true, PaddingMode::Padme)),
            check: true,
        }
    }
}

/// Checks a commit's proposals against the group's current context.
pub(crate) fn check_proposals(
    context: &GroupContext,
    proposals: &ProposalBundle,
) -> Result<(), RulesError> {
    let allowed = [
        ProposalType::ADD,
        ProposalType::UPDATE,
        ProposalType::REMOVE,
        ProposalType::GROUP_CONTEXT_EXTENSIONS,
    ];
    if proposals.proposal_types().any(|t| !allowed.contains(&t)) {
        return Err(RulesError::Forbidden);
    }
    let extension_proposals = proposals.group_context_ext_proposals();
    if extension_proposals.is_empty() {
        return Ok(());
    }
    // The current metadata was checked when it was set (or at create and join).
    let handle = GroupMeta::from_extensions(&context.extensions)
        .map_err(|_| RulesError::BadMeta)?
        .handle;
    for p in extension_proposals {
        let meta = GroupMeta::from_extensions(&p.proposal).map_err(|_| RulesError::BadMeta)?;
        if meta.handle != handle {
            return Err(RulesError::HandleChanged);
        }
    }
    Ok(())
}

impl MlsRules for TernRules {
    type Error = RulesError;

    fn filter_proposals(
        &self,
        _direction: CommitDirection,
        _source: CommitSource,
        _current_roster: &Roster,
        current_context: &GroupContext,
        proposals: ProposalBundle,
    ) -> Result<ProposalBundle, Self::Error> {
        if self.check {
            check_proposals(current_context, &proposals)?;
        }
        Ok(proposals)
    }

    fn commit_options(
        &self,
        roster: &Roster,
        context: &GroupContext,
        proposals: &ProposalBundle,
    ) -> Result<CommitOptions, Self::Error> {
        infallible(self.options.commit_options(roster, context, proposals))
    }

    fn encryption_options(
        &self,
        roster: &Roster,
        context: &GroupContext,
    ) -> Result<EncryptionOptions, Self::Error> {
        infallible(self.options.encryption_options(roster, context))
    }
}

fn infallible<T>(r: Result<T, Infallible>) -> Result<T, RulesError> {
    match r {
        Ok(v) => Ok(v),
        Err(never) => match never {},
    }
}
