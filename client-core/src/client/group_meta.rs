//! Group metadata edits (name, description, picture): each is an `OP_META` op
//! carrying only the fields it sets, merged at plan time onto the epoch's
//! metadata, so edits queued together or committed concurrently by different
//! members all stand.

use super::group_records::{GroupOpRecord, OP_META};
use super::groups::GroupId;
use super::state::State;
use crate::groups::meta::{MAX_DESCRIPTION, MAX_NAME};
use crate::groups::GroupMeta;
use crate::media::AttachmentPointer;
use crate::{Error, Result};

/// One change of a group's metadata, as an op carries it.
#[derive(Debug, Clone)]
pub(crate) enum MetaEdit {
    Name(String),
    Description(String),
    Picture(Option<AttachmentPointer>),
}

/// The bits of `GroupOpRecord::meta_fields`.
pub(crate) const META_NAME: u32 = 1;
pub(crate) const META_DESCRIPTION: u32 = 2;
pub(crate) const META_PICTURE: u32 = 4;

impl MetaEdit {
    fn apply(self, meta: &mut GroupMeta) -> u32 {
        match self {
            MetaEdit::Name(n) => {
                meta.name = n;
                META_NAME
            }
            MetaEdit::Description(d) => {
                meta.description = d;
                META_DESCRIPTION
            }
            MetaEdit::Picture(p) => {
                meta.picture = p.as_ref().map(AttachmentPointer::to_wire);
                META_PICTURE
            }
        }
    }
}

/// `current` with the fields `fields` names taken from `op` (all of them when
/// `fields` is 0): concurrent edits of different fields both stand.
pub(crate) fn merge_meta(current: &GroupMeta, op: &GroupMeta, fields: u32) -> GroupMeta {
    if fields == 0 {
        return op.clone();
    }
    let mut out = current.clone();
    if fields & META_NAME != 0 {
        out.name = op.name.clone();
    }
    if fields & META_DESCRIPTION != 0 {
        out.description = op.description.clone();
    }
    if fields & META_PICTURE != 0 {
        out.picture = op.picture.clone();
    }
    out
}

impl State {
    /// Queues a metadata change of `group` (committed like a membership op; every
    /// member gets `GroupChange::Renamed`).
    pub(crate) fn edit_group_meta(&mut self, group: &GroupId, edit: MetaEdit) -> Result<()> {
        if self.groups.get(&group.0[..]).is_some_and(|r| r.leaving) {
            return Err(Error::LeavingGroup);
        }
        let too_long = match &edit {
            MetaEdit::Name(n) => (n.len() > MAX_NAME).then_some(MAX_NAME),
            MetaEdit::Description(d) => (d.len() > MAX_DESCRIPTION).then_some(MAX_DESCRIPTION),
            MetaEdit::Picture(_) => None,
        };
        if let Some(max) = too_long {
            return Err(Error::TooLarge { max });
        }
        let mut meta = self.session_mut(&group.0)?.meta().map_err(Error::group)?;
        let fields = edit.apply(&mut meta);
        let op = GroupOpRecord {
            kind: OP_META,
            meta: meta.encode(),
            meta_fields: fields,
            user: true,
            ..GroupOpRecord::default()
        };
        self.queue_group_op(group, op)
    }
}

/// Every field bit, for an op whose `meta_fields` is 0 (all).
const META_ALL: u32 = META_NAME | META_DESCRIPTION | META_PICTURE;

/// An `OP_META` kept over a re-add of this device: the edit was made against
/// `stale` (the group as this device last saw it); a field another member
/// changed since (`now` differs from `stale`) keeps its newer value, so a rename
/// queued weeks ago does not undo a later one. `None` when no field is left.
pub(crate) fn rebase_meta_op(
    op: &GroupOpRecord,
    stale: &GroupMeta,
    now: &GroupMeta,
) -> Option<GroupOpRecord> {
    let mut fields = if op.meta_fields == 0 {
        META_ALL
    } else {
        op.meta_fields
    };
    if stale.name != now.name {
        fields &= !META_NAME;
    }
    if stale.description != now.description {
        fields &= !META_DESCRIPTION;
    }
    if stale.picture != now.picture {
        fields &= !META_PICTURE;
    }
    (fields != 0).then(|| GroupOpRecord {
        meta_fields: fields,
        ..op.clone()
    })
}
