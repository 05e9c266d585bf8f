//! Relay -> client messages as domain types: [`ServerMessage`] (a response, a
//! delivery, the end of the queue), [`Reply`] (a successful response) and
//! [`ErrorReply`] (a refusal).
//!
//! `TryFrom<v1::ServerFrame>` checks what a relay sends (ids, key lengths in
//! bundles, signature lengths). A response whose reply is malformed fails only its
//! own request: [`ServerFrameError::request_id`] says which.

use bytes::Bytes;

use crate::address::Fingerprint;
use crate::certificate::IssuedCertificate;
use crate::code::ErrorCode;
use crate::device_list::SignedDeviceList;
use crate::discovery::{DiscoveredAccount, FilterKind, FilterPart, Tag, POINT_LEN};
use crate::error::{array, bad_id, Malformed, Problem};
use crate::groups::{FetchedKeyPackage, MultiSendResult};
use crate::ids::{AccountId, DeviceAddress, DeviceId, MessageId};
use crate::keys::DeviceBundle;
use crate::limits::PUBLIC_KEY_LEN;
use crate::media::BlobStatus;
use crate::v1::{self, response::Result as Wire, server_frame::Body};
use crate::verification::{VerificationId, VERIFICATION_ID_LEN};

#[cfg(test)]
mod tests;

/// A successful answer, one variant per `Response` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The new account's first device; the connection is now that device.
    Register(DeviceAddress),
    /// The added device's id.
    AddDevice(DeviceId),
    /// Authenticated.
    Auth {
        /// Messages waiting in the mailbox at authentication.
        queued: u64,
        /// The certificate the relay serves next, while one is staged.
        next_certificate: Option<NextCertificate>,
    },
    /// Answers both `Send` and `SealedSend`: every envelope is stored.
    Send {
        /// How many envelopes were queued.
        accepted: u32,
    },
    /// Acknowledged.
    Ack {
        /// How many of the acknowledged messages were still stored.
        deleted: u32,
    },
    /// Pong.
    Ping,
    /// Keys stored.
    PublishKeys {
        /// One-time prekeys the relay now holds for the device.
        one_time_prekeys: u32,
    },
    /// Prekey bundles, one per device that has published keys.
    FetchKeys(Vec<DeviceBundle>),
    /// A sender certificate for the authenticated device.
    SenderCertificate(IssuedCertificate),
    /// Delivery token set.
    SetDeliveryToken,
    /// The relay's sender-certificate signing key.
    RelayInfo {
        /// Ed25519 public key.
        signing_key: [u8; PUBLIC_KEY_LEN],
    },
    /// What the relay holds for a blob; `None` if nothing (or it expired).
    BlobStatus(Option<BlobStatus>),
    /// The blob lives another term.
    TouchBlob {
        /// Its new expiry (Unix ms).
        expires_at_ms: u64,
    },
    /// An account's device ids and its signed device list.
    ListDevices {
        /// The devices the relay holds.
        devices: Vec<DeviceId>,
        /// The account's current signed list (signature not yet verified); `None`
        /// if it never published one.
        list: Option<SignedDeviceList>,
    },
    /// The account is deleted (durably); the relay closes the connection next.
    DeleteAccount,
    /// Evaluated points, 32 bytes each, in the order asked.
    DiscoveryEvaluated(Bytes),
    /// The tags found and discoverable.
    DiscoveryFound(Vec<DiscoveredAccount>),
    /// One part of the published filter.
    DiscoveryFilterPart(FilterPart),
    /// Discoverability set.
    SetDiscoverable,
    /// A verification code is on its way.
    VerificationStarted {
        /// The session to answer with the code.
        session: VerificationId,
        /// When the code expires (Unix ms).
        expires_at_ms: u64,
    },
    /// The number is verified.
    Verified {
        /// Whether the account is now discoverable by it.
        discoverable: bool,
    },
    /// The provisioning slot is open.
    OpenProvisioning {
        /// When it expires (Unix ms).
        expires_at_ms: u64,
    },
    /// The payload is in the slot.
    DepositProvisioning,
    /// The slot's payload (the slot is gone), or `None`: not deposited yet.
    TakeProvisioning(Option<Bytes>),
    /// The device list is published.
    PublishDeviceList,
    /// The device is removed (durably).
    RemoveDevice,
    /// Key packages stored.
    PublishKeyPackages {
        /// One-time packages the relay now holds for the device.
        stored: u32,
    },
    /// One key package per device that has one.
    FetchKeyPackages(Vec<FetchedKeyPackage>),
    /// The group handle is registered at epoch 0.
    CreateGroup,
    /// The commit is stored for every accepted device and the group is at `epoch`.
    GroupCommit {
        /// The group's new epoch.
        epoch: u64,
        /// One result per send of the commit, in order.
        results: Vec<MultiSendResult>,
    },
    /// What was stored of a multi-recipient send.
    MultiSend(MultiSendResult),
    /// The device's push target is stored (and, for a UnifiedPush endpoint, checked).
    SetPushTarget,
    /// The device has no push target now.
    ClearPushTarget,
}

/// A refusal: the code, a human-readable detail (never identifiers or message
/// bytes), and when to retry (0: no advice).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", if message.is_empty() { code.as_str() } else { message.as_str() })]
pub struct ErrorReply {
    /// Why.
    pub code: ErrorCode,
    /// Detail for people.
    pub message: String,
    /// Retry after this many ms; 0 when there is no advice.
    pub retry_after_ms: u64,
    /// For [`ErrorCode::WrongCode`]: codes the session still accepts; else 0.
    pub attempts_left: u32,
    /// For [`ErrorCode::StaleEpoch`]: the group's current epoch; else 0.
    pub current_epoch: u64,
}

/// A message a relay pushes to its client on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// The answer to request `id` (0: a frame the relay could not read).
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        result: Result<Reply, ErrorReply>,
    },
    /// A queued or new message.
    Delivery(Delivery),
    /// Everything queued when the connection authenticated has been pushed.
    QueueEmpty,
    /// The operator staged a certificate: the relay serves it from its switch time.
    NextCertificate(NextCertificate),
}

/// A certificate the relay serves from `switch_at_ms` on (`tern-relay admin
/// rotate-cert`). A client pins it next to the current one, but only when told so
/// over a connection verified under a pin it already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextCertificate {
    /// SHA-256 of the certificate's DER.
    pub fingerprint: Fingerprint,
    /// When the relay starts serving it (Unix ms).
    pub switch_at_ms: u64,
}

impl From<NextCertificate> for v1::NextCertificate {
    fn from(n: NextCertificate) -> Self {
        v1::NextCertificate {
            fingerprint: copy(&n.fingerprint.0),
            switch_at_ms: n.switch_at_ms,
        }
    }
}

impl TryFrom<&v1::NextCertificate> for NextCertificate {
    type Error = Malformed;
    fn try_from(n: &v1::NextCertificate) -> Result<Self, Malformed> {
        Ok(NextCertificate {
            fingerprint: Fingerprint(array(
                &n.fingerprint,
                "next_certificate.fingerprint",
                "a certificate fingerprint",
                BAD,
            )?),
            switch_at_ms: n.switch_at_ms,
        })
    }
}

/// A message pushed by the relay. Acknowledge it with its `seq` once it is safely
/// stored on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The relay's sequence number; acknowledge with it.
    pub seq: u64,
    /// The sender's message id.
    pub message_id: MessageId,
    /// Ciphertext: this device's own part when the message has a shared body.
    pub payload: Bytes,
    /// The body of a message sent to many devices at once, stored once by the
    /// relay; `None` for an ordinary send.
    pub shared_body: Option<Bytes>,
    /// When the relay accepted it (Unix ms).
    pub accepted_at_ms: u64,
    /// When the relay will delete it if unacknowledged (Unix ms).
    pub expires_at_ms: u64,
}

/// A server frame that decoded but is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{malformed}")]
pub struct ServerFrameError {
    request_id: Option<u64>,
    malformed: Malformed,
}

impl ErrorReply {
    /// A refusal with no retry advice.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            retry_after_ms: 0,
            attempts_left: 0,
            current_epoch: 0,
        }
    }

    /// [`ErrorCode::WrongCode`] with the attempts the session still accepts.
    pub fn wrong_code(attempts_left: u32) -> Self {
        ErrorReply {
            attempts_left,
            ..ErrorReply::new(ErrorCode::WrongCode, "wrong code")
        }
    }

    /// [`ErrorCode::StaleEpoch`] with the group's current epoch.
    pub fn stale_epoch(current_epoch: u64) -> Self {
        ErrorReply {
            current_epoch,
            ..ErrorReply::new(ErrorCode::StaleEpoch, "stale epoch")
        }
    }
}

impl ServerFrameError {
    /// `Some(id)` when the frame is a response to request `id` whose reply is
    /// malformed: that request fails, the connection can carry on. `None` when the
    /// frame as a whole is broken (no body, a response without a result, a delivery
    /// with a bad message id): the connection cannot be trusted further.
    pub fn request_id(&self) -> Option<u64> {
        self.request_id
    }

    /// What was wrong.
    pub fn malformed(&self) -> &Malformed {
        &self.malformed
    }
}

impl From<ErrorReply> for v1::Error {
    fn from(e: ErrorReply) -> Self {
        v1::Error {
            code: e.code.to_wire(),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            attempts_left: e.attempts_left,
            current_epoch: e.current_epoch,
        }
    }
}

/// Unknown codes become [`ErrorCode::Unspecified`].
impl From<v1::Error> for ErrorReply {
    fn from(e: v1::Error) -> Self {
        ErrorReply {
            code: ErrorCode::from_wire(e.code),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            attempts_left: e.attempts_left,
            current_epoch: e.current_epoch,
        }
    }
}

fn copy(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

impl From<Reply> for Wire {
    fn from(reply: Reply) -> Self {
        match reply {
            Reply::Register(address) => Wire::Register(v1::RegisterResponse {
                account_id: copy(address.account.as_bytes()),
                device_id: address.device.get(),
            }),
            Reply::AddDevice(device) => Wire::AddDevice(v1::AddDeviceResponse {
                device_id: device.get(),
            }),
            Reply::Auth {
                queued,
                next_certificate,
            } => Wire::Auth(v1::AuthResponse {
                queued,
                next_certificate: next_certificate.map(Into::into),
            }),
            Reply::Send { accepted } => Wire::Send(v1::SendResponse { accepted }),
            Reply::Ack { deleted } => Wire::Ack(v1::AckResponse { deleted }),
            Reply::Ping => Wire::Ping(v1::PingResponse {}),
            Reply::PublishKeys { one_time_prekeys } => {
                Wire::PublishKeys(v1::PublishKeysResponse { one_time_prekeys })
            }
            Reply::FetchKeys(bundles) => Wire::FetchKeys(v1::FetchKeysResponse {
                bundles: bundles.iter().map(v1::PreKeyBundle::from).collect(),
            }),
            Reply::SenderCertificate(c) => Wire::SenderCertificate(v1::SenderCertificateResponse {
                certificate: c.certificate,
                signature: copy(&c.signature),
            }),
            Reply::SetDeliveryToken => Wire::SetDeliveryToken(v1::SetDeliveryTokenResponse {}),
            Reply::RelayInfo { signing_key } => Wire::RelayInfo(v1::RelayInfoResponse {
                signing_key: copy(&signing_key),
            }),
            Reply::BlobStatus(status) => Wire::BlobStatus(match status {
                Some(s) => v1::BlobStatusResponse {
                    exists: true,
                    size: s.size,
                    expires_at_ms: s.expires_at_ms,
                },
                None => v1::BlobStatusResponse::default(),
            }),
            Reply::TouchBlob { expires_at_ms } => {
                Wire::TouchBlob(v1::TouchBlobResponse { expires_at_ms })
            }
            Reply::ListDevices { devices, list } => {
                let (device_list, device_list_signature) =
                    list.map_or_else(Default::default, SignedDeviceList::into_wire);
                Wire::ListDevices(v1::ListDevicesResponse {
                    device_ids: devices.into_iter().map(DeviceId::get).collect(),
                    device_list,
                    device_list_signature,
                })
            }
            Reply::DeleteAccount => Wire::DeleteAccount(v1::DeleteAccountResponse {}),
            Reply::DiscoveryEvaluated(evaluated) => {
                Wire::DiscoveryEvaluated(v1::DiscoveryEvaluated { evaluated })
            }
            Reply::DiscoveryFound(found) => Wire::DiscoveryFound(v1::DiscoveryFound {
                accounts: found
                    .into_iter()
                    .map(|a| v1::DiscoveredAccount {
                        tag: copy(&a.tag.0),
                        account_id: copy(a.account.as_bytes()),
                        identity_key: copy(&a.identity_key),
                    })
                    .collect(),
            }),
            Reply::DiscoveryFilterPart(p) => Wire::DiscoveryFilterPart(v1::DiscoveryFilterPart {
                day: p.day,
                kind: match p.kind {
                    FilterKind::Snapshot => v1::FilterKind::Snapshot,
                    FilterKind::Deltas => v1::FilterKind::Deltas,
                } as i32,
                parts: p.parts,
                part: p.part,
                data: p.data,
            }),
            Reply::SetDiscoverable => Wire::SetDiscoverable(v1::SetDiscoverableResponse {}),
            Reply::VerificationStarted {
                session,
                expires_at_ms,
            } => Wire::VerificationStarted(v1::VerificationStarted {
                session_id: copy(&session.0),
                expires_at_ms,
            }),
            Reply::Verified { discoverable } => Wire::Verified(v1::Verified { discoverable }),
            Reply::OpenProvisioning { expires_at_ms } => {
                Wire::OpenProvisioning(v1::OpenProvisioningResponse { expires_at_ms })
            }
            Reply::DepositProvisioning => {
                Wire::DepositProvisioning(v1::DepositProvisioningResponse {})
            }
            Reply::TakeProvisioning(payload) => {
                Wire::TakeProvisioning(v1::TakeProvisioningResponse {
                    payload: payload.unwrap_or_default(),
                })
            }
            Reply::PublishDeviceList => Wire::PublishDeviceList(v1::PublishDeviceListResponse {}),
            Reply::RemoveDevice => Wire::RemoveDevice(v1::RemoveDeviceResponse {}),
            Reply::PublishKeyPackages { stored } => {
                Wire::PublishKeyPackages(v1::PublishKeyPackagesResponse { stored })
            }
            Reply::FetchKeyPackages(packages) => {
                Wire::FetchKeyPackages(v1::FetchKeyPackagesResponse {
                    key_packages: packages.into_iter().map(Into::into).collect(),
                })
            }
            Reply::CreateGroup => Wire::CreateGroup(v1::CreateGroupResponse {}),
            Reply::GroupCommit { epoch, results } => Wire::GroupCommit(v1::GroupCommitResponse {
                epoch,
                results: results.into_iter().map(Into::into).collect(),
            }),
            Reply::MultiSend(result) => Wire::MultiSend(result.into()),
            Reply::SetPushTarget => Wire::SetPushTarget(v1::SetPushTargetResponse {}),
            Reply::ClearPushTarget => Wire::ClearPushTarget(v1::ClearPushTargetResponse {}),
        }
    }
}

impl From<Result<Reply, ErrorReply>> for Wire {
    fn from(result: Result<Reply, ErrorReply>) -> Self {
        match result {
            Ok(reply) => reply.into(),
            Err(e) => Wire::Error(e.into()),
        }
    }
}

const BAD: ErrorCode = ErrorCode::BadRequest;

/// Checks one response result; `Err(ErrorReply)` inside `Ok` is the relay's refusal.
impl TryFrom<Wire> for Result<Reply, ErrorReply> {
    type Error = Malformed;
    fn try_from(wire: Wire) -> Result<Self, Malformed> {
        Ok(Ok(match wire {
            Wire::Error(e) => return Ok(Err(e.into())),
            Wire::Register(r) => Reply::Register(DeviceAddress {
                account: AccountId::try_from(&r.account_id[..])
                    .map_err(bad_id("register_response.account_id"))?,
                device: DeviceId::try_from(r.device_id)
                    .map_err(bad_id("register_response.device_id"))?,
            }),
            Wire::AddDevice(r) => Reply::AddDevice(
                DeviceId::try_from(r.device_id).map_err(bad_id("add_device_response.device_id"))?,
            ),
            Wire::Auth(r) => Reply::Auth {
                queued: r.queued,
                next_certificate: r
                    .next_certificate
                    .as_ref()
                    .map(NextCertificate::try_from)
                    .transpose()?,
            },
            Wire::Send(r) => Reply::Send {
                accepted: r.accepted,
            },
            Wire::Ack(r) => Reply::Ack { deleted: r.deleted },
            Wire::Ping(v1::PingResponse {}) => Reply::Ping,
            Wire::PublishKeys(r) => Reply::PublishKeys {
                one_time_prekeys: r.one_time_prekeys,
            },
            Wire::FetchKeys(r) => Reply::FetchKeys(
                r.bundles
                    .iter()
                    .map(DeviceBundle::try_from)
                    .collect::<Result<_, _>>()?,
            ),
            Wire::SenderCertificate(r) => Reply::SenderCertificate(IssuedCertificate {
                signature: array(
                    &r.signature,
                    "sender_certificate_response.signature",
                    "a certificate signature",
                    BAD,
                )?,
                certificate: r.certificate,
            }),
            Wire::SetDeliveryToken(v1::SetDeliveryTokenResponse {}) => Reply::SetDeliveryToken,
            Wire::RelayInfo(r) => Reply::RelayInfo {
                signing_key: array(
                    &r.signing_key,
                    "relay_info_response.signing_key",
                    "a relay signing key",
                    BAD,
                )?,
            },
            Wire::BlobStatus(r) => Reply::BlobStatus(r.exists.then_some(BlobStatus {
                size: r.size,
                expires_at_ms: r.expires_at_ms,
            })),
            Wire::TouchBlob(r) => Reply::TouchBlob {
                expires_at_ms: r.expires_at_ms,
            },
            Wire::ListDevices(r) => Reply::ListDevices {
                devices: r
                    .device_ids
                    .into_iter()
                    .map(|d| {
                        DeviceId::try_from(d).map_err(bad_id("list_devices_response.device_ids"))
                    })
                    .collect::<Result<_, _>>()?,
                list: if r.device_list.is_empty() {
                    None
                } else {
                    let field = "list_devices_response.device_list";
                    Some(
                        SignedDeviceList::parse(r.device_list, &r.device_list_signature)
                            .map_err(|e| Malformed::new(field, e, BAD))?,
                    )
                },
            },
            Wire::DeleteAccount(v1::DeleteAccountResponse {}) => Reply::DeleteAccount,
            Wire::DiscoveryEvaluated(r) => {
                if r.evaluated.is_empty() || r.evaluated.len() % POINT_LEN != 0 {
                    return Err(Malformed::new(
                        "discovery_evaluated.evaluated",
                        Problem::Missing("32-byte points"),
                        BAD,
                    ));
                }
                Reply::DiscoveryEvaluated(r.evaluated)
            }
            Wire::DiscoveryFound(r) => Reply::DiscoveryFound(
                r.accounts
                    .iter()
                    .map(|a| {
                        Ok(DiscoveredAccount {
                            tag: Tag(array(
                                &a.tag,
                                "discovered_account.tag",
                                "a discovery tag",
                                BAD,
                            )?),
                            account: AccountId::try_from(&a.account_id[..])
                                .map_err(bad_id("discovered_account.account_id"))?,
                            identity_key: array(
                                &a.identity_key,
                                "discovered_account.identity_key",
                                "an identity key",
                                BAD,
                            )?,
                        })
                    })
                    .collect::<Result<_, Malformed>>()?,
            ),
            Wire::DiscoveryFilterPart(r) => {
                let kind = match v1::FilterKind::try_from(r.kind) {
                    Ok(v1::FilterKind::Snapshot) => FilterKind::Snapshot,
                    Ok(v1::FilterKind::Deltas) => FilterKind::Deltas,
                    _ => {
                        return Err(Malformed::new(
                            "discovery_filter_part.kind",
                            Problem::Missing("a filter kind"),
                            BAD,
                        ))
                    }
                };
                if r.part >= r.parts {
                    return Err(Malformed::new(
                        "discovery_filter_part.part",
                        Problem::Missing("a part below the part count"),
                        BAD,
                    ));
                }
                Reply::DiscoveryFilterPart(FilterPart {
                    day: r.day,
                    kind,
                    parts: r.parts,
                    part: r.part,
                    data: r.data,
                })
            }
            Wire::SetDiscoverable(v1::SetDiscoverableResponse {}) => Reply::SetDiscoverable,
            Wire::VerificationStarted(r) => Reply::VerificationStarted {
                session: VerificationId(array::<VERIFICATION_ID_LEN>(
                    &r.session_id,
                    "verification_started.session_id",
                    "a verification session id",
                    BAD,
                )?),
                expires_at_ms: r.expires_at_ms,
            },
            Wire::Verified(r) => Reply::Verified {
                discoverable: r.discoverable,
            },
            Wire::OpenProvisioning(r) => Reply::OpenProvisioning {
                expires_at_ms: r.expires_at_ms,
            },
            Wire::DepositProvisioning(v1::DepositProvisioningResponse {}) => {
                Reply::DepositProvisioning
            }
            Wire::TakeProvisioning(r) => {
                if r.payload.len() > crate::limits::MAX_LINK_PAYLOAD {
                    let problem = Problem::TooMany {
                        what: "link payload bytes",
                        got: r.payload.len(),
                        max: crate::limits::MAX_LINK_PAYLOAD,
                    };
                    return Err(Malformed::new("take_provisioning.payload", problem, BAD));
                }
                Reply::TakeProvisioning((!r.payload.is_empty()).then_some(r.payload))
            }
            Wire::PublishDeviceList(v1::PublishDeviceListResponse {}) => Reply::PublishDeviceList,
            Wire::RemoveDevice(v1::RemoveDeviceResponse {}) => Reply::RemoveDevice,
            Wire::PublishKeyPackages(r) => Reply::PublishKeyPackages { stored: r.stored },
            Wire::FetchKeyPackages(r) => Reply::FetchKeyPackages(
                r.key_packages
                    .into_iter()
                    .map(FetchedKeyPackage::try_from)
                    .collect::<Result<_, _>>()?,
            ),
            Wire::CreateGroup(v1::CreateGroupResponse {}) => Reply::CreateGroup,
            Wire::GroupCommit(r) => Reply::GroupCommit {
                epoch: r.epoch,
                results: r.results.into_iter().map(Into::into).collect(),
            },
            Wire::MultiSend(r) => Reply::MultiSend(r.into()),
            Wire::SetPushTarget(v1::SetPushTargetResponse {}) => Reply::SetPushTarget,
            Wire::ClearPushTarget(v1::ClearPushTargetResponse {}) => Reply::ClearPushTarget,
        }))
    }
}

impl From<Delivery> for v1::Delivery {
    fn from(d: Delivery) -> Self {
        v1::Delivery {
            seq: d.seq,
            message_id: copy(d.message_id.as_bytes()),
            payload: d.payload,
            accepted_at_ms: d.accepted_at_ms,
            expires_at_ms: d.expires_at_ms,
            shared_body: d.shared_body.unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::Delivery> for Delivery {
    type Error = Malformed;
    fn try_from(d: v1::Delivery) -> Result<Self, Malformed> {
        Ok(Delivery {
            seq: d.seq,
            message_id: MessageId::try_from(&d.message_id[..])
                .map_err(bad_id("delivery.message_id"))?,
            payload: d.payload,
            shared_body: (!d.shared_body.is_empty()).then_some(d.shared_body),
            accepted_at_ms: d.accepted_at_ms,
            expires_at_ms: d.expires_at_ms,
        })
    }
}

impl From<ServerMessage> for v1::ServerFrame {
    fn from(m: ServerMessage) -> Self {
        let body = match m {
            ServerMessage::Response { id, result } => Body::Response(v1::Response {
                request_id: id,
                result: Some(result.into()),
            }),
            ServerMessage::Delivery(d) => Body::Delivery(d.into()),
            ServerMessage::QueueEmpty => Body::QueueEmpty(v1::QueueEmpty {}),
            ServerMessage::NextCertificate(n) => Body::NextCertificate(n.into()),
        };
        v1::ServerFrame { body: Some(body) }
    }
}

impl TryFrom<v1::ServerFrame> for ServerMessage {
    type Error = ServerFrameError;
    fn try_from(frame: v1::ServerFrame) -> Result<Self, ServerFrameError> {
        let whole = |malformed| ServerFrameError {
            request_id: None,
            malformed,
        };
        match frame.body {
            Some(Body::Response(r)) => {
                let id = r.request_id;
                let wire = r.result.ok_or_else(|| {
                    whole(Malformed::new(
                        "response.result",
                        Problem::Missing("response without a result"),
                        BAD,
                    ))
                })?;
                let result = wire.try_into().map_err(|malformed| ServerFrameError {
                    request_id: Some(id),
                    malformed,
                })?;
                Ok(ServerMessage::Response { id, result })
            }
            Some(Body::Delivery(d)) => Ok(ServerMessage::Delivery(d.try_into().map_err(whole)?)),
            Some(Body::QueueEmpty(v1::QueueEmpty {})) => Ok(ServerMessage::QueueEmpty),
            Some(Body::NextCertificate(n)) => Ok(ServerMessage::NextCertificate(
                NextCertificate::try_from(&n).map_err(whole)?,
            )),
            None => Err(whole(Malformed::new(
                "server_frame.body",
                Problem::Missing("empty frame"),
                BAD,
            ))),
        }
    }
}
