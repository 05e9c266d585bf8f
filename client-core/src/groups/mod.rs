//! Groups on MLS (RFC 9420), the pure part: no network, no clock, no async.
//!
//! Ciphersuite `MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519` through mls-rs
//! (every mls-rs type stays behind this module). Each device is a leaf whose MLS
//! signature key is its Ed25519 device key, bound to the account identity by the
//! credential in [`identity`]. The state lives in the device's encrypted
//! [`KvStore`](crate::store::KvStore); every operation that changes it returns its
//! writes as [`Staged::ops`], which the caller applies in the same atomic batch as
//! the operation's effect ([`storage`]). On an error nothing is staged and the
//! session is reloaded from the store, so its state is as before the call.
//!
//! - [`GroupDevice`]: this device's MLS client: key packages, create, join, load,
//!   route an incoming envelope to its group.
//! - [`GroupSession`]: one group: commit (add, remove, update, set metadata), apply
//!   or clear the pending commit, the relay's epoch token, encrypt, process.
//! - [`wrap`]: the group envelope that hides group id, epoch and content type.
//! - [`meta`]: the group's name, description and picture as a GroupContext extension.
//! - [`rules`]: which proposals a commit may carry (the metadata and the handle are
//!   checked on every commit, received or made).

mod device;
pub mod identity;
pub mod meta;
pub mod rules;
mod session;
pub mod storage;
mod tree;
pub mod wrap;

#[cfg(test)]
mod tests;

use tern_proto::{AccountId, DeviceId};

use crate::store::{Op, StoreError};

pub use self::device::GroupDevice;
pub use self::identity::{CredentialError, DeviceCredential, TernIdentity};
pub use self::meta::GroupMeta;
pub use self::rules::{RulesError, TernRules};
pub use self::session::GroupSession;
pub use self::storage::StagedMlsStore;
pub use self::tree::TREE_KEY_EXTENSION;
pub use self::wrap::{envelope_tag, WrapKey};

/// The length of an MLS group id (random).
pub const GROUP_ID_LEN: usize = 32;
/// The length of a relay group handle.
pub const HANDLE_LEN: usize = 16;
/// How long a key package is valid.
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 90 * 24 * 3600;
/// Exporter label of the epoch token the relay checks on a commit.
const EPOCH_TOKEN_LABEL: &[u8] = b"tern epoch token";

/// A result with the store writes it needs: apply `ops` in the batch that stores
/// the result's effect, before the next call on the same device or group.
#[derive(Debug)]
#[must_use = "the staged writes must be applied"]
pub struct Staged<T> {
    /// The result.
    pub value: T,
    /// The writes to apply atomically with the result's effect.
    pub ops: Vec<Op>,
}

/// A leaf of a group: one device of one account.
#[derive(Clone, PartialEq, Eq)]
pub struct Member {
    /// The account.
    pub account: AccountId,
    /// The device.
    pub device: DeviceId,
    /// The account's identity key, as the leaf's certificate names it: the caller
    /// checks it against the key pinned for the account.
    pub identity_key: [u8; 32],
    /// The device's Ed25519 key (the leaf's MLS signature key).
    pub device_key: [u8; 32],
    /// The leaf index.
    pub(crate) index: u32,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("device", &self.device)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Member {
    pub(crate) fn from_mls(m: &mls_rs::group::Member) -> Result<Self, GroupError> {
        let c = DeviceCredential::of(&m.signing_identity)?;
        Ok(Member {
            account: c.account,
            device: c.device,
            identity_key: c.identity_key,
            device_key: m
                .signing_identity
                .signature_key
                .as_bytes()
                .try_into()
                .map_err(|_| GroupError::Credential(CredentialError::BadCertificate))?,
            index: m.index,
        })
    }
}

/// Membership changes to commit, as one commit.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Key packages of devices to add (fetched from the relay, verified by the
    /// caller with [`GroupDevice::verify_key_package`]).
    pub add: Vec<Vec<u8>>,
    /// Accounts to remove, every device of each.
    pub remove_accounts: Vec<AccountId>,
    /// Single devices to remove.
    pub remove_devices: Vec<(AccountId, DeviceId)>,
    /// New metadata (its handle must stay the group's).
    pub meta: Option<GroupMeta>,
    /// An encoded `MemberTokens` for the welcome's GroupInfo (new members can send
    /// at once).
    pub member_tokens: Option<Vec<u8>>,
}

/// The welcome for the devices a commit adds.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// The MLS welcome message.
    pub welcome: Vec<u8>,
    /// The ratchet tree, encrypted under the key only the welcome's GroupInfo
    /// carries (`tree.rs`), sent with it out of band: inline
    /// (`GroupWelcome.ratchet_tree`), or as an attachment when that would make the
    /// body too large for one envelope (`GroupWelcome.ratchet_tree_pointer`).
    pub ratchet_tree: Vec<u8>,
    /// SHA-256 of `ratchet_tree`: its blob id as an attachment.
    pub tree_blob_id: [u8; 32],
    /// Who it is for.
    pub to: Vec<Member>,
}

impl Welcome {
    /// The shared body for the new devices with the (encrypted) tree inline:
    /// `0x03 ‖ GroupWelcome`.
    pub fn body(&self) -> Vec<u8> {
        self.encode(self.ratchet_tree.clone(), None)
    }

    /// The shared body with the tree as an attachment (uploaded before the welcome
    /// leaves): its pointer names only the blob, no key.
    pub fn body_with_tree_pointer(&self) -> Vec<u8> {
        let pointer = tern_proto::e2e::AttachmentPointer {
            blob_id: self.tree_blob_id.to_vec().into(),
            sealed_size: self.ratchet_tree.len() as u64,
            ..Default::default()
        };
        self.encode(Vec::new(), Some(pointer))
    }

    /// The length of [`Welcome::body`], without building it.
    pub fn inline_len(&self) -> usize {
        let w = tern_proto::e2e::GroupWelcome {
            welcome: Vec::new().into(),
            ratchet_tree: Vec::new().into(),
            ratchet_tree_pointer: None,
        };
        // Two length-delimited fields: tag, length prefix, bytes.
        let field = |n: usize| 1 + prost::encoding::encoded_len_varint(n as u64) + n;
        1 + prost::Message::encoded_len(&w)
            + field(self.welcome.len())
            + field(self.ratchet_tree.len())
    }

    fn encode(
        &self,
        ratchet_tree: Vec<u8>,
        pointer: Option<tern_proto::e2e::AttachmentPointer>,
    ) -> Vec<u8> {
        let w = tern_proto::e2e::GroupWelcome {
            welcome: self.welcome.clone().into(),
            ratchet_tree: ratchet_tree.into(),
            ratchet_tree_pointer: pointer,
        };
        let mut out = vec![WELCOME_KIND];
        out.extend(prost::Message::encode_to_vec(&w));
        out
    }
}

/// A welcome's tree attachment: the blob and its size (its key is in the
/// welcome's GroupInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreePointer {
    /// SHA-256 of the ciphertext.
    pub blob_id: [u8; 32],
    /// The ciphertext's length.
    pub sealed_size: u64,
}

/// Where a received welcome's (encrypted) ratchet tree is.
#[derive(Debug, Clone)]
pub enum WelcomeTree {
    /// In the welcome.
    Inline(Vec<u8>),
    /// In an attachment, to download (and check against the pointer) first.
    Pointer(TreePointer),
}

/// A welcome body (`0x03 ‖ GroupWelcome` without its first byte) taken apart: the
/// MLS welcome and where its tree is. A body with both or neither is malformed;
/// a pointer with anything but its blob id and size (a key, which belongs in
/// the GroupInfo; an exact size, a digest, a name) is [`GroupError::BadTreePointer`].
pub fn parse_welcome(body: &[u8]) -> Result<(Vec<u8>, WelcomeTree), GroupError> {
    let w = <tern_proto::e2e::GroupWelcome as prost::Message>::decode(body)
        .map_err(|_| GroupError::Malformed)?;
    let tree = match (w.ratchet_tree.is_empty(), w.ratchet_tree_pointer) {
        (false, None) => WelcomeTree::Inline(w.ratchet_tree.to_vec()),
        (true, Some(p)) => {
            let bare = p.key.is_empty()
                && p.size == 0
                && p.content_type.is_empty()
                && p.file_name.is_empty()
                && p.digest.is_empty();
            if !bare {
                return Err(GroupError::BadTreePointer);
            }
            WelcomeTree::Pointer(TreePointer {
                blob_id: p.blob_id[..]
                    .try_into()
                    .map_err(|_| GroupError::BadTreePointer)?,
                sealed_size: p.sealed_size,
            })
        }
        _ => return Err(GroupError::Malformed),
    };
    Ok((w.welcome.to_vec(), tree))
}

/// The first byte of a shared body that is a welcome.
pub const WELCOME_KIND: u8 = 0x03;

/// A commit built and pending: send it with `GroupCommit`, then
/// [`GroupSession::apply_pending`] on OK or [`GroupSession::clear_pending`] on
/// `STALE_EPOCH`.
#[derive(Debug, Clone)]
pub struct PlannedCommit {
    /// The epoch the commit is made in (the relay's current one).
    pub epoch: u64,
    /// This epoch's token, for the relay.
    pub epoch_token: [u8; 32],
    /// SHA-256 of the next epoch's token.
    pub next_token_hash: [u8; 32],
    /// The commit in a group envelope, for the members of this epoch.
    pub commit: Vec<u8>,
    /// The welcome, when devices are added.
    pub welcome: Option<Welcome>,
    /// The leaves it adds (present ones are left out).
    pub added: Vec<Member>,
    /// The leaves it removes (absent ones are left out).
    pub removed: Vec<Member>,
    /// Whether it changes the metadata.
    pub meta_changed: bool,
}

/// What a commit changed.
#[derive(Debug, Clone)]
pub struct CommitApplied {
    /// Who committed.
    pub committer: Member,
    /// The new epoch.
    pub epoch: u64,
    /// Leaves added.
    pub added: Vec<Member>,
    /// Leaves removed.
    pub removed: Vec<Member>,
    /// Every leaf new in this epoch, a re-added device's fresh leaf included
    /// (which `added` and `removed` leave out).
    pub new_leaves: Vec<Member>,
    /// The new metadata, when it changed.
    pub meta: Option<GroupMeta>,
    /// Whether this device was removed: the caller deletes the group
    /// ([`GroupDevice::forget`]).
    pub removed_self: bool,
}

/// An incoming group envelope, processed.
#[derive(Debug, Clone)]
pub enum Processed {
    /// An application message.
    Message {
        /// Who sent it.
        sender: Member,
        /// The content (an encoded `GroupContent`).
        content: Vec<u8>,
    },
    /// A commit of another member, applied.
    Commit(Box<CommitApplied>),
}

/// A group joined from a welcome.
#[derive(Debug)]
pub struct Joined {
    /// The group.
    pub session: GroupSession,
    /// Who added this device.
    pub added_by: Member,
    /// The group's metadata.
    pub meta: GroupMeta,
    /// The adder's `MemberTokens`, if it sent them.
    pub member_tokens: Option<Vec<u8>>,
}

/// Why a group operation failed. The group's state is as before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// Not a well-formed envelope or MLS message (truncated, bad encoding).
    #[error("group message malformed")]
    Malformed,
    /// No live epoch of the group has the envelope's tag.
    #[error("group envelope tag unknown")]
    UnknownTag,
    /// The envelope did not decrypt under its epoch's key.
    #[error("group envelope failed to decrypt")]
    BadEnvelope,
    /// A leaf's credential was refused.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// MLS refused the message or the operation.
    #[error("MLS refused: {0}")]
    Rejected(String),
    /// A message this device sent itself.
    #[error("a group message from this device")]
    FromSelf,
    /// No stored state for the group.
    #[error("unknown group")]
    UnknownGroup,
    /// A commit is pending: apply or clear it first.
    #[error("a commit is pending")]
    PendingCommit,
    /// No commit is pending.
    #[error("no commit is pending")]
    NoPendingCommit,
    /// The sender is no longer in the roster.
    #[error("unknown sender")]
    UnknownSender,
    /// Metadata longer than its limits.
    #[error("group name or description too long")]
    MetaTooLong,
    /// The group's metadata is missing or malformed.
    #[error("group metadata malformed")]
    BadMeta,
    /// The metadata names another handle.
    #[error("the group handle cannot change")]
    HandleChanged,
    /// A commit with a proposal of a type Tern does not use.
    #[error("a proposal of a type Tern does not use")]
    ForbiddenProposal,
    /// A welcome for a group whose id is not [`GROUP_ID_LEN`] bytes.
    #[error("a group id of the wrong length")]
    BadGroupId,
    /// A key package is not for this ciphersuite, or not a key package.
    #[error("key package refused")]
    BadKeyPackage,
    /// A welcome whose ratchet tree is an attachment: fetch it, then
    /// [`GroupDevice::join`] with it.
    #[error("the welcome's ratchet tree is an attachment")]
    TreeNotInline,
    /// A welcome's tree pointer with fields other than its blob id (32 bytes)
    /// and sealed size.
    #[error("a ratchet tree pointer with fields other than its blob id and size")]
    BadTreePointer,
    /// A welcome whose GroupInfo carries no ratchet tree key.
    #[error("a welcome without its ratchet tree's key")]
    NoTreeKey,
    /// A welcome's ratchet tree that does not open under its key.
    #[error("a welcome's ratchet tree that does not open")]
    BadTree,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<mls_rs::error::MlsError> for GroupError {
    fn from(e: mls_rs::error::MlsError) -> Self {
        use mls_rs::error::MlsError as E;
        match e {
            E::IdentityProviderError(a) => {
                match a.inner_dyn_error().downcast_ref::<CredentialError>() {
                    Some(c) => GroupError::Credential(*c),
                    None => GroupError::Rejected(a.to_string()),
                }
            }
            E::GroupStorageError(a) | E::KeyPackageRepoError(a) => {
                match a.inner_dyn_error().downcast_ref::<StoreError>() {
                    Some(StoreError::Corrupt) => GroupError::Store(StoreError::Corrupt),
                    _ => GroupError::Store(StoreError::Backend(a.to_string())),
                }
            }
            E::MlsRulesError(a) => match a.inner_dyn_error().downcast_ref::<RulesError>() {
                Some(RulesError::BadMeta) => GroupError::BadMeta,
                Some(RulesError::HandleChanged) => GroupError::HandleChanged,
                Some(RulesError::Forbidden) => GroupError::ForbiddenProposal,
                None => GroupError::Rejected(a.to_string()),
            },
            E::SerializationError(_) => GroupError::Malformed,
            E::CantProcessMessageFromSelf => GroupError::FromSelf,
            E::ExistingPendingCommit | E::CommitRequired => GroupError::PendingCommit,
            E::PendingCommitNotFound => GroupError::NoPendingCommit,
            E::GroupNotFound => GroupError::UnknownGroup,
            other => GroupError::Rejected(other.to_string()),
        }
    }
}

impl From<mls_rs::mls_rs_codec::Error> for GroupError {
    fn from(_: mls_rs::mls_rs_codec::Error) -> Self {
        GroupError::Malformed
    }
}
