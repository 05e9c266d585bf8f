//! Groups on the wire: key packages, group handles and commits, and the
//! multi-recipient send (one body stored once for many devices).
//!
//! The relay is an MLS delivery service: it never parses a key package, a commit
//! or a welcome. It orders commits per group handle (one per epoch) and stores a
//! multi-recipient message's body once. The checks here are the ones that need
//! nothing but the frame: lengths, counts, duplicates.

use std::collections::HashSet;

use bytes::Bytes;

use crate::code::ErrorCode;
use crate::error::{array, bad_id, Malformed, Problem};
use crate::ids::{AccountId, DeviceId, MessageId};
use crate::limits::{
    COMMIT_ID_LEN, DEFAULT_MAX_ENVELOPE, EPOCH_TOKEN_LEN, GROUP_HANDLE_LEN, MAX_COMMIT_SENDS,
    MAX_KEY_PACKAGE, MAX_KEY_PACKAGES_PER_PUBLISH, MAX_RECIPIENT_DEVICES,
};
use crate::v1;

const BAD: ErrorCode = ErrorCode::BadRequest;

/// A group's handle at the relay: 16 random bytes chosen by its creator, linked to
/// no account.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupHandle(pub [u8; GROUP_HANDLE_LEN]);

impl std::fmt::Debug for GroupHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A handle ties messages to one group: keep it out of debug output.
        f.write_str("GroupHandle(..)")
    }
}

/// A commit's id, chosen by the committer: a retry of the same commit is not stored
/// twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommitId(pub [u8; COMMIT_ID_LEN]);

/// One message to many devices, uploaded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiSend {
    /// The sender's message id; every recipient sees the same one.
    pub message_id: MessageId,
    /// Stored once; never interpreted by the relay.
    pub body: Bytes,
    /// Each account once, with its devices.
    pub recipients: Vec<RecipientAccount>,
}

/// The devices of one recipient account in a [`MultiSend`].
#[derive(Clone, PartialEq, Eq)]
pub struct RecipientAccount {
    /// The account.
    pub account: AccountId,
    /// Its delivery token (any length; the relay hashes it).
    pub delivery_token: Bytes,
    /// As `Request::Send`'s: 0 is unchecked.
    pub device_list_version: u64,
    /// At least one, each once.
    pub devices: Vec<DeviceId>,
    /// Empty, or one per device in the same order: what only that device gets.
    pub parts: Vec<Bytes>,
}

impl std::fmt::Debug for RecipientAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecipientAccount")
            .field("account", &self.account)
            .field("delivery_token", &"..")
            .field("device_list_version", &self.device_list_version)
            .field("devices", &self.devices)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl RecipientAccount {
    /// The part for the `i`th device (empty when the send has no parts).
    pub fn part(&self, i: usize) -> Bytes {
        self.parts.get(i).cloned().unwrap_or_default()
    }
}

impl MultiSend {
    /// How many devices the send is addressed to.
    pub fn device_count(&self) -> usize {
        self.recipients.iter().map(|r| r.devices.len()).sum()
    }
}

/// A commit moving a group from `epoch` to `epoch + 1`, with what it delivers.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupCommit {
    /// The group.
    pub handle: GroupHandle,
    /// The epoch the commit was made in.
    pub epoch: u64,
    /// That epoch's token (its SHA-256 is what the relay holds).
    pub epoch_token: [u8; EPOCH_TOKEN_LEN],
    /// SHA-256 of the next epoch's token.
    pub next_token_hash: [u8; EPOCH_TOKEN_LEN],
    /// The commit's id.
    pub commit_id: CommitId,
    /// One or two sends: the commit to the members, then the welcome to new devices.
    pub sends: Vec<MultiSend>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("epoch", &self.epoch)
            .field("sends", &self.sends)
            .finish_non_exhaustive()
    }
}

/// What a relay did with a [`MultiSend`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MultiSendResult {
    /// Devices whose entry is stored.
    pub accepted: u32,
    /// The devices (or whole accounts) that were refused, and why.
    pub refused: Vec<Refused>,
}

/// One refusal in a [`MultiSendResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Index into [`MultiSend::recipients`].
    pub recipient: u32,
    /// The device, or `None` for every device of that account.
    pub device: Option<DeviceId>,
    /// Why (`UNAUTHORIZED`, `UNKNOWN_RECIPIENT`, `STALE_DEVICE_LIST`, `MAILBOX_FULL`, ...).
    pub code: ErrorCode,
}

/// A key package handed out by a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedKeyPackage {
    /// Whose.
    pub device: DeviceId,
    /// The MLS KeyPackage message, as the device published it.
    pub key_package: Bytes,
    /// The device's last-resort package (its pool was empty, or fetched too often).
    pub last_resort: bool,
}

fn too_many(field: &'static str, what: &'static str, got: usize, max: usize) -> Malformed {
    Malformed::new(
        field,
        Problem::TooMany { what, got, max },
        ErrorCode::TooLarge,
    )
}

/// A key package's bytes, or the [`Malformed`] for `field`.
pub(crate) fn key_package(bytes: Bytes, field: &'static str) -> Result<Bytes, Malformed> {
    if bytes.is_empty() {
        return Err(Malformed::new(
            field,
            Problem::Missing("an empty key package"),
            BAD,
        ));
    }
    if bytes.len() > MAX_KEY_PACKAGE {
        return Err(too_many(
            field,
            "key package bytes",
            bytes.len(),
            MAX_KEY_PACKAGE,
        ));
    }
    Ok(bytes)
}

/// The key packages of a publish request, checked.
pub(crate) fn key_packages(
    packages: Vec<Bytes>,
    field: &'static str,
) -> Result<Vec<Bytes>, Malformed> {
    if packages.len() > MAX_KEY_PACKAGES_PER_PUBLISH {
        return Err(too_many(
            field,
            "key packages",
            packages.len(),
            MAX_KEY_PACKAGES_PER_PUBLISH,
        ));
    }
    packages
        .into_iter()
        .map(|p| key_package(p, field))
        .collect()
}

/// A group handle, or the [`Malformed`] for `field`.
pub(crate) fn handle(bytes: &[u8], field: &'static str) -> Result<GroupHandle, Malformed> {
    array(bytes, field, "a group handle", BAD).map(GroupHandle)
}

/// An epoch token or its hash, or the [`Malformed`] for `field`.
pub(crate) fn token(bytes: &[u8], field: &'static str) -> Result<[u8; EPOCH_TOKEN_LEN], Malformed> {
    array(bytes, field, "an epoch token or its hash", BAD)
}

impl TryFrom<v1::MultiSendRequest> for MultiSend {
    type Error = Malformed;

    fn try_from(r: v1::MultiSendRequest) -> Result<Self, Malformed> {
        let message_id =
            MessageId::try_from(&r.message_id[..]).map_err(bad_id("multi_send.message_id"))?;
        if r.body.is_empty() {
            let problem = Problem::Missing("an empty body");
            return Err(Malformed::new("multi_send.body", problem, BAD));
        }
        if r.body.len() > DEFAULT_MAX_ENVELOPE {
            let n = r.body.len();
            return Err(too_many(
                "multi_send.body",
                "body bytes",
                n,
                DEFAULT_MAX_ENVELOPE,
            ));
        }
        if r.recipients.is_empty() {
            let problem = Problem::Missing("no recipients");
            return Err(Malformed::new("multi_send.recipients", problem, BAD));
        }
        let devices: usize = r.recipients.iter().map(|a| a.devices.len()).sum();
        if devices > MAX_RECIPIENT_DEVICES {
            let field = "multi_send.recipients.devices";
            return Err(too_many(
                field,
                "recipient devices",
                devices,
                MAX_RECIPIENT_DEVICES,
            ));
        }
        let mut accounts = HashSet::with_capacity(r.recipients.len());
        let recipients = r
            .recipients
            .into_iter()
            .map(|a| {
                let account = recipient(a)?;
                if !accounts.insert(account.account) {
                    let field = "multi_send.recipients.account_id";
                    return Err(Malformed::new(field, Problem::Duplicate("an account"), BAD));
                }
                Ok(account)
            })
            .collect::<Result<_, _>>()?;
        Ok(MultiSend {
            message_id,
            body: r.body,
            recipients,
        })
    }
}

fn recipient(a: v1::RecipientAccount) -> Result<RecipientAccount, Malformed> {
    let account = AccountId::try_from(&a.account_id[..])
        .map_err(bad_id("multi_send.recipients.account_id"))?;
    if a.devices.is_empty() {
        let problem = Problem::Missing("an account without devices");
        return Err(Malformed::new(
            "multi_send.recipients.devices",
            problem,
            BAD,
        ));
    }
    let mut seen = HashSet::with_capacity(a.devices.len());
    let devices = a
        .devices
        .iter()
        .map(|&d| {
            let device = DeviceId::try_from(d).map_err(bad_id("multi_send.recipients.devices"))?;
            if !seen.insert(device) {
                let field = "multi_send.recipients.devices";
                return Err(Malformed::new(field, Problem::Duplicate("a device"), BAD));
            }
            Ok(device)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !a.parts.is_empty() && a.parts.len() != devices.len() {
        let problem = Problem::Count {
            what: "parts (one per device, or none)",
            expected: devices.len(),
            got: a.parts.len(),
        };
        return Err(Malformed::new("multi_send.recipients.parts", problem, BAD));
    }
    if let Some(part) = a.parts.iter().find(|p| p.len() > DEFAULT_MAX_ENVELOPE) {
        let field = "multi_send.recipients.parts";
        return Err(too_many(
            field,
            "part bytes",
            part.len(),
            DEFAULT_MAX_ENVELOPE,
        ));
    }
    Ok(RecipientAccount {
        account,
        delivery_token: a.delivery_token,
        device_list_version: a.device_list_version,
        devices,
        parts: a.parts,
    })
}

impl From<MultiSend> for v1::MultiSendRequest {
    fn from(m: MultiSend) -> Self {
        v1::MultiSendRequest {
            message_id: Bytes::copy_from_slice(m.message_id.as_bytes()),
            body: m.body,
            recipients: m
                .recipients
                .into_iter()
                .map(|a| v1::RecipientAccount {
                    account_id: Bytes::copy_from_slice(a.account.as_bytes()),
                    delivery_token: a.delivery_token,
                    device_list_version: a.device_list_version,
                    devices: a.devices.iter().map(|d| d.get()).collect(),
                    parts: a.parts,
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::GroupCommitRequest> for GroupCommit {
    type Error = Malformed;

    fn try_from(r: v1::GroupCommitRequest) -> Result<Self, Malformed> {
        let handle = handle(&r.handle, "group_commit.handle")?;
        let epoch_token = token(&r.epoch_token, "group_commit.epoch_token")?;
        let next_token_hash = token(&r.next_token_hash, "group_commit.next_token_hash")?;
        let commit_id = CommitId(array(
            &r.commit_id,
            "group_commit.commit_id",
            "a commit id",
            BAD,
        )?);
        if r.sends.is_empty() {
            let problem = Problem::Missing("a commit without sends");
            return Err(Malformed::new("group_commit.sends", problem, BAD));
        }
        if r.sends.len() > MAX_COMMIT_SENDS {
            let n = r.sends.len();
            return Err(too_many("group_commit.sends", "sends", n, MAX_COMMIT_SENDS));
        }
        let sends = r
            .sends
            .into_iter()
            .map(MultiSend::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let devices: usize = sends.iter().map(MultiSend::device_count).sum();
        if devices > MAX_RECIPIENT_DEVICES {
            let field = "group_commit.sends";
            return Err(too_many(
                field,
                "recipient devices",
                devices,
                MAX_RECIPIENT_DEVICES,
            ));
        }
        Ok(GroupCommit {
            handle,
            epoch: r.epoch,
            epoch_token,
            next_token_hash,
            commit_id,
            sends,
        })
    }
}

impl From<GroupCommit> for v1::GroupCommitRequest {
    fn from(c: GroupCommit) -> Self {
        v1::GroupCommitRequest {
            handle: Bytes::copy_from_slice(&c.handle.0),
            epoch: c.epoch,
            epoch_token: Bytes::copy_from_slice(&c.epoch_token),
            next_token_hash: Bytes::copy_from_slice(&c.next_token_hash),
            commit_id: Bytes::copy_from_slice(&c.commit_id.0),
            sends: c.sends.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<MultiSendResult> for v1::MultiSendResponse {
    fn from(r: MultiSendResult) -> Self {
        v1::MultiSendResponse {
            accepted: r.accepted,
            refused: r
                .refused
                .into_iter()
                .map(|x| v1::Refusal {
                    recipient: x.recipient,
                    device_id: x.device.map_or(0, DeviceId::get),
                    code: x.code.to_wire(),
                })
                .collect(),
        }
    }
}

impl From<v1::MultiSendResponse> for MultiSendResult {
    fn from(r: v1::MultiSendResponse) -> Self {
        MultiSendResult {
            accepted: r.accepted,
            refused: r
                .refused
                .into_iter()
                .map(|x| Refused {
                    recipient: x.recipient,
                    device: DeviceId::new(x.device_id),
                    code: ErrorCode::from_wire(x.code),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::KeyPackage> for FetchedKeyPackage {
    type Error = Malformed;

    fn try_from(k: v1::KeyPackage) -> Result<Self, Malformed> {
        Ok(FetchedKeyPackage {
            device: DeviceId::try_from(k.device_id)
                .map_err(bad_id("fetch_key_packages.key_packages.device_id"))?,
            key_package: key_package(k.key_package, "fetch_key_packages.key_packages")?,
            last_resort: k.last_resort,
        })
    }
}

impl From<FetchedKeyPackage> for v1::KeyPackage {
    fn from(k: FetchedKeyPackage) -> Self {
        v1::KeyPackage {
            device_id: k.device.get(),
            key_package: k.key_package,
            last_resort: k.last_resort,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
