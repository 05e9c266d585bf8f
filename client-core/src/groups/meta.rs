//! A group's metadata (handle, name, description, picture), carried end-to-end
//! encrypted as the GroupContext extension `0xF002 TernGroupMeta`: every member
//! agrees on it per epoch, a change is a commit, a new member gets it in the
//! welcome.

use mls_rs::extension::ExtensionType;
use mls_rs::Extension;
use prost::Message;
use tern_proto::e2e::{self, AttachmentPointer};

use super::GroupError;

/// The GroupContext extension holding [`GroupMeta`].
pub const META_EXTENSION: u16 = 0xF002;
/// The welcome's GroupInfo extension holding the members' delivery tokens (an
/// encoded `MemberTokens`, opaque here).
pub const MEMBER_TOKENS_EXTENSION: u16 = 0xF003;
/// The longest group name, in bytes.
pub const MAX_NAME: usize = 128;
/// The longest description, in bytes.
pub const MAX_DESCRIPTION: usize = 512;

/// What members know of a group besides its roster.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct GroupMeta {
    /// The relay's opaque handle for the group (its epoch counter).
    pub handle: [u8; 16],
    /// The name (≤ [`MAX_NAME`] bytes).
    pub name: String,
    /// The description (≤ [`MAX_DESCRIPTION`] bytes).
    pub description: String,
    /// The picture, an uploaded attachment.
    pub picture: Option<AttachmentPointer>,
}

impl std::fmt::Debug for GroupMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and handles stay out of logs.
        f.debug_struct("GroupMeta").finish_non_exhaustive()
    }
}

impl GroupMeta {
    /// Checks the lengths.
    pub fn check(&self) -> Result<(), GroupError> {
        if self.name.len() > MAX_NAME || self.description.len() > MAX_DESCRIPTION {
            return Err(GroupError::MetaTooLong);
        }
        Ok(())
    }

    /// The encoded metadata.
    pub fn encode(&self) -> Vec<u8> {
        e2e::GroupMeta {
            handle: bytes::Bytes::copy_from_slice(&self.handle),
            name: self.name.clone(),
            description: self.description.clone(),
            picture: self.picture.clone(),
        }
        .encode_to_vec()
    }

    /// Parses encoded metadata.
    pub fn decode(bytes: &[u8]) -> Result<Self, GroupError> {
        let w = e2e::GroupMeta::decode(bytes).map_err(|_| GroupError::BadMeta)?;
        let meta = GroupMeta {
            handle: w.handle[..].try_into().map_err(|_| GroupError::BadMeta)?,
            name: w.name,
            description: w.description,
            picture: w.picture,
        };
        meta.check().map_err(|_| GroupError::BadMeta)?;
        Ok(meta)
    }

    pub(crate) fn extension(&self) -> Extension {
        Extension::new(ExtensionType::new(META_EXTENSION), self.encode())
    }

    pub(crate) fn from_extensions(list: &mls_rs::ExtensionList) -> Result<Self, GroupError> {
        let ext = list
            .get(ExtensionType::new(META_EXTENSION))
            .ok_or(GroupError::BadMeta)?;
        Self::decode(ext.extension_data())
    }
}
