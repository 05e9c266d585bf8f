//! The group and broadcast calls of [`Client`]: each stores what it asks for on
//! this device and returns; the worker does the rest (see `groups.rs`).

use rand::rngs::OsRng;
use tern_proto::{AccountId, MessageId};

use super::group_meta::MetaEdit;
use super::groups::{GroupId, GroupInfo};
use super::Client;
#[cfg(doc)]
use super::{Event, GroupChange};
use crate::media::AttachmentPointer;
#[cfg(doc)]
use crate::Error;
use crate::Result;

impl Client {
    /// Sends `body` (and attachments) to every account in `contacts` as one upload:
    /// the body is encrypted once, and each recipient device gets a small 1:1
    /// envelope with its key, so every recipient sees an ordinary [`Event::Message`]
    /// from this account (a broadcast list, kept by the app). Returns once stored on
    /// this device, with the message's id (one for all recipients); an
    /// [`Event::Sent`] follows per recipient once the relay has it. A contact whose
    /// delivery token this device lacks gets the message as an ordinary 1:1 message.
    /// [`Error::NoRecipients`] if `contacts` names no other account.
    pub async fn send_broadcast(
        &self,
        contacts: &[AccountId],
        body: &[u8],
        attachments: &[AttachmentPointer],
    ) -> Result<MessageId> {
        let now = self.shared.now_ms();
        let id = self.shared.state.lock().await.enqueue_broadcast(
            contacts,
            body,
            attachments,
            now,
            &mut OsRng,
        )?;
        self.shared.outbox.notify_one();
        Ok(id)
    }

    /// Creates a group named `name` with this account's devices and `contacts`
    /// (each a contact whose card this device has: [`Error::NotAContact`]
    /// otherwise). Returns once the group is stored on this device; the worker
    /// registers it with the relay and adds the members (each of their devices
    /// gets an [`Event::GroupJoined`]); [`Event::GroupChanged`] follows here.
    pub async fn create_group(&self, name: &str, contacts: &[AccountId]) -> Result<GroupId> {
        let now = self.shared.now_ms();
        let id = self
            .shared
            .state
            .lock()
            .await
            .create_group(name, contacts, now, &mut OsRng)?;
        self.shared.outbox.notify_one();
        Ok(id)
    }

    /// Queues the addition of `contacts` (every device of each) to `group`.
    pub async fn add_members(&self, group: &GroupId, contacts: &[AccountId]) -> Result<()> {
        self.shared
            .state
            .lock()
            .await
            .add_group_members(group, contacts)?;
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// Queues the removal of `member` (every device) from `group`; it is told, and
    /// reads nothing sent to the group from then on.
    pub async fn remove_member(&self, group: &GroupId, member: &AccountId) -> Result<()> {
        self.shared
            .state
            .lock()
            .await
            .remove_group_member(group, member)?;
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// Leaves `group`: the members are told (and commit the removal); this
    /// device's state of the group is deleted once the request is out
    /// ([`GroupChange::Left`]).
    pub async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let now = self.shared.now_ms();
        self.shared
            .state
            .lock()
            .await
            .leave_group(group, now, &mut OsRng)?;
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// Queues `body` for every other device in `group`, encrypted once: returns
    /// once stored on this device. The members get an [`Event::GroupMessage`].
    pub async fn send_group(
        &self,
        group: &GroupId,
        body: &[u8],
        attachments: &[AttachmentPointer],
    ) -> Result<MessageId> {
        let now = self.shared.now_ms();
        let content = tern_proto::e2e::GroupContent {
            body: body.to_vec().into(),
            attachments: attachments.iter().map(AttachmentPointer::to_wire).collect(),
            sent_at_ms: now,
            control: None,
        };
        let id = self
            .shared
            .state
            .lock()
            .await
            .enqueue_group(group, content, now, &mut OsRng)?;
        self.shared.outbox.notify_one();
        Ok(id)
    }

    /// Renames `group` (≤ 128 bytes, [`Error::TooLarge`] otherwise): committed like
    /// a membership change, end-to-end encrypted; every member's devices get
    /// [`GroupChange::Renamed`].
    pub async fn rename_group(&self, group: &GroupId, name: &str) -> Result<()> {
        self.edit_group_meta(group, MetaEdit::Name(name.to_string()))
            .await
    }

    /// Sets `group`'s description (≤ 512 bytes), as [`Client::rename_group`] does
    /// its name.
    pub async fn set_group_description(&self, group: &GroupId, description: &str) -> Result<()> {
        self.edit_group_meta(group, MetaEdit::Description(description.to_string()))
            .await
    }

    /// Sets (or with `None` clears) `group`'s picture: an attachment uploaded with
    /// [`Client::upload_attachment`]; members fetch it from the pointer in
    /// [`GroupInfo::picture`].
    pub async fn set_group_picture(
        &self,
        group: &GroupId,
        picture: Option<&AttachmentPointer>,
    ) -> Result<()> {
        self.edit_group_meta(group, MetaEdit::Picture(picture.cloned()))
            .await
    }

    async fn edit_group_meta(&self, group: &GroupId, edit: MetaEdit) -> Result<()> {
        self.shared
            .state
            .lock()
            .await
            .edit_group_meta(group, edit)?;
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// This device's groups.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>> {
        self.shared.state.lock().await.group_list()
    }
}
