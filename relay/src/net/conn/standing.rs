//! A connection's standing: pending, anonymous or authenticated, with the limits and
//! the deadline each one has, and its place in the admission pools.

use super::{End, Session};
use crate::error::{Error, Result};
use crate::net::admission::AdmissionGuard;
use tern_proto::limits::{DEFAULT_MAX_ENVELOPE, MAX_COMMIT_SENDS, MAX_RECIPIENT_DEVICES};
use tern_proto::Reply;

/// The largest frame a connection that is not authenticated may send as a
/// `MultiSend` or `GroupCommit` (both anonymous by design): a commit and its
/// welcome, each a body at the wire's envelope limit and 1,000 devices at up to
/// 256 bytes each (account, token, device id and part with their framing), and
/// 8 KiB over. About 1 MiB; other requests keep the smaller limit.
pub(super) const GROUP_FRAME: usize =
    MAX_COMMIT_SENDS * (DEFAULT_MAX_ENVELOPE + MAX_RECIPIENT_DEVICES * 256) + 8 * 1024;

/// `ClientFrame`'s field numbers of the two group bodies (`proto/tern.proto`).
const GROUP_COMMIT_FIELD: u32 = 32;
const MULTI_SEND_FIELD: u32 = 33;

/// Bytes of a frame's body enough to read its first two keys: the request id's
/// (1), its varint (up to 10) and the body's key (up to 5).
const PEEK: usize = 16;

/// What the accept loop hands a connection: its admission places and the deadline to
/// authenticate by.
pub(crate) struct Admitted {
    pub(crate) guard: AdmissionGuard,
    pub(crate) deadline: tokio::time::Instant,
}

/// How far a connection has identified itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    Pending,
    Anonymous,
    Authenticated,
}

impl Session {
    /// The frame limit for the connection's standing.
    pub(super) fn frame_limit(&self) -> usize {
        match self.standing {
            Standing::Authenticated => self.settings.max_frame,
            _ => self.settings.unauthenticated_frame,
        }
    }

    /// The frame limit for the frame at the start of `buf` (its 4-byte length, then
    /// a `ClientFrame`): the standing's, or before authentication [`GROUP_FRAME`]
    /// (at most `max_frame`) for a multi-send or group commit between the two
    /// limits, told by its first fields as encoders write them (the request id, then
    /// the body). `None` while too few of its bytes are here to tell (a frame over
    /// the larger limit is refused from its length alone).
    pub(super) fn frame_limit_for(&self, buf: &[u8]) -> Option<usize> {
        let limit = self.frame_limit();
        let Some(header) = buf.first_chunk::<4>() else {
            return Some(limit);
        };
        let len = u32::from_be_bytes(*header) as usize;
        let group = GROUP_FRAME.min(self.settings.max_frame).max(limit);
        // Past either limit: refused at once, unread.
        if self.standing == Standing::Authenticated || len <= limit || len > group {
            return Some(limit);
        }
        let body = buf.get(4..4 + PEEK)?;
        if !is_group_request(body) {
            return Some(limit);
        }
        Some(group)
    }

    /// Answers `TOO_LARGE` for a frame of `len` bytes past the standing's limit and
    /// ends the connection.
    pub(super) async fn frame_too_large(&self, len: usize) -> End {
        let e = Error::TooLarge {
            what: "frame",
            size: len,
            max: self.frame_limit(),
        };
        self.reply(0, Err(e)).await;
        End::Protocol
    }

    /// Takes a place among `max_connections` for a connection that is about to
    /// authenticate or make an anonymous request; if none is free, answers
    /// `UNAVAILABLE` and ends the connection.
    pub(super) async fn take_place(&mut self, id: u64) -> bool {
        if self.standing == Standing::Authenticated || self.admission.promote() {
            return true;
        }
        self.reply(id, Err(Error::Unavailable("at capacity"))).await;
        self.ending = Some(End::Full);
        false
    }

    /// Answers an anonymous request; a success counts as one.
    pub(super) async fn anonymous_reply(&mut self, id: u64, reply: Result<Reply>) {
        if reply.is_ok() {
            self.anonymous_request();
        }
        self.reply(id, reply).await
    }

    /// Records a successful anonymous request: a pending connection becomes
    /// anonymous, and an anonymous one's idle time starts again. False if there is no
    /// place for it among `max_connections`.
    pub(super) fn anonymous_request(&mut self) -> bool {
        if self.standing == Standing::Authenticated {
            return true;
        }
        if !self.admission.promote() {
            return false;
        }
        if self.standing != Standing::Anonymous {
            crate::metrics::connection(crate::metrics::ConnKind::Anonymous);
        }
        self.standing = Standing::Anonymous;
        self.deadline = tokio::time::Instant::now() + self.settings.anonymous_idle;
        true
    }

    /// Lifts the limits before authentication once authenticated.
    pub(super) fn authenticated_now(&mut self) {
        if self.standing != Standing::Authenticated {
            crate::metrics::connection(crate::metrics::ConnKind::Authenticated);
        }
        self.standing = Standing::Authenticated;
        let window = quinn::VarInt::from_u32(self.settings.authenticated_receive_window);
        self.conn.set_receive_window(window);
    }
}

/// The length the frame at the start of `buf` announces (0 while unknown).
pub(super) fn announced(buf: &[u8]) -> usize {
    buf.first_chunk::<4>()
        .map_or(0, |h| u32::from_be_bytes(*h) as usize)
}

/// Whether a request decoded from a frame let past the smaller pre-authentication
/// limit by [`is_group_request`] is a multi-send or group commit after all (or one
/// refused as such): protobuf keeps a oneof's last member, so
/// `[MultiSend][large SealedSend]` decodes as the sealed send. Anything else is
/// `TOO_LARGE`.
pub(super) fn fits_group_frame(
    decoded: &std::result::Result<tern_proto::ClientRequest, tern_proto::RequestError>,
) -> bool {
    use tern_proto::RequestKind;
    let kind = match decoded {
        Ok(r) => Some(r.request.kind()),
        Err(e) => e.kind(),
    };
    matches!(
        kind,
        Some(RequestKind::MultiSend | RequestKind::GroupCommit)
    )
}

/// Whether `body`, the start of a `ClientFrame`, holds a multi-send or a group
/// commit as its first field after an optional request id.
pub(super) fn is_group_request(body: &[u8]) -> bool {
    use prost::encoding::{decode_key, WireType};
    let (_, mut rest) = tern_proto::shape::split_request_id(body);
    matches!(
        decode_key(&mut rest),
        Ok((
            GROUP_COMMIT_FIELD | MULTI_SEND_FIELD,
            WireType::LengthDelimited
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use tern_proto::{
        frame, v1, AccountId, ClientRequest, CommitId, DeviceId, GroupCommit, GroupHandle,
        MessageId, MultiSend, RecipientAccount, Request,
    };

    /// A maximal send: a body at the wire's limit, 1,000 accounts of one device,
    /// each with a 32-byte token and a 64-byte part.
    fn maximal(n: u8) -> MultiSend {
        MultiSend {
            message_id: MessageId([n; 16]),
            body: Bytes::from(vec![n; DEFAULT_MAX_ENVELOPE]),
            recipients: (0..MAX_RECIPIENT_DEVICES as u32)
                .map(|i| RecipientAccount {
                    account: AccountId(
                        [[n; 4], i.to_be_bytes(), [0xAA; 4], [0xBB; 4]]
                            .concat()
                            .try_into()
                            .expect("16"),
                    ),
                    delivery_token: Bytes::from(vec![0x77; 32]),
                    device_list_version: u64::MAX,
                    devices: vec![DeviceId::new(u32::MAX >> 1).expect("id")],
                    parts: vec![Bytes::from(vec![0x55; 64])],
                })
                .collect(),
        }
    }

    fn encoded(request: Request) -> BytesMut {
        let frame: v1::ClientFrame = ClientRequest {
            id: u64::MAX,
            request,
        }
        .into();
        let mut out = BytesMut::new();
        frame::encode(&frame, &mut out);
        out
    }

    #[test]
    fn a_maximal_commit_fits_the_group_frame_and_is_told_by_its_first_bytes() {
        let commit = GroupCommit {
            handle: GroupHandle([1; 16]),
            epoch: u64::MAX,
            epoch_token: [2; 32],
            next_token_hash: [3; 32],
            commit_id: CommitId([4; 16]),
            sends: (0..MAX_COMMIT_SENDS as u8).map(maximal).collect(),
        };
        let commit = encoded(Request::GroupCommit(commit));
        assert!(commit.len() - 4 <= GROUP_FRAME, "{} bytes", commit.len());
        assert!(commit.len() - 4 > 264 * 1024, "over the smaller limit");
        assert!(is_group_request(&commit[4..4 + PEEK]));
        let multi = encoded(Request::MultiSend(maximal(9)));
        assert!(is_group_request(&multi[4..4 + PEEK]));
        for other in [Request::Ping, Request::RelayInfo] {
            assert!(!is_group_request(&encoded(other)[4..]));
        }
        assert!(!is_group_request(&[0xFF; PEEK]), "garbage");
    }

    #[test]
    fn a_group_header_followed_by_a_large_sealed_send_does_not_fit_the_group_frame() {
        let multi = encoded(Request::MultiSend(MultiSend {
            message_id: MessageId([1; 16]),
            body: Bytes::from_static(b"body"),
            recipients: Vec::new(),
        }));
        let sealed = encoded(Request::SealedSend {
            to: tern_proto::DeviceAddress {
                account: AccountId([2; 16]),
                device: DeviceId::PRIMARY,
            },
            delivery_token: Bytes::from_static(b"token"),
            envelopes: vec![tern_proto::Envelope {
                message_id: MessageId([3; 16]),
                payload: Bytes::from(vec![0x33; 600 * 1024]),
            }],
            device_list_version: 0,
        });
        // The two bodies as one frame: the sealed send's fields come last.
        let body = [&multi[4..], &sealed[4..]].concat();
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes());
        frame.extend_from_slice(&body);
        assert!(
            is_group_request(&frame[4..4 + PEEK]),
            "its first bytes say multi-send"
        );
        let decoded = frame::Decoder::new(GROUP_FRAME)
            .decode_request(&mut frame)
            .expect("a frame")
            .expect("whole");
        assert!(
            matches!(&decoded, Ok(r) if matches!(r.request, Request::SealedSend { .. })),
            "oneof: the last member wins"
        );
        assert!(!fits_group_frame(&decoded));
        let multi = frame::Decoder::new(GROUP_FRAME)
            .decode_request(&mut multi.clone())
            .expect("a frame")
            .expect("whole");
        assert!(fits_group_frame(&multi));
    }
}
