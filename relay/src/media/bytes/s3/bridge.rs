//! The calls' deadlines ([`Bridge`]) and the download reader ([`S3Reader`]) of the
//! object store's blob bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::media::{BlobError, BlobResult};

/// Bytes fetched by one ranged GET of a download.
const WINDOW: u64 = 8 << 20;
/// The slowest rate, in bytes per second, at which the server is expected to
/// assemble or copy an object: a request whose work grows with the blob's size gets
/// that long on top of its deadline (4 GiB: 256 s more).
pub(crate) const MIN_RATE: u64 = 16 << 20;

/// The runtime calls block on; shut down without waiting when the last user goes, so
/// that dropping the store on an async thread does not panic.
pub(crate) struct Bridge {
    pub(super) runtime: Option<tokio::runtime::Runtime>,
    pub(super) timeout: Duration,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Bridge {
    /// Runs `fut` on the store's runtime and waits for it, at most the deadline. The
    /// outer error is the deadline; the inner one the store's answer. Never panics,
    /// whatever thread it is called on; on an async worker it blocks that worker (up to
    /// the deadline), which is why media calls it from `spawn_blocking`.
    pub(super) fn run<T, F>(&self, fut: F) -> BlobResult<object_store::Result<T>>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        self.run_within(self.timeout, fut)
    }

    /// [`Bridge::run`] for a request whose work grows with `bytes` (see [`MIN_RATE`]).
    pub(super) fn call_sized<T, F>(&self, bytes: u64, fut: F) -> BlobResult<T>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let extra = Duration::from_secs(bytes / MIN_RATE + 1);
        self.run_within(self.timeout.saturating_add(extra), fut)?
            .map_err(failed)
    }

    fn run_within<T, F>(&self, timeout: Duration, fut: F) -> BlobResult<object_store::Result<T>>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or(BlobError::Unavailable("object storage client stopped"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, fut).await);
        });
        // A little slack over the runtime's own timer. No `block_on` here: it panics
        // on an async thread, and this wait cannot.
        match rx.recv_timeout(timeout + Duration::from_millis(500)) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) | Err(_) => Err(BlobError::Unavailable("deadline passed")),
        }
    }

    /// [`Bridge::run`], every failure a [`BlobError`].
    pub(super) fn call<T, F>(&self, fut: F) -> BlobResult<T>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        self.run(fut)?.map_err(failed)
    }
}

/// What a failed store call means for media.
pub(super) fn failed(e: object_store::Error) -> BlobError {
    use object_store::Error as E;
    tracing::debug!(error = %e, "object store call failed");
    match e {
        E::NotFound { .. } => BlobError::NotFound,
        // Wrong keys or bucket: the operator's to fix, not the client's to retry. Told
        // in words of our own: the store's text names the object (a blob id) and the
        // request, and this one is logged at warn.
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            BlobError::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the object store refused the relay's credentials",
            ))
        }
        _ => BlobError::Unavailable("request failed"),
    }
}

/// Ignores "not found" (for deletions).
pub(super) fn gone_is_fine(r: object_store::Result<()>) -> object_store::Result<()> {
    match r {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        r => r,
    }
}

/// Streams a blob out of the object store: ranged GETs of up to [`WINDOW`] bytes
/// from where it stands, handed over in chunks.
pub(crate) struct S3Reader {
    store: Arc<AmazonS3>,
    bridge: Arc<Bridge>,
    path: Path,
    pos: u64,
    size: u64,
    chunk: usize,
    /// The GET being read, if any.
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
}

impl S3Reader {
    /// Reads `size` bytes of the object at `path` from `offset`, in chunks of up to
    /// `chunk` bytes, each call within `bridge`'s deadline.
    pub(super) fn new(
        store: Arc<AmazonS3>,
        bridge: Arc<Bridge>,
        path: Path,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> Self {
        S3Reader {
            store,
            bridge,
            path,
            pos: offset,
            size,
            chunk,
            body: None,
        }
    }

    /// The blob's size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `None` at the end, or early if the object is shorter than its
    /// record. Blocks.
    pub(crate) fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        // A window that ended with bytes still to come: one more GET.
        for _ in 0..2 {
            if self.pos >= self.size {
                return Ok(None);
            }
            let body = match self.body.take() {
                Some(b) => b,
                None => self.get()?,
            };
            let chunk = self.chunk;
            let (body, got) = self
                .bridge
                .call(async move {
                    let mut body = body;
                    let mut out = BytesMut::new();
                    while out.len() < chunk {
                        match body.next().await {
                            Some(bytes) => {
                                let bytes: Bytes = bytes?;
                                out.extend_from_slice(&bytes);
                            }
                            None => break,
                        }
                    }
                    Ok((body, out.freeze()))
                })
                .map_err(std::io::Error::other)?;
            if !got.is_empty() {
                self.body = Some(body);
                self.pos += got.len() as u64;
                return Ok(Some(got));
            }
        }
        Ok(None)
    }

    fn get(&self) -> std::io::Result<BoxStream<'static, object_store::Result<Bytes>>> {
        let end = self.size.min(self.pos.saturating_add(WINDOW));
        let options = GetOptions {
            range: Some(GetRange::Bounded(self.pos..end)),
            ..GetOptions::default()
        };
        let (store, path) = (self.store.clone(), self.path.clone());
        self.bridge
            .call(async move { Ok(store.get_opts(&path, options).await?.into_stream()) })
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::failed;

    /// A refusal's text, which is logged at warn, names no object (a blob id).
    #[test]
    fn a_refusal_names_no_object() {
        let refused = object_store::Error::PermissionDenied {
            path: "blobs/00aa11bb".into(),
            source: "403 from https://s3.example/bucket/blobs/00aa11bb".into(),
        };
        let text = failed(refused).to_string();
        assert!(text.contains("refused the relay's credentials"), "{text}");
        assert!(!text.contains("00aa11bb"), "{text}");
    }
}
