//! Media transfers: one bidirectional QUIC stream per upload or download, beside the
//! control stream, so a large transfer never holds up messages on the connection.
//! The protocol is in `proto/proto/tern.proto` ("media").

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use tern_proto::v1::{self, blob_stream_request::Op, blob_stream_response::Result as Res};
use tern_proto::{frame, AccountId};
use tracing::debug;

use crate::blobs::{Begin, BlobError, BlobStore, WriteBuf, DIRECT_ALIGN};
use crate::core::auth::AuthenticatedDevice;
use crate::error::Error;
use crate::store::BlobId;

/// Largest request frame on a transfer stream.
const MAX_REQUEST: usize = 4096;
/// Bytes per read from the stream or the file.
const CHUNK: usize = 256 * 1024;
/// Bytes gathered from the stream per write to the upload's file.
const WRITE: usize = 1024 * 1024;

/// Accepts transfer streams until the connection ends, each served in a task of its
/// own.
pub(crate) async fn accept_streams(
    conn: quinn::Connection,
    blobs: Arc<BlobStore>,
    who: Arc<OnceLock<AuthenticatedDevice>>,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(transfer(send, recv, blobs.clone(), who.clone()));
    }
}

/// A control-stream question: does the relay have this blob?
pub(crate) async fn status(
    blobs: &Arc<BlobStore>,
    id: &[u8],
) -> Result<v1::BlobStatusResponse, Error> {
    let (b, id) = (blobs.clone(), blob_id(id)?);
    Ok(match blocking(move || b.status(&id)).await? {
        Some(m) => v1::BlobStatusResponse {
            exists: true,
            size: m.size,
            expires_at_ms: m.expires_at,
        },
        None => v1::BlobStatusResponse::default(),
    })
}

/// A forward, on the control stream: the blob lives another term.
pub(crate) async fn touch(
    blobs: &Arc<BlobStore>,
    id: &[u8],
) -> Result<v1::TouchBlobResponse, Error> {
    let (b, id) = (blobs.clone(), blob_id(id)?);
    let meta = blocking(move || b.touch(&id)).await?;
    Ok(v1::TouchBlobResponse {
        expires_at_ms: meta.expires_at,
    })
}

fn blob_id(bytes: &[u8]) -> Result<BlobId, Error> {
    bytes
        .try_into()
        .map_err(|_| Error::BadRequest("a blob id is 32 bytes".into()))
}

fn error_response(e: &Error) -> v1::BlobStreamResponse {
    debug!(error = %e, "media request refused");
    v1::BlobStreamResponse {
        result: Some(Res::Error(v1::Error {
            code: e.code().to_wire(),
            message: e.client_message(),
            retry_after_ms: e.retry_after_ms(),
        })),
    }
}

async fn respond(send: &mut quinn::SendStream, r: &v1::BlobStreamResponse) -> bool {
    let mut buf = BytesMut::new();
    frame::encode(r, &mut buf);
    send.write_all(&buf).await.is_ok()
}

/// Reads the request frame that opens a transfer stream.
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

async fn transfer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    blobs: Arc<BlobStore>,
    who: Arc<OnceLock<AuthenticatedDevice>>,
) {
    let result = match read_request(&mut recv).await {
        Ok(v1::BlobStreamRequest {
            op: Some(Op::Upload(u)),
        }) => upload(&mut send, &mut recv, &blobs, who.get(), u).await,
        Ok(v1::BlobStreamRequest {
            op: Some(Op::Download(d)),
        }) => download(&mut send, &blobs, d).await,
        Ok(_) => Err(Error::BadRequest("empty media request".into())),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        respond(&mut send, &error_response(&e)).await;
    }
    let _ = send.finish();
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
    who: Option<&AuthenticatedDevice>,
    u: v1::BlobUpload,
) -> Result<(), Error> {
    let account = who.ok_or(Error::Unauthorized)?.address().account;
    let id = blob_id(&u.blob_id)?;
    let size = u.size;
    let b = blobs.clone();
    let begin = blocking(move || b.begin(&account, &id, size)).await?;
    let (mut offset, slot) = match begin {
        Begin::Exists(meta) => {
            respond(
                send,
                &v1::BlobStreamResponse {
                    result: Some(Res::UploadReady(v1::UploadReady {
                        offset: meta.size,
                        exists: true,
                    })),
                },
            )
            .await;
            return Ok(());
        }
        Begin::Upload { offset, slot } => (offset, slot),
    };
    let ready = v1::BlobStreamResponse {
        result: Some(Res::UploadReady(v1::UploadReady {
            offset,
            exists: false,
        })),
    };
    if !respond(send, &ready).await {
        return Ok(());
    }
    // QUIC hands over a packet's worth at a time; the file gets big aligned writes
    // (after a resume, the first one ends on an aligned offset).
    let room = |offset: u64| WRITE - (offset % DIRECT_ALIGN as u64) as usize;
    let mut buf = WriteBuf::new(WRITE);
    buf.reset(room(offset));
    loop {
        let chunk = match recv.read_chunk(CHUNK, true).await {
            Ok(c) => c,
            Err(_) => {
                // The connection dropped: keep what arrived, for a resume.
                if !buf.as_slice().is_empty() {
                    let _ = write_out(blobs, account, id, offset, buf).await;
                }
                return Ok(());
            }
        };
        let Some(chunk) = chunk else {
            if !buf.as_slice().is_empty() {
                write_out(blobs, account, id, offset, buf).await?;
            }
            break;
        };
        let mut rest = &chunk.bytes[..];
        while !rest.is_empty() {
            rest = &rest[buf.fill(rest)..];
            if buf.is_full() {
                let (back, len) = write_out(blobs, account, id, offset, buf).await?;
                offset = len;
                buf = back;
                buf.reset(room(offset));
            }
        }
    }
    let b = blobs.clone();
    let meta = blocking(move || b.finish(&account, &id)).await?;
    drop(slot);
    respond(
        send,
        &v1::BlobStreamResponse {
            result: Some(Res::UploadDone(v1::UploadDone {
                expires_at_ms: meta.expires_at,
            })),
        },
    )
    .await;
    Ok(())
}

/// Appends `buf` to the upload, waiting out the account's rate limit; hands the
/// buffer back with the upload's new length.
async fn write_out(
    blobs: &Arc<BlobStore>,
    account: AccountId,
    id: BlobId,
    offset: u64,
    mut buf: WriteBuf,
) -> Result<(WriteBuf, u64), Error> {
    loop {
        let b = blobs.clone();
        let (back, appended) = off_thread(move || {
            let r = b.append(&account, &id, offset, buf.as_slice());
            (buf, r)
        })
        .await?;
        buf = back;
        match appended {
            Ok(len) => return Ok((buf, len)),
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
    d: v1::BlobDownload,
) -> Result<(), Error> {
    let id = blob_id(&d.blob_id)?;
    let b = blobs.clone();
    let offset = d.offset;
    let mut reader = blocking(move || b.open_read(&id, offset, CHUNK)).await?;
    let ready = v1::BlobStreamResponse {
        result: Some(Res::DownloadReady(v1::DownloadReady {
            size: reader.size(),
            offset,
        })),
    };
    if !respond(send, &ready).await {
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
        if send.write_chunk(chunk).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
