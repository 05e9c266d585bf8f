//! Media: blob ids and the typed messages that open a transfer stream.
//!
//! A transfer stream starts with one framed [`BlobStreamRequest`] from the client
//! and one framed [`BlobStreamResponse`] from the relay; raw bytes follow, and an
//! upload ends with a second response (see `proto/proto/tern.proto`, "media").

use bytes::Bytes;

use crate::code::ErrorCode;
use crate::error::{array, Malformed, Problem};
use crate::limits::BLOB_ID_LEN;
use crate::reply::ErrorReply;
use crate::v1::{self, blob_stream_request::Op, blob_stream_response::Result as Res};

/// A blob's id: the SHA-256 of its (encrypted) bytes.
pub type BlobId = [u8; BLOB_ID_LEN];

/// What a relay holds for a blob id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobStatus {
    /// Bytes.
    pub size: u64,
    /// When it expires unless forwarded (Unix ms), rounded down by the relay to the
    /// start of its UTC day.
    pub expires_at_ms: u64,
}

/// The request that opens a transfer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobStreamRequest {
    /// Upload `size` bytes named `blob_id` (an authenticated connection); resumes an
    /// earlier upload of the same blob by the same account.
    Upload {
        /// The blob.
        blob_id: BlobId,
        /// Its whole size.
        size: u64,
    },
    /// Download from `offset` (any connection: the id is the capability).
    Download {
        /// The blob.
        blob_id: BlobId,
        /// Where to start (a resumed download).
        offset: u64,
    },
    /// Export the authenticated device's account (an authenticated connection).
    Export {
        /// Include each queued message's ciphertext.
        include_ciphertexts: bool,
    },
}

/// A relay's answer on a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobStreamResponse {
    /// Refused, or failed.
    Error(ErrorReply),
    /// Send bytes from `offset`; `exists`: the relay has the blob already (its life
    /// was extended) and nothing is to be sent.
    UploadReady {
        /// Where to resume.
        offset: u64,
        /// The relay has the whole blob.
        exists: bool,
    },
    /// Bytes from `offset` to `size` follow.
    DownloadReady {
        /// The blob's whole size.
        size: u64,
        /// Where the bytes start.
        offset: u64,
    },
    /// The upload hashed to its id and is stored.
    UploadDone {
        /// When it expires unless forwarded (Unix ms), rounded down by the relay to the
        /// start of its UTC day.
        expires_at_ms: u64,
    },
    /// The export's JSON follows, until the relay finishes the stream.
    ExportReady,
}

fn blob_id(bytes: &[u8], field: &'static str) -> Result<BlobId, Malformed> {
    array(bytes, field, "a blob id", ErrorCode::BadRequest)
}

/// Checks the opening request: an operation present, a 32-byte blob id (both bad
/// requests, as a relay answers them).
impl TryFrom<v1::BlobStreamRequest> for BlobStreamRequest {
    type Error = Malformed;
    fn try_from(r: v1::BlobStreamRequest) -> Result<Self, Malformed> {
        match r.op {
            Some(Op::Upload(u)) => Ok(BlobStreamRequest::Upload {
                blob_id: blob_id(&u.blob_id, "blob_upload.blob_id")?,
                size: u.size,
            }),
            Some(Op::Download(d)) => Ok(BlobStreamRequest::Download {
                blob_id: blob_id(&d.blob_id, "blob_download.blob_id")?,
                offset: d.offset,
            }),
            Some(Op::Export(e)) => Ok(BlobStreamRequest::Export {
                include_ciphertexts: e.include_ciphertexts,
            }),
            None => Err(Malformed::new(
                "blob_stream_request.op",
                Problem::Missing("empty media request"),
                ErrorCode::BadRequest,
            )),
        }
    }
}

impl From<BlobStreamRequest> for v1::BlobStreamRequest {
    fn from(r: BlobStreamRequest) -> Self {
        let op = match r {
            BlobStreamRequest::Upload { blob_id, size } => Op::Upload(v1::BlobUpload {
                blob_id: Bytes::copy_from_slice(&blob_id),
                size,
            }),
            BlobStreamRequest::Download { blob_id, offset } => Op::Download(v1::BlobDownload {
                blob_id: Bytes::copy_from_slice(&blob_id),
                offset,
            }),
            BlobStreamRequest::Export {
                include_ciphertexts,
            } => Op::Export(v1::ExportRequest {
                include_ciphertexts,
            }),
        };
        v1::BlobStreamRequest { op: Some(op) }
    }
}

/// Checks a relay's answer: a result present.
impl TryFrom<v1::BlobStreamResponse> for BlobStreamResponse {
    type Error = Malformed;
    fn try_from(r: v1::BlobStreamResponse) -> Result<Self, Malformed> {
        Ok(match r.result {
            Some(Res::Error(e)) => BlobStreamResponse::Error(e.into()),
            Some(Res::UploadReady(r)) => BlobStreamResponse::UploadReady {
                offset: r.offset,
                exists: r.exists,
            },
            Some(Res::DownloadReady(r)) => BlobStreamResponse::DownloadReady {
                size: r.size,
                offset: r.offset,
            },
            Some(Res::UploadDone(r)) => BlobStreamResponse::UploadDone {
                expires_at_ms: r.expires_at_ms,
            },
            Some(Res::ExportReady(v1::ExportReady {})) => BlobStreamResponse::ExportReady,
            None => {
                return Err(Malformed::new(
                    "blob_stream_response.result",
                    Problem::Missing("empty media response"),
                    ErrorCode::BadRequest,
                ))
            }
        })
    }
}

impl From<BlobStreamResponse> for v1::BlobStreamResponse {
    fn from(r: BlobStreamResponse) -> Self {
        let result = match r {
            BlobStreamResponse::Error(e) => Res::Error(e.into()),
            BlobStreamResponse::UploadReady { offset, exists } => {
                Res::UploadReady(v1::UploadReady { offset, exists })
            }
            BlobStreamResponse::DownloadReady { size, offset } => {
                Res::DownloadReady(v1::DownloadReady { size, offset })
            }
            BlobStreamResponse::UploadDone { expires_at_ms } => {
                Res::UploadDone(v1::UploadDone { expires_at_ms })
            }
            BlobStreamResponse::ExportReady => Res::ExportReady(v1::ExportReady {}),
        };
        v1::BlobStreamResponse {
            result: Some(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn through_bytes<W: Message + Default>(w: W) -> W {
        W::decode(&w.encode_to_vec()[..]).expect("decodes")
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for r in [
            BlobStreamRequest::Upload {
                blob_id: [1; 32],
                size: 1 << 40,
            },
            BlobStreamRequest::Download {
                blob_id: [2; 32],
                offset: 0,
            },
            BlobStreamRequest::Export {
                include_ciphertexts: true,
            },
        ] {
            let wire = through_bytes(v1::BlobStreamRequest::from(r));
            assert_eq!(BlobStreamRequest::try_from(wire), Ok(r));
        }
        for r in [
            BlobStreamResponse::Error(ErrorReply {
                code: ErrorCode::QuotaExceeded,
                message: "quota".into(),
                retry_after_ms: 5,
                attempts_left: 0,
                current_epoch: 0,
            }),
            BlobStreamResponse::UploadReady {
                offset: 7,
                exists: false,
            },
            BlobStreamResponse::UploadReady {
                offset: 9,
                exists: true,
            },
            BlobStreamResponse::DownloadReady { size: 9, offset: 3 },
            BlobStreamResponse::UploadDone { expires_at_ms: 11 },
            BlobStreamResponse::ExportReady,
        ] {
            let wire = through_bytes(v1::BlobStreamResponse::from(r.clone()));
            assert_eq!(BlobStreamResponse::try_from(wire), Ok(r));
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let empty =
            BlobStreamRequest::try_from(v1::BlobStreamRequest { op: None }).expect_err("no op");
        assert_eq!(empty.code(), ErrorCode::BadRequest);
        assert_eq!(empty.client_message(), "bad request: empty media request");
        for op in [
            Op::Upload(v1::BlobUpload {
                blob_id: Bytes::from_static(&[1; 31]),
                size: 1,
            }),
            Op::Download(v1::BlobDownload {
                blob_id: Bytes::new(),
                offset: 0,
            }),
        ] {
            let e = BlobStreamRequest::try_from(v1::BlobStreamRequest { op: Some(op) })
                .expect_err("short id");
            assert_eq!(e.code(), ErrorCode::BadRequest);
            assert!(e.field().ends_with(".blob_id"), "{e}");
        }
        let e = BlobStreamResponse::try_from(v1::BlobStreamResponse { result: None })
            .expect_err("no result");
        assert_eq!(e.problem(), &Problem::Missing("empty media response"));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(w) = v1::BlobStreamRequest::decode(&bytes[..]) {
                let _ = BlobStreamRequest::try_from(w);
            }
            if let Ok(w) = v1::BlobStreamResponse::decode(&bytes[..]) {
                let _ = BlobStreamResponse::try_from(w);
            }
        }
    }
}
