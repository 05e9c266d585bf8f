//! Media on the wire: blob questions on the control stream, bytes on a stream of
//! their own per transfer (see `proto/proto/tern.proto`, "media"). A transfer opens
//! with tern-proto's typed [`BlobStreamRequest`] and [`BlobStreamResponse`]; the
//! blob bytes that follow go between the stream and the file as they are.

use std::time::Duration;

use bytes::BytesMut;
use tern_proto::v1;
use tern_proto::{frame, BlobStreamRequest, BlobStreamResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{relay_error, RelayConnection, Reply};
use crate::error::{Error, Result};

/// Bytes per stream write or read.
const CHUNK: usize = 256 * 1024;
/// Largest response frame on a transfer stream.
const MAX_RESPONSE: usize = 64 * 1024;

#[doc(no_inline)]
pub use tern_proto::BlobStatus;

/// How an upload went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes this call sent (0 when the relay had the blob, less than the size when
    /// it resumed an earlier upload).
    pub sent: u64,
    /// The relay already had the blob: nothing was uploaded; its life was extended.
    pub existed: bool,
}

/// Reads the relay's next answer on a transfer stream; a refusal is [`Error::Relay`].
async fn read_response(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<BlobStreamResponse> {
    let mut decoder = frame::Decoder::new(MAX_RESPONSE);
    loop {
        if let Some(r) = decoder
            .decode_checked::<v1::BlobStreamResponse, BlobStreamResponse>(buf)
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            return match r {
                Ok(BlobStreamResponse::Error(e)) => Err(relay_error(e)),
                Ok(other) => Ok(other),
                Err(e) => Err(Error::Protocol(e.problem().to_string())),
            };
        }
        match recv.read_chunk(MAX_RESPONSE, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Err(Error::Closed("media stream ended".into())),
            Err(e) => return Err(Error::Closed(e.to_string())),
        }
    }
}

/// How long a stopped upload waits for the relay to say why.
const REFUSAL_WAIT: Duration = Duration::from_secs(5);

/// Why an upload's write failed: the relay stops the stream when it refuses the
/// bytes (a full disk, a budget), after answering with the reason, which is then
/// the error; otherwise the write's own.
async fn refusal(recv: &mut quinn::RecvStream, buf: &mut BytesMut, e: quinn::WriteError) -> Error {
    match tokio::time::timeout(REFUSAL_WAIT, read_response(recv, buf)).await {
        Ok(Err(answer)) if answer.relay_code().is_some() => answer,
        _ => Error::Closed(e.to_string()),
    }
}

impl RelayConnection {
    /// Whether the relay has the blob; `None` if not (or it expired).
    pub async fn blob_status(&self, blob_id: &[u8; 32]) -> Result<Option<BlobStatus>> {
        match self
            .request(tern_proto::Request::BlobStatus { blob_id: *blob_id })
            .await?
        {
            Reply::BlobStatus(status) => Ok(status),
            _ => Err(Error::Protocol("unexpected reply to blob_status".into())),
        }
    }

    /// A forward: the relay keeps the blob another full term. Fails with the relay's
    /// `NOT_FOUND` if it no longer has it.
    pub async fn touch_blob(&self, blob_id: &[u8; 32]) -> Result<u64> {
        match self
            .request(tern_proto::Request::TouchBlob { blob_id: *blob_id })
            .await?
        {
            Reply::TouchBlob { expires_at_ms } => Ok(expires_at_ms),
            _ => Err(Error::Protocol("unexpected reply to touch_blob".into())),
        }
    }

    async fn open_transfer(
        &self,
        request: BlobStreamRequest,
    ) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| Error::Closed(e.to_string()))?;
        let mut buf = BytesMut::new();
        frame::encode(&v1::BlobStreamRequest::from(request), &mut buf);
        send.write_all(&buf)
            .await
            .map_err(|e| Error::Closed(e.to_string()))?;
        Ok((send, recv))
    }

    /// Uploads `size` bytes named `blob_id` from `source`, which must be positioned
    /// at its start. The relay answers where to begin: nothing if it has the blob,
    /// or after the bytes an earlier, interrupted upload left. Needs an authenticated
    /// connection. The relay checks the bytes against the id before keeping them.
    pub async fn upload_blob<R: AsyncRead + tokio::io::AsyncSeek + Unpin>(
        &self,
        blob_id: &[u8; 32],
        size: u64,
        source: &mut R,
    ) -> Result<Uploaded> {
        let (mut send, mut recv) = self
            .open_transfer(BlobStreamRequest::Upload {
                blob_id: *blob_id,
                size,
            })
            .await?;
        let mut buf = BytesMut::new();
        let offset = match read_response(&mut recv, &mut buf).await? {
            BlobStreamResponse::UploadReady { exists: true, .. } => {
                return Ok(Uploaded {
                    sent: 0,
                    existed: true,
                })
            }
            BlobStreamResponse::UploadReady { offset, .. } => offset,
            _ => return Err(Error::Protocol("unexpected media response".into())),
        };
        if offset > size {
            return Err(Error::Protocol(
                "the relay asked to resume past the end".into(),
            ));
        }
        tokio::io::AsyncSeekExt::seek(source, std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::Media(e.to_string()))?;
        let mut left = size - offset;
        let mut chunk = vec![0u8; CHUNK];
        while left > 0 {
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = source
                .read(&mut chunk[..want])
                .await
                .map_err(|e| Error::Media(e.to_string()))?;
            if n == 0 {
                return Err(Error::Media("the source ended before its size".into()));
            }
            if let Err(e) = send.write_all(&chunk[..n]).await {
                return Err(refusal(&mut recv, &mut buf, e).await);
            }
            left -= n as u64;
        }
        send.finish().map_err(|e| Error::Closed(e.to_string()))?;
        match read_response(&mut recv, &mut buf).await? {
            BlobStreamResponse::UploadDone { .. } => Ok(Uploaded {
                sent: size - offset,
                existed: false,
            }),
            _ => Err(Error::Protocol("unexpected media response".into())),
        }
    }

    /// Downloads a blob from `offset` into `sink`; returns the blob's whole size.
    /// Any connection will do: the id is the capability.
    pub async fn download_blob<W: AsyncWrite + Unpin>(
        &self,
        blob_id: &[u8; 32],
        offset: u64,
        sink: &mut W,
    ) -> Result<u64> {
        let (mut send, mut recv) = self
            .open_transfer(BlobStreamRequest::Download {
                blob_id: *blob_id,
                offset,
            })
            .await?;
        let _ = send.finish();
        let mut buf = BytesMut::new();
        let (size, start) = match read_response(&mut recv, &mut buf).await? {
            BlobStreamResponse::DownloadReady { size, offset } => (size, offset),
            _ => return Err(Error::Protocol("unexpected media response".into())),
        };
        if start != offset || offset > size {
            return Err(Error::Protocol(
                "the relay answered another range than asked".into(),
            ));
        }
        let mut got = start;
        // Bytes that came with the response frame.
        if !buf.is_empty() {
            got += buf.len() as u64;
            sink.write_all(&buf)
                .await
                .map_err(|e| Error::Media(e.to_string()))?;
        }
        // QUIC hands over a packet's worth at a time; the sink gets big writes.
        let mut pending = BytesMut::with_capacity(CHUNK);
        loop {
            let ended = match recv.read_chunk(CHUNK, true).await {
                Ok(Some(c)) => {
                    got += c.bytes.len() as u64;
                    if got > size {
                        return Err(Error::Protocol("more bytes than the blob's size".into()));
                    }
                    pending.extend_from_slice(&c.bytes);
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    // Keep what arrived, so a retry resumes after it.
                    let _ = sink.write_all(&pending).await;
                    let _ = sink.flush().await;
                    return Err(Error::Closed(e.to_string()));
                }
            };
            if pending.len() >= CHUNK || ended {
                sink.write_all(&pending)
                    .await
                    .map_err(|e| Error::Media(e.to_string()))?;
                pending.clear();
            }
            if ended {
                break;
            }
        }
        sink.flush()
            .await
            .map_err(|e| Error::Media(e.to_string()))?;
        if got != size {
            return Err(Error::Closed(format!(
                "download stopped at byte {got} of {size}"
            )));
        }
        Ok(size)
    }
    /// Writes into `sink` everything the relay holds about this connection's account
    /// (authenticated connections only): one JSON document in the shape of the
    /// relay's `account-export-v1.schema.json`, with each queued message's ciphertext
    /// if `include_ciphertexts`. Returns the bytes written. A relay that fails part
    /// way resets the stream: that is an error here, never a short document.
    pub async fn export_account<W: AsyncWrite + Unpin>(
        &self,
        include_ciphertexts: bool,
        sink: &mut W,
    ) -> Result<u64> {
        let (mut send, mut recv) = self
            .open_transfer(BlobStreamRequest::Export {
                include_ciphertexts,
            })
            .await?;
        let _ = send.finish();
        let mut buf = BytesMut::new();
        match read_response(&mut recv, &mut buf).await? {
            BlobStreamResponse::ExportReady => {}
            _ => return Err(Error::Protocol("unexpected media response".into())),
        }
        let media = |e: std::io::Error| Error::Media(e.to_string());
        let mut got = buf.len() as u64;
        sink.write_all(&buf).await.map_err(media)?;
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(c)) => {
                    got += c.bytes.len() as u64;
                    sink.write_all(&c.bytes).await.map_err(media)?;
                }
                Ok(None) => break,
                Err(e) => return Err(Error::Closed(format!("export cut short: {e}"))),
            }
        }
        sink.flush().await.map_err(media)?;
        Ok(got)
    }
}
