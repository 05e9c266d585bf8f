//! Blob bytes in an S3-compatible object store, through `object_store`.
//!
//! Layout in the bucket:
//! - `blobs/<hex id>`: one object per blob, named by its content.
//! - `uploads/<hex key>`: an upload's staging object, a multipart upload while bytes
//!   arrive; the key is a hash of account and blob id, so it names neither.
//! - `uploads/<hex key>.parts`: the upload's manifest (multipart id, part ETags, bytes
//!   committed), rewritten after each part, so that another node or process resumes it.
//!
//! Bytes are buffered per upload up to `part_bytes` and then sent as one part (all
//! parts but the last have that size). Bytes still buffered when a process dies are
//! lost; `upload_len` reports the committed bytes and the client sends the rest again.
//! Completion completes the multipart upload (a single put when it never reached a
//! part), verifies the SHA-256 (the running hash when this process saw every byte,
//! else by streaming the staging object) and copies it to `blobs/<hex id>` on the
//! server; the staging object and manifest are deleted once the blob is recorded. Downloads are ranged GETs streamed in
//! chunks.
//!
//! Calls block on a small runtime of this store's own, each bounded by a deadline: an
//! unreachable store is [`BlobError::Unavailable`] once it passes. The deadline
//! (`[objects] timeout`) is per request: one part, one chunk of a read (the hash of an
//! upload read back is a series of them), one manifest; a request whose work grows
//! with the blob (completing a multipart upload, the server-side copy) gets one more
//! second per [`bridge::MIN_RATE`] bytes. A blob of any size finishes, and a server that
//! stops answering fails a call within its deadline.

mod bridge;
mod buffers;

use super::hex;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

pub(crate) use bridge::S3Reader;
use bridge::{failed, gone_is_fine, Bridge};
pub(crate) use buffers::BUSY_RETRY_MS;
use buffers::{Buffers, PartBuffer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tern_proto::AccountId;

use super::{BlobBytes, BlobReader, OpenUpload};
use crate::media::{lock, BlobError, BlobResult};
use crate::store::BlobId;

/// Bytes hashed per call when an upload is read back.
const HASH_CHUNK: usize = 1 << 20;
/// An upload's buffered bytes and running hash are dropped after this long without
/// use (the client sends those bytes again on its resume), so that uploads abandoned
/// mid-part do not hold memory until the sweeper deletes them.
const IDLE_BUFFER: Duration = Duration::from_secs(600);
/// When the node's buffers are all taken, those of uploads idle this long are
/// dropped to make room (their clients send those bytes again on resume).
const IDLE_UNDER_PRESSURE: Duration = Duration::from_secs(30);

/// How to reach the object store.
#[derive(Clone)]
pub(crate) struct S3Settings {
    /// The bucket.
    pub(crate) bucket: String,
    /// The endpoint URL (`None`: AWS for the region).
    pub(crate) endpoint: Option<String>,
    /// The region (any name for most S3-compatible servers).
    pub(crate) region: String,
    /// Access key id.
    pub(crate) access_key: String,
    /// Secret access key.
    pub(crate) secret_key: String,
    /// Whether plain `http://` endpoints are allowed.
    pub(crate) allow_http: bool,
    /// Upload bytes buffered before they go as one part.
    pub(crate) part_bytes: usize,
    /// Upload bytes this node buffers at most, over all uploads (see
    /// `s3/buffers.rs`).
    pub(crate) buffer_bytes: u64,
    /// The deadline of each call.
    pub(crate) timeout: Duration,
}

/// The part size of the tests' uploads: S3's smallest.
#[cfg(test)]
pub(crate) const TEST_PART: usize = 5 << 20;

#[cfg(test)]
impl S3Settings {
    /// Settings for the test server `s3`, with [`TEST_PART`] parts and `timeout`.
    pub(crate) fn for_test(s3: &crate::testing::TestS3, timeout: std::time::Duration) -> Self {
        S3Settings {
            bucket: s3.bucket().to_owned(),
            endpoint: Some(s3.endpoint().to_owned()),
            region: "us-east-1".into(),
            access_key: s3.access_key().to_owned(),
            secret_key: s3.secret_key().to_owned(),
            allow_http: true,
            part_bytes: TEST_PART,
            buffer_bytes: 256 << 20,
            timeout,
        }
    }
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The most a relay writes: S3 takes at most 10,000 parts, of at most `part_mb` each
/// (2.5 TiB). A manifest past these was not written by a relay, and its numbers are
/// not used.
const MAX_PARTS: usize = 10_000;
const MAX_OBJECT_BYTES: u64 = MAX_PARTS as u64 * (crate::config::MAX_PART_MB << 20);
/// A manifest's JSON: 10,000 ETags of well under 100 bytes each.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// An upload's progress as kept beside its staging object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    /// The multipart upload, once its first part went.
    multipart: Option<String>,
    /// The ETags of the parts sent, in order.
    parts: Vec<String>,
    /// Bytes in those parts (or in the staging object, once `done`).
    committed: u64,
    /// The staging object is whole (the multipart upload was completed).
    done: bool,
}

/// An upload as this process knows it.
struct Staging {
    manifest: Manifest,
    /// Bytes after `committed`, not sent yet.
    buf: Vec<u8>,
    /// The hash of every byte so far, when this process saw them all.
    hash: Option<Sha256>,
    /// The node's buffer `buf` uses, while it holds bytes.
    reserved: Option<PartBuffer>,
    /// Last used.
    touched: Instant,
}

impl Manifest {
    /// The manifest in `json`, if it is within what a relay writes (the bucket is
    /// outside the relay: what it holds is read as input).
    fn parse(json: &[u8]) -> BlobResult<Manifest> {
        let m: Manifest = serde_json::from_slice(json).map_err(invalid_manifest)?;
        if m.committed > MAX_OBJECT_BYTES || m.parts.len() > MAX_PARTS {
            return Err(invalid_manifest(PAST));
        }
        Ok(m)
    }
}

/// Why a manifest past [`MAX_PARTS`], [`MAX_OBJECT_BYTES`] or [`MAX_MANIFEST_BYTES`]
/// is refused.
const PAST: &str = "past what a relay writes";

/// A manifest that is not one a relay wrote (`remove_upload` tells it by its kind).
fn invalid_manifest(why: impl std::fmt::Display) -> BlobError {
    BlobError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("upload manifest: {why}"),
    ))
}

impl Staging {
    fn from_manifest(manifest: Manifest) -> Self {
        let hash = (manifest.committed == 0).then(Sha256::new);
        Staging {
            manifest,
            buf: Vec::new(),
            hash,
            reserved: None,
            touched: Instant::now(),
        }
    }

    fn len(&self) -> u64 {
        self.manifest.committed + self.buf.len() as u64
    }
}

/// Blob bytes in an S3-compatible bucket. See the module docs.
pub(crate) struct S3Bytes {
    /// For small requests: each request ends within the deadline.
    store: Arc<AmazonS3>,
    /// For requests whose time grows with a blob (copies, completions, reads, whose
    /// bodies go over several calls): no deadline of the HTTP client's own; each
    /// call's deadline bounds them (see [`Bridge`]).
    long: Arc<AmazonS3>,
    bridge: Arc<Bridge>,
    part_bytes: usize,
    /// The node's upload buffers.
    buffers: Arc<Buffers>,
    /// See [`IDLE_BUFFER`].
    idle: Duration,
    /// The uploads this process has bytes or a running hash of, by staging key.
    staging: Mutex<HashMap<String, Staging>>,
}

impl S3Bytes {
    /// A client of the bucket in `settings`, with a runtime of its own. Makes no
    /// request.
    pub(crate) fn open(settings: &S3Settings) -> BlobResult<Self> {
        let options = ClientOptions::new()
            .with_connect_timeout(settings.timeout.min(Duration::from_secs(2)))
            .with_allow_http(settings.allow_http);
        let store = Self::client(settings, options.clone().with_timeout(settings.timeout))?;
        let long = Self::client(settings, options.with_timeout_disabled())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tern-s3")
            .enable_all()
            .build()
            .map_err(BlobError::Io)?;
        Ok(S3Bytes {
            store: Arc::new(store),
            long: Arc::new(long),
            bridge: Arc::new(Bridge {
                runtime: Some(runtime),
                timeout: settings.timeout,
            }),
            part_bytes: settings.part_bytes,
            buffers: Buffers::new(settings.buffer_bytes, settings.part_bytes as u64),
            idle: IDLE_BUFFER,
            staging: Mutex::default(),
        })
    }

    fn client(settings: &S3Settings, options: ClientOptions) -> BlobResult<AmazonS3> {
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: settings.timeout,
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key)
            .with_secret_access_key(&settings.secret_key)
            .with_allow_http(settings.allow_http)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder
            .build()
            .map_err(|e| BlobError::Io(std::io::Error::other(e)))
    }

    /// Drops buffers unused for `idle` instead of [`IDLE_BUFFER`] (for tests).
    #[cfg(test)]
    pub(crate) fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    fn blob_path(id: &BlobId) -> Path {
        Path::from(format!("blobs/{}", hex(id)))
    }

    /// The staging key: names neither the account nor the blob.
    fn upload_key(account: &AccountId, id: &BlobId) -> String {
        let name = Sha256::new()
            .chain_update(b"tern upload")
            .chain_update(account.as_bytes())
            .chain_update(id)
            .finalize();
        hex(&name)
    }

    fn staging_path(key: &str) -> Path {
        Path::from(format!("uploads/{key}"))
    }

    fn manifest_path(key: &str) -> Path {
        Path::from(format!("uploads/{key}.parts"))
    }

    /// The upload's manifest as stored (a fresh one if none).
    fn load_manifest(&self, key: &str) -> BlobResult<Manifest> {
        let (store, path) = (self.store.clone(), Self::manifest_path(key));
        let got = self.bridge.run(async move {
            let r = store.get(&path).await?;
            // Read whole: bounded first.
            if r.meta.size > MAX_MANIFEST_BYTES {
                return Ok(None);
            }
            r.bytes().await.map(Some)
        })?;
        match got {
            Ok(Some(bytes)) => Manifest::parse(&bytes),
            Ok(None) => Err(invalid_manifest(PAST)),
            Err(object_store::Error::NotFound { .. }) => Ok(Manifest::default()),
            Err(e) => Err(failed(e)),
        }
    }

    fn save_manifest(&self, key: &str, manifest: &Manifest) -> BlobResult<()> {
        let body =
            serde_json::to_vec(manifest).map_err(|e| BlobError::Io(std::io::Error::other(e)))?;
        let (store, path) = (self.store.clone(), Self::manifest_path(key));
        self.bridge.call(async move {
            store.put(&path, PutPayload::from(body)).await?;
            Ok(())
        })
    }

    /// The upload as this process has it, else as its manifest says.
    fn take(&self, key: &str) -> BlobResult<Staging> {
        if let Some(s) = lock(&self.staging).remove(key) {
            return Ok(s);
        }
        Ok(Staging::from_manifest(self.load_manifest(key)?))
    }

    /// A part's buffer for an upload; when none is free, buffers idle for
    /// [`IDLE_UNDER_PRESSURE`] are dropped first.
    fn reserve(&self) -> BlobResult<PartBuffer> {
        self.buffers.reserve().or_else(|_| {
            let now = Instant::now();
            let idle = self.idle.min(IDLE_UNDER_PRESSURE);
            lock(&self.staging).retain(|_, s| now.duration_since(s.touched) < idle);
            self.buffers.reserve()
        })
    }

    fn put_back(&self, key: String, mut staging: Staging) {
        let now = Instant::now();
        staging.touched = now;
        let mut all = lock(&self.staging);
        all.retain(|_, s| now.duration_since(s.touched) < self.idle);
        all.insert(key, staging);
    }

    /// Sends `data` as the upload's next part and records it in the manifest.
    fn send_part(&self, key: &str, manifest: &mut Manifest, data: Bytes) -> BlobResult<()> {
        let path = Self::staging_path(key);
        let multipart = match &manifest.multipart {
            Some(m) => m.clone(),
            None => {
                let (store, path) = (self.store.clone(), path.clone());
                let m = self
                    .bridge
                    .call(async move { store.create_multipart(&path).await })?;
                manifest.multipart = Some(m.clone());
                m
            }
        };
        let (store, idx, n) = (self.store.clone(), manifest.parts.len(), data.len());
        let part = self.bridge.call(async move {
            store
                .put_part(&path, &multipart, idx, PutPayload::from(data))
                .await
        })?;
        manifest.parts.push(part.content_id);
        manifest.committed += n as u64;
        self.save_manifest(key, manifest)
    }

    /// Makes the staging object whole from the parts and the buffer.
    fn finish_staging(&self, key: &str, staging: &mut Staging) -> BlobResult<()> {
        let path = Self::staging_path(key);
        let rest = Bytes::from(std::mem::take(&mut staging.buf));
        let m = &mut staging.manifest;
        let total = m.committed + rest.len() as u64;
        match m.multipart.clone() {
            None => {
                let store = self.store.clone();
                self.bridge.call(async move {
                    store.put(&path, PutPayload::from(rest)).await?;
                    Ok(())
                })?;
            }
            Some(multipart) => {
                if !rest.is_empty() {
                    if let Err(e) = self.send_part(key, m, rest.clone()) {
                        staging.buf = rest.to_vec();
                        return Err(e);
                    }
                }
                let parts: Vec<PartId> = m
                    .parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.clone(),
                    })
                    .collect();
                let store = self.long.clone();
                self.bridge.call_sized(total, async move {
                    store.complete_multipart(&path, &multipart, parts).await?;
                    Ok(())
                })?;
            }
        }
        staging.reserved = None;
        let m = &mut staging.manifest;
        m.committed = total;
        m.done = true;
        self.save_manifest(key, m)
    }

    /// The SHA-256 of the whole staging object of `size` bytes, read back in
    /// windows and chunks, each with its deadline.
    fn hash_staging(&self, key: &str, size: u64) -> BlobResult<[u8; 32]> {
        let mut reader = self.reader(Self::staging_path(key), 0, size, HASH_CHUNK);
        let mut hash = Sha256::new();
        let mut seen = 0;
        // Each chunk moves the reader on: bounded by `size`.
        while let Some(bytes) = reader.next_chunk().map_err(|e| match e.into_inner() {
            Some(inner) => match inner.downcast::<BlobError>() {
                Ok(blob) => *blob,
                Err(other) => BlobError::Io(std::io::Error::other(other)),
            },
            None => BlobError::Unavailable("request failed"),
        })? {
            seen += bytes.len() as u64;
            hash.update(&bytes);
        }
        if seen != size {
            return Err(BlobError::Incomplete {
                received: seen,
                size,
            });
        }
        Ok(hash.finalize().into())
    }

    fn reader(&self, path: Path, offset: u64, size: u64, chunk: usize) -> S3Reader {
        S3Reader::new(
            self.long.clone(),
            self.bridge.clone(),
            path,
            offset,
            size,
            chunk,
        )
    }

    fn delete(&self, path: Path) -> BlobResult<()> {
        let store = self.store.clone();
        self.bridge
            .call(async move { gone_is_fine(store.delete(&path).await) })
    }
}

/// An upload open for one append; its state goes back to the store when dropped.
struct S3Upload<'a> {
    bytes: &'a S3Bytes,
    key: String,
    staging: Option<Staging>,
}

impl Drop for S3Upload<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.staging.take() {
            self.bytes.put_back(std::mem::take(&mut self.key), s);
        }
    }
}

impl OpenUpload for S3Upload<'_> {
    fn len(&self) -> u64 {
        self.staging.as_ref().map_or(0, Staging::len)
    }

    fn append(mut self: Box<Self>, bytes: &[u8]) -> BlobResult<bool> {
        let part = self.bytes.part_bytes;
        let Some(s) = self.staging.as_mut() else {
            return Err(BlobError::NoUpload);
        };
        if s.reserved.is_none() && !bytes.is_empty() {
            s.reserved = Some(self.bytes.reserve()?);
        }
        s.buf.extend_from_slice(bytes);
        if let Some(h) = &mut s.hash {
            h.update(bytes);
        }
        while s.buf.len() >= part {
            // Copied out, so a failed send keeps the buffer whole.
            let data = Bytes::copy_from_slice(&s.buf[..part]);
            self.bytes.send_part(&self.key, &mut s.manifest, data)?;
            s.buf.drain(..part);
        }
        if s.buf.is_empty() {
            s.reserved = None;
        }
        Ok(false)
    }
}

impl BlobBytes for S3Bytes {
    // Other nodes add and delete blobs: the index counts them (`BlobIndex::blob_bytes`),
    // without a listing of the whole bucket.
    fn stored_bytes(&self) -> BlobResult<Option<u64>> {
        Ok(None)
    }

    fn blob_len(&self, id: &BlobId) -> BlobResult<Option<u64>> {
        let (store, path) = (self.store.clone(), Self::blob_path(id));
        match self.bridge.run(async move { store.head(&path).await })? {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(failed(e)),
        }
    }

    fn upload_len(&self, account: &AccountId, id: &BlobId) -> BlobResult<u64> {
        let key = Self::upload_key(account, id);
        let stored = self.load_manifest(&key)?;
        // Ours unless another node or process moved the upload on since.
        let staging = match lock(&self.staging).remove(&key) {
            Some(ours) if ours.manifest == stored => ours,
            _ => Staging::from_manifest(stored),
        };
        let len = staging.len();
        self.put_back(key, staging);
        Ok(len)
    }

    fn discard_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        self.remove_upload(account, id)
    }

    fn open_upload<'a>(
        &'a self,
        account: &AccountId,
        id: &BlobId,
    ) -> BlobResult<Box<dyn OpenUpload + 'a>> {
        let key = Self::upload_key(account, id);
        let staging = self.take(&key)?;
        Ok(Box::new(S3Upload {
            bytes: self,
            key,
            staging: Some(staging),
        }))
    }

    fn complete_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<[u8; 32]> {
        let key = Self::upload_key(account, id);
        let mut upload = S3Upload {
            bytes: self,
            staging: Some(self.take(&key)?),
            key,
        };
        let Some(s) = upload.staging.as_mut() else {
            return Err(BlobError::NoUpload);
        };
        if s.len() != size {
            return Err(BlobError::Incomplete {
                received: s.len(),
                size,
            });
        }
        // Seen whole here: a wrong upload is refused before anything moves.
        let running: Option<[u8; 32]> = s.hash.clone().map(|h| h.finalize().into());
        if let Some(digest) = running {
            if digest != *id {
                return Ok(digest);
            }
        }
        if !s.manifest.done {
            self.finish_staging(&upload.key, s)?;
        }
        match running {
            Some(digest) => Ok(digest),
            None => self.hash_staging(&upload.key, size),
        }
    }

    fn keep_upload(&self, account: &AccountId, id: &BlobId, size: u64) -> BlobResult<()> {
        let key = Self::upload_key(account, id);
        let (store, from, to) = (
            self.long.clone(),
            Self::staging_path(&key),
            Self::blob_path(id),
        );
        // The staging object and manifest stay until `remove_upload`, after the
        // record: a retry after a failure in between completes from them.
        self.bridge
            .call_sized(size, async move { store.copy(&from, &to).await })
    }

    fn remove_upload(&self, account: &AccountId, id: &BlobId) -> BlobResult<()> {
        let key = Self::upload_key(account, id);
        let ours = lock(&self.staging).remove(&key).map(|s| s.manifest);
        let stored = match self.load_manifest(&key) {
            // A manifest that cannot be read names no upload to abort: the objects go
            // anyway (a multipart upload left behind is for the bucket's lifecycle rule).
            Err(BlobError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Manifest::default()
            }
            r => r?,
        };
        let mut aborted = None;
        for m in ours.into_iter().chain([stored]) {
            if let (Some(multipart), false) = (m.multipart, m.done) {
                if aborted.as_ref() == Some(&multipart) {
                    continue;
                }
                aborted = Some(multipart.clone());
                let (store, path) = (self.store.clone(), Self::staging_path(&key));
                self.bridge.call(async move {
                    gone_is_fine(store.abort_multipart(&path, &multipart).await)
                })?;
            }
        }
        self.delete(Self::staging_path(&key))?;
        self.delete(Self::manifest_path(&key))
    }

    fn remove_blob(&self, id: &BlobId) -> BlobResult<()> {
        self.delete(Self::blob_path(id))
    }

    fn open_read(
        &self,
        id: &BlobId,
        offset: u64,
        size: u64,
        chunk: usize,
    ) -> BlobResult<BlobReader> {
        Ok(BlobReader::S3(self.reader(
            Self::blob_path(id),
            offset,
            size,
            chunk,
        )))
    }
}

#[cfg(test)]
mod manifest_tests {
    use super::{Manifest, MAX_OBJECT_BYTES, MAX_PARTS};

    fn json(m: &Manifest) -> Vec<u8> {
        serde_json::to_vec(m).expect("json")
    }

    /// A manifest is read back as written, and one past what a relay writes (a
    /// damaged or foreign object) is refused before its numbers are added to anything.
    #[test]
    fn a_manifest_past_what_a_relay_writes_is_refused() {
        let fine = Manifest {
            multipart: Some("up".into()),
            parts: vec!["\"etag\"".into(); 3],
            committed: 3 << 20,
            done: false,
        };
        assert_eq!(Manifest::parse(&json(&fine)).expect("parses"), fine);
        let huge = Manifest {
            committed: u64::MAX,
            ..fine.clone()
        };
        assert!(Manifest::parse(&json(&huge)).is_err());
        let most = Manifest {
            committed: MAX_OBJECT_BYTES,
            ..fine.clone()
        };
        assert!(Manifest::parse(&json(&most)).is_ok());
        let many = Manifest {
            parts: vec![String::new(); MAX_PARTS + 1],
            ..fine
        };
        assert!(Manifest::parse(&json(&many)).is_err());
        assert!(Manifest::parse(b"{").is_err());
    }

    /// An upload whose manifest cannot be read is still removed (the sweep and a
    /// fresh `begin` remove uploads), manifest and all.
    #[test]
    fn an_upload_with_a_damaged_manifest_is_removed() {
        use crate::media::bytes::BlobBytes;
        use object_store::ObjectStore;
        use tern_proto::AccountId;

        let s3 = crate::testing::TestS3::start();
        let bytes = super::S3Bytes::open(&super::S3Settings::for_test(
            &s3,
            std::time::Duration::from_secs(10),
        ))
        .expect("client");
        let (account, id) = (AccountId([7; 16]), [9; 32]);
        let path = super::S3Bytes::manifest_path(&super::S3Bytes::upload_key(&account, &id));
        let store = bytes.store.clone();
        let at = path.clone();
        bytes
            .bridge
            .call(async move {
                store
                    .put(&at, b"{\"committed\": 1e30".to_vec().into())
                    .await
            })
            .expect("put a damaged manifest");
        bytes.remove_upload(&account, &id).expect("removed");
        let store = bytes.store.clone();
        let gone = bytes
            .bridge
            .run(async move { store.head(&path).await })
            .expect("run");
        assert!(
            matches!(gone, Err(object_store::Error::NotFound { .. })),
            "{gone:?}"
        );
    }
}
