//! Client -> relay requests as domain types.
//!
//! [`ClientRequest`] is one `ClientFrame`: a request id and a [`Request`]. Its
//! `TryFrom<v1::ClientFrame>` does every check that needs nothing but the frame
//! (ids, fixed lengths, counts), so a relay's services receive only well-formed
//! requests; the checks that need state (signatures, accounts, quotas) stay with the
//! services. A refused frame becomes a [`RequestError`] that keeps the request id.
//!
//! # Keeping a relay's answers
//! Each malformed field gets the code a relay has always answered it with (see
//! [`RequestError`]). A relay checked some things before the fields, and keeps
//! today's answers by checking them first when a request is refused here:
//! - `register` and `auth` on a connection that is already authenticated:
//!   `BAD_REQUEST` ("already authenticated"); `register` over the per-address rate:
//!   `RATE_LIMITED`.
//! - `send`, `publish_keys`, `fetch_keys`, `set_delivery_token`, `delete_account` on
//!   a connection that is not authenticated: `UNAUTHORIZED` ([`RequestKind::needs_authentication`]).
//!   A `fetch_keys` with a delivery token needs no authentication, but a malformed
//!   one is still answered so there: the relay cannot see the token of a refused frame.
//!   Not `ack`: an oversized ack is `TOO_LARGE` on any connection.
//! - A media upload on a connection that is not authenticated: `UNAUTHORIZED`
//!   before its blob id is looked at.
//!
//! Fields are checked in the order a relay read them, so when several are wrong, the
//! first is reported. A request with a signature of the right length that does not
//! verify and, later, a malformed field is refused here for the field, where a relay
//! that verified first answered `UNAUTHORIZED`.

use bytes::Bytes;

use crate::code::ErrorCode;
use crate::device_list::SignedDeviceList;
use crate::discovery::{tags_from_bytes, tags_to_bytes, BlindedBatch, Tag};
use crate::error::{array, bad_id, Malformed, Problem};
use crate::groups::{self, GroupCommit, GroupHandle, MultiSend};
use crate::ids::{AccountId, DeviceAddress, DeviceId, MessageId};
use crate::keys::KeyUpload;
use crate::limits::{
    BLOB_ID_LEN, EPOCH_TOKEN_LEN, MAX_ACK_SEQS, PUBLIC_KEY_LEN, READER_SECRET_LEN, SIGNATURE_LEN,
    SLOT_ID_LEN, TOKEN_HASH_LEN,
};
use crate::media::BlobId;
use crate::push::PushTarget;
use crate::v1::{self, client_frame::Body};
use crate::verification::{Code, VerificationId, E164, VERIFICATION_ID_LEN};

mod devices;
mod error;
#[cfg(test)]
mod tests;

pub use error::RequestError;

/// An envelope to queue: the sender's message id and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per message; the recipient drops duplicates by it.
    pub message_id: MessageId,
    /// Ciphertext, never interpreted by the relay.
    pub payload: Bytes,
}

/// One request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    /// Chosen by the client; the reply carries it back.
    pub id: u64,
    /// What is asked.
    pub request: Request,
}

/// Every request a client can make, one variant per `ClientFrame` body. See
/// `proto/proto/tern.proto` for what each does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Creates an account with its first device and authenticates the connection.
    Register {
        /// Ed25519 identity key of the account.
        identity_key: [u8; PUBLIC_KEY_LEN],
        /// Ed25519 key of the first device.
        device_key: [u8; PUBLIC_KEY_LEN],
        /// The identity's signature over `auth::device_certificate(None, device_key)`.
        device_signature: [u8; SIGNATURE_LEN],
        /// The device's signature over `auth::session_proof` of this connection.
        session_proof: [u8; SIGNATURE_LEN],
    },
    /// Adds a device to an account, vouched for by its identity key.
    AddDevice {
        /// The account.
        account: AccountId,
        /// Ed25519 key of the new device.
        device_key: [u8; PUBLIC_KEY_LEN],
        /// The identity's signature over `auth::device_certificate(Some(account), ..)`.
        device_signature: [u8; SIGNATURE_LEN],
    },
    /// Authenticates the connection as a device.
    Auth {
        /// The device.
        address: DeviceAddress,
        /// The device's signature over `auth::session_proof` of this connection.
        signature: [u8; SIGNATURE_LEN],
    },
    /// Queues envelopes for one device (authenticated connections).
    Send {
        /// The recipient.
        to: DeviceAddress,
        /// What to queue, all or nothing.
        envelopes: Vec<Envelope>,
        /// The recipient's device-list version the sender encrypted for; a relay
        /// holding a newer one refuses with [`ErrorCode::StaleDeviceList`]. 0: not
        /// checked.
        device_list_version: u64,
    },
    /// Deletes delivered messages from the authenticated device's mailbox.
    Ack {
        /// Sequence numbers, at most [`MAX_ACK_SEQS`].
        seqs: Vec<u64>,
    },
    /// A round trip.
    Ping,
    /// Publishes the authenticated device's keys.
    PublishKeys(KeyUpload),
    /// Fetches prekey bundles of an account's devices.
    FetchKeys {
        /// The account.
        account: AccountId,
        /// One device, or `None` (0 on the wire) for all of them.
        device: Option<DeviceId>,
        /// The account's delivery token (any length; the relay hashes it): with one,
        /// any connection may fetch, without one only an authenticated device. An
        /// empty token on the wire is `None`.
        delivery_token: Option<Bytes>,
    },
    /// Asks for a sender certificate of the authenticated device.
    SenderCertificate,
    /// Sets the SHA-256 of the account's delivery token.
    SetDeliveryToken {
        /// SHA-256 of the token.
        token_hash: [u8; TOKEN_HASH_LEN],
    },
    /// Queues envelopes from an unidentified sender who shows a delivery token.
    SealedSend {
        /// The recipient.
        to: DeviceAddress,
        /// The recipient account's delivery token (any length; the relay hashes it).
        delivery_token: Bytes,
        /// What to queue, all or nothing.
        envelopes: Vec<Envelope>,
        /// As in [`Request::Send`].
        device_list_version: u64,
    },
    /// Asks for the relay's signing key.
    RelayInfo,
    /// Whether the relay has a blob.
    BlobStatus {
        /// The blob.
        blob_id: BlobId,
    },
    /// A forward: the blob lives another full term.
    TouchBlob {
        /// The blob.
        blob_id: BlobId,
    },
    /// An account's device ids, for a holder of its delivery token.
    ListDevices {
        /// The account.
        account: AccountId,
        /// Its delivery token (any length; the relay hashes it).
        delivery_token: Bytes,
    },
    /// Deletes the authenticated device's account.
    DeleteAccount {
        /// The identity key's signature over [`crate::auth::account_deletion`].
        signature: [u8; SIGNATURE_LEN],
    },
    /// Evaluates blinded OPRF points (authenticated, verified accounts).
    DiscoveryEvaluate {
        /// The points, length-checked.
        blinded: BlindedBatch,
    },
    /// Looks up tags of filter hits (authenticated, verified accounts).
    DiscoveryLookup {
        /// 1..=256 tags.
        tags: Vec<Tag>,
    },
    /// A part of the published filter (any connection).
    DiscoveryFilter {
        /// 0 for the latest snapshot; else the last day the client has.
        since_day: u32,
        /// The artefact's day while its parts download; 0 for the latest.
        day: u32,
        /// Which part, from 0.
        part: u32,
    },
    /// Whether the account's verified number can be found.
    SetDiscoverable(bool),
    /// Starts verifying a phone number for the authenticated account.
    StartVerification {
        /// The number, checked against the E.164 pattern.
        number: E164,
    },
    /// Answers a verification session with its code.
    CheckVerification {
        /// The session, from [`crate::Reply::VerificationStarted`].
        session: VerificationId,
        /// Six digits.
        code: Code,
        /// Whether the number's tag is discoverable once attached; `None` leaves
        /// it to the relay's `discovery.default_discoverable`.
        discoverable: Option<bool>,
    },
    /// Opens a provisioning slot for a new device (any connection).
    OpenProvisioning {
        /// Chosen by the new device.
        slot: SlotId,
        /// SHA-256 of the reader secret that may take the payload.
        reader_hash: [u8; READER_SECRET_LEN],
    },
    /// Fills a slot, once (an authenticated device, for a device of its account).
    DepositProvisioning {
        /// The slot.
        slot: SlotId,
        /// The device the payload is for.
        device: DeviceId,
        /// HPKE-sealed, [`crate::limits::MIN_LINK_PAYLOAD`] to
        /// [`crate::limits::MAX_LINK_PAYLOAD`] bytes.
        payload: Bytes,
    },
    /// Takes a slot's payload (any connection).
    TakeProvisioning {
        /// The slot.
        slot: SlotId,
        /// The secret whose SHA-256 the slot was opened with.
        reader_secret: [u8; READER_SECRET_LEN],
    },
    /// Publishes a new device list of the authenticated account.
    PublishDeviceList(SignedDeviceList),
    /// Removes a device of the authenticated account.
    RemoveDevice {
        /// Not device 1.
        device: DeviceId,
        /// The list without it, signed by the identity; `None` when a linked device
        /// removes itself.
        list: Option<SignedDeviceList>,
    },
    /// Stores MLS key packages of the authenticated device.
    PublishKeyPackages {
        /// One-time packages, each handed out once; at most
        /// [`crate::limits::MAX_KEY_PACKAGES_PER_PUBLISH`].
        key_packages: Vec<Bytes>,
        /// The package handed out when none are left; `None` keeps the current one.
        last_resort: Option<Bytes>,
        /// Drop the device's stored one-time packages first.
        replace: bool,
    },
    /// Takes one key package of each device of an account (any connection).
    FetchKeyPackages {
        /// The account.
        account: AccountId,
        /// One device, or `None` (0 on the wire) for all of them.
        device: Option<DeviceId>,
        /// The account's delivery token (any length; the relay hashes it).
        delivery_token: Bytes,
    },
    /// Registers a group handle at epoch 0 (any connection).
    CreateGroup {
        /// The handle.
        handle: GroupHandle,
        /// SHA-256 of epoch 0's token.
        token_hash: [u8; EPOCH_TOKEN_LEN],
    },
    /// Moves a group to its next epoch and delivers the commit (any connection).
    GroupCommit(GroupCommit),
    /// One message to many devices, stored once (any connection).
    MultiSend(MultiSend),
    /// Where the authenticated device's wake-ups go (replaces an earlier target).
    SetPushTarget(PushTarget),
    /// Forgets the authenticated device's push target.
    ClearPushTarget,
}

/// A provisioning slot's id: 16 random bytes chosen by the new device.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotId(pub [u8; SLOT_ID_LEN]);

impl std::fmt::Debug for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Who holds a slot id may deposit into it: keep it out of debug output.
        f.write_str("SlotId(..)")
    }
}

/// Which request, without its content: for logs, metrics and error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RequestKind {
    /// [`Request::Register`].
    Register,
    /// [`Request::AddDevice`].
    AddDevice,
    /// [`Request::Auth`].
    Auth,
    /// [`Request::Send`].
    Send,
    /// [`Request::Ack`].
    Ack,
    /// [`Request::Ping`].
    Ping,
    /// [`Request::PublishKeys`].
    PublishKeys,
    /// [`Request::FetchKeys`].
    FetchKeys,
    /// [`Request::SenderCertificate`].
    SenderCertificate,
    /// [`Request::SetDeliveryToken`].
    SetDeliveryToken,
    /// [`Request::SealedSend`].
    SealedSend,
    /// [`Request::RelayInfo`].
    RelayInfo,
    /// [`Request::BlobStatus`].
    BlobStatus,
    /// [`Request::TouchBlob`].
    TouchBlob,
    /// [`Request::ListDevices`].
    ListDevices,
    /// [`Request::DeleteAccount`].
    DeleteAccount,
    /// [`Request::DiscoveryEvaluate`].
    DiscoveryEvaluate,
    /// [`Request::DiscoveryLookup`].
    DiscoveryLookup,
    /// [`Request::DiscoveryFilter`].
    DiscoveryFilter,
    /// [`Request::SetDiscoverable`].
    SetDiscoverable,
    /// [`Request::StartVerification`].
    StartVerification,
    /// [`Request::CheckVerification`].
    CheckVerification,
    /// [`Request::OpenProvisioning`].
    OpenProvisioning,
    /// [`Request::DepositProvisioning`].
    DepositProvisioning,
    /// [`Request::TakeProvisioning`].
    TakeProvisioning,
    /// [`Request::PublishDeviceList`].
    PublishDeviceList,
    /// [`Request::RemoveDevice`].
    RemoveDevice,
    /// [`Request::PublishKeyPackages`].
    PublishKeyPackages,
    /// [`Request::FetchKeyPackages`].
    FetchKeyPackages,
    /// [`Request::CreateGroup`].
    CreateGroup,
    /// [`Request::GroupCommit`].
    GroupCommit,
    /// [`Request::MultiSend`].
    MultiSend,
    /// [`Request::SetPushTarget`].
    SetPushTarget,
    /// [`Request::ClearPushTarget`].
    ClearPushTarget,
}

impl RequestKind {
    /// The `ClientFrame` field name (`register`, `add_device`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Register => "register",
            RequestKind::AddDevice => "add_device",
            RequestKind::Auth => "auth",
            RequestKind::Send => "send",
            RequestKind::Ack => "ack",
            RequestKind::Ping => "ping",
            RequestKind::PublishKeys => "publish_keys",
            RequestKind::FetchKeys => "fetch_keys",
            RequestKind::SenderCertificate => "sender_certificate",
            RequestKind::SetDeliveryToken => "set_delivery_token",
            RequestKind::SealedSend => "sealed_send",
            RequestKind::RelayInfo => "relay_info",
            RequestKind::BlobStatus => "blob_status",
            RequestKind::TouchBlob => "touch_blob",
            RequestKind::ListDevices => "list_devices",
            RequestKind::DeleteAccount => "delete_account",
            RequestKind::DiscoveryEvaluate => "discovery_evaluate",
            RequestKind::DiscoveryLookup => "discovery_lookup",
            RequestKind::DiscoveryFilter => "discovery_filter",
            RequestKind::SetDiscoverable => "set_discoverable",
            RequestKind::StartVerification => "start_verification",
            RequestKind::CheckVerification => "check_verification",
            RequestKind::OpenProvisioning => "open_provisioning",
            RequestKind::DepositProvisioning => "deposit_provisioning",
            RequestKind::TakeProvisioning => "take_provisioning",
            RequestKind::PublishDeviceList => "publish_device_list",
            RequestKind::RemoveDevice => "remove_device",
            RequestKind::PublishKeyPackages => "publish_key_packages",
            RequestKind::FetchKeyPackages => "fetch_key_packages",
            RequestKind::CreateGroup => "create_group",
            RequestKind::GroupCommit => "group_commit",
            RequestKind::MultiSend => "multi_send",
            RequestKind::SetPushTarget => "set_push_target",
            RequestKind::ClearPushTarget => "clear_push_target",
        }
    }

    /// Whether the request needs a connection authenticated as a device
    /// (`add_device`, `send`, `ack`, `publish_keys`, `fetch_keys` without a delivery
    /// token, `sender_certificate`, `set_delivery_token`, `delete_account`,
    /// `discovery_evaluate`, `discovery_lookup`, `set_discoverable`,
    /// `start_verification`, `check_verification`, `deposit_provisioning`,
    /// `publish_device_list`, `remove_device`, `publish_key_packages`,
    /// `set_push_target`, `clear_push_target`; `add_device`
    /// as a device of the same account). `discovery_filter`, `open_provisioning`,
    /// `take_provisioning`, `fetch_key_packages`, `create_group`, `group_commit` and
    /// `multi_send` are anonymous. Note for a relay keeping today's answers: for all but
    /// `ack` it has answered `UNAUTHORIZED` on an unauthenticated connection before
    /// looking at the fields, while an oversized ack is `TOO_LARGE` either way.
    pub fn needs_authentication(self) -> bool {
        matches!(
            self,
            RequestKind::AddDevice
                | RequestKind::Send
                | RequestKind::Ack
                | RequestKind::PublishKeys
                | RequestKind::FetchKeys
                | RequestKind::SenderCertificate
                | RequestKind::SetDeliveryToken
                | RequestKind::DeleteAccount
                | RequestKind::DiscoveryEvaluate
                | RequestKind::DiscoveryLookup
                | RequestKind::SetDiscoverable
                | RequestKind::StartVerification
                | RequestKind::CheckVerification
                | RequestKind::DepositProvisioning
                | RequestKind::PublishDeviceList
                | RequestKind::RemoveDevice
                | RequestKind::PublishKeyPackages
                | RequestKind::SetPushTarget
                | RequestKind::ClearPushTarget
        )
    }
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    /// Which request this is.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Register { .. } => RequestKind::Register,
            Request::AddDevice { .. } => RequestKind::AddDevice,
            Request::Auth { .. } => RequestKind::Auth,
            Request::Send { .. } => RequestKind::Send,
            Request::Ack { .. } => RequestKind::Ack,
            Request::Ping => RequestKind::Ping,
            Request::PublishKeys(_) => RequestKind::PublishKeys,
            Request::FetchKeys { .. } => RequestKind::FetchKeys,
            Request::SenderCertificate => RequestKind::SenderCertificate,
            Request::SetDeliveryToken { .. } => RequestKind::SetDeliveryToken,
            Request::SealedSend { .. } => RequestKind::SealedSend,
            Request::RelayInfo => RequestKind::RelayInfo,
            Request::BlobStatus { .. } => RequestKind::BlobStatus,
            Request::TouchBlob { .. } => RequestKind::TouchBlob,
            Request::ListDevices { .. } => RequestKind::ListDevices,
            Request::DeleteAccount { .. } => RequestKind::DeleteAccount,
            Request::DiscoveryEvaluate { .. } => RequestKind::DiscoveryEvaluate,
            Request::DiscoveryLookup { .. } => RequestKind::DiscoveryLookup,
            Request::DiscoveryFilter { .. } => RequestKind::DiscoveryFilter,
            Request::SetDiscoverable(_) => RequestKind::SetDiscoverable,
            Request::StartVerification { .. } => RequestKind::StartVerification,
            Request::CheckVerification { .. } => RequestKind::CheckVerification,
            Request::OpenProvisioning { .. } => RequestKind::OpenProvisioning,
            Request::DepositProvisioning { .. } => RequestKind::DepositProvisioning,
            Request::TakeProvisioning { .. } => RequestKind::TakeProvisioning,
            Request::PublishDeviceList(_) => RequestKind::PublishDeviceList,
            Request::RemoveDevice { .. } => RequestKind::RemoveDevice,
            Request::PublishKeyPackages { .. } => RequestKind::PublishKeyPackages,
            Request::FetchKeyPackages { .. } => RequestKind::FetchKeyPackages,
            Request::CreateGroup { .. } => RequestKind::CreateGroup,
            Request::GroupCommit(_) => RequestKind::GroupCommit,
            Request::MultiSend(_) => RequestKind::MultiSend,
            Request::SetPushTarget(_) => RequestKind::SetPushTarget,
            Request::ClearPushTarget => RequestKind::ClearPushTarget,
        }
    }
}

fn body_kind(body: &Body) -> RequestKind {
    match body {
        Body::Register(_) => RequestKind::Register,
        Body::AddDevice(_) => RequestKind::AddDevice,
        Body::Auth(_) => RequestKind::Auth,
        Body::Send(_) => RequestKind::Send,
        Body::Ack(_) => RequestKind::Ack,
        Body::Ping(_) => RequestKind::Ping,
        Body::PublishKeys(_) => RequestKind::PublishKeys,
        Body::FetchKeys(_) => RequestKind::FetchKeys,
        Body::SenderCertificate(_) => RequestKind::SenderCertificate,
        Body::SetDeliveryToken(_) => RequestKind::SetDeliveryToken,
        Body::SealedSend(_) => RequestKind::SealedSend,
        Body::RelayInfo(_) => RequestKind::RelayInfo,
        Body::BlobStatus(_) => RequestKind::BlobStatus,
        Body::TouchBlob(_) => RequestKind::TouchBlob,
        Body::ListDevices(_) => RequestKind::ListDevices,
        Body::DeleteAccount(_) => RequestKind::DeleteAccount,
        Body::DiscoveryEvaluate(_) => RequestKind::DiscoveryEvaluate,
        Body::DiscoveryLookup(_) => RequestKind::DiscoveryLookup,
        Body::DiscoveryFilter(_) => RequestKind::DiscoveryFilter,
        Body::SetDiscoverable(_) => RequestKind::SetDiscoverable,
        Body::StartVerification(_) => RequestKind::StartVerification,
        Body::CheckVerification(_) => RequestKind::CheckVerification,
        Body::OpenProvisioning(_) => RequestKind::OpenProvisioning,
        Body::DepositProvisioning(_) => RequestKind::DepositProvisioning,
        Body::TakeProvisioning(_) => RequestKind::TakeProvisioning,
        Body::PublishDeviceList(_) => RequestKind::PublishDeviceList,
        Body::RemoveDevice(_) => RequestKind::RemoveDevice,
        Body::PublishKeyPackages(_) => RequestKind::PublishKeyPackages,
        Body::FetchKeyPackages(_) => RequestKind::FetchKeyPackages,
        Body::CreateGroup(_) => RequestKind::CreateGroup,
        Body::GroupCommit(_) => RequestKind::GroupCommit,
        Body::MultiSend(_) => RequestKind::MultiSend,
        Body::SetPushTarget(_) => RequestKind::SetPushTarget,
        Body::ClearPushTarget(_) => RequestKind::ClearPushTarget,
    }
}

const BAD: ErrorCode = ErrorCode::BadRequest;
const UNAUTHORIZED: ErrorCode = ErrorCode::Unauthorized;

fn address(
    account: &[u8],
    device: u32,
    account_field: &'static str,
    device_field: &'static str,
) -> Result<DeviceAddress, Malformed> {
    Ok(DeviceAddress {
        account: AccountId::try_from(account).map_err(bad_id(account_field))?,
        device: DeviceId::try_from(device).map_err(bad_id(device_field))?,
    })
}

fn envelopes(wire: Vec<v1::Envelope>, field: &'static str) -> Result<Vec<Envelope>, Malformed> {
    wire.into_iter()
        .map(|e| {
            Ok(Envelope {
                message_id: MessageId::try_from(&e.message_id[..]).map_err(bad_id(field))?,
                payload: e.payload,
            })
        })
        .collect()
}

fn blob_id(bytes: &[u8], field: &'static str) -> Result<BlobId, Malformed> {
    array::<BLOB_ID_LEN>(bytes, field, "a blob id", BAD)
}

impl TryFrom<Body> for Request {
    type Error = Malformed;

    /// Checks one body. Fields are checked in the order a relay has always looked at
    /// them, so the first malformed field is the one it reported.
    fn try_from(body: Body) -> Result<Self, Malformed> {
        Ok(match body {
            Body::Register(r) => Request::Register {
                identity_key: array(
                    &r.identity_key,
                    "register.identity_key",
                    "an identity key",
                    UNAUTHORIZED,
                )?,
                device_key: array(
                    &r.device_key,
                    "register.device_key",
                    "a device key",
                    UNAUTHORIZED,
                )?,
                device_signature: array(
                    &r.device_signature,
                    "register.device_signature",
                    "a signature",
                    UNAUTHORIZED,
                )?,
                session_proof: array(
                    &r.session_proof,
                    "register.session_proof",
                    "a signature",
                    UNAUTHORIZED,
                )?,
            },
            Body::AddDevice(r) => Request::AddDevice {
                account: AccountId::try_from(&r.account_id[..])
                    .map_err(bad_id("add_device.account_id"))?,
                device_key: array(
                    &r.device_key,
                    "add_device.device_key",
                    "a device key",
                    UNAUTHORIZED,
                )?,
                device_signature: array(
                    &r.device_signature,
                    "add_device.device_signature",
                    "a signature",
                    UNAUTHORIZED,
                )?,
            },
            Body::Auth(r) => Request::Auth {
                address: address(
                    &r.account_id,
                    r.device_id,
                    "auth.account_id",
                    "auth.device_id",
                )?,
                signature: array(&r.signature, "auth.signature", "a signature", UNAUTHORIZED)?,
            },
            Body::Send(r) => Request::Send {
                to: address(
                    &r.recipient_account,
                    r.recipient_device,
                    "send.recipient_account",
                    "send.recipient_device",
                )?,
                envelopes: envelopes(r.envelopes, "send.envelopes.message_id")?,
                device_list_version: r.device_list_version,
            },
            Body::Ack(r) => {
                if r.seqs.len() > MAX_ACK_SEQS {
                    return Err(Malformed::new(
                        "ack.seqs",
                        Problem::TooMany {
                            what: "ack",
                            got: r.seqs.len(),
                            max: MAX_ACK_SEQS,
                        },
                        ErrorCode::TooLarge,
                    ));
                }
                Request::Ack { seqs: r.seqs }
            }
            Body::Ping(v1::PingRequest {}) => Request::Ping,
            Body::PublishKeys(r) => Request::PublishKeys(KeyUpload::try_from(&r)?),
            Body::FetchKeys(r) => Request::FetchKeys {
                account: AccountId::try_from(&r.account_id[..])
                    .map_err(bad_id("fetch_keys.account_id"))?,
                device: DeviceId::new(r.device_id),
                delivery_token: (!r.delivery_token.is_empty()).then_some(r.delivery_token),
            },
            Body::SenderCertificate(v1::SenderCertificateRequest {}) => Request::SenderCertificate,
            Body::SetDeliveryToken(r) => Request::SetDeliveryToken {
                token_hash: array(
                    &r.token_hash,
                    "set_delivery_token.token_hash",
                    "a delivery token hash",
                    BAD,
                )?,
            },
            Body::SealedSend(r) => Request::SealedSend {
                to: address(
                    &r.recipient_account,
                    r.recipient_device,
                    "sealed_send.recipient_account",
                    "sealed_send.recipient_device",
                )?,
                envelopes: envelopes(r.envelopes, "sealed_send.envelopes.message_id")?,
                delivery_token: r.delivery_token,
                device_list_version: r.device_list_version,
            },
            Body::RelayInfo(v1::RelayInfoRequest {}) => Request::RelayInfo,
            Body::BlobStatus(r) => Request::BlobStatus {
                blob_id: blob_id(&r.blob_id, "blob_status.blob_id")?,
            },
            Body::TouchBlob(r) => Request::TouchBlob {
                blob_id: blob_id(&r.blob_id, "touch_blob.blob_id")?,
            },
            Body::ListDevices(r) => Request::ListDevices {
                account: AccountId::try_from(&r.account_id[..])
                    .map_err(bad_id("list_devices.account_id"))?,
                delivery_token: r.delivery_token,
            },
            Body::DeleteAccount(r) => Request::DeleteAccount {
                signature: array(
                    &r.signature,
                    "delete_account.signature",
                    "a signature",
                    UNAUTHORIZED,
                )?,
            },
            Body::DiscoveryEvaluate(r) => Request::DiscoveryEvaluate {
                blinded: BlindedBatch::new(r.blinded)?,
            },
            Body::DiscoveryLookup(r) => Request::DiscoveryLookup {
                tags: tags_from_bytes(&r.tags, "discovery_lookup.tags")?,
            },
            Body::DiscoveryFilter(r) => Request::DiscoveryFilter {
                since_day: r.since_day,
                day: r.day,
                part: r.part,
            },
            Body::SetDiscoverable(r) => Request::SetDiscoverable(r.discoverable),
            Body::StartVerification(r) => {
                // The wire string is dropped here; wipe it so only the E164 keeps the number.
                let number = zeroize::Zeroizing::new(r.number);
                Request::StartVerification {
                    number: E164::parse(&number)?,
                }
            }
            Body::CheckVerification(r) => Request::CheckVerification {
                session: VerificationId(array::<VERIFICATION_ID_LEN>(
                    &r.session_id,
                    "check_verification.session_id",
                    "a verification session id",
                    BAD,
                )?),
                code: Code::parse(&r.code)?,
                discoverable: r.discoverable,
            },
            Body::OpenProvisioning(r) => devices::open(r)?,
            Body::DepositProvisioning(r) => devices::deposit(r)?,
            Body::TakeProvisioning(r) => devices::take(r)?,
            Body::PublishDeviceList(r) => devices::publish(r)?,
            Body::RemoveDevice(r) => devices::remove(r)?,
            Body::PublishKeyPackages(r) => Request::PublishKeyPackages {
                key_packages: groups::key_packages(
                    r.key_packages,
                    "publish_key_packages.key_packages",
                )?,
                last_resort: if r.last_resort.is_empty() {
                    None
                } else {
                    Some(groups::key_package(
                        r.last_resort,
                        "publish_key_packages.last_resort",
                    )?)
                },
                replace: r.replace,
            },
            Body::FetchKeyPackages(r) => Request::FetchKeyPackages {
                account: AccountId::try_from(&r.account_id[..])
                    .map_err(bad_id("fetch_key_packages.account_id"))?,
                device: DeviceId::new(r.device_id),
                delivery_token: r.delivery_token,
            },
            Body::CreateGroup(r) => Request::CreateGroup {
                handle: groups::handle(&r.handle, "create_group.handle")?,
                token_hash: groups::token(&r.token_hash, "create_group.token_hash")?,
            },
            Body::GroupCommit(r) => Request::GroupCommit(GroupCommit::try_from(r)?),
            Body::MultiSend(r) => Request::MultiSend(MultiSend::try_from(r)?),
            Body::SetPushTarget(r) => Request::SetPushTarget(PushTarget::try_from(r)?),
            Body::ClearPushTarget(_) => Request::ClearPushTarget,
        })
    }
}

impl TryFrom<v1::ClientFrame> for ClientRequest {
    type Error = RequestError;

    fn try_from(frame: v1::ClientFrame) -> Result<Self, RequestError> {
        let id = frame.request_id;
        let Some(body) = frame.body else {
            let empty = Malformed::new("client_frame.body", Problem::Missing("empty request"), BAD);
            return Err(RequestError::new(id, None, empty));
        };
        let kind = body_kind(&body);
        let request = Request::try_from(body).map_err(|e| RequestError::new(id, Some(kind), e))?;
        Ok(ClientRequest { id, request })
    }
}

fn copy(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

fn wire_envelopes(envelopes: Vec<Envelope>) -> Vec<v1::Envelope> {
    envelopes
        .into_iter()
        .map(|e| v1::Envelope {
            message_id: copy(e.message_id.as_bytes()),
            payload: e.payload,
        })
        .collect()
}

impl From<Request> for Body {
    fn from(request: Request) -> Self {
        match request {
            Request::Register {
                identity_key,
                device_key,
                device_signature,
                session_proof,
            } => Body::Register(v1::RegisterRequest {
                identity_key: copy(&identity_key),
                device_key: copy(&device_key),
                device_signature: copy(&device_signature),
                session_proof: copy(&session_proof),
            }),
            Request::AddDevice {
                account,
                device_key,
                device_signature,
            } => Body::AddDevice(v1::AddDeviceRequest {
                account_id: copy(account.as_bytes()),
                device_key: copy(&device_key),
                device_signature: copy(&device_signature),
            }),
            Request::Auth { address, signature } => Body::Auth(v1::AuthRequest {
                account_id: copy(address.account.as_bytes()),
                device_id: address.device.get(),
                signature: copy(&signature),
            }),
            Request::Send {
                to,
                envelopes,
                device_list_version,
            } => Body::Send(v1::SendRequest {
                recipient_account: copy(to.account.as_bytes()),
                recipient_device: to.device.get(),
                envelopes: wire_envelopes(envelopes),
                device_list_version,
            }),
            Request::Ack { seqs } => Body::Ack(v1::AckRequest { seqs }),
            Request::Ping => Body::Ping(v1::PingRequest {}),
            Request::PublishKeys(upload) => Body::PublishKeys((&upload).into()),
            Request::FetchKeys {
                account,
                device,
                delivery_token,
            } => Body::FetchKeys(v1::FetchKeysRequest {
                account_id: copy(account.as_bytes()),
                device_id: device.map_or(0, DeviceId::get),
                delivery_token: delivery_token.unwrap_or_default(),
            }),
            Request::SenderCertificate => Body::SenderCertificate(v1::SenderCertificateRequest {}),
            Request::SetDeliveryToken { token_hash } => {
                Body::SetDeliveryToken(v1::SetDeliveryTokenRequest {
                    token_hash: copy(&token_hash),
                })
            }
            Request::SealedSend {
                to,
                delivery_token,
                envelopes,
                device_list_version,
            } => Body::SealedSend(v1::SealedSendRequest {
                recipient_account: copy(to.account.as_bytes()),
                recipient_device: to.device.get(),
                delivery_token,
                envelopes: wire_envelopes(envelopes),
                device_list_version,
            }),
            Request::RelayInfo => Body::RelayInfo(v1::RelayInfoRequest {}),
            Request::BlobStatus { blob_id } => Body::BlobStatus(v1::BlobStatusRequest {
                blob_id: copy(&blob_id),
            }),
            Request::TouchBlob { blob_id } => Body::TouchBlob(v1::TouchBlobRequest {
                blob_id: copy(&blob_id),
            }),
            Request::ListDevices {
                account,
                delivery_token,
            } => Body::ListDevices(v1::ListDevicesRequest {
                account_id: copy(account.as_bytes()),
                delivery_token,
            }),
            Request::DeleteAccount { signature } => Body::DeleteAccount(v1::DeleteAccountRequest {
                signature: copy(&signature),
            }),
            Request::DiscoveryEvaluate { blinded } => {
                Body::DiscoveryEvaluate(v1::DiscoveryEvaluateRequest {
                    blinded: blinded.into_bytes(),
                })
            }
            Request::DiscoveryLookup { tags } => {
                Body::DiscoveryLookup(v1::DiscoveryLookupRequest {
                    tags: tags_to_bytes(&tags),
                })
            }
            Request::DiscoveryFilter {
                since_day,
                day,
                part,
            } => Body::DiscoveryFilter(v1::DiscoveryFilterRequest {
                since_day,
                day,
                part,
            }),
            Request::SetDiscoverable(discoverable) => {
                Body::SetDiscoverable(v1::SetDiscoverableRequest { discoverable })
            }
            Request::StartVerification { number } => {
                Body::StartVerification(v1::StartVerificationRequest {
                    number: number.as_str().to_owned(),
                })
            }
            Request::CheckVerification {
                session,
                code,
                discoverable,
            } => Body::CheckVerification(v1::CheckVerificationRequest {
                session_id: copy(&session.0),
                code: code.as_str().to_owned(),
                discoverable,
            }),
            Request::OpenProvisioning { slot, reader_hash } => {
                Body::OpenProvisioning(v1::OpenProvisioningRequest {
                    slot_id: copy(&slot.0),
                    reader_hash: copy(&reader_hash),
                })
            }
            Request::DepositProvisioning {
                slot,
                device,
                payload,
            } => Body::DepositProvisioning(v1::DepositProvisioningRequest {
                slot_id: copy(&slot.0),
                device_id: device.get(),
                payload,
            }),
            Request::TakeProvisioning {
                slot,
                reader_secret,
            } => Body::TakeProvisioning(v1::TakeProvisioningRequest {
                slot_id: copy(&slot.0),
                reader_secret: copy(&reader_secret),
            }),
            Request::PublishDeviceList(list) => {
                let (device_list, signature) = list.into_wire();
                Body::PublishDeviceList(v1::PublishDeviceListRequest {
                    device_list,
                    signature,
                })
            }
            Request::RemoveDevice { device, list } => {
                let (device_list, signature) =
                    list.map_or_else(Default::default, SignedDeviceList::into_wire);
                Body::RemoveDevice(v1::RemoveDeviceRequest {
                    device_id: device.get(),
                    device_list,
                    signature,
                })
            }
            Request::PublishKeyPackages {
                key_packages,
                last_resort,
                replace,
            } => Body::PublishKeyPackages(v1::PublishKeyPackagesRequest {
                key_packages,
                last_resort: last_resort.unwrap_or_default(),
                replace,
            }),
            Request::FetchKeyPackages {
                account,
                device,
                delivery_token,
            } => Body::FetchKeyPackages(v1::FetchKeyPackagesRequest {
                account_id: copy(account.as_bytes()),
                device_id: device.map_or(0, DeviceId::get),
                delivery_token,
            }),
            Request::CreateGroup { handle, token_hash } => {
                Body::CreateGroup(v1::CreateGroupRequest {
                    handle: copy(&handle.0),
                    token_hash: copy(&token_hash),
                })
            }
            Request::GroupCommit(commit) => Body::GroupCommit(commit.into()),
            Request::MultiSend(send) => Body::MultiSend(send.into()),
            Request::SetPushTarget(target) => Body::SetPushTarget(target.into()),
            Request::ClearPushTarget => Body::ClearPushTarget(v1::ClearPushTargetRequest {}),
        }
    }
}

impl From<ClientRequest> for v1::ClientFrame {
    fn from(r: ClientRequest) -> Self {
        v1::ClientFrame {
            request_id: r.id,
            body: Some(r.request.into()),
        }
    }
}
