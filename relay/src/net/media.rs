//! Media transfers: one bidirectional QUIC stream per upload or download, beside the
//! control stream, so a large transfer never holds up messages on the connection.
//! The protocol is in `proto/proto/tern.proto` ("media"); its opening request and the
//! relay's answers are tern-proto's typed [`BlobStreamRequest`] and
//! [`BlobStreamResponse`]. The blob bytes that follow go between the stream and the
//! files as they are, never through a wire type.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use tern_platform::direct_io::{AlignedBuf, DIRECT_ALIGN};
use tern_proto::v1::{self, blob_stream_request::Op};
use tern_proto::{frame, BlobStatus, BlobStreamRequest, BlobStreamResponse, Reply};
use tracing::debug;

use crate::core::auth::AuthenticatedDevice;
use crate::error::Error;
use crate::export::ExportOptions;
use crate::media::{reported_expiry, Begin, BlobError, BlobStore};
use crate::server::Services;
use crate::store::BlobId;
use crate::verification::Verification;

/// Largest request frame on a transfer stream.
const MAX_REQUEST: usize = 4096;
/// Bytes per read from the stream or the file.
const CHUNK: usize = 256 * 1024;
/// Bytes gathered from the stream per write to the upload's file.
const WRITE: usize = 1024 * 1024;

/// Transfers in progress on one connection. A download is an anonymous request: the
/// connection's read loop is told when one starts and ends, and does not count an
/// anonymous connection idle while one runs.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    transfers: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Activity {
    /// Resolves at the next start or end of a transfer (one already signalled
    /// counts).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await
    }

    /// Whether a transfer is running.
    pub(crate) fn busy(&self) -> bool {
        self.transfers.load(Ordering::Acquire) > 0
    }

    fn begin(self: &Arc<Self>) -> Running {
        self.transfers.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
        Running(self.clone())
    }
}

/// A transfer in progress; its end is signalled when dropped.
struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.transfers.fetch_sub(1, Ordering::AcqRel);
        self.0.notify.notify_one();
    }
}

/// Accepts transfer streams until the connection ends, each served in a task of its
/// own.
pub(crate) async fn accept_streams(
    conn: quinn::Connection,
    blobs: Arc<BlobStore>,
    services: Arc<Services>,
    verification: Arc<Verification>,
    who: Arc<OnceLock<AuthenticatedDevice>>,
    activity: Arc<Activity>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let on = Streams {
            blobs: blobs.clone(),
            services: services.clone(),
            verification: verification.clone(),
            who: who.clone(),
            activity: activity.clone(),
        };
        tokio::spawn(transfer(send, recv, on));
    }
}

/// What a transfer stream works with.
struct Streams {
    blobs: Arc<BlobStore>,
    services: Arc<Services>,
    /// Open phone verifications, which an export reports.
    verification: Arc<Verification>,
    who: Arc<OnceLock<AuthenticatedDevice>>,
    activity: Arc<Activity>,
}

/// A control-stream question: does the relay have this blob? Answers
/// [`Reply::BlobStatus`], its expiry rounded down to the UTC day, as every expiry
/// the relay reports ([`reported_expiry`]).
pub(crate) async fn status(blobs: &Arc<BlobStore>, id: &BlobId) -> Result<Reply, Error> {
    let (b, id) = (blobs.clone(), *id);
    let meta = blocking(move || b.status(&id)).await?;
    Ok(Reply::BlobStatus(meta.map(|m| BlobStatus {
        size: m.size,
        expires_at_ms: reported_expiry(m.expires_at),
    })))
}

/// A forward, on the control stream: the blob lives another term. Answers
/// [`Reply::TouchBlob`].
pub(crate) async fn touch(blobs: &Arc<BlobStore>, id: &BlobId) -> Result<Reply, Error> {
    let (b, id) = (blobs.clone(), *id);
    let meta = blocking(move || b.touch(&id)).await?;
    Ok(Reply::TouchBlob {
        expires_at_ms: reported_expiry(meta.expires_at),
    })
}

pub(super) fn error_response(e: &Error) -> BlobStreamResponse {
    debug!(error = %e, "media request refused");
    BlobStreamResponse::Error(e.to_reply())
}

pub(super) async fn respond(send: &mut quinn::SendStream, r: BlobStreamResponse) -> bool {
    let mut buf = BytesMut::new();
    frame::encode(&v1::BlobStreamResponse::from(r), &mut buf);
    send.write_all(&buf).await.is_ok()
}

/// Reads the request frame that opens a transfer stream, as it came.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<v1::BlobStreamRequest, Error> {
    let mut decoder = frame::Decoder::new(MAX_REQUEST);
    let mut buf = BytesMut::new();
    loop {
        if let Some(r) = decoder
            .decode_message::<v1::BlobStreamRequest>(&mut buf)
            .map_err(|e| Error::BadRequest(e.to_string()))?
        {
            if !buf.is_empty() {
                return Err(Error::BadRequest("bytes before the relay's answer".into()));
            }
            return Ok(r);
        }
        match recv.read_chunk(MAX_REQUEST, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            _ => return Err(Error::BadRequest("stream ended before its request".into())),
        }
    }
}

async fn transfer(mut send: quinn::SendStream, mut recv: quinn::RecvStream, on: Streams) {
    let Streams {
        blobs,
        services,
        verification,
        who,
        activity,
    } = on;
    let transfer = read_request(&mut recv)
        .await
        .and_then(|r| check(r, who.get()));
    let result = match transfer {
        Ok(Transfer::Upload {
            device,
            blob_id,
            size,
        }) => upload(&mut send, &mut recv, &blobs, device, blob_id, size).await,
        Ok(Transfer::Download { blob_id, offset }) => {
            let _running = activity.begin();
            download(&mut send, &blobs, blob_id, offset).await
        }
        Ok(Transfer::Export { device, options }) => {
            super::export::stream(&mut send, &services, &verification, device, options).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        respond(&mut send, error_response(&e)).await;
    }
    let _ = send.finish();
}

/// A transfer stream's opening request, checked.
enum Transfer<'a> {
    /// An upload by the device the connection authenticated as.
    Upload {
        device: &'a AuthenticatedDevice,
        blob_id: BlobId,
        size: u64,
    },
    /// A download (the id is the capability).
    Download { blob_id: BlobId, offset: u64 },
    /// An export of the account the connection authenticated for.
    Export {
        device: &'a AuthenticatedDevice,
        options: ExportOptions,
    },
}

/// Checks the opening request into its typed form. An upload needs the device the
/// connection authenticated as; on a connection that is not authenticated it is
/// refused as such before its fields are looked at, as the relay always has.
fn check(
    request: v1::BlobStreamRequest,
    who: Option<&AuthenticatedDevice>,
) -> Result<Transfer<'_>, Error> {
    if who.is_none() && matches!(request.op, Some(Op::Upload(_) | Op::Export(_))) {
        return Err(Error::Unauthorized);
    }
    let request = BlobStreamRequest::try_from(request)
        .map_err(|m| Error::BadRequest(m.problem().to_string()))?;
    Ok(match (request, who) {
        (BlobStreamRequest::Upload { blob_id, size }, Some(device)) => Transfer::Upload {
            device,
            blob_id,
            size,
        },
        (BlobStreamRequest::Upload { .. } | BlobStreamRequest::Export { .. }, None) => {
            return Err(Error::Unauthorized)
        }
        (
            BlobStreamRequest::Export {
                include_ciphertexts,
            },
            Some(device),
        ) => Transfer::Export {
            device,
            options: ExportOptions {
                include_ciphertexts,
            },
        },
        (BlobStreamRequest::Download { blob_id, offset }, _) => {
            Transfer::Download { blob_id, offset }
        }
    })
}

/// Runs blocking file work off the async threads.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Unavailable("media worker stopped"))
}

/// [`off_thread`] for blob store calls.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, Error> {
    Ok(off_thread(f).await??)
}

async fn upload(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    blobs: &Arc<BlobStore>,
    device: &AuthenticatedDevice,
    id: BlobId,
    size: u64,
) -> Result<(), Error> {
    // The device's account will own the blob.
    let device = device.clone();
    let (b, d) = (blobs.clone(), device.clone());
    let begin = blocking(move || b.begin(&d, &id, size)).await?;
    let (mut offset, running) = match begin {
        Begin::Exists(meta) => {
            let ready = BlobStreamResponse::UploadReady {
                offset: meta.size,
                exists: true,
            };
            respond(send, ready).await;
            return Ok(());
        }
        Begin::Upload { offset, running } => (offset, running),
    };
    let ready = BlobStreamResponse::UploadReady {
        offset,
        exists: false,
    };
    if !respond(send, ready).await {
        return Ok(());
    }
    // QUIC hands over a packet's worth at a time; the file gets big aligned writes
    // (after a resume, the first one ends on an aligned offset).
    let room = |offset: u64| WRITE - (offset % DIRECT_ALIGN as u64) as usize;
    let mut buf = AlignedBuf::new(WRITE);
    buf.reset(room(offset));
    loop {
        let chunk = match recv.read_chunk(CHUNK, true).await {
            Ok(c) => c,
            Err(_) => {
                // The connection dropped: keep what arrived, for a resume.
                if !buf.as_slice().is_empty() {
                    let _ = write_out(blobs, &device, id, offset, buf).await;
                }
                return Ok(());
            }
        };
        let Some(chunk) = chunk else {
            if !buf.as_slice().is_empty() {
                write_out(blobs, &device, id, offset, buf).await?;
            }
            break;
        };
        let mut rest = &chunk.bytes[..];
        while !rest.is_empty() {
            rest = &rest[buf.fill(rest)..];
            if buf.is_full() {
                let (back, len) = write_out(blobs, &device, id, offset, buf).await?;
                offset = len;
                buf = back;
                buf.reset(room(offset));
            }
        }
    }
    let b = blobs.clone();
    let meta = blocking(move || b.finish(&device, &id)).await?;
    drop(running);
    crate::metrics::blob_transfer(crate::metrics::Direction::Upload);
    let done = BlobStreamResponse::UploadDone {
        expires_at_ms: reported_expiry(meta.expires_at),
    };
    respond(send, done).await;
    Ok(())
}

/// Appends `buf` to the upload, waiting out the account's rate limit; hands the
/// buffer back with the upload's new length.
async fn write_out(
    blobs: &Arc<BlobStore>,
    device: &AuthenticatedDevice,
    id: BlobId,
    offset: u64,
    mut buf: AlignedBuf,
) -> Result<(AlignedBuf, u64), Error> {
    loop {
        let (b, d) = (blobs.clone(), device.clone());
        let (back, appended) = off_thread(move || {
            let r = b.append(&d, &id, offset, buf.as_slice());
            (buf, r)
        })
        .await?;
        buf = back;
        match appended {
            Ok(len) => {
                let n = buf.as_slice().len();
                crate::metrics::blob_bytes(crate::metrics::Direction::Upload, n);
                return Ok((buf, len));
            }
            // Over the account's rate: the relay slows the upload down.
            Err(BlobError::RateLimited { retry_after }) => {
                tokio::time::sleep(retry_after).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn download(
    send: &mut quinn::SendStream,
    blobs: &Arc<BlobStore>,
    id: BlobId,
    offset: u64,
) -> Result<(), Error> {
    let b = blobs.clone();
    let mut reader = blocking(move || b.open_read(&id, offset, CHUNK)).await?;
    let ready = BlobStreamResponse::DownloadReady {
        size: reader.size(),
        offset,
    };
    if !respond(send, ready).await {
        return Ok(());
    }
    loop {
        let (back, chunk) = off_thread(move || {
            let chunk = reader.next_chunk();
            (reader, chunk)
        })
        .await?;
        reader = back;
        // None early: the file is shorter than its record; the client sees a short blob.
        let Some(chunk) = chunk? else { break };
        let n = chunk.len();
        if send.write_chunk(chunk).await.is_err() {
            return Ok(());
        }
        crate::metrics::blob_bytes(crate::metrics::Direction::Download, n);
    }
    crate::metrics::blob_transfer(crate::metrics::Direction::Download);
    Ok(())
}
